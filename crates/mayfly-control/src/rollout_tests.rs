use crate::model::*;
use crate::rollout::*;
use crate::service::{Control, ControlError, Outcome, verify_stored};
use mayfly_store::Store;
use mayfly_trust::sign::ControlKey;
use std::collections::BTreeMap;
use std::sync::Arc;

use crate::tests::caller;

fn sys() -> Caller {
    caller(SYSTEM_TENANT, Role::Admin)
}

/// A control plane on a fresh SQLite log, with a signing key.
async fn control() -> (tempfile::TempDir, Arc<dyn Store>, Control) {
    let (dir, store, c) = crate::tests::control().await;
    (dir, store, c.with_signer(ControlKey::generate()))
}

fn policy(tools: &str) -> Vec<Manifest> {
    parse_manifests(
        "p.yaml",
        &format!(
            "apiVersion: mayfly.dev/v1\nkind: Policy\nmetadata: {{name: tools, tenant: acme}}\nspec:\n  tools: {{allow: [{tools}]}}\n"
        ),
    )
    .expect("policy")
}

fn rollout(name: &str, bundle: &str, extra: &str) -> Vec<Manifest> {
    parse_manifests(
        "r.yaml",
        &format!(
            "apiVersion: mayfly.dev/v1\nkind: Rollout\nmetadata: {{name: {name}}}\nspec:\n  bundle: \"{bundle}\"\n  target: {{pool: gpu}}\n{extra}"
        ),
    )
    .expect("rollout")
}

fn report(agent: &str, pool: &str, applied: Option<&str>) -> AgentReport {
    AgentReport {
        record: AgentRecord {
            agent: agent.into(),
            pool: pool.into(),
            labels: BTreeMap::new(),
            applied: applied.map(str::to_owned),
            refused: None,
        },
        blocks_ok: 0,
        blocks_failed: 0,
        interval_ms: 1000,
    }
}

async fn phase_of(c: &Control, name: &str) -> TPhase {
    c.rollout_status(name)
        .await
        .expect("status")
        .transition
        .phase
}

async fn status_of(c: &Control, name: &str) -> Status {
    c.get(&sys(), Kind::Rollout, Some(name)).await[0]
        .status
        .clone()
}

#[tokio::test]
async fn bundles_are_signed_content_addressed_and_published_by_system_admins_only() {
    let (_d, store, c) = control().await;
    c.apply(&caller("acme", Role::Admin), &policy("python"))
        .await
        .expect("policy");
    let e = c
        .publish_bundle(&caller("acme", Role::Admin))
        .await
        .expect_err("tenant admin");
    assert!(matches!(e, ControlError::Forbidden(_)), "{e}");
    let b = c.publish_bundle(&sys()).await.expect("publish");
    assert!(b.created && b.digest.starts_with("sha256:") && b.policies == 1);
    let again = c.publish_bundle(&sys()).await.expect("again");
    assert_eq!((again.created, &again.digest), (false, &b.digest));
    assert_eq!(again.accepted_token, None, "a no-op writes nothing");
    let bundles = c.bundles().await;
    assert_eq!(bundles.len(), 1);
    let body: BundleBody = serde_json::from_value(bundles[0].body.clone()).expect("body");
    assert_eq!(body.policies[0].key.name, "tools");
    // A node without the key cannot sign.
    let unsigned = Control::open(store).await.expect("open");
    let e = unsigned.publish_bundle(&sys()).await.expect_err("no key");
    assert!(e.to_string().contains("no control plane key"), "{e}");
}

