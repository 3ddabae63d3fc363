//! The records every reader yields and the trait of row sources: a leaf, so the dispatcher
//! ([`crate::source`]) and the readers it dispatches to need not import each other.

use crate::error::Result;
use crate::input::RawRecord;
use crate::source::span::Span;

/// Bytes of record text per batch: bounds memory, amortises the parallel encode.
pub const BATCH_BYTES: usize = 1 << 20;

/// Why a record has no JSON text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unreadable {
    /// Not JSON (invalid UTF-8, a broken JSON array).
    Json(String),
    /// A row that cannot be a record (a CSV row with more or fewer cells than the header).
    Row(String),
}

/// One owned record of a batch (see [`RawRecord`]).
#[derive(Clone, Debug)]
pub struct OwnedRecord {
    /// 0-based index of the record in its file.
    pub index: u64,
    /// 1-based line where the record starts (the 1-based row of a Parquet or Arrow file).
    pub line: u64,
    /// The record's JSON text (empty when `value` holds the record), or why it cannot be one.
    pub text: std::result::Result<String, Unreadable>,
    /// The record itself, for a row of a Parquet, Arrow or CSV file: no text to parse.
    pub value: Option<RowValue>,
}

/// A record read as a value: built (a CSV row), or a row of a decoded record batch that the
/// encoder's thread builds when it takes it (so building, like parsing JSONL, runs in
/// parallel, and each value is made and freed on one thread).
#[derive(Clone)]
pub enum RowValue {
    /// The record.
    Built(serde_json::Value),
    /// Row `.1` of the batch `.0` encodes.
    Row(std::sync::Arc<crate::source::row_json::RowEncoder>, usize),
}

impl RowValue {
    /// The record.
    pub fn into_value(self) -> serde_json::Value {
        match self {
            RowValue::Built(v) => v,
            RowValue::Row(enc, r) => enc.row(r),
        }
    }
}

impl std::fmt::Debug for RowValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.clone().into_value())
    }
}

impl OwnedRecord {
    /// A record read as a value (a row of a columnar or CSV file).
    pub fn row(index: u64, line: u64, value: RowValue) -> Self {
        OwnedRecord {
            index,
            line,
            text: Ok(String::new()),
            value: Some(value),
        }
    }

    /// Borrow as a [`RawRecord`] (only for records whose text is valid).
    pub fn raw(&self) -> Option<RawRecord<'_>> {
        self.text.as_ref().ok().map(|t| RawRecord {
            index: self.index,
            line: self.line,
            text: t,
        })
    }
}

/// Rows of a non-JSON source (Parquet, Arrow IPC, CSV), as JSON records.
pub(crate) trait RowSource {
    /// Read only the rows whose bytes the span places in this shard.
    fn restrict(&mut self, span: Span);
    /// The next batch of at most `max_records` records (about [`BATCH_BYTES`] of text); an
    /// empty batch means the end.
    fn next_batch(&mut self, max_records: usize) -> Result<Vec<OwnedRecord>>;
    /// Bytes of the file read so far (for progress).
    fn position(&self) -> u64;
}
