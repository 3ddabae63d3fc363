//! Arrow IPC input, stream and file format alike: the file format is the stream format between
//! a magic and a footer, so both are read message by message from the front (what
//! `datasets.save_to_disk` writes is the stream format). Batches are decoded and converted to
//! records on a thread of their own, ahead of the encoder, as for Parquet; memory is a few
//! record batches. A shard converts the record batches whose bytes its span holds; the others
//! are only decoded to count their rows (decoding IPC is a copy, no parsing).

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arrow_ipc::reader::StreamReader;

use crate::error::{Error, Result};
use crate::source::columnar::{check_schema, convert_batch, source_error, Ahead};
use crate::source::record::{OwnedRecord, RowSource};
use crate::source::span::Span;

/// The magic that opens (and closes) an Arrow IPC file.
const FILE_MAGIC: &[u8] = b"ARROW1";

/// Counts the bytes the IPC reader has consumed: the position of message boundaries.
struct Counted<R> {
    inner: R,
    pos: Arc<AtomicU64>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.pos.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

type Reader = StreamReader<Counted<BufReader<File>>>;

/// The rows of one Arrow IPC file.
pub(crate) struct IpcRows {
    path: PathBuf,
    /// The reader until the decoding thread takes it.
    reader: Option<Reader>,
    pos: Arc<AtomicU64>,
    span: Span,
    ahead: Option<Ahead>,
}

impl IpcRows {
    /// Read the schema of `path` and check that every column can be a JSON value.
    pub(crate) fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let mut buf = BufReader::with_capacity(1 << 20, file);
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
        let pos = Arc::new(AtomicU64::new(start));
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
            reader: Some(reader),
            pos,
            span: Span::ALL,
            ahead: None,
        })
    }

    fn start(&mut self, max_records: usize) -> Result<()> {
        let (Some(reader), path, span, pos) = (
            self.reader.take(),
            self.path.clone(),
            self.span,
            self.pos.clone(),
        ) else {
            return Ok(());
        };
        self.ahead = Some(Ahead::spawn(max_records, move |send| {
            let mut reader = reader;
            let mut index = 0u64;
            loop {
                // The batch's bytes: from the end of the previous message to where the reader
                // stands after it.
                let start = pos.load(Ordering::Relaxed);
                let Some(batch) = reader.next() else {
                    return;
                };
                let batch = match batch {
                    Ok(b) => b,
                    Err(e) => {
                        send(Err(Error::Record {
                            path: path.clone(),
                            line: index + 1,
                            record: index,
                            msg: format!("cannot decode the Arrow record batch from here: {e}"),
                        }));
                        return;
                    }
                };
                let first = index;
                index += batch.num_rows() as u64;
                match span.place(start, pos.load(Ordering::Relaxed)) {
                    std::cmp::Ordering::Less => {}
                    std::cmp::Ordering::Greater => return,
                    std::cmp::Ordering::Equal => {
                        if !send(convert_batch(&path, &batch, first)) {
                            return;
                        }
                    }
                }
            }
        })?);
        Ok(())
    }
}

impl RowSource for IpcRows {
    fn restrict(&mut self, span: Span) {
        self.span = span;
    }

    fn next_batch(&mut self, max_records: usize) -> Result<Vec<OwnedRecord>> {
        if self.ahead.is_none() {
            self.start(max_records)?;
        }
        match &mut self.ahead {
            Some(a) => a.next_batch(max_records),
            None => Ok(Vec::new()),
        }
    }

    fn position(&self) -> u64 {
        self.pos.load(Ordering::Relaxed)
    }
}
