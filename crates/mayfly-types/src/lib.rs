//! Identifiers and the canonical event envelope shared by every mayfly crate.
//!
//! Nothing here performs IO. The envelope is the on-disk and on-wire contract of the
//! event log (DESIGN §3); changing a field name is a breaking change to stored data.

pub mod egress;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::fmt;

/// Identifies one execution of a playbook. Opaque string (UUIDv7 when minted by mayfly).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ExecutionId(pub String);

impl fmt::Display for ExecutionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for ExecutionId {
    fn from(s: &str) -> Self {
        Self(s.to_owned())
    }
}

/// Deterministic command id: `<execution_id>/<seq of its command.issued event>`.
/// Deterministic so that replaying the log reproduces the same ids.
pub fn command_id(execution: &ExecutionId, issued_seq: u64) -> String {
    format!("{}/{}", execution.0, issued_seq)
}

/// Every kind of event the log can hold. Serialized as the dotted names used in DESIGN §3.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventKind {
    #[serde(rename = "execution.requested")]
    ExecutionRequested,
    #[serde(rename = "execution.started")]
    ExecutionStarted,
    #[serde(rename = "execution.completed")]
    ExecutionCompleted,
    #[serde(rename = "execution.failed")]
    ExecutionFailed,
    #[serde(rename = "execution.cancelled")]
    ExecutionCancelled,
    #[serde(rename = "command.issued")]
    CommandIssued,
    #[serde(rename = "command.claimed")]
    CommandClaimed,
    #[serde(rename = "command.completed")]
    CommandCompleted,
    #[serde(rename = "step.started")]
    StepStarted,
    #[serde(rename = "step.finished")]
    StepFinished,
    #[serde(rename = "step.failed")]
    StepFailed,
    #[serde(rename = "step.routed")]
    StepRouted,
    #[serde(rename = "join.released")]
    JoinReleased,
    #[serde(rename = "loop.started")]
    LoopStarted,
    #[serde(rename = "loop.done")]
    LoopDone,
    #[serde(rename = "child.requested")]
    ChildRequested,
    #[serde(rename = "child.started")]
    ChildStarted,
    #[serde(rename = "step.waiting")]
    StepWaiting,
    #[serde(rename = "callback.received")]
    CallbackReceived,
    /// Control plane: a desired-state object was created or changed (stream `control`).
    #[serde(rename = "object.applied")]
    ObjectApplied,
    /// Control plane: a mutation was refused (recorded with its reason; nothing changed).
    #[serde(rename = "object.denied")]
    ObjectDenied,
    /// Control plane: the policies were frozen into a signed bundle (stream `control`).
    #[serde(rename = "bundle.published")]
    BundlePublished,
    /// Control plane: a transition (e.g. a rollout) entered a phase, with its evidence.
    #[serde(rename = "transition.changed")]
    TransitionChanged,
    /// Control plane: a data-plane agent applied, or refused, a bundle.
    #[serde(rename = "agent.reported")]
    AgentReported,
    /// Control plane: the folded state through a seq, written before the records it
    /// summarizes are compacted away.
    #[serde(rename = "control.snapshot")]
    ControlSnapshot,
    /// Actor dataplane: a provider enrolled or (re)registered its incarnation and
    /// capabilities.
    #[serde(rename = "provider.registered")]
    ProviderRegistered,
    /// Actor dataplane: a worker appeared, or its health changed (lost when its lease
    /// expired).
    #[serde(rename = "worker.changed")]
    WorkerChanged,
    /// Actor dataplane: an actor's phase, placement, epoch, pending op or snapshot changed.
    #[serde(rename = "actor.changed")]
    ActorChanged,
    /// Actor dataplane: a checkpoint's manifest, verified and signed by the control plane.
    #[serde(rename = "snapshot.recorded")]
    SnapshotRecorded,
}

