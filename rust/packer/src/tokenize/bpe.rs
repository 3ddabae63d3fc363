//! The `model` section of a BPE `tokenizer.json`, read without the `tokenizers` crate, and
//! Hugging Face's BPE merge algorithm over it.
//!
//! Loading Qwen3's 151k-token vocabulary through `tokenizers::Tokenizer::from_bytes` takes
//! ~0.3 s, most of it building `serde_json::Value` trees for the model and rehashing them; here
//! the model is read in the same pass as the rest of the file: the vocabulary into one string
//! arena and a hash table (no allocation per token), and each merge (an `"a b"` string or an
//! `["a", "b"]` pair) resolved to ids as it is read, borrowed from the file.
//!
//! [`BpeModel::tokenize_into`] reproduces `tokenizers`' `BPE::tokenize` (0.23,
//! `models/bpe/model.rs` `merge_word` and `word.rs` `merge_all`) for the models
//! [`BpeModel::from_json`] accepts:
//!
//! - with `ignore_merges`, a whole piece that is a vocabulary token is that token;
//! - otherwise each character of the piece (each byte's byte-level character when the
//!   pre-tokenizer ends with `ByteLevel`) starts as its vocabulary token; failing that, with
//!   `byte_fallback`, as the `<0xAB>` tokens of its UTF-8 bytes when all exist; failing that,
//!   as the unknown token (consecutive ones fused with `fuse_unk`), or as nothing without an
//!   `unk_token` (SmolLM2 lacks a few control bytes: their neighbours become adjacent);
//! - then the adjacent pair with the lowest merge rank (its index in the merges list; a pair
//!   listed twice keeps the later index), leftmost among equals, is merged into the token of the
//!   concatenation, repeatedly, through a min-heap of (rank, position) whose stale entries are
//!   skipped by the same check Hugging Face makes (the pair now at that position must merge to
//!   the entry's token): O(n log n) in the length of the word.
//!
//! Refused, with the reason: models other than BPE, dropout, a `continuing_subword_prefix` or
//! `end_of_word_suffix` other than empty, and an `unk_token` missing from the vocabulary.

use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt;
use std::hash::BuildHasher;
use std::marker::PhantomData;

use hashbrown::HashTable;
use rustc_hash::FxBuildHasher;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use super::piece_table::{PairTable, NO_PAIR};

/// GPT-2's `bytes_to_unicode`: printable bytes map to themselves, the rest to U+0100 onwards.
pub fn bytes_to_chars() -> [char; 256] {
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

/// A string from the JSON, borrowed when it holds no escapes.
struct Str<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Str<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Str<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Str(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Str(Cow::Owned(v.to_string())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Str(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V(PhantomData))
    }
}

/// The vocabulary, token → id: the tokens' bytes in one arena and a hash table of
/// (offset, length, id), so that reading 151k tokens costs no allocation per token.
#[derive(Default)]
pub(super) struct Vocab {
    arena: String,
    table: HashTable<(u32, u32, u32)>,
}

impl Vocab {
    #[inline]
    fn hash(s: &str) -> u64 {
        FxBuildHasher.hash_one(s)
    }

    #[inline]
    fn key<'s>(arena: &'s str, e: &(u32, u32, u32)) -> &'s str {
        &arena[e.0 as usize..(e.0 + e.1) as usize]
    }

    /// Id of `token`.
    #[inline]
    pub(super) fn get(&self, token: &str) -> Option<u32> {
        self.table
            .find(Self::hash(token), |e| Self::key(&self.arena, e) == token)
            .map(|e| e.2)
    }

    /// Insert or, for a token given twice, replace (a serde map keeps the last value).
    fn insert(&mut self, token: &str, id: u32) -> Result<(), String> {
        let h = Self::hash(token);
        let Vocab { arena, table } = self;
        if let Some(e) = table.find_mut(h, |e| Self::key(arena, e) == token) {
            e.2 = id;
            return Ok(());
        }
        let start = u32::try_from(arena.len()).map_err(|_| "vocabulary over 4 GB")?;
        arena.push_str(token);
        table.insert_unique(h, (start, token.len() as u32, id), |e| {
            Self::hash(Self::key(arena, e))
        });
        Ok(())
    }

    /// Number of distinct tokens.
    fn len(&self) -> usize {
        self.table.len()
    }

    /// Every (token, id).
    fn iter(&self) -> impl Iterator<Item = (&str, u32)> + '_ {
        self.table.iter().map(|e| (Self::key(&self.arena, e), e.2))
    }

    /// The arena and every (offset, length, id) in it: what [`Vocab::from_parts`] takes.
    pub(super) fn parts(&self) -> (&str, impl Iterator<Item = (u32, u32, u32)> + '_) {
        (&self.arena, self.table.iter().copied())
    }

    /// A vocabulary from [`Vocab::parts`]; `None` if an entry is not a whole-char range of the
    /// arena or a token is given twice.
    pub(super) fn from_parts(
        arena: String,
        entries: impl ExactSizeIterator<Item = (u32, u32, u32)>,
    ) -> Option<Vocab> {
        let mut table = HashTable::with_capacity(entries.len());
        for (off, len, id) in entries {
            let token = arena.get(off as usize..off.checked_add(len)? as usize)?;
            let h = Self::hash(token);
            if table.find(h, |e| Self::key(&arena, e) == token).is_some() {
                return None;
            }
            table.insert_unique(h, (off, len, id), |e| Self::hash(Self::key(&arena, e)));
        }
        Some(Vocab { arena, table })
    }
}

