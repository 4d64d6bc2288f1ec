//! The freshness contract across nodes sharing one Postgres log: node A appends (the
//! control plane) and keeps a view; node B keeps only a view, each on its own connections.
//! Pausing B's tail proves every rule: the lag boundary is exact, min_token gives
//! read-your-writes across nodes, strong waits or rejects, served tokens never go back, and
//! with the root gone strong/bounded are rejected while best_effort is served, flagged.
//! Skipped loudly without Postgres; a failure under CI=true.

use mayfly_control::{
    Caller, CatchUp, Class, Control, Degraded, Kind, ReadRequest, Rejection, Role, View,
    parse_manifests,
};
use mayfly_store::{PostgresStore, Store};
use std::sync::Arc;
use std::time::Duration;

fn caller() -> Caller {
    Caller {
        tenant: "acme".into(),
        role: Role::Admin,
        actor: "ops".into(),
        request_id: "req".into(),
    }
}

fn req(class: Class) -> ReadRequest {
    ReadRequest {
        class,
        deadline: Some(Duration::from_millis(300)),
        ..Default::default()
    }
}

async fn pool(c: &Control, slots: u32) -> u64 {
    let m = parse_manifests(
        "pool.yaml",
        &format!("apiVersion: mayfly.dev/v1\nkind: WorkerPool\nmetadata: {{name: gpu}}\nspec: {{slots: {slots}}}\n"),
    )
    .expect("manifest");
    c.apply(&caller(), &m)
        .await
        .expect("apply")
        .accepted_token
        .expect("a write returns its token")
}

