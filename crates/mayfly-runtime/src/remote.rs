//! Distributed mode: the orchestrator publishes commands to a NATS JetStream work queue and
//! answers workers over NATS request/reply; `mayfly worker` processes pull, claim, run and
//! complete through the same [`Coordinator`] contract the in-process workers use.
//!
//! The orchestrator stays the single appender of the log: a remote worker never touches the
//! store. It needs only NATS (and the master key, if steps use the keychain — sealed values
//! travel to it and are opened only there).
//!
//! Subjects, under a prefix (the stream name, `mayfly` by default):
//! `P.commands` (the JetStream work queue), `P.rpc.claim`, `P.rpc.complete`, `P.rpc.extend`
//! (fire and forget), `P.rpc.secret`, `P.rpc.playbook`. Payloads are JSON.

use crate::worker::{Coordinator, Settle};
use crate::{Block, Claim, Completion, Hydrated, RuntimeError, RuntimeHandle};
use futures_util::StreamExt;
use mayfly_dsl::{ParseOptions, Playbook};
use mayfly_queue::{CommandQueue, Delivery, NatsQueue};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio::task::{JoinHandle, JoinSet};

/// Publishes in flight at once (JetStream acks each publish; pipelining them is what makes
/// fan-out fast).
const MAX_INFLIGHT_PUBLISHES: usize = 512;
/// How long a worker waits for the orchestrator's answer.
const RPC_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Serialize, Deserialize)]
struct ClaimReq {
    block: Block,
    worker: String,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "claim", rename_all = "snake_case")]
enum ClaimWire {
    Granted {
        attempt: u32,
        tenant: String,
        digest: String,
        extra_vars: Vec<String>,
        context: Map<String, Value>,
        lease_ms: u64,
    },
    Done,
    Busy {
        retry_ms: u64,
    },
}

#[derive(Serialize, Deserialize)]
struct ExtendReq {
    command_id: String,
    attempt: u32,
}

#[derive(Serialize, Deserialize)]
struct SecretReq {
    command_id: String,
    attempt: u32,
    alias: String,
}

#[derive(Serialize, Deserialize)]
struct PlaybookReq {
    digest: String,
}

#[derive(Serialize, Deserialize)]
struct PlaybookWire {
    source_name: String,
    content: String,
}

/// A refusal, as it crosses the wire.
#[derive(Serialize, Deserialize, Debug)]
struct WireError {
    code: String,
    message: String,
}

impl From<&RuntimeError> for WireError {
    fn from(e: &RuntimeError) -> Self {
        let code = match e {
            RuntimeError::StaleClaim(_) => "stale_claim",
            RuntimeError::Unknown(_) | RuntimeError::Ended(_) => "not_live",
            RuntimeError::Closed => "closed",
            RuntimeError::Store(_) => "store",
            _ => "invalid",
        };
        WireError {
            code: code.into(),
            message: e.to_string(),
        }
    }
}

impl From<WireError> for RuntimeError {
    fn from(e: WireError) -> Self {
        match e.code.as_str() {
            "stale_claim" | "not_live" => RuntimeError::StaleClaim(e.message),
            "closed" => RuntimeError::Closed,
            "store" => RuntimeError::Store(e.message),
            _ => RuntimeError::Invalid(e.message),
        }
    }
}

type Answer<T> = Result<T, WireError>;

fn encode<T: Serialize>(v: &T) -> bytes::Bytes {
    // Serialising these plain data types cannot fail; an empty body is answered as an error.
    serde_json::to_vec(v).unwrap_or_default().into()
}

/// Serve workers' requests for `handle` under `prefix` until the connection closes.
pub async fn serve(
    handle: RuntimeHandle,
    client: async_nats::Client,
    prefix: &str,
) -> Result<JoinHandle<()>, RuntimeError> {
    let mut sub = client
        .queue_subscribe(format!("{prefix}.rpc.*"), format!("{prefix}-orchestrator"))
        .await
        .map_err(|e| RuntimeError::Invalid(format!("subscribing to NATS: {e}")))?;
    Ok(tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            let handle = handle.clone();
            let client = client.clone();
            tokio::spawn(async move {
                let verb = msg.subject.rsplit('.').next().unwrap_or("").to_owned();
                let body = answer(&handle, &verb, &msg.payload).await;
                if let (Some(reply), Some(body)) = (msg.reply, body)
                    && let Err(e) = client.publish(reply, body).await
                {
                    tracing::warn!(error = %e, verb, "could not answer a worker");
                }
            });
        }
    }))
}

