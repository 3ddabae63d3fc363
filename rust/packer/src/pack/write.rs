//! The write stage: plan packs over the staged samples (best-fit decreasing, seeded), copy
//! their tokens into the packed files, write meta.json and commit the directory atomically.
//! A single run and a merge of shards both end in [`finish`].

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use serde::Serialize;
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::pack::binpack::plan_packs;
use crate::pack::copy::{block_ranges, copy_tokens, CopyRow, Dest, Staged, DEFAULT_BLOCK_TOKENS};
use crate::pack::fingerprint::hash_value;
use crate::pack::image;
use crate::pack::mix::{self, MixRule, MixSourceStats};
use crate::pack::stage::{
    Part, StagedSample, MAX_SKIP_EXAMPLES, ROLE_CHOSEN, ROLE_NONE, ROLE_REJECTED, STAGE_TOKENS,
};
use crate::pack::stats::{PackStats, Progress};
use crate::packed_dir::atomic::{HashedWriter, StagingDir};
use crate::packed_dir::direct::allocate;
use crate::packed_dir::layout;
use crate::packed_dir::treehash::{self, Share};

/// What [`finish`] needs besides the parts: the run's identity.
#[derive(Clone, Debug, serde::Deserialize, Serialize)]
pub(crate) struct Header {
    /// [`crate::pack::fingerprint::fingerprint_inputs`] without `inputs`.
    pub fingerprint_base: Value,
    pub max_length: usize,
    /// LLaVA: tokens one image becomes in training (0: images not expanded).
    #[serde(default)]
    pub image_tokens: usize,
    /// Pack capacity in training tokens (0 in a header saved before it existed: max_length).
    #[serde(default)]
    pub pack_length: usize,
    pub format: String,
    pub template: String,
    pub seed: u64,
    /// hash, path, bos, eos.
    pub tokenizer: Value,
    /// Sources mixed by ratio, in global file order (empty: every sample once).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mix: Vec<MixRule>,
}

