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
//! 5. each piece is mapped to ids by a per-thread memo of the BPE model's own answers, asking
//!    the `tokenizers` crate's `BPE::tokenize` on a miss. The merges themselves are therefore
//!    Hugging Face's, whatever the vocabulary: the shared Qwen3 and SmolLM2 vocabularies list
//!    one merge per token in token-id order, yet ~143k (Qwen3) and ~59k (SmolLM2) adjacent
//!    token pairs concatenate to a vocabulary token without being a merge, so a rank-by-token
//!    encoder (tiktoken, the `bpe` crate) could merge where Hugging Face does not.
//!
//! [`FastBpe::from_tokenizer`] accepts a tokenizer only when every step above is provably the
//! one Hugging Face would run, and otherwise says why not; the caller then falls back to the
//! `tokenizers` crate.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};
use rustc_hash::FxHashMap;
use serde::Deserialize;
use serde_json::Value;
use tokenizers::models::bpe::BPE;
use tokenizers::models::ModelWrapper;
use tokenizers::Model as _;
use unicode_normalization_alignments::{is_nfc_quick, IsNormalized, UnicodeNormalization};

use super::split::{Splitter, GPT2_PATTERN};

/// Pieces longer than this (bytes) are not memoised (long runs of spaces or punctuation).
const MEMO_MAX_PIECE: usize = 128;
/// Memo entries per thread before it stops growing (bounds memory to tens of MB per thread).
const MEMO_CAP: usize = 1 << 18;

/// The parts of `tokenizer.json` that decide eligibility (the vocabulary is skipped unparsed).
#[derive(Deserialize)]
struct TokenizerJson {
    #[serde(default)]
    added_tokens: Vec<AddedTokenJson>,
    #[serde(default)]
    normalizer: Option<Value>,
    #[serde(default)]
    pre_tokenizer: Option<Value>,
    #[serde(default)]
    truncation: Option<Value>,
    #[serde(default)]
    padding: Option<Value>,
}

#[derive(Deserialize)]
struct AddedTokenJson {
    id: u32,
    content: String,
    #[serde(default)]
    single_word: bool,
    #[serde(default)]
    lstrip: bool,
    #[serde(default)]
    rstrip: bool,
    #[serde(default = "yes")]
    normalized: bool,
}

fn yes() -> bool {
    true
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
    /// GPT-2's byte → printable char map (what `ByteLevel` feeds the model).
    byte_char: [char; 256],
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

/// GPT-2's `bytes_to_unicode`: printable bytes map to themselves, the rest to U+0100 onwards.
fn bytes_to_chars() -> [char; 256] {
    let mut out = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        out[b as usize] = if printable {
            b as char
        } else {
            next += 1;
            char::from_u32(next - 1).expect("U+0100..U+0143 are chars")
        };
    }
    out
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

impl FastBpe {
    /// Build the fast path for a loaded tokenizer and the bytes of its `tokenizer.json`,
    /// or say why it would not give the same ids.
    pub fn from_tokenizer(hf: &tokenizers::Tokenizer, json: &[u8]) -> Result<FastBpe, String> {
        let bpe = bpe_model(hf).ok_or("the model is not BPE")?;
        if bpe.dropout.is_some_and(|d| d > 0.0) {
            return Err("BPE dropout is random".into());
        }
        let spec: TokenizerJson =
            serde_json::from_slice(json).map_err(|e| format!("unreadable tokenizer.json: {e}"))?;
        if spec.truncation.is_some() || spec.padding.is_some() {
            return Err("tokenizer.json sets truncation or padding".into());
        }
        let nfc = check_normalizer(spec.normalizer.as_ref())?;
        let splitter = check_pre_tokenizer(spec.pre_tokenizer.as_ref())?;
        let (mut raw, mut normalized) = (Vec::new(), Vec::new());
        let mut seen = std::collections::HashSet::new();
        for t in spec.added_tokens {
            if t.single_word || t.lstrip || t.rstrip {
                return Err(format!(
                    "added token {:?} uses single_word/lstrip/rstrip",
                    t.content
                ));
            }
            if t.content.is_empty() || !seen.insert(t.content.clone()) {
                return Err(format!("added token {:?} is empty or repeated", t.content));
            }
            if t.normalized {
                // AddedVocabulary matches these on normalised text, by normalised content.
                let content = if nfc {
                    nfc_string(&t.content)
                } else {
                    t.content
                };
                normalized.push((content, t.id));
            } else {
                raw.push((t.content, t.id));
            }
        }
        Ok(FastBpe {
            nfc,
            splitter,
            raw_added: AddedSet::build(raw)?,
            normalized_added: AddedSet::build(normalized)?,
            byte_char: bytes_to_chars(),
            memo_owner: next_owner(),
        })
    }

    /// Append the ids of `text` (no special tokens added) to `out`. `hf` is the tokenizer this
    /// path was built from; its BPE model answers pieces not memoised yet.
    pub fn encode_into(
        &self,
        hf: &tokenizers::Tokenizer,
        text: &str,
        out: &mut Vec<u32>,
    ) -> Result<(), String> {
        let bpe = bpe_model(hf).ok_or("the model is not BPE")?;
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
                bpe,
                memo: &mut memo,
                out,
                word: String::new(),
            };
            run.split_added(self.raw_added.as_ref(), text, Run::segment)
        })
    }
}

/// One `encode_into` call: the steps of the module doc, each a method.
struct Run<'a> {
    fast: &'a FastBpe,
    bpe: &'a BPE,
    memo: &'a mut Memo,
    out: &'a mut Vec<u32>,
    /// Scratch: a piece spelled in byte-level chars.
    word: String,
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
        self.word.clear();
        self.word
            .extend(p.iter().map(|&b| self.fast.byte_char[b as usize]));
        let tokens = self
            .bpe
            .tokenize(&self.word)
            .map_err(|e| format!("tokenizer failed: {e}"))?;
        let start = self.out.len();
        self.out.extend(tokens.iter().map(|t| t.id));
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

fn bpe_model(hf: &tokenizers::Tokenizer) -> Option<&BPE> {
    match hf.get_model() {
        ModelWrapper::BPE(b) => Some(b),
        _ => None,
    }
}
