//! The BLAKE3 of a file written in pieces by different processes, without reading it again.
//!
//! BLAKE3 is a Merkle tree over 1 KiB chunks whose left subtree always holds the largest power
//! of two of chunks below the total (section 2.1 of the BLAKE3 paper). Cut a file into
//! *blocks* of `2^k` chunks: every block but the last is a whole subtree, the last one a
//! subtree on the right edge, and the left-subtree rule read in blocks is the same rule (the
//! largest power of two of chunks below the total is a whole number of blocks). So each
//! writer hashes the blocks it wrote into chaining values at their offsets
//! ([`block_cv`]), and [`root`] folds the list in order into the hash `blake3::hash` would
//! give the whole file.

use std::os::unix::fs::FileExt as _;
use std::path::Path;

pub use blake3::hazmat::ChainingValue;
use blake3::hazmat::{merge_subtrees_non_root, merge_subtrees_root, HasherExt, Mode};

use crate::error::{Error, Result};
use crate::source::fetch::{ensure, Fetch};

/// The key of a part's file-table row that carries the blocks a shard hashed
/// (`{"first": index, "cvs": [hex, ...]}`); the merge folds them and removes it.
pub const BLAKE3_BLOCKS: &str = "blake3_blocks";

/// The key of a part's file-table row that carries [`probe`] of a file a shard hashed part
/// of: parts that saw different versions of the file (its ends differ) are refused.
pub const SHARE_PROBE: &str = "ends_blake3";

/// Bytes of a BLAKE3 chunk: the smallest block.
pub const CHUNK: u64 = 1024;

/// Is `block` (bytes) a valid block size: a power of two of chunks?
pub fn valid_block(block: u64) -> bool {
    block >= CHUNK && block.is_power_of_two()
}

/// The chaining value of the block of `bytes` that starts at `offset` of the file (a
/// multiple of the block size; only the file's last block may be shorter). Meaningful only
/// when the file has more than one block: a file of one block is hashed whole.
pub fn block_cv(offset: u64, bytes: &[u8]) -> ChainingValue {
    let mut h = blake3::Hasher::new();
    h.set_input_offset(offset);
    h.update(bytes);
    h.finalize_non_root()
}

fn subtree(cvs: &[ChainingValue]) -> ChainingValue {
    match cvs {
        [one] => *one,
        _ => {
            let left = left_blocks(cvs.len());
            merge_subtrees_non_root(&subtree(&cvs[..left]), &subtree(&cvs[left..]), Mode::Hash)
        }
    }
}

/// The largest power of two below `n` (n >= 2): the left subtree's blocks.
fn left_blocks(n: usize) -> usize {
    1 << (usize::BITS - 1 - (n - 1).leading_zeros())
}

/// The hash of a file of two or more blocks from its blocks' chaining values, in order.
pub fn root(cvs: &[ChainingValue]) -> Option<blake3::Hash> {
    if cvs.len() < 2 {
        return None;
    }
    let left = left_blocks(cvs.len());
    Some(merge_subtrees_root(
        &subtree(&cvs[..left]),
        &subtree(&cvs[left..]),
        Mode::Hash,
    ))
}

/// The block size an input file of `size` bytes is hashed in by the shards of a run: about
/// 256 blocks, 1 KiB to 16 MiB each (a function of the size alone: every shard agrees).
pub fn input_block(size: u64) -> u64 {
    (size / 256).next_power_of_two().clamp(CHUNK, 16 << 20)
}

/// What one shard hashed of an input file: the blocks whose first byte falls in its share.
#[derive(Debug)]
pub enum Share {
    /// A file of one block, hashed whole by the shard that owns it.
    Whole(blake3::Hash),
    /// Blocks `first..first + cvs.len()` (none: the shard owns no block of the file).
    Blocks {
        /// Index of the first block.
        first: u64,
        /// Their chaining values, in order.
        cvs: Vec<ChainingValue>,
    },
}

