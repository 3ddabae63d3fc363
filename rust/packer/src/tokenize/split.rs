//! Hand-written equivalents of the pre-tokenizer regexes of byte-level BPE tokenizers.
//!
//! Hugging Face `tokenizers` runs these patterns with Oniguruma, which costs more than the BPE
//! itself. Each pattern here is a fixed alternation, so its leftmost-first backtracking
//! semantics can be written as a direct scan that returns, for a position, the end of the
//! match Oniguruma would find there. Only the exact pattern strings in [`Splitter::from_pattern`]
//! are recognised; `tests/fastbpe_identity.rs` checks the scanners against Oniguruma (the
//! `tokenizers` crate) on real corpora and on random Unicode text, and checks the character
//! classes used here against Oniguruma's on every code point.

use std::sync::OnceLock;

/// GPT-2's pattern, used by `ByteLevel { use_regex: true }` (SmolLM2, GPT-2, RoBERTa...).
pub const GPT2_PATTERN: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// Qwen2/Qwen2.5/Qwen3's `Split` pattern (single digits).
pub const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Llama-3's (and OpenAI cl100k's) `Split` pattern (digits in groups of up to three).
pub const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// DeepSeek-V3's third `Split` pattern (after `\p{N}{1,3}` and a CJK run have been isolated):
/// ASCII punctuation joins the Latin letters after it, marks join letters.
pub const DEEPSEEK3_PATTERN: &str = "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+";

/// Class bit: `\p{L}`.
pub const LETTER: u8 = 1;
/// Class bit: `\p{N}`.
pub const NUMBER: u8 = 2;
/// Class bit: `\s`.
pub const SPACE: u8 = 4;
/// Class bit: `\p{M}`.
pub const MARK: u8 = 8;
/// Class bit: `\p{P}`.
pub const PUNCT: u8 = 16;
/// Class bit: `\p{S}`.
pub const SYMBOL: u8 = 32;

/// One class byte per Unicode code point (1.1 MB, built once per process).
fn classes() -> &'static [u8] {
    static TABLE: OnceLock<Vec<u8>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = vec![0u8; 0x11_0000];
        for (pat, bit) in [
            (r"\p{L}", LETTER),
            (r"\p{N}", NUMBER),
            (r"\s", SPACE),
            (r"\p{M}", MARK),
            (r"\p{P}", PUNCT),
            (r"\p{S}", SYMBOL),
        ] {
            for (lo, hi) in unicode_ranges(pat) {
                for v in &mut t[lo as usize..=hi as usize] {
                    *v |= bit;
                }
            }
        }
        t
    })
}

fn unicode_ranges(pat: &str) -> Vec<(char, char)> {
    use regex_syntax::hir::{Class, HirKind};
    let hir = regex_syntax::Parser::new()
        .parse(pat)
        .expect("static class pattern parses");
    match hir.kind() {
        HirKind::Class(Class::Unicode(c)) => {
            c.ranges().iter().map(|r| (r.start(), r.end())).collect()
        }
        other => unreachable!("{pat} is a Unicode class, got {other:?}"),
    }
}

/// The class bits of `c` (the same table the scanners use).
pub fn class_of(c: char) -> u8 {
    classes()[c as usize]
}

/// What Oniguruma's case-insensitive match folds `c` to, for the letters of the contractions
/// (`s t r e v m l d`); other characters are returned unchanged. U+017F LATIN SMALL LETTER
/// LONG S is the only non-ASCII character that folds to one of them.
#[inline]
pub fn fold(c: char) -> char {
    match c {
        'A'..='Z' => c.to_ascii_lowercase(),
        '\u{17F}' => 's',
        _ => c,
    }
}

/// A pre-tokenizer pattern with a hand-written scanner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Splitter {
    /// [`GPT2_PATTERN`].
    Gpt2,
    /// [`QWEN2_PATTERN`] (`max_digits` 1) or [`LLAMA3_PATTERN`] (3).
    Cl100k {
        /// Longest run of `\p{N}` in one piece.
        max_digits: usize,
    },
    /// [`DEEPSEEK3_PATTERN`]: not every position starts a match (digits, controls...).
    DeepSeek3,
}

