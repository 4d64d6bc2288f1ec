//! The store conformance suite. Every backend runs exactly these checks (SQLite in this
//! crate's tests; Postgres joins with the server issue). Each check panics with a message
//! naming the violated property.

use crate::{Batch, CommandOp, Compaction, Store, StoreError, StoredPlaybook};
use mayfly_types::{Event, EventKind, ExecutionId, GENESIS_HASH};
use serde_json::{Value, json};
use std::sync::Arc;

/// Build `n` sealed, chained events for `exec` starting after `prev` (seq, hash).
pub fn chain(
    exec: &str,
    start_seq: u64,
    prev_hash: &str,
    kinds: &[(EventKind, Option<&str>, Value)],
) -> Vec<Event> {
    let mut prev = prev_hash.to_owned();
    kinds
        .iter()
        .enumerate()
        .map(|(i, (kind, cmd, payload))| {
            let mut e = Event {
                execution_id: ExecutionId::from(exec),
                seq: start_seq + i as u64,
                kind: *kind,
                step: Some("s".into()),
                attempt: cmd.map(|_| 1),
                command_id: cmd.map(str::to_owned),
                at: 1_700_000_000_000 + i as u64,
                actor: "conformance".into(),
                request_id: Some("req-1".into()),
                playbook_digest: "sha256:pb".into(),
                payload: payload.clone(),
                payload_ref: None,
                prev_hash: prev.clone(),
                hash: String::new(),
                position: None,
            };
            if let Err(err) = mayfly_trust::seal(&mut e) {
                panic!("seal: {err}");
            }
            prev = e.hash.clone();
            e
        })
        .collect()
}

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        mayfly_types::now_ms() % 1_000_000_007
    )
}

/// Run every check against `store`.
pub async fn run_all(store: Arc<dyn Store>) {
    the_log_has_a_stable_identity(store.as_ref()).await;
    append_read_round_trip(store.as_ref()).await;
    compaction_deletes_only_the_range_asked(store.as_ref()).await;
    seq_conflict_writes_nothing(store.as_ref()).await;
    completion_recorded_once(store.as_ref()).await;
    group_commit_isolates_failures(store.clone()).await;
    command_lifecycle(store.as_ref()).await;
    command_ops_apply_as_sets(store.as_ref()).await;
    execution_projection(store.as_ref()).await;
    cache_refs_follow_retention(store.as_ref()).await;
    playbooks_are_immutable_by_digest(store.as_ref()).await;
    keychain_slots(store.as_ref()).await;
    catalog_versions(store.clone()).await;
    tokens_are_stored_by_hash(store.as_ref()).await;
    audit_is_append_only_and_tenant_scoped(store.as_ref()).await;
    tail_never_skips_concurrent_commits(std::slice::from_ref(&store), store.clone()).await;
}

/// Audit records come back most recent first, filtered by tenant, with store-assigned ids.
pub async fn audit_is_append_only_and_tenant_scoped(store: &dyn Store) {
    let t = unique("audit-tenant");
    let rec = |tenant: Option<&str>, outcome: &str, rid: &str| crate::AuditRecord {
        id: 0,
        at_ms: 1_700_000_000_000,
        tenant: tenant.map(str::to_owned),
        actor: tenant.map(|_| "ci-token".to_owned()),
        action: "POST /v1/playbooks".into(),
        outcome: outcome.into(),
        detail: "needs author".into(),
        request_id: rid.into(),
    };
    let batch = Batch {
        audit: vec![
            rec(Some(&t), "forbidden", "r1"),
            rec(None, "unauthenticated", "r2"),
            rec(Some(&t), "cross_tenant", "r3"),
        ],
        ..Default::default()
    };
    store.append(Arc::new(batch)).await.expect("append audit");
    let mine = store.list_audit(Some(&t), 10).await.expect("list");
    let got: Vec<(&str, &str)> = mine
        .iter()
        .map(|a| (a.request_id.as_str(), a.outcome.as_str()))
        .collect();
    assert_eq!(got, [("r3", "cross_tenant"), ("r1", "forbidden")]);
    assert!(mine[0].id > mine[1].id, "ids grow");
    assert_eq!(
        mine[1],
        crate::AuditRecord {
            id: mine[1].id,
            ..rec(Some(&t), "forbidden", "r1")
        }
    );
    let all = store.list_audit(None, 3).await.expect("list all");
    assert_eq!(all.len(), 3);
    assert_eq!(
        all[1].tenant, None,
        "the unauthenticated attempt, between the two"
    );
    assert_eq!(store.list_audit(Some(&t), 1).await.expect("limit").len(), 1);
}

