//! The provider conformance suite (csi-sanity style): drives any provider endpoint through
//! the contract and reports each check as passed, failed or skipped (with why). It skips
//! what the provider does not advertise, cleans up the actors it placed, and repeats ops on
//! purpose. `mayfly provider conformance --endpoint URL` runs it; CI runs it against both
//! built-in providers.
//!
//! The suite plays the control plane: it signs snapshot envelopes with a control key the
//! provider trusts. The corrupted-blob check needs write access to the provider's external
//! snapshot store (a local directory); without it that one check is skipped.

use crate::client::{ClientError, ProviderClient};
use mayfly_actor_api::{
    ActorSpec, CONTRACT_VERSION, CheckpointKind, Delivery, Desired, Manifest, Op, OpRequest,
    OpState, OpStatus, Readiness, RefusalCode, Scope, Workload,
};
use mayfly_trust::sign::{ControlKey, Purpose, Signed};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// The HTTP test actor for the `process` class: `GET /` reports its identity, boot id, epoch
/// and a counter kept in its durable dir; `POST /` increments the counter (`POST /slow…`
/// after 1.5 s).
pub const PROCESS_ACTOR: &str = r#"
import http.server, json, os, hashlib, time
BOOT = os.urandom(8).hex()
os.makedirs("data", exist_ok=True)
def counter():
    try:
        return int(open("data/counter").read())
    except Exception:
        return 0
def body(path=""):
    run = os.environ["MAYFLY_RUN_DIR"]
    secret = os.path.join(run, "secrets", "token")
    s = open(secret).read() if os.path.exists(secret) else ""
    return {"actor": os.environ["MAYFLY_ACTOR"], "boot": BOOT, "counter": counter(),
            "epoch": int(os.environ["MAYFLY_EPOCH"]),
            "identity": open(os.environ["MAYFLY_ACTOR_ID_FILE"]).read(),
            "secret_sha256": hashlib.sha256(s.encode()).hexdigest() if s else None,
            "path": path}
class H(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass
    def reply(self, code, obj):
        b = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(b)))
        self.end_headers()
        self.wfile.write(b)
    def do_GET(self):
        self.reply(200, {} if self.path == "/ready" else body(self.path))
    def do_POST(self):
        n = int(self.headers.get("content-length") or 0)
        self.rfile.read(n)
        if self.path.startswith("/slow"):
            time.sleep(1.5)
        with open("data/counter.tmp", "w") as f:
            f.write(str(counter() + 1))
        os.replace("data/counter.tmp", "data/counter")
        self.reply(200, body(self.path))
http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"#;

