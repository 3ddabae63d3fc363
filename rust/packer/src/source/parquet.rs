//! Parquet input: row groups are decoded as Arrow record batches of about a megabyte on a
//! thread of their own, ahead of the encoder ([`Ahead`]: memory is those batches plus the
//! pages being read, whatever the file's size), so decompressing and decoding overlap
//! tokenization; the encoder's threads build each row's record ([`crate::source::row_json`]). A shard
//! reads the row groups whose bytes its span holds, and with a [`Fetch`] hook (an object in
//! storage laid out as a placeholder) asks for the bytes it reads first: the footer, then its
//! row groups, each at once, so a shard downloads about its share of the object.

use std::fs::File;
use std::path::{Path, PathBuf};

use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReaderBuilder,
};

use crate::error::{Error, Result};
use crate::source::columnar::{check_schema, convert_batch, source_error, Ahead};
use crate::source::fetch::{ensure, Fetch, FetchingFile};
use crate::source::record::{OwnedRecord, RowSource};
use crate::source::span::Span;

/// Rows decoded per record batch, at most.
const DECODE_ROWS: usize = 1024;
/// Bytes (uncompressed) decoded per record batch, about: small batches let the encoder start
/// early and keep it fed.
pub(crate) const DECODE_BYTES: u64 = 1 << 20;
/// A Parquet file read through a [`Fetch`] hook: every byte range asked for before it is read.
/// Page headers are read through a small buffer (one demand per header, not per byte).
struct Fetched {
    file: File,
    path: PathBuf,
    fetch: Option<Fetch>,
    len: u64,
}

/// Bytes a page header is read through ([`Fetched`]): headers are tens of bytes.
const HEADER_BUF: usize = 4 << 10;

impl Fetched {
    fn open(path: &Path, fetch: Option<Fetch>) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        Ok(Fetched {
            file,
            path: path.to_path_buf(),
            fetch,
            len,
        })
    }
}

impl parquet::file::reader::Length for Fetched {
    fn len(&self) -> u64 {
        self.len
    }
}

impl parquet::file::reader::ChunkReader for Fetched {
    type T = std::io::BufReader<FetchingFile>;

    fn get_read(&self, start: u64) -> parquet::errors::Result<Self::T> {
        let file = FetchingFile {
            file: self.file.try_clone()?,
            path: self.path.clone(),
            fetch: self.fetch.clone(),
            pos: start,
            bulk_end: start,
        };
        Ok(std::io::BufReader::with_capacity(HEADER_BUF, file))
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<bytes::Bytes> {
        let mut buf = vec![0u8; length];
        let n = crate::source::fetch::read_at(
            &self.file,
            self.fetch.as_ref(),
            &self.path,
            &mut buf,
            start,
        )
        .map_err(|e| parquet::errors::ParquetError::External(Box::new(e)))?;
        if n < length {
            return Err(parquet::errors::ParquetError::EOF(format!(
                "{length} bytes at {start}: the file ends after {n}"
            )));
        }
        Ok(buf.into())
    }
}

/// The rows of one Parquet file.
pub(crate) struct ParquetRows {
    path: PathBuf,
    fetch: Option<Fetch>,
    meta: ArrowReaderMetadata,
    span: Span,
    ahead: Option<Ahead>,
    /// Record index of the next batch's first row.
    index: u64,
    /// Byte ranges and row counts of the row groups being read.
    groups: Vec<(u64, u64, u64)>,
    done: bool,
}

/// Rows of about [`DECODE_BYTES`] in row groups of `bytes` holding `rows`.
fn rows_per(bytes: u64, rows: u64) -> usize {
    let row_bytes = (bytes / rows.max(1)).max(1);
    (DECODE_BYTES / row_bytes).clamp(16, DECODE_ROWS as u64) as usize
}

fn group_range(meta: &parquet::file::metadata::RowGroupMetaData) -> (u64, u64) {
    let mut lo = u64::MAX;
    let mut hi = 0;
    for c in meta.columns() {
        let (start, len) = c.byte_range();
        lo = lo.min(start);
        hi = hi.max(start + len);
    }
    (lo.min(hi), hi)
}

impl ParquetRows {
    /// Read the footer of `path` (every read asked of `fetch` first) and check that every
    /// column can be a JSON value.
    pub(crate) fn open(path: &Path, fetch: Option<Fetch>) -> Result<Self> {
        let file = Fetched::open(path, fetch.clone())?;
        let meta = ArrowReaderMetadata::load(&file, ArrowReaderOptions::new())
            .map_err(|e| source_error(path, format!("not a readable Parquet file: {e}")))?;
        check_schema(path, meta.schema().clone())?;
        Ok(ParquetRows {
            path: path.to_path_buf(),
            fetch,
            meta,
            span: Span::ALL,
            ahead: None,
            index: 0,
            groups: Vec::new(),
            done: false,
        })
    }

