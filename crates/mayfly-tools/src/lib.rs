//! Tool kinds executed inside atomic blocks: `python` (warm interpreter pool), `shell`,
//! `http` and `postgres`. (`noop` and `playbook` never reach a worker: the engine completes noops
//! inline and runs child playbooks as their own executions.)
//!
//! A tool never panics or returns a Rust error for a user-level failure: failures become
//! `ToolOutput { ok: false, error }`, which task policy rules can act on.

mod http;
mod postgres;
mod python;
mod shell;

pub use python::PythonPool;

use mayfly_types::ErrorInfo;
use serde_json::{Map, Value};
use std::time::Duration;

/// A tool failure with a stable code.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ToolError {
    pub code: String,
    pub message: String,
    /// Extra structured detail (a traceback, an HTTP body…).
    pub detail: Option<Value>,
}

impl ToolError {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        ToolError {
            code: code.into(),
            message: message.into(),
            detail: None,
        }
    }

    pub fn info(&self) -> ErrorInfo {
        ErrorInfo::new(self.code.clone(), self.message.clone())
    }
}

/// What a tool produced.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolOutput {
    pub ok: bool,
    /// The step-facing result (`output.data`).
    pub data: Value,
    pub error: Option<ToolError>,
    /// Tool-specific metadata exposed to policy rules (e.g. `output.http`).
    pub meta: Map<String, Value>,
    /// Captured stdout/stderr, kept for debugging (clipped).
    pub logs: Option<Value>,
}

impl ToolOutput {
    pub fn ok(data: Value) -> Self {
        ToolOutput {
            ok: true,
            data,
            error: None,
            meta: Map::new(),
            logs: None,
        }
    }

    pub fn failed(e: ToolError) -> Self {
        ToolOutput {
            ok: false,
            data: Value::Null,
            error: Some(e),
            meta: Map::new(),
            logs: None,
        }
    }

    /// The `output` object that policy rules see.
    pub fn as_output(&self) -> Value {
        let mut m = self.meta.clone();
        m.insert(
            "status".into(),
            Value::String(if self.ok { "ok" } else { "error" }.into()),
        );
        m.insert("data".into(), self.data.clone());
        m.insert(
            "error".into(),
            match &self.error {
                Some(e) => {
                    serde_json::json!({"code": e.code, "message": e.message, "detail": e.detail})
                }
                None => Value::Null,
            },
        );
        Value::Object(m)
    }
}

/// Configuration of the tool host.
#[derive(Debug, Clone)]
pub struct ToolsConfig {
    pub python: String,
    pub python_pool: usize,
    pub default_timeout: Duration,
}

impl Default for ToolsConfig {
    fn default() -> Self {
        ToolsConfig {
            python: "python3".into(),
            python_pool: 4,
            default_timeout: Duration::from_secs(300),
        }
    }
}

/// Runs tools. One per worker process; cheap to share.
pub struct Tools {
    pub python: PythonPool,
    http: reqwest::Client,
    postgres: postgres::Pools,
    pub config: ToolsConfig,
}

impl Tools {
    pub fn new(config: ToolsConfig) -> Result<Self, ToolError> {
        Ok(Tools {
            python: PythonPool::new(config.python.clone(), config.python_pool),
            http: http::client()?,
            postgres: postgres::Pools::default(),
            config,
        })
    }

    /// Run one task. `config` is the task's rendered fields; `input` the merged step and
    /// task input. `code` for python is passed verbatim (never templated).
    pub async fn run(
        &self,
        kind: &str,
        config: &Map<String, Value>,
        input: &Map<String, Value>,
        timeout: Option<Duration>,
    ) -> ToolOutput {
        let timeout = timeout.unwrap_or(self.config.default_timeout);
        match kind {
            "python" => {
                let code = config
                    .get("code")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                self.python
                    .run(code, &Value::Object(input.clone()), timeout)
                    .await
            }
            "shell" => shell::run(config, timeout).await,
            "http" => http::run(&self.http, config, timeout).await,
            "postgres" => postgres::run(&self.postgres, config, input, timeout).await,
            "noop" => ToolOutput::ok(Value::Object(input.clone())),
            other => ToolOutput::failed(ToolError::new(
                "unknown_tool",
                format!("tool kind `{other}` cannot run in a worker"),
            )),
        }
    }
}

/// Parse a duration in seconds from a JSON number or numeric string.
pub fn seconds(v: Option<&Value>) -> Option<Duration> {
    let f = match v? {
        Value::Number(n) => n.as_f64()?,
        Value::String(s) => s.trim().parse().ok()?,
        _ => return None,
    };
    if f > 0.0 {
        Duration::try_from_secs_f64(f).ok()
    } else {
        None
    }
}

#[cfg(test)]
mod tests;
