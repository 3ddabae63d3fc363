//! What a pack run reports: its statistics and its progress.

use serde::Serialize;

/// What a pack run did. Token accounting: tokens + truncated_tokens + dropped_tokens is every
/// token the encoder produced.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct PackStats {
    /// Records read from all inputs (including skipped ones).
    pub records: u64,
    /// Samples written.
    pub samples: u64,
    /// Tokens written.
    pub tokens: u64,
    /// Tokens with loss.
    pub loss_tokens: u64,
    /// Packs written.
    pub packs: u64,
    /// tokens / (packs × max_length).
    pub fill: f64,
    /// Samples split across packs (0 by construction; reported so it can be checked).
    pub split_samples: u64,
    /// Samples longer than max_length (cut, kept if they still train something).
    pub truncated_samples: u64,
    /// Tokens cut by truncation.
    pub truncated_tokens: u64,
    /// Samples dropped: no conversation (e.g. `<nooutput>`) or no trained token.
    pub dropped_samples: u64,
    /// Tokens of dropped samples.
    pub dropped_tokens: u64,
    /// Bad records skipped (`skip_bad`).
    pub skipped_records: u64,
    /// Bad files skipped (`skip_bad`): empty or unparseable as a whole.
    pub skipped_files: u64,
    /// The first few skip reasons, each naming file and line.
    pub skipped_examples: Vec<String>,
    /// Wall time.
    pub seconds: f64,
    /// tokens / seconds.
    pub tokens_per_second: f64,
    /// Wall time loading the tokenizer and template (0 for merge-packs).
    #[serde(default)]
    pub load_seconds: f64,
    /// Wall time reading, parsing, templating, tokenizing and staging the samples.
    #[serde(default)]
    pub encode_seconds: f64,
    /// Wall time planning, writing, hashing and committing the packs.
    #[serde(default)]
    pub write_seconds: f64,
    /// Fingerprint of the output.
    pub fingerprint: String,
    /// Preference pairs written (each is two samples: chosen, rejected); 0 without pairs.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub pairs: u64,
    /// Pairs cut to fit `max_length` (their cut samples count in `truncated_samples`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub truncated_pairs: u64,
    /// Pairs dropped: prompts too long to leave a trained token on each side, or a side that
    /// trains nothing; each also counts 2 in `dropped_samples`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dropped_pairs: u64,
    /// Per-source figures of a mix (empty without one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mix: Vec<crate::pack::mix::MixSourceStats>,
}

/// Progress report: `done` of `total` units (input bytes while encoding, packs while writing).
#[derive(Clone, Copy, Debug)]
pub struct Progress<'a> {
    /// Pipeline stage: "encode" or "write".
    pub stage: &'a str,
    /// Units done.
    pub done: u64,
    /// Units in all.
    pub total: u64,
}

/// Pair counts are absent from the statistics of packs without pairs, so those keep their
/// meta.json byte for byte.
fn is_zero(n: &u64) -> bool {
    *n == 0
}
