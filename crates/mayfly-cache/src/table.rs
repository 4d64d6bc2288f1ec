//! Table-shaped values ↔ Arrow IPC.
//!
//! A value is *table-shaped* when it is a non-empty list of flat records that all have the
//! same keys and whose columns each hold one scalar type (nulls allowed). Only such values
//! are encoded as Arrow, and the rules make the round trip exact: decoding yields the very
//! same JSON value (integers stay integers, explicit nulls stay, no key is added or lost).

use arrow_array::{
    Array, ArrayRef, BooleanArray, Float64Array, Int64Array, NullArray, RecordBatch, StringArray,
};
use arrow_schema::{DataType, Field, Schema};
use serde_json::{Map, Number, Value};
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Col {
    Null,
    Bool,
    Int,
    Float,
    Str,
}

impl Col {
    fn of(v: &Value) -> Option<Col> {
        Some(match v {
            Value::Null => Col::Null,
            Value::Bool(_) => Col::Bool,
            Value::Number(n) if n.is_i64() => Col::Int,
            Value::Number(n) if n.is_f64() => Col::Float,
            Value::String(_) => Col::Str,
            // u64 above i64::MAX, nested lists and records: not a flat table.
            _ => return None,
        })
    }

    fn data_type(self) -> DataType {
        match self {
            Col::Null => DataType::Null,
            Col::Bool => DataType::Boolean,
            Col::Int => DataType::Int64,
            Col::Float => DataType::Float64,
            Col::Str => DataType::Utf8,
        }
    }
}

/// The columns of a table-shaped value, or None when it is not one.
fn shape(v: &Value) -> Option<Vec<(&str, Col)>> {
    let rows = v.as_array()?;
    let first = rows.first()?.as_object()?;
    if first.is_empty() {
        return None;
    }
    let mut cols: Vec<(&str, Col)> = first.keys().map(|k| (k.as_str(), Col::Null)).collect();
    for row in rows {
        let row = row.as_object()?;
        if row.len() != cols.len() {
            return None;
        }
        for (name, col) in cols.iter_mut() {
            let t = Col::of(row.get(*name)?)?;
            match (*col, t) {
                (_, Col::Null) => {}
                (Col::Null, t) => *col = t,
                (c, t) if c == t => {}
                _ => return None,
            }
        }
    }
    Some(cols)
}

/// True when `v` would be stored as an Arrow table.
pub fn is_table(v: &Value) -> bool {
    shape(v).is_some()
}

/// Encode a table-shaped value as an Arrow IPC stream; returns the bytes and column names.
/// None when the value is not table-shaped.
pub fn encode(v: &Value) -> Option<(Vec<u8>, Vec<String>)> {
    let cols = shape(v)?;
    let rows = v.as_array()?;
    let cell = |row: &Value, name: &str| row.get(name).cloned().unwrap_or(Value::Null);
    let mut fields = Vec::with_capacity(cols.len());
    let mut arrays: Vec<ArrayRef> = Vec::with_capacity(cols.len());
    for (name, col) in &cols {
        fields.push(Field::new(*name, col.data_type(), true));
        let values = rows.iter().map(|r| cell(r, name));
        let array: ArrayRef = match col {
            Col::Null => Arc::new(NullArray::new(rows.len())),
            Col::Bool => Arc::new(values.map(|v| v.as_bool()).collect::<BooleanArray>()),
            Col::Int => Arc::new(values.map(|v| v.as_i64()).collect::<Int64Array>()),
            Col::Float => Arc::new(values.map(|v| v.as_f64()).collect::<Float64Array>()),
            Col::Str => Arc::new(
                rows.iter()
                    .map(|r| r.get(*name).and_then(Value::as_str))
                    .collect::<StringArray>(),
            ),
        };
        arrays.push(array);
    }
    let schema = Arc::new(Schema::new(fields));
    let batch = RecordBatch::try_new(schema.clone(), arrays).ok()?;
    let mut out = Vec::new();
    let mut w = arrow_ipc::writer::StreamWriter::try_new(&mut out, &schema).ok()?;
    w.write(&batch).ok()?;
    w.finish().ok()?;
    drop(w);
    Some((out, cols.iter().map(|(n, _)| (*n).to_owned()).collect()))
}

/// Decode an Arrow IPC stream (every batch) back into a list of records.
pub fn decode(bytes: &[u8]) -> Result<Value, String> {
    let reader = arrow_ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None)
        .map_err(|e| format!("arrow: {e}"))?;
    let mut rows = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| format!("arrow: {e}"))?;
        let schema = batch.schema();
        let mut out: Vec<Map<String, Value>> = vec![Map::new(); batch.num_rows()];
        for (field, col) in schema.fields().iter().zip(batch.columns()) {
            for (i, row) in out.iter_mut().enumerate() {
                row.insert(field.name().clone(), cell(col.as_ref(), i)?);
            }
        }
        rows.extend(out.into_iter().map(Value::Object));
    }
    Ok(Value::Array(rows))
}

fn cell(col: &dyn Array, i: usize) -> Result<Value, String> {
    if col.is_null(i) {
        return Ok(Value::Null);
    }
    let any = col.as_any();
    let v = match col.data_type() {
        DataType::Null => Some(Value::Null),
        DataType::Boolean => any
            .downcast_ref::<BooleanArray>()
            .map(|a| Value::Bool(a.value(i))),
        DataType::Int64 => any
            .downcast_ref::<Int64Array>()
            .map(|a| Value::from(a.value(i))),
        DataType::Float64 => any
            .downcast_ref::<Float64Array>()
            .and_then(|a| Number::from_f64(a.value(i)))
            .map(Value::Number),
        DataType::Utf8 => any
            .downcast_ref::<StringArray>()
            .map(|a| Value::String(a.value(i).to_owned())),
        other => return Err(format!("arrow: unsupported column type {other}")),
    };
    v.ok_or_else(|| format!("arrow: malformed {} column", col.data_type()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn round_trip(v: Value) {
        let (bytes, cols) = encode(&v).expect("table-shaped");
        assert!(!cols.is_empty());
        assert_eq!(decode(&bytes).expect("decodes"), v);
    }

    #[test]
    fn tables_round_trip_exactly() {
        round_trip(json!([{"id": 1, "name": "a", "score": 1.5, "ok": true, "note": null}]));
        round_trip(json!([
            {"id": 1, "name": "a", "score": 1.0, "ok": true, "note": null},
            {"id": -7, "name": null, "score": null, "ok": null, "note": null},
            {"id": i64::MAX, "name": "ünïcode", "score": -0.25, "ok": false, "note": null},
        ]));
        let big: Vec<Value> = (0..5000)
            .map(|i| json!({"n": i, "s": format!("row {i}"), "f": i as f64 / 3.0}))
            .collect();
        round_trip(Value::Array(big));
    }

    #[test]
    fn non_tables_are_refused() {
        for v in [
            json!([]),
            json!({}),
            json!([{}]),
            json!([1, 2]),
            json!([{"a": 1}, {"b": 1}]),
            json!([{"a": 1}, {"a": 1, "b": 2}]),
            json!([{"a": 1}, {"a": "x"}]),
            json!([{"a": 1}, {"a": 1.5}]),
            json!([{"a": [1]}]),
            json!([{"a": {"b": 1}}]),
            json!([{"a": u64::MAX}]),
            json!([{"a": 1}, 2]),
        ] {
            assert!(encode(&v).is_none(), "{v} is not a table");
            assert!(!is_table(&v));
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(decode(b"not arrow").is_err());
        assert!(decode(b"").is_err() || decode(b"").is_ok_and(|v| v == json!([])));
    }
}
