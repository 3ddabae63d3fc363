//! The fast byte-level BPE path gives the `tokenizers` crate's ids on tokenizers trained here,
//! with the `tokenizers` crate's own BPE trainer, on generated text — so the identity is
//! checked on every clone, with or without `../shared/data` (tests/fastbpe_identity.rs adds
//! the real tokenizers and corpora where they exist). Two pre-tokenizer layouts: GPT-2's
//! (`ByteLevel` with its regex, as SmolLM2) and Qwen2's (`Split` + `ByteLevel` without one).

use std::path::Path;

use packer::chat::TextTokenizer;
use packer::internals::tokenize::QWEN2_PATTERN;
use packer::TokenizerBackend;
use proptest::prelude::*;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, DecoderWrapper, SplitDelimiterBehavior, TokenizerBuilder};

const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

const WORDS: [&str; 40] = [
    "the",
    "cat",
    "likes",
    "red",
    "apples",
    "in",
    "morning",
    "neighbour",
    "builds",
    "old",
    "songs",
    "at",
    "market",
    "robot",
    "paints",
    "tiny",
    "boats",
    "near",
    "sea",
    "teacher",
    "it's",
    "we'll",
    "I'M",
    "don't",
    "café",
    "naïve",
    "東京",
    "데이터",
    "мир",
    "😀",
    "١٢٣",
    "e\u{301}",
    "HTTP",
    "x86_64",
    "fn()",
    "a+b=c",
    "--flag",
    "3.14",
    "1,000",
    "\t",
]; // fmt: skip

/// A small deterministic generator (xorshift64*), so the corpus is the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// `n` lines of words, numbers, punctuation, whitespace runs, newlines and (rarely) special
/// tokens inside the text.
fn corpus(n: usize, seed: u64) -> Vec<String> {
    let mut rng = Rng(seed | 1);
    let seps = [
        " ", " ", " ", "  ", "\n", " \n\n ", ", ", ". ", "'", "\r\n", "   ",
    ];
    (0..n)
        .map(|_| {
            let mut line = String::new();
            for _ in 0..1 + rng.below(40) {
                match rng.below(20) {
                    0 => line.push_str(&rng.next().to_string()[..1 + rng.below(6)]),
                    1 => line.push_str(SPECIALS[rng.below(3)]),
                    _ => line.push_str(WORDS[rng.below(WORDS.len())]),
                }
                line.push_str(seps[rng.below(seps.len())]);
            }
            line
        })
        .collect()
}

/// Train a byte-level BPE on `texts` with the `tokenizers` trainer and write `tokenizer.json`
/// (+ `tokenizer_config.json`) into `dir`. `qwen2_split`: Qwen2's `Split` then `ByteLevel`
/// without a regex; otherwise `ByteLevel` with GPT-2's regex.
fn train(dir: &Path, texts: &[String], qwen2_split: bool) {
    let byte_level = ByteLevel::new(false, true, !qwen2_split);
    let pre: PreTokenizerWrapper = if qwen2_split {
        let split = Split::new(
            SplitPattern::Regex(QWEN2_PATTERN.into()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .unwrap();
        Sequence::new(vec![split.into(), byte_level.into()]).into()
    } else {
        byte_level.into()
    };
    let mut tok = TokenizerBuilder::<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(BPE::default())
    .with_pre_tokenizer(Some(pre))
    .with_decoder(Some(ByteLevelDecoder::default().into()))
    .build()
    .unwrap();
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(600)
        .min_frequency(2)
        .show_progress(false)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .special_tokens(
            SPECIALS
                .iter()
                .map(|s| AddedToken::from(*s, true))
                .collect(),
        )
        .build();
    tok.train(&mut trainer, texts.iter()).unwrap();
    tok.save(dir.join("tokenizer.json"), false).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"bos_token": null, "eos_token": "<|im_end|>"}"#,
    )
    .unwrap();
}

/// (hf, fast) for a tokenizer trained here; the fast path must accept it.
fn pair(qwen2_split: bool) -> (tempfile::TempDir, TextTokenizer, TextTokenizer) {
    let dir = tempfile::tempdir().unwrap();
    train(dir.path(), &corpus(3000, 7), qwen2_split);
    let hf = TextTokenizer::load_with(dir.path(), TokenizerBackend::Hf).unwrap();
    let fast = TextTokenizer::load_with(dir.path(), TokenizerBackend::Fast).unwrap();
    assert_eq!(fast.backend(), TokenizerBackend::Fast);
    assert!(
        !fast.hf_loaded(),
        "the fast path built the HF tokenizer at load"
    );
    (dir, hf, fast)
}

fn assert_same(hf: &TextTokenizer, fast: &TextTokenizer, texts: &[String]) -> usize {
    let mut n = 0;
    for t in texts {
        let want = hf.encode(t).unwrap();
        let got = fast.encode(t).unwrap();
        assert!(
            want == got,
            "ids differ for {t:?}\n  hf:   {want:?}\n  fast: {got:?}"
        );
        n += want.len();
    }
    n
}

#[test]
fn identical_ids_on_generated_text_gpt2_layout() {
    let (_d, hf, fast) = pair(false);
    // Unseen text from another seed: merges apply to pieces the trainer never saw whole.
    let n = assert_same(&hf, &fast, &corpus(4000, 99));
    assert!(n > 100_000, "only {n} tokens compared");
}

