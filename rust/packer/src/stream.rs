//! Streaming record reader: JSONL and JSON arrays (plain, `.gz`, `.zst`) are read in bounded
//! batches, so an input larger than memory never sits in memory whole; the raw bytes are
//! hashed as they go by (the fingerprint needs each input's BLAKE3). A JSON array (first
//! non-blank byte `[`) is read element by element ([`ArrayElements`]), with the memory of
//! JSONL: one batch of records plus the decoder's buffers.

use std::cell::RefCell;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use crate::error::{Error, Result};
use crate::input::{ArrayElements, RawRecord};

/// Bytes of record text per batch: bounds memory, amortises the parallel encode.
pub const BATCH_BYTES: usize = 8 << 20;

#[derive(Default)]
struct HashState {
    hasher: blake3::Hasher,
    bytes: u64,
}

/// Reads a file and hashes every byte that passes.
struct HashingReader {
    file: File,
    state: Rc<RefCell<HashState>>,
}

impl Read for HashingReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read(buf)?;
        let mut st = self.state.borrow_mut();
        st.hasher.update(&buf[..n]);
        st.bytes += n as u64;
        Ok(n)
    }
}

/// One owned record of a batch (see [`RawRecord`]).
#[derive(Clone, Debug)]
pub struct OwnedRecord {
    /// 0-based index of the record in its file.
    pub index: u64,
    /// 1-based line where the record starts.
    pub line: u64,
    /// The record's JSON text, or why it cannot be one (invalid UTF-8).
    pub text: std::result::Result<String, String>,
}

impl OwnedRecord {
    /// Borrow as a [`RawRecord`] (only for records whose text is valid).
    pub fn raw(&self) -> Option<RawRecord<'_>> {
        self.text.as_ref().ok().map(|t| RawRecord {
            index: self.index,
            line: self.line,
            text: t,
        })
    }
}

enum Mode {
    Lines(Box<dyn BufRead>),
    Array(ArrayElements<Box<dyn BufRead>>),
    Done,
}

/// A file's records, batch by batch, with the raw bytes hashed on the way.
pub struct RecordStream {
    path: PathBuf,
    state: Rc<RefCell<HashState>>,
    mode: Mode,
    line: u64,
    index: u64,
    first: bool,
}

fn open_decoded(path: &Path, raw: HashingReader) -> Result<Box<dyn Read>> {
    let name = path.to_string_lossy();
    Ok(if name.ends_with(".gz") {
        Box::new(flate2::read::MultiGzDecoder::new(BufReader::new(raw)))
    } else if name.ends_with(".zst") {
        Box::new(zstd::stream::read::Decoder::new(raw).map_err(|e| Error::io(path, e))?)
    } else {
        Box::new(raw)
    })
}

impl RecordStream {
    /// Open `path`; peeks at the first non-blank byte to tell a JSON array from JSONL.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let state = Rc::new(RefCell::new(HashState::default()));
        let raw = HashingReader {
            file,
            state: state.clone(),
        };
        let mut reader = BufReader::with_capacity(1 << 20, open_decoded(path, raw)?);
        // Look without consuming: is the first non-blank byte (after a BOM) of the first
        // buffer a '['? (A file opening with over a megabyte of blanks is read as JSONL.)
        let buf = reader.fill_buf().map_err(|e| Error::io(path, e))?;
        let buf = buf.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(buf);
        let is_array = buf.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[');
        let mode = if is_array {
            Mode::Array(ArrayElements::new(Box::new(reader)))
        } else {
            Mode::Lines(Box::new(reader))
        };
        Ok(RecordStream {
            path: path.to_path_buf(),
            state,
            mode,
            line: 0,
            index: 0,
            first: true,
        })
    }

    /// Raw (compressed) bytes read so far.
    pub fn raw_bytes(&self) -> u64 {
        self.state.borrow().bytes
    }

