//! NATS JetStream backend: a work-queue stream and one durable pull consumer shared by all
//! workers. Publishing sets `Nats-Msg-Id` to the command id, so a re-published command
//! (e.g. the outbox re-sending after a crash) is delivered once within the dedupe window.

use crate::{Acker, CommandQueue, Delivery, QueueConfig, QueueError};
use async_nats::jetstream::{self, AckKind, consumer::PullConsumer, stream::RetentionPolicy};
use async_trait::async_trait;
use futures_util::StreamExt;
use std::time::Duration;

const MSG_ID: &str = "Nats-Msg-Id";

fn unavailable(e: impl std::fmt::Display) -> QueueError {
    QueueError::Unavailable(e.to_string())
}

/// A JetStream-backed command queue.
pub struct NatsQueue {
    client: async_nats::Client,
    js: jetstream::Context,
    subject: String,
    consumer: PullConsumer,
    cfg: QueueConfig,
}

impl NatsQueue {
    /// Connect to `url` and create (or reuse) stream `name` with its durable consumer.
    pub async fn connect(url: &str, name: &str, cfg: QueueConfig) -> Result<Self, QueueError> {
        Self::connect_to(&crate::NatsConnect::url(url), name, cfg).await
    }

    /// [`NatsQueue::connect`] with credentials ([`crate::NatsConnect`]).
    pub async fn connect_to(
        nats: &crate::NatsConnect,
        name: &str,
        cfg: QueueConfig,
    ) -> Result<Self, QueueError> {
        let client = nats.connect().await?;
        let js = jetstream::new(client.clone());
        let subject = format!("{name}.commands");
        let stream = js
            .get_or_create_stream(jetstream::stream::Config {
                name: name.to_owned(),
                subjects: vec![subject.clone()],
                retention: RetentionPolicy::WorkQueue,
                duplicate_window: Duration::from_secs(120),
                ..Default::default()
            })
            .await
            .map_err(unavailable)?;
        let consumer: PullConsumer = stream
            .get_or_create_consumer(
                "workers",
                jetstream::consumer::pull::Config {
                    durable_name: Some("workers".into()),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: cfg.ack_wait,
                    max_deliver: if cfg.max_deliver == 0 {
                        -1
                    } else {
                        i64::from(cfg.max_deliver)
                    },
                    // Backoff is applied on nak by this client, so both backends agree on it.
                    ..Default::default()
                },
            )
            .await
            .map_err(unavailable)?;
        Ok(NatsQueue {
            client,
            js,
            subject,
            consumer,
            cfg,
        })
    }

    /// The connection this queue's deliveries are acknowledged on: flush it before the
    /// process exits, or acks still in its buffer are lost (and their messages redelivered).
    pub fn client(&self) -> async_nats::Client {
        self.client.clone()
    }

    /// Delete stream `name` (tests clean up after themselves).
    pub async fn delete(url: &str, name: &str) -> Result<(), QueueError> {
        let client = async_nats::connect(url).await.map_err(unavailable)?;
        jetstream::new(client)
            .delete_stream(name)
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}

struct NatsAcker {
    msg: jetstream::Message,
    delivered: u32,
    cfg: QueueConfig,
}

impl NatsAcker {
    async fn send(&self, kind: AckKind) -> Result<(), QueueError> {
        self.msg.ack_with(kind).await.map_err(unavailable)
    }
}

#[async_trait]
impl Acker for NatsAcker {
    async fn ack(&self) -> Result<(), QueueError> {
        // Fire and forget, no confirmation round trip: a lost ack only means a redelivery,
        // and a redelivered command that is already done is answered `Done` by its claim
        // and never runs again (the claim protocol, not the queue, makes a run happen once).
        self.msg.ack().await.map_err(unavailable)
    }
    async fn nak(&self, delay: Option<Duration>) -> Result<(), QueueError> {
        let d = delay.unwrap_or_else(|| self.cfg.backoff_for(self.delivered));
        self.send(AckKind::Nak((!d.is_zero()).then_some(d))).await
    }
    async fn in_progress(&self) -> Result<(), QueueError> {
        self.send(AckKind::Progress).await
    }
    async fn term(&self) -> Result<(), QueueError> {
        self.send(AckKind::Term).await
    }
}

#[async_trait]
impl CommandQueue for NatsQueue {
    async fn publish(&self, id: &str, payload: &[u8]) -> Result<(), QueueError> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(MSG_ID, id);
        let ack = self
            .js
            .publish_with_headers(self.subject.clone(), headers, payload.to_vec().into())
            .await
            .map_err(unavailable)?;
        ack.await.map_err(unavailable)?;
        Ok(())
    }

    async fn publish_batch(&self, items: &[(String, bytes::Bytes)]) -> Vec<Result<(), QueueError>> {
        // Every message is handed to the client before any confirmation is awaited, so the
        // client writes the batch at once and the server stores it from one read, instead of
        // a write, a read and a wake-up per message.
        let mut acks = Vec::with_capacity(items.len());
        for (id, payload) in items {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(MSG_ID, id.as_str());
            acks.push(
                self.js
                    .publish_with_headers(self.subject.clone(), headers, payload.clone())
                    .await,
            );
        }
        futures_util::future::join_all(acks.into_iter().map(|sent| async move {
            sent.map_err(unavailable)?.await.map_err(unavailable)?;
            Ok(())
        }))
        .await
    }

    async fn pull(&self, wait: Duration) -> Result<Option<Delivery>, QueueError> {
        Ok(self.pull_batch(1, wait).await?.into_iter().next())
    }

    async fn pull_batch(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, QueueError> {
        // A no-wait fetch with an expiry: the server answers with what is available (up to
        // `max`) at once, and waits up to `wait` only while nothing is.
        let mut batch = self
            .consumer
            .fetch()
            .max_messages(max.max(1))
            .expires(wait.max(Duration::from_millis(10)))
            .messages()
            .await
            .map_err(unavailable)?;
        let mut out = Vec::new();
        while let Some(next) = batch.next().await {
            let msg = next.map_err(unavailable)?;
            let delivered = msg.info().map(|i| i.delivered.max(1) as u32).unwrap_or(1);
            let id = msg
                .headers
                .as_ref()
                .and_then(|h| h.get(MSG_ID))
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default();
            let payload = msg.payload.to_vec();
            let acker = Box::new(NatsAcker {
                msg,
                delivered,
                cfg: self.cfg.clone(),
            });
            out.push(Delivery {
                id,
                payload,
                delivered,
                acker,
            });
        }
        Ok(out)
    }

    async fn depth(&self) -> Result<u64, QueueError> {
        let mut c = self.consumer.clone();
        let info = c.info().await.map_err(unavailable)?;
        Ok(info.num_pending + info.num_ack_pending as u64)
    }
}
