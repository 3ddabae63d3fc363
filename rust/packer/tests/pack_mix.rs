//! Mixing sources by ratio, end to end: exact per-source counts for weights 0.5, 1 and 2.5
//! and a sample limit, sources of different formats and columns in one pack, and the same
//! bytes on any thread count and any shard split.

mod pack_common;

use std::path::{Path, PathBuf};

use pack_common::{assert_threads_and_shards_agree, no_progress, write_tokenizer, WORDS};
use packer::{MixSource, PackConfig};
use serde_json::{json, Value};

struct Words(u64);

impl Words {
    fn phrase(&mut self, max: u64) -> String {
        let mut next = |n: u64| {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) % n
        };
        let len = 1 + next(max);
        (0..len)
            .map(|_| WORDS[next(8) as usize])
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Three sources: conversations in two files (a directory), question/answer rows that need a
/// column map into alpaca, and plain text.
fn write_sources(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let mut w = Words(11);
    let chats = dir.join("chats");
    std::fs::create_dir_all(&chats).unwrap();
    for f in 0..2 {
        let text: String = (0..100)
            .map(|_| {
                let (a, b) = (w.phrase(10), w.phrase(16));
                format!("{}\n", json!({"conversation": [{"input": a, "output": b}]}))
            })
            .collect();
        std::fs::write(chats.join(format!("part{f}.jsonl")), text).unwrap();
    }
    let qa = dir.join("qa.jsonl");
    let text: String = (0..80)
        .map(|_| {
            let (q, a) = (w.phrase(10), w.phrase(12));
            format!("{}\n", json!({"question": q, "answer": a}))
        })
        .collect();
    std::fs::write(&qa, text).unwrap();
    let docs = dir.join("docs.jsonl");
    let text: String = (0..30)
        .map(|_| format!("{}\n", json!({"text": w.phrase(30)})))
        .collect();
    std::fs::write(&docs, text).unwrap();
    (chats, qa, docs)
}

fn source(name: &str, path: &Path, weight: f64) -> MixSource {
    MixSource {
        name: name.into(),
        inputs: vec![path.to_string_lossy().into_owned()],
        format: None,
        columns: None,
        weight,
        max_samples: None,
    }
}

fn config(tmp: &Path, out: &str) -> PackConfig {
    let tok = write_tokenizer(tmp);
    let (chats, qa, docs) = write_sources(tmp);
    PackConfig {
        mix: vec![
            source("chats", &chats, 2.5),
            MixSource {
                format: Some("alpaca".into()),
                columns: Some("instruction=question,output=answer".into()),
                max_samples: Some(50),
                ..source("qa", &qa, 0.5)
            },
            MixSource {
                format: Some("pretrain".into()),
                ..source("docs", &docs, 1.0)
            },
        ],
        out_dir: tmp.join(out),
        tokenizer: tok,
        max_length: 64,
        template: "none".into(),
        seed: 5,
        tokenizer_backend: packer::TokenizerBackend::Hf,
        ..PackConfig::default()
    }
}

#[test]
fn mix_counts_are_exact_and_bytes_do_not_depend_on_threads_or_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = PackConfig {
        threads: Some(1),
        ..config(tmp.path(), "one")
    };
    let stats = packer::pack(&cfg, &no_progress).unwrap();
    assert_eq!(stats.records, 310);
    assert_eq!(stats.dropped_samples, 0, "{stats:?}");
    let counts: Vec<(String, u64, u64, u64)> = stats
        .mix
        .iter()
        .map(|m| {
            (
                m.name.clone(),
                m.available_samples,
                m.distinct_samples,
                m.samples,
            )
        })
        .collect();
    assert_eq!(
        counts,
        vec![
            ("chats".into(), 200, 200, 500), // 2 × 200 + round(0.5 × 200)
            ("qa".into(), 80, 50, 25),       // 50 of 80, then half of them
            ("docs".into(), 30, 30, 30),
        ]
    );
    assert_eq!(stats.samples, 555);
    let tokens: u64 = stats.mix.iter().map(|m| m.tokens).sum();
    let loss: u64 = stats.mix.iter().map(|m| m.loss_tokens).sum();
    assert_eq!(tokens, stats.tokens);
    assert_eq!(loss, stats.loss_tokens);
    let docs = &stats.mix[2];
    assert_eq!(
        docs.tokens, docs.loss_tokens,
        "pretraining text trains every token"
    );
    let share: f64 = stats.mix.iter().map(|m| m.token_share).sum();
    assert!((share - 1.0).abs() < 1e-9);

    let one = &cfg.out_dir;
    let meta: Value =
        serde_json::from_slice(&std::fs::read(one.join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta["mix"][1]["samples"], json!(25), "{}", meta["mix"]);
    assert_eq!(meta["num_samples"], json!(555));
    assert_eq!(
        meta["fingerprint_inputs"]["mix"][1]["max_samples"],
        json!(50)
    );
    packer::verify(one).unwrap();
    assert_eq!(stats.fingerprint, packer::fingerprint(&cfg).unwrap());

    // Every chosen sample of `chats` appears 2 or 3 times, and exactly 100 of them 3 times.
    let samples = std::fs::read(one.join("samples.bin")).unwrap();
    let mut copies = std::collections::HashMap::<(i64, i64), u32>::new();
    for row in samples.chunks_exact(40) {
        let v: Vec<i64> = row
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .collect();
        *copies.entry((v[3], v[4])).or_default() += 1;
    }
    let chat_copies: Vec<u32> = copies
        .iter()
        .filter(|((f, _), _)| *f < 2)
        .map(|(_, &c)| c)
        .collect();
    assert_eq!(chat_copies.len(), 200);
    assert_eq!(chat_copies.iter().filter(|&&c| c == 3).count(), 100);
    assert!(chat_copies.iter().all(|&c| c == 2 || c == 3));

    assert_threads_and_shards_agree(&cfg, &[2, 3], tmp.path());

    let heavier = PackConfig {
        out_dir: tmp.path().join("heavier"),
        mix: cfg
            .mix
            .iter()
            .cloned()
            .map(|mut s| {
                s.weight *= 2.0;
                s
            })
            .collect(),
        ..cfg.clone()
    };
    assert_ne!(
        packer::fingerprint(&heavier).unwrap(),
        stats.fingerprint,
        "weights are part of the fingerprint"
    );
}

#[test]
fn mix_errors_name_the_source() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), "out");
    let bad = |f: &dyn Fn(&mut PackConfig)| {
        let mut c = cfg.clone();
        f(&mut c);
        packer::pack(&c, &no_progress).unwrap_err().to_string()
    };
    let e = bad(&|c| c.mix[1].weight = -1.0);
    assert!(
        e.contains("mix source 1 (\"qa\")") && e.contains("weight"),
        "{e}"
    );
    let e = bad(&|c| c.mix[2].format = Some("nope".into()));
    assert!(
        e.contains("mix source 2 (\"docs\")") && e.contains("unknown format"),
        "{e}"
    );
    let e = bad(&|c| c.mix[2].name = "chats".into());
    assert!(e.contains("distinct name"), "{e}");
    let e = bad(&|c| {
        let again = c.mix[0].inputs.clone();
        c.mix[2].inputs = again;
    });
    assert!(e.contains("is an input of mix sources 0"), "{e}");
    let e = bad(&|c| c.inputs = vec!["x.jsonl".into()]);
    assert!(e.contains("not both"), "{e}");
    assert!(!cfg.out_dir.exists());
}
