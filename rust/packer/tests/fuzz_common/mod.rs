//! Shared pieces of the fuzz harnesses: seed corpora, byte mutators and the case
//! budget. The harnesses are proptest properties "never a panic, always `Ok` or an `Error`":
//! proptest runs each input under `catch_unwind`, so a panic fails the test and is shrunk to
//! a minimal input. The toolchain here is stable Rust only, so instead of cargo-fuzz's
//! coverage feedback the inputs are structure-aware: valid seeds plus byte-level mutations
//! (flip, insert, delete, truncate, splice of interesting bytes).
//!
//! `FUZZ_CASES=N` sets cases per target (default 256, a few seconds in the test run); the
//! long run in docs/RELIABILITY.md uses `FUZZ_CASES=100000`.

#![allow(dead_code)]

use proptest::prelude::*;

/// Cases per fuzz target: `FUZZ_CASES` or 256.
pub fn cases() -> u32 {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(256)
}

/// A proptest config with [`cases`] cases and no persisted failure files (the harness runs
/// from the crate's tests dir; regressions found are kept as explicit unit tests instead).
pub fn config() -> ProptestConfig {
    ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        max_shrink_iters: 2000,
        ..ProptestConfig::default()
    }
}

/// One byte-level edit.
#[derive(Clone, Debug)]
pub enum Edit {
    /// XOR a byte with a non-zero mask.
    Flip(usize, u8),
    /// Overwrite a byte with an "interesting" one.
    Set(usize, u8),
    /// Insert bytes.
    Insert(usize, Vec<u8>),
    /// Delete a range.
    Delete(usize, usize),
    /// Keep only a prefix.
    Truncate(usize),
    /// Duplicate a range at another place.
    Splice(usize, usize, usize),
}

const INTERESTING: &[u8] = b"\x00\xff\x7f\x80\n\r\"\\{}[],:-0123456789eE.+ \t\xef\xbb\xbf\xe2";

fn interesting_byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        3 => proptest::sample::select(INTERESTING),
        1 => any::<u8>(),
    ]
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        4 => (any::<usize>(), 1u8..=255).prop_map(|(p, m)| Edit::Flip(p, m)),
        3 => (any::<usize>(), interesting_byte()).prop_map(|(p, b)| Edit::Set(p, b)),
        2 => (any::<usize>(), proptest::collection::vec(interesting_byte(), 1..8))
            .prop_map(|(p, b)| Edit::Insert(p, b)),
        2 => (any::<usize>(), 1usize..16).prop_map(|(p, n)| Edit::Delete(p, n)),
        1 => any::<usize>().prop_map(Edit::Truncate),
        1 => (any::<usize>(), any::<usize>(), 1usize..32).prop_map(|(a, b, n)| Edit::Splice(a, b, n)),
    ]
}

/// Apply `edits` to a copy of `seed`.
pub fn mutate(seed: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut d = seed.to_vec();
    for e in edits {
        let n = d.len();
        match e {
            Edit::Flip(p, m) if n > 0 => d[p % n] ^= m,
            Edit::Set(p, b) if n > 0 => d[p % n] = *b,
            Edit::Insert(p, b) => {
                let at = p % (n + 1);
                d.splice(at..at, b.iter().copied());
            }
            Edit::Delete(p, k) if n > 0 => {
                let at = p % n;
                d.drain(at..(at + k).min(n));
            }
            Edit::Truncate(p) => d.truncate(p % (n + 1)),
            Edit::Splice(a, b, k) if n > 0 => {
                let (a, b) = (a % n, b % (n + 1));
                let chunk: Vec<u8> = d[a..(a + k).min(n)].to_vec();
                d.splice(b..b, chunk);
            }
            _ => {}
        }
    }
    d
}

/// A seed picked from `seeds`, mutated by 0..=8 edits, or (1 in 8) raw random bytes.
pub fn mutated(seeds: &'static [&'static [u8]]) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        7 => (
            proptest::sample::select(seeds),
            proptest::collection::vec(edit(), 0..=8)
        )
            .prop_map(|(s, e)| mutate(s, &e)),
        1 => proptest::collection::vec(interesting_byte(), 0..256),
    ]
}

/// Keys of every supported format, so generated JSON objects hit every mapping's fields.
pub const KEYS: &[&str] = &[
    "conversation",
    "system",
    "input",
    "output",
    "output_with_loss",
    "need_eos_token",
    "sep",
    "messages",
    "role",
    "content",
    "loss",
    "instruction",
    "text",
    "instruction_zh",
    "input_zh",
    "output_zh",
    "prompt",
    "completion",
    "response",
    "question",
    "answer",
    "context",
    "system_prompt",
    "abstract",
    "title",
    "description",
    "color",
    "conversations",
    "from",
    "value",
    "image",
    "id",
    "tools",
    "name",
];

/// Arbitrary JSON values shaped like records: objects keyed by [`KEYS`], nested to depth 4,
/// with strings drawn from role names, template braces and odd Unicode.
pub fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        prop_oneof![
            proptest::sample::select(
                &[
                    "user",
                    "assistant",
                    "system",
                    "human",
                    "gpt",
                    "tool",
                    "function",
                    "<nooutput>",
                    "",
                    " ",
                    "{input}",
                    "{round}",
                    "{{",
                    "}",
                    "<image>",
                    "### Human: a ### Assistant: b",
                    "\u{2028}",
                    "\u{0}",
                    "é",
                    "true",
                    "false",
                    "\n",
                ][..]
            )
            .prop_map(|s| s.to_string()),
            "\\PC{0,12}",
        ]
        .prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            proptest::collection::vec((proptest::sample::select(KEYS), inner), 0..7).prop_map(
                |kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
            ),
        ]
    })
}
