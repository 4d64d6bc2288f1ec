//! The queue conformance suite: every backend runs exactly these checks, in order, on one
//! empty queue configured with [`config`]. Each check leaves the queue empty again.

use crate::{CommandQueue, QueueConfig};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

/// The configuration the suite expects the queue under test to have.
pub fn config() -> QueueConfig {
    QueueConfig {
        ack_wait: Duration::from_secs(1),
        max_deliver: 3,
        backoff: vec![Duration::from_millis(50)],
    }
}

const NONE_WAIT: Duration = Duration::from_millis(300);
const SOME_WAIT: Duration = Duration::from_secs(5);

fn id(tag: &str) -> String {
    format!("{tag}-{}-{}", std::process::id(), mayfly_unique())
}

fn mayfly_unique() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

async fn assert_empty(q: &dyn CommandQueue, why: &str) {
    let got = q.pull(NONE_WAIT).await.expect("pull");
    assert!(got.is_none(), "{why}: expected nothing, got {got:?}");
    assert_eq!(q.depth().await.expect("depth"), 0, "{why}: depth must be 0");
}

/// Run every check.
pub async fn run_all(q: Arc<dyn CommandQueue>) {
    publish_pull_ack(q.as_ref()).await;
    publish_is_deduplicated(q.as_ref()).await;
    batch_publish_is_many_publishes(q.as_ref()).await;
    batch_pull_returns_what_is_there_without_waiting_to_fill(q.as_ref()).await;
    nak_with_delay_redelivers_later(q.as_ref()).await;
    unacked_delivery_is_redelivered_after_ack_wait(q.as_ref()).await;
    in_progress_extends_the_ack_wait(q.as_ref()).await;
    max_deliver_gives_up(q.as_ref()).await;
    term_never_redelivers(q.as_ref()).await;
    competing_pullers_get_each_message_once(q.clone()).await;
}

pub async fn publish_pull_ack(q: &dyn CommandQueue) {
    let a = id("a");
    q.publish(&a, b"payload-a").await.expect("publish");
    assert_eq!(q.depth().await.expect("depth"), 1);
    let d = q.pull(SOME_WAIT).await.expect("pull").expect("a delivery");
    assert_eq!(
        (d.id.as_str(), d.payload.as_slice(), d.delivered),
        (a.as_str(), &b"payload-a"[..], 1)
    );
    assert_eq!(
        q.depth().await.expect("depth"),
        1,
        "in flight still counts as lag"
    );
    d.ack().await.expect("ack");
    assert_empty(q, "after ack").await;
}

pub async fn batch_pull_returns_what_is_there_without_waiting_to_fill(q: &dyn CommandQueue) {
    let ids = [id("b1"), id("b2"), id("b3")];
    for i in &ids {
        q.publish(i, i.as_bytes()).await.expect("publish");
    }
    // Two of three in one batch, then the third: each message exactly once, in order.
    let first = q.pull_batch(2, SOME_WAIT).await.expect("batch");
    let began = std::time::Instant::now();
    let rest = q.pull_batch(10, SOME_WAIT).await.expect("batch");
    assert!(
        began.elapsed() < SOME_WAIT,
        "a batch with messages available must not wait for the batch to fill"
    );
    let got: Vec<&str> = first.iter().chain(&rest).map(|d| d.id.as_str()).collect();
    assert_eq!(got, ids.iter().map(String::as_str).collect::<Vec<_>>());
    for d in first.into_iter().chain(rest) {
        d.ack().await.expect("ack");
    }
    assert_empty(q, "after acking the batch").await;
}

pub async fn publish_is_deduplicated(q: &dyn CommandQueue) {
    let d_id = id("dup");
    q.publish(&d_id, b"1").await.expect("publish");
    q.publish(&d_id, b"1").await.expect("publish again");
    let d = q
        .pull(SOME_WAIT)
        .await
        .expect("pull")
        .expect("one delivery");
    assert_eq!(d.id, d_id);
    d.ack().await.expect("ack");
    assert_empty(q, "a duplicate publish is delivered once").await;
}

