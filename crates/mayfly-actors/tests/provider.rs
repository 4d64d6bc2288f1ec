//! The process provider over its real HTTP API: the conformance suite, plus what the suite
//! cannot see from outside (restart durability, orphan reaping, readiness, capacity,
//! secrets never captured).

use mayfly_actor_api::{
    ActorSpec, CheckpointKind, Delivery, Desired, Op, OpRequest, OpState, Readiness, RefusalCode,
    Scope, Workload,
};
use mayfly_actors::client::ProviderClient;
use mayfly_actors::conformance::{self, Outcome, process_workload};
use mayfly_actors::process::{Contain, ProcessSandbox};
use mayfly_actors::{Journal, Provider, ProviderConfig};
use mayfly_cache::{Cache, LocalCache};
use mayfly_trust::sign::ControlKey;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

struct Harness {
    provider: Arc<Provider>,
    client: ProviderClient,
    server: tokio::task::JoinHandle<()>,
    external: PathBuf,
}

async fn start(root: &Path, key: &ControlKey, slots: u32) -> Harness {
    start_with(root, key, slots, None, None).await
}

/// How `mayfly provider serve` contains actors, with this crate's keeper binary; `None`
/// (and a loud skip, a failure under CI) without bubblewrap.
fn containment() -> Option<Contain> {
    if !mayfly_testkit::bubblewrap() {
        return None;
    }
    let mut extra = Vec::new();
    if let Ok((py, dirs)) = mayfly_tools::sandbox::python_layout("python3") {
        extra.push(py);
        extra.extend(dirs);
    }
    Some(Contain {
        sandbox: Arc::new(mayfly_tools::sandbox::Sandbox::detect(&extra).unwrap()),
        keeper: env!("CARGO_BIN_EXE_mayfly-actor-keeper").into(),
        keeper_args: vec![],
        limits: Default::default(),
    })
}

/// The same, with `external` as the shared snapshot store (default: a directory) and
/// actors contained or not.
async fn start_with(
    root: &Path,
    key: &ControlKey,
    slots: u32,
    external_store: Option<Arc<dyn Cache>>,
    contain: Option<Contain>,
) -> Harness {
    mayfly_actors::install_crypto();
    let cfg = ProviderConfig {
        id: "test-provider".into(),
        slots,
        trusted: vec![key.public().clone()],
        labels: BTreeMap::new(),
        platform: ProviderConfig::platform_of_host(),
    };
    let journal = Journal::open(&root.join("journal.db")).await.unwrap();
    let external = root.join("snapshots");
    let provider = Provider::new(
        cfg,
        Arc::new(match contain {
            Some(c) => ProcessSandbox::contained(root.join("sandbox"), c).unwrap(),
            None => ProcessSandbox::new(root.join("sandbox")).unwrap(),
        }),
        journal,
        Arc::new(LocalCache::new(root.join("local"))),
        external_store.unwrap_or_else(|| Arc::new(LocalCache::new(&external))),
    )
    .await
    .unwrap();
    let (client, server) = mayfly_actors::local::serve_plain(provider.clone())
        .await
        .unwrap();
    Harness {
        provider,
        client,
        server,
        external,
    }
}

impl Harness {
    async fn stop(self) {
        self.provider.shutdown().await;
        self.server.abort();
    }
}

fn spec(actor: &str, workload: Workload) -> ActorSpec {
    ActorSpec {
        actor: actor.into(),
        tenant: "t1".into(),
        template: "tpl".into(),
        workload,
    }
}

fn op(actor: &str, id: &str, epoch: u64, op: Op) -> OpRequest {
    OpRequest {
        op_id: id.into(),
        actor: actor.into(),
        tenant: "t1".into(),
        assignment_epoch: epoch,
        op,
        delivery: Some(Delivery {
            identity: format!("id-{actor}-{epoch}"),
            secrets: BTreeMap::from([("token".into(), "PLANTED-SECRET-7f3a9".into())]),
        }),
        grant: None,
    }
}

