//! The `process` sandbox: an actor is a child process serving HTTP on `$PORT`.
//!
//! * Layout per actor: `<root>/actors/<tenant>/<actor>/{work,run,sock,log,pgid}`. `work`
//!   holds the durable dirs; `run` holds what is delivered fresh on every start (the
//!   identity file `run/actor-id`, one file per secret under `run/secrets/`), is wiped on
//!   every start and stop, and is never captured.
//! * Contained (the default of `mayfly provider serve`): each actor runs in its own
//!   bubblewrap sandbox ([`mayfly_tools::sandbox`]) — own mount, PID, IPC, UTS and network
//!   namespaces, a read-only `/usr`, a bounded private `/work` and `/tmp` with only its own
//!   durable dirs bound in (`/work/<dir>`), its run dir read-only at `/run/mayfly`, seccomp,
//!   no capabilities, rlimits, and (run by root) the tenant's own uid. It sees nothing of the
//!   provider (key, journal, snapshot store), of other actors or of the host's processes,
//!   and has no network: the [`crate::keeper`] relays the provider's requests from a Unix
//!   socket the provider listens on (in a directory the sandbox never sees; the keeper
//!   inherits the listening descriptor) to `$PORT`, and ends the sandbox when the provider's
//!   lease runs out.
//! * Uncontained (`--sandbox off`, development only): a plain child process in the run dir's
//!   sibling `work`, on a loopback port.
//! * Data scope = the durable dirs as one tar stream, zstd-compressed. Full scope (process
//!   memory) is refused honestly: `unsupported_scope`.
//! * Readiness gate: a start succeeds only once `GET readiness.path` answers 200 within
//!   `readiness.deadline_ms`; otherwise the child is killed and the op fails `not_ready`.
//! * No orphans: each child leads its own process group and dies with the provider
//!   (`PR_SET_PDEATHSIG`); its group and a per-start nonce are written to `pgid` *before*
//!   the readiness wait, and a restarted provider reaps any group still carrying that nonce
//!   before it serves.

use crate::{DataRequest, DataResponse, Instance, Sandbox, Streams};
use async_trait::async_trait;
use mayfly_actor_api::{
    ActorSpec, Capabilities, CheckpointKind, Delivery, Format, Overhead, Refusal, RefusalCode,
    Scope, Workload,
};
use mayfly_tools::sandbox::Bind;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

/// Snapshot format of the process sandbox's Data scope.
pub fn data_format() -> Format {
    Format {
        id: "mayfly.process.durable-dirs.tar+zstd".into(),
        version: 1,
    }
}

pub use mayfly_tools::sandbox::KEEPER_INSIDE;

/// The descriptor the keeper finds the provider's listening socket on.
const KEEPER_FD: i32 = 3;

/// The port an actor serves on inside its own network namespace.
const CONTAINED_PORT: u16 = 8080;

/// How contained actors run.
#[derive(Clone, Debug)]
pub struct Contain {
    pub sandbox: Arc<mayfly_tools::sandbox::Sandbox>,
    /// The binary that runs [`crate::keeper`] (bound read-only into each sandbox at
    /// [`KEEPER_INSIDE`]) and the arguments that make it the keeper (`mayfly
    /// __keeper`).
    pub keeper: PathBuf,
    pub keeper_args: Vec<String>,
    /// Bounds of every actor (platform defaults where unset; CPU time is not bounded: an
    /// actor is long-lived).
    pub limits: mayfly_types::Limits,
}

/// The `process` sandbox rooted at a directory.
pub struct ProcessSandbox {
    root: PathBuf,
    http: reqwest::Client,
    contain: Option<Contain>,
}

impl ProcessSandbox {
    /// Uncontained actors (plain child processes; development and trusted code only) rooted
    /// at `root`. Run dirs an earlier incarnation left (identity, secrets) are wiped and its
    /// process groups reaped: nothing outlives the incarnation that started it.
    pub fn new(root: impl Into<PathBuf>) -> Result<Self, Refusal> {
        Self::build(root.into(), None)
    }

    /// Contained actors: each in its own sandbox (module docs).
    pub fn contained(root: impl Into<PathBuf>, contain: Contain) -> Result<Self, Refusal> {
        Self::build(root.into(), Some(contain))
    }

