//! `shell`: run `command` (one string, NoETL's Rust runtime) or `cmds` (a list, in order,
//! stopping at the first failure, NoETL's Python runtime) with `<shell> -c` (`shell`,
//! default `sh`), in `cwd`, with `env` added. Result, the union of both runtimes:
//! `{exit_code, returncode, stdout, stderr}`, plus `commands: [{cmd, returncode, stdout,
//! stderr, duration_ms}]` for a `cmds` list. A non-zero exit is an error.
//!
//! Sandboxed, the commands run in a warm sandbox of the tenant's python pool (the driver
//! spawns them: a fresh bubblewrap per command costs ~5 ms): each in its own session, its
//! CPU bounded, whatever it left running killed after it, in the step's emptied `/work`.

use crate::python::PythonPool;
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

/// A task's commands and how to run them.
struct Task {
    shell: String,
    cmds: Vec<String>,
    env: Vec<(String, String)>,
    cwd: Option<String>,
    /// `cmds` was a list: the result lists each command.
    listed: bool,
}

fn task(config: &Map<String, Value>) -> Result<Task, ToolError> {
    let shell = match config.get("shell") {
        None => "sh".to_owned(),
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        Some(other) => {
            return Err(ToolError::new(
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
            return Err(ToolError::new(
                "bad_config",
                "shell needs `cmds` (list) or `command` (string)",
            ));
        }
    };
    let env = match config.get("env") {
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
    Ok(Task {
        shell,
        cmds,
        env,
        cwd: config.get("cwd").and_then(Value::as_str).map(str::to_owned),
        listed: matches!(config.get("cmds"), Some(Value::Array(_))),
    })
}

/// One finished command.
struct Ran {
    cmd: String,
    /// None: killed by a signal (`signal`).
    code: Option<i32>,
    signal: Option<i32>,
    stdout: String,
    stderr: String,
    duration_ms: u64,
}

/// Run the task on the host, or (`pool`) in that sandboxed pool's sandbox.
pub async fn run(
    config: &Map<String, Value>,
    timeout: Duration,
    pool: Option<&PythonPool>,
) -> ToolOutput {
    let t = match task(config) {
        Ok(t) => t,
        Err(e) => return ToolOutput::failed(e),
    };
    let (ran, timed_out) = match pool {
        None => on_host(&t, timeout).await,
        Some(p) => match in_sandbox(p, &t, timeout).await {
            Ok(r) => r,
            Err(e) => return ToolOutput::failed(e),
        },
    };
    assemble(&t, ran, timed_out, timeout, pool.is_some())
}

async fn on_host(t: &Task, timeout: Duration) -> (Vec<Ran>, Option<String>) {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut ran = Vec::new();
    for c in &t.cmds {
        let began = std::time::Instant::now();
        let mut cmd = Command::new(&t.shell);
        cmd.arg("-c").arg(c).envs(t.env.iter().cloned());
        crate::die_with_parent(cmd.as_std_mut());
        if let Some(d) = &t.cwd {
            cmd.current_dir(d);
        }
        cmd.stdin(Stdio::null()).kill_on_drop(true);
        let out = match tokio::time::timeout_at(deadline, cmd.output()).await {
            Err(_) => return (ran, Some(c.clone())),
            Ok(Err(e)) => {
                ran.push(Ran {
                    cmd: c.clone(),
                    code: None,
                    signal: None,
                    stdout: String::new(),
                    stderr: format!("cannot run `{c}`: {e}"),
                    duration_ms: 0,
                });
                return (ran, None);
            }
            Ok(Ok(o)) => o,
        };
        use std::os::unix::process::ExitStatusExt;
        let r = Ran {
            cmd: c.clone(),
            code: out.status.code(),
            signal: out.status.signal(),
            stdout: clip(&out.stdout),
            stderr: clip(&out.stderr),
            duration_ms: began.elapsed().as_millis() as u64,
        };
        let failed = r.code != Some(0);
        ran.push(r);
        if failed {
            break;
        }
    }
    (ran, None)
}

async fn in_sandbox(
    pool: &PythonPool,
    t: &Task,
    timeout: Duration,
) -> Result<(Vec<Ran>, Option<String>), ToolError> {
    let env: Map<String, Value> = t
        .env
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    if let Some(d) = &t.cwd
        && d.split('/').any(|s| s == "..")
    {
        return Err(ToolError::new(
            "bad_config",
            format!("`cwd` {d} leaves the sandbox's work dir"),
        ));
    }
    let mut req = Map::new();
    req.insert(
        "shell".into(),
        json!({
            "shell": t.shell,
            "cmds": t.cmds,
            "env": env,
            "cwd": t.cwd,
            "timeout_s": timeout.as_secs_f64(),
            "cpu_s": pool.cpu_s(),
        }),
    );
    // The driver keeps the deadline (and says which command it cut off); the pool's own
    // timeout, a little later, ends the whole sandbox if the driver cannot.
    let resp = pool.request(req, timeout + Duration::from_secs(2)).await?;
    let result = resp.get("result").cloned().unwrap_or(Value::Null);
    if resp.get("ok").and_then(Value::as_bool) != Some(true) {
        let msg = resp["error"]["message"]
            .as_str()
            .unwrap_or("shell driver failed");
        return Err(ToolError::new("spawn_failed", msg.to_owned()));
    }
    let ran = result["commands"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|c| {
                    let rc = c["returncode"].as_i64().unwrap_or(-1) as i32;
                    Ran {
                        cmd: c["cmd"].as_str().unwrap_or_default().to_owned(),
                        code: (rc >= 0).then_some(rc),
                        signal: (rc < 0).then_some(-rc),
                        stdout: c["stdout"].as_str().unwrap_or_default().to_owned(),
                        stderr: c["stderr"].as_str().unwrap_or_default().to_owned(),
                        duration_ms: c["duration_ms"].as_u64().unwrap_or(0),
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    let timed_out = result["timed_out"].as_str().map(str::to_owned);
    Ok((ran, timed_out))
}

fn assemble(
    t: &Task,
    ran: Vec<Ran>,
    timed_out: Option<String>,
    timeout: Duration,
    sandboxed: bool,
) -> ToolOutput {
    if let Some(c) = timed_out {
        return ToolOutput::failed(ToolError::new(
            "timeout",
            format!("shell exceeded {:.3}s running `{c}`", timeout.as_secs_f64()),
        ));
    }
    let (mut stdout, mut stderr) = (String::new(), String::new());
    let mut commands = Vec::new();
    let mut code = 0;
    for r in &ran {
        stdout.push_str(&r.stdout);
        stderr.push_str(&r.stderr);
        code = r.code.unwrap_or(-1);
        commands.push(json!({
            "cmd": r.cmd,
            "returncode": code,
            "stdout": r.stdout,
            "stderr": r.stderr,
            "duration_ms": r.duration_ms,
        }));
    }
    let mut data =
        json!({"stdout": stdout, "stderr": stderr, "exit_code": code, "returncode": code});
    if t.listed {
        data["commands"] = Value::Array(commands);
    }
    let Some(last) = ran.last().filter(|r| r.code != Some(0)) else {
        return ToolOutput::ok(data);
    };
    let c = &last.cmd;
    let e = if last.code.is_none() && last.signal.is_none() {
        ToolError::new("spawn_failed", last.stderr.clone())
    } else if let Some(e) = sandboxed.then(|| limit_hit(last, c)).flatten() {
        e
    } else {
        let mut e = ToolError::new("exit_status", format!("`{c}` exited with status {code}"));
        e.detail = Some(json!({"stderr": last.stderr}));
        e
    };
    let mut o = ToolOutput::failed(e);
    if o.error.as_ref().is_some_and(|e| e.code != "spawn_failed") {
        o.data = data;
    }
    o
}

/// A command ended by its sandbox's CPU or file-size limit.
fn limit_hit(r: &Ran, cmd: &str) -> Option<ToolError> {
    let what = crate::sandbox::limit_hit(r.signal, r.code)?;
    Some(ToolError::new(
        "resource_limit",
        format!("`{cmd}` exceeded {what}"),
    ))
}
