//! Preference pairs (`--format preference`): one record → a prompt and two completions, in
//! every form such data is published in. The result is two `openai`-style `messages` records
//! (prompt + chosen, prompt + rejected) whose prompt assistant messages carry `"loss": false`,
//! so the SFT encoders (XTuner templates through the `openai` mapping, or `--template hf`)
//! encode each side with the same rules as a training sample: prompt untrained, completion
//! trained.
//!
//! Forms (TRL's dataset formats, https://huggingface.co/docs/trl/dataset_formats):
//! - explicit prompt, conversational: `prompt`, `chosen`, `rejected` are message lists (the
//!   prompt may hold a system message and earlier turns);
//! - explicit prompt, standard: strings (an optional `system` string goes first);
//! - implicit prompt (Anthropic HH): no `prompt`; `chosen` and `rejected` are whole
//!   conversations and the prompt is their common prefix (messages, or for strings the
//!   common characters, less a trailing space as TRL's `extract_prompt` does).
//!
//! Column maps (`--columns prompt=question,system=system`) are applied before this mapping.
//! Imports only the leaf `format::turn`, so `format` and the stage both use it.

use serde_json::{json, Map, Value};

use crate::format::turn::kind;

/// The two sides of one preference pair, each as an `openai` record `{"messages": [...]}`.
#[derive(Clone, Debug, PartialEq)]
pub struct PairRecords {
    /// Prompt + chosen completion.
    pub chosen: Value,
    /// Prompt + rejected completion.
    pub rejected: Value,
    /// The record's `margin` (how much better chosen is; reward models), if any.
    pub margin: Option<f32>,
}

/// A side as a message list: a string is one message of `role`; a list is checked to hold
/// objects with a string `role`.
fn messages(v: &Value, key: &str, role: &str) -> Result<Vec<Value>, String> {
    match v {
        Value::String(s) => Ok(vec![json!({"role": role, "content": s})]),
        Value::Array(a) => {
            for (i, m) in a.iter().enumerate() {
                let ok = m.get("role").is_some_and(Value::is_string);
                if !ok {
                    return Err(format!(
                        "{key:?}[{i}]: expected a message object with a \"role\", got {}",
                        kind(m)
                    ));
                }
            }
            Ok(a.clone())
        }
        v => Err(format!(
            "{key:?}: expected a string or a list of messages, got {}",
            kind(v)
        )),
    }
}

/// TRL's `extract_prompt` for strings: the common prefix of the two texts; when they part
/// right after a space, the space belongs to the completions. Cut on a char boundary.
fn common_text_prefix(a: &str, b: &str) -> usize {
    let mut end = 0;
    for ((i, ca), cb) in a.char_indices().zip(b.chars()) {
        if ca != cb {
            break;
        }
        end = i + ca.len_utf8();
    }
    if end < a.len().min(b.len()) && a[..end].ends_with(' ') {
        end -= 1;
    }
    end
}

/// Mark the prompt's assistant messages untrained and the completion's trained, and join.
fn side(prompt: &[Value], completion: Vec<Value>) -> Value {
    let mut out = Vec::with_capacity(prompt.len() + completion.len());
    for m in prompt {
        let mut m = m.clone();
        if let Some(o) = m.as_object_mut().filter(|o| o["role"] == "assistant") {
            o.insert("loss".into(), Value::Bool(false));
        }
        out.push(m);
    }
    for mut m in completion {
        if let Some(o) = m.as_object_mut() {
            o.remove("loss");
        }
        out.push(m);
    }
    json!({ "messages": out })
}

