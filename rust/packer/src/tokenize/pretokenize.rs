//! The pre-tokenizers of `tokenizer.json` that the fast path reproduces, read from the file
//! and run without `NormalizedString`'s offset tracking (the normalizers are in
//! [`super::normalize`]).
//!
//! Each step here is the `tokenizers` (0.23) step of the same name, with its exact splitting
//! rules (`NormalizedString::split` and `Pattern::find_matches`):
//!
//! - `Split` with a regex or string pattern, any behaviour, `invert`; the regex runs through a
//!   hand-written scanner ([`super::split`]) for the patterns known there, through a run of one
//!   character class for patterns that are only that (`\p{N}{1,3}`, `[一-龥...]+`), and
//!   otherwise through Oniguruma itself, the engine `tokenizers` uses;
//! - `ByteLevel` (its prefix space and GPT-2 regex; its byte mapping is the model's
//!   [`Alphabet::ByteLevel`](super::bpe::Alphabet)), last in the sequence;
//! - `Metaspace` (`replacement`, every `prepend_scheme`, `split`), `Digits`, `Punctuation`,
//!   `WhitespaceSplit`, nested `Sequence`s;
//!
//! Anything else is refused with its name, and the caller falls back to `tokenizers`.

use serde_json::Value;
use unicode_categories::UnicodeCategories;

use super::split::{Splitter, GPT2_PATTERN};

pub(super) fn kind(v: &Value) -> &str {
    v.get("type").and_then(Value::as_str).unwrap_or("")
}

fn field<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.get(key).filter(|x| !x.is_null())
}

fn flag(v: &Value, key: &str, default: bool) -> bool {
    field(v, key).and_then(Value::as_bool).unwrap_or(default)
}

/// A set of characters: an ASCII bitmap and sorted ranges beyond.
#[derive(Clone, Debug)]
pub struct CharSet {
    ascii: u128,
    ranges: Vec<(u32, u32)>,
}

impl CharSet {
    /// Whether `c` is in the set.
    #[inline]
    pub fn contains(&self, c: char) -> bool {
        let v = c as u32;
        if v < 128 {
            return self.ascii >> v & 1 == 1;
        }
        self.ranges
            .binary_search_by(|&(lo, hi)| {
                if hi < v {
                    std::cmp::Ordering::Less
                } else if lo > v {
                    std::cmp::Ordering::Greater
                } else {
                    std::cmp::Ordering::Equal
                }
            })
            .is_ok()
    }

    /// The characters of a one-class regex (`\\w`, `\\s`...), from `regex-syntax`'s tables.
    pub fn of_class(pattern: &str) -> CharSet {
        use regex_syntax::hir::{Class, HirKind};
        let hir = regex_syntax::Parser::new()
            .parse(pattern)
            .expect("static class pattern parses");
        match hir.kind() {
            HirKind::Class(Class::Unicode(c)) => CharSet::from_ranges(
                c.ranges()
                    .iter()
                    .map(|r| (r.start() as u32, r.end() as u32)),
            ),
            other => unreachable!("{pattern} is a Unicode class, got {other:?}"),
        }
    }

    fn from_ranges(ranges: impl Iterator<Item = (u32, u32)>) -> CharSet {
        let mut set = CharSet {
            ascii: 0,
            ranges: Vec::new(),
        };
        for (lo, hi) in ranges {
            for v in lo..=hi.min(127) {
                set.ascii |= 1 << v;
            }
            if hi >= 128 {
                set.ranges.push((lo.max(128), hi));
            }
        }
        set
    }
}

/// Classes whose `regex-syntax` tables are checked against Oniguruma on every code point
/// (`tests/fastbpe_identity.rs`); a class pattern naming any other escape goes to Oniguruma.
const CHECKED_ESCAPES: &[&str] = &[r"\p{L}", r"\p{N}", r"\p{P}", r"\p{S}", r"\p{M}", r"\s"];

/// How a regex finds its matches.
pub enum Matcher {
    /// A hand-written scanner: every position starts a match.
    Scanner(Splitter),
    /// Greedy runs of `min..=max` characters of one class.
    Class {
        /// The class.
        set: CharSet,
        /// Fewest chars of a match.
        min: usize,
        /// Most chars of a match.
        max: usize,
    },
    /// A literal string (a `String` pattern).
    Literal(String),
    /// Oniguruma, as `tokenizers` runs it.
    Onig(onig::Regex),
}

