//! Fast path for the BPE tokenizers of the popular model families (byte-level: GPT-2, SmolLM2,
//! Llama 3, Qwen2/2.5/3, DeepSeek-V3; SentencePiece-style with `Metaspace` and byte fallback:
//! Llama 2, Mistral, Mixtral, Gemma, Yi, Phi-3...), giving the ids of `tokenizers`'
//! `encode(text, add_special_tokens=False)`.
//!
//! Hugging Face's pipeline spends most of its time around the model: offset-tracking
//! normalized strings, the Oniguruma pre-tokenizer, per-token `String`s. This path keeps
//! Hugging Face's steps and their order, and replaces only the machinery:
//!
//! 1. added tokens with `normalized: false` are cut out of the raw text (Aho-Corasick,
//!    leftmost-longest, with `single_word`, `lstrip` and `rstrip` as `AddedVocabulary` applies
//!    them);
//! 2. each remaining segment goes through the normalizer ([`super::normalize::Normalizer`]);
//! 3. added tokens with `normalized: true` are cut out of the normalised segments, matched by
//!    their normalised content;
//! 4. the pre-tokenizer's steps split each segment into pieces
//!    ([`super::pretokenize::PreTokenizer`]; a single known regex streams through its
//!    hand-written scanner, [`super::split`]);
//! 5. each piece is mapped to ids by a per-thread memo, computed on a miss by [`super::bpe`]'s
//!    reimplementation of the `tokenizers` crate's `BPE::tokenize` (the same merge ranks and
//!    order, byte fallback and unknown token, proven identical by `tests/fastbpe_identity.rs`).
//!    Ranks matter: the shared Qwen3 and SmolLM2 vocabularies list one merge per token in
//!    token-id order, yet ~143k (Qwen3) and ~59k (SmolLM2) adjacent token pairs concatenate to
//!    a vocabulary token without being a merge, so a rank-by-token encoder (tiktoken, the `bpe`
//!    crate) could merge where Hugging Face does not. Long `Metaspace` words are cut where no
//!    merge can cross ([`BpeModel::boundary`]), so they are memoised too.
//!
//! [`FastBpe::from_json`] reads `tokenizer.json` itself (no `tokenizers::Tokenizer` is built, which
//! is most of the load time), accepts a tokenizer only when every step above is provably the one
//! Hugging Face would run and Hugging Face would load it, and otherwise says why not; the caller
//! then falls back to the `tokenizers` crate.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};
use rustc_hash::FxHashMap;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use super::bpe::{Alphabet, BpeModel, ModelHead, ModelJson, Scratch};
use super::compiled;
use super::normalize::Normalizer;
use super::piece_table::{hash, key_in, key_of, prefetch, PieceTable};
use super::pretokenize::{CharSet, PreScratch, PreTokenizer};
use super::shared_memo::{Ids, SharedMemo, Table, View};
use super::split::{Cl100kRanges, PieceRanges, Splitter};

/// Bytes of pieces of more than 15 bytes (and of their ids) memoised per thread before that
/// memo stops growing. Such pieces are few, but a few are long (ShareGPT has separator runs
/// of 40 kB, each repeated): one merged again costs ~150 ns per byte, one memoised a hash.
const LONG_BYTES: usize = 8 << 20;
/// Pieces of more than 15 bytes memoised per thread before that memo stops growing.
const LONG_CAP: usize = 1 << 16;
/// Pieces scanned ahead of their lookups (see [`Run::pre_tokenize`]).
const BATCH: usize = 16;
/// Log2 of the slots of [`Memo::front`]: 16,384 × 32 bytes, a quarter of a 2 MB L2 cache
/// (8,192 measured ~7% slower on all 121 MB of ShareGPT, 32,768 no faster).
const FRONT_BITS: u32 = 14;
/// A hash's slot in [`Memo::front`]: its top [`FRONT_BITS`] bits.
const FRONT_SHIFT: u32 = 64 - FRONT_BITS;

