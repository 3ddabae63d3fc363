//! The pack pipeline, top to bottom: resolve inputs → read records → map format → apply
//! template → encode (parallel, results in input order) → stage tokens → plan packs (BFD) →
//! write the packed directory → commit atomically.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;
use serde_json::{json, Value};

use crate::binpack::plan_packs;
use crate::encode::{encode_turns, Encoded};
use crate::error::{Error, Result};
use crate::format::Format;
use crate::input::{
    read_data_order, read_input, resolve_inputs, split_records, InputFile, RawRecord,
    DATA_EXTENSIONS,
};
use crate::output::{self, HashedWriter, StagingDir};
use crate::template::{self, Template};
use crate::tokenize::{self, TextTokenizer, TokenizerBackend};

/// Records encoded per parallel batch: large enough to amortise scheduling, small enough
/// to bound memory and report progress often.
const CHUNK: usize = 4096;
/// How many skipped-record messages are kept for the report.
const MAX_SKIP_EXAMPLES: usize = 10;

/// Everything that determines a packed directory (plus `threads`, which never changes bytes).
#[derive(Clone, Debug)]
pub struct PackConfig {
    /// Files, directories or globs; with `data_order`, the data root (or empty).
    pub inputs: Vec<String>,
    /// Optional data-order file (one path per line, relative to the data root).
    pub data_order: Option<PathBuf>,
    /// Output directory.
    pub out_dir: PathBuf,
    /// Tokenizer directory or `tokenizer.json`.
    pub tokenizer: PathBuf,
    /// Pack capacity; samples longer than this are truncated (counted).
    pub max_length: usize,
    /// `--format` name.
    pub format: String,
    /// `--template` name, or `none`.
    pub template: String,
    /// Seed of the pack order.
    pub seed: u64,
    /// Worker threads (None = all cores, or `PYFAST_TUNE_THREADS`).
    pub threads: Option<usize>,
    /// Skip (and count) bad records instead of failing.
    pub skip_bad: bool,
    /// Text encoder (`auto`, `hf`, `fast`). Every backend gives the same ids, so it never
    /// changes the output bytes and is not part of the fingerprint.
    pub tokenizer_backend: TokenizerBackend,
}

/// What a pack run did. Token accounting: tokens + truncated_tokens + dropped_tokens is every
/// token the encoder produced.
#[derive(Clone, Debug, Default, Serialize)]
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

