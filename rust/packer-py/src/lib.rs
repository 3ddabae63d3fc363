//! `pyfast_tune._packer`: the only Python binding of the `packer` crate. Arguments are
//! extracted first, the work runs with the GIL released, results cross as Python objects
//! (dicts, lists, tuples); core errors become typed Python exceptions that carry `path`,
//! `line` and `record`.

mod convert;

use std::path::PathBuf;

use packer::{Error, PackConfig, PackStats, Progress};
use pyo3::create_exception;
use pyo3::exceptions::{
    PyException, PyFileNotFoundError, PyKeyboardInterrupt, PyOSError, PyPermissionError,
};
use pyo3::prelude::*;

create_exception!(
    _packer,
    PackError,
    PyException,
    "Base class of pyfast-tune data errors."
);
create_exception!(
    _packer,
    DataFormatError,
    PackError,
    "A record or file is not what its format requires."
);
create_exception!(
    _packer,
    TokenizerError,
    PackError,
    "The tokenizer cannot be loaded or lacks a needed token."
);
create_exception!(
    _packer,
    PackConfigError,
    PackError,
    "An option or input selection is invalid."
);
create_exception!(
    _packer,
    CorruptDataError,
    PackError,
    "A packed directory is truncated, corrupt or foreign."
);

create_exception!(
    _packer,
    NoTrainableSamplesError,
    PackConfigError,
    "Every record was dropped or skipped: there is nothing to pack."
);
create_exception!(
    _packer,
    ShardMismatchError,
    PackConfigError,
    "The part directories given to merge_packs do not make one whole run."
);
create_exception!(
    _packer,
    OutputExistsError,
    PackConfigError,
    "The output path exists and is neither empty nor a packed directory."
);
create_exception!(
    _packer,
    OutsideDataRootError,
    PackConfigError,
    "A symlink under the data root leads outside it."
);

fn to_pyerr(py: Python<'_>, e: Error) -> PyErr {
    let msg = e.to_string();
    let (err, path, line, record) = match &e {
        Error::Io { path, source } => {
            let err = match source.kind() {
                std::io::ErrorKind::NotFound => PyFileNotFoundError::new_err(msg),
                std::io::ErrorKind::PermissionDenied => PyPermissionError::new_err(msg),
                _ => PyOSError::new_err(msg),
            };
            (err, Some(path.clone()), None, None)
        }
        Error::NoInputs(_) => (PyFileNotFoundError::new_err(msg), None, None, None),
        Error::Json { path, line, .. } => (
            DataFormatError::new_err(msg),
            Some(path.clone()),
            Some(*line),
            None,
        ),
        Error::Record {
            path, line, record, ..
        } => (
            DataFormatError::new_err(msg),
            Some(path.clone()),
            Some(*line),
            Some(*record),
        ),
        Error::Source { path, .. } => (
            DataFormatError::new_err(msg),
            Some(path.clone()),
            None,
            None,
        ),
        Error::EmptyFile { path } => (
            DataFormatError::new_err(msg),
            Some(path.clone()),
            None,
            None,
        ),
        Error::DataOrder { path, line, .. } => (
            DataFormatError::new_err(msg),
            Some(path.clone()),
            Some(*line),
            None,
        ),
        Error::Tokenizer { path, .. } => {
            (TokenizerError::new_err(msg), Some(path.clone()), None, None)
        }
        Error::Config(_) => (PackConfigError::new_err(msg), None, None, None),
        Error::NoTrainableSamples { .. } => {
            (NoTrainableSamplesError::new_err(msg), None, None, None)
        }
        Error::ShardMismatch(_) => (ShardMismatchError::new_err(msg), None, None, None),
        Error::OutputExists { path } => (
            OutputExistsError::new_err(msg),
            Some(path.clone()),
            None,
            None,
        ),
        Error::OutsideDataRoot { path, .. } => (
            OutsideDataRootError::new_err(msg),
            Some(path.clone()),
            None,
            None,
        ),
        Error::Internal(_) => (PackError::new_err(msg), None, None, None),
        Error::Corrupt { path, .. } => (
            CorruptDataError::new_err(msg),
            Some(path.clone()),
            None,
            None,
        ),
        Error::Interrupted => (PyKeyboardInterrupt::new_err(msg), None, None, None),
    };
    let value = err.value(py);
    let _ = value.setattr("path", path.map(|p| p.to_string_lossy().into_owned()));
    let _ = value.setattr("line", line);
    let _ = value.setattr("record", record);
    err
}

