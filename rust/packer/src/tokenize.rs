//! Tokenizer loading: any Hugging Face `tokenizer.json`, plus the BOS/EOS rules XTuner's
//! `get_bos_eos_token_ids` derives from the tokenizer's config, and the choice of backend:
//! the `tokenizers` crate, or [`fastbpe`] when it is proven to give the same ids.
//!
//! With the fast path the `tokenizers::Tokenizer` is not built at load (that is ~0.3 s for
//! Qwen3's 11 MB `tokenizer.json`): [`fastbpe::FastBpe`] reads the file itself, and the
//! Hugging Face tokenizer is built from the kept bytes on first need only (the `hf` chat
//! template's offsets).

pub(crate) mod bpe;
pub(crate) mod compiled;
pub(crate) mod fastbpe;
pub(crate) mod normalize;
pub(crate) mod piece_table;
pub(crate) mod pretokenize;
pub(crate) mod shared_memo;
pub(crate) mod split;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde_json::Value;

use crate::error::{Error, Result};
use fastbpe::FastBpe;

/// Tokenizer classes for which XTuner adds no BOS token.
pub const NO_BOS_CLASSES: &[&str] = &[
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

/// A loaded tokenizer with the special ids the encoder needs. Shared across threads.
pub struct TextTokenizer {
    /// The `tokenizers` tokenizer: built at load unless the fast path is used, else on first
    /// need from `json` (a failure to build is kept and reported to each caller).
    hf: OnceLock<std::result::Result<tokenizers::Tokenizer, String>>,
    /// The bytes of `tokenizer.json` while `hf` is not built yet.
    json: Vec<u8>,
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
    let mut parts = vec![std::fs::read(&json).map_err(|e| Error::io(&json, e))?];
    if let Some(p) = &cfg {
        parts.push(std::fs::read(p).map_err(|e| Error::io(p, e))?);
    }
    Ok(hash_parts(&parts))
}

/// [`hash_files`] over contents already read (`tokenizer.json`, then the config if any).
fn hash_parts<B: AsRef<[u8]>>(parts: &[B]) -> String {
    let mut h = blake3::Hasher::new();
    for bytes in parts {
        let bytes = bytes.as_ref();
        h.update(&(bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    }
    h.finalize().to_hex().to_string()
}

fn build_hf(json: &[u8]) -> std::result::Result<tokenizers::Tokenizer, String> {
    tokenizers::Tokenizer::from_bytes(json).map_err(|e| format!("cannot load: {e}"))
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
        let cfg_bytes = match &cfg_path {
            Some(p) => Some(std::fs::read(p).map_err(|e| Error::io(p, e))?),
            None => None,
        };
        let mut parts: Vec<&[u8]> = vec![&bytes];
        parts.extend(cfg_bytes.as_deref());
        let cfg: Value = match (&cfg_path, &cfg_bytes) {
            (Some(p), Some(b)) => serde_json::from_slice(b).map_err(|e| Error::Tokenizer {
                path: p.clone(),
                msg: format!("invalid JSON: {e}"),
            })?,
            _ => Value::Null,
        };
        // The fast path reads tokenizer.json itself; Hugging Face's tokenizer is built now only
        // when it encodes (the `tokenizers` error, if any, comes first as it always did). The
        // hash (a few ms for 11 MB) also names the fast path's compiled form in the cache.
        let hash = hash_parts(&parts);
        let fast = match backend {
            TokenizerBackend::Hf => Err("--tokenizer-backend hf".to_string()),
            _ => FastBpe::from_json_cached(&bytes, &hash),
        };
        let (fast, fast_refused) = match fast {
            Ok(f) => (Some(f), None),
            Err(why) => (None, Some(why)),
        };
        let hf = OnceLock::new();
        if fast.is_none() {
            let _ = hf.set(Ok(build_hf(&bytes).map_err(terr)?));
            if backend == TokenizerBackend::Fast {
                return Err(terr(format!(
                    "the fast tokenizer backend cannot reproduce this tokenizer: {}; use --tokenizer-backend auto or hf",
                    fast_refused.as_deref().unwrap_or_default()
                )));
            }
            if backend == TokenizerBackend::Auto {
                // Same ids either way, only slower: one line, so that the cause is visible.
                eprintln!(
                    "note: {}: encoding with Hugging Face tokenizers (the fast path does not reproduce {})",
                    json.display(),
                    fast_refused.as_deref().unwrap_or_default()
                );
            }
        }
        let mut tok = TextTokenizer {
            hf,
            json: if fast.is_some() { bytes } else { Vec::new() },
            fast,
            fast_refused,
            bos: vec![],
            eos: vec![],
            hash,
            path: json.clone(),
        };
        let id_of = |tok: &TextTokenizer, t: &str, what: &str| {
            tok.token_to_id(t).ok_or_else(|| {
                terr(format!(
                    "{what} {t:?} from tokenizer_config.json is not in the vocabulary"
                ))
            })
        };
        let class = cfg
            .get("tokenizer_class")
            .and_then(Value::as_str)
            .unwrap_or("");
        tok.bos = match token_string(cfg.get("bos_token")) {
            Some(_) if NO_BOS_CLASSES.contains(&class) => vec![],
            Some(t) => vec![id_of(&tok, &t, "bos_token")?],
            None => vec![],
        };
        tok.eos = match token_string(cfg.get("eos_token")) {
            Some(t) => vec![id_of(&tok, &t, "eos_token")?],
            None => vec![],
        };
        Ok(tok)
    }

    /// The `tokenizers` tokenizer, built now if the fast path deferred it.
    fn hf(&self) -> std::result::Result<&tokenizers::Tokenizer, String> {
        self.hf
            .get_or_init(|| build_hf(&self.json))
            .as_ref()
            .map_err(|e| format!("{}: {e}", self.path.display()))
    }

    /// Whether the `tokenizers` tokenizer has been built (at load, or since on first need).
    pub fn hf_loaded(&self) -> bool {
        self.hf.get().is_some()
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
            return fast.encode_into(text, out);
        }
        let enc = self
            .hf()?
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
            .hf()?
            .encode(text, false)
            .map_err(|e| format!("tokenizer failed: {e}"))?;
        Ok((e.get_ids().to_vec(), e.get_offsets().to_vec()))
    }

    /// Id of a token string, if it is in the vocabulary (or is an added token).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        match &self.fast {
            // The fast path holds the whole vocabulary and the added tokens: its `None` is
            // Hugging Face's too.
            Some(fast) => fast.token_to_id(token),
            None => self.hf().ok()?.token_to_id(token),
        }
    }

    /// The fast path, when it is in use.
    pub fn fast(&self) -> Option<&FastBpe> {
        self.fast.as_ref()
    }
}
