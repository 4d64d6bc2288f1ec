//! NoETL's `output_select` (Python runtime, `result_handler.py`): pull a task's small fields
//! up beside its full data, so templates read them without the bulk. Pure; the worker stores
//! the bulk in the shared cache when it is over the inline budget.

pub use mayfly_types::at_path;
use serde_json::{Map, Value, json};

/// Longest string kept by a selected field (longer ones are cut, with `...`).
const MAX_STRING: usize = 500;
/// Budget of a preview's JSON.
const PREVIEW_BYTES: usize = 1024;

fn cut(v: &Value) -> Value {
    match v {
        Value::String(s) if s.chars().count() > MAX_STRING => Value::String(format!(
            "{}...",
            s.chars().take(MAX_STRING).collect::<String>()
        )),
        other => other.clone(),
    }
}

/// The selected fields, each under its path's last segment (`data.items[0].name` → `name`);
/// paths that hold nothing (or null) are left out.
pub fn select(data: &Value, paths: &[String]) -> Map<String, Value> {
    let mut out = Map::new();
    for p in paths {
        if let Some(v) = at_path(data, p).filter(|v| !v.is_null()) {
            let key = p
                .rsplit('.')
                .next()
                .unwrap_or(p)
                .split('[')
                .next()
                .unwrap_or(p);
            out.insert(key.to_owned(), cut(v));
        }
    }
    out
}

fn preview_item(v: &Value) -> Value {
    match v {
        Value::String(s) if s.chars().count() > 100 => {
            Value::String(format!("{}...", s.chars().take(100).collect::<String>()))
        }
        Value::Array(a) => Value::String(format!("[{} items]", a.len())),
        Value::Object(m) => Value::String(format!("{{{} keys}}", m.len())),
        other => other.clone(),
    }
}

/// A bounded look at a value (NoETL's `create_preview`): a record's first fields (values
/// shortened, `_truncated` once the budget is spent), a list's count and first three items,
/// anything else its text.
pub fn preview(data: &Value) -> Value {
    match data {
        Value::Object(m) => {
            let mut out = Map::new();
            let mut size = 2;
            for (k, v) in m {
                let item = preview_item(v);
                let n = json!({ k: item.clone() }).to_string().len();
                if size + n > PREVIEW_BYTES {
                    out.insert("_truncated".into(), Value::Bool(true));
                    break;
                }
                out.insert(k.clone(), item);
                size += n;
            }
            Value::Object(out)
        }
        Value::Array(a) => json!({
            "_type": "array",
            "_count": a.len(),
            "_sample": a.iter().take(3).map(preview_item).collect::<Vec<_>>(),
        }),
        other => {
            let text = match other {
                Value::String(s) => s.clone(),
                v => v.to_string(),
            };
            json!({"_value": text.chars().take(200).collect::<String>()})
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_index_lists_and_records() {
        let d = json!({"data": {"items": [{"name": "a"}, {"name": "b"}], "id": 7}, "status": "ok"});
        assert_eq!(at_path(&d, "data.items[1].name"), Some(&json!("b")));
        assert_eq!(at_path(&d, "data.items.0.name"), Some(&json!("a")));
        assert_eq!(at_path(&d, "status"), Some(&json!("ok")));
        assert_eq!(at_path(&d, "data.items[5].name"), None);
        assert_eq!(at_path(&d, "status.x"), None);
        let s = select(
            &d,
            &[
                "status".into(),
                "data.id".into(),
                "data.items[0].name".into(),
                "data.nope".into(),
            ],
        );
        assert_eq!(json!(s), json!({"status": "ok", "id": 7, "name": "a"}));
    }

    #[test]
    fn long_strings_are_cut_and_previews_bounded() {
        let long = "x".repeat(600);
        let s = select(&json!({ "t": long }), &["t".into()]);
        assert_eq!(s["t"].as_str().map(str::len), Some(503));
        let big: Map<String, Value> = (0..200)
            .map(|i| (format!("k{i:03}"), json!("v".repeat(20))))
            .collect();
        let p = preview(&Value::Object(big));
        assert_eq!(p["_truncated"], json!(true));
        assert!(p.to_string().len() <= PREVIEW_BYTES + 32, "{}", p);
        assert_eq!(
            preview(&json!([[1, 2], {"a": 1}, "s", 4])),
            json!({"_type": "array", "_count": 4, "_sample": ["[2 items]", "{1 keys}", "s"]})
        );
        assert_eq!(preview(&json!(42)), json!({"_value": "42"}));
    }
}