    fn build(root: PathBuf, contain: Option<Contain>) -> Result<Self, Refusal> {
        crate::install_crypto();
        for tenant in std::fs::read_dir(root.join("actors"))
            .into_iter()
            .flatten()
            .flatten()
        {
            for actor in std::fs::read_dir(tenant.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                reap_recorded(&actor.path().join("pgid"));
                let _ = std::fs::remove_dir_all(actor.path().join("run"));
            }
        }
        // Readable by the tenant uids actors run as (a provider run by root).
        let lease = root.join("lease");
        std::fs::create_dir_all(&lease)
            .and_then(|()| std::fs::set_permissions(&lease, std::fs::Permissions::from_mode(0o755)))
            .map_err(|e| failed(format!("lease dir: {e}")))?;
        let http = reqwest::Client::builder()
            .no_proxy()
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| failed(format!("http client: {e}")))?;
        let s = ProcessSandbox {
            root,
            http,
            contain,
        };
        s.write_lease(None)?;
        Ok(s)
    }

    /// Whether actors run contained.
    pub fn is_contained(&self) -> bool {
        self.contain.is_some()
    }

    /// The provider's lease as contained actors see it (`None`: no control plane, no lease).
    /// Replaced atomically: the keepers read the directory it lives in.
    fn write_lease(&self, until_ms: Option<u64>) -> Result<(), Refusal> {
        let dir = self.root.join("lease");
        let tmp = dir.join(".until");
        let text = until_ms.map_or_else(|| "none".to_owned(), |u| u.to_string());
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)))
            .and_then(|()| std::fs::rename(&tmp, dir.join("until")))
            .map_err(|e| failed(format!("lease file: {e}")))
    }

    fn dir(&self, spec: &ActorSpec) -> PathBuf {
        // Both are `is_name`-checked by OpRequest::check: no separators, never `..`.
        self.root
            .join("actors")
            .join(&spec.tenant)
            .join(&spec.actor)
    }
}

fn failed(m: impl Into<String>) -> Refusal {
    Refusal::new(RefusalCode::SandboxFailed, m)
}

