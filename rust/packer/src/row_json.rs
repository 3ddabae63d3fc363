//! Arrow rows as JSON text: each row of a record batch becomes the JSON object its JSON
//! source would have held, so Parquet, Arrow IPC and JSONL inputs go through one record
//! pipeline (formats, `--columns`, templates) unchanged.
//!
//! The mapping: a struct (and the row itself) is an object whose null fields are left out,
//! because a JSON record written to Arrow gets a null for every key it lacked (pyarrow,
//! `datasets`), and formats tell an absent key from a null one; lists are arrays (null items
//! kept as `null`); maps with string keys are objects; dictionary columns read as their
//! values; strings, booleans and numbers are themselves (non-finite floats become `null`,
//! as JSON has no NaN). Binary values are strings when they are UTF-8 text, else `null`;
//! dates, times, timestamps and durations are their integer value in the column's unit;
//! 128-bit decimals are numbers. Other types (unions, intervals, run-end encoded,
//! 256-bit decimals) have no JSON value: the file is refused, naming the column.

use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::*;
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_buffer::NullBuffer;
use arrow_schema::DataType;

/// Writes the value of row `r` (known not to be null) into `out`.
type Enc = Box<dyn Fn(usize, &mut Vec<u8>) + Send + Sync>;

/// One field of an object: its key (quoted, with the colon), nulls, and value encoder.
struct Field {
    key: Vec<u8>,
    nulls: Option<NullBuffer>,
    enc: Enc,
}

/// Encodes the rows of one record batch as JSON objects.
pub struct RowEncoder {
    fields: Arc<Vec<Field>>,
    rows: usize,
}

fn is_null(nulls: &Option<NullBuffer>, i: usize) -> bool {
    nulls.as_ref().is_some_and(|n| n.is_null(i))
}

/// Append `s` as a JSON string.
pub fn write_json_str(out: &mut Vec<u8>, s: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    let mut start = 0;
    for (i, &b) in s.iter().enumerate() {
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&s[start..i]);
        if esc.is_empty() {
            out.extend_from_slice(b"\\u00");
            out.push(HEX[(b >> 4) as usize]);
            out.push(HEX[(b & 15) as usize]);
        } else {
            out.extend_from_slice(esc);
        }
        start = i + 1;
    }
    out.extend_from_slice(&s[start..]);
    out.push(b'"');
}

fn write_f64(out: &mut Vec<u8>, x: f64) {
    use std::io::Write;
    if x.is_finite() {
        // Debug keeps the decimal point ("1.0"), so a float stays a float in JSON.
        let _ = write!(out, "{x:?}");
    } else {
        out.extend_from_slice(b"null");
    }
}

fn write_display(out: &mut Vec<u8>, x: impl std::fmt::Display) {
    use std::io::Write;
    let _ = write!(out, "{x}");
}

fn object_of(fields: &[Field], r: usize, out: &mut Vec<u8>) {
    out.push(b'{');
    let mut first = true;
    for f in fields {
        if is_null(&f.nulls, r) {
            continue;
        }
        if !first {
            out.push(b',');
        }
        first = false;
        out.extend_from_slice(&f.key);
        (f.enc)(r, out);
    }
    out.push(b'}');
}

fn field(name: &str, a: &ArrayRef, path: &str) -> Result<Field, String> {
    let mut key = Vec::with_capacity(name.len() + 3);
    write_json_str(&mut key, name.as_bytes());
    key.push(b':');
    Ok(Field {
        key,
        nulls: a.logical_nulls(),
        enc: encoder(a, path)?,
    })
}

macro_rules! primitive {
    ($a:expr, $t:ty, $write:expr) => {{
        let arr = $a.as_primitive::<$t>().clone();
        Box::new(move |r, out: &mut Vec<u8>| $write(out, arr.value(r)))
    }};
}

fn list_enc(
    child: &ArrayRef,
    path: &str,
    bounds: impl Fn(usize) -> (usize, usize) + Send + Sync + 'static,
) -> Result<Enc, String> {
    let nulls = child.logical_nulls();
    let item = encoder(child, &format!("{path}[]"))?;
    Ok(Box::new(move |r, out| {
        let (s, e) = bounds(r);
        out.push(b'[');
        for i in s..e {
            if i > s {
                out.push(b',');
            }
            if is_null(&nulls, i) {
                out.extend_from_slice(b"null");
            } else {
                item(i, out);
            }
        }
        out.push(b']');
    }))
}

