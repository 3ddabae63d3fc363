//! Copying staged tokens into the packed token files: a range of whole blocks of the output
//! at a time, so that several threads or processes write one output at once. One pack, the
//! serial merge ([`crate::pack::write`]) and the merge in ranges ([`crate::pack::shard::ranged`])
//! all write `input_ids.bin` and `loss_mask.bin` through [`copy_tokens`].

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::pack::stage::{id_bytes, staged_bytes, unpack_mask_bits, widen_ids};
use crate::packed_dir::atomic::start_writeback;
use crate::packed_dir::direct::{Buffer, DirectWrites, BUFFER_BYTES};
use crate::packed_dir::treehash::{BlockHasher, Share};

/// Default block: 4 Mi tokens (16 MiB of ids, 4 MiB of mask per block).
pub const DEFAULT_BLOCK_TOKENS: u64 = 1 << 22;

/// Tokens copied, written and hashed at a time by a range writer: their ids fill one of the
/// direct writer's buffers (the mask's buffer takes four chunks).
const CHUNK_TOKENS: u64 = (BUFFER_BYTES / 4) as u64;

/// The output's tokens `0..tokens`, in `nblocks` blocks of `block_tokens`, cut into at most
/// `max_ranges` ranges of whole blocks (the last may end short), as even as blocks allow:
/// the ranges [`copy_tokens`] runs at once.
pub(crate) fn block_ranges(
    tokens: u64,
    nblocks: u64,
    block_tokens: u64,
    max_ranges: usize,
) -> Vec<(u64, u64)> {
    let r = (max_ranges.max(1) as u64).min(nblocks);
    (0..r)
        .map(|k| {
            let b0 = nblocks * k / r;
            let b1 = nblocks * (k + 1) / r;
            (b0 * block_tokens, (b1 * block_tokens).min(tokens))
        })
        .collect()
}

/// Open a part's staged tokens for a range's reads, without access-time updates where that is
/// allowed (`O_NOATIME`: the file's owner or root; anyone else opens it plainly): each of the
/// many positioned reads would otherwise check the inode's access time (~2% of a range
/// writer's CPU in perf).
fn open_staged(path: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOATIME)
        .open(path)
        .or_else(|_| File::open(path))
        .map_err(|e| Error::io(path, e))
}

/// One output sample's tokens to copy: destination token, source byte (in the staged token
/// files laid end to end: [`Staged`]), length, whether the ids are staged as `<u2`.
pub(crate) type CopyRow = (u64, u64, u32, bool);

/// The staged token files a copy reads, and where each starts with them laid end to end.
pub(crate) struct Staged<'a> {
    pub files: &'a [PathBuf],
    pub bases: &'a [u64],
}

/// The token files a copy writes (both of their final sizes) and how they are hashed: in
/// blocks of `block_tokens` tokens, or whole when the output is one block (`single`).
pub(crate) struct Dest {
    pub ids: PathBuf,
    pub mask: PathBuf,
    pub block_tokens: u64,
    pub single: bool,
}

