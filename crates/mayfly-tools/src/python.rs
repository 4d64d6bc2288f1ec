//! A warm pool of `python3` interpreters speaking JSON lines over pipes.
//!
//! Starting an interpreter costs tens of milliseconds; a warm one answers a trivial step in
//! well under one. Each request gets fresh globals, so steps do not see each other's
//! variables, while imported modules stay cached. A step that times out (or breaks the
//! protocol) gets its interpreter killed and replaced.

use crate::sandbox::{Profile, Sandbox};
use crate::{ToolError, ToolOutput};
use serde_json::{Map, Value, json};
use std::collections::VecDeque;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::{mpsc, oneshot};

const DRIVER: &str = include_str!("driver.py");
const MARK: &str = "\u{1e}@@MAYFLY@@";
/// Most requests written to one interpreter at once. While steps queue for an interpreter,
/// the next ones are already in its pipe when it finishes one: it never sleeps between
/// them, and one write carries several. Each still gets its own response and timeout.
const DEPTH: usize = 8;
/// Most bytes of requests written behind the first. The pipe is empty when a batch is
/// written, so a batch within its buffer (64 KiB) never blocks the write while the
/// interpreter, busy with the first request, cannot read.
const PIPE_ROOM: usize = 32 * 1024;

struct Interp {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

/// One step waiting for an interpreter.
struct Job {
    /// The encoded request, newline included.
    line: String,
    timeout: Duration,
    reply: oneshot::Sender<Result<Value, ToolError>>,
}

/// How an interpreter is started: on the host, or in a sandbox of a profile (one pool
/// per tenant and profile: interpreters are never shared across tenants).
#[derive(Clone, Debug)]
pub(crate) enum Launch {
    Host(String),
    Boxed {
        sandbox: Arc<Sandbox>,
        /// The interpreter's real executable (inside the sandbox at the same path).
        exe: String,
        profile: Profile,
    },
}

struct Shared {
    launch: Launch,
    jobs: tokio::sync::Mutex<mpsc::UnboundedReceiver<Job>>,
    /// Interpreter tasks started, and those of them waiting for work.
    live: AtomicUsize,
    waiting: AtomicUsize,
}

/// The interpreter pool. `size` bounds concurrent python steps in this process: steps
/// beyond it queue, and each interpreter takes the queue's next ones as it frees up.
pub struct PythonPool {
    shared: Arc<Shared>,
    jobs: mpsc::UnboundedSender<Job>,
    size: usize,
}

impl PythonPool {
    /// A pool of at most `size` interpreters of `python` (e.g. `python3`).
    pub fn new(python: impl Into<String>, size: usize) -> Self {
        Self::launching(Launch::Host(python.into()), size)
    }

