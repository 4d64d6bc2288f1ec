//! The gateway: the only component clients talk to. It authenticates (hashed, tenant-scoped
//! API tokens with roles), correlates requests (`x-request-id`, carried into every event),
//! routes to the catalog and the runtime, and streams execution events (SSE). It never reads
//! or writes domain data and never runs tools.
//!
//! Every error is `application/problem+json` with a stable `code`.

mod actors;
mod control;
mod reads;
pub mod tokens;
mod ui;

pub use control::Admissions;
pub use ui::Sessions;

use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use futures_util::Stream;
use mayfly_dsl::ParseOptions;
use mayfly_engine::ExecState;
use mayfly_runtime::RuntimeHandle;
use mayfly_store::{AuditRecord, Store, StoredPlaybook, TokenGrant};
use mayfly_types::{EventKind, ExecutionId};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

/// Largest request body accepted (413 beyond).
pub const MAX_BODY: usize = 1 << 20;
/// The platform tenant: its admins may create tokens for any tenant.
pub const SYSTEM_TENANT: &str = "system";

/// Roles, weakest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Viewer,
    Operator,
    Author,
    Admin,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "viewer" => Some(Role::Viewer),
            "operator" => Some(Role::Operator),
            "author" => Some(Role::Author),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// Shared state of the HTTP handlers.
#[derive(Clone)]
pub struct Gateway {
    pub store: Arc<dyn Store>,
    /// The runtime when this node is the log's appender; None on a view-only node, which
    /// serves reads and answers every write `not_leader`.
    pub runtime: Option<RuntimeHandle>,
    /// The control plane's writer (desired state and its audit) when this node is the log's
    /// appender; None on a read-only node (writes answer `not_leader`).
    pub control: Option<Arc<mayfly_control::Control>>,
    /// This node's materialized view of the control stream: every control-plane read is
    /// served from it under the freshness class the caller asks for.
    pub view: mayfly_control::View,
    /// Admission outcomes since start, by decision (reported by `/v1/status`).
    pub admissions: Arc<control::Admissions>,
    /// Renders `/metrics` (None: the endpoint answers 404).
    pub metrics: Option<PrometheusHandle>,
    /// The actor dataplane driver (None: `/v1/providers`, `/v1/actors` and `/actors/…`
    /// answer `dataplane_disabled`).
    pub dataplane: Option<Arc<mayfly_actors::dataplane::Dataplane>>,
    /// Tokens the store verified lately: authentication without the store for that long.
    pub tokens: Arc<tokens::TokenCache>,
}

/// Install the process-wide Prometheus recorder (once) and return its handle.
pub fn install_metrics() -> Option<PrometheusHandle> {
    static HANDLE: std::sync::OnceLock<Option<PrometheusHandle>> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let latency = [
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0, 60.0,
            ];
            PrometheusBuilder::new()
                .set_buckets(&latency)
                .ok()?
                .install_recorder()
                .ok()
        })
        .clone()
}

/// An error answered as problem+json.
#[derive(Debug)]
pub struct Problem {
    status: StatusCode,
    code: &'static str,
    detail: String,
    extra: Map<String, Value>,
}

impl Problem {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        Problem {
            status,
            code,
            detail: detail.into(),
            extra: Map::new(),
        }
    }
    fn internal(e: impl std::fmt::Display) -> Self {
        Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
    }
    /// A store failure: `503 root_unavailable` when the store could not be reached (or did
    /// not answer within its bound), else internal.
    pub(crate) fn store(e: mayfly_store::StoreError) -> Self {
        if e.is_unavailable() {
            Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "root_unavailable",
                format!("the log's store is unavailable; retry later ({e})"),
            )
        } else {
            Problem::internal(e)
        }
    }
    fn not_found(what: impl Into<String>) -> Self {
        Problem::new(StatusCode::NOT_FOUND, "not_found", what)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let mut body = json!({
            "type": format!("https://mayfly.dev/problems/{}", self.code),
            "title": self.status.canonical_reason().unwrap_or("error"),
            "status": self.status.as_u16(),
            "code": self.code,
            "detail": self.detail,
        });
        if let Value::Object(m) = &mut body {
            m.extend(self.extra);
        }
        let mut r = (self.status, Json(body)).into_response();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        r
    }
}

type ApiResult<T> = Result<T, Problem>;

/// Writes audit records to the store in the background, in batches. The channel is
/// bounded so that a flood of refused requests cannot grow memory without limit: beyond it
/// records are dropped and counted (`mayfly_audit_dropped_total`), never silently.
#[derive(Clone)]
struct Auditor(Option<tokio::sync::mpsc::Sender<AuditRecord>>);

impl Auditor {
    /// A view-only node writes nothing to the shared log: its refusals go to its own log
    /// output only.
    fn log_only() -> Auditor {
        Auditor(None)
    }

    fn spawn(store: Arc<dyn Store>) -> Auditor {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<AuditRecord>(10_000);
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut audit = vec![first];
                while audit.len() < 512 {
                    match rx.try_recv() {
                        Ok(r) => audit.push(r),
                        Err(_) => break,
                    }
                }
                let n = audit.len();
                let batch = Arc::new(mayfly_store::Batch {
                    audit,
                    ..Default::default()
                });
                // Records written while the store is away (the very moments fail-open
                // markers matter) wait for it, however long: the queue behind them is
                // bounded (a full one drops new records, counted). A store that answers
                // with an error of another kind gets a few more tries, then they are
                // dropped, counted.
                let mut tries = 0;
                while let Err(e) = store.append(batch.clone()).await {
                    if !e.is_unavailable() {
                        tries += 1;
                    }
                    if tries >= 5 {
                        metrics::counter!("mayfly_audit_dropped_total").increment(n as u64);
                        tracing::error!(target: "mayfly::audit", error = %e, records = n, "audit records could not be stored");
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                }
            }
        });
        Auditor(Some(tx))
    }

    fn record(&self, r: AuditRecord) {
        tracing::warn!(target: "mayfly::audit", tenant = ?r.tenant, actor = ?r.actor, action = %r.action, outcome = %r.outcome, request_id = %r.request_id, "{}", r.detail);
        if let Some(tx) = &self.0
            && tx.try_send(r).is_err()
        {
            metrics::counter!("mayfly_audit_dropped_total").increment(1);
        }
    }
}

