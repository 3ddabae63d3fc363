//! The fast BPE path gives the `tokenizers` crate's ids: on every string
//! of the shared corpora with both shared tokenizers, on random Unicode text, its BPE merges
//! equal `BPE::tokenize` on random pieces (long ones too, which are not memoised) and on
//! reordered, legacy-format and `ignore_merges` variants of the shared models, and its
//! character classes equal Oniguruma's on every code point. Loading with the fast path builds
//! no `tokenizers::Tokenizer` (the `hf` template's offsets build it on first use).
//!
//! Tests that need `../shared/data` are ignored, with the reason, when it is absent (build.rs).

use std::path::{Path, PathBuf};

use packer::chat::TextTokenizer;
use packer::internals::tokenize::bytes_to_chars;
use packer::internals::tokenize::FastBpe;
use packer::internals::tokenize::{
    class_of, fold, Splitter, DEEPSEEK3_PATTERN, LETTER, MARK, NUMBER, PUNCT, SPACE, SYMBOL,
};
use packer::TokenizerBackend;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use rayon::prelude::*;
use tokenizers::models::bpe::BPE;
use tokenizers::models::ModelWrapper;
use tokenizers::Model as _;

/// The shared tokenizers: byte-level BPE behind one Split (Qwen3) or ByteLevel's regex
/// (SmolLM2), SentencePiece-style BPE with Metaspace and byte fallback (Mistral v0.3), and
/// byte-level BPE behind three Splits (DeepSeek-V3).
const ALL: [&str; 4] = ["qwen3", "smollm2", "mistral-v3", "deepseek-v3"];

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
    assert!(hf.hf_loaded());
    assert!(
        !fast.hf_loaded(),
        "{name}: the fast path built the HF tokenizer at load"
    );
    assert_eq!((&hf.bos, &hf.eos), (&fast.bos, &fast.eos));
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

#[cfg_attr(not(shared_data), ignore = "needs ../shared/data, absent here")]
#[test]
fn identical_ids_on_shared_corpora() {
    for tok in ALL {
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
    check_class_against_onig(r"\p{M}+", |c| class_of(c) & MARK != 0);
    check_class_against_onig(r"\p{P}+", |c| class_of(c) & PUNCT != 0);
    check_class_against_onig(r"\p{S}+", |c| class_of(c) & SYMBOL != 0);
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
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "[TOOL_CALLS]",
    "[INST",
    "<\u{ff5c}begin\u{2581}of\u{2581}sentence\u{ff5c}>",
    "<\u{ff5c}end\u{2581}of\u{2581}sentence\u{ff5c}>",
    "<\u{ff5c}User\u{ff5c}>",
    "<\u{ff5c}Assistant\u{ff5c}>",
    "<0x0A>",
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
        // Metaspace marks, DeepSeek's CJK split edges, marks after spaces, ASCII punctuation
        // before letters, digits in letters.
        "[\u{2581} ]{1,4}[a-z]{0,3}",
        "[\u{9fa4}-\u{9fa6}\u{303f}-\u{3041}\u{309f}-\u{30a1}\u{30ff}\u{3100}]{1,3}",
        "[ \t][\u{300}-\u{302}\u{93f}][a-z]?",
        "[-_.@#/\\\\]{1,2}[a-zA-Z]{1,4}[0-9]{0,4}",
        "[\u{1}-\u{1f}\u{7f}\u{ad}\u{200b}-\u{200f}\u{feff}]{1,3}",
        proptest::sample::select(SPECIALS).prop_map(str::to_string),
        any::<char>().prop_map(|c| c.to_string()),
    ]
}

fn text() -> impl Strategy<Value = String> {
    proptest::collection::vec(piece(), 0..24).prop_map(|v| v.concat())
}

fn tokenizers_or_skip() -> Vec<(TextTokenizer, TextTokenizer)> {
    ALL.iter().filter_map(|t| pair(t)).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[cfg_attr(not(shared_data), ignore = "needs ../shared/data, absent here")]
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

#[cfg_attr(not(shared_data), ignore = "needs ../shared/data, absent here")]
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

    // A pre-tokenizer the fast path does not implement.
    let mut spec2: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("tokenizer.json")).unwrap()).unwrap();
    spec2["pre_tokenizer"] = serde_json::json!({"type": "Sequence", "pretokenizers": [
        {"type": "BertPreTokenizer"},
        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]});
    std::fs::write(&json, spec2.to_string()).unwrap();
    let auto = TextTokenizer::load_with(&json, TokenizerBackend::Auto).unwrap();
    assert_eq!(auto.backend(), TokenizerBackend::Hf);
    assert!(auto
        .fast_refused
        .as_deref()
        .unwrap()
        .contains("pre-tokenizer BertPreTokenizer"));
}

