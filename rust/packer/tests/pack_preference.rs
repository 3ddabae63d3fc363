//! Preference pairs end to end: a pair is one unit of packing (chosen and rejected adjacent in
//! one pack, chosen first), `pairs.bin` records pair id and role per sample, long pairs are
//! cut from their completions' ends or dropped and counted, and the bytes do not depend on
//! threads or shards.

mod pack_common;

use std::path::{Path, PathBuf};

use pack_common::{assert_threads_and_shards_agree, no_progress, write_tokenizer, WORDS};
use packer::{Error, MixSource, PackConfig};
use serde_json::json;

const MAX: usize = 48;

fn words(n: u64, x: &mut u64) -> String {
    (0..n)
        .map(|_| {
            *x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            WORDS[((*x >> 33) % 8) as usize]
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `n` pairs in standard (string) form; every 7th has long completions (cut), every 11th a
/// prompt longer than half of `MAX` (dropped).
fn write_pairs(dir: &Path, n: u64) -> PathBuf {
    let mut x = 11u64;
    let mut text = String::new();
    for i in 0..n {
        let p = if i % 11 == 5 { 30 } else { 1 + i % 9 };
        let (c, r) = if i % 7 == 3 {
            (40, 25)
        } else {
            (1 + i % 6, 1 + (i * 5) % 13)
        };
        let rec = json!({"prompt": words(p, &mut x), "chosen": words(c, &mut x),
                         "rejected": words(r, &mut x)});
        text.push_str(&rec.to_string());
        text.push('\n');
    }
    let d = dir.join("pairs");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("pairs.jsonl"), text).unwrap();
    d
}

fn config(data: &Path, tok: &Path, out: PathBuf) -> PackConfig {
    PackConfig {
        inputs: vec![data.to_string_lossy().into_owned()],
        out_dir: out,
        tokenizer: tok.to_path_buf(),
        max_length: MAX,
        template: "none".into(),
        seed: 5,
        tokenizer_backend: packer::TokenizerBackend::Hf,
        ..PackConfig::default()
    }
}

fn i64s(path: &Path) -> Vec<i64> {
    std::fs::read(path)
        .unwrap()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn pairs_are_adjacent_in_one_pack_and_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = write_tokenizer(tmp.path());
    let data = write_pairs(tmp.path(), 300);
    let one = tmp.path().join("one");
    let cfg = PackConfig {
        threads: Some(1),
        ..config(&data, &tok, one.clone())
    };
    let stats = packer::pack(&cfg, &no_progress).unwrap();
    // 300 records: 28 with a 30-word prompt (dropped: two prompts + EOS leave no room)
    let long_prompts = (0..300).filter(|i| i % 11 == 5).count() as u64;
    assert_eq!(stats.dropped_pairs, long_prompts, "{stats:?}");
    assert_eq!(stats.pairs + stats.dropped_pairs, stats.records);
    assert_eq!(stats.samples, 2 * stats.pairs);
    assert_eq!(stats.dropped_samples, 2 * stats.dropped_pairs);
    assert!(stats.truncated_pairs > 0 && stats.truncated_samples >= stats.truncated_pairs);
    let report = packer::verify(&one).unwrap();
    assert_eq!(report["pairs"], json!(stats.pairs), "{report}");

    let samples = i64s(&one.join("samples.bin"));
    let pairs = i64s(&one.join("pairs.bin"));
    let ids: Vec<u32> = std::fs::read(one.join("input_ids.bin"))
        .unwrap()
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let mask = std::fs::read(one.join("loss_mask.bin")).unwrap();
    assert_eq!(pairs.len() as u64, 2 * stats.samples);
    for k in 0..stats.pairs as usize {
        let (c, r) = (
            &samples[10 * k..10 * k + 5],
            &samples[10 * k + 5..10 * k + 10],
        );
        assert_eq!(&pairs[4 * k..4 * k + 4], &[k as i64, 0, k as i64, 1]);
        assert_eq!(c[2], r[2], "pair {k} split across packs");
        assert_eq!(c[0] + c[1], r[0], "pair {k}: rejected right after chosen");
        assert!(c[1] + r[1] <= MAX as i64);
        // both sides keep the same whole prompt, untrained; each trains something
        let side = |row: &[i64]| {
            let (a, b) = (row[0] as usize, (row[0] + row[1]) as usize);
            (&ids[a..b], &mask[a..b])
        };
        let ((ci, cm), (ri, rm)) = (side(c), side(r));
        let pc = cm.iter().position(|&m| m == 1).unwrap();
        let pr = rm.iter().position(|&m| m == 1).unwrap();
        assert_eq!((pc, &ci[..pc]), (pr, &ri[..pr]), "pair {k}");
        assert!(cm[pc..].iter().all(|&m| m == 1) && rm[pr..].iter().all(|&m| m == 1));
    }
    // An untruncated pair ends each side with the EOS (id 0), trained.
    let c = &samples[0..5];
    let end = (c[0] + c[1] - 1) as usize;
    assert_eq!((ids[end], mask[end]), (0, 1));

    assert_threads_and_shards_agree(&cfg, &[3], tmp.path());
}

#[test]
fn pairs_and_single_samples_in_one_run_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = write_tokenizer(tmp.path());
    let data = write_pairs(tmp.path(), 10);
    std::fs::write(
        data.join("sft.jsonl"),
        "{\"conversation\": [{\"input\": \"red\", \"output\": \"cat\"}]}\n",
    )
    .unwrap();
    let err = packer::pack(&config(&data, &tok, tmp.path().join("out")), &no_progress).unwrap_err();
    assert!(
        matches!(err, Error::Config(ref m) if m.contains("sft.jsonl")),
        "{err}"
    );
}

#[test]
fn sft_packs_have_no_pair_file() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = write_tokenizer(tmp.path());
    let data = tmp.path().join("sft.jsonl");
    std::fs::write(
        &data,
        "{\"conversation\": [{\"input\": \"red\", \"output\": \"cat\"}]}\n",
    )
    .unwrap();
    let out = tmp.path().join("out");
    let stats = packer::pack(&config(&data, &tok, out.clone()), &no_progress).unwrap();
    assert_eq!(stats.pairs, 0);
    assert!(!out.join("pairs.bin").exists());
    let meta = std::fs::read_to_string(out.join("meta.json")).unwrap();
    assert!(!meta.contains("pairs"), "{meta}");
}

