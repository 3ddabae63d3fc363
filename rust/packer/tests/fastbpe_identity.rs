//! The fast byte-level BPE path gives the `tokenizers` crate's ids (issue 7): on every string
//! of the shared corpora with both shared tokenizers, on random Unicode text, and its
//! character classes equal Oniguruma's on every code point.
//!
//! Tests that need `../shared/data` print why they skip when it is absent.

use std::path::{Path, PathBuf};

use packer::tokenize::split::{class_of, fold, LETTER, NUMBER, SPACE};
use packer::tokenize::{TextTokenizer, TokenizerBackend};
use proptest::prelude::*;
use rayon::prelude::*;

fn shared(rel: &str) -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/data")
        .join(rel);
    if p.exists() {
        Some(p)
    } else {
        eprintln!(
            "skipped: {} is absent (../shared/data exists only on the project's machines)",
            p.display()
        );
        None
    }
}

/// (hf, fast) for a shared tokenizer.
fn pair(name: &str) -> Option<(TextTokenizer, TextTokenizer)> {
    let dir = shared(&format!("tokenizers/{name}"))?;
    let hf = TextTokenizer::load_with(&dir, TokenizerBackend::Hf).unwrap();
    let fast = TextTokenizer::load_with(&dir, TokenizerBackend::Fast).unwrap();
    assert_eq!(hf.backend(), TokenizerBackend::Hf);
    assert_eq!(fast.backend(), TokenizerBackend::Fast);
    Some((hf, fast))
}

fn all_strings(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::String(s) => out.push(s.clone()),
        serde_json::Value::Array(a) => a.iter().for_each(|x| all_strings(x, out)),
        serde_json::Value::Object(o) => o.values().for_each(|x| all_strings(x, out)),
        _ => {}
    }
}

/// Every string value of a JSONL corpus, plus each raw line (quotes, escapes, braces).
fn corpus(name: &str) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(shared(name)?).unwrap();
    let mut out = Vec::new();
    for line in text.lines() {
        out.push(line.to_string());
        all_strings(&serde_json::from_str(line).unwrap(), &mut out);
    }
    Some(out)
}

fn assert_same(hf: &TextTokenizer, fast: &TextTokenizer, texts: &[String]) -> usize {
    texts
        .par_iter()
        .map(|t| {
            let want = hf.encode(t).unwrap();
            let got = fast.encode(t).unwrap();
            assert!(
                want == got,
                "ids differ for {t:?}\n  hf:   {want:?}\n  fast: {got:?}"
            );
            want.len()
        })
        .sum()
}

#[test]
fn identical_ids_on_shared_corpora() {
    for tok in ["qwen3", "smollm2"] {
        let Some((hf, fast)) = pair(tok) else { return };
        for data in ["chitchat.jsonl", "pydoc.jsonl"] {
            let Some(texts) = corpus(data) else { return };
            let n = assert_same(&hf, &fast, &texts);
            eprintln!("{tok} {data}: {} texts, {n} tokens identical", texts.len());
            assert!(n > 1_000_000, "{tok} {data}: only {n} tokens compared");
        }
    }
}

/// Oniguruma (the engine `tokenizers` runs the pre-tokenizer regexes with) matches `pattern`
/// on exactly the code points where `ours` holds.
fn check_class_against_onig(pattern: &str, ours: impl Fn(char) -> bool) {
    let chars: Vec<char> = (0..0x11_0000u32).filter_map(char::from_u32).collect();
    let text: String = chars.iter().collect();
    let re = onig::Regex::new(pattern).unwrap();
    let mut onig_set = vec![false; 0x11_0000];
    for (a, b) in re.find_iter(&text) {
        for c in text[a..b].chars() {
            onig_set[c as usize] = true;
        }
    }
    let wrong: Vec<String> = chars
        .iter()
        .filter(|&&c| onig_set[c as usize] != ours(c))
        .take(10)
        .map(|c| format!("U+{:04X} onig={}", *c as u32, onig_set[*c as usize]))
        .collect();
    assert!(wrong.is_empty(), "{pattern}: classes differ at {wrong:?}");
}

#[test]
fn classes_equal_oniguruma_on_every_code_point() {
    check_class_against_onig(r"\p{L}+", |c| class_of(c) & LETTER != 0);
    check_class_against_onig(r"\p{N}+", |c| class_of(c) & NUMBER != 0);
    check_class_against_onig(r"\s+", |c| class_of(c) & SPACE != 0);
    for x in ['s', 't', 'r', 'e', 'v', 'm', 'l', 'd'] {
        check_class_against_onig(&format!("(?i:{x})"), |c| fold(c) == x);
    }
    // The scanners treat the classes as disjoint.
    for c in (0..0x11_0000u32).filter_map(char::from_u32) {
        assert!(
            class_of(c).count_ones() <= 1,
            "U+{:04X} in two classes",
            c as u32
        );
    }
}