/// The HTTP test actor for the `wasm` class (WAT, which the wasm sandbox compiles): the same
/// answers as [`PROCESS_ACTOR`] — `actor`, `identity` (host calls, fresh per start),
/// `counter` (in linear memory, so Full scope carries it) and `boot` (an exported mutable
/// global set by `init`, so golden snapshots and restores carry it).
pub const WASM_ACTOR: &str = r#"(module
  (import "mayfly" "identity" (func $identity (param i32 i32) (result i32)))
  (import "mayfly" "actor" (func $actor (param i32 i32) (result i32)))
  (import "mayfly" "nonce" (func $nonce (result i32)))
  (memory (export "memory") 1)
  (global $heap (export "heap") (mut i32) (i32.const 4096))
  (global $boot (export "boot") (mut i32) (i32.const 0))
  (global $out (mut i32) (i32.const 0))
  (data (i32.const 100) "{\"actor\":\"")
  (data (i32.const 120) "\",\"identity\":\"")
  (data (i32.const 140) "\",\"counter\":")
  (data (i32.const 160) ",\"boot\":")
  (data (i32.const 180) "}")
  (func $alloc (export "alloc") (param $n i32) (result i32) (local $p i32)
    (if (i32.gt_u (i32.add (global.get $heap) (local.get $n)) (i32.const 65000))
      (then (global.set $heap (i32.const 4096))))
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $n)))
    (local.get $p))
  (func (export "init") (global.set $boot (call $nonce)))
  (func $copy (param $src i32) (param $n i32)
    (memory.copy (global.get $out) (local.get $src) (local.get $n))
    (global.set $out (i32.add (global.get $out) (local.get $n))))
  (func $num (param $v i32) (local $p i32)
    (local.set $p (i32.const 220))
    (loop $l
      (local.set $p (i32.sub (local.get $p) (i32.const 1)))
      (i32.store8 (local.get $p) (i32.add (i32.const 48) (i32.rem_u (local.get $v) (i32.const 10))))
      (local.set $v (i32.div_u (local.get $v) (i32.const 10)))
      (br_if $l (i32.ne (local.get $v) (i32.const 0))))
    (call $copy (local.get $p) (i32.sub (i32.const 220) (local.get $p))))
  (func (export "handle") (param $mp i32) (param $ml i32) (param $pp i32) (param $pl i32)
        (param $bp i32) (param $bl i32) (result i64) (local $start i32)
    (if (i32.eq (i32.load8_u (local.get $mp)) (i32.const 80))
      (then (i32.store (i32.const 16) (i32.add (i32.load (i32.const 16)) (i32.const 1)))))
    (local.set $start (call $alloc (i32.const 1024)))
    (global.set $out (local.get $start))
    (call $copy (i32.const 100) (i32.const 10))
    (global.set $out (i32.add (global.get $out) (call $actor (global.get $out) (i32.const 128))))
    (call $copy (i32.const 120) (i32.const 14))
    (global.set $out (i32.add (global.get $out) (call $identity (global.get $out) (i32.const 256))))
    (call $copy (i32.const 140) (i32.const 12))
    (call $num (i32.load (i32.const 16)))
    (call $copy (i32.const 160) (i32.const 8))
    (call $num (global.get $boot))
    (call $copy (i32.const 180) (i32.const 1))
    (i64.or (i64.shl (i64.extend_i32_u (local.get $start)) (i64.const 32))
            (i64.extend_i32_u (i32.sub (global.get $out) (local.get $start))))))
"#;

/// The wasm-class test workload (its module is [`WASM_ACTOR`], by digest).
pub fn wasm_workload() -> Workload {
    Workload::Wasm {
        module: mayfly_trust::sha256_digest(WASM_ACTOR.as_bytes()),
        handler: "handle".into(),
    }
}

/// The process-class test workload.
pub fn process_workload() -> Workload {
    Workload::Process {
        command: "python3".into(),
        args: vec!["-c".into(), PROCESS_ACTOR.into()],
        env: BTreeMap::new(),
        durable_dirs: vec!["data".into()],
        readiness: Readiness {
            path: "/ready".into(),
            deadline_ms: 15_000,
        },
    }
}

/// How to run the suite.
pub struct Config {
    pub client: ProviderClient,
    /// The control key the provider trusts for snapshot envelopes.
    pub key: ControlKey,
    /// The tenant the suite's actors live in (each run uses fresh actor ids).
    pub tenant: String,
    /// The provider's external snapshot store directory, for the corrupted-blob check.
    pub snapshot_dir: Option<PathBuf>,
    /// Workloads by sandbox class (defaults: [`process_workload`] for `process`).
    pub workloads: BTreeMap<String, Workload>,
}

/// One check's outcome.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Passed,
    Failed(String),
    Skipped(String),
}

/// The suite's report.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub checks: Vec<(String, Outcome)>,
}

impl Report {
    pub fn failed(&self) -> usize {
        self.checks
            .iter()
            .filter(|(_, o)| matches!(o, Outcome::Failed(_)))
            .count()
    }
    pub fn passed(&self) -> usize {
        self.checks
            .iter()
            .filter(|(_, o)| matches!(o, Outcome::Passed))
            .count()
    }
    pub fn skipped(&self) -> usize {
        self.checks
            .iter()
            .filter(|(_, o)| matches!(o, Outcome::Skipped(_)))
            .count()
    }
}

type Check = Result<(), String>;

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

struct Run {
    cfg: Config,
    run: String,
    wait: Duration,
    /// The provider's id: the suite grants its ops' blobs to it, as the control plane does.
    provider: String,
}

