//! The shared store conformance suite against SQLite, plus SQLite-specific guarantees.

use mayfly_store::{Batch, SqliteStore, Store, conformance};
use mayfly_types::{EventKind, ExecutionId, GENESIS_HASH};
use serde_json::json;
use std::sync::Arc;

#[tokio::test]
async fn sqlite_passes_the_conformance_suite() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = SqliteStore::open(dir.path().join("log.db"))
        .await
        .expect("open");
    conformance::run_all(Arc::new(store)).await;
}

#[tokio::test]
async fn data_survives_reopen() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("log.db");
    let evs = conformance::chain(
        "keep",
        1,
        GENESIS_HASH,
        &[(EventKind::ExecutionStarted, None, json!({"k": 1}))],
    );
    {
        let store = SqliteStore::open(&path).await.expect("open");
        store
            .append(Arc::new(Batch {
                events: evs.clone(),
                ..Default::default()
            }))
            .await
            .expect("append");
    }
    let store = SqliteStore::open(&path).await.expect("reopen");
    let back = store
        .read_all(&ExecutionId::from("keep"))
        .await
        .expect("read");
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].payload, json!({"k": 1}));
}

#[tokio::test]
async fn the_log_is_append_only_at_the_database_level() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("log.db");
    let store = SqliteStore::open(&path).await.expect("open");
    let evs = conformance::chain(
        "ro",
        1,
        GENESIS_HASH,
        &[(EventKind::ExecutionStarted, None, json!({}))],
    );
    store
        .append(Arc::new(Batch {
            events: evs,
            ..Default::default()
        }))
        .await
        .expect("append");
    let mut conn = SqliteStore::raw_connection(&path).await.expect("conn");
    let upd = sqlx::query("UPDATE events SET payload = '{}'")
        .execute(&mut conn)
        .await;
    assert!(upd.is_err_and(|e| e.to_string().contains("append-only")));
    let del = sqlx::query("DELETE FROM events").execute(&mut conn).await;
    assert!(del.is_err_and(|e| e.to_string().contains("append-only")));
    assert_eq!(
        store
            .read_all(&ExecutionId::from("ro"))
            .await
            .expect("read")
            .len(),
        1
    );
}

#[tokio::test]
async fn each_log_has_its_own_identity_and_keeps_it_across_reopen() {
    let dir = tempfile::tempdir().expect("tmp");
    let a = SqliteStore::open(dir.path().join("a.db")).await.expect("a");
    let b = SqliteStore::open(dir.path().join("b.db")).await.expect("b");
    let id = a.log_id().await.expect("id");
    assert_ne!(
        id,
        b.log_id().await.expect("id"),
        "two logs, two identities"
    );
    drop(a);
    let again = SqliteStore::open(dir.path().join("a.db"))
        .await
        .expect("reopen");
    assert_eq!(again.log_id().await.expect("id"), id);
}