/// The caller, after authentication.
#[derive(Clone)]
struct Caller {
    tenant: String,
    role: Role,
    request_id: String,
    /// The token's name.
    actor: String,
    /// `METHOD /path` of this request.
    action: String,
    audit: Option<Auditor>,
}

impl Caller {
    fn require(&self, role: Role) -> ApiResult<()> {
        if self.role >= role {
            Ok(())
        } else {
            Err(self.deny(
                StatusCode::FORBIDDEN,
                "forbidden",
                "forbidden",
                format!("this needs the {role:?} role"),
            ))
        }
    }

    /// Record that the request was served under an exception (e.g. a read that failed open
    /// while the control plane was degraded) — a marker for review, in the audit table.
    fn mark(&self, outcome: &str, detail: String) {
        metrics::counter!("mayfly_fail_open_total", "outcome" => outcome.to_owned()).increment(1);
        self.audit(outcome, detail);
    }

    /// Record what became of this request in the audit table.
    fn audit(&self, outcome: &str, detail: String) {
        if let Some(a) = &self.audit {
            a.record(AuditRecord {
                id: 0,
                at_ms: mayfly_types::now_ms(),
                tenant: Some(self.tenant.clone()),
                actor: Some(self.actor.clone()),
                action: self.action.clone(),
                outcome: outcome.into(),
                detail,
                request_id: self.request_id.clone(),
            });
        }
    }

    /// Refuse the request with problem `code` and record it (durably, in the audit table)
    /// as `outcome` — which can say more than the answer does (a cross-tenant read is
    /// answered like a missing object).
    fn deny(
        &self,
        status: StatusCode,
        code: &'static str,
        outcome: &str,
        detail: String,
    ) -> Problem {
        self.audit(outcome, detail.clone());
        Problem::new(status, code, detail)
    }
}

/// Hash of an API token as stored (the token itself is never stored).
pub fn token_hash(token: &str) -> String {
    mayfly_trust::sha256_digest(token.as_bytes())
}

/// Create the first admin token when none exists; returns it (shown once) or None.
pub async fn bootstrap_admin(
    store: &dyn Store,
) -> Result<Option<String>, mayfly_store::StoreError> {
    if store.count_tokens().await? > 0 {
        return Ok(None);
    }
    let token = mayfly_trust::keychain::random_token("mf_");
    let grant = TokenGrant {
        tenant: SYSTEM_TENANT.into(),
        role: "admin".into(),
        name: "bootstrap".into(),
    };
    store.put_token(&token_hash(&token), &grant).await?;
    Ok(Some(token))
}

pub(crate) fn request_id(headers: &HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.chars().all(|c| c.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string())
}

/// The answer of a view-only node to a write.
pub(crate) fn not_leader() -> Problem {
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "not_leader",
        "this node serves reads only; send writes to the node that appends to the log",
    )
}

/// The grant of token `hash`: verified by the store lately, or asked of it now. A store
/// that cannot answer (within its bound) is `503 root_unavailable` for tokens not verified
/// within the cache's time; an unknown token is `401`, and forgotten.
pub(crate) async fn verify_token(gw: &Gateway, hash: &str) -> ApiResult<mayfly_store::TokenGrant> {
    if let Some(g) = gw.tokens.fresh(hash) {
        return Ok(g);
    }
    match gw.store.find_token(hash).await.map_err(Problem::store)? {
        Some(g) => {
            gw.tokens.verified(hash, g.clone());
            Ok(g)
        }
        None => {
            gw.tokens.forget(hash);
            Err(Problem::new(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "unknown token",
            ))
        }
    }
}

