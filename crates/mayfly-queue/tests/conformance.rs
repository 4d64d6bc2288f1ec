//! The queue conformance suite against both backends: in-process and the real local NATS
//! JetStream (skipped loudly when NATS is down; with CI=true its absence is a failure).

use mayfly_queue::{MemoryQueue, NatsQueue, conformance};
use std::sync::Arc;

#[tokio::test]
async fn memory_queue_passes_the_conformance_suite() {
    conformance::run_all(Arc::new(MemoryQueue::new(conformance::config()))).await;
}

#[tokio::test]
async fn nats_queue_passes_the_conformance_suite() {
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
    let name = format!("MAYFLY_TEST_{}", std::process::id());
    let q = NatsQueue::connect(&url, &name, conformance::config())
        .await
        .expect("connect");
    conformance::run_all(Arc::new(q)).await;
    NatsQueue::delete(&url, &name).await.expect("cleanup");
}
