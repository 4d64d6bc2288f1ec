//! The `nats` tool (NoETL's operations and result shapes): key-value (`kv_get`, `kv_put`,
//! `kv_delete`, `kv_keys`, `kv_purge`), object store (`object_get`, `object_put`,
//! `object_delete`, `object_list`, `object_info`), JetStream (`js_publish`, `js_consume`,
//! `js_get_msg`, `js_stream_info`), and core NATS `publish` and `request` (mayfly's).
//!
//! Nothing waits unbounded: `js_consume` is one pull of at most 1,000 messages for at most
//! 5 s (NoETL's caps), `request` waits at most the task's timeout, and every operation runs
//! under the task's timeout. Connections are kept per server and credential.

use crate::egress::Guard;
use crate::{ToolError, ToolOutput};
use async_nats::jetstream;
use base64::Engine as _;
use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::{Map, Value, json};
use std::collections::HashMap;
use std::time::Duration;
use tokio::io::AsyncReadExt;

const CONSUME_BATCH_MAX: u64 = 1000;
const CONSUME_BATCH_DEFAULT: u64 = 100;
const CONSUME_WAIT_MAX_MS: u64 = 5_000;
const CONSUME_WAIT_DEFAULT_MS: u64 = 1_000;

pub const OPERATIONS: &[&str] = &[
    "kv_get",
    "kv_put",
    "kv_delete",
    "kv_keys",
    "kv_purge",
    "object_get",
    "object_put",
    "object_delete",
    "object_list",
    "object_info",
    "js_publish",
    "js_consume",
    "js_get_msg",
    "js_stream_info",
    "publish",
    "request",
];

/// Connections by (url, user, password, token): a fan-out of nats steps shares one.
#[derive(Default)]
pub struct Clients(tokio::sync::Mutex<HashMap<Conn, async_nats::Client>>);

#[derive(Clone, Hash, PartialEq, Eq)]
struct Conn {
    url: String,
    user: Option<String>,
    password: Option<String>,
    token: Option<String>,
    /// Checked by an egress policy: the client must not follow advertised servers.
    pinned: bool,
}

impl Clients {
    async fn get(&self, c: &Conn, timeout: Duration) -> Result<async_nats::Client, ToolError> {
        let mut m = self.0.lock().await;
        if let Some(client) = m.get(c)
            && client.connection_state() != async_nats::connection::State::Disconnected
        {
            return Ok(client.clone());
        }
        let mut opts = async_nats::ConnectOptions::new()
            .connection_timeout(timeout.min(Duration::from_secs(10)))
            // A step fails fast on a dead server instead of queueing behind reconnects.
            .max_reconnects(Some(1));
        if c.pinned {
            // Only the servers the task named (and its egress policy checked).
            opts = opts.ignore_discovered_servers();
        }
        if let Some(t) = &c.token {
            opts = opts.token(t.clone());
        } else if let (Some(u), Some(p)) = (&c.user, &c.password) {
            opts = opts.user_and_password(u.clone(), p.clone());
        }
        let client = opts.connect(c.url.as_str()).await.map_err(|e| {
            ToolError::new(
                "connection_failed",
                format!("nats: cannot connect to {}: {e}", c.url),
            )
        })?;
        m.insert(c.clone(), client.clone());
        Ok(client)
    }
}

/// Under an egress policy: each server of `url` (comma-separated, `nats://` by default,
/// port 4222) resolved, checked, and replaced by the address that passed; the client is
/// also told not to follow servers the cluster advertises (see `Clients::get`).
async fn pinned(guard: &Guard, url: &str) -> Result<String, ToolError> {
    if guard.unrestricted() {
        return Ok(url.to_owned());
    }
    let mut out = Vec::new();
    for server in url.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let full = if server.contains("://") {
            server.to_owned()
        } else {
            format!("nats://{server}")
        };
        let mut u = reqwest::Url::parse(&full)
            .map_err(|e| bad(format!("nats `url` `{server}` is not a url: {e}")))?;
        let host = u
            .host_str()
            .ok_or_else(|| bad(format!("nats `url` `{server}` has no host")))?
            .to_owned();
        let port = u.port().unwrap_or(4222);
        if let Some(addrs) = guard.resolve(&host, port).await?
            && let Some(a) = addrs.first()
        {
            u.set_ip_host(a.ip())
                .map_err(|_| bad(format!("nats `url` `{server}` cannot take an address")))?;
            let _ = u.set_port(Some(port));
        }
        out.push(u.to_string().trim_end_matches('/').to_owned());
    }
    Ok(out.join(","))
}

