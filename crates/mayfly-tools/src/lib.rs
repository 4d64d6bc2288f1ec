//! Tool kinds executed inside atomic blocks: `python` (warm interpreter pool), `shell`,
//! `http`, `postgres`, `duckdb` (through the python pool), `nats` and `transfer`. (`noop` and `playbook` never reach a worker: the engine completes noops
//! inline and runs child playbooks as their own executions.)
//!
//! A tool never panics or returns a Rust error for a user-level failure: failures become
//! `ToolOutput { ok: false, error }`, which task policy rules can act on.

mod duckdb;
pub mod egress;
mod http;
pub mod keeper;
mod nats;
mod postgres;
pub mod proxy;
mod python;
pub mod sandbox;
mod shell;
mod transfer;

pub use nats::OPERATIONS as NATS_OPERATIONS;
pub use python::PythonPool;

use egress::Guard;
use mayfly_types::{Egress, ErrorInfo, Limits};
use python::Launch;
use sandbox::{Profile, Sandbox};
use serde_json::{Map, Value};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
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

    /// The `output` object that policy rules see (NoETL's scope, both runtimes' fields):
    /// `status` (`success` | `error`), `data`, `error: {kind, retryable, code, status,
    /// status_code, message, detail}` (null on success), and per tool `http: {status,
    /// headers}` + `response`, `pg: {sqlstate}`, `py: {exception, traceback}`.
    pub fn as_output(&self) -> Value {
        let mut m = self.meta.clone();
        m.insert(
            "status".into(),
            Value::String(if self.ok { "success" } else { "error" }.into()),
        );
        m.insert("data".into(), self.data.clone());
        let error = match &self.error {
            Some(e) => {
                let http = self
                    .meta
                    .get("http")
                    .and_then(|h| h.get("status"))
                    .and_then(Value::as_u64);
                let sqlstate = self
                    .meta
                    .get("pg")
                    .and_then(|p| p.get("sqlstate"))
                    .and_then(Value::as_str);
                let py = self
                    .meta
                    .get("py")
                    .and_then(|p| p.get("exception"))
                    .and_then(Value::as_str);
                let (kind, retryable) = error_kind(&e.code, &e.message, http, sqlstate, py);
                serde_json::json!({
                    "kind": kind,
                    "retryable": retryable,
                    "code": e.code,
                    "status": http,
                    "status_code": http,
                    "message": e.message,
                    "detail": e.detail,
                })
            }
            None => Value::Null,
        };
        m.insert("error".into(), error);
        Value::Object(m)
    }
}

/// NoETL's error-kind taxonomy (`noetl/core/errors.py`): the kind of a tool failure and
/// whether retrying it can help. `http` is the response status, `sqlstate` the Postgres
/// error code, `exception` the Python exception type, where there is one.
pub fn error_kind(
    code: &str,
    message: &str,
    http: Option<u64>,
    sqlstate: Option<&str>,
    exception: Option<&str>,
) -> (&'static str, bool) {
    let msg = message.to_ascii_lowercase();
    if let Some(s) = http.filter(|s| *s >= 400) {
        return match s {
            429 => ("rate_limit", true),
            401 | 403 => ("auth", false),
            404 => ("not_found", false),
            400..=499 => ("client_error", false),
            _ => ("server_error", true),
        };
    }
    if let Some(st) = sqlstate {
        return match st {
            "40001" | "40P01" => ("db_deadlock", true),
            "57014" => ("db_timeout", true),
            _ if st.starts_with("23") => ("db_constraint", false),
            _ if st.starts_with("08") => ("db_connection", true),
            _ => ("unknown", false),
        };
    }
    if let Some(ex) = exception {
        return match ex {
            "JSONDecodeError" => ("parse", false),
            "TypeError" | "ValueError" | "ValidationError" | "KeyError" | "IndexError" => {
                ("schema", false)
            }
            "TimeoutError" => ("timeout", true),
            "ConnectionError" | "ConnectionRefusedError" | "ConnectionResetError" => {
                ("connection", true)
            }
            _ => ("unknown", false),
        };
    }
    match code {
        "timeout" if msg.starts_with("postgres") => ("db_timeout", true),
        "timeout" => ("timeout", true),
        "connection_failed" if msg.starts_with("postgres") => ("db_connection", true),
        "not_found" => ("not_found", false),
        "connection_failed" | "http_error" => ("connection", true),
        "exit_status" | "python_crashed" => ("tool_error", false),
        "duckdb_error" if msg.contains("constraint") => ("db_constraint", false),
        "duckdb_error" if msg.contains("could not set lock") => ("db_deadlock", true),
        "bad_config" | "bad_credential" | "template_error" | "keychain_missing"
        | "tool_unavailable" => ("config", false),
        _ if msg.contains("deadlock") => ("db_deadlock", true),
        _ if msg.contains("timeout") || msg.contains("timed out") => ("timeout", true),
        _ if msg.contains("refused") || msg.contains("dns") || msg.contains("resolve") => {
            ("connection", true)
        }
        _ => ("unknown", false),
    }
}