/// A tail following `read_since(last)` while many appenders commit concurrently sees every
/// event exactly once, in position order. `writers` may be separate connections or
/// processes on the same log (that is where positions can commit out of order).
pub async fn tail_never_skips_concurrent_commits(
    writers_: &[Arc<dyn Store>],
    store: Arc<dyn Store>,
) {
    let start = store.head().await.expect("head");
    let prefix = unique("tail");
    let writers = 16u64;
    let per = 20u64;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let store = writers_[w as usize % writers_.len()].clone();
        let exec = format!("{prefix}-{w}");
        tasks.push(tokio::spawn(async move {
            let mut prev = GENESIS_HASH.to_owned();
            for seq in 1..=per {
                let evs = chain(
                    &exec,
                    seq,
                    &prev,
                    &[(EventKind::StepStarted, None, json!({"w": w, "seq": seq}))],
                );
                prev = evs[0].hash.clone();
                store
                    .append(Arc::new(Batch {
                        events: evs,
                        ..Default::default()
                    }))
                    .await
                    .expect("append");
            }
        }));
    }
    let mut seen = std::collections::HashSet::new();
    let mut last = start;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while seen.len() < (writers * per) as usize {
        assert!(
            std::time::Instant::now() < deadline,
            "tail stalled at {} of {}",
            seen.len(),
            writers * per
        );
        let page = store.read_since(last, 7).await.expect("tail");
        for e in &page {
            let pos = e.position.expect("position");
            assert!(pos > last, "positions increase along the tail");
            last = pos;
            if e.execution_id.0.starts_with(&prefix) {
                assert!(
                    seen.insert((e.execution_id.0.clone(), e.seq)),
                    "an event was delivered twice"
                );
            }
        }
        if page.is_empty() {
            tokio::task::yield_now().await;
        }
    }
    for t in tasks {
        t.await.expect("writer");
    }
    // Nothing committed after the tail caught up was skipped either.
    let rest = store.read_since(last, 100_000).await.expect("rest");
    assert!(
        rest.iter().all(|e| !e.execution_id.0.starts_with(&prefix)),
        "a committed event was skipped by the tail"
    );
}

/// Events come back exactly as written, in seq order, with increasing positions.
pub async fn append_read_round_trip(store: &dyn Store) {
    let exec = unique("rt");
    let evs = chain(
        &exec,
        1,
        GENESIS_HASH,
        &[
            (
                EventKind::ExecutionRequested,
                None,
                json!({"path": "p", "workload": {"x": 1.5, "s": "ü"}}),
            ),
            (EventKind::ExecutionStarted, None, json!({})),
            (
                EventKind::StepFinished,
                None,
                json!({"result": [1, {"a": null}], "big": u64::MAX}),
            ),
        ],
    );
    let head_before = store.head().await.expect("head");
    let pos = store
        .append(Arc::new(Batch {
            events: evs.clone(),
            ..Default::default()
        }))
        .await
        .expect("append");
    let pos = pos.expect("a position");
    assert!(pos > head_before, "position must advance");
    assert_eq!(
        store.head().await.expect("head"),
        pos,
        "head is the last position"
    );
    let back = store
        .read_all(&ExecutionId::from(exec.as_str()))
        .await
        .expect("read");
    assert_eq!(back.len(), 3);
    for (a, b) in evs.iter().zip(&back) {
        let mut b = b.clone();
        assert!(b.position.is_some(), "read events carry their position");
        b.position = None;
        assert_eq!(a, &b, "event round-trips unchanged");
    }
    assert!(back[0].position < back[1].position && back[1].position < back[2].position);
    assert_eq!(
        mayfly_trust::verify_chain(&back),
        Ok(()),
        "stored chain verifies"
    );
    let page = store
        .read(&ExecutionId::from(exec.as_str()), 2, 1)
        .await
        .expect("page");
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].seq, 2, "read honours from_seq and limit");
}