/// Pack options from a Python mapping, read by the core's [`PackConfig`] schema, so unknown
/// or mistyped fields are refused with the field list.
fn options(options: &Bound<'_, PyAny>) -> PyResult<PackConfig> {
    let value = convert::to_json(options, "options")?;
    PackConfig::from_value(value).map_err(PackConfigError::new_err)
}

/// Statistics as the dict `PackStats(**stats)` is built from.
fn stats_dict<'py>(py: Python<'py>, stats: &PackStats) -> PyResult<Bound<'py, PyAny>> {
    let value = serde_json::to_value(stats).map_err(|e| PackError::new_err(e.to_string()))?;
    convert::to_py(py, &value)
}

fn run_with_progress<T: Send>(
    py: Python<'_>,
    progress: Option<Py<PyAny>>,
    work: impl FnOnce(&dyn Fn(Progress<'_>) -> bool) -> packer::Result<T> + Send,
) -> PyResult<T> {
    let result = py.detach(|| {
        let report = |p: Progress<'_>| -> bool {
            Python::attach(|py| {
                if py.check_signals().is_err() {
                    return false;
                }
                match &progress {
                    Some(cb) => cb.call1(py, (p.stage, p.done, p.total)).is_ok(),
                    None => true,
                }
            })
        };
        work(&report)
    });
    result.map_err(|e| to_pyerr(py, e))
}

/// Pack per `options` (a mapping of `PackConfig` fields; absent ones default); returns the
/// statistics as a dict of `PackStats` fields. `progress(stage, done, total)` is called now and then
/// with the GIL held. `shard: [i, n]` encodes part i of n into `out_dir` for `merge_packs`.
/// `fetch(path, start, end)`, if given, is called (GIL held) before bytes `start..end` of
/// an input are read (`end` may pass the file's end); an exception it raises stops the run.
#[pyfunction]
#[pyo3(signature = (options, progress=None, fetch=None))]
fn pack<'py>(
    py: Python<'py>,
    options: &Bound<'_, PyAny>,
    progress: Option<Py<PyAny>>,
    fetch: Option<Py<PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let cfg = self::options(options)?;
    let fetch = fetch.map(|cb| -> packer::Fetch {
        std::sync::Arc::new(move |path: &std::path::Path, start: u64, end: u64| {
            Python::attach(|py| {
                let p = path.to_string_lossy().into_owned();
                cb.call1(py, (p, start, end)).map(|_| ()).map_err(|e| {
                    let msg = format!("fetching bytes {start}..{end}: {e}");
                    Error::io(path, std::io::Error::other(msg))
                })
            })
        })
    });
    let stats = run_with_progress(py, progress, |report| {
        packer::pack_fetching(&cfg, report, fetch)
    })?;
    stats_dict(py, &stats)
}

/// Every pack option with its default, as a dict: the schema front ends derive from.
#[pyfunction]
fn pack_defaults(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    convert::to_py(py, &PackConfig::defaults())
}

/// Every pack option's name, kind, choices, help and default, as a list of dicts: what the
/// CLI builds its `pack` flags from.
#[pyfunction]
fn pack_fields(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    convert::to_py(py, &PackConfig::fields())
}

/// Join the part directories of `pack(shard=(i, n))` into `out_dir`, byte-identical to a
/// single run; returns the statistics as a dict of `PackStats` fields.
#[pyfunction]
#[pyo3(signature = (parts, out_dir, progress=None))]
fn merge_packs<'py>(
    py: Python<'py>,
    parts: Vec<String>,
    out_dir: String,
    progress: Option<Py<PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let parts: Vec<PathBuf> = parts.into_iter().map(PathBuf::from).collect();
    let out = PathBuf::from(out_dir);
    let stats = run_with_progress(py, progress, |report| packer::merge(&parts, &out, report))?;
    stats_dict(py, &stats)
}

