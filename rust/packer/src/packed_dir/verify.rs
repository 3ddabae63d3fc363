//! Full check of a packed directory: every file's size and BLAKE3 against `meta.json`, then
//! the packing invariants (each sample in exactly one pack, whole, within capacity).

use std::path::Path;

use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::packed_dir::layout;

fn corrupt(path: &Path, msg: impl Into<String>) -> Error {
    Error::Corrupt {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

fn i64s(bytes: &[u8]) -> Vec<i64> {
    bytes
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().expect("chunks_exact(8)")))
        .collect()
}

/// Samples cut by a pack boundary, counted from the tables alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitSamples {
    /// How many.
    pub count: u64,
    /// The first: (sample, its first token, its end, the boundary that cuts it).
    pub first: (usize, i64, i64, i64),
}

/// Count the samples of a layout (`samples` rows `(start, length, pack, file, record)`,
/// `packs` boundaries `(token offset, sample offset)`, as in docs/FORMAT.md) whose tokens
/// `[start, start + length)` straddle a pack boundary, i.e. lie in two or more packs. Only
/// meaningful when the boundaries increase; when they do not, nothing is counted (the walk in
/// [`verify`] reports the disorder).
pub fn split_samples(samples: &[i64], packs: &[i64]) -> SplitSamples {
    let mut out = SplitSamples {
        count: 0,
        first: (0, 0, 0, 0),
    };
    // Boundaries between packs: every token offset but the first and the last.
    let offsets: Vec<i64> = packs.chunks_exact(2).map(|b| b[0]).collect();
    let inner = match offsets.len() {
        0..=2 => &[][..],
        n => &offsets[1..n - 1],
    };
    if offsets.windows(2).any(|w| w[0] >= w[1]) {
        return out;
    }
    for (s, row) in samples.chunks_exact(5).enumerate() {
        let (start, len) = (row[0], row[1]);
        // i128: start and length come from a file that may hold any i64.
        let end = start as i128 + len.max(0) as i128;
        let next = inner.partition_point(|&b| b <= start);
        if let Some(&cut) = inner.get(next) {
            if (cut as i128) < end {
                if out.count == 0 {
                    out.first = (s, start, end.min(i64::MAX as i128) as i64, cut);
                }
                out.count += 1;
            }
        }
    }
    out
}

/// Samples of a packing plan (`packs[p]` = the sample ids of pack p) that appear in more than
/// one pack: the pieces a split would leave. `n_samples` bounds the ids; out-of-range ids are
/// not samples and are not counted.
pub fn samples_in_several_packs(packs: &[Vec<u32>], n_samples: usize) -> u64 {
    let mut first_pack = vec![usize::MAX; n_samples];
    let mut split = vec![false; n_samples];
    for (p, members) in packs.iter().enumerate() {
        for &s in members {
            let Some(slot) = first_pack.get_mut(s as usize) else {
                continue;
            };
            if *slot == usize::MAX {
                *slot = p;
            } else if *slot != p {
                split[s as usize] = true;
            }
        }
    }
    split.iter().filter(|&&x| x).count() as u64
}

