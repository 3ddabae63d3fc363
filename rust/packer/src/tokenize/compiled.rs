//! The compiled form of a BPE model, cached on disk under the BLAKE3 of its `tokenizer.json`:
//! the vocabulary, the merges resolved to ids and the table of one-token pieces, so that a
//! later load reads them back instead of resolving 280k merges through string lookups (Llama 3:
//! ~0.1 s) and re-checking every vocabulary token against the merges (~0.13 s); and the file
//! itself without the model's `vocab` and `merges` (its "head": normalizer, pre-tokenizer,
//! added tokens, the model's other keys), so that a load never parses the whole JSON again.
//!
//! The file is `$PYFAST_TUNE_CACHE/tokenizers/<hash>.<format>.bpe` (else `$XDG_CACHE_HOME` or
//! `~/.cache`, then `pyfast_tune/tokenizers`), written atomically (a temporary file renamed)
//! and ended by the BLAKE3 of its contents: a file that is short, altered or of another format
//! version reads as absent and is rebuilt from the JSON. Nothing in it is trusted beyond
//! that: the model built from it passes the same checks as one read from the JSON, and
//! `PYFAST_TUNE_TOKENIZER_CACHE=0` turns the cache off.
//!
//! The folder is bounded: a hit marks its file used (its modification time), and each new
//! file written removes the least recently used ones beyond [`MAX_FILES`] files or
//! [`MAX_BYTES`] bytes, and temporary files of writers dead for an hour ([`prune`]).

use std::fmt;
use std::marker::PhantomData;
use std::path::PathBuf;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use super::bpe::{MergeMap, Vocab};
use super::piece_table::{PairTable, PieceTable, NO_PAIR};

/// Bumped whenever the layout, or what a table holds, changes.
const MAGIC: &[u8; 8] = b"PFTBPE03";
/// Compiled tokenizers kept at most (a large vocabulary's file is 10-20 MB).
const MAX_FILES: usize = 32;
/// Bytes of compiled tokenizers kept at most.
const MAX_BYTES: u64 = 512 << 20;

/// What the cache holds for one `tokenizer.json`.
pub(super) struct Compiled {
    pub vocab: Vocab,
    pub merges: MergeMap,
    pub direct: PieceTable<u32>,
    /// `tokenizer.json` without the model's `vocab` and `merges` ([`head_of`]).
    pub head: Vec<u8>,
}

/// `json` (a whole `tokenizer.json`) without its model's `vocab` and `merges`, as JSON text;
/// `None` if it is not an object with an object `model`. Keys keep their order and every
/// other value its exact text.
pub(super) fn head_of(json: &[u8]) -> Option<Vec<u8>> {
    let top: Entries = serde_json::from_slice(json).ok()?;
    let mut out = Vec::with_capacity(4096);
    let mut found = false;
    write_object(&mut out, &top.0, |out, k, v| {
        if k != "model" {
            out.extend_from_slice(v.get().as_bytes());
            return Some(());
        }
        found = true;
        let model: Entries = serde_json::from_str(v.get()).ok()?;
        let kept: Vec<_> = (model.0.into_iter())
            .filter(|(k, _)| !matches!(k.as_str(), "vocab" | "merges"))
            .collect();
        write_object(out, &kept, |out, _, v| {
            out.extend_from_slice(v.get().as_bytes());
            Some(())
        })
    })?;
    found.then_some(out)
}

/// `{"key":value,...}` with each value written by `value`.
fn write_object(
    out: &mut Vec<u8>,
    entries: &[(String, &RawValue)],
    mut value: impl FnMut(&mut Vec<u8>, &str, &RawValue) -> Option<()>,
) -> Option<()> {
    out.push(b'{');
    for (i, (k, v)) in entries.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        serde_json::to_writer(&mut *out, k).ok()?;
        out.push(b':');
        value(out, k, v)?;
    }
    out.push(b'}');
    Some(())
}

/// A JSON object's entries in order, each value's text borrowed unparsed.
struct Entries<'a>(Vec<(String, &'a RawValue)>);