impl<'de> Deserialize<'de> for Vocab {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Vocab;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map of token to id")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Vocab, A::Error> {
                let mut out = Vocab::default();
                out.table.reserve(1 << 16, |_| 0);
                out.arena.reserve(1 << 20);
                while let Some((k, v)) = map.next_entry::<Str<'de>, u32>()? {
                    out.insert(&k.0, v).map_err(de::Error::custom)?;
                }
                Ok(out)
            }
        }
        d.deserialize_map(V)
    }
}

/// One entry of `model.merges`.
enum MergeItem<'a> {
    /// `"a b"` (the legacy form).
    Line(Cow<'a, str>),
    /// `["a", "b"]`.
    Pair(Cow<'a, str>, Cow<'a, str>),
}

impl<'de: 'a, 'a> Deserialize<'de> for MergeItem<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = MergeItem<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a merge: \"a b\" or [\"a\", \"b\"]")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(MergeItem::Line(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(MergeItem::Line(Cow::Owned(v.to_string())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(MergeItem::Line(Cow::Owned(v)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let a: Str<'a> = seq
                    .next_element()?
                    .ok_or_else(|| de::Error::invalid_length(0, &self))?;
                let b: Str<'a> = seq
                    .next_element()?
                    .ok_or_else(|| de::Error::invalid_length(1, &self))?;
                if seq.next_element::<IgnoredAny>()?.is_some() {
                    return Err(de::Error::invalid_length(3, &self));
                }
                Ok(MergeItem::Pair(a.0, b.0))
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

#[inline]
fn pair_key(a: u32, b: u32) -> u64 {
    (u64::from(a) << 32) | u64::from(b)
}

/// (left id, right id) → (rank, merged id), built from the merges in file order as `tokenizers`
/// builds its merge map: a "#version" line (legacy form) is not a merge and takes no rank; a
/// pair listed twice keeps its later rank; every token and concatenation must be in the
/// vocabulary; "a b" strings and [a, b] pairs cannot be mixed.
#[derive(Default)]
pub(super) struct MergeMap {
    map: PairTable,
    rank: u32,
    lines: bool,
    pairs: bool,
    joined: String,
    /// Some merge joins a left part not ending in `▁` to a right part starting with it (so
    /// a word may not be cut before its `▁`s, see [`BpeModel::boundary`]).
    joins_across_metaspace: bool,
}

impl MergeMap {
    /// A merge map from (pair key, (rank, merged id)) entries, as [`BpeModel::tables`] gives
    /// them.
    pub(super) fn from_entries(map: PairTable, joins_across_metaspace: bool) -> Self {
        MergeMap {
            map,
            joins_across_metaspace,
            ..MergeMap::default()
        }
    }

    fn add(&mut self, vocab: &Vocab, item: &MergeItem) -> Result<(), String> {
        let (a, b) = match item {
            MergeItem::Pair(a, b) => {
                self.pairs = true;
                (&**a, &**b)
            }
            MergeItem::Line(line) => {
                self.lines = true;
                if line.starts_with("#version") {
                    return Ok(());
                }
                let mut parts = line.split(' ');
                match (parts.next(), parts.next(), parts.next()) {
                    (Some(a), Some(b), None) => (a, b),
                    _ => return Err(format!("merge {line:?} is not two tokens")),
                }
            }
        };
        if self.lines && self.pairs {
            return Err("merges mix \"a b\" strings and [a, b] pairs".into());
        }
        let id = |t: &str| {
            vocab
                .get(t)
                .ok_or_else(|| format!("merge token {t:?} is not in the vocabulary"))
        };
        if b.starts_with(METASPACE) && !a.ends_with(METASPACE) {
            self.joins_across_metaspace = true;
        }
        self.joined.clear();
        self.joined.push_str(a);
        self.joined.push_str(b);
        let key = pair_key(id(a)?, id(b)?);
        let new = id(&self.joined)?;
        if key == NO_PAIR {
            return Err("merge of two tokens with id 4294967295".into());
        }
        self.map.insert(key, (self.rank, new));
        self.rank += 1;
        Ok(())
    }
}

/// `model.merges` as read: resolved while reading when the vocabulary came first (as
/// `tokenizers` writes it), else kept for later.
enum Merges<'a> {
    Resolved(MergeMap),
    Pending(Vec<MergeItem<'a>>),
}

struct MergesSeed<'v, 'a> {
    vocab: Option<&'v Vocab>,
    _p: PhantomData<&'a ()>,
}

impl<'de: 'a, 'a> DeserializeSeed<'de> for MergesSeed<'_, 'a> {
    type Value = Merges<'a>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de: 'a, 'a> Visitor<'de> for MergesSeed<'_, 'a> {
    type Value = Merges<'a>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of merges")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        match self.vocab {
            Some(vocab) => {
                let mut m = MergeMap {
                    map: PairTable::with_capacity(1 << 16),
                    ..MergeMap::default()
                };
                while let Some(item) = seq.next_element::<MergeItem<'a>>()? {
                    m.add(vocab, &item).map_err(de::Error::custom)?;
                }
                Ok(Merges::Resolved(m))
            }
            None => {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Merges::Pending(items))
            }
        }
    }
}

/// The `model` object of `tokenizer.json`, as far as a BPE model goes (read in the same pass
/// as the rest of the file, see `fastbpe`). Unknown keys are ignored, as `tokenizers` does; a
/// key given twice is an error (`tokenizers` would keep the last: the fast path is refused).
#[derive(Default)]
pub(super) struct ModelJson<'a> {
    kind: Option<String>,
    dropout: Option<f32>,
    unk_token: Option<String>,
    continuing_subword_prefix: Option<String>,
    end_of_word_suffix: Option<String>,
    fuse_unk: Option<bool>,
    byte_fallback: Option<bool>,
    ignore_merges: Option<bool>,
    vocab: Option<Vocab>,
    merges: Option<Merges<'a>>,
}

impl<'de: 'a, 'a> Deserialize<'de> for ModelJson<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(ModelVisitor(false, PhantomData))
    }
}

