//! Raw bytes of an input file: read with every byte hashed on the way (the fingerprint needs
//! each input's BLAKE3), and decompressed by the file's `.gz`/`.zst` ending.

use std::cell::RefCell;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;
use std::rc::Rc;

use crate::error::{Error, Result};
use crate::source::fetch::{Fetch, FetchingFile};

#[derive(Default)]
pub(crate) struct HashState {
    pub(crate) hasher: blake3::Hasher,
    pub(crate) bytes: u64,
    /// Count the bytes but do not hash them (a shard: the file is hashed in blocks).
    pub(crate) counting_only: bool,
}

/// Reads a file and hashes every byte that passes.
pub(crate) struct HashingReader {
    file: FetchingFile,
    state: Rc<RefCell<HashState>>,
}

impl Read for HashingReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read(buf)?;
        let mut st = self.state.borrow_mut();
        if !st.counting_only {
            st.hasher.update(&buf[..n]);
        }
        st.bytes += n as u64;
        Ok(n)
    }
}

pub(crate) fn open_decoded(path: &Path, raw: HashingReader) -> Result<Box<dyn Read>> {
    let name = path.to_string_lossy();
    Ok(if name.ends_with(".gz") {
        Box::new(flate2::read::MultiGzDecoder::new(BufReader::new(raw)))
    } else if name.ends_with(".zst") {
        Box::new(zstd::stream::read::Decoder::new(raw).map_err(|e| Error::io(path, e))?)
    } else {
        Box::new(raw)
    })
}

impl HashingReader {
    /// Open `path` at byte `pos` (counted in `state` as read), every read asked of `fetch`
    /// first: in whole buffers before `bulk_end`, in small steps after it.
    pub(crate) fn open_at(
        path: &Path,
        state: &Rc<RefCell<HashState>>,
        fetch: Option<Fetch>,
        pos: u64,
        bulk_end: u64,
    ) -> Result<Self> {
        state.borrow_mut().bytes = pos;
        Ok(HashingReader {
            file: FetchingFile {
                file: File::open(path).map_err(|e| Error::io(path, e))?,
                path: path.to_path_buf(),
                fetch,
                pos,
                bulk_end,
            },
            state: state.clone(),
        })
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