struct Scan<'a> {
    /// The text scanned.
    s: &'a str,
    cls: &'static [u8],
}

impl Scan<'_> {
    /// The char at byte `i` (a char boundary), its byte length and class; None at the end.
    #[inline(always)]
    fn at(&self, i: usize) -> Option<(char, usize, u8)> {
        let b = *self.s.as_bytes().get(i)?;
        if b < 0x80 {
            return Some((b as char, 1, self.cls[b as usize]));
        }
        // `i` is a char boundary (pieces and runs only ever advance by whole chars) of valid
        // UTF-8: the lead byte gives the length, and the continuation bytes are there.
        debug_assert!(self.s.is_char_boundary(i));
        let s = self.s.as_bytes();
        let tail = |k: usize| u32::from(s[i + k] & 0x3F);
        let (v, n) = if b < 0xE0 {
            (u32::from(b & 0x1F) << 6 | tail(1), 2)
        } else if b < 0xF0 {
            (u32::from(b & 0x0F) << 12 | tail(1) << 6 | tail(2), 3)
        } else {
            (
                u32::from(b & 0x07) << 18 | tail(1) << 12 | tail(2) << 6 | tail(3),
                4,
            )
        };
        let c = char::from_u32(v)?;
        Some((c, n, self.cls[v as usize]))
    }

    /// End of the run of chars starting at `i` whose class satisfies `keep`.
    #[inline(always)]
    fn run(&self, mut i: usize, keep: impl Fn(u8) -> bool) -> usize {
        let s = self.s.as_bytes();
        // ASCII a byte at a time (most text), other chars decoded.
        while let Some(&b) = s.get(i) {
            if b < 0x80 {
                if !keep(self.cls[b as usize]) {
                    break;
                }
                i += 1;
                continue;
            }
            match self.at(i) {
                Some((_, n, k)) if keep(k) => i += n,
                _ => break,
            }
        }
        i
    }

    /// End of the run of `\p{L}` chars starting at `i`: ASCII letters eight bytes at a time
    /// (a mask of the letter bytes of a word, its first non-letter found by counting zeros:
    /// no branch per byte), other chars decoded.
    #[inline(always)]
    fn letters(&self, mut i: usize) -> usize {
        let s = self.s.as_bytes();
        loop {
            let Some(w) = s.get(i..i + 8) else {
                return self.run(i, |k| k & LETTER != 0);
            };
            let x = u64::from_le_bytes(w.try_into().expect("8 bytes"));
            let n = (ascii_letters(x) ^ HIGH).trailing_zeros() as usize / 8;
            i += n;
            if n == 8 {
                continue;
            }
            if s[i] < 0x80 {
                return i;
            }
            match self.at(i) {
                Some((_, n, k)) if k & LETTER != 0 => i += n,
                _ => return i,
            }
        }
    }

    /// End of a run of `\r`/`\n` starting at `i`.
    #[inline]
    fn newlines(&self, mut i: usize) -> usize {
        while matches!(self.s.as_bytes().get(i), Some(b'\r' | b'\n')) {
            i += 1;
        }
        i
    }

    /// `\s+(?!\S)|\s+` at `i` (a whitespace char): the run, minus its last char when more
    /// than one char is followed by a non-space.
    #[inline]
    fn spaces(&self, i: usize) -> usize {
        let (mut j, mut last, mut count) = (i, i, 0usize);
        while let Some((_, n, k)) = self.at(j) {
            if k & SPACE == 0 {
                break;
            }
            last = j;
            j += n;
            count += 1;
        }
        if j == self.s.len() || count == 1 {
            j
        } else {
            last
        }
    }
}

/// The high bit of each byte of a `u64`.
const HIGH: u64 = 0x8080_8080_8080_8080;