/// Compaction deletes exactly one stream's range (in the writer's transaction, with the
/// batch's events), keeps the rest of that stream and every other stream, and the head.
pub async fn compaction_deletes_only_the_range_asked(store: &dyn Store) {
    let a = unique("compact-a");
    let b = unique("compact-b");
    let kinds: Vec<(EventKind, Option<&str>, Value)> = (0..5)
        .map(|i| (EventKind::ExecutionStarted, None, json!({"i": i})))
        .collect();
    for x in [&a, &b] {
        store
            .append(Arc::new(Batch {
                events: chain(x, 1, GENESIS_HASH, &kinds),
                ..Default::default()
            }))
            .await
            .expect("append");
    }
    let head = store.head().await.expect("head");
    let compaction = |from_seq, through_seq| Compaction {
        execution_id: ExecutionId::from(a.as_str()),
        from_seq,
        through_seq,
    };
    let r = store
        .append(Arc::new(Batch {
            compact: vec![compaction(2, 4)],
            ..Default::default()
        }))
        .await
        .expect("compact");
    assert_eq!(r, None, "a compaction alone appends no event");
    let left: Vec<u64> = store
        .read_all(&ExecutionId::from(a.as_str()))
        .await
        .expect("read")
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(left, [1, 5]);
    assert_eq!(
        store
            .read(&ExecutionId::from(a.as_str()), 2, 1)
            .await
            .expect("read")[0]
            .seq,
        5,
        "a read from inside the compacted range starts after it"
    );
    assert_eq!(
        store
            .read_all(&ExecutionId::from(b.as_str()))
            .await
            .expect("read")
            .len(),
        5,
        "other streams are untouched"
    );
    assert_eq!(store.head().await.expect("head"), head);
}

/// A duplicate (execution, seq) is a conflict and the whole batch is rejected.
pub async fn seq_conflict_writes_nothing(store: &dyn Store) {
    let exec = unique("conflict");
    let first = chain(
        &exec,
        1,
        GENESIS_HASH,
        &[(EventKind::ExecutionStarted, None, json!({}))],
    );
    store
        .append(Arc::new(Batch {
            events: first.clone(),
            ..Default::default()
        }))
        .await
        .expect("first");
    let mut second = chain(
        &exec,
        2,
        &first[0].hash,
        &[(EventKind::StepStarted, None, json!({}))],
    );
    second.extend(chain(
        &exec,
        1,
        GENESIS_HASH,
        &[(EventKind::StepStarted, None, json!({}))],
    ));
    let cmd = unique("cmd");
    let r = store
        .append(Arc::new(Batch {
            events: second,
            commands: vec![CommandOp::Insert {
                command_id: cmd.clone(),
                execution_id: ExecutionId::from(exec.as_str()),
                step: "s".into(),
                index: None,
            }],
            ..Default::default()
        }))
        .await;
    assert!(
        matches!(r, Err(StoreError::Conflict(_))),
        "duplicate seq must conflict, got {r:?}"
    );
    let back = store
        .read_all(&ExecutionId::from(exec.as_str()))
        .await
        .expect("read");
    assert_eq!(back.len(), 1, "a rejected batch writes nothing");
    let open = store
        .open_commands(Some(&ExecutionId::from(exec.as_str())))
        .await
        .expect("open");
    assert!(open.is_empty(), "a rejected batch writes no commands");
}

