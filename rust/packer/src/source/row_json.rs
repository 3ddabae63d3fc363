//! Arrow rows as JSON records: each row of a record batch becomes the JSON object its JSON
//! source would have held (built as a `serde_json::Value`, never printed and parsed again), so Parquet, Arrow IPC and JSONL inputs go through one record
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

use arrow_array::cast::AsArray;
use arrow_array::types::*;
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_buffer::NullBuffer;
use arrow_schema::DataType;
use serde_json::{Map, Value};

/// The value of row `r` (known not to be null).
type Enc = Box<dyn Fn(usize) -> Value + Send + Sync>;

/// One field of an object: its key, nulls, and value encoder.
struct Field {
    key: String,
    nulls: Option<NullBuffer>,
    enc: Enc,
}

/// Makes the records of one record batch.
pub struct RowEncoder {
    fields: Vec<Field>,
    rows: usize,
}

fn is_null(nulls: &Option<NullBuffer>, i: usize) -> bool {
    nulls.as_ref().is_some_and(|n| n.is_null(i))
}

fn float(x: f64) -> Value {
    // JSON has no NaN or infinity.
    serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)
}

fn text_or_null(b: &[u8]) -> Value {
    std::str::from_utf8(b).map_or(Value::Null, |s| Value::String(s.to_string()))
}

fn object_of(fields: &[Field], r: usize) -> Value {
    let mut map = Map::with_capacity(fields.len());
    for f in fields {
        if !is_null(&f.nulls, r) {
            map.insert(f.key.clone(), (f.enc)(r));
        }
    }
    Value::Object(map)
}

fn field(name: &str, a: &ArrayRef, path: &str) -> Result<Field, String> {
    Ok(Field {
        key: name.to_string(),
        nulls: a.logical_nulls(),
        enc: encoder(a, path)?,
    })
}

macro_rules! primitive {
    ($a:expr, $t:ty, $value:expr) => {{
        let arr = $a.as_primitive::<$t>().clone();
        Box::new(move |r| $value(arr.value(r)))
    }};
}

fn list_enc(
    child: &ArrayRef,
    path: &str,
    bounds: impl Fn(usize) -> (usize, usize) + Send + Sync + 'static,
) -> Result<Enc, String> {
    let nulls = child.logical_nulls();
    let item = encoder(child, &format!("{path}[]"))?;
    Ok(Box::new(move |r| {
        let (s, e) = bounds(r);
        Value::Array(
            (s..e)
                .map(|i| {
                    if is_null(&nulls, i) {
                        Value::Null
                    } else {
                        item(i)
                    }
                })
                .collect(),
        )
    }))
}

fn encoder(a: &ArrayRef, path: &str) -> Result<Enc, String> {
    Ok(match a.data_type() {
        DataType::Null => Box::new(|_| Value::Null),
        DataType::Boolean => {
            let arr = a.as_boolean().clone();
            Box::new(move |r| Value::Bool(arr.value(r)))
        }
        DataType::Int8 => primitive!(a, Int8Type, Value::from),
        DataType::Int16 => primitive!(a, Int16Type, Value::from),
        DataType::Int32 => primitive!(a, Int32Type, Value::from),
        DataType::Int64 => primitive!(a, Int64Type, Value::from),
        DataType::UInt8 => primitive!(a, UInt8Type, Value::from),
        DataType::UInt16 => primitive!(a, UInt16Type, Value::from),
        DataType::UInt32 => primitive!(a, UInt32Type, Value::from),
        DataType::UInt64 => primitive!(a, UInt64Type, Value::from),
        DataType::Float16 => primitive!(a, Float16Type, |x: F16| float(x.to_f64())),
        DataType::Float32 => primitive!(a, Float32Type, |x: f32| float(x as f64)),
        DataType::Float64 => primitive!(a, Float64Type, float),
        DataType::Decimal128(_, scale) => {
            let div = 10f64.powi(*scale as i32);
            primitive!(a, Decimal128Type, move |x: i128| float(x as f64 / div))
        }
        DataType::Utf8 => {
            let arr = a.as_string::<i32>().clone();
            Box::new(move |r| Value::String(arr.value(r).to_string()))
        }
        DataType::LargeUtf8 => {
            let arr = a.as_string::<i64>().clone();
            Box::new(move |r| Value::String(arr.value(r).to_string()))
        }
        DataType::Utf8View => {
            let arr = a.as_string_view().clone();
            Box::new(move |r| Value::String(arr.value(r).to_string()))
        }
        DataType::Binary => {
            let arr = a.as_binary::<i32>().clone();
            Box::new(move |r| text_or_null(arr.value(r)))
        }
        DataType::LargeBinary => {
            let arr = a.as_binary::<i64>().clone();
            Box::new(move |r| text_or_null(arr.value(r)))
        }
        DataType::BinaryView => {
            let arr = a.as_binary_view().clone();
            Box::new(move |r| text_or_null(arr.value(r)))
        }
        DataType::FixedSizeBinary(_) => {
            let arr = a.as_fixed_size_binary().clone();
            Box::new(move |r| text_or_null(arr.value(r)))
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
            Box::new(move |r| object_of(&fields, r))
        }
        DataType::Map(_, _) => {
            let m = a.as_map().clone();
            if m.keys().data_type() != &DataType::Utf8 {
                return Err(format!(
                    "column {path:?}: map keys must be strings, got {}",
                    m.keys().data_type()
                ));
            }
            let keys = m.keys().as_string::<i32>().clone();
            let values = m.values().clone();
            let nulls = values.logical_nulls();
            let item = encoder(&values, &format!("{path}{{}}"))?;
            let offs = m.offsets().clone();
            Box::new(move |r| {
                let (s, e) = (offs[r] as usize, offs[r + 1] as usize);
                let map = (s..e)
                    .map(|i| {
                        let v = if is_null(&nulls, i) {
                            Value::Null
                        } else {
                            item(i)
                        };
                        (keys.value(i).to_string(), v)
                    })
                    .collect();
                Value::Object(map)
            })
        }
        DataType::Dictionary(_, _) => {
            let d = a.as_any_dictionary();
            let keys = d.normalized_keys();
            let item = encoder(d.values(), path)?;
            Box::new(move |r| item(keys[r]))
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
            fields,
            rows: batch.num_rows(),
        })
    }

    /// Rows in the batch.
    pub fn num_rows(&self) -> usize {
        self.rows
    }

    /// Row `r` as the JSON value of its record.
    pub fn row(&self, r: usize) -> Value {
        object_of(&self.fields, r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use arrow_array::builder::{
        Int32Builder, ListBuilder, MapBuilder, StringBuilder, StringDictionaryBuilder,
    };
    use arrow_array::{
        BinaryArray, BooleanArray, Float64Array, Int64Array, LargeStringArray, ListArray,
        StructArray, TimestampMillisecondArray,
    };
    use arrow_schema::Field as ArrowField;
    use serde_json::json;

    fn rows(batch: &RecordBatch) -> Vec<Value> {
        let enc = RowEncoder::new(batch).unwrap();
        (0..enc.num_rows()).map(|r| enc.row(r)).collect()
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
        assert!(enc.row(1).to_string().contains("\"f\":0.25"));
        assert_eq!(rows(&batch.slice(2, 1))[0], got[2]);
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
