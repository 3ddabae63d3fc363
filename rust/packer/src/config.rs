//! The one schema of pack options, their validation and the input files they select. The
//! binding receives it whole (`pack(options)`), the Python API, the CLI and the training
//! config's `data` section fill its fields, and the fingerprint reads it. It depends on no
//! pipeline stage.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};
use crate::format::xtuner::Columns;
use crate::format::Format;
use crate::input::{read_data_order, resolve_inputs, InputFile, DATA_EXTENSIONS};
use crate::template::{self, Template};
use crate::tokenize::TokenizerBackend;

/// Everything that determines a packed directory (plus `threads` and `tokenizer_backend`,
/// which never change bytes, and `shard`, which only splits the work).
///
/// Deserialization fills absent fields with [`PackConfig::default`] and rejects unknown
/// ones, so a misspelt option is an error naming the known fields, never silently ignored.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
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
    /// `--template` name, `hf` (the tokenizer's chat template), or `none`.
    pub template: String,
    /// Seed of the pack order.
    pub seed: u64,
    /// Worker threads (None = all cores, or `PYFAST_TUNE_THREADS`).
    pub threads: Option<usize>,
    /// Skip (and count) bad records instead of failing.
    pub skip_bad: bool,
    /// Text encoder (`auto`, `hf`, `fast`). Every backend gives the same ids, so it never
    /// changes the output bytes and is not part of the fingerprint.
    #[serde(
        serialize_with = "backend_to_name",
        deserialize_with = "backend_from_name"
    )]
    pub tokenizer_backend: TokenizerBackend,
    /// Column remapping, `"field=column,..."` (empty = none).
    pub columns: String,
    /// Pre-tokenized `.bin` rows with fewer tokens are skipped (counted as dropped).
    pub min_length: usize,
    /// File-name ending that selects data files when walking directories (e.g. `.bin`);
    /// None = the JSON/JSONL endings.
    pub file_type: Option<String>,
    /// Rebuild a missing or inconsistent `.bin.meta` from its `.bin` instead of failing.
    pub rebuild_meta: bool,
    /// `(i, n)`: encode only part `i` of `n` and save it for `merge-packs`.
    pub shard: Option<(usize, usize)>,
    /// LLaVA: patch embeddings one image becomes at training time (0 = images are not
    /// expanded). Packing then counts each image's `<image>` token as this many tokens, and
    /// checks that every image file exists.
    pub image_tokens: usize,
    /// LLaVA with `image_tokens`: pack capacity after image expansion (0 = `max_length +
    /// image_tokens - 1`, so no sample ever overflows). `max_length` keeps XTuner's meaning:
    /// the text truncation length.
    pub pack_length: usize,
    /// LLaVA: folder the records' image paths are relative to (XTuner's `image_folder`;
    /// default: the folder of the data file holding the record).
    pub image_folder: Option<PathBuf>,
    /// Where inputs came from when a front end resolved them to local files (a Hugging Face
    /// Hub dataset read from its cache): recorded in meta.json and the fingerprint. Never a
    /// user option, so it is left out of the defaults (and so of every front end's flags).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<SourceInfo>,
    /// Sources mixed by ratio (each with its inputs, format, columns, weight and sample
    /// limit), instead of `inputs`. Front ends fill it from a mix file or from mappings in
    /// the input list, so it is left out of the defaults (and so of every front end's flags).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mix: Vec<MixSource>,
    /// Sharded runs: every input file of at most one shard's share of the bytes is one unit,
    /// read whole by the shard its midpoint falls in, so a shard needs only its own files
    /// (larger files are still split by line, row group or batch). Front ends set it for
    /// shards of object-storage inputs and fetch only the files a shard reads
    /// ([`crate::source::span::files_read`]). Another split of the same units, so never a
    /// change of bytes: not in the fingerprint, and left out of the defaults (no flag).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub whole_files: bool,
}

/// One resolved remote source: the repository, the commit its files were read at, the split
/// and subset (config) that chose them, and their paths in the repository, in input order.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SourceInfo {
    /// Repository id, `org/name`.
    pub repo_id: String,
    /// Repository kind (`dataset`).
    pub repo_type: String,
    /// The commit hash the files were read at (never a branch name).
    pub revision: String,
    /// The split that selected the files, if a split did.
    pub split: Option<String>,
    /// The subset (config name) that selected the files, if the repository defines subsets.
    pub subset: Option<String>,
    /// Paths of the files in the repository.
    pub files: Vec<String>,
}

