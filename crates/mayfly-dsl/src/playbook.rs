//! The NoETL v2 playbook model and its parser/validator.

use crate::node::{Loc, Node, NodeV};
use crate::schema;
use crate::template::{Templates, templates};
use serde_json::{Map, Value};
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt;

/// One validation or parse problem, located in the source file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: String,
    pub loc: Loc,
    pub step: Option<String>,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.loc.line, self.loc.col, self.message
        )?;
        if let Some(s) = &self.step {
            write!(f, " (step `{s}`)")?;
        }
        Ok(())
    }
}

/// All problems found in a playbook (never empty).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct DslError {
    pub diagnostics: Vec<Diagnostic>,
}

impl fmt::Display for DslError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.diagnostics.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

/// Tool kinds this build can execute.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ToolKind {
    Python,
    Shell,
    Http,
    Playbook,
    Noop,
    Postgres,
    Duckdb,
    Nats,
    /// Fetch a result held in the shared cache by its `_ref`.
    Artifact,
    Transfer,
    /// Park the step until a callback arrives (no worker is held).
    Wait,
}

impl ToolKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ToolKind::Python => "python",
            ToolKind::Shell => "shell",
            ToolKind::Http => "http",
            ToolKind::Playbook => "playbook",
            ToolKind::Noop => "noop",
            ToolKind::Postgres => "postgres",
            ToolKind::Duckdb => "duckdb",
            ToolKind::Nats => "nats",
            ToolKind::Artifact => "artifact",
            ToolKind::Transfer => "transfer",
            ToolKind::Wait => "wait",
        }
    }
}

/// Loop execution mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoopMode {
    Sequential,
    Parallel,
}

/// Router mode of `next`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NextMode {
    /// First arc (in YAML order) whose `when` holds.
    Exclusive,
    /// Every arc whose `when` holds (parallel fan-out).
    Inclusive,
}

/// Where a `set` key writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SetTarget {
    /// `ctx.x` or a bare `x`: execution-scoped, visible as `{{ x }}` and `{{ ctx.x }}`.
    Ctx(String),
    /// `step.x`: merged into this step's own result object.
    Step(String),
    /// `iter.x`: block-local (one loop iteration / one pipeline run); visible to the
    /// following tasks as `iter.x` and `x`, never persisted. Only in task policy `then.set`.
    Iter(String),
}

/// One `set` assignment (value is a template node).
#[derive(Clone, Debug, PartialEq)]
pub struct SetOp {
    pub target: SetTarget,
    pub value: Node,
}

/// Backoff curve for `do: retry`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backoff {
    Fixed,
    Linear,
    Exponential,
}

/// What a task policy rule tells the worker to do.
#[derive(Clone, Debug, PartialEq)]
pub enum Directive {
    Continue,
    Retry {
        attempts: u32,
        delay_s: f64,
        backoff: Backoff,
        max_delay_s: f64,
    },
    Jump {
        to: String,
    },
    Break,
    Fail,
}

/// A policy rule: `when` (None = the `else` rule) → directive (+ set).
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    pub when: Option<Node>,
    pub directive: Directive,
    pub set: Vec<SetOp>,
    pub loc: Loc,
}

/// One task of a step's tool pipeline.
#[derive(Clone, Debug, PartialEq)]
pub struct Task {
    pub name: String,
    pub kind: ToolKind,
    /// The task's fields other than `name`, `kind`, `spec` and `set` (templated at run time).
    pub config: Node,
    /// Task-level `set:`, rendered after the task ran with `output` = its data, before the
    /// policy rules (NoETL's task_sequence order).
    pub set: Vec<SetOp>,
    pub rules: Vec<Rule>,
    /// What an *error* does when no rule matched: `Fail` unless `on_unmatched: continue`.
    pub on_unmatched_error: Directive,
    pub timeout_s: Option<f64>,
    pub loc: Loc,
}

/// `loop:` of a step.
#[derive(Clone, Debug, PartialEq)]
pub struct LoopSpec {
    pub items: Node,
    pub iterator: String,
    pub mode: LoopMode,
    pub max_in_flight: Option<Node>,
    pub loc: Loc,
}

/// One routing arc.
#[derive(Clone, Debug, PartialEq)]
pub struct Arc {
    pub step: String,
    pub when: Option<Node>,
    pub set: Vec<SetOp>,
    pub loc: Loc,
}

/// `next:` of a step; no arcs = the branch ends here.
#[derive(Clone, Debug, PartialEq)]
pub struct Next {
    pub mode: NextMode,
    pub arcs: Vec<Arc>,
    /// The router named its mode (`next.spec.mode`), which wins over `spec.next_mode`.
    pub explicit_mode: bool,
}

/// One admission rule of `spec.policy.admit.rules` (`when` None = the `else` rule).
#[derive(Clone, Debug, PartialEq)]
pub struct AdmitRule {
    pub when: Option<Node>,
    pub allow: bool,
    pub reason: Option<String>,
    pub loc: Loc,
}

/// `spec.policy.admit`: evaluated before the step runs (each loop item too). `exclusive`
/// (the default): the first rule whose `when` holds decides; `inclusive`: every rule whose
/// `when` holds must allow. No rule holding admits (NoETL's default).
#[derive(Clone, Debug, PartialEq)]
pub struct Admit {
    pub rules: Vec<AdmitRule>,
    pub inclusive: bool,
    pub loc: Loc,
}

/// One workflow step.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    pub name: String,
    pub desc: Option<String>,
    pub loc: Loc,
    /// Empty = pure routing step (completed inline by the engine).
    pub tasks: Vec<Task>,
    /// `tool:` is a list: the step's result is `{<task name>: <its data>, …}` (NoETL's
    /// task_sequence), not one task's data.
    pub pipeline: bool,
    pub input: Option<Node>,
    pub set: Vec<SetOp>,
    pub looping: Option<LoopSpec>,
    pub next: Next,
    pub timeout_s: Option<f64>,
    /// `spec.policy.admit`, if any.
    pub admit: Option<Admit>,
    /// The legacy step guard NoETL's Rust runtime still honours: false when the step is
    /// entered → the step is skipped (it runs nothing, its result is null) and its arcs
    /// route on as after any step.
    pub when: Option<Node>,
    /// `bound_paths`, computed once: a fan-out hydrates thousands of blocks of one step.
    bound: Memo<BTreeSet<String>>,
}

/// A value computed on first use and then kept; it takes no part in equality (it is derived
/// from the rest of its owner).
#[derive(Clone, Debug, Default)]
struct Memo<T>(std::sync::OnceLock<T>);

impl<T> PartialEq for Memo<T> {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Step {
    /// True when the engine can complete this step itself: no tool, or only `noop` tasks
    /// without policy rules or task `set` (those run their pipeline in a worker).
    pub fn is_inline(&self) -> bool {
        self.tasks
            .iter()
            .all(|t| t.kind == ToolKind::Noop && t.rules.is_empty() && t.set.is_empty())
    }

    /// The wait task, when this step parks for a callback.
    pub fn wait_task(&self) -> Option<&Task> {
        self.tasks.iter().find(|t| t.kind == ToolKind::Wait)
    }

    /// Template paths the step's block binds (`fetch.rows`, `steps.x.data`, `row`): every
    /// field a worker renders or evaluates (input, task fields but python `code`, policy
    /// rule conditions and `set` values). Used to hydrate only the cached payloads a block
    /// reads.
    pub fn bound_paths(&self) -> &BTreeSet<String> {
        self.bound.0.get_or_init(|| self.scan_bound_paths())
    }

    fn scan_bound_paths(&self) -> BTreeSet<String> {
        fn scan(n: &Node, bare: bool, out: &mut BTreeSet<String>) {
            match &n.v {
                NodeV::Str(s) => {
                    if let Ok(p) = templates().paths(s, bare) {
                        out.extend(p);
                    }
                }
                NodeV::Seq(items) => items.iter().for_each(|i| scan(i, false, out)),
                NodeV::Map(m) => m.iter().for_each(|(_, _, v)| scan(v, false, out)),
                _ => {}
            }
        }
        let mut out = BTreeSet::new();
        if let Some(i) = &self.input {
            scan(i, false, &mut out);
        }
        for t in &self.tasks {
            if let NodeV::Map(entries) = &t.config.v {
                for (k, _, v) in entries {
                    // Python code is rendered only where it holds template syntax.
                    if !(t.kind == ToolKind::Python
                        && k == "code"
                        && !v.as_str().is_some_and(Templates::is_template))
                    {
                        scan(v, false, &mut out);
                    }
                }
            }
            for r in &t.rules {
                if let Some(w) = &r.when {
                    scan(w, true, &mut out);
                }
                for op in &r.set {
                    scan(&op.value, false, &mut out);
                }
            }
        }
        out
    }

