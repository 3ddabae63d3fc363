//! CSV and TSV input (plain, `.gz`, `.zst`): the first row names the columns and every cell
//! is a string, so each row is the JSON object `{"column": "cell", ...}` (an empty cell is
//! `""`). Quoting follows RFC 4180 (the `csv` crate), for TSV too. A row with more or fewer
//! cells than the header is a bad record. A shard reads the rows whose bytes its span holds;
//! the rows before it are parsed (not converted) so that quoted line breaks never mislead
//! the split and record indices and lines stay the whole file's.

use std::cmp::Ordering;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::source::columnar::source_error;
use crate::source::record::{OwnedRecord, RowSource, RowValue, Unreadable, BATCH_BYTES};
use crate::source::span::Span;

/// The rows of one CSV or TSV file.
pub(crate) struct CsvRows {
    path: PathBuf,
    reader: csv::Reader<Box<dyn Read>>,
    /// Column names.
    names: Vec<String>,
    row: csv::ByteRecord,
    span: Span,
    index: u64,
    done: bool,
}

impl CsvRows {
    /// Read the header row of `data` (the decoded bytes of `path`).
    pub(crate) fn open(path: &Path, data: Box<dyn Read>, delimiter: u8) -> Result<Self> {
        let mut reader = csv::ReaderBuilder::new()
            .delimiter(delimiter)
            .has_headers(true)
            .flexible(true)
            .from_reader(data);
        let header = reader
            .byte_headers()
            .map_err(|e| csv_error(path, e))?
            .clone();
        let mut names = Vec::with_capacity(header.len());
        for (c, name) in header.iter().enumerate() {
            let name = std::str::from_utf8(name).map_err(|_| {
                source_error(path, format!("header cell {} is not UTF-8 text", c + 1))
            })?;
            if names.iter().any(|n| n == name) {
                return Err(source_error(
                    path,
                    format!("the header names column {name:?} twice: expected unique names"),
                ));
            }
            names.push(name.to_string());
        }
        Ok(CsvRows {
            path: path.to_path_buf(),
            reader,
            names,
            row: csv::ByteRecord::new(),
            span: Span::ALL,
            index: 0,
            done: false,
        })
    }

    fn record(&self) -> std::result::Result<serde_json::Value, Unreadable> {
        if self.row.len() != self.names.len() {
            return Err(Unreadable::Row(format!(
                "the row has {} cells, the header {}: expected one cell per column",
                self.row.len(),
                self.names.len()
            )));
        }
        let mut map = serde_json::Map::with_capacity(self.names.len());
        for (name, cell) in self.names.iter().zip(self.row.iter()) {
            let cell = std::str::from_utf8(cell).map_err(|_| {
                Unreadable::Row(format!("column {name:?}: the cell is not UTF-8 text"))
            })?;
            map.insert(name.clone(), serde_json::Value::String(cell.to_string()));
        }
        Ok(serde_json::Value::Object(map))
    }
}

fn csv_error(path: &Path, e: csv::Error) -> Error {
    match e.into_kind() {
        csv::ErrorKind::Io(e) => Error::io(path, e),
        other => source_error(path, format!("{other:?}")),
    }
}

impl RowSource for CsvRows {
    fn restrict(&mut self, span: Span) {
        self.span = span;
    }

    fn next_batch(&mut self, max_records: usize) -> Result<Vec<OwnedRecord>> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        while !self.done && out.len() < max_records && bytes < BATCH_BYTES {
            let more = self
                .reader
                .read_byte_record(&mut self.row)
                .map_err(|e| csv_error(&self.path, e))?;
            if !more {
                self.done = true;
                break;
            }
            let (start, line) = self.row.position().map_or((0, 0), |p| (p.byte(), p.line()));
            match self.span.place(start, self.reader.position().byte()) {
                Ordering::Less => {
                    self.index += 1;
                    continue;
                }
                Ordering::Greater => {
                    self.done = true;
                    break;
                }
                Ordering::Equal => {}
            }
            bytes += self.row.as_slice().len();
            out.push(match self.record() {
                Ok(value) => OwnedRecord::row(self.index, line, RowValue::Built(value)),
                Err(e) => OwnedRecord {
                    index: self.index,
                    line,
                    text: Err(e),
                    value: None,
                },
            });
            self.index += 1;
        }
        Ok(out)
    }

    fn position(&self) -> u64 {
        self.reader.position().byte()
    }
}
