//! Distributed mode: the orchestrator publishes commands to a NATS JetStream work queue and
//! answers workers over NATS request/reply; `mayfly worker` processes pull, claim, run and
//! complete through the same [`Coordinator`] contract the in-process workers use.
//!
//! The orchestrator stays the single appender of the log: a remote worker never touches the
//! store. It needs only NATS (and the master key, if steps use the keychain — sealed values
//! travel to it and are opened only there).
//!
//! A deployment's channel is scoped by its log's identity ([`Channel`]): under the prefix
//! `P = {queue name}_{log id}` (also the stream's name) the subjects are `P.commands` (the
//! JetStream work queue), `P.rpc.claims`, `P.rpc.completes`, `P.rpc.context`, `P.rpc.extend`
//! (fire and forget), `P.rpc.secret`, `P.rpc.child`, `P.rpc.playbook`, `P.rpc.agent`; a
//! worker finds its server's log by asking `{queue name}.hello`. Every message is framed
//! with an HMAC under the log's key ([`mayfly_trust::channel`]): what does not verify is
//! refused (a command is terminated, a request is not answered) and counted. Payloads are
//! JSON. Claims and completions travel in batches: a worker's slots that ask at once share
//! one round trip (a fan-out is bound by message count, not bytes).

use crate::worker::{Coordinator, Settle};
use crate::{Block, Claim, Completion, Hydrated, RuntimeError, RuntimeHandle};
use futures_util::StreamExt;
use mayfly_dsl::{ParseOptions, Playbook};
use mayfly_queue::{CommandQueue, Delivery, NatsQueue, QueueError};
use mayfly_trust::channel::{ChannelKey, Kind, LogKey};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio::task::{JoinHandle, JoinSet};

/// Publish batches in flight at once (JetStream acks each message; pipelining them is what
/// makes fan-out fast).
const MAX_INFLIGHT_PUBLISHES: usize = 512;
/// Most blocks in one publish batch.
const MAX_PUBLISH_BATCH: usize = 256;
/// Most blocks in one queue message, and most bytes of blocks in one (a block larger than
/// that travels alone). Small enough that one worker's share of a dispatch stays a share.
const MAX_GROUP: usize = 16;
const MAX_GROUP_BYTES: usize = 64 * 1024;
/// How long a worker waits for the orchestrator's answer.
const RPC_TIMEOUT: Duration = Duration::from_secs(10);
/// Most claims or completions in one batched request.
const MAX_RPC_BATCH: usize = 64;
/// Batched requests of one verb in flight per worker process: while they are out, the next
/// batch fills.
const RPC_BATCHES_IN_FLIGHT: usize = 2;

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
        /// None when the batch's answer had no room for it: fetch it with `context`.
        context: Option<Map<String, Value>>,
        lease_ms: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limits: Option<Box<mayfly_types::Limits>>,
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

/// The context of a live claim (its answer had no room for it).
#[derive(Serialize, Deserialize)]
struct ContextReq {
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
struct ChildReq {
    command_id: String,
    attempt: u32,
    path: String,
    input: Map<String, Value>,
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
            RuntimeError::TooLarge(_) => "too_large",
            RuntimeError::Fenced(_) => "epoch_mismatch",
            RuntimeError::NotOwned(_) => "not_owned",
            RuntimeError::Child(info) => {
                return WireError {
                    code: info.code.clone(),
                    message: info.message.clone(),
                };
            }
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
            "too_large" => RuntimeError::TooLarge(e.message),
            "epoch_mismatch" => RuntimeError::Fenced(e.message),
            "not_owned" => RuntimeError::NotOwned(e.message),
            c if c.starts_with("child_") => {
                RuntimeError::Child(mayfly_types::ErrorInfo::new(c, e.message))
            }
            _ => RuntimeError::Invalid(e.message),
        }
    }
}

type Answer<T> = Result<T, WireError>;

/// A log's command channel on NATS: names scoped by the log's identity, every message
/// authenticated under the log's key.
#[derive(Clone, Debug)]
pub struct Channel {
    name: String,
    key: LogKey,
    stats: Arc<ChannelStats>,
    /// Requests seen lately (by tag), so a captured one is never acted on twice.
    seen: Arc<std::sync::Mutex<Seen>>,
}

/// How far a request's stamp may be from the server's clock (workers' and servers' clocks
/// must agree within it). A request is remembered long enough that it cannot come back
/// inside this window.
pub const REQUEST_WINDOW_MS: u64 = 60_000;

/// How long a worker waits for a verified answer to a request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Tags of requests opened in the last three windows (rotated every window: a request is
/// remembered for at least two, and its stamp admits it for at most two after it arrived).
#[derive(Debug, Default)]
struct Seen {
    generations: [std::collections::HashSet<[u8; 16]>; 3],
    rotated_ms: u64,
}

impl Seen {
    /// True when `tag` is new (and is now remembered).
    fn first(&mut self, tag: [u8; 16], now: u64) -> bool {
        if now.saturating_sub(self.rotated_ms) >= REQUEST_WINDOW_MS {
            self.generations.rotate_right(1);
            self.generations[0].clear();
            self.rotated_ms = now;
        }
        if self.generations.iter().any(|g| g.contains(&tag)) {
            return false;
        }
        self.generations[0].insert(tag)
    }
}

/// A request's binding: its verb and the inbox its answer goes to (none: fire and forget).
fn request_binding(verb: &str, reply: Option<&str>) -> String {
    format!("{verb}\n{}", reply.unwrap_or(""))
}

/// Refusals on a channel (exported as `mayfly_channel_refused_total{reason}` too): what
/// `/v1/status` shows.
#[derive(Debug, Default)]
pub struct ChannelStats {
    refused: std::sync::atomic::AtomicU64,
    last: std::sync::Mutex<Option<(u64, String)>>,
}

/// The channel as status reports it.
#[derive(Clone, Debug, Serialize)]
pub struct ChannelReading {
    pub log_id: String,
    pub stream: String,
    pub refused: u64,
    /// (unix ms, what was refused and why)
    pub last_refusal: Option<(u64, String)>,
}

impl ChannelStats {
    pub(crate) fn refuse(&self, reason: &'static str, what: String) {
        metrics::counter!("mayfly_channel_refused_total", "reason" => reason).increment(1);
        tracing::warn!(reason, "{what}");
        self.refused.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut l) = self.last.lock() {
            *l = Some((mayfly_types::now_ms(), format!("{reason}: {what}")));
        }
    }
}

impl Channel {
    pub(crate) fn refuse(&self, reason: &'static str, what: String) {
        self.stats.refuse(reason, what);
    }

