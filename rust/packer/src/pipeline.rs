//! The pack pipeline, top to bottom: resolve inputs → stream records (bounded batches) → map
//! format → apply template → encode (parallel, results in input order) → stage tokens → plan
//! packs (BFD) → write the packed directory → commit atomically.
//!
//! Only per-sample lengths and offsets stay in memory; tokens go to staging files. A sharded
//! run (`shard = Some((i, n))`) stops after staging and saves its part (see [`crate::shard`]);
//! `merge-packs` joins the parts and runs the same [`finish`] as a single run, so the bytes
//! are identical.

use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;
use serde_json::{json, Value};

use crate::binpack::plan_packs;
use crate::chat_template::{self, ChatTemplate};
use crate::encode::{encode_turns_opts, Encoded};
use crate::error::{Error, Result};
use crate::format::Format;
use crate::format_xtuner::{llava_image, Columns};
use crate::input::{read_data_order, resolve_inputs, InputFile, RawRecord, DATA_EXTENSIONS};
use crate::output::{self, HashedWriter, StagingDir};
use crate::pretok::{self, PretokFile};
use crate::stream::{self, OwnedRecord, RecordStream};
use crate::template::{self, Template};
use crate::tokenize::{self, TextTokenizer};

pub use crate::config::PackConfig;

/// Records encoded per parallel batch: large enough to amortise scheduling, small enough
/// to bound memory and report progress often.
const CHUNK: usize = 4096;
/// How many skipped-record messages are kept for the report.
pub(crate) const MAX_SKIP_EXAMPLES: usize = 10;
/// Staged token ids of a part (`<u4`, input order).
pub(crate) const STAGE_IDS: &str = "stage_ids.tmp";
/// Staged loss mask of a part (`u1`, input order).
pub(crate) const STAGE_MASK: &str = "stage_mask.tmp";

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

