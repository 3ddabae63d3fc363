//! Dataset formats: each maps one JSON record to XTuner's conversation (a list of turns),
//! with the semantics of XTuner's `dataset_map_fns` (same fields, same defaults, same drops).

use serde_json::{Map, Value};

pub(crate) mod openai;
pub(crate) mod preference;
pub(crate) mod turn;
pub(crate) mod xtuner;

use crate::format::turn::kind;
pub use crate::format::turn::{py_strip, Turn};
use crate::format::xtuner as x;

/// A dataset format (`--format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Detect per file from the first record's keys.
    Auto,
    /// XTuner's own: `{"conversation": [{"system"?, "input", "output", "output_with_loss"?}]}`.
    Conversation,
    /// OpenAI chat: `{"messages": [{"role", "content", "loss"?}]}`.
    OpenAi,
    /// Alpaca: `{"instruction", "input", "output"}`.
    Alpaca,
    /// Plain text for (continued) pretraining: `{"text"}`.
    Pretrain,
    /// `{"instruction_zh", "input_zh", "output_zh"}` (XTuner `alpaca_zh_map_fn`).
    AlpacaZh,
    /// `{"text": "### Human: ... ### Assistant: ..."}` (XTuner `oasst1_map_fn`).
    Oasst1,
    /// `{"prompt", "completion"}` with the coder system prompt.
    CodeAlpaca,
    /// `{"instruction", "input", "output"}` with the medical system prompt.
    Medical,
    /// `{"prompt", "response"}` with the coder system prompt.
    TinyCodes,
    /// `{"input", "output"}` (XTuner `default_map_fn`).
    Default,
    /// ShareGPT/WizardLM `{"conversations": [{"from", "value"}]}`.
    Wizardlm,
    /// `{"system_prompt", "question", "response"}`.
    OpenOrca,
    /// `{"question", "response"}`.
    StackExchange,
    /// `{"abstract", "title"}` with the arxiv system prompt.
    Arxiv,
    /// `{"description", "color"}` with the colorist system prompt.
    Colors,
    /// `{"question", "answer"}` with the lawyer system prompt.
    LawReference,
    /// `{"input", "output"}` with the lawyer system prompt (XTuner's spelling).
    CrimeKgAssitant,
    /// `{"context", "question", "answer"}` with the sql system prompt.
    Sql,
    /// LLaVA `{"image"?, "conversations": [{"from", "value"}]}`: text part, `<image>` placeholder.
    Llava,
    /// Preference pairs: `prompt`?, `chosen`, `rejected` (TRL's forms, see
    /// [`preference`]); each record becomes two adjacent samples packed as one unit.
    Preference,
}