/// One source of a mix, as the options give it.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MixSource {
    /// A label for reports (default: the first input as given). Unique within a mix.
    #[serde(default)]
    pub name: String,
    /// Files, directories or globs of this source (local paths: front ends resolve Hub ids).
    pub inputs: Vec<String>,
    /// Dataset format of this source (default: the run's `format`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// Column remapping of this source, `"field=column,..."` (default: the run's `columns`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub columns: Option<String>,
    /// Share multiplier: whole repetitions plus a seeded fraction (> 0).
    #[serde(default = "one")]
    pub weight: f64,
    /// Keep a seeded subset of at most this many samples (before `weight` applies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_samples: Option<u64>,
}

fn one() -> f64 {
    1.0
}

impl MixSource {
    /// Check the numbers; `index` names the source in messages.
    pub fn validate(&self, index: usize) -> std::result::Result<(), String> {
        if self.inputs.is_empty() {
            return Err(format!(
                "mix source {index} ({:?}) has no inputs",
                self.name
            ));
        }
        if !(self.weight.is_finite() && self.weight > 0.0) {
            return Err(format!(
                "mix source {index} ({:?}): weight must be a finite number > 0, got {}",
                self.name, self.weight
            ));
        }
        if self.max_samples == Some(0) {
            return Err(format!(
                "mix source {index} ({:?}): max_samples must be at least 1",
                self.name
            ));
        }
        Ok(())
    }

    /// The label used in reports.
    pub fn label(&self) -> &str {
        if self.name.is_empty() {
            self.inputs.first().map(String::as_str).unwrap_or("")
        } else {
            &self.name
        }
    }
}

impl Default for PackConfig {
    /// The defaults every front end shows: `auto` format, XTuner's `default` template,
    /// 4096-token packs, seed 0.
    fn default() -> Self {
        PackConfig {
            inputs: Vec::new(),
            data_order: None,
            out_dir: PathBuf::new(),
            tokenizer: PathBuf::new(),
            max_length: 4096,
            format: "auto".into(),
            template: "default".into(),
            seed: 0,
            threads: None,
            skip_bad: false,
            tokenizer_backend: TokenizerBackend::Auto,
            columns: String::new(),
            min_length: 0,
            file_type: None,
            rebuild_meta: false,
            shard: None,
            image_tokens: 0,
            pack_length: 0,
            image_folder: None,
            sources: Vec::new(),
            mix: Vec::new(),
            whole_files: false,
        }
    }
}

impl PackConfig {
    /// Parse options from JSON text (absent fields default, unknown fields are an error).
    pub fn from_json(text: &str) -> std::result::Result<Self, String> {
        serde_json::from_str(text).map_err(|e| format!("pack options: {e}"))
    }

    /// Parse options from a JSON value (a front end's native mapping), as [`Self::from_json`].
    pub fn from_value(value: serde_json::Value) -> std::result::Result<Self, String> {
        serde_json::from_value(value).map_err(|e| format!("pack options: {e}"))
    }

    /// The defaults as a JSON object: the field list front ends derive their options from.
    pub fn defaults() -> serde_json::Value {
        serde_json::to_value(PackConfig::default()).expect("plain data serializes")
    }
}

/// What front ends show for one [`PackConfig`] field.
#[derive(Debug, Serialize)]
pub struct FieldDoc {
    /// The field's name (the CLI flag is `--name-with-dashes`).
    pub name: &'static str,
    /// The value's kind: `paths`, `path`, `str`, `int`, `bool` or `shard` (`I/N`).
    pub kind: &'static str,
    /// The accepted values, when the set is fixed (else empty).
    pub choices: &'static [&'static str],
    /// One-paragraph help.
    pub help: &'static str,
}