/// How turns become text: XTuner prompt template, the tokenizer's chat template, or none.
pub enum Templating {
    /// Turns used as they are.
    None,
    /// An XTuner `PROMPT_TEMPLATE`.
    Xtuner(&'static Template),
    /// The tokenizer's Jinja chat template (`--template hf`).
    Hf(Box<ChatTemplate>),
}

/// Parse the format and template names of a config (`hf` gives `None` here: it needs the
/// tokenizer, see [`Templating`]).
pub fn parse_names(cfg: &PackConfig) -> Result<(Format, Option<&'static Template>)> {
    let format = Format::from_name(&cfg.format).ok_or_else(|| {
        Error::Config(format!(
            "unknown format {:?}; known: {}",
            cfg.format,
            Format::NAMES.join(", ")
        ))
    })?;
    let template = match cfg.template.as_str() {
        "none" | "" | "hf" => None,
        name => Some(template::by_name(name).ok_or_else(|| {
            let names: Vec<_> = template::TEMPLATES.iter().map(|t| t.name).collect();
            Error::Config(format!(
                "unknown template {name:?}; known: none, hf, {}",
                names.join(", ")
            ))
        })?),
    };
    if cfg.max_length == 0 || cfg.max_length > u32::MAX as usize {
        return Err(Error::Config(format!(
            "max_length must be in 1..={}, got {}",
            u32::MAX,
            cfg.max_length
        )));
    }
    Columns::parse(&cfg.columns).map_err(Error::Config)?;
    if let Some((i, n)) = cfg.shard {
        if n == 0 || i >= n {
            return Err(Error::Config(format!(
                "shard {i}/{n}: expected I/N with 0 <= I < N"
            )));
        }
    }
    Ok((format, template))
}

/// The ordered input files of a config.
pub fn resolve(cfg: &PackConfig) -> Result<Vec<InputFile>> {
    match &cfg.data_order {
        Some(order) => {
            let root =
                match cfg.inputs.as_slice() {
                    [] => order
                        .parent()
                        .map(Path::to_path_buf)
                        .unwrap_or_else(|| PathBuf::from(".")),
                    [one] if Path::new(one).is_dir() => PathBuf::from(one),
                    _ => return Err(Error::Config(
                        "with a data-order file, give exactly one input: the data root directory"
                            .into(),
                    )),
                };
            read_data_order(order, &root)
        }
        None => match cfg.file_type.as_deref() {
            Some(ft) if !ft.is_empty() => resolve_inputs(&cfg.inputs, &[ft]),
            _ => resolve_inputs(&cfg.inputs, DATA_EXTENSIONS),
        },
    }
}

/// Whether a file is pre-tokenized InternEVO data (`.bin` with a `.bin.meta`).
pub fn is_pretokenized(path: &Path) -> bool {
    path.to_string_lossy().ends_with(".bin")
}

fn fingerprint_inputs(cfg: &PackConfig, tokenizer_hash: &str, files: &[Value]) -> Value {
    let mut v = json!({
        "tool": "pyfast-tune",
        "tool_version": env!("CARGO_PKG_VERSION"),
        "format_version": output::FORMAT_VERSION,
        "tokenizer": tokenizer_hash,
        "format": cfg.format,
        "template": cfg.template,
        "max_length": cfg.max_length,
        "seed": cfg.seed,
        "skip_bad": cfg.skip_bad,
        "inputs": files,
    });
    // Determinants added by later options are recorded only when set, so directories packed
    // without them keep their fingerprints.
    let o = v.as_object_mut().expect("object literal");
    if !cfg.columns.is_empty() {
        let spec = Columns::parse(&cfg.columns)
            .map(|c| c.spec())
            .unwrap_or_default();
        o.insert("columns".into(), json!(spec));
    }
    if cfg.min_length > 0 {
        o.insert("min_length".into(), json!(cfg.min_length));
    }
    if cfg.template == "hf" {
        // chat_template.jinja is not among the tokenizer files hashed above.
        let h = chat_template::find_source(&cfg.tokenizer)
            .map(|(src, _)| blake3::hash(src.as_bytes()).to_hex().to_string())
            .unwrap_or_default();
        o.insert("chat_template".into(), json!(h));
    }
    v
}

pub(crate) fn hash_value(v: &Value) -> String {
    blake3::hash(v.to_string().as_bytes()).to_hex().to_string()
}

fn file_entry(name: &str, size: u64, hash: &blake3::Hash) -> Value {
    json!({"name": name, "size": size, "blake3": hash.to_hex().to_string()})
}

fn pretok_entry(
    file: &InputFile,
    size: u64,
    hash: &blake3::Hash,
    meta: &(u64, blake3::Hash),
) -> Value {
    let mut e = file_entry(&file.name, size, hash);
    e["meta_size"] = json!(meta.0);
    e["meta_blake3"] = json!(meta.1.to_hex().to_string());
    e
}

/// The fingerprint `pack` would record for `cfg`, without packing (hashes every input,
/// reading each in blocks).
pub fn fingerprint(cfg: &PackConfig) -> Result<String> {
    parse_names(cfg)?;
    let files = resolve(cfg)?;
    let tok_hash = tokenize::hash_files(&cfg.tokenizer)?;
    let entries: Vec<Value> = files
        .par_iter()
        .map(|f| {
            let (size, hash) = stream::hash_file(&f.path)?;
            if is_pretokenized(&f.path) {
                let meta = stream::hash_file(&pretok::meta_path(&f.path))?;
                Ok(pretok_entry(f, size, &hash, &meta))
            } else {
                Ok(file_entry(&f.name, size, &hash))
            }
        })
        .collect::<Result<_>>()?;
    Ok(hash_value(&fingerprint_inputs(cfg, &tok_hash, &entries)))
}

/// Why one record produced no sample.
enum RecordFault {
    Json(String),
    Shape(String),
}

/// What one record became: (sample, tokens before truncation, image path) or None when the
/// format maps it to no conversation.
type Encodedrecord = Option<(Encoded, u64, Option<String>)>;

/// Everything the encoders share.
struct Run<'a> {
    cfg: &'a PackConfig,
    format: Format,
    templating: Templating,
    columns: Columns,
    tok: TextTokenizer,
    pool: rayon::ThreadPool,
}