/// `step.finished` for the same (command_id, attempt) is stored at most once.
pub async fn completion_recorded_once(store: &dyn Store) {
    let exec = unique("once");
    let cmd = format!("{exec}/1");
    let a = chain(
        &exec,
        1,
        GENESIS_HASH,
        &[(EventKind::StepFinished, Some(&cmd), json!({"result": 1}))],
    );
    store
        .append(Arc::new(Batch {
            events: a.clone(),
            ..Default::default()
        }))
        .await
        .expect("first completion");
    let b = chain(
        &exec,
        2,
        &a[0].hash,
        &[(EventKind::StepFinished, Some(&cmd), json!({"result": 2}))],
    );
    let r = store
        .append(Arc::new(Batch {
            events: b,
            ..Default::default()
        }))
        .await;
    assert!(
        matches!(r, Err(StoreError::Conflict(_))),
        "second completion must conflict, got {r:?}"
    );
}

/// Concurrent batches commit together; one bad batch does not fail the others.
pub async fn group_commit_isolates_failures(store: Arc<dyn Store>) {
    let exec = unique("group");
    let mut tasks = Vec::new();
    for i in 0..64u64 {
        let store = store.clone();
        let exec = format!("{exec}-{i}");
        tasks.push(tokio::spawn(async move {
            let evs = chain(
                &exec,
                1,
                GENESIS_HASH,
                &[(EventKind::ExecutionStarted, None, json!({"i": i}))],
            );
            store
                .append(Arc::new(Batch {
                    events: evs,
                    ..Default::default()
                }))
                .await
        }));
    }
    // A poisoned batch in the middle of the burst: seq 1 twice.
    let bad_exec = format!("{exec}-bad");
    let mut bad = chain(
        &bad_exec,
        1,
        GENESIS_HASH,
        &[(EventKind::ExecutionStarted, None, json!({}))],
    );
    bad.extend(bad.clone());
    let bad_r = store
        .append(Arc::new(Batch {
            events: bad,
            ..Default::default()
        }))
        .await;
    assert!(bad_r.is_err(), "poisoned batch must fail");
    for t in tasks {
        let r = t.await.expect("join");
        assert!(
            r.is_ok(),
            "healthy batches commit despite a failing neighbour: {r:?}"
        );
    }
    for i in 0..64u64 {
        let back = store
            .read_all(&ExecutionId(format!("{exec}-{i}")))
            .await
            .expect("read");
        assert_eq!(back.len(), 1);
    }
}

/// Insert → claim (lease) → extend → done; open_commands reflects each state.
pub async fn command_lifecycle(store: &dyn Store) {
    let exec = unique("cmdlife");
    let id = ExecutionId::from(exec.as_str());
    let c1 = format!("{exec}/3");
    let c2 = format!("{exec}/4");
    let ins = |c: &str, index| CommandOp::Insert {
        command_id: c.into(),
        execution_id: id.clone(),
        step: "s".into(),
        index,
    };
    store
        .append(Arc::new(Batch {
            commands: vec![ins(&c1, None), ins(&c2, Some(7))],
            ..Default::default()
        }))
        .await
        .expect("insert");
    let open = store.open_commands(Some(&id)).await.expect("open");
    assert_eq!(open.len(), 2);
    assert_eq!((open[0].state.as_str(), open[0].deliveries), ("pending", 0));
    assert_eq!(open[1].index, Some(7));
    let claim = CommandOp::Claim {
        command_id: c1.clone(),
        worker: "w1".into(),
        lease_until: 5_000,
        deliveries: 1,
    };
    store
        .append(Arc::new(Batch {
            commands: vec![claim],
            ..Default::default()
        }))
        .await
        .expect("claim");
    let extend = CommandOp::Extend {
        command_id: c1.clone(),
        lease_until: 9_000,
    };
    store
        .append(Arc::new(Batch {
            commands: vec![extend],
            ..Default::default()
        }))
        .await
        .expect("extend");
    let open = store.open_commands(Some(&id)).await.expect("open");
    let row = open.iter().find(|r| r.command_id == c1).expect("c1");
    assert_eq!(
        (
            row.state.as_str(),
            row.deliveries,
            row.lease_until,
            row.worker.as_deref()
        ),
        ("claimed", 1, Some(9_000), Some("w1"))
    );
    store
        .append(Arc::new(Batch {
            commands: vec![CommandOp::Done {
                command_id: c1.clone(),
            }],
            ..Default::default()
        }))
        .await
        .expect("done");
    let open = store.open_commands(Some(&id)).await.expect("open");
    assert_eq!(open.len(), 1);
    assert_eq!(open[0].command_id, c2);
    // A done command cannot be claimed again.
    let late = CommandOp::Claim {
        command_id: c1,
        worker: "w2".into(),
        lease_until: 1,
        deliveries: 2,
    };
    let r = store
        .append(Arc::new(Batch {
            commands: vec![late],
            ..Default::default()
        }))
        .await;
    assert!(
        matches!(r, Err(StoreError::Conflict(_))),
        "claiming a done command must conflict: {r:?}"
    );
    assert!(
        store
            .open_commands(None)
            .await
            .expect("all")
            .iter()
            .any(|r| r.command_id == c2)
    );
}