impl EventKind {
    /// Every kind, in declaration order (kept whole by a test over the wire names).
    pub const ALL: &[EventKind] = &[
        EventKind::ExecutionRequested,
        EventKind::ExecutionStarted,
        EventKind::ExecutionCompleted,
        EventKind::ExecutionFailed,
        EventKind::ExecutionCancelled,
        EventKind::CommandIssued,
        EventKind::CommandClaimed,
        EventKind::CommandCompleted,
        EventKind::StepStarted,
        EventKind::StepFinished,
        EventKind::StepFailed,
        EventKind::StepRouted,
        EventKind::JoinReleased,
        EventKind::LoopStarted,
        EventKind::LoopDone,
        EventKind::ChildRequested,
        EventKind::ChildStarted,
        EventKind::StepWaiting,
        EventKind::CallbackReceived,
        EventKind::ObjectApplied,
        EventKind::ObjectDenied,
        EventKind::BundlePublished,
        EventKind::TransitionChanged,
        EventKind::AgentReported,
        EventKind::ControlSnapshot,
        EventKind::ProviderRegistered,
        EventKind::WorkerChanged,
        EventKind::ActorChanged,
        EventKind::SnapshotRecorded,
    ];

    /// The dotted wire name, e.g. `step.finished`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::ExecutionRequested => "execution.requested",
            EventKind::ExecutionStarted => "execution.started",
            EventKind::ExecutionCompleted => "execution.completed",
            EventKind::ExecutionFailed => "execution.failed",
            EventKind::ExecutionCancelled => "execution.cancelled",
            EventKind::CommandIssued => "command.issued",
            EventKind::CommandClaimed => "command.claimed",
            EventKind::CommandCompleted => "command.completed",
            EventKind::StepStarted => "step.started",
            EventKind::StepFinished => "step.finished",
            EventKind::StepFailed => "step.failed",
            EventKind::StepRouted => "step.routed",
            EventKind::JoinReleased => "join.released",
            EventKind::LoopStarted => "loop.started",
            EventKind::LoopDone => "loop.done",
            EventKind::ChildRequested => "child.requested",
            EventKind::ChildStarted => "child.started",
            EventKind::StepWaiting => "step.waiting",
            EventKind::CallbackReceived => "callback.received",
            EventKind::ObjectApplied => "object.applied",
            EventKind::ObjectDenied => "object.denied",
            EventKind::BundlePublished => "bundle.published",
            EventKind::TransitionChanged => "transition.changed",
            EventKind::AgentReported => "agent.reported",
            EventKind::ControlSnapshot => "control.snapshot",
            EventKind::ProviderRegistered => "provider.registered",
            EventKind::WorkerChanged => "worker.changed",
            EventKind::ActorChanged => "actor.changed",
            EventKind::SnapshotRecorded => "snapshot.recorded",
        }
    }

    /// Parse a dotted wire name.
    pub fn parse(s: &str) -> Option<Self> {
        serde_json::from_value(Value::String(s.to_owned())).ok()
    }

    /// True for the kinds that end an execution.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            EventKind::ExecutionCompleted
                | EventKind::ExecutionFailed
                | EventKind::ExecutionCancelled
        )
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The canonical event envelope (DESIGN §3). `hash = sha256(canonical(envelope without hash
/// and position))`; `prev_hash` links to the previous event of the same execution.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub execution_id: ExecutionId,
    /// Dense per execution, starting at 1.
    pub seq: u64,
    pub kind: EventKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_id: Option<String>,
    /// Unix epoch milliseconds when the event was sealed.
    pub at: u64,
    /// Who appended it (`engine`, `worker:<id>`, `cli`).
    pub actor: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    pub playbook_digest: String,
    #[serde(default)]
    pub payload: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_ref: Option<String>,
    pub prev_hash: String,
    pub hash: String,
    /// Global log position assigned by the store (the RootToken); not part of the hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<u64>,
}

/// The hash of "no previous event".
pub const GENESIS_HASH: &str =
    "sha256:0000000000000000000000000000000000000000000000000000000000000000";

/// An event before it is sealed (seq, timestamps and hashes assigned by the appender).
#[derive(Clone, Debug, PartialEq)]
pub struct Draft {
    pub kind: EventKind,
    pub step: Option<String>,
    pub attempt: Option<u32>,
    pub command_id: Option<String>,
    pub payload: Value,
}

impl Draft {
    /// A draft with only a kind and payload.
    pub fn new(kind: EventKind, payload: Value) -> Self {
        Self {
            kind,
            step: None,
            attempt: None,
            command_id: None,
            payload,
        }
    }

