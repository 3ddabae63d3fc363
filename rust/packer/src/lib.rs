//! pyfast-tune's data engine: read JSON/JSONL, Parquet, Arrow IPC and CSV/TSV data, map
//! dataset formats and prompt templates with XTuner's semantics, tokenize in parallel, and
//! pack whole samples into an mmap-able directory — deterministically, whatever the thread
//! count.
//!
//! The modules follow the pipeline ([`pack`] reads top to bottom): [`PackConfig`] → input
//! files (`input`) → records (`source`: JSON, CSV, Parquet, Arrow IPC, pre-tokenized) →
//! turns (`format`) → templated, tokenized samples (`template`, `tokenize`) → packs
//! (`pack`) → the packed directory (`packed_dir`). Only this facade and the few modules
//! below are public; the crate knows nothing of Python (`rust/packer-py` is its only
//! binding).
#![deny(missing_docs)]

mod config;
mod error;
mod format;
mod input;
mod pack;
mod packed_dir;
mod pipeline;
mod source;
mod template;
mod tokenize;

pub use config::{MixSource, PackConfig, SourceInfo};
pub use error::{Error, Result};
pub use pack::fingerprint::fingerprint;
pub use pack::mix::MixSourceStats;
pub use pack::shard::merge;
pub use pack::shard::ranged::{
    finish_ranged, plan as plan_ranged, write_range, Planned, RangeHashes, DEFAULT_BLOCK_TOKENS,
};
pub use pack::stats::{PackStats, Progress};
pub use packed_dir::verify::verify;
pub use pipeline::{pack, pack_fetching};
pub use source::fetch::Fetch;
pub use tokenize::TokenizerBackend;

/// Facts of the engine that front ends bind instead of copying: the packed directory's
/// files and format version, the accepted format and template names, and the tokens the
/// encoder treats specially.
pub mod facts {
    pub use crate::format::Format;
    pub use crate::input::DATA_EXTENSIONS;
    pub use crate::packed_dir::layout::{
        BINARY_FILES, BINARY_LAYOUT, FORMAT_VERSION, IMAGES, INPUT_IDS, LOSS_MASK, META,
        OPTIONAL_LAYOUT, PACKS, PACK_SAMPLES, PAIRS, SAMPLES,
    };
    pub use crate::template::encode::IMAGE_TOKEN_ID;
    pub use crate::template::{by_name as template_by_name, Template, TEMPLATES};
    pub use crate::tokenize::NO_BOS_CLASSES;
}

/// Steps of the pipeline a front end runs on their own: which files a run (or a shard)
/// reads, a tokenizer's hash, a pre-tokenized file read whole, the atomic swap of two directories.
pub mod files {
    pub use crate::config::resolve;
    pub use crate::input::{walk_dir, InputFile};
    pub use crate::packed_dir::atomic::exchange;
    pub use crate::source::pretokenized::read_all as read_pretokenized;
    pub use crate::source::{shard_reads, ShardRead};
    pub use crate::tokenize::hash_files as tokenizer_hash;
}

/// Conversations encoded exactly as `pack` encodes a training sample: for chat prompts that
/// must be the prefix of what the model was trained on.
pub mod chat {
    pub use crate::format::Turn;
    pub use crate::template::chat::{messages_from_openai, ChatTemplate};
    pub use crate::template::encode::{encode_prompt, encode_turns, Encoded};
    pub use crate::tokenize::TextTokenizer;
}

/// Building blocks that the crate's own integration tests and fuzz targets drive directly.
/// Not an API: no stability promise, hidden from the documentation.
#[doc(hidden)]
pub mod internals {
    pub use crate::format::xtuner::{llava_image, Columns};
    pub use crate::input::{read_data_order, split_records};
    pub use crate::packed_dir::verify::{samples_in_several_packs, split_samples};
    pub use crate::source::RecordStream;
    pub use crate::template::chat::messages_from_turns;
    pub use crate::template::py_format;

    /// The pre-tokenized (`X.bin` + `X.bin.meta`) reader's parts.
    pub mod pretokenized {
        pub use crate::source::pretokenized::*;
    }
    /// The tokenizer's fast path, piece by piece.
    pub mod tokenize {
        pub use crate::tokenize::bpe::bytes_to_chars;
        pub use crate::tokenize::fastbpe::FastBpe;
        pub use crate::tokenize::pretokenize::Matcher;
        pub use crate::tokenize::split::{
            class_of, fold, Splitter, DEEPSEEK3_PATTERN, LETTER, MARK, NUMBER, PUNCT,
            QWEN2_PATTERN, SPACE, SYMBOL,
        };
    }
}
