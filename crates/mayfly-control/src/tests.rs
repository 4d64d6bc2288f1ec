use crate::model::*;
use crate::service::{Control, Outcome, verify_stored};
use mayfly_store::{SqliteStore, Store};
use serde_json::json;
use std::sync::Arc;

pub(super) fn caller(tenant: &str, role: Role) -> Caller {
    Caller {
        tenant: tenant.into(),
        role,
        actor: format!("{tenant}-{role:?}").to_lowercase(),
        request_id: "req-1".into(),
    }
}

const POOL: &str = "apiVersion: mayfly.dev/v1\nkind: WorkerPool\nmetadata:\n  name: gpu\n  labels: {team: ml}\nspec:\n  slots: 8\n  queue: mayfly\n";

#[test]
fn manifests_parse_and_validate_with_locations() {
    let src = format!(
        "{POOL}---\napiVersion: mayfly.dev/v1\nkind: Environment\nmetadata: {{name: prod}}\nspec: {{description: production}}\n"
    );
    let ms = parse_manifests("pool.yaml", &src).expect("valid");
    assert_eq!(ms.len(), 2);
    assert_eq!((ms[0].kind, ms[0].name.as_str()), (Kind::WorkerPool, "gpu"));
    assert_eq!(ms[0].labels.get("team").map(String::as_str), Some("ml"));
    assert_eq!(ms[1].kind, Kind::Environment);

    let bad = "apiVersion: mayfly.dev/v1\nkind: WorkerPool\nmetadata: {name: Bad_Name}\nspec:\n  slots: 0\n---\napiVersion: v0\nkind: Gadget\nmetadata: {name: x}\nextra: 1\n---\napiVersion: mayfly.dev/v1\nkind: Policy\nmetadata: {name: p}\nspec:\n  tools: {allow: [python, rocket]}\n---\napiVersion: mayfly.dev/v1\nkind: Policy\nmetadata: {name: q}\nspec:\n  egress: {allow: [\"10.0.0.0/40\"]}\n---\napiVersion: mayfly.dev/v1\nkind: Policy\nmetadata: {name: r}\nspec:\n  egress: everywhere\n---\napiVersion: mayfly.dev/v1\nkind: Tenant\nmetadata: {name: acme, tenant: acme}\nspec: {colour: red}\n";
    let e = parse_manifests("bad.yaml", bad).expect_err("invalid");
    let text = e.to_string();
    for want in [
        "bad.yaml:3:", // name
        "`metadata.name` must be a lowercase name",
        "bad.yaml:5:", // spec of the pool
        "`slots` must be at least 1",
        "bad.yaml:7:", // apiVersion v0
        "unknown kind `Gadget`",
        "unknown field `extra`",
        "unknown tool kind `rocket`",
        "egress: egress rule `10.0.0.0/40`",
        "unknown variant `everywhere`",
        "Tenant is cluster-scoped",
        "unknown field `colour`",
    ] {
        assert!(text.contains(want), "missing `{want}` in:\n{text}");
    }
    let e = parse_manifests("broken.yaml", "kind: [unclosed\n").expect_err("yaml");
    assert!(e.to_string().starts_with("broken.yaml:"), "{e}");
}

#[test]
fn a_playbook_is_a_manifest_alone_in_its_file() {
    let pb = "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {name: hi, path: team/hi}\nworkflow:\n  - step: start\n    tool: {kind: noop}\n";
    let ms = parse_manifests("hi.yaml", pb).expect("playbook");
    assert_eq!(
        (ms[0].kind, ms[0].name.as_str()),
        (Kind::Playbook, "team/hi")
    );
    assert_eq!(ms[0].source.as_deref(), Some(pb));
    let two = format!("{pb}---\n{POOL}");
    let e = parse_manifests("two.yaml", &two).expect_err("not alone");
    assert!(e.to_string().contains("alone in its file"), "{e}");
    let broken = "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {name: x}\nworkflow:\n  - step: start\n    next: nowhere\n";
    let e = parse_manifests("x.yaml", broken).expect_err("invalid playbook");
    assert!(e.to_string().contains("x.yaml:"), "{e}");
}

#[test]
fn versions_are_content_digests_independent_of_spelling() {
    let a = parse_manifests("a", POOL).expect("a").remove(0);
    let b = parse_manifests(
        "b",
        "kind: WorkerPool\napiVersion: mayfly.dev/v1\nspec: {queue: mayfly, slots: 8}\nmetadata: {labels: {team: ml}, name: gpu}\n",
    )
    .expect("b")
    .remove(0);
    let c = caller("acme", Role::Author);
    let key = a.key(&c);
    assert_eq!(key.tenant.as_deref(), Some("acme"));
    assert_eq!(a.version(&key), b.version(&key));
    assert!(a.version(&key).starts_with("sha256:"));
    let mut changed = a.clone();
    changed.spec = json!({"slots": 9, "queue": "mayfly"});
    assert_ne!(changed.version(&key), a.version(&key));
    let other = a.key(&caller("beta", Role::Author));
    assert_ne!(
        a.version(&other),
        a.version(&key),
        "the tenant is part of the identity"
    );
}

