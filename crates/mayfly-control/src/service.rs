//! The control plane over a store: the `control` stream of the event log is its only record
//! (every mutation and every refusal is an event there, hash-chained like an execution's),
//! and the current objects are a fold of it kept in memory by the one process that appends.

use crate::model::{
    Applied, Caller, ControlState, Decision, Denied, FoldError, Kind, Manifest, ObjectKey,
    ObjectView, Revision, authorize,
};
use mayfly_store::{Batch, Store, StoreError, StoredPlaybook};
use mayfly_types::{Event, EventKind, ExecutionId, GENESIS_HASH, now_ms};
use serde::Serialize;
use serde_json::json;
use std::sync::Arc;
use tokio::sync::Mutex;

/// The stream of the event log that holds the control plane's record.
pub const STREAM: &str = "control";

/// Control-plane failures.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("the control stream does not verify: {0}")]
    Chain(String),
    #[error(transparent)]
    Fold(#[from] FoldError),
    #[error("{0}")]
    Invalid(String),
}

/// What became of one object of an apply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Created,
    Configured,
    Unchanged,
    Denied,
    /// Not applied because another object of the same apply was denied (all or nothing).
    Skipped,
}

/// One object's result.
#[derive(Clone, Debug, Serialize)]
pub struct ApplyResult {
    pub kind: Kind,
    pub tenant: Option<String>,
    pub name: String,
    pub version: String,
    pub generation: u64,
    pub outcome: Outcome,
    pub reason: String,
}

/// The answer to an apply. `accepted_token` is the log position of its commit (None when
/// nothing was written).
#[derive(Clone, Debug, Serialize)]
pub struct ApplyReport {
    pub results: Vec<ApplyResult>,
    pub accepted_token: Option<u64>,
}

impl ApplyReport {
    pub fn denied(&self) -> bool {
        self.results.iter().any(|r| r.outcome == Outcome::Denied)
    }
}

/// The result of re-verifying the stored control stream.
#[derive(Clone, Debug, Serialize)]
pub struct Verified {
    pub events: u64,
    pub head: String,
    pub applied: u64,
    pub denied: u64,
}

/// The control plane of one process (the log's appender).
pub struct Control {
    store: Arc<dyn Store>,
    state: Mutex<ControlState>,
    /// Log position of this process's last control write (admission reads at least it).
    last_token: std::sync::atomic::AtomicU64,
}

fn stream() -> ExecutionId {
    ExecutionId::from(STREAM)
}

/// Verify and fold a stored control stream.
fn fold(events: &[Event]) -> Result<ControlState, ControlError> {
    mayfly_trust::verify_chain(events).map_err(|e| ControlError::Chain(e.to_string()))?;
    let mut st = ControlState::default();
    for e in events {
        st.apply(e)?;
    }
    Ok(st)
}

impl Control {
    /// Load the control stream from `store`; refuses to start on a stream that does not
    /// verify (a tampered record is not served as truth).
    pub async fn open(store: Arc<dyn Store>) -> Result<Control, ControlError> {
        let events = store.read_all(&stream()).await?;
        let state = fold(&events)?;
        let last = events.last().and_then(|e| e.position).unwrap_or(0);
        Ok(Control {
            store,
            state: Mutex::new(state),
            last_token: std::sync::atomic::AtomicU64::new(last),
        })
    }

