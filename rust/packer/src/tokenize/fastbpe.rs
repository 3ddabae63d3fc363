//! Fast path for byte-level BPE tokenizers (GPT-2, SmolLM2, Llama-3, Qwen2/2.5/3 families),
//! giving the ids of `tokenizers`' `encode(text, add_special_tokens=False)`.
//!
//! Hugging Face's pipeline spends most of its time around the model: offset-tracking
//! normalized strings, the Oniguruma pre-tokenizer, per-token `String`s. This path keeps
//! Hugging Face's steps and their order, and replaces only the machinery:
//!
//! 1. added tokens with `normalized: false` are cut out of the raw text (Aho-Corasick,
//!    leftmost-longest, as `AddedVocabulary` does);
//! 2. each remaining segment is NFC-normalised when the tokenizer says so — only when the
//!    quick check says it is not already NFC, with the same Unicode tables `tokenizers` uses;
//! 3. added tokens with `normalized: true` are cut out of the normalised segments;
//! 4. the pre-tokenizer regex runs as a hand-written scanner ([`super::split`]);
//! 5. each piece is mapped to ids by a per-thread memo, computed on a miss by [`super::bpe`]'s
//!    reimplementation of the `tokenizers` crate's `BPE::tokenize` (the same merge ranks and
//!    order, proven identical by `tests/fastbpe_identity.rs`). Ranks matter: the shared Qwen3
//!    and SmolLM2 vocabularies list one merge per token in token-id order, yet ~143k (Qwen3) and
//!    ~59k (SmolLM2) adjacent token pairs concatenate to a vocabulary token without being a
//!    merge, so a rank-by-token encoder (tiktoken, the `bpe` crate) could merge where Hugging
//!    Face does not.
//!
//! [`FastBpe::from_json`] reads `tokenizer.json` itself (no `tokenizers::Tokenizer` is built, which
//! is most of the load time), accepts a tokenizer only when every step above is provably the one
//! Hugging Face would run and Hugging Face would load it, and otherwise says why not; the caller
//! then falls back to the `tokenizers` crate.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};
use rustc_hash::FxHashMap;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;
use unicode_normalization_alignments::{is_nfc_quick, IsNormalized, UnicodeNormalization};

use super::bpe::{BpeModel, ModelJson, Scratch};
use super::split::{Splitter, GPT2_PATTERN};

/// Pieces longer than this (bytes) are not memoised (long runs of spaces or punctuation).
const MEMO_MAX_PIECE: usize = 128;
/// Memo entries per thread before it stops growing (bounds memory to tens of MB per thread).
const MEMO_CAP: usize = 1 << 18;

/// The sections of `tokenizer.json` that `tokenizers` reads (unknown keys are ignored by both).
/// A key given twice fails here (`tokenizers` would keep the last): the fast path is refused.
#[derive(Deserialize)]
struct TokenizerJson<'a> {
    #[serde(default, borrow)]
    version: Option<&'a RawValue>,
    #[serde(default)]
    truncation: Option<Value>,
    #[serde(default)]
    padding: Option<Value>,
    #[serde(default)]
    added_tokens: Vec<AddedTokenJson>,
    #[serde(default, borrow)]
    normalizer: Option<&'a RawValue>,
    #[serde(default, borrow)]
    pre_tokenizer: Option<&'a RawValue>,
    #[serde(default, borrow)]
    post_processor: Option<&'a RawValue>,
    #[serde(default, borrow)]
    decoder: Option<&'a RawValue>,
    #[serde(default, borrow)]
    model: Option<ModelJson<'a>>,
}

/// [`TokenizerJson`] with the model unread, to say why the file did not read.
#[derive(Deserialize)]
struct ModelUnread<'a> {
    #[serde(default, borrow)]
    model: Option<&'a RawValue>,
}

/// An entry of `added_tokens`, every field required as in `tokenizers`' `AddedTokenWithId`.
/// Its `id` is not used: `tokenizers` gives an added token its vocabulary id, or the next free
/// id from the vocabulary size on ([`added_token_ids`]).
#[derive(Deserialize)]
#[allow(dead_code)]
struct AddedTokenJson {
    id: u32,
    content: String,
    single_word: bool,
    lstrip: bool,
    rstrip: bool,
    normalized: bool,
    special: bool,
}

/// Added tokens of one matching pass.
struct AddedSet {
    matcher: AhoCorasick,
    ids: Vec<u32>,
}

impl AddedSet {
    fn build(pairs: Vec<(String, u32)>) -> Result<Option<AddedSet>, String> {
        if pairs.is_empty() {
            return Ok(None);
        }
        let matcher = AhoCorasickBuilder::new()
            .match_kind(MatchKind::LeftmostLongest)
            .build(pairs.iter().map(|(c, _)| c))
            .map_err(|e| format!("cannot index added tokens: {e}"))?;
        Ok(Some(AddedSet {
            matcher,
            ids: pairs.into_iter().map(|(_, id)| id).collect(),
        }))
    }
}

