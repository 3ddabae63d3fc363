//! Sharded packing: `pack --shard I/N` encodes part I of the inputs and saves it as a *part
//! directory*; `merge-packs` joins the N parts and runs the single-machine [`finish`] on them.
//!
//! Why the bytes are identical to one machine: packing is global (best-fit decreasing over
//! every sample's length, then seeded shuffles), so shards must not pack. The ordered input
//! files are laid end to end as one byte range and shard I takes the I-th N-th of it: a
//! line of an uncompressed JSONL file belongs to the shard whose share holds its first byte,
//! every other unit of work (a CSV row, a Parquet row group, an Arrow record batch, or a
//! whole file where a file cannot be split: compressed, a JSON array, pre-tokenized) to the
//! shard in whose share its midpoint falls ([`Span`]). So one large file is split as evenly
//! as many small ones. Each shard stages its samples exactly as a single run would and
//! saves per-sample (length, file, record) plus its staged tokens. The merge
//! concatenates the parts in shard order — which is input order — and joins the entries of a
//! file that several shards read, so the sample list, the lengths, the packing plan, the
//! token bytes and meta.json are all the same. A shard of a JSONL file reads it from the
//! first line that begins in its share and numbers its records from there; the merge adds
//! the counts of the parts before ([`crate::pack::numbering`]).
//!
//! The shard holding a file's first byte is its *head*: it alone reports what concerns the
//! file as a whole (an empty file, a format that cannot be detected, a file that cannot be
//! opened), so such a fault is counted once.
//!
//! Part directory: `stage_tokens.tmp` (each sample's ids, `<u2` when all are below 65,536
//! else `<u4`, then its mask's bits), `part_samples.bin` (`<u4` length with bit 31 set for a
//! `<u2` sample, `<u4` trained tokens, `<u4` global file index, `<u8` record; 20 bytes per
//! sample) and
//! `part.json` (shard, counts, statistics, the files it read and their entries, the run's
//! header, and for preference pairs `pair_starts`: the part-local index of each pair's chosen
//! sample, its rejected sample being the next). A record is one unit of a shard, so a pair
//! is never split between parts.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::pack::numbering::{self, Site};
use crate::pack::stage::{
    staged_bytes, Part, StagedSample, ROLE_CHOSEN, ROLE_NONE, ROLE_REJECTED, STAGE_TOKENS,
};
use crate::pack::stats::{PackStats, Progress};
use crate::pack::write::{finish, Header};
use crate::packed_dir::atomic::{HashedWriter, StagingDir};
use crate::packed_dir::treehash::{self, BLAKE3_BLOCKS, SHARE_PROBE};

pub mod ranged;

const PART_JSON: &str = "part.json";
const PART_SAMPLES: &str = "part_samples.bin";
const KIND: &str = "pyfast-tune pack part";
/// Layout of a part's files (`part.json` "format"): 4 since a sample whose ids are all below
/// 65,536 is staged with `<u2` ids ([`NARROW_BIT`]) and each sample's row holds its trained
/// tokens (a mix's statistics are counted from them); 3 since a part of a JSONL file split
/// by line numbers its records from its first line (its file-table row then carries
/// [`numbering::LINES`]; a format-2 part numbered them from the file's start, and merged
/// with format-3 parts would be numbered twice); 2 since each sample's ids and mask bits are
/// staged together ([`STAGE_TOKENS`]); parts without it staged ids and mask bytes in two
/// files.
const PART_FORMAT: u64 = 4;
/// Set in a `part_samples.bin` length when the sample's ids are staged as `<u2`.
const NARROW_BIT: u32 = 1 << 31;
/// Key of `part.json`: the skipped examples that name a record by its part-local numbers.
const SITES: &str = "example_sites";