impl<'de> Deserialize<'de> for Entries<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Object<'a>(PhantomData<&'a ()>);
        impl<'de> Visitor<'de> for Object<'de> {
            type Value = Entries<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry::<String, &'de RawValue>()? {
                    out.push(entry);
                }
                Ok(Entries(out))
            }
        }
        d.deserialize_map(Object(PhantomData))
    }
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
    // The format in the name: two versions of the engine on one machine each keep their own
    // file instead of rebuilding the other's on every load.
    let version = std::str::from_utf8(MAGIC).unwrap_or("PFTBPE");
    Some(
        root.join("tokenizers")
            .join(format!("{hash}.{version}.bpe")),
    )
}

/// The tables written by [`write`], or `None` if the file is absent or not one we wrote.
/// The checksum is verified on a second thread while the tables are built (each length is
/// checked against the bytes left before anything is allocated, so a damaged file cannot
/// ask for more memory than its own size); a mismatch discards them.
pub(super) fn read(path: &std::path::Path) -> Option<Compiled> {
    // Mapped, not read: the parse copies what it keeps, and mapping the file's cached pages
    // touches no fresh memory (reading ~9 MB into a buffer did: ~2,300 page faults, ~6 ms of
    // a ~30 ms load on a VM whose fresh pages fault in the hypervisor).
    let file = std::fs::File::open(path).ok()?;
    // SAFETY: cache files are written whole under a temporary name and renamed into place,
    // never changed afterwards (pruning unlinks them, which leaves a mapping intact); a file
    // damaged all the same fails the checksum below.
    let map = unsafe { memmap2::Mmap::map(&file) }.ok()?;
    let bytes: &[u8] = &map;
    // Used now: the last file [`prune`] would remove. (Best effort: a read-only cache works.)
    let _ = std::fs::File::options()
        .append(true)
        .open(path)
        .and_then(|f| f.set_modified(std::time::SystemTime::now()));
    let (body, sum) = bytes.split_at_checked(bytes.len().checked_sub(32)?)?;
    let (intact, tables) = std::thread::scope(|s| {
        let check = s.spawn(|| blake3::hash(body).as_bytes() == sum);
        let tables = parse(body);
        let intact = check
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (intact, tables)
    });
    tables.filter(|_| intact)
}

fn parse(body: &[u8]) -> Option<Compiled> {
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
    let rows = r.take(n.checked_mul(16)?)?;
    let mut map = PairTable::with_capacity(n);
    for e in rows.chunks_exact(16) {
        let key = u64::from_le_bytes(e[..8].try_into().ok()?);
        if key == NO_PAIR {
            return None;
        }
        map.insert(key, (le32(&e[8..12]), le32(&e[12..])));
    }
    let n = r.u32()? as usize;
    let rows = r.take(n.checked_mul(20)?)?;
    let mut direct = PieceTable::with_capacity(n);
    for e in rows.chunks_exact(20) {
        let key = u128::from_le_bytes(e[..16].try_into().ok()?);
        if key == 0 {
            return None;
        }
        direct.insert(key, le32(&e[16..]));
    }
    let n = r.u32()? as usize;
    let head = r.take(n)?.to_vec();
    r.0.is_empty().then_some(Compiled {
        vocab,
        merges: MergeMap::from_entries(map, joins),
        direct,
        head,
    })
}

/// Write the tables to `path` atomically; a failure only costs the next load its time.
pub(super) fn write(
    path: &std::path::Path,
    vocab: &Vocab,
    merges: &PairTable,
    joins_across_metaspace: bool,
    direct: &[(u128, u32)],
    head: &[u8],
) {
    let (arena, entries) = vocab.parts();
    let mut out = Vec::with_capacity(
        2 * arena.len() + 16 * merges.len() + 20 * direct.len() + head.len() + 64,
    );
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
    out.extend_from_slice(&(head.len() as u32).to_le_bytes());
    out.extend_from_slice(head);
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    let Some(dir) = path.parent() else { return };
    let tmp = dir.join(format!(".{}.{}.tmp", std::process::id(), unique()));
    let ok = std::fs::create_dir_all(dir).is_ok()
        && std::fs::write(&tmp, &out).is_ok()
        && std::fs::rename(&tmp, path).is_ok();
    if !ok {
        let _ = std::fs::remove_file(&tmp);
        return;
    }
    prune(dir, MAX_FILES, MAX_BYTES);
}

