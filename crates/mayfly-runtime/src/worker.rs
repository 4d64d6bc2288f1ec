//! The block loop: claim → hydrate → execute (the task pipeline with its policy rules) →
//! record → release. Workers hold no state between blocks.

use crate::{Block, Claim, Completion, Hydrated, RuntimeError};
use mayfly_cache::{CacheError, Payloads};
use mayfly_dsl::{Directive, NodeV, TemplateError, ToolKind, templates, to_value};
use mayfly_engine::policy::{backoff_delay, default_directive, select_rule};
use mayfly_tools::{ToolError, ToolOutput, Tools};
use mayfly_types::{CacheRef, ErrorInfo, ExecutionId, StepFailed, StepFinished};
use serde_json::{Map, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::Instrument;

/// Upper bound on task runs in one pipeline (guards `jump` cycles).
const MAX_TASK_RUNS: usize = 10_000;
const LOG_CLIP: usize = 8192;

/// What a worker needs from whoever hands out blocks: the embedded orchestrator (an
/// in-process channel) or a remote one (NATS JetStream deliveries + request/reply).
pub trait Coordinator: Clone + Send + Sync + 'static {
    /// The queue delivery a block arrived with; settled once the block is done with.
    type Ticket: Send + 'static;
    /// The next block (None: shut down).
    fn next(&self) -> impl Future<Output = Option<(Block, Self::Ticket)>> + Send;
    fn claim(
        &self,
        block: Block,
        worker: &str,
    ) -> impl Future<Output = Result<Claim, RuntimeError>> + Send;
    /// Keep a claim alive while its block runs.
    fn heartbeat(
        &self,
        ticket: &Self::Ticket,
        command_id: &str,
        attempt: u32,
    ) -> impl Future<Output = ()> + Send;
    /// Record a completion (borrowed: a retry sends the same one again).
    fn complete(&self, c: &Completion) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// Acknowledge the delivery, or ask for it again after a delay.
    fn settle(&self, ticket: Self::Ticket, settle: Settle) -> impl Future<Output = ()> + Send;
    /// Start a fire-and-forget child playbook from a task of the claim's block.
    fn start_child(
        &self,
        h: &Hydrated,
        path: &str,
        input: Map<String, Value>,
    ) -> impl Future<Output = Result<ExecutionId, RuntimeError>> + Send;
    /// The sealed keychain value of `alias` in the claim's tenant (None: not set).
    fn sealed_secret(
        &self,
        h: &Hydrated,
        alias: &str,
    ) -> impl Future<Output = Result<Option<String>, String>> + Send;
}

/// What becomes of a delivery.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Settle {
    /// Done with: never deliver again.
    Ack,
    /// Deliver again after this delay.
    Retry(Duration),
}

