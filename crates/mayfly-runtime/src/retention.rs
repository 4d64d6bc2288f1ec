//! Shared-cache retention: a mark-and-sweep over payloads, marked from the log.
//!
//! The cache holds data in flight, not the record (DESIGN §3): what happened is in the
//! events, each payload named there by its digest. A payload is kept while an execution
//! whose events name it, or an ancestor of that execution, is live or ended less than
//! `keep` ago (the store indexes the digests
//! each execution's events name, in the same transaction as the events), and while it is
//! younger than `grace` — a worker stores a result *before* the completion that names it
//! commits, and a put of a payload already stored touches it, so a writer about to
//! reference one is always inside its grace. Every other payload is deleted, and a delete
//! spares a payload touched since the listing that chose it.
//!
//! Refs nested inside a stored payload (a loop's aggregate of per-item refs) need no
//! reading of the payload: each of them came from an event of the same execution (a
//! step's result, a loop's source) or of a child execution whose result it holds, and a
//! child is retained with its ancestors.

use crate::RuntimeError;
use mayfly_cache::Cache;
use mayfly_store::Store;
use serde::Serialize;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

/// How long payloads are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// After an execution ends, how long the payloads its events name are kept.
    pub keep: Duration,
    /// Payloads stored (or touched) less than this long ago are never collected.
    pub grace: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            keep: Duration::from_secs(7 * 24 * 3600),
            grace: Duration::from_secs(3600),
        }
    }
}

/// What one collection found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Payloads in the cache when it was listed.
    pub listed: usize,
    /// Kept because a retained execution names them.
    pub referenced: usize,
    /// Kept because they are inside the grace period.
    pub young: usize,
    /// Deleted (or, on a dry run, that would be).
    pub deleted: usize,
    pub deleted_bytes: u64,
    /// Chosen, but touched again before the delete: kept.
    pub spared: usize,
    /// Deletes that failed (retried next round).
    pub failed: usize,
}

/// One mark-and-sweep at wall-clock `now_ms`. A dry run deletes nothing and reports what
/// it would delete.
pub async fn collect(
    store: &dyn Store,
    cache: &dyn Cache,
    r: Retention,
    now_ms: u64,
    dry_run: bool,
) -> Result<Report, RuntimeError> {
    let cutoff = now_ms.saturating_sub(r.keep.as_millis() as u64);
    let young_after = now_ms.saturating_sub(r.grace.as_millis() as u64);
    // Listing first: a payload stored after the listing is not swept by this round, and one
    // named by a commit after the mark was touched by its put (spared by the delete).
    let entries = cache
        .list()
        .await
        .map_err(|e| RuntimeError::Store(format!("shared cache: {e}")))?;
    let live: HashSet<(String, String)> = store
        .retained_cache_refs(cutoff)
        .await
        .map_err(|e| RuntimeError::Store(e.to_string()))?
        .into_iter()
        .collect();
    let mut rep = Report {
        listed: entries.len(),
        ..Default::default()
    };
    for e in entries {
        if live.contains(&(e.tenant.clone(), e.digest.clone())) {
            rep.referenced += 1;
        } else if e.touched_ms >= young_after {
            rep.young += 1;
        } else if dry_run {
            rep.deleted += 1;
            rep.deleted_bytes += e.bytes;
        } else {
            match cache.delete(&e.tenant, &e.digest, e.touched_ms).await {
                Ok(true) => {
                    rep.deleted += 1;
                    rep.deleted_bytes += e.bytes;
                }
                Ok(false) => rep.spared += 1,
                // One bad entry must not stall collection: the rest go, it is tried again.
                Err(err) => {
                    rep.failed += 1;
                    tracing::warn!(digest = %e.digest, error = %err, "could not delete a cached payload");
                }
            }
        }
    }
    Ok(rep)
}

/// Collect every `every`, for as long as the returned task runs (the server's loop). Each
/// round is logged and counted in `mayfly_cache_gc_*` metrics; a failed round is retried at
/// the next.
pub fn spawn_periodic(
    store: Arc<dyn Store>,
    cache: Arc<dyn Cache>,
    r: Retention,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match collect(
                store.as_ref(),
                cache.as_ref(),
                r,
                mayfly_types::now_ms(),
                false,
            )
            .await
            {
                Ok(rep) => {
                    metrics::counter!("mayfly_cache_gc_deleted_total")
                        .increment(rep.deleted as u64);
                    metrics::counter!("mayfly_cache_gc_deleted_bytes_total")
                        .increment(rep.deleted_bytes);
                    metrics::gauge!("mayfly_cache_payloads").set((rep.listed - rep.deleted) as f64);
                    tracing::info!(
                        listed = rep.listed,
                        referenced = rep.referenced,
                        young = rep.young,
                        deleted = rep.deleted,
                        deleted_bytes = rep.deleted_bytes,
                        failed = rep.failed,
                        "cache retention round"
                    );
                }
                Err(e) => {
                    metrics::counter!("mayfly_cache_gc_failures_total").increment(1);
                    tracing::warn!(error = %e, "cache retention round failed");
                }
            }
        }
    })
}
