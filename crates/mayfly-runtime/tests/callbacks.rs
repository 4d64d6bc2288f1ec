//! Callbacks that hold no worker: a thousand parked executions, zero busy workers, then all
//! resumed by their one-time tokens; replayed and unknown tokens; timeouts route like failures.

use mayfly_dsl::{ParseOptions, parse};
use mayfly_engine::{ExecState, Status};
use mayfly_runtime::{Runtime, RuntimeConfig, RuntimeError};
use mayfly_store::{SqliteStore, Store};
use mayfly_types::{EventKind, ExecutionId};
use serde_json::{Map, json};
use std::sync::Arc;
use std::time::Duration;

const PARKED: &str = r#"apiVersion: noetl.io/v2
kind: Playbook
metadata: {name: parked}
workflow:
  - step: start
    tool: {kind: wait}
    next: end
  - step: end
    input: {got: "{{ start.approved }}", by: "{{ start.by }}"}
"#;

#[tokio::test]
async fn a_thousand_parked_executions_hold_no_worker_and_all_resume() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = Arc::new(
        SqliteStore::open(dir.path().join("m.db"))
            .await
            .expect("store"),
    );
    let rt = Runtime::start(
        store.clone(),
        RuntimeConfig {
            workers: 2,
            ..Default::default()
        },
    )
    .expect("rt");
    let h = rt.handle();
    let pb = Arc::new(parse("parked.yaml", PARKED, &ParseOptions::default()).expect("pb"));
    let mut ids = Vec::new();
    for _ in 0..1000 {
        ids.push(h.start(pb.clone(), Map::new(), None).await.expect("start"));
    }
    // Every execution is parked on step.waiting, and no block is issued or claimed.
    assert!(
        store.open_commands(None).await.expect("open").is_empty(),
        "parking holds no command and no worker"
    );
    let mut tokens = Vec::new();
    for id in &ids {
        let evs = store.read_all(id).await.expect("events");
        let last = evs.last().expect("events");
        assert_eq!(last.kind, EventKind::StepWaiting);
        let token = last.payload["token"].as_str().expect("token").to_owned();
        assert!(token.starts_with("cb_") && token.len() > 40);
        let st = ExecState::fold(id.clone(), &evs).expect("fold");
        assert_eq!(st.status, Status::Running);
        tokens.push(token);
    }
    assert_eq!(
        tokens
            .iter()
            .collect::<std::collections::HashSet<_>>()
            .len(),
        1000,
        "tokens are unique"
    );
    for (i, (id, token)) in ids.iter().zip(&tokens).enumerate() {
        let (exec, step) = h
            .callback(token, json!({"approved": true, "by": format!("user{i}")}))
            .await
            .expect("callback");
        assert_eq!((&exec, step.as_str()), (id, "start"));
    }
    for (i, id) in ids.iter().enumerate() {
        let r = h.wait(id).await.expect("report");
        assert_eq!(r.status, Status::Completed);
        assert_eq!(r.result, json!({"got": true, "by": format!("user{i}")}));
    }
    assert!(
        matches!(
            h.callback(&tokens[0], json!(1)).await,
            Err(RuntimeError::CallbackUsed)
        ),
        "one time only"
    );
    assert!(matches!(
        h.callback("cb_nope", json!(1)).await,
        Err(RuntimeError::CallbackUnknown)
    ));
    let evs = store.read_all(&ids[0]).await.expect("events");
    assert!(
        evs.iter()
            .any(|e| e.kind == EventKind::CallbackReceived && e.actor == "callback")
    );
}

#[tokio::test]
async fn a_callback_timeout_routes_like_a_failure_and_parked_steps_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("m.db");
    let src = r#"apiVersion: noetl.io/v2
kind: Playbook
metadata: {name: timeout}
workflow:
  - step: start
    tool: {kind: wait, timeout: 0.3}
    next:
      arcs:
        - {step: approved}
        - {step: expired, when: "{{ event.name == 'call.error' and error.code == 'callback_timeout' }}"}
  - step: approved
  - step: expired
    input: {why: "{{ error.code }}"}
"#;
    let store = Arc::new(SqliteStore::open(&path).await.expect("store"));
    let rt = Runtime::start(store.clone(), RuntimeConfig::default()).expect("rt");
    let pb = parse("t.yaml", src, &ParseOptions::default()).expect("pb");
    let r = tokio::time::timeout(Duration::from_secs(10), rt.run(pb, Map::new()))
        .await
        .expect("times out promptly")
        .expect("run");
    assert_eq!(r.status, Status::Completed);
    assert!(r.steps.contains_key("expired") && !r.steps.contains_key("approved"));
    drop(rt);

    // A parked execution outlives its runtime: a new one resumes it and the token still works.
    let rt = Runtime::start(store.clone(), RuntimeConfig::default()).expect("rt");
    let pb = Arc::new(parse("parked.yaml", PARKED, &ParseOptions::default()).expect("pb"));
    let id = rt
        .handle()
        .start(pb, Map::new(), None)
        .await
        .expect("start");
    let token = store
        .read_all(&id)
        .await
        .expect("events")
        .last()
        .expect("ev")
        .payload["token"]
        .as_str()
        .expect("t")
        .to_owned();
    drop(rt);
    let rt = Runtime::start(store.clone(), RuntimeConfig::default()).expect("rt again");
    let h = rt.handle();
    assert!(
        matches!(
            h.callback(&token, json!({})).await,
            Err(RuntimeError::CallbackUnknown)
        ),
        "not live until resumed"
    );
    h.resume(&ExecutionId::from(id.0.as_str()))
        .await
        .expect("resume");
    h.callback(&token, json!({"approved": "yes", "by": "later"}))
        .await
        .expect("callback after restart");
    let r = h.wait(&id).await.expect("report");
    assert_eq!(r.result, json!({"got": "yes", "by": "later"}));
}