    /// Attach the step name.
    pub fn step(mut self, step: impl Into<String>) -> Self {
        self.step = Some(step.into());
        self
    }

    /// Attach a command id and its delivery attempt.
    pub fn command(mut self, id: impl Into<String>, attempt: u32) -> Self {
        self.command_id = Some(id.into());
        self.attempt = Some(attempt);
        self
    }
}

/// A structured error carried in events and results. `code` is stable, `message` human.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorInfo {
    pub code: String,
    pub message: String,
}

impl ErrorInfo {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ErrorInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

/// Payload of `execution.requested`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExecutionRequested {
    /// Catalog path (`metadata.path`, or the playbook name).
    pub path: String,
    /// Where the playbook was loaded from, if a file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The fully merged workload (playbook defaults overlaid with overrides).
    pub workload: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ParentRef>,
    /// The step that started this execution without waiting for it (a fire-and-forget
    /// child): lineage only. Unlike `parent`, nothing is reported back and the execution is
    /// a root of its own (it outlives its starter and is resumed on its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<ParentRef>,
    /// Tenant the execution belongs to (None = `default`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Budgets the policies in force set when it was admitted (bounded autonomy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,
    /// W3C trace context of the request that started it (when traced): its commands are
    /// issued as children of it, also after an orchestrator restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// Budgets set by policy (bounded autonomy): a step's timeout and a task's attempts never
/// exceed them, whatever the playbook asks for, and the sandbox that runs tenant code
/// (`shell`, `python`, `duckdb`) gets its memory, CPU, process, file and disk bounds from
/// them. `egress` is every layer's network rule; a connection must pass all of them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_timeout_s: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Address space of each sandboxed process (MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
    /// CPU seconds of one sandboxed command or python step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_s: Option<u64>,
    /// Processes (and threads) of one sandbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processes: Option<u64>,
    /// Open files of each sandboxed process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_files: Option<u64>,
    /// Size of a sandbox's writable work dir and /tmp (MiB each).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_mb: Option<u64>,
    /// Events one execution may append (it fails `event_limit_exceeded` past them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_events: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<Egress>,
}

impl Limits {
    /// The tighter of two budgets, field by field; egress rules add up (both must pass).
    pub fn narrow(self, other: Limits) -> Limits {
        fn min<T: Ord>(a: Option<T>, b: Option<T>) -> Option<T> {
            match (a, b) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        }
        let mut egress = self.egress;
        for e in other.egress {
            if !egress.contains(&e) {
                egress.push(e);
            }
        }
        Limits {
            step_timeout_s: min(self.step_timeout_s, other.step_timeout_s),
            max_attempts: min(self.max_attempts, other.max_attempts),
            memory_mb: min(self.memory_mb, other.memory_mb),
            cpu_s: min(self.cpu_s, other.cpu_s),
            processes: min(self.processes, other.processes),
            open_files: min(self.open_files, other.open_files),
            disk_mb: min(self.disk_mb, other.disk_mb),
            max_events: min(self.max_events, other.max_events),
            egress,
        }
    }
}

/// One policy layer's network rule for what tenant code and the worker-side tools that act
/// for it (`http`, `postgres`, `nats`, `transfer`) may connect to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Egress {
    /// No network at all.
    None,
    /// Public addresses only: no loopback, private, link-local (cloud metadata), CGNAT,
    /// multicast or unspecified addresses, nor the host's own.
    Public,
    /// Only what the list names: `host`, `host:port`, `*.domain[:port]`, `ip[:port]`,
    /// `cidr[:port]` (`[v6]:port` for IPv6 with a port).
    Allow(Vec<String>),
    /// Anything the host reaches (the platform's explicit opt-out).
    Host,
}

/// The tenant of executions started without one.
pub const DEFAULT_TENANT: &str = "default";

/// Link from a child execution (playbook tool) to the step that awaits it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentRef {
    pub execution_id: ExecutionId,
    pub step: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
}

/// Payload of `command.issued`: one block for a worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CommandIssued {
    pub step: String,
    /// Loop iteration index, when the step loops.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
}

