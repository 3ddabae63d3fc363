//! Arrow IPC input, stream and file format alike: the file format is the stream format between
//! an 8-byte magic and a footer, so both are read message by message from the front (what
//! `datasets.save_to_disk` writes is the stream format). Memory is one record batch. A shard
//! converts the record batches whose bytes its span holds; the others are only decoded to
//! count their rows (decoding IPC is a copy, no parsing).

use std::cell::Cell;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use arrow_ipc::reader::StreamReader;

use crate::error::{Error, Result};
use crate::shard::Span;
use crate::source_parquet::{check_schema, source_error, Pending};
use crate::stream::{HashingReader, OwnedRecord, RowSource, BATCH_BYTES};

/// The magic that opens (and closes) an Arrow IPC file, padded to 8 bytes.
const FILE_MAGIC: &[u8] = b"ARROW1";

/// Counts the bytes the IPC reader has consumed: the position of message boundaries.
struct Counted<R> {
    inner: R,
    pos: Rc<Cell<u64>>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.pos.set(self.pos.get() + n as u64);
        Ok(n)
    }
}

/// The rows of one Arrow IPC file.
pub(crate) struct IpcRows {
    path: PathBuf,
    reader: StreamReader<Counted<BufReader<HashingReader>>>,
    pos: Rc<Cell<u64>>,
    span: Span,
    pending: Option<Pending>,
    /// Record index of the next batch's first row.
    index: u64,
    done: bool,
}

impl IpcRows {
    /// Read the schema of `path` and check that every column can be a JSON value.
    pub(crate) fn open(path: &Path, raw: HashingReader) -> Result<Self> {
        let mut buf = BufReader::with_capacity(1 << 20, raw);
        let head = buf.fill_buf().map_err(|e| Error::io(path, e))?;
        let mut start = 0u64;
        if head.starts_with(FILE_MAGIC) {
            // The magic is padded to the writer's alignment (8 bytes by the specification,
            // 64 by arrow-rs) with zeros; a message never starts with 8 zero bytes.
            buf.consume(8);
            start = 8;
            while buf
                .fill_buf()
                .map_err(|e| Error::io(path, e))?
                .starts_with(&[0; 8])
            {
                buf.consume(8);
                start += 8;
            }
        }
        let pos = Rc::new(Cell::new(start));
        let counted = Counted {
            inner: buf,
            pos: pos.clone(),
        };
        let reader = StreamReader::try_new(counted, None).map_err(|e| {
            source_error(
                path,
                format!("not a readable Arrow IPC file or stream: {e}"),
            )
        })?;
        check_schema(path, reader.schema())?;
        Ok(IpcRows {
            path: path.to_path_buf(),
            reader,
            pos,
            span: Span::ALL,
            pending: None,
            index: 0,
            done: false,
        })
    }
}

impl RowSource for IpcRows {
    fn restrict(&mut self, span: Span) {
        self.span = span;
    }

    fn next_batch(
        &mut self,
        max_records: usize,
        pool: Option<&rayon::ThreadPool>,
    ) -> Result<Vec<OwnedRecord>> {
        let mut out = Vec::new();
        let mut bytes_left = BATCH_BYTES;
        while !self.done && out.len() < max_records && bytes_left > 0 {
            if let Some(p) = &mut self.pending {
                p.take(&mut out, max_records, &mut bytes_left, pool);
                if p.left() > 0 {
                    break;
                }
                self.pending = None;
            }
            let before = self.pos.get();
            match self.reader.next() {
                None => self.done = true,
                Some(Err(e)) => {
                    return Err(Error::Record {
                        path: self.path.clone(),
                        line: self.index + 1,
                        record: self.index,
                        msg: format!("cannot decode the Arrow record batch from here: {e}"),
                    })
                }
                Some(Ok(batch)) => {
                    let first = self.index;
                    self.index += batch.num_rows() as u64;
                    match self.span.place(before, self.pos.get()) {
                        std::cmp::Ordering::Less => {}
                        std::cmp::Ordering::Equal => {
                            self.pending = Some(Pending::new(&self.path, &batch, first)?)
                        }
                        std::cmp::Ordering::Greater => self.done = true,
                    }
                }
            }
        }
        Ok(out)
    }

    fn position(&self) -> u64 {
        self.pos.get()
    }
}
