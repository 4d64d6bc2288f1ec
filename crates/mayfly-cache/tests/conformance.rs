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
    let path = dir.path().join("acme").join(&hex[..2]).join(hex);
    std::fs::write(&path, b"tampered").expect("tamper");
    let err = c.get("acme", &d).await.expect_err("tampering is detected");
    assert_eq!(err.code(), "cache_corrupt");
}

#[tokio::test]
async fn nats_cache_passes_the_conformance_suite() {
    let url = std::env::var("MAYFLY_TEST_NATS").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let up = std::net::TcpStream::connect_timeout(
        &"127.0.0.1:4222".parse().expect("addr"),
        std::time::Duration::from_secs(2),
    )
    .is_ok();
    if !up {
        assert!(
            std::env::var("CI").map(|v| v != "true").unwrap_or(true),
            "CI=true but NATS is not reachable at 127.0.0.1:4222"
        );
        eprintln!(
            "SKIPPED: NATS is not reachable at 127.0.0.1:4222 (start nats-server -js to run this test)"
        );
        return;
    }
    let client = async_nats::connect(&url).await.expect("connect");
    let bucket = format!("mayfly_test_cache_{}", std::process::id());
    let c = NatsCache::open(client.clone(), &bucket)
        .await
        .expect("open");
    conformance::run_all(Arc::new(c)).await;
    NatsCache::delete(client, &bucket).await.expect("cleanup");
}
