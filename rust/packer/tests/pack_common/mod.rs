//! What the end-to-end pack tests share: a word-level tokenizer written to disk, the words it
//! knows, a progress callback that never stops a run, and a directory's files as bytes.

use std::path::{Path, PathBuf};

use packer::Progress;
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