#[test]
fn authorization_matrix() {
    let key = |kind, tenant: Option<&str>| ObjectKey {
        kind,
        tenant: tenant.map(str::to_owned),
        name: "n".into(),
    };
    let sys = caller(SYSTEM_TENANT, Role::Admin);
    let admin = caller("acme", Role::Admin);
    let author = caller("acme", Role::Author);
    let operator = caller("acme", Role::Operator);
    let cases = [
        (&sys, key(Kind::Tenant, None), true),
        (&admin, key(Kind::Tenant, None), false),
        (&admin, key(Kind::Environment, None), false),
        (&author, key(Kind::WorkerPool, Some("acme")), true),
        (&author, key(Kind::Playbook, Some("acme")), true),
        (&author, key(Kind::Policy, Some("acme")), false),
        (&admin, key(Kind::Policy, Some("acme")), true),
        (&operator, key(Kind::WorkerPool, Some("acme")), false),
        (&admin, key(Kind::WorkerPool, Some("beta")), false),
        (&sys, key(Kind::Policy, Some("beta")), true),
    ];
    for (c, k, allowed) in cases {
        let d = authorize(c, &k);
        assert_eq!(d.allowed, allowed, "{:?} {:?}: {}", c.role, k, d.reason);
        assert!(!d.reason.is_empty());
    }
    assert!(
        authorize(&admin, &key(Kind::WorkerPool, Some("beta")))
            .reason
            .contains("cross-tenant")
    );
}

pub(super) async fn control() -> (tempfile::TempDir, Arc<dyn Store>, Control) {
    let dir = tempfile::tempdir().expect("tmp");
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(dir.path().join("c.db"))
            .await
            .expect("store"),
    );
    let c = Control::open(store.clone()).await.expect("open");
    (dir, store, c)
}

#[tokio::test]
async fn apply_records_versions_history_and_denials_and_replays() {
    let (_dir, store, c) = control().await;
    let author = caller("acme", Role::Author);
    let ms = parse_manifests("pool.yaml", POOL).expect("pool");
    let r = c.apply(&author, &ms).await.expect("apply");
    assert_eq!(r.results[0].outcome, Outcome::Created);
    assert_eq!(r.results[0].generation, 1);
    assert!(r.accepted_token.is_some());
    // Identical content: a no-op that writes nothing.
    let r = c.apply(&author, &ms).await.expect("again");
    assert_eq!(r.results[0].outcome, Outcome::Unchanged);
    assert_eq!(r.accepted_token, None);
    let v1 = r.results[0].version.clone();
    // A change: generation 2, before → after recorded.
    let changed = parse_manifests("pool.yaml", &POOL.replace("slots: 8", "slots: 12")).expect("v2");
    let r = c.apply(&author, &changed).await.expect("change");
    assert_eq!(
        (r.results[0].outcome.clone(), r.results[0].generation),
        (Outcome::Configured, 2)
    );
    let hist = c
        .history(&author, Kind::WorkerPool, "gpu")
        .await
        .expect("history");
    assert_eq!(hist.len(), 2);
    assert_eq!(hist[1].before.as_deref(), Some(v1.as_str()));
    assert_eq!(hist[1].actor, "token:acme-author@acme");
    assert_eq!(hist[1].request_id.as_deref(), Some("req-1"));
    let got = c.get(&author, Kind::WorkerPool, Some("gpu")).await;
    assert_eq!(got[0].object.spec["slots"], 12);
    assert_eq!(got[0].status.desired_generation, 2);
    assert_eq!(
        got[0].status.phase,
        Phase::Pending,
        "nothing observes pools yet"
    );

    // A denied object: recorded with its reason; the allowed one beside it is skipped.
    let tenant = parse_manifests(
        "t.yaml",
        "apiVersion: mayfly.dev/v1\nkind: Tenant\nmetadata: {name: acme}\nspec: {display_name: Acme}\n---\napiVersion: mayfly.dev/v1\nkind: Environment\nmetadata: {name: dev}\n",
    )
    .expect("tenant");
    let r = c.apply(&author, &tenant).await.expect("denied apply");
    assert!(r.denied());
    assert_eq!(r.results[0].outcome, Outcome::Denied);
    assert!(r.results[0].reason.contains("cluster-scoped"));
    assert_eq!(r.results[1].outcome, Outcome::Denied);
    assert!(
        c.get(&caller(SYSTEM_TENANT, Role::Admin), Kind::Tenant, None)
            .await
            .is_empty()
    );
    // The system admin may; other tenants do not see acme's pool.
    let r = c
        .apply(&caller(SYSTEM_TENANT, Role::Admin), &tenant)
        .await
        .expect("admin");
    assert_eq!(r.results[0].outcome, Outcome::Created);
    assert!(
        c.get(&caller("beta", Role::Admin), Kind::WorkerPool, None)
            .await
            .is_empty()
    );
    assert_eq!(
        c.get(&caller("beta", Role::Admin), Kind::Environment, None)
            .await
            .len(),
        1
    );

    // The stream verifies, and a fresh process folds it to the same objects.
    let v = c.verify().await.expect("verify");
    assert_eq!((v.events, v.applied, v.denied), (6, 4, 2));
    let again = Control::open(store.clone()).await.expect("reopen");
    assert_eq!(
        again.get(&author, Kind::WorkerPool, Some("gpu")).await[0]
            .object
            .version,
        got[0].object.version
    );
    let events = store
        .read_all(&mayfly_types::ExecutionId::from(crate::STREAM))
        .await
        .expect("events");
    let denied = events
        .iter()
        .find(|e| e.kind == mayfly_types::EventKind::ObjectDenied)
        .expect("denied");
    assert_eq!(denied.payload["decision"]["allowed"], false);
    assert_eq!(denied.actor, "token:acme-author@acme");
    assert!(verify_stored(store.as_ref()).await.is_ok());
}