    /// The playbook task, when this step runs a child playbook.
    /// The playbook task of a child step (a step whose only task starts a child; a
    /// fire-and-forget playbook task among other tasks runs in the worker's pipeline).
    pub fn playbook_task(&self) -> Option<&Task> {
        match self.tasks.as_slice() {
            [t] if t.kind == ToolKind::Playbook => Some(t),
            _ => None,
        }
    }
}

/// A root `keychain:` entry (resolution happens in workers; see the server issue).
#[derive(Clone, Debug, PartialEq)]
pub struct KeychainEntry {
    pub name: String,
    pub kind: Option<String>,
    pub spec: Value,
    pub loc: Loc,
}

/// A parsed and validated playbook.
#[derive(Clone, Debug)]
pub struct Playbook {
    pub file: String,
    pub source: String,
    /// `sha256:` of the source text: the playbook's immutable version id.
    pub digest: String,
    pub name: String,
    /// Catalog path (`metadata.path`, defaulting to the name).
    pub path: String,
    pub description: Option<String>,
    pub workload: Map<String, Value>,
    pub keychain: Vec<KeychainEntry>,
    pub steps: Vec<Step>,
    /// Problems that do not stop the playbook from running (unreachable steps, cycles of
    /// inline steps): `validate` prints them, `run` prints them on stderr.
    pub warnings: Vec<Diagnostic>,
    index: HashMap<String, usize>,
    /// reach[i][j]: step j can be reached from step i by following one or more arcs.
    reach: Vec<Vec<bool>>,
    in_degree: Vec<usize>,
}

/// Tool kinds this build runs (`kind:` values; `workbook` references a root workbook task).
pub const TOOL_KINDS: &[&str] = &[
    "python", "shell", "http", "postgres", "duckdb", "nats", "playbook", "noop", "wait", "workbook",
];

/// A playbook task's `return_result: true` (its step takes the child's result).
fn returns_result(config: &Node) -> bool {
    matches!(
        config.get("return_result").map(|n| &n.v),
        Some(NodeV::Bool(true))
    )
}

/// A playbook task's `return_step` without `return_result` (its step takes the child's
/// status payload).
fn returns_status(config: &Node) -> bool {
    config.get("return_step").is_some() && !returns_result(config)
}

impl Task {
    /// The child's result is taken (`return_result: true`).
    pub fn returns_result(&self) -> bool {
        returns_result(&self.config)
    }

    /// The child's status payload is taken (`return_step`, without `return_result`).
    pub fn returns_status(&self) -> bool {
        returns_status(&self.config)
    }

    /// A playbook task whose step waits for its child (NoETL's default is not to).
    pub fn waits_for_child(&self) -> bool {
        self.kind == ToolKind::Playbook && (self.returns_result() || self.returns_status())
    }
}

/// Why a child's `path` is refused, if it is: a child is named by its catalog path, never
/// by a host file (`/etc/x.yaml`) or by climbing out of the playbook root (`../x`).
pub fn child_path_refusal(path: &str) -> Option<String> {
    if path.contains("{{") {
        return None;
    }
    if path.starts_with('/') || path.starts_with('\\') {
        return Some(format!(
            "child `path` `{path}` is absolute: children are named by catalog path (`metadata.path`, e.g. `team/etl`), never by a host file"
        ));
    }
    if path.split(['/', '\\']).any(|seg| seg == "..") {
        return Some(format!(
            "child `path` `{path}` climbs out with `..`: children are named by catalog path (`metadata.path`, e.g. `team/etl`)"
        ));
    }
    None
}

/// A child's `version`: a catalog version (an integer from 1, or its digits), or `latest` /
/// null for the latest one.
pub fn child_version(v: &serde_json::Value) -> Result<Option<u32>, String> {
    use serde_json::Value;
    let bad = || format!("a child's `version` is a catalog version (1, 2, …) or `latest`, not {v}");
    match v {
        Value::Null => Ok(None),
        Value::String(s) if s.trim() == "latest" => Ok(None),
        Value::String(s) => s
            .trim()
            .parse::<u32>()
            .ok()
            .filter(|n| *n > 0)
            .map(Some)
            .ok_or_else(bad),
        Value::Number(n) => n
            .as_u64()
            .filter(|n| (1..=u64::from(u32::MAX)).contains(n))
            .map(|n| Some(n as u32))
            .ok_or_else(bad),
        _ => Err(bad()),
    }
}

/// A child's catalog path and the version it names with an `@N` suffix (`team/etl@3`);
/// None: the latest.
pub fn split_child_version(path: &str) -> (&str, Option<u32>) {
    match path.rsplit_once('@') {
        Some((p, v)) if !p.is_empty() && !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) => {
            match v.parse::<u32>() {
                Ok(n) if n > 0 => (p, Some(n)),
                _ => (path, None),
            }
        }
        _ => (path, None),
    }
}

/// A child's `path` with the version its task's `version` names appended as `@N` (how a
/// version travels to the orchestrator, from a step and a pipeline task alike); the path as
/// it is when there is none or it is `latest`.
pub fn versioned_child_path(
    path: &str,
    version: Option<&serde_json::Value>,
) -> Result<String, String> {
    match version.map(child_version).transpose()?.flatten() {
        None => Ok(path.to_owned()),
        Some(_) if split_child_version(path).1.is_some() => Err(format!(
            "child `{path}`: the version is given twice, by `@N` and by `version`"
        )),
        Some(n) => Ok(format!("{path}@{n}")),
    }
}

/// A fire-and-forget child has no wait to bound; accepting the key would ignore it.
const PLAYBOOK_TIMEOUT: &str = "a `timeout` on a fire-and-forget child playbook bounds nothing (the step does not wait for it): add `return_step` or `return_result: true` to wait with a timeout, or bound the child's own steps";

/// Operations of the `nats` tool.
pub const NATS_OPERATIONS: &[&str] = &[
    "kv_get",
    "kv_put",
    "kv_delete",
    "kv_keys",
    "kv_purge",
    "object_get",
    "object_put",
    "object_delete",
    "object_list",
    "object_info",
    "js_publish",
    "js_consume",
    "js_get_msg",
    "js_stream_info",
    "publish",
    "request",
];

/// Most runs of one inline step in one execution: a cycle of inline steps (`a → b → a` with
/// no tool) otherwise never leaves the engine.
pub const MAX_INLINE_RUNS: u32 = 10_000;

/// The entry step name (the NoETL Rust engine's rule).
pub const ENTRY_STEP: &str = "start";

/// Names every template may read besides workload keys, step names and ctx keys.
const SCOPE_NAMES: &[&str] = &[
    "callbacks",
    "error",
    "workload",
    "ctx",
    "steps",
    "iter",
    "event",
    "output",
    "result",
    "execution_id",
    "path",
    "version",
    "loop_index",
    "_index",
    "_total",
    "_attempt",
    "keychain",
    "input",
    "attempt",
    "_prev",
    "data",
    "range",
    "dict",
    "namespace",
    "debug",
    "lipsum",
    "cycler",
    "joiner",
    "true",
    "false",
    "none",
    "True",
    "False",
    "None",
];

/// Options for [`parse`].
#[derive(Clone, Debug, Default)]
pub struct ParseOptions {
    /// Extra workload keys that will exist at run time (e.g. `--set` overrides).
    pub extra_vars: Vec<String>,
}

/// Every `keychain.<alias>` a node's strings mention (templates read credentials so).
pub fn keychain_mentions(n: &Node, out: &mut BTreeSet<String>) {
    match &n.v {
        NodeV::Str(s) => {
            let mut rest = s.as_str();
            while let Some(i) = rest.find("keychain.") {
                let after = &rest[i + "keychain.".len()..];
                let name: String = after
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == '-')
                    .collect();
                if !name.is_empty() {
                    out.insert(name);
                }
                rest = after;
            }
        }
        NodeV::Seq(items) => items.iter().for_each(|i| keychain_mentions(i, out)),
        NodeV::Map(m) => m.iter().for_each(|(_, _, v)| keychain_mentions(v, out)),
        _ => {}
    }
}