/// Plan packs over every part's samples (global input order), write the packed directory
/// and commit it. A single run and a merge of shards both end here.
pub(crate) fn finish(
    header: &Header,
    mut parts: Vec<Part>,
    staging: StagingDir,
    start: Instant,
    threads: usize,
    progress: &dyn Fn(Progress<'_>) -> bool,
) -> Result<PackStats> {
    let mut stats = PackStats::default();
    let mut staged: Vec<StagedSample> = Vec::new();
    let mut file_entries = Vec::new();
    let mut file_table = Vec::new();
    let mut images: Vec<Value> = Vec::new();
    let mut margins: Vec<(u64, f32)> = Vec::new();
    // Each staged sample's trained tokens, as its part counted them when staging it.
    let mut loss: Vec<u32> = Vec::new();
    let mut tokens = 0u64;
    for (pi, part) in parts.iter_mut().enumerate() {
        let base = staged.len() as u64;
        for (k, img, at) in part.images.drain(..) {
            images.push(json!([base + k, img, at]));
        }
        margins.extend(part.margins.drain(..).map(|(k, m)| (base + k, m)));
        staged.extend(part.samples.iter().map(|s| StagedSample {
            part: pi as u32,
            ..*s
        }));
        loss.extend(&part.loss);
        tokens += part.tokens;
        add_part_stats(&mut stats, &part.stats);
        file_entries.extend(part.file_entries.iter().cloned());
        file_table.extend(part.file_table.iter().cloned());
    }
    if staged.is_empty() {
        return Err(Error::NoTrainableSamples {
            records: stats.records,
            dropped: stats.dropped_samples,
            skipped: stats.skipped_records,
        });
    }

    let pairs = pair_starts(&staged, &file_table)?;
    if pairs.is_some() && !header.mix.is_empty() {
        return Err(Error::Config(
            "a mix (weight / max_samples) of preference pairs is not supported yet: pack the \
             pairs without a mix"
                .into(),
        ));
    }
    if loss.len() != staged.len() {
        return Err(Error::Internal("a loss count per staged sample".into()));
    }
    let mixed =
        (!header.mix.is_empty()).then(|| apply_mix(header, &mut staged, &mut loss, &mut images));
    if staged.is_empty() {
        return Err(Error::NoTrainableSamples {
            records: stats.records,
            dropped: stats.dropped_samples,
            skipped: stats.skipped_records,
        });
    }
    let tokens: u64 = match mixed {
        Some(_) => staged.iter().map(|s| s.len as u64).sum(),
        None => tokens,
    };

    let lengths: Vec<u32> = staged.iter().map(|s| s.len).collect();
    // Planned at their training length: each image counts as the patch tokens it becomes.
    let image_ids: Vec<u64> = images.iter().filter_map(|v| v[0].as_u64()).collect();
    let capacity = header.pack_length.max(header.max_length);
    let planned = image::expanded_lengths(&staged, &image_ids, header.image_tokens);
    let packs = match &pairs {
        None => plan_packs(&planned, capacity as u32, header.seed),
        Some(starts) => plan_pair_packs(&lengths, starts, header.max_length as u32, header.seed),
    }
    .map_err(Error::Internal)?;
    let part_dirs: Vec<&Path> = parts.iter().map(|p| p.dir.as_path()).collect();
    let mut outputs = write_packed(&staging.dir, &part_dirs, &staged, &packs, threads, progress)?;
    if let Some((source_of, counts)) = &mixed {
        stats.loss_tokens = loss.iter().map(|&x| x as u64).sum();
        let rows = (staged.iter().zip(source_of).zip(&loss)).map(|((s, &src), &l)| (s.len, src, l));
        stats.mix = mix_stats(&header.mix, counts, rows, tokens);
    }
    for p in &parts {
        let f = p.dir.join(STAGE_TOKENS);
        if f.starts_with(&staging.dir) {
            std::fs::remove_file(&f).map_err(|e| Error::io(&f, e))?;
        }
    }
    if let Some(starts) = &pairs {
        let mut w = HashedWriter::create(staging.dir.join(layout::PAIRS))?;
        for (id, &k) in starts.iter().enumerate() {
            w.write_i64s(&[id as i64, 0, id as i64, 1])?;
            debug_assert_eq!(staged[k as usize + 1].role, ROLE_REJECTED);
        }
        let (size, hash) = w.finish()?;
        outputs.insert(
            layout::PAIRS.to_string(),
            json!({"size": size, "blake3": hash}),
        );
        if !margins.is_empty() {
            let entry = write_margins(&staging.dir, staged.len(), &margins)?;
            outputs.insert(layout::MARGINS.to_string(), entry);
        }
    }
    if !images.is_empty() {
        let entry = write_image_table(&staging.dir, header.image_tokens, images)?;
        outputs.insert(layout::IMAGES.to_string(), entry);
    }

    stats.samples = staged.len() as u64;
    stats.tokens = tokens;
    stats.packs = packs.len() as u64;
    // Counted from the plan rather than assumed: the planner never splits a sample, and a
    // change that did would show here (and make `verify` refuse the directory).
    stats.split_samples =
        crate::packed_dir::verify::samples_in_several_packs(&packs, lengths.len());
    let planned_tokens: u64 = planned.iter().map(|&l| l as u64).sum();
    stats.fill = planned_tokens as f64 / (packs.len() as f64 * capacity as f64);
    let mut meta = meta_json(header, &mut stats, file_entries, file_table, outputs);
    if header.image_tokens > 0 {
        meta["image_tokens"] = json!(header.image_tokens);
        meta["pack_length"] = json!(capacity);
        meta["num_training_tokens"] = json!(planned_tokens);
    }
    if !header.mix.is_empty() {
        meta["mix"] = serde_json::to_value(&stats.mix).unwrap_or(Value::Null);
    }
    let meta_path = staging.dir.join(layout::META);
    let mut f = std::fs::File::create(&meta_path).map_err(|e| Error::io(&meta_path, e))?;
    let text = serde_json::to_string_pretty(&meta).map_err(|e| Error::Internal(e.to_string()))?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io(&meta_path, e))?;
    staging.commit()?;
    // Timing excludes nothing: the commit is part of the job.
    stats.seconds = start.elapsed().as_secs_f64();
    stats.tokens_per_second = tokens as f64 / stats.seconds.max(1e-9);
    Ok(stats)
}

