//! The `hf` template: the tokenizer's own Jinja `chat_template` (from `chat_template.jinja`
//! beside `tokenizer.json`, else `tokenizer_config.json`'s `chat_template`), rendered in Rust
//! with minijinja as transformers' `apply_chat_template(messages, tokenize=False)` renders it
//! (trim_blocks, lstrip_blocks, Python string methods, `raise_exception`, `tojson` with
//! `ensure_ascii=False`), then tokenized whole without special tokens, as
//! `apply_chat_template(tokenize=True)` does.
//!
//! Loss: only on assistant content — each assistant message's content as it appears in the
//! rendered text, plus the tokenizer's EOS token when the template writes it right after the
//! content (so the model learns to stop). Where the content sits is learnt by rendering a
//! second time with each assistant content replaced by a unique sentinel; if the template
//! rewrites content (e.g. strips it) the content is found by searching the rendered text in
//! order instead, and a record whose assistant content cannot be found is a record error.

use std::path::Path;

use minijinja::{Environment, ErrorKind, Value as JValue};
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::template::encode::Encoded;
use crate::tokenize::{locate, TextTokenizer};

/// A message given to the chat template.
#[derive(Clone, Debug, PartialEq)]
pub struct Message {
    /// The message object passed to the template (`role`, `content`, any other keys).
    pub fields: Map<String, Value>,
    /// Whether its content is trained (assistant messages with `loss` not false).
    pub trained: bool,
}

impl Message {
    /// A plain message.
    pub fn new(role: &str, content: &str, trained: bool) -> Self {
        let mut fields = Map::new();
        fields.insert("role".into(), Value::String(role.into()));
        fields.insert("content".into(), Value::String(content.into()));
        Message { fields, trained }
    }

    fn role(&self) -> &str {
        self.fields
            .get("role")
            .and_then(Value::as_str)
            .unwrap_or("")
    }

    fn content(&self) -> Option<&str> {
        self.fields.get("content").and_then(Value::as_str)
    }
}

/// A loaded chat template with the special-token strings it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Special tokens from tokenizer_config.json (`bos_token`, `eos_token`, ...).
    tokens: Map<String, Value>,
    eos: Option<String>,
    /// Hex BLAKE3 of the template source: part of the fingerprint.
    pub hash: String,
}

const SENTINEL: char = '\u{10FFFD}';

