//! Streaming record reader: JSONL and JSON arrays (plain, `.gz`, `.zst`), Parquet, Arrow IPC
//! and CSV/TSV are read in bounded batches, so an input larger than memory never sits in
//! memory whole; the raw bytes are hashed as they go by (the fingerprint needs each input's
//! BLAKE3). Each format has its reader in a module below ([`json`]: JSONL, and a JSON array
//! — first non-blank byte `[` — element by element, with the memory of JSONL: one batch of
//! records plus the decoder's buffers). Columnar and CSV rows become the JSON text of the record their JSON source would
//! hold ([`crate::source::row_json`]), so everything after this stage sees one kind of record.
//!
//! A sharded run reads part of a file ([`RecordStream::restrict`]): the lines of an
//! uncompressed JSONL or CSV file, the row groups of a Parquet file, the record batches of an
//! Arrow file whose bytes fall in its [`Span`]. Record indices and line numbers stay those of
//! the whole file.

use std::cell::RefCell;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use crate::error::{Error, Result};
use crate::source::csv as source_csv;
use crate::source::ipc as source_ipc;
use crate::source::json::JsonRecords;
use crate::source::parquet as source_parquet;
use crate::source::raw::{open_decoded, HashState, HashingReader};
use crate::source::record::{OwnedRecord, RowSource};
use crate::source::span::Span;

pub(crate) mod columnar;
pub(crate) mod csv;
pub(crate) mod ipc;
pub(crate) mod json;
pub(crate) mod parquet;
pub(crate) mod pretokenized;
pub(crate) mod raw;
pub(crate) mod record;
pub(crate) mod row_json;
pub(crate) mod span;

enum Mode {
    Json(JsonRecords),
    Rows(Box<dyn RowSource>),
    Done,
}

/// What kind of data a file holds, by its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// JSON array or JSONL (plain, `.gz`, `.zst`).
    Json,
    /// Apache Parquet.
    Parquet,
    /// Arrow IPC, file or stream format.
    Arrow,
    /// Delimited text with a header row: the delimiter (`,` or tab).
    Csv(u8),
}

/// The kind of `path` by its ending (a `.gz`/`.zst` suffix is looked through).
pub fn kind_of(path: &Path) -> Kind {
    let name = path.to_string_lossy().to_ascii_lowercase();
    let name = name
        .strip_suffix(".gz")
        .or_else(|| name.strip_suffix(".zst"))
        .unwrap_or(&name);
    if name.ends_with(".parquet") {
        Kind::Parquet
    } else if name.ends_with(".arrow") || name.ends_with(".feather") {
        Kind::Arrow
    } else if name.ends_with(".csv") {
        Kind::Csv(b',')
    } else if name.ends_with(".tsv") {
        Kind::Csv(b'\t')
    } else {
        Kind::Json
    }
}

fn is_compressed(path: &Path) -> bool {
    let name = path.to_string_lossy();
    name.ends_with(".gz") || name.ends_with(".zst")
}

/// A file's records, batch by batch, with the raw bytes hashed on the way.
pub struct RecordStream {
    path: PathBuf,
    state: Rc<RefCell<HashState>>,
    mode: Mode,
    splittable: bool,
}