    /// Choose the row groups of the span and open them, decoding `batch_rows` rows at a time.
    fn start(&mut self, batch_rows: usize) -> Result<()> {
        let md = self.meta.metadata().clone();
        let ranges: Vec<(u64, u64)> = md.row_groups().iter().map(group_range).collect();
        // Row groups are placed as if they filled the file: the footer (large with many
        // small groups) holds no rows and would leave the last shard short.
        let size = std::fs::metadata(&self.path)
            .map_err(|e| Error::io(&self.path, e))?
            .len();
        let data_lo = ranges.iter().map(|r| r.0).min().unwrap_or(0);
        let data_len = ranges
            .iter()
            .map(|r| r.1)
            .max()
            .unwrap_or(0)
            .saturating_sub(data_lo);
        let scale = |x: u64| -> u64 {
            ((x.saturating_sub(data_lo)) as u128 * size as u128 / data_len.max(1) as u128) as u64
        };
        let mut chosen = Vec::new();
        let (mut bytes, mut rows_chosen) = (0u64, 0u64);
        for (j, rg) in md.row_groups().iter().enumerate() {
            let (lo, hi) = ranges[j];
            let rows = rg.num_rows().max(0) as u64;
            match self.span.place(scale(lo), scale(hi)) {
                std::cmp::Ordering::Less => {
                    if chosen.is_empty() {
                        self.index += rows;
                    }
                }
                std::cmp::Ordering::Equal => {
                    chosen.push(j);
                    bytes += rg.total_byte_size().max(0) as u64;
                    rows_chosen += rows;
                    self.groups.push((lo, hi, rows));
                }
                std::cmp::Ordering::Greater => break,
            }
        }
        if chosen.is_empty() {
            self.done = true;
            return Ok(());
        }
        // A shard's row groups are asked for at once, each whole (a front end downloads
        // them in large, concurrent requests), then read page by page from what is there; a
        // reader of the whole file (the format probe: a few rows) asks page by page.
        if self.span != Span::ALL {
            for &(lo, hi, _) in &self.groups {
                ensure(self.fetch.as_ref(), &self.path, lo, hi)?;
            }
        }
        let file = Fetched::open(&self.path, self.fetch.clone())?;
        let reader = ParquetRecordBatchReaderBuilder::new_with_metadata(file, self.meta.clone())
            .with_row_groups(chosen)
            .with_batch_size(batch_rows.min(rows_per(bytes, rows_chosen)))
            .build()
            .map_err(|e| source_error(&self.path, format!("cannot read the row groups: {e}")))?;
        let (path, mut first) = (self.path.clone(), self.index);
        self.ahead = Some(Ahead::spawn(batch_rows, move |send| {
            for batch in reader {
                let recs = match batch {
                    Ok(b) => convert_batch(&path, &b, first),
                    Err(e) => Err(Error::Record {
                        path: path.clone(),
                        line: first + 1,
                        record: first,
                        msg: format!("cannot decode the Parquet rows from here: {e}"),
                    }),
                };
                first += recs.as_ref().map_or(0, |r| r.0.len() as u64);
                let stop = recs.is_err();
                if !send(recs) || stop {
                    return;
                }
            }
        })?);
        Ok(())
    }
}

impl RowSource for ParquetRows {
    fn restrict(&mut self, span: Span) {
        self.span = span;
    }

    fn next_batch(&mut self, max_records: usize) -> Result<Vec<OwnedRecord>> {
        if self.ahead.is_none() && !self.done {
            // A reader that asks for few records (the format probe) decodes only those.
            self.start(max_records.clamp(1, DECODE_ROWS))?;
            self.done = true;
        }
        match &mut self.ahead {
            Some(a) => a.next_batch(max_records),
            None => Ok(Vec::new()),
        }
    }

    fn position(&self) -> u64 {
        // The start of the row group holding the next row.
        let mut done = self.ahead.as_ref().map_or(0, Ahead::handed_out);
        for &(lo, _, rows) in &self.groups {
            if done < rows {
                return lo;
            }
            done -= rows;
        }
        self.groups.last().map_or(0, |g| g.1)
    }
}