/// Map one preference record to its two sides. Errors name the field and what was expected.
pub fn pair_records(obj: &Map<String, Value>) -> Result<PairRecords, String> {
    let get = |k: &str| {
        obj.get(k).ok_or_else(|| {
            let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
            format!("missing {k:?} (keys: {keys:?})")
        })
    };
    let (chosen, rejected) = (get("chosen")?, get("rejected")?);
    let (prompt, c, r) = match obj.get("prompt") {
        Some(p) if !p.is_null() => {
            let mut prompt = match obj.get("system") {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::String(s)) => vec![json!({"role": "system", "content": s})],
                Some(v) => return Err(format!("\"system\": expected a string, got {}", kind(v))),
            };
            prompt.extend(messages(p, "prompt", "user")?);
            let c = messages(chosen, "chosen", "assistant")?;
            let r = messages(rejected, "rejected", "assistant")?;
            (prompt, c, r)
        }
        _ => match (chosen, rejected) {
            (Value::String(a), Value::String(b)) => {
                let n = common_text_prefix(a, b);
                let prompt = vec![json!({"role": "user", "content": &a[..n]})];
                let c = vec![json!({"role": "assistant", "content": &a[n..]})];
                let r = vec![json!({"role": "assistant", "content": &b[n..]})];
                (prompt, c, r)
            }
            _ => {
                let c = messages(chosen, "chosen", "assistant")?;
                let r = messages(rejected, "rejected", "assistant")?;
                let n = c.iter().zip(&r).take_while(|(x, y)| x == y).count();
                if n == c.len() || n == r.len() {
                    return Err(
                        "implicit prompt: \"chosen\" and \"rejected\" must differ after their \
                         common prefix (the prompt)"
                            .into(),
                    );
                }
                (c[..n].to_vec(), c[n..].to_vec(), r[n..].to_vec())
            }
        },
    };
    for (name, comp) in [("chosen", &c), ("rejected", &r)] {
        if !comp.iter().any(|m| m["role"] == "assistant") {
            return Err(format!(
                "{name:?}: the completion holds no assistant message"
            ));
        }
    }
    let margin = match obj.get("margin") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => match n.as_f64().map(|x| x as f32) {
            Some(m) if m.is_finite() => Some(m),
            _ => return Err(format!("\"margin\": {n} is not a finite 32-bit float")),
        },
        Some(v) => return Err(format!("\"margin\": expected a number, got {}", kind(v))),
    };
    Ok(PairRecords {
        chosen: side(&prompt, c),
        rejected: side(&prompt, r),
        margin,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn explicit_conversational_prompt_keeps_history_untrained() {
        let p = pair_records(&obj(json!({
            "prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "q1"},
                       {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}],
            "chosen": [{"role": "assistant", "content": "good"}],
            "rejected": [{"role": "assistant", "content": "bad"}]})))
        .unwrap();
        let m = p.chosen["messages"].as_array().unwrap();
        assert_eq!(m.len(), 5);
        assert_eq!(m[2]["loss"], false);
        assert_eq!(m[4]["content"], "good");
        assert!(m[4].get("loss").is_none());
        assert_eq!(p.rejected["messages"][4]["content"], "bad");
    }

    #[test]
    fn standard_strings_with_system() {
        let p = pair_records(&obj(
            json!({"system": "S", "prompt": "q", "chosen": "a", "rejected": "b"}),
        ))
        .unwrap();
        assert_eq!(
            p.chosen,
            json!({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "q"},
                                {"role": "assistant", "content": "a"}]})
        );
    }

    #[test]
    fn implicit_prompt_is_the_common_prefix() {
        let turn = |r: &str, c: &str| json!({"role": r, "content": c});
        let p = pair_records(&obj(json!({
            "chosen": [turn("user", "q"), turn("assistant", "a"), turn("user", "q2"), turn("assistant", "yes")],
            "rejected": [turn("user", "q"), turn("assistant", "a"), turn("user", "q2"), turn("assistant", "no")]})))
        .unwrap();
        let m = p.rejected["messages"].as_array().unwrap();
        assert_eq!(
            (m.len(), &m[1]["loss"], &m[3]["content"]),
            (4, &json!(false), &json!("no"))
        );
        // strings: TRL's rule gives the space before the parting word to the completions
        let p = pair_records(&obj(json!({
            "chosen": "\n\nHuman: hi\n\nAssistant: hello there",
            "rejected": "\n\nHuman: hi\n\nAssistant: go away"})))
        .unwrap();
        assert_eq!(
            p.chosen["messages"][0]["content"],
            "\n\nHuman: hi\n\nAssistant:"
        );
        assert_eq!(p.chosen["messages"][1]["content"], " hello there");
        assert_eq!(p.rejected["messages"][1]["content"], " go away");
    }

    #[test]
    fn a_margin_is_a_finite_number() {
        let base = json!({"prompt": "q", "chosen": "a", "rejected": "b"});
        assert_eq!(pair_records(&obj(base.clone())).unwrap().margin, None);
        let mut m = base.clone();
        m["margin"] = json!(1.5);
        assert_eq!(pair_records(&obj(m.clone())).unwrap().margin, Some(1.5));
        m["margin"] = json!("1.5");
        let e = pair_records(&obj(m.clone())).unwrap_err();
        assert!(e.contains("\"margin\": expected a number"), "{e}");
        m["margin"] = json!(1e300);
        assert!(pair_records(&obj(m))
            .unwrap_err()
            .contains("not a finite 32-bit float"));
    }

    #[test]
    fn bad_shapes_name_the_field() {
        let e =
            pair_records(&obj(json!({"prompt": "q", "chosen": 3, "rejected": "b"}))).unwrap_err();
        assert!(e.contains("\"chosen\"") && e.contains("a number"), "{e}");
        let e = pair_records(&obj(json!({"prompt": "q", "chosen": "a"}))).unwrap_err();
        assert!(e.contains("missing \"rejected\""), "{e}");
        let same = json!([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]);
        let e = pair_records(&obj(json!({"chosen": same, "rejected": same}))).unwrap_err();
        assert!(e.contains("must differ"), "{e}");
    }
}