/// Hash the blocks of the file at `path` (`size` bytes, [`input_block`] each) whose first
/// byte `owns` says are this shard's; the blocks of a file are owned by the shards in order,
/// so one shard's are consecutive. Reads those bytes only, each block asked of `fetch`
/// first.
pub fn hash_share(
    path: &Path,
    size: u64,
    owns: impl Fn(u64) -> bool,
    fetch: Option<&Fetch>,
) -> Result<Share> {
    let block = input_block(size);
    let n = size.div_ceil(block);
    let mine: Vec<u64> = (0..n).filter(|&j| owns(j * block)).collect();
    let f = || std::fs::File::open(path).map_err(|e| Error::io(path, e));
    if n <= 1 {
        if mine.is_empty() {
            return Ok(Share::Blocks {
                first: 0,
                cvs: Vec::new(),
            });
        }
        ensure(fetch, path, 0, size)?;
        return crate::source::raw::hash_file(path).map(|(_, h)| Share::Whole(h));
    }
    let file = f()?;
    let mut buf = vec![0u8; block as usize];
    let mut cvs = Vec::with_capacity(mine.len());
    for &j in &mine {
        let len = (size - j * block).min(block) as usize;
        ensure(fetch, path, j * block, j * block + len as u64)?;
        file.read_exact_at(&mut buf[..len], j * block)
            .map_err(|e| Error::io(path, e))?;
        cvs.push(block_cv(j * block, &buf[..len]));
    }
    Ok(Share::Blocks {
        first: mine.first().copied().unwrap_or(0),
        cvs,
    })
}

/// BLAKE3 (hex) of the first and last 64 KiB of a file of `size` bytes: what every shard
/// reading part of it can check cheaply against the others (asked of `fetch` first).
pub fn probe(path: &Path, size: u64, fetch: Option<&Fetch>) -> Result<String> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let n = size.min(1 << 16);
    let mut buf = vec![0u8; n as usize];
    let mut h = blake3::Hasher::new();
    for at in [0, size - n] {
        ensure(fetch, path, at, at + n)?;
        f.read_exact_at(&mut buf, at)
            .map_err(|e| Error::io(path, e))?;
        h.update(&buf);
    }
    Ok(h.finalize().to_hex().to_string())
}

/// Hashes bytes given in file order into what [`hash_share`] gives: the hash of the file when
/// it is one block, else the chaining values of the blocks the bytes cover (the first byte a
/// block boundary; only the file's last block may end short). A writer of a file's bytes
/// hashes them as they go out, in pieces of any length.
#[derive(Clone)]
pub struct BlockHasher {
    /// Bytes of a block (`u64::MAX`: the file is one block).
    block: u64,
    /// The file's offset of the next byte.
    pos: u64,
    /// The first block's index.
    first: u64,
    cur: blake3::Hasher,
    /// Whether `cur` has bytes.
    open: bool,
    cvs: Vec<ChainingValue>,
}

impl BlockHasher {
    /// The hash of a whole file, from its first byte.
    pub fn whole() -> Self {
        Self::blocks(u64::MAX, 0)
    }

    /// Blocks of `block` bytes (a [`valid_block`], or `u64::MAX` for a file of one block)
    /// from `start`, a multiple of `block`.
    pub fn blocks(block: u64, start: u64) -> Self {
        debug_assert!(block == u64::MAX || (valid_block(block) && start.is_multiple_of(block)));
        let mut cur = blake3::Hasher::new();
        if block != u64::MAX {
            cur.set_input_offset(start);
        }
        BlockHasher {
            block,
            pos: start,
            first: if block == u64::MAX { 0 } else { start / block },
            cur,
            open: false,
            cvs: Vec::new(),
        }
    }