#[tokio::test]
async fn policies_set_the_effective_policy_version_of_later_decisions() {
    let (_dir, _store, c) = control().await;
    let admin = caller("acme", Role::Admin);
    let pol = parse_manifests(
        "p.yaml",
        "apiVersion: mayfly.dev/v1\nkind: Policy\nmetadata: {name: base}\nspec:\n  tools: {allow: [python, http]}\n  limits: {step_timeout_s: 30}\n",
    )
    .expect("policy");
    let r = c.apply(&admin, &pol).await.expect("policy");
    assert_eq!(r.results[0].outcome, Outcome::Created);
    let pool = parse_manifests("pool.yaml", POOL).expect("pool");
    c.apply(&admin, &pool).await.expect("pool");
    let hist = c.history(&admin, Kind::WorkerPool, "gpu").await.expect("h");
    let pv = hist[0]
        .policy_version
        .clone()
        .expect("a policy is in effect");
    assert!(pv.starts_with("sha256:"));
    let first = c.history(&admin, Kind::Policy, "base").await.expect("h");
    assert_eq!(
        first[0].policy_version, None,
        "no policy was in effect before the first"
    );
}

/// The audit is tamper-evident: a rewritten record fails verification (naming its seq), a
/// process refuses to load such a stream, and a truncated tail — a valid prefix on its
/// own — is caught by the process that appended past it.
#[tokio::test]
async fn tampering_with_the_control_stream_is_detected() {
    use sqlx::{Connection, SqliteConnection};
    let (dir, store, c) = control().await;
    let author = caller("acme", Role::Author);
    for slots in [8, 9, 10] {
        let ms = parse_manifests(
            "pool.yaml",
            &POOL.replace("slots: 8", &format!("slots: {slots}")),
        )
        .expect("pool");
        c.apply(&author, &ms).await.expect("apply");
    }
    assert_eq!(c.verify().await.expect("clean").events, 3);
    let url = format!("sqlite://{}", dir.path().join("c.db").display());
    let mut raw = SqliteConnection::connect(&url).await.expect("raw");
    // Truncate the tail: what is left still chains, but not to what this process wrote.
    sqlx::query("DROP TRIGGER events_no_delete")
        .execute(&mut raw)
        .await
        .expect("drop");
    sqlx::query("DELETE FROM events WHERE execution_id = 'control' AND seq = 3")
        .execute(&mut raw)
        .await
        .expect("truncate");
    assert!(
        verify_stored(store.as_ref()).await.is_ok(),
        "a prefix chains on its own"
    );
    let e = c.verify().await.expect_err("truncation");
    assert!(e.to_string().contains("ends at #2"), "{e}");
    // Rewrite a record: the chain breaks at it.
    sqlx::query("DROP TRIGGER events_no_update")
        .execute(&mut raw)
        .await
        .expect("drop");
    sqlx::query(
        "UPDATE events SET payload = replace(payload, '\"slots\":8', '\"slots\":80') WHERE execution_id = 'control' AND seq = 1",
    )
    .execute(&mut raw)
    .await
    .expect("tamper");
    let e = verify_stored(store.as_ref()).await.expect_err("tampered");
    assert!(e.to_string().contains("#1 "), "{e}");
    assert!(
        Control::open(store.clone()).await.is_err(),
        "a tampered stream is not loaded"
    );
}

