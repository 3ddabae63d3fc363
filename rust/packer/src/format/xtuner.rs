//! The open-source instruction formats of XTuner's `dataset_map_fns` beyond the first set
//! (alpaca_zh, oasst1, code_alpaca, medical, tiny_codes, default, wizardlm/sharegpt, openorca,
//! stack_exchange, arxiv, colors, law_reference, crime_kg_assitant, sql, llava), plus column
//! remapping (`--columns instruction=question,output=answer`).
//!
//! Each function states the map_fn it mirrors. Where XTuner builds a string with an f-string
//! or `str.format(**example)`, a non-string value goes through Python's `str()` (`None` →
//! `"None"`, `True` → `"True"`, integers as digits), as XTuner would; where XTuner passes a
//! value through, it must be a string (a `null` system or input means "none", as in
//! `template_map_fn`).

use serde_json::{Map, Value};

use crate::format::turn::{kind, py_strip, Turn};

/// XTuner `SYSTEM_TEMPLATE` entries used by the map_fns (`xtuner/utils/templates.py`).
pub mod system {
    /// `SYSTEM_TEMPLATE.coder` (code_alpaca, tiny_codes).
    pub const CODER: &str = "You are a professional programer. Please provide the corresponding code based on the description of Human.\n";
    /// `SYSTEM_TEMPLATE.medical`.
    pub const MEDICAL: &str = "如果你是一名医生，请根据患者的描述回答医学问题。\n";
    /// `SYSTEM_TEMPLATE.arxiv_gentile`.
    pub const ARXIV: &str = "If you are an expert in writing papers, please generate a good paper title for this paper based on other authors' descriptions of their abstracts.\n";
    /// `SYSTEM_TEMPLATE.colorist`.
    pub const COLORIST: &str = "You are a professional color designer. Please provide the corresponding colors based on the description of Human.\n";
    /// `SYSTEM_TEMPLATE.lawyer` (law_reference, crime_kg_assitant).
    pub const LAWYER: &str =
        "你现在是一名专业的中国律师，请根据用户的问题给出准确、有理有据的回复。\n";
    /// `SYSTEM_TEMPLATE.sql`.
    pub const SQL: &str = "If you are an expert in SQL, please generate a good SQL Query for Question based on the CREATE TABLE statement.\n";
}

/// XTuner's `DEFAULT_IMAGE_TOKEN`.
pub const IMAGE_TOKEN: &str = "<image>";

fn get<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<&'a Value, String> {
    obj.get(key).ok_or_else(|| {
        let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        format!("missing {key:?} (keys: {keys:?})")
    })
}

/// A value XTuner passes through as text: must be a string.
fn text(obj: &Map<String, Value>, key: &str) -> Result<String, String> {
    match get(obj, key)? {
        Value::String(s) => Ok(s.clone()),
        v => Err(format!("{key:?}: expected a string, got {}", kind(v))),
    }
}

/// A system or input XTuner passes through: a string, or null meaning none.
fn text_or_none(obj: &Map<String, Value>, key: &str) -> Result<String, String> {
    match get(obj, key)? {
        Value::Null => Ok(String::new()),
        Value::String(s) => Ok(s.clone()),
        v => Err(format!(
            "{key:?}: expected a string or null, got {}",
            kind(v)
        )),
    }
}

/// Python's `str(value)` for the JSON values a dataset holds in an f-string field.
pub(crate) fn py_str(obj: &Map<String, Value>, key: &str) -> Result<String, String> {
    match get(obj, key)? {
        Value::String(s) => Ok(s.clone()),
        Value::Null => Ok("None".into()),
        Value::Bool(b) => Ok(if *b { "True" } else { "False" }.into()),
        Value::Number(n) if n.is_i64() || n.is_u64() => Ok(n.to_string()),
        v => Err(format!(
            "{key:?}: expected a string, got {} (XTuner would format it with str())",
            kind(v)
        )),
    }
}

fn one(system: &str, input: String, output: String) -> Vec<Turn> {
    vec![Turn {
        system: system.to_string(),
        input,
        output,
        output_with_loss: true,
        need_eos_token: true,
        sep: String::new(),
    }]
}

/// `alpaca_zh_map_fn`: `f"{instruction_zh}\n{input_zh}"` → `output_zh`, no system prompt and
/// no `<nooutput>` filter (XTuner's alpaca_zh has neither).
pub fn alpaca_zh(obj: &Map<String, Value>) -> Result<Vec<Turn>, String> {
    let input = format!(
        "{}\n{}",
        py_str(obj, "instruction_zh")?,
        py_str(obj, "input_zh")?
    );
    Ok(one("", input, text(obj, "output_zh")?))
}

