//! The fingerprint of a pack run: a hash of everything that determines its bytes (tool and
//! format version, tokenizer, options, every input's size and hash).

use rayon::prelude::*;
use serde_json::{json, Value};

use crate::config::{parse_names, resolve, PackConfig};
use crate::error::Result;
use crate::format::xtuner::Columns;
use crate::input::InputFile;
use crate::packed_dir::layout;
use crate::source::pretokenized::{self, is_pretokenized};
use crate::source::raw::hash_file;
use crate::template::chat;
use crate::tokenize;

pub(crate) fn fingerprint_inputs(cfg: &PackConfig, tokenizer_hash: &str, files: &[Value]) -> Value {
    let mut v = json!({
        "tool": "pyfast-tune",
        "tool_version": env!("CARGO_PKG_VERSION"),
        "format_version": layout::FORMAT_VERSION,
        "tokenizer": tokenizer_hash,
        "format": cfg.format,
        "template": cfg.template,
        "max_length": cfg.max_length,
        "seed": cfg.seed,
        "skip_bad": cfg.skip_bad,
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
    if cfg.image_tokens > 0 {
        o.insert("image_tokens".into(), json!(cfg.image_tokens));
        o.insert("pack_length".into(), json!(cfg.capacity()));
    }
    if let Some(folder) = &cfg.image_folder {
        o.insert("image_folder".into(), json!(folder.to_string_lossy()));
    }
    if !cfg.sources.is_empty() {
        o.insert("sources".into(), json!(cfg.sources));
    }
    if !cfg.mix.is_empty() {
        o.insert("mix".into(), crate::pack::mix::describe(&cfg.mix));
    }
    if cfg.template == "hf" {
        // chat_template.jinja is not among the tokenizer files hashed above.
        let h = chat::find_source(&cfg.tokenizer)
            .map(|(src, _)| blake3::hash(src.as_bytes()).to_hex().to_string())
            .unwrap_or_default();
        o.insert("chat_template".into(), json!(h));
    }
    // Last, so that `pack` (which takes it out of the header and puts the files it read back
    // at the end) hashes the keys in this same order (serde_json keeps insertion order here).
    o.insert("inputs".into(), json!(files));
    v
}

pub(crate) fn hash_value(v: &Value) -> String {
    blake3::hash(v.to_string().as_bytes()).to_hex().to_string()
}

pub(crate) fn file_entry(name: &str, size: u64, hash: &blake3::Hash) -> Value {
    json!({"name": name, "size": size, "blake3": hash.to_hex().to_string()})
}

pub(crate) fn pretok_entry(
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
            let (size, hash) = hash_file(&f.path)?;
            if is_pretokenized(&f.path) {
                let meta = hash_file(&pretokenized::meta_path(&f.path))?;
                Ok(pretok_entry(f, size, &hash, &meta))
            } else {
                Ok(file_entry(&f.name, size, &hash))
            }
        })
        .collect::<Result<_>>()?;
    Ok(hash_value(&fingerprint_inputs(cfg, &tok_hash, &entries)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SourceInfo;

    #[test]
    fn pack_rebuilds_the_hash_fingerprint_computes() {
        // `pack` takes `inputs` out of the header and writes the files it read back at the
        // end; with every optional determinant set, that must hash as `fingerprint` does.
        let cfg = PackConfig {
            columns: "instruction=question".into(),
            min_length: 3,
            sources: vec![SourceInfo {
                repo_id: "org/name".into(),
                repo_type: "dataset".into(),
                revision: "ab".repeat(20),
                split: Some("train".into()),
                subset: None,
                files: vec!["train.jsonl".into()],
            }],
            ..PackConfig::default()
        };
        let files = vec![json!({"name": "train.jsonl", "size": 1, "blake3": "00"})];
        let whole = fingerprint_inputs(&cfg, "tok", &files);
        let mut header = fingerprint_inputs(&cfg, "tok", &[]);
        header.as_object_mut().unwrap().remove("inputs");
        header["inputs"] = Value::Array(files);
        assert_eq!(hash_value(&header), hash_value(&whole));
        assert_eq!(whole["sources"][0]["revision"], json!("ab".repeat(20)));
        let plain = fingerprint_inputs(&PackConfig::default(), "tok", &[]);
        assert!(plain.get("sources").is_none());
    }
}