/// Authenticate every `/v1` request; attach the request id to the response.
async fn authenticate(State(gw): State<Gateway>, mut req: Request, next: Next) -> Response {
    let rid = request_id(req.headers());
    let too_big = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .is_some_and(|n| n > MAX_BODY);
    // Copy what we need out of the request: it is not Sync, so no borrow may cross an await.
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_owned());
    // Inside the nested `/v1` router the URI has lost its prefix; audit the original.
    let path = req
        .extensions()
        .get::<axum::extract::OriginalUri>()
        .map(|u| u.path().to_owned())
        .unwrap_or_else(|| req.uri().path().to_owned());
    let action = format!("{} {path}", req.method());
    // An actor's data path is its own (it may carry anything): spans and logs name the
    // route, not the path.
    let span_name = match path.strip_prefix("/actors/") {
        Some(rest) => format!(
            "{} /actors/{}",
            req.method(),
            rest.split('/').next().unwrap_or_default()
        ),
        None => action.clone(),
    };
    let write = !matches!(
        *req.method(),
        axum::http::Method::GET | axum::http::Method::HEAD
    );
    if write && gw.runtime.is_none() {
        return not_leader().into_response();
    }
    let audit = req.extensions().get::<Auditor>().cloned();
    // A browser session stands for the token it was opened with (checked again below).
    let session = match (&bearer, req.extensions().get::<ui::Sessions>()) {
        (None, Some(sessions)) => {
            ui::session_cookie(req.headers()).map(|v| sessions.check(&v, mayfly_types::now_ms()))
        }
        _ => None,
    };
    let ui_header = req.headers().get(ui::UI_HEADER).is_some();
    let traceparent = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let result: ApiResult<Caller> = async {
        if too_big {
            return Err(Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("bodies are limited to {MAX_BODY} bytes"),
            ));
        }
        let hash = match (bearer, session) {
            (Some(token), _) => token_hash(&token),
            (None, Some(Some(hash))) => {
                if write && !ui_header {
                    return Err(Problem::new(
                        StatusCode::FORBIDDEN,
                        "csrf",
                        format!(
                            "writes made with a browser session must send `{}: 1`",
                            ui::UI_HEADER
                        ),
                    ));
                }
                hash
            }
            (None, Some(None)) => {
                return Err(Problem::new(
                    StatusCode::UNAUTHORIZED,
                    "session_expired",
                    "the session has expired or was issued by another gateway: log in again",
                ));
            }
            (None, None) => {
                return Err(Problem::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthenticated",
                    "send `Authorization: Bearer <token>`",
                ));
            }
        };
        let grant = verify_token(&gw, &hash).await?;
        let role = Role::parse(&grant.role)
            .ok_or_else(|| Problem::internal("token has an unknown role"))?;
        Ok(Caller {
            tenant: grant.tenant,
            role,
            request_id: rid.clone(),
            actor: grant.name,
            action: action.clone(),
            audit: audit.clone(),
        })
    }
    .await;
    // The request's span: its fields are on every log line of the request, and with
    // tracing on it is the root (or the continuation of the client's `traceparent`) of the
    // trace that follows the execution through its commands and blocks.
    let span = tracing::info_span!(
        "request",
        otel.name = %span_name,
        otel.kind = "server",
        request_id = %rid,
        tenant = tracing::field::Empty,
        http.response.status_code = tracing::field::Empty,
    );
    if let Some(tp) = traceparent {
        mayfly_runtime::trace::set_parent(&span, &tp);
    }
    let mut resp = match result {
        Ok(caller) => {
            span.record("tenant", caller.tenant.as_str());
            req.extensions_mut().insert(caller);
            next.run(req).instrument(span.clone()).await
        }
        Err(p) => {
            if p.status == StatusCode::UNAUTHORIZED
                && let Some(a) = &audit
            {
                a.record(AuditRecord {
                    id: 0,
                    at_ms: mayfly_types::now_ms(),
                    tenant: None,
                    actor: None,
                    action: action.clone(),
                    outcome: "unauthenticated".into(),
                    detail: p.detail.clone(),
                    request_id: rid.clone(),
                });
            }
            p.into_response()
        }
    };
    if let Ok(v) = HeaderValue::from_str(&rid) {
        resp.headers_mut().insert("x-request-id", v);
    }
    span.record("http.response.status_code", resp.status().as_u16());
    span.in_scope(|| tracing::info!(status = resp.status().as_u16(), "request served"));
    resp
}

/// The HTTP API.
pub fn router(gw: Gateway) -> Router {
    let auditor = if gw.runtime.is_some() {
        Auditor::spawn(gw.store.clone())
    } else {
        Auditor::log_only()
    };
    let sessions = ui::Sessions::random();
    // `GET /status` is `GET /v1/status` (same authentication), where operators expect it.
    let status_alias = Router::new()
        .route("/status", get(control::status))
        .layer(middleware::from_fn_with_state(gw.clone(), authenticate))
        .layer(axum::Extension(auditor.clone()))
        .layer(axum::Extension(sessions.clone()));
    let v1 = Router::new()
        .route("/playbooks", post(register).get(list_playbooks))
        .route("/playbooks/{*path}", get(get_playbook))
        .route("/whoami", get(reads::whoami))
        .route("/catalog/graph", get(reads::graph))
        .route("/catalog/diff", get(reads::diff))
        .route("/keychain", get(reads::keychain))
        .route("/workers", get(reads::workers))
        .route("/executions", post(start).get(list_executions))
        .route("/executions/{id}", get(status))
        .route("/executions/{id}/events", get(events))
        .route("/executions/{id}/stream", get(stream))
        .route("/executions/{id}/cancel", post(cancel))
        .route("/tokens", post(create_token))
        .route("/audit", get(list_audit))
        .route("/audit/verify", get(control::verify))
        .route("/status", get(control::status))
        .route("/policy/explain", get(control::explain))
        .route("/apply", post(control::apply))
        .route(
            "/bundles",
            post(control::publish_bundle).get(control::list_bundles),
        )
        .route("/control/compact", post(control::compact))
        .route("/rollouts/{name}", get(control::rollout_status))
        .route("/rollouts/{name}/cancel", post(control::cancel_rollout))
        .route("/objects/{kind}", get(control::list))
        .route("/objects/{kind}/{*name}", get(control::describe))
        .route("/history/{kind}/{*name}", get(control::history))
        .route("/providers", get(actors::providers))
        .route("/providers/enroll", post(actors::enroll))
        .route("/modules", post(actors::put_module))
        .route("/actors", get(actors::list))
        .route("/actors/{name}/snapshots", get(actors::snapshots))
        .route("/actors/{name}/move", post(actors::move_actor))
        .route("/actors/{name}/suspend", post(actors::suspend))
        .route("/actors/{name}/reset", post(actors::reset))
        .layer(middleware::from_fn_with_state(gw.clone(), authenticate))
        .layer(axum::Extension(auditor.clone()))
        .layer(axum::Extension(sessions.clone()));
    // The router: the caller's actors, by name, any method.
    let actor_routes = Router::new()
        .route("/actors/{name}", any(actors::route_root))
        .route("/actors/{name}/", any(actors::route_root))
        .route("/actors/{name}/{*path}", any(actors::route))
        .layer(middleware::from_fn_with_state(gw.clone(), authenticate))
        .layer(axum::Extension(auditor.clone()));
    // No browser session reaches an actor: its answers are the actor's own content, served
    // on this origin, so a session there would hand the UI's authority to actor code.
    let ui_routes = Router::new()
        .route("/", get(ui::root))
        .route("/ui", get(ui::root))
        .route("/ui/", get(ui::index))
        .route("/ui/app.js", get(ui::app_js))
        .route("/ui/app.css", get(ui::app_css))
        .route("/ui/session", post(ui::login).delete(ui::logout))
        .layer(axum::Extension(auditor))
        .layer(axum::Extension(sessions));
    Router::new()
        .nest("/v1", v1)
        .merge(status_alias)
        .merge(actor_routes)
        .merge(ui_routes)
        .route("/actor-credentials", post(actors::credentials))
        .route("/healthz", get(health))
        .route("/readyz", get(ready))
        .route("/openapi.json", get(|| async { Json(openapi()) }))
        .route("/metrics", get(metrics_text))
        .route("/callbacks/{token}", post(callback))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(gw)
}

