//! `shell`: run `cmds` (a list, in order, stopping at the first failure) or `command`
//! with `sh -c`. Result: `{stdout, stderr, exit_code}`; a non-zero exit is an error.

use crate::{ToolError, ToolOutput};
use serde_json::{Map, Value, json};
use std::process::Stdio;
use std::time::Duration;
use tokio::process::Command;

const LIMIT: usize = 1 << 20;

fn clip(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(&b[..b.len().min(LIMIT)]).into_owned();
    if b.len() > LIMIT {
        s + "\n[truncated]"
    } else {
        s
    }
}

pub async fn run(config: &Map<String, Value>, timeout: Duration) -> ToolOutput {
    let cmds: Vec<String> = match config
        .get("cmds")
        .or(config.get("command"))
        .or(config.get("cmd"))
    {
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| v.to_string())
            })
            .collect(),
        Some(Value::String(s)) => vec![s.clone()],
        _ => {
            return ToolOutput::failed(ToolError::new(
                "bad_config",
                "shell needs `cmds` (list) or `command` (string)",
            ));
        }
    };
    let env: Vec<(String, String)> = match config.get("env") {
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.as_str()
                        .map(str::to_owned)
                        .unwrap_or_else(|| v.to_string()),
                )
            })
            .collect(),
        _ => Vec::new(),
    };
    let cwd = config.get("cwd").and_then(Value::as_str);
    let deadline = tokio::time::Instant::now() + timeout;
    let (mut stdout, mut stderr) = (String::new(), String::new());
    let mut code = 0;
    for c in &cmds {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(c)
            .envs(env.iter().cloned())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        if let Some(d) = cwd {
            cmd.current_dir(d);
        }
        let out = match tokio::time::timeout_at(deadline, cmd.output()).await {
            Err(_) => {
                return ToolOutput::failed(ToolError::new(
                    "timeout",
                    format!("shell exceeded {:.3}s running `{c}`", timeout.as_secs_f64()),
                ));
            }
            Ok(Err(e)) => {
                return ToolOutput::failed(ToolError::new(
                    "spawn_failed",
                    format!("cannot run `{c}`: {e}"),
                ));
            }
            Ok(Ok(o)) => o,
        };
        stdout.push_str(&clip(&out.stdout));
        stderr.push_str(&clip(&out.stderr));
        code = out.status.code().unwrap_or(-1);
        if !out.status.success() {
            let mut e = ToolError::new("exit_status", format!("`{c}` exited with status {code}"));
            e.detail = Some(json!({"stderr": clip(&out.stderr)}));
            let mut o = ToolOutput::failed(e);
            o.data = json!({"stdout": stdout, "stderr": stderr, "exit_code": code});
            return o;
        }
    }
    ToolOutput::ok(json!({"stdout": stdout, "stderr": stderr, "exit_code": code}))
}