fn bad(m: impl Into<String>) -> ToolError {
    ToolError::new("bad_config", m)
}

fn failed(op: &str, e: impl std::fmt::Display) -> ToolError {
    ToolError::new("nats_error", format!("nats {op}: {e}"))
}

fn str_field<'a>(cfg: &'a Map<String, Value>, k: &str) -> Option<&'a str> {
    cfg.get(k).and_then(Value::as_str)
}

fn need<'a>(cfg: &'a Map<String, Value>, k: &str, op: &str) -> Result<&'a str, ToolError> {
    str_field(cfg, k).ok_or_else(|| bad(format!("nats `{op}` needs `{k}` (a string)")))
}

fn uint(cfg: &Map<String, Value>, k: &str) -> Result<Option<u64>, ToolError> {
    match cfg.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
            .map(Some)
            .ok_or_else(|| bad(format!("nats `{k}` must be a non-negative integer"))),
    }
}

/// A value as message bytes: a string as its text, anything else as JSON (NoETL).
fn payload(v: Option<&Value>) -> Bytes {
    match v {
        None | Some(Value::Null) => Bytes::new(),
        Some(Value::String(s)) => Bytes::from(s.clone()),
        Some(other) => Bytes::from(other.to_string()),
    }
}

/// Message bytes as a value: JSON when they parse, else the text (NoETL).
fn decode(b: &[u8]) -> Value {
    let text = String::from_utf8_lossy(b);
    serde_json::from_str(&text).unwrap_or_else(|_| Value::String(text.into_owned()))
}

fn headers(cfg: &Map<String, Value>) -> Result<Option<async_nats::HeaderMap>, ToolError> {
    match cfg.get("headers") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => {
            let mut h = async_nats::HeaderMap::new();
            for (k, v) in m {
                let v = v
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| v.to_string());
                h.insert(k.as_str(), v.as_str());
            }
            Ok(Some(h))
        }
        Some(_) => Err(bad("nats `headers` must be a mapping")),
    }
}

fn headers_json(h: Option<&async_nats::HeaderMap>) -> Value {
    let mut out = Map::new();
    if let Some(h) = h {
        for (k, vs) in h.iter() {
            let vs: Vec<Value> = vs.iter().map(|v| Value::String(v.to_string())).collect();
            out.insert(
                k.to_string(),
                if vs.len() == 1 {
                    vs.into_iter().next().unwrap_or(Value::Null)
                } else {
                    Value::Array(vs)
                },
            );
        }
    }
    Value::Object(out)
}

/// `*` and `>`-free glob over KV keys: `*` matches any run of characters.
fn glob(pattern: &str, s: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == s;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !s.starts_with(first) || s.len() < first.len() + last.len() || !s.ends_with(last) {
        return false;
    }
    let mut rest = &s[first.len()..s.len() - last.len()];
    for p in &parts[1..parts.len() - 1] {
        match rest.find(p) {
            Some(i) => rest = &rest[i + p.len()..],
            None => return false,
        }
    }
    true
}

pub async fn run(
    clients: &Clients,
    guard: &Guard,
    config: &Map<String, Value>,
    input: &Map<String, Value>,
    timeout: Duration,
) -> ToolOutput {
    match tokio::time::timeout(timeout, run_op(clients, guard, config, input, timeout)).await {
        Ok(Ok(v)) => ToolOutput::ok(v),
        Ok(Err(e)) => ToolOutput::failed(e),
        Err(_) => ToolOutput::failed(ToolError::new(
            "timeout",
            format!("nats exceeded {:.3}s", timeout.as_secs_f64()),
        )),
    }
}