const SPECIALS: &[&str] = &[
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<think>",
    "</think>",
    "<|im_end",
    "<|",
    "<tool_call>",
    "<jupyter_code>",
];

/// Text pieces chosen to exercise every branch of the scanners, NFC and added tokens.
fn piece() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z]{1,8}",
        "[0-9]{1,7}",
        " {1,9}",
        "[ \t\r\n]{1,6}",
        "[ \u{a0}\u{3000}\u{2028}\u{85}\u{b}\u{c}]{1,4}",
        "[!-/:-@\\[-`{-~]{1,4}",
        "'(s|t|re|ve|m|ll|d|S|T|RE|Ve|M|LL|D|\u{17f}|x)",
        "[\u{4e00}-\u{4e40}\u{3040}-\u{30ff}\u{ac00}-\u{ac20}]{1,5}",
        "[\u{1f600}-\u{1f64f}\u{1f3fb}\u{200d}\u{fe0f}]{1,4}",
        "[aeiouAOU][\u{300}-\u{36f}]{1,3}",
        "[\u{1100}-\u{1112}][\u{1161}-\u{1175}]",
        "[\u{660}-\u{669}\u{bc}-\u{be}\u{2160}-\u{2163}\u{ff10}-\u{ff19}]{1,4}",
        "[\u{e9}\u{c5}\u{212b}\u{2126}\u{fb01}\u{df}\u{130}\u{3c2}]{1,3}",
        proptest::sample::select(SPECIALS).prop_map(str::to_string),
        any::<char>().prop_map(|c| c.to_string()),
    ]
}

fn text() -> impl Strategy<Value = String> {
    proptest::collection::vec(piece(), 0..24).prop_map(|v| v.concat())
}

fn tokenizers_or_skip() -> Vec<(TextTokenizer, TextTokenizer)> {
    ["qwen3", "smollm2"]
        .iter()
        .filter_map(|t| pair(t))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn identical_ids_on_random_unicode(t in text(), u in "\\PC{0,40}") {
        thread_local! {
            static TOKS: Vec<(TextTokenizer, TextTokenizer)> = tokenizers_or_skip();
        }
        TOKS.with(|toks| {
            for (hf, fast) in toks {
                for s in [&t, &u] {
                    prop_assert_eq!(hf.encode(s).unwrap(), fast.encode(s).unwrap(), "text {:?}", s);
                }
            }
            Ok(())
        })?;
    }
}

#[test]
fn unsupported_tokenizer_falls_back_or_refuses() {
    let Some(dir) = shared("tokenizers/smollm2") else {
        return;
    };
    let mut spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("tokenizer.json")).unwrap()).unwrap();
    // A normalizer the fast path does not implement.
    spec["normalizer"] = serde_json::json!({"type": "Lowercase"});
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("tokenizer.json");
    std::fs::write(&json, spec.to_string()).unwrap();

    let auto = TextTokenizer::load_with(&json, TokenizerBackend::Auto).unwrap();
    assert_eq!(auto.backend(), TokenizerBackend::Hf);
    assert!(auto.fast_refused.as_deref().unwrap().contains("Lowercase"));
    assert_eq!(
        auto.encode("Hello World").unwrap(),
        auto.encode("hello world").unwrap()
    );
    let err = TextTokenizer::load_with(&json, TokenizerBackend::Fast)
        .err()
        .expect("fast must refuse a Lowercase normalizer");
    assert!(err.to_string().contains("cannot reproduce"), "{err}");

    // An unknown Split pattern falls back too.
    let mut spec2: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("tokenizer.json")).unwrap()).unwrap();
    spec2["pre_tokenizer"] = serde_json::json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "\\p{N}{1,3}"}, "behavior": "Isolated", "invert": false},
        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]});
    std::fs::write(&json, spec2.to_string()).unwrap();
    let auto = TextTokenizer::load_with(&json, TokenizerBackend::Auto).unwrap();
    assert_eq!(auto.backend(), TokenizerBackend::Hf);
    assert!(auto
        .fast_refused
        .as_deref()
        .unwrap()
        .contains("no fast scanner"));
}