/// The `model` object without its `vocab` and `merges` (skipped unread), for a model whose
/// tables come from the compiled cache ([`ModelJson::with_tables`]).
#[derive(Default)]
pub(super) struct ModelHead<'a>(pub ModelJson<'a>);

impl<'de: 'a, 'a> Deserialize<'de> for ModelHead<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(ModelVisitor(true, PhantomData))
            .map(ModelHead)
    }
}

impl ModelJson<'_> {
    /// This model with its vocabulary and merges given (from the compiled cache).
    pub(super) fn with_tables(mut self, vocab: Vocab, merges: MergeMap) -> Self {
        self.vocab = Some(vocab);
        self.merges = Some(Merges::Resolved(merges));
        self
    }
}

/// Reads a `model` object; `.0`: skip `vocab` and `merges`.
struct ModelVisitor<'a>(bool, PhantomData<&'a ()>);

impl<'de: 'a, 'a> Visitor<'de> for ModelVisitor<'a> {
    type Value = ModelJson<'a>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a tokenizer model")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut m = ModelJson::default();
        let mut seen = std::collections::HashSet::new();
        while let Some(key) = map.next_key::<Str<'de>>()? {
            let key = key.0;
            if !seen.insert(key.clone()) {
                return Err(de::Error::custom(format!("model key {key:?} given twice")));
            }
            match &*key {
                "type" => m.kind = map.next_value()?,
                "dropout" => m.dropout = map.next_value()?,
                "unk_token" => m.unk_token = map.next_value()?,
                "continuing_subword_prefix" => m.continuing_subword_prefix = map.next_value()?,
                "end_of_word_suffix" => m.end_of_word_suffix = map.next_value()?,
                "fuse_unk" => m.fuse_unk = map.next_value()?,
                "byte_fallback" => m.byte_fallback = map.next_value()?,
                "ignore_merges" => m.ignore_merges = map.next_value()?,
                "vocab" | "merges" if self.0 => {
                    map.next_value::<IgnoredAny>()?;
                }
                "vocab" => m.vocab = Some(map.next_value()?),
                "merges" => {
                    let seed = MergesSeed {
                        vocab: m.vocab.as_ref(),
                        _p: PhantomData,
                    };
                    m.merges = Some(map.next_value_seed(seed)?);
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(m)
    }
}