async fn run_op(
    clients: &Clients,
    guard: &Guard,
    cfg: &Map<String, Value>,
    input: &Map<String, Value>,
    timeout: Duration,
) -> Result<Value, ToolError> {
    let op = need(cfg, "operation", "tool")?;
    if !OPERATIONS.contains(&op) {
        return Err(bad(format!(
            "unknown nats `operation` `{op}` (one of {})",
            OPERATIONS.join(", ")
        )));
    }
    // The connection: `auth: <alias>` (a keychain credential `{url, user?, password?,
    // token?}`, resolved by the worker into the input), else the task's own fields.
    let cred = input.get("auth").filter(|v| v.is_object());
    let pick = |k: &str, alt: &str| {
        cred.and_then(|c| c.get(k).or(c.get(alt)))
            .or(cfg.get(k))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let Some(url) = pick("url", "nats_url") else {
        return Err(bad(
            "nats needs `url` (or `auth: <alias>` of a credential with `url`)",
        ));
    };
    let url = pinned(guard, &url).await?;
    let conn = Conn {
        pinned: !guard.unrestricted(),
        url,
        user: pick("user", "username"),
        password: pick("password", "password"),
        token: pick("token", "token"),
    };
    let client = clients.get(&conn, timeout).await?;
    match op {
        "publish" => {
            let subject = need(cfg, "subject", op)?.to_owned();
            let body = payload(cfg.get("data").or(cfg.get("value")));
            let r = match headers(cfg)? {
                Some(h) => client.publish_with_headers(subject.clone(), h, body).await,
                None => client.publish(subject.clone(), body).await,
            };
            r.map_err(|e| failed(op, e))?;
            client.flush().await.map_err(|e| failed(op, e))?;
            return Ok(json!({"status": "success", "subject": subject}));
        }
        "request" => {
            let subject = need(cfg, "subject", op)?.to_owned();
            let body = payload(cfg.get("data").or(cfg.get("value")));
            let req = async_nats::Request::new()
                .payload(body)
                .timeout(Some(timeout));
            let req = match headers(cfg)? {
                Some(h) => req.headers(h),
                None => req,
            };
            let msg = client
                .send_request(subject.clone(), req)
                .await
                .map_err(|e| {
                    use async_nats::RequestErrorKind as K;
                    match e.kind() {
                        K::TimedOut => ToolError::new(
                            "timeout",
                            format!("nats request to `{subject}` got no reply"),
                        ),
                        K::NoResponders => ToolError::new(
                            "not_found",
                            format!("nats request: no responders on `{subject}`"),
                        ),
                        _ => failed(op, e),
                    }
                })?;
            return Ok(json!({
                "status": "success",
                "subject": subject,
                "data": decode(&msg.payload),
                "headers": headers_json(msg.headers.as_ref()),
            }));
        }
        _ => {}
    }
    let js = jetstream::new(client);
    match op {
        "kv_get" | "kv_put" | "kv_delete" | "kv_purge" | "kv_keys" => {
            let bucket = need(cfg, "bucket", op)?;
            let kv = js
                .get_key_value(bucket)
                .await
                .map_err(|e| failed(op, format!("bucket `{bucket}`: {e}")))?;
            if op == "kv_keys" {
                let mut keys: Vec<String> = Vec::new();
                let mut s = kv.keys().await.map_err(|e| failed(op, e))?;
                while let Some(k) = s.next().await {
                    let k = k.map_err(|e| failed(op, e))?;
                    if str_field(cfg, "pattern").is_none_or(|p| glob(p, &k)) {
                        keys.push(k);
                    }
                }
                keys.sort();
                return Ok(
                    json!({"status": "success", "bucket": bucket, "keys": keys, "count": keys.len()}),
                );
            }
            let key = need(cfg, "key", op)?;
            match op {
                "kv_get" => Ok(match kv.get(key).await.map_err(|e| failed(op, e))? {
                    Some(b) => {
                        json!({"status": "success", "bucket": bucket, "key": key, "value": decode(&b)})
                    }
                    None => {
                        json!({"status": "not_found", "bucket": bucket, "key": key, "value": null})
                    }
                }),
                "kv_put" => {
                    let rev = kv
                        .put(key, payload(cfg.get("value")))
                        .await
                        .map_err(|e| failed(op, e))?;
                    Ok(json!({"status": "success", "bucket": bucket, "key": key, "revision": rev}))
                }
                "kv_delete" => {
                    kv.delete(key).await.map_err(|e| failed(op, e))?;
                    Ok(json!({"status": "success", "bucket": bucket, "key": key}))
                }
                _ => {
                    kv.purge(key).await.map_err(|e| failed(op, e))?;
                    Ok(json!({"status": "success", "bucket": bucket, "key": key}))
                }
            }
        }
        "object_get" | "object_put" | "object_delete" | "object_info" | "object_list" => {
            let bucket = need(cfg, "bucket", op)?;
            let store = js
                .get_object_store(bucket)
                .await
                .map_err(|e| failed(op, format!("bucket `{bucket}`: {e}")))?;
            let b64 = match str_field(cfg, "encoding").unwrap_or("utf-8") {
                "utf-8" | "utf8" => false,
                "base64" => true,
                other => {
                    return Err(bad(format!(
                        "nats `encoding` `{other}`: one of utf-8, base64"
                    )));
                }
            };
            if op == "object_list" {
                let mut objects = Vec::new();
                let mut l = store.list().await.map_err(|e| failed(op, e))?;
                while let Some(info) = l.next().await {
                    let info = info.map_err(|e| failed(op, e))?;
                    objects.push(json!({"name": info.name, "size": info.size, "description": info.description, "chunks": info.chunks}));
                }
                return Ok(
                    json!({"status": "success", "bucket": bucket, "count": objects.len(), "objects": objects}),
                );
            }
            let name = need(cfg, "name", op)?;
            match op {
                "object_get" => {
                    let mut obj = store.get(name).await.map_err(|e| failed(op, e))?;
                    let mut buf = Vec::new();
                    obj.read_to_end(&mut buf).await.map_err(|e| failed(op, e))?;
                    let data = if b64 {
                        Value::String(base64::engine::general_purpose::STANDARD.encode(&buf))
                    } else {
                        Value::String(String::from_utf8_lossy(&buf).into_owned())
                    };
                    Ok(
                        json!({"status": "success", "bucket": bucket, "name": name, "data": data, "size": buf.len()}),
                    )
                }
                "object_put" => {
                    let bytes = match cfg.get("data") {
                        Some(Value::String(s)) if b64 => base64::engine::general_purpose::STANDARD
                            .decode(s.trim())
                            .map_err(|_| bad("nats `data` is not valid base64"))?,
                        other => payload(other).to_vec(),
                    };
                    let size = bytes.len();
                    let meta = jetstream::object_store::ObjectMetadata {
                        name: name.to_owned(),
                        description: str_field(cfg, "description").map(str::to_owned),
                        ..Default::default()
                    };
                    store
                        .put(meta, &mut std::io::Cursor::new(bytes))
                        .await
                        .map_err(|e| failed(op, e))?;
                    Ok(json!({"status": "success", "bucket": bucket, "name": name, "size": size}))
                }
                "object_delete" => {
                    store.delete(name).await.map_err(|e| failed(op, e))?;
                    Ok(json!({"status": "success", "bucket": bucket, "name": name}))
                }
                _ => {
                    let info = store.info(name).await.map_err(|e| failed(op, e))?;
                    Ok(
                        json!({"status": "success", "bucket": bucket, "name": info.name, "size": info.size, "description": info.description, "chunks": info.chunks}),
                    )
                }
            }
        }
        "js_publish" => {
            let subject = need(cfg, "subject", op)?.to_owned();
            let body = payload(cfg.get("data").or(cfg.get("value")));
            let ack = match headers(cfg)? {
                Some(h) => js.publish_with_headers(subject, h, body).await,
                None => js.publish(subject, body).await,
            }
            .map_err(|e| failed(op, e))?
            .await
            .map_err(|e| failed(op, e))?;
            Ok(
                json!({"status": "success", "stream": ack.stream, "seq": ack.sequence, "duplicate": ack.duplicate}),
            )
        }
        "js_consume" => {
            let stream_name = need(cfg, "stream", op)?;
            let consumer_name = need(cfg, "consumer", op)?;
            let batch = uint(cfg, "batch")?
                .unwrap_or(CONSUME_BATCH_DEFAULT)
                .clamp(1, CONSUME_BATCH_MAX);
            let wait = uint(cfg, "timeout_ms")?
                .unwrap_or(CONSUME_WAIT_DEFAULT_MS)
                .min(CONSUME_WAIT_MAX_MS);
            let ack = !matches!(cfg.get("ack"), Some(Value::Bool(false)));
            let stream = js
                .get_stream(stream_name)
                .await
                .map_err(|e| failed(op, format!("stream `{stream_name}`: {e}")))?;
            let consumer: jetstream::consumer::PullConsumer = stream
                .get_consumer(consumer_name)
                .await
                .map_err(|e| failed(op, format!("consumer `{consumer_name}`: {e}")))?;
            let mut msgs = consumer
                .fetch()
                .max_messages(batch as usize)
                .expires(Duration::from_millis(wait.max(1)))
                .messages()
                .await
                .map_err(|e| failed(op, e))?;
            let mut out = Vec::new();
            while let Some(m) = msgs.next().await {
                let m = m.map_err(|e| failed(op, e))?;
                let info = m.info().map_err(|e| failed(op, e))?;
                out.push(json!({
                    "subject": m.subject.to_string(),
                    "stream_seq": info.stream_sequence,
                    "consumer_seq": info.consumer_sequence,
                    "delivered": info.delivered,
                    "pending": info.pending,
                    "data": decode(&m.payload),
                    "headers": headers_json(m.headers.as_ref()),
                }));
                if ack {
                    m.ack().await.map_err(|e| failed(op, e))?;
                }
            }
            Ok(json!({
                "status": "success",
                "stream": stream_name,
                "consumer": consumer_name,
                "count": out.len(),
                "messages": out,
                "acked": ack,
            }))
        }
        "js_get_msg" => {
            let stream_name = need(cfg, "stream", op)?;
            let stream = js
                .get_stream(stream_name)
                .await
                .map_err(|e| failed(op, format!("stream `{stream_name}`: {e}")))?;
            let last = matches!(cfg.get("last"), Some(Value::Bool(true)));
            let msg = if let Some(seq) = uint(cfg, "seq")? {
                stream
                    .get_raw_message(seq)
                    .await
                    .map_err(|e| failed(op, e))?
            } else if last || str_field(cfg, "subject").is_some() {
                let subject = str_field(cfg, "subject").unwrap_or(">");
                stream
                    .get_last_raw_message_by_subject(subject)
                    .await
                    .map_err(|e| failed(op, e))?
            } else {
                return Err(bad(
                    "nats `js_get_msg` needs `seq`, `subject` or `last: true`",
                ));
            };
            Ok(json!({
                "status": "success",
                "stream": stream_name,
                "subject": msg.subject.to_string(),
                "seq": msg.sequence,
                "data": decode(&msg.payload),
                "headers": headers_json(Some(&msg.headers)),
            }))
        }
        _ => {
            let stream_name = need(cfg, "stream", op)?;
            let mut stream = js
                .get_stream(stream_name)
                .await
                .map_err(|e| failed(op, format!("stream `{stream_name}`: {e}")))?;
            let info = stream.info().await.map_err(|e| failed(op, e))?;
            Ok(json!({
                "status": "success",
                "stream": stream_name,
                "config": {
                    "name": info.config.name,
                    "subjects": info.config.subjects,
                    "max_msgs": info.config.max_messages,
                    "max_bytes": info.config.max_bytes,
                },
                "state": {
                    "messages": info.state.messages,
                    "bytes": info.state.bytes,
                    "first_seq": info.state.first_sequence,
                    "last_seq": info.state.last_sequence,
                    "consumer_count": info.state.consumer_count,
                },
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::glob;

    #[test]
    fn glob_matches_stars_anywhere() {
        assert!(glob("a*", "abc"));
        assert!(glob("*c", "abc"));
        assert!(glob("a*c", "abc"));
        assert!(glob("a*b*c", "a-b-c"));
        assert!(glob("abc", "abc"));
        assert!(!glob("abc", "abd"));
        assert!(!glob("a*c", "ab"));
        assert!(!glob("a*b*c", "acb"));
        assert!(glob("*", ""));
    }
}