/// `margins.bin` of `samples` samples in `dir`: both samples of a pair hold its margin
/// (`margins`: the chosen sample's index and the margin; 0 for a pair without one). Returns
/// its `outputs` entry (size and BLAKE3).
pub(crate) fn write_margins(dir: &Path, samples: usize, margins: &[(u64, f32)]) -> Result<Value> {
    let mut per_sample = vec![0f32; samples];
    for &(k, m) in margins {
        per_sample[k as usize] = m;
        per_sample[k as usize + 1] = m;
    }
    let bytes: Vec<u8> = per_sample.iter().flat_map(|m| m.to_le_bytes()).collect();
    let mut w = HashedWriter::create(dir.join(layout::MARGINS))?;
    w.write(&bytes)?;
    let (size, hash) = w.finish()?;
    Ok(json!({"size": size, "blake3": hash}))
}

/// `images.json` in `dir` (`samples`: `[sample, path, position]` each); returns its
/// `outputs` entry.
pub(crate) fn write_image_table(
    dir: &Path,
    image_tokens: usize,
    samples: Vec<Value>,
) -> Result<Value> {
    let mut table =
        json!({"image_token_id": crate::template::encode::IMAGE_TOKEN_ID, "samples": samples});
    if image_tokens > 0 {
        table["image_tokens"] = json!(image_tokens);
    }
    let text = table.to_string();
    let p = dir.join(layout::IMAGES);
    std::fs::write(&p, &text).map_err(|e| Error::io(&p, e))?;
    let hash = blake3::hash(text.as_bytes()).to_hex().to_string();
    Ok(json!({"size": text.len(), "blake3": hash}))
}

/// The staged index of each pair's chosen sample (its rejected sample is the next), or None
/// when the run has no pairs. Pair and SFT records in one run are refused: a trainer reads a
/// directory as one or the other.
fn pair_starts(staged: &[StagedSample], file_table: &[Value]) -> Result<Option<Vec<u32>>> {
    let Some(first) = staged.iter().position(|s| s.role != ROLE_NONE) else {
        return Ok(None);
    };
    if let Some(s) = staged.iter().find(|s| s.role == ROLE_NONE) {
        let name = |f: u32| {
            file_table
                .get(f as usize)
                .map_or("?".into(), |v| v["name"].to_string())
        };
        return Err(Error::Config(format!(
            "preference pairs (from {}) and single samples (from {}, record {}) in one run: pack \
             them into separate directories",
            name(staged[first].file),
            name(s.file),
            s.record
        )));
    }
    let mut starts = Vec::with_capacity(staged.len() / 2);
    for (k, pair) in staged.chunks(2).enumerate() {
        match pair {
            [c, r] if c.role == ROLE_CHOSEN && r.role == ROLE_REJECTED => starts.push(2 * k as u32),
            _ => {
                return Err(Error::Internal(format!(
                    "staged sample {} is not the chosen side of a pair",
                    2 * k
                )))
            }
        }
    }
    Ok(Some(starts))
}

/// Plan packs with a pair as the unit: best-fit decreasing on each pair's total length (as
/// [`plan_packs`] does for samples, seeded alike), then each pair expanded to its chosen and
/// rejected samples, adjacent and in that order.
pub(crate) fn plan_pair_packs(
    lengths: &[u32],
    starts: &[u32],
    capacity: u32,
    seed: u64,
) -> std::result::Result<Vec<Vec<u32>>, String> {
    let pair_len: Vec<u32> = starts
        .iter()
        .map(|&k| lengths[k as usize] + lengths[k as usize + 1])
        .collect();
    let packs = plan_packs(&pair_len, capacity, seed)?;
    Ok(packs
        .into_iter()
        .map(|p| {
            p.into_iter()
                .flat_map(|i| [starts[i as usize], starts[i as usize] + 1])
                .collect()
        })
        .collect())
}

