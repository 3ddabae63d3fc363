//! `packer::pack` end to end on generated input: a word-level tokenizer and conversations
//! written here, so it runs on any clone. The packed directory verifies, its bytes do not
//! depend on the thread count, and shards merged give the bytes of a single run.

mod pack_common;

use std::path::{Path, PathBuf};

use pack_common::{assert_threads_and_shards_agree, no_progress, write_tokenizer, WORDS};
use packer::{Error, PackConfig};
use serde_json::json;

/// Conversations of varying lengths from a small LCG, one JSONL file per `files`.
fn write_data(dir: &Path, files: usize, per_file: usize) -> PathBuf {
    let d = dir.join("data");
    std::fs::create_dir_all(&d).unwrap();
    let mut x: u64 = 7;
    let mut next = |n: u64| {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (x >> 33) % n
    };
    for f in 0..files {
        let mut text = String::new();
        for _ in 0..per_file {
            let (la, lb) = (1 + next(12), 1 + next(20));
            let a: Vec<&str> = (0..la).map(|_| WORDS[next(8) as usize]).collect();
            let b: Vec<&str> = (0..lb).map(|_| WORDS[next(8) as usize]).collect();
            let (a, b) = (a.join(" "), b.join(" "));
            text.push_str(&json!({"conversation": [{"input": a, "output": b}]}).to_string());
            text.push('\n');
        }
        std::fs::write(d.join(format!("part{f}.jsonl")), text).unwrap();
    }
    d
}

fn config(data: &Path, tok: &Path, out: PathBuf) -> PackConfig {
    PackConfig {
        inputs: vec![data.to_string_lossy().into_owned()],
        out_dir: out,
        tokenizer: tok.to_path_buf(),
        max_length: 64,
        template: "none".into(),
        seed: 3,
        tokenizer_backend: packer::TokenizerBackend::Hf,
        ..PackConfig::default()
    }
}

#[test]
fn pack_verifies_and_is_independent_of_threads_and_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = write_tokenizer(tmp.path());
    let data = write_data(tmp.path(), 3, 200);

    let one = tmp.path().join("one");
    let cfg = PackConfig {
        threads: Some(1),
        ..config(&data, &tok, one.clone())
    };
    let stats = packer::pack(&cfg, &no_progress).unwrap();
    assert_eq!(stats.records, 600);
    assert_eq!(stats.samples + stats.dropped_samples, 600);
    assert!(stats.samples > 500, "{stats:?}");
    assert_eq!(stats.split_samples, 0);
    assert!(stats.packs > 0 && stats.fill > 0.5, "{stats:?}");
    let report = packer::verify(&one).unwrap();
    assert_eq!(report["split_samples"], json!(0), "{report}");
    assert_eq!(stats.fingerprint, packer::fingerprint(&cfg).unwrap());

    assert_threads_and_shards_agree(&cfg, &[2], tmp.path());
}

#[test]
fn pack_refuses_inputs_with_nothing_to_train() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = write_tokenizer(tmp.path());
    let data = tmp.path().join("empty_convs.jsonl");
    std::fs::write(&data, "{\"conversation\": []}\n{\"conversation\": []}\n").unwrap();
    let cfg = config(&data, &tok, tmp.path().join("out"));
    let err = packer::pack(&cfg, &no_progress).unwrap_err();
    assert!(
        matches!(
            err,
            Error::NoTrainableSamples {
                records: 2,
                dropped: 2,
                skipped: 0
            }
        ),
        "{err}"
    );
    assert!(!tmp.path().join("out").exists());
}
