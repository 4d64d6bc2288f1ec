//! The actor dataplane on the gateway: provider enrollment, providers and actors (read and
//! operate), and the router — `ANY /actors/{name}/{*path}` resolves the caller's actor,
//! resumes it on demand (scale from zero) and forwards the request at its current epoch.
//! A request pinned to an epoch (`x-mayfly-epoch`) that is no longer current is refused.

use crate::{ApiResult, Caller, Gateway, Problem, Role};
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use mayfly_actor_api::EPOCH_HEADER;
use mayfly_actors::dataplane::{Dataplane, DataplaneError, EnrollRequest};
use serde_json::json;
use std::sync::Arc;

fn dataplane(gw: &Gateway) -> ApiResult<Arc<Dataplane>> {
    gw.dataplane.clone().ok_or_else(|| {
        Problem::new(
            StatusCode::NOT_FOUND,
            "dataplane_disabled",
            "the actor dataplane is not enabled on this node",
        )
    })
}

fn problem(c: &Caller, e: DataplaneError) -> Problem {
    let status = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if status == StatusCode::FORBIDDEN {
        return c.deny(status, "forbidden", "denied", e.to_string());
    }
    Problem::new(status, e.code(), e.to_string())
}

/// `POST /v1/providers/enroll`: sign a provider's CSR and record its identity.
pub(crate) async fn enroll(
    State(gw): State<Gateway>,
    axum::Extension(c): axum::Extension<Caller>,
    body: Bytes,
) -> ApiResult<Response> {
    let dp = dataplane(&gw)?;
    let req: EnrollRequest = serde_json::from_slice(&body)
        .map_err(|e| Problem::new(StatusCode::BAD_REQUEST, "invalid_request", e.to_string()))?;
    let r = dp
        .enroll(&c.control(), req)
        .await
        .map_err(|e| problem(&c, e))?;
    gw.view.poke();
    Ok(Json(r).into_response())
}

/// `POST /v1/modules` `{"module_base64": …}`: store a workload module (e.g. WASM) in the
/// caller's tenant scope of the snapshot store; answers its digest.
pub(crate) async fn put_module(
    State(gw): State<Gateway>,
    axum::Extension(c): axum::Extension<Caller>,
    body: Bytes,
) -> ApiResult<Response> {
    use base64::Engine;
    let dp = dataplane(&gw)?;
    let bad = |m: String| Problem::new(StatusCode::BAD_REQUEST, "invalid_request", m);
    let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| bad(e.to_string()))?;
    let bytes = v
        .get("module_base64")
        .and_then(|b| b.as_str())
        .ok_or_else(|| bad("`module_base64` is required".into()))
        .and_then(|b| {
            base64::engine::general_purpose::STANDARD
                .decode(b)
                .map_err(|e| bad(format!("module_base64: {e}")))
        })?;
    let size = bytes.len();
    let digest = dp
        .put_module(&c.control(), bytes)
        .await
        .map_err(|e| problem(&c, e))?;
    Ok(Json(json!({ "digest": digest, "size": size })).into_response())
}

/// `GET /v1/providers`: providers, workers and their leases (system tenant).
pub(crate) async fn providers(
    State(gw): State<Gateway>,
    axum::Extension(c): axum::Extension<Caller>,
) -> ApiResult<Response> {
    let dp = dataplane(&gw)?;
    let r = dp
        .providers(&c.control())
        .await
        .map_err(|e| problem(&c, e))?;
    Ok(Json(r).into_response())
}

/// `GET /v1/actors`: the caller's actors (phase, epoch, worker, last snapshot).
pub(crate) async fn list(
    State(gw): State<Gateway>,
    axum::Extension(c): axum::Extension<Caller>,
) -> ApiResult<Response> {
    let dp = dataplane(&gw)?;
    let r = dp.actors(&c.control()).await.map_err(|e| problem(&c, e))?;
    Ok(Json(json!({ "actors": r })).into_response())
}

/// `GET /v1/actors/{name}/snapshots`: its signed snapshots, the last good one first.
pub(crate) async fn snapshots(
    State(gw): State<Gateway>,
    axum::Extension(c): axum::Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    let dp = dataplane(&gw)?;
    let r = dp
        .snapshots_of(&c.tenant, &name)
        .await
        .map_err(|e| problem(&c, e))?;
    Ok(Json(json!({ "snapshots": r })).into_response())
}