/// A byte-level BPE tokenizer proven equivalent to its `tokenizers` pipeline.
pub struct FastBpe {
    nfc: bool,
    splitter: Splitter,
    raw_added: Option<AddedSet>,
    normalized_added: Option<AddedSet>,
    /// Added token content → id, as `AddedVocabulary` assigns them.
    added_ids: FxHashMap<String, u32>,
    /// The BPE model: vocabulary, merges, encoder of one piece.
    model: BpeModel,
    /// Identifies this instance in the per-thread memo.
    memo_owner: u64,
}

/// Ids of one memoised piece; most pieces are one token.
enum Ids {
    One(u32),
    Many(Box<[u32]>),
}

/// Per-thread memo of piece bytes → ids for the [`FastBpe`] named by `owner`. Pieces of up
/// to 15 bytes (nearly all) are keyed inline, bytes and length packed in a `u128`, so a hit
/// costs one multiply-hash and one integer compare instead of a `memcmp` (issue 7 profile).
#[derive(Default)]
struct Memo {
    owner: u64,
    short: FxHashMap<u128, Ids>,
    long: FxHashMap<Box<[u8]>, Box<[u32]>>,
    /// Buffers of the BPE merges on a miss.
    scratch: Scratch,
}

impl Memo {
    fn len(&self) -> usize {
        self.short.len() + self.long.len()
    }
}

#[inline]
fn short_key(p: &[u8]) -> Option<u128> {
    if p.len() > 15 {
        return None;
    }
    let mut b = [0u8; 16];
    b[..p.len()].copy_from_slice(p);
    b[15] = p.len() as u8;
    Some(u128::from_le_bytes(b))
}

thread_local! {
    static MEMO: RefCell<Memo> = RefCell::new(Memo::default());
}

fn next_owner() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn field<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.get(key).filter(|x| !x.is_null())
}

fn flag(v: &Value, key: &str, default: bool) -> bool {
    field(v, key).and_then(Value::as_bool).unwrap_or(default)
}

/// Whether the normalizer is NFC (true), absent (false), or something else (Err).
fn check_normalizer(n: Option<&Value>) -> Result<bool, String> {
    let Some(n) = n.filter(|n| !n.is_null()) else {
        return Ok(false);
    };
    match n.get("type").and_then(Value::as_str) {
        Some("NFC") => Ok(true),
        Some("Sequence") => {
            let parts = n
                .get("normalizers")
                .and_then(Value::as_array)
                .ok_or("normalizer Sequence without a list")?;
            match parts.as_slice() {
                [] => Ok(false),
                [one] => check_normalizer(Some(one)),
                _ => Err(format!("normalizer sequence {n} is not NFC alone")),
            }
        }
        _ => Err(format!("normalizer {n} (only none or NFC)")),
    }
}

/// `ByteLevel` with no prefix space; returns its `use_regex`.
fn byte_level(p: &Value) -> Result<bool, String> {
    if p.get("type").and_then(Value::as_str) != Some("ByteLevel") {
        return Err(format!("pre-tokenizer {p} is not ByteLevel"));
    }
    if flag(p, "add_prefix_space", true) {
        return Err("ByteLevel pre-tokenizer with add_prefix_space".into());
    }
    Ok(flag(p, "use_regex", true))
}

fn check_pre_tokenizer(p: Option<&Value>) -> Result<Splitter, String> {
    let p = p
        .filter(|p| !p.is_null())
        .ok_or("no pre-tokenizer (not byte-level)")?;
    let steps: Vec<&Value> = match p.get("type").and_then(Value::as_str) {
        Some("Sequence") => p
            .get("pretokenizers")
            .and_then(Value::as_array)
            .ok_or("pre-tokenizer Sequence without a list")?
            .iter()
            .collect(),
        _ => vec![p],
    };
    match steps.as_slice() {
        [bl] => match byte_level(bl)? {
            true => Ok(Splitter::from_pattern(GPT2_PATTERN).expect("known pattern")),
            false => Err("ByteLevel without a regex: no pre-tokenizer split".into()),
        },
        [split, bl] => {
            if byte_level(bl)? {
                return Err("Split followed by ByteLevel with its own regex".into());
            }
            let ok = split.get("type").and_then(Value::as_str) == Some("Split")
                && split.get("behavior").and_then(Value::as_str) == Some("Isolated")
                && !flag(split, "invert", false);
            if !ok {
                return Err(format!(
                    "pre-tokenizer step {split} is not an isolating Split"
                ));
            }
            let pattern = split
                .get("pattern")
                .and_then(|x| x.get("Regex"))
                .and_then(Value::as_str)
                .ok_or_else(|| format!("Split {split} has no Regex pattern"))?;
            Splitter::from_pattern(pattern)
                .ok_or_else(|| format!("Split pattern {pattern:?} has no fast scanner"))
        }
        _ => Err(format!(
            "pre-tokenizer {p} (expected ByteLevel or Split + ByteLevel)"
        )),
    }
}

