//! The normalizers of `tokenizer.json` that the fast path reproduces: `NFC`, `NFD`, `NFKC`,
//! `NFKD` (the `unicode-normalization-alignments` tables `tokenizers` uses), `Prepend`,
//! `Replace` and nested `Sequence`s, each the `tokenizers` (0.23) step of the same name, run
//! without `NormalizedString`'s offset tracking. Anything else is refused with its name, and
//! the caller falls back to `tokenizers`.

use std::borrow::Cow;

use serde_json::Value;
use unicode_normalization_alignments::{
    is_nfc_quick, is_nfkc_quick, IsNormalized, UnicodeNormalization,
};

use super::pretokenize::{kind, Matcher};

/// One normalizer step.
#[derive(Debug)]
pub enum Norm {
    /// `NFC`.
    Nfc,
    /// `NFD`.
    Nfd,
    /// `NFKC`.
    Nfkc,
    /// `NFKD`.
    Nfkd,
    /// `Prepend`: before non-empty text.
    Prepend(String),
    /// `Replace`: each match by `content`.
    Replace {
        /// The pattern.
        matcher: Matcher,
        /// Its replacement.
        content: String,
    },
}

/// The normalizer, flattened.
#[derive(Debug, Default)]
pub struct Normalizer {
    /// The steps, in order.
    pub steps: Vec<Norm>,
}

fn flatten_norm(n: &Value, out: &mut Vec<Norm>) -> Result<(), String> {
    match kind(n) {
        "Sequence" => {
            for m in n
                .get("normalizers")
                .and_then(Value::as_array)
                .ok_or("normalizer Sequence without a list")?
            {
                flatten_norm(m, out)?;
            }
        }
        "NFC" => out.push(Norm::Nfc),
        "NFD" => out.push(Norm::Nfd),
        "NFKC" => out.push(Norm::Nfkc),
        "NFKD" => out.push(Norm::Nfkd),
        "Prepend" => out.push(Norm::Prepend(
            n.get("prepend")
                .and_then(Value::as_str)
                .ok_or("Prepend without a string")?
                .to_string(),
        )),
        "Replace" => out.push(Norm::Replace {
            matcher: Matcher::from_json(n.get("pattern").ok_or("Replace without a pattern")?)?,
            content: n
                .get("content")
                .and_then(Value::as_str)
                .ok_or("Replace without content")?
                .to_string(),
        }),
        other => return Err(format!("normalizer {other} ({n})")),
    }
    Ok(())
}

impl Normalizer {
    /// Read the `normalizer` section (already known to load in `tokenizers`).
    pub fn from_json(n: Option<&Value>) -> Result<Normalizer, String> {
        let mut steps = Vec::new();
        if let Some(n) = n.filter(|n| !n.is_null()) {
            flatten_norm(n, &mut steps)?;
        }
        Ok(Normalizer { steps })
    }

    /// Whether it only ever changes text by replacing it (no `Prepend` or `Replace` that may
    /// remove the first character): the start of a normalised piece is the start of its text.
    pub fn keeps_start(&self) -> bool {
        self.steps
            .iter()
            .all(|s| matches!(s, Norm::Nfc | Norm::Nfd | Norm::Nfkc | Norm::Nfkd))
    }

    /// The normalised `s`.
    pub fn apply<'s>(&self, s: &'s str) -> Cow<'s, str> {
        let mut cur: Cow<'s, str> = Cow::Borrowed(s);
        let mut matches = Vec::new();
        for step in &self.steps {
            let next: Option<String> = match step {
                Norm::Nfc => (!cur.is_ascii() && is_nfc_quick(cur.chars()) != IsNormalized::Yes)
                    .then(|| cur.nfc().map(|(c, _)| c).collect()),
                Norm::Nfkc => (!cur.is_ascii() && is_nfkc_quick(cur.chars()) != IsNormalized::Yes)
                    .then(|| cur.nfkc().map(|(c, _)| c).collect()),
                Norm::Nfd => (!cur.is_ascii()).then(|| cur.nfd().map(|(c, _)| c).collect()),
                Norm::Nfkd => (!cur.is_ascii()).then(|| cur.nfkd().map(|(c, _)| c).collect()),
                Norm::Prepend(p) => (!cur.is_empty()).then(|| format!("{p}{cur}")),
                Norm::Replace { matcher, content } => {
                    matcher.find_matches(&cur, &mut matches);
                    matches.iter().any(|m| m.2).then(|| {
                        let mut out = String::with_capacity(cur.len());
                        for &(a, b, m) in &matches {
                            out.push_str(if m { content } else { &cur[a..b] });
                        }
                        out
                    })
                }
            };
            if let Some(n) = next {
                cur = Cow::Owned(n);
            }
        }
        cur
    }
}