fn run(actor: &str, id: &str, epoch: u64) -> OpRequest {
    op(
        actor,
        id,
        epoch,
        Op::Assign {
            desired: Desired::Running,
            spec: spec(actor, process_workload()),
        },
    )
}

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_process_provider_passes_the_conformance_suite() {
    conformance_suite(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_contained_process_provider_passes_the_conformance_suite() {
    let Some(contain) = containment() else { return };
    conformance_suite(Some(contain)).await;
}

async fn conformance_suite(contain: Option<Contain>) {
    let dir = tempfile::tempdir().unwrap();
    let key = ControlKey::generate();
    let h = start_with(dir.path(), &key, 16, None, contain).await;
    let report = conformance::run(conformance::Config {
        client: h.client.clone(),
        key,
        tenant: "conformance".into(),
        snapshot_dir: Some(h.external.clone()),
        workloads: BTreeMap::new(),
    })
    .await;
    for (name, o) in &report.checks {
        eprintln!("{name}: {o:?}");
    }
    assert_eq!(report.failed(), 0, "{:#?}", report.checks);
    // The only skip is the Full-scope round trip, which the process sandbox does not
    // advertise (and the suite checked it is refused).
    let skipped: Vec<_> = report
        .checks
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::Skipped(_)))
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(skipped, vec!["process: checkpoint_restore_round_trip_Full"]);
    assert!(report.passed() >= 14, "{}", report.passed());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_process_provider_passes_with_the_nats_object_store_as_snapshot_store() {
    if !mayfly_testkit::nats() {
        return;
    }
    let client = async_nats::connect(mayfly_testkit::nats_url())
        .await
        .unwrap();
    let bucket = mayfly_testkit::unique("snapshots");
    let store: Arc<dyn Cache> = Arc::new(
        mayfly_cache::NatsCache::open(client.clone(), &bucket)
            .await
            .unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    let key = ControlKey::generate();
    let h = start_with(dir.path(), &key, 16, Some(store), None).await;
    let report = conformance::run(conformance::Config {
        client: h.client.clone(),
        key,
        tenant: "conformance".into(),
        snapshot_dir: None,
        workloads: BTreeMap::new(),
    })
    .await;
    assert_eq!(report.failed(), 0, "{:#?}", report.checks);
    // Without a directory to plant a corrupted blob in, that one check is skipped.
    assert_eq!(report.skipped(), 2, "{:#?}", report.checks);
    h.stop().await;
    mayfly_cache::NatsCache::delete(client, &bucket)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conformance_run_without_a_trusted_key_fails_loudly() {
    // A provider that trusts another control key must fail the restore checks: the suite
    // does not pass a provider that would restore anything.
    let dir = tempfile::tempdir().unwrap();
    let trusted = ControlKey::generate();
    let h = start(dir.path(), &trusted, 16).await;
    let report = conformance::run(conformance::Config {
        client: h.client.clone(),
        key: ControlKey::generate(),
        tenant: "conformance".into(),
        snapshot_dir: None,
        workloads: BTreeMap::new(),
    })
    .await;
    let failed: Vec<_> = report
        .checks
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::Failed(_)))
        .map(|(n, _)| n.clone())
        .collect();
    assert!(
        failed.contains(&"process: checkpoint_restore_round_trip_Data".to_owned()),
        "{failed:?}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn op_status_and_the_epoch_fence_survive_a_provider_restart_and_orphans_are_reaped() {
    let dir = tempfile::tempdir().unwrap();
    let key = ControlKey::generate();
    let h = start(dir.path(), &key, 4).await;
    let first = h.client.run(&run("a1", "op-1", 5), WAIT).await.unwrap();
    assert_eq!(first.state, OpState::Succeeded, "{first:?}");
    let pid = h.provider.actor("t1", "a1").await.unwrap().unwrap();
    assert_eq!(pid.epoch, 5);
    // The provider dies without stopping its actor (no shutdown): the child is orphaned.
    let addr = first.result.as_ref().unwrap().address.clone().unwrap();
    h.server.abort();
    drop(h.client);
    drop(h.provider);
    let h = start(dir.path(), &key, 4).await;
    // The orphan was reaped: its port no longer answers.
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut gone = false;
    for _ in 0..100 {
        if http.get(format!("{addr}/ready")).send().await.is_err() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(gone, "the orphaned actor survived the provider restart");
    // The op's status survived, and repeating it answers the first result.
    let st = h.client.status("op-1", Duration::ZERO).await.unwrap();
    assert_eq!(st, first);
    assert_eq!(
        h.client.run(&run("a1", "op-1", 5), WAIT).await.unwrap(),
        first
    );
    // The fence survived: epoch 4 is still stale.
    let late = h.client.run(&run("a1", "op-2", 4), WAIT).await.unwrap();
    assert_eq!(late.error.unwrap().code, RefusalCode::StaleEpoch);
    let status = h.client.actor("t1", "a1").await.unwrap();
    assert_eq!(status.epoch, 5);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_gates_a_start_and_capacity_is_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let key = ControlKey::generate();
    let h = start(dir.path(), &key, 1).await;
    let never_ready = Workload::Process {
        command: "sleep".into(),
        args: vec!["30".into()],
        env: BTreeMap::new(),
        durable_dirs: vec![],
        readiness: Readiness {
            path: "/ready".into(),
            deadline_ms: 300,
        },
    };
    let req = op(
        "slow",
        "slow-1",
        1,
        Op::Assign {
            desired: Desired::Running,
            spec: spec("slow", never_ready),
        },
    );
    let st = h.client.run(&req, WAIT).await.unwrap();
    assert_eq!(st.error.unwrap().code, RefusalCode::NotReady);
    let exits = Workload::Process {
        command: "false".into(),
        args: vec![],
        env: BTreeMap::new(),
        durable_dirs: vec![],
        readiness: Readiness::default(),
    };
    let req = op(
        "dies",
        "dies-1",
        1,
        Op::Assign {
            desired: Desired::Running,
            spec: spec("dies", exits),
        },
    );
    let st = h.client.run(&req, WAIT).await.unwrap();
    let e = st.error.unwrap();
    assert_eq!(e.code, RefusalCode::SandboxFailed);
    assert!(e.message.contains("exited"), "{e}");
    // Failed starts hold no slot; the one slot takes one actor, the second is refused.
    let ok = h.client.run(&run("a", "a-1", 1), WAIT).await.unwrap();
    assert_eq!(ok.state, OpState::Succeeded, "{ok:?}");
    let full = h.client.run(&run("b", "b-1", 1), WAIT).await.unwrap();
    assert_eq!(full.error.unwrap().code, RefusalCode::CapacityExhausted);
    let info = h.client.info().await.unwrap();
    assert_eq!((info.workers[0].used, info.workers[0].slots), (1, 1));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_and_identity_are_delivered_fresh_and_never_captured() {
    let dir = tempfile::tempdir().unwrap();
    let key = ControlKey::generate();
    let h = start(dir.path(), &key, 4).await;
    let st = h.client.run(&run("s1", "s-1", 1), WAIT).await.unwrap();
    assert_eq!(st.state, OpState::Succeeded, "{st:?}");
    let v: serde_json::Value = serde_json::from_slice(
        &h.client
            .call("t1", "s1", 1, reqwest::Method::POST, "/", vec![])
            .await
            .unwrap()
            .body,
    )
    .unwrap();
    // The actor sees its secret (it reports only a hash) and its identity.
    assert!(v["secret_sha256"].is_string(), "{v}");
    assert_eq!(v["identity"], "id-s1-1");
    let ck = op(
        "s1",
        "s-ckpt",
        1,
        Op::Checkpoint {
            kind: CheckpointKind::External,
            scope: Scope::Data,
            teardown: true,
        },
    );
    let st = h.client.run(&ck, WAIT).await.unwrap();
    let snap = st.result.unwrap().snapshot.unwrap();
    // Neither the journal nor any blob holds the secret or the identity, compressed or not.
    let store = LocalCache::new(&h.external);
    for b in &snap.manifest.blobs {
        let bytes = store.get("t1", &b.digest).await.unwrap().unwrap();
        let plain = zstd::decode_all(&bytes[..]).unwrap();
        for hay in [&bytes[..], &plain[..]] {
            assert!(!contains(hay, b"PLANTED-SECRET-7f3a9"));
            assert!(!contains(hay, b"id-s1-1"));
        }
        assert!(
            contains(&plain, b"data/counter"),
            "the durable dir is captured"
        );
    }
    for entry in walk(dir.path()) {
        if entry
            .extension()
            .is_some_and(|e| e == "db" || e == "db-wal")
        {
            let bytes = std::fs::read(&entry).unwrap();
            assert!(
                !contains(&bytes, b"PLANTED-SECRET-7f3a9"),
                "{}",
                entry.display()
            );
        }
    }
    // The run dir (identity, secrets) is gone with the actor.
    assert!(!dir.path().join("sandbox/actors/t1/s1/run").exists());
    h.stop().await;
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn walk(d: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(d) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// The red team, from inside a contained actor: it finds only its own durable dir and run
/// dir; the provider's key, journal and snapshot store, another actor's secrets and the
/// host's processes are not there; it can reach nothing on the network (not the host's
/// Postgres, not the provider's own API) and cannot write its delivered files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contained_actor_sees_only_its_own_dirs_and_reaches_nothing() {
    let Some(contain) = containment() else { return };
    let dir = tempfile::tempdir().unwrap();
    let key = ControlKey::generate();
    let h = start_with(dir.path(), &key, 4, None, Some(contain)).await;
    let root = dir.path();
    let provider_key = root.join("provider.key");
    std::fs::write(&provider_key, "PROVIDER-PRIVATE-KEY").unwrap();
    // Another actor holding a secret.
    let st = h.client.run(&run("victim", "v-1", 1), WAIT).await.unwrap();
    assert_eq!(st.state, OpState::Succeeded, "{st:?}");
    let victim_secret = root.join("sandbox/actors/t1/victim/run/secrets/token");
    assert!(victim_secret.exists(), "the victim's secret is on the host");
    let port: u16 = h.client.base().rsplit(':').next().unwrap().parse().unwrap();
    let probe = serde_json::json!({
        "key": provider_key,
        "journal": root.join("journal.db"),
        "other_secret": victim_secret,
        "snapshots": h.external,
        "root": root,
        "port": port,
    });
    let workload = Workload::Process {
        command: "python3".into(),
        args: vec!["-c".into(), PROBE_ACTOR.into()],
        env: BTreeMap::from([("PROBE".into(), probe.to_string())]),
        durable_dirs: vec!["data".into()],
        readiness: Readiness {
            path: "/ready".into(),
            deadline_ms: 15_000,
        },
    };
    let req = op(
        "probe",
        "probe-1",
        1,
        Op::Assign {
            desired: Desired::Running,
            spec: spec("probe", workload),
        },
    );
    let st = h.client.run(&req, WAIT).await.unwrap();
    assert_eq!(st.state, OpState::Succeeded, "{st:?}");
    let answer = h
        .client
        .call("t1", "probe", 1, reqwest::Method::GET, "/probe", vec![])
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&answer.body)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&answer.body)));
    eprintln!("what the actor found: {v}");
    for k in ["key", "journal", "other_secret"] {
        assert_eq!(v[k], "FileNotFoundError", "{k}: {v}");
    }
    assert_eq!(v["snapshots"], "FileNotFoundError", "{v}");
    assert_eq!(v["root"], "FileNotFoundError", "{v}");
    // Its socket is the provider's: not in the sandbox, so it cannot be swapped.
    assert_eq!(
        v["run"],
        serde_json::json!(["mayfly", "mayfly-keeper", "mayfly-lease"]),
        "{v}"
    );
    assert_eq!(v["own_secret"], "PLANTED-SECRET-7f3a9", "{v}");
    assert_eq!(
        v["write_run"], "OSError",
        "delivered files are read-only: {v}"
    );
    assert_eq!(v["work"], serde_json::json!(["data"]), "{v}");
    // Its own PID namespace: the sandbox's init, the keeper, the actor.
    assert!(
        v["pids"].as_array().unwrap().len() <= 4,
        "host processes are visible: {v}"
    );
    for k in ["postgres", "provider_api", "outside"] {
        let r = v[k].as_str().unwrap();
        assert_ne!(r, "connected", "{k}: {v}");
    }
    // The provider's own files are intact and the actor's durable dir is the real one.
    assert_eq!(
        std::fs::read_to_string(&provider_key).unwrap(),
        "PROVIDER-PRIVATE-KEY"
    );
    assert!(
        root.join("sandbox/actors/t1/probe/work/data/probe-was-here")
            .exists()
    );
    h.stop().await;
}

/// An actor stops serving once its provider's lease has run out: the provider refuses its
/// requests and starts, and the keeper inside the sandbox ends the actor even if the
/// provider never acts on it (frozen).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contained_actor_ends_when_the_providers_lease_runs_out() {
    let Some(contain) = containment() else { return };
    let dir = tempfile::tempdir().unwrap();
    let key = ControlKey::generate();
    let h = start_with(dir.path(), &key, 4, None, Some(contain)).await;
    let now = || mayfly_types::now_ms();
    h.provider.set_lease(Some(now() + 60_000));
    let st = h.client.run(&run("l1", "l-1", 1), WAIT).await.unwrap();
    assert_eq!(st.state, OpState::Succeeded, "{st:?}");
    let ok = h
        .client
        .call("t1", "l1", 1, reqwest::Method::GET, "/", vec![])
        .await
        .unwrap();
    assert_eq!(ok.status, 200);
    // The lease runs out: refused by the provider at once.
    h.provider.set_lease(Some(now().saturating_sub(1)));
    let refused = h
        .client
        .call("t1", "l1", 1, reqwest::Method::GET, "/", vec![])
        .await
        .unwrap();
    assert_eq!(
        refused.refusal.map(|r| r.code),
        Some(RefusalCode::StaleEpoch)
    );
    let st = h.client.run(&run("l2", "l-2", 1), WAIT).await.unwrap();
    assert_eq!(st.error.map(|e| e.code), Some(RefusalCode::StaleEpoch));
    // Even with the provider's own check lifted (a frozen provider checks nothing), the
    // actor itself is gone: its keeper ended the sandbox.
    tokio::time::sleep(Duration::from_millis(500)).await;
    h.provider.set_lease(None);
    let gone = h
        .client
        .call("t1", "l1", 1, reqwest::Method::GET, "/", vec![])
        .await
        .unwrap();
    let refusal = gone.refusal.expect("the actor no longer answers");
    assert_eq!(refusal.code, RefusalCode::SandboxFailed, "{refusal}");
    let log = std::fs::read_to_string(dir.path().join("sandbox/actors/t1/l1/log")).unwrap();
    assert!(log.contains("lease ran out"), "{log}");
    h.stop().await;
}