async fn register(
    State(gw): State<Gateway>,
    axum::Extension(c): axum::Extension<Caller>,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    c.require(Role::Author)?;
    let pb = mayfly_dsl::parse_bytes("request", &body, &ParseOptions::default()).map_err(|e| {
        let diags: Vec<Value> = e
            .diagnostics
            .iter()
            .map(|d| json!({"line": d.loc.line, "col": d.loc.col, "step": d.step, "message": d.message}))
            .collect();
        let mut p = Problem::new(StatusCode::BAD_REQUEST, "invalid_playbook", e.to_string());
        p.extra.insert("diagnostics".into(), Value::Array(diags));
        p
    })?;
    let stored = StoredPlaybook {
        digest: pb.digest.clone(),
        path: pb.path.clone(),
        source_name: pb.path.clone(),
        content: pb.source.clone(),
    };
    let (entry, created) = gw
        .store
        .register(&c.tenant, stored)
        .await
        .map_err(Problem::store)?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(json!({"path": entry.path, "version": entry.version, "digest": entry.digest, "created": created}))).into_response())
}

async fn list_playbooks(
    State(gw): State<Gateway>,
    axum::Extension(c): axum::Extension<Caller>,
) -> ApiResult<Json<Value>> {
    let list = gw
        .store
        .list_catalog(&c.tenant)
        .await
        .map_err(Problem::store)?;
    Ok(Json(json!({"playbooks": list})))
}

#[derive(Deserialize)]
struct VersionQuery {
    version: Option<u32>,
}

async fn get_playbook(
    State(gw): State<Gateway>,
    axum::Extension(c): axum::Extension<Caller>,
    Path(path): Path<String>,
    Query(q): Query<VersionQuery>,
) -> ApiResult<Json<Value>> {
    let (e, pb) = gw
        .store
        .resolve(&c.tenant, &path, q.version)
        .await
        .map_err(Problem::store)?
        .ok_or_else(|| Problem::not_found(format!("no playbook `{path}` in the catalog")))?;
    Ok(Json(
        json!({"path": e.path, "version": e.version, "digest": e.digest, "content": pb.content}),
    ))
}

#[derive(Deserialize)]
struct StartRequest {
    path: String,
    version: Option<u32>,
    #[serde(default)]
    workload: Map<String, Value>,
}

async fn start(
    State(gw): State<Gateway>,
    axum::Extension(c): axum::Extension<Caller>,
    body: String,
) -> ApiResult<Response> {
    c.require(Role::Operator)?;
    let req: StartRequest = serde_json::from_str(&body).map_err(|e| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("body: {e}"),
        )
    })?;
    forged_ref(req.workload.values())?;
    // With no version asked for, the desired state (an applied Playbook object) says which
    // catalog version is current — it may be an earlier one, rolled back to.
    let version = match req.version {
        Some(v) => Some(v),
        None => control::desired_playbook_version(&gw, &c, &req.path).await,
    };
    let (entry, stored) = gw
        .store
        .resolve(&c.tenant, &req.path, version)
        .await
        .map_err(Problem::store)?
        .ok_or_else(|| Problem::not_found(format!("no playbook `{}` in the catalog", req.path)))?;
    let opts = ParseOptions {
        extra_vars: req.workload.keys().cloned().collect(),
    };
    let name = format!("{}@{}", entry.path, entry.version);
    let pb = mayfly_dsl::parse(&name, &stored.content, &opts)
        .map_err(|e| Problem::new(StatusCode::BAD_REQUEST, "invalid_playbook", e.to_string()))?;
    let runtime = gw.runtime.as_ref().ok_or_else(not_leader)?;
    let admission = control::admit(&gw, &c, &pb, runtime).await?;
    let id = runtime
        .start_limited(
            Arc::new(pb),
            req.workload,
            Some(c.request_id.clone()),
            Some(c.tenant.clone()),
            admission.limits.clone(),
            mayfly_runtime::trace::traceparent(&tracing::Span::current()),
        )
        .await
        .map_err(|e| match e {
            // Admitted on this node's view, but the log has another appender now: the
            // start is refused with the execution plane's stable reason.
            mayfly_runtime::RuntimeError::Fenced(m) => {
                gw.admissions
                    .count(mayfly_control::AdmissionDecision::EpochMismatch);
                let mut p = c.deny(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "epoch_mismatch",
                    "epoch_mismatch",
                    format!("this node no longer appends to the log: {m}"),
                );
                p.extra
                    .insert("admission".into(), json!({"decision": "epoch_mismatch"}));
                p
            }
            e => Problem::internal(e),
        })?;
    let body = json!({"execution_id": id, "path": entry.path, "version": entry.version, "admission": admission});
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

#[derive(Deserialize)]
struct Page {
    limit: Option<u32>,
    from: Option<u64>,
}

#[derive(Deserialize)]
struct ListQuery {
    limit: Option<u32>,
    /// Only executions in this status (`running`, `completed`, `failed`, `cancelled`, …).
    status: Option<String>,
    /// Only executions whose playbook path contains this text.
    path: Option<String>,
}