impl Format {
    /// Every format name accepted by `--format`.
    pub const NAMES: &'static [&'static str] = &[
        "auto",
        "conversation",
        "openai",
        "alpaca",
        "pretrain",
        "alpaca_zh",
        "oasst1",
        "code_alpaca",
        "medical",
        "tiny_codes",
        "default",
        "wizardlm",
        "openorca",
        "stack_exchange",
        "arxiv",
        "colors",
        "law_reference",
        "crime_kg_assitant",
        "sql",
        "llava",
        "preference",
    ];

    /// Parse a `--format` value.
    pub fn from_name(name: &str) -> Option<Format> {
        Some(match name {
            "auto" => Format::Auto,
            "conversation" | "xtuner" => Format::Conversation,
            "openai" | "messages" => Format::OpenAi,
            "alpaca" => Format::Alpaca,
            "pretrain" | "text" => Format::Pretrain,
            "alpaca_zh" => Format::AlpacaZh,
            "oasst1" => Format::Oasst1,
            "code_alpaca" => Format::CodeAlpaca,
            "medical" => Format::Medical,
            "tiny_codes" => Format::TinyCodes,
            "default" => Format::Default,
            "wizardlm" | "sharegpt" => Format::Wizardlm,
            "openorca" => Format::OpenOrca,
            "stack_exchange" => Format::StackExchange,
            "arxiv" => Format::Arxiv,
            "colors" => Format::Colors,
            "law_reference" => Format::LawReference,
            // XTuner's DATASET_FORMAT_MAPPING spells it "crime_kg_assitan".
            "crime_kg_assitant" | "crime_kg_assitan" | "crime_kg_assistant" => {
                Format::CrimeKgAssitant
            }
            "sql" => Format::Sql,
            "llava" => Format::Llava,
            "preference" | "dpo" => Format::Preference,
            _ => return None,
        })
    }

    /// Canonical name.
    pub fn name(self) -> &'static str {
        match self {
            Format::Auto => "auto",
            Format::Conversation => "conversation",
            Format::OpenAi => "openai",
            Format::Alpaca => "alpaca",
            Format::Pretrain => "pretrain",
            Format::AlpacaZh => "alpaca_zh",
            Format::Oasst1 => "oasst1",
            Format::CodeAlpaca => "code_alpaca",
            Format::Medical => "medical",
            Format::TinyCodes => "tiny_codes",
            Format::Default => "default",
            Format::Wizardlm => "wizardlm",
            Format::OpenOrca => "openorca",
            Format::StackExchange => "stack_exchange",
            Format::Arxiv => "arxiv",
            Format::Colors => "colors",
            Format::LawReference => "law_reference",
            Format::CrimeKgAssitant => "crime_kg_assitant",
            Format::Sql => "sql",
            Format::Llava => "llava",
            Format::Preference => "preference",
        }
    }

    /// The format whose keys a record has, if any.
    pub fn detect(record: &Value) -> Option<Format> {
        let obj = record.as_object()?;
        let has = |keys: &[&str]| keys.iter().all(|k| obj.contains_key(*k));
        // Most specific key sets first; formats that share their columns with another
        // (medical = alpaca's, crime_kg_assitant = default's, oasst1 = pretrain's `text`)
        // are only chosen by name.
        Some(if has(&["chosen", "rejected"]) {
            Format::Preference
        } else if has(&["conversation"]) {
            Format::Conversation
        } else if has(&["messages"]) {
            Format::OpenAi
        } else if has(&["conversations", "image"]) {
            Format::Llava
        } else if has(&["conversations"]) {
            Format::Wizardlm
        } else if has(&["instruction_zh", "output_zh"]) {
            Format::AlpacaZh
        } else if has(&["instruction", "output"]) {
            Format::Alpaca
        } else if has(&["system_prompt", "question", "response"]) {
            Format::OpenOrca
        } else if has(&["question", "response"]) {
            Format::StackExchange
        } else if has(&["context", "question", "answer"]) {
            Format::Sql
        } else if has(&["question", "answer"]) {
            Format::LawReference
        } else if has(&["prompt", "completion"]) {
            Format::CodeAlpaca
        } else if has(&["prompt", "response"]) {
            Format::TinyCodes
        } else if has(&["abstract", "title"]) {
            Format::Arxiv
        } else if has(&["description", "color"]) {
            Format::Colors
        } else if has(&["input", "output"]) {
            Format::Default
        } else if has(&["text"]) {
            Format::Pretrain
        } else {
            return None;
        })
    }

    /// Map one record to turns. An empty list means "no conversation" (e.g. alpaca's
    /// `<nooutput>`): the sample is dropped and counted, as XTuner filters it.
    pub fn to_turns(self, record: &Value) -> Result<Vec<Turn>, String> {
        let obj = record
            .as_object()
            .ok_or_else(|| format!("expected a JSON object, got {}", kind(record)))?;
        match self {
            Format::Auto => {
                let f = Format::detect(record)
                    .ok_or_else(|| format!("cannot detect the format from keys {:?}", keys(obj)))?;
                f.to_turns(record)
            }
            Format::Conversation => conversation(obj),
            Format::OpenAi => openai(obj),
            Format::Alpaca => alpaca(obj),
            Format::AlpacaZh => x::alpaca_zh(obj),
            Format::Oasst1 => x::oasst1(obj),
            Format::CodeAlpaca => x::code_alpaca(obj),
            Format::Medical => x::medical(obj),
            Format::TinyCodes => x::tiny_codes(obj),
            Format::Default => x::default(obj),
            Format::Wizardlm => x::wizardlm(obj),
            Format::OpenOrca => x::openorca(obj),
            Format::StackExchange => x::stack_exchange(obj),
            Format::Arxiv => x::arxiv(obj),
            Format::Colors => x::colors(obj),
            Format::LawReference => x::law_reference(obj),
            Format::CrimeKgAssitant => x::crime_kg_assitant(obj),
            Format::Sql => x::sql(obj),
            Format::Llava => x::llava(obj),
            Format::Preference => Err(
                "a preference record is two samples, not one conversation (encoded as a pair)"
                    .into(),
            ),
            Format::Pretrain => {
                let text = req_str(obj, "text", "")?;
                let mut t = Turn::new(String::new(), String::new(), py_strip(text).to_string());
                t.need_eos_token = false;
                Ok(vec![t])
            }
        }
    }
}

fn keys(obj: &Map<String, Value>) -> Vec<&str> {
    obj.keys().map(|k| k.as_str()).collect()
}

fn req_str<'a>(obj: &'a Map<String, Value>, key: &str, ctx: &str) -> Result<&'a str, String> {
    match obj.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(v) => Err(format!("{ctx}{key:?}: expected a string, got {}", kind(v))),
        None => Err(format!("{ctx}missing {key:?} (keys: {:?})", keys(obj))),
    }
}

