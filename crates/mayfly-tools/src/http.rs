//! `http`: method, url, headers, params, `json` | `form` | `body`, timeout,
//! `follow_redirects`, `response_type` (json | text | binary).
//!
//! Result (NoETL's shape, the union of both runtimes): `{status_code, headers, data, body,
//! url, elapsed}`, where `data` and `body` are the decoded response (with `response_type:
//! json`, the default, JSON is tried whatever the content type, else the text). Policy rules
//! also see `output.http.{status, headers}` and `output.response`. A 4xx/5xx answer is an
//! error (its data is kept, so rules can read it); connection failures too.

use crate::egress::Guard;
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

/// The request a task describes (rebuilt per hop when redirects are followed by hand).
struct Spec {
    method: reqwest::Method,
    headers: Vec<(String, String)>,
    query: Option<Vec<(String, String)>>,
    body: Body,
    timeout: Duration,
}

enum Body {
    None,
    Json(Value),
    Form(Vec<(String, String)>),
    Text(String),
}

impl Spec {
    fn build(
        &self,
        client: &reqwest::Client,
        method: reqwest::Method,
        url: reqwest::Url,
        body: bool,
    ) -> reqwest::RequestBuilder {
        let mut req = client.request(method, url).timeout(self.timeout);
        for (k, v) in &self.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        if let Some(q) = &self.query {
            req = req.query(q);
        }
        if body {
            req = match &self.body {
                Body::None => req,
                Body::Json(j) => req.json(j),
                Body::Form(f) => req.form(f),
                Body::Text(t) => req.body(t.clone()),
            };
        }
        req
    }
}

fn request_error(e: reqwest::Error) -> ToolError {
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
    ToolError::new(code, msg)
}

/// Send under an egress policy: every hop's host is resolved and checked, the connection
/// goes to the checked addresses only (a client pinned to them), and redirects are
/// followed here so each hop is checked the same way. Credentials are not carried to
/// another host.
async fn send_guarded(
    guard: &Guard,
    spec: &mut Spec,
    url: &str,
    follow: bool,
) -> Result<reqwest::Response, ToolError> {
    let mut url = reqwest::Url::parse(url)
        .map_err(|e| ToolError::new("bad_config", format!("invalid url `{url}`: {e}")))?;
    let mut method = spec.method.clone();
    let mut body = true;
    for _ in 0..=10 {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(ToolError::new(
                "bad_config",
                format!("`{}` is not an http(s) url", url),
            ));
        }
        let host = url
            .host_str()
            .ok_or_else(|| ToolError::new("bad_config", format!("`{url}` has no host")))?
            .to_owned();
        let port = url.port_or_known_default().unwrap_or(80);
        let addrs = guard.resolve(&host, port).await?.unwrap_or_default();
        let mut b = reqwest::Client::builder()
            .user_agent(concat!("mayfly/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy();
        if host.parse::<std::net::IpAddr>().is_err() && !host.starts_with('[') {
            b = b.resolve_to_addrs(&host, &addrs);
        }
        let client = b
            .build()
            .map_err(|e| ToolError::new("http_client", e.to_string()))?;
        let resp = spec
            .build(&client, method.clone(), url.clone(), body)
            .send()
            .await
            .map_err(request_error)?;
        let next = resp
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .and_then(|l| url.join(l).ok());
        let status = resp.status().as_u16();
        let Some(next) = next.filter(|_| follow && resp.status().is_redirection()) else {
            return Ok(resp);
        };
        if status == 303 || (matches!(status, 301 | 302) && method == reqwest::Method::POST) {
            method = reqwest::Method::GET;
            body = false;
        }
        if next.host_str() != url.host_str()
            || next.port_or_known_default() != url.port_or_known_default()
        {
            spec.headers.retain(|(k, _)| {
                !matches!(
                    k.to_ascii_lowercase().as_str(),
                    "authorization" | "cookie" | "proxy-authorization"
                )
            });
        }
        url = next;
    }
    Err(ToolError::new(
        "http_error",
        format!("too many redirects from {url}"),
    ))
}

pub async fn run(
    clients: &Clients,
    guard: &Guard,
    config: &Map<String, Value>,
    timeout: Duration,
) -> ToolOutput {
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
    let follow = match config.get("follow_redirects") {
        None | Some(Value::Bool(true)) => true,
        Some(Value::Bool(false)) => false,
        Some(other) => return bad(format!("`follow_redirects` must be a boolean, got {other}")),
    };
    let timeout = crate::seconds(config.get("timeout_seconds"))
        .or_else(|| crate::seconds(config.get("timeout")))
        .unwrap_or(timeout);
    let mut spec = Spec {
        method,
        headers: Vec::new(),
        query: None,
        body: Body::None,
        timeout,
    };
    if let Some(Value::Object(h)) = config.get("headers") {
        // A null header is dropped (NoETL), so `{{ token | default(none) }}` omits it.
        for (k, v) in h.iter().filter(|(_, v)| !v.is_null()) {
            spec.headers.push((k.clone(), text(v)));
        }
    }
    if let Some(Value::Object(q)) = config.get("params").or(config.get("query")) {
        spec.query = Some(
            q.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), text(v)))
                .collect(),
        );
    }
    // Body: the first of json, data (an older spelling of json), form, body.
    if let Some(j) = config.get("json").or(config.get("data")) {
        spec.body = Body::Json(j.clone());
    } else if let Some(f) = config.get("form") {
        let Value::Object(f) = f else {
            return bad("`form` must be a mapping");
        };
        spec.body = Body::Form(f.iter().map(|(k, v)| (k.clone(), text(v))).collect());
    } else if let Some(b) = config.get("body") {
        spec.body = match b {
            Value::String(s) => Body::Text(s.clone()),
            other => Body::Json(other.clone()),
        };
    }
    let started = Instant::now();
    let sent = if guard.unrestricted() {
        let client = if follow {
            &clients.follow
        } else {
            &clients.stay
        };
        match reqwest::Url::parse(&url) {
            Ok(u) => spec
                .build(client, spec.method.clone(), u, true)
                .send()
                .await
                .map_err(request_error),
            Err(e) => Err(ToolError::new(
                "bad_config",
                format!("invalid url `{url}`: {e}"),
            )),
        }
    } else {
        send_guarded(guard, &mut spec, &url, follow).await
    };
    let resp = match sent {
        Ok(r) => r,
        Err(e) => return ToolOutput::failed(e),
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
