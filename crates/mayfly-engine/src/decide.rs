//! `decide()`: the pure transition function of the orchestrator.
//!
//! Contract with the appender (see ARCHITECTURE.md): every draft returned is sealed and
//! applied to the state *immediately*, in order, and `decide` is later called for it too
//! (FIFO). `decide` therefore reasons from the state, never from "what I returned before",
//! and every guard (loop windows, loop completion, joins, execution completion) is
//! state-based so that no decision is ever taken twice.

use crate::context::{Iteration, binds_ref, context};
use crate::state::{ExecState, Status};
use mayfly_dsl::{
    LoopMode, NextMode, NodeV, Playbook, SetTarget, Step, TemplateError, Templates, ToolKind,
    templates, to_value,
};
use mayfly_types::{
    CacheRef, ChildRequested, CommandIssued, Draft, ErrorInfo, Event, EventKind,
    ExecutionCompleted, ExecutionFailed, LoopDone, LoopStarted, StepFailed, StepFinished,
    StepRouted,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

/// See `issue`: how often a chain of inline steps yields to a worker.
pub const INLINE_YIELD_EVERY: u64 = 1024;

/// Default window of a `parallel` loop without `max_in_flight`.
pub const DEFAULT_PARALLEL_WINDOW: usize = 64;

struct Failure {
    step: Option<String>,
    error: ErrorInfo,
}

type R<T> = Result<T, Failure>;

fn payload<T: Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

fn tmpl_err(pb: &Playbook, step: &str, e: TemplateError) -> Failure {
    Failure {
        step: Some(step.to_owned()),
        error: ErrorInfo::new(
            e.code(),
            format!("{}: {} (step `{step}`)", pb.at(e.loc), e.message),
        ),
    }
}

/// Most items one loop run may have.
pub const MAX_LOOP_ITEMS: u64 = 1_000_000;

/// Decide what follows `ev`, given the state that already includes `ev`.
pub fn decide(pb: &Playbook, st: &ExecState, ev: &Event) -> Vec<Draft> {
    if st.status.is_terminal() {
        return Vec::new();
    }
    let out = match ev.kind {
        EventKind::ExecutionRequested => {
            Ok(vec![Draft::new(EventKind::ExecutionStarted, json!({}))])
        }
        EventKind::ExecutionStarted => enter(pb, st, mayfly_dsl::ENTRY_STEP),
        EventKind::StepFinished | EventKind::StepFailed if st.stale.contains(&ev.seq) => {
            Ok(Vec::new())
        }
        EventKind::StepFinished | EventKind::StepFailed => on_step_end(pb, st, ev),
        EventKind::LoopStarted => step_of(pb, ev).and_then(|s| fill_loop(pb, st, s)),
        EventKind::LoopDone => step_of(pb, ev).and_then(|s| {
            let result = st
                .results
                .get(&s.name)
                .map(|r| r.result.clone())
                .unwrap_or(Value::Null);
            route(pb, st, s, "loop.done", &result).map(|d| vec![d])
        }),
        EventKind::StepRouted => on_routed(pb, st, ev),
        EventKind::JoinReleased => step_of(pb, ev).and_then(|s| enter(pb, st, &s.name)),
        _ => Ok(Vec::new()),
    };
    match out {
        Ok(d) => d,
        Err(f) => vec![Draft::new(
            EventKind::ExecutionFailed,
            payload(&ExecutionFailed {
                step: f.step,
                error: f.error,
            }),
        )],
    }
}

fn step_of<'p>(pb: &'p Playbook, ev: &Event) -> R<&'p Step> {
    let name = ev.step.as_deref().unwrap_or_default();
    pb.step(name).ok_or_else(|| Failure {
        step: ev.step.clone(),
        error: ErrorInfo::new(
            "unknown_step",
            format!("event refers to step `{name}` which the playbook does not define"),
        ),
    })
}

