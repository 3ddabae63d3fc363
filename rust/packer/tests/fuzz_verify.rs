//! Fuzz harness for the packed-directory verifier: a valid directory is built by
//! hand (docs/FORMAT.md), then one file is mutated. Two modes: mutate and leave meta.json's
//! hashes alone (the hash check must name the file), or mutate and *re-hash* (so the
//! invariant checks behind the hashes see arbitrary tables: out-of-range ids, overlapping or
//! negative boundaries, absurd counts). Property: never a panic; a changed file is never
//! reported as fine unless its bytes still satisfy every invariant.

mod fuzz_common;

use std::path::Path;

use fuzz_common::{config, mutate, Edit};
use packer::facts::{BINARY_FILES, META};
use packer::verify;
use proptest::prelude::*;
use serde_json::{json, Value};

/// A valid directory: 3 packs of max_length 8 holding 5 samples.
fn tables() -> Vec<(&'static str, Vec<u8>)> {
    // samples: (start, length, pack, file, record); pack p holds pack_samples[s0..s1].
    let samples: [[i64; 5]; 5] = [
        [0, 3, 0, 0, 0],
        [8, 4, 1, 0, 1],
        [3, 5, 0, 0, 2],
        [12, 2, 1, 0, 3],
        [14, 6, 2, 0, 4],
    ];
    let order: [i64; 5] = [0, 2, 1, 3, 4];
    let packs: [[i64; 2]; 4] = [[0, 0], [8, 2], [14, 4], [20, 5]];
    let le = |v: &[i64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    vec![
        (
            "input_ids.bin",
            (0u32..20).flat_map(|x| x.to_le_bytes()).collect(),
        ),
        (
            "loss_mask.bin",
            (0..20).map(|i| (i % 3 == 0) as u8).collect(),
        ),
        ("samples.bin", le(&samples.concat())),
        ("packs.bin", le(&packs.concat())),
        ("pack_samples.bin", le(&order)),
    ]
}

fn meta(files: &[(&str, Vec<u8>)], counts: (u64, u64, u64, u64)) -> Value {
    let outputs: serde_json::Map<String, Value> = files
        .iter()
        .map(|(n, b)| {
            (
                n.to_string(),
                json!({"size": b.len(), "blake3": blake3::hash(b).to_hex().to_string()}),
            )
        })
        .collect();
    json!({
        "format_version": 1, "num_tokens": counts.0, "num_samples": counts.1,
        "num_packs": counts.2, "max_length": counts.3, "outputs": outputs,
        "files": [{"name": "a.jsonl"}],
    })
}

fn write_dir(dir: &Path, files: &[(&str, Vec<u8>)], meta: &Value) {
    for (n, b) in files {
        std::fs::write(dir.join(n), b).unwrap();
    }
    std::fs::write(dir.join(META), serde_json::to_vec(meta).unwrap()).unwrap();
}

const COUNTS: (u64, u64, u64, u64) = (20, 5, 3, 8);

#[test]
fn hand_built_directory_verifies() {
    let d = tempfile::tempdir().unwrap();
    let files = tables();
    write_dir(d.path(), &files, &meta(&files, COUNTS));
    let r = verify(d.path()).expect("valid directory");
    assert_eq!(r["samples"], 5);
    assert_eq!(r["max_pack_tokens"], 8);
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    proptest::collection::vec(
        prop_oneof![
            4 => (any::<usize>(), 1u8..=255).prop_map(|(p, m)| Edit::Flip(p, m)),
            2 => (any::<usize>(), proptest::sample::select(&[0u8, 0xff, 0x7f, 0x80, 1][..]))
                .prop_map(|(p, b)| Edit::Set(p, b)),
            1 => any::<usize>().prop_map(Edit::Truncate),
            1 => (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..9))
                .prop_map(|(p, b)| Edit::Insert(p, b)),
        ],
        1..6,
    )
}

/// Counts in meta.json: the true ones, small perturbations, or absurd values.
fn counts() -> impl Strategy<Value = (u64, u64, u64, u64)> {
    let c = |v: u64| {
        prop_oneof![
            6 => Just(v),
            2 => 0u64..=2 * v + 2,
            1 => proptest::sample::select(&[u64::MAX, u64::MAX / 2, 1u64 << 61, i64::MAX as u64][..]),
        ]
    };
    (c(COUNTS.0), c(COUNTS.1), c(COUNTS.2), c(COUNTS.3))
}

proptest! {
    #![proptest_config(config())]

    /// One file mutated, meta.json's hashes untouched: the mutated file is the one named.
    #[test]
    fn fuzz_verify_hash_mismatch(which in 0usize..5, e in edits()) {
        let d = tempfile::tempdir().unwrap();
        let mut files = tables();
        let m = meta(&files, COUNTS);
        let before = files[which].1.clone();
        files[which].1 = mutate(&before, &e);
        write_dir(d.path(), &files, &m);
        match verify(d.path()) {
            Ok(_) => prop_assert_eq!(&files[which].1, &before),
            Err(err) => {
                prop_assert!(files[which].1 != before);
                let msg = err.to_string();
                prop_assert!(msg.contains(BINARY_FILES[which]), "{} does not name {}", msg, BINARY_FILES[which]);
            }
        }
    }

    /// One file mutated and re-hashed, counts perturbed: the invariant checks see arbitrary
    /// tables. Never a panic; when it passes, the tables really are a valid packing.
    #[test]
    fn fuzz_verify_rehashed(which in 0usize..5, e in edits(), counts in counts()) {
        let d = tempfile::tempdir().unwrap();
        let mut files = tables();
        files[which].1 = mutate(&files[which].1, &e);
        write_dir(d.path(), &files, &meta(&files, counts));
        if verify(d.path()).is_ok() {
            // Accepted: the invariants hold, checked independently here.
            let (n_tok, n_samp, n_pack, max_len) = counts;
            prop_assert_eq!(files[0].1.len() as u64, 4 * n_tok);
            prop_assert_eq!(files[1].1.len() as u64, n_tok);
            prop_assert!(files[1].1.iter().all(|&m| m <= 1));
            let i64s = |b: &[u8]| b.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect::<Vec<_>>();
            let packs = i64s(&files[3].1);
            let mut covered = 0i64;
            for p in 0..n_pack as usize {
                let len = packs[2 * p + 2] - packs[2 * p];
                prop_assert!(len > 0 && len as u64 <= max_len);
                covered += len;
            }
            prop_assert_eq!(covered as u64, n_tok);
            let mut order = i64s(&files[4].1);
            order.sort();
            prop_assert_eq!(order, (0..n_samp as i64).collect::<Vec<_>>());
        }
    }

    /// meta.json itself mutated (bytes, not values).
    #[test]
    fn fuzz_verify_meta_bytes(e in edits()) {
        let d = tempfile::tempdir().unwrap();
        let files = tables();
        write_dir(d.path(), &files, &meta(&files, COUNTS));
        let mp = d.path().join(META);
        let bytes = std::fs::read(&mp).unwrap();
        std::fs::write(&mp, mutate(&bytes, &e)).unwrap();
        let _ = verify(d.path());
    }
}

/// A missing file is named.
#[test]
fn missing_files_are_named() {
    for name in BINARY_FILES.iter().chain([&META]) {
        let d = tempfile::tempdir().unwrap();
        let files = tables();
        write_dir(d.path(), &files, &meta(&files, COUNTS));
        std::fs::remove_file(d.path().join(name)).unwrap();
        let e = verify(d.path()).unwrap_err().to_string();
        assert!(e.contains(name), "{e}");
    }
}
