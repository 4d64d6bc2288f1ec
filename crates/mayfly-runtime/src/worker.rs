//! The block loop: claim → hydrate → execute (the task pipeline with its policy rules) →
//! record → release. Workers hold no state between blocks.

use crate::{Completion, Hydrated, RuntimeHandle};
use mayfly_dsl::{Directive, NodeV, TemplateError, ToolKind, templates, to_value};
use mayfly_engine::policy::{backoff_delay, default_directive, select_rule};
use mayfly_tools::{ToolOutput, Tools};
use mayfly_types::{ErrorInfo, StepFailed, StepFinished};
use serde_json::{Map, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Upper bound on task runs in one pipeline (guards `jump` cycles).
const MAX_TASK_RUNS: usize = 10_000;
const LOG_CLIP: usize = 8192;

/// Pull blocks until the runtime shuts down.
pub async fn worker_loop(handle: RuntimeHandle, tools: Arc<Tools>, worker: String) {
    while let Some(block) = handle.next_block().await {
        let Some(h) = handle.claim(block, &worker).await else {
            continue;
        };
        // Heartbeats keep the lease alive while a long block runs.
        let _hb = {
            let handle = handle.clone();
            let cmd = h.block.command_id.clone();
            let attempt = h.attempt;
            let every = h.lease / 3;
            AbortOnDrop(tokio::spawn(async move {
                let mut t = tokio::time::interval(every.max(Duration::from_millis(10)));
                t.tick().await;
                loop {
                    t.tick().await;
                    handle.extend(&cmd, attempt);
                }
            }))
        };
        // The block runs in its own task so that even a panic becomes a recorded failure
        // (and the heartbeat stops with it) instead of a silently lost worker.
        let job = {
            let tools = tools.clone();
            let h = h.clone();
            tokio::spawn(async move { run_block(&tools, &h).await })
        };
        let outcome = match job.await {
            Ok(o) => o,
            Err(e) => Err(StepFailed {
                index: h.block.index,
                error: ErrorInfo::new(
                    "worker_panic",
                    format!("the block crashed the worker task: {e}"),
                ),
                duration_ms: None,
                logs: None,
            }),
        };
        drop(_hb);
        let c = Completion {
            block: h.block.clone(),
            attempt: h.attempt,
            worker: worker.clone(),
            outcome,
        };
        if let Err(e) = handle.complete(c).await {
            tracing::warn!(command = %h.block.command_id, error = %e, "completion refused");
        }
    }
}

/// Aborts a background task when dropped (heartbeats must never outlive their block).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Seconds to a Duration without panicking on values the parser would not let through.
fn secs(s: f64) -> Duration {
    Duration::try_from_secs_f64(s).unwrap_or(Duration::from_secs(31_536_000))
}

fn tmpl(pb: &mayfly_dsl::Playbook, step: &str, e: TemplateError) -> ErrorInfo {
    ErrorInfo::new(
        "template_error",
        format!("{}: {} (step `{step}`)", pb.at(e.loc), e.message),
    )
}

fn clip_logs(logs: Option<Value>) -> Option<Value> {
    let mut logs = logs?;
    let mut any = false;
    if let Value::Object(m) = &mut logs {
        for v in m.values_mut() {
            if let Value::String(s) = v {
                if !s.is_empty() {
                    any = true;
                }
                if s.len() > LOG_CLIP {
                    let mut cut = LOG_CLIP;
                    while !s.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    s.truncate(cut);
                    s.push_str("\n[truncated]");
                }
            }
        }
    }
    any.then_some(logs)
}

/// Execute one block: the step's task pipeline under its policy rules.
pub async fn run_block(tools: &Tools, h: &Hydrated) -> Result<StepFinished, StepFailed> {
    let started = Instant::now();
    let index = h.block.index;
    let pb = &h.playbook;
    let mut logs = None;
    let fail = |error: ErrorInfo, logs: Option<Value>, started: Instant| StepFailed {
        index,
        error,
        duration_ms: Some(started.elapsed().as_millis() as u64),
        logs: clip_logs(logs),
    };
    let Some(step) = pb.step(&h.block.step) else {
        return Err(fail(
            ErrorInfo::new(
                "unknown_step",
                format!("step `{}` is not defined", h.block.step),
            ),
            None,
            started,
        ));
    };
    let mut ctx = h.context.clone();
    let base_input = match &step.input {
        Some(n) => match templates().render_node(n, &to_value(&ctx)) {
            Ok(Value::Object(m)) => m,
            Ok(_) => Map::new(),
            Err(e) => return Err(fail(tmpl(pb, &step.name, e), None, started)),
        },
        None => Map::new(),
    };
    ctx.insert("input".into(), Value::Object(base_input.clone()));
    let mut set = Map::new();
    let mut step_fields = Map::new();
    let mut last = Value::Null;
    let mut i = 0usize;
    let mut tries = 0u32;
    let mut runs = 0usize;
    while i < step.tasks.len() {
        runs += 1;
        if runs > MAX_TASK_RUNS {
            let e = ErrorInfo::new(
                "pipeline_runaway",
                format!(
                    "more than {MAX_TASK_RUNS} task runs in step `{}`",
                    step.name
                ),
            );
            return Err(fail(e, logs, started));
        }
        let task = &step.tasks[i];
        let mctx = to_value(&ctx);
        // Render the task's fields; python `code` is handed over verbatim.
        let mut config = Map::new();
        if let NodeV::Map(entries) = &task.config.v {
            for (k, _, v) in entries {
                let rendered = if task.kind == ToolKind::Python && k == "code" {
                    v.to_json()
                } else {
                    match templates().render_node(v, &mctx) {
                        Ok(r) => r,
                        Err(e) => return Err(fail(tmpl(pb, &step.name, e), logs, started)),
                    }
                };
                config.insert(k.clone(), rendered);
            }
        }
        let mut input = base_input.clone();
        for key in ["args", "input"] {
            if let Some(Value::Object(m)) = config.get(key) {
                input.extend(m.clone());
            }
        }
        let timeout = task
            .timeout_s
            .or(step.timeout_s)
            .filter(|t| t.is_finite() && *t > 0.0)
            .map(secs);
        let out: ToolOutput = tools
            .run(task.kind.as_str(), &config, &input, timeout)
            .await;
        if out.logs.is_some() {
            logs = out.logs.clone();
        }
        let output = out.as_output();
        let mut pctx = ctx.clone();
        pctx.insert("output".into(), output.clone());
        pctx.insert("result".into(), out.data.clone());
        pctx.insert("attempt".into(), Value::from(tries + 1));
        let pctx_v = to_value(&pctx);
        let rule = match select_rule(&task.rules, &pctx_v) {
            Ok(r) => r,
            Err(e) => return Err(fail(tmpl(pb, &step.name, e), logs, started)),
        };
        if let Some(r) = rule {
            for op in &r.set {
                let v = match templates().render_node(&op.value, &pctx_v) {
                    Ok(v) => v,
                    Err(e) => return Err(fail(tmpl(pb, &step.name, e), logs, started)),
                };
                match &op.target {
                    mayfly_dsl::SetTarget::Ctx(k) => {
                        set.insert(k.clone(), v.clone());
                        if let Some(Value::Object(c)) = ctx.get_mut("ctx") {
                            c.insert(k.clone(), v.clone());
                        }
                        ctx.insert(k.clone(), v);
                    }
                    mayfly_dsl::SetTarget::Step(k) => {
                        step_fields.insert(k.clone(), v);
                    }
                    mayfly_dsl::SetTarget::Iter(k) => {
                        match ctx.get_mut("iter") {
                            Some(Value::Object(it)) => {
                                it.insert(k.clone(), v.clone());
                            }
                            _ => {
                                let mut it = Map::new();
                                it.insert(k.clone(), v.clone());
                                ctx.insert("iter".into(), Value::Object(it));
                            }
                        }
                        ctx.insert(k.clone(), v);
                    }
                }
            }
        }
        let directive = rule
            .map(|r| r.directive.clone())
            .unwrap_or_else(|| default_directive(out.ok, &task.on_unmatched_error));
        let value = if out.ok {
            out.data.clone()
        } else {
            output.clone()
        };
        let error_of = |out: &ToolOutput, task: &str| match &out.error {
            Some(e) => {
                let mut info = e.info();
                if let Some(d) = &e.detail
                    && let Some(tb) = d.as_str()
                {
                    info.message = format!("{}\n{}", info.message, tb.trim_end());
                }
                info
            }
            None => ErrorInfo::new("policy_fail", format!("a policy rule failed task `{task}`")),
        };
        match directive {
            Directive::Retry {
                attempts,
                delay_s,
                backoff,
                max_delay_s,
            } if tries + 1 < attempts => {
                tries += 1;
                let d = backoff_delay(backoff, delay_s, tries, max_delay_s);
                tokio::time::sleep(secs(d)).await;
                continue;
            }
            Directive::Retry { .. } if !out.ok => {
                return Err(fail(error_of(&out, &task.name), logs, started));
            }
            Directive::Fail => return Err(fail(error_of(&out, &task.name), logs, started)),
            Directive::Continue | Directive::Retry { .. } => {
                ctx.insert(task.name.clone(), value.clone());
                ctx.insert("_prev".into(), value.clone());
                last = value;
                i += 1;
                tries = 0;
            }
            Directive::Jump { to } => {
                ctx.insert(task.name.clone(), value.clone());
                ctx.insert("_prev".into(), value.clone());
                last = value;
                i = step
                    .tasks
                    .iter()
                    .position(|t| t.name == to)
                    .unwrap_or(step.tasks.len());
                tries = 0;
            }
            Directive::Break => {
                last = value;
                break;
            }
        }
    }
    if !step_fields.is_empty() {
        if !last.is_object() {
            last = Value::Object(Map::new());
        }
        if let Value::Object(m) = &mut last {
            m.extend(step_fields);
        }
    }
    Ok(StepFinished {
        index,
        result: last,
        set,
        inline: false,
        duration_ms: Some(started.elapsed().as_millis() as u64),
        logs: clip_logs(logs),
    })
}
