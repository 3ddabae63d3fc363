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
    #[error("{path}: empty file: expected JSON or JSONL records")]
    EmptyFile {
        /// The input file.
        path: PathBuf,
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
    /// An option has an invalid value (unknown format or template, zero max_length, ...).
    #[error("{0}")]
    Config(String),
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