/// Configuration of the tool host.
#[derive(Debug, Clone)]
pub struct ToolsConfig {
    pub python: String,
    pub python_pool: usize,
    pub default_timeout: Duration,
    /// Run tenant code (`shell`, `python`, `duckdb`) in a sandbox. When it is required and
    /// bubblewrap cannot start one, those steps fail `sandbox_unavailable` (fail closed).
    pub sandbox: bool,
    /// Egress rules for tenants whose policies set none (empty: unrestricted).
    pub default_egress: Vec<Egress>,
    /// The keeper program (`mayfly __keeper`): sandboxed code under a restricted egress
    /// policy reaches the network only through it and the egress proxy. Without one, such
    /// code fails `sandbox_unavailable` (never silently without network).
    pub keeper: Option<sandbox::Keeper>,
}

impl Default for ToolsConfig {
    fn default() -> Self {
        ToolsConfig {
            python: "python3".into(),
            python_pool: 4,
            default_timeout: Duration::from_secs(300),
            sandbox: false,
            default_egress: Vec::new(),
            keeper: None,
        }
    }
}

/// Who a task runs for: its tenant and the budgets its policies set.
#[derive(Clone, Copy, Debug)]
pub struct Scope<'a> {
    pub tenant: &'a str,
    pub limits: Option<&'a Limits>,
}

impl Default for Scope<'_> {
    fn default() -> Self {
        Scope {
            tenant: mayfly_types::DEFAULT_TENANT,
            limits: None,
        }
    }
}

/// Python pools kept per sandbox profile (tenant and bounds) at once; beyond it the least
/// recently used pool is closed (its interpreters stop once their steps finish).
const BOXED_POOLS: usize = 8;
/// Egress proxies kept (one per tenant and rule set) at once; beyond it the least recently
/// used one stops (sandboxes still using it lose their network: they are far older than
/// this many other tenants' steps).
const PROXIES: usize = 256;
static NEXT_PROXY: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

struct Boxed {
    sandbox: Arc<Sandbox>,
    /// The interpreter's real executable, or why python cannot run in a sandbox.
    python: Result<String, ToolError>,
    /// Most recently used last.
    pools: Mutex<Vec<(Profile, Arc<PythonPool>)>>,
    /// Egress proxies by tenant and rules, most recently used last; their sockets live in
    /// `dir` (0700: only this runtime and the sandboxes they are bound into reach them).
    proxies: Mutex<Vec<(String, Arc<proxy::EgressProxy>)>>,
    dir: tempfile::TempDir,
}

/// Runs tools. One per worker process; cheap to share.
pub struct Tools {
    /// The unsandboxed pool (used when the sandbox is off).
    pub python: PythonPool,
    /// Some: tenant code must run sandboxed (Err: the sandbox cannot start, and why).
    boxed: Option<Result<Boxed, ToolError>>,
    own: Vec<IpAddr>,
    http: http::Clients,
    postgres: postgres::Pools,
    duckdb: duckdb::Locks,
    nats: nats::Clients,
    pub config: ToolsConfig,
}