/// Optional string: absent or null → "".
fn opt_str<'a>(obj: &'a Map<String, Value>, key: &str, ctx: &str) -> Result<&'a str, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(""),
        Some(Value::String(s)) => Ok(s),
        Some(v) => Err(format!(
            "{ctx}{key:?}: expected a string or null, got {}",
            kind(v)
        )),
    }
}

/// Python's `bool(value)` for a JSON value: XTuner's `encode_fn` tests `output_with_loss` and
/// `need_eos_token` by truthiness (`if output_with_loss:`), so `"false"` is true and `0` false.
fn py_truthy(v: Option<&Value>) -> bool {
    match v {
        None => true, // `.get(key, True)`
        Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) => n.as_f64().is_some_and(|x| x != 0.0),
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
    }
}

/// `openai_map_fn`'s loss rule: `str(msg.get("loss", "True")).lower() == "true"`. Absent is
/// true; `true` and any casing of `"true"` are true; everything else (`null` → `"None"`,
/// numbers, `"yes"`) is false.
fn openai_loss(v: Option<&Value>) -> bool {
    match v {
        None => true,
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => s.to_lowercase() == "true",
        Some(_) => false,
    }
}

fn conversation(obj: &Map<String, Value>) -> Result<Vec<Turn>, String> {
    let turns = match obj.get("conversation") {
        Some(Value::Array(a)) => a,
        Some(v) => {
            return Err(format!(
                "\"conversation\": expected an array, got {}",
                kind(v)
            ))
        }
        None => return Err(format!("missing \"conversation\" (keys: {:?})", keys(obj))),
    };
    let mut out = Vec::with_capacity(turns.len());
    for (i, t) in turns.iter().enumerate() {
        let ctx = format!("conversation[{i}].");
        let t = t
            .as_object()
            .ok_or_else(|| format!("conversation[{i}]: expected an object, got {}", kind(t)))?;
        let mut turn = Turn::new(
            opt_str(t, "system", &ctx)?.to_string(),
            opt_str(t, "input", &ctx)?.to_string(),
            req_str(t, "output", &ctx)?.to_string(),
        );
        turn.output_with_loss = py_truthy(t.get("output_with_loss"));
        turn.need_eos_token = py_truthy(t.get("need_eos_token"));
        turn.sep = opt_str(t, "sep", &ctx)?.to_string();
        out.push(turn);
    }
    Ok(out)
}

/// XTuner's `openai_map_fn`: leading assistant messages are skipped (only their role is
/// read); consecutive user messages are concatenated; a system message applies to the next
/// assistant turn (a null system content means none); a trailing user message without an
/// answer is dropped; any other role is an error, as XTuner raises.
fn openai(obj: &Map<String, Value>) -> Result<Vec<Turn>, String> {
    let msgs = match obj.get("messages") {
        Some(Value::Array(a)) => a,
        Some(v) => return Err(format!("\"messages\": expected an array, got {}", kind(v))),
        None => return Err(format!("missing \"messages\" (keys: {:?})", keys(obj))),
    };
    let mut roles = Vec::with_capacity(msgs.len());
    let mut leading = true; // in the leading assistant messages XTuner skips
    for (i, m) in msgs.iter().enumerate() {
        let m = m
            .as_object()
            .ok_or_else(|| format!("messages[{i}]: expected an object, got {}", kind(m)))?;
        let role = req_str(m, "role", &format!("messages[{i}]."))?;
        roles.push((m, role));
        leading &= role == "assistant";
        if !leading && !matches!(role, "system" | "user" | "assistant") {
            return Err(format!(
                "messages[{i}].\"role\": expected \"system\", \"user\" or \"assistant\", got {role:?}"
            ));
        }
    }
    let start = roles
        .iter()
        .position(|m| m.1 != "assistant")
        .unwrap_or(roles.len());
    let (mut system, mut input) = (String::new(), String::new());
    let mut out = Vec::new();
    for (i, &(m, role)) in roles.iter().enumerate().skip(start) {
        let ctx = format!("messages[{i}].");
        match role {
            "system" => system = opt_str(m, "content", &ctx)?.to_string(),
            "user" => input.push_str(req_str(m, "content", &ctx)?),
            _ => {
                let mut t = Turn::new(
                    std::mem::take(&mut system),
                    std::mem::take(&mut input),
                    req_str(m, "content", &ctx)?.to_string(),
                );
                t.output_with_loss = openai_loss(m.get("loss"));
                out.push(t);
            }
        }
    }
    Ok(out)
}