/// SentencePiece's word-boundary mark, which `Metaspace` puts in place of spaces.
pub const METASPACE: char = '\u{2581}';

/// What the model's symbols spell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alphabet {
    /// Each byte of a piece is one byte-level character (GPT-2's `bytes_to_unicode`): the
    /// pre-tokenizer ends with `ByteLevel`.
    ByteLevel,
    /// Each character of a piece is looked up as it is (SentencePiece-style vocabularies).
    Chars,
}

/// The symbols one character (or byte-level character) starts as, as `merge_word` makes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Unit {
    /// The character is a vocabulary token.
    Known(u32),
    /// Not in the vocabulary, but every byte of its UTF-8 is a `<0xAB>` token (`byte_fallback`).
    Bytes([u32; 4], u8),
    /// Neither: the unknown token when there is one, else nothing.
    Unknown,
}

/// A BPE model: vocabulary, merges, and the encoder of one pre-tokenized piece.
pub struct BpeModel {
    /// Token → id (the whole vocabulary, for `token_to_id` and `ignore_merges`).
    vocab: Vocab,
    /// (left id, right id) → (rank, merged id).
    merges: PairTable,
    alphabet: Alphabet,
    /// [`Alphabet::ByteLevel`]: each byte's unit. [`Alphabet::Chars`]: each ASCII char's.
    byte_unit: [Unit; 256],
    /// [`Alphabet::ByteLevel`] with every byte's unit a token: each byte's id (the symbols of a
    /// piece are then its bytes' ids, one each, without [`BpeModel::symbols`]' other cases).
    byte_ids: Option<[u32; 256]>,
    /// Id of each `<0xAB>` token when `byte_fallback` is on ([`NONE`] when absent).
    fallback: Option<[u32; 256]>,
    /// GPT-2's byte → printable char map.
    byte_char: [char; 256],
    ignore_merges: bool,
    unk: Option<u32>,
    fuse_unk: bool,
    /// A character before which a word can be cut when it follows another character, without
    /// changing the merges: `▁` when it is a token and no merge joins a part not ending in `▁`
    /// to one starting with it. A merge across such a cut would need that pair, so each side
    /// merges as it would alone, in the same order; the unknown token cannot fuse across it
    /// (`▁` is known). This keeps the long words of a `Metaspace { split: false }` (or absent)
    /// pre-tokenizer memoisable and their merges short.
    boundary: Option<char>,
    /// Some merge joins a part not ending in `▁` to one starting with it (kept for the cache).
    joins_across_metaspace: bool,
    /// Words of up to [`SCAN_MAX`] symbols may be merged by [`BpeModel::merge_scan`]: no two
    /// tokens share an id and the unknown token (if any) is not empty. Then the merged id of
    /// the pair at a position differs every time that pair changes (its text only grows), so
    /// the heap's stale entries never pass its check, and merging the lowest-ranked,
    /// leftmost adjacent pair each time is exactly what the heap does.
    scan_merges: bool,
}

/// Longest word (in symbols) merged by [`BpeModel::merge_scan`] (a quadratic scan, still
/// cheaper than the heap at this size); longer ones use the heap.
const SCAN_MAX: usize = 64;

/// Reusable buffers for [`BpeModel::tokenize_into`].
#[derive(Default)]
pub struct Scratch {
    word: String,
    ids: Vec<u32>,
    prev: Vec<u32>,
    next: Vec<u32>,
    heap: BinaryHeap<Reverse<(u32, u32, u32)>>,
}

/// "No symbol" in [`Scratch`]'s links, and "no id" in `byte_id`.
const NONE: u32 = u32::MAX;
/// `next` of a symbol merged into its left neighbour (no live symbol has it).
const GONE: u32 = NONE - 1;