/// Payload of `step.finished` (a step, or one loop iteration when `index` is set).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepFinished {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    pub result: Value,
    /// Context mutations produced by task policy `then.set` inside the worker.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub set: Map<String, Value>,
    /// True when the engine completed the step itself (noop / pure routing).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub inline: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// Captured tool stdout/stderr (clipped), when there was any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logs: Option<Value>,
}

/// Payload of `step.failed`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepFailed {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    pub error: ErrorInfo,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logs: Option<Value>,
}

/// Payload of `step.routed`: the outcome of evaluating `set` and `next` after a step ends.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepRouted {
    /// `call.done`, `call.error` or `loop.done`.
    pub event: String,
    /// Targets entered now.
    pub to: Vec<String>,
    /// Join targets: this arrival is counted; the join runs once nothing upstream is active.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub joins: Vec<String>,
    /// Context mutations (step `set`, then the fired arcs' `set`), applied in order.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub set: Map<String, Value>,
    /// Step-result mutations from `set: {step.x: …}`.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub step_set: Map<String, Value>,
}

/// Payload of `loop.started`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoopStarted {
    pub items: Vec<Value>,
    /// The items are the elements of this cached payload (a loop over a large result);
    /// `items` is then empty and item `i` is `source.element(i)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<CacheRef>,
}

/// Payload of `loop.done`: per-iteration results in item order — a list, or a [`CacheRef`]
/// to it when the aggregate exceeds the inline limit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoopDone {
    pub results: Value,
}

/// Payload of `child.requested` (playbook tool).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChildRequested {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    pub path: String,
    pub input: Map<String, Value>,
    /// How long the step waits for the child (ms; a waiting task's `timeout`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// Payload of `child.started`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChildStarted {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    pub child_execution_id: ExecutionId,
    /// Started by a task of a running block, fire-and-forget: lineage only, the step does
    /// not wait for it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub detached: bool,
}

/// Payload of `step.waiting`: the step (or loop item) waits for `POST /callbacks/{token}`
/// without holding a worker. The appender fills in the one-time token.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepWaiting {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    #[serde(default)]
    pub token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// Payload of `callback.received` (the callback's body becomes the step's result).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CallbackReceived {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    pub token: String,
}

/// Payload of `execution.completed`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExecutionCompleted {
    pub result: Value,
}

/// Payload of `execution.failed`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExecutionFailed {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    pub error: ErrorInfo,
}

/// How a cached payload is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheFormat {
    /// UTF-8 JSON text of the value.
    Json,
    /// An Arrow IPC stream of one record batch (a table: list of flat records).
    Arrow,
}

/// A value held in the shared cache instead of inline in an event (DESIGN §3: events carry
/// refs, never large payloads). It appears in results exactly where the value would be, as
/// `{"$ref": "sha256:…", "format": "arrow", "bytes": …, "count": …, "columns": […]}`, so
/// routing conditions can read its summary and a worker hydrates it only when a template of
/// the block binds it. `item` narrows the ref to one element (a loop iteration over a ref).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheRef {
    /// Content digest of the stored bytes (`sha256:<hex>`); also the cache key.
    #[serde(rename = "$ref")]
    pub digest: String,
    pub format: CacheFormat,
    /// Size of the stored bytes.
    pub bytes: u64,
    /// Elements of the value: rows of a table, items of a list (None for other values).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// Column names of a table, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub columns: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item: Option<u64>,
}

impl CacheRef {
    /// The ref a JSON value spells, if it is one (strict: the digest form and every field
    /// must match, so ordinary data with a `$ref` key, e.g. JSON Schema, is not mistaken).
    pub fn parse(v: &Value) -> Option<CacheRef> {
        let Value::Object(m) = v else { return None };
        let Some(Value::String(d)) = m.get("$ref") else {
            return None;
        };
        if !is_sha256_digest(d) || !m.contains_key("format") {
            return None;
        }
        serde_json::from_value(v.clone()).ok()
    }

    /// The JSON spelling of the ref.
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// The ref as the string templates read as `_ref`: `mayfly://cache/<format>/<digest>`,
    /// with `#<i>` for an element.
    pub fn uri(&self) -> String {
        let format = match self.format {
            CacheFormat::Json => "json",
            CacheFormat::Arrow => "arrow",
        };
        let item = self.item.map(|i| format!("#{i}")).unwrap_or_default();
        format!("mayfly://cache/{format}/{}{item}", self.digest)
    }