/// The probe actor of the red-team test: `GET /probe` reports what it could reach.
const PROBE_ACTOR: &str = r#"
import http.server, json, os, socket
P = json.loads(os.environ["PROBE"])
def read(p):
    try:
        with open(p, "rb") as f:
            f.read(16)
        return "read"
    except Exception as e:
        return type(e).__name__
def ls(p):
    try:
        return sorted(os.listdir(p))
    except Exception as e:
        return type(e).__name__
def connect(host, port):
    s = socket.socket()
    s.settimeout(1)
    try:
        s.connect((host, port))
        return "connected"
    except Exception as e:
        return type(e).__name__
    finally:
        s.close()
def write(p):
    try:
        with open(p, "w") as f:
            f.write("x")
        return "written"
    except Exception as e:
        return "OSError" if isinstance(e, OSError) else type(e).__name__
def probe():
    run = os.environ["MAYFLY_RUN_DIR"]
    open("data/probe-was-here", "w").write("1")
    return {
        "key": read(P["key"]),
        "journal": read(P["journal"]),
        "other_secret": read(P["other_secret"]),
        "snapshots": ls(P["snapshots"]) if isinstance(ls(P["snapshots"]), str) else "listed",
        "root": ls(P["root"]) if isinstance(ls(P["root"]), str) else "listed",
        "run": sorted(os.listdir("/run")),
        "own_secret": open(os.path.join(run, "secrets", "token")).read(),
        "write_run": write(os.path.join(run, "secrets", "token")),
        "work": sorted(os.listdir("/work")),
        "pids": [p for p in os.listdir("/proc") if p.isdigit()],
        "postgres": connect("127.0.0.1", 5432),
        "provider_api": connect("127.0.0.1", P["port"]),
        "outside": connect("1.1.1.1", 53),
    }