fn corrupt(path: &Path, msg: impl Into<String>) -> Error {
    Error::Corrupt {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Save a shard's encoded part into its staging directory and commit it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn save(
    header: &Header,
    part: Part,
    i: usize,
    n: usize,
    all_files: &[String],
    staging: StagingDir,
    start: Instant,
) -> Result<PackStats> {
    let mut w = HashedWriter::create(staging.dir.join(PART_SAMPLES))?;
    if part.loss.len() != part.samples.len() {
        return Err(Error::Internal("a loss count per staged sample".into()));
    }
    for (s, loss) in part.samples.iter().zip(&part.loss) {
        if s.len & NARROW_BIT != 0 {
            return Err(Error::Internal(format!("a sample of {} tokens", s.len)));
        }
        let len = s.len | if s.narrow { NARROW_BIT } else { 0 };
        w.write(&len.to_le_bytes())?;
        w.write(&loss.to_le_bytes())?;
        w.write(&s.file.to_le_bytes())?;
        w.write(&s.record.to_le_bytes())?;
    }
    let (_, samples_hash) = w.finish()?;
    let mut stats = part.stats;
    stats.samples = part.samples.len() as u64;
    stats.tokens = part.tokens;
    let mut doc = json!({
        "kind": KIND,
        "format": PART_FORMAT,
        "shard": i,
        "num_shards": n,
        "files": all_files,
        "read": part.files.iter().map(|&(f, head)| json!([f, head])).collect::<Vec<_>>(),
        "header": header,
        "samples": part.samples.len(),
        "tokens": part.tokens,
        "part_samples_blake3": samples_hash,
        "stats": stats,
        "file_entries": part.file_entries,
        "file_table": part.file_table,
        "images": part.images,
        "margins": part.margins,
    });
    let pair_starts: Vec<usize> = (part.samples.iter().enumerate())
        .filter(|(_, s)| s.role == ROLE_CHOSEN)
        .map(|(k, _)| k)
        .collect();
    if !pair_starts.is_empty() {
        doc["pair_starts"] = json!(pair_starts);
    }
    if !part.sites.is_empty() {
        doc[SITES] = json!(part.sites);
    }
    let p = staging.dir.join(PART_JSON);
    let mut f = std::fs::File::create(&p).map_err(|e| Error::io(&p, e))?;
    f.write_all(doc.to_string().as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io(&p, e))?;
    // A part directory is replaced like a packed one: mark it with meta.json.
    let m = staging.dir.join(crate::packed_dir::layout::META);
    std::fs::write(
        &m,
        json!({"kind": KIND, "format": PART_FORMAT, "shard": i, "num_shards": n}).to_string(),
    )
    .map_err(|e| Error::io(&m, e))?;
    staging.commit()?;
    stats.seconds = start.elapsed().as_secs_f64();
    stats.tokens_per_second = part.tokens as f64 / stats.seconds.max(1e-9);
    Ok(stats)
}

struct Loaded {
    doc: Value,
    part: Part,
}

/// A part's `part.json`, checked to be one, and its sample count.
fn load_doc(dir: &Path) -> Result<(Value, u64)> {
    let p = dir.join(PART_JSON);
    let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
    let doc: Value =
        serde_json::from_str(&text).map_err(|e| corrupt(&p, format!("invalid JSON: {e}")))?;
    if doc["kind"] != KIND {
        return Err(corrupt(
            &p,
            "not a part written by `pyfast-tune pack --shard`",
        ));
    }
    if doc["format"].as_u64() != Some(PART_FORMAT) {
        return Err(corrupt(
            &p,
            format!(
                "a part of format {} (this pyfast-tune reads format {PART_FORMAT}): written by \
                 another version; pack this shard again",
                doc.get("format").map_or("1".to_string(), |v| v.to_string())
            ),
        ));
    }
    let n = doc["samples"]
        .as_u64()
        .ok_or_else(|| corrupt(&p, "no sample count"))?;
    Ok((doc, n))
}

/// One sample of a part (a row of `part_samples.bin`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct SampleRow {
    pub len: u32,
    /// Ids staged as `<u2`.
    pub narrow: bool,
    /// Trained tokens.
    pub loss: u32,
    /// Global file index.
    pub file: u32,
    /// Record in the file, part-local for a JSONL file split by line.
    pub record: u64,
}

/// Bytes of a `part_samples.bin` row.
const ROW: usize = 20;

