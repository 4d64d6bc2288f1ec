//! Shared-cache retention on real executions, on both store/cache pairs: SQLite with the
//! local directory, Postgres with the NATS object store.

use mayfly_cache::{Cache, Payloads};
use mayfly_dsl::ParseOptions;
use mayfly_engine::Status;
use mayfly_runtime::retention::{Retention, collect};
use mayfly_runtime::{Runtime, RuntimeConfig};
use mayfly_store::Store;
use mayfly_types::{CacheRef, EventKind, ExecutionId, now_ms};
use serde_json::{Map, json};
use std::sync::Arc;
use std::time::Duration;

/// A large result (by ref), then done.
const DONE: &str = r#"
apiVersion: noetl.io/v2
kind: Playbook
metadata: {name: done, path: tests/done}
workflow:
  - step: start
    tool: {kind: python, code: "result = ['done-%05d' % i for i in range(3000)]"}
"#;

/// A large result (by ref), parked on a callback, then a block that reads the result.
const PARKED: &str = r#"
apiVersion: noetl.io/v2
kind: Playbook
metadata: {name: parked, path: tests/parked}
workflow:
  - step: start
    tool: {kind: python, code: "result = ['parked-%05d' % i for i in range(3000)]"}
    next: approve
  - step: approve
    tool: {kind: wait}
    next: end
  - step: end
    tool: {kind: python, input: {xs: "{{ start }}"}, code: "result = {'n': len(xs), 'last': xs[-1]}"}
"#;

fn pb(src: &str) -> mayfly_dsl::Playbook {
    mayfly_dsl::parse("retention.yaml", src, &ParseOptions::default()).expect("parse")
}

async fn digest_of_start(store: &dyn Store, id: &ExecutionId) -> String {
    let events = store.read_all(id).await.expect("events");
    let e = events
        .iter()
        .find(|e| e.kind == EventKind::StepFinished && e.step.as_deref() == Some("start"))
        .expect("start finished");
    CacheRef::parse(&e.payload["result"])
        .expect("the result is a ref")
        .digest
}

async fn present(cache: &dyn Cache, digest: &str) -> bool {
    cache
        .get(mayfly_types::DEFAULT_TENANT, digest)
        .await
        .expect("get")
        .is_some()
}