/// `oasst1_map_fn`: `text.strip().split('###')`; each stripped piece starting with `Human:` or
/// `Assistant:` contributes its stripped remainder; an odd trailing piece is discarded; pieces
/// pair up in order (input, output) — roles are not checked, as in XTuner.
pub fn oasst1(obj: &Map<String, Value>) -> Result<Vec<Turn>, String> {
    let t = text(obj, "text")?;
    let mut data: Vec<&str> = Vec::new();
    for sentence in py_strip(&t).split("###") {
        let s = py_strip(sentence);
        if let Some(rest) = s.strip_prefix("Human:") {
            data.push(py_strip(rest));
        } else if let Some(rest) = s.strip_prefix("Assistant:") {
            data.push(py_strip(rest));
        }
    }
    if data.len() % 2 == 1 {
        data.pop();
    }
    Ok(data
        .chunks(2)
        .flat_map(|p| one("", p[0].to_string(), p[1].to_string()))
        .collect())
}

fn system_prompt_pair(
    obj: &Map<String, Value>,
    sys: &str,
    input: &str,
    output: &str,
) -> Result<Vec<Turn>, String> {
    Ok(one(sys, text_or_none(obj, input)?, text(obj, output)?))
}

/// `code_alpaca_map_fn`: coder system, `prompt` → `completion`.
pub fn code_alpaca(obj: &Map<String, Value>) -> Result<Vec<Turn>, String> {
    system_prompt_pair(obj, system::CODER, "prompt", "completion")
}

/// `tiny_codes_map_fn`: coder system, `prompt` → `response`.
pub fn tiny_codes(obj: &Map<String, Value>) -> Result<Vec<Turn>, String> {
    system_prompt_pair(obj, system::CODER, "prompt", "response")
}

/// `medical_map_fn`: medical system, `'{instruction}\n{input}'.format(**example)` → `output`.
pub fn medical(obj: &Map<String, Value>) -> Result<Vec<Turn>, String> {
    let input = format!("{}\n{}", py_str(obj, "instruction")?, py_str(obj, "input")?);
    Ok(one(system::MEDICAL, input, text(obj, "output")?))
}

/// `default_map_fn`: `input` → `output`, no system.
pub fn default(obj: &Map<String, Value>) -> Result<Vec<Turn>, String> {
    system_prompt_pair(obj, "", "input", "output")
}

/// `crime_kg_assitant_map_fn` (XTuner's spelling): lawyer system, `input` → `output`.
pub fn crime_kg_assitant(obj: &Map<String, Value>) -> Result<Vec<Turn>, String> {
    system_prompt_pair(obj, system::LAWYER, "input", "output")
}

/// `law_reference_map_fn`: lawyer system, `question` → `answer`.
pub fn law_reference(obj: &Map<String, Value>) -> Result<Vec<Turn>, String> {
    system_prompt_pair(obj, system::LAWYER, "question", "answer")
}

/// `openorca_map_fn`: `system_prompt` (may be empty) + `question` → `response`.
pub fn openorca(obj: &Map<String, Value>) -> Result<Vec<Turn>, String> {
    let sys = text_or_none(obj, "system_prompt")?;
    Ok(one(
        &sys,
        text_or_none(obj, "question")?,
        text(obj, "response")?,
    ))
}

/// `stack_exchange_map_fn`: `question` → `response`.
pub fn stack_exchange(obj: &Map<String, Value>) -> Result<Vec<Turn>, String> {
    system_prompt_pair(obj, "", "question", "response")
}

/// `arxiv_map_fn`: arxiv system, `abstract` → `title`.
pub fn arxiv(obj: &Map<String, Value>) -> Result<Vec<Turn>, String> {
    system_prompt_pair(obj, system::ARXIV, "abstract", "title")
}

/// `colors_map_fn`: colorist system, `':'.join(description.split(':')[1:]).strip()` → `color`.
pub fn colors(obj: &Map<String, Value>) -> Result<Vec<Turn>, String> {
    let d = text(obj, "description")?;
    let desc = d.find(':').map(|i| py_strip(&d[i + 1..])).unwrap_or("");
    Ok(one(system::COLORIST, desc.to_string(), text(obj, "color")?))
}

/// `sql_map_fn`: sql system, `'{context}\n{question}'.format(**example)` → `answer`.
pub fn sql(obj: &Map<String, Value>) -> Result<Vec<Turn>, String> {
    let input = format!("{}\n{}", py_str(obj, "context")?, py_str(obj, "question")?);
    Ok(one(system::SQL, input, text(obj, "answer")?))
}