class H(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass
    def do_GET(self):
        b = json.dumps({} if self.path == "/ready" else probe()).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(b)))
        self.end_headers()
        self.wfile.write(b)
os.makedirs("data", exist_ok=True)
http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"#;

/// A checkpoint with teardown (suspend, move) waits for the requests the actor is serving:
/// the slow request is answered, and its write is in the capture.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_teardown_waits_for_the_requests_being_served() {
    let dir = tempfile::tempdir().unwrap();
    let key = ControlKey::generate();
    let h = start(dir.path(), &key, 4).await;
    let st = h.client.run(&run("d1", "d-1", 1), WAIT).await.unwrap();
    assert_eq!(st.state, OpState::Succeeded, "{st:?}");
    let slow = {
        let client = h.client.clone();
        tokio::spawn(async move {
            client
                .call("t1", "d1", 1, reqwest::Method::POST, "/slow", vec![])
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    let ck = op(
        "d1",
        "d-ckpt",
        1,
        Op::Checkpoint {
            kind: CheckpointKind::External,
            scope: Scope::Data,
            teardown: true,
        },
    );
    let st = h.client.run(&ck, WAIT).await.unwrap();
    assert_eq!(st.state, OpState::Succeeded, "{st:?}");
    let answer = slow.await.unwrap().unwrap();
    assert_eq!(answer.status, 200, "{answer:?}");
    let v: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
    assert_eq!(v["counter"], 1);
    // The request finished before the capture: its write is what was captured.
    let snap = st.result.unwrap().snapshot.unwrap();
    let mut data = Vec::new();
    for b in &snap.manifest.blobs {
        let bytes = LocalCache::new(&h.external)
            .get("t1", &b.digest)
            .await
            .unwrap()
            .unwrap();
        data.extend_from_slice(&bytes);
    }
    let tar = zstd::decode_all(&data[..]).unwrap();
    let mut ar = tar::Archive::new(&tar[..]);
    let counter = ar
        .entries()
        .unwrap()
        .flatten()
        .find(|e| e.path().unwrap().ends_with("counter"))
        .map(|mut e| {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut e, &mut s).unwrap();
            s
        });
    assert_eq!(counter.as_deref(), Some("1"));
    h.stop().await;
}
