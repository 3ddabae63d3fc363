//! What the columnar readers (Parquet, Arrow IPC) share: their file-level errors, the check
//! that every column has a JSON value, the records of a decoded batch, and the thread that
//! decodes ahead of the encoder.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

use arrow_array::RecordBatch;

use crate::error::{Error, Result};
use crate::source::record::{OwnedRecord, RowValue, BATCH_BYTES};
use crate::source::row_json::RowEncoder;

/// Record batches decoded ahead of the encoder (each about
/// [`crate::source::parquet::DECODE_BYTES`] from Parquet).
const AHEAD: usize = 8;

/// A file-level fault of a columnar or CSV input (it cannot be read as its kind).
pub(crate) fn source_error(path: &Path, msg: impl Into<String>) -> Error {
    Error::Source {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// The rows of `batch` as records (built later, by whoever takes them), the first with
/// record index `first` (its line is the 1-based row).
pub(crate) fn convert_batch(path: &Path, batch: &RecordBatch, first: u64) -> Result<Converted> {
    let enc = Arc::new(RowEncoder::new(batch).map_err(|m| source_error(path, m))?);
    let recs = (0..enc.num_rows())
        .zip(first..)
        .map(|(r, index)| OwnedRecord::row(index, index + 1, RowValue::Row(enc.clone(), r)))
        .collect();
    Ok((recs, batch.get_array_memory_size()))
}

/// The records of one decoded batch and the batch's size in memory.
pub(crate) type Converted = (Vec<OwnedRecord>, usize);

/// Records of batches decoded on a thread of its own, a few batches ahead of the encoder,
/// handed out in order: decoding columnar data overlaps tokenization instead of stalling it.
pub(crate) struct Ahead {
    rx: Receiver<Result<Converted>>,
    pending: VecDeque<OwnedRecord>,
    /// Records received so far.
    received: u64,
}

impl Ahead {
    /// Run `work` on a new thread; it hands each batch's records (or the error that ends the
    /// file) to `send`, which says false once nobody listens (the stream stopped early). A
    /// reader that wants only the first few records (`max_records`, the format probe) gets
    /// no batches decoded ahead.
    pub(crate) fn spawn(
        max_records: usize,
        work: impl FnOnce(&dyn Fn(Result<Converted>) -> bool) + Send + 'static,
    ) -> Result<Self> {
        let (tx, rx) = sync_channel(if max_records < 256 { 0 } else { AHEAD });
        std::thread::Builder::new()
            .name("pyfast-tune-rows".into())
            .spawn(move || work(&|recs| tx.send(recs).is_ok()))
            .map_err(|e| Error::Internal(format!("cannot start a reading thread: {e}")))?;
        Ok(Ahead {
            rx,
            pending: VecDeque::new(),
            received: 0,
        })
    }

    /// The next at most `max_records` records: about [`BATCH_BYTES`] / 2 of decoded data (a
    /// batch large enough for the encoder's threads to share evenly), more if ready; empty at
    /// the end.
    pub(crate) fn next_batch(&mut self, max_records: usize) -> Result<Vec<OwnedRecord>> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        while out.len() < max_records {
            if let Some(r) = self.pending.pop_front() {
                out.push(r);
                continue;
            }
            let next = if bytes < BATCH_BYTES / 2 {
                self.rx.recv().ok()
            } else {
                self.rx.try_recv().ok()
            };
            match next {
                None => break,
                Some(recs) => {
                    let (recs, size) = recs?;
                    bytes += size;
                    self.received += recs.len() as u64;
                    self.pending.extend(recs);
                }
            }
        }
        Ok(out)
    }

    /// Records handed out so far.
    pub(crate) fn handed_out(&self) -> u64 {
        self.received - self.pending.len() as u64
    }
}

/// Check that every column of `schema` has a JSON value.
pub(crate) fn check_schema(path: &Path, schema: arrow_schema::SchemaRef) -> Result<()> {
    RowEncoder::new(&RecordBatch::new_empty(schema))
        .map(|_| ())
        .map_err(|m| source_error(path, m))
}
