//! `shell`: run `command` (one string, NoETL's Rust runtime) or `cmds` (a list, in order,
//! stopping at the first failure, NoETL's Python runtime) with `<shell> -c` (`shell`,
//! default `sh`), in `cwd`, with `env` added. Result, the union of both runtimes:
//! `{exit_code, returncode, stdout, stderr}`, plus `commands: [{cmd, returncode, stdout,
//! stderr, duration_ms}]` for a `cmds` list. A non-zero exit is an error.

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
    let listed = matches!(config.get("cmds"), Some(Value::Array(_)));
    let shell = match config.get("shell") {
        None => "sh".to_owned(),
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        Some(other) => {
            return ToolOutput::failed(ToolError::new(
                "bad_config",
                format!("`shell` must name a shell program, got {other}"),
            ));
        }
    };
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
    let mut commands = Vec::new();
    let result = |stdout: &str, stderr: &str, code: i32, commands: &Vec<Value>| {
        let mut r =
            json!({"stdout": stdout, "stderr": stderr, "exit_code": code, "returncode": code});
        if listed {
            r["commands"] = Value::Array(commands.clone());
        }
        r
    };
    for c in &cmds {
        let began = std::time::Instant::now();
        let mut cmd = Command::new(&shell);
        cmd.arg("-c")
            .arg(c)
            .envs(env.iter().cloned())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        crate::die_with_parent(&mut cmd);
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
        commands.push(json!({
            "cmd": c,
            "returncode": code,
            "stdout": clip(&out.stdout),
            "stderr": clip(&out.stderr),
            "duration_ms": began.elapsed().as_millis() as u64,
        }));
        if !out.status.success() {
            let mut e = ToolError::new("exit_status", format!("`{c}` exited with status {code}"));
            e.detail = Some(json!({"stderr": clip(&out.stderr)}));
            let mut o = ToolOutput::failed(e);
            o.data = result(&stdout, &stderr, code, &commands);
            return o;
        }
    }
    ToolOutput::ok(result(&stdout, &stderr, code, &commands))
}