/// Pull blocks until the coordinator shuts down.
///
/// With `payloads`, the refs a block binds are hydrated from the shared cache before it runs
/// and the large parts of its result are stored there before its completion is reported.
pub async fn worker_loop<C: Coordinator>(
    coord: C,
    tools: Arc<Tools>,
    key: Option<mayfly_trust::keychain::MasterKey>,
    payloads: Option<Arc<Payloads>>,
    agent: Option<Arc<crate::agent::Agent>>,
    worker: String,
) {
    if let Some(a) = &agent {
        a.ready().await;
    }
    while let Some((block, ticket)) = coord.next().await {
        let h = match coord.claim(block, &worker).await {
            Ok(Claim::Granted(h)) => h,
            Ok(Claim::Done) => {
                coord.settle(ticket, Settle::Ack).await;
                continue;
            }
            Ok(Claim::Busy(d)) => {
                coord.settle(ticket, Settle::Retry(d)).await;
                continue;
            }
            Err(e) => {
                // Never acked: a refused block (not this log's) stays visible as lag and
                // in the server's refusals; anything else comes back soon.
                let pause = match &e {
                    RuntimeError::NotOwned(_) => {
                        metrics::counter!("mayfly_worker_claims_refused_total", "reason" => "not_owned")
                            .increment(1);
                        Duration::from_secs(30)
                    }
                    _ => Duration::from_secs(1),
                };
                tracing::warn!(error = %e, "claim failed; the block will be delivered again");
                coord.settle(ticket, Settle::Retry(pause)).await;
                continue;
            }
        };
        metrics::gauge!("mayfly_worker_blocks_in_flight").increment(1.0);
        // Every log line of the block carries these fields; with tracing on, the span
        // continues the trace of the command it runs.
        let span = tracing::info_span!(
            "block",
            otel.name = %format!("block {}", h.block.step),
            execution_id = %h.block.execution_id,
            step = %h.block.step,
            index = ?h.block.index,
            command_id = %h.block.command_id,
            attempt = h.attempt,
            tenant = %h.tenant,
            request_id = h.block.request_id.as_deref().unwrap_or(""),
            worker = %worker,
        );
        if let Some(tp) = &h.block.traceparent {
            crate::trace::set_parent(&span, tp);
        }
        let started = Instant::now();
        // The block (not its context, which only the task needs) is kept to report on.
        let (block, attempt, lease) = (h.block.clone(), h.attempt, h.lease);
        // The block runs in its own task so that even a panic becomes a recorded failure
        // instead of a silently lost worker; heartbeats keep the lease alive meanwhile.
        let mut job = {
            let tools = tools.clone();
            let coord = coord.clone();
            let key = key.clone();
            let payloads = payloads.clone();
            let agent = agent.clone();
            let mut h = h;
            tokio::spawn(
                async move {
                    if let Some(p) = &payloads {
                        crate::payload::hydrate(p, &mut h).await?;
                    }
                    let secrets = key.as_ref().map(|key| Secrets { coord: &coord, key });
                    let mut out = run_block(
                        &coord,
                        &tools,
                        secrets.as_ref(),
                        agent.as_deref(),
                        payloads.as_deref(),
                        &h,
                    )
                    .await;
                    if let Some(p) = &payloads {
                        crate::payload::externalize(p, &h.tenant, &mut out).await?;
                    }
                    Ok::<_, CacheError>(out)
                }
                .instrument(span.clone()),
            )
        };
        let mut beat = tokio::time::interval((lease / 3).max(Duration::from_millis(10)));
        beat.tick().await;
        let joined = loop {
            tokio::select! {
                r = &mut job => break r,
                _ = beat.tick() => coord.heartbeat(&ticket, &block.command_id, attempt).await,
            }
        };
        metrics::gauge!("mayfly_worker_blocks_in_flight").decrement(1.0);
        let outcome = match joined {
            Ok(Ok(o)) => o,
            Ok(Err(e @ CacheError::Unavailable(_))) => {
                // Like a lost store: give the block back; it runs again once the cache is up.
                tracing::warn!(command = %block.command_id, error = %e, "shared cache unavailable; the block will be delivered again");
                coord
                    .settle(ticket, Settle::Retry(Duration::from_secs(1)))
                    .await;
                continue;
            }
            Ok(Err(e)) => Err(StepFailed {
                index: block.index,
                error: ErrorInfo::new(e.code(), e.to_string()),
                duration_ms: None,
                logs: None,
            }),
            Err(e) => Err(StepFailed {
                index: block.index,
                error: ErrorInfo::new(
                    "worker_panic",
                    format!("the block crashed the worker task: {e}"),
                ),
                duration_ms: None,
                logs: None,
            }),
        };
        if let Some(a) = &agent {
            a.count(outcome.is_ok());
        }
        let status = if outcome.is_ok() { "ok" } else { "error" };
        metrics::counter!("mayfly_blocks_total", "status" => status).increment(1);
        let ms = match &outcome {
            Ok(f) => f.duration_ms,
            Err(f) => f.duration_ms,
        };
        if let Some(ms) = ms {
            metrics::histogram!("mayfly_step_duration_seconds").record(ms as f64 / 1000.0);
        }
        span.in_scope(|| match &outcome {
            Ok(_) => tracing::info!(status, elapsed_ms = started.elapsed().as_millis() as u64, "block finished"),
            Err(f) => tracing::info!(status, elapsed_ms = started.elapsed().as_millis() as u64, error.code = %f.error.code, "block failed"),
        });
        let c = Completion {
            block,
            attempt,
            worker: worker.clone(),
            outcome,
        };
        let settle = report(&coord, &ticket, c, lease).await;
        coord.settle(ticket, settle).await;
    }
}

