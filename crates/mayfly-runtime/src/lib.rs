//! The embedded runtime: one process, SQLite event log, in-process durable queue.
//!
//! The block contract holds even here: commands are rows in the store (transactional
//! outbox), a worker *claims* one with a lease (`command.claimed`, `step.started`), runs it,
//! and its completion (`step.finished|step.failed`, `command.completed`) is appended in the
//! same transaction as the commands `decide()` derives from it. An expired lease is
//! redelivered; a completion from a superseded attempt is refused.

pub mod agent;
pub mod loader;
mod orchestrator;
pub mod payload;
pub mod remote;
pub mod retention;
pub mod trace;
pub mod worker;

use mayfly_dsl::Playbook;
use mayfly_engine::{ApplyError, Report};
use mayfly_store::{Store, StoreError};
use mayfly_tools::{Tools, ToolsConfig};
use mayfly_types::{Event, ExecutionId, StepFailed, StepFinished};
use orchestrator::{Msg, Orchestrator};
use serde_json::{Map, Value};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{Mutex, broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;

pub use loader::{LoadError, PlaybookIndex, Registered, load_file, resolve_child};

/// Runtime failures.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RuntimeError {
    #[error("store: {0}")]
    Store(String),
    #[error("{0}")]
    Corrupt(String),
    #[error("{0}")]
    Apply(#[from] ApplyError),
    #[error("unknown execution {0}")]
    Unknown(ExecutionId),
    #[error("execution {0} has already ended")]
    Ended(ExecutionId),
    #[error("unknown callback token")]
    CallbackUnknown,
    #[error("this callback token was already used (or timed out)")]
    CallbackUsed,
    #[error("stale claim: {0}")]
    StaleClaim(String),
    #[error("{0}")]
    Invalid(String),
    /// More than the transport carries in one message.
    #[error("{0}")]
    TooLarge(String),
    #[error("the runtime has shut down")]
    Closed,
    /// The store refused the write: another process appends to the log now.
    #[error("epoch mismatch: {0}")]
    Fenced(String),
    /// A block of an execution this log never had (a message from another deployment's
    /// log, or a forged one): refused, never acknowledged.
    #[error("not this log's execution: {0}")]
    NotOwned(String),
    /// A child playbook could not be started (`child_depth_exceeded`, …).
    #[error("{}: {}", .0.code, .0.message)]
    Child(mayfly_types::ErrorInfo),
}

impl From<StoreError> for RuntimeError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Corrupt(m) => RuntimeError::Corrupt(m),
            StoreError::Fenced(m) => RuntimeError::Fenced(m),
            other => RuntimeError::Store(other.to_string()),
        }
    }
}

impl From<mayfly_trust::TrustError> for RuntimeError {
    fn from(e: mayfly_trust::TrustError) -> Self {
        RuntimeError::Corrupt(e.to_string())
    }
}

/// One unit of work for a worker: a command of an execution (also the queue message).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Block {
    pub execution_id: ExecutionId,
    pub command_id: String,
    pub step: String,
    pub index: Option<usize>,
    /// W3C trace context of the command's span (when the execution is traced): the
    /// worker's block span continues that trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// The request that started the execution (for the worker's logs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// A claimed block with everything needed to run it (the hydrated scope).
#[derive(Clone, Debug)]
pub struct Hydrated {
    pub block: Block,
    /// The execution's tenant (keychain lookups are scoped to it).
    pub tenant: String,
    pub attempt: u32,
    pub playbook: Arc<Playbook>,
    pub context: Map<String, Value>,
    pub lease: Duration,
    /// Policy budgets of the execution (a step's timeout and a task's attempts are capped).
    pub limits: Option<mayfly_types::Limits>,
}

/// A worker's result for a claimed block.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Completion {
    pub block: Block,
    pub attempt: u32,
    pub worker: String,
    pub outcome: Result<StepFinished, StepFailed>,
}

/// The answer to a claim.
#[derive(Clone, Debug)]
pub enum Claim {
    /// Run it: the claim holds a lease of `lease` for attempt `attempt`.
    Granted(Box<Hydrated>),
    /// Nothing to run: the command is completed, abandoned, or its execution is not live
    /// here (a resume re-issues what is still open). The delivery can be dropped.
    Done,
    /// Another claim holds a valid lease for this long; deliver again later.
    Busy(Duration),
}

