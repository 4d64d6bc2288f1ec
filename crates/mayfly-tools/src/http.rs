//! `http`: method, url, headers, params, body/json, timeout. Result:
//! `{status_code, headers, json | text, url}`; policy rules also see `output.http.status`.
//! A 4xx/5xx answer is an error (so `retry` rules can act on it); connection failures too.

use crate::{ToolError, ToolOutput};
use serde_json::{Map, Value, json};
use std::time::Duration;

pub fn client() -> Result<reqwest::Client, ToolError> {
    // ring is the crypto provider (aws-lc would need a C toolchain build on every machine).
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .user_agent(concat!("mayfly/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| ToolError::new("http_client", e.to_string()))
}

fn text(v: &Value) -> String {
    v.as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| v.to_string())
}

pub async fn run(
    client: &reqwest::Client,
    config: &Map<String, Value>,
    timeout: Duration,
) -> ToolOutput {
    let Some(url) = config.get("url").or(config.get("endpoint")).map(text) else {
        return ToolOutput::failed(ToolError::new("bad_config", "http needs `url`"));
    };
    let method = config
        .get("method")
        .map(text)
        .unwrap_or_else(|| "GET".into())
        .to_uppercase();
    let Ok(method) = reqwest::Method::from_bytes(method.as_bytes()) else {
        return ToolOutput::failed(ToolError::new(
            "bad_config",
            format!("invalid http method `{method}`"),
        ));
    };
    let timeout = crate::seconds(config.get("timeout")).unwrap_or(timeout);
    let mut req = client.request(method, &url).timeout(timeout);
    if let Some(Value::Object(h)) = config.get("headers") {
        for (k, v) in h {
            req = req.header(k.as_str(), text(v));
        }
    }
    if let Some(Value::Object(q)) = config.get("params").or(config.get("query")) {
        let pairs: Vec<(String, String)> = q.iter().map(|(k, v)| (k.clone(), text(v))).collect();
        req = req.query(&pairs);
    }
    if let Some(j) = config.get("json").or(config.get("data")) {
        req = req.json(j);
    } else if let Some(b) = config.get("body") {
        req = match b {
            Value::String(s) => req.body(s.clone()),
            other => req.json(other),
        };
    }
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
    let is_json = headers
        .get("content-type")
        .and_then(Value::as_str)
        .is_some_and(|c| c.contains("json"));
    let body = match resp.text().await {
        Ok(b) => b,
        Err(e) => {
            return ToolOutput::failed(ToolError::new("http_error", format!("reading body: {e}")));
        }
    };
    let mut data = json!({"status_code": status, "headers": headers, "url": final_url});
    let parsed = if is_json {
        serde_json::from_str::<Value>(&body).ok()
    } else {
        None
    };
    match parsed {
        Some(j) => data["json"] = j,
        None => data["text"] = Value::String(body),
    }
    let mut out = if status >= 400 {
        let mut o = ToolOutput::failed(ToolError::new(
            "http_status",
            format!("{url} answered {status}"),
        ));
        o.data = data;
        o
    } else {
        ToolOutput::ok(data)
    };
    out.meta.insert("http".into(), json!({"status": status}));
    out
}
