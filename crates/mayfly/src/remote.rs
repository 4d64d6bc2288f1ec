//! The CLI against a running server: `mayfly exec start|status|watch|cancel` and
//! `mayfly register --server`. Configured by `MAYFLY_URL` and `MAYFLY_TOKEN`.

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use futures_util::StreamExt;
use serde_json::{Map, Value, json};
use std::path::Path;
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum ExecCmd {
    /// Start an execution of a catalog playbook `path[@version]`.
    Start {
        playbook: String,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Follow it to the end (like `watch`).
        #[arg(long)]
        watch: bool,
    },
    /// Print an execution's status and result.
    Status { execution_id: String },
    /// Follow an execution's events live (SSE) until it ends.
    Watch { execution_id: String },
    /// Cancel a running execution.
    Cancel { execution_id: String },
    /// List the tenant's executions.
    List,
}

pub struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Client {
    pub fn from_env() -> Result<Client> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let base =
            std::env::var("MAYFLY_URL").context("set MAYFLY_URL (e.g. http://127.0.0.1:8080)")?;
        let token = std::env::var("MAYFLY_TOKEN").context("set MAYFLY_TOKEN (an API token)")?;
        Ok(Client {
            http: reqwest::Client::new(),
            base: base.trim_end_matches('/').to_owned(),
            token,
        })
    }

    /// A client for `base` authenticated by `token`.
    pub fn new(base: &str, token: &str) -> Client {
        let _ = rustls::crypto::ring::default_provider().install_default();
        Client {
            http: reqwest::Client::new(),
            base: base.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
        }
    }

    /// Wait for an execution to end: its SSE stream, filtered to the execution's own events
    /// (a fan-out's thousands of step events are not the waiter's business), until the
    /// server ends it.
    pub async fn wait_ended(&self, id: &str) -> Result<()> {
        let resp = self
            .http
            .get(format!(
                "{}/v1/executions/{id}/stream?kinds=execution.*",
                self.base
            ))
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("calling {}", self.base))?;
        if !resp.status().is_success() {
            bail!(
                "{}: {}",
                resp.status(),
                resp.text().await.unwrap_or_default()
            );
        }
        let mut body = resp.bytes_stream();
        while let Some(chunk) = body.next().await {
            chunk?;
        }
        Ok(())
    }

    /// An execution's events from `from`, at most `limit`, following the server's pages.
    pub async fn events(
        &self,
        id: &str,
        from: u64,
        limit: u32,
    ) -> Result<Vec<mayfly_types::Event>> {
        let mut out = Vec::new();
        let mut next = Some(from);
        while let Some(at) = next {
            if out.len() as u64 >= u64::from(limit) {
                break;
            }
            let page = (u64::from(limit) - out.len() as u64).min(1000);
            let v = self
                .send(
                    reqwest::Method::GET,
                    &format!("/v1/executions/{id}/events?from={at}&limit={page}"),
                    None,
                )
                .await?;
            let evs: Vec<mayfly_types::Event> = serde_json::from_value(v["events"].clone())
                .context("the server sent malformed events")?;
            out.extend(evs);
            next = v["next"].as_u64();
        }
        Ok(out)
    }

    pub(crate) async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<String>,
    ) -> Result<Value> {
        let (status, v) = self.send_raw(method, path, body).await?;
        if !status.is_success() {
            let code = v.get("code").and_then(Value::as_str).unwrap_or("error");
            let detail = v.get("detail").and_then(Value::as_str).unwrap_or("");
            bail!("{status} {code}: {detail}");
        }
        Ok(v)
    }

    /// The status and JSON body of a call, whatever the status.
    pub(crate) async fn send_raw(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<String>,
    ) -> Result<(reqwest::StatusCode, Value)> {
        let mut r = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            r = r.body(b);
        }
        let resp = r
            .send()
            .await
            .with_context(|| format!("calling {}", self.base))?;
        let status = resp.status();
        let text = resp.text().await?;
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((status, v))
    }
}