/// The `tokenizers` BPE model of a tokenizer.json.
fn hf_bpe(json: &Path) -> tokenizers::Tokenizer {
    let t = tokenizers::Tokenizer::from_file(json).unwrap();
    assert!(matches!(t.get_model(), ModelWrapper::BPE(_)));
    t
}

fn bpe_of(t: &tokenizers::Tokenizer) -> &BPE {
    match t.get_model() {
        ModelWrapper::BPE(b) => b,
        _ => unreachable!(),
    }
}

/// Ids `BPE::tokenize` gives for a piece of raw bytes (spelled in byte-level chars).
fn hf_piece(bpe: &BPE, piece: &[u8]) -> Vec<u32> {
    let chars = bytes_to_chars();
    let word: String = piece.iter().map(|&b| chars[b as usize]).collect();
    bpe.tokenize(&word).unwrap().iter().map(|t| t.id).collect()
}

/// Each vocabulary token's raw bytes (tokens made of byte-level chars only).
fn vocab_bytes(t: &tokenizers::Tokenizer) -> Vec<Vec<u8>> {
    let chars = bytes_to_chars();
    let mut of = std::collections::HashMap::new();
    for (b, c) in chars.iter().enumerate() {
        of.insert(*c, b as u8);
    }
    let mut v: Vec<(u32, Vec<u8>)> = bpe_of(t)
        .get_vocab()
        .into_iter()
        .filter_map(|(tok, id)| {
            Some((
                id,
                tok.chars()
                    .map(|c| of.get(&c).copied())
                    .collect::<Option<Vec<u8>>>()?,
            ))
        })
        .collect();
    v.sort();
    v.into_iter().map(|(_, b)| b).collect()
}

struct Models {
    name: &'static str,
    fast: TextTokenizer,
    hf: tokenizers::Tokenizer,
    tokens: Vec<Vec<u8>>,
}

fn models_or_skip() -> Vec<Models> {
    ["qwen3", "smollm2"]
        .iter()
        .filter_map(|&name| {
            let dir = shared(&format!("tokenizers/{name}"))?;
            let fast = TextTokenizer::load_with(&dir, TokenizerBackend::Fast).unwrap();
            let hf = hf_bpe(&dir.join("tokenizer.json"));
            let tokens = vocab_bytes(&hf);
            Some(Models {
                name,
                fast,
                hf,
                tokens,
            })
        })
        .collect()
}

/// Raw-byte pieces: random bytes (control bytes included: SmolLM2's vocabulary lacks some),
/// UTF-8 text, runs of one byte (long: not memoised), and concatenations of vocabulary tokens
/// (where merges compete).
fn raw_piece() -> impl Strategy<Value = (Vec<u8>, Vec<usize>)> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 1..40).prop_map(|v| (v, vec![])),
        "\\PC{1,60}".prop_map(|s| (s.into_bytes(), vec![])),
        (any::<u8>(), 1usize..700).prop_map(|(b, n)| (vec![b; n], vec![])),
        ("[ a-z=_\\-#*/.]{1,3}", 100usize..400)
            .prop_map(|(s, n)| (s.repeat(n).into_bytes()[..n].to_vec(), vec![])),
        proptest::collection::vec(any::<usize>(), 1..12).prop_map(|ix| (vec![], ix)),
        proptest::collection::vec(any::<usize>(), 40..120).prop_map(|ix| (vec![], ix)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[cfg_attr(not(shared_data), ignore = "needs ../shared/data, absent here")]
    #[test]
    fn merges_equal_bpe_tokenize((bytes, ix) in raw_piece()) {
        thread_local! {
            static MODELS: Vec<Models> = models_or_skip();
        }
        MODELS.with(|models| {
            for m in models {
                let piece: Vec<u8> = if ix.is_empty() {
                    bytes.clone()
                } else {
                    ix.iter().flat_map(|i| m.tokens[i % m.tokens.len()].iter().copied()).collect()
                };
                let want = hf_piece(bpe_of(&m.hf), &piece);
                let got = m.fast.fast().unwrap().tokenize_piece(&piece);
                prop_assert_eq!(&want, &got, "{} piece {:?}", m.name, String::from_utf8_lossy(&piece));
                // Through the memo too (and again, now memoised when short).
                let text = String::from_utf8_lossy(&piece).into_owned();
                let hf_ids = m.hf.encode_fast(text.as_str(), false).unwrap().get_ids().to_vec();
                prop_assert_eq!(&hf_ids, &m.fast.encode(&text).unwrap(), "{} text {:?}", m.name, text);
                prop_assert_eq!(&hf_ids, &m.fast.encode(&text).unwrap(), "{} text {:?}", m.name, text);
            }
            Ok(())
        })?;
    }
}