    /// The ref a [`uri`](Self::uri) names (its size is not in the string: 0).
    pub fn from_uri(s: &str) -> Option<CacheRef> {
        let rest = s.strip_prefix("mayfly://cache/")?;
        let (format, rest) = rest.split_once('/')?;
        let (digest, item) = match rest.split_once('#') {
            Some((d, i)) => (d, Some(i.parse::<u64>().ok()?)),
            None => (rest, None),
        };
        let format = match format {
            "json" => CacheFormat::Json,
            "arrow" => CacheFormat::Arrow,
            _ => return None,
        };
        is_sha256_digest(digest).then(|| CacheRef {
            digest: digest.to_owned(),
            format,
            bytes: 0,
            count: None,
            columns: Vec::new(),
            item,
        })
    }

    /// The ref to element `i` of this (list or table) payload.
    pub fn element(&self, i: u64) -> CacheRef {
        CacheRef {
            item: Some(i),
            ..self.clone()
        }
    }

    /// The digest of every ref inside `v`, read leniently (any `$ref` holding a digest):
    /// retention keeps what these name, and keeping a payload too long is safe where
    /// dropping one still referenced is not.
    pub fn digests_in<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(d)) = m.get("$ref")
                    && is_sha256_digest(d)
                {
                    out.push(d);
                }
                m.values().for_each(|x| CacheRef::digests_in(x, out));
            }
            Value::Array(a) => a.iter().for_each(|x| CacheRef::digests_in(x, out)),
            _ => {}
        }
    }

    /// True when `v` holds a ref anywhere inside.
    pub fn any_in(v: &Value) -> bool {
        match v {
            Value::Object(m) => CacheRef::parse(v).is_some() || m.values().any(CacheRef::any_in),
            Value::Array(a) => a.iter().any(CacheRef::any_in),
            _ => false,
        }
    }
}

/// `sha256:` followed by 64 lowercase hex digits.
pub fn is_sha256_digest(s: &str) -> bool {
    s.strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
}

