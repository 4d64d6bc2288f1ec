//! The `transfer` tool (NoETL's): rows from a `source` (postgres query, http JSON) into a
//! postgres `target` table, in chunks, `mode: append | replace | upsert`. NoETL's result
//! shape: `{direction, source_type, target_type, mode, rows_transferred, chunks_processed,
//! target_table, columns}`.
//!
//! Unlike NoETL, the whole write is one transaction on the target: a failure in chunk 7
//! leaves the table as it was (NoETL's chunks commit one by one), and `replace` never
//! shows an empty table to readers. Values travel as text cast to the target column's
//! type (`$n::text::<type>`), so a JSON number lands in an `int4`, a decimal string in a
//! `numeric`, an object in a `jsonb`.

use crate::egress::Guard;
use crate::postgres::Pools;
use crate::{ToolError, ToolOutput};
use mayfly_types::at_path;
use serde_json::{Map, Value, json};
use sqlx::Row;
use std::time::Duration;

/// Postgres binds at most 65,535 parameters per statement.
const MAX_PARAMS: usize = 65_535;

fn bad(m: impl Into<String>) -> ToolError {
    ToolError::new("bad_config", m)
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// `schema.table` or `table`, each part quoted.
fn quote_table(t: &str) -> String {
    t.split('.').map(quote_ident).collect::<Vec<_>>().join(".")
}

/// A value as the text Postgres casts to the column's type (None for SQL NULL).
fn as_text(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        other => Some(other.to_string()),
    }
}

/// The credential of an endpoint (the worker has put the keychain value in its `auth`).
fn credential(ep: &Map<String, Value>) -> Option<Value> {
    crate::postgres::credential(ep.get("auth"), ep)
}

fn kind_of(ep: &Map<String, Value>) -> Option<&str> {
    ep.get("type")
        .or(ep.get("kind"))
        .or(ep.get("tool"))
        .and_then(Value::as_str)
}

pub async fn run(
    pools: &Pools,
    http: &crate::http::Clients,
    guard: &Guard,
    config: &Map<String, Value>,
    timeout: Duration,
) -> ToolOutput {
    match tokio::time::timeout(timeout, transfer(pools, http, guard, config, timeout)).await {
        Ok(Ok(v)) => ToolOutput::ok(v),
        Ok(Err(e)) => ToolOutput::failed(e),
        Err(_) => ToolOutput::failed(ToolError::new(
            "timeout",
            format!("transfer exceeded {:.3}s", timeout.as_secs_f64()),
        )),
    }
}