/// Plan the merge of `parts` into `out_dir` from the samples' lengths and stage everything
/// but the tokens (`packer::plan_ranged`). Returns `{"stats": {...}}` when the run was
/// merged serially here (a mix, pairs or images), else `{"staging": dir, "ranges": k,
/// "tokens": t}`: run `merge_write_range(staging, i)` for every i < k (any process, in any
/// order), then `merge_finish(staging, [their results in order])`.
#[pyfunction]
#[pyo3(signature = (parts, out_dir, ranges, block_tokens=None, progress=None))]
fn merge_plan<'py>(
    py: Python<'py>,
    parts: Vec<String>,
    out_dir: String,
    ranges: usize,
    block_tokens: Option<u64>,
    progress: Option<Py<PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let parts: Vec<PathBuf> = parts.into_iter().map(PathBuf::from).collect();
    let out = PathBuf::from(out_dir);
    let block = block_tokens.unwrap_or(packer::DEFAULT_BLOCK_TOKENS);
    let planned = run_with_progress(py, progress, |report| {
        packer::plan_ranged(&parts, &out, block, ranges, report)
    })?;
    let value = match planned {
        packer::Planned::Done(stats) => serde_json::json!({ "stats": stats }),
        packer::Planned::Ranged {
            staging,
            ranges,
            tokens,
        } => serde_json::json!({"staging": staging, "ranges": ranges, "tokens": tokens}),
    };
    convert::to_py(py, &value)
}

/// Copy range `index` of the merge staged in `staging` into place; returns the hashes of
/// its blocks (`{"ids": [hex], "mask": [hex]}`) for `merge_finish`.
#[pyfunction]
fn merge_write_range<'py>(
    py: Python<'py>,
    staging: String,
    index: usize,
) -> PyResult<Bound<'py, PyAny>> {
    let dir = PathBuf::from(staging);
    let hashes = run_with_progress(py, None, |_| packer::write_range(&dir, index))?;
    let value = serde_json::to_value(&hashes).map_err(|e| PackError::new_err(e.to_string()))?;
    convert::to_py(py, &value)
}

/// Fold the ranges' hashes into the token files' hashes, write meta.json and commit the
/// merged directory; returns the statistics as a dict of `PackStats` fields.
#[pyfunction]
fn merge_finish<'py>(
    py: Python<'py>,
    staging: String,
    hashes: Vec<(Vec<String>, Vec<String>)>,
) -> PyResult<Bound<'py, PyAny>> {
    let dir = PathBuf::from(staging);
    let hashes: Vec<packer::RangeHashes> = hashes
        .into_iter()
        .map(|(ids, mask)| packer::RangeHashes { ids, mask })
        .collect();
    let stats = run_with_progress(py, None, |_| packer::finish_ranged(&dir, &hashes))?;
    stats_dict(py, &stats)
}

/// Data files under `root` (recursive, sorted by relative path bytes) whose names end with
/// `file_type`, as relative paths: the lines of a data-order file.
#[pyfunction]
fn data_order(py: Python<'_>, root: String, file_type: String) -> PyResult<Vec<String>> {
    py.detach(|| packer::files::walk_dir(std::path::Path::new(&root), &[file_type.as_str()]))
        .map(|files| files.into_iter().map(|f| f.name).collect())
        .map_err(|e| to_pyerr(py, e))
}

/// Read a pre-tokenized `X.bin` with its `.meta` (one thread, rows of at least `min_length`
/// tokens), check every row against the meta; returns (rows kept, tokens). For benchmarks.
#[pyfunction]
fn read_pretok(py: Python<'_>, path: String, min_length: u64) -> PyResult<(u64, u64)> {
    py.detach(|| packer::files::read_pretokenized(std::path::Path::new(&path), min_length))
        .map(|rows| {
            let tokens = rows.iter().map(|r| r.1.len() as u64).sum();
            (rows.len() as u64, tokens)
        })
        .map_err(|e| to_pyerr(py, e))
}

