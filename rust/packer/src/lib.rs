//! pyfast-tune's data engine: read JSON/JSONL, Parquet, Arrow IPC and CSV/TSV data, map
//! dataset formats and prompt templates with XTuner's semantics, tokenize in parallel, and
//! pack whole samples into an mmap-able directory — deterministically, whatever the thread
//! count.
//!
//! The crate knows nothing of Python; `rust/packer-py` is its only binding.
#![deny(missing_docs)]

pub mod binpack;
pub mod chat_template;
pub mod config;
pub mod encode;
pub mod error;
pub mod fingerprint;
pub mod format;
pub mod format_xtuner;
pub mod input;
pub mod mix;
pub mod output;
pub mod pipeline;
pub mod pretok;
pub mod rng;
pub mod row_json;
pub mod shard;
mod source_csv;
mod source_ipc;
mod source_parquet;
mod source_rows;
pub mod stage;
pub mod stats;
pub mod stream;
pub mod template;
pub mod tokenize;
pub mod turn;
pub mod verify;
pub mod write;

pub use error::{Error, Result};
pub use pipeline::{fingerprint, pack, PackConfig, PackStats, Progress};