/// Current wall clock in unix milliseconds. Used only by appenders, never by `decide()`.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The value at a dotted path with optional `[i]` indexes (`data.items[0].name`, `a.0`; the
/// empty path is the value itself): `output_select` paths, a transfer's `data_path`.
pub fn at_path<'a>(data: &'a Value, path: &str) -> Option<&'a Value> {
    let mut cur = data;
    for part in path.replace(']', "").split('.') {
        let (key, idx) = match part.split_once('[') {
            Some((k, i)) => (k, Some(i.parse::<usize>().ok()?)),
            None => (part, None),
        };
        if !key.is_empty() {
            cur = match cur {
                Value::Object(m) => m.get(key)?,
                Value::Array(a) => a.get(key.parse::<usize>().ok()?)?,
                _ => return None,
            };
        }
        if let Some(i) = idx {
            cur = cur.as_array()?.get(i)?;
        }
    }
    Some(cur)
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_cache_ref_uri_names_the_ref() {
        let r = CacheRef {
            digest: format!("sha256:{}", "ab".repeat(32)),
            format: CacheFormat::Arrow,
            bytes: 9,
            count: Some(3),
            columns: vec!["a".into()],
            item: Some(2),
        };
        let uri = r.uri();
        assert_eq!(uri, format!("mayfly://cache/arrow/{}#2", r.digest));
        let back = CacheRef::from_uri(&uri).expect("parses");
        assert_eq!(
            (back.digest, back.format, back.item),
            (r.digest.clone(), r.format, Some(2))
        );
        assert!(CacheRef::from_uri("mayfly://cache/xml/sha256:00").is_none());
        assert!(CacheRef::from_uri(&format!("mayfly://cache/json/{}#x", r.digest)).is_none());
        assert!(CacheRef::from_uri("http://example.com/x").is_none());
    }
    use super::*;
    use serde_json::json;

    const D: &str = "sha256:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    #[test]
    fn all_lists_every_event_kind_once() {
        // The enum's variants, counted by their wire names in this very source.
        let src = include_str!("lib.rs");
        let start = src.find("pub enum EventKind").unwrap_or(0);
        let end = start + src[start..].find("\n}").unwrap_or(0);
        let declared = src[start..end].matches("#[serde(rename = ").count();
        assert!(declared > 20, "the enum was not found ({declared})");
        assert_eq!(EventKind::ALL.len(), declared);
        let mut names: Vec<&str> = EventKind::ALL.iter().map(|k| k.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), declared);
    }

    #[test]
    fn cache_ref_round_trips_and_is_strict() {
        let r = CacheRef {
            digest: D.into(),
            format: CacheFormat::Arrow,
            bytes: 10,
            count: Some(3),
            columns: vec!["a".into()],
            item: None,
        };
        let v = r.to_value();
        let nested = serde_json::json!({"a": [v.clone(), {"b": r.element(3).to_value()}], "c": {"$ref": "#/x"}});
        let mut found = Vec::new();
        CacheRef::digests_in(&nested, &mut found);
        assert_eq!(found, vec![D, D]);
        assert_eq!(v["$ref"], D);
        assert_eq!(v["format"], "arrow");
        assert_eq!(CacheRef::parse(&v), Some(r.clone()));
        assert_eq!(
            CacheRef::parse(&r.element(2).to_value()).and_then(|r| r.item),
            Some(2)
        );
        // Not refs: JSON Schema `$ref`, bad digests, missing format, extra fields.
        assert_eq!(
            CacheRef::parse(&json!({"$ref": "#/definitions/x", "format": "json", "bytes": 1})),
            None
        );
        assert_eq!(
            CacheRef::parse(&json!({"$ref": "sha256:abc", "format": "json", "bytes": 1})),
            None
        );
        assert_eq!(CacheRef::parse(&json!({"$ref": D, "bytes": 1})), None);
        assert_eq!(
            CacheRef::parse(&json!({"$ref": D, "format": "json", "bytes": 1, "x": 1})),
            None
        );
        assert_eq!(
            CacheRef::parse(&json!({"$ref": D.to_uppercase(), "format": "json", "bytes": 1})),
            None
        );
        assert!(CacheRef::any_in(&json!({"a": [1, {"b": v}]})));
        assert!(!CacheRef::any_in(&json!({"a": [1, {"$ref": "#/x"}]})));
    }

    #[test]
    fn event_kind_round_trips_every_name() {
        // `ALL` is checked whole by `all_lists_every_event_kind_once`.
        for &k in EventKind::ALL {
            assert_eq!(EventKind::parse(k.as_str()), Some(k));
            assert_eq!(
                serde_json::to_value(k).ok(),
                Some(Value::String(k.as_str().into()))
            );
        }
        assert_eq!(EventKind::parse("nope"), None);
        // Budgets narrow field by field; an unset field leaves the other's.
        let a = Limits {
            step_timeout_s: Some(30),
            memory_mb: Some(512),
            egress: vec![Egress::Public],
            ..Limits::default()
        };
        let b = Limits {
            step_timeout_s: Some(10),
            max_attempts: Some(2),
            memory_mb: Some(1024),
            egress: vec![
                Egress::Allow(vec!["db.example:5432".into()]),
                Egress::Public,
            ],
            ..Limits::default()
        };
        assert_eq!(
            a.clone().narrow(b.clone()),
            Limits {
                step_timeout_s: Some(10),
                max_attempts: Some(2),
                memory_mb: Some(512),
                egress: vec![
                    Egress::Public,
                    Egress::Allow(vec!["db.example:5432".into()])
                ],
                ..Limits::default()
            }
        );
        assert_eq!(a.clone().narrow(Limits::default()), a);
        assert!(EventKind::ExecutionFailed.is_terminal());
        assert!(!EventKind::StepFinished.is_terminal());
    }

    #[test]
    fn command_ids_are_deterministic() {
        let e = ExecutionId::from("abc");
        assert_eq!(command_id(&e, 7), "abc/7");
    }

    #[test]
    fn step_finished_omits_empty_fields() {
        let p = StepFinished {
            index: None,
            result: Value::Null,
            set: Map::new(),
            inline: false,
            duration_ms: None,
            logs: None,
        };
        assert_eq!(
            serde_json::to_string(&p).ok().as_deref(),
            Some(r#"{"result":null}"#)
        );
    }
}