#[test]
fn admission_rules_of_each_class() {
    use crate::view::{Class, ReadRequest, Rejection, admits};
    let r = |class, max_lag, max_staleness_ms, min_token| ReadRequest {
        class,
        max_lag,
        max_staleness_ms,
        min_token,
        deadline: None,
    };
    // best_effort: anything, unless a min_token is not reached (never downgraded).
    assert!(admits(&r(Class::BestEffort, None, None, None), 3, None, 99_999).is_ok());
    assert_eq!(
        admits(&r(Class::BestEffort, None, None, Some(4)), 3, Some(9), 0),
        Err(Rejection::MinTokenNotReached {
            served: 3,
            min_token: 4
        })
    );
    // strong: served must reach the confirmed current token; no root, no answer.
    assert!(admits(&r(Class::Strong, None, None, None), 9, Some(9), 0).is_ok());
    assert_eq!(
        admits(&r(Class::Strong, None, None, None), 8, Some(9), 0),
        Err(Rejection::LagExceeded {
            served: 8,
            current: 9,
            lag: 1
        })
    );
    assert_eq!(
        admits(&r(Class::Strong, None, None, None), 9, None, 0).map_err(|e| e.code()),
        Err("root_unavailable")
    );
    // bounded: the lag boundary is inclusive; staleness counts only while behind.
    assert!(admits(&r(Class::Bounded, Some(2), None, None), 7, Some(9), 0).is_ok());
    assert!(admits(&r(Class::Bounded, Some(1), None, None), 7, Some(9), 0).is_err());
    assert!(admits(&r(Class::Bounded, None, Some(100), None), 7, Some(9), 100).is_ok());
    assert!(admits(&r(Class::Bounded, None, Some(100), None), 7, Some(9), 101).is_err());
    assert!(admits(&r(Class::Bounded, None, Some(100), None), 9, Some(9), 5_000).is_ok());
    assert_eq!(
        admits(&r(Class::Bounded, Some(5), None, None), 7, None, 0).map_err(|e| e.code()),
        Err("root_unavailable")
    );
    assert_eq!(
        admits(&r(Class::Bounded, Some(5), None, Some(8)), 7, Some(9), 0).map_err(|e| e.code()),
        Err("min_token_not_reached")
    );
}

#[test]
fn the_client_verifier_recomputes_replies_and_keeps_a_floor() {
    use crate::view::{CatchUp, Class, Degraded, Freshness, ReadRequest, check_reply};
    let f = |served, current, lag, state, class| Freshness {
        served_token: served,
        current_token: current,
        current_token_age_ms: 0,
        lag,
        catch_up_state: state,
        degraded_mode: Degraded::Healthy,
        serving_class: class,
        log_id: None,
    };
    let strong = ReadRequest {
        class: Class::Strong,
        ..Default::default()
    };
    let best = ReadRequest::default();
    assert_eq!(
        check_reply(&strong, &f(9, 9, 0, CatchUp::Fresh, Class::Strong), 5),
        Ok(9)
    );
    // Lies and downgrades are caught.
    assert!(check_reply(&strong, &f(8, 9, 0, CatchUp::Fresh, Class::Strong), 0).is_err());
    assert!(check_reply(&strong, &f(8, 9, 1, CatchUp::Lagging, Class::Strong), 0).is_err());
    assert!(check_reply(&strong, &f(9, 9, 0, CatchUp::Fresh, Class::BestEffort), 0).is_err());
    assert!(check_reply(&best, &f(7, 9, 2, CatchUp::Fresh, Class::BestEffort), 0).is_err());
    // The floor: never behind what the session saw or wrote.
    assert_eq!(
        check_reply(&best, &f(7, 9, 2, CatchUp::Lagging, Class::BestEffort), 7),
        Ok(7)
    );
    assert!(check_reply(&best, &f(6, 9, 3, CatchUp::Lagging, Class::BestEffort), 7).is_err());
    let min = ReadRequest {
        min_token: Some(8),
        ..Default::default()
    };
    assert!(check_reply(&min, &f(7, 9, 2, CatchUp::Lagging, Class::BestEffort), 0).is_err());
    let bounded = ReadRequest {
        class: Class::Bounded,
        max_lag: Some(1),
        ..Default::default()
    };
    assert!(check_reply(&bounded, &f(7, 9, 2, CatchUp::Lagging, Class::Bounded), 0).is_err());
    assert!(
        check_reply(
            &best,
            &f(7, 7, 0, CatchUp::Unavailable, Class::BestEffort),
            0
        )
        .is_ok()
    );
    assert!(
        check_reply(
            &bounded,
            &f(7, 7, 0, CatchUp::Unavailable, Class::Bounded),
            0
        )
        .is_err()
    );
}

