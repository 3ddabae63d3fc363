//! The pack pipeline, top to bottom: validate options and resolve inputs ([`crate::config`])
//! → load tokenizer and template → encode and stage every sample ([`crate::pack::stage`]) → plan
//! packs, write the packed directory and commit it atomically ([`crate::pack::write`]).
//!
//! A sharded run (`shard = Some((i, n))`) stops after staging and saves its part (see
//! [`crate::pack::shard`]); `merge-packs` joins the parts and runs the same [`finish`] as a single
//! run, so the bytes are identical. The fingerprint is [`crate::pack::fingerprint`].

use std::time::Instant;

use serde_json::json;

use crate::error::{Error, Result};
use crate::format::xtuner::Columns;
use crate::format::Format;
use crate::input::InputFile;
use crate::pack::fingerprint::fingerprint_inputs;
use crate::pack::mix::MixRule;
use crate::pack::stage::{encode_part, Run, SourceView, Templating};
use crate::pack::write::{finish, Header};
use crate::packed_dir::atomic::StagingDir;
use crate::source::fetch::Fetch;
use crate::template::chat::ChatTemplate;
use crate::tokenize::TextTokenizer;

pub use crate::config::{parse_names, resolve_sources, PackConfig};
pub use crate::pack::stats::{PackStats, Progress};

/// Run the whole pipeline and commit the packed directory (or, with `cfg.shard`, the shard's
/// part). `progress` is called from the calling thread between batches; returning `false`
/// aborts with [`Error::Interrupted`] and leaves no output.
pub fn pack(cfg: &PackConfig, progress: &dyn Fn(Progress<'_>) -> bool) -> Result<PackStats> {
    pack_fetching(cfg, progress, None)
}

/// [`pack`] with every byte range of an input asked of `fetch` before it is read: a front
/// end whose inputs are placeholders of objects in object storage downloads just those.
pub fn pack_fetching(
    cfg: &PackConfig,
    progress: &dyn Fn(Progress<'_>) -> bool,
    fetch: Option<Fetch>,
) -> Result<PackStats> {
    let start = Instant::now();
    let (format, template) = parse_names(cfg)?;
    let (files, file_source) = resolve_sources(cfg)?;
    let tok = TextTokenizer::load_with(&cfg.tokenizer, cfg.tokenizer_backend)?;
    let templating = match (cfg.template.as_str(), template) {
        ("hf", _) => Templating::Hf(Box::new(ChatTemplate::load(&cfg.tokenizer)?)),
        (_, Some(t)) => Templating::Xtuner(t),
        _ => Templating::None,
    };
    let threads = crate::config::threads_or_default(cfg.threads);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| Error::Internal(format!("cannot start worker threads: {e}")))?;
    let run = Run {
        cfg,
        sources: source_views(cfg, format)?,
        file_source: file_source.clone(),
        templating,
        tok,
        pool,
        fetch,
    };
    let sizes: Vec<u64> = files
        .iter()
        .map(|f| {
            std::fs::metadata(&f.path)
                .map(|m| m.len())
                .map_err(|e| Error::io(&f.path, e))
        })
        .collect::<Result<_>>()?;

    let staging = StagingDir::new(&cfg.out_dir)?;
    let load_seconds = start.elapsed().as_secs_f64();
    let part = encode_part(&run, &files, &sizes, cfg.shard, &staging.dir, progress)?;
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
        image_tokens: cfg.image_tokens,
        pack_length: cfg.capacity(),
        format: cfg.format.clone(),
        template: cfg.template.clone(),
        seed: cfg.seed,
        tokenizer: json!({"hash": run.tok.hash, "path": run.tok.path.to_string_lossy(),
                          "bos": run.tok.bos, "eos": run.tok.eos}),
        mix: mix_rules(cfg, &files, &file_source),
    };
    if let Some((i, n)) = cfg.shard {
        let names: Vec<String> = files.iter().map(|f| f.name.clone()).collect();
        return crate::pack::shard::save(&header, part, i, n, &names, staging, start).map(phases);
    }
    finish(&header, vec![part], staging, start, threads, progress).map(phases)
}

/// Format and columns per mix source (one view of the run's own without a mix).
fn source_views(cfg: &PackConfig, format: Format) -> Result<Vec<SourceView>> {
    let columns = |c: &str| Columns::parse(c).map_err(Error::Config);
    if cfg.mix.is_empty() {
        return Ok(vec![SourceView {
            format,
            columns: columns(&cfg.columns)?,
        }]);
    }
    cfg.mix
        .iter()
        .map(|src| {
            Ok(SourceView {
                format: match &src.format {
                    Some(f) => Format::from_name(f)
                        .ok_or_else(|| Error::Config(format!("unknown format {f:?}")))?,
                    None => format,
                },
                columns: columns(src.columns.as_deref().unwrap_or(&cfg.columns))?,
            })
        })
        .collect()
}

/// The write stage's view of a mix: each source's rule and the names of its files, in the
/// global file order.
fn mix_rules(cfg: &PackConfig, files: &[InputFile], file_source: &[u32]) -> Vec<MixRule> {
    cfg.mix
        .iter()
        .enumerate()
        .map(|(si, src)| MixRule {
            name: src.label().to_string(),
            weight: src.weight,
            max_samples: src.max_samples,
            files: files
                .iter()
                .zip(file_source)
                .filter(|(_, &s)| s as usize == si)
                .map(|(f, _)| f.name.clone())
                .collect(),
        })
        .collect()
}
