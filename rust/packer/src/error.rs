//! The one error type of the engine. Every variant names the file (and line or record) it is
//! about, so a user with terabytes of data can find the bad byte.

use std::path::PathBuf;

/// Result alias used across the crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong while reading, encoding, packing or writing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An input, tokenizer or output file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// An input path, directory or glob matched no data files.
    #[error("no input files: {0}")]
    NoInputs(String),
    /// A line or array element is not valid JSON.
    #[error("{path}:{line}: invalid JSON: {msg}")]
    Json {
        /// The input file.
        path: PathBuf,
        /// 1-based line number where the bad record starts.
        line: u64,
        /// What the JSON parser said.
        msg: String,
    },
    /// A record is valid JSON but not of the shape its format requires.
    #[error("{path}:{line} (record {record}): {msg}")]
    Record {
        /// The input file.
        path: PathBuf,
        /// 1-based line number where the record starts.
        line: u64,
        /// 0-based record index in the file.
        record: u64,
        /// What was expected.
        msg: String,
    },
    /// An input file holds no records at all.
    #[error("{path}: empty file: expected records")]
    EmptyFile {
        /// The input file.
        path: PathBuf,
    },
    /// A file cannot be read as its kind: a corrupt Parquet or Arrow file, a column type no
    /// JSON value can hold, a CSV header that is not text, a compressed columnar file.
    #[error("{path}: {msg}")]
    Source {
        /// The input file.
        path: PathBuf,
        /// What could not be read, and what was expected.
        msg: String,
    },
    /// The tokenizer could not be loaded or lacks what the template needs.
    #[error("tokenizer {path}: {msg}")]
    Tokenizer {
        /// The tokenizer file or directory.
        path: PathBuf,
        /// What went wrong.
        msg: String,
    },
    /// A data-order file is malformed or lists a path outside the data root.
    #[error("{path}:{line}: {msg}")]
    DataOrder {
        /// The data-order file.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// What was wrong with the entry.
        msg: String,
    },
    /// An option has an invalid value (unknown format or template, zero max_length, bad
    /// columns or shard spec, ...).
    #[error("{0}")]
    Config(String),
    /// Every record was dropped (nothing trained) or skipped: there is nothing to pack.
    #[error(
        "no trainable samples in the inputs: {records} records, {dropped} dropped (nothing trained), {skipped} skipped"
    )]
    NoTrainableSamples {
        /// Records read.
        records: u64,
        /// Records that became no sample or a sample without a trained token.
        dropped: u64,
        /// Bad records skipped (`skip_bad`).
        skipped: u64,
    },
    /// The part directories given to merge-packs do not make one whole run.
    #[error("merge-packs: {0}")]
    ShardMismatch(String),
    /// The output path exists and is neither empty nor a packed directory.
    #[error("refusing to replace {path}: it exists and is not a pyfast-tune packed directory")]
    OutputExists {
        /// The output directory.
        path: PathBuf,
    },
    /// A symlink under the data root leads outside it.
    #[error("{path}: symlink points outside the data root {root} (to {target})")]
    OutsideDataRoot {
        /// The symlink.
        path: PathBuf,
        /// The data root.
        root: PathBuf,
        /// Where it points.
        target: PathBuf,
    },
    /// The engine itself failed (worker threads could not start, an internal invariant broke).
    #[error("internal error: {0}")]
    Internal(String),
    /// The caller asked to stop (Ctrl-C); nothing was written.
    #[error("interrupted")]
    Interrupted,
    /// A packed directory is missing a file, truncated, corrupt or foreign.
    #[error("{path}: {msg}")]
    Corrupt {
        /// The offending file of the packed directory.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
}

impl Error {
    /// Wrap an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
