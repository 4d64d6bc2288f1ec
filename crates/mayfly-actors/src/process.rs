//! The `process` sandbox: an actor is a child process serving HTTP on `$PORT`.
//!
//! * Layout per actor: `<root>/actors/<tenant>/<actor>/{work,run,log}`. `work` is the
//!   working directory and holds the durable dirs; `run` holds what is delivered fresh on
//!   every start (the identity file `run/actor-id`, one file per secret under
//!   `run/secrets/`), is wiped on every start and stop, and is never captured.
//! * Data scope = the durable dirs as one tar stream, zstd-compressed. Full scope (process
//!   memory) is refused honestly: `unsupported_scope`.
//! * Readiness gate: a start succeeds only once `GET readiness.path` answers 200 within
//!   `readiness.deadline_ms`; otherwise the child is killed and the op fails `not_ready`.
//! * Each child leads its own process group; stop kills the group, so an actor's own
//!   children never outlive it.

use crate::{DataRequest, DataResponse, Instance, Sandbox, Streams};
use async_trait::async_trait;
use mayfly_actor_api::{
    ActorSpec, Capabilities, CheckpointKind, Delivery, Format, Overhead, Refusal, RefusalCode,
    Scope, Workload,
};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

/// Snapshot format of the process sandbox's Data scope.
pub fn data_format() -> Format {
    Format {
        id: "mayfly.process.durable-dirs.tar+zstd".into(),
        version: 1,
    }
}

/// The `process` sandbox rooted at a directory.
pub struct ProcessSandbox {
    root: PathBuf,
    http: reqwest::Client,
}

impl ProcessSandbox {
    /// A sandbox rooted at `root`. Run dirs an earlier incarnation left (identity, secrets)
    /// are wiped: nothing delivered outlives the actor it was delivered to.
    pub fn new(root: impl Into<PathBuf>) -> Result<Self, Refusal> {
        crate::install_crypto();
        let root: PathBuf = root.into();
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
                let _ = std::fs::remove_dir_all(actor.path().join("run"));
            }
        }
        let http = reqwest::Client::builder()
            .no_proxy()
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| failed(format!("http client: {e}")))?;
        Ok(ProcessSandbox { root, http })
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
        let data = restored.and_then(|(_, mut s)| s.remove("data"));
        let dirs = durable_dirs.clone();
        let identity = delivery.identity.clone();
        let secrets = delivery.secrets.clone();
        let (w, r) = (work.clone(), run.clone());
        tokio::task::spawn_blocking(move || prepare(&w, &r, &dirs, data, &identity, &secrets))
            .await
            .map_err(|e| failed(e.to_string()))??;

        let port = free_port().map_err(|e| failed(format!("no free port: {e}")))?;
        let log = std::fs::File::create(dir.join("log")).map_err(|e| failed(e.to_string()))?;
        let log2 = log.try_clone().map_err(|e| failed(e.to_string()))?;
        let mut cmd = tokio::process::Command::new(command);
        cmd.args(args)
            .current_dir(&work)
            .envs(env)
            .env("PORT", port.to_string())
            .env("MAYFLY_ACTOR", &spec.actor)
            .env("MAYFLY_TENANT", &spec.tenant)
            .env("MAYFLY_EPOCH", epoch.to_string())
            .env("MAYFLY_RUN_DIR", &run)
            .env("MAYFLY_ACTOR_ID_FILE", run.join("actor-id"))
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(|e| failed(format!("spawn `{command}`: {e}")))?;
        let pid = child.id().map(i64::from);
        let address = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_millis(readiness.deadline_ms);
        let probe = format!("{address}{}", readiness.path);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                kill_group(pid);
                return Err(failed(format!(
                    "the actor exited before it was ready ({status})"
                )));
            }
            let ok = self
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
            address,
            work,
            run,
            durable_dirs: durable_dirs.clone(),
            http: self.http.clone(),
        }))
    }
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
    use std::os::unix::fs::PermissionsExt;
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

/// Kill an orphaned actor group left by an earlier incarnation, but only if its leader is
/// still that actor (its environment names it): a recycled pid is never signalled.
pub(crate) fn reap_orphan(pgid: i64, actor: &str) {
    let env = std::fs::read(format!("/proc/{pgid}/environ")).unwrap_or_default();
    let want = format!("MAYFLY_ACTOR={actor}");
    if env.split(|b| *b == 0).any(|kv| kv == want.as_bytes()) {
        kill_group(Some(pgid));
    }
}

struct ProcessInstance {
    child: Mutex<Option<tokio::process::Child>>,
    pgid: Option<i64>,
    address: String,
    work: PathBuf,
    run: PathBuf,
    durable_dirs: Vec<String>,
    http: reqwest::Client,
}

#[async_trait]
impl Instance for ProcessInstance {
    fn address(&self) -> Option<String> {
        Some(self.address.clone())
    }

    fn pgid(&self) -> Option<i64> {
        self.pgid
    }

    async fn alive(&self) -> bool {
        let mut c = self.child.lock().await;
        matches!(c.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    async fn handle(&self, req: DataRequest) -> Result<DataResponse, Refusal> {
        let method = reqwest::Method::from_bytes(req.method.as_bytes())
            .map_err(|_| Refusal::invalid("method"))?;
        let mut rb = self
            .http
            .request(method, format!("{}{}", self.address, req.path_and_query));
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
    }
}

/// The durable dirs as a tar stream (paths relative to the work dir), zstd level 3.
/// Deterministic for identical trees: entries sorted, times and owners zeroed.
fn pack(work: &Path, dirs: &[String]) -> Result<Vec<u8>, Refusal> {
    let io = |e: std::io::Error| failed(format!("pack durable dirs: {e}"));
    let mut files = Vec::new();
    for d in dirs {
        // A durable dir (or any directory on its way) that is a symlink could point the
        // capture at the run dir (secrets) or anywhere on the host: refused.
        let mut at = work.to_path_buf();
        for part in d.split('/') {
            at.push(part);
            if std::fs::symlink_metadata(&at).is_ok_and(|m| m.file_type().is_symlink()) {
                return Err(failed(format!(
                    "durable dir `{d}` goes through a symlink; it is not captured"
                )));
            }
        }
        walk(work, &work.join(d), &mut files).map_err(io)?;
    }
    files.sort();
    let enc = zstd::stream::write::Encoder::new(Vec::new(), 3).map_err(io)?;
    let mut ar = tar::Builder::new(enc);
    for (rel, path, is_dir) in files {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        if is_dir {
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            h.set_size(0);
            ar.append_data(&mut h, &rel, std::io::empty()).map_err(io)?;
        } else {
            let bytes = std::fs::read(&path).map_err(io)?;
            h.set_entry_type(tar::EntryType::Regular);
            h.set_mode(0o644);
            h.set_size(bytes.len() as u64);
            ar.append_data(&mut h, &rel, &bytes[..]).map_err(io)?;
        }
    }
    ar.into_inner().map_err(io)?.finish().map_err(io)
}

/// Regular files and dirs under `dir` (symlinks and specials are not durable data).
fn walk(base: &Path, dir: &Path, out: &mut Vec<(String, PathBuf, bool)>) -> std::io::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let rel = |p: &Path| {
        p.strip_prefix(base)
            .map(|r| r.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    out.push((rel(dir), dir.to_path_buf(), true));
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let ft = e.file_type()?;
        let p = e.path();
        if ft.is_dir() {
            walk(base, &p, out)?;
        } else if ft.is_file() {
            out.push((rel(&p), p, false));
        }
    }
    Ok(())
}