#[tokio::test]
async fn admission_applies_every_policy_layer_then_quota_then_capacity() {
    let (_dir, _store, c) = control().await;
    let sys = caller(SYSTEM_TENANT, Role::Admin);
    let platform = parse_manifests(
        "platform.yaml",
        "apiVersion: mayfly.dev/v1\nkind: Policy\nmetadata: {name: platform}\nspec:\n  tools: {allow: [python, http, noop, postgres]}\n---\napiVersion: mayfly.dev/v1\nkind: Tenant\nmetadata: {name: acme}\nspec: {quotas: {max_running_executions: 2}}\n",
    )
    .expect("platform");
    c.apply(&sys, &platform).await.expect("platform");
    let tenant = parse_manifests(
        "acme.yaml",
        "apiVersion: mayfly.dev/v1\nkind: Policy\nmetadata: {name: narrow}\nspec:\n  tools: {allow: [python, noop, shell]}\n  keychain: {allow: [pg_local]}\n",
    )
    .expect("acme");
    c.apply(&caller("acme", Role::Admin), &tenant)
        .await
        .expect("acme");
    let st = c.state_for_tests().await;
    let ask = |tools: &[&str], aliases: &[&str], templated, running, pending| AdmissionRequest {
        tenant: "acme".into(),
        playbook: "team/etl".into(),
        now_ms: 1_000,
        tools: tools.iter().map(|t| t.to_string()).collect(),
        aliases: aliases.iter().map(|t| t.to_string()).collect(),
        templated_auth: templated,
        running,
        pending_publishes: pending,
        max_pending_publishes: 100,
    };
    let d = |r: AdmissionRequest| st.admit(&r);
    let ok = d(ask(&["python"], &["pg_local"], false, 0, 0));
    assert_eq!(ok.decision, AdmissionDecision::Accepted, "{}", ok.reason);
    assert!(ok.policy_version.is_some());
    // The platform layer refuses shell even though the tenant's allows it (layers narrow).
    let r = d(ask(&["python", "shell"], &[], false, 0, 0));
    assert_eq!(r.decision, AdmissionDecision::PolicyDenied);
    assert!(
        r.reason.contains("policy system/platform") && r.reason.contains("`shell`"),
        "{}",
        r.reason
    );
    // The tenant layer refuses http though the platform allows it.
    let r = d(ask(&["http"], &[], false, 0, 0));
    assert!(r.reason.contains("policy acme/narrow"), "{}", r.reason);
    let r = d(ask(&["python"], &["prod_db"], false, 0, 0));
    assert!(
        r.reason.contains("keychain alias `prod_db`"),
        "{}",
        r.reason
    );
    let r = d(ask(&["python"], &[], true, 0, 0));
    assert!(r.reason.contains("fail closed"), "{}", r.reason);
    // Quota, then capacity.
    assert_eq!(
        d(ask(&["python"], &[], false, 2, 0)).decision,
        AdmissionDecision::TenantQuota
    );
    assert_eq!(
        d(ask(&["python"], &[], false, 1, 100)).decision,
        AdmissionDecision::QueueSaturated
    );
    // Another tenant: only the platform layer, no quota.
    let mut other = ask(&["http"], &["anything"], true, 50, 0);
    other.tenant = "beta".into();
    assert_eq!(d(other).decision, AdmissionDecision::Accepted);
}

