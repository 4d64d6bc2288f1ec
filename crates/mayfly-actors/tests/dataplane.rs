//! The control plane's dataplane under faults, in one process over the real seams (mTLS on
//! loopback, a SQLite control log, real process actors): a checkpoint that fails keeps the
//! last good snapshot, an unenrolled certificate cannot heartbeat, a provider that claims a
//! scope it cannot capture fails conformance, and a cut-off provider's actors are fenced.

use async_trait::async_trait;
use mayfly_actor_api::{
    ActorPhase, ActorSpec, Capabilities, Delivery, Format, Refusal, RefusalCode, Scope,
};
use mayfly_actors::conformance::{self, Outcome, process_workload};
use mayfly_actors::dataplane::{DataplaneError, Heartbeat};
use mayfly_actors::local::LocalDataplane;
use mayfly_actors::process::ProcessSandbox;
use mayfly_actors::{DataRequest, DataResponse, Instance, Sandbox, Streams};
use mayfly_control::Control;
use mayfly_trust::sign::ControlKey;
use serde_json::json;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The process sandbox, with two faults to inject: captures fail while `fail` is set, and
/// with `lie` it advertises Full scope it cannot capture.
struct Faulty {
    inner: ProcessSandbox,
    fail: Arc<AtomicBool>,
    lie: bool,
}

struct FaultyInstance {
    inner: Box<dyn Instance>,
    fail: Arc<AtomicBool>,
}

#[async_trait]
impl Sandbox for Faulty {
    fn class(&self) -> &'static str {
        "process"
    }
    fn capabilities(&self) -> Capabilities {
        let mut c = self.inner.capabilities();
        if self.lie {
            c.scopes.push(Scope::Full);
        }
        c
    }
    fn format(&self, scope: Scope) -> Option<Format> {
        if self.lie && scope == Scope::Full {
            return self.inner.format(Scope::Data);
        }
        self.inner.format(scope)
    }
    async fn start(
        &self,
        spec: &ActorSpec,
        epoch: u64,
        delivery: &Delivery,
        restored: Option<(Scope, Streams)>,
    ) -> Result<Box<dyn Instance>, Refusal> {
        Ok(Box::new(FaultyInstance {
            inner: self.inner.start(spec, epoch, delivery, restored).await?,
            fail: self.fail.clone(),
        }))
    }
}

#[async_trait]
impl Instance for FaultyInstance {
    fn address(&self) -> Option<String> {
        self.inner.address()
    }
    async fn alive(&self) -> bool {
        self.inner.alive().await
    }
    async fn handle(&self, req: DataRequest) -> Result<DataResponse, Refusal> {
        self.inner.handle(req).await
    }
    async fn capture(&self, scope: Scope, teardown: bool) -> Result<Streams, Refusal> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(Refusal::new(
                RefusalCode::SandboxFailed,
                "injected: disk full",
            ));
        }
        self.inner.capture(scope, teardown).await
    }
    async fn stop(&self) {
        self.inner.stop().await
    }
}

async fn rig(dir: &Path, fail: Arc<AtomicBool>, lie: bool) -> (LocalDataplane, ControlKey) {
    let store = mayfly_store::SqliteStore::open(dir.join("control.db"))
        .await
        .unwrap();
    let key = ControlKey::generate();
    let control = Arc::new(
        Control::open(Arc::new(store))
            .await
            .unwrap()
            .with_signer(ControlKey::from_base64(&key.to_base64()).unwrap()),
    );
    let mut rig = LocalDataplane::start(control, &key, dir, 2_000)
        .await
        .unwrap();
    rig.add_provider(
        "faulty",
        8,
        Box::new(move |_, d| {
            Ok(Arc::new(Faulty {
                inner: ProcessSandbox::new(d.join("sandbox"))?,
                fail,
                lie,
            }) as Arc<dyn Sandbox>)
        }),
    )
    .await
    .unwrap();
    rig.wait_live(1, Duration::from_secs(20)).await.unwrap();
    rig.apply(&[
        json!({"apiVersion": "mayfly.dev/v1", "kind": "ActorTemplate",
               "metadata": {"name": "counter", "tenant": "t"},
               "spec": {"workload": process_workload(), "idleTimeoutMs": 0}}),
        json!({"apiVersion": "mayfly.dev/v1", "kind": "Actor",
               "metadata": {"name": "c", "tenant": "t"}, "spec": {"template": "counter"}}),
    ])
    .await
    .unwrap();
    (rig, key)
}