/// Enter a step: start its loop, complete it inline, start a child, or issue a command.
fn enter(pb: &Playbook, st: &ExecState, name: &str) -> R<Vec<Draft>> {
    let step = pb.step(name).ok_or_else(|| Failure {
        step: Some(name.to_owned()),
        error: ErrorInfo::new("unknown_step", format!("step `{name}` is not defined")),
    })?;
    // The legacy step guard (NoETL's Rust runtime): false → skipped, and routing goes on.
    if let Some(w) = &step.when
        && !templates()
            .eval_condition(w, &to_value(&context(st, None)))
            .map_err(|e| tmpl_err(pb, name, e))?
    {
        let f = StepFinished {
            index: None,
            result: Value::Null,
            set: Map::new(),
            inline: true,
            duration_ms: None,
            logs: None,
        };
        return Ok(vec![
            Draft::new(EventKind::StepFinished, payload(&f)).step(name),
        ]);
    }
    if let Some(error) = admission(pb, st, step)? {
        // A refusal is the step's outcome: recorded, and routable like any failure
        // (`event.name == 'call.error'`, `error.code == 'admission_denied'`).
        let f = StepFailed {
            index: None,
            error,
            duration_ms: None,
            logs: None,
        };
        return Ok(vec![
            Draft::new(EventKind::StepFailed, payload(&f)).step(name),
        ]);
    }
    if step.is_inline()
        && step.looping.is_none()
        && st
            .results
            .get(name)
            .is_some_and(|r| r.runs >= mayfly_dsl::playbook::MAX_INLINE_RUNS)
    {
        return Err(Failure {
            step: Some(name.to_owned()),
            error: ErrorInfo::new(
                "inline_cycle",
                format!(
                    "{}: step `{name}` ran {} times without a tool: a cycle of inline steps never ends (step `{name}`)",
                    pb.at(step.loc),
                    mayfly_dsl::playbook::MAX_INLINE_RUNS
                ),
            ),
        });
    }
    if let Some(l) = &step.looping {
        let ctx = to_value(&context(st, None));
        let items = templates()
            .render_node(&l.items, &ctx)
            .map_err(|e| tmpl_err(pb, name, e))?;
        // A large list arrives as a ref: loop over its elements by reference, never
        // copying the list into the log (each item's worker hydrates only its element).
        if let Some(r) = CacheRef::parse(&items)
            && r.item.is_none()
            && r.count.is_some()
        {
            // A ref's count is data (it may come from a tool's output): bound it before the
            // state sizes anything by it.
            let n = r.count.unwrap_or(0);
            if n > MAX_LOOP_ITEMS {
                return Err(Failure {
                    step: Some(name.to_owned()),
                    error: ErrorInfo::new(
                        "loop_too_large",
                        format!(
                            "{}: `loop.in` names {n} items, more than {MAX_LOOP_ITEMS} (step `{name}`)",
                            pb.at(l.items.loc)
                        ),
                    ),
                });
            }
            let l = LoopStarted {
                items: Vec::new(),
                source: Some(r),
            };
            return Ok(vec![
                Draft::new(EventKind::LoopStarted, payload(&l)).step(name),
            ]);
        }
        let items = match items {
            Value::Array(a) => a,
            Value::Null => Vec::new(),
            other => {
                return Err(Failure {
                    step: Some(name.to_owned()),
                    error: ErrorInfo::new(
                        "loop_not_a_list",
                        format!(
                            "{}: `loop.in` must evaluate to a list, got {other} (step `{name}`)",
                            pb.at(l.items.loc)
                        ),
                    ),
                });
            }
        };
        return Ok(vec![
            Draft::new(
                EventKind::LoopStarted,
                payload(&LoopStarted {
                    items,
                    source: None,
                }),
            )
            .step(name),
        ]);
    }
    Ok(vec![issue(pb, st, step, None)?])
}