impl BpeModel {
    /// Read the `model` object of a `tokenizer.json` (its raw JSON text) for pieces spelled in
    /// `alphabet`, or say why the fast path cannot reproduce it (including anything
    /// `tokenizers` would reject).
    pub fn from_json(model: &str, alphabet: Alphabet) -> Result<BpeModel, String> {
        match serde_json::from_str::<ModelJson>(model) {
            Ok(m) => Self::from_parsed(m, alphabet),
            Err(e) => {
                #[derive(Deserialize)]
                struct Kind {
                    #[serde(rename = "type")]
                    kind: Option<String>,
                }
                match serde_json::from_str::<Kind>(model).map(|k| k.kind) {
                    Ok(Some(kind)) if kind != "BPE" => Err(format!("the model is {kind}, not BPE")),
                    _ => Err(format!("unreadable BPE model: {e}")),
                }
            }
        }
    }

    /// [`BpeModel::from_json`] once the JSON is read.
    pub(super) fn from_parsed(m: ModelJson, alphabet: Alphabet) -> Result<BpeModel, String> {
        match m.kind.as_deref() {
            Some("BPE") => {}
            Some(other) => return Err(format!("the model is {other}, not BPE")),
            None => return Err("the model has no \"type\"".into()),
        }
        if m.dropout.is_some_and(|d| d != 0.0) {
            return Err("BPE dropout is random".into());
        }
        if m.continuing_subword_prefix.is_some_and(|p| !p.is_empty()) {
            return Err("BPE continuing_subword_prefix".into());
        }
        if m.end_of_word_suffix.is_some_and(|p| !p.is_empty()) {
            return Err("BPE end_of_word_suffix".into());
        }
        let (Some(vocab), Some(merges)) = (m.vocab, m.merges) else {
            return Err("BPE model without vocab or merges".into());
        };
        let merges = match merges {
            Merges::Resolved(m) => m,
            Merges::Pending(items) => {
                let mut m = MergeMap::default();
                for item in &items {
                    m.add(&vocab, item)?;
                }
                m
            }
        };
        // `tokenizers` fails the encode that needs an unknown token missing from the
        // vocabulary; the fast path would have to fail the same calls: not done.
        let unk = match &m.unk_token {
            Some(t) => Some(
                vocab
                    .get(t)
                    .ok_or_else(|| format!("BPE unk_token {t:?} is not in the vocabulary"))?,
            ),
            None => None,
        };
        let fallback = (m.byte_fallback == Some(true)).then(|| {
            let mut ids = [NONE; 256];
            for (b, id) in ids.iter_mut().enumerate() {
                *id = vocab.get(&format!("<0x{b:02X}>")).unwrap_or(NONE);
            }
            ids
        });
        let mut model = BpeModel {
            vocab,
            merges: PairTable::default(),
            alphabet,
            byte_unit: [Unit::Unknown; 256],
            byte_ids: None,
            fallback,
            byte_char: bytes_to_chars(),
            ignore_merges: m.ignore_merges.unwrap_or(false),
            unk,
            fuse_unk: m.fuse_unk == Some(true),
            boundary: None,
            joins_across_metaspace: merges.joins_across_metaspace,
            scan_merges: false,
        };
        model.scan_merges = model.ids_distinct()
            && model
                .unk
                .is_none_or(|_| m.unk_token.as_ref().is_some_and(|t| !t.is_empty()));
        let mut buf = [0u8; 4];
        for b in 0..256usize {
            let c = match alphabet {
                Alphabet::ByteLevel => model.byte_char[b],
                Alphabet::Chars if b < 128 => b as u8 as char,
                Alphabet::Chars => continue,
            };
            model.byte_unit[b] = model.unit_of(c.encode_utf8(&mut buf));
        }
        if alphabet == Alphabet::ByteLevel
            && model.byte_unit.iter().all(|u| !matches!(u, Unit::Known(_)))
        {
            return Err("the vocabulary has no byte-level character: not byte-level BPE".into());
        }
        if alphabet == Alphabet::ByteLevel {
            let mut ids = [0u32; 256];
            let all_known = ids.iter_mut().zip(&model.byte_unit).all(|(id, u)| match u {
                Unit::Known(k) => {
                    *id = *k;
                    true
                }
                _ => false,
            });
            model.byte_ids = all_known.then_some(ids);
        }
        if alphabet == Alphabet::Chars
            && !merges.joins_across_metaspace
            && model.vocab.get(METASPACE.encode_utf8(&mut buf)).is_some()
        {
            model.boundary = Some(METASPACE);
        }
        model.merges = merges.map;
        Ok(model)
    }