/// Default for [`RuntimeConfig::max_attempts`].
/// Default of [`RuntimeConfig::max_children`].
pub const DEFAULT_MAX_CHILDREN: u64 = 100_000;

/// Events one execution may append unless a policy sets fewer (`limits.max_events`): far
/// above a million-item loop's, far below what would exhaust a log (a step routed back to
/// itself forever stops here).
pub const DEFAULT_MAX_EVENTS: u64 = 20_000_000;

pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;

/// Tuning of the embedded runtime.
#[derive(Clone)]
pub struct RuntimeConfig {
    /// Concurrent blocks (worker tasks) in this process; 0 = none (external workers only).
    pub workers: usize,
    /// How long a claim stays valid without a heartbeat.
    pub lease: Duration,
    /// Claims of one block (worker deaths, lapsed leases) after which the step fails with
    /// `worker_lost` instead of being handed out again.
    pub max_attempts: u32,
    pub tools: ToolsConfig,
    pub worker_id: String,
    /// Master key for keychain resolution inside blocks, in each execution's tenant
    /// (None: steps that use the keychain fail closed).
    pub keychain: Option<mayfly_trust::keychain::MasterKey>,
    /// Distributed dispatch: commands are published to this queue (for `mayfly worker`
    /// processes) instead of the in-process channel; `workers` must then be 0.
    pub queue: Option<Arc<dyn mayfly_queue::CommandQueue>>,
    /// The shared cache: large engine-made payloads (loop aggregates, inline results) and
    /// in-process workers' results go there (None: everything stays inline).
    pub cache: Option<Arc<mayfly_cache::Payloads>>,
    /// The process's data-plane agent: in-process workers enforce the policy bundle it
    /// applied (None: no bundle enforcement, as for a one-shot `mayfly run`).
    pub agent: Option<Arc<agent::Agent>>,
    /// Children come from the parent tenant's catalog only, never from files of this host
    /// (a server). Otherwise (`mayfly run`, which registers its playbook tree into the
    /// catalog first: [`PlaybookIndex::register`]) a child not in the catalog is looked for
    /// as a file beside its parent's. Looked up off the appender either way.
    pub children_from_catalog: bool,
    /// Most child executions one root execution may start, its whole tree counted (a
    /// playbook that calls itself in a loop grows exponentially long before it is deep).
    pub max_children: u64,
    /// Most events one execution may append (a policy's `limits.max_events` can only
    /// lower it); past it the execution fails `event_limit_exceeded`.
    pub max_events: u64,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        RuntimeConfig {
            workers: 16,
            lease: Duration::from_secs(30),
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            tools: ToolsConfig {
                python_pool: cpus.max(2),
                ..Default::default()
            },
            worker_id: format!("local-{}", std::process::id()),
            keychain: None,
            queue: None,
            cache: None,
            agent: None,
            max_children: DEFAULT_MAX_CHILDREN,
            max_events: DEFAULT_MAX_EVENTS,
            children_from_catalog: false,
        }
    }
}

/// A cheap, cloneable handle to the orchestrator (what workers use).
#[derive(Clone)]
pub struct RuntimeHandle {
    tx: mpsc::UnboundedSender<Msg>,
    pending: Arc<AtomicU64>,
    store: Arc<dyn Store>,
    blocks: Arc<Mutex<mpsc::UnboundedReceiver<Block>>>,
    events: broadcast::Sender<Arc<Event>>,
    queue_health: remote::QueueHealth,
    /// Where remote workers' agents report (set once the control plane is up).
    hub: Arc<std::sync::OnceLock<Arc<dyn agent::AgentHub>>>,
    stats: Arc<QueueStats>,
    /// The command channel this runtime serves (distributed mode).
    channel: Arc<std::sync::OnceLock<remote::Channel>>,
}

impl RuntimeHandle {
    /// Route remote agents' reports (the `agent` RPC verb) to `hub`.
    pub fn set_agent_hub(&self, hub: Arc<dyn agent::AgentHub>) {
        let _ = self.hub.set(hub);
    }

    pub(crate) fn agent_hub(&self) -> Option<&Arc<dyn agent::AgentHub>> {
        self.hub.get()
    }