/// A variant of a shared tokenizer.json, edited by `edit`, in a temporary directory (with the
/// original tokenizer_config.json).
fn variant(
    name: &str,
    edit: impl FnOnce(&mut serde_json::Value),
) -> Option<(tempfile::TempDir, PathBuf)> {
    let dir = shared(&format!("tokenizers/{name}"))?;
    let mut spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("tokenizer.json")).unwrap()).unwrap();
    edit(&mut spec);
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("tokenizer.json"), spec.to_string()).unwrap();
    std::fs::copy(
        dir.join("tokenizer_config.json"),
        tmp.path().join("tokenizer_config.json"),
    )
    .unwrap();
    let path = tmp.path().to_path_buf();
    Some((tmp, path))
}

/// Texts with many distinct pieces: the first 300 lines of both corpora and random pieces.
fn sample_texts() -> Option<Vec<String>> {
    let mut out: Vec<String> = corpus("pydoc.jsonl")?.into_iter().take(300).collect();
    out.extend(corpus("chitchat.jsonl")?.into_iter().take(300));
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    for _ in 0..300 {
        out.push(text().new_tree(&mut runner).unwrap().current());
    }
    Some(out)
}

/// The variant loads on the fast path (no HF at load) and gives HF's ids on the sample texts.
fn assert_variant_identical(dir: &Path, texts: &[String]) {
    let fast = TextTokenizer::load_with(dir, TokenizerBackend::Fast).unwrap();
    assert!(!fast.hf_loaded());
    let hf = TextTokenizer::load_with(dir, TokenizerBackend::Hf).unwrap();
    let n = assert_same(&hf, &fast, texts);
    assert!(n > 100_000, "only {n} tokens compared");
}

#[cfg_attr(not(shared_data), ignore = "needs ../shared/data, absent here")]
#[test]
fn merge_ranks_and_formats_as_tokenizers() {
    let Some(texts) = sample_texts() else { return };
    for name in ["smollm2", "qwen3"] {
        // Merges in another order (ranks differ from token ids), one listed twice (the later
        // rank counts), as legacy "a b" strings with a "#version" line, with ignore_merges.
        let Some((_t1, reordered)) = variant(name, |s| {
            let merges = s["model"]["merges"].as_array_mut().unwrap();
            let n = merges.len();
            merges[n / 3..2 * n / 3].reverse();
            merges.swap(10, n - 10);
            let dup = merges[5].clone();
            merges.push(dup);
        }) else {
            return;
        };
        assert_variant_identical(&reordered, &texts);
        let (_t2, legacy) = variant(name, |s| {
            let merges = s["model"]["merges"].as_array_mut().unwrap();
            let mut lines = vec![serde_json::json!("#version: 0.2")];
            lines.extend(merges.iter().map(|m| {
                serde_json::json!(format!(
                    "{} {}",
                    m[0].as_str().unwrap(),
                    m[1].as_str().unwrap()
                ))
            }));
            *merges = lines;
        })
        .unwrap();
        assert_variant_identical(&legacy, &texts);
        let (_t3, ignore) = variant(name, |s| s["model"]["ignore_merges"] = true.into()).unwrap();
        assert_variant_identical(&ignore, &texts);
    }
}