/// Run every check against one provider.
pub async fn run(cfg: Config) -> Report {
    let mut report = Report::default();
    let info = match cfg.client.info().await {
        Ok(i) => i,
        Err(e) => {
            report
                .checks
                .push(("provider_info".into(), Outcome::Failed(e.to_string())));
            return report;
        }
    };
    let r = Run {
        cfg,
        run: uuid::Uuid::now_v7().simple().to_string()[20..].to_owned(),
        wait: Duration::from_secs(60),
        provider: info.id.clone(),
    };
    report
        .checks
        .push(("provider_info".into(), outcome(check_info(&info))));
    let caps = info.capabilities.clone();
    for class in &caps.classes {
        let Some(workload) = r.workload(class).await else {
            report.checks.push((
                format!("{class}: all"),
                Outcome::Skipped(format!(
                    "no test workload for class `{class}` (wasm needs --snapshot-dir)"
                )),
            ));
            continue;
        };
        // Each check's actors are released before the next check: the suite needs one
        // slot at a time, whatever else the provider runs.
        let mut placed = Vec::new();
        let before = r.used().await.unwrap_or(0);
        macro_rules! check {
            ($name:expr, $fut:expr) => {{
                let from = placed.len();
                let o = outcome($fut);
                let released = r.release(&placed[from..], &workload).await;
                report.checks.push((format!("{class}: {}", $name), o));
                if let Err(e) = released {
                    report.checks.push((
                        format!("{class}: cleanup after {}", $name),
                        Outcome::Failed(e),
                    ));
                }
            }};
        }
        check!(
            "placed_actor_is_reachable_and_capacity_is_reported",
            r.placed(&workload, &mut placed).await
        );
        check!(
            "repeated_op_id_is_a_no_op",
            r.repeated(&workload, &mut placed).await
        );
        check!(
            "same_op_id_different_payload_is_refused",
            r.conflict(&workload, &mut placed).await
        );
        check!(
            "stale_epoch_is_refused",
            r.stale(&workload, &mut placed).await
        );
        check!(
            "op_status_survives_a_disconnect",
            r.disconnect(&workload, &mut placed).await
        );
        check!(
            "unadvertised_scopes_are_refused",
            r.unadvertised(&caps.scopes, &workload, &mut placed).await
        );
        for scope in [Scope::Data, Scope::Full] {
            let name = format!("checkpoint_restore_round_trip_{scope:?}");
            if !caps.scopes.contains(&scope) {
                report.checks.push((
                    format!("{class}: {name}"),
                    Outcome::Skipped(format!("{scope:?} not advertised")),
                ));
                continue;
            }
            check!(name, r.round_trip(scope, &workload, &mut placed).await);
        }
        match caps.scopes.first().copied() {
            Some(scope) => {
                let from = placed.len();
                for (n, o) in r.restore_rejects(scope, &workload, &mut placed).await {
                    report.checks.push((format!("{class}: {n}"), o));
                }
                if let Err(e) = r.release(&placed[from..], &workload).await {
                    report.checks.push((
                        format!("{class}: cleanup after restore_rejects"),
                        Outcome::Failed(e),
                    ));
                }
            }
            None => report.checks.push((
                format!("{class}: restore_rejects_*"),
                Outcome::Skipped("no checkpoint scope advertised".into()),
            )),
        }
        let after = r.used().await.unwrap_or(u32::MAX);
        let released = if after == before {
            Ok(())
        } else {
            Err(format!(
                "used slots {before} before the suite, {after} after it"
            ))
        };
        report.checks.push((
            format!("{class}: cleanup_releases_capacity"),
            outcome(released),
        ));
    }
    report
}

fn outcome(c: Check) -> Outcome {
    match c {
        Ok(()) => Outcome::Passed,
        Err(e) => Outcome::Failed(e),
    }
}