/// `spec.policy.admit`, evaluated against the step's scope when the step is entered: the
/// refusal it yields, if any.
fn admission(pb: &Playbook, st: &ExecState, step: &Step) -> R<Option<ErrorInfo>> {
    let Some(admit) = &step.admit else {
        return Ok(None);
    };
    let ctx = to_value(&context(st, None));
    let mut refusal = None;
    for (i, rule) in admit.rules.iter().enumerate() {
        let holds = match &rule.when {
            None => true,
            Some(w) => templates()
                .eval_condition(w, &ctx)
                .map_err(|e| tmpl_err(pb, &step.name, e))?,
        };
        if !holds {
            continue;
        }
        if !rule.allow && refusal.is_none() {
            let why = rule
                .reason
                .clone()
                .unwrap_or_else(|| format!("admit rule {} refused the step", i + 1));
            refusal = Some(ErrorInfo::new(
                "admission_denied",
                format!("{}: {why} (step `{}`)", pb.at(rule.loc), step.name),
            ));
        }
        if !admit.inclusive {
            break;
        }
    }
    Ok(refusal)
}

/// The draft that runs one block (whole step, or one loop item).
fn issue(pb: &Playbook, st: &ExecState, step: &Step, item: Option<(usize, &Value)>) -> R<Draft> {
    let iteration = match (item, &step.looping) {
        (Some((index, value)), Some(l)) => Some(Iteration {
            iterator: &l.iterator,
            value,
            index,
            total: st.loops.get(&step.name).map_or(0, |l| l.len()),
        }),
        _ => None,
    };
    let index = item.map(|(i, _)| i);
    // Every INLINE_YIELD_EVERY-th step end, an inline step goes through a worker instead:
    // the appender leaves its commit loop, so a long run (or cycle) of inline steps never
    // holds the orchestrator from every other execution.
    let yields = item.is_none() && st.steps_finished % INLINE_YIELD_EVERY == INLINE_YIELD_EVERY - 1;
    let inline_ctx = (step.is_inline() && !yields)
        .then(|| context(st, iteration))
        .filter(|c| {
            // A block that reads a cached payload goes to a worker (the engine does no IO).
            !(c.values().any(CacheRef::any_in) && binds_ref(c, step.bound_paths()))
        });
    if let Some(ctx) = inline_ctx {
        // Trivial blocks never cost a queue round-trip: the engine completes them itself.
        let result = inline_result(step, &ctx, item.map(|(_, v)| v))
            .map_err(|e| tmpl_err(pb, &step.name, e))?;
        let f = StepFinished {
            index,
            result,
            set: Map::new(),
            inline: true,
            duration_ms: None,
            logs: None,
        };
        return Ok(Draft::new(EventKind::StepFinished, payload(&f)).step(&step.name));
    }
    if let Some(task) = step.wait_task() {
        // Parks without a worker; the appender fills in the one-time token.
        let timeout_ms = task
            .timeout_s
            .or(step.timeout_s)
            .map(|s| (s * 1000.0) as u64);
        let w = mayfly_types::StepWaiting {
            index,
            token: String::new(),
            timeout_ms,
        };
        return Ok(Draft::new(EventKind::StepWaiting, payload(&w)).step(&step.name));
    }
    if let Some(task) = step.playbook_task() {
        let ctx = to_value(&context(st, iteration));
        let render = |n: &mayfly_dsl::Node| {
            templates()
                .render_node(n, &ctx)
                .map_err(|e| tmpl_err(pb, &step.name, e))
        };
        let mut path = match task.config.get("path") {
            Some(p) => match render(p)? {
                Value::String(s) => s,
                other => other.to_string(),
            },
            None => String::new(),
        };
        // A `version` travels in the path as `@N`, as a pipeline task's does.
        if let Some(v) = task.config.get("version") {
            path = mayfly_dsl::versioned_child_path(&path, Some(&render(v)?)).map_err(|m| {
                Failure {
                    step: Some(step.name.clone()),
                    error: ErrorInfo::new("bad_version", m),
                }
            })?;
        }
        let mut input = Map::new();
        for src in [
            step.input.as_ref(),
            task.config.get("args"),
            task.config.get("input"),
        ]
        .into_iter()
        .flatten()
        {
            if let Value::Object(m) = render(src)? {
                input.extend(m);
            }
        }
        // A child in a loop also gets the item, `_index` and `_total` (NoETL): they arrive in
        // its workload unless the input names them itself.
        if let (Some(it), Some(l), false) = (iteration, &step.looping, step.pipeline) {
            input
                .entry(l.iterator.clone())
                .or_insert_with(|| it.value.clone());
            input.entry("_index").or_insert_with(|| json!(it.index));
            input.entry("_total").or_insert_with(|| json!(it.total));
        }
        // Only a waiting child has a wait to bound (validation refuses a timeout otherwise).
        let timeout_ms = task
            .timeout_s
            .or(step.timeout_s)
            .map(|s| (s * 1000.0) as u64);
        let c = ChildRequested {
            index,
            path,
            input,
            timeout_ms,
        };
        return Ok(Draft::new(EventKind::ChildRequested, payload(&c)).step(&step.name));
    }
    let c = CommandIssued {
        step: step.name.clone(),
        index,
    };
    Ok(Draft::new(EventKind::CommandIssued, payload(&c)).step(&step.name))
}

