//! Read models the web UI draws (and any client may use): who the caller is, a catalog
//! playbook as a graph, the diff of two catalog versions, the tenant's keychain aliases, and
//! the workers and the work queue. None reads domain data: the catalog and keychain aliases
//! are the platform's own records, and no secret value leaves the store.

use crate::{ApiResult, Caller, Gateway, Problem, SYSTEM_TENANT};
use axum::Json;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use mayfly_dsl::ParseOptions;
use serde::Deserialize;
use serde_json::{Value, json};

/// `GET /v1/whoami`: the caller's tenant, role and token name.
pub(crate) async fn whoami(axum::Extension(c): axum::Extension<Caller>) -> Json<Value> {
    Json(json!({
        "tenant": c.tenant,
        "role": format!("{:?}", c.role).to_lowercase(),
        "name": c.actor,
        "system": c.tenant == SYSTEM_TENANT,
    }))
}

async fn resolve(
    gw: &Gateway,
    c: &Caller,
    path: &str,
    version: Option<u32>,
) -> ApiResult<(mayfly_store::CatalogEntry, mayfly_store::StoredPlaybook)> {
    gw.store
        .resolve(&c.tenant, path, version)
        .await
        .map_err(Problem::store)?
        .ok_or_else(|| {
            Problem::not_found(match version {
                Some(v) => format!("no playbook `{path}` version {v} in the catalog"),
                None => format!("no playbook `{path}` in the catalog"),
            })
        })
}

/// `GET /v1/catalog/graph?path=P[&version=N]`: the playbook's steps and arcs with a layered
/// layout ([`mayfly_dsl::graph`]).
pub(crate) async fn graph(
    State(gw): State<Gateway>,
    axum::Extension(c): axum::Extension<Caller>,
    Query(q): Query<crate::control::PlaybookQuery>,
) -> ApiResult<Json<Value>> {
    let (entry, stored) = resolve(&gw, &c, &q.path, q.version).await?;
    // Registration parsed it with the same (default) options, so this succeeds.
    let name = format!("{}@{}", entry.path, entry.version);
    let pb = mayfly_dsl::parse(&name, &stored.content, &ParseOptions::default())
        .map_err(|e| Problem::new(StatusCode::BAD_REQUEST, "invalid_playbook", e.to_string()))?;
    Ok(Json(json!({
        "path": entry.path,
        "version": entry.version,
        "digest": entry.digest,
        "graph": mayfly_dsl::graph(&pb),
    })))
}

#[derive(Deserialize)]
pub(crate) struct DiffQuery {
    path: String,
    from: u32,
    to: Option<u32>,
}

/// `GET /v1/catalog/diff?path=P&from=N[&to=M]`: a unified diff of two catalog versions
/// (`to` defaults to the latest).
pub(crate) async fn diff(
    State(gw): State<Gateway>,
    axum::Extension(c): axum::Extension<Caller>,
    Query(q): Query<DiffQuery>,
) -> ApiResult<Json<Value>> {
    let (a, pa) = resolve(&gw, &c, &q.path, Some(q.from)).await?;
    let (b, pb) = resolve(&gw, &c, &q.path, q.to).await?;
    let (old, new) = (
        format!("{}@{}", a.path, a.version),
        format!("{}@{}", b.path, b.version),
    );
    // Diffing is CPU work on caller-chosen input: off the async threads, and bounded (past
    // the deadline the diff is coarser, never slower).
    let (unified, added, removed) = tokio::task::spawn_blocking(move || {
        let text = similar::TextDiff::configure()
            .timeout(std::time::Duration::from_millis(500))
            .diff_lines(&pa.content, &pb.content);
        let unified = text
            .unified_diff()
            .context_radius(3)
            .header(&old, &new)
            .to_string();
        let (mut added, mut removed) = (0usize, 0usize);
        for op in text.iter_all_changes() {
            match op.tag() {
                similar::ChangeTag::Insert => added += 1,
                similar::ChangeTag::Delete => removed += 1,
                similar::ChangeTag::Equal => {}
            }
        }
        (unified, added, removed)
    })
    .await
    .map_err(Problem::internal)?;
    Ok(Json(json!({
        "path": a.path,
        "from": {"version": a.version, "digest": a.digest},
        "to": {"version": b.version, "digest": b.digest},
        "added": added,
        "removed": removed,
        "unified": unified,
    })))
}

/// `GET /v1/keychain`: the tenant's credential aliases and when each was last set — never a
/// value (the store holds them sealed; the gateway has no key to open them).
pub(crate) async fn keychain(
    State(gw): State<Gateway>,
    axum::Extension(c): axum::Extension<Caller>,
) -> ApiResult<Json<Value>> {
    let list = gw
        .store
        .list_secrets(&c.tenant)
        .await
        .map_err(Problem::store)?;
    Ok(Json(json!({"aliases": list})))
}

/// `GET /v1/workers`: the work queue (depth, blocks in flight, JetStream consumer lag) and,
/// for the platform tenant, the worker agents that report to this control plane (pool,
/// labels, enforced bundle, counters, liveness).
pub(crate) async fn workers(
    State(gw): State<Gateway>,
    axum::Extension(c): axum::Extension<Caller>,
) -> ApiResult<Json<Value>> {
    let queue = gw.runtime.as_ref().map(|r| {
        json!({
            "up": r.queue_up(),
            "pending_publishes": r.pending_publishes(),
            "stats": r.queue_stats(),
        })
    });
    // Agents are shared infrastructure: listed to the platform's own tenant only.
    let agents = (c.tenant == SYSTEM_TENANT).then(|| {
        gw.control
            .as_ref()
            .map(|ctl| {
                let mut list: Vec<Value> = ctl
                    .agents()
                    .into_iter()
                    .map(|(a, live)| {
                        json!({
                            "agent": a.report.record.agent,
                            "pool": a.report.record.pool,
                            "labels": a.report.record.labels,
                            "applied": a.report.record.applied,
                            "refused": a.report.record.refused,
                            "blocks_ok": a.report.blocks_ok,
                            "blocks_failed": a.report.blocks_failed,
                            "last_seen_ms": a.last_seen_ms,
                            "live": live,
                        })
                    })
                    .collect();
                list.sort_by(|x, y| x["agent"].as_str().cmp(&y["agent"].as_str()));
                list
            })
            .unwrap_or_default()
    });
    Ok(Json(json!({"queue": queue, "agents": agents})))
}