    /// The channel of queue `name` for the log `key` belongs to.
    pub fn new(name: &str, key: LogKey) -> Channel {
        Channel {
            name: name.to_owned(),
            key,
            stats: Default::default(),
            seen: Default::default(),
        }
    }

    /// A `verb` request, stamped with this clock and bound to the inbox `reply` its answer
    /// goes to.
    pub(crate) fn seal_request(&self, verb: &str, reply: Option<&str>, body: &[u8]) -> Vec<u8> {
        let mut stamped = Vec::with_capacity(8 + body.len());
        stamped.extend_from_slice(&mayfly_types::now_ms().to_be_bytes());
        stamped.extend_from_slice(body);
        self.key
            .seal(Kind::Request, &request_binding(verb, reply), &stamped)
    }

    /// The body of a `verb` request that came with reply inbox `reply`, if it verifies, is
    /// stamped within [`REQUEST_WINDOW_MS`] of this clock and was not seen before; else the
    /// refusal's reason and text.
    pub(crate) fn open_request<'a>(
        &self,
        verb: &str,
        reply: Option<&str>,
        frame: &'a [u8],
    ) -> Result<&'a [u8], (&'static str, String)> {
        let stamped = self
            .key
            .open(Kind::Request, &request_binding(verb, reply), frame)
            .map_err(|e| {
                (
                    "unauthenticated_request",
                    format!("`{verb}` request not answered: {e}"),
                )
            })?;
        let (stamp, body) = stamped.split_at_checked(8).ok_or((
            "unauthenticated_request",
            format!("`{verb}` request not answered: no stamp"),
        ))?;
        let stamp = u64::from_be_bytes(stamp.try_into().unwrap_or_default());
        let now = mayfly_types::now_ms();
        if now.abs_diff(stamp) > REQUEST_WINDOW_MS {
            return Err((
                "stale_request",
                format!(
                    "`{verb}` request not answered: stamped {} s from this server's clock (replayed, or the clocks differ by more than {} s)",
                    now.abs_diff(stamp) / 1000,
                    REQUEST_WINDOW_MS / 1000
                ),
            ));
        }
        let tag = mayfly_trust::channel::tag_prefix(frame).unwrap_or_default();
        let first = self
            .seen
            .lock()
            .map(|mut s| s.first(tag, now))
            .unwrap_or(true);
        if !first {
            return Err((
                "replayed_request",
                format!("`{verb}` request not answered: it was answered before (replayed)"),
            ));
        }
        Ok(body)
    }

    /// Send a `verb` request on `subject` and wait for the first answer that verifies;
    /// answers that do not (anyone may publish to an inbox) are counted and skipped.
    pub(crate) async fn ask(
        &self,
        client: &async_nats::Client,
        subject: String,
        verb: &str,
        body: &[u8],
    ) -> Result<bytes::Bytes, RuntimeError> {
        let closed = |e: &dyn std::fmt::Display| {
            tracing::debug!(error = %e, verb, "orchestrator unreachable");
            RuntimeError::Closed
        };
        let inbox = client.new_inbox();
        let mut sub = client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| closed(&e))?;
        let sealed = self.seal_request(verb, Some(&inbox), body);
        client
            .publish_with_reply(subject, inbox.clone(), sealed.into())
            .await
            .map_err(|e| closed(&e))?;
        let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
        loop {
            // No answer in time: the orchestrator is down or restarting.
            let msg = match tokio::time::timeout_at(deadline, sub.next()).await {
                Ok(Some(m)) => m,
                _ => return Err(closed(&"no answer")),
            };
            if msg.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
                return Err(closed(&"no responders"));
            }
            match self.key.open(Kind::Answer, &inbox, &msg.payload) {
                Ok(b) => return Ok(bytes::Bytes::copy_from_slice(b)),
                Err(e) => self.stats.refuse(
                    "unauthenticated_answer",
                    format!("an answer to `{verb}` was skipped: {e}"),
                ),
            }
        }
    }

    /// The stream's name and the subjects' prefix: `{name}_{log id}`.
    pub fn prefix(&self) -> String {
        format!("{}_{}", self.name, self.key.log_id())
    }

    pub fn log_id(&self) -> &str {
        self.key.log_id()
    }

    pub fn reading(&self) -> ChannelReading {
        ChannelReading {
            log_id: self.log_id().to_owned(),
            stream: self.prefix(),
            refused: self.stats.refused.load(Ordering::Relaxed),
            last_refusal: self.stats.last.lock().ok().and_then(|l| l.clone()),
        }
    }

    /// `queue` with every message sealed on publish and opened on pull (what does not open
    /// is terminated and counted, never handed out).
    pub fn seal<Q: CommandQueue>(&self, queue: Q) -> Sealed<Q> {
        Sealed {
            inner: queue,
            channel: self.clone(),
        }
    }

    fn hello_subject(name: &str) -> String {
        format!("{name}.hello")
    }
}

/// A command queue behind a channel's authentication.
pub struct Sealed<Q> {
    inner: Q,
    channel: Channel,
}

impl<Q> Sealed<Q> {
    pub fn inner(&self) -> &Q {
        &self.inner
    }

    async fn open(&self, mut d: Delivery) -> Option<Delivery> {
        match self.channel.key.open(Kind::Command, "", &d.payload) {
            Ok(body) => {
                d.payload = body.to_vec();
                Some(d)
            }
            Err(e) => {
                self.channel.stats.refuse(
                    "unauthenticated_command",
                    format!("queue message {} terminated: {e}", d.id),
                );
                let _ = d.term().await;
                None
            }
        }
    }
}