/// Stream a part's `n` samples to `each`, checking the content hash and that the staged
/// token file holds exactly their tokens. Returns the token count and the staged file's size.
fn read_samples(
    dir: &Path,
    doc: &Value,
    n: u64,
    mut each: impl FnMut(SampleRow),
) -> Result<(u64, u64)> {
    let sp = dir.join(PART_SAMPLES);
    let f = std::fs::File::open(&sp).map_err(|e| Error::io(&sp, e))?;
    let len = f.metadata().map_err(|e| Error::io(&sp, e))?.len();
    if len != ROW as u64 * n {
        return Err(corrupt(
            &sp,
            format!("{len} bytes, expected {} for {n} samples", ROW as u64 * n),
        ));
    }
    // Read and hashed 4,096 rows at a time: BLAKE3 hashes a large update with SIMD, a
    // 20-byte one on its own.
    let mut r = f;
    let mut h = blake3::Hasher::new();
    let (mut offset, mut staged) = (0u64, 0u64);
    let mut block = vec![0u8; ROW << 12];
    let mut left = n;
    while left > 0 {
        let rows = left.min(1 << 12) as usize;
        let bytes = &mut block[..ROW * rows];
        r.read_exact(bytes).map_err(|e| Error::io(&sp, e))?;
        h.update(bytes);
        for rec in bytes.chunks_exact(ROW) {
            let u4 = |at: usize| u32::from_le_bytes(rec[at..at + 4].try_into().expect("4 bytes"));
            let row = SampleRow {
                len: u4(0) & !NARROW_BIT,
                narrow: u4(0) & NARROW_BIT != 0,
                loss: u4(4),
                file: u4(8),
                record: u64::from_le_bytes(rec[12..20].try_into().expect("8 bytes")),
            };
            if row.loss > row.len {
                return Err(corrupt(
                    &sp,
                    format!("{} trained of {} tokens", row.loss, row.len),
                ));
            }
            each(row);
            offset += row.len as u64;
            staged += staged_bytes(row.len, row.narrow);
        }
        left -= rows as u64;
    }
    if doc["part_samples_blake3"].as_str() != Some(h.finalize().to_hex().as_str()) {
        return Err(corrupt(&sp, "content hash differs from part.json"));
    }
    let tokens = doc["tokens"].as_u64().unwrap_or(u64::MAX);
    let f = dir.join(STAGE_TOKENS);
    let size = std::fs::metadata(&f).map_err(|e| Error::io(&f, e))?.len();
    if tokens != offset || size != staged {
        return Err(corrupt(
            &f,
            format!("{size} bytes, expected {staged} ({offset} tokens)"),
        ));
    }
    Ok((offset, staged))
}

/// A part as [`finish`] takes it, without its samples (`samples` empty, `tokens` set).
fn part_of(dir: &Path, doc: &Value) -> Result<Part> {
    let p = dir.join(PART_JSON);
    let stats: PackStats = serde_json::from_value(doc["stats"].clone())
        .map_err(|e| corrupt(&p, format!("bad stats: {e}")))?;
    let list = |k: &str| doc[k].as_array().cloned().unwrap_or_default();
    let images = list("images")
        .iter()
        .map(|v| Some((v[0].as_u64()?, v[1].as_str()?.to_string(), v[2].as_i64()?)))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| corrupt(&p, "bad list of images"))?;
    let margins = list("margins")
        .iter()
        .filter_map(|v| Some((v[0].as_u64()?, v[1].as_f64()? as f32)))
        .collect();
    let files: Vec<(usize, bool)> = list("read")
        .iter()
        .map(|v| Some((v[0].as_u64()? as usize, v[1].as_bool()?)))
        .collect::<Option<_>>()
        .ok_or_else(|| corrupt(&p, "bad list of files read"))?;
    let file_entries = list("file_entries");
    let file_table = list("file_table");
    if file_entries.len() != files.len() || file_table.len() != files.len() {
        return Err(corrupt(&p, "file entries do not match the files read"));
    }
    let sites: Vec<Site> = serde_json::from_value(doc.get(SITES).cloned().unwrap_or(json!([])))
        .map_err(|e| corrupt(&p, format!("bad {SITES}: {e}")))?;
    Ok(Part {
        dir: dir.to_path_buf(),
        samples: Vec::new(),
        tokens: doc["tokens"].as_u64().unwrap_or(0),
        stats,
        file_entries,
        file_table,
        loss: Vec::new(),
        images,
        margins,
        files,
        sites,
    })
}