/// The sections of `tokenizer.json` that `tokenizers` reads (unknown keys are ignored by both).
/// A key given twice fails here (`tokenizers` would keep the last): the fast path is refused.
#[derive(Deserialize)]
struct TokenizerJson<'a, M> {
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
    #[serde(default)]
    model: Option<M>,
}

impl<'a, M> TokenizerJson<'a, M> {
    fn with_model<N>(self, model: Option<N>) -> TokenizerJson<'a, N> {
        TokenizerJson {
            version: self.version,
            truncation: self.truncation,
            padding: self.padding,
            added_tokens: self.added_tokens,
            normalizer: self.normalizer,
            pre_tokenizer: self.pre_tokenizer,
            post_processor: self.post_processor,
            decoder: self.decoder,
            model,
        }
    }
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

/// How an added token is matched (`AddedToken`'s flags).
#[derive(Clone, Copy)]
struct AddedRule {
    id: u32,
    single_word: bool,
    lstrip: bool,
    rstrip: bool,
}

/// Added tokens of one matching pass.
struct AddedSet {
    matcher: AhoCorasick,
    rules: Vec<AddedRule>,
}

impl AddedSet {
    fn build(pairs: Vec<(String, AddedRule)>) -> Result<Option<AddedSet>, String> {
        if pairs.is_empty() {
            return Ok(None);
        }
        let matcher = AhoCorasickBuilder::new()
            .match_kind(MatchKind::LeftmostLongest)
            .build(pairs.iter().map(|(c, _)| c))
            .map_err(|e| format!("cannot index added tokens: {e}"))?;
        Ok(Some(AddedSet {
            matcher,
            rules: pairs.into_iter().map(|(_, r)| r).collect(),
        }))
    }
}

/// `\w` and `\s` of the `regex` crate, which `AddedVocabulary` uses for `single_word`,
/// `lstrip` and `rstrip` (the same `regex-syntax` tables).
fn word_space() -> &'static (CharSet, CharSet) {
    static SETS: OnceLock<(CharSet, CharSet)> = OnceLock::new();
    SETS.get_or_init(|| (CharSet::of_class(r"\w"), CharSet::of_class(r"\s")))
}

/// A tokenizer proven equivalent to its `tokenizers` pipeline.
pub struct FastBpe {
    normalizer: Normalizer,
    pre: PreTokenizer,
    /// The pre-tokenizer when it is one known regex, streamed.
    scanner: Option<Splitter>,
    raw_added: Option<AddedSet>,
    normalized_added: Option<AddedSet>,
    /// Added token content → id, as `AddedVocabulary` assigns them.
    added_ids: FxHashMap<String, u32>,
    /// The BPE model: vocabulary, merges, encoder of one piece.
    model: BpeModel,
    /// Pieces of up to 15 bytes that encode as the one token they spell (most pieces of real
    /// text), looked up before the memo: shared by every thread and complete from the start,
    /// so a cold encoder misses only on pieces that need several tokens.
    direct: PieceTable<u32>,
    /// The pieces of up to 15 bytes that need several tokens, as merged so far by any thread.
    shared: SharedMemo,
    /// Identifies this instance in the per-thread memo.
    memo_owner: u64,
}

/// Per-thread state of an encoder for the [`FastBpe`] named by `owner`. Pieces of up to 15
/// bytes (nearly all) are keyed inline, bytes and length packed in a `u128` ([`key_of`]), so
/// a hit costs one multiply-hash and one integer compare instead of a `memcmp`.
#[derive(Default)]
struct Memo {
    owner: u64,
    /// The ids of the pieces seen last, direct-mapped by key hash: the frequent pieces of a
    /// text (a few thousand cover most of it) are answered from cache-resident memory; the
    /// shared tables span megabytes, where each probe would wait on RAM. Entries of more
    /// than three ids point into [`FastBpe::shared`]'s arena.
    front: Vec<(u128, Ids)>,
    /// Which table of [`FastBpe::shared`] this thread reads.
    shared: View,
    /// Pieces of more than 15 bytes, memoised per thread (few: runs of spaces or digits).
    long: FxHashMap<Box<[u8]>, Ids>,
    /// Ids of the pieces of `long` of more than three tokens.
    spill: Vec<u32>,
    /// Bytes of the pieces of `long` and of `spill`.
    long_bytes: usize,
    /// Buffers of the BPE merges on a miss.
    scratch: Scratch,
    /// Buffers of the pre-tokenizer steps.
    pre: PreScratch,
}