/// XTuner's `alpaca_map_fn` (0.2.0, after its "Remove `system` for `alpaca_map_fn`" fix): no
/// system prompt; `output == "<nooutput>"` drops the record; the input is the f-string
/// `f"{instruction}\n{input}"`, so a null value reads `None` as in XTuner. An absent `input`
/// (XTuner raises KeyError) reads as empty.
fn alpaca(obj: &Map<String, Value>) -> Result<Vec<Turn>, String> {
    let output = req_str(obj, "output", "")?;
    if output == "<nooutput>" {
        return Ok(Vec::new());
    }
    let instruction = x::py_str(obj, "instruction")?;
    let input = match obj.get("input") {
        None => String::new(),
        Some(_) => x::py_str(obj, "input")?,
    };
    Ok(vec![Turn::new(
        String::new(),
        format!("{instruction}\n{input}"),
        output.to_string(),
    )])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn openai_mapping_follows_xtuner() {
        let r = json!({"messages": [
            {"role": "assistant", "content": "skipped"},
            {"role": "system", "content": "S"},
            {"role": "user", "content": "a"},
            {"role": "user", "content": "b"},
            {"role": "assistant", "content": "A1", "loss": "False"},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": "A2"},
            {"role": "user", "content": "dangling"}
        ]});
        let t = Format::Auto.to_turns(&r).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!((t[0].system.as_str(), t[0].input.as_str()), ("S", "ab"));
        assert!(!t[0].output_with_loss);
        assert_eq!(
            (
                t[1].system.as_str(),
                t[1].input.as_str(),
                t[1].output.as_str()
            ),
            ("", "c", "A2")
        );
        assert!(t[1].output_with_loss);
    }

    #[test]
    fn alpaca_and_pretrain() {
        let t = Format::Alpaca
            .to_turns(&json!({"instruction": "I", "input": "x", "output": "O"}))
            .unwrap();
        assert_eq!(t[0].input, "I\nx");
        // XTuner 0.2.0's alpaca_map_fn has no system prompt
        assert_eq!(t[0].system, "");
        // f-string semantics: null is "None"; an absent input reads as empty
        let t = Format::Alpaca
            .to_turns(&json!({"instruction": "I", "input": null, "output": "O"}))
            .unwrap();
        assert_eq!(t[0].input, "I\nNone");
        let t = Format::Alpaca
            .to_turns(&json!({"instruction": 7, "output": "O"}))
            .unwrap();
        assert_eq!(t[0].input, "7\n");
        assert!(Format::Alpaca
            .to_turns(&json!({"instruction": "I", "input": "", "output": "<nooutput>"}))
            .unwrap()
            .is_empty());
        let t = Format::Pretrain
            .to_turns(&json!({"text": "\u{1f} hi \n"}))
            .unwrap();
        assert_eq!(t[0].output, "hi");
        assert!(!t[0].need_eos_token);
    }

    #[test]
    fn loss_flags_follow_xtuner_rules() {
        // openai_map_fn: str(msg.get("loss", "True")).lower() == "true"
        let msgs = |loss: Value| {
            json!({"messages": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a", "loss": loss}]})
        };
        for (loss, want) in [
            (json!(true), true),
            (json!("TRUE"), true),
            (json!(false), false),
            (json!(null), false),
            (json!(1), false),
            (json!("yes"), false),
        ] {
            let t = Format::OpenAi.to_turns(&msgs(loss.clone())).unwrap();
            assert_eq!(t[0].output_with_loss, want, "{loss}");
        }
        // encode_fn: `if output_with_loss:` is Python truthiness
        let conv = |flag: Value| json!({"conversation": [{"input": "q", "output": "a", "output_with_loss": flag}]});
        for (flag, want) in [
            (json!("false"), true),
            (json!(0), false),
            (json!(null), false),
            (json!(""), false),
            (json!(2), true),
        ] {
            let t = Format::Conversation.to_turns(&conv(flag.clone())).unwrap();
            assert_eq!(t[0].output_with_loss, want, "{flag}");
        }
        // a null system content means no system; a leading assistant is not read at all
        let t = Format::OpenAi
            .to_turns(&json!({"messages": [
                {"role": "assistant", "content": null},
                {"role": "system", "content": null},
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a"}]}))
            .unwrap();
        assert_eq!((t.len(), t[0].system.as_str()), (1, ""));
    }

    #[test]
    fn wrong_shapes_say_what_was_expected() {
        let e = Format::OpenAi
            .to_turns(&json!({"messages": "x"}))
            .unwrap_err();
        assert!(e.contains("expected an array"), "{e}");
        let e = Format::OpenAi
            .to_turns(&json!({"messages": [{"role": "tool", "content": "x"}]}))
            .unwrap_err();
        assert!(e.contains("\"tool\""), "{e}");
        let e = Format::Auto.to_turns(&json!({"foo": 1})).unwrap_err();
        assert!(e.contains("cannot detect"), "{e}");
        let e = Format::Conversation
            .to_turns(&json!({"conversation": [{"input": "x"}]}))
            .unwrap_err();
        assert!(e.contains("\"output\""), "{e}");
        assert!(Format::Pretrain.to_turns(&json!([1])).is_err());
    }
}