fn py_json(v: &Value, indent: Option<usize>, depth: usize, out: &mut String) {
    let nl = |out: &mut String, d: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * d));
        }
    };
    let (item_sep, key_sep) = if indent.is_some() {
        (",", ": ")
    } else {
        (", ", ": ")
    };
    match v {
        Value::String(s) => {
            out.push('"');
            for c in s.chars() {
                match c {
                    '"' => out.push_str("\\\""),
                    '\\' => out.push_str("\\\\"),
                    '\n' => out.push_str("\\n"),
                    '\r' => out.push_str("\\r"),
                    '\t' => out.push_str("\\t"),
                    '\u{8}' => out.push_str("\\b"),
                    '\u{c}' => out.push_str("\\f"),
                    c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                    c => out.push(c),
                }
            }
            out.push('"');
        }
        Value::Array(a) if !a.is_empty() => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                nl(out, depth + 1);
                py_json(x, indent, depth + 1, out);
            }
            nl(out, depth);
            out.push(']');
        }
        Value::Object(o) if !o.is_empty() => {
            out.push('{');
            for (i, (k, x)) in o.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                nl(out, depth + 1);
                py_json(&Value::String(k.clone()), indent, depth + 1, out);
                out.push_str(key_sep);
                py_json(x, indent, depth + 1, out);
            }
            nl(out, depth);
            out.push('}');
        }
        Value::Null => out.push_str("null"),
        other => out.push_str(&other.to_string()),
    }
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=indent)`.
fn tojson(
    v: JValue,
    kwargs: minijinja::value::Kwargs,
) -> std::result::Result<String, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let json = serde_json::to_value(&v)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = String::new();
    py_json(&json, indent, 0, &mut out);
    Ok(out)
}

fn token_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// Where the chat template of a tokenizer is: `chat_template.jinja` beside `tokenizer.json`,
/// else the `chat_template` of `tokenizer_config.json` (a string, or a list of named
/// templates of which `default` is used). Returns (source, tokenizer_config).
pub fn find_source(tokenizer: &Path) -> Result<(String, Value)> {
    let (json, cfg_path) = locate(tokenizer)?;
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
    let jinja = json.with_file_name("chat_template.jinja");
    if jinja.is_file() {
        let src = std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?;
        return Ok((src, cfg));
    }
    let src =
        match cfg.get("chat_template") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template")?.as_str())
                .map(str::to_string)
                .ok_or_else(|| Error::Tokenizer {
                    path: tokenizer.to_path_buf(),
                    msg: "chat_template is a list without a \"default\" entry".into(),
                })?,
            _ => return Err(Error::Tokenizer {
                path: tokenizer.to_path_buf(),
                msg: "template \"hf\" needs the tokenizer's chat template: no chat_template.jinja \
                      beside tokenizer.json and no \"chat_template\" in tokenizer_config.json"
                    .into(),
            }),
        };
    Ok((src, cfg))
}

impl ChatTemplate {
    /// Load the chat template of the tokenizer at `tokenizer` (directory or tokenizer.json).
    pub fn load(tokenizer: &Path) -> Result<Self> {
        let (src, cfg) = find_source(tokenizer)?;
        let hash = blake3::hash(src.as_bytes()).to_hex().to_string();
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<JValue, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template_owned("chat", src)
            .map_err(|e| Error::Tokenizer {
                path: tokenizer.to_path_buf(),
                msg: format!("chat template does not parse: {e:#}"),
            })?;
        let mut tokens = Map::new();
        if let Some(o) = cfg.as_object() {
            for (k, v) in o {
                if k.ends_with("_token") {
                    if let Some(s) = token_string(v) {
                        tokens.insert(k.clone(), Value::String(s));
                    }
                }
            }
        }
        let eos = tokens
            .get("eos_token")
            .and_then(Value::as_str)
            .map(str::to_string);
        Ok(ChatTemplate {
            env,
            tokens,
            eos,
            hash,
        })
    }

    /// Render `messages` as `apply_chat_template(messages, tokenize=False,
    /// add_generation_prompt=...)` would.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> std::result::Result<String, String> {
        let msgs: Vec<Value> = messages
            .iter()
            .map(|m| Value::Object(m.fields.clone()))
            .collect();
        let mut ctx = self.tokens.clone();
        ctx.insert("messages".into(), Value::Array(msgs));
        ctx.insert(
            "add_generation_prompt".into(),
            Value::Bool(add_generation_prompt),
        );
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| format!("chat template: {e}"))?;
        tmpl.render(JValue::from_serialize(&ctx))
            .map_err(|e| format!("chat template failed on this record: {e:#}"))
    }

    /// Byte spans of the rendered text that are trained.
    fn loss_spans(
        &self,
        messages: &[Message],
        text: &str,
    ) -> std::result::Result<Vec<(usize, usize)>, String> {
        let assistants: Vec<usize> = (0..messages.len())
            .filter(|&i| messages[i].role() == "assistant" && messages[i].content().is_some())
            .collect();
        let mut spans = Vec::new();
        let mut marked = messages.to_vec();
        for (k, &i) in assistants.iter().enumerate() {
            marked[i].fields.insert(
                "content".into(),
                Value::String(format!("{SENTINEL}{k}{SENTINEL}")),
            );
        }
        // Exact positions when the template copies content verbatim.
        if let Ok(m) = self.render(&marked, false) {
            let mut rebuilt = String::with_capacity(text.len());
            let mut rest = m.as_str();
            let mut pos = Vec::new();
            for (k, &i) in assistants.iter().enumerate() {
                let mark = format!("{SENTINEL}{k}{SENTINEL}");
                let Some(at) = rest.find(&mark) else { break };
                rebuilt.push_str(&rest[..at]);
                let start = rebuilt.len();
                rebuilt.push_str(messages[i].content().unwrap_or(""));
                pos.push((start, rebuilt.len()));
                rest = &rest[at + mark.len()..];
            }
            rebuilt.push_str(rest);
            if pos.len() == assistants.len() && rebuilt == text {
                for (k, &i) in assistants.iter().enumerate() {
                    if messages[i].trained {
                        spans.push(pos[k]);
                    }
                }
                return Ok(self.with_eos(spans, text));
            }
        }
        // The template rewrote content: find each one in order.
        let mut cursor = 0;
        for &i in &assistants {
            let c = messages[i].content().unwrap_or("");
            let c = if text[cursor..].contains(c) {
                c
            } else {
                crate::format::py_strip(c)
            };
            if c.is_empty() {
                continue;
            }
            let at = text[cursor..].find(c).ok_or_else(|| {
                format!(
                    "cannot find assistant message {i}'s content in the rendered chat template \
                     (the template rewrites it); record not trainable with --template hf"
                )
            })? + cursor;
            if messages[i].trained {
                spans.push((at, at + c.len()));
            }
            cursor = at + c.len();
        }
        Ok(self.with_eos(spans, text))
    }

    fn with_eos(&self, mut spans: Vec<(usize, usize)>, text: &str) -> Vec<(usize, usize)> {
        if let Some(eos) = self.eos.as_deref().filter(|e| !e.is_empty()) {
            for s in &mut spans {
                if text[s.1..].starts_with(eos) {
                    s.1 += eos.len();
                }
            }
        }
        spans
    }

    /// Render, tokenize the whole text without special tokens, and mark trained tokens (a
    /// token is trained when its bytes overlap a trained span); truncate to `max_length`.
    pub fn encode(
        &self,
        tok: &TextTokenizer,
        messages: &[Message],
        max_length: usize,
    ) -> std::result::Result<Encoded, String> {
        let text = self.render(messages, false)?;
        let spans = self.loss_spans(messages, &text)?;
        let (ids, offsets) = tok.encode_with_offsets(&text)?;
        let mut mask = vec![0u8; ids.len()];
        let mut s = 0;
        for (t, &(a, b)) in offsets.iter().enumerate() {
            while s < spans.len() && spans[s].1 <= a {
                s += 1;
            }
            if s < spans.len() && spans[s].0 < b.max(a + 1) && a < spans[s].1 {
                mask[t] = 1;
            }
        }
        let mut enc = Encoded {
            ids,
            mask,
            truncated: 0,
        };
        if enc.ids.len() > max_length {
            enc.truncated = (enc.ids.len() - max_length) as u64;
            enc.ids.truncate(max_length);
            enc.mask.truncate(max_length);
        }
        Ok(enc)
    }
}