    pub(crate) fn set_channel(&self, channel: remote::Channel) {
        let _ = self.channel.set(channel);
    }

    /// The command channel served (log identity, stream, refusals), in distributed mode.
    pub fn channel(&self) -> Option<remote::ChannelReading> {
        self.channel.get().map(remote::Channel::reading)
    }

    pub(crate) fn channel_refused(&self, reason: &'static str, what: String) {
        match self.channel.get() {
            Some(c) => c.refuse(reason, what),
            None => tracing::warn!(reason, "{what}"),
        }
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Msg,
    ) -> Result<T, RuntimeError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).map_err(|_| RuntimeError::Closed)?;
        rx.await.map_err(|_| RuntimeError::Closed)
    }

    /// Start an execution; returns once `execution.requested` (and everything `decide`
    /// derived from it) is durable.
    pub async fn start(
        &self,
        pb: Arc<Playbook>,
        overrides: Map<String, Value>,
        request_id: Option<String>,
    ) -> Result<ExecutionId, RuntimeError> {
        self.start_as(pb, overrides, request_id, None).await
    }

    /// Start an execution owned by `tenant` (None = the default tenant).
    pub async fn start_as(
        &self,
        pb: Arc<Playbook>,
        overrides: Map<String, Value>,
        request_id: Option<String>,
        tenant: Option<String>,
    ) -> Result<ExecutionId, RuntimeError> {
        self.start_limited(pb, overrides, request_id, tenant, None, None)
            .await
    }

    /// Start an execution owned by `tenant` under the policy budgets `limits` (recorded in
    /// `execution.requested`, enforced on every block, inherited by children), traced as a
    /// child of `traceparent` (the starting request's span) when given.
    pub async fn start_limited(
        &self,
        pb: Arc<Playbook>,
        overrides: Map<String, Value>,
        request_id: Option<String>,
        tenant: Option<String>,
        limits: Option<mayfly_types::Limits>,
        traceparent: Option<String>,
    ) -> Result<ExecutionId, RuntimeError> {
        self.ask(|reply| Msg::Start {
            pb,
            overrides,
            request_id,
            tenant,
            limits,
            traceparent,
            reply,
        })
        .await?
    }

    /// Load an unfinished execution from the log and continue it.
    pub async fn resume(&self, id: &ExecutionId) -> Result<(), RuntimeError> {
        self.ask(|reply| Msg::Resume {
            id: id.clone(),
            reply,
        })
        .await?
    }

    /// Wait for an execution to end (answers at once for one that already has).
    pub async fn wait(&self, id: &ExecutionId) -> Result<Report, RuntimeError> {
        self.ask(|reply| Msg::Wait {
            id: id.clone(),
            reply,
        })
        .await?
    }

    /// The next dispatched block (None once the runtime has shut down).
    pub async fn next_block(&self) -> Option<Block> {
        let b = self.blocks.lock().await.recv().await;
        if b.is_some() {
            self.pending.fetch_sub(1, Ordering::Relaxed);
        }
        b
    }

    /// Blocks dispatched and not yet taken by a worker (in process) or acknowledged by the
    /// queue (distributed).
    pub fn pending_publishes(&self) -> u64 {
        self.pending.load(Ordering::Relaxed)
    }

    /// Claim a block: granted (with a lease), done (nothing to run) or busy (another
    /// claim's lease is still valid).
    pub async fn claim(&self, block: Block, worker: &str) -> Result<Claim, RuntimeError> {
        self.ask(|reply| Msg::Claim {
            block,
            worker: worker.to_owned(),
            reply,
        })
        .await
    }

    /// The tenant of the execution a live claim `(command_id, attempt)` belongs to (None
    /// when no such claim holds a valid lease). Remote workers' keychain reads are
    /// authorised by this.
    pub async fn claim_tenant(&self, command_id: &str, attempt: u32) -> Option<String> {
        self.live_claim(command_id, attempt, false)
            .await
            .map(|(tenant, _)| tenant)
    }

    /// The template context of a live claim `(command_id, attempt)` (None when no such
    /// claim holds a valid lease): how a remote worker gets a context too large to travel
    /// with its claim.
    pub async fn claim_context(
        &self,
        command_id: &str,
        attempt: u32,
    ) -> Option<Map<String, Value>> {
        self.live_claim(command_id, attempt, true)
            .await
            .and_then(|(_, ctx)| ctx)
    }

    async fn live_claim(
        &self,
        command_id: &str,
        attempt: u32,
        context: bool,
    ) -> Option<orchestrator::LiveClaim> {
        self.ask(|reply| Msg::LiveClaim {
            command_id: command_id.to_owned(),
            attempt,
            context,
            reply,
        })
        .await
        .ok()
        .flatten()
    }

    /// Start a fire-and-forget child playbook from a task of the live claim `(command_id,
    /// attempt)` (a playbook task in a pipeline); the child's id once it is recorded.
    pub async fn start_task_child(
        &self,
        command_id: &str,
        attempt: u32,
        path: &str,
        input: Map<String, Value>,
    ) -> Result<ExecutionId, RuntimeError> {
        self.ask(|reply| Msg::StartChild {
            command_id: command_id.to_owned(),
            attempt,
            path: path.to_owned(),
            input,
            reply,
        })
        .await?
    }

    /// A stored playbook version by digest (remote workers fetch what they run).
    pub async fn playbook(
        &self,
        digest: &str,
    ) -> Result<Option<mayfly_store::StoredPlaybook>, RuntimeError> {
        Ok(self.store.get_playbook(digest).await?)
    }

    /// Record a block's outcome; refused when the claim was superseded.
    pub async fn complete(&self, c: Completion) -> Result<(), RuntimeError> {
        self.ask(|reply| Msg::Complete {
            completion: Box::new(c),
            reply,
        })
        .await?
    }

    /// Deliver a callback: the parked step completes with `payload` as its result.
    pub async fn callback(
        &self,
        token: &str,
        payload: Value,
    ) -> Result<(ExecutionId, String), RuntimeError> {
        self.ask(|reply| Msg::Callback {
            token: token.to_owned(),
            payload,
            reply,
        })
        .await?
    }

    /// Cancel a running execution (and its children); in-flight blocks' completions are
    /// then refused.
    pub async fn cancel(&self, id: &ExecutionId, reason: &str) -> Result<(), RuntimeError> {
        self.ask(|reply| Msg::Cancel {
            id: id.clone(),
            reason: reason.to_owned(),
            reply,
        })
        .await?
    }

    /// Heartbeat: extend the lease of a claim still being worked on.
    pub fn extend(&self, command_id: &str, attempt: u32) {
        let _ = self.tx.send(Msg::Extend {
            command_id: command_id.to_owned(),
            attempt,
        });
    }

    /// The work queue now: depth, blocks in flight, consumer lag.
    pub fn queue_stats(&self) -> QueueReading {
        self.stats.read()
    }

    /// False while commands cannot be published to the queue (distributed mode): they are
    /// retried, not lost, but no new block starts meanwhile.
    pub fn queue_up(&self) -> bool {
        self.queue_health.up()
    }

    /// Every committed event, as it is committed.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.events.subscribe()
    }
}