fn check_info(info: &mayfly_actor_api::ProviderInfo) -> Check {
    ensure!(
        info.capabilities.contract == CONTRACT_VERSION,
        "contract `{}`, expected `{CONTRACT_VERSION}`",
        info.capabilities.contract
    );
    ensure!(
        !info.capabilities.classes.is_empty(),
        "no sandbox class advertised"
    );
    ensure!(!info.incarnation.is_empty(), "no incarnation");
    ensure!(!info.workers.is_empty(), "no worker reported");
    for w in &info.workers {
        ensure!(w.slots > 0, "worker {} has no slots", w.id);
        ensure!(
            w.used <= w.slots,
            "worker {} uses more slots than it has",
            w.id
        );
        ensure!(
            info.capabilities.classes.contains(&w.class),
            "worker {} runs an unadvertised class",
            w.id
        );
    }
    ensure!(
        info.capabilities.scopes.is_empty() || !info.capabilities.formats.is_empty(),
        "a checkpoint scope is advertised without any snapshot format"
    );
    Ok(())
}

impl Run {
    /// The test workload of a class. The wasm module must be in the provider's snapshot
    /// store: it is uploaded to `--snapshot-dir` (without one the class is skipped).
    async fn workload(&self, class: &str) -> Option<Workload> {
        if let Some(w) = self.cfg.workloads.get(class) {
            return Some(w.clone());
        }
        match class {
            "process" => Some(process_workload()),
            "wasm" => {
                let dir = self.cfg.snapshot_dir.as_ref()?;
                let store = mayfly_cache::LocalCache::new(dir);
                let w = wasm_workload();
                let Workload::Wasm { module, .. } = &w else {
                    return None;
                };
                mayfly_cache::Cache::put(
                    &store,
                    &self.cfg.tenant,
                    module,
                    bytes::Bytes::from_static(WASM_ACTOR.as_bytes()),
                )
                .await
                .ok()?;
                Some(w)
            }
            _ => None,
        }
    }

    fn actor(&self, placed: &mut Vec<String>) -> String {
        let a = format!("conf-{}-{}", self.run, placed.len());
        placed.push(a.clone());
        a
    }

    fn spec(&self, actor: &str, workload: &Workload) -> ActorSpec {
        ActorSpec {
            actor: actor.into(),
            tenant: self.cfg.tenant.clone(),
            template: format!("conformance-{}", workload.class()),
            workload: workload.clone(),
        }
    }

    fn op(&self, actor: &str, id: &str, epoch: u64, op: Op) -> OpRequest {
        let mut req = OpRequest {
            op_id: format!("{actor}.{id}"),
            actor: actor.into(),
            tenant: self.cfg.tenant.clone(),
            assignment_epoch: epoch,
            op,
            delivery: Some(Delivery {
                identity: format!("identity-{actor}-{epoch}"),
                secrets: BTreeMap::from([("token".into(), format!("secret-{actor}-{epoch}"))]),
            }),
            grant: None,
        };
        // As the control plane does: a provider under one reaches blobs only with it.
        req.grant = crate::broker::grant_for(
            &self.cfg.key,
            &self.provider,
            &req,
            self.wait + Duration::from_secs(60),
            crate::dataplane::DEFAULT_MAX_SNAPSHOT_BYTES,
        )
        .ok()
        .flatten();
        req
    }

    fn assign(&self, actor: &str, id: &str, epoch: u64, w: &Workload, d: Desired) -> OpRequest {
        self.op(
            actor,
            id,
            epoch,
            Op::Assign {
                desired: d,
                spec: self.spec(actor, w),
            },
        )
    }

    async fn ok(&self, req: &OpRequest) -> Result<OpStatus, String> {
        let st = self
            .cfg
            .client
            .run(req, self.wait)
            .await
            .map_err(|e| format!("{} {}: {e}", req.op.name(), req.op_id))?;
        ensure!(
            st.state == OpState::Succeeded,
            "{} {} failed: {:?}",
            req.op.name(),
            req.op_id,
            st.error
        );
        Ok(st)
    }

