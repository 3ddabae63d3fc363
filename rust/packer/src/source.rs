//! Streaming record reader: JSONL and JSON arrays (plain, `.gz`, `.zst`), Parquet, Arrow IPC
//! and CSV/TSV are read in bounded batches, so an input larger than memory never sits in
//! memory whole; the raw bytes are hashed as they go by (the fingerprint needs each input's
//! BLAKE3). Each format has its reader in a module below ([`json`]: JSONL, and a JSON array
//! — first non-blank byte `[` — element by element, with the memory of JSONL: one batch of
//! records plus the decoder's buffers). Columnar and CSV rows become the JSON text of the record their JSON source would
//! hold ([`crate::source::row_json`]), so everything after this stage sees one kind of record.
//!
//! A sharded run reads part of a file ([`RecordStream::restrict`]): the lines of an
//! uncompressed JSONL file that begin in its share, read from there on (records and lines
//! numbered from the part's first line: [`json`]); the rows of a CSV file, the row groups of
//! a Parquet file, the record batches of an Arrow file whose bytes its [`Span`] places in it
//! (their indices and line numbers those of the whole file). Every byte read of an input is
//! first asked of the run's [`Fetch`] hook, if it has one ([`fetch`]).

use std::cell::RefCell;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use crate::error::{Error, Result};
use crate::source::csv as source_csv;
use crate::source::fetch::{ensure, Fetch};
use crate::source::ipc as source_ipc;
use crate::source::json::JsonRecords;
use crate::source::lines::{first_is_bracket, first_line_from, PEEK};
use crate::source::parquet as source_parquet;
use crate::source::raw::{open_decoded, HashState, HashingReader};
use crate::source::record::{OwnedRecord, RowSource};
use crate::source::span::Span;

pub(crate) mod columnar;
pub(crate) mod csv;
pub mod fetch;
pub(crate) mod ipc;
pub(crate) mod json;
pub(crate) mod lines;
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
    fetch: Option<Fetch>,
    /// Uncompressed JSONL.
    by_line: bool,
    /// JSONL: lines read (blank ones included), and where the first of them begins.
    lines: u64,
    first_line: u64,
}

