//! The provider HTTP API (JSON). Transport security (mTLS with certificates issued by the
//! control plane's CA) wraps this router; see `mayfly-pki`.
//!
//! * `GET  /v1/provider` — identity, incarnation, contract, capabilities, capacity
//! * `POST /v1/ops[?wait_ms=N]` — submit an op; answers its status once it is terminal
//!   (200) or after `wait_ms` (202, still running). Synchronous refusals are
//!   problem+json with the refusal code.
//! * `GET  /v1/ops/{op_id}[?wait_ms=N]` — the durable status (survives reconnects)
//! * `GET  /v1/actors/{tenant}/{actor}` — where an actor runs and its epoch
//! * `ANY  /v1/actors/{tenant}/{actor}/http/{*path}` — the data path; `x-mayfly-epoch` must
//!   be the actor's current epoch; `.`/`..` segments are refused

use crate::{DataRequest, Provider, ProviderError};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use mayfly_actor_api::{EPOCH_HEADER, OpRequest, OpState, Refusal, RefusalCode, problem};
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;

/// Largest data-path body the provider buffers.
pub const DATA_BODY_LIMIT: usize = 8 << 20;

/// The provider API over `provider`.
pub fn router(provider: Arc<Provider>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/v1/provider", get(info))
        .route("/v1/ops", post(submit))
        .route("/v1/ops/{op_id}", get(status))
        .route("/v1/actors/{tenant}/{actor}", get(actor))
        .route("/v1/actors/{tenant}/{actor}/http", any(data_root))
        .route("/v1/actors/{tenant}/{actor}/http/", any(data_root))
        .route("/v1/actors/{tenant}/{actor}/http/{*rest}", any(data))
        .layer(DefaultBodyLimit::max(DATA_BODY_LIMIT))
        .with_state(provider)
}

#[derive(Deserialize)]
struct Wait {
    wait_ms: Option<u64>,
}

impl Wait {
    fn duration(&self) -> Duration {
        Duration::from_millis(self.wait_ms.unwrap_or(30_000).min(120_000))
    }
}

fn refused(r: &Refusal) -> Response {
    let status = StatusCode::from_u16(r.code.http_status()).unwrap_or(StatusCode::BAD_REQUEST);
    (
        status,
        [("content-type", "application/problem+json")],
        problem(r).to_string(),
    )
        .into_response()
}

fn error(e: ProviderError) -> Response {
    match e {
        ProviderError::Refused(r) => refused(&r),
        ProviderError::Journal(j) => {
            tracing::error!(error = %j, "provider journal");
            refused(&Refusal::new(
                RefusalCode::SandboxFailed,
                "op journal unavailable",
            ))
        }
    }
}

async fn info(State(p): State<Arc<Provider>>) -> Response {
    axum::Json(p.info().await).into_response()
}

async fn submit(State(p): State<Arc<Provider>>, Query(w): Query<Wait>, body: Bytes) -> Response {
    let req: OpRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return refused(&Refusal::invalid(format!("op does not parse: {e}"))),
    };
    let op_id = match p.submit(req).await {
        Ok(id) => id,
        Err(e) => return error(e),
    };
    answer(&p, &op_id, w.duration()).await
}

async fn answer(p: &Provider, op_id: &str, wait: Duration) -> Response {
    match p.status(op_id, wait).await {
        Ok(Some(st)) => {
            let code = if st.state == OpState::Running {
                StatusCode::ACCEPTED
            } else {
                StatusCode::OK
            };
            (code, axum::Json(st)).into_response()
        }
        Ok(None) => refused(&Refusal::new(
            RefusalCode::UnknownActor,
            format!("no op `{op_id}` on this provider"),
        )),
        Err(e) => error(e),
    }
}

async fn status(
    State(p): State<Arc<Provider>>,
    Path(op_id): Path<String>,
    Query(w): Query<Wait>,
) -> Response {
    answer(&p, &op_id, w.duration()).await
}

async fn actor(
    State(p): State<Arc<Provider>>,
    Path((tenant, actor)): Path<(String, String)>,
) -> Response {
    match p.actor(&tenant, &actor).await {
        Ok(Some(a)) => axum::Json(a).into_response(),
        Ok(None) => refused(&Refusal::new(RefusalCode::UnknownActor, "unknown actor")),
        Err(e) => error(e),
    }
}

async fn data_root(
    State(p): State<Arc<Provider>>,
    Path((tenant, actor)): Path<(String, String)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    forward(
        p,
        (tenant, actor),
        String::new(),
        method,
        uri,
        headers,
        body,
    )
    .await
}

async fn data(
    State(p): State<Arc<Provider>>,
    Path((tenant, actor, rest)): Path<(String, String, String)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    forward(p, (tenant, actor), rest, method, uri, headers, body).await
}

/// A data-path path is plain segments: no `.`, `..` or empty segment (after decoding), so
/// a request can never climb out of the actor it names.
pub fn clean_data_path(path: &str) -> bool {
    let path = path.trim_start_matches('/');
    path.is_empty()
        || path
            .trim_end_matches('/')
            .split('/')
            .all(|seg| !seg.is_empty() && seg != "." && seg != ".." && !seg.contains('\\'))
}

/// Hop-by-hop, routing and mayfly-credential headers never cross to the actor (the gateway's
/// router drops the same, plus cookies).
pub const DROP: &[&str] = &[
    "host",
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-authorization",
    "authorization",
    "content-length",
    EPOCH_HEADER,
];

async fn forward(
    p: Arc<Provider>,
    (tenant, actor): (String, String),
    rest: String,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(epoch) = headers
        .get(EPOCH_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    else {
        return refused(&Refusal::new(
            RefusalCode::StaleEpoch,
            format!("the data path requires `{EPOCH_HEADER}`"),
        ));
    };
    if !clean_data_path(&rest) {
        return refused(&Refusal::invalid(
            "the data path has `.`, `..` or empty segments",
        ));
    }
    let mut path = format!("/{rest}");
    if let Some(q) = uri.query() {
        path.push('?');
        path.push_str(q);
    }
    let req = DataRequest {
        method: method.to_string(),
        path_and_query: path,
        headers: headers
            .iter()
            .filter(|(k, _)| !DROP.contains(&k.as_str()))
            .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
            .collect(),
        body,
    };
    match p.call(&tenant, &actor, epoch, req).await {
        Ok(r) => {
            let mut resp = Response::builder()
                .status(StatusCode::from_u16(r.status).unwrap_or(StatusCode::BAD_GATEWAY));
            for (k, v) in &r.headers {
                if !DROP.contains(&k.as_str()) {
                    resp = resp.header(k, v);
                }
            }
            resp.header(EPOCH_HEADER, epoch.to_string())
                .body(axum::body::Body::from(r.body))
                .unwrap_or_else(|_| StatusCode::BAD_GATEWAY.into_response())
        }
        Err(r) => refused(&r),
    }
}