impl Tools {
    pub fn new(config: ToolsConfig) -> Result<Self, ToolError> {
        mayfly_types::egress::validate(&config.default_egress)
            .map_err(|m| ToolError::new("bad_policy", m))?;
        let boxed = config.sandbox.then(|| {
            let layout = sandbox::python_layout(&config.python);
            let dirs = layout.as_ref().map(|(_, d)| d.clone()).unwrap_or_default();
            let sb = Sandbox::detect(&dirs)?.with_keeper(config.keeper.clone());
            let dir = tempfile::Builder::new()
                .prefix("mayfly-egress-")
                .tempdir()
                .map_err(|e| {
                    ToolError::new(
                        "sandbox_unavailable",
                        format!("no directory for the egress proxy's sockets: {e}"),
                    )
                })?;
            Ok(Boxed {
                sandbox: Arc::new(sb),
                python: layout.map(|(exe, _)| exe.display().to_string()),
                pools: Mutex::new(Vec::new()),
                proxies: Mutex::new(Vec::new()),
                dir,
            })
        });
        Ok(Tools {
            python: PythonPool::new(config.python.clone(), config.python_pool),
            boxed,
            own: egress::own_addresses(),
            http: http::clients()?,
            postgres: postgres::Pools::default(),
            duckdb: duckdb::Locks::default(),
            nats: nats::Clients::default(),
            config,
        })
    }

    /// Why tenant code cannot run here, if the sandbox is required and does not start.
    pub fn sandbox_error(&self) -> Option<&ToolError> {
        self.boxed.as_ref().and_then(|b| b.as_ref().err())
    }

    /// Whether tenant code runs sandboxed.
    pub fn sandboxed(&self) -> bool {
        matches!(self.boxed, Some(Ok(_)))
    }

    /// The egress rules in force for `scope`: its policies' rules, else this host's default.
    fn layers<'s>(&'s self, scope: &Scope<'s>) -> &'s [Egress] {
        let layers = scope.limits.map(|l| &l.egress[..]).unwrap_or_default();
        if layers.is_empty() {
            &self.config.default_egress[..]
        } else {
            layers
        }
    }

    /// The egress guard of `scope`: its policies' rules, else this host's default.
    pub fn guard(&self, scope: &Scope<'_>) -> Result<Guard, ToolError> {
        let layers = self.layers(scope);
        if layers.is_empty() {
            // Nothing to compile (the usual `mayfly run` case, on every task).
            return Ok(Guard::open());
        }
        Guard::new(layers, &self.own)
    }

    /// The sandboxed python pool tenant code of `scope` runs in (one per tenant and bound
    /// profile), or None when tenant code runs unsandboxed (the host pool `python`).
    fn pool(&self, scope: &Scope<'_>, guard: &Guard) -> Result<Option<Arc<PythonPool>>, ToolError> {
        let b = match &self.boxed {
            None => return Ok(None),
            Some(Err(e)) => return Err(e.clone()),
            Some(Ok(b)) => b,
        };
        let mut profile = Profile::new(scope.tenant, scope.limits, guard.sandbox_network());
        if !profile.network && !guard.denies_all() {
            profile.egress = Some(self.proxy(b, scope, guard)?);
        }
        let exe = b.python.clone()?;
        let mut pools = b
            .pools
            .lock()
            .map_err(|_| ToolError::new("python_unavailable", "pool registry poisoned"))?;
        if let Some(i) = pools.iter().position(|(p, _)| *p == profile) {
            let entry = pools.remove(i);
            let pool = entry.1.clone();
            pools.push(entry);
            return Ok(Some(pool));
        }
        if pools.len() >= BOXED_POOLS {
            pools.remove(0);
        }
        let pool = Arc::new(PythonPool::launching(
            Launch::Boxed {
                sandbox: b.sandbox.clone(),
                exe,
                profile: profile.clone(),
            },
            self.config.python_pool,
        ));
        pools.push((profile, pool.clone()));
        Ok(Some(pool))
    }