    /// The next batch of at most `max_records` records (about [`BATCH_BYTES`] of text);
    /// an empty batch means the end of the file.
    pub fn next_batch(&mut self, max_records: usize) -> Result<Vec<OwnedRecord>> {
        let mut out = Vec::new();
        match &mut self.mode {
            Mode::Done => {}
            Mode::Array(elements) => {
                let mut bytes = 0usize;
                while out.len() < max_records && bytes < BATCH_BYTES {
                    let Some(el) = elements
                        .next_element()
                        .map_err(|e| Error::io(&self.path, e))?
                    else {
                        break;
                    };
                    bytes += el.text.as_ref().map_or(0, Vec::len);
                    let text = el.text.and_then(|t| {
                        String::from_utf8(t).map_err(|e| {
                            let at = e.utf8_error().valid_up_to();
                            format!("invalid UTF-8 at byte {at} of the element")
                        })
                    });
                    out.push(OwnedRecord {
                        index: el.index,
                        line: el.line,
                        text,
                    });
                }
            }
            Mode::Lines(reader) => {
                let mut bytes = 0usize;
                let mut buf = Vec::new();
                while out.len() < max_records && bytes < BATCH_BYTES {
                    buf.clear();
                    let n = reader
                        .read_until(b'\n', &mut buf)
                        .map_err(|e| Error::io(&self.path, e))?;
                    if n == 0 {
                        break;
                    }
                    self.line += 1;
                    let mut line: &[u8] = &buf;
                    if line.last() == Some(&b'\n') {
                        line = &line[..line.len() - 1];
                    }
                    if self.first {
                        self.first = false;
                        line = line.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(line);
                    }
                    if line.iter().all(|b| b.is_ascii_whitespace()) {
                        continue;
                    }
                    bytes += line.len();
                    let text = std::str::from_utf8(line)
                        .map(str::to_string)
                        .map_err(|e| format!("invalid UTF-8 at column {}", e.valid_up_to() + 1));
                    out.push(OwnedRecord {
                        index: self.index,
                        line: self.line,
                        text,
                    });
                    self.index += 1;
                }
            }
        }
        if out.is_empty() {
            self.mode = Mode::Done;
        }
        Ok(out)
    }

    /// Finish: hash any raw bytes the decoder left unread; returns (raw size, BLAKE3).
    pub fn finish(self) -> Result<(u64, blake3::Hash)> {
        drop(self.mode);
        let mut st = self.state.borrow_mut();
        let mut f = File::open(&self.path).map_err(|e| Error::io(&self.path, e))?;
        f.seek(SeekFrom::Start(st.bytes))
            .map_err(|e| Error::io(&self.path, e))?;
        let mut rest = [0u8; 1 << 16];
        loop {
            let n = f.read(&mut rest).map_err(|e| Error::io(&self.path, e))?;
            if n == 0 {
                break;
            }
            st.hasher.update(&rest[..n]);
            st.bytes += n as u64;
        }
        Ok((st.bytes, st.hasher.finalize()))
    }
}

