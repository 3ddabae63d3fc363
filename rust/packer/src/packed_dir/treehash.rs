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

pub use blake3::hazmat::ChainingValue;
use blake3::hazmat::{merge_subtrees_non_root, merge_subtrees_root, HasherExt, Mode};

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
        assert_eq!(left_blocks(2), 1);
        assert_eq!(left_blocks(5), 4);
        assert_eq!(left_blocks(8), 4);
    }
}