#[tokio::test]
async fn a_rollout_is_planned_admitted_and_completed_by_a_quorum_of_effective_agents() {
    let (_d, store, c) = control().await;
    c.apply(&caller("acme", Role::Admin), &policy("python"))
        .await
        .expect("policy");
    let b = c.publish_bundle(&sys()).await.expect("publish").digest;

    // An unknown bundle, and a tenant caller, are refused.
    let r = c
        .apply(&sys(), &rollout("r1", "sha256:00", ""))
        .await
        .expect("apply");
    assert!(r.results[0].reason.contains("not published"), "{r:?}");
    let r = c
        .apply(&caller("acme", Role::Admin), &rollout("r1", &b, ""))
        .await
        .expect("apply");
    assert_eq!(r.results[0].outcome, Outcome::Denied);

    let r = c
        .apply(&sys(), &rollout("r1", &b, "  quorum: 0.5\n"))
        .await
        .expect("apply");
    assert_eq!(r.results[0].outcome, Outcome::Created);
    assert_eq!(phase_of(&c, "r1").await, TPhase::Planned);
    let s = status_of(&c, "r1").await;
    assert_eq!(
        (s.phase, s.conditions[0].reason.as_str()),
        (Phase::Pending, "NoMatchingAgents")
    );

    // An agent of another pool changes nothing; one of the pool admits it and is told to
    // enforce the bundle.
    let other = c
        .agent_report(report("cpu-1", "cpu", None))
        .await
        .expect("report");
    assert_eq!(other.desired, None);
    assert_eq!(phase_of(&c, "r1").await, TPhase::Planned);
    let a = c
        .agent_report(report("gpu-1", "gpu", None))
        .await
        .expect("report");
    assert_eq!(a.desired.map(|d| d.digest), Some(b.clone()));
    c.agent_report(report("gpu-2", "gpu", None))
        .await
        .expect("report");
    assert_eq!(phase_of(&c, "r1").await, TPhase::Admitted);
    assert_eq!(status_of(&c, "r1").await.phase, Phase::Progressing);

    // One of two agents observing it effective is a quorum of 0.5.
    c.agent_report(report("gpu-1", "gpu", Some(&b)))
        .await
        .expect("ack");
    let st = c.rollout_status("r1").await.expect("status");
    assert_eq!(st.transition.phase, TPhase::Completed, "{st:?}");
    let acks: BTreeMap<_, _> = st
        .agents
        .iter()
        .map(|a| (a.agent.as_str(), a.effective))
        .collect();
    assert_eq!(acks, BTreeMap::from([("gpu-1", true), ("gpu-2", false)]));
    let s = status_of(&c, "r1").await;
    assert_eq!((s.phase, s.observed_generation), (Phase::Ready, 1));
    // The pool is observed now that agents report against it.
    let pool = parse_manifests(
        "pool.yaml",
        "apiVersion: mayfly.dev/v1\nkind: WorkerPool\nmetadata: {name: gpu, tenant: system}\nspec: {slots: 4}\n",
    )
    .expect("pool");
    c.apply(&sys(), &pool).await.expect("pool");
    let p = c.get(&sys(), Kind::WorkerPool, Some("gpu")).await;
    assert_eq!(p[0].status.phase, Phase::Ready, "{:?}", p[0].status);

    // Every decision is in the audited stream: a fresh fold reproduces the transitions.
    verify_stored(store.as_ref()).await.expect("verifies");
    let replayed = Control::open(store.clone()).await.expect("reopen");
    assert_eq!(
        replayed.rollout_status("r1").await.expect("st").transition,
        st.transition
    );
    let events = store
        .read_all(&mayfly_types::ExecutionId::from("control"))
        .await
        .expect("read");
    let kinds: Vec<String> = events.iter().map(|e| e.kind.to_string()).collect();
    for k in ["bundle.published", "transition.changed", "agent.reported"] {
        assert!(kinds.iter().any(|x| x == k), "{k} missing: {kinds:?}");
    }
}

