//! Bytes a front end makes readable on demand: an object-storage shard lays its inputs out
//! as sparse placeholders of the objects' sizes, and the engine names each byte range of an
//! input before it reads it, so the front end downloads only what is read (a shard of a
//! large JSONL object: its share, the line that crosses the share's end, the file's head for
//! the format probe). Local files need no hook. A leaf: every reader may take one.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, Result};

/// Called with (file, start, end) before the engine reads bytes `start..end` of an input
/// (`end` may pass the end of the file); returns once they can be read.
pub type Fetch = Arc<dyn Fn(&Path, u64, u64) -> Result<()> + Send + Sync>;

/// Ask `fetch` (if any) for bytes `start..end` of `path`.
pub(crate) fn ensure(fetch: Option<&Fetch>, path: &Path, start: u64, end: u64) -> Result<()> {
    match fetch {
        Some(f) if start < end => f(path, start, end),
        _ => Ok(()),
    }
}

/// Reads past this many bytes of a reader's bulk end are asked for in steps of this size,
/// so a reader finishing the line that crosses its share's end asks for little more.
pub(crate) const STEP: u64 = 64 << 10;

/// Positioned reads of `path` whose every byte is asked for first: `read_at` fills `buf`
/// from `at` (short only at the end of the file).
pub(crate) fn read_at(
    file: &File,
    fetch: Option<&Fetch>,
    path: &Path,
    buf: &mut [u8],
    at: u64,
) -> Result<usize> {
    ensure(fetch, path, at, at + buf.len() as u64)?;
    let mut done = 0;
    while done < buf.len() {
        let n = file
            .read_at(&mut buf[done..], at + done as u64)
            .map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        done += n;
    }
    Ok(done)
}

/// A file read from `pos` on with every read asked for first: reads before `bulk_end` go
/// in whole buffers, later ones in [`STEP`]s.
pub(crate) struct FetchingFile {
    pub(crate) file: File,
    pub(crate) path: std::path::PathBuf,
    pub(crate) fetch: Option<Fetch>,
    pub(crate) pos: u64,
    pub(crate) bulk_end: u64,
}

impl Read for FetchingFile {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut len = buf.len() as u64;
        if let Some(f) = &self.fetch {
            len = len.min(if self.pos < self.bulk_end {
                self.bulk_end - self.pos
            } else {
                STEP
            });
            f(&self.path, self.pos, self.pos + len).map_err(std::io::Error::other)?;
        }
        let n = self.file.read_at(&mut buf[..len as usize], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}