#[cfg_attr(not(shared_data), ignore = "needs ../shared/data, absent here")]
#[test]
fn refuses_bpe_options_it_does_not_reproduce() {
    // (option, edit, whether `tokenizers` loads the result: with a prefix it panics on
    // SmolLM2's one-character tokens)
    type Edit = fn(&mut serde_json::Value);
    let cases: [(&str, Edit, bool); 5] = [
        ("dropout", |s| s["model"]["dropout"] = 0.1.into(), true),
        (
            "continuing_subword_prefix",
            |s| s["model"]["continuing_subword_prefix"] = "##".into(),
            false,
        ),
        (
            "end_of_word_suffix",
            |s| s["model"]["end_of_word_suffix"] = "</w>".into(),
            true,
        ),
        (
            "Metaspace prepend_scheme first after another step",
            |s| {
                s["pre_tokenizer"] = serde_json::json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Digits", "individual_digits": true},
                    {"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "first", "split": true}]})
            },
            true,
        ),
        (
            "ByteLevel",
            |s| {
                s["pre_tokenizer"] = serde_json::json!({"type": "Sequence", "pretokenizers": [
                    {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
                    {"type": "Digits", "individual_digits": true}]})
            },
            true,
        ),
    ];
    for (what, edit, hf_loads) in cases {
        let Some((_t, dir)) = variant("smollm2", edit) else {
            return;
        };
        let bytes = std::fs::read(dir.join("tokenizer.json")).unwrap();
        let why = FastBpe::from_json(&bytes).err().expect("must refuse");
        assert!(why.contains(what), "{what}: {why}");
        if !hf_loads {
            continue;
        }
        let auto = TextTokenizer::load_with(&dir, TokenizerBackend::Auto).unwrap();
        assert_eq!(auto.backend(), TokenizerBackend::Hf, "{what}");
        assert!(auto.hf_loaded());
        assert!(auto.fast_refused.as_deref().unwrap().contains(what));
        let err = TextTokenizer::load_with(&dir, TokenizerBackend::Fast)
            .err()
            .expect("fast must refuse");
        assert!(err.to_string().contains(what), "{err}");
    }
    // A file `tokenizers` cannot load fails as before, whatever the backend.
    let Some((_t, dir)) = variant("smollm2", |s| {
        s["model"]["merges"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!(["Ġt", "zzqqxx-not-a-token"]))
    }) else {
        return;
    };
    for backend in [
        TokenizerBackend::Auto,
        TokenizerBackend::Fast,
        TokenizerBackend::Hf,
    ] {
        let err = TextTokenizer::load_with(&dir, backend)
            .err()
            .expect("must fail");
        assert!(err.to_string().contains("cannot load"), "{err}");
    }
}

#[cfg_attr(not(shared_data), ignore = "needs ../shared/data, absent here")]
#[test]
fn hf_is_built_lazily_for_offsets_and_ids_agree() {
    for name in ["qwen3", "smollm2"] {
        let Some((hf, fast)) = pair(name) else { return };
        // token_to_id from the fast path's own tables equals Hugging Face's, added tokens too.
        let hft = hf_bpe(&hf.path);
        let mut probes: Vec<String> = hft
            .get_added_tokens_decoder()
            .values()
            .map(|t| t.content.clone())
            .collect();
        probes.extend(hft.get_vocab(false).into_keys().step_by(97));
        probes.extend(["", "not a token", "<|im_end", "Ġthe", "\u{e9}"].map(String::from));
        for p in &probes {
            assert_eq!(
                hf.token_to_id(p),
                fast.token_to_id(p),
                "{name}: token {p:?}"
            );
        }
        assert!(!fast.hf_loaded(), "token_to_id must not build HF");
        let text = "<|im_start|>user\nHello, café 東京 😀 it's  12345\n<|im_end|>\n";
        assert_eq!(hf.encode(text).unwrap(), fast.encode(text).unwrap());
        assert!(!fast.hf_loaded(), "encode must not build HF");
        // The hf template's offsets come from HF, built now, from every thread at once.
        let want = hf.encode_with_offsets(text).unwrap();
        let got: Vec<_> = (0..8)
            .into_par_iter()
            .map(|_| fast.encode_with_offsets(text).unwrap())
            .collect();
        assert!(fast.hf_loaded());
        assert!(got.iter().all(|g| *g == want));
    }
}

type Edit = fn(&mut serde_json::Value);

fn metaspace(prepend: &str, split: bool) -> serde_json::Value {
    serde_json::json!({"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": prepend, "split": split})
}

fn byte_level(prefix: bool, regex: bool) -> serde_json::Value {
    serde_json::json!({"type": "ByteLevel", "add_prefix_space": prefix, "trim_offsets": true, "use_regex": regex})
}

fn split(pattern: serde_json::Value, behavior: &str, invert: bool) -> serde_json::Value {
    serde_json::json!({"type": "Split", "pattern": pattern, "behavior": behavior, "invert": invert})
}

/// Set the flags of the added token `content`.
fn added_flags(s: &mut serde_json::Value, content: &str, flags: &[(&str, bool)]) {
    let t = s["added_tokens"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|t| t["content"] == content)
        .unwrap_or_else(|| panic!("no added token {content}"));
    for (k, v) in flags {
        t[*k] = (*v).into();
    }
}

/// Add an added token (normalized or not) with the next free id.
fn add_token(s: &mut serde_json::Value, content: &str, normalized: bool, lstrip: bool) {
    let added = s["added_tokens"].as_array_mut().unwrap();
    let id = added
        .iter()
        .map(|t| t["id"].as_u64().unwrap())
        .max()
        .unwrap()
        + 1;
    added.push(
        serde_json::json!({"id": id, "content": content, "single_word": false,
        "lstrip": lstrip, "rstrip": false, "normalized": normalized, "special": false}),
    );
}

/// Every supported step, one variant of a shared tokenizer each: ids equal Hugging Face's on
/// the sample texts (and on texts built around the added tokens the variant changes).
#[cfg_attr(not(shared_data), ignore = "needs ../shared/data, absent here")]
#[test]
fn every_supported_step_as_tokenizers() {
    let Some(mut texts) = sample_texts() else {
        return;
    };
    for t in [
        "a [INST] b [/INST]  c</s> d </s>e\u{2581}[INST]x",
        "  <s> hello </s>  world  [TOOL_CALLS]\n\n[INST]\t",
        "caf\u{e9} cafe\u{301} CAF\u{c9} \u{fb01}ne \u{2460}\u{ff21} Hello hello_world",
        "  <|im_start|>user <|im_end|>  <|endoftext|>x<|endoftext|> y",
    ] {
        for i in 0..50 {
            texts.push(format!("{} {t} {}", i, "word ".repeat(i)));
        }
    }
    let mistral: Vec<(&str, Edit)> = vec![
        ("metaspace first, no split", |s| {
            s["pre_tokenizer"] = metaspace("first", false)
        }),
        ("metaspace always, split", |s| {
            s["pre_tokenizer"] = metaspace("always", true)
        }),
        ("metaspace first, split", |s| {
            s["pre_tokenizer"] = metaspace("first", true)
        }),
        ("metaspace never, split", |s| {
            s["pre_tokenizer"] = metaspace("never", true)
        }),
        ("legacy llama: Prepend + Replace, no pre-tokenizer", |s| {
            s["pre_tokenizer"] = serde_json::Value::Null;
            s["normalizer"] = serde_json::json!({"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": "\u{2581}"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}]});
        }),
        ("NFKC, regex Replace", |s| {
            s["normalizer"] = serde_json::json!({"type": "Sequence", "normalizers": [
                {"type": "NFKC"},
                {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}]});
        }),
        ("punctuation, digits, metaspace", |s| {
            s["pre_tokenizer"] = serde_json::json!({"type": "Sequence", "pretokenizers": [
                {"type": "Punctuation", "behavior": "Isolated"},
                {"type": "Digits", "individual_digits": true},
                metaspace("always", true)]});
        }),
        ("contiguous digits, whitespace split", |s| {
            s["pre_tokenizer"] = serde_json::json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": false},
                {"type": "WhitespaceSplit"},
                metaspace("always", false)]});
        }),
        ("ignore_merges", |s| {
            s["model"]["ignore_merges"] = true.into()
        }),
        ("unknown bytes fused", |s| {
            // Lead bytes of CJK and of most emoji have no token: those chars are unknown.
            let vocab = s["model"]["vocab"].as_object_mut().unwrap();
            for b in ["<0xE4>", "<0xE5>", "<0xE6>", "<0xF0>"] {
                vocab.remove(b);
            }
        }),
        ("unknown bytes not fused", |s| {
            let vocab = s["model"]["vocab"].as_object_mut().unwrap();
            for b in ["<0xE4>", "<0xE5>", "<0xE6>", "<0xF0>"] {
                vocab.remove(b);
            }
            s["model"]["fuse_unk"] = false.into();
        }),
        ("added tokens lstrip, rstrip, single_word", |s| {
            added_flags(s, "[INST]", &[("lstrip", true)]);
            added_flags(s, "[/INST]", &[("rstrip", true)]);
            added_flags(s, "</s>", &[("single_word", true)]);
            added_flags(s, "<s>", &[("lstrip", true), ("rstrip", true)]);
            added_flags(
                s,
                "[TOOL_CALLS]",
                &[("normalized", true), ("single_word", true)],
            );
            add_token(s, "hello", true, false);
            add_token(s, " world", false, true);
        }),
    ];
    let byte_level_variants: Vec<(&str, &str, Edit)> = vec![
        (
            "qwen3",
            "Split Removed (a class run), then GPT-2's regex",
            |s| {
                s["pre_tokenizer"] = serde_json::json!({"type": "Sequence", "pretokenizers": [
                split(serde_json::json!({"Regex": "\\s+"}), "Removed", false),
                byte_level(false, true)]});
            },
        ),
        ("qwen3", "Split MergedWithPrevious, inverted", |s| {
            let p = s["pre_tokenizer"]["pretokenizers"][0]["pattern"].clone();
            s["pre_tokenizer"]["pretokenizers"][0] = split(p, "MergedWithPrevious", true);
        }),
        (
            "qwen3",
            "Split MergedWithNext on a string, then GPT-2's regex",
            |s| {
                s["pre_tokenizer"] = serde_json::json!({"type": "Sequence", "pretokenizers": [
                split(serde_json::json!({"String": " "}), "MergedWithNext", false),
                byte_level(false, true)]});
            },
        ),
        (
            "qwen3",
            "Split Contiguous (Oniguruma), NFKC, normalized added tokens",
            |s| {
                s["pre_tokenizer"] = serde_json::json!({"type": "Sequence", "pretokenizers": [
                split(serde_json::json!({"Regex": "[a-z]+(?=\\s)|\\d"}), "Contiguous", false),
                byte_level(false, false)]});
                s["normalizer"] = serde_json::json!({"type": "NFKC"});
                add_token(s, "caf\u{e9}", true, false);
                add_token(s, "\u{fb01}ne", true, true);
                added_flags(s, "<|im_end|>", &[("normalized", true), ("rstrip", true)]);
            },
        ),
        ("smollm2", "ByteLevel with a prefix space", |s| {
            s["pre_tokenizer"] = byte_level(true, true)
        }),
        (
            "smollm2",
            "byte_fallback without byte tokens (GGUF conversion)",
            |s| s["model"]["byte_fallback"] = true.into(),
        ),
        (
            "smollm2",
            "byte_fallback with byte tokens, unknown token",
            |s| {
                // SmolLM2 lacks some byte-level characters: they fall back to <0x..> tokens.
                let vocab = s["model"]["vocab"].as_object_mut().unwrap();
                let mut next = vocab.len() as u64 + 100;
                for b in 0..=255u8 {
                    if b % 3 != 0 {
                        vocab.insert(format!("<0x{b:02X}>"), next.into());
                        next += 1;
                    }
                }
                s["model"]["byte_fallback"] = true.into();
                s["model"]["unk_token"] = "<|endoftext|>".into();
            },
        ),
        (
            "deepseek-v3",
            "digits and CJK runs only, prefix space",
            |s| {
                let steps = s["pre_tokenizer"]["pretokenizers"].as_array_mut().unwrap();
                steps.remove(2);
                steps[2] = byte_level(true, false);
            },
        ),
    ];
    let mut cases: Vec<(&str, &str, Edit)> = mistral
        .into_iter()
        .map(|(w, e)| ("mistral-v3", w, e))
        .collect();
    cases.extend(byte_level_variants);
    for (name, what, edit) in cases {
        let Some((_t, dir)) = variant(name, edit) else {
            return;
        };
        let fast = TextTokenizer::load_with(&dir, TokenizerBackend::Fast)
            .unwrap_or_else(|e| panic!("{name} {what}: {e}"));
        let hf = TextTokenizer::load_with(&dir, TokenizerBackend::Hf).unwrap();
        let n = assert_same(&hf, &fast, &texts);
        eprintln!("{name} {what}: {n} tokens identical");
        assert!(n > 100_000, "{name} {what}: only {n} tokens compared");
    }
}