/// One rendered conversation: (text, ids, loss mask).
type RenderedChat = (String, Vec<u32>, Vec<u8>);

/// Render conversations (a list of lists of message dicts) with the tokenizer's chat
/// template, as the `hf` template does; returns (text, ids, loss mask) per conversation.
#[pyfunction]
fn render_chats(
    py: Python<'_>,
    tokenizer: String,
    conversations: Vec<Bound<'_, PyAny>>,
) -> PyResult<Vec<RenderedChat>> {
    let convs: Vec<serde_json::Value> = conversations
        .iter()
        .enumerate()
        .map(|(i, c)| convert::to_json(c, &format!("conversations[{i}]")))
        .collect::<PyResult<_>>()?;
    let path = PathBuf::from(tokenizer);
    py.detach(|| {
        let tok = packer::chat::TextTokenizer::load(&path)?;
        let ct = packer::chat::ChatTemplate::load(&path)?;
        // A malformed conversation is a data error naming its index; a template that fails
        // to render or encode it is the tokenizer's.
        let template_err = |msg: String| Error::Tokenizer {
            path: path.clone(),
            msg,
        };
        convs
            .into_iter()
            .enumerate()
            .map(|(i, messages)| {
                let record = serde_json::json!({ "messages": messages });
                let msgs =
                    packer::chat::messages_from_openai(&record).map_err(|msg| Error::Record {
                        path: PathBuf::from("<conversations>"),
                        line: 1,
                        record: i as u64,
                        msg,
                    })?;
                let text = ct.render(&msgs, false).map_err(template_err)?;
                let enc = ct
                    .encode(&tok, &msgs, None, usize::MAX)
                    .map_err(template_err)?;
                Ok((text, enc.ids, enc.mask))
            })
            .collect::<packer::Result<Vec<_>>>()
    })
    .map_err(|e| to_pyerr(py, e))
}

/// The fingerprint `pack` would record for these options (hashes every input).
#[pyfunction]
fn fingerprint(py: Python<'_>, options: &Bound<'_, PyAny>) -> PyResult<String> {
    let cfg = self::options(options)?;
    py.detach(|| packer::fingerprint(&cfg))
        .map_err(|e| to_pyerr(py, e))
}

/// Hex BLAKE3 of a tokenizer's files, as recorded in `meta.json`.
#[pyfunction]
fn tokenizer_hash(py: Python<'_>, path: String) -> PyResult<String> {
    py.detach(|| packer::files::tokenizer_hash(std::path::Path::new(&path)))
        .map_err(|e| to_pyerr(py, e))
}

/// All prompt templates as a list of dicts (name, system, instruction, suffix,
/// suffix_as_eos, sep, stop_words).
#[pyfunction]
fn templates(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    let list: Vec<_> = packer::facts::TEMPLATES
        .iter()
        .map(|t| {
            serde_json::json!({
                "name": t.name, "system": t.system, "instruction": t.instruction,
                "suffix": t.suffix, "suffix_as_eos": t.suffix_as_eos, "sep": t.sep,
                "stop_words": t.stop_words,
            })
        })
        .collect();
    convert::to_py(py, &serde_json::Value::Array(list))
}

/// Facts of the engine Python must agree with, as a dict: the packed format's version, the
/// id `<image>` placeholders are stored as, each binary file's element type and row width,
/// the tokenizer classes that get no BOS.
#[pyfunction]
fn engine_facts(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    let files: serde_json::Map<String, serde_json::Value> = packer::facts::BINARY_LAYOUT
        .iter()
        .map(|(name, dtype, width)| {
            (
                name.to_string(),
                serde_json::json!({"dtype": dtype, "width": width}),
            )
        })
        .collect();
    let optional: serde_json::Map<String, serde_json::Value> = packer::facts::OPTIONAL_LAYOUT
        .iter()
        .map(|(n, d, w)| (n.to_string(), serde_json::json!({"dtype": d, "width": w})))
        .collect();
    let facts = serde_json::json!({
        "optional_files": optional,
        "format_version": packer::facts::FORMAT_VERSION,
        "image_token_id": packer::facts::IMAGE_TOKEN_ID,
        "binary_files": files,
        "no_bos_classes": packer::facts::NO_BOS_CLASSES,
        "data_extensions": packer::facts::DATA_EXTENSIONS,
    });
    convert::to_py(py, &facts)
}