pub async fn batch_publish_is_many_publishes(q: &dyn CommandQueue) {
    // A duplicate inside the batch and one of an earlier publish are both dropped.
    let earlier = id("bp0");
    q.publish(&earlier, b"0").await.expect("publish");
    let ids: Vec<String> = (1..=40).map(|i| id(&format!("bp{i}"))).collect();
    let mut items: Vec<(String, bytes::Bytes)> = ids
        .iter()
        .map(|i| (i.clone(), bytes::Bytes::from(i.clone().into_bytes())))
        .collect();
    items.push((
        ids[3].clone(),
        bytes::Bytes::from(ids[3].clone().into_bytes()),
    ));
    items.push((earlier.clone(), bytes::Bytes::from_static(b"0")));
    let results = q.publish_batch(&items).await;
    assert_eq!(results.len(), items.len(), "one result per message");
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let mut got = Vec::new();
    while got.len() < ids.len() + 1 {
        let batch = q.pull_batch(64, SOME_WAIT).await.expect("batch");
        assert!(
            !batch.is_empty(),
            "only {} of {} delivered",
            got.len(),
            ids.len() + 1
        );
        got.extend(batch);
    }
    let order: Vec<&str> = got.iter().map(|d| d.id.as_str()).collect();
    let want: Vec<&str> = std::iter::once(earlier.as_str())
        .chain(ids.iter().map(String::as_str))
        .collect();
    assert_eq!(order, want, "each message once, in publish order");
    for d in &got[1..] {
        assert_eq!(d.payload, d.id.as_bytes(), "payload of {}", d.id);
    }
    for d in got {
        d.ack().await.expect("ack");
    }
    assert_empty(q, "after acking a batch with duplicates").await;
}

pub async fn nak_with_delay_redelivers_later(q: &dyn CommandQueue) {
    let n = id("nak");
    q.publish(&n, b"x").await.expect("publish");
    let d = q.pull(SOME_WAIT).await.expect("pull").expect("first");
    d.nak(Some(Duration::from_millis(800))).await.expect("nak");
    let early = q.pull(Duration::from_millis(200)).await.expect("pull");
    assert!(
        early.is_none(),
        "nak'ed message must wait for its delay, got {early:?}"
    );
    let d = q.pull(SOME_WAIT).await.expect("pull").expect("redelivered");
    assert_eq!((d.id.as_str(), d.delivered), (n.as_str(), 2));
    d.ack().await.expect("ack");
    assert_empty(q, "after nak+ack").await;
}

pub async fn unacked_delivery_is_redelivered_after_ack_wait(q: &dyn CommandQueue) {
    let u = id("unacked");
    q.publish(&u, b"x").await.expect("publish");
    let first = q.pull(SOME_WAIT).await.expect("pull").expect("first");
    // The worker "dies": no ack. After ack_wait the message comes back.
    let again = q
        .pull(SOME_WAIT)
        .await
        .expect("pull")
        .expect("redelivered after ack_wait");
    assert_eq!((again.id.as_str(), again.delivered), (u.as_str(), 2));
    again.ack().await.expect("ack");
    // A late ack of the superseded delivery is harmless.
    first.ack().await.expect("late ack");
    assert_empty(q, "after redelivery+ack").await;
}

pub async fn in_progress_extends_the_ack_wait(q: &dyn CommandQueue) {
    let p = id("progress");
    q.publish(&p, b"x").await.expect("publish");
    let d = q.pull(SOME_WAIT).await.expect("pull").expect("first");
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(600)).await;
        d.in_progress().await.expect("progress");
    }
    // 1.8 s after delivery with a 1 s ack_wait: still ours thanks to the heartbeats.
    let none = q.pull(NONE_WAIT).await.expect("pull");
    assert!(
        none.is_none(),
        "a heartbeating delivery must not be redelivered, got {none:?}"
    );
    d.ack().await.expect("ack");
    assert_empty(q, "after progress+ack").await;
}

pub async fn max_deliver_gives_up(q: &dyn CommandQueue) {
    let m = id("max");
    q.publish(&m, b"x").await.expect("publish");
    for n in 1..=3 {
        let d = q.pull(SOME_WAIT).await.expect("pull").expect("delivery");
        assert_eq!(d.delivered, n);
        d.nak(None).await.expect("nak");
    }
    let none = q.pull(Duration::from_millis(1500)).await.expect("pull");
    assert!(
        none.is_none(),
        "no delivery beyond max_deliver, got {none:?}"
    );
}

pub async fn term_never_redelivers(q: &dyn CommandQueue) {
    let t = id("term");
    q.publish(&t, b"x").await.expect("publish");
    let d = q.pull(SOME_WAIT).await.expect("pull").expect("delivery");
    d.term().await.expect("term");
    let none = q.pull(Duration::from_millis(1500)).await.expect("pull");
    assert!(
        none.is_none(),
        "a terminated message is never redelivered, got {none:?}"
    );
}

pub async fn competing_pullers_get_each_message_once(q: Arc<dyn CommandQueue>) {
    let prefix = id("many");
    let n = 60;
    for i in 0..n {
        q.publish(&format!("{prefix}-{i}"), format!("{i}").as_bytes())
            .await
            .expect("publish");
    }
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let q = q.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(d) = q.pull(Duration::from_millis(500)).await.expect("pull") {
                got.push(d.id.clone());
                d.ack().await.expect("ack");
            }
            got
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("puller"));
    }
    let unique: HashSet<&String> = all.iter().collect();
    assert_eq!(
        all.len(),
        n,
        "every message delivered exactly once: {all:?}"
    );
    assert_eq!(unique.len(), n);
    assert_eq!(q.depth().await.expect("depth"), 0);
}