    /// Apply `manifests` as `caller`: authorize every object first; if any is refused,
    /// record each refusal and change nothing; else record each change (identical content
    /// is a no-op and records nothing), all in one commit.
    pub async fn apply(
        &self,
        caller: &Caller,
        manifests: &[Manifest],
    ) -> Result<ApplyReport, ControlError> {
        let mut st = self.state.lock().await;
        let mut next = st.clone();
        let mut events = Vec::new();
        let mut results = Vec::new();
        let keyed: Vec<(ObjectKey, &Manifest, Decision)> = manifests
            .iter()
            .map(|m| {
                let key = m.key(caller);
                let d = authorize(caller, &key);
                (key, m, d)
            })
            .collect();
        let any_denied = keyed.iter().any(|(_, _, d)| !d.allowed);
        let mut playbooks = Vec::new();
        for (key, m, decision) in keyed {
            let version = m.version(&key);
            let current = next.objects.get(&key);
            let before = current.map(|o| o.version.clone());
            let generation = current.map_or(0, |o| o.generation);
            let policy_version = next.policy_version(key.tenant.as_deref());
            let result = |outcome, generation, reason: String| ApplyResult {
                kind: key.kind,
                tenant: key.tenant.clone(),
                name: key.name.clone(),
                version: version.clone(),
                generation,
                outcome,
                reason,
            };
            if !decision.allowed {
                // What exists in a scope the caller cannot read is not revealed (the audit
                // record keeps it).
                let shown = if crate::model::visible(caller, &key) {
                    generation
                } else {
                    0
                };
                let d = Denied {
                    key: key.clone(),
                    attempted: version.clone(),
                    current: before,
                    decision: decision.clone(),
                    policy_version,
                };
                results.push(result(Outcome::Denied, shown, decision.reason));
                self.push(
                    &mut next,
                    &mut events,
                    caller,
                    EventKind::ObjectDenied,
                    json!(d),
                )?;
                continue;
            }
            if any_denied {
                results.push(result(
                    Outcome::Skipped,
                    generation,
                    "another object of this apply was denied; nothing was applied".into(),
                ));
                continue;
            }
            if before.as_deref() == Some(version.as_str()) {
                results.push(result(Outcome::Unchanged, generation, decision.reason));
                continue;
            }
            let mut catalog_version = None;
            if let (Kind::Playbook, Some(src)) = (key.kind, &m.source) {
                // The catalog is immutable by digest: registering is idempotent, so a
                // commit that fails below leaves at most an unreferenced version.
                let tenant = key.tenant.clone().unwrap_or_default();
                let (entry, _) = self
                    .store
                    .register(
                        &tenant,
                        StoredPlaybook {
                            digest: version.clone(),
                            path: key.name.clone(),
                            source_name: key.name.clone(),
                            content: src.clone(),
                        },
                    )
                    .await?;
                catalog_version = Some(entry.version);
                playbooks.push(entry);
            }
            let outcome = if before.is_some() {
                Outcome::Configured
            } else {
                Outcome::Created
            };
            let a = Applied {
                key: key.clone(),
                version: version.clone(),
                generation: generation + 1,
                before,
                labels: m.labels.clone(),
                spec: m.spec.clone(),
                decision: decision.clone(),
                policy_version,
                catalog_version,
            };
            results.push(result(outcome, generation + 1, decision.reason));
            self.push(
                &mut next,
                &mut events,
                caller,
                EventKind::ObjectApplied,
                json!(a),
            )?;
        }
        if events.is_empty() {
            return Ok(ApplyReport {
                results,
                accepted_token: None,
            });
        }
        let token = match self
            .store
            .append(Arc::new(Batch {
                events,
                ..Default::default()
            }))
            .await
        {
            Ok(t) => t,
            Err(e) => {
                // The commit may have landed even though it reported failure (a connection
                // lost during COMMIT): take the stream as stored, not as assumed, so the
                // next apply does not reuse a seq.
                match self
                    .store
                    .read_all(&stream())
                    .await
                    .map_err(ControlError::from)
                    .and_then(|ev| fold(&ev))
                {
                    Ok(stored) => *st = stored,
                    Err(re) => {
                        tracing::error!(error = %re, "control stream could not be re-read after a failed commit")
                    }
                }
                return Err(e.into());
            }
        };
        *st = next;
        if let Some(t) = token {
            self.last_token
                .fetch_max(t, std::sync::atomic::Ordering::SeqCst);
        }
        Ok(ApplyReport {
            results,
            accepted_token: token,
        })
    }

    /// Seal the next event of the stream and fold it into `st`.
    fn push(
        &self,
        st: &mut ControlState,
        events: &mut Vec<Event>,
        caller: &Caller,
        kind: EventKind,
        payload: serde_json::Value,
    ) -> Result<(), ControlError> {
        let mut e = Event {
            execution_id: stream(),
            seq: st.seq + 1,
            kind,
            step: None,
            attempt: None,
            command_id: None,
            at: now_ms(),
            actor: caller.actor_ref(),
            request_id: Some(caller.request_id.clone()),
            playbook_digest: String::new(),
            payload,
            payload_ref: None,
            prev_hash: if st.seq == 0 {
                GENESIS_HASH.to_owned()
            } else {
                st.last_hash.clone()
            },
            hash: String::new(),
            position: None,
        };
        mayfly_trust::seal(&mut e).map_err(|err| ControlError::Invalid(err.to_string()))?;
        st.apply(&e)?;
        events.push(e);
        Ok(())
    }

    /// The log position of this process's last control write (0: none yet).
    pub fn last_token(&self) -> u64 {
        self.last_token.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Objects of `kind` visible to `caller` (one, with `name`), as this appender sees them.
    pub async fn get(&self, caller: &Caller, kind: Kind, name: Option<&str>) -> Vec<ObjectView> {
        self.state.lock().await.objects_of(caller, kind, name)
    }

    /// Every revision of one object (oldest first), if visible to `caller`.
    pub async fn history(&self, caller: &Caller, kind: Kind, name: &str) -> Option<Vec<Revision>> {
        self.state.lock().await.history_of(caller, kind, name)
    }

    #[cfg(test)]
    pub(crate) async fn state_for_tests(&self) -> ControlState {
        self.state.lock().await.clone()
    }

    /// Re-read the stored stream and verify it: hash chain, dense seq, every event folds,
    /// and the stored head is the one this process wrote last (a truncated or rewritten
    /// tail is caught too).
    pub async fn verify(&self) -> Result<Verified, ControlError> {
        let st = self.state.lock().await;
        let events = self.store.read_all(&stream()).await?;
        let stored = fold(&events)?;
        if stored.seq != st.seq || stored.last_hash != st.last_hash {
            return Err(ControlError::Chain(format!(
                "the stored stream ends at #{} ({}), but this process appended up to #{} ({})",
                stored.seq, stored.last_hash, st.seq, st.last_hash
            )));
        }
        Ok(report(&stored, &events))
    }
}

fn report(st: &ControlState, events: &[Event]) -> Verified {
    Verified {
        events: events.len() as u64,
        head: if st.seq == 0 {
            GENESIS_HASH.to_owned()
        } else {
            st.last_hash.clone()
        },
        applied: st.seq - st.denied,
        denied: st.denied,
    }
}

/// Verify the control stream of `store` without a running control plane (`mayfly audit
/// verify --db`).
pub async fn verify_stored(store: &dyn Store) -> Result<Verified, ControlError> {
    let events = store.read_all(&stream()).await?;
    let st = fold(&events)?;
    Ok(report(&st, &events))
}