/// `mayfly status`: the server's status document; exit 1 when it is degraded.
pub async fn status() -> Result<ExitCode> {
    let c = Client::from_env()?;
    let v = c.send(reqwest::Method::GET, "/v1/status", None).await?;
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(if v["state"] == "ready" {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `mayfly token`: create a token; prints it (it is shown once).
pub async fn token(role: &str, name: &str, tenant: Option<String>) -> Result<ExitCode> {
    let c = Client::from_env()?;
    let body = json!({"tenant": tenant, "role": role, "name": name}).to_string();
    let v = c
        .send(reqwest::Method::POST, "/v1/tokens", Some(body))
        .await?;
    println!("{}", v["token"].as_str().unwrap_or_default());
    Ok(ExitCode::SUCCESS)
}

pub async fn register(file: &Path) -> Result<ExitCode> {
    let c = Client::from_env()?;
    let body =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let v = c
        .send(reqwest::Method::POST, "/v1/playbooks", Some(body))
        .await?;
    let what = if v["created"] == json!(true) {
        "registered"
    } else {
        "unchanged"
    };
    println!(
        "{what} {}@{} {}",
        v["path"].as_str().unwrap_or(""),
        v["version"],
        v["digest"].as_str().unwrap_or("")
    );
    Ok(ExitCode::SUCCESS)
}

pub async fn exec(
    cmd: ExecCmd,
    overrides: impl Fn(&[String]) -> Result<Map<String, Value>>,
) -> Result<ExitCode> {
    let c = Client::from_env()?;
    match cmd {
        ExecCmd::Start {
            playbook,
            set,
            watch,
        } => {
            let (path, version) = match playbook.rsplit_once('@') {
                Some((p, v)) => (
                    p.to_owned(),
                    Some(v.parse::<u32>().context("version after @")?),
                ),
                None => (playbook.clone(), None),
            };
            let body = json!({"path": path, "version": version, "workload": overrides(&set)?});
            let v = c
                .send(
                    reqwest::Method::POST,
                    "/v1/executions",
                    Some(body.to_string()),
                )
                .await?;
            let id = v["execution_id"].as_str().unwrap_or_default().to_owned();
            if watch {
                eprintln!("execution {id}");
                return follow(&c, &id).await;
            }
            println!("{id}");
            Ok(ExitCode::SUCCESS)
        }
        ExecCmd::Status { execution_id } => {
            let v = c
                .send(
                    reqwest::Method::GET,
                    &format!("/v1/executions/{execution_id}"),
                    None,
                )
                .await?;
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(if v["status"] == "failed" || v["status"] == "cancelled" {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        ExecCmd::Watch { execution_id } => follow(&c, &execution_id).await,
        ExecCmd::Cancel { execution_id } => {
            c.send(
                reqwest::Method::POST,
                &format!("/v1/executions/{execution_id}/cancel"),
                None,
            )
            .await?;
            println!("cancelled {execution_id}");
            Ok(ExitCode::SUCCESS)
        }
        ExecCmd::List => {
            let v = c.send(reqwest::Method::GET, "/v1/executions", None).await?;
            for x in v["executions"].as_array().into_iter().flatten() {
                println!(
                    "{}  {:<10} {}",
                    x["execution_id"].as_str().unwrap_or(""),
                    x["status"].as_str().unwrap_or(""),
                    x["path"].as_str().unwrap_or("")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Follow the SSE stream, printing one line per event, then the final result.
async fn follow(c: &Client, id: &str) -> Result<ExitCode> {
    let resp = c
        .http
        .get(format!("{}/v1/executions/{id}/stream", c.base))
        .bearer_auth(&c.token)
        .send()
        .await
        .with_context(|| format!("calling {}", c.base))?;
    if !resp.status().is_success() {
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        bail!("{status}: {text}");
    }
    let mut body = resp.bytes_stream();
    let mut buf = String::new();
    while let Some(chunk) = body.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk?));
        while let Some(end) = buf.find("\n\n") {
            let frame: String = buf.drain(..end + 2).collect();
            let data: String = frame
                .lines()
                .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
                .collect();
            if data.is_empty() {
                continue;
            }
            if let Ok(e) = serde_json::from_str::<Value>(&data) {
                let step = e["step"].as_str().unwrap_or("");
                eprintln!(
                    "{:>5}  {:<20} {step}",
                    e["seq"],
                    e["kind"].as_str().unwrap_or("")
                );
            }
        }
    }
    let v = c
        .send(reqwest::Method::GET, &format!("/v1/executions/{id}"), None)
        .await?;
    eprintln!("{} {id}", v["status"].as_str().unwrap_or("?"));
    if let Some(e) = v.get("error").filter(|e| !e.is_null()) {
        eprintln!(
            "  error: {}: {}",
            e["code"].as_str().unwrap_or(""),
            e["message"].as_str().unwrap_or("")
        );
    }
    println!("{}", serde_json::to_string_pretty(&v["result"])?);
    Ok(if v["status"] == "completed" {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
