//! The `openai` format read straight from a record's JSON text, without a
//! `serde_json::Value` tree: strings without escapes are borrowed from the text, the rest
//! are decoded once. Only the common shape is read here (an object whose `messages` are
//! objects with string `role`s and string `content`s where the mapping reads them, no
//! `tools`); any other record gives `None` and goes through the `Value` mapping
//! ([`crate::format::Format::to_turns`]), which owns every message and error. Where this
//! reader answers, its turns are those of that mapping (same rules: `openai_map_fn`'s).
//!
//! Fields the mapping never reads are still parsed as `Value`s, so a record is refused
//! here exactly where `serde_json::from_str::<Value>` would refuse it (numbers out of range,
//! nesting depth); a repeated key gives `None` (the `Value` map keeps the last one).

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

/// One turn of an `openai` record, borrowing from the record's text where it can.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct BorrowedTurn<'a> {
    /// System text ("" = none).
    pub system: Cow<'a, str>,
    /// User text (consecutive user messages joined).
    pub input: Cow<'a, str>,
    /// Assistant text.
    pub output: Cow<'a, str>,
    /// Whether the output is trained (the message's `loss`).
    pub output_with_loss: bool,
}

/// The turns of the `openai` record `text`, or `None` when this reader leaves the record to
/// the `Value` mapping (see the module doc). An empty list: no assistant answer (dropped).
pub(crate) fn turns(text: &str) -> Option<Vec<BorrowedTurn<'_>>> {
    // A struct visitor would also take a JSON array; the `Value` mapping refuses one.
    if !text.trim_start().starts_with('{') {
        return None;
    }
    let record: Record<'_> = serde_json::from_str(text).ok()?;
    if !matches!(record.tools, Field::Absent | Field::Null) {
        return None;
    }
    map_messages(record.messages)
}

/// `openai_map_fn` on parsed messages, as the `Value` mapping applies it.
fn map_messages(msgs: Vec<Message<'_>>) -> Option<Vec<BorrowedTurn<'_>>> {
    let start = msgs
        .iter()
        .position(|m| m.role != "assistant")
        .unwrap_or(msgs.len());
    let mut system = Cow::Borrowed("");
    let mut input: Cow<'_, str> = Cow::Borrowed("");
    let mut out = Vec::new();
    for m in msgs.into_iter().skip(start) {
        match &*m.role {
            "system" => {
                system = match m.content {
                    Field::Absent | Field::Null => Cow::Borrowed(""),
                    Field::Str(s) => s,
                    _ => return None,
                }
            }
            "user" => {
                let Field::Str(s) = m.content else {
                    return None;
                };
                if input.is_empty() {
                    input = s;
                } else {
                    input.to_mut().push_str(&s);
                }
            }
            "assistant" => {
                let Field::Str(output) = m.content else {
                    return None;
                };
                out.push(BorrowedTurn {
                    system: std::mem::take(&mut system),
                    input: std::mem::take(&mut input),
                    output,
                    output_with_loss: m.loss.openai_loss(),
                });
            }
            _ => return None,
        }
    }
    Some(out)
}

/// A record: `messages`, `tools`, and any other keys (parsed, unused).
struct Record<'a> {
    messages: Vec<Message<'a>>,
    tools: Field<'a>,
}

/// A message: `role`, `content`, `loss`, and any other keys (parsed, unused).
struct Message<'a> {
    role: Cow<'a, str>,
    content: Field<'a>,
    loss: Field<'a>,
}

/// A JSON value as far as the mapping looks at it.
#[derive(Debug, Default)]
enum Field<'a> {
    /// The key is not in the object.
    #[default]
    Absent,
    Null,
    Bool(bool),
    Str(Cow<'a, str>),
    /// A number, array or object.
    Other,
}

impl Field<'_> {
    /// `openai_map_fn`'s loss rule: `str(msg.get("loss", "True")).lower() == "true"`.
    fn openai_loss(&self) -> bool {
        match self {
            Field::Absent => true,
            Field::Bool(b) => *b,
            Field::Str(s) => s.to_lowercase() == "true",
            Field::Null | Field::Other => false,
        }
    }
}

/// Set a field once; a repeated key fails the parse (see the module doc).
fn set_once<T, E: de::Error>(slot: &mut Option<T>, value: T, key: &str) -> Result<(), E> {
    if slot.replace(value).is_some() {
        return Err(E::custom(format_args!("repeated key {key:?}")));
    }
    Ok(())
}