/// Copy tokens `t0..t1` of the output (`t0` a multiple of the block; `t1` one too, or the
/// end) from the staged parts into the token files, given `rows` in output order from the
/// one holding token `t0` on; make them durable and return the hashes of the range's blocks
/// of `input_ids.bin` and `loss_mask.bin` (the files' own when `single`). `tick(tokens)`
/// after each chunk written, a `false` from it stops the copy
/// ([`Error::Interrupted`]). Any number of copies of disjoint ranges may run at once.
pub(crate) fn copy_tokens(
    rows: impl Iterator<Item = Result<CopyRow>>,
    from: &Staged<'_>,
    to: &Dest,
    (t0, t1): (u64, u64),
    tick: &(dyn Fn(u64) -> bool + Sync),
) -> Result<(Share, Share)> {
    let open_out = |p: &PathBuf| {
        OpenOptions::new()
            .write(true)
            .open(p)
            .map_err(|e| Error::io(p, e))
    };
    let (out_ids, out_mask) = (open_out(&to.ids)?, open_out(&to.mask)?);
    // The tokens bypass the page cache where the filesystem allows ([`DirectWrites`]); the
    // direct writers hash the blocks (on their threads, which wait on the device anyway).
    let blocks = |width: u64| match to.single {
        true => BlockHasher::whole(),
        false => BlockHasher::blocks(width * to.block_tokens, width * t0),
    };
    let (mut direct_ids, mut direct_mask) = (
        DirectWrites::open(&to.ids, blocks(4)),
        DirectWrites::open(&to.mask, blocks(1)),
    );
    let mut sources: Vec<Option<File>> = (0..from.files.len()).map(|_| None).collect();
    let mut rows = rows.peekable();
    let mut scratch = Vec::new();
    // Each block is filled and written a chunk at a time, straight into the direct writers'
    // buffers (the bytes go to the device with no further copy, hashed on the way); the
    // mask's buffer holds a run of chunks, written at the block's end or when full. Buffers
    // are not cleared: the chunk's samples cover each of its tokens once (counted in
    // `filled`), so what was there is overwritten.
    let mut b0 = t0;
    while b0 < t1 {
        let b1 = (b0 + to.block_tokens).min(t1);
        // The mask's buffer and the token its first byte is.
        let mut mask_buf: Option<(Buffer, u64)> = None;
        let mut c0 = b0;
        while c0 < b1 {
            let c1 = (c0 + CHUNK_TOKENS).min(b1);
            let n = (c1 - c0) as usize;
            let mut ids = direct_ids.buffer().map_err(|e| Error::io(&to.ids, e))?;
            let (mask_all, m0) = match &mut mask_buf {
                Some((m, m0)) => (m, *m0),
                None => {
                    let m = direct_mask.buffer().map_err(|e| Error::io(&to.mask, e))?;
                    let (m, _) = mask_buf.insert((m, c0));
                    (m, c0)
                }
            };
            let mask = &mut mask_all[(c0 - m0) as usize..(c1 - m0) as usize];
            let mut filled = 0usize;
            while let Some(row) = rows.peek() {
                let &(dst, src, len, narrow) =
                    row.as_ref().map_err(|e| Error::Internal(e.to_string()))?;
                let (lo, hi) = (dst.max(c0), (dst + len as u64).min(c1));
                if lo >= c1 {
                    break;
                }
                if lo < hi {
                    filled += (hi - lo) as usize;
                    let p = from.bases.partition_point(|&b| b <= src) - 1;
                    let path = &from.files[p];
                    let f = match &mut sources[p] {
                        Some(f) => f,
                        slot => slot.insert(open_staged(path)?),
                    };
                    // The sample's ids, then its mask's bits, from byte `at` of the part's file.
                    let at = src - from.bases[p];
                    let (a, b) = ((lo - c0) as usize, (hi - c0) as usize);
                    let k = lo - dst;
                    let w = id_bytes(narrow);
                    if hi - lo == len as u64 {
                        // Whole: one read, then the ids and the mask into place.
                        scratch.resize(staged_bytes(len, narrow) as usize, 0);
                        f.read_exact_at(&mut scratch, at)
                            .map_err(|e| Error::io(path, e))?;
                        let (i, m) = scratch.split_at(w * (b - a));
                        widen_ids(i, narrow, &mut ids[4 * a..4 * b]);
                        unpack_mask_bits(m, 0, &mut mask[a..b]);
                    } else {
                        // Part of it: its ids in this chunk, then all its mask's bits.
                        let n_ids = w * (b - a);
                        let bits = (len as u64).div_ceil(8) as usize;
                        scratch.resize(n_ids + bits, 0);
                        let (i, m) = scratch.split_at_mut(n_ids);
                        f.read_exact_at(i, at + w as u64 * k)
                            .and_then(|_| f.read_exact_at(m, at + w as u64 * len as u64))
                            .map_err(|e| Error::io(path, e))?;
                        widen_ids(i, narrow, &mut ids[4 * a..4 * b]);
                        unpack_mask_bits(m, k as usize, &mut mask[a..b]);
                    }
                }
                if dst + len as u64 > c1 {
                    break; // the sample goes on in the next chunk
                }
                rows.next();
            }
            if filled != n {
                return Err(Error::Internal(format!(
                    "merge plan: tokens {c0}..{c1} hold {filled} samples' tokens, not {n}"
                )));
            }
            direct_ids
                .write_buffer(&out_ids, ids, 4 * n, 4 * c0)
                .map_err(|e| Error::io(&to.ids, e))?;
            if c1 == b1 || (c1 - m0) as usize == BUFFER_BYTES {
                let (m, m0) = mask_buf.take().expect("filled above");
                direct_mask
                    .write_buffer(&out_mask, m, (c1 - m0) as usize, m0)
                    .map_err(|e| Error::io(&to.mask, e))?;
            }
            if !tick(n as u64) {
                return Err(Error::Interrupted);
            }
            c0 = c1;
        }
        // The block is written: its pages go to disk while the next one is filled.
        start_writeback(&out_ids, 4 * b0, 4 * (b1 - b0));
        start_writeback(&out_mask, b0, b1 - b0);
        b0 = b1;
    }
    let ids = direct_ids.finish().map_err(|e| Error::io(&to.ids, e))?;
    let mask = direct_mask.finish().map_err(|e| Error::io(&to.mask, e))?;
    for (f, p) in [(&out_ids, &to.ids), (&out_mask, &to.mask)] {
        f.sync_data().map_err(|e| Error::io(p, e))?;
    }
    Ok((ids, mask))
}