thread_local! {
    static MEMO: RefCell<Memo> = RefCell::new(Memo::default());
}

fn next_owner() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
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
        Self::from_json_in(json, None)
    }

    /// [`FastBpe::from_json`] through the compiled cache ([`super::compiled`]) of the file whose
    /// hash is `hash`: its tables read back when cached, else built and cached.
    pub fn from_json_cached(json: &[u8], hash: &str) -> Result<FastBpe, String> {
        Self::from_json_in(json, compiled::path_for(hash))
    }

    /// [`FastBpe::from_json_cached`] with the cache file named.
    pub fn from_json_cache_file(json: &[u8], file: &std::path::Path) -> Result<FastBpe, String> {
        Self::from_json_in(json, Some(file.to_path_buf()))
    }

    fn from_json_in(json: &[u8], cache: Option<std::path::PathBuf>) -> Result<FastBpe, String> {
        if let Some(c) = cache.as_deref().and_then(compiled::read) {
            if let Some(fast) = Self::from_compiled(c) {
                return fast;
            }
        }
        Self::from_json_read(json, cache)
    }

    /// Everything from the compiled form: the tables, and the rest of the model and file from
    /// its copy of the JSON without the model's `vocab` and `merges` (a few kB: a hit never
    /// parses the whole file, 9 MB for Llama 3, ~18% of a load that did). `None` if that copy
    /// does not parse (it parsed when it was written: same bytes, same hash).
    fn from_compiled(c: compiled::Compiled) -> Option<Result<FastBpe, String>> {
        let compiled::Compiled {
            vocab,
            merges,
            direct,
            head,
        } = c;
        let mut spec = serde_json::from_slice::<TokenizerJson<ModelHead>>(&head).ok()?;
        let model = spec.model.take().map(|h| h.0.with_tables(vocab, merges));
        Some(Self::assemble(spec.with_model(model), Some(direct), None))
    }

    /// Everything from the JSON; the compiled form written to `cache`.
    fn from_json_read(json: &[u8], cache: Option<std::path::PathBuf>) -> Result<FastBpe, String> {
        // One pass over the file, the model included; only on failure a second one, for why.
        let spec: TokenizerJson<ModelJson> = serde_json::from_slice(json).map_err(|e| {
            match serde_json::from_slice::<ModelUnread>(json).map(|u| u.model) {
                Ok(Some(model)) => match BpeModel::from_json(model.get(), Alphabet::Chars) {
                    Err(why) => why,
                    Ok(_) => format!("unreadable tokenizer.json: {e}"),
                },
                _ => format!("unreadable tokenizer.json: {e}"),
            }
        })?;
        // The compiled form keeps the file without the model's tables (parsed on a hit).
        let cache = cache.and_then(|path| Some((path, compiled::head_of(json)?)));
        Self::assemble(spec, None, cache)
    }

    /// The checks and tables after the JSON is read; `direct` when the cache had it, else it
    /// is built (and the compiled form written to `cache`'s file with its head).
    fn assemble(
        spec: TokenizerJson<ModelJson>,
        direct: Option<PieceTable<u32>>,
        cache: Option<(std::path::PathBuf, Vec<u8>)>,
    ) -> Result<FastBpe, String> {
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
        let normalizer = Normalizer::from_json(normalizer.as_ref())?;
        let pre = PreTokenizer::from_json(pre_tokenizer.as_ref())?;
        if pre.uses_first() && !normalizer.keeps_start() {
            return Err(
                "Metaspace prepend_scheme first after a Prepend or Replace normalizer".into(),
            );
        }
        let alphabet = if pre.byte_level {
            Alphabet::ByteLevel
        } else {
            Alphabet::Chars
        };
        let model =
            BpeModel::from_parsed(spec.model.ok_or("tokenizer.json has no model")?, alphabet)?;

        let ids = added_token_ids(&spec.added_tokens, &model);
        let (mut raw, mut normalized) = (Vec::new(), Vec::new());
        let mut added_ids = FxHashMap::default();
        let mut seen_ids = std::collections::HashSet::new();
        let mut seen_normalized = std::collections::HashSet::new();
        for (t, id) in spec.added_tokens.into_iter().zip(ids) {
            if t.content.is_empty() || added_ids.insert(t.content.clone(), id).is_some() {
                return Err(format!("added token {:?} is empty or repeated", t.content));
            }
            // `AddedVocabulary` keeps one token per id, and one id per pattern of a pass.
            if !seen_ids.insert(id) {
                return Err(format!("added token {:?} shares id {id}", t.content));
            }
            let rule = AddedRule {
                id,
                single_word: t.single_word,
                lstrip: t.lstrip,
                rstrip: t.rstrip,
            };
            if t.normalized {
                // AddedVocabulary matches these on normalised text, by normalised content.
                let content = normalizer.apply(&t.content).into_owned();
                if content.is_empty() || !seen_normalized.insert(content.clone()) {
                    return Err(format!(
                        "added token {content:?} normalises to nothing or like another"
                    ));
                }
                normalized.push((content, rule));
            } else {
                raw.push((t.content, rule));
            }
        }
        let direct = direct.unwrap_or_else(|| {
            let mut pairs = Vec::with_capacity(model.vocab_size());
            model.one_token_pieces(15, |p, id| {
                pairs.push((key_of(p).expect("1 to 15 bytes"), id))
            });
            if let Some((path, head)) = &cache {
                let (vocab, merges, joins) = model.tables();
                compiled::write(path, vocab, merges, joins, &pairs, head);
            }
            let mut direct = PieceTable::with_capacity(pairs.len());
            for (k, id) in pairs {
                direct.insert(k, id);
            }
            direct
        });
        Ok(FastBpe {
            direct,
            scanner: pre.single_scanner(),
            normalizer,
            pre,
            raw_added: AddedSet::build(raw)?,
            normalized_added: AddedSet::build(normalized)?,
            added_ids,
            model,
            shared: SharedMemo::default(),
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

    /// The BPE model alone: ids of one pre-tokenized piece (raw bytes when the alphabet is
    /// byte-level), as `tokenizers`' `BPE::tokenize` gives them. Not memoised.
    pub fn tokenize_piece(&self, piece: &[u8]) -> Vec<u32> {
        let mut out = Vec::new();
        self.model
            .tokenize_into(piece, &mut Scratch::default(), &mut out);
        out
    }

    /// What the model's pieces are spelled in.
    pub fn alphabet(&self) -> Alphabet {
        self.model.alphabet()
    }

    /// Append the ids of `text` (no special tokens added) to `out`.
    pub fn encode_into(&self, text: &str, out: &mut Vec<u32>) -> Result<(), String> {
        MEMO.with(|cell| {
            let mut memo = cell.borrow_mut();
            if memo.owner != self.memo_owner {
                *memo = Memo {
                    owner: self.memo_owner,
                    front: vec![(0, Ids::default()); 1 << FRONT_BITS],
                    ..Memo::default()
                };
            }
            let table = self.shared.take_table(&mut memo.shared);
            let mut run = Run {
                fast: self,
                table: &table,
                memo: &mut memo,
                out,
            };
            let r = run.split_added(self.raw_added.as_ref(), text, true, Run::segment);
            SharedMemo::put_table(&mut memo.shared, table);
            r
        })
    }
}

/// A piece found by the scanner: `text[i..j]`, its key ([`key_in`]; 0 for none), its hash, and
/// its ids when [`Memo::front`] held them at [`Run::probe`] (else `ids.n` is [`UNRESOLVED`]).
#[derive(Clone, Copy, Default)]
struct Scanned {
    i: u32,
    j: u32,
    key: u128,
    hash: u64,
    ids: Ids,
}

/// [`Scanned::ids`] not yet known.
const UNRESOLVED: u32 = u32::MAX;

/// One `encode_into` call: the steps of the module doc, each a method.
struct Run<'a> {
    fast: &'a FastBpe,
    /// The table of [`FastBpe::shared`] read during this call.
    table: &'a Table,
    memo: &'a mut Memo,
    out: &'a mut Vec<u32>,
}

/// The byte length of the run of chars of `set` at the start of `s`.
fn leading(s: &str, set: &CharSet) -> usize {
    s.char_indices()
        .find(|&(_, c)| !set.contains(c))
        .map_or(s.len(), |(i, _)| i)
}

/// The byte offset where the run of chars of `set` at the end of `s` starts.
fn trailing(s: &str, set: &CharSet) -> usize {
    s.char_indices()
        .rev()
        .find(|&(_, c)| !set.contains(c))
        .map_or(0, |(i, c)| i + c.len_utf8())
}

impl Run<'_> {
    /// Steps 1 and 3: added tokens become their ids, the text between them goes to `seg`
    /// (with whether it starts the input), as `AddedVocabulary::find_matches` splits.
    fn split_added(
        &mut self,
        set: Option<&AddedSet>,
        text: &str,
        first: bool,
        seg: fn(&mut Self, &str, bool) -> Result<(), String>,
    ) -> Result<(), String> {
        let Some(set) = set else {
            return seg(self, text, first);
        };
        let mut last = 0;
        for m in set.matcher.find_iter(text) {
            let (mut start, mut stop) = (m.start(), m.end());
            let rule = set.rules[m.pattern().as_usize()];
            if rule.single_word {
                let (word, _) = word_space();
                let start_space = start == 0
                    || !text[..start]
                        .chars()
                        .next_back()
                        .is_some_and(|c| word.contains(c));
                let stop_space = stop == text.len()
                    || !text[stop..]
                        .chars()
                        .next()
                        .is_some_and(|c| word.contains(c));
                if !start_space || !stop_space {
                    continue;
                }
            }
            if rule.lstrip {
                start = trailing(&text[..start], &word_space().1).max(last);
            }
            if rule.rstrip {
                stop += leading(&text[stop..], &word_space().1);
            }
            if last < start {
                seg(self, &text[last..start], first && last == 0)?;
            }
            self.out.push(rule.id);
            last = stop;
        }
        if last < text.len() {
            seg(self, &text[last..], first && last == 0)?;
        }
        Ok(())
    }

    /// Step 2: the normalizer (Hugging Face normalises each segment between raw added tokens).
    fn segment(&mut self, s: &str, first: bool) -> Result<(), String> {
        let fast = self.fast;
        let s = fast.normalizer.apply(s);
        if s.is_empty() {
            return Ok(());
        }
        self.split_added(fast.normalized_added.as_ref(), &s, first, Run::pre_tokenize)
    }

    /// Step 4: the pre-tokenizer's pieces.
    fn pre_tokenize(&mut self, s: &str, first: bool) -> Result<(), String> {
        let fast = self.fast;
        if let Some(scanner) = fast.scanner {
            // Texts of up to 4 GiB: a scanned piece's offsets are kept as `u32`s.
            if fast.model.boundary().is_none() && u32::try_from(s.len()).is_ok() {
                match scanner {
                    Splitter::Cl100k { max_digits: 3 } => self.fused(s, Cl100kRanges::<3>::new(s)),
                    Splitter::Cl100k { max_digits: 1 } => self.fused(s, Cl100kRanges::<1>::new(s)),
                    _ => self.fused(s, scanner.pieces(s)),
                }
                return Ok(());
            }
            for p in scanner.pieces(s) {
                self.piece(p.as_bytes())?;
            }
            return Ok(());
        }
        let mut pre = std::mem::take(&mut self.memo.pre);
        let r = fast
            .pre
            .run(s, first, &mut pre, |p| self.piece(p.as_bytes()));
        self.memo.pre = pre;
        r
    }

    /// Steps 4 and 5 fused and pipelined for a covering scanner without word cuts: each piece's
    /// key straight from the text; a batch is scanned (its front slots prefetched), then probed
    /// in the front (its misses have their table slots prefetched), then the previous batch is
    /// emitted (the front's hits as they are, the rest looked up): each lookup's cache misses
    /// were started a whole batch of scanning earlier.
    fn fused(&mut self, s: &str, mut pieces: impl PieceRanges) {
        let text = s.as_bytes();
        let mut bufs = [[Scanned::default(); BATCH]; 2];
        let (mut cur, mut prev_n) = (0, 0);
        loop {
            let mut n = 0;
            while n < BATCH {
                let Some((i, j)) = pieces.next_range() else {
                    break;
                };
                bufs[cur][n] = self.scanned(text, i, j);
                n += 1;
            }
            for p in &mut bufs[cur][..n] {
                self.probe(p);
            }
            self.batch(text, &bufs[1 - cur][..prev_n]);
            if n < BATCH {
                self.batch(text, &bufs[cur][..n]);
                return;
            }
            (cur, prev_n) = (1 - cur, n);
        }
    }

    /// Step 5: a piece's ids, memoised per thread; a long word cut where merges cannot cross.
    fn piece(&mut self, p: &[u8]) -> Result<(), String> {
        let model = &self.fast.model;
        match model.boundary() {
            Some(c) if !model.ignore_merges() => {
                let mut buf = [0u8; 4];
                let mark = c.encode_utf8(&mut buf).as_bytes();
                let mut start = 0;
                for at in model.cuts(p, mark) {
                    self.word(&p[start..at]);
                    start = at;
                }
                self.word(&p[start..]);
            }
            _ => self.word(p),
        }
        Ok(())
    }

    /// Append `ids`, of a piece of up to 15 bytes.
    #[inline(always)]
    fn emit(&mut self, ids: Ids) {
        match ids.n {
            0 => {}
            1 => self.out.push(ids.ids[0]),
            n @ 2..=3 => self.out.extend_from_slice(&ids.ids[..n as usize]),
            n => self.fast.shared.extend(self.out, ids.ids[0], n),
        }
    }

    #[inline]
    fn word(&mut self, p: &[u8]) {
        self.word_key(p, key_of(p));
    }

    /// Piece `text[i..j]` (`text` of at most `u32::MAX` bytes) as scanned: its key and hash, its
    /// [`Memo::front`] slot prefetched.
    #[inline(always)]
    fn scanned(&self, text: &[u8], i: usize, j: usize) -> Scanned {
        let unresolved = Ids {
            n: UNRESOLVED,
            ids: [0; 3],
        };
        let Some(k) = key_in(text, i, j) else {
            return Scanned {
                i: i as u32,
                j: j as u32,
                key: 0,
                hash: 0,
                ids: unresolved,
            };
        };
        let h = hash(k);
        prefetch(&self.memo.front[(h >> FRONT_SHIFT) as usize]);
        Scanned {
            i: i as u32,
            j: j as u32,
            key: k,
            hash: h,
            ids: unresolved,
        }
    }

    /// Scanned piece `p`'s ids from [`Memo::front`] when it holds them; otherwise prefetch the
    /// slots of the tables its lookup will read. (Ids found here stay right until emitted: a
    /// piece's ids never change, and the spill they may point into only grows.)
    #[inline(always)]
    fn probe(&self, p: &mut Scanned) {
        if p.key == 0 {
            return;
        }
        let (key, ids) = self.memo.front[(p.hash >> FRONT_SHIFT) as usize];
        if key == p.key {
            p.ids = ids;
        } else {
            self.fast.direct.prefetch_hash(p.hash);
            self.table.prefetch_hash(p.hash);
        }
    }

    /// The ids of the scanned and probed pieces of `batch`, in order.
    #[inline]
    fn batch(&mut self, text: &[u8], batch: &[Scanned]) {
        for p in batch {
            if p.ids.n != UNRESOLVED {
                self.emit(p.ids);
            } else if p.key != 0 {
                self.word_tables(&text[p.i as usize..p.j as usize], p.key, p.hash);
            } else {
                self.word_key(&text[p.i as usize..p.j as usize], None);
            }
        }
    }

    /// The ids of word `p`, whose key ([`key_of`]) is `key`.
    #[inline]
    fn word_key(&mut self, p: &[u8], key: Option<u128>) {
        match key {
            Some(k) => self.word_hashed(p, k, hash(k)),
            None => match self.memo.long.get(p) {
                Some(&Ids { n, ids }) if n <= 3 => self.out.extend_from_slice(&ids[..n as usize]),
                Some(&Ids { n, ids: [at, ..] }) => self
                    .out
                    .extend_from_slice(&self.memo.spill[at as usize..(at + n) as usize]),
                None => self.miss(p, None),
            },
        }
    }

    /// The ids of word `p` of key `k` (never 0) and hash `h`.
    #[inline(always)]
    fn word_hashed(&mut self, p: &[u8], k: u128, h: u64) {
        let (front_key, ids) = self.memo.front[(h >> FRONT_SHIFT) as usize];
        if front_key == k {
            self.emit(ids);
            return;
        }
        self.word_tables(p, k, h);
    }

    /// [`Run::word_hashed`] past [`Memo::front`]: the shared table of one-token pieces, then
    /// the memo, then the merges; the front remembers what the tables gave.
    #[inline(always)]
    fn word_tables(&mut self, p: &[u8], k: u128, h: u64) {
        let slot = (h >> FRONT_SHIFT) as usize;
        let ids = if let Some(id) = self.fast.direct.get_hashed(k, h) {
            Ids {
                n: 1,
                ids: [id, 0, 0],
            }
        } else if let Some(ids) = self.table.get_hashed(k, h) {
            ids
        } else {
            self.miss(p, Some((k, h)));
            return;
        };
        self.memo.front[slot] = (k, ids);
        self.emit(ids);
    }

    /// A word in no table: merged, then memoised (shared when it has a key and hash, else
    /// per thread) while the memo has room.
    #[inline(never)]
    fn miss(&mut self, p: &[u8], key: Option<(u128, u64)>) {
        let start = self.out.len();
        let model = &self.fast.model;
        if key.is_some() {
            // A piece of up to 15 bytes in no table: not a vocabulary token, or
            // [`FastBpe::direct`] would hold it (with `ignore_merges`, every such token is
            // its own encoding).
            model.merge_unlisted(p, &mut self.memo.scratch, self.out);
        } else {
            model.tokenize_into(p, &mut self.memo.scratch, self.out);
        }
        let got = &self.out[start..];
        match key {
            Some((k, h)) => (self.fast.shared).insert(&mut self.memo.shared, self.table, k, h, got),
            None if self.memo.long_bytes + p.len() + 4 * got.len() <= LONG_BYTES
                && self.memo.long.len() < LONG_CAP =>
            {
                self.memo.long_bytes += p.len() + 4 * got.len();
                let ids = Ids::of(got, self.memo.spill.len() as u32);
                if got.len() > 3 {
                    self.memo.spill.extend_from_slice(got);
                }
                self.memo.long.insert(p.into(), ids);
            }
            None => {}
        }
    }
}
