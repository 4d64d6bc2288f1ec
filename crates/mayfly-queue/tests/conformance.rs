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
    if !mayfly_testkit::nats() {
        return;
    }
    let url = mayfly_testkit::nats_url();
    let name = mayfly_testkit::unique("MAYFLY_TEST");
    let q = NatsQueue::connect(&url, &name, conformance::config())
        .await
        .expect("connect");
    conformance::run_all(Arc::new(q)).await;
    NatsQueue::delete(&url, &name).await.expect("cleanup");
}