/// Most recent first. Filters apply to the tenant's 1,000 most recent executions.
async fn list_executions(
    State(gw): State<Gateway>,
    axum::Extension(c): axum::Extension<Caller>,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<Value>> {
    let limit = q.limit.unwrap_or(50).min(1000) as usize;
    let status = q.status.filter(|s| !s.is_empty());
    let path = q.path.filter(|s| !s.is_empty());
    let filtered = status.is_some() || path.is_some();
    let mut rows = gw
        .store
        .list_executions(Some(&c.tenant), if filtered { 1000 } else { limit as u32 })
        .await
        .map_err(Problem::store)?;
    rows.retain(|r| {
        status.as_ref().is_none_or(|s| &r.status == s)
            && path.as_ref().is_none_or(|p| r.path.contains(p.as_str()))
    });
    rows.truncate(limit);
    Ok(Json(json!({"executions": rows})))
}

/// The execution, if it belongs to the caller's tenant (else 404: existence is not leaked).
async fn owned(gw: &Gateway, c: &Caller, id: &str) -> ApiResult<ExecutionId> {
    let id = ExecutionId::from(id);
    match gw.store.get_execution(&id).await.map_err(Problem::store)? {
        Some(row) if row.tenant == c.tenant => Ok(id),
        // Recorded as a cross-tenant attempt, answered exactly like a missing execution.
        Some(_) => Err(c.deny(
            StatusCode::NOT_FOUND,
            "not_found",
            "cross_tenant",
            format!("no execution {id}"),
        )),
        None => Err(Problem::not_found(format!("no execution {id}"))),
    }
}

async fn status(
    State(gw): State<Gateway>,
    axum::Extension(c): axum::Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let id = owned(&gw, &c, &id).await?;
    let evs = gw.store.read_all(&id).await.map_err(Problem::store)?;
    mayfly_trust::verify_chain(&evs).map_err(Problem::internal)?;
    let st = ExecState::fold(id, &evs).map_err(Problem::internal)?;
    Ok(Json(
        serde_json::to_value(st.report()).map_err(Problem::internal)?,
    ))
}

async fn events(
    State(gw): State<Gateway>,
    axum::Extension(c): axum::Extension<Caller>,
    Path(id): Path<String>,
    Query(p): Query<Page>,
) -> ApiResult<Json<Value>> {
    let id = owned(&gw, &c, &id).await?;
    let limit = p.limit.unwrap_or(100).clamp(1, 1000);
    let evs = gw
        .store
        .read(&id, p.from.unwrap_or(1), limit)
        .await
        .map_err(Problem::store)?;
    let next = (evs.len() as u32 == limit)
        .then(|| evs.last().map(|e| e.seq + 1))
        .flatten();
    let mut evs = serde_json::to_value(evs).map_err(Problem::internal)?;
    if let Value::Array(list) = &mut evs {
        list.iter_mut().for_each(|e| redact_callback_token(&c, e));
    }
    Ok(Json(json!({"events": evs, "next": next})))
}

#[derive(Deserialize)]
struct StreamQuery {
    /// Comma-separated event kinds to send (`step.finished`) or families (`execution.*`).
    kinds: Option<String>,
}

/// Which event kinds a stream sends (`?kinds=`), resolved once; none given sends every kind.
struct KindFilter(Option<Vec<EventKind>>);

impl KindFilter {
    fn parse(q: Option<&str>) -> ApiResult<Self> {
        let Some(q) = q.filter(|q| !q.trim().is_empty()) else {
            return Ok(KindFilter(None));
        };
        let mut out = Vec::new();
        for k in q.split(',').map(str::trim).filter(|k| !k.is_empty()) {
            let matched: Vec<EventKind> = match k.strip_suffix('*') {
                // Families keep their dot (`execution.`) so `execution.*` never matches
                // `executions`.
                Some(family) if family.ends_with('.') => EventKind::ALL
                    .iter()
                    .copied()
                    .filter(|e| e.as_str().starts_with(family))
                    .collect(),
                Some(_) => Vec::new(),
                None => EventKind::ALL
                    .iter()
                    .copied()
                    .filter(|e| e.as_str() == k)
                    .collect(),
            };
            if matched.is_empty() {
                return Err(Problem::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    format!(
                        "kinds: `{k}` is neither an event kind (step.finished) nor a family of them (step.*)"
                    ),
                ));
            }
            out.extend(matched);
        }
        Ok(KindFilter(Some(out)))
    }

    fn wants(&self, kind: EventKind) -> bool {
        self.0.as_ref().is_none_or(|want| want.contains(&kind))
    }
}

/// SSE of an execution's events: `id` is the seq (resume with `Last-Event-ID`), `event` the
/// kind; `?kinds=` sends only those kinds. The stream ends after the execution's terminal
/// event, whether or not the filter lets it through.
async fn stream(
    State(gw): State<Gateway>,
    axum::Extension(c): axum::Extension<Caller>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<StreamQuery>,
) -> ApiResult<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>> {
    let filter = KindFilter::parse(q.kinds.as_deref())?;
    let id = owned(&gw, &c, &id).await?;
    let mut next = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|s| s + 1)
        .unwrap_or(1);
    // A view-only node has no commits of its own to follow: it polls the log.
    let mut wake = match &gw.runtime {
        Some(r) => r.subscribe(),
        None => tokio::sync::broadcast::channel(1).1,
    };
    let store = gw.store.clone();
    let s = async_stream(move |tx| async move {
        let send = |e: &mayfly_types::Event| {
            // The same bytes whichever path an event took: events followed from the commit
            // broadcast carry no log position, so none carries it here (`/events` has it).
            // Serialized straight from the event (no `Value` in between): a fan-out streams
            // several events per item.
            let redact = c.role < Role::Operator
                && e.kind == EventKind::StepWaiting
                && e.payload.get("token").is_some();
            let data = if e.position.is_none() && !redact {
                serde_json::to_string(e)
            } else {
                let mut e = e.clone();
                e.position = None;
                if redact && let Some(p) = e.payload.as_object_mut() {
                    p.insert("token".into(), Value::from("[redacted]"));
                }
                serde_json::to_string(&e)
            }
            .unwrap_or_default();
            SseEvent::default()
                .id(e.seq.to_string())
                .event(e.kind.as_str())
                .data(data)
        };
        loop {
            // Catch up from the log (the start, a gap, or commits of another process).
            let page = match store.read(&id, next, 500).await {
                Ok(p) => p,
                Err(_) => return,
            };
            for e in &page {
                next = e.seq + 1;
                if filter.wants(e.kind) && tx.send(Ok(send(e))).await.is_err()
                    || e.kind.is_terminal()
                {
                    return;
                }
            }
            if page.len() == 500 {
                continue;
            }
            // Then follow this process's commits as they are broadcast (already durable):
            // the next event in sequence goes out without a read; anything else (a gap, a
            // lagged receiver, half a second of silence) falls back to reading the log.
            let follow = async {
                loop {
                    match wake.recv().await {
                        Ok(e) if e.execution_id == id => {
                            if e.seq < next {
                                continue;
                            }
                            if e.seq > next {
                                return false;
                            }
                            // Counted only once sent: a timeout while the client is slow
                            // must not skip it.
                            if filter.wants(e.kind) && tx.send(Ok(send(&e))).await.is_err()
                                || e.kind.is_terminal()
                            {
                                return true;
                            }
                            next = e.seq + 1;
                        }
                        Ok(_) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => return false,
                        Err(_) => std::future::pending::<()>().await,
                    }
                }
            };
            if let Ok(true) = tokio::time::timeout(Duration::from_millis(500), follow).await {
                return;
            }
        }
    });
    Ok(Sse::new(s).keep_alive(KeepAlive::default()))
}