async fn transfer(
    pools: &Pools,
    http: &crate::http::Clients,
    guard: &Guard,
    config: &Map<String, Value>,
    timeout: Duration,
) -> Result<Value, ToolError> {
    let empty = Map::new();
    let source = config
        .get("source")
        .and_then(Value::as_object)
        .ok_or_else(|| bad("transfer needs `source` (a mapping with `type`)"))?;
    let target = config
        .get("target")
        .and_then(Value::as_object)
        .ok_or_else(|| bad("transfer needs `target` (a mapping with `type` and `table`)"))?;
    let source_type =
        kind_of(source).ok_or_else(|| bad("transfer `source.type`: postgres or http"))?;
    let target_type = kind_of(target).ok_or_else(|| bad("transfer `target.type`: postgres"))?;
    let mode = config
        .get("mode")
        .and_then(Value::as_str)
        .unwrap_or("append");
    if !matches!(mode, "append" | "replace" | "upsert") {
        return Err(bad(format!(
            "transfer `mode` `{mode}`: one of append, replace, upsert"
        )));
    }
    let chunk_size = match config.get("chunk_size") {
        None | Some(Value::Null) => 1000,
        Some(v) => v
            .as_u64()
            .filter(|n| *n > 0)
            .ok_or_else(|| bad("transfer `chunk_size` must be a positive integer"))?
            as usize,
    };

    // Read the source.
    let rows: Vec<Value> = match source_type {
        "postgres" => {
            let cred = credential(source).ok_or_else(|| {
                bad("transfer `source` (postgres) needs `auth: <alias>` or `connection`")
            })?;
            let query = source
                .get("query")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("transfer `source.query` is missing"))?;
            let mut cfg = Map::new();
            cfg.insert("query".into(), json!(query));
            cfg.insert("connection".into(), cred);
            let out = crate::postgres::run(pools, guard, &cfg, &empty, timeout).await;
            if let Some(e) = out.error {
                return Err(ToolError::new(
                    e.code,
                    format!("transfer source: {}", e.message),
                ));
            }
            out.data
                .get("rows")
                .and_then(Value::as_array)
                .cloned()
                .ok_or_else(|| {
                    ToolError::new(
                        "bad_config",
                        "transfer source: the query returns no rows (its last statement must be a SELECT)",
                    )
                })?
        }
        "http" => {
            let mut cfg = Map::new();
            for k in ["url", "method", "headers", "params"] {
                if let Some(v) = source.get(k) {
                    cfg.insert(k.into(), v.clone());
                }
            }
            if !cfg.contains_key("url") {
                return Err(bad("transfer `source` (http) needs `url`"));
            }
            let out = crate::http::run(http, guard, &cfg, timeout).await;
            if let Some(e) = out.error {
                return Err(ToolError::new(
                    e.code,
                    format!("transfer source: {}", e.message),
                ));
            }
            let body = out.data.get("data").cloned().unwrap_or(Value::Null);
            let path = source
                .get("data_path")
                .and_then(Value::as_str)
                .unwrap_or("");
            match at_path(&body, path) {
                Some(Value::Array(a)) => a.clone(),
                _ => {
                    return Err(ToolError::new(
                        "bad_config",
                        format!(
                            "transfer source: the response{} is not a list of records",
                            if path.is_empty() {
                                String::new()
                            } else {
                                format!(" at `{path}`")
                            }
                        ),
                    ));
                }
            }
        }
        other => {
            return Err(bad(format!(
                "transfer `source.type` `{other}` is not supported (postgres, http); for DuckDB, query with a duckdb task and hand its rows to a postgres task"
            )));
        }
    };
    if target_type != "postgres" {
        return Err(bad(format!(
            "transfer `target.type` `{target_type}` is not supported (postgres); to load rows into DuckDB, use a duckdb task with `tables:`"
        )));
    }
    let table = target
        .get("table")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("transfer `target.table` is missing"))?;
    let cred = credential(target)
        .ok_or_else(|| bad("transfer `target` needs `auth: <alias>` or `connection`"))?;

    // Columns: the first record's keys (renamed by `target.mapping: {source: target}`, which
    // then selects exactly the mapped columns).
    let first = match rows.first() {
        Some(Value::Object(m)) => m.clone(),
        Some(_) => return Err(bad("transfer source rows must be records (objects)")),
        None => Map::new(),
    };
    let mapping: Vec<(String, String)> = match target.get("mapping") {
        None | Some(Value::Null) => first.keys().map(|k| (k.clone(), k.clone())).collect(),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(s, t)| {
                t.as_str()
                    .map(|t| (s.clone(), t.to_owned()))
                    .ok_or_else(|| bad("transfer `target.mapping` values must be column names"))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(bad(
                "transfer `target.mapping` must map source columns to target columns",
            ));
        }
    };
    let key: Vec<String> = match target.get("key").or(target.get("conflict_columns")) {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<_>>()
            .ok_or_else(|| bad("transfer `target.key` must name columns"))?,
        Some(_) => return Err(bad("transfer `target.key` must name columns")),
    };
    if mode == "upsert" && key.is_empty() {
        return Err(bad(
            "transfer `mode: upsert` needs `target.key` (the conflict columns)",
        ));
    }
    let columns: Vec<String> = mapping.iter().map(|(_, t)| t.clone()).collect();
    let result = |n: usize, chunks: usize| {
        json!({
            "status": "success",
            "direction": format!("{source_type}_to_{target_type}"),
            "source_type": source_type,
            "target_type": target_type,
            "mode": mode,
            "rows_transferred": n,
            "chunks_processed": chunks,
            "target_table": table,
            "columns": columns,
        })
    };

    let pool = pools.pool(&cred, guard, timeout).await?;
    let db = |e: sqlx::Error| {
        let mut m = format!("transfer target: {e}");
        if let sqlx::Error::Database(d) = &e
            && let Some(c) = d.code()
        {
            m.push_str(&format!(" (SQLSTATE {c})"));
        }
        ToolError::new("postgres_error", m)
    };
    let mut tx = pool.begin().await.map_err(db)?;
    // The target's column types: each value is cast to its column's type.
    let (schema, name) = match table.split_once('.') {
        Some((s, n)) => (Some(s), n),
        None => (None, table),
    };
    let types: std::collections::HashMap<String, String> = sqlx::query(
        "select a.attname::text, format_type(a.atttypid, a.atttypmod) \
         from pg_attribute a join pg_class c on c.oid = a.attrelid \
         join pg_namespace n on n.oid = c.relnamespace \
         where c.relname = $1 and n.nspname = coalesce($2, current_schema()) \
         and a.attnum > 0 and not a.attisdropped",
    )
    .bind(name)
    .bind(schema)
    .fetch_all(&mut *tx)
    .await
    .map_err(db)?
    .into_iter()
    .map(|r| (r.get::<String, _>(0), r.get::<String, _>(1)))
    .collect();
    if types.is_empty() {
        return Err(ToolError::new(
            "postgres_error",
            format!("transfer target: table `{table}` does not exist"),
        ));
    }
    if let Some(c) = columns.iter().find(|c| !types.contains_key(*c)) {
        return Err(bad(format!(
            "transfer target table `{table}` has no column `{c}`"
        )));
    }
    if mode == "replace" {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM {}",
            quote_table(table)
        )))
        .execute(&mut *tx)
        .await
        .map_err(db)?;
    }
    if rows.is_empty() {
        tx.commit().await.map_err(db)?;
        return Ok(result(0, 0));
    }
    let per_chunk = chunk_size.min(MAX_PARAMS / columns.len().max(1)).max(1);
    let cols_sql = columns
        .iter()
        .map(|c| quote_ident(c))
        .collect::<Vec<_>>()
        .join(", ");
    let conflict = if mode == "upsert" {
        let updates: Vec<String> = columns
            .iter()
            .filter(|c| !key.contains(c))
            .map(|c| format!("{0} = EXCLUDED.{0}", quote_ident(c)))
            .collect();
        let keys = key
            .iter()
            .map(|c| quote_ident(c))
            .collect::<Vec<_>>()
            .join(", ");
        if updates.is_empty() {
            format!(" ON CONFLICT ({keys}) DO NOTHING")
        } else {
            format!(" ON CONFLICT ({keys}) DO UPDATE SET {}", updates.join(", "))
        }
    } else {
        String::new()
    };
    let mut chunks = 0;
    for chunk in rows.chunks(per_chunk) {
        let mut values = Vec::with_capacity(chunk.len());
        let mut params: Vec<Option<String>> = Vec::with_capacity(chunk.len() * columns.len());
        for row in chunk {
            let Value::Object(r) = row else {
                return Err(bad("transfer source rows must be records (objects)"));
            };
            let mut slots = Vec::with_capacity(columns.len());
            for (src, dst) in &mapping {
                params.push(r.get(src).and_then(as_text));
                slots.push(format!("${}::text::{}", params.len(), types[dst]));
            }
            values.push(format!("({})", slots.join(", ")));
        }
        let sql = format!(
            "INSERT INTO {} ({cols_sql}) VALUES {}{conflict}",
            quote_table(table),
            values.join(", ")
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for p in params {
            q = q.bind(p);
        }
        q.execute(&mut *tx).await.map_err(db)?;
        chunks += 1;
    }
    tx.commit().await.map_err(db)?;
    Ok(result(rows.len(), chunks))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_quoting() {
        let v = json!({"data": {"items": [{"a": 1}]}});
        assert_eq!(at_path(&v, "data.items.0.a"), Some(&json!(1)));
        assert_eq!(at_path(&v, ""), Some(&v));
        assert_eq!(at_path(&v, "data.nope"), None);
        assert_eq!(quote_table("s.t\"x"), "\"s\".\"t\"\"x\"");
        assert_eq!(as_text(&json!({"k": 1})).as_deref(), Some("{\"k\":1}"));
        assert_eq!(as_text(&Value::Null), None);
    }
}
