//! Per-execution event budget: a step routed back to itself forever stops at the budget
//! (the runtime's, or a policy's lower `limits.max_events`) with `event_limit_exceeded`.

use mayfly_dsl::{ParseOptions, parse};
use mayfly_engine::Status;
use mayfly_runtime::{Runtime, RuntimeConfig};
use mayfly_store::{SqliteStore, Store};
use serde_json::Map;
use std::sync::Arc;

const FOREVER: &str = "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {name: forever}\nworkflow:\n  - step: start\n    tool: {kind: python, code: \"result = 1\"}\n    next: start\n";

#[tokio::test]
async fn a_step_routed_to_itself_forever_stops_at_the_event_budget() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = Arc::new(
        SqliteStore::open(dir.path().join("m.db"))
            .await
            .expect("store"),
    );
    let rt = Runtime::start(
        store.clone(),
        RuntimeConfig {
            max_events: 200,
            ..Default::default()
        },
    )
    .expect("rt");
    let pb = Arc::new(parse("forever.yaml", FOREVER, &ParseOptions::default()).expect("pb"));
    let h = rt.handle();
    for (limits, cap) in [
        (None, 200u64),
        (
            Some(mayfly_types::Limits {
                max_events: Some(60),
                ..Default::default()
            }),
            60,
        ),
    ] {
        let id = h
            .start_limited(pb.clone(), Map::new(), None, None, limits, None)
            .await
            .expect("start");
        let r = h.wait(&id).await.expect("wait");
        let e = r.error.clone().expect("failed");
        assert_eq!(
            (r.status, e.code.as_str()),
            (Status::Failed, "event_limit_exceeded"),
            "{r:?}"
        );
        assert!(
            e.message.contains(&format!("limit of {cap} events")),
            "{e:?}"
        );
        let events = store.read_all(&id).await.expect("read");
        assert!(
            events.len() as u64 <= cap + 1,
            "{} events past a budget of {cap}",
            events.len()
        );
        assert!(events.len() as u64 > cap / 2, "it ran until the budget");
    }
}