async fn answer(h: &RuntimeHandle, verb: &str, payload: &[u8]) -> Option<bytes::Bytes> {
    fn bad<T: Serialize>(e: serde_json::Error) -> Option<bytes::Bytes> {
        let a: Answer<T> = Err(WireError {
            code: "invalid".into(),
            message: format!("malformed request: {e}"),
        });
        Some(encode(&a))
    }
    match verb {
        "claim" => {
            let req: ClaimReq = match serde_json::from_slice(payload) {
                Ok(r) => r,
                Err(e) => return bad::<ClaimWire>(e),
            };
            let a: Answer<ClaimWire> = match h.claim(req.block, &req.worker).await {
                Ok(Claim::Granted(x)) => Ok(ClaimWire::Granted {
                    attempt: x.attempt,
                    tenant: x.tenant,
                    digest: x.playbook.digest.clone(),
                    extra_vars: x
                        .context
                        .get("workload")
                        .and_then(Value::as_object)
                        .map(|w| w.keys().cloned().collect())
                        .unwrap_or_default(),
                    context: x.context,
                    lease_ms: x.lease.as_millis() as u64,
                }),
                Ok(Claim::Done) => Ok(ClaimWire::Done),
                Ok(Claim::Busy(d)) => Ok(ClaimWire::Busy {
                    retry_ms: d.as_millis() as u64,
                }),
                Err(e) => Err((&e).into()),
            };
            Some(encode(&a))
        }
        "complete" => {
            let c: Completion = match serde_json::from_slice(payload) {
                Ok(c) => c,
                Err(e) => return bad::<()>(e),
            };
            let a: Answer<()> = h.complete(c).await.map_err(|e| (&e).into());
            Some(encode(&a))
        }
        "extend" => {
            if let Ok(r) = serde_json::from_slice::<ExtendReq>(payload) {
                h.extend(&r.command_id, r.attempt);
            }
            None
        }
        "secret" => {
            let r: SecretReq = match serde_json::from_slice(payload) {
                Ok(r) => r,
                Err(e) => return bad::<Option<String>>(e),
            };
            // Only a worker holding a live claim gets its execution's tenant's values.
            let a: Answer<Option<String>> = match h.claim_tenant(&r.command_id, r.attempt).await {
                None => Err(WireError {
                    code: "stale_claim".into(),
                    message: format!(
                        "no live claim {}#{} (keychain access refused)",
                        r.command_id, r.attempt
                    ),
                }),
                Some(tenant) => h
                    .store
                    .get_secret(&tenant, &r.alias)
                    .await
                    .map_err(|e| (&RuntimeError::from(e)).into()),
            };
            Some(encode(&a))
        }
        "playbook" => {
            let r: PlaybookReq = match serde_json::from_slice(payload) {
                Ok(r) => r,
                Err(e) => return bad::<Option<PlaybookWire>>(e),
            };
            let a: Answer<Option<PlaybookWire>> = match h.playbook(&r.digest).await {
                Ok(p) => Ok(p.map(|p| PlaybookWire {
                    source_name: p.source_name,
                    content: p.content,
                })),
                Err(e) => Err((&e).into()),
            };
            Some(encode(&a))
        }
        _ => None,
    }
}

/// Health of the dispatch path, shared with whoever reports status.
#[derive(Clone, Default)]
pub struct QueueHealth(Arc<AtomicBool>);

impl QueueHealth {
    /// False while publishing to the queue fails (commands are retried, not lost).
    pub fn up(&self) -> bool {
        !self.0.load(Ordering::Relaxed)
    }
    fn set(&self, up: bool) {
        self.0.store(!up, Ordering::Relaxed);
        metrics::gauge!("mayfly_queue_up").set(if up { 1.0 } else { 0.0 });
    }
}

/// Publish every dispatched block to `queue`, retrying each until JetStream acknowledges
/// it. Message ids are unique per dispatch (the dedupe window only absorbs a retried
/// publish whose ack was lost; a later re-dispatch of the same command must get through).
pub(crate) async fn publisher(
    mut rx: mpsc::UnboundedReceiver<Block>,
    queue: Arc<dyn CommandQueue>,
    health: QueueHealth,
) {
    let nonce = uuid::Uuid::now_v7().simple().to_string();
    let mut n: u64 = 0;
    let mut inflight = JoinSet::new();
    health.set(true);
    loop {
        tokio::select! {
            b = rx.recv(), if inflight.len() < MAX_INFLIGHT_PUBLISHES => {
                let Some(b) = b else { break };
                n += 1;
                let id = format!("{}.{nonce}.{n}", b.command_id);
                let payload = encode(&b);
                let (queue, health) = (queue.clone(), health.clone());
                inflight.spawn(async move {
                    let mut pause = Duration::from_millis(100);
                    loop {
                        match queue.publish(&id, &payload).await {
                            Ok(()) => {
                                health.set(true);
                                return;
                            }
                            Err(e) => {
                                health.set(false);
                                tracing::warn!(error = %e, command = %id, "publish failed; retrying");
                                tokio::time::sleep(pause).await;
                                pause = (pause * 2).min(Duration::from_secs(5));
                            }
                        }
                    }
                });
            }
            Some(_) = inflight.join_next(), if !inflight.is_empty() => {}
        }
    }
    while inflight.join_next().await.is_some() {}
}

