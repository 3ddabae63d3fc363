//! A conversation turn, the unit every dataset format maps to and every template encodes,
//! and Python's whitespace rules the mappings follow. Its own module so that the format
//! mappings (`format`, `format::xtuner`, `format::preference`) all build on it without
//! depending on each other.

use serde_json::Value;

/// How a JSON value is named in "expected ..., got ..." messages.
pub(crate) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// One turn of XTuner's `conversation` format after mapping (before the template).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Turn {
    /// System text ("" = none).
    pub system: String,
    /// User text (no loss).
    pub input: String,
    /// Assistant text.
    pub output: String,
    /// Whether the output (and its EOS) is trained.
    pub output_with_loss: bool,
    /// Whether an EOS token follows the output (XTuner's `need_eos_token`, default true).
    pub need_eos_token: bool,
    /// Text appended after the turn without loss (XTuner's `sep`, default "").
    pub sep: String,
}

impl Turn {
    pub(crate) fn new(system: String, input: String, output: String) -> Self {
        Turn {
            system,
            input,
            output,
            output_with_loss: true,
            need_eos_token: true,
            sep: String::new(),
        }
    }
}

/// Python's `str.isspace` set: Unicode White_Space plus U+001C..U+001F (which Rust's
/// `char::is_whitespace` does not include). `str.strip()` with no argument uses it.
pub fn py_isspace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `str.strip()`.
pub fn py_strip(s: &str) -> &str {
    s.trim_matches(py_isspace)
}