/// A parked step's callback token is a capability (`POST /callbacks/{token}` resumes the
/// step with any result): callers who may not operate executions read it redacted. Their
/// copy of that event then no longer matches its hash; the log itself is untouched.
fn redact_callback_token(c: &Caller, event: &mut Value) {
    if c.role >= Role::Operator || event["kind"] != "step.waiting" {
        return;
    }
    if let Some(p) = event.get_mut("payload").and_then(Value::as_object_mut)
        && p.contains_key("token")
    {
        p.insert("token".into(), Value::from("[redacted]"));
    }
}

/// A stream fed by a producer task through a bounded channel (back-pressure to the client).
fn async_stream<F, Fut>(f: F) -> impl Stream<Item = Result<SseEvent, Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<SseEvent, Infallible>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(f(tx));
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

async fn cancel(
    State(gw): State<Gateway>,
    axum::Extension(c): axum::Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    c.require(Role::Operator)?;
    let id = owned(&gw, &c, &id).await?;
    match gw
        .runtime
        .as_ref()
        .ok_or_else(not_leader)?
        .cancel(&id, &format!("cancelled by request {}", c.request_id))
        .await
    {
        Ok(()) => Ok(Json(json!({"execution_id": id, "status": "cancelled"}))),
        Err(mayfly_runtime::RuntimeError::Ended(_)) => Err(Problem::new(
            StatusCode::CONFLICT,
            "already_ended",
            format!("execution {id} has already ended"),
        )),
        Err(e) => Err(Problem::internal(e)),
    }
}

#[derive(Deserialize)]
struct TokenRequest {
    tenant: Option<String>,
    role: String,
    name: String,
}

#[derive(Deserialize)]
struct AuditQuery {
    limit: Option<u32>,
    tenant: Option<String>,
}

/// Audit records, most recent first: admins see their tenant's; `system` admins see every
/// tenant's (and refused unauthenticated requests), or one tenant's with `?tenant=`.
async fn list_audit(
    State(gw): State<Gateway>,
    axum::Extension(c): axum::Extension<Caller>,
    Query(q): Query<AuditQuery>,
) -> ApiResult<Json<Value>> {
    c.require(Role::Admin)?;
    let limit = q.limit.unwrap_or(100).min(1000);
    let tenant = if c.tenant == SYSTEM_TENANT {
        q.tenant
    } else {
        Some(c.tenant.clone())
    };
    let rows = gw
        .store
        .list_audit(tenant.as_deref(), limit)
        .await
        .map_err(Problem::store)?;
    Ok(Json(json!({"audit": rows})))
}

async fn create_token(
    State(gw): State<Gateway>,
    axum::Extension(c): axum::Extension<Caller>,
    body: String,
) -> ApiResult<Response> {
    c.require(Role::Admin)?;
    let req: TokenRequest = serde_json::from_str(&body).map_err(|e| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("body: {e}"),
        )
    })?;
    Role::parse(&req.role).ok_or_else(|| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "role must be viewer, operator, author or admin",
        )
    })?;
    let tenant = req.tenant.unwrap_or_else(|| c.tenant.clone());
    if tenant != c.tenant && c.tenant != SYSTEM_TENANT {
        return Err(c.deny(
            StatusCode::FORBIDDEN,
            "forbidden",
            "forbidden",
            format!("tenant admins create tokens for their own tenant only (asked for `{tenant}`)"),
        ));
    }
    let token = mayfly_trust::keychain::random_token("mf_");
    let grant = TokenGrant {
        tenant: tenant.clone(),
        role: req.role.clone(),
        name: req.name,
    };
    gw.store
        .put_token(&token_hash(&token), &grant)
        .await
        .map_err(Problem::store)?;
    let body = json!({"token": token, "tenant": tenant, "role": req.role});
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// `POST /callbacks/{token}`: authenticated by the one-time token itself. The JSON body
/// (empty = null) becomes the parked step's result.
async fn callback(
    State(gw): State<Gateway>,
    Path(token): Path<String>,
    body: String,
) -> ApiResult<Json<Value>> {
    let payload: Value = if body.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&body).map_err(|e| {
            Problem::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("body must be JSON: {e}"),
            )
        })?
    };
    forged_ref(std::iter::once(&payload))?;
    let runtime = gw.runtime.as_ref().ok_or_else(not_leader)?;
    match runtime.callback(&token, payload).await {
        Ok((id, step)) => Ok(Json(
            json!({"execution_id": id, "step": step, "status": "resumed"}),
        )),
        Err(mayfly_runtime::RuntimeError::CallbackUnknown) => Err(Problem::new(
            StatusCode::NOT_FOUND,
            "unknown_callback",
            "no step waits for this token",
        )),
        Err(mayfly_runtime::RuntimeError::CallbackUsed) => Err(Problem::new(
            StatusCode::CONFLICT,
            "callback_used",
            "this token was already used or has timed out",
        )),
        Err(e) => Err(Problem::internal(e)),
    }
}