/// Export the queue's consumer lag (waiting + unacknowledged) for autoscalers.
pub(crate) async fn lag_reporter(queue: Arc<dyn CommandQueue>, health: QueueHealth) {
    let mut t = tokio::time::interval(Duration::from_secs(2));
    loop {
        t.tick().await;
        match queue.depth().await {
            Ok(d) => {
                metrics::gauge!("mayfly_queue_consumer_lag").set(d as f64);
            }
            Err(e) => {
                health.set(false);
                tracing::warn!(error = %e, "queue depth unavailable");
            }
        }
    }
}

/// A worker's view of a remote orchestrator: deliveries from JetStream, claims and
/// completions over request/reply.
#[derive(Clone)]
pub struct RemoteCoordinator {
    inner: Arc<Inner>,
}

/// (digest, extra workload keys): what a parsed playbook depends on.
type PlaybookKey = (String, Vec<String>);

struct Inner {
    client: async_nats::Client,
    /// Idle slots ask the fetcher for a delivery here.
    wants: mpsc::UnboundedSender<oneshot::Sender<(Block, Delivery)>>,
    fetcher: JoinHandle<()>,
    prefix: String,
    /// Parsed playbooks by (digest, extra workload keys): workers fetch each version once.
    playbooks: Mutex<HashMap<PlaybookKey, Arc<Playbook>>>,
}

impl RemoteCoordinator {
    /// Connect to the queue `prefix` on the NATS server at `url`.
    pub async fn connect(
        url: &str,
        prefix: &str,
        cfg: mayfly_queue::QueueConfig,
    ) -> Result<Self, RuntimeError> {
        let client = async_nats::ConnectOptions::new()
            .request_timeout(Some(RPC_TIMEOUT))
            .connect(url)
            .await
            .map_err(|e| RuntimeError::Invalid(format!("connecting to NATS at {url}: {e}")))?;
        let queue = NatsQueue::connect(url, prefix, cfg)
            .await
            .map_err(|e| RuntimeError::Invalid(e.to_string()))?;
        let (wants, rx) = mpsc::unbounded_channel();
        let fetcher = tokio::spawn(fetcher(queue, rx));
        Ok(RemoteCoordinator {
            inner: Arc::new(Inner {
                client,
                wants,
                fetcher,
                prefix: prefix.to_owned(),
                playbooks: Mutex::new(HashMap::new()),
            }),
        })
    }

    async fn call<Req: Serialize, T: for<'de> Deserialize<'de>>(
        &self,
        verb: &str,
        req: &Req,
    ) -> Result<T, RuntimeError> {
        let subject = format!("{}.rpc.{verb}", self.inner.prefix);
        let began = std::time::Instant::now();
        let msg = self
            .inner
            .client
            .request(subject, encode(req))
            .await
            // No responder or no answer: the orchestrator is down or restarting.
            .map_err(|e| {
                tracing::debug!(error = %e, verb, "orchestrator unreachable");
                RuntimeError::Closed
            })?;
        metrics::histogram!("mayfly_worker_rpc_seconds", "verb" => verb.to_owned())
            .record(began.elapsed().as_secs_f64());
        let a: Answer<T> = serde_json::from_slice(&msg.payload)
            .map_err(|e| RuntimeError::Invalid(format!("malformed answer to {verb}: {e}")))?;
        a.map_err(RuntimeError::from)
    }

    async fn playbook(
        &self,
        digest: &str,
        extra_vars: Vec<String>,
    ) -> Result<Arc<Playbook>, RuntimeError> {
        let key = (digest.to_owned(), extra_vars);
        if let Some(pb) = self.inner.playbooks.lock().await.get(&key) {
            return Ok(pb.clone());
        }
        let got: Option<PlaybookWire> = self
            .call(
                "playbook",
                &PlaybookReq {
                    digest: digest.to_owned(),
                },
            )
            .await?;
        let p = got.ok_or_else(|| RuntimeError::Invalid(format!("unknown playbook {digest}")))?;
        let pb = mayfly_dsl::parse(
            &p.source_name,
            &p.content,
            &ParseOptions {
                extra_vars: key.1.clone(),
            },
        )
        .map_err(|e| RuntimeError::Invalid(e.to_string()))?;
        if pb.digest != digest {
            return Err(RuntimeError::Corrupt(format!(
                "playbook {digest} arrived with digest {}",
                pb.digest
            )));
        }
        let pb = Arc::new(pb);
        let mut cache = self.inner.playbooks.lock().await;
        if cache.len() > 1024 {
            cache.clear();
        }
        cache.insert(key, pb.clone());
        Ok(pb)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.fetcher.abort();
    }
}

