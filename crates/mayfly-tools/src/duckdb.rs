//! The `duckdb` tool: NoETL's contract (`query`/`command`, `params`, `db_path`,
//! `as_objects`; postgres' result shape) plus `tables:`, records handed in as temporary
//! tables. DuckDB runs in the python pool through its prebuilt Python package: building
//! DuckDB's C++ from source (the `duckdb` crate's `bundled` feature) compiles ~2,100
//! translation units, about three hours on 2 cores, and an interpreter of the pool is
//! contained the way python steps are (SQL such as `read_text('/etc/passwd')` reads what
//! the step could read, no more).

use crate::python::PythonPool;
use crate::{ToolError, ToolOutput};
use serde_json::{Map, Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const DRIVER: &str = include_str!("duckdb_driver.py");

/// One writer per database file in this process: DuckDB locks a file to one process, and
/// two interpreters of the pool are two processes.
#[derive(Default)]
pub struct Locks(Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl Locks {
    fn of(&self, path: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(path.to_owned()).or_default().clone()
    }
}

fn bad(m: impl Into<String>) -> ToolOutput {
    ToolOutput::failed(ToolError::new("bad_config", m))
}

/// A table name DuckDB takes unquoted and a template cannot smuggle SQL through.
fn ident(s: &str) -> bool {
    s.chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

pub async fn run(
    py: &PythonPool,
    locks: &Locks,
    config: &Map<String, Value>,
    timeout: Duration,
) -> ToolOutput {
    let Some(sql) = ["query", "command", "commands", "sql"]
        .iter()
        .find_map(|k| config.get(*k))
    else {
        return bad("duckdb needs `query` (or `command`, `commands`, `sql`)");
    };
    let Some(sql) = sql.as_str() else {
        return bad("duckdb `query` must be a string");
    };
    let params = match config.get("params").or(config.get("parameters")) {
        None | Some(Value::Null) => Value::Null,
        Some(Value::Array(a)) if a.is_empty() => Value::Null,
        Some(v @ (Value::Array(_) | Value::Object(_))) => v.clone(),
        Some(other) => json!([other]),
    };
    let db_path = match config
        .get("db_path")
        .or(config.get("database"))
        .or(config.get("db"))
    {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() || s == ":memory:" => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return bad("duckdb `db_path` must be a string"),
    };
    let as_objects = match config.get("as_objects") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => return bad("duckdb `as_objects` must be true or false"),
    };
    let tables = match config.get("tables") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => {
            return bad("duckdb `tables` must map table names to lists of records");
        }
    };
    for (name, rows) in &tables {
        if !ident(name) {
            return bad(format!(
                "duckdb table name `{name}` must be an identifier (letters, digits, _)"
            ));
        }
        match rows.as_array() {
            Some(r) if r.is_empty() => {
                return bad(format!(
                    "duckdb table `{name}` has no rows: DuckDB cannot infer its columns"
                ));
            }
            Some(r) if r.iter().all(Value::is_object) => {}
            _ => {
                return bad(format!(
                    "duckdb table `{name}` must be a list of records (objects)"
                ));
            }
        }
    }
    let input = json!({
        "sql": sql,
        "params": params,
        "db_path": db_path,
        "as_objects": as_objects,
        "tables": tables,
    });
    let lock = db_path.as_deref().map(|p| locks.of(p));
    let _held = match &lock {
        Some(l) => Some(l.lock().await),
        None => None,
    };
    let out = py.run(DRIVER, &input, timeout).await;
    if !out.ok {
        return out;
    }
    let data = out.data;
    match data.get("__mayfly_duckdb__").and_then(Value::as_str) {
        Some("ok") => {
            let shapes = data
                .get("statements")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            ToolOutput::ok(crate::postgres::assemble(shapes))
        }
        Some("unavailable") => ToolOutput::failed(ToolError::new(
            "tool_unavailable",
            format!(
                "the duckdb tool runs DuckDB's Python package, which {} cannot import ({}); install it with `{} -m pip install duckdb`",
                data.get("python")
                    .and_then(Value::as_str)
                    .unwrap_or("python3"),
                data.get("message").and_then(Value::as_str).unwrap_or(""),
                data.get("python")
                    .and_then(Value::as_str)
                    .unwrap_or("python3"),
            ),
        )),
        _ => {
            let ty = data.get("type").and_then(Value::as_str).unwrap_or("Error");
            let msg = data.get("message").and_then(Value::as_str).unwrap_or("");
            let mut o = ToolOutput::failed(ToolError::new("duckdb_error", format!("{ty}: {msg}")));
            o.meta.insert("duckdb".into(), json!({"exception": ty}));
            o
        }
    }
}
