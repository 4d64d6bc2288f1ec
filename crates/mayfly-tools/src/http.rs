//! `http`: method, url, headers, params, `json` | `form` | `body`, timeout,
//! `follow_redirects`, `response_type` (json | text | binary).
//!
//! Result (NoETL's shape, the union of both runtimes): `{status_code, headers, data, body,
//! url, elapsed}`, where `data` and `body` are the decoded response (with `response_type:
//! json`, the default, JSON is tried whatever the content type, else the text). Policy rules
//! also see `output.http.{status, headers}` and `output.response`. A 4xx/5xx answer is an
//! error (its data is kept, so rules can read it); connection failures too.

use crate::{ToolError, ToolOutput};
use base64::Engine as _;
use serde_json::{Map, Value, json};
use std::time::{Duration, Instant};

/// The two clients a worker keeps: one follows redirects (the default), one does not.
pub struct Clients {
    follow: reqwest::Client,
    stay: reqwest::Client,
}

pub fn clients() -> Result<Clients, ToolError> {
    // ring is the crypto provider (aws-lc would need a C toolchain build on every machine).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let build = |policy| {
        reqwest::Client::builder()
            .user_agent(concat!("mayfly/", env!("CARGO_PKG_VERSION")))
            .redirect(policy)
            .build()
            .map_err(|e| ToolError::new("http_client", e.to_string()))
    };
    Ok(Clients {
        follow: build(reqwest::redirect::Policy::limited(10))?,
        stay: build(reqwest::redirect::Policy::none())?,
    })
}

fn text(v: &Value) -> String {
    v.as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| v.to_string())
}

fn bad(msg: impl Into<String>) -> ToolOutput {
    ToolOutput::failed(ToolError::new("bad_config", msg))
}

pub async fn run(clients: &Clients, config: &Map<String, Value>, timeout: Duration) -> ToolOutput {
    let Some(url) = config.get("url").or(config.get("endpoint")).map(text) else {
        return bad("http needs `url`");
    };
    let method = config
        .get("method")
        .map(text)
        .unwrap_or_else(|| "GET".into())
        .to_uppercase();
    let Ok(method) = reqwest::Method::from_bytes(method.as_bytes()) else {
        return bad(format!("invalid http method `{method}`"));
    };
    let response_type = match config.get("response_type").map(text).as_deref() {
        None | Some("json") => "json",
        Some("text") => "text",
        Some("binary") => "binary",
        Some(other) => {
            return bad(format!(
                "unknown `response_type` `{other}` (json, text, binary)"
            ));
        }
    };
    let client = match config.get("follow_redirects") {
        None | Some(Value::Bool(true)) => &clients.follow,
        Some(Value::Bool(false)) => &clients.stay,
        Some(other) => return bad(format!("`follow_redirects` must be a boolean, got {other}")),
    };
    let timeout = crate::seconds(config.get("timeout_seconds"))
        .or_else(|| crate::seconds(config.get("timeout")))
        .unwrap_or(timeout);
    let mut req = client.request(method, &url).timeout(timeout);
    if let Some(Value::Object(h)) = config.get("headers") {
        // A null header is dropped (NoETL), so `{{ token | default(none) }}` omits it.
        for (k, v) in h.iter().filter(|(_, v)| !v.is_null()) {
            req = req.header(k.as_str(), text(v));
        }
    }
    if let Some(Value::Object(q)) = config.get("params").or(config.get("query")) {
        let pairs: Vec<(String, String)> = q
            .iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| (k.clone(), text(v)))
            .collect();
        req = req.query(&pairs);
    }
    // Body: the first of json, data (an older spelling of json), form, body.
    if let Some(j) = config.get("json").or(config.get("data")) {
        req = req.json(j);
    } else if let Some(f) = config.get("form") {
        let Value::Object(f) = f else {
            return bad("`form` must be a mapping");
        };
        let pairs: Vec<(String, String)> = f.iter().map(|(k, v)| (k.clone(), text(v))).collect();
        req = req.form(&pairs);
    } else if let Some(b) = config.get("body") {
        req = match b {
            Value::String(s) => req.body(s.clone()),
            other => req.json(other),
        };
    }
    let started = Instant::now();
    let resp = match req.send().await {
        Ok(r) => r,
        Err(e) => {
            let code = if e.is_timeout() {
                "timeout"
            } else if e.is_connect() {
                "connection_failed"
            } else {
                "http_error"
            };
            // reqwest's Display omits the cause chain; include it so "connection refused" shows.
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            return ToolOutput::failed(ToolError::new(code, msg));
        }
    };
    let status = resp.status().as_u16();
    let final_url = resp.url().to_string();
    let mut headers = Map::new();
    for (k, v) in resp.headers() {
        headers.insert(
            k.as_str().to_owned(),
            Value::String(v.to_str().unwrap_or_default().to_owned()),
        );
    }
    let retry_after = headers.get("retry-after").cloned();
    let bytes = match resp.bytes().await {
        Ok(b) => b,
        Err(e) => {
            return ToolOutput::failed(ToolError::new("http_error", format!("reading body: {e}")));
        }
    };
    let elapsed = started.elapsed().as_secs_f64();
    let decoded = match response_type {
        "binary" => json!({
            "base64": base64::engine::general_purpose::STANDARD.encode(&bytes),
            "size": bytes.len(),
        }),
        _ => {
            let text = String::from_utf8_lossy(&bytes).into_owned();
            if response_type == "json" {
                serde_json::from_str::<Value>(&text).unwrap_or(Value::String(text))
            } else {
                Value::String(text)
            }
        }
    };
    let data = json!({
        "status_code": status,
        "headers": headers,
        "data": decoded,
        "body": decoded,
        "url": final_url,
        "elapsed": elapsed,
    });
    let mut out = if status >= 400 {
        let mut o = ToolOutput::failed(ToolError::new(
            "http_status",
            format!("HTTP {status} response from {url}"),
        ));
        o.data = data.clone();
        o
    } else {
        ToolOutput::ok(data.clone())
    };
    let mut http = json!({"status": status, "headers": headers});
    if let Some(r) = retry_after {
        http["retry_after"] = r;
    }
    out.meta.insert("http".into(), http);
    out.meta.insert("response".into(), data);
    out
}
