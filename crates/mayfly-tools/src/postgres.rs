//! `postgres`: `query` (rows as a list of objects) or `command` (statements; multi-statement
//! allowed without params), with positional `params` ($1, $2, …). The connection comes from
//! the task's `auth` credential (resolved from the keychain inside the worker): either
//! `{dsn}` or `{host, port, user|username, password, database|dbname}`.
//!
//! Rows are converted by Postgres itself (`json_agg` over the query as a CTE), so every
//! column type arrives as faithful JSON and `INSERT … RETURNING` works as a query.

use crate::{ToolError, ToolOutput};
use serde_json::{Map, Value, json};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Executor, PgPool, Row};
use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

/// Pools by connection parameters (kept in memory only).
#[derive(Default)]
pub struct Pools {
    pools: Mutex<HashMap<String, PgPool>>,
}

fn bad(msg: impl Into<String>) -> ToolOutput {
    ToolOutput::failed(ToolError::new("bad_config", msg))
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn options(cred: &Value) -> Result<(String, PgConnectOptions), String> {
    if let Some(dsn) = cred
        .get("dsn")
        .or(cred.get("url"))
        .and_then(text)
        .or_else(|| cred.as_str().map(str::to_owned))
    {
        let o = PgConnectOptions::from_str(&dsn)
            .map_err(|_| "the credential's dsn is not a valid postgres URL".to_owned())?;
        return Ok((dsn, o));
    }
    let f = |k: &[&str]| k.iter().find_map(|k| cred.get(*k).and_then(text));
    let host = f(&["host", "hostname"]).unwrap_or_else(|| "127.0.0.1".into());
    let port: u16 = f(&["port"]).and_then(|p| p.parse().ok()).unwrap_or(5432);
    let user = f(&["user", "username"]).ok_or("the credential has no `user`")?;
    let db = f(&["database", "dbname", "db"]).unwrap_or_else(|| user.clone());
    let mut o = PgConnectOptions::new()
        .host(&host)
        .port(port)
        .username(&user)
        .database(&db);
    let password = f(&["password"]);
    if let Some(p) = &password {
        o = o.password(p);
    }
    let key = format!(
        "{host}\u{0}{port}\u{0}{user}\u{0}{db}\u{0}{}",
        password.unwrap_or_default()
    );
    Ok((key, o))
}

impl Pools {
    async fn pool(&self, cred: &Value, timeout: Duration) -> Result<PgPool, ToolError> {
        let (key, opts) = options(cred).map_err(|m| ToolError::new("bad_credential", m))?;
        if let Some(p) = self.pools.lock().ok().and_then(|m| m.get(&key).cloned()) {
            return Ok(p);
        }
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(timeout.min(Duration::from_secs(10)))
            .connect_with(opts)
            .await
            .map_err(|e| ToolError::new("connection_failed", format!("postgres: {e}")))?;
        if let Ok(mut m) = self.pools.lock() {
            m.insert(key, pool.clone());
        }
        Ok(pool)
    }
}

fn bind_all<'q>(
    mut q: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    params: &'q [Value],
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    for p in params {
        q = match p {
            Value::Null => q.bind(None::<String>),
            Value::Bool(b) => q.bind(*b),
            Value::Number(n) => match n.as_i64() {
                Some(i) => q.bind(i),
                None => q.bind(n.as_f64().unwrap_or(0.0)),
            },
            Value::String(s) => q.bind(s.as_str()),
            // Structured values travel as JSON text (cast with `$1::jsonb` in the SQL).
            other => q.bind(other.to_string()),
        };
    }
    q
}

pub async fn run(
    pools: &Pools,
    config: &Map<String, Value>,
    input: &Map<String, Value>,
    timeout: Duration,
) -> ToolOutput {
    let cred = input
        .get("auth")
        .filter(|v| !v.is_null())
        .or(config.get("connection"))
        .cloned();
    let Some(cred) = cred else {
        return bad("postgres needs `auth: <keychain alias>` (or a `connection` object)");
    };
    let params: Vec<Value> = match config.get("params").or(config.get("parameters")) {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a.clone(),
        Some(other) => vec![other.clone()],
    };
    let pool = match pools.pool(&cred, timeout).await {
        Ok(p) => p,
        Err(e) => return ToolOutput::failed(e),
    };
    let work = async {
        if let Some(sql) = config
            .get("query")
            .or(config.get("sql"))
            .and_then(Value::as_str)
        {
            let sql = sql.trim().trim_end_matches(';').trim();
            let wrapped = format!(
                "WITH __mayfly_q AS ({sql}) SELECT coalesce(json_agg(__mayfly_q), '[]'::json)::text AS rows FROM __mayfly_q"
            );
            let row = bind_all(sqlx::query(sqlx::AssertSqlSafe(wrapped)), &params)
                .fetch_one(&pool)
                .await?;
            let rows: String = row.try_get("rows")?;
            Ok::<Value, sqlx::Error>(serde_json::from_str(&rows).unwrap_or(Value::Null))
        } else if let Some(cmd) = config.get("command").and_then(Value::as_str) {
            let affected = if params.is_empty() {
                // Several statements (DDL scripts) are allowed without parameters.
                pool.execute(sqlx::raw_sql(sqlx::AssertSqlSafe(cmd.to_owned())))
                    .await?
                    .rows_affected()
            } else {
                bind_all(sqlx::query(sqlx::AssertSqlSafe(cmd.to_owned())), &params)
                    .execute(&pool)
                    .await?
                    .rows_affected()
            };
            Ok(json!({"rows_affected": affected}))
        } else {
            Err(sqlx::Error::Protocol(
                "postgres needs `query` or `command`".into(),
            ))
        }
    };
    match tokio::time::timeout(timeout, work).await {
        Err(_) => ToolOutput::failed(ToolError::new(
            "timeout",
            format!("postgres exceeded {:.3}s", timeout.as_secs_f64()),
        )),
        Ok(Ok(v)) => ToolOutput::ok(v),
        Ok(Err(sqlx::Error::Protocol(m))) => bad(m),
        Ok(Err(e)) => {
            let msg = match &e {
                sqlx::Error::Database(d) => format!(
                    "{} (SQLSTATE {})",
                    d.message(),
                    d.code().unwrap_or_default()
                ),
                other => other.to_string(),
            };
            ToolOutput::failed(ToolError::new("postgres_error", msg))
        }
    }
}
