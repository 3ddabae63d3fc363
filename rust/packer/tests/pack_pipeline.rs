//! `packer::pack` end to end on generated input: a word-level tokenizer and conversations
//! written here, so it runs on any clone. The packed directory verifies, its bytes do not
//! depend on the thread count, and shards merged give the bytes of a single run.

use std::path::{Path, PathBuf};

use packer::{Error, PackConfig, Progress};
use serde_json::json;

const WORDS: [&str; 8] = [
    "red", "green", "blue", "cat", "dog", "runs", "sleeps", "far",
];

fn write_tokenizer(dir: &Path) -> PathBuf {
    let mut vocab = serde_json::Map::new();
    vocab.insert("</s>".into(), json!(0));
    vocab.insert("[UNK]".into(), json!(1));
    for (i, w) in WORDS.iter().enumerate() {
        vocab.insert((*w).into(), json!(i + 2));
    }
    let tok = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": 0, "content": "</s>", "single_word": false, "lstrip": false,
                          "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"},
    });
    let d = dir.join("tok");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("tokenizer.json"), tok.to_string()).unwrap();
    std::fs::write(d.join("tokenizer_config.json"), r#"{"eos_token": "</s>"}"#).unwrap();
    d
}

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

fn no_progress(_: Progress<'_>) -> bool {
    true
}

fn bytes_of(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let b = std::fs::read(dir.join(&n)).unwrap();
            (n, b)
        })
        .collect()
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

    let two = tmp.path().join("two");
    let cfg2 = PackConfig {
        threads: Some(2),
        ..config(&data, &tok, two.clone())
    };
    packer::pack(&cfg2, &no_progress).unwrap();
    assert_eq!(bytes_of(&one), bytes_of(&two));

    let parts: Vec<PathBuf> = (0..2)
        .map(|i| {
            let p = tmp.path().join(format!("shard{i}"));
            let cfg = PackConfig {
                shard: Some((i, 2)),
                ..config(&data, &tok, p.clone())
            };
            packer::pack(&cfg, &no_progress).unwrap();
            p
        })
        .collect();
    let merged = tmp.path().join("merged");
    packer::merge(&parts, &merged, &no_progress).unwrap();
    assert_eq!(bytes_of(&one), bytes_of(&merged));
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
