//! Mixing sources by ratio: each source of a mix keeps a seeded subset of its samples
//! (`max_samples`) and is repeated by its `weight` — whole repetitions plus a seeded fraction
//! (weight 2.5: every sample twice, and a seeded half of them a third time).
//!
//! The choice is made in [`select`] over every staged sample at once, in the write stage
//! that a single run and a merge of shards share, from keys that depend only on the seed,
//! the source, the file name and the record index. So the same inputs, weights and seed give
//! the same samples whatever the thread count or the `--shard` split, and the counts are exact:
//! a source with `n` encoded samples contributes `min(n, max_samples) = m` distinct samples and
//! `floor(w)·m + round(frac(w)·m)` samples in all.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::config::MixSource;
use crate::pack::rng::SplitMix64;

/// What the write stage needs of one source: its rule and the names of its files, which are
/// the next `files.len()` entries of the run's global file list.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub(crate) struct MixRule {
    pub name: String,
    pub weight: f64,
    pub max_samples: Option<u64>,
    pub files: Vec<String>,
}

/// What one source became.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct MixSourceStats {
    /// The source's label.
    pub name: String,
    /// Its weight.
    pub weight: f64,
    /// Its sample limit, if any.
    pub max_samples: Option<u64>,
    /// Samples its records encoded to (before `max_samples` and `weight`).
    pub available_samples: u64,
    /// Distinct samples kept after `max_samples`.
    pub distinct_samples: u64,
    /// Samples in the packed directory, repetitions included.
    pub samples: u64,
    /// Tokens in the packed directory.
    pub tokens: u64,
    /// Trained tokens in the packed directory.
    pub loss_tokens: u64,
    /// This source's share of the packed tokens.
    pub token_share: f64,
}

/// A sample's key for one decision (`stream`): a function of the seed, the source, the file
/// name and the record index only.
fn key(file_key: u64, record: u64, stream: u64) -> u64 {
    SplitMix64::new(
        file_key ^ record.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        stream,
    )
    .next_u64()
}

fn file_key(seed: u64, source: &str, file: &str) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes());
    h.update(source.as_bytes());
    h.update(&[0]);
    h.update(file.as_bytes());
    let b = h.finalize();
    u64::from_le_bytes(b.as_bytes()[..8].try_into().expect("8 bytes"))
}

/// The `count` members of `members` (indices into `keys`) with the smallest keys, ties broken
/// by position, returned as a membership mask over `members`.
fn smallest(members: &[usize], keys: &[u64], count: usize) -> Vec<bool> {
    let mut order: Vec<usize> = (0..members.len()).collect();
    if count < members.len() {
        order.select_nth_unstable_by_key(count, |&j| (keys[members[j]], j));
    }
    let mut keep = vec![false; members.len()];
    for &j in &order[..count.min(members.len())] {
        keep[j] = true;
    }
    keep
}

/// The source of each file of the run (rules list their files in the global file order).
pub(crate) fn source_of_files(rules: &[MixRule]) -> Vec<u32> {
    rules
        .iter()
        .enumerate()
        .flat_map(|(si, r)| std::iter::repeat_n(si as u32, r.files.len()))
        .collect()
}

/// How many times each sample appears in the output (0 = not selected), by its global file
/// index and record index; `file_of[s]`/`record_of[s]` for every staged sample in input order.
/// Returns the copies per sample and, per source, (available, distinct, in-output) counts.
pub(crate) fn select(
    rules: &[MixRule],
    seed: u64,
    file_of: &[u32],
    record_of: &[u64],
) -> (Vec<u32>, Vec<(u64, u64, u64)>) {
    let source_of_file = source_of_files(rules);
    let file_keys: Vec<u64> = rules
        .iter()
        .flat_map(|r| r.files.iter().map(|f| file_key(seed, &r.name, f)))
        .collect();
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); rules.len()];
    for (s, &f) in file_of.iter().enumerate() {
        members[source_of_file[f as usize] as usize].push(s);
    }
    let subset_keys: Vec<u64> = (0..file_of.len())
        .map(|s| key(file_keys[file_of[s] as usize], record_of[s], 1))
        .collect();
    let extra_keys: Vec<u64> = (0..file_of.len())
        .map(|s| key(file_keys[file_of[s] as usize], record_of[s], 2))
        .collect();
    let mut copies = vec![0u32; file_of.len()];
    let mut counts = Vec::with_capacity(rules.len());
    for (r, m) in rules.iter().zip(&members) {
        let n = m.len();
        let limit = r.max_samples.map_or(n, |x| (x as usize).min(n));
        let kept: Vec<usize> = smallest(m, &subset_keys, limit)
            .into_iter()
            .zip(m)
            .filter_map(|(k, &s)| k.then_some(s))
            .collect();
        let whole = r.weight.floor();
        let extra = ((r.weight - whole) * kept.len() as f64).round() as usize;
        let more = smallest(&kept, &extra_keys, extra);
        let mut total = 0u64;
        for (&s, plus) in kept.iter().zip(more) {
            copies[s] = whole as u32 + plus as u32;
            total += copies[s] as u64;
        }
        counts.push((n as u64, kept.len() as u64, total));
    }
    (copies, counts)
}