    /// Whether no two vocabulary tokens share an id.
    fn ids_distinct(&self) -> bool {
        let n = self.vocab.len();
        let mut seen = vec![0u64; n.div_ceil(64) + 1];
        for (_, id) in self.vocab.iter() {
            let id = id as usize;
            if id / 64 >= seen.len() {
                seen.resize(id / 64 + 1, 0);
            }
            let (w, b) = (id / 64, 1u64 << (id % 64));
            if seen[w] & b != 0 {
                return false;
            }
            seen[w] |= b;
        }
        true
    }

    /// The unit of one character (its UTF-8 text), as `merge_word` looks it up.
    fn unit_of(&self, c: &str) -> Unit {
        if let Some(id) = self.vocab.get(c) {
            return Unit::Known(id);
        }
        if let Some(fb) = &self.fallback {
            let mut ids = [NONE; 4];
            if c.bytes().enumerate().all(|(i, b)| {
                ids[i] = fb[b as usize];
                ids[i] != NONE
            }) {
                return Unit::Bytes(ids, c.len() as u8);
            }
        }
        Unit::Unknown
    }

    /// The vocabulary, the merges ((left id, right id) key → (rank, merged id)) and whether a
    /// merge joins across `▁`: what the compiled cache keeps ([`MergeMap::from_entries`]).
    pub(super) fn tables(&self) -> (&Vocab, &PairTable, bool) {
        (&self.vocab, &self.merges, self.joins_across_metaspace)
    }

    /// What the pieces are spelled in.
    pub fn alphabet(&self) -> Alphabet {
        self.alphabet
    }

    /// See the field: the character before which long words may be cut.
    pub fn boundary(&self) -> Option<char> {
        self.boundary
    }

    /// Whether a piece that is a vocabulary token is that token, merges aside.
    pub fn ignore_merges(&self) -> bool {
        self.ignore_merges
    }

    /// Where [`BpeModel::boundary`] (spelled `mark`) cuts `piece`: before each `mark` that
    /// follows another character.
    pub fn cuts<'p>(&self, piece: &'p [u8], mark: &'p [u8]) -> impl Iterator<Item = usize> + 'p {
        let mut i = 0;
        std::iter::from_fn(move || {
            while let Some(k) = find(&piece[i..], mark) {
                let at = i + k;
                i = at + mark.len();
                if at > 0 && !piece[..at].ends_with(mark) {
                    return Some(at);
                }
            }
            None
        })
    }

    /// Call `f(piece, id)` for every piece of at most `max_len` bytes (raw bytes for a
    /// byte-level alphabet) that [`BpeModel::tokenize_into`] encodes as the one vocabulary token
    /// it spells: what a lookup of the whole piece may answer before any merge is tried. A token
    /// that Hugging Face's merges would not rebuild from its own bytes is left out.
    pub(super) fn one_token_pieces(&self, max_len: usize, mut f: impl FnMut(&[u8], u32)) {
        let mut byte_of = [u16::MAX; 0x144];
        for (b, &c) in self.byte_char.iter().enumerate() {
            byte_of[c as usize] = b as u16;
        }
        let (mut raw, mut scratch, mut out) = (Vec::new(), Scratch::default(), Vec::new());
        for (token, id) in self.vocab.iter() {
            raw.clear();
            match self.alphabet {
                Alphabet::Chars => raw.extend_from_slice(token.as_bytes()),
                Alphabet::ByteLevel => {
                    for c in token.chars() {
                        match byte_of.get(c as usize) {
                            Some(&b) if b != u16::MAX => raw.push(b as u8),
                            _ => break,
                        }
                    }
                    if raw.len() != token.chars().count() {
                        continue;
                    }
                }
            }
            if raw.is_empty() || raw.len() > max_len {
                continue;
            }
            out.clear();
            self.tokenize_into(&raw, &mut scratch, &mut out);
            if out == [id] {
                f(&raw, id);
            }
        }
    }

