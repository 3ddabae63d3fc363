//! Record and line numbers of a JSONL file split between shards. A shard reads the file
//! from its first line on ([`crate::source::span::Span::lines`]), so it numbers the
//! records and lines it reads from there, and cannot know how many come before without
//! reading the whole prefix. The parts are contiguous runs of lines in input order, so the
//! merge, which sees every part's counts ([`LINES`] and `records` in their file-table
//! rows), adds to a part's numbers those of the parts before it: the samples' record
//! indices and the skipped-record examples ([`Site`]) become the whole file's, and the
//! output is the bytes of one `pack`. A bad record that stops a shard names its line in the
//! whole file: the shard counts the lines before its first one then, on that error path only
//! ([`crate::source::lines::count_lines`]).

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::PackConfig;
use crate::error::{Error, Result};
use crate::format::Format;
use crate::pack::stats::PackStats;
use crate::source::fetch::Fetch;

/// How many skipped-record messages are kept for the report.
pub(crate) const MAX_SKIP_EXAMPLES: usize = 10;

/// Why one record produced no sample.
#[derive(Clone)]
pub(crate) enum RecordFault {
    Json(String),
    Shape(String),
}

/// The error that names a bad record: its file, line and index.
pub(crate) fn record_error(
    path: &Path,
    rec_line: u64,
    rec_index: u64,
    fault: RecordFault,
    fmt: &str,
) -> Error {
    match fault {
        RecordFault::Json(msg) => Error::Json {
            path: path.to_path_buf(),
            line: rec_line,
            msg: format!("record {rec_index}: {msg}"),
        },
        RecordFault::Shape(msg) => Error::Record {
            path: path.to_path_buf(),
            line: rec_line,
            record: rec_index,
            msg: format!("{msg} (format {fmt})"),
        },
    }
}

/// Without `skip_bad`, `err` stops the run; with it, it is kept as an example (the first
/// [`MAX_SKIP_EXAMPLES`]).
pub(crate) fn skip(cfg: &PackConfig, stats: &mut PackStats, err: Error) -> Result<()> {
    if !cfg.skip_bad {
        return Err(err);
    }
    if stats.skipped_examples.len() < MAX_SKIP_EXAMPLES {
        stats.skipped_examples.push(err.to_string());
    }
    Ok(())
}

/// Key of a part's file-table row: the lines the part read of a file whose records it
/// numbered from its first line (blank lines included); the merge removes it.
pub(crate) const LINES: &str = "lines";

/// A skipped-record example whose record a part named by its part-local line and index.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub(crate) struct Site {
    /// Index of the example in the part's `skipped_examples`.
    pub example: usize,
    /// Global index of the input file.
    pub file: u64,
    /// The file's path, as the example names it.
    pub path: String,
    /// Part-local line (1-based) and record (0-based).
    pub line: u64,
    pub record: u64,
    /// The fault: invalid JSON (else a record of the wrong shape), its message, the format.
    pub json: bool,
    pub msg: String,
    pub format: String,
}

/// A record that gives no sample: counted, then an error (without `skip_bad`) or a skipped
/// example (its [`Site`] kept in `sites` when its numbers are part-local). `at`: (file
/// index, line, record, and where the part's first line begins when they are part-local).
#[allow(clippy::too_many_arguments)]
pub(crate) fn bad_record(
    cfg: &PackConfig,
    fetch: Option<&Fetch>,
    path: &Path,
    at: (usize, u64, u64, Option<u64>),
    fault: RecordFault,
    fmt: Format,
    stats: &mut PackStats,
    sites: &mut Vec<Site>,
) -> Result<()> {
    let (file, line, record, local) = at;
    stats.skipped_records += 1;
    let fmt = fmt.name();
    let local = local.filter(|&start| start > 0);
    if let (Some(start), false) = (local, cfg.skip_bad) {
        // The error path alone reads the lines before the part.
        let (lines, records) = crate::source::lines::count_lines(path, fetch, start)?;
        return Err(record_error(
            path,
            line + lines,
            record + records,
            fault,
            fmt,
        ));
    }
    if local.is_some() && stats.skipped_examples.len() < MAX_SKIP_EXAMPLES {
        let (json, msg) = match &fault {
            RecordFault::Json(m) => (true, m.clone()),
            RecordFault::Shape(m) => (false, m.clone()),
        };
        sites.push(Site {
            example: stats.skipped_examples.len(),
            file: file as u64,
            path: path.to_string_lossy().into_owned(),
            line,
            record,
            json,
            msg,
            format: fmt.to_string(),
        });
    }
    skip(cfg, stats, record_error(path, line, record, fault, fmt))
}

