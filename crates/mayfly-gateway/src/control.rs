//! Control-plane endpoints: apply desired state, read objects (with status) and their
//! history, verify the audit chain. The gateway only authenticates and translates; the
//! decisions and the record are `mayfly-control`'s.

use crate::{ApiResult, Caller, Gateway, Problem, Role, not_leader};
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use mayfly_control::{
    Admission, AdmissionDecision, AdmissionRequest, Class, ControlState, Kind, Outcome, ReadRequest,
};
use serde::Deserialize;
use serde_json::{Value, json};
use std::time::Duration;

impl Caller {
    /// The control stream holds every tenant's record: reading it whole (audit, bundles,
    /// rollouts) is for operators of the system tenant.
    fn require_system(&self) -> ApiResult<()> {
        self.require(Role::Operator)?;
        if self.tenant != mayfly_control::SYSTEM_TENANT {
            return Err(self.deny(
                StatusCode::FORBIDDEN,
                "forbidden",
                "forbidden",
                "this reads every tenant's control record: it is for the system tenant".into(),
            ));
        }
        Ok(())
    }

    pub(crate) fn control(&self) -> mayfly_control::Caller {
        mayfly_control::Caller {
            tenant: self.tenant.clone(),
            role: match self.role {
                Role::Viewer => mayfly_control::Role::Viewer,
                Role::Operator => mayfly_control::Role::Operator,
                Role::Author => mayfly_control::Role::Author,
                Role::Admin => mayfly_control::Role::Admin,
            },
            actor: self.actor.clone(),
            request_id: self.request_id.clone(),
        }
    }
}

#[derive(Deserialize)]
pub(crate) struct ApplyQuery {
    /// The file name the body came from (used in messages).
    file: Option<String>,
}

/// `POST /v1/apply`: a YAML body of one or more manifests. All or nothing: any refusal is
/// recorded and nothing is changed (403); else 200 with one result per object.
pub(crate) async fn apply(
    State(gw): State<Gateway>,
    axum::Extension(c): axum::Extension<Caller>,
    Query(q): Query<ApplyQuery>,
    body: String,
) -> ApiResult<Response> {
    c.require(Role::Author)?;
    let file = q.file.unwrap_or_else(|| "request".into());
    let manifests = mayfly_control::parse_manifests(&file, &body).map_err(|e| {
        let mut p = Problem::new(StatusCode::BAD_REQUEST, "invalid_manifest", e.to_string());
        p.extra.insert(
            "diagnostics".into(),
            Value::Array(e.diagnostics.into_iter().map(Value::String).collect()),
        );
        p
    })?;
    if manifests.is_empty() {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid_manifest",
            format!("{file}: no manifest in the body"),
        ));
    }
    let Some(control) = &gw.control else {
        return Err(not_leader());
    };
    let report = control
        .apply(&c.control(), &manifests)
        .await
        .map_err(|e| match e {
            mayfly_control::ControlError::Store(e) => Problem::store(e),
            e => Problem::internal(e),
        })?;
    gw.view.poke();
    if report.denied() {
        let reasons: Vec<String> = report
            .results
            .iter()
            .filter(|r| r.outcome == Outcome::Denied)
            .map(|r| format!("{} `{}`: {}", r.kind, r.name, r.reason))
            .collect();
        // A refusal that time resolves (a transition holds the scope) is a conflict with a
        // retry hint, not a permission problem.
        let hint = report.results.iter().find_map(|r| r.retry_hint.clone());
        let (status, code) = if hint.is_some() {
            (StatusCode::CONFLICT, "conflicted")
        } else {
            (StatusCode::FORBIDDEN, "denied")
        };
        let mut p = c.deny(status, code, "denied", reasons.join("; "));
        p.extra.insert("results".into(), json!(report.results));
        if let Some(h) = hint {
            p.extra.insert("retry_hint".into(), json!(h));
        }
        return Err(p);
    }
    let mut body = json!(report);
    if let Value::Object(m) = &mut body {
        // Which log `accepted_token` counts in (clients keep their floor per log).
        m.insert("log_id".into(), json!(gw.view.log_id().await));
    }
    Ok(Json(body).into_response())
}