/// The result of an inline step. A `noop` task: its rendered `result:` if given, else the
/// step's rendered `input`, else `{status: "ok", message}` (NoETL's noop). A step with no
/// tool: its rendered `input`, else the loop item.
pub fn inline_result(
    step: &Step,
    scope: &Map<String, Value>,
    item: Option<&Value>,
) -> Result<Value, TemplateError> {
    let noop =
        |task: &mayfly_dsl::Task, ctx: &minijinja::Value| -> Result<Option<Value>, TemplateError> {
            if let Some(r) = task.config.get("result") {
                return templates().render_node(r, ctx).map(Some);
            }
            if step.input.is_some() {
                return Ok(None);
            }
            let message = match task.config.get("message") {
                Some(m) => templates().render_node(m, ctx)?,
                None => Value::String("noop".into()),
            };
            Ok(Some(json!({"status": "ok", "message": message})))
        };
    if step.pipeline {
        // `{label: data}`, each task seeing the ones before it by label (as in a worker).
        let mut scope = scope.clone();
        let mut labeled = Map::new();
        for task in &step.tasks {
            let v = noop(task, &to_value(&scope))?.unwrap_or(Value::Null);
            scope.insert(task.name.clone(), crate::context::alias(&v));
            labeled.insert(task.name.clone(), v);
        }
        return Ok(Value::Object(labeled));
    }
    let ctx = to_value(scope);
    if let Some(task) = step.tasks.last()
        && let Some(v) = noop(task, &ctx)?
    {
        return Ok(v);
    }
    match &step.input {
        Some(input) => templates().render_node(input, &ctx),
        None => Ok(item.cloned().unwrap_or(Value::Null)),
    }
}

/// Issue loop items up to the window; finish the loop when every item is done.
fn fill_loop(pb: &Playbook, st: &ExecState, step: &Step) -> R<Vec<Draft>> {
    let (Some(spec), Some(l)) = (&step.looping, st.loops.get(&step.name)) else {
        return Ok(Vec::new());
    };
    if l.finished {
        return Ok(Vec::new());
    }
    let n = l.len();
    if l.done >= n {
        let d = LoopDone {
            results: Value::Array(l.results.clone()),
        };
        return Ok(vec![
            Draft::new(EventKind::LoopDone, payload(&d)).step(&step.name),
        ]);
    }
    let window = match spec.mode {
        LoopMode::Sequential => 1,
        LoopMode::Parallel => match &spec.max_in_flight {
            None => DEFAULT_PARALLEL_WINDOW,
            Some(node) => {
                // Recomputed each time an item ends: the execution's whole context is built
                // only when the window is templated (usually it is a number).
                let v = match &node.v {
                    NodeV::Str(s) if !Templates::is_template(s) => node.to_json(),
                    NodeV::Str(_) | NodeV::Seq(_) | NodeV::Map(_) => templates()
                        .render_node(node, &to_value(&context(st, None)))
                        .map_err(|e| tmpl_err(pb, &step.name, e))?,
                    _ => node.to_json(),
                };
                let w = v
                    .as_u64()
                    .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
                    .ok_or_else(|| Failure {
                        step: Some(step.name.clone()),
                        error: ErrorInfo::new(
                            "bad_max_in_flight",
                            format!(
                                "{}: `max_in_flight` must be a positive integer, got {v}",
                                pb.at(node.loc)
                            ),
                        ),
                    })?;
                (w as usize).max(1)
            }
        },
    };
    // Sequential loops must also wait for an inline item to be *done* before the next.
    let busy = if spec.mode == LoopMode::Sequential {
        l.next_index - l.done
    } else {
        l.in_flight
    };
    let mut out = Vec::new();
    let mut next = l.next_index;
    let budget = window.saturating_sub(busy);
    while next < n && out.len() < budget {
        let item = l.item(next).unwrap_or(Value::Null);
        out.push(issue(pb, st, step, Some((next, &item)))?);
        next += 1;
    }
    Ok(out)
}