fn encoder(a: &ArrayRef, path: &str) -> Result<Enc, String> {
    Ok(match a.data_type() {
        DataType::Null => Box::new(|_, out| out.extend_from_slice(b"null")),
        DataType::Boolean => {
            let arr = a.as_boolean().clone();
            Box::new(move |r, out| {
                out.extend_from_slice(if arr.value(r) { b"true" } else { b"false" })
            })
        }
        DataType::Int8 => primitive!(a, Int8Type, write_display),
        DataType::Int16 => primitive!(a, Int16Type, write_display),
        DataType::Int32 => primitive!(a, Int32Type, write_display),
        DataType::Int64 => primitive!(a, Int64Type, write_display),
        DataType::UInt8 => primitive!(a, UInt8Type, write_display),
        DataType::UInt16 => primitive!(a, UInt16Type, write_display),
        DataType::UInt32 => primitive!(a, UInt32Type, write_display),
        DataType::UInt64 => primitive!(a, UInt64Type, write_display),
        DataType::Float16 => {
            primitive!(a, Float16Type, |o, x: F16| write_f64(o, x.to_f64()))
        }
        DataType::Float32 => primitive!(a, Float32Type, |o, x: f32| write_f64(o, x as f64)),
        DataType::Float64 => primitive!(a, Float64Type, write_f64),
        DataType::Decimal128(_, scale) => {
            let div = 10f64.powi(*scale as i32);
            primitive!(a, Decimal128Type, move |o, x: i128| write_f64(
                o,
                x as f64 / div
            ))
        }
        DataType::Utf8 => {
            let arr = a.as_string::<i32>().clone();
            Box::new(move |r, out| write_json_str(out, arr.value(r).as_bytes()))
        }
        DataType::LargeUtf8 => {
            let arr = a.as_string::<i64>().clone();
            Box::new(move |r, out| write_json_str(out, arr.value(r).as_bytes()))
        }
        DataType::Utf8View => {
            let arr = a.as_string_view().clone();
            Box::new(move |r, out| write_json_str(out, arr.value(r).as_bytes()))
        }
        DataType::Binary => {
            let arr = a.as_binary::<i32>().clone();
            Box::new(move |r, out| write_text_or_null(out, arr.value(r)))
        }
        DataType::LargeBinary => {
            let arr = a.as_binary::<i64>().clone();
            Box::new(move |r, out| write_text_or_null(out, arr.value(r)))
        }
        DataType::BinaryView => {
            let arr = a.as_binary_view().clone();
            Box::new(move |r, out| write_text_or_null(out, arr.value(r)))
        }
        DataType::FixedSizeBinary(_) => {
            let arr = a.as_fixed_size_binary().clone();
            Box::new(move |r, out| write_text_or_null(out, arr.value(r)))
        }
        t if t.is_temporal() && matches!(t.primitive_width(), Some(4 | 8)) => {
            // Same layout as the integer of its width: read it as that integer.
            let int = if t.primitive_width() == Some(4) {
                DataType::Int32
            } else {
                DataType::Int64
            };
            let data = a
                .to_data()
                .into_builder()
                .data_type(int)
                .build()
                .map_err(|e| format!("column {path:?}: {e}"))?;
            encoder(&arrow_array::make_array(data), path)?
        }
        DataType::List(_) => {
            let l = a.as_list::<i32>().clone();
            let offs = l.offsets().clone();
            list_enc(l.values(), path, move |r| {
                (offs[r] as usize, offs[r + 1] as usize)
            })?
        }
        DataType::LargeList(_) => {
            let l = a.as_list::<i64>().clone();
            let offs = l.offsets().clone();
            list_enc(l.values(), path, move |r| {
                (offs[r] as usize, offs[r + 1] as usize)
            })?
        }
        DataType::FixedSizeList(_, n) => {
            let l = a.as_fixed_size_list().clone();
            let n = *n as usize;
            let values = l.values().clone();
            list_enc(&values, path, move |r| {
                let s = l.value_offset_at(r);
                (s, s + n)
            })?
        }
        DataType::Struct(_) => {
            let s = a.as_struct();
            let fields = s
                .fields()
                .iter()
                .zip(s.columns())
                .map(|(f, c)| field(f.name(), c, &format!("{path}.{}", f.name())))
                .collect::<Result<Vec<_>, _>>()?;
            Box::new(move |r, out| object_of(&fields, r, out))
        }
        DataType::Map(_, _) => {
            let m = a.as_map().clone();
            let keys = m.keys().clone();
            if keys.data_type() != &DataType::Utf8 {
                return Err(format!(
                    "column {path:?}: map keys must be strings, got {}",
                    keys.data_type()
                ));
            }
            let keys = keys.as_string::<i32>().clone();
            let values = m.values().clone();
            let nulls = values.logical_nulls();
            let item = encoder(&values, &format!("{path}{{}}"))?;
            let offs = m.offsets().clone();
            Box::new(move |r, out| {
                let (s, e) = (offs[r] as usize, offs[r + 1] as usize);
                out.push(b'{');
                for i in s..e {
                    if i > s {
                        out.push(b',');
                    }
                    write_json_str(out, keys.value(i).as_bytes());
                    out.push(b':');
                    if is_null(&nulls, i) {
                        out.extend_from_slice(b"null");
                    } else {
                        item(i, out);
                    }
                }
                out.push(b'}');
            })
        }
        DataType::Dictionary(_, _) => {
            let d = a.as_any_dictionary();
            let keys = d.normalized_keys();
            let item = encoder(d.values(), path)?;
            Box::new(move |r, out| item(keys[r], out))
        }
        t => {
            return Err(format!(
                "column {path:?}: Arrow type {t} has no JSON value (expected strings, numbers, \
                 booleans, lists, structs or maps)"
            ))
        }
    })
}