async fn record(rig: &LocalDataplane) -> mayfly_control::dataplane::ActorRecord {
    rig.control
        .read(|st| st.actors.get("t/c").cloned())
        .await
        .unwrap()
        .expect("record")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_checkpoint_never_replaces_the_last_good_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let fail = Arc::new(AtomicBool::new(false));
    let (mut rig, _) = rig(dir.path(), fail.clone(), false).await;
    let v = rig.call("t", "c", reqwest::Method::POST).await.unwrap();
    assert_eq!(v["counter"], 1);
    let good = rig.dp.suspend("t", "c", "Test").await.unwrap().unwrap();
    let v = rig.call("t", "c", reqwest::Method::POST).await.unwrap();
    assert_eq!(v["counter"], 2);
    let before = record(&rig).await;
    fail.store(true, Ordering::SeqCst);
    let e = rig.dp.suspend("t", "c", "Test").await.unwrap_err();
    assert!(
        matches!(e, DataplaneError::Refused(ref r) if r.code == RefusalCode::SandboxFailed),
        "{e}"
    );
    let after = record(&rig).await;
    assert_eq!(after.phase, ActorPhase::Suspended);
    assert_eq!(
        after.snapshot.as_deref(),
        Some(good.descriptor.digest.as_str())
    );
    assert_eq!(
        after.epoch,
        before.epoch + 1,
        "the failed attempt is fenced"
    );
    assert!(
        after.reason.starts_with("CheckpointFailed"),
        "{}",
        after.reason
    );
    // The provider was told to stop it: nothing runs at the fenced epoch.
    assert!(rig.providers[0].provider.running().await.is_empty());
    fail.store(false, Ordering::SeqCst);
    let v = rig.get("t", "c").await.unwrap();
    assert_eq!(v["counter"], 1, "restored from the last good snapshot");
    // A snapshot whose blob rots in the store: the restore refuses it, the actor is Failed
    // (with the reason) and keeps pointing at it — nothing corrupt is ever restored.
    let snap = rig.dp.suspend("t", "c", "Test").await.unwrap().unwrap();
    let manifest: mayfly_actor_api::Manifest =
        serde_json::from_value(snap.envelope.body.clone()).unwrap();
    let blob = &manifest.blobs[0];
    let path = mayfly_cache::LocalCache::new(dir.path().join("snapshots"))
        .path_of("t", &blob.digest)
        .unwrap();
    std::fs::write(&path, b"rotten").unwrap();
    let e = rig.get("t", "c").await.unwrap_err();
    assert_eq!(e.code(), "blob_digest_mismatch", "{e}");
    let r = record(&rig).await;
    assert_eq!(r.phase, ActorPhase::Failed);
    assert_eq!(r.reason, "ResumeFailed: blob_digest_mismatch");
    assert_eq!(r.snapshot.as_deref(), Some(snap.descriptor.digest.as_str()));
    rig.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_enrolled_certificates_heartbeat_and_a_cut_provider_is_fenced() {
    let dir = tempfile::tempdir().unwrap();
    let (mut rig, _) = rig(dir.path(), Arc::new(AtomicBool::new(false)), false).await;
    let info = rig.providers[0].provider.info().await;
    let hb = Heartbeat {
        incarnation: "x".into(),
        capabilities: info.capabilities.clone(),
        workers: info.workers.clone(),
        running: vec![],
    };
    // A fingerprint no enrollment recorded.
    let e = rig.dp.heartbeat("sha256:00", hb.clone()).await.unwrap_err();
    assert_eq!(e.code(), "unauthenticated");
    // Over the wire: a certificate of our CA that was never enrolled.
    let stranger = rig
        .ca
        .issue(&[], mayfly_pki::Usage::Provider, "provider:stranger")
        .unwrap();
    let endpoint = rig.dp.config().provider_endpoint.clone().unwrap();
    let http = mayfly_pki::client(rig.ca.cert_pem(), &stranger, None).unwrap();
    let r = http
        .post(format!("{endpoint}/v1/providers/heartbeat"))
        .json(&hb)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    // A provider cut off from the control plane: its lease runs out, its actor is fenced,
    // and the provider, unable to renew, stops the actor itself.
    rig.get("t", "c").await.unwrap();
    assert_eq!(record(&rig).await.phase, ActorPhase::Running);
    let epoch = record(&rig).await.epoch;
    let provider = rig.providers[0].provider.clone();
    // Keep its heartbeat loop but sever the API and renewals: drop the tasks, then run a
    // heartbeat loop that cannot reach the control plane (self-fencing).
    rig.cut("faulty");
    let dead = tokio::spawn(mayfly_actors::heartbeat::run(
        provider.clone(),
        reqwest::Client::new(),
        "https://127.0.0.1:9".into(),
        Duration::from_millis(100),
    ));
    let mut fenced = false;
    for _ in 0..100 {
        let r = record(&rig).await;
        if r.phase == ActorPhase::Suspended && r.reason == "WorkerLost" {
            assert_eq!(r.epoch, epoch + 1);
            fenced = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        fenced,
        "the lost worker's actor was not fenced: {:?}",
        record(&rig).await
    );
    let mut stopped = false;
    for _ in 0..100 {
        if provider.running().await.is_empty() {
            stopped = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(stopped, "the cut-off provider kept its actor running");
    dead.abort();
    rig.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_just_joined_is_never_declared_lost_by_a_concurrent_controller_round() {
    // A controller round that read the leases before a new worker's first heartbeat
    // renewed its lease, but took the control lock after that heartbeat wrote the worker's
    // record, saw a worker without a lease and declared it lost (and fenced its actors).
    let dir = tempfile::tempdir().unwrap();
    let (mut rig, _) = rig(dir.path(), Arc::new(AtomicBool::new(false)), false).await;
    let (fingerprint, incarnation) = rig
        .control
        .read(|st| {
            st.providers
                .get("faulty")
                .map(|p| (p.fingerprint.clone(), p.incarnation.clone()))
        })
        .await
        .unwrap()
        .expect("the rig's provider is enrolled");
    let info = rig.providers[0].provider.info().await;
    for i in 0..50 {
        let mut joiner = info.workers[0].clone();
        joiner.id = format!("faulty/joiner-{i}");
        let hb = Heartbeat {
            incarnation: incarnation.clone().expect("the provider has heartbeated"),
            capabilities: info.capabilities.clone(),
            workers: vec![joiner.clone()],
            running: vec![],
        };
        // Both in flight at once: the heartbeat first, the round right behind it.
        let (beat, round) = tokio::join!(rig.dp.heartbeat(&fingerprint, hb), rig.dp.tick());
        beat.unwrap();
        round.unwrap();
        let lost = rig
            .control
            .read(|st| st.workers.get(&joiner.id).map(|w| w.lost))
            .await
            .unwrap();
        assert_eq!(
            lost,
            Some(false),
            "round {i}: the new worker was declared lost"
        );
    }
    // The rig's own actor was never fenced by any of it.
    rig.get("t", "c").await.unwrap();
    assert_eq!(record(&rig).await.epoch, 1);
    rig.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_claiming_a_scope_it_lacks_fails_conformance() {
    let dir = tempfile::tempdir().unwrap();
    let (rig, key) = rig(dir.path(), Arc::new(AtomicBool::new(false)), true).await;
    let report = conformance::run(conformance::Config {
        client: rig.client("faulty").unwrap(),
        key,
        tenant: "conformance".into(),
        snapshot_dir: None,
        workloads: Default::default(),
    })
    .await;
    let failed: Vec<_> = report
        .checks
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::Failed(_)))
        .map(|(n, _)| n.as_str())
        .collect();
    // Exactly the lie fails: the honest Data scope round trip passes.
    assert_eq!(
        failed,
        vec!["process: checkpoint_restore_round_trip_Full"],
        "{:#?}",
        report.checks
    );
}

/// A request that outlasts the idle timeout is never cut off by idle suspension: the actor
/// is idle only with no request in flight, counted from the end of the last one — and the
/// write the slow request made is in the snapshot idle suspension then takes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_suspension_never_tears_down_a_request_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let (mut rig, _) = rig(dir.path(), Arc::new(AtomicBool::new(false)), false).await;
    rig.apply(&[
        json!({"apiVersion": "mayfly.dev/v1", "kind": "ActorTemplate",
               "metadata": {"name": "sleepy", "tenant": "t"},
               "spec": {"workload": process_workload(), "idleTimeoutMs": 300}}),
        json!({"apiVersion": "mayfly.dev/v1", "kind": "Actor",
               "metadata": {"name": "s", "tenant": "t"}, "spec": {"template": "sleepy"}}),
    ])
    .await
    .unwrap();
    let v = rig.call("t", "s", reqwest::Method::POST).await.unwrap();
    assert_eq!(v["counter"], 1);
    // 1.5 s in the actor, five idle timeouts, with the controller ticking every 200 ms.
    let (slow, _) = rig
        .dp
        .route(
            "t",
            "s",
            None,
            reqwest::Method::POST,
            "/slow",
            None,
            &[],
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(slow.status, 200, "{}", String::from_utf8_lossy(&slow.body));
    let v: serde_json::Value = serde_json::from_slice(&slow.body).unwrap();
    assert_eq!(v["counter"], 2, "{v}");
    let state = |rig: &LocalDataplane| {
        let control = rig.control.clone();
        async move {
            control
                .read(|st| st.actors.get("t/s").cloned())
                .await
                .unwrap()
                .expect("record")
        }
    };
    // Idleness counts from the end of the request: it is still running now.
    let after = state(&rig).await;
    assert_eq!(
        (after.phase, after.epoch),
        (ActorPhase::Running, 1),
        "suspended while serving: {after:?}"
    );
    // Afterwards it idles out, with the slow request's write in its snapshot.
    let end = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = state(&rig).await;
        if r.phase == ActorPhase::Suspended {
            assert_eq!(r.reason, "Idle");
            break;
        }
        assert!(std::time::Instant::now() < end, "never idled out: {r:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let v = rig.get("t", "s").await.unwrap();
    assert_eq!(v["counter"], 2, "{v}");
    rig.shutdown().await;
}

/// A provider holds no snapshot store: it reaches blobs through the control plane's broker,
/// only with the grant the control plane signed for the op at hand. Red team with the
/// provider's own certificate: no grant, a forged or foreign grant, another tenant's scope,
/// another provider's grant, a write under a read grant, an unenrolled certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_reaches_snapshot_blobs_only_under_its_ops_grant() {
    use mayfly_actor_api::{BlobGrant, CheckpointKind, Op, OpRequest};
    let dir = tempfile::tempdir().unwrap();
    let (mut rig, key) = rig(dir.path(), Arc::new(AtomicBool::new(false)), false).await;
    rig.get("t", "c").await.unwrap();
    let snap = rig.dp.suspend("t", "c", "Test").await.unwrap().unwrap();
    let manifest: mayfly_actor_api::Manifest =
        serde_json::from_value(snap.envelope.body.clone()).unwrap();
    let digest = manifest.blobs[0].digest.clone();
    // The checkpoint went through the broker into the control plane's store, not the
    // provider's.
    let stored = rig
        .store
        .get("t", &digest)
        .await
        .unwrap()
        .expect("in the store");
    // And the resume came back through it (fetched under the restore's grant).
    rig.get("t", "c").await.unwrap();
    assert_eq!(record(&rig).await.phase, ActorPhase::Running);

    let endpoint = rig.dp.config().provider_endpoint.clone().unwrap();
    let me = &rig.providers[0].identity;
    let http = mayfly_pki::client(rig.ca.cert_pem(), me, None).unwrap();
    let url = format!("{endpoint}/v1/blobs/{digest}");
    let restore = |tenant: &str| OpRequest {
        op_id: "restore.e9.x".into(),
        actor: "c".into(),
        tenant: tenant.into(),
        assignment_epoch: 9,
        op: Op::Restore {
            snapshot: snap.envelope.clone(),
            spec: ActorSpec {
                actor: "c".into(),
                tenant: tenant.into(),
                template: "counter".into(),
                workload: process_workload(),
            },
        },
        delivery: None,
        grant: None,
    };
    let grant = |k: &ControlKey, provider: &str, req: &OpRequest| {
        mayfly_actors::broker::grant_for(k, provider, req, Duration::from_secs(60), 0)
            .unwrap()
            .unwrap()
    };
    let get = |g: Option<&mayfly_trust::sign::Signed>| {
        let mut r = http.get(&url);
        if let Some(g) = g {
            r = r.header(
                mayfly_actors::broker::GRANT_HEADER,
                mayfly_actors::broker::encode(g),
            );
        }
        async move {
            let r = r.send().await.unwrap();
            (r.status().as_u16(), r.bytes().await.unwrap())
        }
    };
    let refused = |(status, body): (u16, bytes::Bytes)| {
        let text = String::from_utf8_lossy(&body).into_owned();
        assert_eq!(status, 403, "{text}");
        assert!(text.contains("blob_access_denied"), "{text}");
        text
    };
    // The grant the control plane would sign for a restore of this snapshot: served.
    let good = grant(&key, "faulty", &restore("t"));
    let (status, body) = get(Some(&good)).await;
    assert_eq!((status, body), (200, stored));
    // No grant.
    assert!(refused(get(None).await).contains("no readable grant"));
    // Signed by a key the control plane does not hold.
    let stranger_key = ControlKey::generate();
    assert!(
        refused(get(Some(&grant(&stranger_key, "faulty", &restore("t")))).await)
            .contains("unknown_key")
    );
    // Another provider's grant, presented with this provider's certificate.
    assert!(
        refused(get(Some(&grant(&key, "elsewhere", &restore("t")))).await)
            .contains("provider elsewhere's")
    );
    // A genuine grant in another tenant's scope: that tenant holds no such blob.
    let (status, _) = get(Some(&grant(&key, "faulty", &restore("other")))).await;
    assert_eq!(status, 404);
    // A grant whose body was edited after signing (its tenant, its reads).
    let mut edited = good.clone();
    edited.body = serde_json::to_value(BlobGrant {
        read: vec![digest.clone(), "sha256:".to_owned() + &"0".repeat(64)],
        ..serde_json::from_value(good.body.clone()).unwrap()
    })
    .unwrap();
    assert!(refused(get(Some(&edited)).await).contains("digest_mismatch"));
    // Writing under a read grant; and under a write grant, beyond its budget.
    let put = |g: &mayfly_trust::sign::Signed, body: &'static [u8]| {
        let d = mayfly_trust::sha256_digest(body);
        let r = http
            .put(format!("{endpoint}/v1/blobs/{d}"))
            .header(
                mayfly_actors::broker::GRANT_HEADER,
                mayfly_actors::broker::encode(g),
            )
            .body(body);
        async move {
            let r = r.send().await.unwrap();
            (r.status().as_u16(), r.bytes().await.unwrap())
        }
    };
    assert!(refused(put(&good, b"planted").await).contains("allows 0 bytes"));
    let checkpoint = OpRequest {
        op: Op::Checkpoint {
            kind: CheckpointKind::External,
            scope: Scope::Data,
            teardown: false,
        },
        ..restore("t")
    };
    let w =
        mayfly_actors::broker::grant_for(&key, "faulty", &checkpoint, Duration::from_secs(60), 8)
            .unwrap()
            .unwrap();
    assert_eq!(put(&w, b"12345678").await.0, 204);
    assert!(refused(put(&w, b"9").await).contains("allows 8 bytes"));
    // A certificate of the control plane's CA that no enrollment recorded.
    let stranger = rig
        .ca
        .issue(&[], mayfly_pki::Usage::Provider, "provider:stranger")
        .unwrap();
    let http = mayfly_pki::client(rig.ca.cert_pem(), &stranger, None).unwrap();
    let r = http
        .get(&url)
        .header(
            mayfly_actors::broker::GRANT_HEADER,
            mayfly_actors::broker::encode(&good),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    assert!(r.text().await.unwrap().contains("not an enrolled provider"));
    rig.shutdown().await;
}