/// The `mix` entry of meta.json and the fingerprint: the rules as given.
pub(crate) fn describe(sources: &[MixSource]) -> Value {
    Value::Array(
        sources
            .iter()
            .map(|s| {
                json!({"name": s.label(), "inputs": s.inputs, "format": s.format,
                       "columns": s.columns, "weight": s.weight, "max_samples": s.max_samples})
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(name: &str, weight: f64, max_samples: Option<u64>, files: &[&str]) -> MixRule {
        MixRule {
            name: name.into(),
            weight,
            max_samples,
            files: files.iter().map(|f| f.to_string()).collect(),
        }
    }

    #[test]
    fn counts_are_exact() {
        // Source a: file 0 with 10 samples; source b: files 1 and 2 with 7 + 6 samples.
        let rules = [
            rule("a", 2.5, None, &["a.jsonl"]),
            rule("b", 0.5, Some(9), &["b1.jsonl", "b2.jsonl"]),
        ];
        let mut file_of = vec![0u32; 10];
        file_of.extend([1u32; 7]);
        file_of.extend([2u32; 6]);
        let record_of: Vec<u64> = (0..10).chain(0..7).chain(0..6).collect();
        let (copies, counts) = select(&rules, 0, &file_of, &record_of);
        assert_eq!(counts, vec![(10, 10, 25), (13, 9, 5)]); // round(0.5 * 9) = 5 (half away)
        assert!(copies[..10].iter().all(|&c| c == 2 || c == 3));
        assert_eq!(copies[..10].iter().filter(|&&c| c == 3).count(), 5);
        assert_eq!(copies[10..].iter().filter(|&&c| c > 0).count(), 5);
        assert!(copies[10..].iter().all(|&c| c <= 1));
    }

    #[test]
    fn choice_depends_on_keys_not_on_position() {
        let rules = [rule("a", 0.5, None, &["a.jsonl"])];
        let file_of = vec![0u32; 40];
        let record_of: Vec<u64> = (0..40).collect();
        let (c1, _) = select(&rules, 3, &file_of, &record_of);
        // The same records in another order (as another shard split would list them after a
        // merge, were it to differ) are chosen the same way.
        let rev: Vec<u64> = record_of.iter().rev().copied().collect();
        let (c2, _) = select(&rules, 3, &file_of, &rev);
        let chosen = |c: &[u32], rec: &[u64]| {
            let mut v: Vec<u64> = rec
                .iter()
                .zip(c)
                .filter(|(_, &k)| k > 0)
                .map(|(&r, _)| r)
                .collect();
            v.sort();
            v
        };
        assert_eq!(chosen(&c1, &record_of), chosen(&c2, &rev));
        let (c3, _) = select(&rules, 4, &file_of, &record_of);
        assert_ne!(c1, c3, "another seed chooses other samples");
    }

    #[test]
    fn a_larger_limit_keeps_a_superset() {
        let file_of = vec![0u32; 50];
        let record_of: Vec<u64> = (0..50).collect();
        let (small, _) = select(&[rule("a", 1.0, Some(10), &["f"])], 0, &file_of, &record_of);
        let (large, _) = select(&[rule("a", 1.0, Some(20), &["f"])], 0, &file_of, &record_of);
        assert!(small.iter().zip(&large).all(|(&s, &l)| s <= l));
        assert_eq!(small.iter().sum::<u32>(), 10);
        assert_eq!(large.iter().sum::<u32>(), 20);
    }

    #[test]
    fn validation_names_the_source() {
        let mut s = MixSource {
            name: "chat".into(),
            inputs: vec!["a.jsonl".into()],
            format: None,
            columns: None,
            weight: 0.0,
            max_samples: None,
        };
        assert!(s
            .validate(1)
            .unwrap_err()
            .contains("mix source 1 (\"chat\")"));
        s.weight = f64::NAN;
        assert!(s.validate(1).is_err());
        s.weight = 1.0;
        s.max_samples = Some(0);
        assert!(s.validate(1).unwrap_err().contains("max_samples"));
    }
}
