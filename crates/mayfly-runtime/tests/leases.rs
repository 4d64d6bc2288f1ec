//! The block contract with external workers driven by hand: claims take a lease, an
//! expired lease is redelivered, a superseded attempt's completion is refused, and a
//! completed command is never claimed again.

use mayfly_dsl::{ParseOptions, parse};
use mayfly_engine::Status;
use mayfly_runtime::{Claim, Completion, Runtime, RuntimeConfig, RuntimeError};
use mayfly_store::{SqliteStore, Store};
use mayfly_types::{EventKind, StepFinished};
use serde_json::{Map, json};
use std::sync::Arc;
use std::time::Duration;

const PB: &str = "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {name: lease}\nworkflow:\n  - step: start\n    tool: {kind: python, code: 'result = 1'}\n";

fn finished(v: serde_json::Value) -> StepFinished {
    StepFinished {
        index: None,
        result: v,
        set: Map::new(),
        inline: false,
        duration_ms: None,
        logs: None,
    }
}

/// A runtime on a fresh SQLite log (the directory lives as long as the returned guard).
async fn runtime(cfg: RuntimeConfig) -> (tempfile::TempDir, Arc<SqliteStore>, Runtime) {
    let dir = tempfile::tempdir().expect("tmp");
    let store = Arc::new(
        SqliteStore::open(dir.path().join("m.db"))
            .await
            .expect("store"),
    );
    let rt = Runtime::start(store.clone(), cfg).expect("rt");
    (dir, store, rt)
}

#[tokio::test]
async fn expired_lease_is_redelivered_and_the_old_attempt_is_refused() {
    let cfg = RuntimeConfig {
        workers: 0,
        lease: Duration::from_millis(200),
        ..Default::default()
    };
    let (_dir, store, rt) = runtime(cfg).await;
    let h = rt.handle();
    let pb = parse("lease.yaml", PB, &ParseOptions::default()).expect("pb");
    let id = h
        .start(Arc::new(pb), Map::new(), Some("req-42".into()))
        .await
        .expect("start");

    // Worker A claims and then goes silent (no heartbeat).
    let block = tokio::time::timeout(Duration::from_secs(5), h.next_block())
        .await
        .expect("dispatched")
        .expect("block");
    let a = granted(h.claim(block.clone(), "A").await);
    assert_eq!(a.attempt, 1);
    // While A's lease is valid nobody else can claim the same block: busy, with the time
    // the lease still has.
    match h.claim(block.clone(), "B").await.expect("claim") {
        Claim::Busy(left) => assert!(left <= Duration::from_millis(200), "{left:?}"),
        other => panic!("expected busy, got {other:?}"),
    }
    let open = store.open_commands(Some(&id)).await.expect("open");
    assert_eq!(
        (open[0].state.as_str(), open[0].worker.as_deref()),
        ("claimed", Some("A"))
    );

    // The lease expires: the block is delivered again and B claims attempt 2.
    let again = tokio::time::timeout(Duration::from_secs(5), h.next_block())
        .await
        .expect("redelivered")
        .expect("block");
    assert_eq!(again, block);
    let b = granted(h.claim(again.clone(), "B").await);
    assert_eq!(b.attempt, 2);

    // A wakes up and reports: refused, its claim was superseded.
    let late = Completion {
        block: block.clone(),
        attempt: 1,
        worker: "A".into(),
        outcome: Ok(finished(json!("from A"))),
    };
    assert!(matches!(
        h.complete(late).await,
        Err(RuntimeError::StaleClaim(_))
    ));
    let good = Completion {
        block: block.clone(),
        attempt: 2,
        worker: "B".into(),
        outcome: Ok(finished(json!("from B"))),
    };
    h.complete(good.clone()).await.expect("B completes");
    let report = h.wait(&id).await.expect("report");
    assert_eq!(report.status, Status::Completed);
    assert_eq!(report.result, json!("from B"));

    // Duplicate delivery of a completed command is acked without running; a second
    // completion is refused.
    assert!(matches!(h.claim(block.clone(), "C").await, Ok(Claim::Done)));
    assert!(h.complete(good).await.is_err());

    let events = store.read_all(&id).await.expect("events");
    let finishes: Vec<_> = events
        .iter()
        .filter(|e| e.kind == EventKind::StepFinished)
        .collect();
    assert_eq!(finishes.len(), 1, "exactly one step.finished");
    assert_eq!(finishes[0].attempt, Some(2));
    assert_eq!(finishes[0].actor, "worker:B");
    let claims: Vec<_> = events
        .iter()
        .filter(|e| e.kind == EventKind::CommandClaimed)
        .map(|e| e.attempt)
        .collect();
    assert_eq!(claims, [Some(1), Some(2)]);
    assert!(
        events
            .iter()
            .all(|e| e.request_id.as_deref() == Some("req-42")),
        "request id is on every event"
    );
    assert!(
        store
            .open_commands(Some(&id))
            .await
            .expect("open")
            .is_empty()
    );
}