#[async_trait]
impl Sandbox for ProcessSandbox {
    fn class(&self) -> &'static str {
        "process"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            contract: mayfly_actor_api::CONTRACT_VERSION.into(),
            classes: vec!["process".into()],
            scopes: vec![Scope::Data],
            kinds: vec![CheckpointKind::Local, CheckpointKind::External],
            formats: vec![data_format()],
            golden_restore: true,
            overhead: Overhead {
                memory_bytes: 8 << 20,
                start_ms: 50,
            },
        }
    }

    fn format(&self, scope: Scope) -> Option<Format> {
        (scope == Scope::Data).then(data_format)
    }

    async fn start(
        &self,
        spec: &ActorSpec,
        epoch: u64,
        delivery: &Delivery,
        restored: Option<(Scope, Streams)>,
    ) -> Result<Box<dyn Instance>, Refusal> {
        let Workload::Process {
            command,
            args,
            env,
            durable_dirs,
            readiness,
        } = &spec.workload
        else {
            return Err(Refusal::new(
                RefusalCode::UnsupportedClass,
                "the process sandbox runs only process workloads",
            ));
        };
        let dir = self.dir(spec);
        let work = dir.join("work");
        let run = dir.join("run");
        let sock = dir.join("sock");
        let data = restored.and_then(|(_, mut s)| s.remove("data"));
        let dirs = durable_dirs.clone();
        let identity = delivery.identity.clone();
        let secrets = delivery.secrets.clone();
        let owner = self.contain.as_ref().and_then(|c| {
            c.sandbox.runs_as(&mayfly_tools::sandbox::Profile::new(
                &spec.tenant,
                None,
                false,
            ))
        });
        let (w, r, k) = (work.clone(), run.clone(), sock.clone());
        tokio::task::spawn_blocking(move || {
            prepare(&w, &r, &dirs, data, &identity, &secrets)?;
            // The provider's alone (the sandbox never sees it): nobody but the provider
            // connects to an actor, and no actor can swap the socket for another.
            recreate(&k)?;
            std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| failed(format!("socket dir: {e}")))?;
            match owner {
                Some(uid) => give(&[&w, &r], uid),
                None => Ok(()),
            }
        })
        .await
        .map_err(|e| failed(e.to_string()))??;

        let nonce = uuid::Uuid::now_v7().simple().to_string();
        let log = std::fs::File::create(dir.join("log")).map_err(|e| failed(e.to_string()))?;
        let log2 = log.try_clone().map_err(|e| failed(e.to_string()))?;
        // The contained actor's listening socket, held until the keeper has it.
        let mut listening = None;
        let (std_cmd, ingress) = match &self.contain {
            Some(c) => {
                let mut profile =
                    mayfly_tools::sandbox::Profile::new(&spec.tenant, Some(&c.limits), false);
                profile.cpu_s = u64::MAX;
                let mut binds = Vec::new();
                let mut sorted = durable_dirs.clone();
                sorted.sort();
                for d in &sorted {
                    binds.push(Bind {
                        host: work.join(d),
                        inside: Path::new("/work").join(d),
                        writable: true,
                    });
                }
                binds.extend([
                    Bind {
                        host: run.clone(),
                        inside: "/run/mayfly".into(),
                        writable: false,
                    },
                    Bind {
                        host: self.root.join("lease"),
                        inside: "/run/mayfly-lease".into(),
                        writable: false,
                    },
                    Bind {
                        host: c.keeper.clone(),
                        inside: KEEPER_INSIDE.into(),
                        writable: false,
                    },
                ]);
                let mut argv = vec![KEEPER_INSIDE.to_owned()];
                argv.extend(c.keeper_args.iter().cloned());
                argv.extend(
                    [
                        "--listen-fd",
                        &KEEPER_FD.to_string(),
                        "--port",
                        &CONTAINED_PORT.to_string(),
                        "--lease",
                        "/run/mayfly-lease/until",
                        "--",
                        command,
                    ]
                    .map(str::to_owned),
                );
                argv.extend(args.iter().cloned());
                let mut envs: Vec<(String, String)> =
                    env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                envs.extend(
                    [
                        ("PORT", CONTAINED_PORT.to_string()),
                        ("MAYFLY_ACTOR", spec.actor.clone()),
                        ("MAYFLY_TENANT", spec.tenant.clone()),
                        ("MAYFLY_EPOCH", epoch.to_string()),
                        ("MAYFLY_RUN_DIR", "/run/mayfly".into()),
                        ("MAYFLY_ACTOR_ID_FILE", "/run/mayfly/actor-id".into()),
                        ("MAYFLY_START", nonce.clone()),
                    ]
                    .map(|(k, v)| (k.to_owned(), v)),
                );
                let mut cmd = c
                    .sandbox
                    .command_with(&profile, &argv, &envs, &binds)
                    .map_err(|e| failed(e.to_string()))?;
                // The socket's host path can exceed a socket address's 108 bytes; a
                // descriptor of its directory names it in a few.
                let dir_fd = std::fs::File::open(&sock).map_err(|e| failed(e.to_string()))?;
                let via = format!("/proc/self/fd/{}/http.sock", dir_fd.as_raw_fd());
                // The provider listens; the keeper inherits the listening socket as
                // KEEPER_FD. Moved high first, clear of the descriptors the sandbox's own
                // setup places (stdio, the seccomp programs at 10 and up).
                let listener = std::os::unix::net::UnixListener::bind(&via)
                    .map_err(|e| failed(format!("actor socket: {e}")))?;
                let high = rustix::io::fcntl_dupfd_cloexec(&listener, 100)
                    .map_err(|e| failed(format!("actor socket: {e}")))?;
                let raw = high.as_raw_fd();
                {
                    use std::os::unix::process::CommandExt;
                    // SAFETY: only dup2 (async-signal-safe) between fork and exec.
                    unsafe {
                        cmd.pre_exec(move || {
                            if libc::dup2(raw, KEEPER_FD) < 0 {
                                return Err(std::io::Error::last_os_error());
                            }
                            Ok(())
                        });
                    }
                }
                listening = Some((listener, high));
                let http = reqwest::Client::builder()
                    .unix_socket(via.as_str())
                    .pool_idle_timeout(Duration::from_secs(30))
                    .build()
                    .map_err(|e| failed(format!("http client: {e}")))?;
                let address = format!("unix:{}", sock.join("http.sock").display());
                (
                    cmd,
                    Ingress {
                        base: "http://actor".into(),
                        address,
                        http,
                        _dir: Some(dir_fd),
                    },
                )
            }
            None => {
                let port = free_port().map_err(|e| failed(format!("no free port: {e}")))?;
                let mut cmd = std::process::Command::new(command);
                cmd.args(args)
                    .current_dir(&work)
                    .envs(env)
                    .env("PORT", port.to_string())
                    .env("MAYFLY_ACTOR", &spec.actor)
                    .env("MAYFLY_TENANT", &spec.tenant)
                    .env("MAYFLY_EPOCH", epoch.to_string())
                    .env("MAYFLY_RUN_DIR", &run)
                    .env("MAYFLY_ACTOR_ID_FILE", run.join("actor-id"))
                    .env("MAYFLY_START", &nonce);
                mayfly_tools::die_with_parent(&mut cmd);
                let address = format!("http://127.0.0.1:{port}");
                (
                    cmd,
                    Ingress {
                        base: address.clone(),
                        address,
                        http: self.http.clone(),
                        _dir: None,
                    },
                )
            }
        };
        let mut cmd = tokio::process::Command::from(std_cmd);
        cmd.stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0)
            .kill_on_drop(true);
        // Spawned from this (runtime) thread: the death signal follows the thread that
        // forked, and a blocking-pool thread retires when idle.
        let mut child = cmd
            .spawn()
            .map_err(|e| failed(format!("spawn `{command}`: {e}")))?;
        drop(listening);
        let pid = child.id().map(i64::from);
        let pgid_file = dir.join("pgid");
        if let Some(p) = pid {
            // Recorded before the readiness wait: a provider killed now leaves a record.
            if let Err(e) = std::fs::write(&pgid_file, format!("{p} {nonce}")) {
                kill_group(pid);
                return Err(failed(format!("pgid record: {e}")));
            }
        }
        let deadline = Instant::now() + Duration::from_millis(readiness.deadline_ms);
        let probe = format!("{}{}", ingress.base, readiness.path);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                kill_group(pid);
                let _ = std::fs::remove_file(&pgid_file);
                return Err(failed(format!(
                    "the actor exited before it was ready ({status}); the end of its output: {}",
                    tail(&dir.join("log"))
                )));
            }
            let ok = ingress
                .http
                .get(&probe)
                .timeout(Duration::from_millis(500))
                .send()
                .await
                .is_ok_and(|r| r.status() == reqwest::StatusCode::OK);
            if ok {
                break;
            }
            if Instant::now() >= deadline {
                kill_group(pid);
                let _ = child.kill().await;
                let _ = std::fs::remove_file(&pgid_file);
                return Err(Refusal::new(
                    RefusalCode::NotReady,
                    format!(
                        "GET {} did not answer 200 within {} ms",
                        readiness.path, readiness.deadline_ms
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
        Ok(Box::new(ProcessInstance {
            child: Mutex::new(Some(child)),
            pgid: pid,
            pgid_file,
            ingress,
            work,
            run,
            durable_dirs: durable_dirs.clone(),
        }))
    }

    fn lease(&self, until_ms: Option<u64>) {
        if let Err(e) = self.write_lease(until_ms) {
            tracing::error!(error = %e.message, "cannot renew the actors' lease file");
        }
    }
}

/// The last kilobyte of an actor's log, for a failed start's message.
fn tail(log: &Path) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let mut bytes = Vec::new();
    if let Ok(mut f) = std::fs::File::open(log) {
        let _ = f
            .seek(SeekFrom::End(-1024))
            .or_else(|_| f.seek(SeekFrom::Start(0)));
        let _ = f.take(1024).read_to_end(&mut bytes);
    }
    let text = String::from_utf8_lossy(&bytes);
    match text.trim() {
        "" => "(nothing)".to_owned(),
        t => t.to_owned(),
    }
}

/// How the provider reaches one actor.
struct Ingress {
    /// URL prefix of requests (`http://actor` over the keeper's Unix socket).
    base: String,
    /// What the provider reports as the actor's address.
    address: String,
    http: reqwest::Client,
    /// The socket directory, held open for `/proc/self/fd/N/http.sock`.
    _dir: Option<std::fs::File>,
}

/// An empty directory at `d`.
fn recreate(d: &Path) -> Result<(), Refusal> {
    if d.exists() {
        std::fs::remove_dir_all(d).map_err(|e| failed(format!("clean: {e}")))?;
    }
    std::fs::create_dir_all(d).map_err(|e| failed(format!("mkdir: {e}")))
}

/// Hand the actor's dirs to the tenant's uid (a provider run by root starts actors as the
/// tenant): everything under them, recursively, never following a link.
fn give(dirs: &[&Path], uid: u32) -> Result<(), Refusal> {
    fn walk(p: &Path, uid: u32) -> std::io::Result<()> {
        std::os::unix::fs::lchown(p, Some(uid), Some(uid))?;
        if std::fs::symlink_metadata(p)?.is_dir() {
            for e in std::fs::read_dir(p)? {
                walk(&e?.path(), uid)?;
            }
        }
        Ok(())
    }
    for d in dirs {
        walk(d, uid).map_err(|e| failed(format!("chown {}: {e}", d.display())))?;
    }
    Ok(())
}

/// Reap the process group a `pgid` record names if its leader still carries the record's
/// start nonce (a recycled pid is never signalled), then drop the record.
fn reap_recorded(record: &Path) {
    let Ok(text) = std::fs::read_to_string(record) else {
        return;
    };
    if let Some((pgid, nonce)) = text.trim().split_once(' ')
        && let Ok(pgid) = pgid.parse::<i64>()
    {
        let env = std::fs::read(format!("/proc/{pgid}/environ")).unwrap_or_default();
        let want = format!("MAYFLY_START={nonce}");
        if env.split(|b| *b == 0).any(|kv| kv == want.as_bytes()) {
            tracing::warn!(pgid, "reaping an actor an earlier provider left running");
            kill_group(Some(pgid));
        }
    }
    let _ = std::fs::remove_file(record);
}

/// Lay out the actor's dirs: work (emptied, then the restored data or empty durable dirs),
/// run (emptied, then the fresh identity and secrets, owner-only).
fn prepare(
    work: &Path,
    run: &Path,
    durable_dirs: &[String],
    data: Option<Vec<u8>>,
    identity: &str,
    secrets: &std::collections::BTreeMap<String, String>,
) -> Result<(), Refusal> {
    let io = |what: &str, e: std::io::Error| failed(format!("{what}: {e}"));
    for d in [work, run] {
        if d.exists() {
            std::fs::remove_dir_all(d).map_err(|e| io("clean", e))?;
        }
        std::fs::create_dir_all(d).map_err(|e| io("mkdir", e))?;
    }
    if let Some(data) = data {
        let dec = zstd::stream::read::Decoder::new(&data[..]).map_err(|e| {
            Refusal::new(RefusalCode::ManifestUnreadable, format!("data stream: {e}"))
        })?;
        let mut ar = tar::Archive::new(dec);
        // Only files and directories (what `pack` writes): a link in a crafted image could
        // point a later entry outside `work`. `unpack_in` refuses `..` and absolute paths.
        for entry in ar.entries().map_err(|e| unreadable(&e))? {
            let mut entry = entry.map_err(|e| unreadable(&e))?;
            let kind = entry.header().entry_type();
            if !(kind.is_file() || kind.is_dir()) {
                return Err(Refusal::new(
                    RefusalCode::ManifestUnreadable,
                    "the data stream holds an entry that is neither a file nor a directory",
                ));
            }
            entry.unpack_in(work).map_err(|e| unreadable(&e))?;
        }
    }
    for d in durable_dirs {
        std::fs::create_dir_all(work.join(d)).map_err(|e| io("durable dir", e))?;
    }
    std::fs::set_permissions(run, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| io("run dir", e))?;
    write_private(&run.join("actor-id"), identity.as_bytes())?;
    if !secrets.is_empty() {
        let sdir = run.join("secrets");
        std::fs::create_dir_all(&sdir).map_err(|e| io("secrets dir", e))?;
        for (k, v) in secrets {
            if !mayfly_actor_api::is_name(k, 128) {
                return Err(Refusal::invalid(format!("secret name `{k}`")));
            }
            write_private(&sdir.join(k), v.as_bytes())?;
        }
    }
    Ok(())
}

fn unreadable(e: &std::io::Error) -> Refusal {
    Refusal::new(
        RefusalCode::ManifestUnreadable,
        format!("data stream does not unpack: {e}"),
    )
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), Refusal> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| failed(format!("{}: {e}", path.display())))?;
    f.write_all(bytes)
        .map_err(|e| failed(format!("{}: {e}", path.display())))
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// SIGKILL a whole process group.
pub(crate) fn kill_group(pgid: Option<i64>) {
    if let Some(p) = pgid.and_then(|p| i32::try_from(p).ok()).filter(|p| *p > 1) {
        // SAFETY: kill(2) with a negative pid signals a process group; no memory is shared.
        unsafe {
            libc::kill(-p, libc::SIGKILL);
        }
    }
}

