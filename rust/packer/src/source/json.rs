//! JSON records: JSONL (one record per line) or a JSON array read element by element
//! ([`ArrayElements`]), from a decoded byte stream (plain, `.gz`, `.zst`), in batches of about
//! [`BATCH_BYTES`] of text. The reader the other formats have in their own modules; the
//! dispatcher ([`crate::source::RecordStream`]) picks it by the file's name and first byte.
//!
//! A shard reads only the lines that begin in its share ([`crate::source::span::Span::lines`];
//! a JSON array is read whole by one shard): its reader starts at its first line, and its
//! records and lines are numbered from there (the merge, which sees every part's counts,
//! makes them the whole file's).

use std::io::BufRead;
use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::input::ArrayElements;
use crate::source::record::{OwnedRecord, Unreadable, BATCH_BYTES};

enum Body {
    Lines(Box<dyn BufRead>),
    Array(ArrayElements<Box<dyn BufRead>>),
}

/// The records of one JSON or JSONL file.
pub(crate) struct JsonRecords {
    path: PathBuf,
    body: Body,
    line: u64,
    index: u64,
    first: bool,
    /// Byte offset (in the decompressed stream) of the next line.
    pos: u64,
    /// No line beginning at or after this offset is read.
    end: u64,
}

impl JsonRecords {
    /// One record per line of `reader`.
    pub(crate) fn lines(path: PathBuf, reader: Box<dyn BufRead>) -> Self {
        Self::new(path, Body::Lines(reader))
    }

    /// The elements of the JSON array `reader` holds.
    pub(crate) fn array(path: PathBuf, reader: Box<dyn BufRead>) -> Self {
        Self::new(path, Body::Array(ArrayElements::new(reader)))
    }

    /// The lines of `reader`, positioned at byte `pos` of the file where a line begins,
    /// that begin before `end`; numbered from 0 (records) and 1 (lines).
    pub(crate) fn lines_between(
        path: PathBuf,
        reader: Box<dyn BufRead>,
        pos: u64,
        end: u64,
    ) -> Self {
        let mut r = Self::new(path, Body::Lines(reader));
        (r.first, r.pos, r.end) = (pos == 0, pos, end);
        r
    }

    fn new(path: PathBuf, body: Body) -> Self {
        JsonRecords {
            path,
            body,
            line: 0,
            index: 0,
            first: true,
            pos: 0,
            end: u64::MAX,
        }
    }

    /// Lines read so far, blank ones included.
    pub(crate) fn lines_read(&self) -> u64 {
        self.line
    }

    /// The next batch of at most `max_records` records; empty at the end of the file.
    pub(crate) fn next_batch(&mut self, max_records: usize) -> Result<Vec<OwnedRecord>> {
        let mut out = Vec::new();
        match &mut self.body {
            Body::Array(elements) => {
                let mut bytes = 0usize;
                while out.len() < max_records && bytes < BATCH_BYTES {
                    let Some(el) = elements
                        .next_element()
                        .map_err(|e| Error::io(&self.path, e))?
                    else {
                        break;
                    };
                    bytes += el.text.as_ref().map_or(0, Vec::len);
                    let text = el.text.map_err(Unreadable::Json).and_then(|t| {
                        String::from_utf8(t).map_err(|e| {
                            let at = e.utf8_error().valid_up_to();
                            Unreadable::Json(format!("invalid UTF-8 at byte {at} of the element"))
                        })
                    });
                    out.push(OwnedRecord {
                        index: el.index,
                        line: el.line,
                        text,
                        value: None,
                    });
                }
            }
            Body::Lines(reader) => {
                let mut bytes = 0usize;
                // A line is read straight into the buffer its record keeps (one copy); a
                // line that makes no record leaves its buffer to the next.
                let mut spare = Vec::new();
                while out.len() < max_records && bytes < BATCH_BYTES && self.pos < self.end {
                    let mut buf = std::mem::take(&mut spare);
                    buf.clear();
                    let n = reader
                        .read_until(b'\n', &mut buf)
                        .map_err(|e| Error::io(&self.path, e))?;
                    if n == 0 {
                        break;
                    }
                    self.pos += n as u64;
                    self.line += 1;
                    if buf.last() == Some(&b'\n') {
                        buf.pop();
                    }
                    if self.first {
                        self.first = false;
                        if buf.starts_with(b"\xEF\xBB\xBF") {
                            buf.drain(..3);
                        }
                    }
                    if buf.iter().all(|b| b.is_ascii_whitespace()) {
                        spare = buf;
                        continue;
                    }
                    bytes += buf.len();
                    let text = String::from_utf8(buf).map_err(|e| {
                        let at = e.utf8_error().valid_up_to();
                        Unreadable::Json(format!("invalid UTF-8 at column {}", at + 1))
                    });
                    out.push(OwnedRecord {
                        index: self.index,
                        line: self.line,
                        text,
                        value: None,
                    });
                    self.index += 1;
                }
            }
        }
        Ok(out)
    }
}