#[tokio::test]
async fn explain_shows_each_layer_and_time_bound_exceptions() {
    let (_dir, _store, c) = control().await;
    let sys = caller(SYSTEM_TENANT, Role::Admin);
    let acme = caller("acme", Role::Admin);
    c.apply(
        &sys,
        &parse_manifests(
            "p.yaml",
            "apiVersion: mayfly.dev/v1\nkind: Policy\nmetadata: {name: platform}\nspec:\n  tools: {allow: [python, noop]}\n",
        )
        .expect("platform"),
    )
    .await
    .expect("apply");
    let policies = "apiVersion: mayfly.dev/v1\nkind: Policy\nmetadata: {name: base}\nspec:\n  keychain: {allow: [pg]}\n---\napiVersion: mayfly.dev/v1\nkind: Policy\nmetadata: {name: etl-needs-s3}\nspec:\n  exception: true\n  scope: {playbook: team/etl}\n  expires_at_ms: 5000\n  keychain: {allow: [s3]}\n  tools: {allow: [http]}\n";
    c.apply(&acme, &parse_manifests("a.yaml", policies).expect("acme"))
        .await
        .expect("apply");
    let st = c.state_for_tests().await;
    let req = |playbook: &str, now_ms, tools: &[&str], aliases: &[&str]| AdmissionRequest {
        tenant: "acme".into(),
        playbook: playbook.into(),
        now_ms,
        tools: tools.iter().map(|t| t.to_string()).collect(),
        aliases: aliases.iter().map(|t| t.to_string()).collect(),
        ..Default::default()
    };
    // The tenant's exception lifts its own tenant's keychain restriction for team/etl...
    let ex = st.explain(&req("team/etl", 1_000, &["python"], &["pg", "s3"]));
    assert!(ex.allowed, "{ex:?}");
    let base = ex
        .steps
        .iter()
        .find(|s| s.policy == "acme/base")
        .expect("base");
    assert!(
        base.outcome
            .contains("lifted by exception acme/etl-needs-s3 until 5000"),
        "{base:?}"
    );
    assert_eq!(
        ex.steps[0].layer, "platform",
        "platform first: {:?}",
        ex.steps
    );
    // ...but not the platform's: a tenant exception cannot widen the platform layer.
    let ex = st.explain(&req("team/etl", 1_000, &["python", "http"], &[]));
    assert!(!ex.allowed);
    assert_eq!(ex.decided_by.as_deref(), Some("system/platform"));
    assert!(
        ex.reason
            .contains("(platform) does not allow tool kind `http`"),
        "{}",
        ex.reason
    );
    // Another playbook does not get the exception; after expiry nobody does.
    let ex = st.explain(&req("team/other", 1_000, &["python"], &["s3"]));
    assert_eq!(ex.decided_by.as_deref(), Some("acme/base"));
    let ex = st.explain(&req("team/etl", 5_000, &["python"], &["s3"]));
    assert!(!ex.allowed);
    assert!(
        ex.steps
            .iter()
            .any(|s| s.outcome == "not in force: expired at 5000"),
        "{:?}",
        ex.steps
    );
    // No policy here sets budgets.
    assert_eq!(ex.limits, mayfly_types::Limits::default());
    // Deterministic: the same inputs give the same explanation.
    assert_eq!(
        st.explain(&req("team/etl", 1_000, &["python"], &["pg", "s3"])),
        st.explain(&req("team/etl", 1_000, &["python"], &["pg", "s3"]))
    );
    // An exception must be time-bound and for one workload.
    let e = parse_manifests(
        "x.yaml",
        "apiVersion: mayfly.dev/v1\nkind: Policy\nmetadata: {name: forever}\nspec: {exception: true, tools: {allow: [shell]}}\n",
    )
    .expect_err("unbounded exception");
    assert!(e.to_string().contains("time-bound"), "{e}");
}

