//! A warm pool of `python3` interpreters speaking JSON lines over pipes.
//!
//! Starting an interpreter costs tens of milliseconds; a warm one answers a trivial step in
//! well under one. Each request gets fresh globals, so steps do not see each other's
//! variables, while imported modules stay cached. A step that times out (or breaks the
//! protocol) gets its interpreter killed and replaced.

use crate::{ToolError, ToolOutput};
use serde_json::{Value, json};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::Semaphore;

const DRIVER: &str = include_str!("driver.py");
const MARK: &str = "\u{1e}@@MAYFLY@@";

struct Interp {
    _child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

/// The interpreter pool. `size` bounds concurrent python steps in this process.
pub struct PythonPool {
    python: String,
    idle: Mutex<Vec<Interp>>,
    slots: Semaphore,
    size: usize,
}

impl PythonPool {
    /// A pool of at most `size` interpreters of `python` (e.g. `python3`).
    pub fn new(python: impl Into<String>, size: usize) -> Self {
        let size = size.max(1);
        PythonPool {
            python: python.into(),
            idle: Mutex::new(Vec::new()),
            slots: Semaphore::new(size),
            size,
        }
    }

    pub fn size(&self) -> usize {
        self.size
    }

    fn spawn(&self) -> Result<Interp, ToolError> {
        let mut child = Command::new(&self.python)
            .arg("-u")
            .arg("-c")
            .arg(DRIVER)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                ToolError::new(
                    "python_unavailable",
                    format!("cannot start `{}`: {e}", self.python),
                )
            })?;
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| ToolError::new("python_unavailable", "no stdin pipe"))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| ToolError::new("python_unavailable", "no stdout pipe"))?;
        Ok(Interp {
            _child: child,
            stdin,
            stdout: BufReader::new(stdout),
        })
    }

    /// Start interpreters until `size` are idle, so the first steps pay no start-up.
    pub async fn warm(&self) -> Result<(), ToolError> {
        let have = self.idle.lock().map(|v| v.len()).unwrap_or(0);
        for _ in have..self.size {
            let mut it = self.spawn()?;
            // A no-op round trip proves the interpreter is ready.
            exchange(
                &mut it,
                &json!({"code": "result = None", "input": {}}),
                Duration::from_secs(30),
            )
            .await?;
            if let Ok(mut v) = self.idle.lock() {
                v.push(it);
            }
        }
        Ok(())
    }

    /// Run `code` with `input` (keys become globals, the whole map is `input_data`).
    pub async fn run(&self, code: &str, input: &Value, timeout: Duration) -> ToolOutput {
        let Ok(_permit) = self.slots.acquire().await else {
            return ToolOutput::failed(ToolError::new("python_unavailable", "pool closed"));
        };
        let existing = self.idle.lock().ok().and_then(|mut v| v.pop());
        let mut it = match existing {
            Some(it) => it,
            None => match self.spawn() {
                Ok(it) => it,
                Err(e) => return ToolOutput::failed(e),
            },
        };
        let req = json!({"code": code, "input": input});
        match exchange(&mut it, &req, timeout).await {
            Ok(resp) => {
                if let Ok(mut v) = self.idle.lock() {
                    v.push(it);
                }
                let logs = json!({
                    "stdout": resp.get("stdout").cloned().unwrap_or(Value::Null),
                    "stderr": resp.get("stderr").cloned().unwrap_or(Value::Null),
                });
                if resp.get("ok").and_then(Value::as_bool) == Some(true) {
                    let mut out =
                        ToolOutput::ok(resp.get("result").cloned().unwrap_or(Value::Null));
                    out.logs = Some(logs);
                    out
                } else {
                    let err = resp.get("error").cloned().unwrap_or(Value::Null);
                    let ty = err.get("type").and_then(Value::as_str).unwrap_or("Error");
                    let msg = err.get("message").and_then(Value::as_str).unwrap_or("");
                    let mut e = ToolError::new("python_exception", format!("{ty}: {msg}"));
                    e.detail = err.get("traceback").cloned();
                    let mut out = ToolOutput::failed(e);
                    out.logs = Some(logs);
                    out
                }
            }
            // The interpreter is dropped (killed): its state is unknown after a timeout.
            Err(e) => ToolOutput::failed(e),
        }
    }
}

async fn exchange(it: &mut Interp, req: &Value, timeout: Duration) -> Result<Value, ToolError> {
    let mut line =
        serde_json::to_string(req).map_err(|e| ToolError::new("python_protocol", e.to_string()))?;
    line.push('\n');
    let io = async {
        it.stdin.write_all(line.as_bytes()).await?;
        it.stdin.flush().await?;
        let mut buf = String::new();
        loop {
            buf.clear();
            let n = it.stdout.read_line(&mut buf).await?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "interpreter exited",
                ));
            }
            if let Some(rest) = buf.strip_prefix(MARK) {
                return Ok(rest.to_owned());
            }
            // Unmarked line: something wrote to fd 1 directly (e.g. a subprocess); skip it.
        }
    };
    let resp = match tokio::time::timeout(timeout, io).await {
        Err(_) => {
            return Err(ToolError::new(
                "timeout",
                format!("python step exceeded {:.3}s", timeout.as_secs_f64()),
            ));
        }
        Ok(Err(e)) => {
            return Err(ToolError::new(
                "python_crashed",
                format!("python interpreter failed: {e}"),
            ));
        }
        Ok(Ok(s)) => s,
    };
    serde_json::from_str(&resp)
        .map_err(|e| ToolError::new("python_protocol", format!("bad response: {e}")))
}