/// The high bit of each byte of `x` (eight bytes of text, little-endian) that is an ASCII
/// letter, the other bits clear. Each byte is taken without its high bit and lowercased by
/// setting 0x20; adding 0x1F then sets its high bit when it is at least `a`, adding 0x05 when
/// it is past `z` (no carry crosses a byte: each is at most 0x7F + 0x1F); bytes of 0x80 and up
/// (not ASCII) are cleared at the end.
#[inline(always)]
fn ascii_letters(x: u64) -> u64 {
    const LOW7: u64 = 0x7F7F_7F7F_7F7F_7F7F;
    let y = (x & LOW7) | 0x2020_2020_2020_2020;
    let ge_a = y + 0x1F1F_1F1F_1F1F_1F1F;
    let gt_z = y + 0x0505_0505_0505_0505;
    ge_a & !gt_z & !x & HIGH
}

impl Splitter {
    /// The scanner for a `Split` regex pattern string, if it is one of the known ones.
    pub fn from_pattern(pattern: &str) -> Option<Splitter> {
        match pattern {
            GPT2_PATTERN => Some(Splitter::Gpt2),
            QWEN2_PATTERN => Some(Splitter::Cl100k { max_digits: 1 }),
            LLAMA3_PATTERN => Some(Splitter::Cl100k { max_digits: 3 }),
            DEEPSEEK3_PATTERN => Some(Splitter::DeepSeek3),
            _ => None,
        }
    }

    /// Whether every position starts a match, so that [`Splitter::pieces`] applies.
    pub fn covering(self) -> bool {
        !matches!(self, Splitter::DeepSeek3)
    }

    /// The end of the match that starts at byte `i` of `s` (a char boundary), if one does.
    pub fn match_at(self, s: &str, i: usize) -> Option<usize> {
        let scan = Scan { s, cls: classes() };
        let j = match self {
            Splitter::Gpt2 => scan.gpt2(i),
            Splitter::Cl100k { max_digits } => scan.cl100k(i, max_digits),
            Splitter::DeepSeek3 => return scan.deepseek3(i),
        };
        (j > i).then_some(j)
    }

    /// The matches of the pattern in `s`, in order; together they cover `s` (a
    /// [`Splitter::covering`] pattern).
    pub fn pieces(self, s: &str) -> Pieces<'_> {
        debug_assert!(self.covering());
        Pieces {
            scan: Scan { s, cls: classes() },
            splitter: self,
            pos: 0,
        }
    }
}

/// Iterator over the pieces of a string (see [`Splitter::pieces`]).
pub struct Pieces<'a> {
    scan: Scan<'a>,
    splitter: Splitter,
    pos: usize,
}

/// The byte ranges of the pieces of a text, in order, covering it.
pub trait PieceRanges {
    /// The byte range of the next piece (char boundaries of the text).
    fn next_range(&mut self) -> Option<(usize, usize)>;
}

/// [`Splitter::pieces`] of [`LLAMA3_PATTERN`] (`MAX_DIGITS` 3) or [`QWEN2_PATTERN`] (1) with
/// the pattern fixed at compile time: a loop over pieces does not choose the scanner at every
/// piece (a measurable share of a piece's cost), and the scanner is inlined into it.
pub struct Cl100kRanges<'a, const MAX_DIGITS: usize> {
    scan: Scan<'a>,
    pos: usize,
}

impl<'a, const MAX_DIGITS: usize> Cl100kRanges<'a, MAX_DIGITS> {
    /// The pieces of `s`.
    pub fn new(s: &'a str) -> Self {
        Cl100kRanges {
            scan: Scan { s, cls: classes() },
            pos: 0,
        }
    }
}

impl<const MAX_DIGITS: usize> PieceRanges for Cl100kRanges<'_, MAX_DIGITS> {
    #[inline(always)]
    fn next_range(&mut self) -> Option<(usize, usize)> {
        let i = self.pos;
        if i >= self.scan.s.len() {
            return None;
        }
        let j = self.scan.cl100k(i, MAX_DIGITS);
        debug_assert!(j > i, "every position starts a match");
        self.pos = j;
        Some((i, j))
    }
}

impl PieceRanges for Pieces<'_> {
    #[inline(always)]
    fn next_range(&mut self) -> Option<(usize, usize)> {
        Pieces::next_range(self)
    }
}

