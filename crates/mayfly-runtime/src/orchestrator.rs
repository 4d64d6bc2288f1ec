//! The orchestrator: the single appender of the embedded runtime.
//!
//! One task owns the in-memory projections of live executions. Each *cycle* takes every
//! message that has arrived, turns them into events (sealed into each execution's hash
//! chain and applied at once), runs `decide()` on every new event (FIFO), collects the
//! resulting commands into the same batch (transactional outbox), and commits the batch
//! with one fsync. Only after the commit are commands dispatched, replies sent and events
//! published: nobody ever observes an effect that is not durable.

use crate::loader::{load_file, resolve_child};
use crate::{Block, Claim, Completion, Hydrated, RuntimeError};
use mayfly_dsl::{ParseOptions, Playbook, parse};
use mayfly_engine::{ExecState, Iteration, Report, context, decide};
use mayfly_store::{Batch, CommandOp, Store, StoredPlaybook};
use mayfly_types::{
    CacheRef, ChildRequested, ChildStarted, Draft, ErrorInfo, Event, EventKind, ExecutionFailed,
    ExecutionId, ExecutionRequested, ParentRef, StepFailed, StepFinished, command_id, now_ms,
};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, mpsc, oneshot};

pub(crate) enum Msg {
    Start {
        pb: Arc<Playbook>,
        overrides: Map<String, Value>,
        request_id: Option<String>,
        tenant: Option<String>,
        limits: Option<mayfly_types::Limits>,
        traceparent: Option<String>,
        reply: oneshot::Sender<Result<ExecutionId, RuntimeError>>,
    },
    Resume {
        id: ExecutionId,
        reply: oneshot::Sender<Result<(), RuntimeError>>,
    },
    Claim {
        block: Block,
        worker: String,
        reply: oneshot::Sender<Claim>,
    },
    /// A live claim's tenant (and, with `context`, its template context).
    LiveClaim {
        command_id: String,
        attempt: u32,
        context: bool,
        reply: oneshot::Sender<Option<LiveClaim>>,
    },
    Complete {
        completion: Box<Completion>,
        reply: oneshot::Sender<Result<(), RuntimeError>>,
    },
    Extend {
        command_id: String,
        attempt: u32,
    },
    Callback {
        token: String,
        payload: Value,
        reply: oneshot::Sender<Result<(ExecutionId, String), RuntimeError>>,
    },
    CallbackTimeout {
        token: String,
    },
    /// An awaited child's wait (its task's `timeout`) ran out.
    ChildTimeout {
        exec: ExecutionId,
        step: String,
        index: Option<usize>,
    },
    Cancel {
        id: ExecutionId,
        reason: String,
        reply: oneshot::Sender<Result<(), RuntimeError>>,
    },
    Wait {
        id: ExecutionId,
        reply: oneshot::Sender<Result<Report, RuntimeError>>,
    },
    /// A child playbook looked up in the catalog (off the appender) for `ask`.
    ChildResolved {
        ask: Box<ChildAsk>,
        then: ChildThen,
        found: Result<Arc<Playbook>, ErrorInfo>,
    },
    /// A task of a running block starts a fire-and-forget child.
    StartChild {
        command_id: String,
        attempt: u32,
        path: String,
        input: Map<String, Value>,
        reply: oneshot::Sender<Result<ExecutionId, RuntimeError>>,
    },
}

/// A live claim's tenant and, when asked for, its template context.
pub(crate) type LiveClaim = (String, Option<Map<String, Value>>);

/// A child playbook asked for by step `step` (item `index`) of `parent`.
pub(crate) struct ChildAsk {
    parent: ExecutionId,
    step: String,
    index: Option<usize>,
    path: String,
    input: Map<String, Value>,
    /// A root of its own (linked by `origin`), not awaited.
    detached: bool,
    /// Started by a pipeline task (its `child.started` is not awaited by the step).
    from_task: bool,
}

/// Who hears how a child start went.
pub(crate) enum ChildThen {
    /// The step that requested it (`child.requested`): a failure fails the step; a detached
    /// child's start is its result.
    Step,
    /// A pipeline task of a running block, waiting for the child's id.
    Task(oneshot::Sender<Result<ExecutionId, RuntimeError>>),
}

/// Most executions one chain of child playbooks may nest (the root counts as one).
pub const MAX_CHILD_DEPTH: usize = 16;

struct Exec {
    pb: Arc<Playbook>,
    st: ExecState,
    request_id: Option<String>,
    source: Option<String>,
    /// Trace context its commands are issued under (in memory only: after a restart the
    /// execution's remaining blocks start fresh traces).
    traceparent: Option<String>,
}

/// What a new execution starts from.
struct Start {
    pb: Arc<Playbook>,
    workload: Map<String, Value>,
    parent: Option<ParentRef>,
    /// A fire-and-forget child's starter (lineage only; see `ExecutionRequested::origin`).
    origin: Option<ParentRef>,
    request_id: Option<String>,
    source: Option<String>,
    tenant: Option<String>,
    limits: Option<mayfly_types::Limits>,
    traceparent: Option<String>,
}

/// The span of a command being issued (a child of the execution's trace, when traced):
/// its context travels in the block, so the worker's span continues the trace. Returns the
/// block's trace context and request id.
fn command_trace(
    x: &Exec,
    command_id: &str,
    step: &str,
    index: Option<usize>,
) -> (Option<String>, Option<String>) {
    let Some(parent) = &x.traceparent else {
        return (None, x.request_id.clone());
    };
    let span = tracing::info_span!(
        "command",
        otel.name = %format!("command {step}"),
        execution_id = %x.st.execution_id,
        step = %step,
        index = ?index,
        command_id = %command_id,
        tenant = %x.st.tenant,
        request_id = ?x.request_id,
    );
    crate::trace::set_parent(&span, parent);
    (crate::trace::traceparent(&span), x.request_id.clone())
}

struct Lease {
    attempt: u32,
    deadline: Instant,
    block: Block,
}

enum Reply {
    Called(
        oneshot::Sender<Result<(ExecutionId, String), RuntimeError>>,
        (ExecutionId, String),
    ),
    Started(
        oneshot::Sender<Result<ExecutionId, RuntimeError>>,
        ExecutionId,
    ),
    Resumed(oneshot::Sender<Result<(), RuntimeError>>),
    Claimed(oneshot::Sender<Claim>, Box<Hydrated>),
    Completed(oneshot::Sender<Result<(), RuntimeError>>),
}

#[derive(Default)]
struct Cycle {
    batch: Batch,
    /// Events awaiting decide: (execution, index into `batch.events`).
    queue: VecDeque<(ExecutionId, usize)>,
    dispatch: Vec<Block>,
    replies: Vec<Reply>,
    finished: Vec<ExecutionId>,
    /// Executions loaded from the log this cycle (dropped again if the commit fails).
    loaded: Vec<ExecutionId>,
    /// Payloads split off engine-made events, stored before the batch commits so that
    /// every ref in the log points at stored bytes.
    blobs: Vec<(String, mayfly_cache::Blob)>,
    fatal: Option<RuntimeError>,
}

pub(crate) struct Orchestrator {
    store: Arc<dyn Store>,
    execs: HashMap<ExecutionId, Exec>,
    leases: HashMap<String, Lease>,
    dispatch: crate::Dispatch,
    events: broadcast::Sender<Arc<Event>>,
    waiters: HashMap<ExecutionId, Vec<oneshot::Sender<Result<Report, RuntimeError>>>>,
    lease: Duration,
    /// Parked steps by callback token (rebuilt from the log on resume).
    callbacks: HashMap<String, ExecutionId>,
    /// Tokens already used or expired: a replay answers "used", not "unknown".
    spent: std::collections::HashSet<String>,
    /// Executions dropped from memory by a failed commit, reloaded from the log as soon as
    /// the store answers again (the store going away must not strand them).
    reload: std::collections::BTreeSet<ExecutionId>,
    /// Where large engine-made payloads (loop aggregates, inline results) go.
    cache: Option<Arc<mayfly_cache::Payloads>>,
    /// Claims of one command after which it fails with `worker_lost`.
    max_attempts: u32,
    /// Children come from the parent tenant's catalog only (a server); otherwise (`mayfly
    /// run`, which registers its tree there) a child not in the catalog is looked for as a
    /// file beside its parent's. Either way by a task off the appender, which answers on
    /// `me` (`Msg::ChildResolved`).
    catalog_children: bool,
    me: Option<mpsc::WeakUnboundedSender<Msg>>,
    /// Child executions started per root execution in this process's life, and the most
    /// allowed (see `RuntimeConfig::max_children`).
    children_started: HashMap<ExecutionId, u64>,
    max_children: u64,
    /// Events one execution may append (see `RuntimeConfig::max_events`).
    max_events: u64,
    /// Each live child's execution tree (its root) and depth (the root is 1), kept while it
    /// runs: a fire-and-forget child outlives its starter, and the depth and count limits
    /// must still see the whole chain.
    lineage: HashMap<ExecutionId, (ExecutionId, usize)>,
    /// Executions with an awaited child whose wait is bounded (see `child_deadlines`).
    child_timers: std::collections::BTreeSet<ExecutionId>,
    /// Live children per tree root (the root's count is dropped once none is left).
    tree_live: HashMap<ExecutionId, u64>,
}