/// `POST /v1/actors/{name}/move`: checkpoint → new epoch → restore on another worker.
pub(crate) async fn move_actor(
    State(gw): State<Gateway>,
    axum::Extension(c): axum::Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    let dp = dataplane(&gw)?;
    let r = dp
        .move_actor(&c.control(), &c.tenant, &name)
        .await
        .map_err(|e| problem(&c, e))?;
    Ok(Json(json!({ "actor": name, "epoch": r.epoch, "worker": r.worker })).into_response())
}

/// `POST /v1/actors/{name}/reset`: drop its snapshot and start it over (fenced).
pub(crate) async fn reset(
    State(gw): State<Gateway>,
    axum::Extension(c): axum::Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    let dp = dataplane(&gw)?;
    let epoch = dp
        .reset(&c.control(), &name)
        .await
        .map_err(|e| problem(&c, e))?;
    Ok(Json(json!({ "actor": name, "epoch": epoch })).into_response())
}

/// `POST /v1/actors/{name}/suspend`: checkpoint and release its slot now.
pub(crate) async fn suspend(
    State(gw): State<Gateway>,
    axum::Extension(c): axum::Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    c.require(Role::Operator)?;
    let dp = dataplane(&gw)?;
    let r = dp
        .suspend(&c.tenant, &name, "Suspended")
        .await
        .map_err(|e| problem(&c, e))?;
    Ok(Json(json!({ "actor": name, "snapshot": r.map(|s| s.descriptor) })).into_response())
}

/// `ANY /actors/{name}` and `ANY /actors/{name}/{*path}`: the router.
pub(crate) async fn route_root(
    State(gw): State<Gateway>,
    axum::Extension(c): axum::Extension<Caller>,
    Path(name): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    forward(gw, c, name, String::new(), (method, uri, headers), body).await
}

pub(crate) async fn route(
    State(gw): State<Gateway>,
    axum::Extension(c): axum::Extension<Caller>,
    Path((name, path)): Path<(String, String)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    forward(gw, c, name, path, (method, uri, headers), body).await
}

async fn forward(
    gw: Gateway,
    c: Caller,
    name: String,
    path: String,
    (method, uri, headers): (Method, Uri, HeaderMap),
    body: Bytes,
) -> ApiResult<Response> {
    // The path is the actor's: it may never climb out of it (`..` after decoding).
    if !mayfly_actors::http::clean_data_path(&path) {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "the actor path has `.`, `..` or empty segments",
        ));
    }
    let forwarded: Vec<(String, String)> = headers
        .iter()
        // None that authenticate to mayfly, route, or frame the hop.
        .filter(|(k, _)| {
            let k = k.as_str();
            !mayfly_actors::http::DROP.contains(&k) && k != "cookie" && !k.starts_with("x-mayfly-")
        })
        .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
        .collect();
    let reads = matches!(method, Method::GET | Method::HEAD);
    c.require(if reads { Role::Viewer } else { Role::Operator })?;
    let dp = dataplane(&gw)?;
    let pinned = match headers.get(EPOCH_HEADER) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| {
                    Problem::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_request",
                        "bad epoch header",
                    )
                })?,
        ),
    };
    let m = reqwest::Method::from_bytes(method.as_str().as_bytes())
        .map_err(|_| Problem::new(StatusCode::BAD_REQUEST, "invalid_request", "method"))?;
    let (answer, epoch) = dp
        .route(
            &c.tenant,
            &name,
            pinned,
            m,
            &path,
            uri.query(),
            &forwarded,
            body.to_vec(),
        )
        .await
        .map_err(|e| problem(&c, e))?;
    let mut resp = Response::builder()
        .status(StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_GATEWAY))
        .header(EPOCH_HEADER, epoch.to_string());
    if let Some(ct) = &answer.content_type {
        resp = resp.header("content-type", ct);
    }
    resp.body(axum::body::Body::from(answer.body))
        .map_err(|e| Problem::new(StatusCode::BAD_GATEWAY, "internal", e.to_string()))
}

/// `POST /actor-credentials` with `authorization: Actor <identity token>`: the credential
/// broker. Answers the actor's template secrets while the token's epoch is current;
/// `stale_epoch` (409) for an earlier epoch, `unauthenticated` for anything else.
pub(crate) async fn credentials(State(gw): State<Gateway>, headers: HeaderMap) -> Response {
    let Ok(dp) = dataplane(&gw) else {
        return Problem::new(
            StatusCode::NOT_FOUND,
            "dataplane_disabled",
            "no actor dataplane",
        )
        .into_response();
    };
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Actor "))
        .map(str::trim);
    let Some(token) = token else {
        return Problem::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "send `authorization: Actor <identity token>`",
        )
        .into_response();
    };
    match dp.credentials(token).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => {
            let status =
                StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            Problem::new(status, e.code(), e.to_string()).into_response()
        }
    }
}