fn load(dir: &Path) -> Result<Loaded> {
    let (doc, n) = load_doc(dir)?;
    let mut samples = Vec::with_capacity(n as usize);
    let mut loss = Vec::with_capacity(n as usize);
    let mut offset = 0u64;
    read_samples(dir, &doc, n, |r| {
        loss.push(r.loss);
        samples.push(StagedSample {
            part: 0,
            offset,
            len: r.len,
            file: r.file,
            record: r.record,
            role: ROLE_NONE,
            narrow: r.narrow,
        });
        offset += staged_bytes(r.len, r.narrow);
    })?;
    for v in doc["pair_starts"].as_array().map_or(&[][..], Vec::as_slice) {
        let k = v.as_u64().map(|k| k as usize);
        match k.filter(|&k| k + 1 < samples.len()) {
            Some(k) => {
                samples[k].role = ROLE_CHOSEN;
                samples[k + 1].role = ROLE_REJECTED;
            }
            None => return Err(corrupt(&dir.join(PART_JSON), format!("bad pair start {v}"))),
        }
    }
    let mut part = part_of(dir, &doc)?;
    part.samples = samples;
    part.loss = loss;
    Ok(Loaded { part, doc })
}

/// Check that `docs` (sorted by shard) are the N parts of one run; returns its header and
/// its number of input files.
fn check_parts(docs: &[&Value]) -> Result<(Header, usize)> {
    let first = docs[0];
    let n = first["num_shards"].as_u64().unwrap_or(0) as usize;
    let same = |k: &str| docs.iter().all(|d| d[k] == first[k]);
    if !same("header") || !same("files") || !same("num_shards") {
        return Err(Error::ShardMismatch(
            "the parts come from different runs (inputs, tokenizer or options differ)".into(),
        ));
    }
    let got: Vec<u64> = docs.iter().filter_map(|d| d["shard"].as_u64()).collect();
    if got != (0..n as u64).collect::<Vec<_>>() {
        return Err(Error::ShardMismatch(format!(
            "need shards 0..{n} exactly once, got {got:?}"
        )));
    }
    let nfiles = first["files"].as_array().map_or(0, Vec::len);
    let header: Header = serde_json::from_value(first["header"].clone())
        .map_err(|e| Error::ShardMismatch(format!("bad part header: {e}")))?;
    Ok((header, nfiles))
}