/// Refuse input that spells a cache reference: refs are minted by mayfly only, and a forged
/// one would make a step read whatever blob of the tenant's cache it names.
fn forged_ref<'a>(mut values: impl Iterator<Item = &'a Value>) -> ApiResult<()> {
    if values.any(mayfly_types::CacheRef::any_in) {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "forged_ref",
            "the input contains a cache reference ({\"$ref\": \"sha256:…\", \"format\": …}); only mayfly mints those",
        ));
    }
    Ok(())
}

/// Liveness and dependencies: 200 `ok`, or 503 `degraded` naming what is down (the store,
/// or the command queue in distributed mode). Degraded is not lossy: appends fail without
/// effect and commands are retried until the queue takes them.
/// `GET /healthz`: liveness — the process answers (200 `alive`); restart it only when this
/// fails. What it depends on is readiness (`/readyz`).
async fn health() -> Response {
    Json(json!({"status": "alive"})).into_response()
}

/// `GET /readyz`: readiness — 200 `ready` when the store answers (within the store bound),
/// the queue takes publishes and the control view folds; else 503 `degraded` naming what
/// is down and why. Asked on each call, so it reflects a change at once.
async fn ready(State(gw): State<Gateway>) -> Response {
    let store = gw.store.head().await.err().map(|e| e.to_string());
    let queue_up = gw.runtime.as_ref().is_none_or(RuntimeHandle::queue_up);
    let view = gw.view.failure();
    let ok = store.is_none() && queue_up && view.is_none();
    let body = json!({
        "status": if ok { "ready" } else { "degraded" },
        "store": if store.is_none() { "up" } else { "down" },
        "store_error": store,
        "queue": if queue_up { "up" } else { "down" },
        "view": if view.is_none() { "folding" } else { "failed" },
        "view_failure": view,
        "pending_publishes": gw.runtime.as_ref().map_or(0, |r| r.pending_publishes()),
    });
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

/// Prometheus text exposition (unauthenticated, like `/healthz`: no tenant data in it).
async fn metrics_text(State(gw): State<Gateway>) -> Response {
    match &gw.metrics {
        Some(h) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            h.render(),
        )
            .into_response(),
        None => Problem::not_found("metrics are not enabled").into_response(),
    }
}