/// Many claims and completions in one batch (a fan-out's commit) apply together; one
/// claim of a done command refuses the whole batch and changes nothing.
pub async fn command_ops_apply_as_sets(store: &dyn Store) {
    let exec = unique("cmdset");
    let id = ExecutionId::from(exec.as_str());
    let ids: Vec<String> = (0..2500).map(|i| format!("{exec}/{i}")).collect();
    let append = |commands: Vec<CommandOp>| {
        store.append(Arc::new(Batch {
            commands,
            ..Default::default()
        }))
    };
    append(
        ids.iter()
            .enumerate()
            .map(|(i, c)| CommandOp::Insert {
                command_id: c.clone(),
                execution_id: id.clone(),
                step: "fan".into(),
                index: Some(i),
            })
            .collect(),
    )
    .await
    .expect("insert");
    // More than one statement chunk, and one command claimed twice (the later claim wins).
    let claim = |c: &String, worker: &str, deliveries| CommandOp::Claim {
        command_id: c.clone(),
        worker: worker.into(),
        lease_until: 7_000,
        deliveries,
    };
    let mut claims: Vec<CommandOp> = ids.iter().map(|c| claim(c, "w1", 1)).collect();
    claims.push(claim(&ids[5], "w2", 2));
    append(claims).await.expect("claim all");
    let open = store.open_commands(Some(&id)).await.expect("open");
    assert_eq!(open.len(), 2500);
    assert!(
        open.iter()
            .all(|r| r.state == "claimed" && r.lease_until == Some(7_000))
    );
    let five = open.iter().find(|r| r.command_id == ids[5]).expect("5");
    assert_eq!((five.worker.as_deref(), five.deliveries), (Some("w2"), 2));
    append(
        ids[..2000]
            .iter()
            .map(|c| CommandOp::Done {
                command_id: c.clone(),
            })
            .collect(),
    )
    .await
    .expect("done");
    let open = store.open_commands(Some(&id)).await.expect("open");
    assert_eq!(open.len(), 500);
    assert!(open.iter().all(|r| ids[2000..].contains(&r.command_id)));
    // A batch claiming open commands and one done command: refused as a whole.
    let r = append(vec![claim(&ids[2001], "w3", 2), claim(&ids[0], "w3", 2)]).await;
    assert!(
        matches!(r, Err(StoreError::Conflict(_))),
        "a batch claiming a done command must conflict: {r:?}"
    );
    let open = store.open_commands(Some(&id)).await.expect("open");
    let row = open
        .iter()
        .find(|r| r.command_id == ids[2001])
        .expect("2001");
    assert_eq!(
        row.worker.as_deref(),
        Some("w1"),
        "nothing of a refused batch applies"
    );
}