/// meta.json of a finished directory (both writers': one `pack`, and the ranged merge): the
/// fingerprint of `file_entries` (set in `stats` too), the run's settings, the statistics
/// without wall-clock figures and the outputs' sizes and hashes.
pub(crate) fn meta_json(
    header: &Header,
    stats: &mut PackStats,
    file_entries: Vec<Value>,
    file_table: Vec<Value>,
    outputs: serde_json::Map<String, Value>,
) -> Value {
    let mut fp_inputs = header.fingerprint_base.clone();
    fp_inputs["inputs"] = Value::Array(file_entries);
    stats.fingerprint = hash_value(&fp_inputs);
    let mut meta = json!({
        "format_version": layout::FORMAT_VERSION,
        "tool": "pyfast-tune",
        "tool_version": env!("CARGO_PKG_VERSION"),
        "fingerprint": stats.fingerprint,
        "fingerprint_inputs": fp_inputs,
        "max_length": header.max_length,
        "format": header.format,
        "template": header.template,
        "seed": header.seed,
        "tokenizer": header.tokenizer,
        "files": file_table,
        "stats": stats_for_meta(stats),
        "num_samples": stats.samples,
        "num_packs": stats.packs,
        "num_tokens": stats.tokens,
        "outputs": outputs,
    });
    if let Some(sources) = meta["fingerprint_inputs"].get("sources").cloned() {
        meta["sources"] = sources;
    }
    meta
}

/// Statistics as stored in meta.json: without wall-clock figures, so the directory's bytes
/// are a function of the inputs and settings only.
pub(crate) fn stats_for_meta(stats: &PackStats) -> Value {
    let mut v = serde_json::to_value(stats).unwrap_or(Value::Null);
    if let Some(o) = v.as_object_mut() {
        for k in [
            "seconds",
            "tokens_per_second",
            "load_seconds",
            "encode_seconds",
            "write_seconds",
            "mix", // meta.json has it at the top level
        ] {
            o.remove(k);
        }
    }
    v
}