/// What a playbook may touch, as far as its text says: for admission policies.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reach {
    /// Tool kinds of every task.
    pub tools: BTreeSet<String>,
    /// Keychain aliases named literally (`auth: alias`, `keychain.alias`).
    pub aliases: BTreeSet<String>,
    /// Some `auth:` is a template: its alias is known only at run time.
    pub templated_auth: bool,
}

impl Playbook {
    /// The tool kinds and keychain aliases this playbook can use.
    pub fn reach(&self) -> Reach {
        let mut r = Reach::default();
        for s in &self.steps {
            if let Some(i) = &s.input {
                keychain_mentions(i, &mut r.aliases);
            }
            for t in &s.tasks {
                r.tools.insert(t.kind.as_str().to_owned());
                keychain_mentions(&t.config, &mut r.aliases);
                if let Some(a) = t.config.get("auth").and_then(Node::as_str) {
                    if a.contains("{{") || a.contains("{%") {
                        r.templated_auth = true;
                    } else if !a.is_empty() {
                        r.aliases.insert(a.to_owned());
                    }
                }
            }
        }
        r
    }

    pub fn step(&self, name: &str) -> Option<&Step> {
        self.index.get(name).map(|&i| &self.steps[i])
    }

    pub fn step_index(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    /// A join is a step that arcs from two or more distinct steps lead to.
    pub fn is_join(&self, name: &str) -> bool {
        self.index
            .get(name)
            .is_some_and(|&i| self.in_degree[i] >= 2)
    }

    /// True when `to` can be reached from `from` by following arcs.
    pub fn reaches(&self, from: &str, to: &str) -> bool {
        match (self.index.get(from), self.index.get(to)) {
            (Some(&f), Some(&t)) => self.reach[f][t],
            _ => false,
        }
    }

    /// Location string for messages: `file:line:col`.
    pub fn at(&self, loc: Loc) -> String {
        format!("{}:{}:{}", self.file, loc.line, loc.col)
    }
}

/// Parse and validate a playbook read as bytes: invalid UTF-8 is reported at its byte offset
/// (and line:col).
pub fn parse_bytes(file: &str, bytes: &[u8], opts: &ParseOptions) -> Result<Playbook, DslError> {
    match std::str::from_utf8(bytes) {
        Ok(s) => parse(file, s, opts),
        Err(e) => {
            let at = e.valid_up_to();
            let before = String::from_utf8_lossy(&bytes[..at]);
            let line = before.matches('\n').count() as u32 + 1;
            let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) as u32 + 1;
            Err(DslError {
                diagnostics: vec![Diagnostic {
                    file: file.to_owned(),
                    loc: Loc { line, col },
                    step: None,
                    message: format!("invalid UTF-8 at byte offset {at}"),
                }],
            })
        }
    }
}

/// Stack for parsing: YAML deserialization recurses per nesting level with large frames
/// (tens of KiB a level in a debug build), so untrusted input is parsed on a thread whose
/// stack is known, whatever thread (a 2 MiB runtime worker) asked.
const PARSE_STACK: usize = 64 << 20;

/// Parse and validate a playbook. `file` is used only in messages.
pub fn parse(file: &str, source: &str, opts: &ParseOptions) -> Result<Playbook, DslError> {
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("mayfly-parse".into())
            .stack_size(PARSE_STACK)
            .spawn_scoped(s, || parse_here(file, source, opts))
            .map(|h| h.join())
    })
    .unwrap_or_else(|_| Ok(parse_here(file, source, opts)))
    .unwrap_or_else(|_| {
        Err(DslError {
            diagnostics: vec![Diagnostic {
                file: file.to_owned(),
                loc: Loc { line: 1, col: 1 },
                step: None,
                message: "the parser failed on this input".into(),
            }],
        })
    })
}

fn parse_here(file: &str, source: &str, opts: &ParseOptions) -> Result<Playbook, DslError> {
    // YAML 1.2 core booleans: `n`, `y`, `on`, `off` stay strings (keys like `n:` are common).
    let mut options = serde_saphyr::Options::default();
    options.strict_booleans = true;
    let root: Node = serde_saphyr::from_str_with_options(source, options).map_err(|e| {
        let loc = e
            .location()
            .map(|l| Loc {
                line: l.line() as u32,
                col: l.column() as u32,
            })
            .unwrap_or(Loc { line: 1, col: 1 });
        let text = e.to_string();
        let first = text.lines().next().unwrap_or("invalid YAML").to_owned();
        DslError {
            diagnostics: vec![Diagnostic {
                file: file.to_owned(),
                loc,
                step: None,
                message: format!("invalid YAML: {first}"),
            }],
        }
    })?;
    let mut p = Parser {
        file,
        diags: Vec::new(),
        warnings: Vec::new(),
        step: None,
    };
    let pb = p.playbook(&root, source, opts);
    if p.diags.is_empty()
        && let Some(mut pb) = pb
    {
        pb.warnings = p.warnings;
        return Ok(pb);
    }
    if p.diags.is_empty() {
        p.diags.push(Diagnostic {
            file: file.into(),
            loc: root.loc,
            step: None,
            message: "invalid playbook".into(),
        });
    }
    Err(DslError {
        diagnostics: p.diags,
    })
}

struct Parser<'a> {
    file: &'a str,
    diags: Vec<Diagnostic>,
    warnings: Vec<Diagnostic>,
    step: Option<String>,
}