/// The `conversations` list of a ShareGPT/LLaVA record.
fn conversations(obj: &Map<String, Value>) -> Result<&[Value], String> {
    match get(obj, "conversations")? {
        Value::Array(a) => Ok(a),
        v => Err(format!(
            "\"conversations\": expected an array, got {}",
            kind(v)
        )),
    }
}

/// `conversations[i][key]` as a string.
fn msg_str<'a>(list: &'a [Value], i: usize, key: &str) -> Result<&'a str, String> {
    let m = list[i].as_object().ok_or_else(|| {
        format!(
            "conversations[{i}]: expected an object, got {}",
            kind(&list[i])
        )
    })?;
    match get(m, key).map_err(|e| format!("conversations[{i}]: {e}"))? {
        Value::String(s) => Ok(s),
        v => Err(format!(
            "conversations[{i}].{key:?}: expected a string, got {}",
            kind(v)
        )),
    }
}

/// The loop XTuner's `wizardlm_map_fn` and `llava_map_fn` share: leading `gpt` messages are
/// skipped (only their `from` is read); each `human` value is added to the pending input by
/// `human`; each `gpt` message closes a turn with the pending input (possibly empty) and
/// empties it; a trailing `human` without an answer is dropped; any other `from` is an error
/// (XTuner raises NotImplementedError).
fn human_gpt_turns(
    obj: &Map<String, Value>,
    human: impl Fn(&str, &mut String),
) -> Result<Vec<Turn>, String> {
    let list = conversations(obj)?;
    let mut start = 0;
    while start < list.len() && msg_str(list, start, "from")? == "gpt" {
        start += 1;
    }
    let (mut input, mut out) = (String::new(), Vec::new());
    for i in start..list.len() {
        match msg_str(list, i, "from")? {
            "human" => human(msg_str(list, i, "value")?, &mut input),
            "gpt" => out.extend(one(
                "",
                std::mem::take(&mut input),
                msg_str(list, i, "value")?.to_string(),
            )),
            other => {
                return Err(format!(
                    "conversations[{i}].\"from\": expected \"human\" or \"gpt\", got {other:?}"
                ))
            }
        }
    }
    Ok(out)
}

/// `wizardlm_map_fn` (ShareGPT `conversations` of `from`/`value`): consecutive `human` values
/// are concatenated with no separator into one input, as XTuner does.
pub fn wizardlm(obj: &Map<String, Value>) -> Result<Vec<Turn>, String> {
    human_gpt_turns(obj, |value, input| input.push_str(value))
}

/// `llava_map_fn`: as [`wizardlm`], except that a `human` value holding `<image>` has it
/// removed, stripped and put in front as `"<image>\n" + text` (stripped). The image path is
/// read separately (see [`llava_image`]).
pub fn llava(obj: &Map<String, Value>) -> Result<Vec<Turn>, String> {
    human_gpt_turns(obj, |value, input| {
        if value.contains(IMAGE_TOKEN) {
            let v = value.replace(IMAGE_TOKEN, "");
            let v = format!("{IMAGE_TOKEN}\n{}", py_strip(&v));
            input.push_str(py_strip(&v));
        } else {
            input.push_str(value);
        }
    })
}

/// The `image` path of a LLaVA record (None when the record has no image: text-only rows of
/// LLaVA mixtures).
pub fn llava_image(record: &Value) -> Result<Option<String>, String> {
    match record.get("image") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => Err(format!(
            "\"image\": expected a string path, got {}",
            kind(v)
        )),
    }
}

/// Column remapping: `(field, column)` pairs, e.g. `instruction=question` reads the format's
/// `instruction` field from the dataset's `question` column.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Columns(pub Vec<(String, String)>);