/// Record a completion. While the coordinator is unreachable the claim is kept alive and
/// the completion retried until the lease would lapse; then the delivery is given back
/// (the block runs again — at least once).
async fn report<C: Coordinator>(
    coord: &C,
    ticket: &C::Ticket,
    c: Completion,
    lease: Duration,
) -> Settle {
    let deadline = Instant::now() + lease;
    let mut pause = Duration::from_millis(50);
    loop {
        match coord.complete(&c).await {
            Ok(()) => return Settle::Ack,
            // A fenced orchestrator is about to stop; its successor takes the completion.
            Err(e @ (RuntimeError::Closed | RuntimeError::Store(_) | RuntimeError::Fenced(_))) => {
                if Instant::now() + pause >= deadline {
                    tracing::warn!(command = %c.block.command_id, error = %e, "completion not recorded; giving the block back");
                    return Settle::Retry(Duration::ZERO);
                }
                tracing::warn!(command = %c.block.command_id, error = %e, "completion not recorded yet; retrying");
                tokio::time::sleep(pause).await;
                coord
                    .heartbeat(ticket, &c.block.command_id, c.attempt)
                    .await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
            Err(e) => {
                // Superseded, already recorded, or the execution ended: nothing to retry.
                tracing::warn!(command = %c.block.command_id, error = %e, "completion refused");
                return Settle::Ack;
            }
        }
    }
}

impl Coordinator for crate::RuntimeHandle {
    type Ticket = ();

    async fn next(&self) -> Option<(Block, ())> {
        self.next_block().await.map(|b| (b, ()))
    }
    async fn claim(&self, block: Block, worker: &str) -> Result<Claim, RuntimeError> {
        crate::RuntimeHandle::claim(self, block, worker).await
    }
    async fn heartbeat(&self, _: &(), command_id: &str, attempt: u32) {
        self.extend(command_id, attempt);
    }
    async fn complete(&self, c: &Completion) -> Result<(), RuntimeError> {
        crate::RuntimeHandle::complete(self, c.clone()).await
    }
    // In process a busy or lost block is re-dispatched by the orchestrator's lease reaper.
    async fn settle(&self, _: (), _: Settle) {}
    async fn start_child(
        &self,
        h: &Hydrated,
        path: &str,
        input: Map<String, Value>,
    ) -> Result<ExecutionId, RuntimeError> {
        self.start_task_child(&h.block.command_id, h.attempt, path, input)
            .await
    }

    async fn sealed_secret(&self, h: &Hydrated, alias: &str) -> Result<Option<String>, String> {
        self.store
            .get_secret(&h.tenant, alias)
            .await
            .map_err(|e| e.to_string())
    }
}

/// `auth: <alias>`: http gets `Authorization` (token → Bearer, username/password → Basic)
/// and any `headers` of the credential; other tools receive it as the `auth` input.
fn apply_auth(
    kind: ToolKind,
    config: &mut Map<String, Value>,
    input: &mut Map<String, Value>,
    cred: &Value,
) {
    if kind != ToolKind::Http {
        input.insert("auth".into(), cred.clone());
        return;
    }
    let mut headers = match config.remove("headers") {
        Some(Value::Object(h)) => h,
        _ => Map::new(),
    };
    let field = |k: &str| cred.get(k).and_then(Value::as_str).map(str::to_owned);
    if let Some(t) = field("token").or_else(|| cred.as_str().map(str::to_owned)) {
        headers.insert("authorization".into(), Value::String(format!("Bearer {t}")));
    } else if let (Some(u), Some(p)) = (field("username"), field("password")) {
        use base64::Engine as _;
        let b = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
        headers.insert("authorization".into(), Value::String(format!("Basic {b}")));
    }
    if let Some(Value::Object(extra)) = cred.get("headers") {
        headers.extend(extra.clone());
    }
    config.insert("headers".into(), Value::Object(headers));
}

/// Seconds to a Duration without panicking on values the parser would not let through.
fn secs(s: f64) -> Duration {
    Duration::try_from_secs_f64(s).unwrap_or(Duration::from_secs(31_536_000))
}

fn tmpl(pb: &mayfly_dsl::Playbook, step: &str, e: TemplateError) -> ErrorInfo {
    ErrorInfo::new(
        e.code(),
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

/// The data plane's own policy check of a block against the bundle `agent` applied: the
/// tool kinds it runs and the keychain `aliases` it resolves (templated ones included, now
/// that they are known). A refusal fails the step with `policy_denied`.
fn enforce(
    agent: &crate::agent::Agent,
    h: &Hydrated,
    step: &mayfly_dsl::Step,
    aliases: &[String],
) -> Option<StepFailed> {
    if let Some(why) = agent.missing_bundle() {
        return Some(StepFailed {
            index: h.block.index,
            error: ErrorInfo::new("no_policy_bundle", why),
            duration_ms: None,
            logs: None,
        });
    }
    if !agent.enforcing() {
        return None;
    }
    let tools = step
        .tasks
        .iter()
        .map(|t| t.kind.as_str().to_owned())
        .collect();
    let aliases = aliases.iter().cloned().collect();
    let reason = agent.check(&h.tenant, &h.playbook.path, tools, aliases)?;
    Some(StepFailed {
        index: h.block.index,
        error: ErrorInfo::new("policy_denied", reason),
        duration_ms: None,
        logs: None,
    })
}

/// Execute one block: resolve the keychain aliases it uses (only here, inside the worker),
/// check them and its tool kinds against the policy bundle `agent` enforces, run the task
/// pipeline, and redact every resolved secret value from what it returns.
pub async fn run_block<C: Coordinator>(
    coord: &C,
    tools: &Tools,
    secrets: Option<&Secrets<'_, C>>,
    agent: Option<&crate::agent::Agent>,
    payloads: Option<&Payloads>,
    h: &Hydrated,
) -> Result<StepFinished, StepFailed> {
    let index = h.block.index;
    let Some(step) = h.playbook.step(&h.block.step) else {
        let e = ErrorInfo::new(
            "unknown_step",
            format!("step `{}` is not defined", h.block.step),
        );
        return Err(StepFailed {
            index,
            error: e,
            duration_ms: None,
            logs: None,
        });
    };
    let aliases = referenced_aliases(step, &h.context);
    if let Some(denied) = agent.and_then(|a| enforce(a, h, step, &aliases)) {
        return Err(denied);
    }
    if aliases.is_empty() {
        return run_pipeline(coord, tools, payloads, h, None).await;
    }
    let resolved = match secrets {
        Some(s) => s.resolve(h, &aliases).await,
        None => Err(ErrorInfo::new(
            "keychain_unavailable",
            format!(
                "step `{}` uses the keychain but no master key is configured",
                step.name
            ),
        )),
    };
    let (values, redactor) = match resolved {
        Ok(v) => v,
        Err(error) => {
            return Err(StepFailed {
                index,
                error,
                duration_ms: None,
                logs: None,
            });
        }
    };
    let out = run_pipeline(coord, tools, payloads, h, Some(values)).await;
    match out {
        Ok(mut f) => {
            redactor.value(&mut f.result);
            for v in f.set.values_mut() {
                redactor.value(v);
            }
            if let Some(l) = &mut f.logs {
                redactor.value(l);
            }
            Ok(f)
        }
        Err(mut f) => {
            f.error.message = redactor.text(&f.error.message);
            if let Some(l) = &mut f.logs {
                redactor.value(l);
            }
            Err(f)
        }
    }
}

/// Aliases a step uses: `auth: <alias>` on its tasks and `keychain.<alias>` in any field.
fn referenced_aliases(step: &mayfly_dsl::Step, ctx: &Map<String, Value>) -> Vec<String> {
    use mayfly_dsl::playbook::keychain_mentions as scan;
    let mut out = std::collections::BTreeSet::new();
    // Converted only for a step with `auth:` (most have none, and a big context is costly).
    let mut mctx = None;
    for t in &step.tasks {
        scan(&t.config, &mut out);
        // A transfer's endpoints name their own credentials.
        let endpoints = ["source", "target"]
            .iter()
            .filter(|_| t.kind == ToolKind::Transfer)
            .filter_map(|side| t.config.get(side).and_then(|ep| ep.get("auth")));
        for a in t.config.get("auth").into_iter().chain(endpoints) {
            if let Ok(Value::String(alias)) =
                templates().render_node(a, mctx.get_or_insert_with(|| to_value(ctx)))
                && !alias.is_empty()
            {
                out.insert(alias);
            }
        }
    }
    if let Some(i) = &step.input {
        scan(i, &mut out);
    }
    out.into_iter().collect()
}

/// Worker-side keychain access: sealed values from the coordinator, opened here with the
/// master key (the orchestrator never sees a plaintext value).
pub struct Secrets<'a, C> {
    pub coord: &'a C,
    pub key: &'a mayfly_trust::keychain::MasterKey,
}

impl<C: Coordinator> Secrets<'_, C> {
    async fn resolve(
        &self,
        h: &Hydrated,
        aliases: &[String],
    ) -> Result<(Value, Redactor), ErrorInfo> {
        let tenant = h.tenant.as_str();
        let mut values = Map::new();
        let mut redactor = Redactor::default();
        for alias in aliases {
            let sealed = self
                .coord
                .sealed_secret(h, alias)
                .await
                .map_err(|e| ErrorInfo::new("keychain_unavailable", e))?
                .ok_or_else(|| {
                    ErrorInfo::new(
                        "keychain_missing",
                        format!("keychain alias `{alias}` is not set for tenant `{tenant}`"),
                    )
                })?;
            let plain = self.key.open(tenant, alias, &sealed).map_err(|e| {
                ErrorInfo::new("keychain_sealed", format!("keychain alias `{alias}`: {e}"))
            })?;
            let text = String::from_utf8_lossy(&plain).into_owned();
            let v = serde_json::from_str::<Value>(&text).unwrap_or(Value::String(text));
            redactor.learn(&v);
            values.insert(alias.clone(), v);
        }
        Ok((Value::Object(values), redactor))
    }
}

/// Replaces resolved secret values wherever they surface in a block's output.
#[derive(Default)]
struct Redactor {
    needles: Vec<String>,
}

/// Secret strings shorter than this are not redacted (they would shred ordinary output);
/// such values are too weak to be secrets anyway.
const MIN_SECRET_LEN: usize = 4;

impl Redactor {
    fn learn(&mut self, v: &Value) {
        match v {
            Value::String(s) if s.len() >= MIN_SECRET_LEN => self.needles.push(s.clone()),
            Value::Array(a) => a.iter().for_each(|x| self.learn(x)),
            Value::Object(m) => {
                if let (Some(Value::String(u)), Some(Value::String(p))) =
                    (m.get("username"), m.get("password"))
                {
                    use base64::Engine as _;
                    self.needles
                        .push(base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}")));
                }
                m.values().for_each(|x| self.learn(x));
            }
            Value::Number(n) if n.to_string().len() >= MIN_SECRET_LEN => {
                self.needles.push(n.to_string())
            }
            _ => {}
        }
        // Longest first, so a secret containing another is removed whole.
        self.needles.sort_by_key(|s| std::cmp::Reverse(s.len()));
        self.needles.dedup();
    }

    fn text(&self, s: &str) -> String {
        let mut out = s.to_owned();
        for n in &self.needles {
            if out.contains(n.as_str()) {
                out = out.replace(n.as_str(), "[REDACTED]");
            }
        }
        out
    }

    fn value(&self, v: &mut Value) {
        match v {
            Value::String(s) => *s = self.text(s),
            Value::Array(a) => a.iter_mut().for_each(|x| self.value(x)),
            Value::Object(m) => {
                for x in m.values_mut() {
                    self.value(x);
                }
            }
            Value::Number(n) if self.needles.iter().any(|k| *k == n.to_string()) => {
                *v = Value::String("[REDACTED]".into())
            }
            _ => {}
        }
    }
}

/// Write one `set` assignment into the running block: `ctx.x`/`x` is execution scope (and
/// persisted), `step.x` a field of the step's result, `iter.x` block-local.
fn assign(
    ctx: &mut Map<String, Value>,
    set: &mut Map<String, Value>,
    step_fields: &mut Map<String, Value>,
    target: &mayfly_dsl::SetTarget,
    v: Value,
) {
    match target {
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

/// What a python task's `context` global holds: `execution_id`, `step`, and — only when
/// the code reads `context` or `variables`, since it is the whole render context — the
/// render context as `variables`.
fn python_context(task: &mayfly_dsl::Task, ctx: &Map<String, Value>, h: &Hydrated) -> Value {
    let code = task
        .config
        .get("code")
        .and_then(|c| c.as_str())
        .unwrap_or("");
    let mut c = Map::new();
    c.insert(
        "execution_id".into(),
        Value::String(h.block.execution_id.0.clone()),
    );
    c.insert("step".into(), Value::String(h.block.step.clone()));
    if code.contains("context") || code.contains("variables") {
        let mut vars = ctx.clone();
        vars.remove("keychain");
        vars.remove(mayfly_dsl::template::LOOPS_KEY);
        vars.remove(mayfly_dsl::template::REFS_KEY);
        c.insert("variables".into(), Value::Object(vars));
    }
    Value::Object(c)
}

/// The resolved keychain value of `alias` in a block's scope (null when unresolved: the tool
/// then refuses the missing credential).
fn credential(ctx: &Map<String, Value>, alias: &str) -> Value {
    ctx.get("keychain")
        .and_then(|k| k.get(alias))
        .cloned()
        .unwrap_or(Value::Null)
}

/// A fire-and-forget `playbook` task of a pipeline (validation refuses a waiting one there):
/// the child is started through the coordinator, recorded before this returns, and the task's
/// data is NoETL's `{status: started, execution_id, path, async: true}`.
async fn child_task<C: Coordinator>(
    coord: &C,
    h: &Hydrated,
    config: &Map<String, Value>,
    input: &Map<String, Value>,
) -> ToolOutput {
    let Some(path) = config.get("path").and_then(Value::as_str) else {
        return ToolOutput::failed(ToolError::new("bad_config", "playbook task needs `path`"));
    };
    // A `version` travels in the path as `@N` (the orchestrator splits it off).
    let path = match mayfly_dsl::versioned_child_path(path, config.get("version")) {
        Ok(p) => p,
        Err(m) => return ToolOutput::failed(ToolError::new("bad_version", m)),
    };
    let path = path.as_str();
    match coord.start_child(h, path, input.clone()).await {
        Ok(id) => ToolOutput::ok(serde_json::json!({
            "status": "started",
            "execution_id": id.0,
            "path": path,
            "async": true,
        })),
        Err(RuntimeError::Child(e)) => ToolOutput::failed(ToolError::new(e.code, e.message)),
        Err(e) => ToolOutput::failed(ToolError::new("child_start_failed", e.to_string())),
    }
}

/// `kind: artifact, action: get`: the value a `_ref` (`mayfly://cache/<format>/<digest>`,
/// optionally `#<item>`) names, fetched from this tenant's shared cache.
async fn artifact_get(
    payloads: Option<&Payloads>,
    tenant: &str,
    config: &Map<String, Value>,
    input: &Map<String, Value>,
) -> ToolOutput {
    let bad = |m: String| ToolOutput::failed(ToolError::new("bad_config", m));
    let r = ["result_ref", "ref"]
        .iter()
        .find_map(|k| config.get(*k).or(input.get(*k)))
        .cloned()
        .unwrap_or(Value::Null);
    // NoETL passes the reference as a string or as `{ref: …}`.
    let text = match &r {
        Value::String(s) => s.clone(),
        Value::Object(m) => match m.get("ref").or(m.get("_ref")).and_then(Value::as_str) {
            Some(s) => s.to_owned(),
            None => return bad("artifact `result_ref` has no `ref`".into()),
        },
        _ => return bad("artifact needs `result_ref`: a step's `{{ s._ref }}`".into()),
    };
    let Some(cache_ref) = CacheRef::from_uri(&text) else {
        return bad(format!(
            "artifact `result_ref` `{text}` is not a mayfly://cache/<json|arrow>/sha256:<hex> reference"
        ));
    };
    let Some(p) = payloads else {
        return ToolOutput::failed(ToolError::new(
            "cache_unavailable",
            "this worker has no shared cache to fetch the artifact from",
        ));
    };
    match p.hydrate(tenant, &cache_ref).await {
        Ok(v) => ToolOutput::ok(v),
        Err(e) => ToolOutput::failed(ToolError::new(e.code(), e.to_string())),
    }
}

/// NoETL's `output_select` (Python runtime): the selected fields beside the data — `{…fields,
/// _inline: data}`, or for data over the inline budget (stored in the cache now) `{…fields,
/// _ref: {ref, store, bytes}, _preview, _size_bytes, _store}`; `kind: artifact` loads it by
/// `_ref`.
async fn selected(
    payloads: Option<&Payloads>,
    tenant: &str,
    data: Value,
    paths: &[String],
) -> Result<Value, CacheError> {
    use mayfly_engine::output::{preview, select};
    let mut out = select(&data, paths);
    let size = mayfly_cache::json_len(&data);
    match payloads {
        Some(p) if size > p.inline_limit() && CacheRef::parse(&data).is_none() => {
            let blob = mayfly_cache::encode(&data);
            p.cache()
                .put(tenant, &blob.cache_ref.digest, blob.bytes.clone())
                .await?;
            let r = &blob.cache_ref;
            // NoETL's Python runtime's `_ref` is an object; `$ref` also keeps the payload
            // retained as long as this result is (retention follows `$ref` digests).
            out.insert(
                "_ref".into(),
                serde_json::json!({
                    "ref": r.uri(),
                    "$ref": r.digest,
                    "store": "cache",
                    "bytes": r.bytes,
                }),
            );
            out.insert("_preview".into(), preview(&data));
            out.insert("_size_bytes".into(), Value::from(size));
            out.insert("_store".into(), Value::from("cache"));
        }
        _ => {
            out.insert("_inline".into(), data);
        }
    }
    Ok(Value::Object(out))
}

/// The task pipeline under its policy rules.
async fn run_pipeline<C: Coordinator>(
    coord: &C,
    tools: &Tools,
    payloads: Option<&Payloads>,
    h: &Hydrated,
    keychain: Option<Value>,
) -> Result<StepFinished, StepFailed> {
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
    if let Some(k) = keychain {
        ctx.insert("keychain".into(), k);
    }
    if step.is_inline() {
        // Sent here only because it reads a cached payload: the same result the engine
        // computes for an inline block (the rendered `input`, else the loop item).
        let item = step
            .looping
            .as_ref()
            .and_then(|l| ctx.get(&l.iterator).cloned());
        let result = match mayfly_engine::decide::inline_result(step, &ctx, item.as_ref()) {
            Ok(v) => v,
            Err(e) => return Err(fail(tmpl(pb, &step.name, e), None, started)),
        };
        return Ok(StepFinished {
            index,
            result,
            set: Map::new(),
            inline: false,
            duration_ms: Some(started.elapsed().as_millis() as u64),
            logs: None,
        });
    }
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
    // A pipeline's result: each task's data under its label, in task order (NoETL).
    let mut labeled = Map::new();
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
                    // NoETL renders `{{ }}` in python code before it runs (always as text).
                    match v.as_str() {
                        Some(code) if mayfly_dsl::Templates::is_template(code) => {
                            match templates().render_text(code, &mctx) {
                                Ok(c) => Value::String(c),
                                Err(message) => {
                                    let e = TemplateError {
                                        loc: v.loc,
                                        message,
                                    };
                                    return Err(fail(tmpl(pb, &step.name, e), logs, started));
                                }
                            }
                        }
                        _ => v.to_json(),
                    }
                } else {
                    match templates().render_node(v, &mctx) {
                        Ok(r) => r,
                        Err(e) => return Err(fail(tmpl(pb, &step.name, e), logs, started)),
                    }
                };
                config.insert(k.clone(), rendered);
            }
        }
        if task.kind == ToolKind::Python {
            config.insert(
                mayfly_tools::CONTEXT_KEY.into(),
                python_context(task, &ctx, h),
            );
        }
        let mut input = base_input.clone();
        // A single tool in a loop also gets the item, `_index` and `_total` as arguments
        // (NoETL), so python code reads the iterator as a global without listing it.
        if let (Some(l), false) = (&step.looping, step.pipeline) {
            for k in [l.iterator.as_str(), "_index", "_total"] {
                if let Some(v) = ctx.get(k) {
                    input.insert(k.to_owned(), v.clone());
                }
            }
        }
        for key in ["args", "input"] {
            if let Some(Value::Object(m)) = config.get(key) {
                input.extend(m.clone());
            }
        }
        if let Some(Value::String(alias)) = config.get("auth").cloned() {
            let cred = credential(&ctx, &alias);
            apply_auth(task.kind, &mut config, &mut input, &cred);
        }
        if task.kind == ToolKind::Transfer {
            for side in ["source", "target"] {
                if let Some(Value::Object(ep)) = config.get_mut(side)
                    && let Some(Value::String(alias)) = ep.get("auth").cloned()
                {
                    ep.insert("auth".into(), credential(&ctx, &alias));
                }
            }
        }
        // The policy budget caps whatever the playbook asks for (bounded autonomy).
        let budget = h
            .limits
            .as_ref()
            .and_then(|l| l.step_timeout_s)
            .map(|s| s as f64);
        let timeout = match (
            task.timeout_s
                .or(step.timeout_s)
                .filter(|t| t.is_finite() && *t > 0.0),
            budget,
        ) {
            (Some(t), Some(b)) => Some(t.min(b)),
            (t, b) => t.or(b),
        }
        .map(secs);
        let task_started = Instant::now();
        // `output_select` shapes the task's data afterwards; no tool reads it.
        let select: Option<Vec<String>> = config
            .remove("output_select")
            .or_else(|| {
                config
                    .remove("output")
                    .and_then(|o| o.get("output_select").cloned())
            })
            .and_then(|v| serde_json::from_value(v).ok());
        let run = async {
            if task.kind == ToolKind::Artifact {
                artifact_get(payloads, &h.tenant, &config, &input).await
            } else if task.kind == ToolKind::Playbook {
                child_task(coord, h, &config, &input).await
            } else {
                let scope = mayfly_tools::Scope {
                    tenant: &h.tenant,
                    limits: h.limits.as_ref(),
                };
                tools
                    .run_in(&scope, task.kind.as_str(), &config, &input, timeout)
                    .await
            }
        };
        let out: ToolOutput = run
            .instrument(tracing::info_span!(
                "tool",
                otel.name = %format!("tool {}", task.kind.as_str()),
                tool = task.kind.as_str(),
                task = %task.name,
                attempt = tries + 1,
            ))
            .await;
        if out.logs.is_some() {
            logs = out.logs.clone();
        }
        let mut output = out.as_output();
        output["meta"] = serde_json::json!({
            "attempt": tries + 1,
            "duration_ms": task_started.elapsed().as_millis() as u64,
        });
        // Task-level `set:` first, with `output` = the task's own data (NoETL's order).
        if !task.set.is_empty() {
            let mut sctx = ctx.clone();
            sctx.insert("output".into(), out.data.clone());
            let sctx_v = to_value(&sctx);
            for op in &task.set {
                let v = match templates().render_node(&op.value, &sctx_v) {
                    Ok(v) => v,
                    Err(e) => return Err(fail(tmpl(pb, &step.name, e), logs, started)),
                };
                assign(&mut ctx, &mut set, &mut step_fields, &op.target, v);
            }
        }
        let mut pctx = ctx.clone();
        pctx.insert("output".into(), output.clone());
        pctx.insert("result".into(), out.data.clone());
        pctx.insert("attempt".into(), Value::from(tries + 1));
        pctx.insert("_attempt".into(), Value::from(tries + 1));
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
                assign(&mut ctx, &mut set, &mut step_fields, &op.target, v);
            }
        }
        let directive = rule
            .map(|r| r.directive.clone())
            .unwrap_or_else(|| default_directive(out.ok, &task.on_unmatched_error));
        let value = if out.ok || !out.data.is_null() {
            out.data.clone()
        } else {
            output.clone()
        };
        let value = match &select {
            Some(paths) if out.ok => match selected(payloads, &h.tenant, value, paths).await {
                Ok(v) => v,
                Err(e) => {
                    return Err(fail(ErrorInfo::new(e.code(), e.to_string()), logs, started));
                }
            },
            _ => value,
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
            } if tries + 1
                < h.limits
                    .as_ref()
                    .and_then(|l| l.max_attempts)
                    .map_or(attempts, |m| attempts.min(m)) =>
            {
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
                ctx.insert(task.name.clone(), mayfly_engine::alias(&value));
                ctx.insert("_prev".into(), value.clone());
                labeled.insert(task.name.clone(), value.clone());
                last = value;
                i += 1;
                tries = 0;
            }
            Directive::Jump { to } => {
                ctx.insert(task.name.clone(), mayfly_engine::alias(&value));
                ctx.insert("_prev".into(), value.clone());
                labeled.insert(task.name.clone(), value.clone());
                last = value;
                i = step
                    .tasks
                    .iter()
                    .position(|t| t.name == to)
                    .unwrap_or(step.tasks.len());
                tries = 0;
            }
            Directive::Break => {
                labeled.insert(task.name.clone(), value.clone());
                last = value;
                break;
            }
        }
    }
    if step.pipeline {
        last = Value::Object(labeled);
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