/// The environment layer: a platform policy scoped to an Environment applies to the tenants
/// that run in it, after the platform layer and before the tenant's; each layer has its own
/// version; a tenant naming an unknown environment is Degraded.
#[tokio::test]
async fn the_environment_layer_applies_to_tenants_of_that_environment() {
    let (_dir, _store, c) = control().await;
    let sys = caller(SYSTEM_TENANT, Role::Admin);
    let platform = "apiVersion: mayfly.dev/v1\nkind: Policy\nmetadata: {name: platform}\nspec:\n  tools: {allow: [python, noop, http]}\n---\napiVersion: mayfly.dev/v1\nkind: Policy\nmetadata: {name: prod-no-http}\nspec:\n  scope: {environment: prod}\n  tools: {allow: [python, noop]}\n  limits: {step_timeout_s: 30, memory_mb: 512}\n  egress: public\n---\napiVersion: mayfly.dev/v1\nkind: Environment\nmetadata: {name: prod}\n---\napiVersion: mayfly.dev/v1\nkind: Tenant\nmetadata: {name: acme}\nspec: {environment: prod}\n---\napiVersion: mayfly.dev/v1\nkind: Tenant\nmetadata: {name: beta}\nspec: {environment: staging}\n";
    c.apply(&sys, &parse_manifests("p.yaml", platform).expect("parse"))
        .await
        .expect("apply");
    c.apply(
        &caller("acme", Role::Admin),
        &parse_manifests(
            "a.yaml",
            "apiVersion: mayfly.dev/v1\nkind: Policy\nmetadata: {name: base}\nspec:\n  tools: {allow: [python, noop, http, shell]}\n  limits: {memory_mb: 1024, processes: 32}\n  egress: {allow: [\"db.acme.internal:5432\", \"*.acme.com\"]}\n",
        )
        .expect("parse"),
    )
    .await
    .expect("apply");
    let st = c.state_for_tests().await;
    let req = |tenant: &str, tools: &[&str]| AdmissionRequest {
        tenant: tenant.into(),
        playbook: "team/x".into(),
        now_ms: 1,
        tools: tools.iter().map(|t| t.to_string()).collect(),
        ..Default::default()
    };
    let ex = st.explain(&req("acme", &["http"]));
    assert!(!ex.allowed);
    assert_eq!(ex.decided_by.as_deref(), Some("system/prod-no-http"));
    assert!(ex.reason.contains("(environment)"), "{}", ex.reason);
    assert_eq!(ex.environment.as_deref(), Some("prod"));
    let layers: Vec<&str> = ex.steps.iter().map(|s| s.layer.as_str()).collect();
    assert_eq!(layers, ["platform", "environment", "tenant"]);
    let versions: Vec<&str> = ex.layers.iter().map(|l| l.layer.as_str()).collect();
    assert_eq!(versions, ["platform", "environment", "tenant"]);
    assert_eq!(
        ex.limits.step_timeout_s,
        Some(30),
        "the environment's budget"
    );
    // Sandbox bounds narrow like budgets; every layer's egress rule applies.
    assert_eq!(
        (ex.limits.memory_mb, ex.limits.processes),
        (Some(512), Some(32))
    );
    assert_eq!(
        ex.limits.egress,
        vec![
            mayfly_types::Egress::Public,
            mayfly_types::Egress::Allow(vec!["db.acme.internal:5432".into(), "*.acme.com".into()])
        ]
    );
    // A bundle carries the tenants' environments: agents apply the environment layer too.
    let frozen = crate::rollout::BundleBody::freeze(&st).policy_state();
    let ex = frozen.explain(&req("acme", &["http"]));
    assert_eq!(
        ex.decided_by.as_deref(),
        Some("system/prod-no-http"),
        "{ex:?}"
    );
    // A tenant in another environment is not governed by prod's layer.
    let ex = st.explain(&req("beta", &["http"]));
    assert!(ex.allowed, "{ex:?}");
    assert!(ex.steps.iter().all(|s| s.layer != "environment"));
    // Layers are versioned independently: changing the tenant's policy leaves the others'.
    let before = st.explain(&req("acme", &["noop"])).layers;
    c.apply(
        &caller("acme", Role::Admin),
        &parse_manifests(
            "a.yaml",
            "apiVersion: mayfly.dev/v1\nkind: Policy\nmetadata: {name: base}\nspec:\n  tools: {allow: [python, noop]}\n",
        )
        .expect("parse"),
    )
    .await
    .expect("apply");
    let after = c
        .state_for_tests()
        .await
        .explain(&req("acme", &["noop"]))
        .layers;
    assert_eq!(before[0], after[0]);
    assert_eq!(before[1], after[1]);
    assert_ne!(before[2].version, after[2].version);
    // beta names an environment that does not exist.
    let beta = c.get(&sys, Kind::Tenant, Some("beta")).await;
    assert_eq!(beta[0].status.phase, Phase::Degraded);
    assert_eq!(beta[0].status.conditions[0].reason, "UnknownEnvironment");
    let acme = c.get(&sys, Kind::Tenant, Some("acme")).await;
    assert_eq!(acme[0].status.phase, Phase::Ready);
}

#[tokio::test]
async fn degradation_rules_close_reads_by_policy_and_never_open_privileged_classes() {
    let (_dir, _store, c) = control().await;
    let sys = caller(SYSTEM_TENANT, Role::Admin);
    let docs = "apiVersion: mayfly.dev/v1\nkind: Policy\nmetadata: {name: strict-prod}\nspec:\n  scope: {tenant: acme}\n  degradation: {read: fail_closed, execute: fail_closed}\n  expires_at_ms: 5000\n";
    c.apply(&sys, &parse_manifests("d.yaml", docs).expect("parse"))
        .await
        .expect("apply");
    let st = c.state_for_tests().await;
    let r = st.degradation("acme", ActionClass::Read, 1_000);
    assert!(!r.fail_open);
    assert_eq!(r.decided_by.as_deref(), Some("system/strict-prod"));
    assert!(r.reason.contains("(platform)"), "{}", r.reason);
    // Expired, it no longer closes anything; other tenants were never closed.
    assert!(st.degradation("acme", ActionClass::Read, 5_000).fail_open);
    assert!(st.degradation("beta", ActionClass::Read, 1_000).fail_open);
    for class in [ActionClass::Execute, ActionClass::Write] {
        let r = st.degradation("beta", class, 1_000);
        assert!(!r.fail_open && r.reason.contains("privileged"), "{r:?}");
    }
    for (spec, want) in [
        ("{write: fail_open}", "privileged actions fail closed"),
        ("{delete: fail_closed}", "unknown action class `delete`"),
        ("{read: maybe}", "must be `fail_open` or `fail_closed`"),
    ] {
        let doc = format!(
            "apiVersion: mayfly.dev/v1\nkind: Policy\nmetadata: {{name: x}}\nspec:\n  degradation: {spec}\n"
        );
        let e = parse_manifests("x.yaml", &doc).expect_err(spec);
        assert!(e.to_string().contains(want), "{e}");
        assert!(e.to_string().starts_with("x.yaml:5:"), "{e}");
    }
}