impl Run<'_> {
    fn parse(&self, text: &str) -> std::result::Result<Value, RecordFault> {
        let mut value: Value =
            serde_json::from_str(text).map_err(|e| RecordFault::Json(e.to_string()))?;
        if !self.columns.is_empty() {
            self.columns.apply(&mut value);
        }
        Ok(value)
    }

    fn encode_record(
        &self,
        rec: &RawRecord<'_>,
        format: Format,
    ) -> std::result::Result<Encodedrecord, RecordFault> {
        let value = self.parse(rec.text)?;
        let image = if format == Format::Llava {
            llava_image(&value).map_err(RecordFault::Shape)?
        } else {
            None
        };
        let max_length = self.cfg.max_length;
        // Pretraining text is never wrapped in a prompt template (XTuner's pretrain configs
        // set template_map_fn=None), so one --template serves a mixed directory.
        let templating = if format == Format::Pretrain {
            &Templating::None
        } else {
            &self.templating
        };
        let enc = match templating {
            Templating::Hf(ct) => {
                let messages = if format == Format::OpenAi {
                    chat_template::messages_from_openai(&value).map_err(RecordFault::Shape)?
                } else {
                    let turns = format.to_turns(&value).map_err(RecordFault::Shape)?;
                    chat_template::messages_from_turns(&turns)
                };
                if messages.is_empty() {
                    return Ok(None);
                }
                ct.encode(&self.tok, &messages, max_length)
                    .map_err(RecordFault::Shape)?
            }
            t => {
                let mut turns = format.to_turns(&value).map_err(RecordFault::Shape)?;
                if turns.is_empty() {
                    return Ok(None);
                }
                if let Templating::Xtuner(t) = t {
                    t.apply(&mut turns).map_err(RecordFault::Shape)?;
                }
                encode_turns_opts(&self.tok, &turns, max_length, format == Format::Llava)
                    .map_err(RecordFault::Shape)?
            }
        };
        let raw_len = enc.ids.len() as u64 + enc.truncated;
        Ok(Some((enc, raw_len, image)))
    }

    fn detect(&self, path: &Path, rec: &RawRecord<'_>) -> Result<Option<Format>> {
        let Ok(value) = self.parse(rec.text) else {
            return Ok(None); // not JSON: a bad record; detect from the next one
        };
        Format::detect(&value).map(Some).ok_or_else(|| Error::Record {
            path: path.to_path_buf(),
            line: rec.line,
            record: rec.index,
            msg: format!(
                "cannot detect the format from this record's keys (see `pyfast-tune formats`; \
                 e.g. \"conversation\", \"messages\", \"conversations\", \"instruction\"+\"output\", \
                 \"text\"): pass --format or --columns; record starts {:?}",
                rec.text.chars().take(80).collect::<String>()
            ),
        })
    }
}

/// Per-sample bookkeeping while staging (input order).
#[derive(Clone, Copy, Debug)]
pub(crate) struct StagedSample {
    /// Which part's staging files hold the tokens.
    pub part: u32,
    /// Token offset in that part's staging files.
    pub offset: u64,
    /// Tokens.
    pub len: u32,
    /// Global index of the source file.
    pub file: u32,
    /// Record index in the source file.
    pub record: u64,
}

/// The encoded samples of a range of input files, staged in `dir`.
pub(crate) struct Part {
    /// Directory holding [`STAGE_IDS`] and [`STAGE_MASK`].
    pub dir: PathBuf,
    pub samples: Vec<StagedSample>,
    pub tokens: u64,
    pub stats: PackStats,
    pub file_entries: Vec<Value>,
    pub file_table: Vec<Value>,
    /// (part-local sample index, image path) of LLaVA samples.
    pub images: Vec<(u64, String)>,
}

/// What [`finish`] needs besides the parts: the run's identity.
#[derive(Clone, Debug, serde::Deserialize, Serialize)]
pub(crate) struct Header {
    /// [`fingerprint_inputs`] without `inputs`.
    pub fingerprint_base: Value,
    pub max_length: usize,
    pub format: String,
    pub template: String,
    pub seed: u64,
    /// hash, path, bos, eos.
    pub tokenizer: Value,
}