/// One entry per [`PackConfig`] field: the CLI builds its `pack` flags (type, default,
/// choices, help) from this table and the defaults, so a field added to the struct and here
/// is offered everywhere. A test checks the table against the struct.
pub const FIELDS: &[FieldDoc] = &[
    FieldDoc {
        name: "inputs",
        kind: "paths",
        choices: &[],
        help: "files, directories or globs: JSON arrays/JSONL and CSV/TSV (plain/.gz/.zst), \
               Parquet, Arrow IPC (a datasets.save_to_disk folder too), pre-tokenized .bin; \
               hf://datasets/org/name[@rev][/path]",
    },
    FieldDoc {
        name: "data_order",
        kind: "path",
        choices: &[],
        help: "file listing input paths (relative to the single INPUT dir), one per line",
    },
    FieldDoc {
        name: "out_dir",
        kind: "path",
        choices: &[],
        help: "output directory (replaced atomically)",
    },
    FieldDoc {
        name: "tokenizer",
        kind: "path",
        choices: &[],
        help: "directory with tokenizer.json (+ tokenizer_config.json), or the json",
    },
    FieldDoc {
        name: "max_length",
        kind: "int",
        choices: &[],
        help: "pack capacity in tokens; longer samples are truncated (counted)",
    },
    FieldDoc {
        name: "format",
        kind: "str",
        choices: &[],
        help: "dataset format (see `pyfast-tune formats`; auto: by keys)",
    },
    FieldDoc {
        name: "template",
        kind: "str",
        choices: &[],
        help: "XTuner prompt template name, 'hf' (the tokenizer's chat template) or 'none' \
               (see `pyfast-tune templates`)",
    },
    FieldDoc {
        name: "seed",
        kind: "int",
        choices: &[],
        help: "seed of the pack order",
    },
    FieldDoc {
        name: "threads",
        kind: "int",
        choices: &[],
        help:
            "worker threads (default: all cores, or PYFAST_TUNE_THREADS); never changes the output",
    },
    FieldDoc {
        name: "skip_bad",
        kind: "bool",
        choices: &[],
        help: "skip and count bad records/files instead of failing",
    },
    FieldDoc {
        name: "tokenizer_backend",
        kind: "str",
        choices: &TokenizerBackend::NAMES,
        help: "text encoder: the fast byte-level BPE path when it provably gives the ids of \
               Hugging Face tokenizers (auto), always tokenizers (hf), or fast (fail if the \
               tokenizer does not qualify); never changes the output",
    },
    FieldDoc {
        name: "columns",
        kind: "str",
        choices: &[],
        help: "remap columns to the format's fields: instruction=question,output=answer",
    },
    FieldDoc {
        name: "min_length",
        kind: "int",
        choices: &[],
        help: "skip pre-tokenized .bin rows shorter than this (XTuner min_length)",
    },
    FieldDoc {
        name: "file_type",
        kind: "str",
        choices: &[],
        help: "file-name ending of data files in directories (e.g. .bin for pre-tokenized \
               InternEVO data; default: every data ending the engine reads)",
    },
    FieldDoc {
        name: "rebuild_meta",
        kind: "bool",
        choices: &[],
        help: "rebuild a missing or inconsistent X.bin.meta from X.bin",
    },
    FieldDoc {
        name: "shard",
        kind: "shard",
        choices: &[],
        help: "encode part I of N (0-based) into --out; join the parts with merge-packs",
    },
    FieldDoc {
        name: "image_tokens",
        kind: "int",
        choices: &[],
        help: "LLaVA: tokens one image becomes in training ((H/p)*(W/p) patches, e.g. 576 for \
               CLIP-L/14 at 336 px); packing counts images at this size and checks image files",
    },
    FieldDoc {
        name: "pack_length",
        kind: "int",
        choices: &[],
        help: "LLaVA with --image-tokens: pack capacity after image expansion (default: \
               max_length + image_tokens - 1; max_length stays the text truncation length)",
    },
    FieldDoc {
        name: "image_folder",
        kind: "path",
        choices: &[],
        help: "LLaVA: folder image paths are relative to (default: the data file's folder)",
    },
];

