//! The merge that scales: a plan from sample lengths alone, then the tokens copied by many
//! workers into disjoint byte ranges of the final files, then a manifest written last.
//!
//! [`plan`] (one process, memory per *sample*, never per token) reads every part's
//! `part_samples.bin`, plans the packs exactly as [`finish`](crate::pack::write::finish)
//! does, writes the per-sample and per-pack files (`samples.bin`, `packs.bin`,
//! `pack_samples.bin`) into the output's staging directory, gives `input_ids.bin` and
//! `loss_mask.bin` their final sizes, and splits the tokens into ranges of whole blocks.
//! [`write_range`] (any process that sees the staging directory; ranges in any order, at
//! once) copies one range's tokens from the parts' staged files into place with positioned
//! writes and returns its blocks' BLAKE3 chaining values ([`treehash`]). [`finish_ranged`]
//! folds those into the two files' hashes, writes `meta.json` and commits the directory: the
//! same bytes as the serial merge, with no process copying every token.
//!
//! Plan memory: 4 bytes of length per sample, and at the peak 12 more while best-fit
//! decreasing runs (its order, each sample's pack, the packs' members: [`plan_packs_flat`])
//! plus 16 per pack; then the flat plan and each sample's pack and offset in it (12).
//! A mix is planned here too: its choices need each staged sample's file and record, and
//! its per-source statistics the sample's trained tokens (both in `part_samples.bin`), 16
//! more bytes per staged sample, and 8 per output sample (its staged sample and length).
//! Preference pairs are planned with the pair as the unit, as one pack plans them, and
//! `pairs.bin` / `margins.bin` written here; LLaVA images at their training size, from the
//! `<image>` positions the parts recorded (`images.json` written here), a mix's copies of a
//! LLaVA sample each with its image, as one pack's mix gives them. Only runs the serial merge
//! refuses (pairs beside single samples, a mix of pairs) are handed to it, for its error.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{check_parts, join_file_entries, load_doc, merge, part_of, read_samples};
use crate::error::{Error, Result};
use crate::pack::binpack::plan_packs_flat;
use crate::pack::copy::{block_ranges, copy_tokens, CopyRow, Dest, Staged};
use crate::pack::stage::{staged_bytes, STAGE_TOKENS};
use crate::pack::stats::{PackStats, Progress};
use crate::pack::write::{write_image_table, write_margins};
use crate::packed_dir::atomic::{HashedWriter, StagingDir};
use crate::packed_dir::direct::allocate;
use crate::packed_dir::layout;
use crate::packed_dir::treehash::{self, Share};

/// Folder of the plan inside the staging directory (removed before the commit).
const PLAN_DIR: &str = ".merge";
const PLAN_JSON: &str = "plan.json";
/// Per output sample in pack order: destination token, source byte (the parts' staged
/// files laid end to end), length, 1 when the ids are staged as `<u2` else 0:
/// `<u8 <u8 <u4 <u4`.
const COPY: &str = "copy.bin";
const COPY_ROW: u64 = 24;
/// Write buffers of the plan step (its fixed memory).
const BUF: usize = 1 << 18;
pub use crate::pack::copy::DEFAULT_BLOCK_TOKENS;

/// What [`plan`] leaves for the writers and [`finish_ranged`] (`.merge/plan.json`).
#[derive(Debug, Serialize, Deserialize)]
struct Plan {
    dest: PathBuf,
    max_length: u64,
    tokens: u64,
    block_tokens: u64,
    /// Token ranges `[start, end)`, whole blocks each (the last may end short).
    ranges: Vec<(u64, u64)>,
    parts: Vec<PathBuf>,
    /// Where each part's staged file starts with the parts laid end to end (and the total).
    part_bases: Vec<u64>,
    /// meta.json but for the hashes of the two token files.
    meta: Value,
    stats: PackStats,
}