/// Keep the compiled files of `dir` within `max_files` files and `max_bytes` bytes, removing
/// the least recently used (oldest modification time) first, and remove temporary files of
/// writers that stopped an hour ago or more. Best effort: another process may be pruning or
/// reading too (a file removed under a reader reads as absent and is rebuilt).
pub(super) fn prune(dir: &std::path::Path, max_files: usize, max_bytes: u64) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let now = std::time::SystemTime::now();
    let mut kept = Vec::new();
    for e in entries.flatten() {
        let (Ok(meta), name) = (e.metadata(), e.file_name()) else {
            continue;
        };
        let name = name.to_string_lossy();
        let modified = meta.modified().unwrap_or(now);
        if name.starts_with('.') && name.ends_with(".tmp") {
            let age = now.duration_since(modified).unwrap_or_default();
            if age.as_secs() >= 3600 {
                let _ = std::fs::remove_file(e.path());
            }
        } else if name.ends_with(".bpe") && meta.is_file() {
            kept.push((modified, meta.len(), e.path()));
        }
    }
    kept.sort_by_key(|k| std::cmp::Reverse(k.0)); // most recently used first
    let mut bytes = 0u64;
    for (k, (_, len, path)) in kept.iter().enumerate() {
        bytes += len;
        if k >= max_files || (k > 0 && bytes > max_bytes) {
            let _ = std::fs::remove_file(path);
        }
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

#[cfg(test)]
mod tests {
    use super::{head_of, prune};

    #[test]
    fn the_cache_folder_keeps_the_most_recently_used_files() {
        let dir = tempfile::tempdir().unwrap();
        let now = std::time::SystemTime::now();
        let at = |mins: u64| now - std::time::Duration::from_secs(60 * mins);
        let file = |name: &str, len: usize, mins: u64| {
            let p = dir.path().join(name);
            std::fs::write(&p, vec![0u8; len]).unwrap();
            let f = std::fs::File::options().append(true).open(&p).unwrap();
            f.set_modified(at(mins)).unwrap();
            p
        };
        // ten files of 100 bytes, used 0..9 minutes ago; a stale and a fresh temporary file;
        // a file of another kind is not ours to remove
        let files: Vec<_> = (0..10)
            .map(|k| file(&format!("{k}.PFTBPE03.bpe"), 100, k))
            .collect();
        let stale = file(".1.2.tmp", 10, 120);
        let fresh = file(".1.3.tmp", 10, 1);
        let other = file("notes.txt", 10, 500);
        prune(dir.path(), 6, 1 << 20);
        let exists: Vec<bool> = files.iter().map(|p| p.exists()).collect();
        assert_eq!(
            exists,
            [true, true, true, true, true, true, false, false, false, false]
        );
        assert!(!stale.exists() && fresh.exists() && other.exists());
        // by bytes: 250 keep the two most recent (the most recent one always stays)
        prune(dir.path(), 6, 250);
        let exists: Vec<bool> = files.iter().map(|p| p.exists()).collect();
        assert_eq!(exists[..3], [true, true, false]);
        prune(dir.path(), 6, 10);
        assert!(files[0].exists() && !files[1].exists());
    }

    #[test]
    fn the_head_is_the_file_without_the_models_tables() {
        let json = br#"{"version":"1.0","added_tokens":[{"id":0,"content":"<s>"}],
            "normalizer":null,"model":{"type":"BPE","dropout":null,"vocab":{"a":0,"b":1},
            "unk_token":"\u00e9\"","merges":["a b"],"byte_fallback":false},"decoder":{"x":[1,2]}}"#;
        let head = head_of(json).unwrap();
        assert_eq!(
            std::str::from_utf8(&head).unwrap(),
            r#"{"version":"1.0","added_tokens":[{"id":0,"content":"<s>"}],"normalizer":null,"model":{"type":"BPE","dropout":null,"unk_token":"\u00e9\"","byte_fallback":false},"decoder":{"x":[1,2]}}"#
        );
        // keys that need escaping are written back escaped
        let head = head_of(br#"{"a\"b":1,"model":{}}"#).unwrap();
        assert_eq!(head, br#"{"a\"b":1,"model":{}}"#);
        for bad in [
            &br#"[1]"#[..],
            br#"{"model":[]}"#,
            br#"{"normalizer":null}"#,
            b"{",
        ] {
            assert!(head_of(bad).is_none(), "{:?}", std::str::from_utf8(bad));
        }
    }
}