    /// The next bytes of the file.
    pub fn update(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let room = self.block - self.pos % self.block;
            let n = (room.min(bytes.len() as u64)) as usize;
            self.cur.update(&bytes[..n]);
            self.open = true;
            self.pos += n as u64;
            bytes = &bytes[n..];
            if self.pos.is_multiple_of(self.block) {
                let mut next = blake3::Hasher::new();
                next.set_input_offset(self.pos);
                self.cvs
                    .push(std::mem::replace(&mut self.cur, next).finalize_non_root());
                self.open = false;
            }
        }
    }

    /// What was hashed: [`Share::Whole`] for a file of one block, else its blocks'
    /// chaining values.
    pub fn finish(mut self) -> Share {
        if self.block == u64::MAX {
            return Share::Whole(self.cur.finalize());
        }
        if self.open {
            self.cvs.push(self.cur.finalize_non_root());
        }
        Share::Blocks {
            first: self.first,
            cvs: self.cvs,
        }
    }
}

/// Hex of a chaining value, as it travels in JSON.
pub fn to_hex(cv: &ChainingValue) -> String {
    cv.iter().map(|b| format!("{b:02x}")).collect()
}

/// A chaining value from its hex.
pub fn from_hex(s: &str) -> Option<ChainingValue> {
    let mut cv = [0u8; 32];
    if s.len() != 64 {
        return None;
    }
    for (k, byte) in cv.iter_mut().enumerate() {
        *byte = u8::from_str_radix(s.get(2 * k..2 * k + 2)?, 16).ok()?;
    }
    Some(cv)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_fold_to_the_hash_of_the_whole() {
        let data: Vec<u8> = (0..70_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for block in [1024u64, 2048, 4096, 16384] {
            for len in [2049usize, 4096, 5000, 9 * 1024, 33_000, 65_536, 70_000] {
                let bytes = &data[..len];
                if (len as u64) <= block {
                    continue;
                }
                let cvs: Vec<ChainingValue> = bytes
                    .chunks(block as usize)
                    .enumerate()
                    .map(|(k, b)| block_cv(k as u64 * block, b))
                    .collect();
                assert_eq!(
                    root(&cvs),
                    Some(blake3::hash(bytes)),
                    "block {block} len {len}"
                );
            }
        }
        assert!(valid_block(4096) && !valid_block(512) && !valid_block(3072));
        // Three shards' shares of a file on disk fold to its hash.
        let dir = std::env::temp_dir().join(format!("treehash-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("f");
        std::fs::write(&p, &data[..69_001]).unwrap();
        let size = 69_001u64;
        let mut all = Vec::new();
        for i in 0..3u64 {
            match hash_share(&p, size, |off| off * 3 / size == i, None).unwrap() {
                Share::Blocks { first, cvs } => {
                    assert!(cvs.is_empty() || first == all.len() as u64);
                    all.extend(cvs);
                }
                Share::Whole(_) => panic!("a file of many blocks"),
            }
        }
        assert_eq!(root(&all), Some(blake3::hash(&data[..69_001])));
        std::fs::remove_dir_all(&dir).unwrap();
        // Bytes hashed as a writer gives them, in pieces across blocks, fold to the same.
        for (block, len) in [
            (1024u64, 70_000usize),
            (4096, 16_384),
            (4096, 20_000),
            (16384, 60_000),
        ] {
            let mut all = Vec::new();
            for (lo, hi) in [(0, 3 * block as usize), (3 * block as usize, len)] {
                let mut h = BlockHasher::blocks(block, lo as u64);
                for piece in data[lo..hi].chunks(777) {
                    h.update(piece);
                }
                match h.finish() {
                    Share::Blocks { first, cvs } => {
                        assert_eq!(first, all.len() as u64);
                        all.extend(cvs);
                    }
                    Share::Whole(_) => panic!("blocks asked"),
                }
            }
            assert_eq!(
                root(&all),
                Some(blake3::hash(&data[..len])),
                "{block} {len}"
            );
        }
        let mut h = BlockHasher::whole();
        data[..5000].chunks(999).for_each(|p| h.update(p));
        assert!(matches!(h.finish(), Share::Whole(x) if x == blake3::hash(&data[..5000])));
        assert_eq!(left_blocks(2), 1);
        assert_eq!(left_blocks(5), 4);
        assert_eq!(left_blocks(8), 4);
    }
}