#[test]
fn identical_ids_on_generated_text_qwen2_layout() {
    let (_d, hf, fast) = pair(true);
    let n = assert_same(&hf, &fast, &corpus(4000, 99));
    assert!(n > 100_000, "only {n} tokens compared");
}

/// (hf, fast) for a copy of tokenizer `dir` changed by `edit`.
fn variant(
    dir: &Path,
    edit: impl FnOnce(&mut serde_json::Value),
) -> (tempfile::TempDir, TextTokenizer, TextTokenizer) {
    let mut spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("tokenizer.json")).unwrap()).unwrap();
    edit(&mut spec);
    let out = tempfile::tempdir().unwrap();
    std::fs::write(
        out.path().join("tokenizer.json"),
        serde_json::to_vec(&spec).unwrap(),
    )
    .unwrap();
    std::fs::copy(
        dir.join("tokenizer_config.json"),
        out.path().join("tokenizer_config.json"),
    )
    .unwrap();
    let hf = TextTokenizer::load_with(out.path(), TokenizerBackend::Hf).unwrap();
    let fast = TextTokenizer::load_with(out.path(), TokenizerBackend::Fast).unwrap();
    assert_eq!(fast.backend(), TokenizerBackend::Fast);
    (out, hf, fast)
}

/// With `ignore_merges`, a piece that is a vocabulary token is that token whatever the merges
/// would make of it; the fast path answers those from its table of one-token pieces and merges
/// the others without looking them up again. The merges are listed in reverse, so that many
/// tokens are not what their own merges give: the flag must change the ids of some texts.
#[test]
fn identical_ids_with_ignore_merges() {
    let (dir, _, _) = pair_cached(true);
    let reverse = |s: &mut serde_json::Value| {
        s["model"]["merges"].as_array_mut().unwrap().reverse();
    };
    let (_d1, merged_hf, merged_fast) = variant(dir.path(), reverse);
    let (_d2, hf, fast) = variant(dir.path(), |s| {
        reverse(s);
        s["model"]["ignore_merges"] = true.into();
    });
    let texts = corpus(2000, 31);
    assert!(assert_same(&hf, &fast, &texts) > 50_000);
    assert_same(&merged_hf, &merged_fast, &texts);
    let differ = texts
        .iter()
        .filter(|t| hf.encode(t).unwrap() != merged_hf.encode(t).unwrap())
        .count();
    assert!(
        differ > 100,
        "ignore_merges changed the ids of {differ} texts only"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Random Unicode (any printable code point, whitespace, specials) on both layouts.
    #[test]
    fn identical_ids_on_random_unicode(
        texts in proptest::collection::vec("(\\PC|\\s|<\\|im_end\\|>){0,60}", 1..20)
    ) {
        for qwen2 in [false, true] {
            let (_d, hf, fast) = pair_cached(qwen2);
            for t in &texts {
                prop_assert_eq!(hf.encode(t).unwrap(), fast.encode(t).unwrap(), "{:?}", t);
            }
        }
    }
}

/// Training takes a moment: the property test shares one pair per layout.
fn pair_cached(qwen2: bool) -> &'static (tempfile::TempDir, TextTokenizer, TextTokenizer) {
    use std::sync::OnceLock;
    static PAIRS: [OnceLock<(tempfile::TempDir, TextTokenizer, TextTokenizer)>; 2] =
        [OnceLock::new(), OnceLock::new()];
    PAIRS[qwen2 as usize].get_or_init(|| pair(qwen2))
}

/// The compiled form cached on disk gives the same ids as the JSON read whole: written on the
/// first load, read back on the second, and a damaged file is rebuilt, not trusted.
#[test]
fn compiled_cache_gives_the_same_ids() {
    use packer::internals::tokenize::FastBpe;
    let (dir, hf, _) = pair_cached(true);
    let json = std::fs::read(dir.path().join("tokenizer.json")).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let file = cache.path().join("sub").join("t.bpe");
    let texts = corpus(300, 5);
    let ids = |fast: &FastBpe| -> Vec<Vec<u32>> {
        texts
            .iter()
            .map(|t| {
                let mut out = Vec::new();
                fast.encode_into(t, &mut out).unwrap();
                out
            })
            .collect()
    };
    let want: Vec<Vec<u32>> = texts.iter().map(|t| hf.encode(t).unwrap()).collect();
    let built = FastBpe::from_json_cache_file(&json, &file).unwrap();
    assert!(file.is_file(), "the compiled form was not written");
    assert_eq!(ids(&built), want);
    let written = std::fs::read(&file).unwrap();
    let read_back = FastBpe::from_json_cache_file(&json, &file).unwrap();
    assert_eq!(ids(&read_back), want);
    assert_eq!(
        std::fs::read(&file).unwrap(),
        written,
        "a good cache was rewritten"
    );
    let mut damaged = written.clone();
    let mid = damaged.len() / 2;
    damaged[mid] ^= 1;
    std::fs::write(&file, &damaged).unwrap();
    let rebuilt = FastBpe::from_json_cache_file(&json, &file).unwrap();
    assert_eq!(ids(&rebuilt), want);
    assert_eq!(
        std::fs::read(&file).unwrap(),
        written,
        "a damaged cache was not rebuilt"
    );
}