impl PackConfig {
    /// [`FIELDS`] with each field's default, as a JSON array of objects
    /// (`name`, `kind`, `choices`, `help`, `default`).
    pub fn fields() -> serde_json::Value {
        let defaults = PackConfig::defaults();
        let fields: Vec<serde_json::Value> = FIELDS
            .iter()
            .map(|f| {
                let mut v = serde_json::to_value(f).expect("plain data");
                v["default"] = defaults[f.name].clone();
                v
            })
            .collect();
        serde_json::Value::Array(fields)
    }
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
    // Below 2^31: a staged sample's length keeps a flag in its top bit (pack::shard).
    if cfg.max_length == 0 || cfg.max_length > i32::MAX as usize {
        return Err(Error::Config(format!(
            "max_length must be in 1..={}, got {}",
            i32::MAX,
            cfg.max_length
        )));
    }
    Columns::parse(&cfg.columns).map_err(Error::Config)?;
    check_images(cfg)?;
    check_mix(cfg)?;
    if let Some((i, n)) = cfg.shard {
        if n == 0 || i >= n {
            return Err(Error::Config(format!(
                "shard {i}/{n}: expected I/N with 0 <= I < N"
            )));
        }
    }
    Ok((format, template))
}

/// `pack_length` only means something with `image_tokens`, and must hold any sample.
fn check_images(cfg: &PackConfig) -> Result<()> {
    if cfg.pack_length > 0 && cfg.image_tokens == 0 {
        return Err(Error::Config(
            "pack_length is the capacity after image expansion: set image_tokens too".into(),
        ));
    }
    if cfg.pack_length > u32::MAX as usize {
        return Err(Error::Config(format!(
            "pack_length must be at most {}",
            u32::MAX
        )));
    }
    if cfg.pack_length > 0 && cfg.pack_length < cfg.max_length + cfg.image_tokens - 1 {
        return Err(Error::Config(format!(
            "pack_length {} cannot hold a sample of max_length {} text tokens with one image \
             of {} tokens: use at least {} (or lower max_length, as XTuner's LLaVA configs do)",
            cfg.pack_length,
            cfg.max_length,
            cfg.image_tokens,
            cfg.max_length + cfg.image_tokens - 1
        )));
    }
    Ok(())
}

impl PackConfig {
    /// Pack capacity in training tokens: `pack_length`, or with `image_tokens` the room for
    /// a `max_length` sample with its image expanded, else `max_length`.
    pub fn capacity(&self) -> usize {
        match (self.image_tokens, self.pack_length) {
            (0, _) => self.max_length,
            (n, 0) => self.max_length + n - 1,
            (_, c) => c,
        }
    }
}

/// A mix replaces `inputs`; each source's format and columns must parse and its names be
/// unique (they key its seeded choices and its line in the report).
fn check_mix(cfg: &PackConfig) -> Result<()> {
    if cfg.mix.is_empty() {
        return Ok(());
    }
    if !cfg.inputs.is_empty() || cfg.data_order.is_some() {
        return Err(Error::Config(
            "a mix lists its own inputs: give either mix sources or inputs/data_order, not both"
                .into(),
        ));
    }
    let mut names = std::collections::HashSet::new();
    for (i, src) in cfg.mix.iter().enumerate() {
        src.validate(i).map_err(Error::Config)?;
        if !names.insert(src.label()) {
            return Err(Error::Config(format!(
                "mix source {i}: the name {:?} is used by an earlier source; give each a \
                 distinct name",
                src.label()
            )));
        }
        if let Some(f) = &src.format {
            Format::from_name(f).ok_or_else(|| {
                Error::Config(format!(
                    "mix source {i} ({:?}): unknown format {f:?}; known: {}",
                    src.label(),
                    Format::NAMES.join(", ")
                ))
            })?;
        }
        if let Some(c) = &src.columns {
            Columns::parse(c)
                .map_err(|e| Error::Config(format!("mix source {i} ({:?}): {e}", src.label())))?;
        }
    }
    Ok(())
}

/// The ordered input files of a config.
pub fn resolve(cfg: &PackConfig) -> Result<Vec<InputFile>> {
    Ok(resolve_sources(cfg)?.0)
}