/// The executions projection follows lifecycle events in the same transaction.
pub async fn execution_projection(store: &dyn Store) {
    let exec = unique("proj");
    let id = ExecutionId::from(exec.as_str());
    let evs = chain(
        &exec,
        1,
        GENESIS_HASH,
        &[(
            EventKind::ExecutionRequested,
            None,
            json!({"path": "a/b", "workload": {}, "parent": {"execution_id": "p1", "step": "s"}}),
        )],
    );
    store
        .append(Arc::new(Batch {
            events: evs.clone(),
            ..Default::default()
        }))
        .await
        .expect("req");
    let row = store.get_execution(&id).await.expect("get").expect("row");
    assert_eq!((row.path.as_str(), row.status.as_str()), ("a/b", "pending"));
    assert_eq!(row.parent_execution_id, Some(ExecutionId::from("p1")));
    let more = chain(
        &exec,
        2,
        &evs[0].hash,
        &[
            (EventKind::ExecutionStarted, None, json!({})),
            (EventKind::ExecutionCompleted, None, json!({"result": 1})),
        ],
    );
    store
        .append(Arc::new(Batch {
            events: more,
            ..Default::default()
        }))
        .await
        .expect("more");
    let row = store.get_execution(&id).await.expect("get").expect("row");
    assert_eq!(row.status, "completed");
    let list = store.list_executions(None, 1000).await.expect("list");
    assert!(list.iter().any(|r| r.execution_id == id));
    assert_eq!(
        row.tenant, "default",
        "no tenant in the request means the default tenant"
    );
    // A tenant's listing holds only its own executions.
    let tenant = unique("ten");
    let other = unique("exec-t");
    let evs = chain(
        &other,
        1,
        GENESIS_HASH,
        &[(
            EventKind::ExecutionRequested,
            None,
            json!({"path": "p", "workload": {}, "tenant": tenant}),
        )],
    );
    store
        .append(Arc::new(Batch {
            events: evs,
            ..Default::default()
        }))
        .await
        .expect("req");
    let mine = store
        .list_executions(Some(&tenant), 100)
        .await
        .expect("list");
    assert_eq!(mine.len(), 1);
    assert_eq!(
        (mine[0].execution_id.0.as_str(), mine[0].tenant.as_str()),
        (other.as_str(), tenant.as_str())
    );
    assert!(
        !store
            .list_executions(Some("nobody"), 100)
            .await
            .expect("list")
            .iter()
            .any(|r| r.execution_id.0 == other)
    );
    assert!(
        store
            .get_execution(&ExecutionId::from("nope"))
            .await
            .expect("get")
            .is_none()
    );
}

/// The payloads named by a live execution's events are always retained; a finished one's
/// only while it ended at or after the cutoff. Refs nested anywhere in a payload count, and
/// each pair is reported once.
pub async fn cache_refs_follow_retention(store: &dyn Store) {
    let tenant = unique("cref");
    let d = |c: char| format!("sha256:{}", c.to_string().repeat(64));
    let r = |c: char| json!({"$ref": d(c), "format": "json", "bytes": 10});
    let (live, done, child) = (
        unique("cref-live"),
        unique("cref-done"),
        unique("cref-child"),
    );
    let mut events = chain(
        &live,
        1,
        GENESIS_HASH,
        &[
            (
                EventKind::ExecutionRequested,
                None,
                json!({"path": "p", "workload": {"w": r('a')}, "tenant": tenant}),
            ),
            (EventKind::ExecutionStarted, None, json!({})),
            (
                EventKind::StepFinished,
                None,
                json!({"result": {"rows": [r('b'), {"x": r('b')}]}}),
            ),
        ],
    );
    events.extend(chain(
        &done,
        1,
        GENESIS_HASH,
        &[
            (
                EventKind::ExecutionRequested,
                None,
                json!({"path": "p", "workload": {}, "tenant": tenant}),
            ),
            (EventKind::ExecutionStarted, None, json!({})),
            (
                EventKind::ExecutionCompleted,
                None,
                json!({"result": r('c')}),
            ),
        ],
    ));
    // A child of the live execution, ended long ago: its parent may hold its result.
    events.extend(chain(
        &child,
        1,
        GENESIS_HASH,
        &[
            (
                EventKind::ExecutionRequested,
                None,
                json!({"path": "c", "workload": {}, "tenant": tenant, "parent": {"execution_id": live, "step": "s"}}),
            ),
            (EventKind::ExecutionStarted, None, json!({})),
            (EventKind::ExecutionCompleted, None, json!({"result": [r('d'), r('d')]})),
        ],
    ));
    store
        .append(Arc::new(Batch {
            events,
            ..Default::default()
        }))
        .await
        .expect("append");
    let tn = tenant.as_str();
    let retained = |cutoff: u64| async move {
        let mut v: Vec<String> = store
            .retained_cache_refs(cutoff)
            .await
            .expect("retained")
            .into_iter()
            .filter(|(t, _)| t == tn)
            .map(|(_, d)| d)
            .collect();
        v.sort();
        v
    };
    // The finished execution's last event is at 1_700_000_000_002.
    assert_eq!(
        retained(1_700_000_000_002).await,
        vec![d('a'), d('b'), d('c'), d('d')],
        "a recent finish keeps its payloads"
    );
    assert_eq!(
        retained(1_700_000_000_003).await,
        vec![d('a'), d('b'), d('d')],
        "a finish before the cutoff releases its payloads; the live execution keeps its own \
         and its finished child's"
    );
}