impl std::fmt::Debug for Matcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Matcher::Scanner(s) => write!(f, "Scanner({s:?})"),
            Matcher::Class { min, max, .. } => write!(f, "Class{{{min},{max}}}"),
            Matcher::Literal(s) => write!(f, "Literal({s:?})"),
            Matcher::Onig(_) => write!(f, "Onig"),
        }
    }
}

/// A pattern that is one character class, optionally repeated (`C`, `C+`, `C{m,n}`), written
/// with literal characters, ranges and checked escapes only.
fn class_pattern(pattern: &str) -> Option<Matcher> {
    use regex_syntax::hir::{Class, HirKind};
    let mut rest = pattern.to_string();
    for e in CHECKED_ESCAPES {
        rest = rest.replace(e, "");
    }
    // Other escapes, groups, flags, POSIX classes and set operations can differ between
    // engines: left to Oniguruma.
    if ["\\", "(", "[:", "[[", "&&", "--", "~~", "."]
        .iter()
        .any(|t| rest.contains(t))
    {
        return None;
    }
    let hir = regex_syntax::Parser::new().parse(pattern).ok()?;
    let (class, min, max) = match hir.kind() {
        HirKind::Class(c) => (c.clone(), 1, 1),
        HirKind::Repetition(r) if r.greedy && r.min >= 1 => match r.sub.kind() {
            HirKind::Class(c) => (
                c.clone(),
                r.min as usize,
                r.max.map_or(usize::MAX, |m| m as usize),
            ),
            _ => return None,
        },
        _ => return None,
    };
    let Class::Unicode(u) = class else {
        return None;
    };
    let set = CharSet::from_ranges(
        u.ranges()
            .iter()
            .map(|r| (r.start() as u32, r.end() as u32)),
    );
    Some(Matcher::Class { set, min, max })
}

impl Matcher {
    /// The matcher of a `Split`/`Replace` `pattern` object (`{"Regex": ...}` or `{"String": ...}`).
    pub fn from_json(pattern: &Value) -> Result<Matcher, String> {
        if let Some(s) = pattern.get("String").and_then(Value::as_str) {
            if s.is_empty() {
                return Err("Split or Replace with an empty String pattern".into());
            }
            return Ok(Matcher::Literal(s.to_string()));
        }
        let re = pattern
            .get("Regex")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("pattern {pattern} is neither Regex nor String"))?;
        Matcher::from_regex(re)
    }

    /// The matcher of a regex string.
    pub fn from_regex(re: &str) -> Result<Matcher, String> {
        if let Some(s) = Splitter::from_pattern(re) {
            return Ok(Matcher::Scanner(s));
        }
        if let Some(m) = class_pattern(re) {
            return Ok(m);
        }
        onig::Regex::new(re)
            .map(Matcher::Onig)
            .map_err(|e| format!("regex {re:?} does not compile: {e}"))
    }

    /// `Pattern::find_matches`: `(start, end, is_match)` covering `s` in order (nothing for an
    /// empty `s`, whose only split is empty and dropped anyway).
    pub fn find_matches(&self, s: &str, out: &mut Vec<(usize, usize, bool)>) {
        out.clear();
        if s.is_empty() {
            return;
        }
        let mut prev = 0;
        let mut push = |a: usize, b: usize, out: &mut Vec<(usize, usize, bool)>| {
            if prev != a {
                out.push((prev, a, false));
            }
            out.push((a, b, true));
            prev = b;
        };
        match self {
            Matcher::Scanner(sp) if sp.covering() => {
                let mut i = 0;
                for p in sp.pieces(s) {
                    push(i, i + p.len(), out);
                    i += p.len();
                }
            }
            Matcher::Scanner(sp) => {
                let mut i = 0;
                while i < s.len() {
                    match sp.match_at(s, i) {
                        Some(j) => {
                            push(i, j, out);
                            i = j;
                        }
                        None => i += s[i..].chars().next().map_or(1, char::len_utf8),
                    }
                }
            }
            Matcher::Class { set, min, max } => {
                // Greedy runs: chunks of `max` chars, then the rest if it has `min`.
                let (mut start, mut count, mut end) = (0, 0, 0);
                for (i, c) in s.char_indices() {
                    if set.contains(c) {
                        if count == 0 {
                            start = i;
                        }
                        count += 1;
                        end = i + c.len_utf8();
                        if count == *max {
                            push(start, end, out);
                            count = 0;
                        }
                    } else if count > 0 {
                        if count >= *min {
                            push(start, end, out);
                        }
                        count = 0;
                    }
                }
                if count >= *min && count > 0 {
                    push(start, end, out);
                }
            }
            Matcher::Literal(lit) => {
                for (a, m) in s.match_indices(lit.as_str()) {
                    push(a, a + m.len(), out);
                }
            }
            Matcher::Onig(re) => {
                for (a, b) in re.find_iter(s) {
                    push(a, b, out);
                }
            }
        }
        if prev != s.len() {
            out.push((prev, s.len(), false));
        }
    }
}

