//! Execution state: a pure fold over the event log.

use mayfly_types::{
    CacheRef, ChildRequested, ChildStarted, CommandIssued, ErrorInfo, Event, EventKind,
    ExecutionCompleted, ExecutionFailed, ExecutionId, ExecutionRequested, GENESIS_HASH, LoopDone,
    LoopStarted, ParentRef, StepFailed, StepFinished, StepRouted,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet};

/// Lifecycle of an execution.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Pending,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl Status {
    pub fn is_terminal(self) -> bool {
        matches!(self, Status::Completed | Status::Failed | Status::Cancelled)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Running => "running",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
        }
    }
}

/// The latest outcome of a step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// `ok` or `error`.
    pub status: String,
    pub result: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
    /// How many times the step has completed (re-entry through cycles counts).
    pub runs: u32,
}

/// Progress of a looping step.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct LoopState {
    pub items: Vec<Value>,
    /// Items by reference: the elements of a cached payload (see [`LoopStarted::source`]).
    pub source: Option<CacheRef>,
    /// Next item to issue.
    pub next_index: usize,
    /// Issued to workers/children and not yet finished.
    pub in_flight: usize,
    pub done: usize,
    pub results: Vec<Value>,
    pub finished: bool,
    /// The first failed iteration aborts the loop; only its failure is routed.
    pub first_failure: Option<usize>,
    /// Seq of the `loop.started` that began this run of the loop. A loop step can be
    /// re-entered (an arc back to it) while items of the previous run are still in flight;
    /// their completions must not count toward the new run.
    pub generation: u64,
}

impl LoopState {
    /// Number of items of this run.
    pub fn len(&self) -> usize {
        match &self.source {
            Some(r) => r.count.unwrap_or(0) as usize,
            None => self.items.len(),
        }
    }

    /// True when the loop has no items.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Item `i`: the value itself, or a ref to element `i` of the source payload (hydrated
    /// by the worker that runs the item, only if the block's templates bind it).
    pub fn item(&self, i: usize) -> Option<Value> {
        match &self.source {
            Some(r) => (i < self.len()).then(|| r.element(i as u64).to_value()),
            None => self.items.get(i).cloned(),
        }
    }

    /// True when a command of `generation` belongs to this run and it still accepts items.
    pub fn accepts(&self, generation: Option<u64>) -> bool {
        !self.finished && generation == Some(self.generation)
    }
}

/// A block handed to a worker and not yet completed.
#[derive(Clone, Debug, PartialEq)]
pub struct PendingCommand {
    pub step: String,
    pub index: Option<usize>,
    /// Latest delivery attempt that claimed it (0 = never claimed).
    pub attempt: u32,
    /// For loop items: the generation (seq of `loop.started`) the item belongs to.
    pub generation: Option<u64>,
}

/// Everything known about one execution, derived only from its events.
#[derive(Clone, Debug)]
pub struct ExecState {
    pub execution_id: ExecutionId,
    pub path: String,
    pub tenant: String,
    /// Policy budgets the execution was admitted under.
    pub limits: Option<mayfly_types::Limits>,
    pub playbook_digest: String,
    pub status: Status,
    pub workload: Map<String, Value>,
    pub ctx: Map<String, Value>,
    pub results: BTreeMap<String, StepRecord>,
    /// Active tokens per step (entered and not yet routed onwards).
    pub active: BTreeMap<String, u32>,
    /// Arrivals waiting at join steps.
    pub arrivals: BTreeMap<String, u32>,
    pub loops: BTreeMap<String, LoopState>,
    pub commands: BTreeMap<String, PendingCommand>,
    /// Child executions awaited: (step, index) → child id once started.
    pub children: BTreeMap<(String, Option<usize>), Option<ExecutionId>>,
    /// When each awaited child's wait ends (unix ms; a waiting playbook task's `timeout`).
    pub child_deadlines: BTreeMap<(String, Option<usize>), u64>,
    pub parent: Option<ParentRef>,
    pub result: Option<Value>,
    pub error: Option<ErrorInfo>,
    pub failed_step: Option<String>,
    /// Result of the most recent step that ended a branch (no outgoing arc fired).
    pub last_terminal: Value,
    pub last_seq: u64,
    pub last_hash: String,
    pub steps_finished: u64,
    /// Seqs of completions that belonged to an earlier run of a loop (ignored by decide).
    pub stale: BTreeSet<u64>,
    /// Steps (or loop items) parked for a callback, by one-time token.
    pub waiting: BTreeMap<String, Waiting>,
}