    /// The op must end failed (journaled) or be refused synchronously, with `code`.
    async fn refused(&self, req: &OpRequest, code: RefusalCode) -> Check {
        match self.cfg.client.run(req, self.wait).await {
            Ok(st) => {
                let got = st.error.as_ref().map(|e| e.code);
                ensure!(
                    st.state == OpState::Failed && got == Some(code),
                    "{} {}: expected refusal `{code}`, got {:?} {:?}",
                    req.op.name(),
                    req.op_id,
                    st.state,
                    st.error
                );
                Ok(())
            }
            Err(e) => {
                ensure!(
                    e.code() == Some(code),
                    "{} {}: expected refusal `{code}`, got {e}",
                    req.op.name(),
                    req.op_id
                );
                Ok(())
            }
        }
    }

    async fn get(&self, actor: &str, epoch: u64) -> Result<Value, String> {
        let a = self
            .cfg
            .client
            .call(
                &self.cfg.tenant,
                actor,
                epoch,
                reqwest::Method::GET,
                "/",
                vec![],
            )
            .await
            .map_err(|e| e.to_string())?;
        ensure!(
            a.status == 200,
            "data path GET at epoch {epoch}: {} {:?}",
            a.status,
            a.refusal
        );
        serde_json::from_slice(&a.body).map_err(|e| format!("actor answered non-JSON: {e}"))
    }

    async fn used(&self) -> Result<u32, String> {
        let i = self.cfg.client.info().await.map_err(|e| e.to_string())?;
        Ok(i.workers.iter().map(|w| w.used).sum())
    }

    async fn placed(&self, w: &Workload, placed: &mut Vec<String>) -> Check {
        let before = self.used().await?;
        let a = self.actor(placed);
        let st = self
            .ok(&self.assign(&a, "run", 1, w, Desired::Running))
            .await?;
        let result = st.result.ok_or("no result")?;
        ensure!(result.epoch == 1, "result epoch {}", result.epoch);
        let v = self.get(&a, 1).await?;
        ensure!(v["actor"] == a.as_str(), "reached another actor: {v}");
        ensure!(
            v["identity"] == format!("identity-{a}-1").as_str(),
            "identity not delivered: {v}"
        );
        let after = self.used().await?;
        ensure!(
            after == before + 1,
            "used slots {before} → {after}, expected +1"
        );
        let status = self
            .cfg
            .client
            .actor(&self.cfg.tenant, &a)
            .await
            .map_err(|e| e.to_string())?;
        ensure!(status.epoch == 1, "actor status epoch {}", status.epoch);
        Ok(())
    }

    async fn repeated(&self, w: &Workload, placed: &mut Vec<String>) -> Check {
        let a = self.actor(placed);
        let req = self.assign(&a, "run", 1, w, Desired::Running);
        let first = self.ok(&req).await?;
        let boot = self.get(&a, 1).await?["boot"].clone();
        let used = self.used().await?;
        for _ in 0..3 {
            let again = self.ok(&req).await?;
            ensure!(
                again == first,
                "a repeat answered differently: {again:?} vs {first:?}"
            );
        }
        let boot2 = self.get(&a, 1).await?["boot"].clone();
        ensure!(boot == boot2, "a repeated op id restarted the actor");
        ensure!(
            self.used().await? == used,
            "a repeated op id took another slot"
        );
        Ok(())
    }

    async fn conflict(&self, w: &Workload, placed: &mut Vec<String>) -> Check {
        let a = self.actor(placed);
        self.ok(&self.assign(&a, "run", 1, w, Desired::Running))
            .await?;
        let other = self.assign(&a, "run", 1, w, Desired::Suspended);
        self.refused(&other, RefusalCode::OpIdConflict).await?;
        self.get(&a, 1).await.map(|_| ())
    }