/// `find_matches` of a `Fn(char) -> bool` pattern: each matching char is its own match.
fn char_matches(s: &str, pred: impl Fn(char) -> bool, out: &mut Vec<(usize, usize, bool)>) {
    out.clear();
    let mut last = 0;
    for (i, c) in s.char_indices() {
        if pred(c) {
            if last < i {
                out.push((last, i, false));
            }
            last = i + c.len_utf8();
            out.push((i, last, true));
        }
    }
    if last < s.len() {
        out.push((last, s.len(), false));
    }
}

/// `SplitDelimiterBehavior`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behavior {
    /// Matches are dropped.
    Removed,
    /// Matches are pieces of their own.
    Isolated,
    /// A match joins the piece before it.
    MergedWithPrevious,
    /// A match joins the piece after it.
    MergedWithNext,
    /// Runs of matches, and of non-matches, are pieces.
    Contiguous,
}

impl Behavior {
    fn from_json(v: Option<&Value>, default: Option<Behavior>) -> Result<Behavior, String> {
        let Some(name) = v.filter(|v| !v.is_null()) else {
            return default.ok_or_else(|| "Split without a behavior".to_string());
        };
        Ok(match name.as_str() {
            Some("Removed") => Behavior::Removed,
            Some("Isolated") => Behavior::Isolated,
            Some("MergedWithPrevious") => Behavior::MergedWithPrevious,
            Some("MergedWithNext") => Behavior::MergedWithNext,
            Some("Contiguous") => Behavior::Contiguous,
            _ => return Err(format!("split behavior {name}")),
        })
    }

    /// `NormalizedString::split`'s pieces (relative to the split string), empty ones dropped.
    fn apply(self, m: &[(usize, usize, bool)], invert: bool, out: &mut Vec<(usize, usize)>) {
        let start = out.len();
        let is_match = |x: &(usize, usize, bool)| x.2 != invert;
        match self {
            Behavior::Isolated => out.extend(m.iter().map(|x| (x.0, x.1))),
            Behavior::Removed => out.extend(m.iter().filter(|x| !is_match(x)).map(|x| (x.0, x.1))),
            Behavior::Contiguous => {
                let mut prev = false;
                for x in m {
                    let cur = is_match(x);
                    match out[start..].last_mut() {
                        Some(last) if cur == prev => last.1 = x.1,
                        _ => out.push((x.0, x.1)),
                    }
                    prev = cur;
                }
            }
            Behavior::MergedWithPrevious => {
                let mut prev = false;
                for x in m {
                    let cur = is_match(x);
                    match out[start..].last_mut() {
                        Some(last) if cur && !prev => last.1 = x.1,
                        _ => out.push((x.0, x.1)),
                    }
                    prev = cur;
                }
            }
            Behavior::MergedWithNext => {
                let mut prev = false;
                for x in m.iter().rev() {
                    let cur = is_match(x);
                    match out[start..].last_mut() {
                        Some(last) if cur && !prev => last.0 = x.0,
                        _ => out.push((x.0, x.1)),
                    }
                    prev = cur;
                }
                out[start..].reverse();
            }
        }
        let mut w = start;
        for r in start..out.len() {
            if out[r].0 < out[r].1 {
                out[w] = out[r];
                w += 1;
            }
        }
        out.truncate(w);
    }
}

/// Which characters a char-predicate split matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CharClass {
    /// `char::is_numeric` (`Digits`).
    Numeric,
    /// ASCII punctuation or Unicode `P*` (`Punctuation`).
    Punctuation,
    /// `char::is_whitespace` (`WhitespaceSplit`).
    Whitespace,
    /// One character (`Metaspace { split: true }`).
    Is(char),
}

impl CharClass {
    #[inline]
    fn has(self, c: char) -> bool {
        match self {
            CharClass::Numeric => c.is_numeric(),
            CharClass::Punctuation => c.is_ascii_punctuation() || c.is_punctuation(),
            CharClass::Whitespace => c.is_whitespace(),
            CharClass::Is(x) => c == x,
        }
    }
}

/// `Metaspace`'s `prepend_scheme`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prepend {
    /// Before every piece not starting with the replacement.
    Always,
    /// Only before the piece that starts the input.
    First,
    /// Never.
    Never,
}