/// A step parked until `POST /callbacks/{token}` (or its timeout).
#[derive(Clone, Debug, PartialEq)]
pub struct Waiting {
    pub step: String,
    pub index: Option<usize>,
    /// When it started waiting (unix ms) and for how long it may (ms).
    pub since: u64,
    pub timeout_ms: Option<u64>,
}

/// An event could not be folded (it does not fit the state: corrupt or foreign log).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot apply event seq {seq} ({kind}): {reason}")]
pub struct ApplyError {
    pub seq: u64,
    pub kind: String,
    pub reason: String,
}

impl ExecState {
    /// Empty state for an execution id (before `execution.requested`).
    pub fn new(execution_id: ExecutionId) -> Self {
        ExecState {
            execution_id,
            path: String::new(),
            tenant: mayfly_types::DEFAULT_TENANT.to_owned(),
            limits: None,
            playbook_digest: String::new(),
            status: Status::Pending,
            workload: Map::new(),
            ctx: Map::new(),
            results: BTreeMap::new(),
            active: BTreeMap::new(),
            arrivals: BTreeMap::new(),
            loops: BTreeMap::new(),
            commands: BTreeMap::new(),
            children: BTreeMap::new(),
            child_deadlines: BTreeMap::new(),
            parent: None,
            result: None,
            error: None,
            failed_step: None,
            last_terminal: Value::Null,
            last_seq: 0,
            last_hash: GENESIS_HASH.to_owned(),
            steps_finished: 0,
            stale: BTreeSet::new(),
            waiting: BTreeMap::new(),
        }
    }

