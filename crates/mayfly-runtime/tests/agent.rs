//! The data-plane agent for real: a worker pool whose agent applies a signed policy bundle
//! rolled out by the control plane enforces it on every block; bundles that do not verify
//! are refused, audited, and roll the rollout back.

use mayfly_control::rollout::TPhase;
use mayfly_control::{Caller, Control, Role, SYSTEM_TENANT, parse_manifests};
use mayfly_dsl::{ParseOptions, parse};
use mayfly_engine::Status;
use mayfly_runtime::agent::{Agent, AgentConfig};
use mayfly_runtime::{Runtime, RuntimeConfig};
use mayfly_store::{SqliteStore, Store};
use mayfly_trust::sign::ControlKey;
use serde_json::Map;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

fn caller(tenant: &str) -> Caller {
    Caller {
        tenant: tenant.into(),
        role: Role::Admin,
        actor: "admin".into(),
        request_id: "r".into(),
    }
}

fn agent(id: &str, key: &ControlKey) -> Arc<Agent> {
    Arc::new(Agent::new(AgentConfig {
        id: id.into(),
        pool: "default".into(),
        labels: BTreeMap::new(),
        trusted: vec![key.public().clone()],
        interval: Duration::from_millis(100),
    }))
}

async fn setup() -> (tempfile::TempDir, Arc<dyn Store>, Arc<Control>, ControlKey) {
    let dir = tempfile::tempdir().expect("tmp");
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(dir.path().join("m.db"))
            .await
            .expect("store"),
    );
    let key = ControlKey::generate();
    let control = Arc::new(
        Control::open(store.clone())
            .await
            .expect("control")
            .with_signer(key.clone()),
    );
    (dir, store, control, key)
}

/// Apply `policies` (YAML) for the default tenant, publish a bundle of them, and roll it
/// out to every agent as Rollout `name`; the bundle's digest.
async fn roll_out(control: &Control, policies: &str, name: &str) -> String {
    let policy = parse_manifests("p.yaml", policies).expect("policy");
    control
        .apply(&caller("default"), &policy)
        .await
        .expect("apply");
    let b = control
        .publish_bundle(&caller(SYSTEM_TENANT))
        .await
        .expect("publish")
        .digest;
    let r = parse_manifests(
        "r.yaml",
        &format!("apiVersion: mayfly.dev/v1\nkind: Rollout\nmetadata: {{name: {name}}}\nspec:\n  bundle: \"{b}\"\n"),
    )
    .expect("rollout");
    control
        .apply(&caller(SYSTEM_TENANT), &r)
        .await
        .expect("rollout");
    b
}

const NOOP_ONLY: &str = "apiVersion: mayfly.dev/v1\nkind: Policy\nmetadata: {name: noop-only, tenant: default}\nspec:\n  tools: {allow: [noop]}\n";

/// Allow only `noop` for the default tenant, publish, and roll it out to every agent.
async fn roll_out_noop_only(control: &Control) -> String {
    roll_out(control, NOOP_ONLY, "lock-down").await
}

const SHELL: &str = "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {name: sh, path: t/sh}\nworkflow:\n  - step: start\n    tool: {kind: shell, cmds: [\"echo hi\"]}\n";
const NOOP: &str = "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {name: nop, path: t/nop}\nworkflow:\n  - step: start\n    tool: {kind: noop}\n";

#[tokio::test]
async fn workers_enforce_the_bundle_their_agent_applied_and_acknowledge_it() {
    let (_dir, store, control, key) = setup().await;
    let a = agent("w-1", &key);
    let rt = Runtime::start(
        store.clone(),
        RuntimeConfig {
            workers: 2,
            agent: Some(a.clone()),
            ..Default::default()
        },
    )
    .expect("rt");
    // Its workers take blocks once the agent has heard from the control plane.
    a.sync(control.as_ref()).await.expect("first sync");
    // Before any bundle, the worker runs shell.
    let pb = parse("sh.yaml", SHELL, &ParseOptions::default()).expect("pb");
    let r = rt.run(pb.clone(), Map::new()).await.expect("run");
    assert_eq!(r.status, Status::Completed, "{:?}", r.error);

    let b = roll_out_noop_only(&control).await;
    a.sync(control.as_ref()).await.expect("sync");
    assert_eq!(a.applied(), Some(b.clone()));
    let st = control.rollout_status("lock-down").await.expect("status");
    assert_eq!(st.transition.phase, TPhase::Completed, "{st:?}");
    assert!(st.agents[0].effective && st.agents[0].agent == "w-1");

    // Admission never saw these runs (no gateway): the worker itself refuses the block.
    let r = rt.run(pb, Map::new()).await.expect("run");
    assert_eq!(r.status, Status::Failed);
    let e = r.error.expect("error");
    assert_eq!(e.code, "policy_denied", "{e:?}");
    assert!(
        e.message.contains("does not allow tool kind `shell`"),
        "{e:?}"
    );
    assert!(e.message.contains(&b), "names the bundle: {e:?}");
    let ok = parse("nop.yaml", NOOP, &ParseOptions::default()).expect("pb");
    let r = rt.run(ok, Map::new()).await.expect("run");
    assert_eq!(r.status, Status::Completed, "{:?}", r.error);

    // Cancelling is not possible once completed; a withdrawn bundle (none desired) stops
    // enforcement.
    a.offer(None);
    assert_eq!(a.applied(), None);
}

