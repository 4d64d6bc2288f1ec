//! The command queue, defined in JetStream's vocabulary so that the in-process backend has
//! exactly the semantics NATS gives the distributed one:
//!
//! * a message is delivered to one puller at a time and stays *in flight* until acked;
//! * not acked within `ack_wait` → redelivered (the delivery count grows);
//! * `nak(delay)` → redelivered after the delay (or the configured backoff step);
//! * `in_progress` → the ack_wait clock restarts (long blocks);
//! * `term` → never delivered again (poison pill);
//! * after `max_deliver` deliveries it is not delivered again;
//! * publishing the same id twice (within the dedupe window) delivers once.
//!
//! Both backends pass [`conformance`].

use async_trait::async_trait;
use std::time::Duration;

pub mod conformance;
mod connect;
mod memory;
mod nats;

pub use connect::NatsConnect;
pub use memory::MemoryQueue;
pub use nats::NatsQueue;

/// Queue failures.
#[derive(Debug, Clone, thiserror::Error)]
pub enum QueueError {
    #[error("queue unavailable: {0}")]
    Unavailable(String),
    #[error("queue error: {0}")]
    Other(String),
}

/// Delivery policy shared by both backends.
#[derive(Clone, Debug, PartialEq)]
pub struct QueueConfig {
    /// How long a delivery may stay unacknowledged before it is redelivered.
    pub ack_wait: Duration,
    /// Deliveries after which a message is given up (0 = unlimited).
    pub max_deliver: u32,
    /// Redelivery delays by delivery number for `nak(None)` (last entry repeats).
    pub backoff: Vec<Duration>,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            ack_wait: Duration::from_secs(30),
            max_deliver: 10,
            backoff: Vec::new(),
        }
    }
}

impl QueueConfig {
    /// Delay before redelivering after the `delivered`-th delivery was nak'ed without a delay.
    pub fn backoff_for(&self, delivered: u32) -> Duration {
        if self.backoff.is_empty() {
            return Duration::ZERO;
        }
        let i = (delivered.max(1) as usize - 1).min(self.backoff.len() - 1);
        self.backoff[i]
    }
}

/// One delivery of a message.
pub struct Delivery {
    /// The publisher's id (the command id): the dedupe key.
    pub id: String,
    pub payload: Vec<u8>,
    /// 1 for the first delivery, 2 for the first redelivery, …
    pub delivered: u32,
    acker: Box<dyn Acker>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("id", &self.id)
            .field("delivered", &self.delivered)
            .finish()
    }
}

impl Delivery {
    /// Done: never deliver again.
    pub async fn ack(self) -> Result<(), QueueError> {
        self.acker.ack().await
    }
    /// Not now: redeliver after `delay` (None = the configured backoff).
    pub async fn nak(self, delay: Option<Duration>) -> Result<(), QueueError> {
        self.acker.nak(delay).await
    }
    /// Still working: restart the ack_wait clock.
    pub async fn in_progress(&self) -> Result<(), QueueError> {
        self.acker.in_progress().await
    }
    /// Poison: never deliver again, without success.
    pub async fn term(self) -> Result<(), QueueError> {
        self.acker.term().await
    }
}

/// Backend side of a delivery's acknowledgements.
#[async_trait]
pub(crate) trait Acker: Send + Sync {
    async fn ack(&self) -> Result<(), QueueError>;
    async fn nak(&self, delay: Option<Duration>) -> Result<(), QueueError>;
    async fn in_progress(&self) -> Result<(), QueueError>;
    async fn term(&self) -> Result<(), QueueError>;
}

/// A work queue of commands.
#[async_trait]
pub trait CommandQueue: Send + Sync + 'static {
    /// Enqueue `payload` under `id` (deduplicated by id).
    async fn publish(&self, id: &str, payload: &[u8]) -> Result<(), QueueError>;
    /// Enqueue several messages, each exactly as [`publish`](Self::publish) would: one result
    /// per message, in order. A backend may send them together (JetStream gets the batch in
    /// one write and confirms each message).
    async fn publish_batch(&self, items: &[(String, bytes::Bytes)]) -> Vec<Result<(), QueueError>> {
        let mut out = Vec::with_capacity(items.len());
        for (id, payload) in items {
            out.push(self.publish(id, payload).await);
        }
        out
    }
    /// The next deliverable message, waiting up to `wait`.
    async fn pull(&self, wait: Duration) -> Result<Option<Delivery>, QueueError>;
    /// Up to `max` deliverable messages: returns as soon as at least one is available
    /// (waiting up to `wait` for the first), without waiting to fill the batch.
    async fn pull_batch(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, QueueError> {
        let mut out = Vec::new();
        if let Some(d) = self.pull(wait).await? {
            out.push(d);
            while out.len() < max {
                match self.pull(Duration::ZERO).await? {
                    Some(d) => out.push(d),
                    None => break,
                }
            }
        }
        Ok(out)
    }
    /// Messages not yet acknowledged (waiting or in flight): the consumer lag autoscalers read.
    async fn depth(&self) -> Result<u64, QueueError>;
}