    /// The socket of the egress proxy serving `scope`'s tenant under its rules (started on
    /// first use).
    fn proxy(&self, b: &Boxed, scope: &Scope<'_>, guard: &Guard) -> Result<PathBuf, ToolError> {
        let rules = serde_json::to_string(self.layers(scope)).unwrap_or_default();
        let key = format!("{}\0{rules}", scope.tenant);
        let mut proxies = b
            .proxies
            .lock()
            .map_err(|_| ToolError::new("sandbox_unavailable", "proxy registry poisoned"))?;
        if let Some(i) = proxies.iter().position(|(k, _)| *k == key) {
            let entry = proxies.remove(i);
            let path = entry.1.path().to_owned();
            proxies.push(entry);
            return Ok(path);
        }
        if proxies.len() >= PROXIES {
            proxies.remove(0);
        }
        // A name of its own per start: a socket being torn down is never reused.
        let name = format!(
            "{:016x}.sock",
            NEXT_PROXY.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let p = proxy::EgressProxy::start(guard.clone(), b.dir.path().join(name)).map_err(|e| {
            ToolError::new(
                "sandbox_unavailable",
                format!("cannot start the egress proxy: {e}"),
            )
        })?;
        let path = p.path().to_owned();
        proxies.push((key, Arc::new(p)));
        Ok(path)
    }

    /// Run one task for the default tenant under this host's defaults.
    pub async fn run(
        &self,
        kind: &str,
        config: &Map<String, Value>,
        input: &Map<String, Value>,
        timeout: Option<Duration>,
    ) -> ToolOutput {
        self.run_in(&Scope::default(), kind, config, input, timeout)
            .await
    }

    /// Run one task for `scope`. `config` is the task's rendered fields; `input` the merged
    /// step and task input. `code` for python is passed verbatim (never templated). Tenant
    /// code runs in the scope's sandbox; connections pass the scope's egress rules.
    pub async fn run_in(
        &self,
        scope: &Scope<'_>,
        kind: &str,
        config: &Map<String, Value>,
        input: &Map<String, Value>,
        timeout: Option<Duration>,
    ) -> ToolOutput {
        let timeout = timeout.unwrap_or(self.config.default_timeout);
        let guard = match self.guard(scope) {
            Ok(g) => g,
            Err(e) => return ToolOutput::failed(e),
        };
        match kind {
            "python" => {
                let code = match self.python_code(&guard, config).await {
                    Ok(c) => c,
                    Err(e) => return ToolOutput::failed(e),
                };
                let mut extra = Map::new();
                if let Some(c) = config.get(CONTEXT_KEY) {
                    extra.insert("context".into(), c.clone());
                }
                match config.get("libs").map(python::import_lines) {
                    None => {}
                    Some(Ok(lines)) => {
                        extra.insert("libs".into(), Value::String(lines));
                    }
                    Some(Err(e)) => return ToolOutput::failed(e),
                }
                match config.get("env") {
                    None | Some(Value::Null) => {}
                    Some(Value::Object(env)) => {
                        let env: Map<String, Value> = env
                            .iter()
                            .map(|(k, v)| {
                                let v = v
                                    .as_str()
                                    .map(str::to_owned)
                                    .unwrap_or_else(|| v.to_string());
                                (k.clone(), Value::String(v))
                            })
                            .collect();
                        extra.insert("env".into(), Value::Object(env));
                    }
                    Some(_) => {
                        return ToolOutput::failed(ToolError::new(
                            "bad_config",
                            "python `env` must be a mapping",
                        ));
                    }
                }
                let pool = match self.pool(scope, &guard) {
                    Ok(p) => p,
                    Err(e) => return ToolOutput::failed(e),
                };
                pool.as_deref()
                    .unwrap_or(&self.python)
                    .run_with(&code, &Value::Object(input.clone()), extra, timeout)
                    .await
            }
            "shell" => match self.pool(scope, &guard) {
                Ok(p) => shell::run(config, timeout, p.as_deref()).await,
                Err(e) => ToolOutput::failed(e),
            },
            "http" => http::run(&self.http, &guard, config, timeout).await,
            "postgres" => postgres::run(&self.postgres, &guard, config, input, timeout).await,
            "duckdb" => match self.pool(scope, &guard) {
                Ok(p) => {
                    let py = p.as_deref().unwrap_or(&self.python);
                    duckdb::run(py, &self.duckdb, config, timeout).await
                }
                Err(e) => ToolOutput::failed(e),
            },
            "nats" => nats::run(&self.nats, &guard, config, input, timeout).await,
            "transfer" => transfer::run(&self.postgres, &self.http, &guard, config, timeout).await,
            "noop" => ToolOutput::ok(match config.get("result") {
                Some(r) => r.clone(),
                None if !input.is_empty() => Value::Object(input.clone()),
                None => {
                    serde_json::json!({"status": "ok", "message": config.get("message").cloned().unwrap_or_else(|| "noop".into())})
                }
            }),
            other => ToolOutput::failed(ToolError::new(
                "unknown_tool",
                format!("tool kind `{other}` cannot run in a worker"),
            )),
        }
    }
}

/// The config key under which the worker hands a python task its `context` (the render
/// context as `variables`, `execution_id`, `step`). Not a playbook key: the schema
/// rejects it in a playbook.
pub const CONTEXT_KEY: &str = "__context";

impl Tools {
    /// A python task's source: `code`, else `code_b64`/`code_base64`, else `script`
    /// (`source.type` inline, or http fetched with this worker's client).
    async fn python_code(
        &self,
        guard: &Guard,
        config: &Map<String, Value>,
    ) -> Result<String, ToolError> {
        let bad = |m: String| ToolError::new("bad_config", m);
        if let Some(c) = config.get("code") {
            return c
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| bad("python `code` must be a string".into()));
        }
        if let Some(b) = config.get("code_b64").or(config.get("code_base64")) {
            use base64::Engine as _;
            let raw = b
                .as_str()
                .and_then(|s| {
                    base64::engine::general_purpose::STANDARD
                        .decode(s.trim())
                        .ok()
                })
                .ok_or_else(|| bad("python `code_b64` is not valid base64".into()))?;
            return String::from_utf8(raw)
                .map_err(|_| bad("python `code_b64` does not decode to UTF-8 text".into()));
        }
        let Some(script) = config.get("script") else {
            return Err(bad("python needs `code`, `code_b64` or `script`".into()));
        };
        let source = script.get("source").cloned().unwrap_or(Value::Null);
        let kind = source
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("inline");
        match kind {
            "inline" => source
                .get("code")
                .or(script.get("code"))
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| bad("python `script.source.code` is missing".into())),
            "http" => {
                let url = source
                    .get("endpoint")
                    .or(script.get("uri"))
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        bad("python `script` of type http needs `source.endpoint` or `uri`".into())
                    })?;
                let mut cfg = Map::new();
                cfg.insert("url".into(), Value::String(url.to_owned()));
                cfg.insert("response_type".into(), Value::String("text".into()));
                if let Some(m) = source.get("method") {
                    cfg.insert("method".into(), m.clone());
                }
                let timeout = seconds(source.get("timeout")).unwrap_or(Duration::from_secs(30));
                let out = http::run(&self.http, guard, &cfg, timeout).await;
                match (out.ok, out.data.get("body").and_then(Value::as_str)) {
                    (true, Some(code)) => Ok(code.to_owned()),
                    _ => Err(ToolError::new(
                        "script_unavailable",
                        format!(
                            "python script from {url}: {}",
                            out.error
                                .map(|e| e.message)
                                .unwrap_or_else(|| "no body".into())
                        ),
                    )),
                }
            }
            "file" | "gcs" | "s3" => Err(bad(format!(
                "python `script.source.type: {kind}` is not supported: a worker reads no host files or buckets for a playbook; inline the code or serve it over http"
            ))),
            other => Err(bad(format!(
                "unknown python `script.source.type` `{other}` (inline, http)"
            ))),
        }
    }
}

/// Make `cmd`'s process die with the process that starts it, even by `kill -9` (Linux
/// `PR_SET_PDEATHSIG`): an interpreter or command left running after its runtime died
/// would finish the step in flight while a resumed run runs it again. Only the direct
/// child is covered (what it starts itself is the sandbox's to contain).
pub fn die_with_parent(cmd: &mut std::process::Command) {
    #[cfg(target_os = "linux")]
    {
        let parent = std::process::id();
        // SAFETY: between fork and exec only async-signal-safe calls are made (prctl,
        // getppid, _exit) and nothing is allocated.
        use std::os::unix::process::CommandExt;
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent died before the call: no signal will come, so go now.
                if libc::getppid() as u32 != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cmd;
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