struct ProcessInstance {
    child: Mutex<Option<tokio::process::Child>>,
    pgid: Option<i64>,
    pgid_file: PathBuf,
    ingress: Ingress,
    work: PathBuf,
    run: PathBuf,
    durable_dirs: Vec<String>,
}

#[async_trait]
impl Instance for ProcessInstance {
    fn address(&self) -> Option<String> {
        Some(self.ingress.address.clone())
    }

    async fn alive(&self) -> bool {
        let mut c = self.child.lock().await;
        matches!(c.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    async fn handle(&self, req: DataRequest) -> Result<DataResponse, Refusal> {
        let method = reqwest::Method::from_bytes(req.method.as_bytes())
            .map_err(|_| Refusal::invalid("method"))?;
        let mut rb = self.ingress.http.request(
            method,
            format!("{}{}", self.ingress.base, req.path_and_query),
        );
        for (k, v) in &req.headers {
            rb = rb.header(k, v);
        }
        let resp = rb
            .body(req.body)
            .send()
            .await
            .map_err(|e| failed(format!("actor unreachable: {e}")))?;
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
            .collect();
        let body = resp
            .bytes()
            .await
            .map_err(|e| failed(format!("actor response: {e}")))?;
        Ok(DataResponse {
            status,
            headers,
            body,
        })
    }

    async fn capture(&self, scope: Scope, teardown: bool) -> Result<Streams, Refusal> {
        if scope != Scope::Data {
            return Err(Refusal::new(
                RefusalCode::UnsupportedScope,
                "the process sandbox cannot capture process memory (Full scope)",
            ));
        }
        if teardown {
            // Stop first: the captured dirs are then exactly what the actor left.
            self.stop().await;
        }
        let work = self.work.clone();
        let dirs = self.durable_dirs.clone();
        let data = tokio::task::spawn_blocking(move || pack(&work, &dirs))
            .await
            .map_err(|e| failed(e.to_string()))??;
        Ok(Streams::from([("data".to_owned(), data)]))
    }

    async fn stop(&self) {
        kill_group(self.pgid);
        if let Some(mut c) = self.child.lock().await.take() {
            let _ = c.kill().await;
        }
        let _ = tokio::fs::remove_dir_all(&self.run).await;
        let _ = tokio::fs::remove_file(&self.pgid_file).await;
    }
}

/// The durable dirs as a tar stream (paths relative to the work dir), zstd level 3.
/// Deterministic for identical trees: entries sorted, times and owners zeroed.
///
/// A live capture reads while the actor runs, so every name is opened relative to its
/// directory's descriptor without following links (`openat`, `O_NOFOLLOW`), and each file
/// is read from the descriptor it was checked on: an actor that swaps a file or a
/// directory for a link (to a provider key, say) mid-capture gets an error, never the
/// link's target. Anything but regular files and directories is left out.
fn pack(work: &Path, dirs: &[String]) -> Result<Vec<u8>, Refusal> {
    let io = |e: std::io::Error| failed(format!("pack durable dirs: {e}"));
    let root = open_dir(None, work.as_os_str()).map_err(|e| io(e.into()))?;
    let mut entries = Vec::new();
    for d in dirs {
        let mut at = root.try_clone().map_err(io)?;
        let mut missing = false;
        for part in d.split('/') {
            match open_dir(Some(&at), std::ffi::OsStr::new(part)) {
                Ok(next) => at = next,
                Err(rustix::io::Errno::NOENT) => {
                    missing = true;
                    break;
                }
                Err(rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR) => {
                    return Err(failed(format!(
                        "durable dir `{d}` goes through a symlink; it is not captured"
                    )));
                }
                Err(e) => return Err(io(e.into())),
            }
        }
        if !missing {
            collect(at, d.clone(), &mut entries).map_err(io)?;
        }
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let enc = zstd::stream::write::Encoder::new(Vec::new(), 3).map_err(io)?;
    let mut ar = tar::Builder::new(enc);
    for (rel, bytes) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        match bytes {
            None => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                ar.append_data(&mut h, &rel, std::io::empty()).map_err(io)?;
            }
            Some(bytes) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644);
                h.set_size(bytes.len() as u64);
                ar.append_data(&mut h, &rel, &bytes[..]).map_err(io)?;
            }
        }
    }
    ar.into_inner().map_err(io)?.finish().map_err(io)
}