/// Parse an optional section as `tokenizers` would (its own types), so that a file it would
/// reject is not accepted here, and as a [`Value`] for the checks above.
fn section<T: serde::de::DeserializeOwned>(
    raw: Option<&RawValue>,
    what: &str,
) -> Result<Option<Value>, String> {
    let Some(raw) = raw.filter(|r| r.get() != "null") else {
        return Ok(None);
    };
    serde_json::from_str::<T>(raw.get()).map_err(|e| format!("{what} not loadable: {e}"))?;
    serde_json::from_str(raw.get())
        .map(Some)
        .map_err(|e| format!("{what}: {e}"))
}

/// Ids `AddedVocabulary::add_tokens` gives `tokens` (added in file order to an empty added
/// vocabulary): a token in the model's vocabulary keeps that id, the others take ids from the
/// vocabulary size on.
fn added_token_ids(tokens: &[AddedTokenJson], model: &BpeModel) -> Vec<u32> {
    let mut next = model.vocab_size() as u32;
    tokens
        .iter()
        .map(|t| {
            model.token_to_id(&t.content).unwrap_or_else(|| {
                next += 1;
                next - 1
            })
        })
        .collect()
}

impl FastBpe {
    /// Build the fast path from the bytes of a `tokenizer.json`, or say why it would not give
    /// the ids the `tokenizers` crate gives (or why that crate might not load it).
    pub fn from_json(json: &[u8]) -> Result<FastBpe, String> {
        // One pass over the file, the model included; only on failure a second one, for why.
        let spec: TokenizerJson = serde_json::from_slice(json).map_err(|e| {
            match serde_json::from_slice::<ModelUnread>(json).map(|u| u.model) {
                Ok(Some(model)) => match BpeModel::from_json(model.get()) {
                    Err(why) => why,
                    Ok(_) => format!("unreadable tokenizer.json: {e}"),
                },
                _ => format!("unreadable tokenizer.json: {e}"),
            }
        })?;
        if let Some(v) = spec.version {
            if v.get() != "\"1.0\"" {
                return Err(format!("tokenizer.json version {}", v.get()));
            }
        }
        if spec.truncation.as_ref().is_some_and(|v| !v.is_null())
            || spec.padding.as_ref().is_some_and(|v| !v.is_null())
        {
            return Err("tokenizer.json sets truncation or padding".into());
        }
        let normalizer = section::<tokenizers::NormalizerWrapper>(spec.normalizer, "normalizer")?;
        let pre_tokenizer =
            section::<tokenizers::PreTokenizerWrapper>(spec.pre_tokenizer, "pre-tokenizer")?;
        section::<tokenizers::PostProcessorWrapper>(spec.post_processor, "post-processor")?;
        section::<tokenizers::DecoderWrapper>(spec.decoder, "decoder")?;
        let nfc = check_normalizer(normalizer.as_ref())?;
        let splitter = check_pre_tokenizer(pre_tokenizer.as_ref())?;
        let model = BpeModel::from_parsed(spec.model.ok_or("tokenizer.json has no model")?)?;

        let ids = added_token_ids(&spec.added_tokens, &model);
        let (mut raw, mut normalized) = (Vec::new(), Vec::new());
        let mut added_ids = FxHashMap::default();
        let mut seen_ids = std::collections::HashSet::new();
        let mut seen_normalized = std::collections::HashSet::new();
        for (t, id) in spec.added_tokens.into_iter().zip(ids) {
            if t.single_word || t.lstrip || t.rstrip {
                return Err(format!(
                    "added token {:?} uses single_word/lstrip/rstrip",
                    t.content
                ));
            }
            if t.content.is_empty() || added_ids.insert(t.content.clone(), id).is_some() {
                return Err(format!("added token {:?} is empty or repeated", t.content));
            }
            // `AddedVocabulary` keeps one token per id, and one id per pattern of a pass.
            if !seen_ids.insert(id) {
                return Err(format!("added token {:?} shares id {id}", t.content));
            }
            if t.normalized {
                // AddedVocabulary matches these on normalised text, by normalised content.
                let content = if nfc {
                    nfc_string(&t.content)
                } else {
                    t.content
                };
                if !seen_normalized.insert(content.clone()) {
                    return Err(format!("added token {content:?} normalises like another"));
                }
                normalized.push((content, id));
            } else {
                raw.push((t.content, id));
            }
        }
        Ok(FastBpe {
            nfc,
            splitter,
            raw_added: AddedSet::build(raw)?,
            normalized_added: AddedSet::build(normalized)?,
            added_ids,
            model,
            memo_owner: next_owner(),
        })
    }