    /// Fold a whole log.
    pub fn fold<'a>(
        execution_id: ExecutionId,
        events: impl IntoIterator<Item = &'a Event>,
    ) -> Result<Self, ApplyError> {
        let mut st = ExecState::new(execution_id);
        for e in events {
            st.apply(e)?;
        }
        Ok(st)
    }

    /// Total active tokens (entered steps not yet routed onwards).
    pub fn active_total(&self) -> u32 {
        self.active.values().sum()
    }

    fn dec_active(&mut self, step: &str) {
        if let Some(n) = self.active.get_mut(step) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.active.remove(step);
            }
        }
    }

    /// Apply one event. Pure and deterministic: replay yields the same state.
    pub fn apply(&mut self, ev: &Event) -> Result<(), ApplyError> {
        let fail = |reason: String| ApplyError {
            seq: ev.seq,
            kind: ev.kind.to_string(),
            reason,
        };
        fn p<'a, T: serde::Deserialize<'a>>(ev: &'a Event) -> Result<T, ApplyError> {
            T::deserialize(&ev.payload).map_err(|e| ApplyError {
                seq: ev.seq,
                kind: ev.kind.to_string(),
                reason: format!("bad payload: {e}"),
            })
        }
        let step = || {
            ev.step
                .clone()
                .ok_or_else(|| fail("event has no step".into()))
        };
        match ev.kind {
            EventKind::ExecutionRequested => {
                let r: ExecutionRequested = p(ev)?;
                self.path = r.path;
                self.workload = r.workload;
                if let Some(t) = r.tenant {
                    self.tenant = t;
                }
                self.limits = r.limits;
                self.parent = r.parent;
                self.playbook_digest = ev.playbook_digest.clone();
            }
            EventKind::ExecutionStarted => {
                self.status = Status::Running;
                *self
                    .active
                    .entry(mayfly_dsl::ENTRY_STEP.to_owned())
                    .or_default() += 1;
            }
            EventKind::CommandIssued => {
                let c: CommandIssued = p(ev)?;
                let id = ev
                    .command_id
                    .clone()
                    .ok_or_else(|| fail("command.issued without command_id".into()))?;
                let generation = c
                    .index
                    .and_then(|_| self.loops.get(&c.step).map(|l| l.generation));
                if let Some(i) = c.index {
                    self.issue_item(&c.step, i);
                }
                self.commands.insert(
                    id,
                    PendingCommand {
                        generation,
                        step: c.step,
                        index: c.index,
                        attempt: 0,
                    },
                );
            }
            EventKind::CommandClaimed => {
                if let Some(c) = ev
                    .command_id
                    .as_ref()
                    .and_then(|id| self.commands.get_mut(id))
                {
                    c.attempt = ev.attempt.unwrap_or(1);
                }
            }
            EventKind::StepStarted => {}
            EventKind::CommandCompleted => {
                if let Some(id) = &ev.command_id {
                    self.commands.remove(id);
                }
            }
            EventKind::StepFinished => {
                let f: StepFinished = p(ev)?;
                let s = step()?;
                if !self.end_block(ev, &s, f.index) {
                    return self.advance(ev);
                }
                for (k, v) in f.set {
                    self.ctx.insert(k, v);
                }
                self.steps_finished += 1;
                match f.index {
                    Some(i) => {
                        self.children.remove(&(s.clone(), Some(i)));
                        self.child_deadlines.remove(&(s.clone(), Some(i)));
                        let l = self
                            .loops
                            .get_mut(&s)
                            .ok_or_else(|| fail(format!("no loop running for `{s}`")))?;
                        if f.inline {
                            l.next_index = l.next_index.max(i + 1);
                        } else {
                            l.in_flight = l.in_flight.saturating_sub(1);
                        }
                        if let Some(slot) = l.results.get_mut(i) {
                            *slot = f.result;
                        }
                        l.done += 1;
                    }
                    None => {
                        self.children.remove(&(s.clone(), None));
                        self.child_deadlines.remove(&(s.clone(), None));
                        let runs = self.results.get(&s).map(|r| r.runs).unwrap_or(0) + 1;
                        self.results.insert(
                            s,
                            StepRecord {
                                status: "ok".into(),
                                result: f.result,
                                error: None,
                                runs,
                            },
                        );
                    }
                }
            }
            EventKind::StepFailed => {
                let f: StepFailed = p(ev)?;
                let s = step()?;
                if !self.end_block(ev, &s, f.index) {
                    return self.advance(ev);
                }
                self.children.remove(&(s.clone(), f.index));
                self.child_deadlines.remove(&(s.clone(), f.index));
                if let Some(i) = f.index
                    && let Some(l) = self.loops.get_mut(&s)
                {
                    l.in_flight = l.in_flight.saturating_sub(1);
                    l.done += 1;
                    l.finished = true;
                    l.first_failure.get_or_insert(i);
                    if let Some(slot) = l.results.get_mut(i) {
                        *slot = serde_json::json!({"error": f.error});
                    }
                }
                let runs = self.results.get(&s).map(|r| r.runs).unwrap_or(0) + 1;
                self.results.insert(
                    s,
                    StepRecord {
                        status: "error".into(),
                        result: Value::Null,
                        error: Some(f.error),
                        runs,
                    },
                );
            }
            EventKind::StepRouted => {
                let r: StepRouted = p(ev)?;
                let s = step()?;
                for (k, v) in r.set {
                    self.ctx.insert(k, v);
                }
                if let Some(rec) = self.results.get_mut(&s) {
                    if !r.step_set.is_empty() {
                        // A cached ref counts as the value it stands for: only a record
                        // takes fields, and a ref must stay intact to resolve.
                        if !rec.result.is_object() || CacheRef::parse(&rec.result).is_some() {
                            rec.result = Value::Object(Map::new());
                        }
                        if let Value::Object(m) = &mut rec.result {
                            m.extend(r.step_set);
                        }
                    }
                    if r.to.is_empty() && r.joins.is_empty() {
                        self.last_terminal = rec.result.clone();
                    }
                }
                self.dec_active(&s);
                for t in r.to {
                    *self.active.entry(t).or_default() += 1;
                }
                for j in r.joins {
                    *self.arrivals.entry(j).or_default() += 1;
                }
            }
            EventKind::JoinReleased => {
                let s = step()?;
                self.arrivals.remove(&s);
                *self.active.entry(s).or_default() += 1;
            }
            EventKind::LoopStarted => {
                let l: LoopStarted = p(ev)?;
                let n = match &l.source {
                    Some(r) => r.count.unwrap_or(0) as usize,
                    None => l.items.len(),
                };
                self.loops.insert(
                    step()?,
                    LoopState {
                        generation: ev.seq,
                        items: l.items,
                        source: l.source,
                        results: vec![Value::Null; n],
                        ..Default::default()
                    },
                );
            }
            EventKind::LoopDone => {
                let d: LoopDone = p(ev)?;
                let s = step()?;
                if let Some(l) = self.loops.get_mut(&s) {
                    l.finished = true;
                    // Items are no longer needed once the loop is done; keep memory bounded.
                    l.items = Vec::new();
                    l.source = None;
                    l.results = Vec::new();
                }
                let runs = self.results.get(&s).map(|r| r.runs).unwrap_or(0) + 1;
                self.results.insert(
                    s,
                    StepRecord {
                        status: "ok".into(),
                        result: d.results,
                        error: None,
                        runs,
                    },
                );
            }
            EventKind::ChildRequested => {
                let c: ChildRequested = p(ev)?;
                let s = step()?;
                if let Some(i) = c.index {
                    self.issue_item(&s, i);
                }
                if let Some(t) = c.timeout_ms {
                    self.child_deadlines.insert((s.clone(), c.index), ev.at + t);
                }
                self.children.insert((s, c.index), None);
            }
            EventKind::ChildStarted => {
                let c: ChildStarted = p(ev)?;
                let s = step()?;
                if !c.detached {
                    self.children
                        .insert((s, c.index), Some(c.child_execution_id));
                }
            }
            EventKind::StepWaiting => {
                let w: mayfly_types::StepWaiting = p(ev)?;
                let s = step()?;
                if let Some(i) = w.index {
                    self.issue_item(&s, i);
                }
                self.waiting.insert(
                    w.token,
                    Waiting {
                        step: s,
                        index: w.index,
                        since: ev.at,
                        timeout_ms: w.timeout_ms,
                    },
                );
            }
            EventKind::CallbackReceived => {
                let c: mayfly_types::CallbackReceived = p(ev)?;
                self.waiting.remove(&c.token);
            }
            // Control-plane kinds live in their own stream, never in an execution's.
            EventKind::ObjectApplied
            | EventKind::ObjectDenied
            | EventKind::BundlePublished
            | EventKind::TransitionChanged
            | EventKind::AgentReported
            | EventKind::ControlSnapshot
            | EventKind::ProviderRegistered
            | EventKind::WorkerChanged
            | EventKind::ActorChanged
            | EventKind::SnapshotRecorded => {
                return Err(fail("a control-plane event in an execution's log".into()));
            }
            EventKind::ExecutionCompleted => {
                let c: ExecutionCompleted = p(ev)?;
                self.status = Status::Completed;
                self.result = Some(c.result);
            }
            EventKind::ExecutionFailed => {
                let f: ExecutionFailed = p(ev)?;
                self.status = Status::Failed;
                self.failed_step = f.step;
                self.error = Some(f.error);
            }
            EventKind::ExecutionCancelled => {
                self.status = Status::Cancelled;
            }
        }
        self.advance(ev)
    }

    fn advance(&mut self, ev: &Event) -> Result<(), ApplyError> {
        self.last_seq = ev.seq;
        self.last_hash = ev.hash.clone();
        Ok(())
    }

    /// Bookkeeping common to a step (or item) ending: false when the completion is stale
    /// (an earlier run of a loop), which is then only remembered; else clears its wait.
    fn end_block(&mut self, ev: &Event, step: &str, index: Option<usize>) -> bool {
        if self.is_stale(ev, step, index) {
            self.stale.insert(ev.seq);
            return false;
        }
        self.waiting
            .retain(|_, w| !(w.step == step && w.index == index));
        true
    }

    /// A worker's completion of a loop item from an earlier run of the loop.
    fn is_stale(&self, ev: &Event, step: &str, index: Option<usize>) -> bool {
        let (Some(_), Some(cmd)) = (index, ev.command_id.as_ref()) else {
            return false;
        };
        let Some(pending) = self.commands.get(cmd) else {
            return false;
        };
        self.loops
            .get(step)
            .is_some_and(|l| pending.generation != Some(l.generation))
    }

    fn issue_item(&mut self, step: &str, i: usize) {
        if let Some(l) = self.loops.get_mut(step) {
            l.next_index = l.next_index.max(i + 1);
            l.in_flight += 1;
        }
    }

    /// The user-facing summary printed by `mayfly run` and `mayfly replay`.
    pub fn report(&self) -> Report {
        Report {
            execution_id: self.execution_id.clone(),
            path: self.path.clone(),
            status: self.status,
            result: self.result.clone().unwrap_or(Value::Null),
            error: self.error.clone(),
            failed_step: self.failed_step.clone(),
            steps: self
                .results
                .iter()
                .map(|(k, v)| (k.clone(), v.result.clone()))
                .collect(),
            ctx: self.ctx.clone(),
            events: self.last_seq,
        }
    }
}

/// Final (or current) outcome of an execution.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub execution_id: ExecutionId,
    pub path: String,
    pub status: Status,
    pub result: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_step: Option<String>,
    pub steps: BTreeMap<String, Value>,
    pub ctx: Map<String, Value>,
    pub events: u64,
}