/// Ids `BPE::tokenize` gives for a piece spelled as it is (SentencePiece-style models).
fn hf_piece_chars(bpe: &BPE, piece: &str) -> Vec<u32> {
    bpe.tokenize(piece).unwrap().iter().map(|t| t.id).collect()
}

/// Words of Metaspace text: runs of `▁`, letters, CJK (byte fallback), rare chars.
fn metaspace_word() -> impl Strategy<Value = String> {
    prop_oneof![
        "\u{2581}{0,3}[a-zA-Z]{1,10}",
        "\u{2581}{1,6}",
        "\u{2581}?[\u{4e00}-\u{9fff}\u{ac00}-\u{d7a3}]{1,4}",
        "\u{2581}?[!-/:-@\\[-`{-~0-9]{1,4}",
        "\u{2581}?\\PC{1,3}",
        "[\n\t\r]{1,2}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// The SentencePiece-style model (characters, byte fallback, unknown token) equals
    /// `BPE::tokenize` on single words and on long words cut at their `▁`s.
    #[cfg_attr(not(shared_data), ignore = "needs ../shared/data, absent here")]
    #[test]
    fn char_merges_equal_bpe_tokenize(words in proptest::collection::vec(metaspace_word(), 1..80)) {
        thread_local! {
            static MODEL: Option<(TextTokenizer, tokenizers::Tokenizer)> =
                shared("tokenizers/mistral-v3").map(|dir| {
                    let fast = TextTokenizer::load_with(&dir, TokenizerBackend::Fast).unwrap();
                    let hf = hf_bpe(&dir.join("tokenizer.json"));
                    (fast, hf)
                });
        }
        MODEL.with(|m| {
            let Some((fast, hf)) = m else { return Ok(()) };
            let fast = fast.fast().unwrap();
            for piece in [words[0].clone(), words.concat()] {
                let want = hf_piece_chars(bpe_of(hf), &piece);
                prop_assert_eq!(&want, &fast.tokenize_piece(piece.as_bytes()), "piece {:?}", piece);
            }
            Ok(())
        })?;
    }

    /// DeepSeek-V3's third pattern: the scanner finds Oniguruma's matches.
    #[test]
    fn deepseek_scanner_equals_oniguruma(t in text(), u in "\\PC{0,40}") {
        thread_local! {
            static RE: onig::Regex = onig::Regex::new(DEEPSEEK3_PATTERN).unwrap();
        }
        RE.with(|re| {
            for s in [&t, &u] {
                let want: Vec<(usize, usize)> = re.find_iter(s).collect();
                let mut got = Vec::new();
                let mut i = 0;
                while i < s.len() {
                    match Splitter::DeepSeek3.match_at(s, i) {
                        Some(j) => {
                            got.push((i, j));
                            i = j;
                        }
                        None => i += s[i..].chars().next().unwrap().len_utf8(),
                    }
                }
                prop_assert_eq!(want, got, "text {:?}", s);
            }
            Ok(())
        })?;
    }
}

#[cfg_attr(not(shared_data), ignore = "needs ../shared/data, absent here")]
#[test]
fn deepseek_patterns_run_without_oniguruma() {
    let Some(dir) = shared("tokenizers/deepseek-v3") else {
        return;
    };
    let spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("tokenizer.json")).unwrap()).unwrap();
    let steps = spec["pre_tokenizer"]["pretokenizers"].as_array().unwrap();
    let re = |i: usize| steps[i]["pattern"]["Regex"].as_str().unwrap().to_string();
    assert_eq!(Splitter::from_pattern(&re(2)), Some(Splitter::DeepSeek3));
    for i in 0..2 {
        let m = packer::internals::tokenize::Matcher::from_regex(&re(i)).unwrap();
        assert!(
            matches!(m, packer::internals::tokenize::Matcher::Class { .. }),
            "{}: {m:?}",
            re(i)
        );
    }
    // Every code point through the class runs and the scanner, against Oniguruma.
    let all: String = (0..0x11_0000u32).filter_map(char::from_u32).collect();
    for i in 0..3 {
        let m = packer::internals::tokenize::Matcher::from_regex(&re(i)).unwrap();
        let onig = onig::Regex::new(&re(i)).unwrap();
        let mut got = Vec::new();
        m.find_matches(&all, &mut got);
        let got: Vec<(usize, usize)> = got.iter().filter(|x| x.2).map(|x| (x.0, x.1)).collect();
        let want: Vec<(usize, usize)> = onig.find_iter(&all).collect();
        assert!(got == want, "pattern {i} differs from Oniguruma");
    }
}
