//! The cache conformance suite against both backends: a local directory and the real local
//! NATS JetStream object store (skipped loudly when NATS is down; with CI=true its absence is
//! a failure).

use mayfly_cache::{Cache, LocalCache, NatsCache, conformance};
use std::sync::Arc;

#[tokio::test]
async fn local_cache_passes_the_conformance_suite() {
    let dir = tempfile::tempdir().expect("tempdir");
    conformance::run_all(Arc::new(LocalCache::new(dir.path()))).await;
}

#[tokio::test]
async fn local_cache_detects_a_tampered_payload() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = LocalCache::new(dir.path());
    let b = bytes::Bytes::from_static(b"original");
    let d = mayfly_trust::sha256_digest(&b);
    c.put("acme", &d, b).await.expect("put");
    let hex = d.trim_start_matches("sha256:");
    let path = dir.path().join("t61636d65").join(&hex[..2]).join(hex);
    std::fs::write(&path, b"tampered").expect("tamper");
    let err = c.get("acme", &d).await.expect_err("tampering is detected");
    assert_eq!(err.code(), "cache_corrupt");
}

/// A reader that meets a payload moved aside by a delete still judging it (to be spared)
/// looks again instead of reporting it missing; a put meeting it stores it anew.
#[tokio::test]
async fn local_cache_reads_through_a_delete_that_spares() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = LocalCache::new(dir.path());
    let b = bytes::Bytes::from_static(b"spared");
    let d = mayfly_trust::sha256_digest(&b);
    c.put("acme", &d, b.clone()).await.expect("put");
    let hex = d.trim_start_matches("sha256:");
    let path = dir.path().join("t61636d65").join(&hex[..2]).join(hex);
    let tomb = path.with_extension("gc-1");
    std::fs::rename(&path, &tomb).expect("move aside");
    let (from, to) = (tomb.clone(), path.clone());
    let back = tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        std::fs::rename(from, to).expect("spare");
    });
    assert_eq!(c.get("acme", &d).await.expect("get"), Some(b.clone()));
    back.await.expect("task");
    // Without a delete in progress, absent is absent at once.
    std::fs::remove_file(&path).expect("remove");
    assert_eq!(c.get("acme", &d).await.expect("get"), None);
    // A put of a payload a delete has moved aside stores it anew.
    c.put("acme", &d, b.clone()).await.expect("put");
    std::fs::rename(&path, &tomb).expect("move aside");
    c.put("acme", &d, b.clone()).await.expect("put again");
    assert_eq!(std::fs::read(&path).expect("stored anew"), b.to_vec());
}

#[tokio::test]
async fn nats_cache_passes_the_conformance_suite() {
    if !mayfly_testkit::nats() {
        return;
    }
    let url = mayfly_testkit::nats_url();
    let client = async_nats::connect(&url).await.expect("connect");
    let bucket = mayfly_testkit::unique("mayfly_test_cache");
    let c = NatsCache::open(client.clone(), &bucket)
        .await
        .expect("open");
    conformance::run_all(Arc::new(c)).await;
    NatsCache::delete(client, &bucket).await.expect("cleanup");
}