/// The ordered input files of a config and, per file, the index of the mix source it belongs
/// to (all 0 without a mix). A file in two sources is an error.
pub fn resolve_sources(cfg: &PackConfig) -> Result<(Vec<InputFile>, Vec<u32>)> {
    if cfg.mix.is_empty() {
        let files = resolve_plain(cfg)?;
        let n = files.len();
        return Ok((files, vec![0; n]));
    }
    let exts: Vec<&str> = match cfg.file_type.as_deref() {
        Some(ft) if !ft.is_empty() => vec![ft],
        _ => DATA_EXTENSIONS.to_vec(),
    };
    let (mut files, mut source_of) = (Vec::new(), Vec::new());
    let mut seen = std::collections::HashMap::new();
    for (si, src) in cfg.mix.iter().enumerate() {
        for f in resolve_inputs(&src.inputs, &exts)? {
            let canon = std::fs::canonicalize(&f.path).unwrap_or_else(|_| f.path.clone());
            if let Some(other) = seen.insert(canon, si) {
                return Err(Error::Config(format!(
                    "{} is an input of mix sources {other} ({:?}) and {si} ({:?}); a file \
                     belongs to one source (use weight to repeat it)",
                    f.path.display(),
                    cfg.mix[other].label(),
                    src.label()
                )));
            }
            files.push(f);
            source_of.push(si as u32);
        }
    }
    Ok((files, source_of))
}

fn resolve_plain(cfg: &PackConfig) -> Result<Vec<InputFile>> {
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

fn backend_to_name<S: Serializer>(
    b: &TokenizerBackend,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(b.name())
}

fn backend_from_name<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<TokenizerBackend, D::Error> {
    let name = String::deserialize(d)?;
    TokenizerBackend::from_name(&name).ok_or_else(|| {
        serde::de::Error::custom(format!(
            "unknown tokenizer backend {name:?}; known: {}",
            TokenizerBackend::NAMES.join(", ")
        ))
    })
}

/// `threads`, else `PYFAST_TUNE_THREADS`, else the CPUs available.
pub(crate) fn threads_or_default(threads: Option<usize>) -> usize {
    threads
        .or_else(|| std::env::var("PYFAST_TUNE_THREADS").ok()?.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_fields_default_and_round_trip() {
        let cfg = PackConfig::from_json(r#"{"inputs": ["a.jsonl"], "shard": [1, 3]}"#).unwrap();
        assert_eq!(cfg.max_length, 4096);
        assert_eq!(cfg.template, "default");
        assert_eq!(cfg.shard, Some((1, 3)));
        let text = serde_json::to_string(&cfg).unwrap();
        let back = PackConfig::from_json(&text).unwrap();
        assert_eq!(serde_json::to_string(&back).unwrap(), text);
    }

    #[test]
    fn sources_parse_but_stay_out_of_the_defaults() {
        assert!(PackConfig::defaults().get("sources").is_none());
        let cfg = PackConfig::from_json(
            r#"{"sources": [{"repo_id": "o/n", "repo_type": "dataset", "revision": "ab",
                "split": "train", "subset": null, "files": ["train.jsonl"]}]}"#,
        )
        .unwrap();
        assert_eq!(cfg.sources[0].files, ["train.jsonl"]);
        assert!(PackConfig::from_json(r#"{"sources": [{"repo": "o/n"}]}"#).is_err());
    }

    #[test]
    fn unknown_fields_and_backends_are_errors() {
        let e = PackConfig::from_json(r#"{"max_lenght": 8}"#).unwrap_err();
        assert!(e.contains("unknown field `max_lenght`"), "{e}");
        assert!(e.contains("max_length"), "{e}");
        let e = PackConfig::from_json(r#"{"tokenizer_backend": "slow"}"#).unwrap_err();
        assert!(e.contains("unknown tokenizer backend \"slow\""), "{e}");
    }

    #[test]
    fn field_docs_cover_every_field_once() {
        let defaults = serde_json::to_value(PackConfig::default()).unwrap();
        let mut fields: Vec<&str> = defaults
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut documented: Vec<&str> = FIELDS.iter().map(|f| f.name).collect();
        fields.sort_unstable();
        documented.sort_unstable();
        assert_eq!(
            documented, fields,
            "FIELDS must list every PackConfig field once"
        );
        for f in FIELDS {
            assert!(!f.help.is_empty(), "{} has no help", f.name);
            assert!(
                ["paths", "path", "str", "int", "bool", "shard"].contains(&f.kind),
                "{}: kind {}",
                f.name,
                f.kind
            );
        }
    }
}
