//! `postgres`: `query` | `command` (one or several statements) with positional `params`
//! (`$1`, `$2`, …; a single statement then). The connection comes from the task's `auth`
//! credential (resolved from the keychain inside the worker), a `connection` object, a
//! `connection_string`, or `host/port/database/user/password` on the task; `schema` sets the
//! `search_path`.
//!
//! Result (NoETL's shape, the union of both runtimes): the last statement's
//! `{columns, rows, row_count}` when it returns rows (a `SELECT`, `WITH`, `VALUES`, `SHOW`,
//! `TABLE`, or anything with `RETURNING`), else `{affected_rows, row_count}`; plus
//! `command_<i>` with each statement's own result and `statement_count`. Several statements
//! without params run as one implicit transaction (Postgres' simple protocol), so a script
//! is all or nothing. Values: integers, floats and booleans are native, json/jsonb JSON,
//! numeric an exact decimal string, timestamptz RFC 3339, timestamp `YYYY-MM-DDTHH:MM:SS`,
//! date/time/uuid strings, bytea base64; other types their text (or null when Postgres
//! sends them in binary and they are not text).

use crate::egress::Guard;
use crate::{ToolError, ToolOutput};
use base64::Engine as _;
use futures_util::TryStreamExt;
use serde_json::{Map, Value, json};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow, PgValueFormat, PgValueRef};
use sqlx::{Column, Either, Executor, PgPool, Row, TypeInfo, ValueRef};
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
        .or(cred.get("connection_string"))
        .and_then(text)
        .or_else(|| cred.as_str().map(str::to_owned))
    {
        let o = PgConnectOptions::from_str(&dsn)
            .map_err(|_| "the connection string is not a valid postgres URL".to_owned())?;
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
    pub(crate) async fn pool(
        &self,
        cred: &Value,
        guard: &Guard,
        timeout: Duration,
    ) -> Result<PgPool, ToolError> {
        let (mut key, mut opts) = options(cred).map_err(|m| ToolError::new("bad_credential", m))?;
        if !guard.unrestricted() {
            // A socket path (or a host that is one) is the host's own Postgres.
            if let Some(sock) = opts.get_socket() {
                guard.local_socket(&sock.display().to_string())?;
            }
            let host = opts.get_host().to_owned();
            if host.starts_with('/') {
                guard.local_socket(&host)?;
            }
            // Connect to the address that was checked, not to the name again.
            if let Some(addrs) = guard.resolve(&host, opts.get_port()).await?
                && let Some(a) = addrs.first()
            {
                opts = opts.host(&a.ip().to_string());
                key.push_str(&format!("\u{0}{}", a.ip()));
            }
        }
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

/// Split a script on its top-level `;` (quotes, `$tag$` bodies and comments respected).
/// Empty statements are dropped.
pub fn split_statements(sql: &str) -> Vec<String> {
    let b = sql.as_bytes();
    let mut out = Vec::new();
    let (mut start, mut i) = (0usize, 0usize);
    while i < b.len() {
        match b[i] {
            b'\'' | b'"' => {
                let q = b[i];
                let escapes = q == b'\'' && i > 0 && matches!(b[i - 1], b'E' | b'e');
                i += 1;
                while i < b.len() {
                    if escapes && b[i] == b'\\' {
                        i += 2;
                        continue;
                    }
                    if b[i] == q {
                        if b.get(i + 1) == Some(&q) {
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    i += 1;
                }
                i += 1;
            }
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                    i += 1;
                }
                i += 2;
            }
            b'$' => {
                // `$tag$ … $tag$` (a `$1` parameter is not a tag).
                let tag_end = b[i + 1..]
                    .iter()
                    .position(|c| !(c.is_ascii_alphanumeric() || *c == b'_'))
                    .map(|p| i + 1 + p);
                match tag_end {
                    Some(e)
                        if b[e] == b'$' && !b[i + 1..e].first().is_some_and(u8::is_ascii_digit) =>
                    {
                        let tag = &sql[i..=e];
                        match sql[e + 1..].find(tag) {
                            Some(p) => i = e + 1 + p + tag.len(),
                            None => i = b.len(),
                        }
                    }
                    _ => i += 1,
                }
            }
            b';' => {
                let s = sql[start..i].trim();
                if !s.is_empty() {
                    out.push(s.to_owned());
                }
                i += 1;
                start = i;
            }
            _ => i += 1,
        }
    }
    let s = sql[start.min(sql.len())..].trim();
    if !s.is_empty() {
        out.push(s.to_owned());
    }
    out
}

/// Does this statement return rows (by its text, as NoETL classifies, plus `RETURNING`)?
fn returns_rows(stmt: &str) -> bool {
    let code: String = stmt
        .lines()
        .map(|l| l.split("--").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join(" ");
    let first = code
        .trim_start()
        .trim_start_matches('(')
        .split(|c: char| c.is_whitespace() || c == '(')
        .next()
        .unwrap_or("")
        .to_ascii_uppercase();
    matches!(
        first.as_str(),
        "SELECT" | "WITH" | "VALUES" | "SHOW" | "TABLE" | "EXPLAIN" | "FETCH"
    ) || code.to_ascii_uppercase().contains("RETURNING")
}

/// Days since 1970-01-01 → (y, m, d) (proleptic Gregorian; Howard Hinnant's algorithm).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Postgres' epoch (2000-01-01) in days after 1970-01-01.
const PG_EPOCH_DAYS: i64 = 10_957;

fn clock(us: i64) -> String {
    let (s, frac) = (us.div_euclid(1_000_000), us.rem_euclid(1_000_000));
    let t = format!("{:02}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60);
    if frac == 0 {
        t
    } else {
        format!("{t}.{}", format!("{frac:06}").trim_end_matches('0'))
    }
}

fn stamp(us: i64) -> String {
    let days = us.div_euclid(86_400_000_000);
    let (y, m, d) = civil(days + PG_EPOCH_DAYS);
    format!(
        "{y:04}-{m:02}-{d:02}T{}",
        clock(us.rem_euclid(86_400_000_000))
    )
}

/// Postgres' binary numeric → its exact decimal text.
fn numeric(b: &[u8]) -> Option<String> {
    let word = |i: usize| -> Option<u16> { Some(u16::from_be_bytes([*b.get(i)?, *b.get(i + 1)?])) };
    let (n, weight, sign, dscale) = (word(0)?, word(2)? as i16, word(4)?, word(6)?);
    if sign == 0xC000 {
        return Some("NaN".into());
    }
    let digits: Vec<u16> = (0..n as usize)
        .map(|i| word(8 + 2 * i))
        .collect::<Option<_>>()?;
    let mut int = String::new();
    for k in 0..=weight.max(-1) {
        let dg = digits.get(k as usize).copied().unwrap_or(0);
        if int.is_empty() {
            if dg != 0 {
                int = dg.to_string();
            }
        } else {
            int.push_str(&format!("{dg:04}"));
        }
    }
    if int.is_empty() {
        int.push('0');
    }
    let mut frac = String::new();
    let mut k = weight as i32 + 1;
    while frac.len() < dscale as usize {
        let dg = if k < 0 {
            0
        } else {
            digits.get(k as usize).copied().unwrap_or(0)
        };
        frac.push_str(&format!("{dg:04}"));
        k += 1;
    }
    frac.truncate(dscale as usize);
    let neg = if sign == 0x4000 { "-" } else { "" };
    Some(if frac.is_empty() {
        format!("{neg}{int}")
    } else {
        format!("{neg}{int}.{frac}")
    })
}

/// One column value as JSON (see the module docs for the mapping).
fn value(v: PgValueRef<'_>) -> Value {
    if v.is_null() {
        return Value::Null;
    }
    let ty = v.type_info().name().to_ascii_uppercase();
    match v.format() {
        PgValueFormat::Text => {
            let Ok(s) = v.as_str() else {
                return Value::Null;
            };
            match ty.as_str() {
                "BOOL" => Value::Bool(s == "t"),
                "INT2" | "INT4" | "INT8" | "OID" => {
                    s.parse::<i64>().map(Value::from).unwrap_or(Value::Null)
                }
                "FLOAT4" | "FLOAT8" => s
                    .parse::<f64>()
                    .ok()
                    .and_then(|f| serde_json::Number::from_f64(f).map(Value::Number))
                    .unwrap_or_else(|| Value::String(s.to_owned())),
                "JSON" | "JSONB" => serde_json::from_str(s).unwrap_or(Value::Null),
                "TIMESTAMPTZ" => {
                    let mut t = s.replacen(' ', "T", 1);
                    // `+00` → `+00:00` (RFC 3339 wants minutes in the offset).
                    let tail = t.len().saturating_sub(3);
                    if t.is_char_boundary(tail)
                        && matches!(t.as_bytes().get(tail), Some(b'+') | Some(b'-'))
                    {
                        t.push_str(":00");
                    }
                    Value::String(t)
                }
                "TIMESTAMP" => Value::String(s.replacen(' ', "T", 1)),
                "BYTEA" => match s.strip_prefix("\\x").map(hex::decode) {
                    Some(Ok(raw)) => {
                        Value::String(base64::engine::general_purpose::STANDARD.encode(raw))
                    }
                    _ => Value::String(s.to_owned()),
                },
                _ => Value::String(s.to_owned()),
            }
        }
        PgValueFormat::Binary => {
            let Ok(b) = v.as_bytes() else {
                return Value::Null;
            };
            let int = |n: usize| -> Option<i64> {
                let a = b.get(..n)?;
                Some(match n {
                    2 => i16::from_be_bytes(a.try_into().ok()?) as i64,
                    4 => i32::from_be_bytes(a.try_into().ok()?) as i64,
                    _ => i64::from_be_bytes(a.try_into().ok()?),
                })
            };
            let num = |f: Option<f64>| {
                f.and_then(serde_json::Number::from_f64)
                    .map(Value::Number)
                    .unwrap_or(Value::Null)
            };
            match ty.as_str() {
                "BOOL" => Value::Bool(b.first() == Some(&1)),
                "INT2" => int(2).map(Value::from).unwrap_or(Value::Null),
                "INT4" | "OID" => int(4).map(Value::from).unwrap_or(Value::Null),
                "INT8" => int(8).map(Value::from).unwrap_or(Value::Null),
                "FLOAT4" => num(b
                    .get(..4)
                    .and_then(|a| a.try_into().ok())
                    .map(|a| f32::from_be_bytes(a) as f64)),
                "FLOAT8" => num(b
                    .get(..8)
                    .and_then(|a| a.try_into().ok())
                    .map(f64::from_be_bytes)),
                "NUMERIC" => numeric(b).map(Value::String).unwrap_or(Value::Null),
                "JSON" => serde_json::from_slice(b).unwrap_or(Value::Null),
                "JSONB" => b
                    .get(1..)
                    .and_then(|j| serde_json::from_slice(j).ok())
                    .unwrap_or(Value::Null),
                "UUID" if b.len() == 16 => {
                    let h = hex::encode(b);
                    Value::String(format!(
                        "{}-{}-{}-{}-{}",
                        &h[..8],
                        &h[8..12],
                        &h[12..16],
                        &h[16..20],
                        &h[20..]
                    ))
                }
                "BYTEA" => Value::String(base64::engine::general_purpose::STANDARD.encode(b)),
                "DATE" => int(4)
                    .map(|d| {
                        let (y, m, dd) = civil(d + PG_EPOCH_DAYS);
                        Value::String(format!("{y:04}-{m:02}-{dd:02}"))
                    })
                    .unwrap_or(Value::Null),
                "TIME" => int(8)
                    .map(|u| Value::String(clock(u)))
                    .unwrap_or(Value::Null),
                "TIMESTAMP" => int(8)
                    .map(|u| Value::String(stamp(u)))
                    .unwrap_or(Value::Null),
                "TIMESTAMPTZ" => int(8)
                    .map(|u| Value::String(format!("{}+00:00", stamp(u))))
                    .unwrap_or(Value::Null),
                _ => match std::str::from_utf8(b) {
                    Ok(s) if !s.contains('\0') => Value::String(s.to_owned()),
                    _ => Value::Null,
                },
            }
        }
    }
}

/// One statement's rows and how many rows it affected.
#[derive(Default)]
struct Stmt {
    columns: Vec<String>,
    rows: Vec<Value>,
    affected: u64,
}

fn row_json(row: &PgRow, as_objects: bool, columns: &mut Vec<String>) -> Value {
    if columns.is_empty() {
        *columns = row.columns().iter().map(|c| c.name().to_owned()).collect();
    }
    let vals = (0..row.len()).map(|i| row.try_get_raw(i).map(value).unwrap_or(Value::Null));
    if as_objects {
        Value::Object(columns.iter().cloned().zip(vals).collect())
    } else {
        Value::Array(vals.collect())
    }
}

fn shape(stmt: &Stmt, rows_shape: bool) -> Value {
    if rows_shape {
        json!({
            "status": "success",
            "columns": stmt.columns,
            "rows": stmt.rows,
            "row_count": stmt.rows.len(),
        })
    } else {
        json!({
            "status": "success",
            "affected_rows": stmt.affected,
            "row_count": stmt.affected,
        })
    }
}

/// A script's result from its statements' shapes (postgres and duckdb alike): the last
/// statement's fields at the top, every statement as `command_<i>`, and `statement_count`.
pub(crate) fn assemble(shapes: Vec<Value>) -> Value {
    let mut out = Map::new();
    let n = shapes.len();
    let mut last = Value::Null;
    for (i, v) in shapes.into_iter().enumerate() {
        out.insert(format!("command_{i}"), v.clone());
        last = v;
    }
    if let Value::Object(m) = last {
        for (k, v) in m {
            if k != "status" {
                out.insert(k, v);
            }
        }
    }
    out.insert("statement_count".into(), json!(n));
    Value::Object(out)
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// The connection a task (or a transfer endpoint) names: its resolved `auth` credential,
/// else `connection` / `connection_string`, else its own host/user/database fields.
pub(crate) fn credential(auth: Option<&Value>, config: &Map<String, Value>) -> Option<Value> {
    let direct = ["host", "user", "username", "database", "dbname"]
        .iter()
        .any(|k| config.contains_key(*k));
    auth.filter(|v| !v.is_null())
        .or(config.get("connection"))
        .or(config.get("connection_string"))
        .cloned()
        .or_else(|| direct.then(|| Value::Object(config.clone())))
}

pub async fn run(
    pools: &Pools,
    guard: &Guard,
    config: &Map<String, Value>,
    input: &Map<String, Value>,
    timeout: Duration,
) -> ToolOutput {
    let Some(cred) = credential(input.get("auth"), config) else {
        return bad(
            "postgres needs `auth: <keychain alias>` (or `connection`, `connection_string`, or host/user/database)",
        );
    };
    let params: Vec<Value> = match config.get("params").or(config.get("parameters")) {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a.clone(),
        Some(other) => vec![other.clone()],
    };
    let as_objects = !matches!(config.get("as_objects"), Some(Value::Bool(false)));
    let Some(sql) = config
        .get("query")
        .or(config.get("command"))
        .or(config.get("sql"))
        .and_then(Value::as_str)
    else {
        return bad("postgres needs `query` or `command` (a string)");
    };
    let statements = split_statements(sql);
    if statements.is_empty() {
        return bad("postgres `query` has no statement");
    }
    if !params.is_empty() && statements.len() > 1 {
        return bad(format!(
            "`params` bind a single statement; the query has {} (run them as separate tasks, or without params)",
            statements.len()
        ));
    }
    let schema = config
        .get("schema")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let pool = match pools.pool(&cred, guard, timeout).await {
        Ok(p) => p,
        Err(e) => return ToolOutput::failed(e),
    };
    let work = async {
        let mut conn = pool.acquire().await?;
        if let Some(s) = &schema {
            // The session's search_path changes: this connection is not reused after.
            conn.close_on_drop();
            conn.execute(sqlx::AssertSqlSafe(format!(
                "SET search_path TO {}",
                quote_ident(s)
            )))
            .await?;
        }
        let mut done: Vec<Stmt> = Vec::new();
        let mut cur = Stmt::default();
        {
            let mut stream = if params.is_empty() {
                conn.fetch_many(sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned())))
            } else {
                conn.fetch_many(bind_all(
                    sqlx::query(sqlx::AssertSqlSafe(sql.to_owned())),
                    &params,
                ))
            };
            while let Some(item) = stream.try_next().await? {
                match item {
                    Either::Right(row) => {
                        let r = row_json(&row, as_objects, &mut cur.columns);
                        cur.rows.push(r);
                    }
                    Either::Left(res) => {
                        cur.affected = res.rows_affected();
                        done.push(std::mem::take(&mut cur));
                    }
                }
            }
        }
        Ok::<Vec<Stmt>, sqlx::Error>(done)
    };
    match tokio::time::timeout(timeout, work).await {
        Err(_) => ToolOutput::failed(ToolError::new(
            "timeout",
            format!("postgres exceeded {:.3}s", timeout.as_secs_f64()),
        )),
        Ok(Ok(done)) => {
            let shapes = done
                .iter()
                .enumerate()
                .map(|(i, st)| {
                    let text = statements.get(i).map(String::as_str).unwrap_or("");
                    shape(st, !st.rows.is_empty() || returns_rows(text))
                })
                .collect();
            ToolOutput::ok(assemble(shapes))
        }
        Ok(Err(e)) => {
            let mut sqlstate = None;
            let msg = match &e {
                sqlx::Error::Database(d) => {
                    sqlstate = d.code().map(|c| c.into_owned());
                    let mut m = format!(
                        "{} (SQLSTATE {})",
                        d.message(),
                        sqlstate.as_deref().unwrap_or_default()
                    );
                    if let Some(pg) = d.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
                        if let Some(detail) = pg.detail() {
                            m.push_str(&format!(" | DETAIL: {detail}"));
                        }
                        if let Some(hint) = pg.hint() {
                            m.push_str(&format!(" | HINT: {hint}"));
                        }
                    }
                    m
                }
                sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) => {
                    return ToolOutput::failed(ToolError::new(
                        "connection_failed",
                        format!("postgres: {e}"),
                    ));
                }
                other => other.to_string(),
            };
            let mut out = ToolOutput::failed(ToolError::new("postgres_error", msg));
            if let Some(s) = sqlstate {
                out.meta
                    .insert("pg".into(), json!({"sqlstate": s, "code": s}));
            }
            out
        }
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn statements_split_on_top_level_semicolons_only() {
        let s = "create table t(a text); insert into t values ('a;b'), (E'c\\';d');\n\
                 -- a comment; with a semicolon\n\
                 do $body$ begin perform 1; end $body$; select $1::int; ";
        let v = split_statements(s);
        assert_eq!(v.len(), 4, "{v:?}");
        assert!(v[1].ends_with("(E'c\\';d')"));
        assert!(v[2].contains("-- a comment; with a semicolon"));
        assert!(v[2].ends_with("end $body$"));
        assert_eq!(v[3], "select $1::int");
        assert_eq!(split_statements(" ; ;"), Vec::<String>::new());
    }

    #[test]
    fn row_returning_statements_are_classified_by_text() {
        assert!(returns_rows("SELECT 1"));
        assert!(returns_rows(
            "  with x as (insert into t values (1) returning *) select * from x"
        ));
        assert!(returns_rows("insert into t values (1) returning id"));
        assert!(returns_rows("(select 1)"));
        assert!(!returns_rows("insert into t values (1)"));
        assert!(!returns_rows("create table t(a int)"));
    }

    #[test]
    fn binary_numerics_dates_and_stamps_decode_exactly() {
        // 12.50: ndigits 2, weight 0, sign +, dscale 2, digits [12, 5000].
        let b = [0, 2, 0, 0, 0, 0, 0, 2, 0, 12, 0x13, 0x88];
        assert_eq!(numeric(&b).as_deref(), Some("12.50"));
        // -0.0001: ndigits 1, weight -1, sign -, dscale 4, digits [1].
        let b = [0, 1, 0xff, 0xff, 0x40, 0, 0, 4, 0, 1];
        assert_eq!(numeric(&b).as_deref(), Some("-0.0001"));
        // 100000: ndigits 1, weight 1, digits [10].
        let b = [0, 1, 0, 1, 0, 0, 0, 0, 0, 10];
        assert_eq!(numeric(&b).as_deref(), Some("100000"));
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(PG_EPOCH_DAYS), (2000, 1, 1));
        assert_eq!(civil(19_782), (2024, 2, 29));
        assert_eq!(stamp(1_500_000), "2000-01-01T00:00:01.5");
        assert_eq!(stamp(-1), "1999-12-31T23:59:59.999999");
    }
}
