//! The `openai` format read straight from a record's JSON text, without a
//! `serde_json::Value` tree: one pass over the text, strings without escapes borrowed from
//! it, the rest decoded once into an arena the caller reuses. Only the common shape is read
//! here: an object with `messages` (an array of objects with a string `role` and `content`,
//! an optional `loss`) and perhaps `tools: null`, every other key holding a string, `true`,
//! `false` or `null`.
//! Any other record gives `None` and goes through the `Value` mapping
//! ([`crate::format::Format::to_turns`]), which owns every message and error; so does a
//! record this reader finds any fault in (JSON `serde_json` would refuse, a repeated key,
//! which the `Value` map resolves by keeping the last). Where this reader answers, its turns
//! are those of that mapping (same rules: `openai_map_fn`'s), and the text is JSON that
//! `serde_json` reads to the same values: strings hold no raw control character, escapes are
//! JSON's, `\u` surrogates come in pairs, nothing but whitespace follows the object.

use std::ops::Range;

/// A string of the record: a slice of its text where it has no escape, else decoded into the
/// record's arena (one buffer reused from record to record: no allocation per string).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Text<'a> {
    /// Borrowed from the record's text.
    Raw(&'a str),
    /// Bytes of the arena.
    Decoded(Range<usize>),
    /// Consecutive user messages joined (rare).
    Joined(String),
}

impl Default for Text<'_> {
    fn default() -> Self {
        Text::Raw("")
    }
}

impl<'a> Text<'a> {
    /// The string, given the arena [`turns`] decoded into.
    pub(crate) fn get<'s>(&'s self, arena: &'s str) -> &'s str
    where
        'a: 's,
    {
        match self {
            Text::Raw(s) => s,
            Text::Decoded(r) => &arena[r.clone()],
            Text::Joined(s) => s,
        }
    }
}

/// One turn of an `openai` record (its strings resolved with [`Text::get`]).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct BorrowedTurn<'a> {
    /// System text ("" = none).
    pub system: Text<'a>,
    /// User text (consecutive user messages joined).
    pub input: Text<'a>,
    /// Assistant text.
    pub output: Text<'a>,
    /// Whether the output is trained (the message's `loss`).
    pub output_with_loss: bool,
}

/// The turns of the `openai` record `text`, or `None` when this reader leaves the record to
/// the `Value` mapping (see the module doc). An empty list: no assistant answer (dropped).
/// Strings with escapes are decoded into `arena` (cleared first).
pub(crate) fn turns<'a>(text: &'a str, arena: &mut String) -> Option<Vec<BorrowedTurn<'a>>> {
    arena.clear();
    let mut p = Scanner { text, at: 0, arena };
    let record = p.record()?;
    if !matches!(record.tools, Field::Absent | Field::Null) {
        return None;
    }
    map_messages(record.messages, arena)
}

/// `openai_map_fn` on parsed messages, as the `Value` mapping applies it.
fn map_messages<'a>(msgs: Vec<Message<'a>>, arena: &str) -> Option<Vec<BorrowedTurn<'a>>> {
    let start = msgs
        .iter()
        .position(|m| m.role.get(arena) != "assistant")
        .unwrap_or(msgs.len());
    let mut system = Text::default();
    let mut input = Text::default();
    let mut out = Vec::new();
    for m in msgs.into_iter().skip(start) {
        match m.role.get(arena) {
            "system" => {
                system = match m.content {
                    Field::Absent | Field::Null => Text::default(),
                    Field::Str(s) => s,
                    Field::Bool(_) => return None,
                }
            }
            "user" => {
                let Field::Str(s) = m.content else {
                    return None;
                };
                input = if input.get(arena).is_empty() {
                    s
                } else {
                    Text::Joined([input.get(arena), s.get(arena)].concat())
                };
            }
            "assistant" => {
                let Field::Str(output) = m.content else {
                    return None;
                };
                out.push(BorrowedTurn {
                    system: std::mem::take(&mut system),
                    input: std::mem::take(&mut input),
                    output,
                    output_with_loss: m.loss.openai_loss(arena),
                });
            }
            _ => return None,
        }
    }
    Some(out)
}

/// A record: `messages` and `tools`.
struct Record<'a> {
    messages: Vec<Message<'a>>,
    tools: Field<'a>,
}

/// A message: `role`, `content`, `loss`.
struct Message<'a> {
    role: Text<'a>,
    content: Field<'a>,
    loss: Field<'a>,
}

