//! Control-plane endpoints: apply desired state, read objects (with status) and their
//! history, verify the audit chain. The gateway only authenticates and translates; the
//! decisions and the record are `mayfly-control`'s.

use crate::{ApiResult, Caller, Gateway, Problem, Role, not_leader};
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use mayfly_control::{Class, ControlState, Kind, Outcome, ReadRequest};
use serde::Deserialize;
use serde_json::{Value, json};
use std::time::Duration;

impl Caller {
    fn control(&self) -> mayfly_control::Caller {
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
        .map_err(Problem::internal)?;
    gw.view.poke();
    if report.denied() {
        let reasons: Vec<String> = report
            .results
            .iter()
            .filter(|r| r.outcome == Outcome::Denied)
            .map(|r| format!("{} `{}`: {}", r.kind, r.name, r.reason))
            .collect();
        let mut p = c.deny(
            StatusCode::FORBIDDEN,
            "denied",
            "denied",
            reasons.join("; "),
        );
        p.extra.insert("results".into(), json!(report.results));
        return Err(p);
    }
    Ok(Json(json!(report)).into_response())
}

fn kind(s: &str) -> ApiResult<Kind> {
    Kind::parse(s).ok_or_else(|| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("unknown kind `{s}` (Tenant, Environment, Policy, Playbook, WorkerPool)"),
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
/// rejected (503) with a stable code — never answered under a weaker one.
async fn fresh_read(
    gw: &Gateway,
    q: &Fresh,
    f: impl FnOnce(&ControlState) -> ApiResult<Value>,
) -> ApiResult<Response> {
    let req = q.request()?;
    match gw.view.read(&req, f).await {
        Ok((body, freshness)) => {
            let mut body = body?;
            if let Value::Object(m) = &mut body {
                m.insert("freshness".into(), json!(freshness));
            }
            let mut resp = Json(body).into_response();
            let h = resp.headers_mut();
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
            let mut p = Problem::new(StatusCode::SERVICE_UNAVAILABLE, r.code(), r.to_string());
            p.extra.insert("reason".into(), json!(r.code()));
            p.extra.insert("serving_class".into(), json!(req.class));
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
    fresh_read(&gw, &q, |st| {
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
    fresh_read(&gw, &q, |st| {
        st.objects_of(&who, k, Some(&name))
            .into_iter()
            .next()
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
    fresh_read(&gw, &q, |st| {
        st.history_of(&who, k, &name)
            .map(|h| json!({"kind": k, "name": name, "revisions": h}))
            .ok_or_else(|| Problem::not_found(format!("no {k} `{name}`")))
    })
    .await
}

/// `GET /v1/audit/verify`: re-read and verify the control stream (operator).
pub(crate) async fn verify(
    State(gw): State<Gateway>,
    axum::Extension(c): axum::Extension<Caller>,
) -> ApiResult<Response> {
    c.require(Role::Operator)?;
    let Some(control) = &gw.control else {
        return Err(not_leader());
    };
    match control.verify().await {
        Ok(v) => Ok(Json(json!({"ok": true, "verified": v})).into_response()),
        Err(mayfly_control::ControlError::Store(e)) => Err(Problem::internal(e)),
        Err(e) => Ok((
            StatusCode::CONFLICT,
            Json(json!({"ok": false, "error": e.to_string()})),
        )
            .into_response()),
    }
}