#[tokio::test]
async fn the_same_intent_is_a_no_op_and_a_conflicting_one_is_refused_with_a_retry_hint() {
    let (_d, _store, c) = control().await;
    c.apply(&caller("acme", Role::Admin), &policy("python"))
        .await
        .expect("policy");
    let b1 = c.publish_bundle(&sys()).await.expect("b1").digest;
    c.apply(&caller("acme", Role::Admin), &policy("python, shell"))
        .await
        .expect("policy 2");
    let b2 = c.publish_bundle(&sys()).await.expect("b2").digest;
    assert_ne!(b1, b2);
    c.apply(&sys(), &rollout("r1", &b1, "")).await.expect("r1");
    c.agent_report(report("gpu-1", "gpu", None))
        .await
        .expect("report");
    assert_eq!(phase_of(&c, "r1").await, TPhase::Admitted);

    // Another rollout with the same intent: stored, but nothing new is rolled out.
    let same = c
        .apply(&sys(), &rollout("r1-again", &b1, ""))
        .await
        .expect("same");
    assert_eq!(same.results[0].outcome, Outcome::Created);
    assert!(same.results[0].reason.contains("same intent"), "{same:?}");
    let before = c.rollout_status("r1").await.expect("st").transition;
    assert_eq!(
        c.rollout_status("r1-again").await.expect("st").transition,
        before
    );

    // A different bundle on the same scope conflicts while r1 holds it.
    let r = c.apply(&sys(), &rollout("r2", &b2, "")).await.expect("r2");
    assert_eq!(r.results[0].outcome, Outcome::Denied);
    assert!(r.results[0].reason.contains("conflicted"), "{r:?}");
    let hint = r.results[0].retry_hint.clone().expect("hint");
    assert!(hint.contains("mayfly rollout cancel r1"), "{hint}");
    let st = c.state_for_tests().await;
    let t2 = RolloutSpec {
        bundle: b2.clone(),
        target: Target {
            pool: Some("gpu".into()),
            labels: BTreeMap::new(),
        },
        activation: Activation::default(),
        quorum: 1.0,
        rollback: RollbackTrigger::default(),
        max_inconsistency_ms: 60_000,
        revision: 0,
    }
    .transition_id();
    assert_eq!(st.transitions[&t2].phase, TPhase::Conflicted);

    // Cancelled, r1 gives the scope back (agents return to no bundle), and r2 goes through.
    c.cancel_rollout(&caller("acme", Role::Admin), "r1")
        .await
        .expect_err("tenant admin cannot cancel");
    c.cancel_rollout(&sys(), "r1").await.expect("cancel");
    assert_eq!(phase_of(&c, "r1").await, TPhase::Cancelled);
    let e = c.cancel_rollout(&sys(), "r1").await.expect_err("twice");
    assert!(e.to_string().contains("not in progress"), "{e}");
    let r = c.apply(&sys(), &rollout("r2", &b2, "")).await.expect("r2");
    assert_eq!(r.results[0].outcome, Outcome::Created, "{r:?}");
    let a = c
        .agent_report(report("gpu-1", "gpu", None))
        .await
        .expect("report");
    assert_eq!(a.desired.map(|d| d.digest), Some(b2.clone()));
    let phases: Vec<TPhase> = c.state_for_tests().await.transitions[&t2]
        .phases
        .iter()
        .map(|p| p.phase)
        .collect();
    assert_eq!(
        phases,
        [TPhase::Conflicted, TPhase::Planned, TPhase::Admitted]
    );
}

#[tokio::test]
async fn a_refusing_agent_rolls_the_rollout_back_to_the_previous_bundle() {
    let (_d, _store, c) = control().await;
    c.apply(&caller("acme", Role::Admin), &policy("python"))
        .await
        .expect("policy");
    let b1 = c.publish_bundle(&sys()).await.expect("b1").digest;
    c.apply(&sys(), &rollout("r1", &b1, "")).await.expect("r1");
    c.agent_report(report("gpu-1", "gpu", None))
        .await
        .expect("report");
    c.agent_report(report("gpu-1", "gpu", Some(&b1)))
        .await
        .expect("ack");
    assert_eq!(phase_of(&c, "r1").await, TPhase::Completed);

    c.apply(&caller("acme", Role::Admin), &policy("python, http"))
        .await
        .expect("policy 2");
    let b2 = c.publish_bundle(&sys()).await.expect("b2").digest;
    c.apply(&sys(), &rollout("r2", &b2, "")).await.expect("r2");
    let a = c
        .agent_report(report("gpu-1", "gpu", Some(&b1)))
        .await
        .expect("report");
    assert_eq!(a.desired.map(|d| d.digest), Some(b2.clone()));
    let mut refusing = report("gpu-1", "gpu", Some(&b1));
    refusing.record.refused = Some(Refusal {
        bundle: b2.clone(),
        code: "bad_signature".into(),
        message: "the signature does not verify".into(),
    });
    let a = c.agent_report(refusing).await.expect("refusal");
    assert_eq!(phase_of(&c, "r2").await, TPhase::Aborted);
    assert_eq!(
        a.desired.map(|d| d.digest),
        Some(b1.clone()),
        "rolled back to the bundle in force before"
    );
    let st = c.rollout_status("r2").await.expect("st");
    assert!(st.transition.reason.contains("refused"), "{st:?}");
    assert_eq!(
        st.agents[0].refused.as_ref().map(|r| r.code.as_str()),
        Some("bad_signature")
    );
    assert_eq!(status_of(&c, "r2").await.conditions[0].reason, "RolledBack");
    // r1 was never superseded: r2 did not complete.
    assert_eq!(phase_of(&c, "r1").await, TPhase::Completed);
}