/// What [`plan`] did.
#[derive(Debug)]
pub enum Planned {
    /// The run has a mix, pairs or images: the serial merge wrote the directory.
    Done(PackStats),
    /// Staged: run [`write_range`] for `0..ranges` of `staging`, then [`finish_ranged`].
    Ranged {
        /// The output's staging directory.
        staging: PathBuf,
        /// Number of ranges.
        ranges: usize,
        /// Tokens of the run.
        tokens: u64,
    },
}

/// The hashes of one range's blocks (hex): chaining values, or for a directory whose token
/// files are one block each, the files' own hashes.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RangeHashes {
    /// `input_ids.bin`'s blocks.
    pub ids: Vec<String>,
    /// `loss_mask.bin`'s blocks.
    pub mask: Vec<String>,
}

fn plan_path(staging: &Path) -> PathBuf {
    staging.join(PLAN_DIR).join(PLAN_JSON)
}

fn load_plan(staging: &Path) -> Result<Plan> {
    let p = plan_path(staging);
    let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Corrupt {
        path: p,
        msg: format!("not a merge plan: {e}"),
    })
}

/// Plan the merge of `parts` into `out_dir` and stage everything but the tokens; the
/// tokens are cut into at most `max_ranges` ranges of blocks of `block_tokens` (a power of
/// two >= 1024). Runs that cannot be planned from lengths alone are merged serially here.
pub fn plan(
    parts: &[PathBuf],
    out_dir: &Path,
    block_tokens: u64,
    max_ranges: usize,
    progress: &dyn Fn(Progress<'_>) -> bool,
) -> Result<Planned> {
    let start = Instant::now();
    if !treehash::valid_block(block_tokens) {
        return Err(Error::Config(format!(
            "block_tokens must be a power of two >= 1024, got {block_tokens}"
        )));
    }
    if parts.is_empty() {
        return Err(Error::NoInputs(
            "merge-packs: no part directories given".into(),
        ));
    }
    let mut docs = Vec::with_capacity(parts.len());
    for d in parts {
        let (doc, n) = load_doc(d)?;
        docs.push((d.clone(), doc, n));
    }
    docs.sort_by_key(|(_, doc, _)| doc["shard"].as_u64());
    let (header, nfiles) = check_parts(&docs.iter().map(|(_, d, _)| d).collect::<Vec<_>>())?;
    let bases = crate::pack::numbering::bases(&docs.iter().map(|(_, d, _)| d).collect::<Vec<_>>());
    // Preference pairs: each part's samples are all pairs (chosen, rejected, ...) or the
    // run is refused by the serial merge, which says why (pairs beside single samples, a mix
    // of pairs).
    let pairs = docs.iter().any(|(_, d, _)| d.get("pair_starts").is_some());
    let all_paired = docs.iter().all(|(_, d, n)| {
        let starts = d["pair_starts"].as_array().map_or(&[][..], Vec::as_slice);
        n % 2 == 0
            && starts.len() as u64 == n / 2
            && (starts.iter().enumerate()).all(|(k, v)| v.as_u64() == Some(2 * k as u64))
    });
    if pairs && (!all_paired || !header.mix.is_empty()) {
        return merge(parts, out_dir, progress).map(Planned::Done);
    }

    let mut ps = Vec::with_capacity(docs.len());
    for ((dir, doc, _), base) in docs.iter().zip(&bases) {
        let mut part = part_of(dir, doc)?;
        crate::pack::numbering::name_examples(&mut part.stats, &part.sites, base);
        ps.push(part);
    }
    join_file_entries(&mut ps, nfiles)?;
    let mut stats = PackStats::default();
    let mut file_entries = Vec::new();
    let mut file_table = Vec::new();
    for part in &ps {
        crate::pack::write::add_part_stats(&mut stats, &part.stats);
        file_entries.extend(part.file_entries.iter().cloned());
        file_table.extend(part.file_table.iter().cloned());
    }

    // Lengths, in input order: the parts laid end to end.
    let total: u64 = docs.iter().map(|(_, _, n)| n).sum();
    let mut lengths: Vec<u32> = Vec::with_capacity(total as usize);
    // Which samples are staged narrow (`<u2` ids), one bit each.
    let mut narrow = vec![0u64; (total as usize).div_ceil(64)];
    let (mut part_bases, mut tokens) = (vec![0u64], 0u64);
    // A mix chooses by each sample's file and record (numbered in the whole file) and
    // counts its loss tokens per source: kept for a mix only.
    let mixed = !header.mix.is_empty();
    let (mut file_of, mut record_of, mut loss_of) = (Vec::new(), Vec::new(), Vec::new());
    for ((dir, doc, n), base) in docs.iter().zip(&bases) {
        let (t, staged) = read_samples(dir, doc, *n, |r| {
            if let Some(w) = narrow.get_mut(lengths.len() / 64) {
                *w |= (r.narrow as u64) << (lengths.len() % 64);
            }
            lengths.push(r.len);
            if mixed {
                file_of.push(r.file);
                record_of.push(r.record + base.get(&(r.file as u64)).map_or(0, |b| b.1));
                loss_of.push(r.loss);
            }
        })?;
        part_bases.push(part_bases.last().copied().unwrap_or(0) + staged);
        tokens += t;
    }
    // With a mix the output's samples are copies of the staged ones (none, one or several
    // each, in input order): `copies[i]` of staged sample i; `orig[e]` is output sample e's.
    let mut copies = Vec::new();
    let mut orig: Vec<u32> = Vec::new();
    let mut out_lengths: Vec<u32> = Vec::new();
    if mixed {
        let (c, counts) = crate::pack::mix::select(&header.mix, header.seed, &file_of, &record_of);
        let source_of_file = crate::pack::mix::source_of_files(&header.mix);
        for (i, &k) in c.iter().enumerate() {
            for _ in 0..k {
                orig.push(i as u32);
                out_lengths.push(lengths[i]);
            }
        }
        tokens = out_lengths.iter().map(|&l| l as u64).sum();
        stats.loss_tokens = orig.iter().map(|&i| loss_of[i as usize] as u64).sum();
        let rows = orig.iter().map(|&i| {
            let i = i as usize;
            (lengths[i], source_of_file[file_of[i] as usize], loss_of[i])
        });
        stats.mix = crate::pack::write::mix_stats(&header.mix, &counts, rows, tokens);
        copies = c;
        drop((file_of, record_of, loss_of));
    }
    // Output sample `e` -> its staged sample.
    let input_of = |e: usize| if mixed { orig[e] as usize } else { e };
    let planned: &[u32] = if mixed { &out_lengths } else { &lengths };
    // LLaVA: (sample, path, position of its `<image>` token) in the whole run, as the parts
    // recorded them; the plan counts each image at its training size (`image_tokens - 1`
    // more), in packs of `pack_length`.
    let mut images: Vec<(u64, String, i64)> = Vec::new();
    let mut first = 0u64;
    for ((_, _, n), part) in docs.iter().zip(&ps) {
        images.extend(
            part.images
                .iter()
                .map(|(k, p, at)| (first + k, p.clone(), *at)),
        );
        first += n;
    }
    if mixed && !images.is_empty() {
        // Each copy of a LLaVA sample carries its image (one pack's `apply_mix`).
        let image_of: std::collections::HashMap<u64, (String, i64)> =
            images.drain(..).map(|(j, p, at)| (j, (p, at))).collect();
        images = (orig.iter().enumerate())
            .filter_map(|(e, &i)| {
                let (p, at) = image_of.get(&u64::from(i))?;
                Some((e as u64, p.clone(), *at))
            })
            .collect();
    }
    let capacity = header.pack_length.max(header.max_length) as u32;
    let expanded: Vec<u32>;
    let plan_len: &[u32] = if header.image_tokens > 0 && !images.is_empty() {
        let mut e = planned.to_vec();
        for (j, _, _) in &images {
            let l = e.get_mut(*j as usize).ok_or_else(|| {
                Error::Internal(format!("image of sample {j} of {}", planned.len()))
            })?;
            *l += header.image_tokens as u32 - 1;
        }
        expanded = e;
        &expanded
    } else {
        planned
    };
    if planned.is_empty() {
        return Err(Error::NoTrainableSamples {
            records: stats.records,
            dropped: stats.dropped_samples,
            skipped: stats.skipped_records,
        });
    }
    let (flat, bounds) = if pairs {
        // A pair is the unit (its two samples adjacent in one pack), as one pack plans it.
        let starts: Vec<u32> = (0..planned.len() as u32).step_by(2).collect();
        let packs = crate::pack::write::plan_pair_packs(
            planned,
            &starts,
            header.max_length as u32,
            header.seed,
        )
        .map_err(Error::Internal)?;
        let bounds = std::iter::once(0)
            .chain(packs.iter().scan(0u64, |at, p| {
                *at += p.len() as u64;
                Some(*at)
            }))
            .collect::<Vec<u64>>();
        (packs.concat(), bounds)
    } else {
        plan_packs_flat(plan_len, capacity, header.seed).map_err(Error::Internal)?
    };
    let npacks = bounds.len() - 1;

    let staging = StagingDir::new(out_dir)?;
    let dir = staging.dir.clone();
    std::fs::create_dir(dir.join(PLAN_DIR)).map_err(|e| Error::io(&dir, e))?;
    // Where each sample's staged bytes start with the parts laid end to end: a prefix sum
    // kept every 16 samples (half a byte per sample), the rest summed from the lengths
    // (within one cache line of them).
    let is_narrow = |s: usize| narrow[s / 64] >> (s % 64) & 1 != 0;
    let staged_of = |s: usize| staged_bytes(lengths[s], is_narrow(s));
    let checkpoints: Vec<u64> = (0..lengths.len())
        .step_by(16)
        .scan(0u64, |acc, c| {
            let at = *acc;
            *acc += (c..(c + 16).min(lengths.len())).map(staged_of).sum::<u64>();
            Some(at)
        })
        .collect();
    let source_of = |s: usize| checkpoints[s / 16] + (s & !15..s).map(staged_of).sum::<u64>();
    let mut pack_of = vec![u32::MAX; planned.len()];
    let mut within = vec![0u32; planned.len()];
    let mut pack_starts = Vec::with_capacity(npacks);
    let mut w_packs = HashedWriter::with_capacity(dir.join(layout::PACKS), BUF)?;
    let mut w_order = HashedWriter::with_capacity(dir.join(layout::PACK_SAMPLES), BUF)?;
    let copy_path = dir.join(PLAN_DIR).join(COPY);
    let mut w_copy = BufWriter::with_capacity(
        BUF,
        File::create(&copy_path).map_err(|e| Error::io(&copy_path, e))?,
    );
    let (mut tok_pos, mut sample_pos) = (0u64, 0u64);
    let mut split = 0u64;
    for (p, span) in bounds.windows(2).enumerate() {
        let members = &flat[span[0] as usize..span[1] as usize];
        w_packs.write_i64s(&[tok_pos as i64, sample_pos as i64])?;
        pack_starts.push(tok_pos);
        let mut off = 0u32;
        for &s in members {
            let s = s as usize;
            let (len, o) = (planned[s], input_of(s));
            match pack_of[s] {
                u32::MAX => pack_of[s] = p as u32,
                q if q != p as u32 => split += 1,
                _ => {}
            }
            within[s] = off;
            w_order.write_i64s(&[s as i64])?;
            let mut row = [0u8; COPY_ROW as usize];
            row[0..8].copy_from_slice(&(tok_pos + off as u64).to_le_bytes());
            row[8..16].copy_from_slice(&source_of(o).to_le_bytes());
            row[16..20].copy_from_slice(&len.to_le_bytes());
            row[20] = is_narrow(o) as u8;
            w_copy
                .write_all(&row)
                .map_err(|e| Error::io(&copy_path, e))?;
            off += len;
            sample_pos += 1;
        }
        tok_pos += off as u64;
    }
    w_packs.write_i64s(&[tok_pos as i64, sample_pos as i64])?;
    drop((flat, bounds));
    w_copy
        .into_inner()
        .map_err(|e| Error::io(&copy_path, e.into_error()))?
        .sync_all()
        .map_err(|e| Error::io(&copy_path, e))?;

    // samples.bin in output order (a staged sample's copies in a row): file and record
    // streamed from the parts again.
    let mut w_samples = HashedWriter::with_capacity(dir.join(layout::SAMPLES), BUF)?;
    let (mut i, mut s) = (0usize, 0usize);
    let mut failed = None;
    for ((pdir, doc, n), base) in docs.iter().zip(&bases) {
        read_samples(pdir, doc, *n, |r| {
            let record = r.record + base.get(&(r.file as u64)).map_or(0, |b| b.1);
            for _ in 0..if mixed { copies[i] } else { 1 } {
                let pk = pack_of[s] as usize;
                let row = [
                    (pack_starts[pk] + within[s] as u64) as i64,
                    r.len as i64,
                    pk as i64,
                    r.file as i64,
                    record as i64,
                ];
                if let Err(e) = w_samples.write_i64s(&row) {
                    failed.get_or_insert(e);
                }
                s += 1;
            }
            i += 1;
        })?;
    }
    if let Some(e) = failed {
        return Err(e);
    }
    let mut outputs = serde_json::Map::new();
    for (name, w) in [
        (layout::PACKS, w_packs),
        (layout::PACK_SAMPLES, w_order),
        (layout::SAMPLES, w_samples),
    ] {
        let (size, hash) = w.finish()?;
        outputs.insert(name.to_string(), json!({"size": size, "blake3": hash}));
    }
    let mut images_output = None;
    if !images.is_empty() {
        let samples: Vec<Value> = images.iter().map(|(j, p, at)| json!([j, p, at])).collect();
        images_output = Some(write_image_table(&dir, header.image_tokens, samples)?);
    }
    if pairs {
        let n = planned.len() as u64;
        let mut w = HashedWriter::with_capacity(dir.join(layout::PAIRS), BUF)?;
        for id in 0..n as i64 / 2 {
            w.write_i64s(&[id, 0, id, 1])?;
        }
        let (size, hash) = w.finish()?;
        outputs.insert(layout::PAIRS.into(), json!({"size": size, "blake3": hash}));
        let mut margins = Vec::new();
        let mut first = 0u64; // the part's first sample in the whole run
        for ((_, _, n), part) in docs.iter().zip(&ps) {
            for &(k, m) in &part.margins {
                if k + 1 >= *n {
                    return Err(Error::Corrupt {
                        path: part.dir.join(super::PART_JSON),
                        msg: format!("a margin for sample {k} of {n}"),
                    });
                }
                margins.push((first + k, m));
            }
            first += n;
        }
        if !margins.is_empty() {
            let entry = write_margins(&dir, n as usize, &margins)?;
            outputs.insert(layout::MARGINS.into(), entry);
        }
    }
    if let Some(v) = images_output {
        outputs.insert(layout::IMAGES.into(), v);
    }
    for (name, width) in [(layout::INPUT_IDS, 4u64), (layout::LOSS_MASK, 1)] {
        let p = dir.join(name);
        File::create(&p)
            .and_then(|f| allocate(&f, width * tokens))
            .map_err(|e| Error::io(&p, e))?;
    }

    stats.samples = planned.len() as u64;
    stats.tokens = tokens;
    stats.packs = npacks as u64;
    stats.split_samples = split;
    let planned_tokens: u64 = plan_len.iter().map(|&l| l as u64).sum();
    stats.fill = planned_tokens as f64 / (npacks as f64 * capacity as f64);
    let mut meta =
        crate::pack::write::meta_json(&header, &mut stats, file_entries, file_table, outputs);
    if header.image_tokens > 0 {
        meta["image_tokens"] = json!(header.image_tokens);
        meta["pack_length"] = json!(capacity);
        meta["num_training_tokens"] = json!(planned_tokens);
    }
    if mixed {
        meta["mix"] = serde_json::to_value(&stats.mix).unwrap_or(Value::Null);
    }
    let nblocks = tokens.div_ceil(block_tokens);
    let ranges = block_ranges(tokens, nblocks, block_tokens, max_ranges);
    let r = ranges.len();
    stats.write_seconds = start.elapsed().as_secs_f64();
    let plan = Plan {
        dest: out_dir.to_path_buf(),
        max_length: header.max_length as u64,
        tokens,
        block_tokens,
        ranges,
        parts: docs.iter().map(|(d, _, _)| d.clone()).collect(),
        part_bases,
        meta,
        stats,
    };
    let p = plan_path(&dir);
    let text = serde_json::to_string(&plan).map_err(|e| Error::Internal(e.to_string()))?;
    std::fs::write(&p, text).map_err(|e| Error::io(&p, e))?;
    Ok(Planned::Ranged {
        staging: staging.keep(),
        ranges: r,
        tokens,
    })
}

/// The copy rows from the one whose sample holds token `t` on, read sequentially.
fn copy_rows_from(path: &Path, t: u64) -> Result<impl Iterator<Item = Result<CopyRow>>> {
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    let n = f.metadata().map_err(|e| Error::io(path, e))?.len() / COPY_ROW;
    let dst_at = |k: u64| -> Result<u64> {
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, k * COPY_ROW)
            .map_err(|e| Error::io(path, e))?;
        Ok(u64::from_le_bytes(b))
    };
    // The last row whose destination is <= t.
    let (mut lo, mut hi) = (0u64, n);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if dst_at(mid)? <= t {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let mut r = BufReader::with_capacity(1 << 20, f.try_clone().map_err(|e| Error::io(path, e))?);
    r.seek(SeekFrom::Start(lo * COPY_ROW))
        .map_err(|e| Error::io(path, e))?;
    let path = path.to_path_buf();
    let mut left = n - lo;
    Ok(std::iter::from_fn(move || {
        if left == 0 {
            return None;
        }
        left -= 1;
        let mut row = [0u8; COPY_ROW as usize];
        Some(
            r.read_exact(&mut row)
                .map_err(|e| Error::io(&path, e))
                .map(|_| {
                    (
                        u64::from_le_bytes(row[0..8].try_into().expect("8 bytes")),
                        u64::from_le_bytes(row[8..16].try_into().expect("8 bytes")),
                        u32::from_le_bytes(row[16..20].try_into().expect("4 bytes")),
                        row[20] != 0,
                    )
                }),
        )
    }))
}

/// Copy range `k` of the plan staged in `staging` into place; returns its blocks' hashes.
/// Memory: a few MiB of buffers.
pub fn write_range(staging: &Path, k: usize) -> Result<RangeHashes> {
    let plan = load_plan(staging)?;
    let &(t0, t1) = plan.ranges.get(k).ok_or_else(|| {
        Error::Config(format!(
            "range {k} of a plan of {} ranges",
            plan.ranges.len()
        ))
    })?;
    let files: Vec<PathBuf> = plan.parts.iter().map(|p| p.join(STAGE_TOKENS)).collect();
    let from = Staged {
        files: &files,
        bases: &plan.part_bases,
    };
    let to = Dest {
        ids: staging.join(layout::INPUT_IDS),
        mask: staging.join(layout::LOSS_MASK),
        block_tokens: plan.block_tokens,
        single: plan.tokens <= plan.block_tokens,
    };
    let rows = copy_rows_from(&staging.join(PLAN_DIR).join(COPY), t0)?;
    let (ids, mask) = copy_tokens(rows, &from, &to, (t0, t1), &|_| true)?;
    let hex = |share: Share| match share {
        Share::Whole(h) => vec![h.to_hex().to_string()],
        Share::Blocks { cvs, .. } => cvs.iter().map(treehash::to_hex).collect(),
    };
    Ok(RangeHashes {
        ids: hex(ids),
        mask: hex(mask),
    })
}

/// Fold the ranges' hashes (`hashes[k]` from [`write_range`] of range k) into the token
/// files' hashes, write `meta.json` last and commit the staged directory to its destination.
pub fn finish_ranged(staging: &Path, hashes: &[RangeHashes]) -> Result<PackStats> {
    let start = Instant::now();
    let plan = load_plan(staging)?;
    if hashes.len() != plan.ranges.len() {
        return Err(Error::Config(format!(
            "{} range results for a plan of {} ranges",
            hashes.len(),
            plan.ranges.len()
        )));
    }
    let nblocks = plan.tokens.div_ceil(plan.block_tokens) as usize;
    let root = |pick: &dyn Fn(&RangeHashes) -> &Vec<String>| -> Result<String> {
        let all: Vec<&String> = hashes.iter().flat_map(|h| pick(h).iter()).collect();
        let bad = || {
            Error::Internal(format!(
                "range hashes: {} blocks, expected {nblocks}",
                all.len()
            ))
        };
        if all.len() != nblocks {
            return Err(bad());
        }
        if nblocks == 1 {
            return Ok(all[0].clone());
        }
        let cvs = all
            .iter()
            .map(|s| treehash::from_hex(s))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(bad)?;
        Ok(treehash::root(&cvs).ok_or_else(bad)?.to_hex().to_string())
    };
    let ids_hash = root(&|h| &h.ids)?;
    let mask_hash = root(&|h| &h.mask)?;
    // plan.json keeps meta.json's floats exactly: serde_json parses them to the nearest
    // value (its float_roundtrip feature).
    let mut meta = plan.meta;
    let mut stats = plan.stats;
    let staged = meta["outputs"].as_object().cloned().unwrap_or_default();
    let mut outputs = serde_json::Map::new();
    outputs.insert(
        layout::INPUT_IDS.into(),
        json!({"size": 4 * plan.tokens, "blake3": ids_hash}),
    );
    outputs.insert(
        layout::LOSS_MASK.into(),
        json!({"size": plan.tokens, "blake3": mask_hash}),
    );
    let optional = layout::OPTIONAL_LAYOUT.iter().map(|(name, _, _)| name);
    for name in (layout::BINARY_FILES.iter().chain(optional)).chain([&layout::IMAGES]) {
        if let Some(v) = staged.get(*name) {
            outputs.insert(name.to_string(), v.clone());
        }
    }
    meta["outputs"] = Value::Object(outputs);
    let plan_dir = staging.join(PLAN_DIR);
    std::fs::remove_dir_all(&plan_dir).map_err(|e| Error::io(&plan_dir, e))?;
    let meta_path = staging.join(layout::META);
    let mut f = File::create(&meta_path).map_err(|e| Error::io(&meta_path, e))?;
    let text = serde_json::to_string_pretty(&meta).map_err(|e| Error::Internal(e.to_string()))?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io(&meta_path, e))?;
    StagingDir::adopt(staging.to_path_buf(), plan.dest.clone()).commit()?;
    stats.write_seconds += start.elapsed().as_secs_f64();
    stats.seconds = stats.write_seconds;
    stats.tokens_per_second = stats.tokens as f64 / stats.seconds.max(1e-9);
    Ok(stats)
}