    /// Id of a vocabulary token.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.vocab.get(token)
    }

    /// Number of distinct vocabulary tokens (`Model::get_vocab_size`).
    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    /// The initial symbols of `piece`, as `merge_word` builds them: units in order, the
    /// unknown token for unknown characters (consecutive ones fused into one with `fuse_unk`).
    /// As in `merge_word`, a pending unknown token is written only before the next known
    /// character or at the end, so byte-fallback symbols can come before it.
    fn symbols(&self, piece: &[u8], ids: &mut Vec<u32>) {
        if let Some(byte_ids) = &self.byte_ids {
            ids.extend(piece.iter().map(|&b| byte_ids[b as usize]));
            return;
        }
        let mut pending = false;
        let mut add = |u: Unit, ids: &mut Vec<u32>| match u {
            Unit::Known(id) => {
                if pending {
                    ids.push(self.unk.unwrap_or(NONE));
                    pending = false;
                }
                ids.push(id);
            }
            Unit::Bytes(b, n) => ids.extend_from_slice(&b[..n as usize]),
            Unit::Unknown => {
                if let Some(unk) = self.unk {
                    if pending && !self.fuse_unk {
                        ids.push(unk);
                    }
                    pending = true;
                }
            }
        };
        match self.alphabet {
            Alphabet::ByteLevel => {
                for &b in piece {
                    add(self.byte_unit[b as usize], ids);
                }
            }
            Alphabet::Chars => {
                // Pieces are cut from `str`s at char boundaries.
                let s = std::str::from_utf8(piece).expect("pieces are UTF-8");
                let mut buf = [0u8; 4];
                for c in s.chars() {
                    let u = if c.is_ascii() {
                        self.byte_unit[c as usize]
                    } else {
                        self.unit_of(c.encode_utf8(&mut buf))
                    };
                    add(u, ids);
                }
            }
        }
        if pending {
            ids.push(self.unk.unwrap_or(NONE));
        }
    }

    /// Append the ids `tokenizers`' `BPE::tokenize` gives for `piece` (raw bytes, before the
    /// byte-level mapping when the alphabet is byte-level) to `out`.
    pub fn tokenize_into(&self, piece: &[u8], scratch: &mut Scratch, out: &mut Vec<u32>) {
        if piece.is_empty() {
            return;
        }
        if self.ignore_merges {
            let id = match self.alphabet {
                Alphabet::ByteLevel => {
                    scratch.word.clear();
                    scratch
                        .word
                        .extend(piece.iter().map(|&b| self.byte_char[b as usize]));
                    self.vocab.get(&scratch.word)
                }
                Alphabet::Chars => std::str::from_utf8(piece)
                    .ok()
                    .and_then(|s| self.vocab.get(s)),
            };
            if let Some(id) = id {
                out.push(id);
                return;
            }
        }
        self.merge_unlisted(piece, scratch, out);
    }

    /// [`BpeModel::tokenize_into`] of a non-empty `piece` that is not a vocabulary token (for
    /// [`BpeModel::ignore_merges`], which looks the piece up first: callers that know it is
    /// absent, from a table of the one-token pieces, skip that lookup).
    pub(super) fn merge_unlisted(&self, piece: &[u8], scratch: &mut Scratch, out: &mut Vec<u32>) {
        if let Some(c) = self.boundary {
            let mut buf = [0u8; 4];
            let mark = c.encode_utf8(&mut buf).as_bytes();
            let mut start = 0;
            for at in self.cuts(piece, mark) {
                self.merge_into(&piece[start..at], scratch, out);
                start = at;
            }
            self.merge_into(&piece[start..], scratch, out);
            return;
        }
        self.merge_into(piece, scratch, out);
    }

    /// The merges of one word (`merge_word` and `Word::merge_all`).
    fn merge_into(&self, piece: &[u8], scratch: &mut Scratch, out: &mut Vec<u32>) {
        let Scratch {
            ids,
            prev,
            next,
            heap,
            ..
        } = scratch;
        ids.clear();
        self.symbols(piece, ids);
        let n = ids.len();
        match n {
            0 => return,
            1 => return out.push(ids[0]),
            _ if n <= SCAN_MAX && self.scan_merges => return self.merge_scan(ids, out),
            _ => {}
        }
        prev.clear();
        next.clear();
        heap.clear();
        assert!(n < GONE as usize, "piece of {n} symbols");
        prev.extend((0..n as u32).map(|i| i.wrapping_sub(1)));
        next.extend((1..=n as u32).map(|i| if i as usize == n { NONE } else { i }));
        for i in 0..n - 1 {
            if let Some((rank, new)) = self.merges.get(pair_key(ids[i], ids[i + 1])) {
                heap.push(Reverse((rank, i as u32, new)));
            }
        }
        while let Some(Reverse((_, pos, new))) = heap.pop() {
            let p = pos as usize;
            if next[p] == GONE || next[p] == NONE {
                continue;
            }
            let r = next[p] as usize;
            match self.merges.get(pair_key(ids[p], ids[r])) {
                Some((_, id)) if id == new => {}
                _ => continue,
            }
            ids[p] = new;
            next[p] = next[r];
            next[r] = GONE;
            if next[p] != NONE {
                prev[next[p] as usize] = pos;
            }
            if prev[p] != NONE {
                let q = prev[p] as usize;
                if let Some((rank, id)) = self.merges.get(pair_key(ids[q], ids[p])) {
                    heap.push(Reverse((rank, q as u32, id)));
                }
            }
            if next[p] != NONE {
                let s = next[p] as usize;
                if let Some((rank, id)) = self.merges.get(pair_key(ids[p], ids[s])) {
                    heap.push(Reverse((rank, pos, id)));
                }
            }
        }
        let mut i = 0usize;
        loop {
            out.push(ids[i]);
            match next[i] {
                NONE => break,
                j => i = j as usize,
            }
        }
    }
}

