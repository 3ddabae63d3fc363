//! Tokenizer loading: any Hugging Face `tokenizer.json`, plus the BOS/EOS rules XTuner's
//! `get_bos_eos_token_ids` derives from the tokenizer's config, and the choice of backend:
//! the `tokenizers` crate, or [`fastbpe`] when it is proven to give the same ids (issue 7).

pub mod fastbpe;
pub mod split;

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};
use fastbpe::FastBpe;

/// Tokenizer classes for which XTuner adds no BOS token.
const NO_BOS_CLASSES: &[&str] = &[
    "QWenTokenizer",
    "QWen2Tokenizer",
    "Qwen2Tokenizer",
    "Qwen2TokenizerFast",
];

/// Which encoder turns text into ids. Both give the same ids; only the speed differs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TokenizerBackend {
    /// The fast path when the tokenizer qualifies, else the `tokenizers` crate.
    #[default]
    Auto,
    /// Always the `tokenizers` crate.
    Hf,
    /// The fast path; loading fails (saying why) when the tokenizer does not qualify.
    Fast,
}

impl TokenizerBackend {
    /// Names accepted by [`TokenizerBackend::from_name`].
    pub const NAMES: [&'static str; 3] = ["auto", "hf", "fast"];

    /// Parse `auto`, `hf` or `fast`.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "auto" => Some(Self::Auto),
            "hf" => Some(Self::Hf),
            "fast" => Some(Self::Fast),
            _ => None,
        }
    }

    /// The name of this backend.
    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Hf => "hf",
            Self::Fast => "fast",
        }
    }
}

/// A loaded tokenizer with the special ids the encoder needs.
pub struct TextTokenizer {
    hf: tokenizers::Tokenizer,
    /// The fast path, when chosen.
    fast: Option<FastBpe>,
    /// Why the fast path was not used (None when it is).
    pub fast_refused: Option<String>,
    /// Ids put before a turn that starts a new EOS-terminated segment (may be empty).
    pub bos: Vec<u32>,
    /// Ids put after an output when the template does not use its suffix as EOS.
    pub eos: Vec<u32>,
    /// Hex BLAKE3 of `tokenizer.json` and `tokenizer_config.json`: part of the fingerprint.
    pub hash: String,
    /// The `tokenizer.json` loaded.
    pub path: PathBuf,
}

fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// Locate `tokenizer.json` (and its `tokenizer_config.json`) from a directory or file path.
pub fn locate(path: &Path) -> Result<(PathBuf, Option<PathBuf>)> {
    let json = if path.is_dir() {
        path.join("tokenizer.json")
    } else {
        path.to_path_buf()
    };
    if !json.is_file() {
        return Err(Error::Tokenizer {
            path: path.to_path_buf(),
            msg: format!(
                "{} not found (expected a tokenizer.json or a directory holding one)",
                json.display()
            ),
        });
    }
    let cfg = json.with_file_name("tokenizer_config.json");
    Ok((json.clone(), cfg.is_file().then_some(cfg)))
}

/// Hex BLAKE3 over the tokenizer files, without parsing them.
pub fn hash_files(path: &Path) -> Result<String> {
    let (json, cfg) = locate(path)?;
    let mut h = blake3::Hasher::new();
    for p in std::iter::once(&json).chain(cfg.iter()) {
        let bytes = std::fs::read(p).map_err(|e| Error::io(p, e))?;
        h.update(&(bytes.len() as u64).to_le_bytes());
        h.update(&bytes);
    }
    Ok(h.finalize().to_hex().to_string())
}