fn thread_count(cfg: &PackConfig) -> usize {
    cfg.threads
        .or_else(|| std::env::var("PYFAST_TUNE_THREADS").ok()?.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
}

/// Run the whole pipeline and commit the packed directory (or, with `cfg.shard`, the shard's
/// part). `progress` is called from the calling thread between batches; returning `false`
/// aborts with [`Error::Interrupted`] and leaves no output.
pub fn pack(cfg: &PackConfig, progress: &dyn Fn(Progress<'_>) -> bool) -> Result<PackStats> {
    let start = Instant::now();
    let (format, template) = parse_names(cfg)?;
    let files = resolve(cfg)?;
    let tok = TextTokenizer::load_with(&cfg.tokenizer, cfg.tokenizer_backend)?;
    let templating = match (cfg.template.as_str(), template) {
        ("hf", _) => Templating::Hf(Box::new(ChatTemplate::load(&cfg.tokenizer)?)),
        (_, Some(t)) => Templating::Xtuner(t),
        _ => Templating::None,
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(thread_count(cfg))
        .build()
        .map_err(|e| Error::Internal(format!("cannot start worker threads: {e}")))?;
    let run = Run {
        cfg,
        format,
        templating,
        columns: Columns::parse(&cfg.columns).map_err(Error::Config)?,
        tok,
        pool,
    };
    let sizes: Vec<u64> = files
        .iter()
        .map(|f| {
            std::fs::metadata(&f.path)
                .map(|m| m.len())
                .map_err(|e| Error::io(&f.path, e))
        })
        .collect::<Result<_>>()?;
    let range = match cfg.shard {
        Some((i, n)) => crate::shard::file_range(&sizes, i, n),
        None => 0..files.len(),
    };

    let staging = StagingDir::new(&cfg.out_dir)?;
    let load_seconds = start.elapsed().as_secs_f64();
    let part = encode_part(&run, &files, range.clone(), &sizes, &staging.dir, progress)?;
    let encode_seconds = start.elapsed().as_secs_f64() - load_seconds;
    let phases = |mut stats: PackStats| {
        stats.load_seconds = load_seconds;
        stats.encode_seconds = encode_seconds;
        stats.write_seconds = (stats.seconds - load_seconds - encode_seconds).max(0.0);
        stats
    };
    let mut fp_base = fingerprint_inputs(cfg, &run.tok.hash, &[]);
    fp_base.as_object_mut().map(|o| o.remove("inputs"));
    let header = Header {
        fingerprint_base: fp_base,
        max_length: cfg.max_length,
        format: cfg.format.clone(),
        template: cfg.template.clone(),
        seed: cfg.seed,
        tokenizer: json!({"hash": run.tok.hash, "path": run.tok.path.to_string_lossy(),
                          "bos": run.tok.bos, "eos": run.tok.eos}),
    };
    if let Some((i, n)) = cfg.shard {
        let names: Vec<String> = files.iter().map(|f| f.name.clone()).collect();
        return crate::shard::save(&header, part, i, n, &names, range, staging, start).map(phases);
    }
    finish(&header, vec![part], staging, start, progress).map(phases)
}

fn record_error(
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

/// Appends samples of one part to its staging files.
struct Stager {
    ids: HashedWriter,
    mask: HashedWriter,
    buf: Vec<u8>,
    part: Part,
}

impl Stager {
    fn stage(
        &mut self,
        enc: &Encoded,
        file: usize,
        record: u64,
        image: Option<String>,
    ) -> Result<()> {
        self.buf.clear();
        self.buf
            .extend(enc.ids.iter().flat_map(|x| x.to_le_bytes()));
        self.ids.write(&self.buf)?;
        self.mask.write(&enc.mask)?;
        if let Some(img) = image {
            self.part.images.push((self.part.samples.len() as u64, img));
        }
        self.part.samples.push(StagedSample {
            part: 0,
            offset: self.part.tokens,
            len: enc.ids.len() as u32,
            file: file as u32,
            record,
        });
        self.part.tokens += enc.ids.len() as u64;
        Ok(())
    }

    /// Count and stage one encoded sample (truncation, drops).
    fn take(
        &mut self,
        enc: Encoded,
        raw_len: u64,
        file: usize,
        record: u64,
        image: Option<String>,
    ) -> Result<()> {
        let stats = &mut self.part.stats;
        if enc.truncated > 0 {
            stats.truncated_samples += 1;
            stats.truncated_tokens += enc.truncated;
        }
        let trained = enc.trained() as u64;
        if trained == 0 {
            stats.dropped_samples += 1;
            stats.dropped_tokens += raw_len - enc.truncated;
            return Ok(());
        }
        stats.loss_tokens += trained;
        self.stage(&enc, file, record, image)
    }
}

fn skip(cfg: &PackConfig, stats: &mut PackStats, err: Error) -> Result<()> {
    if !cfg.skip_bad {
        return Err(err);
    }
    if stats.skipped_examples.len() < MAX_SKIP_EXAMPLES {
        stats.skipped_examples.push(err.to_string());
    }
    Ok(())
}

/// Encode files `range` (global indices) into staging files in `dir`.
fn encode_part(
    run: &Run<'_>,
    files: &[InputFile],
    range: std::ops::Range<usize>,
    sizes: &[u64],
    dir: &Path,
    progress: &dyn Fn(Progress<'_>) -> bool,
) -> Result<Part> {
    let total_bytes: u64 = sizes[range.clone()].iter().sum();
    let mut st = Stager {
        ids: HashedWriter::create(dir.join(STAGE_IDS))?,
        mask: HashedWriter::create(dir.join(STAGE_MASK))?,
        buf: Vec::new(),
        part: Part {
            dir: dir.to_path_buf(),
            samples: Vec::new(),
            tokens: 0,
            stats: PackStats::default(),
            file_entries: Vec::new(),
            file_table: Vec::new(),
            images: Vec::new(),
        },
    };
    let mut bytes_done = 0u64;
    for fi in range {
        let file = &files[fi];
        let report = |done: u64| {
            progress(Progress {
                stage: "encode",
                done: bytes_done + done,
                total: total_bytes,
            })
        };
        if is_pretokenized(&file.path) {
            encode_pretok_file(run, file, fi, &mut st, &report)?;
        } else {
            encode_json_file(run, file, fi, &mut st, &report)?;
        }
        bytes_done += sizes[fi];
    }
    st.ids.finish()?;
    st.mask.finish()?;
    Ok(st.part)
}

fn encode_json_file(
    run: &Run<'_>,
    file: &InputFile,
    fi: usize,
    st: &mut Stager,
    report: &dyn Fn(u64) -> bool,
) -> Result<()> {
    let cfg = run.cfg;
    let mut table = json!({"name": file.name, "size": 0, "records": 0, "format": Value::Null});
    let mut stream = match RecordStream::open(&file.path) {
        Ok(s) => s,
        Err(e @ (Error::EmptyFile { .. } | Error::Json { .. })) => {
            let (size, hash) = stream::hash_file(&file.path)?;
            st.part
                .file_entries
                .push(file_entry(&file.name, size, &hash));
            table["size"] = json!(size);
            st.part.file_table.push(table);
            st.part.stats.skipped_files += 1;
            return skip(cfg, &mut st.part.stats, e);
        }
        Err(e) => return Err(e),
    };
    let mut file_format = match run.format {
        Format::Auto => None,
        f => Some(f),
    };
    let mut records = 0u64;
    let mut file_fault: Option<Error> = None;
    loop {
        let batch: Vec<OwnedRecord> = stream.next_batch(CHUNK)?;
        if batch.is_empty() {
            break;
        }
        records += batch.len() as u64;
        if file_format.is_none() {
            for r in batch.iter().filter_map(OwnedRecord::raw) {
                match run.detect(&file.path, &r) {
                    Ok(Some(f)) => {
                        file_format = Some(f);
                        break;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        file_fault = Some(e);
                        break;
                    }
                }
            }
            if file_fault.is_some() {
                break;
            }
        }
        // Until a record parses, the format is unknown; those records are bad JSON anyway.
        let fmt = file_format.unwrap_or(Format::Auto);
        let results: Vec<_> = run.pool.install(|| {
            batch
                .par_iter()
                .map(|r| match r.raw() {
                    Some(raw) => run.encode_record(&raw, fmt),
                    None => Err(RecordFault::Json(r.text.clone().err().unwrap_or_default())),
                })
                .collect()
        });
        for (rec, res) in batch.iter().zip(results) {
            match res {
                Ok(Some((enc, raw_len, image))) => st.take(enc, raw_len, fi, rec.index, image)?,
                Ok(None) => st.part.stats.dropped_samples += 1,
                Err(fault) => {
                    st.part.stats.skipped_records += 1;
                    let err = record_error(&file.path, rec.line, rec.index, fault, fmt.name());
                    skip(cfg, &mut st.part.stats, err)?;
                }
            }
        }
        if !report(stream.raw_bytes()) {
            return Err(Error::Interrupted);
        }
    }
    let (size, hash) = stream.finish()?;
    st.part
        .file_entries
        .push(file_entry(&file.name, size, &hash));
    table["size"] = json!(size);
    if let Some(e) = file_fault {
        st.part.file_table.push(table);
        st.part.stats.skipped_files += 1;
        return skip(cfg, &mut st.part.stats, e);
    }
    if records == 0 {
        st.part.file_table.push(table);
        st.part.stats.skipped_files += 1;
        let e = Error::EmptyFile {
            path: file.path.clone(),
        };
        return skip(cfg, &mut st.part.stats, e);
    }
    table["records"] = json!(records);
    table["format"] = json!(file_format.unwrap_or(run.format).name());
    st.part.file_table.push(table);
    st.part.stats.records += records;
    Ok(())
}

/// What one `.bin` row became.
enum RowOut {
    /// Filtered by `min_length`.
    Short,
    /// ids, mask.
    Tokens(Vec<u32>, Vec<u8>),
    /// Not a `{"tokens": [...]}` line.
    Bad(String),
    /// Token count differs from the `.meta`.
    Mismatch(String),
}

fn encode_pretok_file(
    run: &Run<'_>,
    file: &InputFile,
    fi: usize,
    st: &mut Stager,
    report: &dyn Fn(u64) -> bool,
) -> Result<()> {
    let cfg = run.cfg;
    let mut pf = PretokFile::open(&file.path, cfg.min_length as u64, cfg.rebuild_meta)?;
    let (size, hash) = stream::hash_file(&file.path)?;
    st.part
        .file_entries
        .push(pretok_entry(file, size, &hash, &pf.meta_hash));
    st.part
        .file_table
        .push(json!({"name": file.name, "size": size,
        "records": pf.num_rows(), "format": "pretokenized"}));
    st.part.stats.records += pf.num_rows() as u64;
    let max_length = cfg.max_length;
    loop {
        let batch = pf.next_batch(CHUNK)?;
        if batch.is_empty() {
            break;
        }
        let results: Vec<RowOut> = run.pool.install(|| {
            batch
                .par_iter()
                .map(|row| {
                    let Some(line) = row.line.as_ref() else {
                        return RowOut::Short;
                    };
                    match pretok::decode_line(line) {
                        Err(msg) => RowOut::Bad(msg),
                        Ok((ids, mask)) => match pretok::check_count(&file.path, row, ids.len()) {
                            Err(msg) => RowOut::Mismatch(msg),
                            Ok(()) => RowOut::Tokens(ids, mask),
                        },
                    }
                })
                .collect()
        });
        for (row, res) in batch.iter().zip(results) {
            match res {
                RowOut::Short => {
                    // Shorter than min_length: XTuner's JsonlDataset filters it; we count it.
                    st.part.stats.dropped_samples += 1;
                    st.part.stats.dropped_tokens += row.count;
                }
                RowOut::Tokens(mut ids, mut mask) => {
                    let raw_len = ids.len() as u64;
                    let truncated = raw_len.saturating_sub(max_length as u64);
                    ids.truncate(max_length);
                    mask.truncate(max_length);
                    let enc = Encoded {
                        ids,
                        mask,
                        truncated,
                    };
                    st.take(enc, raw_len, fi, row.row, None)?;
                }
                // A .meta that disagrees with its .bin is corrupt as a whole: never skipped.
                RowOut::Mismatch(msg) => {
                    return Err(Error::Corrupt {
                        path: pretok::meta_path(&file.path),
                        msg,
                    })
                }
                RowOut::Bad(msg) => {
                    st.part.stats.skipped_records += 1;
                    let err = Error::Record {
                        path: file.path.clone(),
                        line: row.row + 1,
                        record: row.row,
                        msg: format!("byte offset {}: {msg}", row.offset),
                    };
                    skip(cfg, &mut st.part.stats, err)?;
                }
            }
        }
        if !report(pf.position()) {
            return Err(Error::Interrupted);
        }
    }
    Ok(())
}

/// Plan packs over every part's samples (global input order), write the packed directory
/// and commit it. A single run and a merge of shards both end here.
pub(crate) fn finish(
    header: &Header,
    mut parts: Vec<Part>,
    staging: StagingDir,
    start: Instant,
    progress: &dyn Fn(Progress<'_>) -> bool,
) -> Result<PackStats> {
    let mut stats = PackStats::default();
    let mut staged: Vec<StagedSample> = Vec::new();
    let mut file_entries = Vec::new();
    let mut file_table = Vec::new();
    let mut images: Vec<Value> = Vec::new();
    let mut tokens = 0u64;
    for (pi, part) in parts.iter_mut().enumerate() {
        let base = staged.len() as u64;
        for (k, img) in part.images.drain(..) {
            images.push(json!([base + k, img]));
        }
        staged.extend(part.samples.iter().map(|s| StagedSample {
            part: pi as u32,
            ..*s
        }));
        tokens += part.tokens;
        let p = &part.stats;
        stats.records += p.records;
        stats.loss_tokens += p.loss_tokens;
        stats.truncated_samples += p.truncated_samples;
        stats.truncated_tokens += p.truncated_tokens;
        stats.dropped_samples += p.dropped_samples;
        stats.dropped_tokens += p.dropped_tokens;
        stats.skipped_records += p.skipped_records;
        stats.skipped_files += p.skipped_files;
        for m in &p.skipped_examples {
            if stats.skipped_examples.len() < MAX_SKIP_EXAMPLES {
                stats.skipped_examples.push(m.clone());
            }
        }
        file_entries.extend(part.file_entries.iter().cloned());
        file_table.extend(part.file_table.iter().cloned());
    }
    if staged.is_empty() {
        return Err(Error::NoTrainableSamples {
            records: stats.records,
            dropped: stats.dropped_samples,
            skipped: stats.skipped_records,
        });
    }

    let lengths: Vec<u32> = staged.iter().map(|s| s.len).collect();
    let packs =
        plan_packs(&lengths, header.max_length as u32, header.seed).map_err(Error::Internal)?;
    let part_dirs: Vec<&Path> = parts.iter().map(|p| p.dir.as_path()).collect();
    let mut outputs = write_packed(&staging.dir, &part_dirs, &staged, &packs, progress)?;
    for p in &parts {
        for name in [STAGE_IDS, STAGE_MASK] {
            let f = p.dir.join(name);
            if f.starts_with(&staging.dir) {
                std::fs::remove_file(&f).map_err(|e| Error::io(&f, e))?;
            }
        }
    }
    if !images.is_empty() {
        let p = staging.dir.join(output::IMAGES);
        let text =
            json!({"image_token_id": crate::encode::IMAGE_TOKEN_ID, "samples": images}).to_string();
        std::fs::write(&p, &text).map_err(|e| Error::io(&p, e))?;
        outputs.insert(
            output::IMAGES.to_string(),
            json!({"size": text.len(), "blake3": blake3::hash(text.as_bytes()).to_hex().to_string()}),
        );
    }

    stats.samples = staged.len() as u64;
    stats.tokens = tokens;
    stats.packs = packs.len() as u64;
    stats.fill = tokens as f64 / (packs.len() as f64 * header.max_length as f64);
    let mut fp_inputs = header.fingerprint_base.clone();
    fp_inputs["inputs"] = Value::Array(file_entries);
    stats.fingerprint = hash_value(&fp_inputs);
    let meta = json!({
        "format_version": output::FORMAT_VERSION,
        "tool": "pyfast-tune",
        "tool_version": env!("CARGO_PKG_VERSION"),
        "fingerprint": stats.fingerprint,
        "fingerprint_inputs": fp_inputs,
        "max_length": header.max_length,
        "format": header.format,
        "template": header.template,
        "seed": header.seed,
        "tokenizer": header.tokenizer,
        "files": file_table,
        "stats": stats_for_meta(&stats),
        "num_samples": stats.samples,
        "num_packs": stats.packs,
        "num_tokens": stats.tokens,
        "outputs": outputs,
    });
    let meta_path = staging.dir.join(output::META);
    let mut f = std::fs::File::create(&meta_path).map_err(|e| Error::io(&meta_path, e))?;
    let text = serde_json::to_string_pretty(&meta).map_err(|e| Error::Internal(e.to_string()))?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io(&meta_path, e))?;
    staging.commit()?;
    // Timing excludes nothing: the commit is part of the job.
    stats.seconds = start.elapsed().as_secs_f64();
    stats.tokens_per_second = tokens as f64 / stats.seconds.max(1e-9);
    Ok(stats)
}

/// Statistics as stored in meta.json: without wall-clock figures, so the directory's bytes
/// are a function of the inputs and settings only.
fn stats_for_meta(stats: &PackStats) -> Value {
    let mut v = serde_json::to_value(stats).unwrap_or(Value::Null);
    if let Some(o) = v.as_object_mut() {
        for k in [
            "seconds",
            "tokens_per_second",
            "load_seconds",
            "encode_seconds",
            "write_seconds",
        ] {
            o.remove(k);
        }
    }
    v
}

fn open(path: &Path) -> Result<std::fs::File> {
    std::fs::File::open(path).map_err(|e| Error::io(path, e))
}

/// Write the packed files; returns `outputs` for meta.json (size and BLAKE3 per file).
/// Staged tokens are read with positioned reads, not mapped, so resident memory stays
/// bounded however large the staging files are.
fn write_packed(
    dir: &Path,
    part_dirs: &[&Path],
    staged: &[StagedSample],
    packs: &[Vec<u32>],
    progress: &dyn Fn(Progress<'_>) -> bool,
) -> Result<serde_json::Map<String, Value>> {
    let sources: Vec<(std::fs::File, std::fs::File, PathBuf)> = part_dirs
        .iter()
        .map(|d| {
            Ok((
                open(&d.join(STAGE_IDS))?,
                open(&d.join(STAGE_MASK))?,
                d.join(STAGE_IDS),
            ))
        })
        .collect::<Result<_>>()?;
    let mut w_ids = HashedWriter::create(dir.join(output::INPUT_IDS))?;
    let mut w_mask = HashedWriter::create(dir.join(output::LOSS_MASK))?;
    let mut w_packs = HashedWriter::create(dir.join(output::PACKS))?;
    let mut w_order = HashedWriter::create(dir.join(output::PACK_SAMPLES))?;
    let mut new_start = vec![0i64; staged.len()];
    let mut pack_of = vec![0i64; staged.len()];
    let (mut tok_pos, mut sample_pos) = (0i64, 0i64);
    let (mut ids_buf, mut mask_buf) = (Vec::new(), Vec::new());
    for (p, members) in packs.iter().enumerate() {
        w_packs.write_i64s(&[tok_pos, sample_pos])?;
        for &s in members {
            let s = s as usize;
            let st = &staged[s];
            let (ids_f, mask_f, ids_path) = &sources[st.part as usize];
            ids_buf.resize(st.len as usize * 4, 0);
            mask_buf.resize(st.len as usize, 0);
            ids_f
                .read_exact_at(&mut ids_buf, st.offset * 4)
                .and_then(|_| mask_f.read_exact_at(&mut mask_buf, st.offset))
                .map_err(|e| Error::io(ids_path, e))?;
            w_ids.write(&ids_buf)?;
            w_mask.write(&mask_buf)?;
            w_order.write_i64s(&[s as i64])?;
            new_start[s] = tok_pos;
            pack_of[s] = p as i64;
            tok_pos += st.len as i64;
            sample_pos += 1;
        }
        let report = Progress {
            stage: "write",
            done: p as u64,
            total: packs.len() as u64,
        };
        if p % 4096 == 0 && !progress(report) {
            return Err(Error::Interrupted);
        }
    }
    w_packs.write_i64s(&[tok_pos, sample_pos])?;
    let mut w_samples = HashedWriter::create(dir.join(output::SAMPLES))?;
    for (s, st) in staged.iter().enumerate() {
        w_samples.write_i64s(&[
            new_start[s],
            st.len as i64,
            pack_of[s],
            st.file as i64,
            st.record as i64,
        ])?;
    }
    let mut outputs = serde_json::Map::new();
    let names = [
        output::INPUT_IDS,
        output::LOSS_MASK,
        output::PACKS,
        output::PACK_SAMPLES,
        output::SAMPLES,
    ];
    for (name, w) in names
        .into_iter()
        .zip([w_ids, w_mask, w_packs, w_order, w_samples])
    {
        let (size, hash) = w.finish()?;
        outputs.insert(name.to_string(), json!({"size": size, "blake3": hash}));
    }
    // meta.json lists outputs in BINARY_FILES order, as before.
    let mut ordered = serde_json::Map::new();
    for name in output::BINARY_FILES {
        if let Some(v) = outputs.remove(*name) {
            ordered.insert(name.to_string(), v);
        }
    }
    if !progress(Progress {
        stage: "write",
        done: packs.len() as u64,
        total: packs.len() as u64,
    }) {
        return Err(Error::Interrupted);
    }
    Ok(ordered)
}