fn on_step_end(pb: &Playbook, st: &ExecState, ev: &Event) -> R<Vec<Draft>> {
    let step = step_of(pb, ev)?;
    let index = ev.payload.get("index").and_then(Value::as_u64);
    if ev.kind == EventKind::StepFailed {
        let f = StepFailed::deserialize(&ev.payload).map_err(|e| Failure {
            step: Some(step.name.clone()),
            error: ErrorInfo::new("bad_event", e.to_string()),
        })?;
        // A failed iteration fails the loop step; either may be caught by a `call.error` arc.
        if let (Some(i), Some(l)) = (index, st.loops.get(&step.name))
            && l.first_failure != Some(i as usize)
        {
            return Ok(Vec::new());
        }
        let ctx = error_context(st, &step.name, &f.error);
        return match route_error(pb, st, step, &ctx)? {
            Some(d) => Ok(vec![d]),
            None => Err(Failure {
                step: Some(step.name.clone()),
                error: f.error,
            }),
        };
    }
    if index.is_some() {
        return fill_loop(pb, st, step);
    }
    let result = st
        .results
        .get(&step.name)
        .map(|r| r.result.clone())
        .unwrap_or(Value::Null);
    Ok(vec![route(pb, st, step, "call.done", &result)?])
}

/// `output` in a step's `set` and arcs: the step's data with its `.data` alias (NoETL), plus
/// `status: "success"` when the data has no `status` of its own.
fn output_of(result: &Value) -> Value {
    match crate::context::alias(result) {
        Value::Object(mut m) => {
            m.entry("status").or_insert_with(|| json!("success"));
            Value::Object(m)
        }
        other => json!({"status": "success", "data": other}),
    }
}

fn error_context(st: &ExecState, step: &str, error: &ErrorInfo) -> Map<String, Value> {
    let mut ctx = context(st, None);
    ctx.insert("event".into(), json!({"name": "call.error", "step": step}));
    ctx.insert("error".into(), json!(error));
    ctx.insert(
        "output".into(),
        json!({"status": "error", "error": error, "data": null}),
    );
    ctx
}

/// On failure only arcs whose `when` explicitly holds fire; an unconditional arc does not
/// swallow errors.
fn route_error(
    pb: &Playbook,
    st: &ExecState,
    step: &Step,
    ctx: &Map<String, Value>,
) -> R<Option<Draft>> {
    let _ = st;
    let mctx = to_value(ctx);
    let mut to = Vec::new();
    let mut set = Map::new();
    for arc in &step.next.arcs {
        let Some(w) = &arc.when else { continue };
        if templates()
            .eval_condition(w, &mctx)
            .map_err(|e| tmpl_err(pb, &step.name, e))?
        {
            apply_set(pb, &step.name, &arc.set, &mctx, &mut set, &mut Map::new())?;
            to.push(arc.step.clone());
            if step.next.mode == NextMode::Exclusive {
                break;
            }
        }
    }
    if to.is_empty() {
        return Ok(None);
    }
    Ok(Some(routed(
        pb,
        &step.name,
        "call.error",
        to,
        set,
        Map::new(),
    )))
}

fn apply_set(
    pb: &Playbook,
    step: &str,
    ops: &[mayfly_dsl::SetOp],
    ctx: &minijinja::Value,
    set: &mut Map<String, Value>,
    step_set: &mut Map<String, Value>,
) -> R<()> {
    for op in ops {
        let v = templates()
            .render_node(&op.value, ctx)
            .map_err(|e| tmpl_err(pb, step, e))?;
        match &op.target {
            SetTarget::Ctx(k) => {
                set.insert(k.clone(), v);
            }
            SetTarget::Step(k) => {
                step_set.insert(k.clone(), v);
            }
            // Rejected by the parser outside policy rules; nothing to persist.
            SetTarget::Iter(_) => {}
        }
    }
    Ok(())
}