/// Compaction: a snapshot replaces the records it summarizes (all but the first); the
/// state, every object's history and the audit verification survive; a view paused behind
/// the compaction reports `bootstrap_required` (strong and bounded reads refused, best
/// effort served flagged) until its tail folds the snapshot.
#[tokio::test]
async fn compaction_keeps_state_and_history_and_a_paused_view_must_bootstrap() {
    use crate::view::{CatchUp, Class, ReadRequest, Rejection, View};
    use sqlx::{Connection, SqliteConnection};
    let (dir, store, c) = control().await;
    let sys = caller(SYSTEM_TENANT, Role::Admin);
    let author = caller("acme", Role::Author);
    let pool = |slots: u32| {
        parse_manifests(
            "pool.yaml",
            &POOL.replace("slots: 8", &format!("slots: {slots}")),
        )
        .expect("pool")
    };
    c.apply(&author, &pool(8)).await.expect("apply");
    let view = View::start(store.clone(), false);
    let strong = ReadRequest {
        class: Class::Strong,
        ..Default::default()
    };
    view.read(&strong, |_| ()).await.expect("caught up");
    view.pause().await;
    for slots in [9, 10] {
        c.apply(&author, &pool(slots)).await.expect("apply");
    }
    let before = c.state_for_tests().await;
    let e = c.compact(&author).await.expect_err("not an admin");
    assert!(e.to_string().contains("admin"), "{e}");
    let r = c.compact(&sys).await.expect("compact");
    assert_eq!(
        (r.snapshot_seq, r.compacted, r.deleted),
        (4, Some((2, 3)), 2)
    );
    let seqs: Vec<u64> = store
        .read_all(&mayfly_types::ExecutionId::from("control"))
        .await
        .expect("read")
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(
        seqs,
        [1, 4],
        "the first record (it names the log) and the snapshot"
    );
    let v = verify_stored(store.as_ref()).await.expect("verifies");
    assert_eq!(v.compacted, Some((2, 3)));
    c.verify().await.expect("the appender agrees");
    let again = Control::open(store.clone()).await.expect("reopen");
    let after = again.state_for_tests().await;
    assert_eq!(
        after.objects, before.objects,
        "objects and their histories survive"
    );
    assert_eq!(
        again
            .history(&author, Kind::WorkerPool, "gpu")
            .await
            .expect("history")
            .len(),
        3
    );

    // The paused view is behind the compaction.
    let e = view
        .read(&strong, |_| ())
        .await
        .expect_err("must bootstrap");
    assert!(
        matches!(
            e,
            Rejection::BootstrapRequired {
                held: 1,
                resumes: 4
            }
        ),
        "{e:?}"
    );
    assert_eq!(e.code(), "bootstrap_required");
    let bounded = ReadRequest {
        class: Class::Bounded,
        max_lag: Some(1_000_000),
        deadline: Some(std::time::Duration::from_millis(200)),
        ..Default::default()
    };
    assert_eq!(
        view.read(&bounded, |_| ())
            .await
            .expect_err("bounded too")
            .code(),
        "bootstrap_required"
    );
    let (slots, f) = view
        .read(&ReadRequest::default(), |st| {
            st.objects.values().next().map(|o| o.spec["slots"].clone())
        })
        .await
        .expect("best effort is served");
    assert_eq!(f.catch_up_state, CatchUp::BootstrapRequired);
    assert_eq!(slots, Some(serde_json::json!(8)), "what it held, flagged");
    view.resume();
    let (slots, f) = view
        .read(&strong, |st| {
            st.objects.values().next().map(|o| o.spec["slots"].clone())
        })
        .await
        .expect("bootstrapped");
    assert_eq!(f.catch_up_state, CatchUp::Fresh);
    assert_eq!(slots, Some(serde_json::json!(10)));

    // Life goes on after compaction; a tampered snapshot is caught like any record.
    c.apply(&author, &pool(11)).await.expect("apply");
    verify_stored(store.as_ref()).await.expect("verifies");
    let url = format!("sqlite://{}", dir.path().join("c.db").display());
    let mut raw = SqliteConnection::connect(&url).await.expect("raw");
    sqlx::query("DROP TRIGGER events_no_update")
        .execute(&mut raw)
        .await
        .expect("drop");
    sqlx::query(
        "UPDATE events SET payload = replace(payload, '\"slots\":10', '\"slots\":99') WHERE execution_id = 'control' AND seq = 4",
    )
    .execute(&mut raw)
    .await
    .expect("tamper");
    let e = verify_stored(store.as_ref()).await.expect_err("tampered");
    assert!(e.to_string().contains("#4 (control.snapshot)"), "{e}");
}