fn granted(c: Result<Claim, RuntimeError>) -> Box<mayfly_runtime::Hydrated> {
    match c {
        Ok(Claim::Granted(h)) => h,
        other => panic!("expected a granted claim, got {other:?}"),
    }
}

#[tokio::test]
async fn heartbeats_keep_a_long_block_from_being_redelivered() {
    let cfg = RuntimeConfig {
        workers: 2,
        lease: Duration::from_millis(300),
        ..Default::default()
    };
    let (_dir, store, rt) = runtime(cfg).await;
    let src = "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {name: slow}\nworkflow:\n  - step: start\n    tool: {kind: python, code: \"import time\\ntime.sleep(1.2)\\nresult = 'slow'\"}\n";
    let pb = parse("slow.yaml", src, &ParseOptions::default()).expect("pb");
    let report = rt.run(pb, Map::new()).await.expect("run");
    assert_eq!(report.result, json!("slow"));
    let events = store.read_all(&report.execution_id).await.expect("events");
    let claims = events
        .iter()
        .filter(|e| e.kind == EventKind::CommandClaimed)
        .count();
    assert_eq!(
        claims, 1,
        "a block that heartbeats keeps its lease (1.2s run, 0.3s lease)"
    );
}

/// A block whose workers keep dying (claimed, never completed, lease lapses) is not handed
/// out forever: after `max_attempts` claims the step fails with `worker_lost`, recorded once,
/// and the playbook's routing takes over (here: none, so the execution fails).
#[tokio::test]
async fn a_block_claimed_max_attempts_times_fails_with_worker_lost() {
    let cfg = RuntimeConfig {
        workers: 0,
        lease: Duration::from_millis(100),
        max_attempts: 3,
        ..Default::default()
    };
    let (_dir, store, rt) = runtime(cfg).await;
    let h = rt.handle();
    let pb = parse("lease.yaml", PB, &ParseOptions::default()).expect("pb");
    let id = h
        .start(Arc::new(pb), Map::new(), None)
        .await
        .expect("start");
    for attempt in 1..=3 {
        let block = tokio::time::timeout(Duration::from_secs(5), h.next_block())
            .await
            .expect("dispatched")
            .expect("block");
        let g = granted(h.claim(block, "dies").await);
        assert_eq!(g.attempt, attempt);
        // The worker dies: no heartbeat, no completion; the lease lapses.
    }
    let block = tokio::time::timeout(Duration::from_secs(5), h.next_block())
        .await
        .expect("dispatched once more")
        .expect("block");
    assert!(matches!(
        h.claim(block, "w4").await.expect("claim"),
        Claim::Done
    ));
    let report = tokio::time::timeout(Duration::from_secs(5), h.wait(&id))
        .await
        .expect("ends")
        .expect("report");
    assert_eq!(report.status, Status::Failed);
    assert_eq!(
        report.error.as_ref().map(|e| e.code.as_str()),
        Some("worker_lost")
    );
    let events = store.read_all(&id).await.expect("events");
    let failed: Vec<_> = events
        .iter()
        .filter(|e| e.kind == EventKind::StepFailed)
        .collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].attempt, Some(3));
    assert!(
        store
            .open_commands(Some(&id))
            .await
            .expect("open")
            .is_empty()
    );
}