/// One pre-tokenizer step.
#[derive(Debug)]
pub enum Step {
    /// `Split` (and `ByteLevel`'s regex).
    Split {
        /// The pattern.
        matcher: Matcher,
        /// What becomes of matches.
        behavior: Behavior,
        /// Whether the non-matches are the delimiters.
        invert: bool,
    },
    /// `Digits`, `Punctuation`, `WhitespaceSplit`, `Metaspace`'s split.
    Chars {
        /// The delimiter chars.
        class: CharClass,
        /// What becomes of them.
        behavior: Behavior,
    },
    /// `Metaspace`'s replacement of spaces and prefix.
    Metaspace {
        /// What spaces become.
        rep: char,
        /// When it is put before a piece.
        prepend: Prepend,
    },
    /// `ByteLevel { add_prefix_space: true }`: a space before each piece not starting with one.
    PrefixSpace,
}

/// The pre-tokenizer, flattened, and whether it ends with `ByteLevel`.
#[derive(Debug)]
pub struct PreTokenizer {
    /// The steps, in order.
    pub steps: Vec<Step>,
    /// Whether it ends with `ByteLevel` (the model spells pieces in byte-level chars).
    pub byte_level: bool,
}

fn flatten<'a>(p: &'a Value, out: &mut Vec<&'a Value>) -> Result<(), String> {
    if kind(p) == "Sequence" {
        for q in p
            .get("pretokenizers")
            .and_then(Value::as_array)
            .ok_or("pre-tokenizer Sequence without a list")?
        {
            flatten(q, out)?;
        }
    } else {
        out.push(p);
    }
    Ok(())
}

impl PreTokenizer {
    /// Read the `pre_tokenizer` section (already known to load in `tokenizers`).
    pub fn from_json(p: Option<&Value>) -> Result<PreTokenizer, String> {
        let mut flat = Vec::new();
        if let Some(p) = p.filter(|p| !p.is_null()) {
            flatten(p, &mut flat)?;
        }
        let mut steps = Vec::new();
        let mut byte_level = false;
        for (i, p) in flat.iter().enumerate() {
            if byte_level {
                return Err(format!(
                    "pre-tokenizer step {} after ByteLevel (sees byte-level characters)",
                    kind(p)
                ));
            }
            match kind(p) {
                "ByteLevel" => {
                    byte_level = true;
                    if flag(p, "add_prefix_space", true) {
                        steps.push(Step::PrefixSpace);
                    }
                    if flag(p, "use_regex", true) {
                        steps.push(Step::Split {
                            matcher: Matcher::Scanner(
                                Splitter::from_pattern(GPT2_PATTERN).expect("known pattern"),
                            ),
                            behavior: Behavior::Isolated,
                            invert: false,
                        });
                    }
                }
                "Split" => steps.push(Step::Split {
                    matcher: Matcher::from_json(
                        p.get("pattern").ok_or("Split without a pattern")?,
                    )?,
                    behavior: Behavior::from_json(p.get("behavior"), None)?,
                    invert: flag(p, "invert", false),
                }),
                "Metaspace" => {
                    let rep = p
                        .get("replacement")
                        .and_then(Value::as_str)
                        .and_then(|s| {
                            let mut c = s.chars();
                            c.next().filter(|_| c.next().is_none())
                        })
                        .ok_or("Metaspace replacement is not one character")?;
                    let mut prepend = match field(p, "prepend_scheme").and_then(Value::as_str) {
                        None | Some("always") => Prepend::Always,
                        Some("first") => Prepend::First,
                        Some("never") => Prepend::Never,
                        Some(other) => return Err(format!("Metaspace prepend_scheme {other}")),
                    };
                    if field(p, "add_prefix_space").and_then(Value::as_bool) == Some(false) {
                        prepend = Prepend::Never;
                    }
                    if prepend == Prepend::First && i > 0 {
                        // `first` asks whether the piece starts the input; after another
                        // step that is its offset in the original text, not tracked here.
                        return Err("Metaspace prepend_scheme first after another step".into());
                    }
                    steps.push(Step::Metaspace { rep, prepend });
                    if flag(p, "split", true) {
                        steps.push(Step::Chars {
                            class: CharClass::Is(rep),
                            behavior: Behavior::MergedWithNext,
                        });
                    }
                }
                "Digits" => steps.push(Step::Chars {
                    class: CharClass::Numeric,
                    behavior: if flag(p, "individual_digits", false) {
                        Behavior::Isolated
                    } else {
                        Behavior::Contiguous
                    },
                }),
                "Punctuation" => steps.push(Step::Chars {
                    class: CharClass::Punctuation,
                    behavior: Behavior::from_json(p.get("behavior"), Some(Behavior::Isolated))?,
                }),
                "WhitespaceSplit" => steps.push(Step::Chars {
                    class: CharClass::Whitespace,
                    behavior: Behavior::Removed,
                }),
                other => return Err(format!("pre-tokenizer {other}")),
            }
        }
        Ok(PreTokenizer { steps, byte_level })
    }

