//! Control-plane endpoints: apply desired state, read objects (with status) and their
//! history, verify the audit chain. The gateway only authenticates and translates; the
//! decisions and the record are `mayfly-control`'s.

use crate::{ApiResult, Caller, Gateway, Problem, Role};
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use mayfly_control::{Kind, Outcome};
use serde::Deserialize;
use serde_json::{Value, json};

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
    let report = gw
        .control
        .apply(&c.control(), &manifests)
        .await
        .map_err(Problem::internal)?;
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

/// `GET /v1/objects/{kind}`: the objects of a kind visible to the caller, with status.
pub(crate) async fn list(
    State(gw): State<Gateway>,
    axum::Extension(c): axum::Extension<Caller>,
    Path(k): Path<String>,
) -> ApiResult<Json<Value>> {
    let objects = gw.control.get(&c.control(), kind(&k)?, None).await;
    Ok(Json(json!({"objects": objects})))
}

/// `GET /v1/objects/{kind}/{name}`: one object with status (404 when not visible).
pub(crate) async fn describe(
    State(gw): State<Gateway>,
    axum::Extension(c): axum::Extension<Caller>,
    Path((k, name)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let k = kind(&k)?;
    gw.control
        .get(&c.control(), k, Some(&name))
        .await
        .into_iter()
        .next()
        .map(|o| Json(json!(o)))
        .ok_or_else(|| Problem::not_found(format!("no {k} `{name}`")))
}

/// `GET /v1/history/{kind}/{name}`: every revision, oldest first.
pub(crate) async fn history(
    State(gw): State<Gateway>,
    axum::Extension(c): axum::Extension<Caller>,
    Path((k, name)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let k = kind(&k)?;
    gw.control
        .history(&c.control(), k, &name)
        .await
        .map(|h| Json(json!({"kind": k, "name": name, "revisions": h})))
        .ok_or_else(|| Problem::not_found(format!("no {k} `{name}`")))
}

/// `GET /v1/audit/verify`: re-read and verify the control stream (operator).
pub(crate) async fn verify(
    State(gw): State<Gateway>,
    axum::Extension(c): axum::Extension<Caller>,
) -> ApiResult<Response> {
    c.require(Role::Operator)?;
    match gw.control.verify().await {
        Ok(v) => Ok(Json(json!({"ok": true, "verified": v})).into_response()),
        Err(mayfly_control::ControlError::Store(e)) => Err(Problem::internal(e)),
        Err(e) => Ok((
            StatusCode::CONFLICT,
            Json(json!({"ok": false, "error": e.to_string()})),
        )
            .into_response()),
    }
}