impl RecordStream {
    /// Open `path`: by its name a Parquet, Arrow IPC or CSV/TSV file, else JSON, where the
    /// first non-blank byte tells a JSON array from JSONL.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with(path, None, u64::MAX)
    }

    /// [`RecordStream::open`] with every read asked of `fetch` first; reads past byte
    /// `bulk_end` go in small steps (a stream read only as far as its first records).
    pub fn open_with(path: &Path, fetch: Option<Fetch>, bulk_end: u64) -> Result<Self> {
        let state = Rc::new(RefCell::new(HashState::default()));
        let compressed = is_compressed(path);
        let rows: Option<Box<dyn RowSource>> = match kind_of(path) {
            Kind::Json => None,
            Kind::Parquet if !compressed => Some(Box::new(source_parquet::ParquetRows::open(
                path,
                fetch.clone(),
            )?)),
            Kind::Arrow if !compressed => Some(Box::new(source_ipc::IpcRows::open(path)?)),
            Kind::Csv(delimiter) => Some(Box::new(source_csv::CsvRows::open(
                path,
                open_decoded(
                    path,
                    HashingReader::open_at(path, &state, fetch.clone(), 0, bulk_end)?,
                )?,
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
                fetch,
                by_line: false,
                lines: 0,
                first_line: 0,
            });
        }
        let raw = HashingReader::open_at(path, &state, fetch.clone(), 0, bulk_end)?;
        let mut reader = BufReader::with_capacity(PEEK, open_decoded(path, raw)?);
        // Is the first non-blank byte (after a BOM) of the first megabyte a '['? (A file
        // opening with over a megabyte of blanks is read as JSONL.) Looked at without
        // consuming; a plain file read through `fetch` is looked at in small reads, as far
        // as its first non-blank byte.
        let is_array = if fetch.is_some() && !compressed {
            first_is_bracket(path, fetch.as_ref())?
        } else {
            let buf = reader.fill_buf().map_err(|e| Error::io(path, e))?;
            let buf = buf.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(buf);
            buf.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[')
        };
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
            fetch,
            by_line: !is_array && !compressed,
            lines: 0,
            first_line: 0,
        })
    }

    /// Whether this is a JSONL file a shard reads from its share on ([`Self::restrict`]),
    /// numbering its records from there.
    pub fn split_by_line(&self) -> bool {
        self.by_line
    }

    /// JSONL: lines read so far (blank ones included).
    pub fn lines_read(&self) -> u64 {
        match &self.mode {
            Mode::Json(records) => records.lines_read(),
            _ => self.lines,
        }
    }

    /// JSONL: the byte where the first line read begins (0 unless restricted).
    pub fn first_line(&self) -> u64 {
        self.first_line
    }

    /// Whether a shard can read part of this file: uncompressed JSONL, CSV, Parquet and
    /// Arrow can be split; a JSON array or a compressed file is read by one shard whole.
    pub fn splittable(&self) -> bool {
        self.splittable
    }

    /// Read only the records `span` places in its shard (a splittable file of `size`
    /// bytes, nothing read yet). JSONL: the lines that begin in its share
    /// ([`Span::lines`]), read from the first of them on; nothing before it but one byte.
    pub fn restrict(&mut self, span: Span, size: u64) -> Result<()> {
        debug_assert!(self.splittable);
        match &mut self.mode {
            Mode::Rows(rows) => rows.restrict(span),
            Mode::Json(_) => {
                let (lo, hi) = span.lines(size);
                let fetch = self.fetch.clone();
                let start = first_line_from(&self.path, fetch.as_ref(), lo, hi)?;
                // The share asked for at once (a front end downloads it in large, concurrent
                // requests), the end of its last line then in steps as it is read.
                ensure(fetch.as_ref(), &self.path, start, hi)?;
                let raw = HashingReader::open_at(&self.path, &self.state, fetch, start, hi)?;
                let reader = BufReader::with_capacity(PEEK, raw);
                self.mode = Mode::Json(JsonRecords::lines_between(
                    self.path.clone(),
                    Box::new(reader),
                    start,
                    hi,
                ));
                self.first_line = start;
            }
            Mode::Done => {}
        }
        Ok(())
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
            Mode::Json(records) => {
                out = records.next_batch(max_records)?;
                self.lines = records.lines_read();
            }
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
        let size = std::fs::metadata(&self.path).map_err(|e| Error::io(&self.path, e))?;
        ensure(self.fetch.as_ref(), &self.path, st.bytes, size.len())?;
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

/// How shard `i` of `n` reads an input file ([`shard_reads`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShardRead {
    /// Not at all.
    No,
    /// Whole (or by batch or CSV row from the file's start): a front end fetches the whole
    /// file.
    Whole,
    /// Its own lines of an uncompressed JSONL file and the few bytes around them
    /// ([`Span::lines`]), or the footer and its own row groups of a Parquet file (and the
    /// first rows, for the format); every range is asked of the run's [`Fetch`] before it
    /// is read.
    Part,
}