/// BLAKE3 and size of a whole file, read in blocks (bounded memory).
pub fn hash_file(path: &Path) -> Result<(u64, blake3::Hash)> {
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::split_records;
    use std::io::Write;

    fn collect(path: &Path, per_batch: usize) -> (Vec<OwnedRecord>, u64, blake3::Hash) {
        let mut s = RecordStream::open(path).unwrap();
        let mut all = Vec::new();
        loop {
            let b = s.next_batch(per_batch).unwrap();
            if b.is_empty() {
                break;
            }
            assert!(b.len() <= per_batch);
            all.extend(b);
        }
        let (size, h) = s.finish().unwrap();
        (all, size, h)
    }

    #[test]
    fn jsonl_plain_gz_zst_and_array_agree_with_split_records() {
        let d = tempfile::tempdir().unwrap();
        let text =
            "\u{feff}{\"text\": \"a\u{2028}b\"}\n\n  \n{\"text\": \"c\"}\r\n{\"text\": \"d\"}";
        let plain = d.path().join("x.jsonl");
        std::fs::write(&plain, text).unwrap();
        let gz = d.path().join("x.jsonl.gz");
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(text.as_bytes()).unwrap();
        std::fs::write(&gz, e.finish().unwrap()).unwrap();
        let zst = d.path().join("x.jsonl.zst");
        std::fs::write(&zst, zstd::encode_all(text.as_bytes(), 3).unwrap()).unwrap();
        let expect = split_records(&plain, text.as_bytes()).unwrap();
        for p in [&plain, &gz, &zst] {
            let (recs, size, h) = collect(p, 2);
            let raw = std::fs::read(p).unwrap();
            assert_eq!((size, h), (raw.len() as u64, blake3::hash(&raw)), "{p:?}");
            assert_eq!(recs.len(), expect.len());
            for (a, b) in recs.iter().zip(&expect) {
                let a = a.raw().unwrap();
                assert_eq!(
                    (a.index, a.line, a.text),
                    (b.index, b.line, b.text.trim_start_matches('\u{feff}'))
                );
            }
        }
        let arr = d.path().join("a.json");
        std::fs::write(&arr, "\n [{\"text\": 1},\n {\"text\": 2}]").unwrap();
        let (recs, _, _) = collect(&arr, 1);
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[1].line, 3);
    }

    fn compressed(d: &Path, name: &str, bytes: &[u8]) -> [PathBuf; 3] {
        let plain = d.join(name);
        std::fs::write(&plain, bytes).unwrap();
        let gz = d.join(format!("{name}.gz"));
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(bytes).unwrap();
        std::fs::write(&gz, e.finish().unwrap()).unwrap();
        let zst = d.join(format!("{name}.zst"));
        std::fs::write(&zst, zstd::encode_all(bytes, 3).unwrap()).unwrap();
        [plain, gz, zst]
    }

    #[test]
    fn a_json_array_streams_the_records_of_its_jsonl() {
        let d = tempfile::tempdir().unwrap();
        let recs: Vec<String> = (0..50)
            .map(|i| format!("{{\"text\": \"r{i}, [x] {{y}} \\\"q\\\" \\n\", \"n\": [{i}, {{}}]}}"))
            .collect();
        let jsonl = recs.join("\n") + "\n";
        let array = format!("\u{feff}[\n  {}\n]\n", recs.join(",\n  "));
        let (want, _, _) = collect(&compressed(d.path(), "r.jsonl", jsonl.as_bytes())[0], 7);
        for p in compressed(d.path(), "r.json", array.as_bytes()) {
            let (got, size, h) = collect(&p, 7);
            let raw = std::fs::read(&p).unwrap();
            assert_eq!((size, h), (raw.len() as u64, blake3::hash(&raw)), "{p:?}");
            assert_eq!(got.len(), want.len(), "{p:?}");
            for (g, w) in got.iter().zip(&want) {
                assert_eq!((g.index, &g.text), (w.index, &w.text), "{p:?}");
                assert_eq!(g.line, w.line + 1, "{p:?}"); // the array opens on line 1
            }
        }
        // Broken at element 3: elements 0-2, then a last record with the error.
        let broken = format!("[{}, {}, {}, {{\"text\": ", recs[0], recs[1], recs[2]);
        for p in compressed(d.path(), "b.json", broken.as_bytes()) {
            let (got, _, _) = collect(&p, 2);
            assert_eq!(got.len(), 4, "{p:?}");
            assert!(got[..3].iter().all(|r| r.text.is_ok()));
            assert_eq!(got[3].index, 3);
            assert!(got[3].text.as_ref().unwrap_err().contains("no closing ']'"));
        }
    }

    #[test]
    fn bad_utf8_is_a_record_fault_not_a_stop() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("u.jsonl");
        std::fs::write(&p, b"{}\n{\"a\": \"\xff\"}\n{}\n").unwrap();
        let (recs, _, _) = collect(&p, 10);
        assert_eq!(recs.len(), 3);
        assert!(recs[1].text.is_err());
        assert_eq!(recs[1].line, 2);
    }
}