    /// Id of a token string as `Tokenizer::token_to_id` gives it: added tokens first, then the
    /// model's vocabulary (both complete here, so `None` is `tokenizers`' answer too).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.added_ids
            .get(token)
            .copied()
            .or_else(|| self.model.token_to_id(token))
    }

    /// The BPE model alone: ids of one pre-tokenized piece (raw bytes), as `tokenizers`'
    /// `BPE::tokenize` gives them for its byte-level spelling. Not memoised.
    pub fn tokenize_piece(&self, piece: &[u8]) -> Vec<u32> {
        let mut out = Vec::new();
        self.model
            .tokenize_into(piece, &mut Scratch::default(), &mut out);
        out
    }

    /// Append the ids of `text` (no special tokens added) to `out`.
    pub fn encode_into(&self, text: &str, out: &mut Vec<u32>) -> Result<(), String> {
        MEMO.with(|cell| {
            let mut memo = cell.borrow_mut();
            if memo.owner != self.memo_owner {
                *memo = Memo {
                    owner: self.memo_owner,
                    ..Memo::default()
                };
            }
            let mut run = Run {
                fast: self,
                memo: &mut memo,
                out,
            };
            run.split_added(self.raw_added.as_ref(), text, Run::segment)
        })
    }
}

/// One `encode_into` call: the steps of the module doc, each a method.
struct Run<'a> {
    fast: &'a FastBpe,
    memo: &'a mut Memo,
    out: &'a mut Vec<u32>,
}

impl Run<'_> {
    /// Steps 1 and 3: added tokens become their ids, the text between them goes to `seg`.
    fn split_added(
        &mut self,
        set: Option<&AddedSet>,
        text: &str,
        seg: fn(&mut Self, &str) -> Result<(), String>,
    ) -> Result<(), String> {
        let Some(set) = set else {
            return seg(self, text);
        };
        let mut last = 0;
        for m in set.matcher.find_iter(text) {
            if m.start() > last {
                seg(self, &text[last..m.start()])?;
            }
            self.out.push(set.ids[m.pattern().as_usize()]);
            last = m.end();
        }
        if last < text.len() {
            seg(self, &text[last..])?;
        }
        Ok(())
    }

    /// Step 2: NFC (Hugging Face normalises each segment between raw added tokens).
    fn segment(&mut self, s: &str) -> Result<(), String> {
        let fast = self.fast;
        if fast.nfc && !s.is_ascii() && is_nfc_quick(s.chars()) != IsNormalized::Yes {
            let s = nfc_string(s);
            self.split_added(fast.normalized_added.as_ref(), &s, Run::pre_tokenize)
        } else {
            self.split_added(fast.normalized_added.as_ref(), s, Run::pre_tokenize)
        }
    }

    /// Step 4: the pre-tokenizer's pieces.
    fn pre_tokenize(&mut self, s: &str) -> Result<(), String> {
        for p in self.fast.splitter.pieces(s) {
            self.piece(p.as_bytes())?;
        }
        Ok(())
    }

    /// Step 5: a piece's ids, memoised per thread.
    fn piece(&mut self, p: &[u8]) -> Result<(), String> {
        let key = short_key(p);
        match key {
            Some(k) => match self.memo.short.get(&k) {
                Some(Ids::One(id)) => {
                    self.out.push(*id);
                    return Ok(());
                }
                Some(Ids::Many(ids)) => {
                    self.out.extend_from_slice(ids);
                    return Ok(());
                }
                None => {}
            },
            None => {
                if let Some(ids) = self.memo.long.get(p) {
                    self.out.extend_from_slice(ids);
                    return Ok(());
                }
            }
        }
        let start = self.out.len();
        self.fast
            .model
            .tokenize_into(p, &mut self.memo.scratch, self.out);
        if self.memo.len() < MEMO_CAP {
            let ids = &self.out[start..];
            match key {
                Some(k) => {
                    let v = match ids {
                        [one] => Ids::One(*one),
                        many => Ids::Many(many.into()),
                    };
                    self.memo.short.insert(k, v);
                }
                None if p.len() <= MEMO_MAX_PIECE => {
                    self.memo.long.insert(p.into(), ids.into());
                }
                None => {}
            }
        }
        Ok(())
    }
}

fn nfc_string(s: &str) -> String {
    s.nfc().map(|(c, _)| c).collect()
}