/// How shard `i` of `n` reads each input file (`paths` in input order, their `sizes`;
/// `whole`: with [`crate::PackConfig::whole_files`]): what a front end of object storage
/// downloads before the shard runs ([`ShardRead::Whole`]) or on demand
/// ([`ShardRead::Part`]). A file named as JSON may hold an array: read whole by one shard,
/// through the same demands.
pub fn shard_reads(
    paths: &[PathBuf],
    sizes: &[u64],
    i: usize,
    n: usize,
    whole: bool,
) -> Vec<ShardRead> {
    let read = span::files_read(sizes, i, n, whole);
    let total: u64 = sizes.iter().sum();
    paths
        .iter()
        .zip(sizes)
        .zip(read)
        .map(|((p, &size), read)| {
            let unit = whole && Span::new(0, total, i, n).whole_unit(size);
            // Read in ranges: an uncompressed JSONL file by line, a Parquet file by row group
            // (after its footer).
            let ranged = !is_compressed(p)
                && match kind_of(p) {
                    Kind::Json => !crate::source::pretokenized::is_pretokenized(p),
                    Kind::Parquet => true,
                    _ => false,
                };
            match (read, ranged && !unit && n > 1) {
                (false, _) => ShardRead::No,
                (true, true) => ShardRead::Part,
                (true, false) => ShardRead::Whole,
            }
        })
        .collect()
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
        let size = std::fs::metadata(path).unwrap().len();
        if let Some(span) = span {
            assert!(s.splittable(), "{path:?}");
            s.restrict(span, size).unwrap();
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
        if span.is_some() && s.split_by_line() {
            // Read from its first line on: hashed in blocks by the caller (treehash).
            return out;
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
                    // JSONL parts number their records from their first line.
                    let base = if name == "r.jsonl" {
                        joined.len() as u64
                    } else {
                        0
                    };
                    joined.extend(part.into_iter().map(|(k, v)| (k + base, v)));
                }
                assert_eq!(joined, want, "{name} /{n}");
            }
        }
    }

    /// The records of shard `i` of `n` of a whole-inputs JSONL file, read through a hook
    /// that records each range asked for; and the part's (lines, first line).
    fn jsonl_part(
        path: &Path,
        i: usize,
        n: usize,
    ) -> (Vec<OwnedRecord>, u64, u64, Vec<(u64, u64)>) {
        let asked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = asked.clone();
        let fetch: Fetch = std::sync::Arc::new(move |_: &Path, a: u64, b: u64| {
            log.lock().unwrap().push((a, b));
            Ok(())
        });
        let size = std::fs::metadata(path).unwrap().len();
        let mut s = RecordStream::open_with(path, Some(fetch), u64::MAX).unwrap();
        assert!(s.split_by_line());
        s.restrict(Span::new(0, size, i, n), size).unwrap();
        s.skip_hashing();
        let mut out = Vec::new();
        loop {
            let b = s.next_batch(7).unwrap();
            if b.is_empty() {
                break;
            }
            out.extend(b);
        }
        let (lines, first) = (s.lines_read(), s.first_line());
        let asked = asked.lock().unwrap().clone();
        (out, lines, first, asked)
    }

    #[test]
    fn jsonl_shards_read_their_lines_and_ask_for_nothing_else() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.jsonl");
        let mut text = String::from("\u{feff}");
        for k in 0..3000 {
            match k % 11 {
                3 => text.push_str("   \n"),
                7 => text.push_str(&format!("{{\"text\": \"{}\"}}\r\n", "y".repeat(k % 300))),
                _ => text.push_str(&format!("{{\"text\": \"r{k}\"}}\n")),
            }
        }
        text.push_str("{\"text\": \"last, no newline\"}");
        std::fs::write(&p, &text).unwrap();
        let whole = collect(&p, 50).0;
        let size = text.len() as u64;
        for n in [1, 2, 3, 7] {
            let (mut lines, mut records) = (0u64, 0u64);
            for i in 0..n {
                let (part, part_lines, first, asked) = jsonl_part(&p, i, n);
                // Numbered from the part's first line: the lines and records before it are
                // what the error path counts.
                assert_eq!(
                    lines::count_lines(&p, None, first).unwrap(),
                    (lines, records),
                    "{i}/{n}"
                );
                for r in &part {
                    let w = &whole[(r.index + records) as usize];
                    assert_eq!((r.line + lines, &r.text), (w.line, &w.text), "{i}/{n}");
                }
                lines += part_lines;
                records += part.len() as u64;
                // Asked: the peek (a step from the start), one byte before the share,
                // the share, and the steps that finish its last line.
                let (lo, hi) = Span::new(0, size, i, n).lines(size);
                let end = text[hi as usize..]
                    .find('\n')
                    .map_or(size, |k| hi + k as u64 + 1);
                for &(a, b) in &asked {
                    let peek = b <= fetch::STEP;
                    let near = a + 1 >= lo && a <= end && b <= end + fetch::STEP;
                    assert!(
                        peek || near,
                        "{i}/{n}: asked {a}..{b}, share {lo}..{hi}, end {end}"
                    );
                }
                // Bytes never asked for are never read: junk there changes nothing.
                let junk = d.path().join("junk.jsonl");
                let mut bytes = vec![b'{'; size as usize];
                for &(a, b) in &asked {
                    let (a, b) = (a.min(size) as usize, b.min(size) as usize);
                    bytes[a..b].copy_from_slice(&text.as_bytes()[a..b]);
                }
                std::fs::write(&junk, &bytes).unwrap();
                let again = jsonl_part(&junk, i, n).0;
                let key = |r: &OwnedRecord| (r.index, r.line, r.text.clone());
                assert_eq!(
                    again.iter().map(key).collect::<Vec<_>>(),
                    part.iter().map(key).collect::<Vec<_>>()
                );
            }
            assert_eq!(records, whole.len() as u64, "/{n}");
        }
    }
}
