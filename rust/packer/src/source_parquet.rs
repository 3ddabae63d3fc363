//! Parquet input: row groups are decoded as Arrow record batches, one batch at a time (memory
//! is one batch plus the pages being read, whatever the file's size), and each row becomes
//! the JSON text of its record ([`crate::row_json`]); the rows of a batch are converted in
//! parallel, in order. A shard reads the row groups whose bytes its span holds.

use std::fs::File;
use std::path::{Path, PathBuf};

use arrow_array::RecordBatch;
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReader,
    ParquetRecordBatchReaderBuilder,
};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::row_json::RowEncoder;
use crate::shard::Span;
use crate::stream::{OwnedRecord, RowSource, BATCH_BYTES};

/// Rows decoded per record batch.
const DECODE_ROWS: usize = 1024;
/// Rows converted to JSON per parallel task.
const TASK_ROWS: usize = 128;

/// A file-level fault of a columnar or CSV input (it cannot be read as its kind).
pub(crate) fn source_error(path: &Path, msg: impl Into<String>) -> Error {
    Error::Record {
        path: path.to_path_buf(),
        line: 0,
        record: 0,
        msg: msg.into(),
    }
}

/// Rows `range` of `enc` as records, converted in parallel; `first` is the record index of
/// row 0 of the batch.
pub(crate) fn convert_rows(
    enc: &RowEncoder,
    range: std::ops::Range<usize>,
    first: u64,
    pool: Option<&rayon::ThreadPool>,
) -> Vec<OwnedRecord> {
    let tasks: Vec<std::ops::Range<usize>> = range
        .clone()
        .step_by(TASK_ROWS)
        .map(|s| s..(s + TASK_ROWS).min(range.end))
        .collect();
    let convert = || -> Vec<Vec<String>> { tasks.into_par_iter().map(|r| enc.rows(r)).collect() };
    let texts = match pool {
        Some(pool) => pool.install(convert),
        None => convert(),
    };
    texts
        .into_iter()
        .flatten()
        .zip(range)
        .map(|(text, r)| {
            let index = first + r as u64;
            OwnedRecord {
                index,
                line: index + 1,
                text: Ok(text),
            }
        })
        .collect()
}

/// A decoded batch and how far into it the rows have been handed out.
pub(crate) struct Pending {
    enc: RowEncoder,
    /// Record index of the batch's first row.
    first: u64,
    next: usize,
}

impl Pending {
    pub(crate) fn new(path: &Path, batch: &RecordBatch, first: u64) -> Result<Self> {
        let enc = RowEncoder::new(batch).map_err(|m| source_error(path, m))?;
        Ok(Pending {
            enc,
            first,
            next: 0,
        })
    }

    pub(crate) fn left(&self) -> usize {
        self.enc.num_rows() - self.next
    }

    /// Move up to `max` rows (and about `bytes_left` bytes of text) into `out`.
    pub(crate) fn take(
        &mut self,
        out: &mut Vec<OwnedRecord>,
        max: usize,
        bytes_left: &mut usize,
        pool: Option<&rayon::ThreadPool>,
    ) {
        while self.left() > 0 && out.len() < max && *bytes_left > 0 {
            let n = self.left().min(max - out.len()).min(DECODE_ROWS);
            let recs = convert_rows(&self.enc, self.next..self.next + n, self.first, pool);
            self.next += n;
            let bytes: usize = recs
                .iter()
                .map(|r| r.text.as_ref().map_or(0, String::len))
                .sum();
            *bytes_left = bytes_left.saturating_sub(bytes);
            out.extend(recs);
        }
    }
}

/// Check that every column of `schema` has a JSON value.
pub(crate) fn check_schema(path: &Path, schema: arrow_schema::SchemaRef) -> Result<()> {
    RowEncoder::new(&RecordBatch::new_empty(schema))
        .map(|_| ())
        .map_err(|m| source_error(path, m))
}

/// The rows of one Parquet file.
pub(crate) struct ParquetRows {
    path: PathBuf,
    meta: ArrowReaderMetadata,
    span: Span,
    reader: Option<ParquetRecordBatchReader>,
    pending: Option<Pending>,
    /// Record index of the next batch's first row.
    index: u64,
    /// Record index of the first row read.
    first_row: u64,
    /// Byte ranges and row counts of the row groups being read.
    groups: Vec<(u64, u64, u64)>,
    done: bool,
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
    /// Read the footer of `path` and check that every column can be a JSON value.
    pub(crate) fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let meta = ArrowReaderMetadata::load(&file, ArrowReaderOptions::new())
            .map_err(|e| source_error(path, format!("not a readable Parquet file: {e}")))?;
        check_schema(path, meta.schema().clone())?;
        Ok(ParquetRows {
            path: path.to_path_buf(),
            meta,
            span: Span::ALL,
            reader: None,
            pending: None,
            index: 0,
            first_row: 0,
            groups: Vec::new(),
            done: false,
        })
    }

    fn start(&mut self) -> Result<()> {
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
                    self.groups.push((lo, hi, rows));
                }
                std::cmp::Ordering::Greater => break,
            }
        }
        self.first_row = self.index;
        if chosen.is_empty() {
            self.done = true;
            return Ok(());
        }
        let file = File::open(&self.path).map_err(|e| Error::io(&self.path, e))?;
        let reader = ParquetRecordBatchReaderBuilder::new_with_metadata(file, self.meta.clone())
            .with_row_groups(chosen)
            .with_batch_size(DECODE_ROWS)
            .build()
            .map_err(|e| source_error(&self.path, format!("cannot read the row groups: {e}")))?;
        self.reader = Some(reader);
        Ok(())
    }
}

impl RowSource for ParquetRows {
    fn restrict(&mut self, span: Span) {
        self.span = span;
    }

    fn next_batch(
        &mut self,
        max_records: usize,
        pool: Option<&rayon::ThreadPool>,
    ) -> Result<Vec<OwnedRecord>> {
        let mut out = Vec::new();
        if self.reader.is_none() && !self.done {
            self.start()?;
        }
        let mut bytes_left = BATCH_BYTES;
        while !self.done && out.len() < max_records && bytes_left > 0 {
            if let Some(p) = &mut self.pending {
                p.take(&mut out, max_records, &mut bytes_left, pool);
                if p.left() > 0 {
                    break;
                }
                self.pending = None;
            }
            let reader = self.reader.as_mut().expect("started");
            match reader.next() {
                None => self.done = true,
                Some(Err(e)) => {
                    return Err(Error::Record {
                        path: self.path.clone(),
                        line: self.index + 1,
                        record: self.index,
                        msg: format!("cannot decode the Parquet rows from here: {e}"),
                    })
                }
                Some(Ok(batch)) => {
                    let first = self.index;
                    self.index += batch.num_rows() as u64;
                    self.pending = Some(Pending::new(&self.path, &batch, first)?);
                }
            }
        }
        Ok(out)
    }

    fn position(&self) -> u64 {
        // The start of the row group holding the next row.
        let handed_out = self.index - self.pending.as_ref().map_or(0, |p| p.left() as u64);
        let mut done = handed_out - self.first_row;
        for &(lo, _, rows) in &self.groups {
            if done < rows {
                return lo;
            }
            done -= rows;
        }
        self.groups.last().map_or(0, |g| g.1)
    }
}