/// The OpenAPI 3.1 description of this API.
pub fn openapi() -> Value {
    let problem = json!({"description": "problem+json", "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}});
    let ok = |d: &str| json!({"description": d, "content": {"application/json": {}}});
    json!({
        "openapi": "3.1.0",
        "info": {"title": "mayfly gateway", "version": env!("CARGO_PKG_VERSION")},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Problem": {"type": "object", "required": ["type", "status", "code", "detail"], "properties": {
                "type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"},
                "code": {"type": "string", "enum": ["unauthenticated", "forbidden", "not_found", "invalid_playbook", "invalid_request", "invalid_manifest", "denied", "forged_ref", "payload_too_large", "already_ended", "unknown_callback", "callback_used", "internal"]},
                "detail": {"type": "string"}, "diagnostics": {"type": "array"}}}}
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/playbooks": {
                "post": {"summary": "Register a playbook (YAML body) as the next immutable catalog version", "responses": {"201": ok("registered"), "200": ok("identical content: unchanged"), "400": problem, "401": problem, "403": problem, "413": problem}},
                "get": {"summary": "List the catalog", "responses": {"200": ok("catalog entries"), "401": problem}}
            },
            "/v1/playbooks/{path}": {"get": {"summary": "A catalog version (latest, or ?version=N) with content", "parameters": [{"name": "path", "in": "path", "required": true, "schema": {"type": "string"}}, {"name": "version", "in": "query", "schema": {"type": "integer"}}], "responses": {"200": ok("playbook"), "404": problem}}},
            "/v1/executions": {
                "post": {"summary": "Start an execution: {path, version?, workload?}", "responses": {"201": ok("started"), "400": problem, "404": problem}},
                "get": {"summary": "List the tenant's executions", "responses": {"200": ok("executions")}}
            },
            "/v1/executions/{id}": {"get": {"summary": "Status and result (rebuilt from the verified log)", "responses": {"200": ok("report"), "404": problem}}},
            "/v1/executions/{id}/events": {"get": {"summary": "Events, paged (?from=SEQ&limit=N)", "responses": {"200": ok("events and next"), "404": problem}}},
            "/v1/executions/{id}/stream": {"get": {"summary": "Server-sent events; resumable with Last-Event-ID; ?kinds=step.finished,execution.* sends only those kinds (the stream still ends with the execution)", "parameters": [{"name": "kinds", "in": "query", "schema": {"type": "string"}}], "responses": {"200": {"description": "text/event-stream"}, "400": problem, "404": problem}}},
            "/v1/executions/{id}/cancel": {"post": {"summary": "Cancel a running execution and its children", "responses": {"200": ok("cancelled"), "404": problem, "409": problem}}},
            "/v1/audit": {"get": {"summary": "Audit records of refused requests, most recent first (admin; system admins: every tenant or ?tenant=)", "parameters": [{"name": "limit", "in": "query", "schema": {"type": "integer"}}, {"name": "tenant", "in": "query", "schema": {"type": "string"}}], "responses": {"200": ok("{audit: [...]}"), "403": problem}}},
            "/v1/apply": {"post": {"summary": "Apply desired state: a YAML body of manifests (Tenant, Environment, Policy, WorkerPool, Rollout; or one NoETL playbook), all or nothing; ?file= names the source in messages", "parameters": [{"name": "file", "in": "query", "schema": {"type": "string"}}], "responses": {"200": ok("{results: [{kind, tenant, name, version, generation, outcome, reason, retry_hint?}], accepted_token}"), "400": problem, "403": problem, "409": problem}}},
            "/v1/objects/{kind}": {"get": {"summary": "Objects of a kind visible to the caller, with status", "responses": {"200": ok("{objects: [...]}"), "400": problem}}},
            "/v1/objects/{kind}/{name}": {"get": {"summary": "One object: spec, version, generation, status, revisions", "responses": {"200": ok("object"), "404": problem}}},
            "/v1/history/{kind}/{name}": {"get": {"summary": "Every revision of an object, oldest first (version, before, actor, request id, policy version)", "responses": {"200": ok("{revisions: [...]}"), "404": problem}}},
            "/v1/audit/verify": {"get": {"summary": "Re-read and verify the hash-chained control stream (operator)", "responses": {"200": ok("{ok: true, verified}"), "409": ok("{ok: false, error}"), "403": problem}}},
            "/v1/status": {"get": {"summary": "Restart state (ready | degraded, what is down), role (appender | replica), pending publishes, admission outcomes, control view freshness; also served as /status", "responses": {"200": ok("status")}}},
            "/v1/policy/explain": {"get": {"summary": "How the policies in force judge a catalog playbook (?path=&version=), layer by layer", "responses": {"200": ok("{path, version, tools, aliases, explanation}"), "404": problem}}},
            "/v1/bundles": {
                "post": {"summary": "Freeze every Policy into a bundle signed by the control plane key (system admins); a no-op when unchanged", "responses": {"200": ok("{digest, key_id, policies, created, accepted_token}"), "403": problem}},
                "get": {"summary": "Published bundles (system tenant)", "responses": {"200": ok("{bundles: [...]}"), "403": problem}}
            },
            "/v1/rollouts/{name}": {"get": {"summary": "A rollout's transition (phase, reason, history) and each targeted agent's acknowledged bundle (system tenant)", "responses": {"200": ok("{rollout, transition, agents}"), "404": problem}}},
            "/v1/rollouts/{name}/cancel": {"post": {"summary": "Cancel an in-progress rollout; agents return to the previous bundle (system admins)", "responses": {"200": ok("{rollout, accepted_token}"), "404": problem, "409": problem}}},
            "/v1/control/compact": {"post": {"summary": "Snapshot the control stream and delete the records it summarizes (system admins); views behind it report bootstrap_required until they fold the snapshot", "responses": {"200": ok("{snapshot_seq, compacted, deleted, accepted_token}"), "403": problem}}},
            "/v1/tokens": {"post": {"summary": "Create an API token {tenant?, role, name} (admin)", "responses": {"201": ok("the token, shown once"), "403": problem}}},
            "/healthz": {"get": {"security": [], "summary": "Liveness: the process answers", "responses": {"200": ok("{status: alive}")}}},
            "/readyz": {"get": {"security": [], "summary": "Readiness: store, queue and control view (503 degraded, naming what is down)", "responses": {"200": ok("{status: ready, ...}"), "503": ok("{status: degraded, ...}")}}},
            "/callbacks/{token}": {"post": {"security": [], "summary": "Resume a parked (`wait`) step; the JSON body becomes its result", "responses": {"200": ok("resumed"), "404": problem, "409": problem}}},
            "/metrics": {"get": {"security": [], "summary": "Prometheus metrics", "responses": {"200": {"description": "text/plain exposition"}}}},
            "/openapi.json": {"get": {"security": [], "summary": "This document", "responses": {"200": ok("OpenAPI")}}}
        }
    })
}

/// What `mayfly server` prints on stderr as it starts, written and read in one place (the
/// binary prints it; the benchmark and tests that spawn servers read it back).
pub mod banner {
    /// The bootstrap admin token line (first start only).
    pub fn token_line(token: &str) -> String {
        format!(
            "admin token (shown once; tenant `{}`): {token}",
            super::SYSTEM_TENANT
        )
    }

    /// The readiness line: the gateway's URL and a description of its setup.
    pub fn ready_line(addr: std::net::SocketAddr, setup: &str) -> String {
        format!("mayfly gateway on http://{addr} ({setup})")
    }

    /// A server's banner, read line by line.
    #[derive(Debug, Default)]
    pub struct Banner {
        /// The admin token, if this start minted one.
        pub token: Option<String>,
        /// The gateway's base URL, once the server is ready.
        pub url: Option<String>,
        /// The command queue's JetStream stream (distributed mode).
        pub stream: Option<String>,
    }

    impl Banner {
        /// Take in one stderr line; true once the server is ready (its URL is known).
        pub fn feed(&mut self, line: &str) -> bool {
            if line.starts_with("admin token") {
                self.token = line.rsplit(' ').next().map(str::to_owned);
            } else if line.starts_with("mayfly gateway on ") {
                self.url = line
                    .split_whitespace()
                    .find(|w| w.starts_with("http://"))
                    .map(str::to_owned);
                let mut words = line.split_whitespace();
                while let Some(w) = words.next() {
                    if w == "stream" {
                        self.stream = words
                            .next()
                            .map(|s| s.trim_end_matches([',', ')']).to_owned());
                    }
                }
            }
            self.url.is_some()
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn what_is_printed_reads_back() {
            let mut b = Banner::default();
            assert!(!b.feed(&token_line("mf_abc")));
            assert!(!b.feed("some log line"));
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 8080));
            assert!(b.feed(&ready_line(addr, "db x.db, in-process workers")));
            assert_eq!(b.token.as_deref(), Some("mf_abc"));
            assert_eq!(b.url.as_deref(), Some("http://127.0.0.1:8080"));
            assert_eq!(b.stream, None);
            let mut d = Banner::default();
            assert!(d.feed(&ready_line(
                addr,
                "db x, queue nats://h:4222, stream mayfly_0a1b, log 0a1b"
            )));
            assert_eq!(d.stream.as_deref(), Some("mayfly_0a1b"));
        }
    }
}