/// Format names accepted by `pack`.
#[pyfunction]
fn format_names() -> Vec<&'static str> {
    packer::facts::Format::NAMES.to_vec()
}

/// How shard `index` of `shards` reads each input file (paths and sizes in input order):
/// "" not at all, "whole" (fetch it whole first), "part" (its own lines of a JSONL file:
/// the ranges are asked of `pack`'s `fetch` as they are read). `whole`: with `whole_files`
/// set in the options.
#[pyfunction]
fn shard_reads(
    paths: Vec<String>,
    sizes: Vec<u64>,
    index: usize,
    shards: usize,
    whole: bool,
) -> Vec<&'static str> {
    let paths: Vec<PathBuf> = paths.into_iter().map(PathBuf::from).collect();
    packer::files::shard_reads(&paths, &sizes, index, shards, whole)
        .into_iter()
        .map(|r| match r {
            packer::files::ShardRead::No => "",
            packer::files::ShardRead::Whole => "whole",
            packer::files::ShardRead::Part => "part",
        })
        .collect()
}

/// The ordered list of input files `pack` would read for these options (`inputs`,
/// `data_order`, `file_type`), as (path, name) pairs.
#[pyfunction]
fn resolve_inputs(py: Python<'_>, options: &Bound<'_, PyAny>) -> PyResult<Vec<(String, String)>> {
    let cfg = self::options(options)?;
    let files = py
        .detach(|| packer::files::resolve(&cfg))
        .map_err(|e| to_pyerr(py, e))?;
    Ok(files
        .into_iter()
        .map(|f| (f.path.to_string_lossy().into_owned(), f.name))
        .collect())
}

/// Encodes chat conversations with an XTuner template exactly as `pack` encodes a training
/// sample (the engine's tokenizer, BOS/EOS rules and template), so a chat prompt is the
/// prefix of the sample its conversation would pack into.
#[pyclass(frozen)]
struct ChatEncoder {
    tok: packer::chat::TextTokenizer,
    template: &'static packer::facts::Template,
    system: String,
}

#[pymethods]
impl ChatEncoder {
    #[new]
    #[pyo3(signature = (tokenizer, template, system=None))]
    fn new(
        py: Python<'_>,
        tokenizer: PathBuf,
        template: &str,
        system: Option<String>,
    ) -> PyResult<Self> {
        let template = packer::facts::template_by_name(template).ok_or_else(|| {
            PackConfigError::new_err(format!("unknown template {template:?} for chat encoding"))
        })?;
        let tok = py
            .detach(|| packer::chat::TextTokenizer::load(&tokenizer))
            .map_err(|e| to_pyerr(py, e))?;
        Ok(ChatEncoder {
            tok,
            template,
            system: system.unwrap_or_default(),
        })
    }

    /// (ids, trained mask) of `turns` = [(input, output), ...]. An output of None ends the
    /// ids at that turn's open answer (the generation prompt; the mask is then all false).
    fn encode(&self, turns: Vec<(String, Option<String>)>) -> PyResult<(Vec<u32>, Vec<bool>)> {
        let open = turns.last().is_some_and(|t| t.1.is_none());
        let mut conv: Vec<packer::chat::Turn> = turns
            .into_iter()
            .enumerate()
            .map(|(i, (input, output))| packer::chat::Turn {
                system: if i == 0 && self.template.system.is_some() {
                    self.system.clone()
                } else {
                    String::new()
                },
                input,
                output: output.unwrap_or_default(),
                output_with_loss: true,
                need_eos_token: true,
                sep: String::new(),
            })
            .collect();
        self.template
            .apply(&mut conv)
            .map_err(PackConfigError::new_err)?;
        if self.template.system.is_none() && !self.system.is_empty() {
            // A template without SYSTEM (minicpm): the system text leads the first input, as
            // XTuner's chat hook writes it.
            if let Some(first) = conv.first_mut() {
                first.input = format!("{}\n{}", self.system, first.input);
            }
        }
        if open {
            let ids =
                packer::chat::encode_prompt(&self.tok, &conv).map_err(PackConfigError::new_err)?;
            let n = ids.len();
            return Ok((ids, vec![false; n]));
        }
        let enc = packer::chat::encode_turns(&self.tok, &conv, usize::MAX)
            .map_err(PackConfigError::new_err)?;
        Ok((enc.ids, enc.mask.into_iter().map(|m| m != 0).collect()))
    }
}