    /// The single scanner of a pre-tokenizer that is one isolating regex split (the common
    /// byte-level case), which streams its pieces with no buffers.
    pub fn single_scanner(&self) -> Option<Splitter> {
        match self.steps.as_slice() {
            [Step::Split {
                matcher: Matcher::Scanner(s),
                behavior: Behavior::Isolated,
                invert: false,
            }] if s.covering() => Some(*s),
            _ => None,
        }
    }

    /// Whether some step needs to know if a piece starts the input.
    pub fn uses_first(&self) -> bool {
        self.steps.iter().any(|s| {
            matches!(
                s,
                Step::Metaspace {
                    prepend: Prepend::First,
                    ..
                }
            )
        })
    }

    /// The pieces of `s` (`first`: it starts the input), each given to `emit`.
    pub fn run(
        &self,
        s: &str,
        first: bool,
        buf: &mut PreScratch,
        mut emit: impl FnMut(&str) -> Result<(), String>,
    ) -> Result<(), String> {
        let PreScratch {
            text,
            text2,
            spans,
            spans2,
            matches,
            sub,
        } = buf;
        // The pieces' text: the input until a step rewrites it into `text`.
        let mut own = false;
        spans.clear();
        spans.push((0, s.len(), first));
        for step in &self.steps {
            spans2.clear();
            let cur: &str = if own { text } else { s };
            match step {
                Step::Split {
                    matcher,
                    behavior,
                    invert,
                } => {
                    for &(a, b, f) in spans.iter() {
                        matcher.find_matches(&cur[a..b], matches);
                        sub.clear();
                        behavior.apply(matches, *invert, sub);
                        spans2.extend(sub.iter().map(|&(x, y)| (a + x, a + y, f && x == 0)));
                    }
                }
                Step::Chars { class, behavior } => {
                    for &(a, b, f) in spans.iter() {
                        char_matches(&cur[a..b], |c| class.has(c), matches);
                        sub.clear();
                        behavior.apply(matches, false, sub);
                        spans2.extend(sub.iter().map(|&(x, y)| (a + x, a + y, f && x == 0)));
                    }
                }
                Step::Metaspace { rep, prepend } => {
                    text2.clear();
                    for &(a, b, f) in spans.iter() {
                        let start = text2.len();
                        let piece = &cur[a..b];
                        let add = match prepend {
                            Prepend::Always => true,
                            Prepend::First => f,
                            Prepend::Never => false,
                        };
                        // A piece starting with a space starts with the replacement after it.
                        if add && !piece.starts_with(' ') && !piece.starts_with(*rep) {
                            text2.push(*rep);
                        }
                        let mut last = 0;
                        for (k, _) in piece.match_indices(' ') {
                            text2.push_str(&piece[last..k]);
                            text2.push(*rep);
                            last = k + 1;
                        }
                        text2.push_str(&piece[last..]);
                        spans2.push((start, text2.len(), f));
                    }
                    std::mem::swap(text, text2);
                    own = true;
                }
                Step::PrefixSpace => {
                    text2.clear();
                    for &(a, b, f) in spans.iter() {
                        let start = text2.len();
                        if !cur[a..b].starts_with(' ') {
                            text2.push(' ');
                        }
                        text2.push_str(&cur[a..b]);
                        spans2.push((start, text2.len(), f));
                    }
                    std::mem::swap(text, text2);
                    own = true;
                }
            }
            std::mem::swap(spans, spans2);
        }
        let cur: &str = if own { text } else { s };
        for &(a, b, _) in spans.iter() {
            emit(&cur[a..b])?;
        }
        Ok(())
    }
}

/// Buffers of [`PreTokenizer::run`].
#[derive(Default)]
pub struct PreScratch {
    text: String,
    text2: String,
    spans: Vec<(usize, usize, bool)>,
    spans2: Vec<(usize, usize, bool)>,
    matches: Vec<(usize, usize, bool)>,
    sub: Vec<(usize, usize)>,
}