/// Write the packed files; returns `outputs` for meta.json (size and BLAKE3 per file).
/// The tokens are copied by `threads` threads, each a range of whole blocks of the output
/// ([`copy_tokens`], as the merge in ranges writes them), reading the staged tokens with
/// positioned reads (not mapped: resident memory stays bounded however large they are); the
/// blocks' hashes fold into each file's ([`treehash`]).
fn write_packed(
    dir: &Path,
    part_dirs: &[&Path],
    staged: &[StagedSample],
    packs: &[Vec<u32>],
    threads: usize,
    progress: &dyn Fn(Progress<'_>) -> bool,
) -> Result<serde_json::Map<String, Value>> {
    let files: Vec<PathBuf> = part_dirs.iter().map(|d| d.join(STAGE_TOKENS)).collect();
    let mut bases = vec![0u64];
    for f in &files {
        let len = std::fs::metadata(f).map_err(|e| Error::io(f, e))?.len();
        bases.push(bases.last().copied().unwrap_or(0) + len);
    }
    bases.pop();
    let mut w_packs = HashedWriter::create(dir.join(layout::PACKS))?;
    let mut w_order = HashedWriter::create(dir.join(layout::PACK_SAMPLES))?;
    let mut new_start = vec![0i64; staged.len()];
    let mut pack_of = vec![0i64; staged.len()];
    // Each output sample's copy, in output order.
    let mut rows: Vec<CopyRow> = Vec::with_capacity(staged.len());
    let (mut tok_pos, mut sample_pos) = (0i64, 0i64);
    for (p, members) in packs.iter().enumerate() {
        w_packs.write_i64s(&[tok_pos, sample_pos])?;
        for &s in members {
            let st = &staged[s as usize];
            let src = bases[st.part as usize] + st.offset;
            rows.push((tok_pos as u64, src, st.len, st.narrow));
            w_order.write_i64s(&[s as i64])?;
            new_start[s as usize] = tok_pos;
            pack_of[s as usize] = p as i64;
            tok_pos += st.len as i64;
            sample_pos += 1;
        }
    }
    w_packs.write_i64s(&[tok_pos, sample_pos])?;
    let tokens = tok_pos as u64;
    let to = Dest {
        ids: dir.join(layout::INPUT_IDS),
        mask: dir.join(layout::LOSS_MASK),
        block_tokens: DEFAULT_BLOCK_TOKENS,
        single: tokens <= DEFAULT_BLOCK_TOKENS,
    };
    for (p, len) in [(&to.ids, 4 * tokens), (&to.mask, tokens)] {
        let f = std::fs::File::create(p).map_err(|e| Error::io(p, e))?;
        allocate(&f, len).map_err(|e| Error::io(p, e))?;
    }
    // Ranges of whole blocks, one per thread (one, empty, for no tokens).
    let blocks = tokens.div_ceil(to.block_tokens).max(1);
    let ranges = block_ranges(tokens, blocks, to.block_tokens, threads);
    let from = Staged {
        files: &files,
        bases: &bases,
    };
    let (done, stop) = (AtomicU64::new(0), AtomicBool::new(false));
    let tick = |n: u64| {
        done.fetch_add(n, Ordering::Relaxed);
        !stop.load(Ordering::Relaxed)
    };
    let copied = std::thread::scope(|scope| {
        let (finished, wait) = std::sync::mpsc::channel::<()>();
        let handles: Vec<_> = (ranges.iter())
            .map(|&(t0, t1)| {
                let (rows, from, to, tick) = (&rows, &from, &to, &tick);
                let finished = finished.clone();
                scope.spawn(move || {
                    let first = rows.partition_point(|r| r.0 + r.2 as u64 <= t0);
                    let it = rows[first..].iter().map(|&r| Ok(r));
                    let r = copy_tokens(it, from, to, (t0, t1), tick);
                    let _ = finished.send(());
                    r
                })
            })
            .collect();
        drop(finished);
        // Progress from this thread (the caller's) while the copies run; a copy that panics
        // drops its sender, which ends the wait too.
        let mut left = handles.len();
        while left > 0 {
            match wait.recv_timeout(std::time::Duration::from_millis(100)) {
                Ok(()) => left -= 1,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            }
            // Packs done, estimated from the tokens copied.
            let at = u128::from(done.load(Ordering::Relaxed));
            let report = Progress {
                stage: "write",
                done: (at * packs.len() as u128 / u128::from(tokens.max(1))) as u64,
                total: packs.len() as u64,
            };
            if !progress(report) {
                stop.store(true, Ordering::Relaxed);
            }
        }
        (handles.into_iter())
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect::<Result<Vec<_>>>()
    })?;
    let (mut ids_cvs, mut mask_cvs) = (Vec::new(), Vec::new());
    let (mut ids_hash, mut mask_hash) = (None, None);
    for (ids, mask) in copied {
        for (share, cvs, whole) in [
            (ids, &mut ids_cvs, &mut ids_hash),
            (mask, &mut mask_cvs, &mut mask_hash),
        ] {
            match share {
                Share::Whole(h) => *whole = Some(h),
                Share::Blocks { cvs: c, .. } => cvs.extend(c),
            }
        }
    }
    let folded = |whole: Option<blake3::Hash>, cvs: &[treehash::ChainingValue]| {
        whole
            .or_else(|| treehash::root(cvs))
            .ok_or_else(|| Error::Internal("the token files' blocks gave no hash".into()))
    };
    let ids_hash = folded(ids_hash, &ids_cvs)?;
    let mask_hash = folded(mask_hash, &mask_cvs)?;
    drop(rows);
    let mut w_samples = HashedWriter::create(dir.join(layout::SAMPLES))?;
    for (s, st) in staged.iter().enumerate() {
        w_samples.write_i64s(&[
            new_start[s],
            st.len as i64,
            pack_of[s],
            st.file as i64,
            st.record as i64,
        ])?;
    }
    let mut outputs = serde_json::Map::new();
    outputs.insert(
        layout::INPUT_IDS.to_string(),
        json!({"size": 4 * tokens, "blake3": ids_hash.to_hex().to_string()}),
    );
    outputs.insert(
        layout::LOSS_MASK.to_string(),
        json!({"size": tokens, "blake3": mask_hash.to_hex().to_string()}),
    );
    let names = [layout::PACKS, layout::PACK_SAMPLES, layout::SAMPLES];
    let done = HashedWriter::finish_all(vec![w_packs, w_order, w_samples])?;
    for (name, (size, hash)) in names.into_iter().zip(done) {
        outputs.insert(name.to_string(), json!({"size": size, "blake3": hash}));
    }
    // meta.json lists outputs in BINARY_FILES order, as before.
    let mut ordered = serde_json::Map::new();
    for name in layout::BINARY_FILES {
        if let Some(v) = outputs.remove(*name) {
            ordered.insert(name.to_string(), v);
        }
    }
    if !progress(Progress {
        stage: "write",
        done: packs.len() as u64,
        total: packs.len() as u64,
    }) {
        return Err(Error::Interrupted);
    }
    Ok(ordered)
}

/// Replace the staged samples (input order) by the mix's choice: each kept sample as many
/// times as [`mix::select`] says, its copies adjacent, images following their samples.
/// Returns each output sample's source and the per-source counts.
fn apply_mix(
    header: &Header,
    staged: &mut Vec<StagedSample>,
    loss: &mut Vec<u32>,
    images: &mut Vec<Value>,
) -> (Vec<u32>, Vec<(u64, u64, u64)>) {
    let file_of: Vec<u32> = staged.iter().map(|s| s.file).collect();
    let record_of: Vec<u64> = staged.iter().map(|s| s.record).collect();
    let (copies, counts) = mix::select(&header.mix, header.seed, &file_of, &record_of);
    let source_of_file = mix::source_of_files(&header.mix);
    // sample -> [path, position]
    let image_of: std::collections::HashMap<u64, Value> = images
        .drain(..)
        .filter_map(|v| Some((v[0].as_u64()?, json!([v[1], v[2]]))))
        .collect();
    let mut out = Vec::with_capacity(copies.iter().map(|&c| c as usize).sum());
    let mut out_loss = Vec::with_capacity(out.capacity());
    let mut source_of = Vec::with_capacity(out.capacity());
    for (i, (s, &c)) in staged.iter().zip(&copies).enumerate() {
        for _ in 0..c {
            if let Some(img) = image_of.get(&(i as u64)) {
                images.push(json!([out.len() as u64, img[0], img[1]]));
            }
            out.push(*s);
            out_loss.push(loss[i]);
            source_of.push(source_of_file[s.file as usize]);
        }
    }
    *staged = out;
    *loss = out_loss;
    (source_of, counts)
}

/// Per-source figures of a mixed pack: `rules` and `counts` as [`mix::select`] took and
/// gave them, `samples` (tokens, source, loss tokens) of each output sample.
pub(crate) fn mix_stats(
    rules: &[MixRule],
    counts: &[(u64, u64, u64)],
    samples: impl Iterator<Item = (u32, u32, u32)>,
    tokens: u64,
) -> Vec<MixSourceStats> {
    let mut out: Vec<MixSourceStats> = rules
        .iter()
        .zip(counts)
        .map(|(r, &(available, distinct, samples))| MixSourceStats {
            name: r.name.clone(),
            weight: r.weight,
            max_samples: r.max_samples,
            available_samples: available,
            distinct_samples: distinct,
            samples,
            ..MixSourceStats::default()
        })
        .collect();
    for (len, src, loss) in samples {
        let m = &mut out[src as usize];
        m.tokens += len as u64;
        m.loss_tokens += loss as u64;
    }
    for m in &mut out {
        m.token_share = m.tokens as f64 / tokens.max(1) as f64;
    }
    out
}

/// Sum a part's counts into the run's (one pack's writer and the ranged merge).
pub(crate) fn add_part_stats(stats: &mut PackStats, p: &PackStats) {
    stats.records += p.records;
    stats.loss_tokens += p.loss_tokens;
    stats.truncated_samples += p.truncated_samples;
    stats.truncated_tokens += p.truncated_tokens;
    stats.dropped_samples += p.dropped_samples;
    stats.dropped_tokens += p.dropped_tokens;
    stats.skipped_records += p.skipped_records;
    stats.skipped_files += p.skipped_files;
    stats.pairs += p.pairs;
    stats.truncated_pairs += p.truncated_pairs;
    stats.dropped_pairs += p.dropped_pairs;
    for m in &p.skipped_examples {
        if stats.skipped_examples.len() < MAX_SKIP_EXAMPLES {
            stats.skipped_examples.push(m.clone());
        }
    }
}