/// Recompute hashes and invariants of a packed directory; returns the report as a dict.
#[pyfunction]
fn verify(py: Python<'_>, path: String) -> PyResult<Bound<'_, PyAny>> {
    let report = py
        .detach(|| packer::verify(std::path::Path::new(&path)))
        .map_err(|e| to_pyerr(py, e))?;
    convert::to_py(py, &report)
}

/// Swap two existing directories atomically (`renameat2(RENAME_EXCHANGE)`); False where the
/// platform or filesystem cannot, OSError on any other failure.
#[pyfunction]
fn exchange_dirs(py: Python<'_>, a: PathBuf, b: PathBuf) -> PyResult<bool> {
    py.detach(|| packer::files::exchange(&a, &b)).map_err(|e| {
        let msg = format!("cannot exchange {} and {}: {e}", a.display(), b.display());
        match e.raw_os_error() {
            Some(errno) => PyOSError::new_err((errno, msg)),
            None => PyOSError::new_err(msg),
        }
    })
}

#[pymodule]
fn _packer(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("PackError", py.get_type::<PackError>())?;
    m.add("DataFormatError", py.get_type::<DataFormatError>())?;
    m.add("TokenizerError", py.get_type::<TokenizerError>())?;
    m.add("PackConfigError", py.get_type::<PackConfigError>())?;
    m.add("CorruptDataError", py.get_type::<CorruptDataError>())?;
    m.add(
        "NoTrainableSamplesError",
        py.get_type::<NoTrainableSamplesError>(),
    )?;
    m.add("ShardMismatchError", py.get_type::<ShardMismatchError>())?;
    m.add("OutputExistsError", py.get_type::<OutputExistsError>())?;
    m.add(
        "OutsideDataRootError",
        py.get_type::<OutsideDataRootError>(),
    )?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<ChatEncoder>()?;
    m.add_function(wrap_pyfunction!(pack, m)?)?;
    m.add_function(wrap_pyfunction!(pack_defaults, m)?)?;
    m.add_function(wrap_pyfunction!(pack_fields, m)?)?;
    m.add_function(wrap_pyfunction!(fingerprint, m)?)?;
    m.add_function(wrap_pyfunction!(tokenizer_hash, m)?)?;
    m.add_function(wrap_pyfunction!(templates, m)?)?;
    m.add_function(wrap_pyfunction!(format_names, m)?)?;
    m.add_function(wrap_pyfunction!(engine_facts, m)?)?;
    m.add_function(wrap_pyfunction!(resolve_inputs, m)?)?;
    m.add_function(wrap_pyfunction!(shard_reads, m)?)?;
    m.add_function(wrap_pyfunction!(verify, m)?)?;
    m.add_function(wrap_pyfunction!(merge_packs, m)?)?;
    m.add_function(wrap_pyfunction!(merge_plan, m)?)?;
    m.add_function(wrap_pyfunction!(merge_write_range, m)?)?;
    m.add_function(wrap_pyfunction!(merge_finish, m)?)?;
    m.add_function(wrap_pyfunction!(data_order, m)?)?;
    m.add_function(wrap_pyfunction!(render_chats, m)?)?;
    m.add_function(wrap_pyfunction!(read_pretok, m)?)?;
    m.add_function(wrap_pyfunction!(exchange_dirs, m)?)?;
    Ok(())
}