/// Join the parts written by `pack --shard I/N` (any order, all N of one run) into the packed
/// directory a single `pack` would have written, byte for byte.
pub fn merge(
    parts: &[PathBuf],
    out_dir: &Path,
    progress: &dyn Fn(Progress<'_>) -> bool,
) -> Result<PackStats> {
    let start = Instant::now();
    if parts.is_empty() {
        return Err(Error::NoInputs(
            "merge-packs: no part directories given".into(),
        ));
    }
    let mut loaded = parts.iter().map(|d| load(d)).collect::<Result<Vec<_>>>()?;
    loaded.sort_by_key(|l| l.doc["shard"].as_u64());
    let docs: Vec<&Value> = loaded.iter().map(|l| &l.doc).collect();
    let (header, nfiles) = check_parts(&docs)?;
    let bases = numbering::bases(&docs);
    let mut parts: Vec<Part> = loaded.into_iter().map(|l| l.part).collect();
    for (part, base) in parts.iter_mut().zip(&bases) {
        for s in &mut part.samples {
            s.record += base.get(&(s.file as u64)).map_or(0, |b| b.1);
        }
        numbering::name_examples(&mut part.stats, &part.sites, base);
    }
    join_file_entries(&mut parts, nfiles)?;
    let staging = StagingDir::new(out_dir)?;
    let threads = crate::config::threads_or_default(None);
    finish(&header, parts, staging, start, threads, progress)
}

/// One entry per input file, in order, as a single run lists them: a file several shards
/// read has one entry (equal in every part: the whole file's size and hash) whose record
/// count is the sum of theirs. A file split between shards was hashed in blocks, each by
/// the shard whose share holds its first byte (`BLAKE3_BLOCKS` in the parts' rows, the
/// entry's hash null): its hash is folded here from all of them. The joined entries go to
/// the first part ([`finish`] lists the parts' entries in order).
fn join_file_entries(parts: &mut [Part], nfiles: usize) -> Result<()> {
    let mut joined: Vec<(usize, bool, Value, Value)> = Vec::new();
    let mut blocks: Vec<Vec<(u64, Vec<String>)>> = Vec::new();
    let mut probes: Vec<Option<Value>> = Vec::new();
    for (k, part) in parts.iter_mut().enumerate() {
        let entries = std::mem::take(&mut part.file_entries);
        let table = std::mem::take(&mut part.file_table);
        for ((&(f, head), entry), mut row) in part.files.iter().zip(entries).zip(table) {
            let hashed = row
                .as_object_mut()
                .and_then(|o| o.shift_remove(BLAKE3_BLOCKS))
                .map(|b| {
                    let cvs = b["cvs"].as_array().map_or(&[][..], Vec::as_slice);
                    let cvs = cvs.iter().filter_map(|v| v.as_str().map(String::from));
                    (b["first"].as_u64().unwrap_or(u64::MAX), cvs.collect())
                });
            let probe = row
                .as_object_mut()
                .and_then(|o| o.shift_remove(SHARE_PROBE));
            row.as_object_mut()
                .map(|o| o.shift_remove(numbering::LINES));
            match joined.last_mut() {
                Some(last) if last.0 == f => {
                    let seen = probes.last_mut().expect("one per joined file");
                    match (seen.as_ref(), &probe) {
                        (Some(a), Some(b)) if a != b => {
                            return Err(Error::ShardMismatch(format!(
                                "file {f} changed between the shards that read it (the BLAKE3 \
                                 of its ends: {a} vs {b}): encode the shards again"
                            )))
                        }
                        (None, Some(_)) => *seen = probe.clone(),
                        _ => {}
                    }
                    if !same_file(&last.2, &entry) {
                        return Err(Error::ShardMismatch(format!(
                            "shard {k} read file {f} with another size or hash than the shard before"
                        )));
                    }
                    if last.2["blake3"].is_null() {
                        last.2["blake3"] = entry["blake3"].clone();
                    }
                    if head && last.1 {
                        return Err(Error::ShardMismatch(format!(
                            "file {f} has two head shards"
                        )));
                    }
                    last.1 |= head;
                    let sum = last.3["records"].as_u64().unwrap_or(0)
                        + row["records"].as_u64().unwrap_or(0);
                    if last.3["format"].is_null() {
                        last.3["format"] = row["format"].take();
                    }
                    last.3["records"] = json!(sum);
                }
                Some(last) if last.0 > f => {
                    return Err(Error::ShardMismatch(format!(
                        "shard {k} reads file {f} after file {}",
                        last.0
                    )))
                }
                _ => {
                    joined.push((f, head, entry, row));
                    blocks.push(Vec::new());
                    probes.push(probe);
                }
            }
            if let (Some(b), Some(list)) = (hashed, blocks.last_mut()) {
                list.push(b);
            }
        }
    }
    for ((f, _, entry, _), list) in joined.iter_mut().zip(blocks) {
        if entry["blake3"].is_null() {
            let size = entry["size"].as_u64().unwrap_or(0);
            let hash = fold_blocks(size, list).ok_or_else(|| {
                Error::ShardMismatch(format!(
                    "file {f}: the parts hashed some of its blocks, not all of them once"
                ))
            })?;
            entry["blake3"] = json!(hash.to_hex().to_string());
        }
    }
    let covered: Vec<usize> = joined.iter().map(|j| j.0).collect();
    if covered != (0..nfiles).collect::<Vec<_>>() {
        return Err(Error::ShardMismatch(format!(
            "the parts read {} of {nfiles} files",
            covered.len()
        )));
    }
    if let Some(j) = joined.iter().find(|j| !j.1) {
        return Err(Error::ShardMismatch(format!(
            "no part holds the start of file {}",
            j.0
        )));
    }
    if let Some(p) = parts.first_mut() {
        for (_, _, entry, row) in joined {
            p.file_entries.push(entry);
            p.file_table.push(row);
        }
    }
    Ok(())
}

/// Two parts' entries of one file agree: equal, but for a hash one of them left to the
/// merge (null).
fn same_file(a: &Value, b: &Value) -> bool {
    let (ha, hb) = (&a["blake3"], &b["blake3"]);
    if !(ha.is_null() || hb.is_null() || ha == hb) {
        return false;
    }
    let mut b = b.clone();
    b["blake3"] = ha.clone();
    *a == b
}

/// The hash of a file of `size` bytes from its blocks' chaining values, given per shard as
/// (first block, values); None unless they are every block exactly once, in order.
fn fold_blocks(size: u64, mut list: Vec<(u64, Vec<String>)>) -> Option<blake3::Hash> {
    list.sort_by_key(|b| b.0);
    let mut cvs = Vec::new();
    for (first, part) in list {
        if first != cvs.len() as u64 {
            return None;
        }
        for h in part {
            cvs.push(treehash::from_hex(&h)?);
        }
    }
    if cvs.len() as u64 != size.div_ceil(treehash::input_block(size)) {
        return None;
    }
    treehash::root(&cvs)
}