fn kind(s: &str) -> ApiResult<Kind> {
    Kind::parse(s).ok_or_else(|| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!(
                "unknown kind `{s}` (Tenant, Environment, Policy, Playbook, WorkerPool, Rollout)"
            ),
        )
    })
}

/// Freshness requirements of a read, as query parameters.
#[derive(Deserialize)]
pub(crate) struct Fresh {
    /// strong | bounded | best_effort (default best_effort, echoed as `serving_class`).
    consistency: Option<String>,
    max_lag: Option<u64>,
    max_staleness_ms: Option<u64>,
    min_token: Option<u64>,
    deadline_ms: Option<u64>,
    /// Which tenant's object, when the caller sees several (system callers).
    tenant: Option<String>,
}

impl Fresh {
    fn request(&self) -> ApiResult<ReadRequest> {
        let class = match self.consistency.as_deref() {
            None => Class::BestEffort,
            Some(c) => Class::parse(c).ok_or_else(|| {
                Problem::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    format!("unknown consistency `{c}` (strong, bounded, best_effort)"),
                )
            })?,
        };
        if class == Class::Bounded && self.max_lag.is_none() && self.max_staleness_ms.is_none() {
            return Err(Problem::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "a bounded read needs max_lag and/or max_staleness_ms",
            ));
        }
        Ok(ReadRequest {
            class,
            max_lag: self.max_lag,
            max_staleness_ms: self.max_staleness_ms,
            min_token: self.min_token,
            deadline: self
                .deadline_ms
                .map(|ms| Duration::from_millis(ms.min(30_000))),
        })
    }
}