impl<'de: 'a, 'a> Deserialize<'de> for Record<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Record<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an openai record")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Record<'a>, A::Error> {
                let (mut messages, mut tools) = (None, None);
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    match &*key {
                        "messages" => set_once(&mut messages, map.next_value()?, "messages")?,
                        "tools" => set_once(&mut tools, map.next_value()?, "tools")?,
                        _ => drop(map.next_value::<Value>()?),
                    }
                }
                Ok(Record {
                    messages: messages.ok_or_else(|| de::Error::missing_field("messages"))?,
                    tools: tools.unwrap_or_default(),
                })
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Message<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Message<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an openai message")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Message<'a>, A::Error> {
                let (mut role, mut content, mut loss) = (None, None, None);
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    match &*key {
                        "role" => set_once(&mut role, map.next_value::<Field>()?, "role")?,
                        "content" => set_once(&mut content, map.next_value()?, "content")?,
                        "loss" => set_once(&mut loss, map.next_value()?, "loss")?,
                        _ => drop(map.next_value::<Value>()?),
                    }
                }
                let Some(Field::Str(role)) = role else {
                    return Err(de::Error::custom("role is not a string"));
                };
                Ok(Message {
                    role,
                    content: content.unwrap_or_default(),
                    loss: loss.unwrap_or_default(),
                })
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Field<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Field<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_unit<E>(self) -> Result<Field<'a>, E> {
                Ok(Field::Null)
            }
            fn visit_bool<E>(self, b: bool) -> Result<Field<'a>, E> {
                Ok(Field::Bool(b))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Field<'a>, E> {
                Ok(Field::Other)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Field<'a>, E> {
                Ok(Field::Other)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Field<'a>, E> {
                Ok(Field::Other)
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Field<'a>, E> {
                Ok(Field::Str(Cow::Borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<Field<'a>, E> {
                Ok(Field::Str(Cow::Owned(s.to_string())))
            }
            fn visit_string<E>(self, s: String) -> Result<Field<'a>, E> {
                Ok(Field::Str(Cow::Owned(s)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Field<'a>, A::Error> {
                while seq.next_element::<Value>()?.is_some() {}
                Ok(Field::Other)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Field<'a>, A::Error> {
                while map.next_entry::<String, Value>()?.is_some() {}
                Ok(Field::Other)
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::Format;

    /// This reader's turns, or `None`, next to the `Value` mapping's.
    fn both(
        text: &str,
    ) -> (
        Option<Vec<BorrowedTurn<'_>>>,
        Result<Vec<crate::format::Turn>, String>,
    ) {
        let slow = serde_json::from_str::<Value>(text)
            .map_err(|e| e.to_string())
            .and_then(|v| Format::OpenAi.to_turns(&v));
        (turns(text), slow)
    }

    /// Where this reader answers, the `Value` mapping gives the same turns.
    fn agrees(text: &str) -> bool {
        let (fast, slow) = both(text);
        let Some(fast) = fast else {
            return false;
        };
        let slow = slow.expect("the Value mapping accepts what the fast reader accepts");
        assert_eq!(fast.len(), slow.len(), "{text}");
        for (f, s) in fast.iter().zip(&slow) {
            assert_eq!(
                (&*f.system, &*f.input, &*f.output, f.output_with_loss),
                (&*s.system, &*s.input, &*s.output, s.output_with_loss),
                "{text}"
            );
            assert!(s.need_eos_token && s.sep.is_empty());
        }
        true
    }

    #[test]
    fn common_records_read_as_the_value_mapping_reads_them() {
        for text in [
            r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo\n\u00e9"}]}"#,
            r#" {"id": 3, "messages": [{"role": "assistant", "content": 7}, {"role": "system", "content": null},
                {"role": "user", "content": "a"}, {"role": "user", "content": "b\"c"},
                {"role": "assistant", "content": "A1", "loss": "FALSE", "extra": [1, {"x": null}]},
                {"role": "system", "content": "S"}, {"role": "user", "content": "q"},
                {"role": "assistant", "content": "A2", "loss": null}, {"role": "user", "content": "dangling"}],
                "tools": null}"#,
            r#"{"messages": [{"content": "q", "role": "user"}, {"role": "assistant", "content": "a", "loss": "True"},
                {"role": "user", "content": "q2"}, {"role": "assistant", "content": "b", "loss": 1}]}"#,
            r#"{"messages": [{"role": "system"}, {"role": "user", "content": ""}, {"role": "assistant", "content": ""}]}"#,
            r#"{"messages": []}"#,
            r#"{"messages": [{"role": "user", "content": "only a question"}]}"#,
        ] {
            assert!(agrees(text), "the fast reader declined {text}");
        }
    }

    #[test]
    fn other_records_are_left_to_the_value_mapping() {
        for text in [
            // not an object, or messages not a list of objects
            r#"[{"messages": []}]"#,
            r#"{"messages": [["user", "hi"]]}"#,
            r#"{"messages": "x"}"#,
            r#"{"text": "x"}"#,
            // shapes the mapping refuses (it owns the message)
            r#"{"messages": [{"role": "user", "content": null}, {"role": "assistant", "content": "a"}]}"#,
            r#"{"messages": [{"role": "tool", "content": "x"}]}"#,
            r#"{"messages": [{"role": 1, "content": "x"}]}"#,
            r#"{"messages": [{"role": "system", "content": 5}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}"#,
            // tools go through the template path that refuses or renders them
            r#"{"messages": [], "tools": []}"#,
            // a repeated key: the Value map keeps the last one
            r#"{"messages": [{"role": "user", "content": "a", "content": "b"}, {"role": "assistant", "content": "c"}]}"#,
            // what from_str::<Value> refuses: an out-of-range number in an unread field,
            // trailing text, invalid escapes
            r#"{"messages": [], "n": 1e999}"#,
            r#"{"messages": []} x"#,
            r#"{"messages": [{"role": "user", "content": "\ud800"}]}"#,
        ] {
            assert!(both(text).0.is_none(), "the fast reader answered {text}");
        }
    }

    #[test]
    fn unescaped_text_is_borrowed() {
        let t = turns(r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a\nb"}]}"#)
            .unwrap();
        assert!(matches!(t[0].input, Cow::Borrowed("q")));
        assert!(matches!(t[0].output, Cow::Owned(_)));
    }
}
