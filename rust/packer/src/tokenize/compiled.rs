//! The compiled form of a BPE model, cached on disk under the BLAKE3 of its `tokenizer.json`:
//! the vocabulary, the merges resolved to ids and the table of one-token pieces, so that a
//! later load reads them back instead of resolving 280k merges through string lookups (Llama 3:
//! ~0.1 s) and re-checking every vocabulary token against the merges (~0.13 s).
//!
//! The file is `$PYFAST_TUNE_CACHE/tokenizers/<hash>.bpe` (else `$XDG_CACHE_HOME` or
//! `~/.cache`, then `pyfast_tune/tokenizers`), written atomically (a temporary file renamed)
//! and ended by the BLAKE3 of its contents: a file that is short, altered or of another format
//! version reads as absent and is rebuilt from the JSON. Nothing in it is trusted beyond
//! that: the model built from it passes the same checks as one read from the JSON, and
//! `PYFAST_TUNE_TOKENIZER_CACHE=0` turns the cache off.

use std::path::PathBuf;

use super::bpe::{MergeMap, Vocab};
use super::piece_table::{PairTable, PieceTable, NO_PAIR};

/// Bumped whenever the layout, or what a table holds, changes.
const MAGIC: &[u8; 8] = b"PFTBPE02";

/// What the cache holds for one `tokenizer.json`.
pub(super) struct Compiled {
    pub vocab: Vocab,
    pub merges: MergeMap,
    pub direct: PieceTable<u32>,
}

/// The cache file for the `tokenizer.json` whose BLAKE3 (hex) is `hash`; `None` when the cache
/// is off or no cache directory can be named.
pub(super) fn path_for(hash: &str) -> Option<PathBuf> {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if env("PYFAST_TUNE_TOKENIZER_CACHE").is_some_and(|v| v == "0") {
        return None;
    }
    let root = match env("PYFAST_TUNE_CACHE") {
        Some(d) => PathBuf::from(d),
        None => env("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| env("HOME").map(|h| PathBuf::from(h).join(".cache")))?
            .join("pyfast_tune"),
    };
    Some(root.join("tokenizers").join(format!("{hash}.bpe")))
}

/// The tables written by [`write`], or `None` if the file is absent or not one we wrote.
pub(super) fn read(path: &std::path::Path) -> Option<Compiled> {
    let bytes = std::fs::read(path).ok()?;
    let (body, sum) = bytes.split_at_checked(bytes.len().checked_sub(32)?)?;
    if blake3::hash(body).as_bytes() != sum {
        return None;
    }
    let mut r = Reader(body.strip_prefix(MAGIC)?);
    let n = r.u32()? as usize;
    let arena = String::from_utf8(r.take(n)?.to_vec()).ok()?;
    let n = r.u32()? as usize;
    let entries = r.take(n.checked_mul(12)?)?;
    let vocab = Vocab::from_parts(
        arena,
        entries
            .chunks_exact(12)
            .map(|e| (le32(&e[..4]), le32(&e[4..8]), le32(&e[8..]))),
    )?;
    let joins = r.u32()? != 0;
    let n = r.u32()? as usize;
    let mut map = PairTable::with_capacity(n);
    for e in r.take(n.checked_mul(16)?)?.chunks_exact(16) {
        let key = u64::from_le_bytes(e[..8].try_into().ok()?);
        if key == NO_PAIR {
            return None;
        }
        map.insert(key, (le32(&e[8..12]), le32(&e[12..])));
    }
    let n = r.u32()? as usize;
    let mut direct = PieceTable::with_capacity(n);
    for e in r.take(n.checked_mul(20)?)?.chunks_exact(20) {
        let key = u128::from_le_bytes(e[..16].try_into().ok()?);
        if key == 0 {
            return None;
        }
        direct.insert(key, le32(&e[16..]));
    }
    r.0.is_empty().then_some(Compiled {
        vocab,
        merges: MergeMap::from_entries(map, joins),
        direct,
    })
}

/// Write the tables to `path` atomically; a failure only costs the next load its time.
pub(super) fn write(
    path: &std::path::Path,
    vocab: &Vocab,
    merges: &PairTable,
    joins_across_metaspace: bool,
    direct: &[(u128, u32)],
) {
    let (arena, entries) = vocab.parts();
    let mut out = Vec::with_capacity(arena.len() + 16 * merges.len() + 20 * direct.len() + 64);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(arena.len() as u32).to_le_bytes());
    out.extend_from_slice(arena.as_bytes());
    let entries: Vec<(u32, u32, u32)> = entries.collect();
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for (off, len, id) in entries {
        for v in [off, len, id] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    out.extend_from_slice(&u32::from(joins_across_metaspace).to_le_bytes());
    out.extend_from_slice(&(merges.len() as u32).to_le_bytes());
    for (key, (rank, id)) in merges.iter() {
        out.extend_from_slice(&key.to_le_bytes());
        out.extend_from_slice(&rank.to_le_bytes());
        out.extend_from_slice(&id.to_le_bytes());
    }
    out.extend_from_slice(&(direct.len() as u32).to_le_bytes());
    for &(key, id) in direct {
        out.extend_from_slice(&key.to_le_bytes());
        out.extend_from_slice(&id.to_le_bytes());
    }
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    let Some(dir) = path.parent() else { return };
    let tmp = dir.join(format!(".{}.{}.tmp", std::process::id(), unique()));
    let ok = std::fs::create_dir_all(dir).is_ok()
        && std::fs::write(&tmp, &out).is_ok()
        && std::fs::rename(&tmp, path).is_ok();
    if !ok {
        let _ = std::fs::remove_file(&tmp);
    }
}

/// A number no other call in this process returns (temporary file names).
fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b.try_into().expect("4 bytes"))
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(le32)
    }
}