/// Messages for the `hf` template from an `openai` record (message objects passed through,
/// `loss: false` assistant messages untrained) — leading assistant messages are kept, as the
/// template sees the conversation as written.
pub fn messages_from_openai(record: &Value) -> std::result::Result<Vec<Message>, String> {
    let msgs = record
        .get("messages")
        .and_then(Value::as_array)
        .ok_or("expected \"messages\": an array")?;
    msgs.iter()
        .enumerate()
        .map(|(i, m)| {
            let mut fields = m
                .as_object()
                .ok_or_else(|| format!("messages[{i}]: expected an object"))?
                .clone();
            let loss = match fields.remove("loss") {
                None | Some(Value::Null) => true,
                Some(Value::Bool(b)) => b,
                Some(Value::String(s)) => s.to_lowercase() == "true",
                Some(_) => return Err(format!("messages[{i}].\"loss\": expected a boolean")),
            };
            let role = fields.get("role").and_then(Value::as_str).unwrap_or("");
            let trained = role == "assistant" && loss;
            Ok(Message { fields, trained })
        })
        .collect()
}

/// Messages for the `hf` template from mapped turns: system (when not empty), user, assistant.
pub fn messages_from_turns(turns: &[crate::format::Turn]) -> Vec<Message> {
    let mut out = Vec::with_capacity(turns.len() * 2 + 1);
    for t in turns {
        if !t.system.is_empty() {
            out.push(Message::new("system", &t.system, false));
        }
        out.push(Message::new("user", &t.input, false));
        out.push(Message::new("assistant", &t.output, t.output_with_loss));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_tpl(dir: &Path, tpl: &str) {
        std::fs::write(
            dir.join("tokenizer_config.json"),
            serde_json::json!({"eos_token": "<|im_end|>", "chat_template": tpl}).to_string(),
        )
        .unwrap();
        std::fs::write(dir.join("tokenizer.json"), "{}").unwrap();
    }

    #[test]
    fn renders_with_python_methods_and_finds_spans() {
        let d = tempfile::tempdir().unwrap();
        write_tpl(
            d.path(),
            "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content.strip() + '<|im_end|>\\n' }}{% endfor %}",
        );
        let t = ChatTemplate::load(d.path()).unwrap();
        let msgs = vec![
            Message::new("user", "hi", false),
            Message::new("assistant", " yo ", true),
        ];
        let text = t.render(&msgs, false).unwrap();
        assert_eq!(
            text,
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
        );
        // strip() rewrites the content: found by search, EOS included.
        let spans = t.loss_spans(&msgs, &text).unwrap();
        assert_eq!(&text[spans[0].0..spans[0].1], "yo<|im_end|>");
    }

    #[test]
    fn tojson_is_python_style_and_raise_exception_fails() {
        let mut out = String::new();
        py_json(
            &serde_json::json!({"a": [1, "é\n"], "b": {}}),
            None,
            0,
            &mut out,
        );
        assert_eq!(out, "{\"a\": [1, \"é\\n\"], \"b\": {}}");
        let d = tempfile::tempdir().unwrap();
        write_tpl(d.path(), "{{ raise_exception('no system') }}");
        let t = ChatTemplate::load(d.path()).unwrap();
        assert!(t.render(&[], false).unwrap_err().contains("no system"));
    }
}