#[test]
fn a_mix_of_pairs_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = write_tokenizer(tmp.path());
    let data = write_pairs(tmp.path(), 10);
    let cfg = PackConfig {
        inputs: vec![],
        mix: vec![MixSource {
            name: "pairs".into(),
            inputs: vec![data.to_string_lossy().into_owned()],
            format: None,
            columns: None,
            weight: 2.0,
            max_samples: None,
        }],
        ..config(&data, &tok, tmp.path().join("out"))
    };
    let err = packer::pack(&cfg, &no_progress).unwrap_err();
    assert!(
        matches!(err, Error::Config(ref m) if m.contains("mix")),
        "{err}"
    );
}

#[test]
fn verify_refuses_pairs_out_of_place() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = write_tokenizer(tmp.path());
    let data = write_pairs(tmp.path(), 20);
    let out = tmp.path().join("out");
    packer::pack(&config(&data, &tok, out.clone()), &no_progress).unwrap();
    // Swap the roles of pair 0 and refresh meta.json's size and hash: only the pair check
    // can catch it.
    let p = out.join("pairs.bin");
    let mut rows = i64s(&p);
    rows.swap(1, 3);
    let bytes: Vec<u8> = rows.iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(&p, &bytes).unwrap();
    let mp = out.join("meta.json");
    let mut meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&mp).unwrap()).unwrap();
    meta["outputs"]["pairs.bin"]["blake3"] = json!(blake3::hash(&bytes).to_hex().to_string());
    std::fs::write(&mp, meta.to_string()).unwrap();
    let err = packer::verify(&out).unwrap_err();
    assert!(err.to_string().contains("pairs.bin"), "{err}");
}