/// The orchestrator's outbox to the queue, counting what is dispatched but not yet taken
/// (in process) or acknowledged by JetStream (distributed): the pending publishes that
/// admission and `/v1/status` report.
#[derive(Clone)]
pub(crate) struct Dispatch {
    tx: mpsc::UnboundedSender<Block>,
    pending: Arc<AtomicU64>,
    pub(crate) stats: Arc<QueueStats>,
}

/// The work queue as the orchestrator last saw it (also exported as Prometheus gauges):
/// what the web UI's workers page and `/v1/workers` show.
#[derive(Debug, Default)]
pub struct QueueStats {
    pub(crate) in_flight: AtomicU64,
    pub(crate) depth: AtomicU64,
    pub(crate) live: AtomicU64,
    /// JetStream consumer lag + 1 (0: not measured, e.g. the in-process queue).
    pub(crate) lag: AtomicU64,
}

/// A reading of [`QueueStats`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct QueueReading {
    /// Blocks claimed by a worker and not yet completed.
    pub blocks_in_flight: u64,
    /// Blocks issued and waiting for a worker.
    pub depth: u64,
    /// Executions the orchestrator holds in memory (not terminal).
    pub live_executions: u64,
    /// Messages in the JetStream stream not yet acknowledged (distributed mode only).
    pub consumer_lag: Option<u64>,
}