impl Pieces<'_> {
    /// The byte range of the next piece (char boundaries of the text).
    #[inline(always)]
    pub fn next_range(&mut self) -> Option<(usize, usize)> {
        let i = self.pos;
        if i >= self.scan.s.len() {
            return None;
        }
        let j = match self.splitter {
            Splitter::Gpt2 => self.scan.gpt2(i),
            Splitter::Cl100k { max_digits } => self.scan.cl100k(i, max_digits),
            Splitter::DeepSeek3 => unreachable!("not a covering pattern"),
        };
        debug_assert!(j > i, "every position starts a match");
        self.pos = j;
        Some((i, j))
    }
}

impl<'a> Iterator for Pieces<'a> {
    type Item = &'a str;

    #[inline]
    fn next(&mut self) -> Option<&'a str> {
        let (i, j) = self.next_range()?;
        Some(&self.scan.s[i..j])
    }
}

impl Scan<'_> {
    /// End of the match of [`GPT2_PATTERN`] at `i`.
    fn gpt2(&self, i: usize) -> usize {
        let Some((c, n, k)) = self.at(i) else {
            return i;
        };
        if c == '\'' {
            let b = self.s.as_bytes();
            match (b.get(i + 1), b.get(i + 2)) {
                (Some(b's' | b't' | b'm' | b'd'), _) => return i + 2,
                (Some(b'r' | b'v'), Some(b'e')) | (Some(b'l'), Some(b'l')) => return i + 3,
                _ => {}
            }
        }
        // ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`: the optional space joins a run of
        // whatever non-space class follows it.
        let (start, k) = match (c, self.at(i + n)) {
            (' ', Some((_, _, k2))) if k2 & SPACE == 0 => (i + n, k2),
            _ => (i, k),
        };
        if k & LETTER != 0 {
            self.run(start, |k| k & LETTER != 0)
        } else if k & NUMBER != 0 {
            self.run(start, |k| k & NUMBER != 0)
        } else if k & SPACE == 0 {
            self.run(start, |k| k & (LETTER | NUMBER | SPACE) == 0)
        } else {
            self.spaces(i)
        }
    }

    /// End of the match of [`QWEN2_PATTERN`] / [`LLAMA3_PATTERN`] at `i`.
    #[inline(always)]
    fn cl100k(&self, i: usize, max_digits: usize) -> usize {
        // The commonest pieces first, as the alternation below would match them: an ASCII
        // letter starts `\p{L}+`; a space before one is the optional `[^\r\n\p{L}\p{N}]`.
        let b = self.s.as_bytes();
        let Some(&c) = b.get(i) else {
            return i;
        };
        if c.is_ascii_alphabetic() {
            return self.letters(i + 1);
        }
        let next = b.get(i + 1).copied().unwrap_or(0);
        match c {
            // ` word`; ` ?[^\s\p{L}\p{N}]+[\r\n]*` for ` (`, ` "`... (a space before ASCII
            // punctuation: no letter follows the space, so the optional char is no use).
            b' ' if next.is_ascii_alphabetic() => return self.letters(i + 2),
            b' ' if next.is_ascii_punctuation() => {
                return self.newlines(self.run(i + 1, |k| k & (LETTER | NUMBER | SPACE) == 0))
            }
            // ASCII punctuation but `'` (the contractions): before a letter it is the
            // optional char of `[^\r\n\p{L}\p{N}]?\p{L}+`; before another ASCII char the
            // run of `[^\s\p{L}\p{N}]+[\r\n]*`. Before a non-ASCII char: the general case.
            _ if c.is_ascii_punctuation() && c != b'\'' && next < 0x80 => {
                if next.is_ascii_alphabetic() {
                    return self.letters(i + 2);
                }
                return self.newlines(self.run(i + 1, |k| k & (LETTER | NUMBER | SPACE) == 0));
            }
            // `\p{N}{1,max}` over ASCII digits, while no non-ASCII char (maybe a digit) comes.
            b'0'..=b'9' => {
                let mut j = i + 1;
                while j - i < max_digits && b.get(j).is_some_and(u8::is_ascii_digit) {
                    j += 1;
                }
                if j - i == max_digits || b.get(j).is_none_or(|&x| x < 0x80) {
                    return j;
                }
            }
            // `\s*[\r\n]+` from a newline: the whitespace run up to its last `\r` or `\n`,
            // while the run is ASCII.
            b'\n' | b'\r' => {
                let (mut j, mut end) = (i + 1, i + 1);
                while let Some(&x) = b.get(j) {
                    if x >= 0x80 || self.cls[x as usize] & SPACE == 0 {
                        break;
                    }
                    j += 1;
                    if x == b'\n' || x == b'\r' {
                        end = j;
                    }
                }
                if b.get(j).is_none_or(|&x| x < 0x80) {
                    return end;
                }
            }
            _ => {}
        }
        self.cl100k_general(i, max_digits)
    }

    /// [`Scan::cl100k`] for any start.
    fn cl100k_general(&self, i: usize, max_digits: usize) -> usize {
        let Some((c, n, k)) = self.at(i) else {
            return i;
        };
        // (?i:'s|'t|'re|'ve|'m|'ll|'d)
        if c == '\'' {
            if let Some((c2, n2, _)) = self.at(i + 1) {
                let j = i + 1 + n2;
                match fold(c2) {
                    's' | 't' | 'm' | 'd' => return j,
                    f @ ('r' | 'v' | 'l') => {
                        if let Some((c3, n3, _)) = self.at(j) {
                            if fold(c3) == if f == 'l' { 'l' } else { 'e' } {
                                return j + n3;
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        // [^\r\n\p{L}\p{N}]?\p{L}+
        if k & LETTER != 0 {
            return self.letters(i);
        }
        if k & NUMBER == 0 && c != '\r' && c != '\n' {
            if let Some((_, _, k2)) = self.at(i + n) {
                if k2 & LETTER != 0 {
                    return self.letters(i + n);
                }
            }
        }
        // \p{N}{1,max}
        if k & NUMBER != 0 {
            let mut j = i + n;
            for _ in 1..max_digits {
                match self.at(j) {
                    Some((_, n2, k2)) if k2 & NUMBER != 0 => j += n2,
                    _ => break,
                }
            }
            return j;
        }
        //  ?[^\s\p{L}\p{N}]+[\r\n]*
        let other = |k: u8| k & (LETTER | NUMBER | SPACE) == 0;
        let start = match (c, self.at(i + n)) {
            (' ', Some((_, _, k2))) if other(k2) => Some(i + n),
            _ if other(k) => Some(i),
            _ => None,
        };
        if let Some(start) = start {
            return self.newlines(self.run(start, other));
        }
        // \s*[\r\n]+ : the whitespace run up to and including its last \r or \n.
        let (mut j, mut after_nl) = (i, None);
        while let Some((c2, n2, k2)) = self.at(j) {
            if k2 & SPACE == 0 {
                break;
            }
            j += n2;
            if c2 == '\r' || c2 == '\n' {
                after_nl = Some(j);
            }
        }
        if let Some(end) = after_nl {
            return end;
        }
        // \s+(?!\S)|\s+
        self.spaces(i)
    }

    /// End of the match of [`DEEPSEEK3_PATTERN`] at `i`, if one starts there.
    fn deepseek3(&self, i: usize) -> Option<usize> {
        let (c, n, k) = self.at(i)?;
        let letter_mark = |k: u8| k & (LETTER | MARK) != 0;
        let punct_sym = |k: u8| k & (PUNCT | SYMBOL) != 0;
        // [!-/:-@\[-`{-~][A-Za-z]+
        if c.is_ascii_punctuation()
            && self
                .s
                .as_bytes()
                .get(i + 1)
                .is_some_and(u8::is_ascii_alphabetic)
        {
            let b = self.s.as_bytes();
            let mut j = i + 1;
            while b.get(j).is_some_and(u8::is_ascii_alphabetic) {
                j += 1;
            }
            return Some(j);
        }
        // [^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+ : the optional char, else the run from here.
        let optional = c != '\r' && c != '\n' && k & (LETTER | PUNCT | SYMBOL) == 0;
        if optional {
            if let Some((_, _, k2)) = self.at(i + n) {
                if letter_mark(k2) {
                    return Some(self.run(i + n, letter_mark));
                }
            }
        }
        if letter_mark(k) {
            return Some(self.run(i, letter_mark));
        }
        //  ?[\p{P}\p{S}]+[\r\n]*
        let start = match (c, self.at(i + n)) {
            (' ', Some((_, _, k2))) if punct_sym(k2) => Some(i + n),
            _ if punct_sym(k) => Some(i),
            _ => None,
        };
        if let Some(start) = start {
            return Some(self.newlines(self.run(start, punct_sym)));
        }
        if k & SPACE == 0 {
            return None;
        }
        // \s*[\r\n]+ : the whitespace run up to and including its last \r or \n.
        let (mut j, mut after_nl) = (i, None);
        while let Some((c2, n2, k2)) = self.at(j) {
            if k2 & SPACE == 0 {
                break;
            }
            j += n2;
            if c2 == '\r' || c2 == '\n' {
                after_nl = Some(j);
            }
        }
        if let Some(end) = after_nl {
            return Some(end);
        }
        // \s+(?!\S)|\s+
        Some(self.spaces(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
    use tokenizers::{
        OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer, SplitDelimiterBehavior,
    };

    /// The pieces Oniguruma (through `tokenizers`' `Split`, as the tokenizers run it) cuts.
    fn onig(pattern: &str, s: &str) -> Vec<String> {
        let split = Split::new(
            SplitPattern::Regex(pattern.into()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .unwrap();
        let mut pre = PreTokenizedString::from(s);
        split.pre_tokenize(&mut pre).unwrap();
        pre.get_splits(OffsetReferential::Original, OffsetType::Byte)
            .into_iter()
            .map(|(p, _, _)| p.to_string())
            .collect()
    }

    /// Text around the scanners' ASCII shortcuts: letters, digits (ASCII and not) in runs
    /// longer than three, punctuation before letters and digits, newlines among spaces
    /// (ASCII and not), contractions.
    fn text() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            "[a-zA-Z]{1,10}",
            "[0-9]{1,7}",
            "[0-9]{1,3}[\u{660}-\u{669}\u{b2}\u{bc}\u{ff10}]{1,2}",
            "[ \t\r\n\u{b}\u{c}]{1,6}",
            "[\r\n][ \t]{0,3}[\u{a0}\u{3000}\u{2028}\u{85}]",
            "[!-/:-@\\[-`{-~]{1,3}",
            " [!-/:-@\\[-`{-~]{1,3}[a-z]?",
            "[!-/:-@\\[-`{-~][a-zA-Z\u{e9}\u{4e00}\u{300}]{1,4}",
            "'(s|t|re|ve|m|ll|d|S|T|RE|Ve|M|LL|D|\u{17f}|x)",
            "[\u{e9}\u{df}\u{4e00}-\u{4e05}\u{300}\u{1f600}]{1,3}",
            "[\u{1}-\u{1f}\u{7f}]{1,2}",
            any::<char>().prop_map(|c| c.to_string()),
        ];
        proptest::collection::vec(piece, 0..24).prop_map(|v| v.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn scanners_cut_as_oniguruma(s in text()) {
            for pattern in [LLAMA3_PATTERN, QWEN2_PATTERN, GPT2_PATTERN] {
                let splitter = Splitter::from_pattern(pattern).unwrap();
                let ours: Vec<String> = splitter.pieces(&s).map(str::to_string).collect();
                prop_assert_eq!(ours, onig(pattern, &s), "{} on {:?}", pattern, s);
            }
        }
    }

    #[test]
    fn ascii_letter_mask() {
        for b in 0..=255u8 {
            let x = u64::from_le_bytes([b'a', b, b'a', b'a', b'a', b'a', b'a', b'a']);
            let want = b.is_ascii_alphabetic();
            assert_eq!(ascii_letters(x) & 0x8000 != 0, want, "byte {b:#x}");
            assert_eq!(ascii_letters(x) & !0x8000, HIGH & !0x8000, "byte {b:#x}");
        }
    }
}