impl Orchestrator {
    pub(crate) fn new(
        store: Arc<dyn Store>,
        dispatch: crate::Dispatch,
        events: broadcast::Sender<Arc<Event>>,
        lease: Duration,
        cache: Option<Arc<mayfly_cache::Payloads>>,
        max_attempts: u32,
    ) -> Self {
        Orchestrator {
            store,
            execs: HashMap::new(),
            leases: HashMap::new(),
            dispatch,
            events,
            waiters: HashMap::new(),
            lease,
            callbacks: HashMap::new(),
            spent: std::collections::HashSet::new(),
            reload: std::collections::BTreeSet::new(),
            cache,
            max_attempts: max_attempts.max(1),
            catalog_children: false,
            me: None,
            children_started: HashMap::new(),
            max_children: crate::DEFAULT_MAX_CHILDREN,
            max_events: crate::DEFAULT_MAX_EVENTS,
            lineage: HashMap::new(),
            child_timers: std::collections::BTreeSet::new(),
            tree_live: HashMap::new(),
        }
    }

    pub(crate) fn with_max_events(mut self, max: u64) -> Self {
        self.max_events = max.max(16);
        self
    }

    pub(crate) fn with_max_children(mut self, max: u64) -> Self {
        self.max_children = max.max(1);
        self
    }

    /// `me` reaches this orchestrator's own inbox (lookups off the appender answer there).
    pub(crate) fn with_inbox(mut self, me: mpsc::WeakUnboundedSender<Msg>) -> Self {
        self.me = Some(me);
        self
    }

    /// Resolve children in the tenant catalog only (never on this host's disk).
    pub(crate) fn with_catalog_children(mut self) -> Self {
        self.catalog_children = true;
        self
    }

