//! `verify` counts split samples from the layout itself: 0 on a directory the packer could
//! write, the number of samples a pack boundary cuts on a hand-made one (which it refuses,
//! naming the count, the first such sample and `samples.bin`).

use std::path::Path;

use packer::facts::META;
use packer::internals::split_samples;
use packer::verify;
use serde_json::json;

fn le(v: &[i64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Write a directory of `n_tok` tokens with these tables (docs/FORMAT.md), meta.json's sizes
/// and hashes matching, so only the layout can be at fault.
fn write_dir(dir: &Path, n_tok: usize, samples: &[[i64; 5]], order: &[i64], packs: &[[i64; 2]]) {
    let files: Vec<(&str, Vec<u8>)> = vec![
        (
            "input_ids.bin",
            (0..n_tok as u32).flat_map(|x| x.to_le_bytes()).collect(),
        ),
        ("loss_mask.bin", vec![1u8; n_tok]),
        ("samples.bin", le(&samples.concat())),
        ("packs.bin", le(&packs.concat())),
        ("pack_samples.bin", le(order)),
    ];
    let outputs: serde_json::Map<String, serde_json::Value> = files
        .iter()
        .map(|(n, b)| {
            (
                n.to_string(),
                json!({"size": b.len(), "blake3": blake3::hash(b).to_hex().to_string()}),
            )
        })
        .collect();
    for (n, b) in &files {
        std::fs::write(dir.join(n), b).unwrap();
    }
    let meta = json!({
        "format_version": 1, "num_tokens": n_tok, "num_samples": samples.len(),
        "num_packs": packs.len() - 1, "max_length": 16, "outputs": outputs,
        "files": [{"name": "a.jsonl"}],
    });
    std::fs::write(dir.join(META), serde_json::to_vec(&meta).unwrap()).unwrap();
}

/// 3 packs over 20 tokens: [0, 8) holds samples 0 and 2, [8, 14) samples 1 and 3, [14, 20)
/// sample 4.
const SAMPLES: [[i64; 5]; 5] = [
    [0, 3, 0, 0, 0],
    [8, 4, 1, 0, 1],
    [3, 5, 0, 0, 2],
    [12, 2, 1, 0, 3],
    [14, 6, 2, 0, 4],
];
const ORDER: [i64; 5] = [0, 2, 1, 3, 4];
const PACKS: [[i64; 2]; 4] = [[0, 0], [8, 2], [14, 4], [20, 5]];

#[test]
fn whole_samples_count_zero_and_the_report_says_so() {
    let d = tempfile::tempdir().unwrap();
    write_dir(d.path(), 20, &SAMPLES, &ORDER, &PACKS);
    let r = verify(d.path()).expect("a valid layout");
    assert_eq!(r["split_samples"], 0);
    assert_eq!(split_samples(&SAMPLES.concat(), &PACKS.concat()).count, 0);
}

#[test]
fn a_boundary_through_samples_is_counted_and_refused() {
    // Move the first boundary from token 8 to 10 and the second from 14 to 13: sample 1
    // (tokens 8..12) and sample 3 (12..14) are now cut; the others still sit whole.
    let packs: [[i64; 2]; 4] = [[0, 0], [10, 2], [13, 4], [20, 5]];
    let s = split_samples(&SAMPLES.concat(), &packs.concat());
    assert_eq!(s.count, 2);
    assert_eq!(s.first, (1, 8, 12, 10));

    let d = tempfile::tempdir().unwrap();
    write_dir(d.path(), 20, &SAMPLES, &ORDER, &packs);
    let e = verify(d.path()).unwrap_err().to_string();
    assert!(e.contains("samples.bin"), "{e}");
    assert!(e.contains("2 sample(s) split across packs"), "{e}");
    assert!(e.contains("sample 1, tokens 8..12"), "{e}");
}

#[test]
fn a_layout_that_splits_every_sample_counts_them_all() {
    // XTuner-style chunking: one stream of 4 samples of 5 tokens cut into packs of 4 tokens.
    let samples: Vec<[i64; 5]> = (0..4).map(|s| [5 * s, 5, s, 0, s]).collect();
    let packs: Vec<[i64; 2]> = (0..=5).map(|p| [4 * p, (p).min(4)]).collect();
    let s = split_samples(&samples.concat(), &packs.concat());
    // Boundaries at 4, 8, 12, 16 cut samples [0,5), [5,10), [10,15), [15,20) once each.
    assert_eq!(s.count, 4);
}

#[test]
fn disordered_boundaries_count_nothing_and_never_panic() {
    let packs = [0i64, 0, 14, 2, 8, 4, 20, 5];
    assert_eq!(split_samples(&SAMPLES.concat(), &packs).count, 0);
    let extreme = [
        i64::MAX - 1,
        i64::MAX,
        2,
        0,
        0,
        0,
        0,
        0,
        i64::MIN,
        -1,
        0,
        0,
        0,
        0,
        0,
    ];
    let packs = [0i64, 0, 1, 1, i64::MAX, 2];
    let _ = split_samples(&extreme, &packs);
}

#[test]
fn a_plan_counts_samples_placed_in_several_packs() {
    use packer::internals::samples_in_several_packs;
    assert_eq!(
        samples_in_several_packs(&[vec![0, 2], vec![1, 3], vec![4]], 5),
        0
    );
    // Sample 1 in packs 0 and 1 (two pieces), sample 4 in packs 1 and 2; a repeat inside
    // one pack is not a split.
    let plan = [vec![0, 1, 2, 2], vec![1, 3, 4], vec![4]];
    assert_eq!(samples_in_several_packs(&plan, 5), 2);
    assert_eq!(samples_in_several_packs(&[vec![7]], 5), 0);
}