impl Columns {
    /// Parse `"instruction=question,output=answer"` (empty string = no remapping).
    pub fn parse(spec: &str) -> Result<Columns, String> {
        let mut out = Vec::new();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (field, column) = part.split_once('=').ok_or_else(|| {
                format!(
                    "--columns entry {part:?}: expected FIELD=COLUMN, e.g. instruction=question"
                )
            })?;
            let (field, column) = (field.trim(), column.trim());
            if field.is_empty() || column.is_empty() {
                return Err(format!(
                    "--columns entry {part:?}: empty field or column name"
                ));
            }
            if out.iter().any(|(f, _): &(String, String)| f == field) {
                return Err(format!("--columns maps {field:?} twice"));
            }
            out.push((field.to_string(), column.to_string()));
        }
        Ok(Columns(out))
    }

    /// True when nothing is remapped.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The canonical spec string (for the fingerprint and meta.json).
    pub fn spec(&self) -> String {
        let parts: Vec<String> = self.0.iter().map(|(f, c)| format!("{f}={c}")).collect();
        parts.join(",")
    }

    /// Apply to one record: every mapped field takes its column's value (all reads happen
    /// before any write, so `input=output,output=input` swaps). A column the record lacks
    /// leaves the field as it was.
    pub fn apply(&self, record: &mut Value) {
        let Some(obj) = record.as_object_mut() else {
            return;
        };
        let vals: Vec<(String, Option<Value>)> = self
            .0
            .iter()
            .map(|(f, c)| (f.clone(), obj.get(c).cloned()))
            .collect();
        for (f, v) in vals {
            if let Some(v) = v {
                obj.insert(f, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn o(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn oasst1_splits_and_drops_dangling_input() {
        let t = oasst1(&o(json!({"text":
            " ### Human: Hi ### Assistant:  Hello ### junk ### Human: more? "})))
        .unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!((t[0].input.as_str(), t[0].output.as_str()), ("Hi", "Hello"));
    }

    #[test]
    fn colors_and_py_str() {
        let t = colors(&o(json!({"description": "a: b : c ", "color": "#fff"}))).unwrap();
        assert_eq!(t[0].input, "b : c");
        let t = colors(&o(json!({"description": "none", "color": "#fff"}))).unwrap();
        assert_eq!(t[0].input, "");
        let t = medical(&o(
            json!({"instruction": "I", "input": null, "output": "O"}),
        ))
        .unwrap();
        assert_eq!(t[0].input, "I\nNone");
        assert!(medical(&o(json!({"instruction": "I", "input": [1], "output": "O"}))).is_err());
    }

    #[test]
    fn sharegpt_and_llava() {
        let r = o(json!({"conversations": [
            {"from": "gpt", "value": "lead"}, {"from": "human", "value": "q"},
            {"from": "gpt", "value": "a"}, {"from": "human", "value": "dangling"}]}));
        let t = wizardlm(&r).unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].input, "q");
        // consecutive human values join with no separator; each gpt closes a turn (an empty
        // input when two gpt messages follow each other)
        let r = o(json!({"conversations": [
            {"from": "gpt", "value": null}, {"from": "gpt", "value": "lead2"},
            {"from": "human", "value": "a"}, {"from": "human", "value": "b"},
            {"from": "gpt", "value": "A"}, {"from": "gpt", "value": "B"},
            {"from": "human", "value": "c"}]}));
        let t = wizardlm(&r).unwrap();
        let pairs: Vec<_> = t
            .iter()
            .map(|t| (t.input.as_str(), t.output.as_str()))
            .collect();
        assert_eq!(pairs, [("ab", "A"), ("", "B")]);
        // only gpt messages, or nothing: no turn
        let r = o(json!({"conversations": [{"from": "gpt", "value": "x"}]}));
        assert!(wizardlm(&r).unwrap().is_empty());
        // any other `from` is an error naming it, even after good turns
        let bad = o(json!({"conversations": [
            {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"},
            {"from": "system", "value": "s"}]}));
        let e = wizardlm(&bad).unwrap_err();
        assert!(
            e.contains("conversations[2]") && e.contains("\"system\""),
            "{e}"
        );
        let bad = o(json!({"conversations": [{"from": "human", "value": 1}]}));
        assert!(wizardlm(&bad).unwrap_err().contains("expected a string"));
        let t = llava(&o(json!({"conversations": [
            {"from": "human", "value": "What is this?\n<image> "},
            {"from": "gpt", "value": "A cat."}]})))
        .unwrap();
        assert_eq!(t[0].input, "<image>\nWhat is this?");
    }

    #[test]
    fn columns_remap_and_swap() {
        let c = Columns::parse("instruction=question, output=answer").unwrap();
        let mut r = json!({"question": "Q", "answer": "A", "input": ""});
        c.apply(&mut r);
        assert_eq!(r["instruction"], "Q");
        assert_eq!(r["output"], "A");
        let mut r = json!({"input": "x", "output": "y"});
        Columns::parse("input=output,output=input")
            .unwrap()
            .apply(&mut r);
        assert_eq!(
            (r["input"].as_str(), r["output"].as_str()),
            (Some("y"), Some("x"))
        );
        assert!(Columns::parse("nope").is_err());
        assert!(Columns::parse("a=b,a=c").is_err());
        assert_eq!(Columns::parse(" ").unwrap().spec(), "");
    }
}