    pub(crate) async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Msg>) {
        let period = (self.lease / 4).clamp(Duration::from_millis(20), Duration::from_millis(500));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                m = rx.recv() => {
                    let Some(m) = m else { break };
                    let mut msgs = vec![m];
                    while msgs.len() < 4096 {
                        match rx.try_recv() {
                            Ok(m) => msgs.push(m),
                            Err(_) => break,
                        }
                    }
                    self.cycle(msgs).await;
                }
                _ = tick.tick() => {
                    let timeouts = self.reap();
                    if !timeouts.is_empty() {
                        self.cycle(timeouts).await;
                    }
                    if !self.reload.is_empty() {
                        self.reload_dropped().await;
                    }
                }
            }
        }
    }

    /// Redeliver commands whose lease expired (the worker died or hung).
    /// Redeliver expired leases; return the callbacks whose timeout has passed.
    fn reap(&mut self) -> Vec<Msg> {
        let wall = now_ms();
        let timed_out: Vec<Msg> = self
            .callbacks
            .iter()
            .filter(|(token, exec)| {
                self.execs
                    .get(*exec)
                    .and_then(|x| x.st.waiting.get(*token))
                    .and_then(|w| w.timeout_ms.map(|t| w.since + t <= wall))
                    .unwrap_or(false)
            })
            .map(|(token, _)| Msg::CallbackTimeout {
                token: token.clone(),
            })
            .collect();
        let mut timed_out = timed_out;
        let execs = &self.execs;
        self.child_timers.retain(|id| {
            let Some(x) = execs.get(id).filter(|x| !x.st.status.is_terminal()) else {
                return false;
            };
            for ((step, index), deadline) in &x.st.child_deadlines {
                if *deadline <= wall {
                    timed_out.push(Msg::ChildTimeout {
                        exec: id.clone(),
                        step: step.clone(),
                        index: *index,
                    });
                }
            }
            !x.st.child_deadlines.is_empty()
        });
        let now = Instant::now();
        let expired: Vec<String> = self
            .leases
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for k in expired {
            if let Some(l) = self.leases.remove(&k) {
                tracing::warn!(command = %k, attempt = l.attempt, "lease expired; redelivering");
                self.dispatch.send(l.block);
            }
        }
        timed_out
    }

    async fn cycle(&mut self, msgs: Vec<Msg>) {
        let mut c = Cycle::default();
        for m in msgs {
            match m {
                Msg::Start {
                    pb,
                    overrides,
                    request_id,
                    tenant,
                    limits,
                    traceparent,
                    reply,
                } => {
                    let id = ExecutionId(uuid::Uuid::now_v7().to_string());
                    let mut workload = pb.workload.clone();
                    workload.extend(overrides);
                    let source = Some(pb.file.clone());
                    c.batch.playbooks.push(stored(&pb));
                    let start = Start {
                        pb,
                        workload,
                        parent: None,
                        origin: None,
                        request_id,
                        source,
                        tenant,
                        limits,
                        traceparent,
                    };
                    self.start_exec(&mut c, id.clone(), start);
                    c.replies.push(Reply::Started(reply, id));
                }
                Msg::Resume { id, reply } => match self.resume(&mut c, &id).await {
                    Ok(()) => c.replies.push(Reply::Resumed(reply)),
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                },
                Msg::Claim {
                    block,
                    worker,
                    reply,
                } => match self.claim(&mut c, block, &worker) {
                    Claim::Granted(h) => c.replies.push(Reply::Claimed(reply, h)),
                    other => {
                        let _ = reply.send(other);
                    }
                },
                Msg::LiveClaim {
                    command_id,
                    attempt,
                    context,
                    reply,
                } => {
                    let live = self.live_lease(&command_id, attempt).and_then(|l| {
                        let x = self.execs.get(&l.block.execution_id)?;
                        let ctx = match context {
                            true => {
                                let index = x.st.commands.get(&command_id)?.index;
                                Some(block_context(x, &l.block.step, index))
                            }
                            false => None,
                        };
                        Some((x.st.tenant.clone(), ctx))
                    });
                    let _ = reply.send(live);
                }
                Msg::StartChild {
                    command_id,
                    attempt,
                    path,
                    input,
                    reply,
                } => {
                    let block = self
                        .live_lease(&command_id, attempt)
                        .map(|l| l.block.clone());
                    let Some(b) = block else {
                        let _ = reply.send(Err(RuntimeError::StaleClaim(format!(
                            "no live claim {command_id}#{attempt} (no child started)"
                        ))));
                        continue;
                    };
                    let ask = ChildAsk {
                        parent: b.execution_id.clone(),
                        step: b.step.clone(),
                        index: b.index,
                        path,
                        input,
                        detached: true,
                        from_task: true,
                    };
                    self.request_child(&mut c, ask, ChildThen::Task(reply));
                }
                Msg::ChildResolved { ask, then, found } => {
                    let r = found.and_then(|pb| self.launch_child(&mut c, &ask, pb));
                    self.child_outcome(&mut c, *ask, then, r);
                }
                Msg::Complete { completion, reply } => match self.complete(&mut c, *completion) {
                    Ok(()) => c.replies.push(Reply::Completed(reply)),
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                },
                Msg::Extend {
                    command_id,
                    attempt,
                } => {
                    if let Some(l) = self.leases.get_mut(&command_id)
                        && l.attempt == attempt
                    {
                        l.deadline = Instant::now() + self.lease;
                        let lease_until = now_ms() + self.lease.as_millis() as u64;
                        c.batch.commands.push(CommandOp::Extend {
                            command_id,
                            lease_until,
                        });
                    }
                }
                Msg::Callback {
                    token,
                    payload,
                    reply,
                } => match self.take_callback(&token) {
                    Some((exec, step, index)) => {
                        let got = Draft::new(
                            EventKind::CallbackReceived,
                            json!({"index": index, "token": token}),
                        );
                        let f = StepFinished {
                            index,
                            result: payload,
                            set: Map::new(),
                            inline: false,
                            duration_ms: None,
                            logs: None,
                        };
                        let done = Draft::new(EventKind::StepFinished, json!(f));
                        self.emit(
                            &mut c,
                            &exec,
                            vec![got.step(&step), done.step(&step)],
                            "callback",
                        );
                        c.replies.push(Reply::Called(reply, (exec, step)));
                    }
                    None => {
                        let e = if self.spent.contains(&token) {
                            RuntimeError::CallbackUsed
                        } else {
                            RuntimeError::CallbackUnknown
                        };
                        let _ = reply.send(Err(e));
                    }
                },
                Msg::CallbackTimeout { token } => {
                    if let Some((exec, step, index)) = self.take_callback(&token) {
                        let f = StepFailed {
                            index,
                            error: ErrorInfo::new(
                                "callback_timeout",
                                format!("no callback arrived for step `{step}` in time"),
                            ),
                            duration_ms: None,
                            logs: None,
                        };
                        self.emit(
                            &mut c,
                            &exec,
                            vec![Draft::new(EventKind::StepFailed, json!(f)).step(&step)],
                            "engine",
                        );
                    }
                }
                Msg::ChildTimeout { exec, step, index } => {
                    self.child_timed_out(&mut c, &exec, step, index);
                }
                Msg::Cancel { id, reason, reply } => match self.execs.get(&id) {
                    Some(x) if !x.st.status.is_terminal() => {
                        let d =
                            Draft::new(EventKind::ExecutionCancelled, json!({"reason": reason}));
                        self.emit(&mut c, &id, vec![d], "engine");
                        c.replies.push(Reply::Completed(reply));
                    }
                    _ => {
                        let r = match self.report_from_store(&id).await {
                            Ok(r) if r.status.is_terminal() => Err(RuntimeError::Ended(id.clone())),
                            Ok(_) => Err(RuntimeError::Invalid(format!(
                                "execution {id} is not running in this process"
                            ))),
                            Err(e) => Err(e),
                        };
                        let _ = reply.send(r);
                    }
                },
                Msg::Wait { id, reply } => match self.execs.get(&id) {
                    Some(_) => self.waiters.entry(id).or_default().push(reply),
                    None => {
                        // Not live: answer from the log.
                        let r = self.report_from_store(&id).await;
                        let _ = reply.send(r);
                    }
                },
            }
            self.drain(&mut c);
        }
        self.commit(c).await;
    }

    async fn commit(&mut self, c: Cycle) {
        let Cycle {
            batch,
            dispatch,
            replies,
            finished,
            fatal,
            loaded,
            blobs,
            ..
        } = c;
        let batch = Arc::new(batch);
        let began = Instant::now();
        let stored = match (&fatal, &self.cache) {
            (None, Some(p)) => store_blobs(p, blobs).await,
            _ => Ok(()),
        };
        let result = match fatal.map(Err).unwrap_or(stored) {
            Err(e) => Err(e),
            Ok(()) => self
                .store
                .append(batch.clone())
                .await
                .map_err(RuntimeError::from),
        };
        if result.is_ok() && !batch.events.is_empty() {
            metrics::histogram!("mayfly_event_append_seconds")
                .record(began.elapsed().as_secs_f64());
            metrics::counter!("mayfly_events_appended_total").increment(batch.events.len() as u64);
        }
        let batch = Arc::try_unwrap(batch).unwrap_or_else(|b| (*b).clone());
        if let Err(e) = result {
            // In-memory state ran ahead of the log: forget the executions this cycle touched
            // so they are reloaded from the log (resume) rather than trusted.
            tracing::error!(error = %e, "commit failed; dropping in-memory state of affected executions");
            let touched: std::collections::HashSet<ExecutionId> = batch
                .events
                .iter()
                .map(|e| e.execution_id.clone())
                .chain(loaded)
                .collect();
            for id in &touched {
                self.execs.remove(id);
                self.leases.retain(|_, l| &l.block.execution_id != id);
                self.reload.insert(id.clone());
            }
            for r in replies {
                match r {
                    Reply::Started(tx, _) => {
                        let _ = tx.send(Err(e.clone()));
                    }
                    Reply::Resumed(tx) | Reply::Completed(tx) => {
                        let _ = tx.send(Err(e.clone()));
                    }
                    Reply::Claimed(tx, _) => {
                        // Not durable, so not granted; the block is delivered again.
                        let _ = tx.send(Claim::Busy(Duration::from_secs(1)));
                    }
                    Reply::Called(tx, _) => {
                        let _ = tx.send(Err(e.clone()));
                    }
                }
            }
            for id in touched {
                for w in self.waiters.remove(&id).unwrap_or_default() {
                    let _ = w.send(Err(e.clone()));
                }
            }
            return;
        }
        for b in dispatch {
            self.dispatch.send(b);
        }
        for r in replies {
            match r {
                Reply::Started(tx, id) => {
                    let _ = tx.send(Ok(id));
                }
                Reply::Resumed(tx) | Reply::Completed(tx) => {
                    let _ = tx.send(Ok(()));
                }
                Reply::Claimed(tx, h) => {
                    let _ = tx.send(Claim::Granted(h));
                }
                Reply::Called(tx, v) => {
                    let _ = tx.send(Ok(v));
                }
            }
        }
        if self.events.receiver_count() > 0 {
            for e in batch.events {
                let _ = self.events.send(Arc::new(e));
            }
        }
        for id in finished {
            if let Some(x) = self.execs.remove(&id) {
                let report = x.st.report();
                for w in self.waiters.remove(&id).unwrap_or_default() {
                    let _ = w.send(Ok(report.clone()));
                }
            }
            self.leases.retain(|_, l| l.block.execution_id != id);
        }
        self.record_gauges();
    }

    /// Claim a parked step's token (one time): (execution, step, index).
    /// The lease of claim `(command_id, attempt)` while it holds.
    fn live_lease(&self, command_id: &str, attempt: u32) -> Option<&Lease> {
        self.leases
            .get(command_id)
            .filter(|l| l.attempt == attempt && l.deadline > Instant::now())
    }

    fn take_callback(&mut self, token: &str) -> Option<(ExecutionId, String, Option<usize>)> {
        let exec = self.callbacks.get(token)?.clone();
        let w = self
            .execs
            .get(&exec)
            .filter(|x| !x.st.status.is_terminal())?
            .st
            .waiting
            .get(token)?
            .clone();
        self.callbacks.remove(token);
        self.spent.insert(token.to_owned());
        Some((exec, w.step, w.index))
    }

    /// Autoscaling signals: blocks claimed and running, and blocks waiting for a worker.
    fn record_gauges(&self) {
        let open: usize = self.execs.values().map(|x| x.st.commands.len()).sum();
        let depth = open.saturating_sub(self.leases.len());
        metrics::gauge!("mayfly_blocks_in_flight").set(self.leases.len() as f64);
        metrics::gauge!("mayfly_queue_depth").set(depth as f64);
        metrics::gauge!("mayfly_live_executions").set(self.execs.len() as f64);
        let s = &self.dispatch.stats;
        s.in_flight.store(
            self.leases.len() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        s.depth
            .store(depth as u64, std::sync::atomic::Ordering::Relaxed);
        s.live.store(
            self.execs.len() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    async fn report_from_store(&self, id: &ExecutionId) -> Result<Report, RuntimeError> {
        Ok(self.load(id).await?.1.report())
    }

    fn start_exec(&mut self, c: &mut Cycle, id: ExecutionId, start: Start) {
        let Start {
            pb,
            workload,
            parent,
            origin,
            request_id,
            source,
            tenant,
            limits,
            traceparent,
        } = start;
        let req = ExecutionRequested {
            path: pb.path.clone(),
            source: source.clone(),
            workload,
            parent,
            origin,
            tenant,
            limits,
            traceparent: traceparent.clone(),
        };
        let st = ExecState::new(id.clone());
        self.execs.insert(
            id.clone(),
            Exec {
                pb,
                st,
                request_id,
                source,
                traceparent,
            },
        );
        self.emit(
            c,
            &id,
            vec![Draft::new(EventKind::ExecutionRequested, json!(req))],
            "engine",
        );
    }

    /// Seal drafts into the execution's chain, apply them now, queue them for decide.
    fn emit(&mut self, c: &mut Cycle, id: &ExecutionId, drafts: Vec<Draft>, actor: &str) {
        let Some(x) = self.execs.get_mut(id) else {
            return;
        };
        // An execution that would append past its event budget fails instead (its own
        // end still goes in): a step routed back to itself forever must stop somewhere.
        let cap =
            x.st.limits
                .as_ref()
                .and_then(|l| l.max_events)
                .map_or(self.max_events, |m| m.min(self.max_events));
        let ends = drafts.iter().any(|d| {
            matches!(
                d.kind,
                EventKind::ExecutionCompleted
                    | EventKind::ExecutionFailed
                    | EventKind::ExecutionCancelled
            )
        });
        let drafts = if !ends
            && !x.st.status.is_terminal()
            && x.st.last_seq.saturating_add(drafts.len() as u64) > cap
        {
            let f = ExecutionFailed {
                step: None,
                error: ErrorInfo::new(
                    "event_limit_exceeded",
                    format!("the execution reached its limit of {cap} events (limits.max_events)"),
                ),
            };
            vec![Draft::new(EventKind::ExecutionFailed, json!(f))]
        } else {
            drafts
        };
        for d in drafts {
            let seq = x.st.last_seq + 1;
            let mut d = d;
            if d.kind == EventKind::StepWaiting
                && let Value::Object(m) = &mut d.payload
                && m.get("token")
                    .and_then(Value::as_str)
                    .is_none_or(str::is_empty)
            {
                // The one-time capability is minted here, not in decide(): decide stays pure.
                m.insert(
                    "token".into(),
                    Value::String(mayfly_trust::keychain::random_token("cb_")),
                );
            }
            if let Some(p) = &self.cache {
                // The request names the tenant the execution's state learns only from it.
                let tenant = match d.kind {
                    EventKind::ExecutionRequested => d
                        .payload
                        .get("tenant")
                        .and_then(Value::as_str)
                        .unwrap_or(mayfly_types::DEFAULT_TENANT)
                        .to_owned(),
                    _ => x.st.tenant.clone(),
                };
                // A loop's list goes by ref only where workers consume its items: the engine
                // renders inline steps' and child playbooks' items itself, and never reads
                // the cache.
                let by_ref = d.kind == EventKind::LoopStarted
                    && d.step
                        .as_deref()
                        .and_then(|n| x.pb.step(n))
                        .is_some_and(|s| {
                            !s.is_inline() && s.playbook_task().is_none() && s.wait_task().is_none()
                        });
                split_payload(&mut d, p.inline_limit(), by_ref, &tenant, &mut c.blobs);
            }
            let cmd = if d.kind == EventKind::CommandIssued {
                Some(command_id(id, seq))
            } else {
                d.command_id
            };
            let mut e = Event {
                execution_id: id.clone(),
                seq,
                kind: d.kind,
                step: d.step,
                attempt: d.attempt,
                command_id: cmd,
                at: now_ms(),
                actor: actor.to_owned(),
                request_id: x.request_id.clone(),
                playbook_digest: x.pb.digest.clone(),
                payload: d.payload,
                payload_ref: None,
                prev_hash: x.st.last_hash.clone(),
                hash: String::new(),
                position: None,
            };
            if let Err(err) = mayfly_trust::seal(&mut e) {
                c.fatal = Some(RuntimeError::Invalid(err.to_string()));
                return;
            }
            if let Err(err) = x.st.apply(&e) {
                c.fatal = Some(RuntimeError::Apply(err));
                return;
            }
            c.queue.push_back((id.clone(), c.batch.events.len()));
            c.batch.events.push(e);
        }
    }

    /// Run decide on every queued event, FIFO, performing the IO-side effects.
    fn drain(&mut self, c: &mut Cycle) {
        while let Some((id, i)) = c.queue.pop_front() {
            if c.fatal.is_some() {
                return;
            }
            let kind = c.batch.events[i].kind;
            match kind {
                EventKind::CommandIssued => {
                    let ev = &c.batch.events[i];
                    let (Some(cmd), Some(step)) = (ev.command_id.clone(), ev.step.clone()) else {
                        continue;
                    };
                    let index = ev
                        .payload
                        .get("index")
                        .and_then(Value::as_u64)
                        .map(|i| i as usize);
                    c.batch.commands.push(CommandOp::Insert {
                        command_id: cmd.clone(),
                        execution_id: id.clone(),
                        step: step.clone(),
                        index,
                    });
                    let (traceparent, request_id) = self
                        .execs
                        .get(&id)
                        .map(|x| command_trace(x, &cmd, &step, index))
                        .unwrap_or_default();
                    c.dispatch.push(Block {
                        execution_id: id.clone(),
                        command_id: cmd,
                        step,
                        index,
                        traceparent,
                        request_id,
                    });
                }
                EventKind::StepWaiting => {
                    if let Some(t) = c.batch.events[i]
                        .payload
                        .get("token")
                        .and_then(Value::as_str)
                    {
                        self.callbacks.insert(t.to_owned(), id.clone());
                    }
                }
                EventKind::ChildRequested => {
                    if c.batch.events[i].payload.get("timeout_ms").is_some() {
                        self.child_timers.insert(id.clone());
                    }
                    let live = self
                        .execs
                        .get(&id)
                        .is_some_and(|x| !x.st.status.is_terminal());
                    if live {
                        let ev = c.batch.events[i].clone();
                        self.start_child(c, &id, &ev);
                    }
                }
                EventKind::ExecutionCompleted
                | EventKind::ExecutionFailed
                | EventKind::ExecutionCancelled => {
                    let ev = c.batch.events[i].clone();
                    self.finish(c, &id, &ev);
                }
                _ => {}
            }
            let drafts = match self.execs.get(&id) {
                Some(x) => decide(&x.pb, &x.st, &c.batch.events[i]),
                None => continue,
            };
            if !drafts.is_empty() {
                self.emit(c, &id, drafts, "engine");
            }
        }
    }

    /// Record that the engine failed `step` (loop item `index`) of execution `id`.
    fn fail_step(
        &mut self,
        c: &mut Cycle,
        id: &ExecutionId,
        step: String,
        index: Option<usize>,
        error: ErrorInfo,
    ) {
        let f = StepFailed {
            index,
            error,
            duration_ms: None,
            logs: None,
        };
        self.emit(
            c,
            id,
            vec![Draft::new(EventKind::StepFailed, json!(f)).step(step)],
            "engine",
        );
    }

    fn start_child(&mut self, c: &mut Cycle, parent: &ExecutionId, ev: &Event) {
        let Some(px) = self.execs.get(parent) else {
            return;
        };
        let Ok(req) = serde_json::from_value::<ChildRequested>(ev.payload.clone()) else {
            return;
        };
        let step = ev.step.clone().unwrap_or_default();
        // NoETL's default: without `return_step`/`return_result` the parent does not wait.
        let detached = px
            .pb
            .step(&step)
            .and_then(|s| s.playbook_task())
            .is_some_and(|t| !t.waits_for_child());
        let ask = ChildAsk {
            parent: parent.clone(),
            step,
            index: req.index,
            path: req.path,
            input: req.input,
            detached,
            from_task: false,
        };
        self.request_child(c, ask, ChildThen::Step);
    }

    /// Tell whoever asked for a child how its start went.
    fn child_outcome(
        &mut self,
        c: &mut Cycle,
        ask: ChildAsk,
        then: ChildThen,
        r: Result<ExecutionId, ErrorInfo>,
    ) {
        match (then, r) {
            (ChildThen::Task(reply), Ok(id)) => c.replies.push(Reply::Started(reply, id)),
            (ChildThen::Task(reply), Err(e)) => {
                let _ = reply.send(Err(RuntimeError::Child(e)));
            }
            (ChildThen::Step, Err(e)) => self.fail_step(c, &ask.parent, ask.step, ask.index, e),
            (ChildThen::Step, Ok(child_id)) if ask.detached => {
                // NoETL's fire-and-forget result; the child runs on as a root of its own.
                let result = json!({
                    "status": "started",
                    "execution_id": child_id.0,
                    "path": ask.path,
                    "async": true,
                });
                let pref = ParentRef {
                    execution_id: ask.parent.clone(),
                    step: ask.step,
                    index: ask.index,
                };
                self.notify_parent(c, &pref, &child_id, Ok(result));
            }
            (ChildThen::Step, Ok(_)) => {}
        }
    }

    /// Start the child `ask` names: check the depth and count limits and the path, then
    /// find the playbook by a task off the appender — in the parent tenant's catalog (a
    /// server: only there), else beside the parent's file (`mayfly run`) — whose answer
    /// comes back as `Msg::ChildResolved` and launches it.
    fn request_child(&mut self, c: &mut Cycle, ask: ChildAsk, then: ChildThen) {
        if let Err(e) = self.child_allowed(&ask.parent, &ask.path) {
            return self.child_outcome(c, ask, then, Err(e));
        }
        let (tenant, source) = match self.execs.get(&ask.parent) {
            Some(x) => (x.st.tenant.clone(), x.source.clone()),
            None => (mayfly_types::DEFAULT_TENANT.to_owned(), None),
        };
        // Files beside the parent's: never on a server.
        let beside = (!self.catalog_children).then_some(source);
        let Some(me) = self.me.as_ref().and_then(|m| m.upgrade()) else {
            let e = ErrorInfo::new("child_load_failed", "the runtime is stopping");
            return self.child_outcome(c, ask, then, Err(e));
        };
        let store = self.store.clone();
        tokio::spawn(async move {
            let found = find_child(store.as_ref(), &tenant, &ask, beside).await;
            let _ = me.send(Msg::ChildResolved {
                ask: Box::new(ask),
                then,
                found,
            });
        });
    }

    /// The execution tree of live execution `parent` (its root) and how deep it is (the
    /// root is 1). Children started here know their tree; after a restart the parent chain
    /// is walked.
    fn tree_of(&self, parent: &ExecutionId) -> Option<(ExecutionId, usize)> {
        let px = self.execs.get(parent)?;
        if let Some((root, depth)) = self.lineage.get(parent) {
            return Some((root.clone(), *depth));
        }
        let mut depth = 1usize;
        let mut root = parent.clone();
        let mut up = px.st.parent.as_ref().map(|p| p.execution_id.clone());
        while let Some(pid) = up {
            depth += 1;
            up = self
                .execs
                .get(&pid)
                .and_then(|x| x.st.parent.as_ref().map(|p| p.execution_id.clone()));
            root = pid;
        }
        Some((root, depth))
    }

    /// When the chain of playbooks above `parent` already holds `path` (by catalog path):
    /// how the cycle reads, for the depth error (an unbounded recursion is the usual cause).
    fn cycle_of(&self, parent: &ExecutionId, path: &str) -> String {
        let key = |p: &str| {
            let (p, _) = mayfly_dsl::split_child_version(p);
            p.trim_start_matches("./")
                .trim_end_matches(".yaml")
                .trim_end_matches(".yml")
                .to_owned()
        };
        let mut chain = Vec::new();
        let mut up = Some(parent.clone());
        while let Some(id) = up {
            let Some(x) = self.execs.get(&id) else { break };
            chain.push(key(&x.pb.path));
            up = x.st.parent.as_ref().map(|p| p.execution_id.clone());
        }
        chain.reverse();
        let wanted = key(path);
        match chain.iter().rposition(|p| *p == wanted) {
            Some(i) => {
                let mut cycle: Vec<&str> = chain[i..].iter().map(String::as_str).collect();
                cycle.push(&wanted);
                format!(
                    ": a cycle — `{}` starts itself again ({}), each level one deeper",
                    wanted,
                    cycle.join(" → ")
                )
            }
            None => String::new(),
        }
    }

    /// May `parent` start child `path`: its tree's count and depth limits (a playbook that
    /// calls itself must end somewhere), and the path as rendered (checked like a literal
    /// one at validation). Counts the start.
    fn child_allowed(&mut self, parent: &ExecutionId, path: &str) -> Result<(), ErrorInfo> {
        let Some((root, depth)) = self.tree_of(parent) else {
            return Err(ErrorInfo::new(
                "child_load_failed",
                format!("execution {parent} is not live"),
            ));
        };
        let started = self.children_started.entry(root).or_insert(0);
        *started += 1;
        if *started > self.max_children {
            return Err(ErrorInfo::new(
                "child_limit_exceeded",
                format!(
                    "child playbook `{path}`: the execution tree already started {} child executions",
                    self.max_children
                ),
            ));
        }
        if depth >= MAX_CHILD_DEPTH {
            return Err(ErrorInfo::new(
                "child_depth_exceeded",
                format!(
                    "child playbook `{path}` would be {} levels deep; at most {MAX_CHILD_DEPTH} executions may nest{}",
                    depth + 1,
                    self.cycle_of(parent, path)
                ),
            ));
        }
        if let Some(why) = mayfly_dsl::child_path_refusal(path) {
            return Err(ErrorInfo::new("child_path_refused", why));
        }
        Ok(())
    }

    /// Start `child` for `ask`: its events, lineage and execution. A `detached` child is a
    /// root of its own (linked by `origin`); `from_task` marks its `child.started` as not
    /// awaited by the step.
    fn launch_child(
        &mut self,
        c: &mut Cycle,
        ask: &ChildAsk,
        child: Arc<Playbook>,
    ) -> Result<ExecutionId, ErrorInfo> {
        let (Some(px), Some((root, depth))) =
            (self.execs.get(&ask.parent), self.tree_of(&ask.parent))
        else {
            return Err(ErrorInfo::new(
                "child_load_failed",
                format!("execution {} is not live", ask.parent),
            ));
        };
        if px.st.status.is_terminal() {
            return Err(ErrorInfo::new(
                "child_load_failed",
                format!("execution {} has ended", ask.parent),
            ));
        }
        let parent = &ask.parent;
        let request_id = px.request_id.clone();
        let traceparent = px.traceparent.clone();
        let tenant = Some(px.st.tenant.clone());
        // A child runs under its parent's budgets.
        let limits = px.st.limits.clone();
        let child_id = ExecutionId(uuid::Uuid::now_v7().to_string());
        let mut workload = child.workload.clone();
        workload.extend(ask.input.clone());
        c.batch.playbooks.push(stored(&child));
        let pref = ParentRef {
            execution_id: parent.clone(),
            step: ask.step.clone(),
            index: ask.index,
        };
        let source = Some(child.file.clone());
        let started = ChildStarted {
            index: ask.index,
            child_execution_id: child_id.clone(),
            detached: ask.from_task,
        };
        self.emit(
            c,
            parent,
            vec![Draft::new(EventKind::ChildStarted, json!(started)).step(ask.step.clone())],
            "engine",
        );
        self.lineage
            .insert(child_id.clone(), (root.clone(), depth + 1));
        *self.tree_live.entry(root).or_insert(0) += 1;
        let (parent_ref, origin) = if ask.detached {
            (None, Some(pref))
        } else {
            (Some(pref), None)
        };
        let start = Start {
            pb: child,
            workload,
            parent: parent_ref,
            origin,
            request_id,
            source,
            tenant,
            limits,
            traceparent,
        };
        self.start_exec(c, child_id.clone(), start);
        Ok(child_id)
    }

    fn finish(&mut self, c: &mut Cycle, id: &ExecutionId, ev: &Event) {
        c.finished.push(id.clone());
        self.callbacks.retain(|_, e| e != id);
        let Some(x) = self.execs.get(id) else { return };
        // Abandoned commands (e.g. in-flight items of a failed loop) are closed, not left open.
        for cmd in x.st.commands.keys() {
            c.batch.commands.push(CommandOp::Done {
                command_id: cmd.clone(),
            });
            self.leases.remove(cmd);
        }
        // Children still running are cancelled with their parent: nothing is left orphaned.
        let live_children: Vec<ExecutionId> =
            x.st.children
                .values()
                .flatten()
                .filter(|c| {
                    self.execs
                        .get(*c)
                        .is_some_and(|cx| !cx.st.status.is_terminal())
                })
                .cloned()
                .collect();
        let parent = x.st.parent.clone();
        for child in live_children {
            let why = json!({"reason": format!("parent execution {id} ended")});
            self.emit(
                c,
                &child,
                vec![Draft::new(EventKind::ExecutionCancelled, why)],
                "engine",
            );
        }
        // The tree's child count lives as long as any of its executions does.
        match self.lineage.remove(id) {
            Some((root, _)) => {
                let left = self.tree_live.get_mut(&root).map(|n| {
                    *n = n.saturating_sub(1);
                    *n
                });
                let root_live = self
                    .execs
                    .get(&root)
                    .is_some_and(|r| !r.st.status.is_terminal());
                if left == Some(0) {
                    self.tree_live.remove(&root);
                    if !root_live {
                        self.children_started.remove(&root);
                    }
                }
            }
            None if !self.tree_live.contains_key(id) => {
                self.children_started.remove(id);
            }
            None => {}
        }
        let Some(parent) = parent else {
            return;
        };
        let outcome = match ev.kind {
            EventKind::ExecutionCompleted => {
                Ok(ev.payload.get("result").cloned().unwrap_or(Value::Null))
            }
            EventKind::ExecutionFailed => Err(ExecutionFailed::deserialize(&ev.payload)
                .map(|f| f.error)
                .unwrap_or_else(|_| ErrorInfo::new("child_failed", ev.kind.to_string()))),
            _ => Err(ErrorInfo::new(
                "cancelled",
                "the child execution was cancelled",
            )),
        };
        let outcome = match (self.execs.get(&parent.execution_id), self.execs.get(id)) {
            (Some(px), Some(cx)) => child_outcome(&px.pb, &parent, id, &cx.st, outcome),
            _ => outcome,
        };
        self.notify_parent(c, &parent, id, outcome);
    }

    /// An awaited child's wait ran out: NoETL's outcome for the step (`return_step`: a
    /// success `{status: timeout, execution_id, timeout_seconds}`; otherwise the step fails
    /// with `child_timeout`), and the child is cancelled (nothing is left orphaned).
    fn child_timed_out(
        &mut self,
        c: &mut Cycle,
        exec: &ExecutionId,
        step: String,
        index: Option<usize>,
    ) {
        let Some(x) = self.execs.get(exec).filter(|x| !x.st.status.is_terminal()) else {
            return;
        };
        let key = (step.clone(), index);
        let (Some(_), Some(Some(child))) =
            (x.st.child_deadlines.get(&key), x.st.children.get(&key))
        else {
            return;
        };
        let child = child.clone();
        let task = x.pb.step(&step).and_then(|s| s.playbook_task());
        let status_only = task.is_some_and(|t| t.returns_status());
        let timeout_s = task
            .and_then(|t| t.timeout_s)
            .or(x.pb.step(&step).and_then(|s| s.timeout_s))
            .unwrap_or_default();
        let draft = if status_only {
            let f = StepFinished {
                index,
                result: json!({
                    "status": "timeout",
                    "execution_id": child.0,
                    // As written: `timeout: 1` reads back as 1, not 1.0.
                    "timeout_seconds": if timeout_s.fract() == 0.0 {
                        json!(timeout_s as u64)
                    } else {
                        json!(timeout_s)
                    },
                }),
                set: Map::new(),
                inline: false,
                duration_ms: None,
                logs: None,
            };
            Draft::new(EventKind::StepFinished, json!(f))
        } else {
            let f = StepFailed {
                index,
                error: ErrorInfo::new(
                    "child_timeout",
                    format!("child execution {child} did not end within {timeout_s}s"),
                ),
                duration_ms: None,
                logs: None,
            };
            Draft::new(EventKind::StepFailed, json!(f))
        };
        self.emit(c, exec, vec![draft.step(step)], "engine");
        if self
            .execs
            .get(&child)
            .is_some_and(|cx| !cx.st.status.is_terminal())
        {
            let why =
                json!({"reason": format!("the parent step stopped waiting after {timeout_s}s")});
            self.emit(
                c,
                &child,
                vec![Draft::new(EventKind::ExecutionCancelled, why)],
                "engine",
            );
        }
    }

    /// Complete the parent step (or loop item) that awaits child `child`, unless the parent
    /// has ended or no longer waits for this child (a re-entered loop started a new one).
    fn notify_parent(
        &mut self,
        c: &mut Cycle,
        parent: &ParentRef,
        child: &ExecutionId,
        outcome: Result<Value, ErrorInfo>,
    ) {
        let Some(px) = self.execs.get(&parent.execution_id) else {
            return;
        };
        let awaited =
            px.st.children.get(&(parent.step.clone(), parent.index)) == Some(&Some(child.clone()));
        if px.st.status.is_terminal() || !awaited {
            return;
        }
        let draft = match outcome {
            Ok(result) => {
                let f = StepFinished {
                    index: parent.index,
                    result,
                    set: Map::new(),
                    inline: false,
                    duration_ms: None,
                    logs: None,
                };
                Draft::new(EventKind::StepFinished, json!(f))
            }
            Err(why) => {
                // A runaway recursion keeps its own code up the chain (one message, not
                // sixteen nested ones); any other failure is the child's.
                let error =
                    if why.code == "child_depth_exceeded" || why.code == "child_limit_exceeded" {
                        why
                    } else {
                        ErrorInfo::new(
                            "child_failed",
                            format!("child execution {child} failed: {why}"),
                        )
                    };
                let f = StepFailed {
                    index: parent.index,
                    error,
                    duration_ms: None,
                    logs: None,
                };
                Draft::new(EventKind::StepFailed, json!(f))
            }
        };
        self.emit(
            c,
            &parent.execution_id,
            vec![draft.step(parent.step.clone())],
            "engine",
        );
    }

    fn claim(&mut self, c: &mut Cycle, block: Block, worker: &str) -> Claim {
        let lease = self.lease;
        let Some(x) = self.execs.get(&block.execution_id) else {
            if self.reload.contains(&block.execution_id) {
                return Claim::Busy(Duration::from_secs(1));
            }
            return Claim::Done;
        };
        if x.st.status.is_terminal() {
            return Claim::Done;
        }
        // Completed already (duplicate delivery): ack without running.
        let Some(pending) = x.st.commands.get(&block.command_id) else {
            return Claim::Done;
        };
        if let Some(l) = self.leases.get(&block.command_id) {
            let now = Instant::now();
            if l.deadline > now {
                return Claim::Busy(l.deadline - now);
            }
        }
        // An item of an aborted or superseded loop run: close it without running it.
        if pending.index.is_some()
            && !x
                .st
                .loops
                .get(&block.step)
                .is_some_and(|l| l.accepts(pending.generation))
        {
            let done = Draft::new(EventKind::CommandCompleted, json!({"abandoned": true}))
                .step(&block.step)
                .command(&block.command_id, pending.attempt);
            c.batch.commands.push(CommandOp::Done {
                command_id: block.command_id.clone(),
            });
            self.emit(c, &block.execution_id, vec![done], "engine");
            return Claim::Done;
        }
        if pending.attempt >= self.max_attempts {
            // Claimed this often and never completed: the workers running it died or lost
            // their lease every time (a block that kills its worker, or none can finish it).
            // Fail the step so the playbook's routing decides, instead of retrying forever.
            let f = StepFailed {
                index: pending.index,
                error: ErrorInfo::new(
                    "worker_lost",
                    format!(
                        "the block was claimed {} times and never completed (its workers died or lost their lease)",
                        pending.attempt
                    ),
                ),
                duration_ms: None,
                logs: None,
            };
            let attempt = pending.attempt;
            let drafts = vec![
                Draft::new(EventKind::StepFailed, json!(f))
                    .step(&block.step)
                    .command(&block.command_id, attempt),
                Draft::new(EventKind::CommandCompleted, json!({}))
                    .step(&block.step)
                    .command(&block.command_id, attempt),
            ];
            c.batch.commands.push(CommandOp::Done {
                command_id: block.command_id.clone(),
            });
            self.leases.remove(&block.command_id);
            self.emit(c, &block.execution_id, drafts, "engine");
            return Claim::Done;
        }
        let attempt = pending.attempt + 1;
        let index = pending.index;
        let ctx = block_context(x, &block.step, index);
        let pb = x.pb.clone();
        let tenant = x.st.tenant.clone();
        let limits = x.st.limits.clone();
        let lease_until = now_ms() + lease.as_millis() as u64;
        let claimed = Draft::new(
            EventKind::CommandClaimed,
            json!({"worker": worker, "lease_ms": lease.as_millis() as u64}),
        )
        .step(&block.step)
        .command(&block.command_id, attempt);
        let started = Draft::new(EventKind::StepStarted, json!({"index": index}))
            .step(&block.step)
            .command(&block.command_id, attempt);
        self.emit(
            c,
            &block.execution_id,
            vec![claimed, started],
            &format!("worker:{worker}"),
        );
        c.batch.commands.push(CommandOp::Claim {
            command_id: block.command_id.clone(),
            worker: worker.to_owned(),
            lease_until,
            deliveries: attempt,
        });
        self.leases.insert(
            block.command_id.clone(),
            Lease {
                attempt,
                deadline: Instant::now() + lease,
                block: block.clone(),
            },
        );
        Claim::Granted(Box::new(Hydrated {
            tenant,
            block,
            attempt,
            playbook: pb,
            context: ctx,
            lease,
            limits,
        }))
    }

    /// Reload executions a failed commit dropped (each through its root, like `resume`).
    /// Those whose log cannot be read yet stay queued for the next tick.
    async fn reload_dropped(&mut self) {
        let ids: Vec<ExecutionId> = self.reload.iter().cloned().collect();
        let mut c = Cycle::default();
        for id in ids {
            match self.resume(&mut c, &id).await {
                // Resumed, already live, ended, or never committed at all: nothing to wait for.
                Ok(()) | Err(RuntimeError::Unknown(_)) => {
                    self.reload.remove(&id);
                }
                Err(e) => {
                    tracing::warn!(execution = %id, error = %e, "reload after a failed commit: not yet");
                    // Whatever this cycle half-loaded is dropped again and re-queued.
                    c.fatal = Some(e);
                    break;
                }
            }
            self.drain(&mut c);
        }
        self.commit(c).await;
    }

    fn complete(&mut self, c: &mut Cycle, done: Completion) -> Result<(), RuntimeError> {
        let b = &done.block;
        if !self.execs.contains_key(&b.execution_id) && self.reload.contains(&b.execution_id) {
            // Not refused: the worker retries while the execution is reloaded.
            return Err(RuntimeError::Store(format!(
                "execution {} is being reloaded from the log",
                b.execution_id
            )));
        }
        let x = self
            .execs
            .get(&b.execution_id)
            .ok_or_else(|| RuntimeError::Unknown(b.execution_id.clone()))?;
        if x.st.status.is_terminal() {
            return Err(RuntimeError::StaleClaim(format!(
                "execution {} has already ended",
                b.execution_id
            )));
        }
        let pending = x.st.commands.get(&b.command_id).ok_or_else(|| {
            RuntimeError::StaleClaim(format!("command {} is already completed", b.command_id))
        })?;
        if pending.attempt != done.attempt {
            return Err(RuntimeError::StaleClaim(format!(
                "command {} attempt {} was superseded by attempt {}",
                b.command_id, done.attempt, pending.attempt
            )));
        }
        self.leases.remove(&b.command_id);
        let end = match done.outcome {
            Ok(f) => Draft::new(EventKind::StepFinished, json!(f)),
            Err(f) => Draft::new(EventKind::StepFailed, json!(f)),
        };
        let completed = Draft::new(EventKind::CommandCompleted, json!({}));
        let drafts = vec![
            end.step(&b.step).command(&b.command_id, done.attempt),
            completed.step(&b.step).command(&b.command_id, done.attempt),
        ];
        let id = b.execution_id.clone();
        c.batch.commands.push(CommandOp::Done {
            command_id: b.command_id.clone(),
        });
        self.emit(c, &id, drafts, &format!("worker:{}", done.worker));
        Ok(())
    }

    /// Load an execution from the log and re-dispatch whatever it was waiting for.
    async fn resume(&mut self, c: &mut Cycle, id: &ExecutionId) -> Result<(), RuntimeError> {
        // A child is resumed through its root: the parent must be live to receive its result.
        let mut root = id.clone();
        for _ in 0..64 {
            let first = self.store.read(&root, 1, 1).await?;
            let first = first
                .first()
                .ok_or_else(|| RuntimeError::Unknown(root.clone()))?;
            match first
                .payload
                .get("parent")
                .and_then(|p| ParentRef::deserialize(p).ok())
            {
                Some(p) => root = p.execution_id,
                None => break,
            }
        }
        let mut stack = vec![root];
        while let Some(id) = stack.pop() {
            if self.execs.contains_key(&id) {
                continue;
            }
            let (events, st) = self.load(&id).await?;
            if st.status.is_terminal() {
                continue;
            }
            let first = &events[0];
            let stored = self
                .store
                .get_playbook(&first.playbook_digest)
                .await?
                .ok_or_else(|| {
                    RuntimeError::Invalid(format!(
                        "playbook {} of execution {id} is not in the store",
                        first.playbook_digest
                    ))
                })?;
            let extra = st.workload.keys().cloned().collect();
            let pb = parse(
                &stored.source_name,
                &stored.content,
                &ParseOptions { extra_vars: extra },
            )
            .map_err(|e| RuntimeError::Invalid(e.to_string()))?;
            let source = first
                .payload
                .get("source")
                .and_then(Value::as_str)
                .map(str::to_owned);
            let awaited: Vec<(String, Option<usize>, ExecutionId)> = st
                .children
                .iter()
                .filter_map(|((step, index), child)| {
                    child.clone().map(|ch| (step.clone(), *index, ch))
                })
                .collect();
            let request_id = first.request_id.clone();
            let traceparent = first
                .payload
                .get("traceparent")
                .and_then(Value::as_str)
                .map(str::to_owned);
            self.execs.insert(
                id.clone(),
                Exec {
                    pb: Arc::new(pb),
                    st,
                    request_id,
                    source,
                    traceparent,
                },
            );
            c.loaded.push(id.clone());
            // Open commands go out again, still children of the starting request's trace.
            if let Some(x) = self.execs.get(&id) {
                for (cmd, p) in &x.st.commands {
                    let (traceparent, request_id) = command_trace(x, cmd, &p.step, p.index);
                    c.dispatch.push(Block {
                        execution_id: id.clone(),
                        command_id: cmd.clone(),
                        step: p.step.clone(),
                        index: p.index,
                        traceparent,
                        request_id,
                    });
                }
            }
            if let Some(x) = self.execs.get(&id) {
                for token in x.st.waiting.keys() {
                    self.callbacks.insert(token.clone(), id.clone());
                }
                if !x.st.child_deadlines.is_empty() {
                    self.child_timers.insert(id.clone());
                }
            }
            tracing::info!(execution = %id, "resumed from the log");
            // A child asked for but not started (its catalog lookup was under way when the
            // process stopped) is asked for again.
            for ev in unstarted_children(&events) {
                self.start_child(c, &id, &ev);
            }
            for (step, index, child) in awaited {
                let (_, cst) = self.load(&child).await?;
                if cst.status.is_terminal() {
                    // The child ended but its parent never heard (it was not live): tell it now.
                    let outcome = match (cst.status, cst.result.clone(), cst.error.clone()) {
                        (mayfly_engine::Status::Completed, r, _) => Ok(r.unwrap_or(Value::Null)),
                        (_, _, Some(e)) => Err(e),
                        (s, _, None) => Err(ErrorInfo::new("child_failed", s.as_str())),
                    };
                    let pref = ParentRef {
                        execution_id: id.clone(),
                        step,
                        index,
                    };
                    let outcome = match self.execs.get(&id) {
                        Some(px) => child_outcome(&px.pb, &pref, &child, &cst, outcome),
                        None => outcome,
                    };
                    self.notify_parent(c, &pref, &child, outcome);
                    self.drain(c);
                } else {
                    stack.push(child);
                }
            }
        }
        Ok(())
    }

    /// Read, verify and fold one execution's log.
    async fn load(&self, id: &ExecutionId) -> Result<(Vec<Event>, ExecState), RuntimeError> {
        let events = self.store.read_all(id).await?;
        if events.is_empty() {
            return Err(RuntimeError::Unknown(id.clone()));
        }
        mayfly_trust::verify_chain(&events)?;
        let st = ExecState::fold(id.clone(), &events)?;
        Ok((events, st))
    }
}

/// What a parent step receives from its child, as its `playbook` task asks (NoETL):
/// `return_step` → the child's status payload `{execution_id, status, path, result, error}`,
/// a success even when the child failed; `result_step: S` → the data of the child's step
/// `S`; otherwise (and with `return_result: true`) the child's result, its failure failing
/// the step.
fn child_outcome(
    parent_pb: &Playbook,
    parent: &ParentRef,
    child: &ExecutionId,
    child_st: &ExecState,
    outcome: Result<Value, ErrorInfo>,
) -> Result<Value, ErrorInfo> {
    let Some(task) = parent_pb.step(&parent.step).and_then(|s| s.playbook_task()) else {
        return outcome;
    };
    if task.returns_status() {
        let status = match (&outcome, child_st.status) {
            (Ok(_), _) => "COMPLETED",
            (Err(_), mayfly_engine::Status::Cancelled) => "CANCELLED",
            (Err(_), _) => "FAILED",
        };
        let (result, error) = match outcome {
            Ok(v) => (v, Value::Null),
            Err(e) => (Value::Null, json!(e)),
        };
        return Ok(json!({
            "execution_id": child.0,
            "status": status,
            "path": child_st.path,
            "result": result,
            "error": error,
        }));
    }
    match task.config.get("result_step").and_then(|n| n.as_str()) {
        Some(name) => outcome.map(|_| {
            child_st
                .results
                .get(name)
                .map(|r| r.result.clone())
                .unwrap_or(Value::Null)
        }),
        None => outcome,
    }
}

/// The template context a block of `step` (loop item `index`) runs with.
fn block_context(x: &Exec, step: &str, index: Option<usize>) -> Map<String, Value> {
    let item = index.and_then(|i| x.st.loops.get(step).and_then(|l| l.item(i)));
    let iterator =
        x.pb.step(step)
            .and_then(|s| s.looping.as_ref())
            .map(|l| l.iterator.clone());
    match (&iterator, &item, index) {
        (Some(it), Some(v), Some(i)) => context(
            &x.st,
            Some(Iteration {
                iterator: it,
                value: v,
                index: i,
                total: x.st.loops.get(step).map_or(0, |l| l.len()),
            }),
        ),
        _ => context(&x.st, None),
    }
}

/// Move the large part of an engine-made payload (a loop's aggregate, an inline step's or
/// the execution's result) to the cache: the event keeps a ref (DESIGN §3).
fn split_payload(
    d: &mut Draft,
    limit: usize,
    loop_by_ref: bool,
    tenant: &str,
    blobs: &mut Vec<(String, mayfly_cache::Blob)>,
) {
    let mut split = |v: &mut Value| {
        let (out, parts) = mayfly_cache::split(std::mem::take(v), limit);
        *v = out;
        blobs.extend(parts.into_iter().map(|b| (tenant.to_owned(), b)));
    };
    let each = |v: Option<&mut Value>, split: &mut dyn FnMut(&mut Value)| {
        if let Some(Value::Object(m)) = v {
            m.values_mut().for_each(split);
        }
    };
    match d.kind {
        EventKind::LoopDone => d.payload.get_mut("results").map_or((), split),
        EventKind::StepFinished | EventKind::ExecutionCompleted => {
            d.payload.get_mut("result").map_or((), split)
        }
        EventKind::StepRouted => {
            each(d.payload.get_mut("set"), &mut split);
            each(d.payload.get_mut("step_set"), &mut split);
        }
        EventKind::ChildRequested => each(d.payload.get_mut("input"), &mut split),
        EventKind::ExecutionRequested => each(d.payload.get_mut("workload"), &mut split),
        EventKind::LoopStarted if loop_by_ref => {
            // A list the engine computed (`range(…)`, a concatenation) leaves the log like
            // any other large payload: the loop then runs over its elements by ref, exactly
            // as a loop over a tool's large result does.
            let Value::Object(m) = &mut d.payload else {
                return;
            };
            if m.get("source").is_some_and(|s| !s.is_null()) {
                return;
            }
            let Some(items) = m.get_mut("items") else {
                return;
            };
            let (out, parts) = mayfly_cache::split(std::mem::take(items), limit);
            if CacheRef::parse(&out).is_some() {
                *items = Value::Array(Vec::new());
                m.insert("source".into(), out);
                blobs.extend(parts.into_iter().map(|b| (tenant.to_owned(), b)));
            } else {
                *items = out;
            }
        }
        _ => {}
    }
}

async fn store_blobs(
    p: &mayfly_cache::Payloads,
    blobs: Vec<(String, mayfly_cache::Blob)>,
) -> Result<(), RuntimeError> {
    for (tenant, b) in blobs {
        p.cache()
            .put(&tenant, &b.cache_ref.digest, b.bytes)
            .await
            .map_err(|e| RuntimeError::Store(format!("shared cache: {e}")))?;
    }
    Ok(())
}

fn stored(pb: &Playbook) -> StoredPlaybook {
    StoredPlaybook {
        digest: pb.digest.clone(),
        path: pb.path.clone(),
        source_name: pb.file.clone(),
        content: pb.source.clone(),
    }
}

/// The child `ask` names: in `tenant`'s catalog (the version its path names with `@N`,
/// else the latest), else — when `beside` is given (`mayfly run`: the parent's file, if it
/// has one) — a file beside the parent's, read off the appender. Parsed with the input keys
/// as extra variables.
async fn find_child(
    store: &dyn Store,
    tenant: &str,
    ask: &ChildAsk,
    beside: Option<Option<String>>,
) -> Result<Arc<Playbook>, ErrorInfo> {
    let failed = |m: String| ErrorInfo::new("child_load_failed", m);
    let opts = ParseOptions {
        extra_vars: ask.input.keys().cloned().collect(),
    };
    let (path, version) = mayfly_dsl::split_child_version(&ask.path);
    let path = path.trim_start_matches("./");
    let what = match version {
        Some(v) => format!("child playbook `{path}` version {v}"),
        None => format!("child playbook `{path}`"),
    };
    let key = path.trim_end_matches(".yaml").trim_end_matches(".yml");
    let mut found = store
        .resolve(tenant, key, version)
        .await
        .map_err(|e| failed(format!("{what}: the catalog did not answer: {e}")))?;
    if found.is_none() && key != path {
        found = store
            .resolve(tenant, path, version)
            .await
            .map_err(|e| failed(format!("{what}: the catalog did not answer: {e}")))?;
    }
    if let Some((_, stored)) = found {
        return parse(&stored.source_name, &stored.content, &opts)
            .map(Arc::new)
            .map_err(|e| failed(e.to_string()));
    }
    let Some(source) = beside else {
        return Err(failed(format!(
            "{what} is not in tenant `{tenant}`'s catalog (register it: mayfly register FILE)"
        )));
    };
    if version.is_some() {
        return Err(failed(format!(
            "{what} is not in the local catalog (the playbooks this run registered: those under --playbooks, or beside the file run, as they were in each run against this --db); files have no versions"
        )));
    }
    let child = ask.path.clone();
    tokio::task::spawn_blocking(move || {
        resolve_child(source.as_deref(), &child).and_then(|p| load_file(&p, &opts))
    })
    .await
    .map_err(|e| failed(format!("{what}: the lookup stopped: {e}")))?
    .map(Arc::new)
    .map_err(|e| {
        failed(format!(
            "{what} is not in the local catalog, nor a file beside its parent: {e}"
        ))
    })
}

/// `child.requested` events of an execution that nothing answered yet: no `child.started`
/// and no outcome of that step (and loop item) after them.
fn unstarted_children(events: &[Event]) -> Vec<Event> {
    let index = |e: &Event| e.payload.get("index").and_then(Value::as_u64);
    events
        .iter()
        .enumerate()
        .filter(|(_, e)| e.kind == EventKind::ChildRequested)
        .filter(|(i, e)| {
            !events[i + 1..].iter().any(|later| {
                matches!(
                    later.kind,
                    EventKind::ChildStarted | EventKind::StepFailed | EventKind::StepFinished
                ) && later.step == e.step
                    && index(later) == index(e)
            })
        })
        .map(|(_, e)| e.clone())
        .collect()
}