/// Parse the format and template names of a config.
pub fn parse_names(cfg: &PackConfig) -> Result<(Format, Option<&'static Template>)> {
    let format = Format::from_name(&cfg.format).ok_or_else(|| {
        Error::Config(format!(
            "unknown format {:?}; known: {}",
            cfg.format,
            Format::NAMES.join(", ")
        ))
    })?;
    let template = match cfg.template.as_str() {
        "none" | "" => None,
        name => Some(template::by_name(name).ok_or_else(|| {
            let names: Vec<_> = template::TEMPLATES.iter().map(|t| t.name).collect();
            Error::Config(format!(
                "unknown template {name:?}; known: none, {}",
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
        None => resolve_inputs(&cfg.inputs, DATA_EXTENSIONS),
    }
}

fn fingerprint_inputs(cfg: &PackConfig, tokenizer_hash: &str, files: &[Value]) -> Value {
    json!({
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
    })
}

fn hash_value(v: &Value) -> String {
    blake3::hash(v.to_string().as_bytes()).to_hex().to_string()
}

fn file_entry(name: &str, size: u64, hash: &blake3::Hash) -> Value {
    json!({"name": name, "size": size, "blake3": hash.to_hex().to_string()})
}

/// The fingerprint `pack` would record for `cfg`, without packing (hashes every input).
/// Use it to key a cache of packed directories.
pub fn fingerprint(cfg: &PackConfig) -> Result<String> {
    parse_names(cfg)?;
    let files = resolve(cfg)?;
    let tok_hash = tokenize::hash_files(&cfg.tokenizer)?;
    let entries: Vec<Value> = files
        .par_iter()
        .map(|f| {
            let raw = std::fs::read(&f.path).map_err(|e| Error::io(&f.path, e))?;
            Ok(file_entry(&f.name, raw.len() as u64, &blake3::hash(&raw)))
        })
        .collect::<Result<_>>()?;
    Ok(hash_value(&fingerprint_inputs(cfg, &tok_hash, &entries)))
}

/// Why one record produced no sample.
enum RecordFault {
    Json(String),
    Shape(String),
}

fn encode_record(
    rec: &RawRecord<'_>,
    format: Format,
    template: Option<&Template>,
    tok: &TextTokenizer,
    max_length: usize,
) -> std::result::Result<Option<(Encoded, u64)>, RecordFault> {
    let value: Value =
        serde_json::from_str(rec.text).map_err(|e| RecordFault::Json(e.to_string()))?;
    let mut turns = format.to_turns(&value).map_err(RecordFault::Shape)?;
    if turns.is_empty() {
        return Ok(None);
    }
    if let Some(t) = template {
        t.apply(&mut turns);
    }
    let enc = encode_turns(tok, &turns, max_length).map_err(RecordFault::Shape)?;
    let raw_len = enc.ids.len() as u64 + enc.truncated;
    Ok(Some((enc, raw_len)))
}

/// Per-sample bookkeeping while staging (input order).
struct StagedSample {
    offset: u64,
    len: u32,
    file: u32,
    record: u64,
}

fn detect_file_format(
    path: &Path,
    records: &[RawRecord<'_>],
) -> std::result::Result<Format, Error> {
    let first = &records[0];
    let value: Value = serde_json::from_str(first.text).map_err(|e| Error::Json {
        path: path.to_path_buf(),
        line: first.line,
        msg: e.to_string(),
    })?;
    Format::detect(&value).ok_or_else(|| Error::Record {
        path: path.to_path_buf(),
        line: first.line,
        record: first.index,
        msg: format!(
            "cannot detect the format from this record's keys (expected one of \"conversation\", \"messages\", \"instruction\"+\"output\", \"text\"): pass --format; record starts {:?}",
            first.text.chars().take(80).collect::<String>()
        ),
    })
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

/// Run the whole pipeline and commit the packed directory. `progress` is called from the
/// calling thread between batches; returning `false` aborts with [`Error::Interrupted`]
/// and leaves no output.
pub fn pack(cfg: &PackConfig, progress: &dyn Fn(Progress<'_>) -> bool) -> Result<PackStats> {
    let start = Instant::now();
    let (format, template) = parse_names(cfg)?;
    let files = resolve(cfg)?;
    let tok = TextTokenizer::load_with(&cfg.tokenizer, cfg.tokenizer_backend)?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(thread_count(cfg))
        .build()
        .map_err(|e| Error::Config(format!("cannot start worker threads: {e}")))?;
    let total_bytes: u64 = files
        .iter()
        .map(|f| {
            std::fs::metadata(&f.path)
                .map(|m| m.len())
                .map_err(|e| Error::io(&f.path, e))
        })
        .sum::<Result<u64>>()?;

    let staging = StagingDir::new(&cfg.out_dir)?;
    let stage_ids_path = staging.dir.join("stage_ids.tmp");
    let stage_mask_path = staging.dir.join("stage_mask.tmp");
    let mut stage_ids = HashedWriter::create(stage_ids_path.clone())?;
    let mut stage_mask = HashedWriter::create(stage_mask_path.clone())?;

    let mut stats = PackStats::default();
    let mut staged: Vec<StagedSample> = Vec::new();
    let mut file_entries: Vec<Value> = Vec::with_capacity(files.len());
    let mut file_table: Vec<Value> = Vec::with_capacity(files.len());
    let mut staged_tokens = 0u64;
    let mut bytes_done = 0u64;
    let mut buf: Vec<u8> = Vec::new();

    let skip = |stats: &mut PackStats, err: Error| -> Result<()> {
        if !cfg.skip_bad {
            return Err(err);
        }
        if stats.skipped_examples.len() < MAX_SKIP_EXAMPLES {
            stats.skipped_examples.push(err.to_string());
        }
        Ok(())
    };

    for (fi, file) in files.iter().enumerate() {
        let (hash, size, data) = read_input(&file.path)?;
        file_entries.push(file_entry(&file.name, size, &hash));
        let mut table_entry =
            json!({"name": file.name, "size": size, "records": 0, "format": Value::Null});
        let split = split_records(&file.path, &data).and_then(|records| {
            let fmt = match format {
                Format::Auto => detect_file_format(&file.path, &records)?,
                f => f,
            };
            Ok((records, fmt))
        });
        let (records, file_format) = match split {
            Ok(x) => x,
            Err(e @ (Error::EmptyFile { .. } | Error::Json { .. } | Error::Record { .. })) => {
                stats.skipped_files += 1;
                skip(&mut stats, e)?;
                file_table.push(table_entry);
                bytes_done += size;
                continue;
            }
            Err(e) => return Err(e),
        };
        // Pretraining text is never wrapped in a prompt template (XTuner's pretrain configs
        // set template_map_fn=None), so one --template serves a mixed directory.
        let file_template = if file_format == Format::Pretrain {
            None
        } else {
            template
        };
        table_entry["records"] = json!(records.len());
        table_entry["format"] = json!(file_format.name());
        file_table.push(table_entry);
        stats.records += records.len() as u64;

        for chunk in records.chunks(CHUNK) {
            let results: Vec<_> = pool.install(|| {
                chunk
                    .par_iter()
                    .map(|r| encode_record(r, file_format, file_template, &tok, cfg.max_length))
                    .collect()
            });
            for (rec, res) in chunk.iter().zip(results) {
                match res {
                    Ok(Some((enc, raw_len))) => {
                        if enc.truncated > 0 {
                            stats.truncated_samples += 1;
                            stats.truncated_tokens += enc.truncated;
                        }
                        let trained = enc.trained() as u64;
                        if trained == 0 {
                            stats.dropped_samples += 1;
                            stats.dropped_tokens += raw_len - enc.truncated;
                            continue;
                        }
                        stats.loss_tokens += trained;
                        buf.clear();
                        buf.extend(enc.ids.iter().flat_map(|x| x.to_le_bytes()));
                        stage_ids.write(&buf)?;
                        stage_mask.write(&enc.mask)?;
                        staged.push(StagedSample {
                            offset: staged_tokens,
                            len: enc.ids.len() as u32,
                            file: fi as u32,
                            record: rec.index,
                        });
                        staged_tokens += enc.ids.len() as u64;
                    }
                    Ok(None) => stats.dropped_samples += 1,
                    Err(fault) => {
                        stats.skipped_records += 1;
                        let err = match fault {
                            RecordFault::Json(msg) => Error::Json {
                                path: file.path.clone(),
                                line: rec.line,
                                msg,
                            },
                            RecordFault::Shape(msg) => Error::Record {
                                path: file.path.clone(),
                                line: rec.line,
                                record: rec.index,
                                msg: format!("{msg} (format {})", file_format.name()),
                            },
                        };
                        skip(&mut stats, err)?;
                    }
                }
            }
            let consumed = chunk
                .last()
                .map(|r| r.text.as_ptr() as usize + r.text.len() - data.as_ptr() as usize);
            let frac = consumed.unwrap_or(0) as f64 / data.len().max(1) as f64;
            if !progress(Progress {
                stage: "encode",
                done: bytes_done + (frac * size as f64) as u64,
                total: total_bytes,
            }) {
                return Err(Error::Interrupted);
            }
        }
        bytes_done += size;
    }
    stage_ids.finish()?;
    stage_mask.finish()?;

    if staged.is_empty() {
        return Err(Error::Config(format!(
            "no trainable samples in the inputs: {} records, {} dropped (nothing trained), {} skipped",
            stats.records, stats.dropped_samples, stats.skipped_records
        )));
    }

    let lengths: Vec<u32> = staged.iter().map(|s| s.len).collect();
    let packs = plan_packs(&lengths, cfg.max_length as u32, cfg.seed).map_err(Error::Config)?;

    write_packed(
        &staging.dir,
        &stage_ids_path,
        &stage_mask_path,
        &staged,
        &packs,
        progress,
    )?;
    std::fs::remove_file(&stage_ids_path).map_err(|e| Error::io(&stage_ids_path, e))?;
    std::fs::remove_file(&stage_mask_path).map_err(|e| Error::io(&stage_mask_path, e))?;

    stats.samples = staged.len() as u64;
    stats.tokens = staged_tokens;
    stats.packs = packs.len() as u64;
    stats.fill = staged_tokens as f64 / (packs.len() as f64 * cfg.max_length as f64);
    stats.seconds = start.elapsed().as_secs_f64();
    stats.tokens_per_second = staged_tokens as f64 / stats.seconds.max(1e-9);

    let fp_inputs = fingerprint_inputs(cfg, &tok.hash, &file_entries);
    stats.fingerprint = hash_value(&fp_inputs);
    let mut outputs = serde_json::Map::new();
    for name in output::BINARY_FILES {
        let p = staging.dir.join(name);
        let bytes = std::fs::read(&p).map_err(|e| Error::io(&p, e))?;
        outputs.insert(
            name.to_string(),
            json!({"size": bytes.len(), "blake3": blake3::hash(&bytes).to_hex().to_string()}),
        );
    }
    let meta = json!({
        "format_version": output::FORMAT_VERSION,
        "tool": "pyfast-tune",
        "tool_version": env!("CARGO_PKG_VERSION"),
        "fingerprint": stats.fingerprint,
        "fingerprint_inputs": fp_inputs,
        "max_length": cfg.max_length,
        "format": cfg.format,
        "template": cfg.template,
        "seed": cfg.seed,
        "tokenizer": {"hash": tok.hash, "path": tok.path.to_string_lossy(), "bos": tok.bos, "eos": tok.eos},
        "files": file_table,
        "stats": stats,
        "num_samples": stats.samples,
        "num_packs": stats.packs,
        "num_tokens": stats.tokens,
        "outputs": outputs,
    });
    let meta_path = staging.dir.join(output::META);
    let mut f = std::fs::File::create(&meta_path).map_err(|e| Error::io(&meta_path, e))?;
    let text = serde_json::to_string_pretty(&meta).map_err(|e| Error::Config(e.to_string()))?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io(&meta_path, e))?;
    staging.commit()?;
    // Timing excludes nothing: the commit is part of the job.
    stats.seconds = start.elapsed().as_secs_f64();
    stats.tokens_per_second = staged_tokens as f64 / stats.seconds.max(1e-9);
    Ok(stats)
}

fn map_file(path: &Path) -> Result<memmap2::Mmap> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the file lives in our private staging directory, was fully written and synced
    // above, and nothing writes to it while the map is alive.
    unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::io(path, e))
}

fn write_packed(
    dir: &Path,
    stage_ids: &Path,
    stage_mask: &Path,
    staged: &[StagedSample],
    packs: &[Vec<u32>],
    progress: &dyn Fn(Progress<'_>) -> bool,
) -> Result<()> {
    let ids = map_file(stage_ids)?;
    let mask = map_file(stage_mask)?;
    let mut w_ids = HashedWriter::create(dir.join(output::INPUT_IDS))?;
    let mut w_mask = HashedWriter::create(dir.join(output::LOSS_MASK))?;
    let mut w_packs = HashedWriter::create(dir.join(output::PACKS))?;
    let mut w_order = HashedWriter::create(dir.join(output::PACK_SAMPLES))?;
    let mut new_start = vec![0i64; staged.len()];
    let mut pack_of = vec![0i64; staged.len()];
    let (mut tok_pos, mut sample_pos) = (0i64, 0i64);
    for (p, members) in packs.iter().enumerate() {
        w_packs.write_i64s(&[tok_pos, sample_pos])?;
        for &s in members {
            let s = s as usize;
            let st = &staged[s];
            let (a, b) = (st.offset as usize, st.offset as usize + st.len as usize);
            w_ids.write(&ids[a * 4..b * 4])?;
            w_mask.write(&mask[a..b])?;
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
    for w in [w_ids, w_mask, w_packs, w_order, w_samples] {
        w.finish()?;
    }
    if !progress(Progress {
        stage: "write",
        done: packs.len() as u64,
        total: packs.len() as u64,
    }) {
        return Err(Error::Interrupted);
    }
    Ok(())
}