#[tokio::test]
async fn a_bundle_that_does_not_verify_is_refused_audited_and_rolled_back() {
    let (_dir, store, control, _key) = setup().await;
    // This agent trusts another key: the control plane's signature is unknown to it.
    let stranger = agent("w-2", &ControlKey::generate());
    let b = roll_out_noop_only(&control).await;
    stranger.sync(control.as_ref()).await.expect("sync");
    assert_eq!(stranger.applied(), None, "nothing unverified is applied");
    let st = control.rollout_status("lock-down").await.expect("status");
    assert_eq!(st.transition.phase, TPhase::Aborted, "{st:?}");
    let refusal = st.agents[0].refused.clone().expect("refusal");
    assert_eq!(
        (refusal.code.as_str(), refusal.bundle.as_str()),
        ("unknown_key", b.as_str())
    );
    let events = store
        .read_all(&mayfly_types::ExecutionId::from("control"))
        .await
        .expect("read");
    assert!(
        events.iter().any(|e| e.kind.as_str() == "agent.reported"
            && e.actor == "agent:w-2"
            && e.payload["refused"]["code"] == "unknown_key"),
        "the refusal is audited"
    );

    // A bundle altered after signing is refused too, and the one in force stays in force.
    let (_d2, _s2, control2, key2) = setup().await;
    let trusting = agent("w-3", &key2);
    let good = roll_out_noop_only(&control2).await;
    trusting.sync(control2.as_ref()).await.expect("sync");
    assert_eq!(trusting.applied(), Some(good.clone()));
    let mut forged = control2.bundles().await.remove(0);
    forged.body["policies"] = serde_json::json!([]);
    forged.digest = "sha256:forged".into();
    trusting.offer(Some(&forged));
    assert_eq!(
        trusting.applied(),
        Some(good),
        "the verified bundle stays applied"
    );
    let r = trusting.report().record.refused.expect("refused");
    assert_eq!(r.code, "digest_mismatch");
}

/// A hub that answers with the control plane's bundle but a clock `skew_ms` ahead of the
/// worker's (the control plane's clock is the one that counts).
struct Skewed {
    control: Arc<Control>,
    skew_ms: u64,
}

impl mayfly_runtime::agent::AgentHub for Skewed {
    fn report(
        &self,
        report: mayfly_control::rollout::AgentReport,
    ) -> mayfly_runtime::agent::HubFuture<'_> {
        Box::pin(async move {
            let mut a = self
                .control
                .agent_report(report)
                .await
                .map_err(|e| e.to_string())?;
            a.now_ms += self.skew_ms;
            Ok(a)
        })
    }
}

/// Time-bound exceptions expire by the control plane's clock, not the worker's: a worker
/// whose clock runs an hour behind still stops honouring an exception the control plane
/// considers expired.
#[tokio::test]
async fn agents_judge_expiry_by_the_control_planes_clock() {
    let (_dir, _store, control, key) = setup().await;
    let now = mayfly_types::now_ms();
    let expires = now + 10 * 60_000;
    let policies = format!(
        "{NOOP_ONLY}---\napiVersion: mayfly.dev/v1\nkind: Policy\nmetadata: {{name: shell-for-now, tenant: default}}\nspec:\n  exception: true\n  scope: {{playbook: t/sh}}\n  expires_at_ms: {expires}\n  tools: {{allow: [shell]}}\n"
    );
    let b = roll_out(&control, &policies, "x").await;
    let tools = || std::collections::BTreeSet::from(["shell".to_owned()]);

    let in_sync = agent("w-a", &key);
    in_sync.sync(control.as_ref()).await.expect("sync");
    assert_eq!(
        in_sync.check("default", "t/sh", tools(), Default::default()),
        None
    );

    // The control plane is an hour past the expiry; this worker's clock is not.
    let behind = agent("w-b", &key);
    let hub = Skewed {
        control: control.clone(),
        skew_ms: 70 * 60_000,
    };
    behind.sync(&hub).await.expect("sync");
    assert_eq!(behind.applied(), Some(b));
    let denied = behind
        .check("default", "t/sh", tools(), Default::default())
        .expect("expired by the control plane's clock");
    assert!(
        denied.contains("does not allow tool kind `shell`"),
        "{denied}"
    );
}

/// A worker whose agent could not apply the bundle the control plane has in force (here:
/// signed with a key it does not trust) runs nothing: failing open would let through what
/// the bundle forbids.
#[tokio::test]
async fn a_worker_without_the_bundle_in_force_runs_nothing() {
    let (_dir, store, control, _key) = setup().await;
    let stranger = agent("w-4", &ControlKey::generate());
    let rt = Runtime::start(
        store.clone(),
        RuntimeConfig {
            workers: 1,
            agent: Some(stranger.clone()),
            ..Default::default()
        },
    )
    .expect("rt");
    stranger.sync(control.as_ref()).await.expect("first sync");
    let pb = parse("sh.yaml", SHELL, &ParseOptions::default()).expect("pb");
    assert_eq!(stranger.missing_bundle(), None, "no bundle in force yet");
    let r = rt.run(pb.clone(), Map::new()).await.expect("run");
    assert_eq!(r.status, Status::Completed, "{:?}", r.error);

    let b = roll_out_noop_only(&control).await;
    // The answer that carries the bundle is the one it refuses.
    stranger.offer(control.bundles().await.first());
    assert_eq!(stranger.applied(), None);
    let why = stranger.missing_bundle().expect("missing");
    assert!(why.contains(&b) && why.contains("unknown_key"), "{why}");
    // (A noop step never reaches a worker: the engine completes it inline.)
    let r = rt.run(pb.clone(), Map::new()).await.expect("run");
    let e = r.error.expect("refused");
    assert_eq!(
        (r.status, e.code.as_str()),
        (Status::Failed, "no_policy_bundle"),
        "{e:?}"
    );
    // The bundle withdrawn: nothing is in force, and it runs again.
    stranger.offer(None);
    let r = rt.run(pb, Map::new()).await.expect("run");
    assert_eq!(r.status, Status::Completed, "{:?}", r.error);
}