fn slots(st: &mayfly_control::ControlState) -> Option<u64> {
    st.objects_of(&caller(), Kind::WorkerPool, Some("gpu"))
        .first()
        .and_then(|o| o.object.spec["slots"].as_u64())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freshness_rules_across_two_nodes() {
    if !mayfly_testkit::postgres() {
        return;
    }
    let url = mayfly_testkit::postgres_url();
    let schema = mayfly_testkit::unique("mayfly_fresh");
    let open = || async {
        Arc::new(
            PostgresStore::connect_schema(&url, &schema)
                .await
                .expect("store"),
        ) as Arc<dyn Store>
    };
    let a_store = open().await;
    let control = Control::open(a_store.clone()).await.expect("control");
    let a = View::start(a_store.clone(), false);
    let b = View::start(open().await, true);

    // Read-your-writes across nodes: B serves A's write once asked for its token.
    let t1 = pool(&control, 1).await;
    let ryw = ReadRequest {
        min_token: Some(t1),
        ..req(Class::BestEffort)
    };
    let (got, f) = b.read(&ryw, slots).await.expect("min_token reached");
    assert_eq!(got, Some(1));
    assert!(f.served_token >= t1);
    assert_eq!(f.serving_class, Class::BestEffort);
    let (_, f) = a
        .read(&req(Class::Strong), slots)
        .await
        .expect("strong on A");
    assert_eq!(
        (f.lag, f.catch_up_state, f.degraded_mode),
        (0, CatchUp::Fresh, Degraded::Healthy)
    );
    let (_, f) = b
        .read(&req(Class::Strong), slots)
        .await
        .expect("strong on B");
    assert_eq!(f.degraded_mode, Degraded::ViewOnly, "B does not append");
    let mut seen = vec![f.served_token];

    // Pause B's tail; A writes three more versions.
    b.pause().await;
    let served = b.served();
    let mut last = 0;
    for s in [2, 3, 4] {
        last = pool(&control, s).await;
    }
    let head = a_store.head().await.expect("head");
    assert_eq!(head, last);
    let lag = head - served;
    assert!(lag >= 3, "three writes behind: {lag}");

    // The lag boundary is exact.
    let bounded = |max_lag| ReadRequest {
        max_lag: Some(max_lag),
        ..req(Class::Bounded)
    };
    let (got, f) = b
        .read(&bounded(lag), slots)
        .await
        .expect("within the bound");
    assert_eq!((got, f.lag, f.current_token), (Some(1), lag, head));
    assert_eq!(f.catch_up_state, CatchUp::Lagging);
    let r = b
        .read(&bounded(lag - 1), slots)
        .await
        .expect_err("one past the bound");
    assert_eq!(r.code(), "lag_exceeded");
    assert_eq!(
        r,
        Rejection::LagExceeded {
            served,
            current: head,
            lag
        }
    );
    // Strong cannot be served by a paused view; min_token is never downgraded.
    let r = b
        .read(&req(Class::Strong), slots)
        .await
        .expect_err("strong");
    assert_eq!(r.code(), "lag_exceeded");
    let r = b
        .read(
            &ReadRequest {
                min_token: Some(last),
                ..req(Class::BestEffort)
            },
            slots,
        )
        .await
        .expect_err("min token");
    assert_eq!(r.code(), "min_token_not_reached");
    // best_effort is served, flagged with how far behind it is.
    let (got, f) = b
        .read(&req(Class::BestEffort), slots)
        .await
        .expect("best effort");
    assert_eq!(
        (got, f.served_token, f.serving_class),
        (Some(1), served, Class::BestEffort)
    );
    seen.push(f.served_token);
    // Staleness: behind for longer than allowed.
    tokio::time::sleep(Duration::from_millis(120)).await;
    let stale = ReadRequest {
        max_staleness_ms: Some(50),
        ..req(Class::Bounded)
    };
    assert_eq!(
        b.read(&stale, slots).await.expect_err("stale").code(),
        "lag_exceeded"
    );
    let patient = ReadRequest {
        max_staleness_ms: Some(60_000),
        ..req(Class::Bounded)
    };
    assert!(b.read(&patient, slots).await.is_ok());
    // A current token not confirmed for a while: root_lagging.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (_, f) = b
        .read(&req(Class::BestEffort), slots)
        .await
        .expect("best effort");
    assert_eq!(f.degraded_mode, Degraded::RootLagging);

    // Resumed, B catches up; strong now waits for it and is served.
    b.resume();
    let (got, f) = b
        .read(&req(Class::Strong), slots)
        .await
        .expect("strong after resume");
    assert_eq!((got, f.lag), (Some(4), 0));
    seen.push(f.served_token);
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]),
        "served tokens never go back: {seen:?}"
    );

    // Compaction past a paused subscriber: B paused at generation 4, A writes two more and
    // compacts; B must bootstrap (strong and bounded refused, best_effort flagged) until its
    // resumed tail folds the snapshot.
    b.pause().await;
    for s in [5, 6] {
        pool(&control, s).await;
    }
    let admin = mayfly_control::Caller {
        tenant: mayfly_control::SYSTEM_TENANT.into(),
        role: mayfly_control::Role::Admin,
        actor: "ops".into(),
        request_id: "compact".into(),
    };
    let report = control.compact(&admin).await.expect("compact");
    assert!(report.deleted >= 5, "{report:?}");
    for class in [Class::Strong, Class::Bounded] {
        let r = b
            .read(&req(class), slots)
            .await
            .expect_err("behind a compaction");
        assert_eq!(r.code(), "bootstrap_required", "{class:?}");
    }
    let (got, f) = b
        .read(&req(Class::BestEffort), slots)
        .await
        .expect("best effort");
    assert_eq!(got, Some(4), "what it held when paused");
    assert_eq!(f.catch_up_state, CatchUp::BootstrapRequired);
    b.resume();
    let (got, f) = b
        .read(&req(Class::Strong), slots)
        .await
        .expect("bootstrapped from the snapshot");
    assert_eq!((got, f.catch_up_state), (Some(6), CatchUp::Fresh));
    seen.push(f.served_token);
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");

    // The root goes away (its tables vanish): strong and bounded are rejected,
    // best_effort is still served from the view, flagged.
    PostgresStore::drop_schema(&url, &schema)
        .await
        .expect("drop");
    for class in [Class::Strong, Class::Bounded] {
        let r = b.read(&req(class), slots).await.expect_err("no root");
        assert_eq!(r.code(), "root_unavailable", "{class:?}");
    }
    b.poke();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (got, f) = b
        .read(&req(Class::BestEffort), slots)
        .await
        .expect("served from the view");
    assert_eq!(got, Some(6));
    assert_eq!(
        (f.catch_up_state, f.degraded_mode, f.serving_class),
        (
            CatchUp::Unavailable,
            Degraded::RootUnavailable,
            Class::BestEffort
        )
    );
}

/// A client's own deadline is that request's: `deadline_ms=0` is refused
/// `deadline_exceeded` (never `root_unavailable`), and nobody else's reads see the node
/// degraded because of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_deadline_is_that_requests_only() {
    let dir = tempfile::tempdir().expect("tmp");
    let store: Arc<dyn Store> = Arc::new(
        mayfly_store::SqliteStore::open(dir.path().join("c.db"))
            .await
            .expect("store"),
    );
    let view = View::start(store, false);
    // Healthy first: a strong read confirms the head.
    view.read(&req(Class::Strong), |_| ())
        .await
        .expect("strong");
    for _ in 0..20 {
        let zero = ReadRequest {
            class: Class::Strong,
            deadline: Some(Duration::ZERO),
            ..Default::default()
        };
        match view.read(&zero, |_| ()).await {
            Ok(_) => {}
            Err(Rejection::DeadlineExceeded(0)) => {}
            Err(e) => panic!("a zero deadline answered {}: {e}", e.code()),
        }
        let (_, f) = view
            .read(&req(Class::BestEffort), |_| ())
            .await
            .expect("best_effort");
        assert_eq!(f.degraded_mode, Degraded::Healthy, "{f:?}");
    }
    let strong = ReadRequest {
        class: Class::Strong,
        ..Default::default()
    };
    view.read(&strong, |_| ())
        .await
        .expect("strong still served");
}