fn routed(
    pb: &Playbook,
    step: &str,
    event: &str,
    targets: Vec<String>,
    set: Map<String, Value>,
    step_set: Map<String, Value>,
) -> Draft {
    let (joins, to): (Vec<String>, Vec<String>) = targets.into_iter().partition(|t| pb.is_join(t));
    let r = StepRouted {
        event: event.to_owned(),
        to,
        joins,
        set,
        step_set,
    };
    Draft::new(EventKind::StepRouted, payload(&r)).step(step)
}

/// Evaluate the step's `set`, then its arcs, producing one `step.routed`.
fn route(pb: &Playbook, st: &ExecState, step: &Step, event: &str, result: &Value) -> R<Draft> {
    let mut ctx = context(st, None);
    ctx.insert("result".into(), result.clone());
    ctx.insert("event".into(), json!({"name": event, "step": step.name}));
    ctx.insert("output".into(), output_of(result));
    let mut set = Map::new();
    let mut step_set = Map::new();
    apply_set(
        pb,
        &step.name,
        &step.set,
        &to_value(&ctx),
        &mut set,
        &mut step_set,
    )?;
    // Arcs see the step's own assignments.
    for (k, v) in &set {
        ctx.insert(k.clone(), v.clone());
        if let Some(Value::Object(c)) = ctx.get_mut("ctx") {
            c.insert(k.clone(), v.clone());
        }
    }
    let mctx = to_value(&ctx);
    let mut to = Vec::new();
    for arc in &step.next.arcs {
        let fires = match &arc.when {
            None => true,
            Some(w) => templates()
                .eval_condition(w, &mctx)
                .map_err(|e| tmpl_err(pb, &step.name, e))?,
        };
        if fires {
            apply_set(pb, &step.name, &arc.set, &mctx, &mut set, &mut step_set)?;
            to.push(arc.step.clone());
            if step.next.mode == NextMode::Exclusive {
                break;
            }
        }
    }
    Ok(routed(pb, &step.name, event, to, set, step_set))
}

/// After a routing: enter the targets, release joins nothing upstream can still reach,
/// and complete the execution when nothing is active.
fn on_routed(pb: &Playbook, st: &ExecState, ev: &Event) -> R<Vec<Draft>> {
    let r = StepRouted::deserialize(&ev.payload).map_err(|e| Failure {
        step: ev.step.clone(),
        error: ErrorInfo::new("bad_event", e.to_string()),
    })?;
    let mut out = Vec::new();
    for t in &r.to {
        out.extend(enter(pb, st, t)?);
    }
    let waiting: Vec<&String> = st
        .arrivals
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(j, _)| j)
        .collect();
    for join in &waiting {
        let upstream_active = st
            .active
            .iter()
            .any(|(s, n)| *n > 0 && s != *join && pb.reaches(s, join));
        // A join that is itself waiting upstream (chained joins) will arrive here later.
        // Mutually reachable joins (a cycle) are ordered by name so neither waits forever.
        let upstream_join = waiting
            .iter()
            .any(|k| k != join && pb.reaches(k, join) && (!pb.reaches(join, k) || k < join));
        if !upstream_active && !upstream_join {
            out.push(Draft::new(EventKind::JoinReleased, json!({})).step(join.as_str()));
        }
    }
    if out.is_empty()
        && st.active_total() == 0
        && st.arrivals.values().all(|n| *n == 0)
        && st.status == Status::Running
    {
        let c = ExecutionCompleted {
            result: st.last_terminal.clone(),
        };
        out.push(Draft::new(EventKind::ExecutionCompleted, payload(&c)));
    }
    Ok(out)
}

/// Is `kind` a tool the worker pool runs (as opposed to the engine inline)?
pub fn needs_worker(kind: ToolKind) -> bool {
    !matches!(kind, ToolKind::Noop | ToolKind::Playbook)
}