/// The whole story on one store and cache.
async fn retention_keeps_what_the_log_names(store: Arc<dyn Store>, cache: Arc<dyn Cache>) {
    let rt = Runtime::start(
        store.clone(),
        RuntimeConfig {
            cache: Some(Arc::new(Payloads::new(
                cache.clone(),
                mayfly_cache::DEFAULT_INLINE_LIMIT,
            ))),
            ..Default::default()
        },
    )
    .expect("runtime");
    let h = rt.handle();
    let done = rt.run(pb(DONE), Map::new()).await.expect("run");
    assert_eq!(done.status, Status::Completed, "{:?}", done.error);
    let parked = h
        .start(Arc::new(pb(PARKED)), Map::new(), None)
        .await
        .expect("start");
    let token = loop {
        let events = store.read_all(&parked).await.expect("events");
        if let Some(w) = events.iter().find(|e| e.kind == EventKind::StepWaiting) {
            break w.payload["token"].as_str().expect("token").to_owned();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let done_digest = digest_of_start(store.as_ref(), &done.execution_id).await;
    let parked_digest = digest_of_start(store.as_ref(), &parked).await;
    // An orphan: stored, named by no event (a completion that never committed).
    let orphan = bytes::Bytes::from_static(b"\"a result whose completion never committed\"");
    let orphan_digest = mayfly_trust::sha256_digest(&orphan);
    cache
        .put(mayfly_types::DEFAULT_TENANT, &orphan_digest, orphan.clone())
        .await
        .expect("put");

    let t = now_ms() + 1;
    let hour = Duration::from_secs(3600);
    let zero = Duration::ZERO;
    // Inside the grace period nothing goes, referenced or not.
    let r = collect(
        store.as_ref(),
        cache.as_ref(),
        Retention {
            keep: zero,
            grace: hour,
        },
        t,
        false,
    )
    .await
    .expect("gc");
    assert_eq!(r.deleted, 0, "{r:?}");
    assert!(r.young >= 2, "{r:?}");
    // Kept for an hour after the end: only the orphan goes; a dry run deletes nothing.
    let keep_hour = Retention {
        keep: hour,
        grace: zero,
    };
    let r = collect(store.as_ref(), cache.as_ref(), keep_hour, t, true)
        .await
        .expect("dry run");
    assert_eq!((r.deleted, r.referenced), (1, 2), "{r:?}");
    assert!(
        present(cache.as_ref(), &orphan_digest).await,
        "a dry run deletes nothing"
    );
    let r = collect(store.as_ref(), cache.as_ref(), keep_hour, t, false)
        .await
        .expect("gc");
    assert_eq!((r.deleted, r.referenced), (1, 2), "{r:?}");
    assert!(!present(cache.as_ref(), &orphan_digest).await);
    assert!(present(cache.as_ref(), &done_digest).await);
    // Kept for no time after the end: the finished execution's payload goes, the parked
    // (live) execution's stays however old.
    let r = collect(
        store.as_ref(),
        cache.as_ref(),
        Retention {
            keep: zero,
            grace: zero,
        },
        t,
        false,
    )
    .await
    .expect("gc");
    assert_eq!((r.deleted, r.referenced), (1, 1), "{r:?}");
    assert!(!present(cache.as_ref(), &done_digest).await);
    assert!(present(cache.as_ref(), &parked_digest).await);
    // The log is untouched: the finished execution still replays from its events alone.
    let events = store.read_all(&done.execution_id).await.expect("events");
    mayfly_trust::verify_chain(&events).expect("chain intact");
    // The parked execution resumes and its next block reads the payload it kept.
    h.callback(&token, json!({"ok": true}))
        .await
        .expect("callback");
    let r = h.wait(&parked).await.expect("wait");
    assert_eq!(r.status, Status::Completed, "{:?}", r.error);
    assert_eq!(r.result, json!({"n": 3000, "last": "parked-02999"}));
    // A payload stored again after the listing that chose it is spared by the delete.
    let chosen = cache
        .list()
        .await
        .expect("list")
        .into_iter()
        .find(|e| e.digest == parked_digest)
        .expect("listed");
    tokio::time::sleep(Duration::from_millis(20)).await;
    let bytes = cache
        .get(mayfly_types::DEFAULT_TENANT, &parked_digest)
        .await
        .expect("get")
        .expect("present");
    cache
        .put(mayfly_types::DEFAULT_TENANT, &parked_digest, bytes)
        .await
        .expect("put again");
    assert!(
        !cache
            .delete(
                mayfly_types::DEFAULT_TENANT,
                &parked_digest,
                chosen.touched_ms
            )
            .await
            .expect("delete")
    );
    drop(rt);
}

#[tokio::test]
async fn sqlite_and_local_directory() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = Arc::new(
        mayfly_store::SqliteStore::open(dir.path().join("m.db"))
            .await
            .expect("store"),
    );
    let cache = Arc::new(mayfly_cache::LocalCache::new(dir.path().join("cache")));
    retention_keeps_what_the_log_names(store, cache).await;
}

#[tokio::test]
async fn postgres_and_nats_object_store() {
    if !(mayfly_testkit::postgres() && mayfly_testkit::nats()) {
        return;
    }
    let pg = mayfly_testkit::postgres_url();
    let schema = mayfly_testkit::unique("mayfly_retention");
    let store = Arc::new(
        mayfly_store::PostgresStore::connect_schema(&pg, &schema)
            .await
            .expect("postgres"),
    );
    let client = async_nats::connect(mayfly_testkit::nats_url())
        .await
        .expect("nats");
    let bucket = mayfly_testkit::unique("mayfly_retention");
    let cache = Arc::new(
        mayfly_cache::NatsCache::open(client.clone(), &bucket)
            .await
            .expect("object store"),
    );
    retention_keeps_what_the_log_names(store, cache).await;
    mayfly_cache::NatsCache::delete(client, &bucket)
        .await
        .expect("delete bucket");
    mayfly_store::PostgresStore::drop_schema(&pg, &schema)
        .await
        .expect("drop schema");
}