/// The controller's clock-driven rules, evaluated purely at chosen instants.
#[tokio::test]
async fn activation_delay_error_rate_window_and_supersession_are_decided_purely() {
    let (_d, _store, c) = control().await;
    c.apply(&caller("acme", Role::Admin), &policy("python"))
        .await
        .expect("policy");
    let b1 = c.publish_bundle(&sys()).await.expect("b1").digest;
    c.apply(
        &sys(),
        &rollout(
            "r1",
            &b1,
            "  activation: {after_ms: 10000}\n  max_inconsistency_ms: 5000\n  rollback: {error_rate: 0.5, min_blocks: 10}\n",
        ),
    )
    .await
    .expect("r1");
    let st = c.state_for_tests().await;
    let t = st.transitions.values().next().expect("t").clone();
    let live = |ok: u64, failed: u64, at: u64| {
        let mut r = report("gpu-1", "gpu", None);
        r.blocks_ok = ok;
        r.blocks_failed = failed;
        BTreeMap::from([(
            "gpu-1".to_owned(),
            LiveAgent {
                report: r,
                last_seen_ms: at,
            },
        )])
    };
    let t0 = t.planned_at;
    assert!(st.reconcile(t0 + 9_999, &live(0, 0, t0 + 9_999)).is_empty());
    let adm = st.reconcile(t0 + 10_000, &live(5, 1, t0 + 10_000));
    assert_eq!(adm[0].phase, TPhase::Admitted);
    // A silent agent is not live: nothing is admitted for it.
    assert!(st.reconcile(t0 + 20_000, &live(0, 0, t0)).is_empty());

    // Fold the admission (with its baseline) and judge later instants.
    let mut st = st;
    st.fold_transition(adm[0].clone(), st.seq + 1, t0 + 10_000)
        .expect("fold");
    let at = t0 + 11_000;
    assert!(
        st.reconcile(at, &live(10, 5, at)).is_empty(),
        "9 blocks < min_blocks"
    );
    let err = st.reconcile(at, &live(10, 7, at));
    assert_eq!(err[0].phase, TPhase::Aborted, "{err:?}");
    assert!(
        err[0].reason.contains("6 of 11 blocks failed"),
        "{}",
        err[0].reason
    );
    let late = t0 + 15_001;
    let win = st.reconcile(late, &live(5, 1, late));
    assert_eq!(win[0].phase, TPhase::Aborted);
    assert!(
        win[0].reason.contains("max inconsistency window"),
        "{}",
        win[0].reason
    );

    // Quorum met: completed, and an earlier completed transition on the scope superseded.
    let mut old = t.clone();
    old.id = "tr-old".into();
    old.phase = TPhase::Completed;
    st.transitions.insert(old.id.clone(), old);
    st.agents.insert(
        "gpu-1".into(),
        AgentRecord {
            agent: "gpu-1".into(),
            pool: "gpu".into(),
            labels: BTreeMap::new(),
            applied: Some(b1.clone()),
            refused: None,
        },
    );
    let done = st.reconcile(at, &live(5, 1, at));
    let phases: Vec<(&str, TPhase)> = done.iter().map(|c| (c.id.as_str(), c.phase)).collect();
    assert_eq!(
        phases,
        [
            (t.id.as_str(), TPhase::Completed),
            ("tr-old", TPhase::Superseded)
        ]
    );
}

#[test]
fn rollout_manifests_validate_bounds_with_locations() {
    let bad = "apiVersion: mayfly.dev/v1\nkind: Rollout\nmetadata: {name: r, tenant: acme}\nspec:\n  bundle: latest\n  quorum: 1.5\n";
    let e = parse_manifests("r.yaml", bad).expect_err("invalid");
    let text = e.to_string();
    assert!(text.contains("cluster-scoped"), "{text}");
    assert!(text.contains("r.yaml:5:"), "{text}");
    assert!(text.contains("bundle digest"), "{text}");
    for (spec, want) in [
        ("quorum: 0", "quorum"),
        ("rollback: {failed_acks: 0}", "failed_acks"),
        (
            "target: {zone: x}",
            "spec: target.zone: unknown field `zone`",
        ),
    ] {
        let bad = format!(
            "apiVersion: mayfly.dev/v1\nkind: Rollout\nmetadata: {{name: r}}\nspec:\n  bundle: sha256:ab\n  {spec}\n"
        );
        let e = parse_manifests("r.yaml", &bad).expect_err(spec).to_string();
        assert!(e.contains(want), "{spec}: {e}");
    }
    // The id is the intent's: the rollout's name and tuning do not change it, a revision does.
    let a: RolloutSpec = serde_json::from_value(
        serde_json::json!({"bundle": "sha256:ab", "target": {"pool": "gpu"}}),
    )
    .expect("a");
    let mut b = a.clone();
    b.quorum = 0.5;
    assert_eq!(a.transition_id(), b.transition_id());
    b.revision = 1;
    assert_ne!(a.transition_id(), b.transition_id());
}