/// A JSON value this reader takes: a string, a literal, or no value at all.
#[derive(Debug, Default)]
enum Field<'a> {
    /// The key is not in the object.
    #[default]
    Absent,
    Null,
    Bool(bool),
    Str(Text<'a>),
}

impl Field<'_> {
    /// `openai_map_fn`'s loss rule: `str(msg.get("loss", "True")).lower() == "true"`.
    fn openai_loss(&self, arena: &str) -> bool {
        match self {
            Field::Absent => true,
            Field::Bool(b) => *b,
            Field::Str(s) => s.get(arena).to_lowercase() == "true",
            Field::Null => false,
        }
    }
}

/// The keys this reader looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Key {
    Messages,
    Tools,
    Role,
    Content,
    Loss,
    Other,
}

/// Set a field once: a repeated key is left to the `Value` mapping.
fn set_once<'a>(slot: &mut Field<'a>, value: Field<'a>) -> Option<()> {
    if !matches!(slot, Field::Absent) {
        return None;
    }
    *slot = value;
    Some(())
}

/// A cursor over the record's text; every method returns `None` on anything it does not take.
struct Scanner<'a, 'b> {
    text: &'a str,
    at: usize,
    arena: &'b mut String,
}

impl<'a> Scanner<'a, '_> {
    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.at).copied()
    }

    /// Skip JSON whitespace (space, tab, line feed, carriage return).
    fn blank(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.at += 1;
        }
    }

    /// Whitespace, then `c`.
    fn eat(&mut self, c: u8) -> Option<()> {
        self.blank();
        (self.peek()? == c).then(|| self.at += 1)
    }

    /// Whitespace, then `c` if it is there.
    fn eat_if(&mut self, c: u8) -> bool {
        self.blank();
        let hit = self.peek() == Some(c);
        self.at += hit as usize;
        hit
    }

    /// `{ "key": value, ... }`, calling `entry` for each key with the cursor at its value.
    fn object(&mut self, mut entry: impl FnMut(&mut Self, Key) -> Option<()>) -> Option<()> {
        self.eat(b'{')?;
        if self.eat_if(b'}') {
            return Some(());
        }
        loop {
            self.eat(b'"')?;
            let key = self.key()?;
            self.eat(b':')?;
            entry(self, key)?;
            if self.eat_if(b'}') {
                return Some(());
            }
            self.eat(b',')?;
        }
    }

    /// The whole text: one record object, nothing but whitespace after it.
    fn record(&mut self) -> Option<Record<'a>> {
        let (mut messages, mut tools) = (None, Field::Absent);
        self.object(|p, key| match key {
            Key::Messages if messages.is_none() => {
                messages = Some(p.messages()?);
                Some(())
            }
            Key::Tools => set_once(&mut tools, p.field()?),
            Key::Messages => None,
            _ => p.field().map(drop),
        })?;
        self.blank();
        if self.at != self.text.len() {
            return None;
        }
        Some(Record {
            messages: messages?,
            tools,
        })
    }

    /// `[ message, ... ]`.
    fn messages(&mut self) -> Option<Vec<Message<'a>>> {
        self.eat(b'[')?;
        let mut out = Vec::new();
        if self.eat_if(b']') {
            return Some(out);
        }
        loop {
            out.push(self.message()?);
            if self.eat_if(b']') {
                return Some(out);
            }
            self.eat(b',')?;
        }
    }

    fn message(&mut self) -> Option<Message<'a>> {
        let (mut role, mut content, mut loss) = (Field::Absent, Field::Absent, Field::Absent);
        self.object(|p, key| match key {
            Key::Role => set_once(&mut role, p.field()?),
            Key::Content => set_once(&mut content, p.field()?),
            Key::Loss => set_once(&mut loss, p.field()?),
            _ => p.field().map(drop),
        })?;
        let Field::Str(role) = role else {
            return None;
        };
        Some(Message {
            role,
            content,
            loss,
        })
    }

    /// A string, `true`, `false` or `null`.
    fn field(&mut self) -> Option<Field<'a>> {
        self.blank();
        let rest = &self.text.as_bytes()[self.at..];
        for (word, value) in [
            (&b"null"[..], Field::Null),
            (b"true", Field::Bool(true)),
            (b"false", Field::Bool(false)),
        ] {
            if rest.starts_with(word) {
                self.at += word.len();
                return Some(value);
            }
        }
        self.eat(b'"')?;
        self.string().map(Field::Str)
    }

    /// A key after its opening quote, as the keys this reader looks at (a decoded key leaves
    /// nothing in the arena).
    fn key(&mut self) -> Option<Key> {
        let mark = self.arena.len();
        let key = self.string()?;
        let key = match key.get(self.arena) {
            "messages" => Key::Messages,
            "tools" => Key::Tools,
            "role" => Key::Role,
            "content" => Key::Content,
            "loss" => Key::Loss,
            _ => Key::Other,
        };
        self.arena.truncate(mark);
        Some(key)
    }

    /// The rest of a string whose opening quote was read: borrowed where it has no escape,
    /// else decoded onto the arena.
    fn string(&mut self) -> Option<Text<'a>> {
        let start = self.at;
        let end = self.plain_run();
        self.at = end;
        if self.peek()? == b'"' {
            self.at += 1;
            return Some(Text::Raw(&self.text[start..end]));
        }
        let from = self.arena.len();
        self.arena.push_str(&self.text[start..end]);
        loop {
            match self.peek()? {
                b'"' => {
                    self.at += 1;
                    return Some(Text::Decoded(from..self.arena.len()));
                }
                b'\\' => {
                    self.at += 1;
                    self.escape()?;
                }
                _ => return None, // a control character
            }
            let run = self.at;
            self.at = self.plain_run();
            self.arena.push_str(&self.text[run..self.at]);
        }
    }

    /// Where the run of string bytes from the cursor ends: at the first `"`, `\\` or control
    /// character (or the end of the text).
    fn plain_run(&self) -> usize {
        self.at + first_special(&self.text.as_bytes()[self.at..])
    }

    /// One escape after its backslash, decoded onto the arena.
    fn escape(&mut self) -> Option<()> {
        let c = self.peek()?;
        self.at += 1;
        let ch = match c {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let hi = self.hex4()?;
                match hi {
                    0xD800..=0xDBFF => {
                        // A leading surrogate: only a trailing one may follow.
                        if !self.text.as_bytes()[self.at..].starts_with(b"\\u") {
                            return None;
                        }
                        self.at += 2;
                        let lo = self.hex4()?;
                        if !(0xDC00..=0xDFFF).contains(&lo) {
                            return None;
                        }
                        char::from_u32(0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00))?
                    }
                    0xDC00..=0xDFFF => return None,
                    _ => char::from_u32(hi)?,
                }
            }
            _ => return None,
        };
        self.arena.push(ch);
        Some(())
    }

    /// Four hex digits of a `\u` escape.
    fn hex4(&mut self) -> Option<u32> {
        let digits = self.text.as_bytes().get(self.at..self.at + 4)?;
        let mut v = 0u32;
        for &d in digits {
            v = v * 16 + (d as char).to_digit(16)?;
        }
        self.at += 4;
        Some(v)
    }
}