    async fn stale(&self, w: &Workload, placed: &mut Vec<String>) -> Check {
        let a = self.actor(placed);
        self.ok(&self.assign(&a, "run1", 1, w, Desired::Running))
            .await?;
        self.ok(&self.assign(&a, "run2", 2, w, Desired::Running))
            .await?;
        self.refused(
            &self.assign(&a, "late", 1, w, Desired::Suspended),
            RefusalCode::StaleEpoch,
        )
        .await?;
        self.refused(
            &self.op(
                &a,
                "late-ckpt",
                1,
                Op::Checkpoint {
                    kind: CheckpointKind::Local,
                    scope: Scope::Data,
                    teardown: false,
                },
            ),
            RefusalCode::StaleEpoch,
        )
        .await
        .or_else(|e| {
            // A provider without Data scope refuses the scope first; that is also a refusal.
            if e.contains("unsupported_scope") {
                Ok(())
            } else {
                Err(e)
            }
        })?;
        let late = self
            .cfg
            .client
            .call(&self.cfg.tenant, &a, 1, reqwest::Method::GET, "/", vec![])
            .await
            .map_err(|e| e.to_string())?;
        ensure!(
            late.refusal.as_ref().map(|r| r.code) == Some(RefusalCode::StaleEpoch),
            "a data-path request at the old epoch was not refused: {} {:?}",
            late.status,
            late.refusal
        );
        let v = self.get(&a, 2).await?;
        ensure!(v["actor"] == a.as_str(), "current epoch unreachable");
        Ok(())
    }

    async fn disconnect(&self, w: &Workload, placed: &mut Vec<String>) -> Check {
        let a = self.actor(placed);
        let req = self.assign(&a, "run", 1, w, Desired::Running);
        // Submit without waiting, then drop this connection's answer.
        let first = self
            .cfg
            .client
            .submit(&req, Duration::ZERO)
            .await
            .map_err(|e| e.to_string())?;
        ensure!(first.op_id == req.op_id, "status of another op");
        // A fresh client: a new connection, nothing shared with the first.
        let fresh = ProviderClient::new(self.cfg.client.base(), self.cfg.client.http().clone());
        let st = fresh
            .status(&req.op_id, self.wait)
            .await
            .map_err(|e| e.to_string())?;
        ensure!(st.state == OpState::Succeeded, "op after reconnect: {st:?}");
        let again = fresh
            .status(&req.op_id, Duration::ZERO)
            .await
            .map_err(|e| e.to_string())?;
        ensure!(again == st, "op status changed between reads");
        let missing = fresh.status(&format!("{a}.never"), Duration::ZERO).await;
        ensure!(missing.is_err(), "an unknown op id has a status");
        Ok(())
    }

    async fn unadvertised(
        &self,
        scopes: &[Scope],
        w: &Workload,
        placed: &mut Vec<String>,
    ) -> Check {
        let missing: Vec<Scope> = [Scope::Full, Scope::Data]
            .into_iter()
            .filter(|s| !scopes.contains(s))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let a = self.actor(placed);
        self.ok(&self.assign(&a, "run", 1, w, Desired::Running))
            .await?;
        for s in missing {
            let req = self.op(
                &a,
                &format!("ckpt-{s:?}"),
                1,
                Op::Checkpoint {
                    kind: CheckpointKind::External,
                    scope: s,
                    teardown: false,
                },
            );
            self.refused(&req, RefusalCode::UnsupportedScope).await?;
        }
        self.get(&a, 1).await.map(|_| ())
    }

    fn sign(&self, m: &Manifest) -> Result<Signed, String> {
        let body = serde_json::to_value(m).map_err(|e| e.to_string())?;
        self.cfg
            .key
            .sign(Purpose::Snapshot, body)
            .map_err(|e| e.to_string())
    }