/// Putting the same digest twice is a no-op; content is returned verbatim.
pub async fn playbooks_are_immutable_by_digest(store: &dyn Store) {
    let content = format!("apiVersion: noetl.io/v2 # {}\n", unique("pb"));
    let digest = mayfly_trust::sha256_digest(content.as_bytes());
    let pb = StoredPlaybook {
        digest: digest.clone(),
        path: "x/y".into(),
        source_name: "y.yaml".into(),
        content: content.clone(),
    };
    store.put_playbook(pb.clone()).await.expect("put");
    store
        .put_playbook(StoredPlaybook {
            path: "other".into(),
            ..pb.clone()
        })
        .await
        .expect("put again");
    let back = store
        .get_playbook(&digest)
        .await
        .expect("get")
        .expect("stored");
    assert_eq!(back, pb, "first version wins; identical digest is a no-op");
    assert!(
        store
            .get_playbook("sha256:none")
            .await
            .expect("get")
            .is_none()
    );
}

/// Keychain rows: put/overwrite/list/delete, per tenant, values never listed.
pub async fn keychain_slots(store: &dyn Store) {
    use crate::SecretOp;
    let t1 = unique("tenant-a");
    let t2 = unique("tenant-b");
    let put = |t: &str, a: &str, v: &str| SecretOp::Put {
        tenant: t.into(),
        alias: a.into(),
        sealed: v.into(),
    };
    store
        .append(Arc::new(Batch {
            secrets: vec![
                put(&t1, "pg", "mk1.x.1"),
                put(&t1, "api", "mk1.x.2"),
                put(&t2, "pg", "mk1.x.3"),
            ],
            ..Default::default()
        }))
        .await
        .expect("put");
    assert_eq!(
        store.get_secret(&t1, "pg").await.expect("get").as_deref(),
        Some("mk1.x.1")
    );
    assert_eq!(
        store.get_secret(&t2, "pg").await.expect("get").as_deref(),
        Some("mk1.x.3"),
        "tenants are separate"
    );
    let list: Vec<String> = store
        .list_secrets(&t1)
        .await
        .expect("list")
        .into_iter()
        .map(|e| e.alias)
        .collect();
    assert_eq!(list, ["api", "pg"]);
    store
        .append(Arc::new(Batch {
            secrets: vec![put(&t1, "pg", "mk1.x.9")],
            ..Default::default()
        }))
        .await
        .expect("overwrite");
    assert_eq!(
        store.get_secret(&t1, "pg").await.expect("get").as_deref(),
        Some("mk1.x.9")
    );
    let del = SecretOp::Delete {
        tenant: t1.clone(),
        alias: "pg".into(),
    };
    store
        .append(Arc::new(Batch {
            secrets: vec![del],
            ..Default::default()
        }))
        .await
        .expect("delete");
    assert!(store.get_secret(&t1, "pg").await.expect("get").is_none());
    assert!(
        store.get_secret(&t2, "pg").await.expect("get").is_some(),
        "delete is per tenant"
    );
}