impl Parser<'_> {
    fn err(&mut self, loc: Loc, message: impl Into<String>) {
        self.diags.push(Diagnostic {
            file: self.file.to_owned(),
            loc,
            step: self.step.clone(),
            message: message.into(),
        });
    }

    fn string(&mut self, n: &Node, what: &str) -> Option<String> {
        match &n.v {
            NodeV::Str(s) => Some(s.clone()),
            NodeV::Int(i) => Some(i.to_string()),
            NodeV::Float(f) => Some(f.to_string()),
            NodeV::Bool(b) => Some(b.to_string()),
            _ => {
                self.err(
                    n.loc,
                    format!("`{what}` must be a string, found {}", n.type_name()),
                );
                None
            }
        }
    }

    /// A finite, non-negative number of at most one year (all numbers here are counts or
    /// seconds; anything else would overflow a `Duration` or is a mistake).
    fn number(&mut self, n: &Node, what: &str) -> Option<f64> {
        let v = self.raw_number(n, what)?;
        if !v.is_finite() || !(0.0..=31_536_000.0).contains(&v) {
            self.err(
                n.loc,
                format!("`{what}` must be between 0 and 31536000, found {v}"),
            );
            return None;
        }
        Some(v)
    }

    fn raw_number(&mut self, n: &Node, what: &str) -> Option<f64> {
        match &n.v {
            NodeV::Int(i) => Some(*i as f64),
            NodeV::Float(f) => Some(*f),
            NodeV::Str(s) => match s.trim().parse::<f64>() {
                Ok(f) => Some(f),
                Err(_) => {
                    self.err(n.loc, format!("`{what}` must be a number, found `{s}`"));
                    None
                }
            },
            _ => {
                self.err(
                    n.loc,
                    format!("`{what}` must be a number, found {}", n.type_name()),
                );
                None
            }
        }
    }

    fn map<'n>(&mut self, n: &'n Node, what: &str) -> Option<&'n [(String, Loc, Node)]> {
        match &n.v {
            NodeV::Map(m) => Some(m),
            _ => {
                self.err(
                    n.loc,
                    format!("`{what}` must be a mapping, found {}", n.type_name()),
                );
                None
            }
        }
    }

    /// Every key of mapping `n` must be in `known`; `place` selects the legacy messages.
    fn keys(&mut self, n: &Node, place: &str, what: &str, known: &[&str]) {
        let NodeV::Map(entries) = &n.v else { return };
        for (k, loc, _) in entries {
            if known.contains(&k.as_str()) {
                continue;
            }
            let msg = match schema::legacy(place, k) {
                Some(alt) => format!("`{k}` in {what}: {alt}"),
                None => match schema::did_you_mean(k, known) {
                    Some(m) => format!("unknown key `{k}` in {what}; did you mean `{m}`?"),
                    None => format!("unknown key `{k}` in {what} (known: {})", known.join(", ")),
                },
            };
            self.err(*loc, msg);
        }
    }

    fn check_templates(&mut self, n: &Node) {
        match &n.v {
            NodeV::Str(s) => {
                if let Err(m) = templates().check(s) {
                    self.err(n.loc, format!("template error: {m}"));
                }
            }
            NodeV::Seq(items) => items.iter().for_each(|i| self.check_templates(i)),
            NodeV::Map(entries) => entries.iter().for_each(|(_, _, v)| self.check_templates(v)),
            _ => {}
        }
    }

    fn playbook(&mut self, root: &Node, source: &str, opts: &ParseOptions) -> Option<Playbook> {
        self.map(root, "document")?;
        self.keys(root, "root", "the playbook", schema::ROOT);
        if let Some(e) = root.get("executor").filter(|e| !e.is_null()) {
            self.executor(e);
        }
        match root.get("apiVersion").and_then(Node::as_str) {
            Some("noetl.io/v2") => {}
            Some(other) => {
                let loc = root.get("apiVersion").map(|n| n.loc).unwrap_or(root.loc);
                self.err(
                    loc,
                    format!("unsupported apiVersion `{other}` (expected `noetl.io/v2`)"),
                )
            }
            None => self.err(root.loc, "missing `apiVersion: noetl.io/v2`"),
        }
        match root.get("kind").and_then(Node::as_str) {
            Some("Playbook") => {}
            Some(other) => {
                let loc = root.get("kind").map(|n| n.loc).unwrap_or(root.loc);
                self.err(
                    loc,
                    format!("unsupported kind `{other}` (expected `Playbook`)"),
                )
            }
            None => self.err(root.loc, "missing `kind: Playbook`"),
        }
        let (name, path, description) = match root.get("metadata") {
            Some(m) if self.map(m, "metadata").is_some() => {
                self.keys(m, "metadata", "`metadata`", schema::METADATA);
                let name = match m.get("name") {
                    Some(n) => self.string(n, "metadata.name"),
                    None => {
                        self.err(m.loc, "`metadata.name` is required");
                        None
                    }
                };
                let path = m.get("path").and_then(|p| self.string(p, "metadata.path"));
                let desc = m
                    .get("description")
                    .and_then(|d| self.string(d, "metadata.description"));
                (name, path, desc)
            }
            Some(_) => (None, None, None),
            None => {
                self.err(root.loc, "missing `metadata` (with at least `name`)");
                (None, None, None)
            }
        };
        let workload = match root.get("workload") {
            None => Map::new(),
            Some(w) if w.is_null() => Map::new(),
            Some(w) => match w.to_json() {
                Value::Object(m) => m,
                _ => {
                    self.err(w.loc, "`workload` must be a mapping");
                    Map::new()
                }
            },
        };
        let keychain = self.keychain(root.get("keychain"));
        let workbook: HashMap<String, Node> = self.workbook(root.get("workbook"));

        let Some(wf) = root.get("workflow") else {
            self.err(root.loc, "missing `workflow` (a list of steps)");
            return None;
        };
        let Some(items) = wf.as_seq() else {
            self.err(
                wf.loc,
                format!(
                    "`workflow` must be a list of steps, found {}",
                    wf.type_name()
                ),
            );
            return None;
        };
        if items.is_empty() {
            self.err(wf.loc, "`workflow` has no steps");
        }
        let mut steps = Vec::new();
        let mut index = HashMap::new();
        for item in items {
            if let Some(step) = self.step_def(item, &workbook) {
                if index.contains_key(&step.name) {
                    self.step = Some(step.name.clone());
                    self.err(step.loc, format!("duplicate step name `{}`", step.name));
                } else {
                    index.insert(step.name.clone(), steps.len());
                    steps.push(step);
                }
            }
            self.step = None;
        }
        if !steps.is_empty() && !index.contains_key(ENTRY_STEP) {
            self.err(
                wf.loc,
                format!("no entry step: the workflow must contain a step named `{ENTRY_STEP}`"),
            );
        }
        // Arcs must point at real steps.
        for s in &steps {
            for a in &s.next.arcs {
                if !index.contains_key(&a.step) {
                    self.step = Some(s.name.clone());
                    let known: Vec<&str> = steps.iter().map(|s| s.name.as_str()).collect();
                    self.err(
                        a.loc,
                        format!(
                            "arc to unknown step `{}` (steps: {})",
                            a.step,
                            known.join(", ")
                        ),
                    );
                }
            }
        }
        self.step = None;
        self.check_condition_scope(&steps, &workload, opts);

        let n = steps.len();
        let mut in_degree = vec![0usize; n];
        let mut adj = vec![Vec::new(); n];
        for (i, s) in steps.iter().enumerate() {
            let mut seen = BTreeSet::new();
            for a in &s.next.arcs {
                if let Some(&j) = index.get(&a.step) {
                    adj[i].push(j);
                    if seen.insert(j) {
                        in_degree[j] += 1;
                    }
                }
            }
        }
        let reach: Vec<Vec<bool>> = (0..n)
            .map(|i| {
                let mut r = vec![false; n];
                let mut q: VecDeque<usize> = adj[i].iter().copied().collect();
                while let Some(j) = q.pop_front() {
                    if !r[j] {
                        r[j] = true;
                        q.extend(adj[j].iter().copied());
                    }
                }
                r
            })
            .collect();
        self.graph_warnings(&steps, &index, &reach);
        let name = name?;
        Some(Playbook {
            file: self.file.to_owned(),
            source: source.to_owned(),
            digest: mayfly_trust::sha256_digest(source.as_bytes()),
            path: path.unwrap_or_else(|| name.clone()),
            name,
            description,
            workload,
            keychain,
            steps,
            warnings: Vec::new(),
            index,
            reach,
            in_degree,
        })
    }

    fn warn(&mut self, loc: Loc, step: &str, message: String) {
        self.warnings.push(Diagnostic {
            file: self.file.to_owned(),
            loc,
            step: Some(step.to_owned()),
            message,
        });
    }

    /// Steps `start` never reaches, and cycles made only of inline steps (no tool runs in
    /// them: they spin in the engine until a `when` stops them, capped at run time).
    fn graph_warnings(
        &mut self,
        steps: &[Step],
        index: &HashMap<String, usize>,
        reach: &[Vec<bool>],
    ) {
        let Some(&start) = index.get(ENTRY_STEP) else {
            return;
        };
        for (i, s) in steps.iter().enumerate() {
            if i != start && !reach[start][i] {
                self.warn(
                    s.loc,
                    &s.name,
                    format!("step `{}` is unreachable from `{ENTRY_STEP}`", s.name),
                );
            }
        }
        // Reachability through inline steps only.
        let inline: Vec<bool> = steps
            .iter()
            .map(|s| s.is_inline() && s.looping.is_none())
            .collect();
        let mut reported = vec![false; steps.len()];
        for (i, s) in steps.iter().enumerate() {
            if !inline[i] || reported[i] {
                continue;
            }
            let mut seen = vec![false; steps.len()];
            let mut stack: Vec<usize> = s
                .next
                .arcs
                .iter()
                .filter_map(|a| index.get(&a.step).copied())
                .collect();
            while let Some(j) = stack.pop() {
                if !inline[j] || seen[j] {
                    continue;
                }
                seen[j] = true;
                stack.extend(
                    steps[j]
                        .next
                        .arcs
                        .iter()
                        .filter_map(|a| index.get(&a.step).copied()),
                );
            }
            if seen[i] {
                let members: Vec<&str> = (0..steps.len())
                    .filter(|&j| seen[j])
                    .map(|j| steps[j].name.as_str())
                    .collect();
                for j in 0..steps.len() {
                    reported[j] |= seen[j];
                }
                self.warn(
                    s.loc,
                    &s.name,
                    format!(
                        "steps {} form a cycle of inline steps (no tool runs in it): each pass is appended by the engine itself; an execution stops with `inline_cycle` after {MAX_INLINE_RUNS} passes of one step",
                        members.iter().map(|m| format!("`{m}`")).collect::<Vec<_>>().join(", ")
                    ),
                );
            }
        }
    }

    fn keychain(&mut self, n: Option<&Node>) -> Vec<KeychainEntry> {
        let Some(n) = n else { return Vec::new() };
        let Some(items) = n.as_seq() else {
            if !n.is_null() {
                self.err(
                    n.loc,
                    "`keychain` must be a list of {name, kind, …} entries",
                );
            }
            return Vec::new();
        };
        let mut out = Vec::new();
        for it in items {
            self.keys(it, "keychain", "a keychain entry", schema::KEYCHAIN);
            match it.get("name").and_then(Node::as_str) {
                Some(name) => out.push(KeychainEntry {
                    name: name.to_owned(),
                    kind: it.get("kind").and_then(Node::as_str).map(str::to_owned),
                    spec: it.to_json(),
                    loc: it.loc,
                }),
                None => self.err(it.loc, "keychain entry needs a `name`"),
            }
        }
        out
    }

    fn workbook(&mut self, n: Option<&Node>) -> HashMap<String, Node> {
        let mut out = HashMap::new();
        let Some(n) = n else { return out };
        let Some(items) = n.as_seq() else {
            if !n.is_null() {
                self.err(n.loc, "`workbook` must be a list of {name, tool} entries");
            }
            return out;
        };
        for it in items {
            self.keys(it, "workbook", "a workbook entry", schema::WORKBOOK);
            match (it.get("name").and_then(Node::as_str), it.get("tool")) {
                (Some(name), Some(tool)) => {
                    out.insert(name.to_owned(), tool.clone());
                }
                _ => self.err(it.loc, "workbook entry needs `name` and `tool`"),
            }
        }
        out
    }

    fn step_def(&mut self, n: &Node, workbook: &HashMap<String, Node>) -> Option<Step> {
        let entries = self.map(n, "workflow item")?;
        let name = match n.get("step") {
            Some(s) => self.string(s, "step")?,
            None => {
                self.err(n.loc, "workflow item is missing `step` (its name)");
                return None;
            }
        };
        self.step = Some(name.clone());
        let _ = entries;
        self.keys(n, "step", "a step", schema::STEP);
        let guard = n.get("when").cloned();
        if let Some(w) = &guard {
            self.check_templates(w);
        }
        let desc = n
            .get("desc")
            .or(n.get("description"))
            .and_then(|d| self.string(d, "desc"));
        let input = n.get("input").filter(|i| !i.is_null()).cloned();
        if let Some(i) = &input
            && self.map(i, "input").is_some()
        {
            self.check_templates(i);
        }
        let set = n
            .get("set")
            .map(|s| self.set_ops(s, false))
            .unwrap_or_default();
        let mut timeout_s = None;
        let mut step_rules = Vec::new();
        let mut admit = None;
        let mut next_mode = None;
        if let Some(spec) = n.get("spec").filter(|s| !s.is_null())
            && self.map(spec, "spec").is_some()
        {
            self.keys(spec, "step_spec", "a step's `spec`", schema::STEP_SPEC);
            timeout_s = spec
                .get("timeout")
                .and_then(|t| self.number(t, "spec.timeout"));
            if let Some(p) = spec.get("policy").filter(|p| !p.is_null())
                && self.map(p, "spec.policy").is_some()
            {
                self.keys(
                    p,
                    "step_policy",
                    "a step's `spec.policy`",
                    schema::STEP_POLICY,
                );
                if let Some(rules) = p.get("rules") {
                    step_rules = self.rules(rules);
                }
                if let Some(a) = p.get("admit").filter(|a| !a.is_null()) {
                    admit = self.admit(a);
                }
            }
            if let Some(m) = spec.get("next_mode") {
                next_mode = self.next_mode(m);
            }
        }
        let mut tasks = match n.get("tool") {
            None => Vec::new(),
            Some(t) if t.is_null() => Vec::new(),
            Some(t) => match &t.v {
                NodeV::Map(_) => self.task(t, &name, workbook).into_iter().collect(),
                NodeV::Seq(items) => items
                    .iter()
                    .enumerate()
                    .filter_map(|(i, it)| self.task(it, &format!("task_{}", i + 1), workbook))
                    .collect(),
                _ => {
                    self.err(
                        t.loc,
                        format!(
                            "`tool` must be a mapping or a list of tasks, found {}",
                            t.type_name()
                        ),
                    );
                    Vec::new()
                }
            },
        };
        for t in tasks.iter_mut() {
            if t.rules.is_empty() {
                t.rules = step_rules.clone();
            }
        }
        let mut names = BTreeSet::new();
        for t in &tasks {
            if !names.insert(t.name.clone()) {
                self.err(
                    t.loc,
                    format!("duplicate task name `{}` in the pipeline", t.name),
                );
            }
        }
        for t in &tasks {
            for r in &t.rules {
                if let Directive::Jump { to } = &r.directive
                    && !names.contains(to)
                {
                    self.err(r.loc, format!("`jump` to unknown task `{to}`"));
                }
            }
        }
        if tasks.iter().any(|t| t.kind == ToolKind::Wait) && tasks.len() > 1 {
            let loc = tasks[0].loc;
            self.err(loc, "a `wait` task must be the only task of its step (the step parks until its callback)");
        }
        if tasks.len() > 1 {
            for t in tasks.iter().filter(|t| t.kind == ToolKind::Playbook) {
                if t.waits_for_child() {
                    self.err(t.loc, "a `playbook` task that waits for its child (`return_result`, `return_step`) must be the only task of its step (the step then waits without holding a worker); a fire-and-forget playbook task may share a step");
                }
            }
        }
        let looping = n
            .get("loop")
            .filter(|l| !l.is_null())
            .and_then(|l| self.loop_spec(l));
        let mut next = self.next(n.get("next"));
        if let Some(m) = next_mode
            && !next.explicit_mode
        {
            next.mode = m;
        }
        let pipeline = matches!(n.get("tool").map(|t| &t.v), Some(NodeV::Seq(_)));
        let fire_and_forget = |t: &Task| t.kind == ToolKind::Playbook && !t.waits_for_child();
        if timeout_s.is_some()
            && tasks.len() == 1
            && tasks.iter().any(fire_and_forget)
            && let Some(t) = n.get("spec").and_then(|s| s.get("timeout"))
        {
            self.err(t.loc, PLAYBOOK_TIMEOUT);
        }
        Some(Step {
            name,
            desc,
            loc: n.loc,
            tasks,
            pipeline,
            input,
            set,
            looping,
            next,
            timeout_s,
            admit,
            when: guard,
            bound: Memo::default(),
        })
    }

    fn task(
        &mut self,
        n: &Node,
        default_name: &str,
        workbook: &HashMap<String, Node>,
    ) -> Option<Task> {
        let entries = self.map(n, "tool")?;
        let kind_node = match n.get("kind") {
            Some(k) => k,
            None => {
                self.err(n.loc, "tool is missing `kind`");
                return None;
            }
        };
        let kind_str = self.string(kind_node, "kind")?;
        if kind_str == "workbook" {
            self.keys(
                n,
                "workbook_ref",
                "a `kind: workbook` reference",
                schema::WORKBOOK_REF,
            );
            let Some(target) = n.get("name").and_then(Node::as_str) else {
                self.err(n.loc, "`kind: workbook` needs `name` (the workbook task)");
                return None;
            };
            let Some(tool) = workbook.get(target) else {
                self.err(n.loc, format!("unknown workbook task `{target}`"));
                return None;
            };
            // The reference's own `input` overrides the workbook task's.
            let mut tool = tool.clone();
            if let (Some(over), NodeV::Map(tm)) = (n.get("input"), &mut tool.v) {
                match tm.iter_mut().find(|(k, _, _)| k == "input") {
                    Some((_, _, existing)) => {
                        if let (NodeV::Map(base), NodeV::Map(add)) = (&mut existing.v, &over.v) {
                            for (k, l, v) in add {
                                base.retain(|(bk, _, _)| bk != k);
                                base.push((k.clone(), *l, v.clone()));
                            }
                        } else {
                            *existing = over.clone();
                        }
                    }
                    None => tm.push(("input".into(), over.loc, over.clone())),
                }
            }
            if let NodeV::Map(tm) = &mut tool.v {
                tm.retain(|(k, _, _)| k != "name");
                tm.push((
                    "name".into(),
                    n.loc,
                    Node {
                        loc: n.loc,
                        v: NodeV::Str(target.to_owned()),
                    },
                ));
            }
            return self.task(&tool, target, &HashMap::new());
        }
        let kind = match kind_str.as_str() {
            "python" => ToolKind::Python,
            "shell" => ToolKind::Shell,
            "http" => ToolKind::Http,
            "playbook" => ToolKind::Playbook,
            "noop" => ToolKind::Noop,
            "postgres" => ToolKind::Postgres,
            "duckdb" => ToolKind::Duckdb,
            "nats" => ToolKind::Nats,
            "artifact" => ToolKind::Artifact,
            "transfer" => ToolKind::Transfer,
            "wait" | "callback" => ToolKind::Wait,
            "ducklake" | "snowflake" | "container" | "rhai" | "secrets" | "mcp" | "agent"
            | "playbooks" | "iterator" | "script" | "snowflake_transfer" | "gcs" | "gateway"
            | "task_sequence" | "subscription" | "wasm" => {
                let instead = match kind_str.as_str() {
                    "secrets" => {
                        "; secrets never become step results in mayfly: declare the alias under `keychain:` and read `{{ keychain.<alias>.<field> }}` in the step that needs it"
                    }
                    "iterator" => "; iterate with a step `loop: {in: …, iterator: …}`",
                    "script" => {
                        "; run scripts with `kind: python` (`script: {source: …}`) or `kind: shell`"
                    }
                    "ducklake" => "; `kind: duckdb` runs DuckDB SQL",
                    "task_sequence" => "; write the pipeline as `tool:` with a list of tasks",
                    "playbooks" => "; call one child per task with `kind: playbook`",
                    _ => "",
                };
                self.err(
                    kind_node.loc,
                    format!(
                        "tool kind `{kind_str}` is not available in this build (available: {}){instead}",
                        TOOL_KINDS.join(", ")
                    ),
                );
                return None;
            }
            other => {
                let hint = schema::did_you_mean(other, TOOL_KINDS)
                    .map(|m| format!("; did you mean `{m}`?"))
                    .unwrap_or_default();
                self.err(
                    kind_node.loc,
                    format!(
                        "unknown tool kind `{other}` (available: {}){hint}",
                        TOOL_KINDS.join(", ")
                    ),
                );
                return None;
            }
        };
        let known: Vec<&str> = schema::TASK_COMMON
            .iter()
            .chain(schema::tool_keys(&kind_str))
            .copied()
            .collect();
        self.keys(n, "tool", &format!("a `{kind_str}` task"), &known);
        let name = n
            .get("name")
            .and_then(Node::as_str)
            .unwrap_or(default_name)
            .to_owned();
        let mut rules = Vec::new();
        let mut timeout_s = None;
        let mut on_unmatched_error = Directive::Fail;
        let mut task_set = Vec::new();
        if let Some(s) = n.get("set").filter(|s| !s.is_null()) {
            task_set = self.set_ops(s, true);
        }
        if let Some(spec) = n.get("spec").filter(|s| !s.is_null()) {
            self.keys(spec, "task_spec", "a task's `spec`", schema::TASK_SPEC);
            if let Some(p) = spec.get("policy").filter(|p| !p.is_null()) {
                self.keys(
                    p,
                    "task_policy",
                    "a task's `spec.policy`",
                    schema::TASK_POLICY,
                );
            }
            if let Some(r) = spec.get("policy").and_then(|p| p.get("rules")) {
                rules = self.rules(r);
            }
            if let Some(u) = spec.get("policy").and_then(|p| p.get("on_unmatched")) {
                match u.as_str() {
                    Some("continue") => on_unmatched_error = Directive::Continue,
                    Some("fail") => {}
                    _ => self.err(u.loc, "`on_unmatched` must be `continue` or `fail`"),
                }
            }
            timeout_s = spec
                .get("timeout")
                .and_then(|t| self.number(t, "spec.timeout"));
        }
        if let Some(t) = n.get("timeout_seconds").or(n.get("timeout")) {
            timeout_s = self.number(t, "timeout");
        }
        let config_entries: Vec<(String, Loc, Node)> = entries
            .iter()
            .filter(|(k, _, _)| !matches!(k.as_str(), "name" | "kind" | "spec" | "set"))
            .cloned()
            .collect();
        let config = Node {
            loc: n.loc,
            v: NodeV::Map(config_entries),
        };
        match kind {
            ToolKind::Python => match config.get("code") {
                Some(c) if c.as_str().is_some() => {}
                Some(c) => self.err(c.loc, "python `code` must be a string"),
                None if ["code_b64", "code_base64", "script"]
                    .iter()
                    .any(|k| config.get(k).is_some()) => {}
                None => self.err(n.loc, "python tool needs `code` (or `code_b64`, `script`)"),
            },
            ToolKind::Shell => {
                if config
                    .get("cmds")
                    .or(config.get("command"))
                    .or(config.get("cmd"))
                    .is_none()
                {
                    self.err(n.loc, "shell tool needs `cmds` (a list) or `command`");
                }
            }
            ToolKind::Http => {
                if config.get("url").or(config.get("endpoint")).is_none() {
                    self.err(n.loc, "http tool needs `url`");
                }
            }
            ToolKind::Playbook => {
                match config.get("path") {
                    None => self.err(n.loc, "playbook tool needs `path`"),
                    Some(p) => {
                        if let Some(why) = p.as_str().and_then(child_path_refusal) {
                            self.err(p.loc, why);
                        }
                        if let (Some(v), Some(path)) = (config.get("version"), p.as_str())
                            && split_child_version(path).1.is_some()
                        {
                            self.err(v.loc, "the child's version is given twice: by `@N` in `path` and by `version`");
                        }
                    }
                }
                if let Some(v) = config.get("version")
                    && !v.as_str().is_some_and(|s| s.contains("{{"))
                    && let Err(why) = child_version(&v.to_json())
                {
                    self.err(v.loc, why);
                }
                let waits = returns_result(&config) || returns_status(&config);
                if let Some(t) = n.get("timeout_seconds").or(n.get("timeout"))
                    && !waits
                {
                    self.err(t.loc, PLAYBOOK_TIMEOUT);
                }
                if let Some(r) = config.get("return_result")
                    && !matches!(r.v, NodeV::Bool(_))
                {
                    self.err(r.loc, "`return_result` must be true or false");
                }
                if let Some(r) = config.get("result_step")
                    && r.as_str().is_none()
                {
                    self.err(r.loc, "`result_step` must name a step of the child");
                }
            }
            ToolKind::Noop => {}
            ToolKind::Wait => {}
            ToolKind::Postgres => {
                if config
                    .get("query")
                    .or(config.get("sql"))
                    .or(config.get("command"))
                    .is_none()
                {
                    self.err(n.loc, "postgres tool needs `query` or `command`");
                }
            }
            ToolKind::Transfer => {
                for (side, keys) in [
                    ("source", schema::TRANSFER_SOURCE),
                    ("target", schema::TRANSFER_TARGET),
                ] {
                    match config.get(side) {
                        None => self.err(n.loc, format!("transfer tool needs `{side}`")),
                        Some(ep) => {
                            self.keys(ep, "transfer", &format!("transfer `{side}`"), keys);
                        }
                    }
                }
            }
            ToolKind::Artifact => {
                if let Some(a) = config.get("action") {
                    match a.as_str() {
                        Some("get") => {}
                        Some("put") => self.err(
                            a.loc,
                            "artifact `action: put` is not supported (NoETL's Rust runtime refuses it too): a result over the inline budget is stored by reference already; name it with `{{ s._ref }}`",
                        ),
                        Some(t) if t.contains("{{") => {}
                        _ => self.err(a.loc, "artifact `action` must be `get`"),
                    }
                }
                let has_ref = ["result_ref", "ref"]
                    .iter()
                    .any(|k| config.get(k).is_some())
                    || config
                        .get("input")
                        .is_some_and(|i| i.get("result_ref").is_some() || i.get("ref").is_some());
                if !has_ref {
                    self.err(
                        n.loc,
                        "artifact tool needs `result_ref` (a step's `{{ s._ref }}`)",
                    );
                }
            }
            ToolKind::Nats => match config.get("operation") {
                None => self.err(n.loc, "nats tool needs `operation`"),
                Some(o) => {
                    if let Some(op) = o.as_str()
                        && !op.contains("{{")
                        && !NATS_OPERATIONS.contains(&op)
                    {
                        let hint = schema::did_you_mean(op, NATS_OPERATIONS)
                            .map(|m| format!("; did you mean `{m}`?"))
                            .unwrap_or_default();
                        self.err(
                            o.loc,
                            format!(
                                "unknown nats `operation` `{op}` (one of {}){hint}",
                                NATS_OPERATIONS.join(", ")
                            ),
                        );
                    }
                }
            },
            ToolKind::Duckdb => {
                if ["query", "command", "commands", "sql"]
                    .iter()
                    .all(|k| config.get(k).is_none())
                {
                    self.err(
                        n.loc,
                        "duckdb tool needs `query` (or `command`, `commands`)",
                    );
                }
                if let Some(a) = n.get("auth") {
                    self.err(
                        a.loc,
                        "duckdb `auth` (credentials turned into DuckDB secrets for ATTACH) is not supported: DuckDB's postgres and httpfs extensions are downloaded at run time, which a worker never does; read the rows with a postgres task and hand them in with duckdb `tables:`",
                    );
                }
            }
        }
        if let Some(o) = n.get("output") {
            match o.v {
                NodeV::Map(_) => self.keys(o, "output", "a tool's `output`", schema::OUTPUT),
                _ => self.err(
                    o.loc,
                    "a tool's `output` must be a mapping (`{output_select: [paths]}`)",
                ),
            }
        }
        let select = n
            .get("output_select")
            .or(n.get("output").and_then(|o| o.get("output_select")));
        if let Some(sel) = select
            && !sel
                .as_seq()
                .is_some_and(|items| items.iter().all(|i| i.as_str().is_some()))
        {
            self.err(
                sel.loc,
                "`output_select` must be a list of paths (`status`, `data.items[0].id`)",
            );
        }
        // Python `code` is a template too where it holds `{{`/`{%` (NoETL renders it).
        if let NodeV::Map(m) = &config.v {
            for (_, _, v) in m {
                self.check_templates(v);
            }
        }
        Some(Task {
            name,
            kind,
            config,
            set: task_set,
            rules,
            on_unmatched_error,
            timeout_s,
            loc: n.loc,
        })
    }

    fn rules(&mut self, n: &Node) -> Vec<Rule> {
        let Some(items) = n.as_seq() else {
            self.err(n.loc, "`policy.rules` must be a list");
            return Vec::new();
        };
        let mut out = Vec::new();
        for it in items {
            self.keys(it, "rule", "a policy rule", schema::RULE);
            let (when, then) = if let Some(e) = it.get("else") {
                self.keys(e, "rule_else", "`else`", schema::RULE_ELSE);
                (None, e.get("then").unwrap_or(e))
            } else {
                match it.get("then") {
                    Some(t) => (it.get("when").cloned(), t),
                    None => {
                        self.err(it.loc, "policy rule needs `then` (or `else: {then: …}`)");
                        continue;
                    }
                }
            };
            if let Some(w) = &when {
                self.check_templates(w);
            }
            let (directive, set) = match &then.v {
                NodeV::Str(s) => (self.directive(s, then, then.loc), Vec::new()),
                NodeV::Map(_) => {
                    self.keys(then, "then", "a policy rule's `then`", schema::THEN);
                    let d = match then.get("do") {
                        Some(dn) => match dn.as_str() {
                            Some(s) => self.directive(s, then, dn.loc),
                            None => {
                                self.err(
                                    dn.loc,
                                    "`do` must be one of continue, retry, jump, break, fail",
                                );
                                None
                            }
                        },
                        None => Some(Directive::Continue),
                    };
                    let set = then
                        .get("set")
                        .map(|s| self.set_ops(s, true))
                        .unwrap_or_default();
                    (d, set)
                }
                _ => {
                    self.err(
                        then.loc,
                        "`then` must be a mapping like {do: retry, attempts: 3}",
                    );
                    (None, Vec::new())
                }
            };
            if let Some(directive) = directive {
                out.push(Rule {
                    when,
                    directive,
                    set,
                    loc: it.loc,
                });
            }
        }
        out
    }

    fn directive(&mut self, s: &str, then: &Node, loc: Loc) -> Option<Directive> {
        Some(match s {
            "continue" => Directive::Continue,
            "break" => Directive::Break,
            "fail" => Directive::Fail,
            "jump" => match then.get("to").and_then(Node::as_str) {
                Some(to) => Directive::Jump { to: to.to_owned() },
                None => {
                    self.err(loc, "`do: jump` needs `to: <task name>`");
                    return None;
                }
            },
            "retry" => {
                let attempts = match then.get("attempts").or(then.get("max_attempts")) {
                    Some(a) => self
                        .number(a, "attempts")
                        .map(|f| f.max(1.0) as u32)
                        .unwrap_or(3),
                    None => 3,
                };
                let delay_s = then
                    .get("delay")
                    .and_then(|d| self.number(d, "delay"))
                    .unwrap_or(1.0);
                let max_delay_s = then
                    .get("max_delay")
                    .and_then(|d| self.number(d, "max_delay"))
                    .unwrap_or(60.0);
                let backoff = match then.get("backoff").and_then(Node::as_str) {
                    None | Some("fixed") | Some("constant") => Backoff::Fixed,
                    Some("linear") => Backoff::Linear,
                    Some("exponential") => Backoff::Exponential,
                    Some(other) => {
                        self.err(
                            loc,
                            format!("unknown backoff `{other}` (fixed, linear, exponential)"),
                        );
                        Backoff::Fixed
                    }
                };
                Directive::Retry {
                    attempts,
                    delay_s,
                    backoff,
                    max_delay_s,
                }
            }
            other => {
                self.err(
                    loc,
                    format!(
                        "unknown policy directive `{other}` (continue, retry, jump, break, fail)"
                    ),
                );
                return None;
            }
        })
    }

    fn set_ops(&mut self, n: &Node, in_block: bool) -> Vec<SetOp> {
        let Some(entries) = self.map(n, "set") else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (k, loc, v) in entries {
            self.check_templates(v);
            let target = if let Some(rest) = k.strip_prefix("ctx.") {
                SetTarget::Ctx(rest.to_owned())
            } else if let Some(rest) = k.strip_prefix("step.") {
                SetTarget::Step(rest.to_owned())
            } else if let Some(rest) = k.strip_prefix("iter.") {
                if !in_block {
                    self.err(
                        *loc,
                        format!("`set: {k}`: `iter.*` is block-local and only valid in a task policy rule's `then.set`; use `ctx.*` or `step.*` here"),
                    );
                    continue;
                }
                SetTarget::Iter(rest.to_owned())
            } else {
                SetTarget::Ctx(k.clone())
            };
            out.push(SetOp {
                target,
                value: v.clone(),
            });
        }
        out
    }

    fn loop_spec(&mut self, n: &Node) -> Option<LoopSpec> {
        self.map(n, "loop")?;
        self.keys(n, "loop", "`loop`", schema::LOOP);
        if let Some(sp) = n.get("spec").filter(|s| !s.is_null()) {
            self.keys(sp, "loop_spec", "`loop.spec`", schema::LOOP_SPEC);
        }
        let Some(items) = n.get("in").or(n.get("items")) else {
            self.err(n.loc, "`loop` needs `in` (the collection)");
            return None;
        };
        self.check_templates(items);
        let iterator = match n.get("iterator").or(n.get("element")) {
            Some(i) => self.string(i, "iterator")?,
            None => "item".to_owned(),
        };
        let spec = n.get("spec");
        let mode_node = spec.and_then(|s| s.get("mode")).or(n.get("mode"));
        let mode = match mode_node.and_then(Node::as_str) {
            None | Some("sequential") => LoopMode::Sequential,
            Some("parallel") | Some("async") => LoopMode::Parallel,
            Some("cursor") => {
                let loc = mode_node.map(|m| m.loc).unwrap_or(n.loc);
                self.err(loc, "cursor loops (`mode: cursor`) are not supported; claim rows in a step and loop over them");
                LoopMode::Sequential
            }
            Some(other) => {
                let loc = mode_node.map(|m| m.loc).unwrap_or(n.loc);
                self.err(
                    loc,
                    format!("unknown loop mode `{other}` (sequential, parallel)"),
                );
                LoopMode::Sequential
            }
        };
        let max_in_flight = spec
            .and_then(|s| s.get("max_in_flight"))
            .or(n.get("concurrency"))
            .cloned();
        if let Some(m) = &max_in_flight {
            self.check_templates(m);
        }
        Some(LoopSpec {
            items: items.clone(),
            iterator,
            mode,
            max_in_flight,
            loc: n.loc,
        })
    }

    fn arc(&mut self, n: &Node) -> Option<Arc> {
        match &n.v {
            NodeV::Str(s) => Some(Arc {
                step: s.clone(),
                when: None,
                set: Vec::new(),
                loc: n.loc,
            }),
            NodeV::Map(_) => {
                self.keys(n, "arc", "an arc", schema::ARC);
                let Some(step) = n.get("step").and_then(|s| self.string(s, "step")) else {
                    self.err(n.loc, "arc needs `step` (the target)");
                    return None;
                };
                let when = n.get("when").cloned();
                if let Some(w) = &when {
                    self.check_templates(w);
                }
                let set = n
                    .get("set")
                    .map(|s| self.set_ops(s, false))
                    .unwrap_or_default();
                Some(Arc {
                    step,
                    when,
                    set,
                    loc: n.loc,
                })
            }
            _ => {
                self.err(
                    n.loc,
                    format!(
                        "an arc must be a step name or a mapping, found {}",
                        n.type_name()
                    ),
                );
                None
            }
        }
    }

    fn next_mode(&mut self, mode: &Node) -> Option<NextMode> {
        match mode.as_str() {
            Some("exclusive") => Some(NextMode::Exclusive),
            Some("inclusive") => Some(NextMode::Inclusive),
            _ => {
                let shown = mode
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| mode.type_name().into());
                self.err(
                    mode.loc,
                    format!("unknown next mode `{shown}` (exclusive, inclusive)"),
                );
                None
            }
        }
    }

    fn admit(&mut self, n: &Node) -> Option<Admit> {
        self.map(n, "spec.policy.admit")?;
        self.keys(n, "admit", "`spec.policy.admit`", schema::ADMIT);
        let inclusive = match n.get("mode") {
            None => false,
            Some(m) => self.next_mode(m) == Some(NextMode::Inclusive),
        };
        let Some(items) = n.get("rules").and_then(Node::as_seq) else {
            self.err(n.loc, "`spec.policy.admit` needs `rules` (a list)");
            return None;
        };
        let mut rules = Vec::new();
        for it in items {
            if self.map(it, "admit rule").is_none() {
                continue;
            }
            self.keys(it, "rule", "an admit rule", schema::RULE);
            let (when, then) = match it.get("else") {
                Some(e) => {
                    self.keys(e, "rule_else", "`else`", schema::RULE_ELSE);
                    (None, e.get("then"))
                }
                None => (it.get("when").cloned(), it.get("then")),
            };
            let Some(then) = then else {
                self.err(it.loc, "admit rule needs `then: {allow: true|false}`");
                continue;
            };
            if self.map(then, "then").is_none() {
                continue;
            }
            self.keys(
                then,
                "admit_then",
                "an admit rule's `then`",
                schema::ADMIT_THEN,
            );
            let allow = match then.get("allow").map(|a| &a.v) {
                Some(NodeV::Bool(b)) => *b,
                _ => {
                    self.err(then.loc, "admit rule's `then.allow` must be true or false");
                    continue;
                }
            };
            if let Some(w) = &when {
                self.check_templates(w);
            } else if it.get("else").is_none() {
                self.err(it.loc, "admit rule needs `when` (or `else: {then: …}`)");
                continue;
            }
            let reason = then.get("reason").and_then(|r| self.string(r, "reason"));
            rules.push(AdmitRule {
                when,
                allow,
                reason,
                loc: it.loc,
            });
        }
        Some(Admit {
            rules,
            inclusive,
            loc: n.loc,
        })
    }

    fn executor(&mut self, e: &Node) {
        if self.map(e, "executor").is_none() {
            return;
        }
        self.keys(e, "executor", "`executor`", schema::EXECUTOR);
        if let Some(p) = e.get("profile") {
            match p.as_str() {
                Some("local" | "distributed" | "auto") => {}
                _ => self.err(
                    p.loc,
                    "`executor.profile` must be local, distributed or auto",
                ),
            }
        }
        if let Some(r) = e.get("requires").filter(|r| !r.is_null()) {
            if self.map(r, "executor.requires").is_none() {
                return;
            }
            self.keys(
                r,
                "executor_requires",
                "`executor.requires`",
                schema::EXECUTOR_REQUIRES,
            );
            for t in r.get("tools").and_then(Node::as_seq).unwrap_or_default() {
                let name = t.as_str().unwrap_or_default();
                if !TOOL_KINDS.contains(&name) {
                    self.err(
                        t.loc,
                        format!(
                            "the playbook requires tool `{name}`, which this build does not have (available: {})",
                            TOOL_KINDS.join(", ")
                        ),
                    );
                }
            }
            for f in r.get("features").and_then(Node::as_seq).unwrap_or_default() {
                self.err(
                    f.loc,
                    format!(
                        "the playbook requires feature `{}`, which this build does not know",
                        f.as_str().unwrap_or_default()
                    ),
                );
            }
        }
    }

    fn next(&mut self, n: Option<&Node>) -> Next {
        let mut next = Next {
            mode: NextMode::Exclusive,
            arcs: Vec::new(),
            explicit_mode: false,
        };
        let Some(n) = n else { return next };
        match &n.v {
            NodeV::Null => {}
            NodeV::Str(_) => next.arcs.extend(self.arc(n)),
            NodeV::Seq(items) => {
                for it in items {
                    next.arcs.extend(self.arc(it));
                }
            }
            NodeV::Map(_) => {
                if let Some(arcs) = n.get("arcs") {
                    self.keys(n, "next", "`next`", schema::NEXT);
                    if let Some(sp) = n.get("spec").filter(|s| !s.is_null()) {
                        self.keys(sp, "next_spec", "`next.spec`", schema::NEXT_SPEC);
                    }
                    match arcs.as_seq() {
                        Some(items) => {
                            for it in items {
                                next.arcs.extend(self.arc(it));
                            }
                        }
                        None => self.err(arcs.loc, "`next.arcs` must be a list"),
                    }
                    if let Some(mode) = n.get("spec").and_then(|s| s.get("mode"))
                        && let Some(m) = self.next_mode(mode)
                    {
                        next.mode = m;
                        next.explicit_mode = true;
                    }
                } else if n.get("step").is_some() {
                    next.arcs.extend(self.arc(n));
                } else {
                    self.err(
                        n.loc,
                        "`next` must be a step name, a list of arcs, or {spec, arcs}",
                    );
                }
            }
            _ => self.err(
                n.loc,
                format!(
                    "`next` must be a step name, a list or a mapping, found {}",
                    n.type_name()
                ),
            ),
        }
        next
    }

    /// Strict static check of `when` conditions: every root variable must be in scope.
    /// Run time is lenient (chainable undefined) for NoETL compatibility; this catches typos.
    fn check_condition_scope(
        &mut self,
        steps: &[Step],
        workload: &Map<String, Value>,
        opts: &ParseOptions,
    ) {
        let mut known: BTreeSet<String> = SCOPE_NAMES.iter().map(|s| s.to_string()).collect();
        known.extend(workload.keys().cloned());
        known.extend(opts.extra_vars.iter().cloned());
        for s in steps {
            known.insert(s.name.clone());
            if let Some(l) = &s.looping {
                known.insert(l.iterator.clone());
            }
            let all_sets = s
                .set
                .iter()
                .chain(s.next.arcs.iter().flat_map(|a| a.set.iter()))
                .chain(
                    s.tasks
                        .iter()
                        .flat_map(|t| t.rules.iter().flat_map(|r| r.set.iter())),
                );
            for op in all_sets {
                if let SetTarget::Ctx(k) = &op.target {
                    known.insert(k.split('.').next().unwrap_or(k).to_owned());
                }
            }
            for t in &s.tasks {
                known.insert(t.name.clone());
            }
        }
        for s in steps {
            self.step = Some(s.name.clone());
            let conds: Vec<&Node> = s
                .next
                .arcs
                .iter()
                .filter_map(|a| a.when.as_ref())
                .chain(s.when.iter())
                .chain(
                    s.admit
                        .iter()
                        .flat_map(|a| a.rules.iter().filter_map(|r| r.when.as_ref())),
                )
                .chain(
                    s.tasks
                        .iter()
                        .flat_map(|t| t.rules.iter().filter_map(|r| r.when.as_ref())),
                )
                .collect();
            for c in conds {
                let Some(text) = c.as_str() else { continue };
                match templates().variables(text, !Templates::is_template(text)) {
                    Ok(vars) => {
                        for v in vars {
                            if !known.contains(&v) {
                                self.err(
                                    c.loc,
                                    format!("undefined variable `{v}` in `when` (not a workload key, step, ctx key, loop iterator or scope name)"),
                                );
                            }
                        }
                    }
                    // Template syntax errors were already reported by check_templates.
                    Err(m) if !Templates::is_template(text) => {
                        self.err(c.loc, format!("invalid condition: {m}"))
                    }
                    Err(_) => {}
                }
            }
        }
        self.step = None;
    }
}