impl RecordStream {
    /// Open `path`: by its name a Parquet, Arrow IPC or CSV/TSV file, else JSON, where the
    /// first non-blank byte tells a JSON array from JSONL.
    pub fn open(path: &Path) -> Result<Self> {
        let state = Rc::new(RefCell::new(HashState::default()));
        let compressed = is_compressed(path);
        let rows: Option<Box<dyn RowSource>> = match kind_of(path) {
            Kind::Json => None,
            Kind::Parquet if !compressed => {
                Some(Box::new(source_parquet::ParquetRows::open(path)?))
            }
            Kind::Arrow if !compressed => Some(Box::new(source_ipc::IpcRows::open(path)?)),
            Kind::Csv(delimiter) => Some(Box::new(source_csv::CsvRows::open(
                path,
                open_decoded(path, HashingReader::open(path, &state)?)?,
                delimiter,
            )?)),
            Kind::Parquet | Kind::Arrow => {
                return Err(Error::Source {
                    path: path.to_path_buf(),
                    msg: "compressed Parquet or Arrow files are not read: the formats compress \
                          inside; give the file without .gz/.zst"
                        .into(),
                })
            }
        };
        if let Some(rows) = rows {
            return Ok(RecordStream {
                path: path.to_path_buf(),
                state,
                mode: Mode::Rows(rows),
                splittable: !compressed,
            });
        }
        let raw = HashingReader::open(path, &state)?;
        let mut reader = BufReader::with_capacity(1 << 20, open_decoded(path, raw)?);
        // Look without consuming: is the first non-blank byte (after a BOM) of the first
        // buffer a '['? (A file opening with over a megabyte of blanks is read as JSONL.)
        let buf = reader.fill_buf().map_err(|e| Error::io(path, e))?;
        let buf = buf.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(buf);
        let is_array = buf.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[');
        let records = if is_array {
            JsonRecords::array(path.to_path_buf(), Box::new(reader))
        } else {
            JsonRecords::lines(path.to_path_buf(), Box::new(reader))
        };
        Ok(RecordStream {
            path: path.to_path_buf(),
            state,
            mode: Mode::Json(records),
            splittable: !is_array && !compressed,
        })
    }

    /// Whether a shard can read part of this file: uncompressed JSONL, CSV, Parquet and
    /// Arrow can be split; a JSON array or a compressed file is read by one shard whole.
    pub fn splittable(&self) -> bool {
        self.splittable
    }

    /// Read only the records whose bytes `span` places in its shard (a splittable file).
    pub fn restrict(&mut self, span: Span) {
        debug_assert!(self.splittable);
        match &mut self.mode {
            Mode::Rows(rows) => rows.restrict(span),
            Mode::Json(records) => records.restrict(span),
            Mode::Done => {}
        }
    }

    /// Raw (compressed) bytes read so far.
    pub fn raw_bytes(&self) -> u64 {
        match &self.mode {
            Mode::Rows(rows) => rows.position(),
            _ => self.state.borrow().bytes,
        }
    }

    /// The next batch of at most `max_records` records (about
    /// [`BATCH_BYTES`](crate::source::record::BATCH_BYTES) of text);
    /// an empty batch means the end of the file.
    pub fn next_batch(&mut self, max_records: usize) -> Result<Vec<OwnedRecord>> {
        let mut out = Vec::new();
        match &mut self.mode {
            Mode::Done => {}
            Mode::Rows(rows) => out = rows.next_batch(max_records)?,
            Mode::Json(records) => out = records.next_batch(max_records)?,
        }
        if out.is_empty() {
            self.mode = Mode::Done;
        }
        Ok(out)
    }

    /// Stop hashing the raw bytes read from now on: a shard's file is hashed in blocks
    /// ([`crate::packed_dir::treehash::hash_share`]), each by one shard. Then
    /// [`RecordStream::size`] ends the stream, not [`RecordStream::finish`].
    pub fn skip_hashing(&mut self) {
        self.state.borrow_mut().counting_only = true;
    }

    /// The raw size of the file (the end of a stream whose hashing was skipped).
    pub fn size(self) -> Result<u64> {
        drop(self.mode);
        let m = std::fs::metadata(&self.path).map_err(|e| Error::io(&self.path, e))?;
        Ok(m.len())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::split_records;
    use crate::source::record::Unreadable;
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
            let Err(Unreadable::Json(e)) = &got[3].text else {
                panic!("{:?}", got[3].text)
            };
            assert!(e.contains("no closing ']'"));
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

    fn collect_span(path: &Path, span: Option<Span>) -> Vec<(u64, serde_json::Value)> {
        let mut s = RecordStream::open(path).unwrap();
        if let Some(span) = span {
            assert!(s.splittable(), "{path:?}");
            s.restrict(span);
        }
        let mut out = Vec::new();
        loop {
            let b = s.next_batch(50).unwrap();
            if b.is_empty() {
                break;
            }
            for r in b {
                let v = match r.value {
                    Some(v) => v.into_value(),
                    None => serde_json::from_str(r.text.as_ref().unwrap()).unwrap(),
                };
                out.push((r.index, v));
            }
        }
        let (size, h) = s.finish().unwrap();
        let raw = std::fs::read(path).unwrap();
        assert_eq!(
            (size, h),
            (raw.len() as u64, blake3::hash(&raw)),
            "{path:?}"
        );
        out
    }

    #[test]
    fn parquet_arrow_and_csv_rows_are_the_jsonl_records_and_split_by_span() {
        use arrow_array::{ArrayRef, RecordBatch, StringArray};
        use std::sync::Arc;
        let d = tempfile::tempdir().unwrap();
        let texts: Vec<String> = (0..300)
            .map(|i| format!("row {i}, \"quoted\"{}", "\nline".repeat(i % 3)))
            .collect();
        let tags: Vec<String> = (0..300).map(|i| format!("t{}", i % 7)).collect();
        let jsonl: String = texts
            .iter()
            .zip(&tags)
            .map(|(t, g)| serde_json::json!({"text": t, "tag": g}).to_string() + "\n")
            .collect();
        std::fs::write(d.path().join("r.jsonl"), &jsonl).unwrap();
        let mut csv = ::csv::Writer::from_path(d.path().join("r.csv")).unwrap();
        csv.write_record(["text", "tag"]).unwrap();
        for (t, g) in texts.iter().zip(&tags) {
            csv.write_record([t, g]).unwrap();
        }
        csv.flush().unwrap();
        let batch = RecordBatch::try_from_iter([
            (
                "text",
                Arc::new(StringArray::from(texts.clone())) as ArrayRef,
            ),
            ("tag", Arc::new(StringArray::from(tags.clone())) as ArrayRef),
        ])
        .unwrap();
        let props = ::parquet::file::properties::WriterProperties::builder()
            .set_max_row_group_row_count(Some(32))
            .build();
        let f = File::create(d.path().join("r.parquet")).unwrap();
        let mut w = ::parquet::arrow::ArrowWriter::try_new(f, batch.schema(), Some(props)).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        let f = File::create(d.path().join("f.arrow")).unwrap();
        let mut fw = arrow_ipc::writer::FileWriter::try_new(f, &batch.schema()).unwrap();
        let f = File::create(d.path().join("s.arrow")).unwrap();
        let mut sw = arrow_ipc::writer::StreamWriter::try_new(f, &batch.schema()).unwrap();
        for s in (0..300).step_by(32) {
            let part = batch.slice(s, 32.min(300 - s));
            fw.write(&part).unwrap();
            sw.write(&part).unwrap();
        }
        fw.finish().unwrap();
        sw.finish().unwrap();

        let want = collect_span(&d.path().join("r.jsonl"), None);
        assert_eq!(want.len(), 300);
        for name in ["r.jsonl", "r.parquet", "f.arrow", "s.arrow", "r.csv"] {
            let p = d.path().join(name);
            assert_eq!(collect_span(&p, None), want, "{name}");
            let size = std::fs::metadata(&p).unwrap().len();
            for n in [2, 3, 5] {
                let mut joined = Vec::new();
                for i in 0..n {
                    // The file sits after 100 bytes of other inputs, before 50 more.
                    let part = collect_span(&p, Some(Span::new(100, size + 150, i, n)));
                    assert!(n > 3 || !part.is_empty(), "{name} {i}/{n}");
                    joined.extend(part);
                }
                assert_eq!(joined, want, "{name} /{n}");
            }
        }
    }
}