/// One puller per worker process: it asks JetStream for exactly as many messages as there
/// are idle slots (one request for all of them), so no message waits in a local buffer
/// while its ack_wait runs, and an idle worker costs one pending pull request.
async fn fetcher(
    queue: NatsQueue,
    mut wants: mpsc::UnboundedReceiver<oneshot::Sender<(Block, Delivery)>>,
) {
    let mut idle: std::collections::VecDeque<oneshot::Sender<(Block, Delivery)>> =
        std::collections::VecDeque::new();
    let mut pause = Duration::from_millis(100);
    loop {
        if idle.is_empty() {
            match wants.recv().await {
                Some(w) => idle.push_back(w),
                None => return,
            }
        }
        while let Ok(w) = wants.try_recv() {
            idle.push_back(w);
        }
        idle.retain(|w| !w.is_closed());
        if idle.is_empty() {
            continue;
        }
        let batch = match queue.pull_batch(idle.len(), Duration::from_secs(5)).await {
            Ok(b) => {
                pause = Duration::from_millis(100);
                b
            }
            Err(e) => {
                tracing::warn!(error = %e, "queue unavailable; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        for d in batch {
            let b = match serde_json::from_slice::<Block>(&d.payload) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(error = %e, id = %d.id, "malformed command; terminating it");
                    let _ = d.term().await;
                    continue;
                }
            };
            let mut item = (b, d);
            loop {
                match idle.pop_front() {
                    Some(w) => match w.send(item) {
                        Ok(()) => break,
                        // That slot is gone: offer the delivery to the next one.
                        Err(back) => item = back,
                    },
                    None => {
                        // Every slot that asked is gone: give the delivery back at once.
                        let _ = item.1.nak(None).await;
                        break;
                    }
                }
            }
        }
    }
}

impl Coordinator for RemoteCoordinator {
    type Ticket = Delivery;

    async fn next(&self) -> Option<(Block, Delivery)> {
        let (tx, rx) = oneshot::channel();
        self.inner.wants.send(tx).ok()?;
        rx.await.ok()
    }

    async fn claim(&self, block: Block, worker: &str) -> Result<Claim, RuntimeError> {
        let req = ClaimReq {
            block: block.clone(),
            worker: worker.to_owned(),
        };
        match self.call::<_, ClaimWire>("claim", &req).await? {
            ClaimWire::Done => Ok(Claim::Done),
            ClaimWire::Busy { retry_ms } => Ok(Claim::Busy(Duration::from_millis(retry_ms))),
            ClaimWire::Granted {
                attempt,
                tenant,
                digest,
                extra_vars,
                context,
                lease_ms,
            } => {
                let playbook = self.playbook(&digest, extra_vars).await?;
                Ok(Claim::Granted(Box::new(Hydrated {
                    block,
                    tenant,
                    attempt,
                    playbook,
                    context,
                    lease: Duration::from_millis(lease_ms),
                })))
            }
        }
    }

    async fn heartbeat(&self, ticket: &Delivery, command_id: &str, attempt: u32) {
        if let Err(e) = ticket.in_progress().await {
            tracing::warn!(error = %e, command = command_id, "in-progress signal failed");
        }
        let req = ExtendReq {
            command_id: command_id.to_owned(),
            attempt,
        };
        let subject = format!("{}.rpc.extend", self.inner.prefix);
        if let Err(e) = self.inner.client.publish(subject, encode(&req)).await {
            tracing::warn!(error = %e, command = command_id, "heartbeat failed");
        }
    }

    async fn complete(&self, c: Completion) -> Result<(), RuntimeError> {
        self.call("complete", &c).await
    }

    async fn settle(&self, ticket: Delivery, settle: Settle) {
        // Off the slot's path: the slot pulls its next block while JetStream confirms. A
        // lost ack means a redelivery, which the claim protocol answers with `done`.
        tokio::spawn(async move {
            let r = match settle {
                Settle::Ack => ticket.ack().await,
                Settle::Retry(d) => ticket.nak(Some(d)).await,
            };
            if let Err(e) = r {
                tracing::warn!(error = %e, "could not settle a delivery");
            }
        });
    }

    async fn sealed_secret(&self, h: &Hydrated, alias: &str) -> Result<Option<String>, String> {
        let req = SecretReq {
            command_id: h.block.command_id.clone(),
            attempt: h.attempt,
            alias: alias.to_owned(),
        };
        self.call("secret", &req).await.map_err(|e| e.to_string())
    }
}