    pub(crate) fn launching(launch: Launch, size: usize) -> Self {
        let (jobs, rx) = mpsc::unbounded_channel();
        PythonPool {
            shared: Arc::new(Shared {
                launch,
                jobs: tokio::sync::Mutex::new(rx),
                live: AtomicUsize::new(0),
                waiting: AtomicUsize::new(0),
            }),
            jobs,
            size: size.max(1),
        }
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// The per-step CPU budget of a sandboxed pool (None on the host).
    pub(crate) fn cpu_s(&self) -> Option<u64> {
        match &self.shared.launch {
            Launch::Boxed { profile, .. } => Some(profile.cpu_s),
            Launch::Host(_) => None,
        }
    }

    /// Start interpreters until `size` run, so the first steps pay no start-up.
    pub async fn warm(&self) -> Result<(), ToolError> {
        while self.shared.live.load(Ordering::Acquire) < self.size {
            let mut it = spawn(&self.shared.launch)?;
            // A no-op round trip proves the interpreter is ready.
            let line = request_line(&json!({"code": "result = None", "input": {}}))?;
            write(&mut it, &line).await.map_err(crashed)?;
            tokio::time::timeout(Duration::from_secs(30), response(&mut it))
                .await
                .map_err(|_| ToolError::new("timeout", "python did not start in 30s"))??;
            if !self.reserve() {
                break;
            }
            tokio::spawn(interpreter(self.shared.clone(), Some(it)));
        }
        Ok(())
    }

    /// Count one more interpreter task, unless `size` already run.
    fn reserve(&self) -> bool {
        if self.shared.live.fetch_add(1, Ordering::AcqRel) < self.size {
            return true;
        }
        self.shared.live.fetch_sub(1, Ordering::AcqRel);
        false
    }

    /// Run `code` with `input` (keys become globals, the whole map is `input_data`).
    pub async fn run(&self, code: &str, input: &Value, timeout: Duration) -> ToolOutput {
        self.run_with(code, input, Map::new(), timeout).await
    }

    /// [`run`](Self::run) with the request's other fields: `context` (`variables`,
    /// `execution_id`, `step`), `libs` (import lines), `env`.
    pub async fn run_with(
        &self,
        code: &str,
        input: &Value,
        mut extra: Map<String, Value>,
        timeout: Duration,
    ) -> ToolOutput {
        extra.insert("code".into(), Value::String(code.to_owned()));
        extra.insert("input".into(), input.clone());
        match self.request(extra, timeout).await {
            Ok(resp) => output(resp),
            Err(e) => ToolOutput::failed(e),
        }
    }

    /// Send one request (its fields as the driver reads them) and return the driver's raw
    /// response. A sandboxed pool's driver empties the work dir and sets the step's CPU
    /// budget first.
    pub(crate) async fn request(
        &self,
        mut extra: Map<String, Value>,
        timeout: Duration,
    ) -> Result<Value, ToolError> {
        if let Launch::Boxed { profile, .. } = &self.shared.launch {
            extra.insert("sandbox".into(), json!({"cpu_s": profile.cpu_s}));
        }
        let line = request_line(&Value::Object(extra))?;
        // Another interpreter only when none is free to take this step.
        if self.shared.waiting.load(Ordering::Acquire) == 0 && self.reserve() {
            tokio::spawn(interpreter(self.shared.clone(), None));
        }
        let (reply, rx) = oneshot::channel();
        let job = Job {
            line,
            timeout,
            reply,
        };
        if self.jobs.send(job).is_err() {
            return Err(ToolError::new("python_unavailable", "pool closed"));
        }
        match rx.await {
            Ok(r) => r,
            Err(_) => Err(ToolError::new(
                "python_unavailable",
                "the interpreter pool stopped",
            )),
        }
    }
}

/// `libs:` as Python import lines: `{alias: module}` → `import module as alias` (plain
/// `import module` when they are equal), `{alias: {from: pkg, import: name}}` →
/// `from pkg import name as alias` (NoETL's Python runtime). Names must be dotted
/// identifiers, so a `libs` entry cannot smuggle code.
pub fn import_lines(libs: &Value) -> Result<String, ToolError> {
    let bad = |m: String| ToolError::new("bad_config", m);
    let ident = |s: &str| {
        !s.is_empty()
            && s.split('.').all(|p| {
                p.chars()
                    .next()
                    .is_some_and(|c| c.is_alphabetic() || c == '_')
                    && p.chars().all(|c| c.is_alphanumeric() || c == '_')
            })
    };
    let Value::Object(m) = libs else {
        return Err(bad(
            "python `libs` must be a mapping of alias: module".into()
        ));
    };
    let mut out = String::new();
    for (alias, spec) in m {
        if !ident(alias) || alias.contains('.') {
            return Err(bad(format!(
                "python `libs`: `{alias}` is not a valid alias"
            )));
        }
        let line = match spec {
            Value::String(module) if ident(module) => {
                if module == alias {
                    format!("import {module}")
                } else {
                    format!("import {module} as {alias}")
                }
            }
            Value::Object(f) => {
                let from = f.get("from").and_then(Value::as_str).unwrap_or_default();
                let name = f.get("import").and_then(Value::as_str).unwrap_or_default();
                if !ident(from) || !ident(name) || name.contains('.') {
                    return Err(bad(format!(
                        "python `libs.{alias}` needs `from: <module>` and `import: <name>`"
                    )));
                }
                if name == alias {
                    format!("from {from} import {name}")
                } else {
                    format!("from {from} import {name} as {alias}")
                }
            }
            other => {
                return Err(bad(format!(
                    "python `libs.{alias}`: `{other}` is not a module name"
                )));
            }
        };
        out.push_str(&line);
        out.push('\n');
    }
    Ok(out)
}

fn spawn(launch: &Launch) -> Result<Interp, ToolError> {
    let mut cmd = match launch {
        Launch::Host(python) => {
            let mut c = std::process::Command::new(python);
            c.arg("-u").arg("-c").arg(DRIVER);
            crate::die_with_parent(&mut c);
            Command::from(c)
        }
        Launch::Boxed {
            sandbox,
            exe,
            profile,
        } => Command::from(sandbox.command(
            // CPU time is budgeted per step by the driver: the interpreter outlives steps.
            &Profile {
                cpu_s: libc::RLIM_INFINITY,
                ..profile.clone()
            },
            &[exe.clone(), "-u".into(), "-c".into(), DRIVER.into()],
            &[("PYTHONDONTWRITEBYTECODE".into(), "1".into())],
        )?),
    };
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| {
        let what = match launch {
            Launch::Host(p) => p.clone(),
            Launch::Boxed { exe, .. } => format!("{exe} in a sandbox"),
        };
        ToolError::new("python_unavailable", format!("cannot start `{what}`: {e}"))
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
        child,
        stdin,
        stdout: BufReader::new(stdout),
    })
}

/// One interpreter's life: take the queue's next steps (up to [`DEPTH`]), write them all,
/// read their responses in order. A step that times out or crashes the interpreter takes
/// it down (its state is unknown); the steps written after it had not started, so they
/// run on the replacement. Ends when the pool is dropped.
async fn interpreter(shared: Arc<Shared>, mut it: Option<Interp>) {
    let mut carried: VecDeque<Job> = VecDeque::new();
    loop {
        let mut batch: Vec<Job> = Vec::new();
        let mut behind = 0;
        let fits = |batch: &Vec<Job>, behind: usize, j: &Job| {
            batch.is_empty() || (batch.len() < DEPTH && behind + j.line.len() <= PIPE_ROOM)
        };
        while let Some(j) = carried.pop_front() {
            if !fits(&batch, behind, &j) {
                carried.push_front(j);
                break;
            }
            if !batch.is_empty() {
                behind += j.line.len();
            }
            batch.push(j);
        }
        if batch.is_empty() {
            shared.waiting.fetch_add(1, Ordering::AcqRel);
            let mut rx = shared.jobs.lock().await;
            let first = rx.recv().await;
            shared.waiting.fetch_sub(1, Ordering::AcqRel);
            let Some(first) = first else { return };
            batch.push(first);
            while let Ok(j) = rx.try_recv() {
                if !fits(&batch, behind, &j) {
                    carried.push_back(j);
                    break;
                }
                behind += j.line.len();
                batch.push(j);
            }
        }
        // A step whose caller has gone is not run.
        batch.retain(|j| !j.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        let mut interp = match it.take() {
            Some(i) => i,
            None => match spawn(&shared.launch) {
                Ok(i) => i,
                Err(e) => {
                    for j in batch {
                        let _ = j.reply.send(Err(e.clone()));
                    }
                    continue;
                }
            },
        };
        let lines: String = batch.iter().map(|j| j.line.as_str()).collect();
        let mut jobs = batch.into_iter();
        if let Err(e) = write(&mut interp, &lines).await {
            // Nothing ran: the interpreter died before it read them.
            if let Some(j) = jobs.next() {
                let _ = j.reply.send(Err(crashed(e)));
            }
            carried.extend(jobs);
            continue;
        }
        let mut healthy = true;
        while let Some(j) = jobs.next() {
            let r = match tokio::time::timeout(j.timeout, response(&mut interp)).await {
                Ok(r) => r,
                Err(_) => Err(ToolError::new(
                    "timeout",
                    format!("python step exceeded {:.3}s", j.timeout.as_secs_f64()),
                )),
            };
            healthy = r.is_ok();
            let _ = j.reply.send(r);
            if !healthy {
                carried.extend(jobs);
                break;
            }
        }
        if healthy {
            it = Some(interp);
        }
        // Otherwise `interp` is dropped here, which kills it.
    }
}

fn request_line(req: &Value) -> Result<String, ToolError> {
    let mut line =
        serde_json::to_string(req).map_err(|e| ToolError::new("python_protocol", e.to_string()))?;
    line.push('\n');
    Ok(line)
}

fn crashed(e: std::io::Error) -> ToolError {
    ToolError::new("python_crashed", format!("python interpreter failed: {e}"))
}

async fn write(it: &mut Interp, lines: &str) -> std::io::Result<()> {
    it.stdin.write_all(lines.as_bytes()).await?;
    it.stdin.flush().await
}

/// Why an interpreter stopped answering: its exit status, read for a moment (a limit of
/// its sandbox shows as the signal that enforced it).
async fn exited(it: &mut Interp) -> ToolError {
    let status = tokio::time::timeout(Duration::from_millis(500), it.child.wait())
        .await
        .ok()
        .and_then(Result::ok);
    let why = match status {
        None => "interpreter exited".to_owned(),
        Some(s) => {
            use std::os::unix::process::ExitStatusExt;
            if let Some(what) = crate::sandbox::limit_hit(s.signal(), s.code()) {
                return ToolError::new("resource_limit", format!("python step exceeded {what}"));
            }
            // bwrap reports a payload killed by signal N as exit status 128 + N.
            match s
                .signal()
                .or_else(|| s.code().filter(|c| *c > 128).map(|c| c - 128))
            {
                Some(n) => format!("interpreter killed by signal {n}"),
                None => format!("interpreter exited ({s})"),
            }
        }
    };
    crashed(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, why))
}

/// The next response of `it` (its lines without the mark are stray output, skipped).
async fn response(it: &mut Interp) -> Result<Value, ToolError> {
    let mut buf = String::new();
    loop {
        buf.clear();
        let n = it.stdout.read_line(&mut buf).await.map_err(crashed)?;
        if n == 0 {
            return Err(exited(it).await);
        }
        if let Some(rest) = buf.strip_prefix(MARK) {
            return serde_json::from_str(rest)
                .map_err(|e| ToolError::new("python_protocol", format!("bad response: {e}")));
        }
        // Unmarked line: something wrote to fd 1 directly (e.g. a subprocess); skip it.
    }
}

fn output(resp: Value) -> ToolOutput {
    let logs = json!({
        "stdout": resp.get("stdout").cloned().unwrap_or(Value::Null),
        "stderr": resp.get("stderr").cloned().unwrap_or(Value::Null),
    });
    if resp.get("ok").and_then(Value::as_bool) == Some(true) {
        // No result (None): the step's output is what it printed (NoETL).
        let result = match resp.get("result") {
            None | Some(Value::Null) => logs.clone(),
            Some(v) => v.clone(),
        };
        let mut out = ToolOutput::ok(result);
        out.logs = Some(logs);
        out
    } else {
        let err = resp.get("error").cloned().unwrap_or(Value::Null);
        let ty = err.get("type").and_then(Value::as_str).unwrap_or("Error");
        let msg = err.get("message").and_then(Value::as_str).unwrap_or("");
        let mut e = ToolError::new("python_exception", format!("{ty}: {msg}"));
        e.detail = err.get("traceback").cloned();
        let mut out = ToolOutput::failed(e);
        out.meta.insert(
            "py".into(),
            json!({"exception": ty, "traceback": err.get("traceback").cloned().unwrap_or(Value::Null)}),
        );
        out.logs = Some(logs);
        out
    }
}