impl QueueStats {
    pub fn read(&self) -> QueueReading {
        QueueReading {
            blocks_in_flight: self.in_flight.load(Ordering::Relaxed),
            depth: self.depth.load(Ordering::Relaxed),
            live_executions: self.live.load(Ordering::Relaxed),
            consumer_lag: self.lag.load(Ordering::Relaxed).checked_sub(1),
        }
    }
}

impl Dispatch {
    pub(crate) fn send(&self, b: Block) {
        if self.tx.send(b).is_ok() {
            self.pending.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The embedded runtime: orchestrator + in-process worker pool.
pub struct Runtime {
    handle: RuntimeHandle,
    pub tools: Arc<Tools>,
    workers: Vec<JoinHandle<()>>,
    orchestrator: JoinHandle<()>,
}

impl Runtime {
    /// Start the orchestrator and `config.workers` worker tasks on `store`.
    pub fn start(store: Arc<dyn Store>, config: RuntimeConfig) -> Result<Runtime, RuntimeError> {
        let tools = Arc::new({
            let t = Tools::new(config.tools.clone())
                .map_err(|e| RuntimeError::Invalid(e.to_string()))?;
            if let Some(e) = t.sandbox_error() {
                tracing::error!(error = %e.message, "no sandbox: shell, python and duckdb steps fail sandbox_unavailable");
                eprintln!(
                    "warning: {}: shell, python and duckdb steps fail until it is fixed",
                    e.message
                );
            }
            t
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let (btx, brx) = mpsc::unbounded_channel();
        let pending = Arc::new(AtomicU64::new(0));
        let stats = Arc::new(QueueStats::default());
        let (events, _) = broadcast::channel(16_384);
        let orch = Orchestrator::new(
            store.clone(),
            Dispatch {
                tx: btx,
                pending: pending.clone(),
                stats: stats.clone(),
            },
            events.clone(),
            config.lease,
            config.cache.clone(),
            config.max_attempts,
        );
        let mut orch = orch
            .with_inbox(tx.downgrade())
            .with_max_children(config.max_children)
            .with_max_events(config.max_events);
        if config.children_from_catalog {
            orch = orch.with_catalog_children();
        }
        let orchestrator = tokio::spawn(orch.run(rx));
        let mut background = Vec::new();
        let health = remote::QueueHealth::default();
        let blocks = match &config.queue {
            Some(q) => {
                if config.workers > 0 {
                    return Err(RuntimeError::Invalid(
                        "with a queue, workers are separate processes (workers must be 0)".into(),
                    ));
                }
                background.push(tokio::spawn(remote::publisher(
                    brx,
                    q.clone(),
                    health.clone(),
                    pending.clone(),
                )));
                background.push(tokio::spawn(remote::lag_reporter(
                    q.clone(),
                    health.clone(),
                    stats.clone(),
                )));
                // Nothing is dispatched in process: next_block() ends at once.
                mpsc::unbounded_channel().1
            }
            None => brx,
        };
        let handle = RuntimeHandle {
            tx,
            pending,
            store,
            blocks: Arc::new(Mutex::new(blocks)),
            events,
            queue_health: health,
            hub: Default::default(),
            channel: Default::default(),
            stats,
        };
        let mut workers: Vec<JoinHandle<()>> = (0..config.workers)
            .map(|i| {
                tokio::spawn(worker::worker_loop(
                    handle.clone(),
                    tools.clone(),
                    config.keychain.clone(),
                    config.cache.clone(),
                    config.agent.clone(),
                    format!("{}-{i}", config.worker_id),
                ))
            })
            .collect();
        workers.append(&mut background);
        Ok(Runtime {
            handle,
            tools,
            workers,
            orchestrator,
        })
    }

    pub fn handle(&self) -> RuntimeHandle {
        self.handle.clone()
    }

    /// Start and wait: the whole execution.
    pub async fn run(
        &self,
        pb: Playbook,
        overrides: Map<String, Value>,
    ) -> Result<Report, RuntimeError> {
        let id = self.handle.start(Arc::new(pb), overrides, None).await?;
        self.handle.wait(&id).await
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        for w in &self.workers {
            w.abort();
        }
        self.orchestrator.abort();
    }
}
