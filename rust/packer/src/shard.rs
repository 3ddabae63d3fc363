//! Sharded packing: `pack --shard I/N` encodes part I of the inputs and saves it as a *part
//! directory*; `merge-packs` joins the N parts and runs the single-machine [`finish`] on them.
//!
//! Why the bytes are identical to one machine: packing is global (best-fit decreasing over
//! every sample's length, then seeded shuffles), so shards must not pack. Each shard takes a
//! contiguous range of the ordered input files (balanced by size), stages its samples exactly
//! as a single run would, and saves per-sample (length, file, record) plus its staged tokens.
//! The merge concatenates the parts in shard order — which is input order — so the sample
//! list, the lengths, the packing plan, the token bytes and meta.json are all the same.
//!
//! Part directory: `stage_ids.tmp` (`<u4`), `stage_mask.tmp` (`u1`), `part_samples.bin`
//! (`<u4` length, `<u4` global file index, `<u8` record; 16 bytes per sample) and
//! `part.json` (shard, counts, statistics, file entries, the run's header).

use std::io::{BufReader, Read, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::output::{HashedWriter, StagingDir};
use crate::stage::{Part, StagedSample, STAGE_IDS, STAGE_MASK};
use crate::stats::{PackStats, Progress};
use crate::write::{finish, Header};

const PART_JSON: &str = "part.json";
const PART_SAMPLES: &str = "part_samples.bin";
const KIND: &str = "pyfast-tune pack part";

/// The contiguous range of files of shard `i` of `n`: file j belongs to the shard in whose
/// share of the total bytes its midpoint falls, so shards get similar byte counts and
/// together cover every file once, in order.
pub fn file_range(sizes: &[u64], i: usize, n: usize) -> Range<usize> {
    let total: u128 = sizes.iter().map(|&s| s as u128).sum::<u128>();
    let shard_of = |j: usize| -> usize {
        if total == 0 {
            return j * n / sizes.len().max(1);
        }
        let before: u128 = sizes[..j].iter().map(|&s| s as u128).sum();
        let mid2 = 2 * before + sizes[j] as u128; // 2 × midpoint
        ((mid2 * n as u128) / (2 * total)).min(n as u128 - 1) as usize
    };
    let start = (0..sizes.len())
        .find(|&j| shard_of(j) >= i)
        .unwrap_or(sizes.len());
    let end = (start..sizes.len())
        .find(|&j| shard_of(j) > i)
        .unwrap_or(sizes.len());
    start..end
}

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
    range: Range<usize>,
    staging: StagingDir,
    start: Instant,
) -> Result<PackStats> {
    let mut w = HashedWriter::create(staging.dir.join(PART_SAMPLES))?;
    for s in &part.samples {
        w.write(&s.len.to_le_bytes())?;
        w.write(&s.file.to_le_bytes())?;
        w.write(&s.record.to_le_bytes())?;
    }
    let (_, samples_hash) = w.finish()?;
    let mut stats = part.stats;
    stats.samples = part.samples.len() as u64;
    stats.tokens = part.tokens;
    let doc = json!({
        "kind": KIND,
        "shard": i,
        "num_shards": n,
        "files": all_files,
        "file_range": [range.start, range.end],
        "header": header,
        "samples": part.samples.len(),
        "tokens": part.tokens,
        "part_samples_blake3": samples_hash,
        "stats": stats,
        "file_entries": part.file_entries,
        "file_table": part.file_table,
        "images": part.images,
    });
    let p = staging.dir.join(PART_JSON);
    let mut f = std::fs::File::create(&p).map_err(|e| Error::io(&p, e))?;
    f.write_all(doc.to_string().as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io(&p, e))?;
    // A part directory is replaced like a packed one: mark it with meta.json.
    let m = staging.dir.join(crate::output::META);
    std::fs::write(
        &m,
        json!({"kind": KIND, "shard": i, "num_shards": n}).to_string(),
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

fn load(dir: &Path) -> Result<Loaded> {
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
    let n = doc["samples"]
        .as_u64()
        .ok_or_else(|| corrupt(&p, "no sample count"))?;
    let sp = dir.join(PART_SAMPLES);
    let f = std::fs::File::open(&sp).map_err(|e| Error::io(&sp, e))?;
    let len = f.metadata().map_err(|e| Error::io(&sp, e))?.len();
    if len != 16 * n {
        return Err(corrupt(
            &sp,
            format!("{len} bytes, expected {} for {n} samples", 16 * n),
        ));
    }
    let mut r = BufReader::with_capacity(1 << 20, f);
    let mut h = blake3::Hasher::new();
    let mut samples = Vec::with_capacity(n as usize);
    let mut offset = 0u64;
    let mut rec = [0u8; 16];
    for _ in 0..n {
        r.read_exact(&mut rec).map_err(|e| Error::io(&sp, e))?;
        h.update(&rec);
        let len = u32::from_le_bytes(rec[0..4].try_into().expect("4 bytes"));
        let file = u32::from_le_bytes(rec[4..8].try_into().expect("4 bytes"));
        let record = u64::from_le_bytes(rec[8..16].try_into().expect("8 bytes"));
        samples.push(StagedSample {
            part: 0,
            offset,
            len,
            file,
            record,
        });
        offset += len as u64;
    }
    if doc["part_samples_blake3"].as_str() != Some(h.finalize().to_hex().as_str()) {
        return Err(corrupt(&sp, "content hash differs from part.json"));
    }
    let tokens = doc["tokens"].as_u64().unwrap_or(u64::MAX);
    for (name, width) in [(STAGE_IDS, 4), (STAGE_MASK, 1)] {
        let f = dir.join(name);
        let size = std::fs::metadata(&f).map_err(|e| Error::io(&f, e))?.len();
        if tokens != offset || size != width * offset {
            return Err(corrupt(
                &f,
                format!(
                    "{size} bytes, expected {} ({offset} tokens)",
                    width * offset
                ),
            ));
        }
    }
    let stats: PackStats = serde_json::from_value(doc["stats"].clone())
        .map_err(|e| corrupt(&p, format!("bad stats: {e}")))?;
    let list = |k: &str| doc[k].as_array().cloned().unwrap_or_default();
    let images = list("images")
        .iter()
        .filter_map(|v| Some((v[0].as_u64()?, v[1].as_str()?.to_string())))
        .collect();
    Ok(Loaded {
        part: Part {
            dir: dir.to_path_buf(),
            samples,
            tokens,
            stats,
            file_entries: list("file_entries"),
            file_table: list("file_table"),
            images,
        },
        doc,
    })
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
    let first = &loaded[0].doc;
    let n = first["num_shards"].as_u64().unwrap_or(0) as usize;
    let same = |k: &str| loaded.iter().all(|l| l.doc[k] == first[k]);
    if !same("header") || !same("files") || !same("num_shards") {
        return Err(Error::ShardMismatch(
            "the parts come from different runs (inputs, tokenizer or options differ)".into(),
        ));
    }
    let got: Vec<u64> = loaded
        .iter()
        .filter_map(|l| l.doc["shard"].as_u64())
        .collect();
    if got != (0..n as u64).collect::<Vec<_>>() {
        return Err(Error::ShardMismatch(format!(
            "need shards 0..{n} exactly once, got {got:?}"
        )));
    }
    let mut next = 0u64;
    for l in &loaded {
        let r = &l.doc["file_range"];
        if r[0].as_u64() != Some(next) {
            return Err(Error::ShardMismatch(format!(
                "shard {} starts at file {}, expected {next}",
                l.doc["shard"], r[0]
            )));
        }
        next = r[1].as_u64().unwrap_or(0);
    }
    let nfiles = first["files"].as_array().map_or(0, Vec::len) as u64;
    if next != nfiles {
        return Err(Error::ShardMismatch(format!(
            "the parts cover {next} of {nfiles} files"
        )));
    }
    let header: Header = serde_json::from_value(first["header"].clone())
        .map_err(|e| Error::ShardMismatch(format!("bad part header: {e}")))?;
    let staging = StagingDir::new(out_dir)?;
    let parts: Vec<Part> = loaded.into_iter().map(|l| l.part).collect();
    finish(&header, parts, staging, start, progress)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_cover_every_file_once_in_order() {
        for sizes in [
            vec![10u64, 10, 10, 10, 10, 10],
            vec![100, 1, 1, 1, 1],
            vec![0, 0, 0],
            vec![5],
            vec![],
        ] {
            for n in 1..5 {
                let mut next = 0;
                for i in 0..n {
                    let r = file_range(&sizes, i, n);
                    assert_eq!(r.start, next, "{sizes:?} {i}/{n}");
                    next = r.end;
                }
                assert_eq!(next, sizes.len(), "{sizes:?} /{n}");
            }
        }
        assert_eq!(file_range(&[10, 10, 10, 10, 10, 10], 1, 3), 2..4);
    }
}