#[async_trait::async_trait]
impl<Q: CommandQueue> CommandQueue for Sealed<Q> {
    async fn publish(&self, id: &str, payload: &[u8]) -> Result<(), QueueError> {
        self.inner
            .publish(id, &self.channel.key.seal(Kind::Command, "", payload))
            .await
    }
    async fn publish_batch(&self, items: &[(String, bytes::Bytes)]) -> Vec<Result<(), QueueError>> {
        let sealed: Vec<(String, bytes::Bytes)> = items
            .iter()
            .map(|(id, p)| {
                (
                    id.clone(),
                    self.channel.key.seal(Kind::Command, "", p).into(),
                )
            })
            .collect();
        self.inner.publish_batch(&sealed).await
    }
    async fn pull(&self, wait: Duration) -> Result<Option<Delivery>, QueueError> {
        let until = tokio::time::Instant::now() + wait;
        loop {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            match self.inner.pull(left).await? {
                None => return Ok(None),
                Some(d) => {
                    if let Some(d) = self.open(d).await {
                        return Ok(Some(d));
                    }
                }
            }
        }
    }
    async fn pull_batch(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, QueueError> {
        let mut out = Vec::new();
        for d in self.inner.pull_batch(max, wait).await? {
            if let Some(d) = self.open(d).await {
                out.push(d);
            }
        }
        Ok(out)
    }
    async fn depth(&self) -> Result<u64, QueueError> {
        self.inner.depth().await
    }
}

/// What a server says at `{name}.hello`.
#[derive(Serialize, Deserialize)]
struct Hello {
    log_id: String,
}

/// Find the log whose channel a worker joins: ask every server of queue `name` on NATS which
/// log it appends (each answer authenticated under that log's key, which only holders of
/// `key` can derive), or take `pinned`. Two logs answering is refused: say which with
/// `--log-id`. Waits for a server up to `patience`.
pub async fn discover(
    client: &async_nats::Client,
    name: &str,
    key: &ChannelKey,
    pinned: Option<&str>,
    patience: Duration,
) -> Result<Channel, RuntimeError> {
    let deadline = tokio::time::Instant::now() + patience;
    let mut strangers = 0usize;
    loop {
        let inbox = client.new_inbox();
        let mut sub = client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| RuntimeError::Invalid(format!("subscribing to NATS: {e}")))?;
        client
            .publish_with_reply(Channel::hello_subject(name), inbox.clone(), "".into())
            .await
            .map_err(|e| RuntimeError::Invalid(format!("publishing to NATS: {e}")))?;
        let _ = client.flush().await;
        let mut logs = std::collections::BTreeSet::new();
        // The first answer, then a moment for others (another deployment on the same name).
        let mut window = Duration::from_secs(1);
        while let Ok(Some(msg)) = tokio::time::timeout(window, sub.next()).await {
            window = Duration::from_millis(300);
            let frame = msg.payload.as_ref();
            let claimed = frame
                .get(mayfly_trust::channel::OVERHEAD..)
                .and_then(|b| serde_json::from_slice::<Hello>(b).ok());
            match claimed {
                Some(h)
                    if is_log_id(&h.log_id)
                        && key
                            .for_log(&h.log_id)
                            .open(Kind::Hello, &inbox, frame)
                            .is_ok() =>
                {
                    logs.insert(h.log_id);
                }
                _ => strangers += 1,
            }
        }
        let _ = sub.unsubscribe().await;
        let chosen = match pinned {
            Some(p) if logs.contains(p) => Some(p.to_owned()),
            Some(_) => None,
            None if logs.len() > 1 => {
                return Err(RuntimeError::Invalid(format!(
                    "servers of {} different logs answer on queue `{name}` ({}): pick one with --log-id",
                    logs.len(),
                    logs.iter().cloned().collect::<Vec<_>>().join(", ")
                )));
            }
            None => logs.into_iter().next(),
        };
        if let Some(log) = chosen {
            return Ok(Channel::new(name, key.for_log(&log)));
        }
        if tokio::time::Instant::now() >= deadline {
            let who = match pinned {
                Some(p) => format!("the server of log {p}"),
                None => "a server".into(),
            };
            return Err(RuntimeError::Invalid(format!(
                "no answer from {who} on queue `{name}` that this worker's channel key (fingerprint {}) authenticates{}",
                key.fingerprint(),
                if strangers > 0 {
                    format!(
                        "; {strangers} answers did not verify: another deployment, or a different channel key (copy the server's channel.key)"
                    )
                } else {
                    String::new()
                }
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Whether `s` is a log id (32 hex digits).
pub fn is_log_id(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn encode<T: Serialize>(v: &T) -> bytes::Bytes {
    // Serialising these plain data types cannot fail; an empty body is answered as an error.
    serde_json::to_vec(v).unwrap_or_default().into()
}

/// Room for one answer or request in a NATS message of at most `max_payload` bytes
/// (headroom for the message's own framing; never more than the server accepts).
fn room(max_payload: usize) -> usize {
    max_payload.saturating_sub(4096).max(max_payload / 2)
}

/// A context kept as it was at claim time: (when stashed, the context).
type Stashed = (std::time::Instant, Map<String, Value>);

/// Contexts of claims granted without them (their batch's answer had no room), kept as they
/// were at claim time until the worker fetches them — so a block renders the same scope
/// whichever way its context travelled.
#[derive(Clone, Default)]
struct Stash(Arc<std::sync::Mutex<HashMap<(String, u32), Stashed>>>);

impl Stash {
    fn put(&self, command_id: &str, attempt: u32, ctx: Map<String, Value>) {
        if let Ok(mut m) = self.0.lock() {
            // Unfetched entries (the worker died) go once their lease is long gone.
            m.retain(|_, (at, _)| at.elapsed() < Duration::from_secs(600));
            m.insert(
                (command_id.to_owned(), attempt),
                (std::time::Instant::now(), ctx),
            );
        }
    }
    fn take(&self, command_id: &str, attempt: u32) -> Option<Map<String, Value>> {
        self.0
            .lock()
            .ok()?
            .remove(&(command_id.to_owned(), attempt))
            .map(|(_, c)| c)
    }
}

/// `[a,b,…]` from already encoded JSON values.
fn join_array<'a>(parts: impl Iterator<Item = &'a [u8]>) -> bytes::Bytes {
    let mut out = vec![b'['];
    for (i, p) in parts.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(p);
    }
    out.push(b']');
    out.into()
}

/// Serve workers' requests for `handle` on `channel` until the connection closes, and
/// introduce the channel's log to workers that ask (`{name}.hello`).
pub async fn serve(
    handle: RuntimeHandle,
    client: async_nats::Client,
    channel: &Channel,
) -> Result<JoinHandle<()>, RuntimeError> {
    let prefix = channel.prefix();
    let nats =
        |e: async_nats::SubscribeError| RuntimeError::Invalid(format!("subscribing to NATS: {e}"));
    let mut sub = client
        .queue_subscribe(format!("{prefix}.rpc.*"), format!("{prefix}-orchestrator"))
        .await
        .map_err(nats)?;
    // Not a queue group: every server of the name answers, so a worker sees them all.
    let mut hello = client
        .subscribe(Channel::hello_subject(&channel.name))
        .await
        .map_err(nats)?;
    handle.set_channel(channel.clone());
    let room =
        room(client.server_info().max_payload).saturating_sub(mayfly_trust::channel::OVERHEAD);
    let stash = Stash::default();
    let channel = channel.clone();
    Ok(tokio::spawn(async move {
        loop {
            tokio::select! {
                msg = sub.next() => {
                    let Some(msg) = msg else { return };
                    let (handle, client, stash, channel) =
                        (handle.clone(), client.clone(), stash.clone(), channel.clone());
                    tokio::spawn(async move {
                        let verb = msg.subject.rsplit('.').next().unwrap_or("").to_owned();
                        let reply = msg.reply.as_ref().map(|r| r.as_str());
                        let payload = match channel.open_request(&verb, reply, &msg.payload) {
                            Ok(p) => p,
                            Err((reason, why)) => {
                                channel.stats.refuse(reason, why);
                                return;
                            }
                        };
                        let body = answer(&handle, &verb, payload, room, &stash).await;
                        if let (Some(reply), Some(body)) = (msg.reply, body) {
                            let sealed = channel.key.seal(Kind::Answer, &reply, &body);
                            if let Err(e) = client.publish(reply, sealed.into()).await {
                                tracing::warn!(error = %e, verb, "could not answer a worker");
                            }
                        }
                    });
                }
                msg = hello.next() => {
                    let Some(msg) = msg else { return };
                    if let Some(reply) = msg.reply {
                        let body = encode(&Hello { log_id: channel.log_id().to_owned() });
                        let sealed = channel.key.seal(Kind::Hello, &reply, &body);
                        if let Err(e) = client.publish(reply, sealed.into()).await {
                            tracing::warn!(error = %e, "could not answer a worker's hello");
                        }
                    }
                }
            }
        }
    }))
}

/// The answer to one worker request (None: fire and forget). `room` bounds the encoded
/// answer (the NATS server's max payload).
async fn answer(
    h: &RuntimeHandle,
    verb: &str,
    payload: &[u8],
    room: usize,
    stash: &Stash,
) -> Option<bytes::Bytes> {
    fn bad<T: Serialize>(e: serde_json::Error) -> Option<bytes::Bytes> {
        let a: Answer<T> = Err(WireError {
            code: "invalid".into(),
            message: format!("malformed request: {e}"),
        });
        Some(encode(&a))
    }
    match verb {
        "claims" => {
            let reqs: Vec<ClaimReq> = match serde_json::from_slice(payload) {
                Ok(r) => r,
                Err(e) => return bad::<Vec<Answer<ClaimWire>>>(e),
            };
            // All sent to the orchestrator before any is awaited: they share its cycle and
            // its commit.
            let ids: Vec<(String, mayfly_types::ExecutionId)> = reqs
                .iter()
                .map(|r| (r.block.command_id.clone(), r.block.execution_id.clone()))
                .collect();
            let claims = futures_util::future::join_all(
                reqs.into_iter()
                    .map(|r| async move { h.claim(r.block, &r.worker).await }),
            )
            .await;
            let mut used = 2;
            let mut parts = Vec::with_capacity(claims.len());
            for (c, (command_id, execution)) in claims.into_iter().zip(ids) {
                // `Done` for an execution this log never had is not ours to ack: refused.
                let c = match c {
                    Ok(Claim::Done) => {
                        match h.store.get_execution(&execution).await {
                            Ok(Some(_)) => Ok(Claim::Done),
                            Ok(None) => {
                                h.channel_refused(
                                "not_owned",
                                format!("claim of {command_id}: this log has no execution {execution}"),
                            );
                                Err(RuntimeError::NotOwned(execution.to_string()))
                            }
                            Err(e) => Err(e.into()),
                        }
                    }
                    other => other,
                };
                let mut a: Answer<ClaimWire> = match c {
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
                        context: Some(x.context),
                        lease_ms: x.lease.as_millis() as u64,
                        limits: x.limits.map(Box::new),
                    }),
                    Ok(Claim::Done) => Ok(ClaimWire::Done),
                    Ok(Claim::Busy(d)) => Ok(ClaimWire::Busy {
                        retry_ms: d.as_millis() as u64,
                    }),
                    Err(e) => Err((&e).into()),
                };
                let mut part = serde_json::to_vec(&a).unwrap_or_default();
                if used + part.len() + 1 > room
                    && let Ok(ClaimWire::Granted {
                        context, attempt, ..
                    }) = &mut a
                {
                    // Granted all the same; the worker fetches this context on its own.
                    if let Some(ctx) = context.take() {
                        stash.put(&command_id, *attempt, ctx);
                    }
                    part = serde_json::to_vec(&a).unwrap_or_default();
                }
                used += part.len() + 1;
                parts.push(part);
            }
            Some(join_array(parts.iter().map(Vec::as_slice)))
        }
        "completes" => {
            let done: Vec<Completion> = match serde_json::from_slice(payload) {
                Ok(c) => c,
                Err(e) => return bad::<Vec<Answer<()>>>(e),
            };
            let answers: Vec<Answer<()>> = futures_util::future::join_all(
                done.into_iter().map(|c| async move { h.complete(c).await }),
            )
            .await
            .into_iter()
            .map(|r| r.map_err(|e| (&e).into()))
            .collect();
            Some(encode(&answers))
        }
        "context" => {
            let r: ContextReq = match serde_json::from_slice(payload) {
                Ok(r) => r,
                Err(e) => return bad::<Map<String, Value>>(e),
            };
            let live = match stash.take(&r.command_id, r.attempt) {
                Some(c) => Some(c),
                None => h.claim_context(&r.command_id, r.attempt).await,
            };
            let a: Answer<Map<String, Value>> = live.ok_or_else(|| WireError {
                code: "stale_claim".into(),
                message: format!("no live claim {}#{}", r.command_id, r.attempt),
            });
            let body = encode(&a);
            if body.len() > room {
                let e = RuntimeError::TooLarge(format!(
                    "the step's template context is {} bytes, more than one NATS message carries ({room}); pass large values by reference (shared cache) instead of inline workload",
                    body.len()
                ));
                return Some(encode(&Answer::<Map<String, Value>>::Err((&e).into())));
            }
            Some(body)
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
        "child" => {
            let r: ChildReq = match serde_json::from_slice(payload) {
                Ok(r) => r,
                Err(e) => return bad::<mayfly_types::ExecutionId>(e),
            };
            // Only a worker holding a live claim starts a child, in its execution's tree.
            let a: Answer<mayfly_types::ExecutionId> = h
                .start_task_child(&r.command_id, r.attempt, &r.path, r.input)
                .await
                .map_err(|e| (&e).into());
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
        "agent" => {
            let r: mayfly_control::rollout::AgentReport = match serde_json::from_slice(payload) {
                Ok(r) => r,
                Err(e) => return bad::<mayfly_control::rollout::AgentAnswer>(e),
            };
            let a: Answer<mayfly_control::rollout::AgentAnswer> = match h.agent_hub() {
                Some(hub) => hub.report(r).await.map_err(|message| WireError {
                    code: "control".into(),
                    message,
                }),
                None => Err(WireError {
                    code: "unavailable".into(),
                    message: "this orchestrator runs no control plane".into(),
                }),
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

/// Publish every dispatched block to `queue`, retrying each message until JetStream
/// acknowledges it. Message ids are unique per dispatch (the dedupe window only absorbs a
/// retried publish whose ack was lost; a later re-dispatch of the same command must get
/// through).
///
/// The blocks a commit dispatches arrive together and go out as one batch of messages, each
/// carrying up to [`MAX_GROUP`] blocks as a JSON array: JetStream's cost (store, ack,
/// delivery, consumer bookkeeping) is per message, and a fan-out dispatches blocks by the
/// dozen. A worker settles such a message once all its blocks are done with (see `Group`).
pub(crate) async fn publisher(
    mut rx: mpsc::UnboundedReceiver<Block>,
    queue: Arc<dyn CommandQueue>,
    health: QueueHealth,
    pending: Arc<std::sync::atomic::AtomicU64>,
) {
    let nonce = uuid::Uuid::now_v7().simple().to_string();
    let mut n: u64 = 0;
    let mut inflight = JoinSet::new();
    health.set(true);
    loop {
        tokio::select! {
            b = rx.recv(), if inflight.len() < MAX_INFLIGHT_PUBLISHES => {
                let Some(b) = b else { break };
                let mut blocks = vec![b];
                while blocks.len() < MAX_PUBLISH_BATCH {
                    match rx.try_recv() {
                        Ok(b) => blocks.push(b),
                        Err(_) => break,
                    }
                }
                // (message id, payload) per message, and how many blocks each carries.
                let mut items: Vec<(String, bytes::Bytes)> = Vec::new();
                let mut counts: Vec<u64> = Vec::new();
                for group in groups(&blocks) {
                    n += 1;
                    items.push((format!("{}.{nonce}.{n}", group.first_id), group.payload));
                    counts.push(group.len as u64);
                }
                let (queue, health, pending) = (queue.clone(), health.clone(), pending.clone());
                inflight.spawn(async move {
                    let results = queue.publish_batch(&items).await;
                    let mut retries = JoinSet::new();
                    for (((id, payload), count), r) in items.into_iter().zip(counts).zip(results) {
                        match r {
                            Ok(()) => {
                                health.set(true);
                                pending.fetch_sub(count, Ordering::Relaxed);
                            }
                            Err(e) => {
                                health.set(false);
                                tracing::warn!(error = %e, message = %id, "publish failed; retrying");
                                let (queue, health, pending) =
                                    (queue.clone(), health.clone(), pending.clone());
                                retries.spawn(async move {
                                    let mut pause = Duration::from_millis(100);
                                    loop {
                                        tokio::time::sleep(pause).await;
                                        pause = (pause * 2).min(Duration::from_secs(5));
                                        match queue.publish(&id, &payload).await {
                                            Ok(()) => {
                                                health.set(true);
                                                pending.fetch_sub(count, Ordering::Relaxed);
                                                return;
                                            }
                                            Err(e) => {
                                                health.set(false);
                                                tracing::warn!(error = %e, message = %id, "publish failed; retrying");
                                            }
                                        }
                                    }
                                });
                            }
                        }
                    }
                    while retries.join_next().await.is_some() {}
                });
            }
            Some(_) = inflight.join_next(), if !inflight.is_empty() => {}
        }
    }
    while inflight.join_next().await.is_some() {}
}

/// One queue message's worth of blocks.
struct Encoded {
    first_id: String,
    payload: bytes::Bytes,
    len: usize,
}

/// `blocks` cut into messages of at most [`MAX_GROUP`] blocks and [`MAX_GROUP_BYTES`]
/// bytes (a single larger block still travels, alone), each a JSON array.
fn groups(blocks: &[Block]) -> Vec<Encoded> {
    let mut out = Vec::new();
    let mut parts: Vec<bytes::Bytes> = Vec::new();
    let mut bytes = 0;
    let mut first_id = String::new();
    let flush = |parts: &mut Vec<bytes::Bytes>, first_id: &mut String, out: &mut Vec<Encoded>| {
        if !parts.is_empty() {
            out.push(Encoded {
                first_id: std::mem::take(first_id),
                payload: join_array(parts.iter().map(|p| p.as_ref())),
                len: parts.len(),
            });
            parts.clear();
        }
    };
    for b in blocks {
        let e = encode(b);
        if parts.len() == MAX_GROUP || (!parts.is_empty() && bytes + e.len() > MAX_GROUP_BYTES) {
            flush(&mut parts, &mut first_id, &mut out);
            bytes = 0;
        }
        if parts.is_empty() {
            first_id = b.command_id.clone();
        }
        bytes += e.len() + 1;
        parts.push(e);
    }
    flush(&mut parts, &mut first_id, &mut out);
    out
}

/// The blocks of one queue message: a JSON array of blocks, or a single block (what
/// publishers before grouping sent).
fn decode_group(payload: &[u8]) -> Result<Vec<Block>, serde_json::Error> {
    match payload.iter().find(|c| !c.is_ascii_whitespace()) {
        Some(b'[') => serde_json::from_slice(payload),
        _ => serde_json::from_slice::<Block>(payload).map(|b| vec![b]),
    }
}

/// Export the queue's consumer lag (waiting + unacknowledged) for autoscalers.
pub(crate) async fn lag_reporter(
    queue: Arc<dyn CommandQueue>,
    health: QueueHealth,
    stats: Arc<crate::QueueStats>,
) {
    let mut t = tokio::time::interval(Duration::from_secs(2));
    loop {
        t.tick().await;
        match queue.depth().await {
            Ok(d) => {
                metrics::gauge!("mayfly_queue_consumer_lag").set(d as f64);
                stats.lag.store(d + 1, std::sync::atomic::Ordering::Relaxed);
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
    /// The queue's own connection, which carries the deliveries' acks.
    queue_client: async_nats::Client,
    /// Set once the worker drains: slots stop taking deliveries.
    draining: tokio::sync::watch::Sender<bool>,
    claims: Batcher<ClaimWire>,
    completes: Batcher<()>,
    /// Idle slots ask the fetcher for a delivery here.
    wants: mpsc::UnboundedSender<oneshot::Sender<(Block, Ticket)>>,
    fetcher: JoinHandle<()>,
    channel: Channel,
    /// Parsed playbooks by (digest, extra workload keys): workers fetch each version once.
    playbooks: Mutex<HashMap<PlaybookKey, Arc<Playbook>>>,
}

impl RemoteCoordinator {
    /// Connect to `channel` (see [`discover`]) on the NATS server at `url`.
    pub async fn connect(
        url: &str,
        channel: &Channel,
        cfg: mayfly_queue::QueueConfig,
    ) -> Result<Self, RuntimeError> {
        Self::connect_to(&mayfly_queue::NatsConnect::url(url), channel, cfg).await
    }

    /// [`RemoteCoordinator::connect`] with credentials.
    pub async fn connect_to(
        nats: &mayfly_queue::NatsConnect,
        channel: &Channel,
        cfg: mayfly_queue::QueueConfig,
    ) -> Result<Self, RuntimeError> {
        let prefix = &channel.prefix();
        let client = nats
            .connect_with(|o| o.request_timeout(Some(RPC_TIMEOUT)))
            .await
            .map_err(|e| RuntimeError::Invalid(e.to_string()))?;
        let ack_wait = cfg.ack_wait;
        let queue = NatsQueue::connect_to(nats, prefix, cfg)
            .await
            .map_err(|e| RuntimeError::Invalid(e.to_string()))?;
        let queue_client = queue.client();
        let queue = channel.seal(queue);
        let (wants, rx) = mpsc::unbounded_channel();
        let draining = tokio::sync::watch::Sender::new(false);
        let fetcher = tokio::spawn(fetcher(queue, rx, draining.subscribe(), ack_wait));
        let room =
            room(client.server_info().max_payload).saturating_sub(mayfly_trust::channel::OVERHEAD);
        Ok(RemoteCoordinator {
            inner: Arc::new(Inner {
                claims: Batcher::start(client.clone(), channel.clone(), "claims", room),
                completes: Batcher::start(client.clone(), channel.clone(), "completes", room),
                client,
                queue_client,
                draining,
                wants,
                fetcher,
                channel: channel.clone(),
                playbooks: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// Stop taking deliveries: idle slots' `next()` returns None at once (a delivery already
    /// on its way to one goes back to the queue), busy slots finish their block and then
    /// get None. Their worker loops end; nothing running is abandoned.
    pub fn drain(&self) {
        self.inner.draining.send_replace(true);
    }

    /// Write out whatever the NATS connections still buffer (acks, above all): called before
    /// the process exits, so a finished block's ack is not lost and redelivered.
    pub async fn flush(&self) {
        for (what, c) in [
            ("requests", &self.inner.client),
            ("queue", &self.inner.queue_client),
        ] {
            if let Err(e) = c.flush().await {
                tracing::warn!(error = %e, connection = what, "could not flush NATS");
            }
        }
    }

    /// Report this process's agent to the control plane behind the orchestrator.
    pub async fn agent_report(
        &self,
        r: &mayfly_control::rollout::AgentReport,
    ) -> Result<mayfly_control::rollout::AgentAnswer, RuntimeError> {
        self.call("agent", r).await
    }

    async fn call<Req: Serialize, T: for<'de> Deserialize<'de>>(
        &self,
        verb: &str,
        req: &Req,
    ) -> Result<T, RuntimeError> {
        let channel = &self.inner.channel;
        let subject = format!("{}.rpc.{verb}", channel.prefix());
        let began = std::time::Instant::now();
        let body = channel
            .ask(&self.inner.client, subject, verb, &encode(req))
            .await?;
        metrics::histogram!("mayfly_worker_rpc_seconds", "verb" => verb.to_owned())
            .record(began.elapsed().as_secs_f64());
        let a: Answer<T> = serde_json::from_slice(&body)
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

/// One request waiting for a batch: its encoded body and where its answer goes.
struct Pending<T> {
    body: Vec<u8>,
    reply: oneshot::Sender<Result<T, RuntimeError>>,
}

/// Coalesces concurrent calls of one verb into one request (a JSON array) per round trip:
/// whatever the slots asked while earlier batches were out goes in the next one.
struct Batcher<T> {
    tx: mpsc::UnboundedSender<Pending<T>>,
    task: JoinHandle<()>,
}

impl<T: for<'de> Deserialize<'de> + Send + 'static> Batcher<T> {
    fn start(client: async_nats::Client, channel: Channel, verb: &str, room: usize) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(batch_loop(client, channel, verb.to_owned(), room, rx));
        Batcher { tx, task }
    }

    async fn call<Req: Serialize>(&self, req: &Req) -> Result<T, RuntimeError> {
        let body = serde_json::to_vec(req)
            .map_err(|e| RuntimeError::Invalid(format!("encoding a request: {e}")))?;
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Pending { body, reply })
            .map_err(|_| RuntimeError::Closed)?;
        rx.await.map_err(|_| RuntimeError::Closed)?
    }
}

impl<T> Drop for Batcher<T> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn batch_loop<T: for<'de> Deserialize<'de> + Send + 'static>(
    client: async_nats::Client,
    channel: Channel,
    verb: String,
    room: usize,
    mut rx: mpsc::UnboundedReceiver<Pending<T>>,
) {
    let subject = format!("{}.rpc.{verb}", channel.prefix());
    let slots = Arc::new(tokio::sync::Semaphore::new(RPC_BATCHES_IN_FLIGHT));
    let mut carry: Option<Pending<T>> = None;
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let first = match carry.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        let mut used = first.body.len() + 2;
        let mut batch = vec![first];
        while batch.len() < MAX_RPC_BATCH {
            match rx.try_recv() {
                Ok(p) if used + p.body.len() + 1 > room => {
                    carry = Some(p);
                    break;
                }
                Ok(p) => {
                    used += p.body.len() + 1;
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        let (client, subject, verb, channel) = (
            client.clone(),
            subject.clone(),
            verb.clone(),
            channel.clone(),
        );
        tokio::spawn(async move {
            let _permit = permit;
            let body = join_array(batch.iter().map(|p| p.body.as_slice()));
            let began = std::time::Instant::now();
            let answers = match channel.ask(&client, subject, &verb, &body).await {
                Err(e) => Err(e),
                Ok(answer) => {
                    metrics::histogram!("mayfly_worker_rpc_seconds", "verb" => verb.clone())
                        .record(began.elapsed().as_secs_f64());
                    match serde_json::from_slice::<Vec<Answer<T>>>(&answer).map_err(|e| {
                        RuntimeError::Invalid(format!("malformed answer to {verb}: {e}"))
                    }) {
                        Ok(v) if v.len() == batch.len() => Ok(v),
                        Ok(v) => Err(RuntimeError::Invalid(format!(
                            "{} answers to {} {verb} requests",
                            v.len(),
                            batch.len()
                        ))),
                        Err(e) => Err(e),
                    }
                }
            };
            match answers {
                Ok(v) => {
                    for (p, a) in batch.into_iter().zip(v) {
                        let _ = p.reply.send(a.map_err(RuntimeError::from));
                    }
                }
                Err(e) => {
                    for p in batch {
                        let _ = p.reply.send(Err(e.clone()));
                    }
                }
            }
        });
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.fetcher.abort();
    }
}

/// The blocks of one queue message settle it together. The message is acked once every
/// block in it is done with, or given back (after the longest delay any of them asked for)
/// when one of them wants another delivery: on that redelivery the claims of its finished
/// siblings are answered `done`, so nothing runs twice. Any running block's heartbeat keeps
/// the whole message in progress.
struct Group {
    delivery: Mutex<Option<Delivery>>,
    remaining: std::sync::atomic::AtomicUsize,
    retry: std::sync::Mutex<Option<Duration>>,
    /// When the message was last reported in progress (its blocks' heartbeats coincide).
    beat: std::sync::Mutex<std::time::Instant>,
}

/// A worker's hold on one block of a queue message (see [`RemoteCoordinator`]).
pub struct Ticket(Arc<Group>);

/// Heartbeats of one message's blocks closer together than this are sent once.
const GROUP_BEAT: Duration = Duration::from_millis(250);

impl Ticket {
    fn group(d: Delivery, blocks: usize) -> Vec<Ticket> {
        let g = Arc::new(Group {
            delivery: Mutex::new(Some(d)),
            remaining: std::sync::atomic::AtomicUsize::new(blocks),
            retry: std::sync::Mutex::new(None),
            beat: std::sync::Mutex::new(std::time::Instant::now()),
        });
        (0..blocks).map(|_| Ticket(g.clone())).collect()
    }

    async fn in_progress(&self) -> Result<(), mayfly_queue::QueueError> {
        if let Ok(mut last) = self.0.beat.lock() {
            if last.elapsed() < GROUP_BEAT {
                return Ok(());
            }
            *last = std::time::Instant::now();
        }
        match &*self.0.delivery.lock().await {
            Some(d) => d.in_progress().await,
            None => Ok(()),
        }
    }

    async fn settle(self, settle: Settle) -> Result<(), mayfly_queue::QueueError> {
        let g = self.0;
        if let (Settle::Retry(d), Ok(mut r)) = (settle, g.retry.lock()) {
            *r = Some(r.map_or(d, |x| x.max(d)));
        }
        if g.remaining.fetch_sub(1, Ordering::AcqRel) != 1 {
            return Ok(());
        }
        let Some(d) = g.delivery.lock().await.take() else {
            return Ok(());
        };
        let retry = g.retry.lock().ok().and_then(|r| *r);
        match retry {
            None => d.ack().await,
            Some(delay) => d.nak(Some(delay)).await,
        }
    }
}

/// One puller per worker process: it asks JetStream for about as many messages as the idle
/// slots will take (one request for all of them, sized by the blocks per message seen so
/// far), so few blocks wait in the local buffer while their ack_wait runs, and an idle
/// worker costs one pending pull request. Buffered blocks are kept in progress, and go
/// back to the queue when the worker drains.
async fn fetcher(
    queue: Sealed<NatsQueue>,
    mut wants: mpsc::UnboundedReceiver<oneshot::Sender<(Block, Ticket)>>,
    mut draining: tokio::sync::watch::Receiver<bool>,
    ack_wait: Duration,
) {
    type Want = oneshot::Sender<(Block, Ticket)>;
    let mut idle: std::collections::VecDeque<Want> = std::collections::VecDeque::new();
    let mut ready: std::collections::VecDeque<(Block, Ticket)> = std::collections::VecDeque::new();
    // Running mean of blocks per message.
    let mut per_message = 1.0_f64;
    let mut pause = Duration::from_millis(100);
    let mut keepalive = tokio::time::interval((ack_wait / 3).max(Duration::from_millis(10)));
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if *draining.borrow_and_update() {
            give_back(&mut ready).await;
            return;
        }
        // Hand out what was fetched before asking for more.
        while let Some(item) = ready.pop_front() {
            if let Some(item) = give(&mut idle, item) {
                ready.push_front(item);
                break;
            }
        }
        while let Ok(w) = wants.try_recv() {
            idle.push_back(w);
        }
        idle.retain(|w| !w.is_closed());
        if idle.is_empty() || !ready.is_empty() {
            tokio::select! {
                w = wants.recv() => match w {
                    Some(w) => idle.push_back(w),
                    None => {
                        give_back(&mut ready).await;
                        return;
                    }
                },
                _ = keepalive.tick(), if !ready.is_empty() => {
                    let mut seen: Vec<usize> = Vec::new();
                    for (_, t) in &ready {
                        let g = Arc::as_ptr(&t.0) as usize;
                        if !seen.contains(&g) {
                            seen.push(g);
                            let _ = t.in_progress().await;
                        }
                    }
                }
                // An error: the coordinator is gone; give back what is buffered.
                changed = draining.changed() => {
                    if changed.is_err() {
                        give_back(&mut ready).await;
                        return;
                    }
                }
            }
            continue;
        }
        let want = ((idle.len() as f64 / per_message).floor() as usize).max(1);
        let batch = match queue.pull_batch(want, Duration::from_secs(5)).await {
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
            let blocks = match decode_group(&d.payload) {
                Ok(b) if !b.is_empty() => b,
                Ok(_) => {
                    let _ = d.ack().await;
                    continue;
                }
                Err(e) => {
                    tracing::error!(error = %e, id = %d.id, "malformed command message; terminating it");
                    let _ = d.term().await;
                    continue;
                }
            };
            per_message = 0.8 * per_message + 0.2 * blocks.len() as f64;
            let tickets = Ticket::group(d, blocks.len());
            ready.extend(blocks.into_iter().zip(tickets));
        }
    }
}

/// Return the buffered blocks to the queue at once (the worker drains or its coordinator is
/// gone).
async fn give_back(ready: &mut std::collections::VecDeque<(Block, Ticket)>) {
    for (_, t) in ready.drain(..) {
        let _ = t.settle(Settle::Retry(Duration::ZERO)).await;
    }
}

/// Offer `item` to the first idle slot still waiting; it comes back if none is.
fn give(
    idle: &mut std::collections::VecDeque<oneshot::Sender<(Block, Ticket)>>,
    mut item: (Block, Ticket),
) -> Option<(Block, Ticket)> {
    while let Some(w) = idle.pop_front() {
        match w.send(item) {
            Ok(()) => return None,
            // That slot is gone: offer the block to the next one.
            Err(back) => item = back,
        }
    }
    Some(item)
}

impl Coordinator for RemoteCoordinator {
    type Ticket = Ticket;

    async fn next(&self) -> Option<(Block, Ticket)> {
        let mut draining = self.inner.draining.subscribe();
        if *draining.borrow_and_update() {
            return None;
        }
        let (tx, mut rx) = oneshot::channel();
        self.inner.wants.send(tx).ok()?;
        tokio::select! {
            biased;
            got = &mut rx => got.ok(),
            _ = async { draining.wait_for(|d| *d).await.is_ok() } => {
                // A delivery the fetcher handed over meanwhile goes straight back.
                rx.close();
                if let Ok((_, t)) = rx.try_recv() {
                    let _ = t.settle(Settle::Retry(Duration::ZERO)).await;
                }
                None
            }
        }
    }

    async fn claim(&self, block: Block, worker: &str) -> Result<Claim, RuntimeError> {
        let req = ClaimReq {
            block: block.clone(),
            worker: worker.to_owned(),
        };
        match self.inner.claims.call(&req).await? {
            ClaimWire::Done => Ok(Claim::Done),
            ClaimWire::Busy { retry_ms } => Ok(Claim::Busy(Duration::from_millis(retry_ms))),
            ClaimWire::Granted {
                attempt,
                tenant,
                digest,
                extra_vars,
                context,
                lease_ms,
                limits,
            } => {
                let context = match context {
                    Some(c) => c,
                    None => {
                        let req = ContextReq {
                            command_id: block.command_id.clone(),
                            attempt,
                        };
                        match self.call::<_, Map<String, Value>>("context", &req).await {
                            Ok(c) => c,
                            // The lease ran out meanwhile: another claim will run it.
                            Err(RuntimeError::StaleClaim(_)) => {
                                return Ok(Claim::Busy(Duration::from_millis(100)));
                            }
                            // It can never reach a worker: fail the step, do not retry.
                            Err(RuntimeError::TooLarge(msg)) => {
                                let failed = mayfly_types::StepFailed {
                                    index: block.index,
                                    error: mayfly_types::ErrorInfo::new("context_too_large", msg),
                                    duration_ms: None,
                                    logs: None,
                                };
                                self.complete(&Completion {
                                    block,
                                    attempt,
                                    worker: worker.to_owned(),
                                    outcome: Err(failed),
                                })
                                .await?;
                                return Ok(Claim::Done);
                            }
                            Err(e) => return Err(e),
                        }
                    }
                };
                let playbook = self.playbook(&digest, extra_vars).await?;
                Ok(Claim::Granted(Box::new(Hydrated {
                    block,
                    tenant,
                    attempt,
                    playbook,
                    context,
                    lease: Duration::from_millis(lease_ms),
                    limits: limits.map(|l| *l),
                })))
            }
        }
    }

    async fn heartbeat(&self, ticket: &Ticket, command_id: &str, attempt: u32) {
        if let Err(e) = ticket.in_progress().await {
            tracing::warn!(error = %e, command = command_id, "in-progress signal failed");
        }
        let req = ExtendReq {
            command_id: command_id.to_owned(),
            attempt,
        };
        let channel = &self.inner.channel;
        let subject = format!("{}.rpc.extend", channel.prefix());
        let sealed = channel.seal_request("extend", None, &encode(&req));
        if let Err(e) = self.inner.client.publish(subject, sealed.into()).await {
            tracing::warn!(error = %e, command = command_id, "heartbeat failed");
        }
    }

    async fn complete(&self, c: &Completion) -> Result<(), RuntimeError> {
        self.inner.completes.call(c).await
    }

    async fn settle(&self, ticket: Ticket, settle: Settle) {
        // Acks are fire and forget (handing one to the client is all this awaits): a lost ack
        // means a redelivery, which the claim protocol answers with `done`. Settled before
        // the slot moves on, so a draining worker's last acks are in the buffer it flushes.
        if let Err(e) = ticket.settle(settle).await {
            tracing::warn!(error = %e, "could not settle a delivery");
        }
    }

    async fn start_child(
        &self,
        h: &Hydrated,
        path: &str,
        input: Map<String, Value>,
    ) -> Result<mayfly_types::ExecutionId, RuntimeError> {
        let req = ChildReq {
            command_id: h.block.command_id.clone(),
            attempt: h.attempt,
            path: path.to_owned(),
            input,
        };
        self.call("child", &req).await
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

impl crate::agent::AgentHub for RemoteCoordinator {
    fn report(&self, report: mayfly_control::rollout::AgentReport) -> crate::agent::HubFuture<'_> {
        Box::pin(async move { self.agent_report(&report).await.map_err(|e| e.to_string()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(i: usize, pad: usize) -> Block {
        Block {
            execution_id: mayfly_types::ExecutionId("x".into()),
            command_id: format!("c{i}"),
            step: "s".repeat(pad.max(1)),
            index: Some(i),
            traceparent: None,
            request_id: None,
        }
    }

    fn ids(blocks: &[Block]) -> Vec<String> {
        blocks.iter().map(|b| b.command_id.clone()).collect()
    }

    #[test]
    fn dispatched_blocks_are_cut_into_messages_that_decode_back_in_order() {
        let blocks: Vec<Block> = (0..40).map(|i| block(i, 1)).collect();
        let msgs = groups(&blocks);
        assert_eq!(
            msgs.iter().map(|m| m.len).collect::<Vec<_>>(),
            [MAX_GROUP, MAX_GROUP, 40 - 2 * MAX_GROUP]
        );
        let mut back = Vec::new();
        for m in &msgs {
            let got = decode_group(&m.payload).expect("decodes");
            assert_eq!(got.len(), m.len);
            assert_eq!(m.first_id, got[0].command_id);
            back.extend(got);
        }
        assert_eq!(ids(&back), ids(&blocks));
        assert!(groups(&[]).is_empty());
    }

    #[test]
    fn messages_stay_under_their_byte_budget_and_a_large_block_travels_alone() {
        let blocks: Vec<Block> = (0..6).map(|i| block(i, MAX_GROUP_BYTES / 3)).collect();
        let msgs = groups(&blocks);
        // Two of these fill a message.
        assert_eq!(msgs.iter().map(|m| m.len).collect::<Vec<_>>(), [2, 2, 2]);
        assert!(msgs.iter().all(|m| m.payload.len() <= MAX_GROUP_BYTES));
        let big = [block(0, 1), block(1, MAX_GROUP_BYTES * 2), block(2, 1)];
        let msgs = groups(&big);
        assert_eq!(msgs.iter().map(|m| m.len).collect::<Vec<_>>(), [1, 1, 1]);
        assert!(msgs[1].payload.len() > MAX_GROUP_BYTES);
    }

    #[test]
    fn a_single_block_message_still_decodes() {
        let one = serde_json::to_vec(&block(7, 1)).expect("encode");
        assert_eq!(ids(&decode_group(&one).expect("decodes")), ["c7"]);
        assert_eq!(
            ids(&decode_group(b" [] ").expect("decodes")),
            Vec::<String>::new()
        );
        assert!(decode_group(b"{\"nope\": 1}").is_err());
        assert!(decode_group(b"[1, 2]").is_err());
        assert!(decode_group(b"").is_err());
    }
}