impl BpeModel {
    /// [`BpeModel::merge_into`] for a word of 2 to [`SCAN_MAX`] symbols `init`, when
    /// [`BpeModel::scan_merges`] holds: on the stack, no heap, no stale entries. The ranks of
    /// the adjacent pairs are kept in order; each step merges the lowest, leftmost among
    /// equals (equal ranks are the same pair), and looks up the (at most two) new pairs.
    #[inline]
    fn merge_scan(&self, init: &[u32], out: &mut Vec<u32>) {
        let n = init.len();
        debug_assert!((2..=SCAN_MAX).contains(&n));
        let mut ids = [0u32; SCAN_MAX];
        // merge[i]: rank << 32 | merged id of (ids[i], ids[i + 1]); u64::MAX: none. The lowest
        // value is the lowest rank (equal ranks are the same pair, so equal values).
        let mut merge = [u64::MAX; SCAN_MAX];
        let merge_of = |a: u32, b: u32| {
            self.merges
                .get(pair_key(a, b))
                .map_or(u64::MAX, |(rank, id)| u64::from(rank) << 32 | u64::from(id))
        };
        ids[..n].copy_from_slice(init);
        for i in 0..n - 1 {
            self.merges.prefetch(pair_key(ids[i], ids[i + 1]));
        }
        for i in 0..n - 1 {
            merge[i] = merge_of(ids[i], ids[i + 1]);
        }
        // Each merge looks up the pairs its token makes with its neighbours, a chain of
        // dependent cache misses; the pairs that each possible merge would make are
        // prefetched one merge ahead (a hint only), so that most lookups find them cached.
        let ahead = |ids: &[u32], merge: &[u64], m: usize, i: usize| {
            if merge[i] != u64::MAX {
                let new = merge[i] as u32;
                if i > 0 {
                    self.merges.prefetch(pair_key(ids[i - 1], new));
                }
                if i + 2 < m {
                    self.merges.prefetch(pair_key(new, ids[i + 2]));
                }
            }
        };
        for i in 0..n - 1 {
            ahead(&ids, &merge, n, i);
        }
        let mut m = n;
        while m > 1 {
            let mut k = 0;
            let mut best = merge[0];
            for (i, &r) in merge[..m - 1].iter().enumerate().skip(1) {
                if r < best {
                    (best, k) = (r, i);
                }
            }
            if best == u64::MAX {
                break;
            }
            ids[k] = best as u32;
            ids.copy_within(k + 2..m, k + 1);
            merge.copy_within(k + 1..m - 1, k);
            m -= 1;
            merge[m - 1] = u64::MAX;
            let left = (k > 0).then(|| pair_key(ids[k - 1], ids[k]));
            let right = (k + 1 < m).then(|| pair_key(ids[k], ids[k + 1]));
            if let (Some(a), Some(b)) = (left, right) {
                self.merges.prefetch(a);
                self.merges.prefetch(b);
            }
            if k > 0 {
                merge[k - 1] = merge_of(ids[k - 1], ids[k]);
                ahead(&ids, &merge, m, k - 1);
            }
            if k + 1 < m {
                merge[k] = merge_of(ids[k], ids[k + 1]);
                ahead(&ids, &merge, m, k);
            }
        }
        out.extend_from_slice(&ids[..m]);
    }
}

/// Position of the first occurrence of `needle` (non-empty) in `hay`.
#[inline]
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    let first = needle[0];
    let mut i = 0;
    while let Some(k) = hay[i..].iter().position(|&b| b == first) {
        let at = i + k;
        if hay[at..].starts_with(needle) {
            return Some(at);
        }
        i = at + 1;
    }
    None
}
