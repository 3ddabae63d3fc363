//! What the end-to-end pack tests share: a word-level tokenizer written to disk, the words it
//! knows, a progress callback that never stops a run, and a directory's files as bytes.

#![allow(dead_code)] // each test crate includes this module and uses part of it

use std::path::{Path, PathBuf};

use packer::{PackConfig, Progress};
use serde_json::json;

/// The tokenizer's words (ids 2..), after `</s>` (0, the EOS) and `[UNK]` (1).
pub const WORDS: [&str; 8] = [
    "red", "green", "blue", "cat", "dog", "runs", "sleeps", "far",
];

/// A word-level tokenizer of [`WORDS`] in `dir/tok`, with `</s>` as its EOS.
pub fn write_tokenizer(dir: &Path) -> PathBuf {
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

/// A progress callback that lets every run go on.
pub fn no_progress(_: Progress<'_>) -> bool {
    true
}

/// Every file of `dir`, by name, with its bytes.
pub fn bytes_of(dir: &Path) -> Vec<(String, Vec<u8>)> {
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

/// `cfg` (already packed into `cfg.out_dir`) packed again on 2 threads and as `n` shards
/// joined by `merge` for each `n` of `shards`: every result has the same bytes.
pub fn assert_threads_and_shards_agree(cfg: &PackConfig, shards: &[usize], tmp: &Path) {
    let one = &cfg.out_dir;
    let two = PackConfig {
        threads: Some(2),
        out_dir: tmp.join("two"),
        ..cfg.clone()
    };
    packer::pack(&two, &no_progress).unwrap();
    assert_eq!(bytes_of(one), bytes_of(&two.out_dir), "2 threads");
    for &n in shards {
        let parts: Vec<PathBuf> = (0..n)
            .map(|i| {
                let c = PackConfig {
                    shard: Some((i, n)),
                    out_dir: tmp.join(format!("shard{n}_{i}")),
                    ..cfg.clone()
                };
                packer::pack(&c, &no_progress).unwrap();
                c.out_dir
            })
            .collect();
        let merged = tmp.join(format!("merged{n}"));
        packer::merge(&parts, &merged, &no_progress).unwrap();
        assert_eq!(bytes_of(one), bytes_of(&merged), "{n} shards");
    }
}
