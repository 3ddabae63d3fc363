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

    /// Whether the message carries non-empty `tool_calls` (OpenAI function calling).
    fn calls_tools(&self) -> bool {
        self.fields
            .get("tool_calls")
            .and_then(Value::as_array)
            .is_some_and(|c| !c.is_empty())
    }
}

/// The `tools` of a record for `apply_chat_template(tools=...)`: an array of JSON schemas, or
/// the same as JSON text (as many datasets store it in a string column). Absent, null, empty
/// text or an empty array: no tools.
pub fn tools_of(record: &Value) -> std::result::Result<Option<Value>, String> {
    let tools = match record.get("tools") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => return Ok(None),
        Some(Value::String(s)) => serde_json::from_str(s)
            .map_err(|e| format!("\"tools\": a string that is not JSON ({e})"))?,
        Some(v) => v.clone(),
    };
    match tools {
        Value::Array(a) if a.is_empty() => Ok(None),
        Value::Array(a) if a.iter().all(Value::is_object) => Ok(Some(Value::Array(a))),
        _ => Err("\"tools\": expected an array of tool schemas (objects)".into()),
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
        self.render_with_tools(messages, None, add_generation_prompt)
    }

    /// [`ChatTemplate::render`] with `apply_chat_template(..., tools=tools)`: the tool schemas
    /// (a JSON array) the template may describe to the model. Absent tools are not passed at
    /// all, as before tools existed, so templates render records without tools unchanged.
    pub fn render_with_tools(
        &self,
        messages: &[Message],
        tools: Option<&Value>,
        add_generation_prompt: bool,
    ) -> std::result::Result<String, String> {
        let msgs: Vec<Value> = messages
            .iter()
            .map(|m| Value::Object(m.fields.clone()))
            .collect();
        let mut ctx = self.tokens.clone();
        ctx.insert("messages".into(), Value::Array(msgs));
        if let Some(t) = tools {
            ctx.insert("tools".into(), t.clone());
        }
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
        tools: Option<&Value>,
        text: &str,
    ) -> std::result::Result<Vec<(usize, usize)>, String> {
        let calls: Vec<usize> = (0..messages.len())
            .filter(|&i| messages[i].role() == "assistant" && messages[i].calls_tools())
            .collect();
        let mut spans = self.content_spans(messages, tools, text)?;
        for &i in &calls {
            if messages[i].trained {
                spans.push(self.turn_span(messages, tools, i, text)?);
            }
        }
        spans.sort_unstable();
        Ok(spans)
    }

    /// The span of assistant message `i` that calls tools, as the template writes it (its
    /// content and its calls, up to and including the EOS that ends it): what rendering the
    /// conversation up to it adds to the conversation before it with a generation prompt.
    /// The calls are written by the template from structured `tool_calls`, so there is no
    /// content to find in the text.
    fn turn_span(
        &self,
        messages: &[Message],
        tools: Option<&Value>,
        i: usize,
        text: &str,
    ) -> std::result::Result<(usize, usize), String> {
        let before = self.render_with_tools(&messages[..i], tools, true)?;
        let through = self.render_with_tools(&messages[..=i], tools, false)?;
        if !(through.starts_with(&before) && text.starts_with(&through)) {
            return Err(format!(
                "messages[{i}] calls tools, and the chat template does not render the \
                 conversation as a prefix of itself; record not trainable with --template hf"
            ));
        }
        let (start, mut end) = (before.len(), through.len());
        // Up to the end of the turn's EOS, not the whitespace the template writes after it.
        if let Some(eos) = self.eos.as_deref().filter(|e| !e.is_empty()) {
            if let Some(at) = text[start..end].rfind(eos) {
                end = start + at + eos.len();
            }
        }
        Ok((start, end))
    }

    /// Byte spans of assistant content (messages that call tools aside).
    fn content_spans(
        &self,
        messages: &[Message],
        tools: Option<&Value>,
        text: &str,
    ) -> std::result::Result<Vec<(usize, usize)>, String> {
        let assistants: Vec<usize> = (0..messages.len())
            .filter(|&i| {
                let m = &messages[i];
                m.role() == "assistant" && m.content().is_some() && !m.calls_tools()
            })
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
        if let Ok(m) = self.render_with_tools(&marked, tools, false) {
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
        tools: Option<&Value>,
        max_length: usize,
    ) -> std::result::Result<Encoded, String> {
        let text = self.render_with_tools(messages, tools, false)?;
        let spans = self.loss_spans(messages, tools, &text)?;
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
        let spans = t.loss_spans(&msgs, None, &text).unwrap();
        assert_eq!(&text[spans[0].0..spans[0].1], "yo<|im_end|>");
    }

    /// A Qwen2.5-style template: tool schemas in the system turn, calls written from
    /// `tool_calls`, tool results as user turns.
    const TOOL_TPL: &str = "{%- if tools %}<|im_start|>system\nTools:{% for t in tools %} \
        {{ t.function.name }}{% endfor %}<|im_end|>\n{%- endif %}{%- for m in messages %}\
        {%- if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n\
        {{ m.content or '' }}{% for c in m.tool_calls %}<tool_call>{{ c.function | tojson }}\
        </tool_call>{% endfor %}<|im_end|>\n{%- elif m.role == 'tool' %}<|im_start|>user\n\
        <tool_response>{{ m.content }}</tool_response><|im_end|>\n{%- else %}<|im_start|>\
        {{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endif %}{%- endfor %}\
        {%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}";

    #[test]
    fn tools_reach_the_template_and_tool_calls_are_trained() {
        let d = tempfile::tempdir().unwrap();
        write_tpl(d.path(), TOOL_TPL);
        let t = ChatTemplate::load(d.path()).unwrap();
        let record = serde_json::json!({
            "tools": "[{\"type\": \"function\", \"function\": {\"name\": \"weather\"}}]",
            "messages": [
                {"role": "user", "content": "Rain in Oslo?"},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}]},
                {"role": "tool", "content": "rain"},
                {"role": "assistant", "content": "Yes, rain."}]});
        let tools = tools_of(&record).unwrap();
        let msgs = messages_from_openai(&record).unwrap();
        let text = t.render_with_tools(&msgs, tools.as_ref(), false).unwrap();
        assert!(
            text.starts_with("<|im_start|>system\nTools: weather<|im_end|>"),
            "{text}"
        );
        let spans = t.loss_spans(&msgs, tools.as_ref(), &text).unwrap();
        let trained: Vec<&str> = spans.iter().map(|&(a, b)| &text[a..b]).collect();
        assert_eq!(
            trained,
            [
                "<tool_call>{\"name\": \"weather\", \"arguments\": {\"city\": \"Oslo\"}}</tool_call><|im_end|>",
                "Yes, rain.<|im_end|>",
            ]
        );
        // The tool's answer and the user's question are never trained.
        assert!(!trained.iter().any(|s| s.contains("rain</tool_response>")));
        // Without tools the template renders no tool preamble (and nothing is passed).
        let plain = t.render(&msgs, false).unwrap();
        assert!(plain.starts_with("<|im_start|>user\n"), "{plain}");
    }

    #[test]
    fn tools_column_shapes() {
        use serde_json::json;
        assert_eq!(tools_of(&json!({"tools": null})).unwrap(), None);
        assert_eq!(tools_of(&json!({"tools": ""})).unwrap(), None);
        assert_eq!(tools_of(&json!({"tools": []})).unwrap(), None);
        assert!(tools_of(&json!({"tools": "[1"}))
            .unwrap_err()
            .contains("not JSON"));
        assert!(tools_of(&json!({"tools": [1]}))
            .unwrap_err()
            .contains("array of tool schemas"));
        let t = tools_of(&json!({"tools": [{"name": "f"}]}))
            .unwrap()
            .unwrap();
        assert_eq!(t, json!([{"name": "f"}]));
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