/// Whether a byte ends a run of plain string bytes: `"`, `\\` or a control character.
fn is_special(b: u8) -> bool {
    b == b'"' || b == b'\\' || b < 0x20
}

/// The index of the first [`is_special`] byte of `bytes` (its length if none): 16 bytes at a
/// time, one pass for all three tests (runs between escapes are short in chat text, where a
/// `memchr2` call per run and a second pass for control characters cost more).
fn first_special(bytes: &[u8]) -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{
            __m128i, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_max_epu8, _mm_movemask_epi8,
            _mm_or_si128, _mm_set1_epi8,
        };
        let mut i = 0;
        while i + 16 <= bytes.len() {
            // SAFETY: SSE2 is part of the x86_64 baseline; the unaligned load reads
            // `bytes[i..i + 16]`, in bounds by the loop condition.
            let hits = unsafe {
                let x = _mm_loadu_si128(bytes.as_ptr().add(i) as *const __m128i);
                let quote = _mm_cmpeq_epi8(x, _mm_set1_epi8(b'"' as i8));
                let slash = _mm_cmpeq_epi8(x, _mm_set1_epi8(b'\\' as i8));
                // x <= 0x1f (unsigned) exactly where max(x, 0x1f) == 0x1f.
                let low = _mm_set1_epi8(0x1f);
                let ctrl = _mm_cmpeq_epi8(_mm_max_epu8(x, low), low);
                _mm_movemask_epi8(_mm_or_si128(_mm_or_si128(quote, slash), ctrl)) as u32
            };
            if hits != 0 {
                return i + hits.trailing_zeros() as usize;
            }
            i += 16;
        }
        i + bytes[i..]
            .iter()
            .position(|&b| is_special(b))
            .unwrap_or(bytes.len() - i)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        bytes
            .iter()
            .position(|&b| is_special(b))
            .unwrap_or(bytes.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::Format;
    use serde_json::Value;

    /// This reader's turns (strings resolved), or `None`, next to the `Value` mapping's.
    #[allow(clippy::type_complexity)]
    fn both(
        text: &str,
    ) -> (
        Option<Vec<(String, String, String, bool)>>,
        Result<Vec<crate::format::Turn>, String>,
    ) {
        let slow = serde_json::from_str::<Value>(text)
            .map_err(|e| e.to_string())
            .and_then(|v| Format::OpenAi.to_turns(&v));
        let mut arena = String::from("left over from the last record");
        let fast = turns(text, &mut arena).map(|ts| {
            ts.iter()
                .map(|t| {
                    (
                        t.system.get(&arena).to_string(),
                        t.input.get(&arena).to_string(),
                        t.output.get(&arena).to_string(),
                        t.output_with_loss,
                    )
                })
                .collect()
        });
        (fast, slow)
    }

    /// Where this reader answers, the `Value` mapping gives the same turns.
    fn agrees(text: &str) -> bool {
        let (fast, slow) = both(text);
        let Some(fast) = fast else {
            return false;
        };
        let slow = slow.expect("the Value mapping accepts what the fast reader accepts");
        assert_eq!(fast.len(), slow.len(), "{text}");
        for (f, s) in fast.iter().zip(&slow) {
            assert_eq!(
                (&*f.0, &*f.1, &*f.2, f.3),
                (&*s.system, &*s.input, &*s.output, s.output_with_loss),
                "{text}"
            );
            assert!(s.need_eos_token && s.sep.is_empty());
        }
        true
    }

    #[test]
    fn common_records_read_as_the_value_mapping_reads_them() {
        for text in [
            r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo\n\u00e9"}]}"#,
            "\t{\"id\": \"x\", \"messages\":[{\"role\":\"assistant\",\"content\":true},{\"role\":\"system\",\"content\":null},\r\n\
                {\"role\":\"user\",\"content\":\"a\"}, {\"role\": \"user\", \"content\": \"b\\\"c\\\\d\\/\"},\n\
                {\"role\":\"assistant\",\"content\":\"A1\",\"loss\":\"FALSE\",\"extra\":null},\
                {\"role\":\"system\",\"content\":\"S\"},{\"role\":\"user\",\"content\":\"q\\ud83d\\ude00\\u0000\"},\
                {\"role\":\"assistant\",\"content\":\"A2\",\"loss\":null},{\"role\":\"user\",\"content\":\"dangling\"}],\
                \"tools\": null, \"flag\": false} \n",
            r#"{"messages": [{"content": "q", "role": "user"}, {"role": "assistant", "content": "a", "loss": "True"},
                {"role": "user", "content": "q2"}, {"role": "assistant", "content": "b", "loss": false}]}"#,
            r#"{"messages": [{"role": "system"}, {"role": "user", "content": ""}, {"role": "assistant", "content": ""}]}"#,
            r#"{"m\u0065ssages": [{"r\u006fle": "user", "content": "k"}, {"role": "assistant", "content": "v"}]}"#,
            r#"{"messages": []}"#,
            r#"{"messages": [{"role": "user", "content": "only a question"}]}"#,
        ] {
            assert!(agrees(text), "the fast reader declined {text}");
        }
    }

    #[test]
    fn other_records_are_left_to_the_value_mapping() {
        for text in [
            // not an object, or messages not a list of objects
            r#"[{"messages": []}]"#,
            r#"{"messages": [["user", "hi"]]}"#,
            r#"{"messages": "x"}"#,
            r#"{"text": "x"}"#,
            r#"{}"#,
            // shapes the mapping refuses (it owns the message)
            r#"{"messages": [{"role": "user", "content": null}, {"role": "assistant", "content": "a"}]}"#,
            r#"{"messages": [{"role": "tool", "content": "x"}]}"#,
            r#"{"messages": [{"role": 1, "content": "x"}]}"#,
            r#"{"messages": [{"role": "system", "content": true}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}"#,
            // tools go through the template path that refuses or renders them
            r#"{"messages": [], "tools": []}"#,
            r#"{"messages": [], "tools": "[]"}"#,
            // values this reader does not take: numbers, arrays, objects
            r#"{"id": 3, "messages": []}"#,
            r#"{"messages": [{"role": "user", "content": "q", "loss": 1}, {"role": "assistant", "content": "a"}]}"#,
            r#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "q"}]}]}"#,
            // repeated keys: the Value map keeps the last one
            r#"{"messages": [{"role": "user", "content": "a", "content": "b"}, {"role": "assistant", "content": "c"}]}"#,
            r#"{"messages": [], "messages": []}"#,
            r#"{"messages": [], "tools": null, "tools": null}"#,
            // what from_str::<Value> refuses: trailing text, bad escapes, raw control
            // characters, lone or broken surrogates, unterminated or malformed text
            r#"{"messages": []} x"#,
            r#"{"messages": [],}"#,
            r#"{"messages": [{"role": "user", "content": "a"},]}"#,
            r#"{"messages": [{"role": "user", "content": "\x"}]}"#,
            "{\"messages\": [{\"role\": \"user\", \"content\": \"a\tb\"}]}",
            r#"{"messages": [{"role": "user", "content": "\ud800"}]}"#,
            r#"{"messages": [{"role": "user", "content": "\ud800\u0041"}]}"#,
            r#"{"messages": [{"role": "user", "content": "\udc00"}]}"#,
            r#"{"messages": [{"role": "user", "content": "\u12g4"}]}"#,
            r#"{"messages": [{"role": "user", "content": "abc"#,
            r#"{"messages": [{"role": "user", "content": nul}]}"#,
            r#"{"messages": [{"role": "user" "content": "a"}]}"#,
        ] {
            assert!(both(text).0.is_none(), "the fast reader answered {text}");
        }
    }

    #[test]
    fn first_special_finds_the_first_quote_backslash_or_control_character() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let len = (next() % 80) as usize;
            // Mostly plain bytes (ASCII and high bytes), a special one now and then.
            let bytes: Vec<u8> = (0..len)
                .map(|_| match next() % 40 {
                    0 => b'"',
                    1 => b'\\',
                    2 => (next() % 0x20) as u8,
                    3 => 0x20,
                    4 => 0x7f,
                    5 => 0xff,
                    _ => 0x21 + (next() % 0xdf) as u8,
                })
                .collect();
            let want = bytes
                .iter()
                .position(|&b| is_special(b))
                .unwrap_or(bytes.len());
            assert_eq!(first_special(&bytes), want, "{bytes:?}");
        }
    }

    #[test]
    fn unescaped_text_is_borrowed_and_escaped_text_decoded_into_the_arena() {
        let mut arena = String::new();
        let text = r#"{"messages": [{"role": "user", "content": "q"}, {"r\u006fle": "assistant", "content": "a\nb"}]}"#;
        let t = turns(text, &mut arena).unwrap();
        assert_eq!(t[0].input, Text::Raw("q"));
        // The decoded key left nothing behind: the arena holds the output alone.
        assert_eq!(t[0].output, Text::Decoded(0..3));
        assert_eq!(arena, "a\nb");
    }

    /// Strings of quotes, backslashes, control characters, escapes of every kind (valid or
    /// not), multi-byte text and surrogate pairs: this reader decodes each as `serde_json`
    /// does, or declines where `serde_json` refuses.
    #[test]
    fn strings_decode_as_serde_json_decodes_them() {
        const PIECES: &[&str] = &[
            "a",
            "é",
            "语",
            "😀",
            " ",
            "\"",
            "\\",
            "/",
            "\u{7f}",
            "\\n",
            "\\t",
            "\\\"",
            "\\\\",
            "\\/",
            "\\b",
            "\\f",
            "\\r",
            "\\u0041",
            "\\u00E9",
            "\\u8bed",
            "\\ud83d\\ude00",
            "\\uD83D\\uDE00",
            "\\u0000",
            "\\u001f",
            "\n",
            "\u{1}",
            "\\ud83d",
            "\\ude00",
            "\\x",
            "\\u12",
            "\\",
        ];
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let (mut same, mut declined) = (0, 0);
        for _ in 0..20_000 {
            let len = next() % 12;
            let body: String = (0..len)
                .map(|_| PIECES[(next() % PIECES.len() as u64) as usize])
                .collect();
            let text = format!(
                r#"{{"messages": [{{"role": "user", "content": "{body}"}}, {{"role": "assistant", "content": "x"}}]}}"#
            );
            let want = serde_json::from_str::<Value>(&text)
                .ok()
                .map(|v| v["messages"][0]["content"].as_str().unwrap().to_string());
            match (both(&text).0, want) {
                (Some(t), Some(w)) => {
                    assert_eq!(t[0].1, w, "{text}");
                    same += 1;
                }
                (None, None) => declined += 1,
                (got, want) => panic!("{text}: fast {got:?}, serde_json {want:?}"),
            }
        }
        // Both kinds of case were met.
        assert!(
            same > 1000 && declined > 1000,
            "{same} decoded, {declined} refused"
        );
    }
}