/// Verify `dir`; returns a JSON report (files checked, samples, packs, max pack length, and
/// `split_samples` counted from the layout: 0, or the directory is refused).
pub fn verify(dir: &Path) -> Result<Value> {
    let meta_path = dir.join(layout::META);
    let text = std::fs::read_to_string(&meta_path).map_err(|e| Error::io(&meta_path, e))?;
    let meta: Value = serde_json::from_str(&text)
        .map_err(|e| corrupt(&meta_path, format!("invalid JSON: {e}")))?;
    let num = |k: &str| -> Result<u64> {
        meta.get(k)
            .and_then(Value::as_u64)
            .ok_or_else(|| corrupt(&meta_path, format!("missing or invalid {k:?}")))
    };
    let (n_tok, n_samp, n_pack, max_len) = (
        num("num_tokens")?,
        num("num_samples")?,
        num("num_packs")?,
        // LLaVA packs hold up to pack_length training tokens (images expanded), so their
        // text is bounded by it too.
        meta.get("pack_length")
            .and_then(Value::as_u64)
            .map_or_else(|| num("max_length"), Ok)?,
    );
    let mut data = std::collections::HashMap::new();
    let optional: Vec<&str> = (layout::OPTIONAL_LAYOUT.iter())
        .map(|(name, _, _)| *name)
        .filter(|name| meta["outputs"].get(*name).is_some())
        .collect();
    for name in layout::BINARY_FILES.iter().chain(optional.iter()) {
        let p = dir.join(name);
        let bytes = std::fs::read(&p).map_err(|e| Error::io(&p, e))?;
        let listed = &meta["outputs"][*name];
        if listed["size"].as_u64() != Some(bytes.len() as u64) {
            return Err(corrupt(
                &p,
                format!("{} bytes, meta.json lists {}", bytes.len(), listed["size"]),
            ));
        }
        let hash = blake3::hash(&bytes).to_hex().to_string();
        if listed["blake3"].as_str() != Some(hash.as_str()) {
            return Err(corrupt(
                &p,
                "content hash differs from meta.json: the file was modified or corrupted",
            ));
        }
        data.insert(*name, bytes);
    }
    let p_of = |n: &str| dir.join(n);
    let ids = &data[layout::INPUT_IDS];
    let mask = &data[layout::LOSS_MASK];
    // Counts come from a file that may be corrupt: compare in u128 so no product overflows
    // (found by tests/fuzz_verify.rs).
    let (n_tok128, n_samp128, n_pack128) = (n_tok as u128, n_samp as u128, n_pack as u128);
    if ids.len() as u128 != 4 * n_tok128 || mask.len() as u128 != n_tok128 {
        return Err(corrupt(
            &p_of(layout::INPUT_IDS),
            "token count differs from meta.json num_tokens",
        ));
    }
    if let Some(pos) = mask.iter().position(|&m| m > 1) {
        return Err(corrupt(
            &p_of(layout::LOSS_MASK),
            format!("byte {pos} is {}, expected 0 or 1", mask[pos]),
        ));
    }
    let samples = i64s(&data[layout::SAMPLES]);
    let packs = i64s(&data[layout::PACKS]);
    let order = i64s(&data[layout::PACK_SAMPLES]);
    if samples.len() as u128 != 5 * n_samp128
        || order.len() as u128 != n_samp128
        || packs.len() as u128 != 2 * (n_pack128 + 1)
    {
        return Err(corrupt(
            &p_of(layout::SAMPLES),
            "table sizes differ from meta.json counts",
        ));
    }
    let split = split_samples(&samples, &packs);
    if split.count > 0 {
        let (s, a, b, cut) = split.first;
        return Err(corrupt(
            &p_of(layout::SAMPLES),
            format!(
                "{} sample(s) split across packs (first: sample {s}, tokens {a}..{b}, cut by the \
                 pack boundary at token {cut}); every sample must lie whole in one pack",
                split.count
            ),
        ));
    }
    let mut seen = vec![false; n_samp as usize];
    let mut max_pack = 0i64;
    let ppath = p_of(layout::PACKS);
    if packs[0] != 0
        || packs[1] != 0
        || packs[2 * n_pack as usize] != n_tok as i64
        || packs[2 * n_pack as usize + 1] != n_samp as i64
    {
        return Err(corrupt(
            &ppath,
            "pack boundaries do not span all tokens and samples",
        ));
    }
    for p in 0..n_pack as usize {
        let (t0, s0, t1, s1) = (
            packs[2 * p],
            packs[2 * p + 1],
            packs[2 * p + 2],
            packs[2 * p + 3],
        );
        if t1 <= t0 || s1 <= s0 || s0 < 0 || s1 as u64 > n_samp {
            return Err(corrupt(
                &ppath,
                format!("pack {p} is empty or out of order"),
            ));
        }
        if (t1 as i128 - t0 as i128) > max_len as i128 {
            return Err(corrupt(
                &ppath,
                format!(
                    "pack {p} holds {} tokens > max_length {max_len}",
                    t1 as i128 - t0 as i128
                ),
            ));
        }
        max_pack = max_pack.max(t1 - t0);
        let mut pos = t0;
        for &s in &order[s0 as usize..s1 as usize] {
            let spath = p_of(layout::PACK_SAMPLES);
            if s < 0 || s as u64 >= n_samp {
                return Err(corrupt(&spath, format!("sample id {s} out of range")));
            }
            if std::mem::replace(&mut seen[s as usize], true) {
                return Err(corrupt(
                    &spath,
                    format!("sample {s} appears in more than one place"),
                ));
            }
            let row = &samples[5 * s as usize..5 * s as usize + 5];
            if row[0] != pos || row[2] != p as i64 || row[1] <= 0 {
                return Err(corrupt(
                    &p_of(layout::SAMPLES),
                    format!("sample {s} (start {}, length {}, pack {}) does not sit whole at token {pos} of pack {p}", row[0], row[1], row[2]),
                ));
            }
            pos = pos.checked_add(row[1]).ok_or_else(|| {
                corrupt(
                    &p_of(layout::SAMPLES),
                    format!("sample {s}: length overflows"),
                )
            })?;
        }
        if pos != t1 {
            return Err(corrupt(
                &ppath,
                format!(
                    "pack {p}: samples cover {} tokens, pack has {}",
                    pos - t0,
                    t1 - t0
                ),
            ));
        }
    }
    if let Some(s) = seen.iter().position(|&x| !x) {
        return Err(corrupt(
            &p_of(layout::PACK_SAMPLES),
            format!("sample {s} is in no pack"),
        ));
    }
    let n_pairs = match data.get(layout::PAIRS) {
        Some(bytes) => Some(crate::packed_dir::pairs::check_pairs(
            &p_of(layout::PAIRS),
            &i64s(bytes),
            &samples,
        )?),
        None => None,
    };
    let mut out = json!({
        "ok": true, "files": layout::BINARY_FILES.len() + 1 + n_pairs.is_some() as usize, "tokens": n_tok, "samples": n_samp,
        "packs": n_pack, "max_pack_tokens": max_pack,
        "split_samples": split.count,
    });
    if let Some(n) = n_pairs {
        out["pairs"] = json!(n);
    }
    Ok(out)
}