/// Catalog: immutable dense versions per (tenant, path); identical content is a no-op;
/// concurrent registrations never collide.
pub async fn catalog_versions(store: Arc<dyn Store>) {
    let tenant = unique("cat");
    let pb = |content: &str| StoredPlaybook {
        digest: mayfly_trust::sha256_digest(content.as_bytes()),
        path: "team/flow".into(),
        source_name: "flow.yaml".into(),
        content: content.into(),
    };
    let (e1, new1) = store
        .register(&tenant, pb("v-one"))
        .await
        .expect("register");
    assert_eq!((e1.version, new1), (1, true));
    let (again, new_again) = store
        .register(&tenant, pb("v-one"))
        .await
        .expect("register again");
    assert_eq!(
        (again.version, new_again),
        (1, false),
        "identical content is a no-op"
    );
    let (e2, new2) = store
        .register(&tenant, pb("v-two"))
        .await
        .expect("register v2");
    assert_eq!((e2.version, new2), (2, true));
    let (latest, content) = store
        .resolve(&tenant, "team/flow", None)
        .await
        .expect("resolve")
        .expect("found");
    assert_eq!((latest.version, content.content.as_str()), (2, "v-two"));
    let (first, content) = store
        .resolve(&tenant, "team/flow", Some(1))
        .await
        .expect("resolve")
        .expect("found");
    assert_eq!((first.version, content.content.as_str()), (1, "v-one"));
    assert!(
        store
            .resolve(&tenant, "team/flow", Some(9))
            .await
            .expect("resolve")
            .is_none()
    );
    assert!(
        store
            .resolve(&unique("other"), "team/flow", None)
            .await
            .expect("resolve")
            .is_none(),
        "catalogs are per tenant"
    );
    let mut tasks = Vec::new();
    for i in 0..8 {
        let store = store.clone();
        let tenant = tenant.clone();
        tasks.push(tokio::spawn(async move {
            store
                .register(&tenant, pb(&format!("concurrent-{i}")))
                .await
        }));
    }
    for t in tasks {
        t.await
            .expect("join")
            .expect("concurrent registration succeeds");
    }
    let versions: Vec<u32> = store
        .list_catalog(&tenant)
        .await
        .expect("list")
        .into_iter()
        .map(|e| e.version)
        .collect();
    assert_eq!(
        versions,
        (1..=10).collect::<Vec<u32>>(),
        "versions are dense and unique"
    );
}

/// Token grants are found by hash only.
pub async fn tokens_are_stored_by_hash(store: &dyn Store) {
    let before = store.count_tokens().await.expect("count");
    let hash = mayfly_trust::sha256_digest(unique("tok").as_bytes());
    let g = crate::TokenGrant {
        tenant: "acme".into(),
        role: "operator".into(),
        name: "ci".into(),
    };
    store.put_token(&hash, &g).await.expect("put");
    assert_eq!(store.find_token(&hash).await.expect("find"), Some(g));
    assert_eq!(store.count_tokens().await.expect("count"), before + 1);
    assert!(
        store
            .find_token("sha256:unknown")
            .await
            .expect("find")
            .is_none()
    );
    assert!(
        store
            .put_token(
                &hash,
                &crate::TokenGrant {
                    tenant: "x".into(),
                    role: "admin".into(),
                    name: "dup".into()
                }
            )
            .await
            .is_err(),
        "a hash is granted once"
    );
}

/// The log id is 32 lowercase hex digits and the same on every read.
pub async fn the_log_has_a_stable_identity(store: &dyn Store) {
    let a = store.log_id().await.expect("log id");
    assert!(
        a.len() == 32
            && a.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "the log id is 32 lowercase hex digits: {a}"
    );
    assert_eq!(
        store.log_id().await.expect("log id"),
        a,
        "the log id never changes"
    );
}