    /// Place an actor, bump its counter `n` times, checkpoint it externally with teardown.
    async fn snapshot(
        &self,
        scope: Scope,
        w: &Workload,
        placed: &mut Vec<String>,
        n: u32,
    ) -> Result<(String, Manifest), String> {
        let a = self.actor(placed);
        self.ok(&self.assign(&a, "run", 1, w, Desired::Running))
            .await?;
        for _ in 0..n {
            let r = self
                .cfg
                .client
                .call(&self.cfg.tenant, &a, 1, reqwest::Method::POST, "/", vec![])
                .await
                .map_err(|e| e.to_string())?;
            ensure!(r.status == 200, "POST: {}", r.status);
        }
        let st = self
            .ok(&self.op(
                &a,
                "ckpt",
                1,
                Op::Checkpoint {
                    kind: CheckpointKind::External,
                    scope,
                    teardown: true,
                },
            ))
            .await?;
        let snap = st
            .result
            .and_then(|r| r.snapshot)
            .ok_or("checkpoint returned no snapshot")?;
        ensure!(
            snap.descriptor == snap.manifest.descriptor(),
            "descriptor does not address the manifest"
        );
        ensure!(snap.manifest.scope == scope, "manifest scope");
        ensure!(
            snap.manifest.actor.as_deref() == Some(a.as_str())
                && snap.manifest.tenant == self.cfg.tenant,
            "manifest not bound to the actor and tenant"
        );
        Ok((a, snap.manifest))
    }

    fn restore(&self, actor: &str, id: &str, epoch: u64, w: &Workload, s: Signed) -> OpRequest {
        self.op(
            actor,
            id,
            epoch,
            Op::Restore {
                snapshot: s,
                spec: self.spec(actor, w),
            },
        )
    }

    async fn round_trip(&self, scope: Scope, w: &Workload, placed: &mut Vec<String>) -> Check {
        let (a, m) = self.snapshot(scope, w, placed, 3).await?;
        let late = self
            .cfg
            .client
            .call(&self.cfg.tenant, &a, 1, reqwest::Method::GET, "/", vec![])
            .await
            .map_err(|e| e.to_string())?;
        ensure!(late.status != 200, "a torn-down actor still answers");
        let env = self.sign(&m)?;
        let req = self.restore(&a, "restore", 2, w, env);
        let st = self.ok(&req).await?;
        ensure!(
            st.result.map(|r| r.epoch) == Some(2),
            "restore did not bind epoch 2"
        );
        let v = self.get(&a, 2).await?;
        ensure!(
            v["counter"] == 3,
            "restored counter {} (expected 3)",
            v["counter"]
        );
        ensure!(
            v["identity"] == format!("identity-{a}-2").as_str(),
            "identity not delivered fresh on restore: {}",
            v["identity"]
        );
        // Restoring the same snapshot again is a rollback: a newer epoch, the same data.
        let again = self.restore(&a, "rollback", 3, w, self.sign(&m)?);
        self.ok(&again).await?;
        let v = self.get(&a, 3).await?;
        ensure!(v["counter"] == 3, "rollback counter {}", v["counter"]);
        self.refused(
            &self.restore(&a, "old", 3, w, self.sign(&m)?),
            RefusalCode::StaleEpoch,
        )
        .await
    }