/// Per part (`docs` in shard order): file index -> (lines, records) of the parts before it
/// that numbered the file from their first line.
pub(crate) fn bases(docs: &[&Value]) -> Vec<HashMap<u64, (u64, u64)>> {
    let mut seen: HashMap<u64, (u64, u64)> = HashMap::new();
    let mut out = Vec::with_capacity(docs.len());
    for doc in docs {
        let mut mine = HashMap::new();
        let read = doc["read"].as_array().map_or(&[][..], Vec::as_slice);
        let rows = doc["file_table"].as_array().map_or(&[][..], Vec::as_slice);
        for (r, row) in read.iter().zip(rows) {
            let (Some(f), Some(lines)) = (r[0].as_u64(), row[LINES].as_u64()) else {
                continue;
            };
            let before = seen.entry(f).or_default();
            mine.insert(f, *before);
            before.0 += lines;
            before.1 += row["records"].as_u64().unwrap_or(0);
        }
        out.push(mine);
    }
    out
}

/// The part's skipped-record examples at `sites`, named again by their place in the whole
/// file (`base`: this part's [`bases`]).
pub(crate) fn name_examples(
    stats: &mut PackStats,
    sites: &[Site],
    base: &HashMap<u64, (u64, u64)>,
) {
    for s in sites {
        let (lines, records) = base.get(&s.file).copied().unwrap_or_default();
        let fault = if s.json {
            RecordFault::Json(s.msg.clone())
        } else {
            RecordFault::Shape(s.msg.clone())
        };
        let err = record_error(
            Path::new(&s.path),
            s.line + lines,
            s.record + records,
            fault,
            &s.format,
        );
        if let Some(e) = stats.skipped_examples.get_mut(s.example) {
            *e = err.to_string();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn bases_sum_the_parts_before_per_file() {
        let docs = [
            json!({"read": [[0, true], [1, true]],
                   "file_table": [{"records": 4}, {"records": 3, "lines": 5}]}),
            json!({"read": [[1, false]], "file_table": [{"records": 2, "lines": 2}]}),
            json!({"read": [[1, false], [2, true]],
                   "file_table": [{"records": 0, "lines": 1}, {"records": 9, "lines": 9}]}),
            json!({"read": [[1, false]], "file_table": [{"records": 1, "lines": 1}]}),
        ];
        let b = bases(&docs.iter().collect::<Vec<_>>());
        assert_eq!(b[0], HashMap::from([(1, (0, 0))]));
        assert_eq!(b[1], HashMap::from([(1, (5, 3))]));
        assert_eq!(b[2], HashMap::from([(1, (7, 5)), (2, (0, 0))]));
        assert_eq!(b[3], HashMap::from([(1, (8, 5))]));

        let mut stats = PackStats {
            skipped_examples: vec!["other".into(), "local".into()],
            ..Default::default()
        };
        let site = Site {
            example: 1,
            file: 1,
            path: "/d/x.jsonl".into(),
            line: 2,
            record: 1,
            json: false,
            msg: "no messages".into(),
            format: "openai".into(),
        };
        name_examples(&mut stats, &[site], &b[3]);
        assert_eq!(stats.skipped_examples[0], "other");
        assert_eq!(
            stats.skipped_examples[1],
            "/d/x.jsonl:10 (record 6): no messages (format openai)"
        );
    }
}