/// Conflicts are decided within one apply too, reveal nothing to callers refused for
/// authorization, and never re-plan an intent whose transition already ran.
#[tokio::test]
async fn conflicts_within_an_apply_and_for_unauthorized_callers() {
    let (_d, _store, c) = control().await;
    c.apply(&caller("acme", Role::Admin), &policy("python"))
        .await
        .expect("policy");
    let b1 = c.publish_bundle(&sys()).await.expect("b1").digest;
    c.apply(&caller("acme", Role::Admin), &policy("python, http"))
        .await
        .expect("policy 2");
    let b2 = c.publish_bundle(&sys()).await.expect("b2").digest;
    let mut both = rollout("r1", &b1, "");
    both.extend(rollout("r2", &b2, ""));
    let r = c.apply(&sys(), &both).await.expect("apply");
    assert_eq!(r.results[1].outcome, Outcome::Denied, "{r:?}");
    assert!(r.results[1].reason.contains("of this apply"), "{r:?}");
    assert!(r.results[1].retry_hint.is_some());
    assert_eq!(r.results[0].outcome, Outcome::Skipped, "all or nothing");

    c.apply(&sys(), &rollout("r1", &b1, "")).await.expect("r1");
    c.agent_report(report("gpu-1", "gpu", None))
        .await
        .expect("report");
    // A tenant admin is refused for authorization: no hint, no transition recorded.
    let before = c.state_for_tests().await.transitions.len();
    let r = c
        .apply(&caller("acme", Role::Admin), &rollout("r2", &b2, ""))
        .await
        .expect("apply");
    assert_eq!(r.results[0].outcome, Outcome::Denied);
    assert_eq!(r.results[0].retry_hint, None, "{r:?}");
    assert_eq!(c.state_for_tests().await.transitions.len(), before);

    // r1 completes; r2 runs and holds the scope; re-declaring r1's finished intent under a
    // new name is refused as a conflict, and r1's record is left as it was.
    c.agent_report(report("gpu-1", "gpu", Some(&b1)))
        .await
        .expect("ack");
    c.apply(&sys(), &rollout("r2", &b2, "")).await.expect("r2");
    let r = c
        .apply(&sys(), &rollout("r1-again", &b1, ""))
        .await
        .expect("apply");
    assert_eq!(r.results[0].outcome, Outcome::Denied, "{r:?}");
    assert_eq!(phase_of(&c, "r1").await, TPhase::Completed);
}

/// A Rollout whose transition is in progress cannot change its intent (its old transition
/// would become unreachable by `cancel`): refused with a hint to cancel it first.
#[tokio::test]
async fn an_in_progress_rollout_cannot_change_its_intent() {
    let (_d, _store, c) = control().await;
    c.apply(&caller("acme", Role::Admin), &policy("python"))
        .await
        .expect("policy");
    let b1 = c.publish_bundle(&sys()).await.expect("b1").digest;
    c.apply(&sys(), &rollout("r1", &b1, "")).await.expect("r1");
    let elsewhere = parse_manifests(
        "r.yaml",
        &format!("apiVersion: mayfly.dev/v1\nkind: Rollout\nmetadata: {{name: r1}}\nspec:\n  bundle: \"{b1}\"\n  target: {{pool: cpu}}\n"),
    )
    .expect("rollout");
    let r = c.apply(&sys(), &elsewhere).await.expect("apply");
    assert_eq!(r.results[0].outcome, Outcome::Denied, "{r:?}");
    assert!(r.results[0].reason.contains("cancel it before"), "{r:?}");
    let hint = r.results[0].retry_hint.clone().expect("hint");
    assert!(hint.contains("mayfly rollout cancel r1"), "{hint}");
    c.cancel_rollout(&sys(), "r1").await.expect("cancel");
    let r = c.apply(&sys(), &elsewhere).await.expect("apply");
    assert_eq!(r.results[0].outcome, Outcome::Configured, "{r:?}");
}