/// A directory, opened without following a link (relative to `at` when given).
fn open_dir(
    at: Option<&std::os::fd::OwnedFd>,
    name: &std::ffi::OsStr,
) -> rustix::io::Result<std::os::fd::OwnedFd> {
    use rustix::fs::{CWD, Mode, OFlags};
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    match at {
        Some(dir) => rustix::fs::openat(dir, name, flags, Mode::empty()),
        None => rustix::fs::openat(CWD, name, flags, Mode::empty()),
    }
}

/// `dir` (named `rel`) and everything under it: (relative path, None for a directory or the
/// bytes of a regular file).
fn collect(
    dir: std::os::fd::OwnedFd,
    rel: String,
    out: &mut Vec<(String, Option<Vec<u8>>)>,
) -> std::io::Result<()> {
    use rustix::fs::{FileType, Mode, OFlags};
    use std::os::unix::ffi::OsStrExt;
    out.push((rel.clone(), None));
    let mut names = Vec::new();
    for entry in rustix::fs::Dir::read_from(&dir)? {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(name.to_vec());
        }
    }
    for name in names {
        let name = std::ffi::OsStr::from_bytes(&name);
        let child = format!("{rel}/{}", name.to_string_lossy());
        // Opened as a non-blocking, link-refusing descriptor first; what it *is* comes from
        // that descriptor, not from the name (which the actor may have swapped meanwhile).
        let fd = match rustix::fs::openat(
            &dir,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            // A link (ELOOP), a socket (ENXIO) or something gone meanwhile: not durable data.
            Err(rustix::io::Errno::LOOP | rustix::io::Errno::NXIO | rustix::io::Errno::NOENT) => {
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        match FileType::from_raw_mode(rustix::fs::fstat(&fd)?.st_mode) {
            FileType::Directory => collect(fd, child, out)?,
            FileType::RegularFile => {
                let mut bytes = Vec::new();
                std::io::Read::read_to_end(&mut std::fs::File::from(fd), &mut bytes)?;
                out.push((child, Some(bytes)));
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a capture takes: regular files and directories, read through descriptors opened
    /// without following links — never a link's target, never a FIFO (which would block),
    /// never a socket; a durable dir that is itself a link is refused.
    #[test]
    fn a_capture_takes_files_and_dirs_never_what_links_point_at() {
        let d = tempfile::tempdir().unwrap();
        let work = d.path().join("work");
        let data = work.join("data");
        std::fs::create_dir_all(data.join("sub")).unwrap();
        std::fs::write(data.join("a"), "A").unwrap();
        std::fs::write(data.join("sub/b"), "B").unwrap();
        let secret = d.path().join("provider.key");
        std::fs::write(&secret, "PROVIDER-SECRET").unwrap();
        std::os::unix::fs::symlink(&secret, data.join("link")).unwrap();
        std::os::unix::fs::symlink(d.path(), data.join("dirlink")).unwrap();
        let fifo = std::ffi::CString::new(data.join("fifo").to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let _sock = std::os::unix::net::UnixListener::bind(data.join("sock")).unwrap();
        let packed = pack(&work, &["data".into()]).unwrap();
        let tar = zstd::decode_all(&packed[..]).unwrap();
        let mut ar = tar::Archive::new(&tar[..]);
        let names: Vec<String> = ar
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(names, ["data", "data/a", "data/sub", "data/sub/b"]);
        assert!(!tar.windows(15).any(|w| w == b"PROVIDER-SECRET"));
        std::os::unix::fs::symlink(d.path(), work.join("evil")).unwrap();
        let e = pack(&work, &["evil".into()]).unwrap_err();
        assert!(e.message.contains("symlink"), "{e}");
        let e = pack(&work, &["data/dirlink/work".into()]).unwrap_err();
        assert!(e.message.contains("symlink"), "{e}");
    }
}