/// Serve `f` from the view under the request's class: the body gets a `freshness` field
/// and the answer `x-mayfly-*` headers; a read that cannot be served under its class is
/// rejected (503) with a stable code — never answered under a weaker one. While the control
/// plane is degraded (root lagging or unavailable) the `read` class's degradation rule
/// decides: fail open — served, flagged `fail_open` and recorded in the audit for review —
/// or, where a policy closes it, refused (`control_degraded`).
async fn fresh_read(
    gw: &Gateway,
    c: &Caller,
    q: &Fresh,
    f: impl FnOnce(&ControlState) -> ApiResult<Value>,
) -> ApiResult<Response> {
    let req = q.request()?;
    let tenant = c.tenant.clone();
    let now = mayfly_types::now_ms();
    let read = |st: &ControlState| {
        (
            f(st),
            st.degradation(&tenant, mayfly_control::ActionClass::Read, now),
        )
    };
    match gw.view.read(&req, read).await {
        Ok(((body, rule), freshness)) => {
            let degraded = matches!(
                freshness.degraded_mode,
                mayfly_control::Degraded::RootLagging | mayfly_control::Degraded::RootUnavailable
            );
            let mode = json!(freshness.degraded_mode);
            let mode = mode.as_str().unwrap_or("degraded");
            if degraded && !rule.fail_open {
                let mut p = c.deny(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "control_degraded",
                    "fail_closed",
                    format!("the control plane is degraded ({mode}): {}", rule.reason),
                );
                p.extra.insert("freshness".into(), json!(freshness));
                return Err(p);
            }
            if degraded {
                c.mark(
                    "fail_open",
                    format!(
                        "read served while the control plane is degraded ({mode}) at token {} (lag {}): {}",
                        freshness.served_token, freshness.lag, rule.reason
                    ),
                );
            }
            let mut body = match body {
                Ok(b) => b,
                Err(mut p) => {
                    // A 404 is an answer too: say how fresh the view that gave it was.
                    p.extra.insert("freshness".into(), json!(freshness));
                    return Err(p);
                }
            };
            if let Value::Object(m) = &mut body {
                m.insert("freshness".into(), json!(freshness));
                if degraded {
                    m.insert(
                        "fail_open".into(),
                        json!({"class": "read", "degraded_mode": mode, "reason": rule.reason, "recorded": true}),
                    );
                }
            }
            let mut resp = Json(body).into_response();
            let h = resp.headers_mut();
            if degraded {
                h.insert("x-mayfly-fail-open", HeaderValue::from_static("read"));
            }
            for (name, v) in [
                ("x-mayfly-served-token", freshness.served_token.to_string()),
                (
                    "x-mayfly-current-token",
                    freshness.current_token.to_string(),
                ),
                ("x-mayfly-lag", freshness.lag.to_string()),
                (
                    "x-mayfly-serving-class",
                    freshness.serving_class.as_str().to_owned(),
                ),
            ] {
                if let Ok(v) = HeaderValue::from_str(&v) {
                    h.insert(name, v);
                }
            }
            Ok(resp)
        }
        Err(r) => {
            let status = match r {
                // The caller's own deadline: not the node's state.
                mayfly_control::Rejection::DeadlineExceeded(_) => StatusCode::GATEWAY_TIMEOUT,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            let mut p = Problem::new(status, r.code(), r.to_string());
            p.extra.insert("reason".into(), json!(r.code()));
            p.extra.insert("serving_class".into(), json!(req.class));
            // A client whose floor was set on another log learns it here and starts over
            // (when this view knows it: a rejection never waits on the store).
            p.extra
                .insert("log_id".into(), json!(gw.view.known_log_id()));
            Err(p)
        }
    }
}

/// `GET /v1/objects/{kind}`: the objects of a kind visible to the caller, with status.
pub(crate) async fn list(
    State(gw): State<Gateway>,
    axum::Extension(c): axum::Extension<Caller>,
    Path(k): Path<String>,
    Query(q): Query<Fresh>,
) -> ApiResult<Response> {
    let k = kind(&k)?;
    let who = c.control();
    fresh_read(&gw, &c, &q, |st| {
        Ok(json!({"objects": st.objects_of(&who, k, None)}))
    })
    .await
}

/// `GET /v1/objects/{kind}/{name}`: one object with status (404 when not visible).
pub(crate) async fn describe(
    State(gw): State<Gateway>,
    axum::Extension(c): axum::Extension<Caller>,
    Path((k, name)): Path<(String, String)>,
    Query(q): Query<Fresh>,
) -> ApiResult<Response> {
    let k = kind(&k)?;
    let who = c.control();
    let tenant = q.tenant.clone();
    fresh_read(&gw, &c, &q, |st| {
        st.object_of(&who, k, &name, tenant.as_deref())
            .map(|o| json!(o))
            .ok_or_else(|| Problem::not_found(format!("no {k} `{name}`")))
    })
    .await
}

/// `GET /v1/history/{kind}/{name}`: every revision, oldest first.
pub(crate) async fn history(
    State(gw): State<Gateway>,
    axum::Extension(c): axum::Extension<Caller>,
    Path((k, name)): Path<(String, String)>,
    Query(q): Query<Fresh>,
) -> ApiResult<Response> {
    let k = kind(&k)?;
    let who = c.control();
    let tenant = q.tenant.clone();
    fresh_read(&gw, &c, &q, |st| {
        st.object_of(&who, k, &name, tenant.as_deref())
            .map(|o| json!({"kind": k, "name": name, "tenant": o.object.key.tenant, "revisions": o.object.revisions}))
            .ok_or_else(|| Problem::not_found(format!("no {k} `{name}`")))
    })
    .await
}

/// `GET /v1/audit/verify`: re-read and verify the control stream (operator). A read: the
/// appender also checks the stored stream ends where it appended; a replica verifies the
/// stored chain on its own.
pub(crate) async fn verify(
    State(gw): State<Gateway>,
    axum::Extension(c): axum::Extension<Caller>,
) -> ApiResult<Response> {
    c.require_system()?;
    let verified = match &gw.control {
        Some(control) => control.verify().await,
        None => mayfly_control::verify_stored(gw.store.as_ref()).await,
    };
    match verified {
        Ok(v) => Ok(Json(json!({"ok": true, "verified": v})).into_response()),
        Err(mayfly_control::ControlError::Store(e)) => Err(Problem::store(e)),
        Err(e) => Ok((
            StatusCode::CONFLICT,
            Json(json!({"ok": false, "error": e.to_string()})),
        )
            .into_response()),
    }
}

/// Admission outcomes since this process started, by decision.
#[derive(Default)]
pub struct Admissions(std::sync::Mutex<std::collections::BTreeMap<&'static str, u64>>);

impl Admissions {
    pub(crate) fn count(&self, d: AdmissionDecision) {
        metrics::counter!("mayfly_admissions_total", "decision" => d.as_str()).increment(1);
        if let Ok(mut m) = self.0.lock() {
            *m.entry(d.as_str()).or_default() += 1;
        }
    }
    fn snapshot(&self) -> Value {
        self.0.lock().map(|m| json!(*m)).unwrap_or(Value::Null)
    }
}

/// A default-class read that includes at least this node's own last control write (an
/// apply just before a start or an explain counts).
fn own_writes(gw: &Gateway) -> ReadRequest {
    ReadRequest {
        min_token: gw
            .control
            .as_ref()
            .map(|c| c.last_token())
            .filter(|t| *t > 0),
        ..Default::default()
    }
}

/// What `c` asks to run when it starts `pb` now (load fields left at zero).
fn asking(c: &Caller, pb: &mayfly_dsl::Playbook) -> AdmissionRequest {
    let reach = pb.reach();
    AdmissionRequest {
        tenant: c.tenant.clone(),
        playbook: pb.path.clone(),
        now_ms: mayfly_types::now_ms(),
        tools: reach.tools,
        aliases: reach.aliases,
        templated_auth: reach.templated_auth,
        ..Default::default()
    }
}

/// Most blocks waiting for dispatch before new executions are refused (`queue_saturated`).
pub const MAX_PENDING_PUBLISHES: u64 = 100_000;

/// Admission of a new execution: policies in force for the caller's tenant (tool kinds and
/// keychain aliases), its quota, the dispatch backlog. Decided on this node's view of the
/// control plane, which must include this node's own last control write and be at most 2 s
/// stale — else the start fails closed (it is a privileged action).
pub(crate) async fn admit(
    gw: &Gateway,
    c: &Caller,
    pb: &mayfly_dsl::Playbook,
    runtime: &mayfly_runtime::RuntimeHandle,
) -> ApiResult<Admission> {
    let running = gw
        .store
        .list_executions(Some(&c.tenant), 10_000)
        .await
        .map_err(Problem::store)?
        .iter()
        .filter(|x| matches!(x.status.as_str(), "pending" | "running"))
        .count() as u64;
    let req = AdmissionRequest {
        running,
        pending_publishes: runtime.pending_publishes(),
        max_pending_publishes: MAX_PENDING_PUBLISHES,
        ..asking(c, pb)
    };
    let fresh = ReadRequest {
        class: Class::Bounded,
        max_staleness_ms: Some(2_000),
        deadline: Some(Duration::from_secs(2)),
        ..own_writes(gw)
    };
    let (a, _) = gw
        .view
        .read(&fresh, |st| st.admit(&req))
        .await
        .map_err(|r| {
            let mut p = c.deny(
                StatusCode::SERVICE_UNAVAILABLE,
                r.code(),
                "admission_unavailable",
                format!("admission fails closed (`execute` is a privileged action class): the control plane view is not fresh enough ({r})"),
            );
            p.extra.insert("reason".into(), json!(r.code()));
            p.extra.insert("action_class".into(), json!("execute"));
            p
        })?;
    gw.admissions.count(a.decision);
    let (status, code) = match a.decision {
        AdmissionDecision::Accepted => return Ok(a),
        AdmissionDecision::PolicyDenied => (StatusCode::FORBIDDEN, "policy_denied"),
        AdmissionDecision::TenantQuota => (StatusCode::TOO_MANY_REQUESTS, "tenant_quota"),
        AdmissionDecision::QueueSaturated => (StatusCode::SERVICE_UNAVAILABLE, "queue_saturated"),
        AdmissionDecision::NotLeader => (StatusCode::SERVICE_UNAVAILABLE, "not_leader"),
        AdmissionDecision::EpochMismatch => (StatusCode::SERVICE_UNAVAILABLE, "epoch_mismatch"),
    };
    let mut p = c.deny(status, code, code, a.reason.clone());
    p.extra.insert("admission".into(), json!(a));
    Err(p)
}

/// `GET /v1/status`: this node's role and restart state (ready, or degraded naming what is
/// down), pending publishes, admission outcomes, and its control view's freshness.
pub(crate) async fn status(
    State(gw): State<Gateway>,
    axum::Extension(_c): axum::Extension<Caller>,
) -> ApiResult<Json<Value>> {
    let store_up = gw.store.head().await.is_ok();
    let queue_up = gw
        .runtime
        .as_ref()
        .is_none_or(mayfly_runtime::RuntimeHandle::queue_up);
    let (_, freshness) = gw
        .view
        .read(&ReadRequest::default(), |_| ())
        .await
        .map_err(|r| Problem::new(StatusCode::SERVICE_UNAVAILABLE, r.code(), r.to_string()))?;
    let view_failed = gw.view.failure().is_some();
    let degraded: Vec<&str> = [
        (!store_up, "store"),
        (!queue_up, "queue"),
        (view_failed, "view"),
    ]
    .into_iter()
    .filter_map(|(down, what)| down.then_some(what))
    .collect();
    Ok(Json(json!({
        "state": if degraded.is_empty() { "ready" } else { "degraded" },
        "down": degraded,
        "role": if gw.runtime.is_some() { "appender" } else { "replica" },
        "pending_publishes": gw.runtime.as_ref().map_or(0, |r| r.pending_publishes()),
        "admissions": gw.admissions.snapshot(),
        "control_view": freshness,
        "control_view_failure": gw.view.failure(),
        // Distributed mode: the command channel (log identity, stream, refused messages).
        "channel": gw.runtime.as_ref().and_then(mayfly_runtime::RuntimeHandle::channel),
    })))
}

/// The catalog version the desired state names for playbook `path` of the caller's tenant
/// (None: no Playbook object; the catalog's latest applies).
pub(crate) async fn desired_playbook_version(gw: &Gateway, c: &Caller, path: &str) -> Option<u32> {
    let who = c.control();
    let tenant = c.tenant.clone();
    let fresh = own_writes(gw);
    gw.view
        .read(&fresh, |st| {
            st.objects
                .get(&mayfly_control::ObjectKey {
                    kind: Kind::Playbook,
                    tenant: Some(tenant),
                    name: path.to_owned(),
                })
                .filter(|o| mayfly_control::visible(&who, &o.key))
                .and_then(|o| o.catalog_version)
        })
        .await
        .ok()
        .and_then(|(v, _)| v)
}

/// `?path=P[&version=N]`: a catalog playbook, at a version or the current one.
#[derive(Deserialize)]
pub(crate) struct PlaybookQuery {
    pub(crate) path: String,
    pub(crate) version: Option<u32>,
}

/// `GET /v1/policy/explain?path=P[&version=N]`: how the policies in force for the caller's
/// tenant judge that catalog playbook, layer by layer, and which one decides.
pub(crate) async fn explain(
    State(gw): State<Gateway>,
    axum::Extension(c): axum::Extension<Caller>,
    Query(q): Query<PlaybookQuery>,
) -> ApiResult<Json<Value>> {
    let version = match q.version {
        Some(v) => Some(v),
        None => desired_playbook_version(&gw, &c, &q.path).await,
    };
    let (entry, stored) = gw
        .store
        .resolve(&c.tenant, &q.path, version)
        .await
        .map_err(Problem::store)?
        .ok_or_else(|| Problem::not_found(format!("no playbook `{}` in the catalog", q.path)))?;
    let pb = mayfly_dsl::parse(
        &format!("{}@{}", entry.path, entry.version),
        &stored.content,
        &mayfly_dsl::ParseOptions::default(),
    )
    .map_err(|e| Problem::new(StatusCode::BAD_REQUEST, "invalid_playbook", e.to_string()))?;
    let req = asking(&c, &pb);
    let fresh = own_writes(&gw);
    let (ex, freshness) = gw
        .view
        .read(&fresh, |st| st.explain(&req))
        .await
        .map_err(|r| Problem::new(StatusCode::SERVICE_UNAVAILABLE, r.code(), r.to_string()))?;
    Ok(Json(json!({
        "path": entry.path,
        "version": entry.version,
        "tools": req.tools,
        "aliases": req.aliases,
        "explanation": ex,
        "freshness": freshness,
    })))
}

fn control_error(c: &Caller, e: mayfly_control::ControlError) -> Problem {
    use mayfly_control::ControlError as E;
    match e {
        E::Forbidden(m) => c.deny(StatusCode::FORBIDDEN, "forbidden", "denied", m),
        E::NotFound(m) => Problem::not_found(m),
        E::Invalid(m) => Problem::new(StatusCode::CONFLICT, "invalid_state", m),
        E::Store(e) => Problem::store(e),
        e => Problem::internal(e),
    }
}

/// Run a control-plane write on the appending node (`not_leader` elsewhere), answer its
/// report, and let this node's view pick the write up at once.
async fn leader_write<T, F, Fut>(gw: &Gateway, c: &Caller, write: F) -> ApiResult<Response>
where
    T: serde::Serialize,
    F: FnOnce(std::sync::Arc<mayfly_control::Control>, mayfly_control::Caller) -> Fut,
    Fut: std::future::Future<Output = Result<T, mayfly_control::ControlError>>,
{
    let control = gw.control.clone().ok_or_else(not_leader)?;
    let r = write(control, c.control())
        .await
        .map_err(|e| control_error(c, e))?;
    gw.view.poke();
    Ok(Json(r).into_response())
}

/// `POST /v1/bundles`: freeze the policies into a signed bundle (system admins).
pub(crate) async fn publish_bundle(
    State(gw): State<Gateway>,
    axum::Extension(c): axum::Extension<Caller>,
) -> ApiResult<Response> {
    leader_write(&gw, &c, |control, who| async move {
        control.publish_bundle(&who).await
    })
    .await
}

/// `GET /v1/bundles`: published bundles (digest, signing key, policies) — system tenant.
pub(crate) async fn list_bundles(
    State(gw): State<Gateway>,
    axum::Extension(c): axum::Extension<Caller>,
) -> ApiResult<Response> {
    c.require_system()?;
    let Some(control) = &gw.control else {
        return Err(not_leader());
    };
    let bundles = control.bundles().await;
    Ok(Json(json!({ "bundles": bundles })).into_response())
}

/// `GET /v1/rollouts/{name}`: the rollout's transition and every targeted agent's
/// acknowledged bundle (served by the node that runs the controller).
pub(crate) async fn rollout_status(
    State(gw): State<Gateway>,
    axum::Extension(c): axum::Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    c.require_system()?;
    let Some(control) = &gw.control else {
        return Err(not_leader());
    };
    let r = control
        .rollout_status(&name)
        .await
        .map_err(|e| control_error(&c, e))?;
    Ok(Json(r).into_response())
}

/// `POST /v1/rollouts/{name}/cancel`: stop an in-progress rollout; agents return to the
/// bundle in force before it.
pub(crate) async fn cancel_rollout(
    State(gw): State<Gateway>,
    axum::Extension(c): axum::Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    leader_write(&gw, &c, |control, who| async move {
        let token = control.cancel_rollout(&who, &name).await?;
        Ok(json!({ "rollout": name, "accepted_token": token }))
    })
    .await
}

/// `POST /v1/control/compact`: snapshot the control stream and delete the records the
/// snapshot summarizes (system admins). Views behind it bootstrap from the snapshot.
pub(crate) async fn compact(
    State(gw): State<Gateway>,
    axum::Extension(c): axum::Extension<Caller>,
) -> ApiResult<Response> {
    leader_write(&gw, &c, |control, who| async move {
        control.compact(&who).await
    })
    .await
}