    async fn restore_rejects(
        &self,
        scope: Scope,
        w: &Workload,
        placed: &mut Vec<String>,
    ) -> Vec<(String, Outcome)> {
        let mut out = Vec::new();
        let (a, m) = match self.snapshot(scope, w, placed, 1).await {
            Ok(x) => x,
            Err(e) => {
                out.push(("restore_rejects_*".into(), Outcome::Failed(e)));
                return out;
            }
        };
        let mut epoch = 1;
        let mut try_restore = |name: &str, env: Result<Signed, String>, code: RefusalCode| {
            epoch += 1;
            let name = name.to_owned();
            let a = a.clone();
            let e = epoch;
            async move {
                let env = match env {
                    Ok(e) => e,
                    Err(x) => return (name, Outcome::Failed(x)),
                };
                let req = self.restore(&a, &name, e, w, env);
                (name, outcome(self.refused(&req, code).await))
            }
        };
        let garbage = self
            .cfg
            .key
            .sign(Purpose::Snapshot, serde_json::json!({"not": "a manifest"}))
            .map_err(|e| e.to_string());
        out.push(
            try_restore(
                "restore_rejects_an_unreadable_manifest",
                garbage,
                RefusalCode::ManifestUnreadable,
            )
            .await,
        );
        let mut foreign = m.clone();
        foreign.tenant = format!("{}-other", self.cfg.tenant);
        out.push(
            try_restore(
                "restore_rejects_another_tenants_manifest",
                self.sign(&foreign),
                RefusalCode::ForeignSnapshot,
            )
            .await,
        );
        let stranger = ControlKey::generate()
            .sign(
                Purpose::Snapshot,
                serde_json::to_value(&m).unwrap_or_default(),
            )
            .map_err(|e| e.to_string());
        out.push(
            try_restore(
                "restore_rejects_an_envelope_not_signed_by_the_control_plane",
                stranger,
                RefusalCode::SnapshotUntrusted,
            )
            .await,
        );
        let mut missing = m.clone();
        if let Some(b) = missing.blobs.first_mut() {
            b.digest = mayfly_trust::sha256_digest(format!("absent-{a}").as_bytes());
        }
        out.push(
            try_restore(
                "restore_rejects_a_missing_blob",
                self.sign(&missing),
                RefusalCode::BlobDigestMismatch,
            )
            .await,
        );
        match (&self.cfg.snapshot_dir, m.blobs.first()) {
            (Some(dir), Some(first)) => {
                let planted = plant_corrupt(dir, &self.cfg.tenant, &a);
                let out_of = match planted {
                    Ok(digest) => {
                        let mut bad = m.clone();
                        bad.blobs[0] = mayfly_actor_api::BlobRef {
                            digest,
                            ..first.clone()
                        };
                        try_restore(
                            "restore_rejects_a_blob_with_a_wrong_digest",
                            self.sign(&bad),
                            RefusalCode::BlobDigestMismatch,
                        )
                        .await
                    }
                    Err(e) => (
                        "restore_rejects_a_blob_with_a_wrong_digest".into(),
                        Outcome::Failed(e),
                    ),
                };
                out.push(out_of);
            }
            _ => out.push((
                "restore_rejects_a_blob_with_a_wrong_digest".into(),
                Outcome::Skipped("no --snapshot-dir to plant a corrupted blob in".into()),
            )),
        }
        // None of the refused restores may have taken the actor's place or epoch.
        let status = self.cfg.client.actor(&self.cfg.tenant, &a).await;
        let unchanged = match status {
            Ok(s) => {
                if s.epoch == 1 && s.phase == mayfly_actor_api::ProviderPhase::Stopped {
                    Ok(())
                } else {
                    Err(format!("after refused restores the actor is {s:?}"))
                }
            }
            Err(e) => Err(e.to_string()),
        };
        out.push(("refused_restores_change_nothing".into(), outcome(unchanged)));
        out
    }

    async fn release(&self, placed: &[String], w: &Workload) -> Check {
        for a in placed {
            let st = self.cfg.client.actor(&self.cfg.tenant, a).await;
            let epoch = match st {
                Ok(s) => s.epoch,
                Err(ClientError::Refused(_)) => continue,
                Err(e) => return Err(e.to_string()),
            };
            let req = OpRequest {
                delivery: None,
                ..self.op(
                    a,
                    "cleanup",
                    epoch,
                    Op::Assign {
                        desired: Desired::Suspended,
                        spec: self.spec(a, w),
                    },
                )
            };
            self.ok(&req).await?;
        }
        for a in placed {
            if let Ok(s) = self.cfg.client.actor(&self.cfg.tenant, a).await {
                ensure!(
                    s.phase == mayfly_actor_api::ProviderPhase::Stopped,
                    "{a} still running after cleanup"
                );
            }
        }
        Ok(())
    }
}

/// Write bytes under a digest they do not hash to, in the local snapshot store layout
/// (`<dir>/t<hex tenant>/<hex[..2]>/<hex>`), and return that digest.
fn plant_corrupt(dir: &std::path::Path, tenant: &str, salt: &str) -> Result<String, String> {
    let claimed = mayfly_trust::sha256_digest(format!("claimed-{salt}").as_bytes());
    let path = mayfly_cache::LocalCache::new(dir)
        .path_of(tenant, &claimed)
        .map_err(|e| e.to_string())?;
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).map_err(|e| e.to_string())?;
    }
    std::fs::write(&path, b"these bytes do not hash to the claimed digest")
        .map_err(|e| e.to_string())?;
    Ok(claimed)
}