impl TextTokenizer {
    /// Load from a directory holding `tokenizer.json` (and usually `tokenizer_config.json`)
    /// or from the `tokenizer.json` path itself, with the [`TokenizerBackend::Auto`] backend.
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_with(path, TokenizerBackend::Auto)
    }

    /// [`TextTokenizer::load`] with a chosen backend.
    pub fn load_with(path: &Path, backend: TokenizerBackend) -> Result<Self> {
        let (json, cfg_path) = locate(path)?;
        let terr = |msg: String| Error::Tokenizer {
            path: json.clone(),
            msg,
        };
        let bytes = std::fs::read(&json).map_err(|e| Error::io(&json, e))?;
        let hf = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| terr(format!("cannot load: {e}")))?;
        let cfg: Value = match &cfg_path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
                serde_json::from_str(&text).map_err(|e| Error::Tokenizer {
                    path: p.clone(),
                    msg: format!("invalid JSON: {e}"),
                })?
            }
            None => Value::Null,
        };
        let id_of = |tok: &str, what: &str| {
            hf.token_to_id(tok).ok_or_else(|| {
                terr(format!(
                    "{what} {tok:?} from tokenizer_config.json is not in the vocabulary"
                ))
            })
        };
        let class = cfg
            .get("tokenizer_class")
            .and_then(Value::as_str)
            .unwrap_or("");
        let bos = match token_string(cfg.get("bos_token")) {
            Some(_) if NO_BOS_CLASSES.contains(&class) => vec![],
            Some(t) => vec![id_of(&t, "bos_token")?],
            None => vec![],
        };
        let eos = match token_string(cfg.get("eos_token")) {
            Some(t) => vec![id_of(&t, "eos_token")?],
            None => vec![],
        };
        let (fast, fast_refused) = match backend {
            TokenizerBackend::Hf => (None, Some("--tokenizer-backend hf".to_string())),
            _ => match FastBpe::from_tokenizer(&hf, &bytes) {
                Ok(f) => (Some(f), None),
                Err(why) if backend == TokenizerBackend::Fast => {
                    return Err(terr(format!(
                        "the fast tokenizer backend cannot reproduce this tokenizer: {why}; use --tokenizer-backend auto or hf"
                    )))
                }
                Err(why) => (None, Some(why)),
            },
        };
        Ok(TextTokenizer {
            hf,
            fast,
            fast_refused,
            bos,
            eos,
            hash: hash_files(path)?,
            path: json,
        })
    }

    /// Ids of `text` without special tokens (`tokenizer.encode(text, add_special_tokens=False)`);
    /// added/special tokens written in the text are matched as in Hugging Face.
    pub fn encode(&self, text: &str) -> std::result::Result<Vec<u32>, String> {
        let mut ids = Vec::new();
        self.encode_into(text, &mut ids)?;
        Ok(ids)
    }

    /// [`TextTokenizer::encode`], appending to `out`.
    pub fn encode_into(&self, text: &str, out: &mut Vec<u32>) -> std::result::Result<(), String> {
        if text.is_empty() {
            return Ok(());
        }
        if let Some(fast) = &self.fast {
            return fast.encode_into(&self.hf, text, out);
        }
        let enc = self
            .hf
            .encode_fast(text, false)
            .map_err(|e| format!("tokenizer failed: {e}"))?;
        out.extend_from_slice(enc.get_ids());
        Ok(())
    }

    /// The backend in use: [`TokenizerBackend::Fast`] or [`TokenizerBackend::Hf`].
    pub fn backend(&self) -> TokenizerBackend {
        match self.fast {
            Some(_) => TokenizerBackend::Fast,
            None => TokenizerBackend::Hf,
        }
    }

    /// Ids of `text` without special tokens and each token's byte span in `text` (the `hf`
    /// chat template maps its trained character spans to tokens with them).
    #[allow(clippy::type_complexity)]
    pub fn encode_with_offsets(
        &self,
        text: &str,
    ) -> std::result::Result<(Vec<u32>, Vec<(usize, usize)>), String> {
        if text.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let e = self
            .hf
            .encode(text, false)
            .map_err(|e| format!("tokenizer failed: {e}"))?;
        Ok((e.get_ids().to_vec(), e.get_offsets().to_vec()))
    }

    /// Id of a token string, if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.hf.token_to_id(token)
    }
}
