//! The packed-directory verifier on arbitrary tables: four header bytes give the counts
//! (tokens, samples, packs, max_length), the rest fills the five binary files at exactly the
//! sizes those counts require, and meta.json lists their true sizes and hashes — so every
//! input reaches the invariant checks behind the hash check. Never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use packer::facts::{BINARY_FILES, META};

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let (n_tok, n_samp, n_pack, max_len) = (
        data[0] as usize,
        (data[1] % 32) as usize,
        (data[2] % 32) as usize,
        data[3] as u64,
    );
    let sizes = [4 * n_tok, n_tok, 40 * n_samp, 16 * (n_pack + 1), 8 * n_samp];
    let mut bytes = data[4..].iter().copied().chain(std::iter::repeat(0u8));
    let dir = tempfile::tempdir().unwrap();
    let mut outputs = serde_json::Map::new();
    for (name, size) in BINARY_FILES.iter().zip(sizes) {
        let b: Vec<u8> = bytes.by_ref().take(size).collect();
        std::fs::write(dir.path().join(name), &b).unwrap();
        outputs.insert(
            name.to_string(),
            serde_json::json!({"size": size, "blake3": blake3::hash(&b).to_hex().to_string()}),
        );
    }
    let meta = serde_json::json!({
        "format_version": 1, "num_tokens": n_tok, "num_samples": n_samp,
        "num_packs": n_pack, "max_length": max_len, "outputs": outputs,
    });
    std::fs::write(dir.path().join(META), meta.to_string()).unwrap();
    let _ = packer::verify(dir.path());
});