type F16 = <Float16Type as arrow_array::ArrowPrimitiveType>::Native;

fn write_text_or_null(out: &mut Vec<u8>, b: &[u8]) {
    match std::str::from_utf8(b) {
        Ok(s) => write_json_str(out, s.as_bytes()),
        Err(_) => out.extend_from_slice(b"null"),
    }
}

impl RowEncoder {
    /// An encoder for the rows of `batch`; an error names the first column whose type has
    /// no JSON value.
    pub fn new(batch: &RecordBatch) -> Result<Self, String> {
        let schema = batch.schema();
        let fields = schema
            .fields()
            .iter()
            .zip(batch.columns())
            .map(|(f, c)| field(f.name(), c, f.name()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(RowEncoder {
            fields: Arc::new(fields),
            rows: batch.num_rows(),
        })
    }

    /// Rows in the batch.
    pub fn num_rows(&self) -> usize {
        self.rows
    }

    /// Row `r` as JSON text (appended to `out`).
    pub fn write_row(&self, r: usize, out: &mut Vec<u8>) {
        object_of(&self.fields, r, out);
    }

    /// Rows `range` as JSON texts.
    pub fn rows(&self, range: std::ops::Range<usize>) -> Vec<String> {
        let mut buf = Vec::new();
        range
            .map(|r| {
                buf.clear();
                self.write_row(r, &mut buf);
                // Every string written came from a UTF-8 array or was checked to be UTF-8, so this
                // copies without replacing anything.
                String::from_utf8_lossy(&buf).into_owned()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::builder::{
        Int32Builder, ListBuilder, MapBuilder, StringBuilder, StringDictionaryBuilder,
    };
    use arrow_array::{
        BinaryArray, BooleanArray, Float64Array, Int64Array, LargeStringArray, ListArray,
        StructArray, TimestampMillisecondArray,
    };
    use arrow_schema::Field as ArrowField;
    use serde_json::{json, Value};

    fn rows(batch: &RecordBatch) -> Vec<Value> {
        let enc = RowEncoder::new(batch).unwrap();
        enc.rows(0..enc.num_rows())
            .iter()
            .map(|t| serde_json::from_str(t).unwrap())
            .collect()
    }

    /// `messages: list<struct<role, content, loss?>>` as pyarrow writes a JSON list of
    /// objects, some without `loss`.
    fn messages() -> ArrayRef {
        let role: ArrayRef = Arc::new(arrow_array::StringArray::from(vec![
            "user",
            "assistant",
            "user",
        ]));
        let content: ArrayRef = Arc::new(arrow_array::StringArray::from(vec![
            "q \"1\"\n\u{1}",
            "a",
            "é\t",
        ]));
        let loss: ArrayRef = Arc::new(BooleanArray::from(vec![None, Some(false), None]));
        let s = StructArray::from(vec![
            (
                Arc::new(ArrowField::new("role", DataType::Utf8, false)),
                role,
            ),
            (
                Arc::new(ArrowField::new("content", DataType::Utf8, false)),
                content,
            ),
            (
                Arc::new(ArrowField::new("loss", DataType::Boolean, true)),
                loss,
            ),
        ]);
        let field = Arc::new(ArrowField::new("item", s.data_type().clone(), true));
        let offsets = arrow_buffer::OffsetBuffer::new(vec![0, 2, 2, 3].into());
        let nulls = NullBuffer::from(vec![true, true, false]);
        Arc::new(ListArray::new(field, offsets, Arc::new(s), Some(nulls)))
    }

    #[test]
    fn rows_are_the_json_records_nulls_left_out() {
        let mut ints = ListBuilder::new(Int32Builder::new());
        ints.append_value([Some(1), None]);
        ints.append_value([]);
        ints.append_null();
        let mut map = MapBuilder::new(None, StringBuilder::new(), Int32Builder::new());
        map.keys().append_value("k");
        map.values().append_value(7);
        map.append(true).unwrap();
        map.append(true).unwrap();
        map.append(false).unwrap();
        let mut dict = StringDictionaryBuilder::<Int32Type>::new();
        dict.append_value("x");
        dict.append_null();
        dict.append_value("x");
        let cols: Vec<(&str, ArrayRef)> = vec![
            ("messages", messages()),
            (
                "n",
                Arc::new(Int64Array::from(vec![Some(-3), None, Some(5)])),
            ),
            ("f", Arc::new(Float64Array::from(vec![1.0, f64::NAN, 0.25]))),
            ("big", Arc::new(LargeStringArray::from(vec!["l", "m", "n"]))),
            (
                "bin",
                Arc::new(BinaryArray::from(vec![&b"ok"[..], &b"\xff"[..], &b""[..]])),
            ),
            ("ints", Arc::new(ints.finish())),
            ("map", Arc::new(map.finish())),
            ("dict", Arc::new(dict.finish())),
            (
                "ts",
                Arc::new(TimestampMillisecondArray::from(vec![1, 2, 3])),
            ),
        ];
        let batch = RecordBatch::try_from_iter(cols).unwrap();
        let got = rows(&batch);
        assert_eq!(
            got[0],
            json!({"messages": [{"role": "user", "content": "q \"1\"\n\u{1}"},
                                {"role": "assistant", "content": "a", "loss": false}],
                   "n": -3, "f": 1.0, "big": "l", "bin": "ok", "ints": [1, null],
                   "map": {"k": 7}, "dict": "x", "ts": 1})
        );
        assert_eq!(
            got[1],
            json!({"messages": [], "f": null, "big": "m", "bin": null, "ints": [], "map": {},
                   "ts": 2})
        );
        assert_eq!(
            got[2],
            json!({"n": 5, "f": 0.25, "big": "n", "bin": "", "dict": "x", "ts": 3})
        );
        // A float stays a float; a slice reads its own rows.
        let enc = RowEncoder::new(&batch.slice(1, 2)).unwrap();
        assert!(enc.rows(1..2)[0].contains("\"f\":0.25"));
        assert_eq!(rows(&batch.slice(2, 1))[0], got[2]);
    }

    #[test]
    fn strings_escape_like_serde() {
        for s in [
            "plain",
            "q\"b\\s",
            "ctl\u{0}\u{1f}\u{7f}",
            "\u{2028}é😀",
            "\r\n\t",
        ] {
            let mut out = Vec::new();
            write_json_str(&mut out, s.as_bytes());
            let back: String = serde_json::from_slice(&out).unwrap();
            assert_eq!(back, s);
        }
    }

    #[test]
    fn a_type_without_json_value_names_its_column() {
        let iv: ArrayRef = Arc::new(arrow_array::IntervalMonthDayNanoArray::from(vec![
            arrow_buffer::IntervalMonthDayNano::new(1, 2, 3),
        ]));
        let s = StructArray::from(vec![(
            Arc::new(ArrowField::new("span", iv.data_type().clone(), false)),
            iv,
        )]);
        let batch = RecordBatch::try_from_iter([("meta", Arc::new(s) as ArrayRef)]).unwrap();
        let e = RowEncoder::new(&batch).err().unwrap();
        assert!(
            e.starts_with("column \"meta.span\": Arrow type Interval"),
            "{e}"
        );
    }
}
