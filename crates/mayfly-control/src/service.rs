//! The control plane over a store: the `control` stream of the event log is its only record
//! (every mutation and every refusal is an event there, hash-chained like an execution's),
//! and the current objects are a fold of it kept in memory by the one process that appends.

use crate::model::Role;
use crate::model::{
    Applied, Caller, ControlState, Decision, Denied, FoldError, Kind, Manifest, ObjectKey,
    ObjectView, Revision, authorize,
};
use crate::rollout::{
    AgentAnswer, AgentReport, BundleBody, LiveAgent, Published, RolloutSpec, TPhase,
    TransitionChanged,
};
use mayfly_store::{Batch, Store, StoreError, StoredPlaybook};
use mayfly_trust::sign::ControlKey;
use mayfly_types::{Event, EventKind, ExecutionId, GENESIS_HASH, now_ms};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::BTreeMap;
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
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
}

/// The answer to a compaction.
#[derive(Clone, Debug, Serialize)]
pub struct CompactReport {
    /// Seq of the snapshot record.
    pub snapshot_seq: u64,
    /// The seq range deleted (None: nothing to delete).
    pub compacted: Option<(u64, u64)>,
    pub deleted: u64,
    pub accepted_token: Option<u64>,
}

/// The answer to a bundle publish.
#[derive(Clone, Debug, Serialize)]
pub struct BundleReport {
    pub digest: String,
    pub key_id: String,
    pub policies: usize,
    /// False: the same policies were already published (no-op).
    pub created: bool,
    pub accepted_token: Option<u64>,
}

/// One targeted agent's acknowledgement, as `mayfly rollout status` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct AgentAck {
    pub agent: String,
    pub pool: String,
    pub applied: Option<String>,
    /// It observes the rollout's bundle as effective.
    pub effective: bool,
    pub refused: Option<crate::rollout::Refusal>,
    pub live: bool,
    pub last_seen_ms: Option<u64>,
}

/// A rollout's transition and its agents.
#[derive(Clone, Debug, Serialize)]
pub struct RolloutStatus {
    pub rollout: String,
    pub transition: crate::rollout::Transition,
    pub agents: Vec<AgentAck>,
}

fn rollout_transition<'a>(
    st: &'a ControlState,
    name: &str,
) -> Result<&'a crate::rollout::Transition, ControlError> {
    let key = ObjectKey {
        kind: Kind::Rollout,
        tenant: None,
        name: name.to_owned(),
    };
    let o = st
        .objects
        .get(&key)
        .ok_or_else(|| ControlError::NotFound(format!("no rollout `{name}`")))?;
    let spec = RolloutSpec::deserialize(&o.spec)
        .map_err(|e| ControlError::Invalid(format!("rollout `{name}`: {e}")))?;
    st.transitions
        .get(&spec.transition_id())
        .ok_or_else(|| ControlError::NotFound(format!("rollout `{name}` has no transition")))
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
    /// When to try again, for a refusal that time resolves (a conflicting transition).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_hint: Option<String>,
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
    /// The seq range compacted into a snapshot (the chain is verified from there on).
    pub compacted: Option<(u64, u64)>,
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
    /// Signs policy bundles (None: this node cannot publish).
    signer: Option<ControlKey>,
    /// Agents heard from, with their latest report (soft state: liveness and counters).
    live: std::sync::Mutex<BTreeMap<String, LiveAgent>>,
    /// A failed write could not be reconciled with the store: re-read before trusting `state`.
    untrusted: std::sync::atomic::AtomicBool,
}

fn stream() -> ExecutionId {
    ExecutionId::from(STREAM)
}

/// Verify and fold a stored control stream: the fold checks every record's seq, link and
/// hash itself (and accepts a gap only before a snapshot, whose summary replaces what was
/// compacted).
fn fold(events: &[Event]) -> Result<ControlState, ControlError> {
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
            signer: None,
            live: Default::default(),
            untrusted: Default::default(),
        })
    }

    /// Sign policy bundles with `key`.
    pub fn with_signer(mut self, key: ControlKey) -> Control {
        self.signer = Some(key);
        self
    }

    /// Freeze every Policy into a bundle signed by the control plane key and publish it
    /// (system admins only). Publishing the same policies again is a no-op: the digest is
    /// the bundle's identity.
    pub async fn publish_bundle(&self, caller: &Caller) -> Result<BundleReport, ControlError> {
        if !(caller.tenant == crate::model::SYSTEM_TENANT && caller.role == Role::Admin) {
            return Err(ControlError::Forbidden(format!(
                "publishing a policy bundle needs an admin of the `{}` tenant",
                crate::model::SYSTEM_TENANT
            )));
        }
        let signer = self.signer.as_ref().ok_or_else(|| {
            ControlError::Invalid("this node holds no control plane key: it cannot sign".into())
        })?;
        let mut st = self.lock().await?;
        let body = BundleBody::freeze(&st);
        let policies = body.policies.len();
        let signed = signer
            .sign(mayfly_trust::sign::Purpose::PolicyBundle, json!(body))
            .map_err(|e| ControlError::Invalid(e.to_string()))?;
        if st.bundles.contains_key(&signed.digest) {
            return Ok(BundleReport {
                digest: signed.digest,
                key_id: signed.key_id,
                policies,
                created: false,
                accepted_token: None,
            });
        }
        let mut events = Vec::new();
        let published = Published {
            bundle: signed.clone(),
            policies,
        };
        self.push_or_reload(
            &mut st,
            &mut events,
            caller,
            EventKind::BundlePublished,
            json!(published),
        )
        .await?;
        let accepted_token = self.append_folded(&mut st, events).await?;
        Ok(BundleReport {
            digest: signed.digest,
            key_id: signed.key_id,
            policies,
            created: true,
            accepted_token,
        })
    }

    /// The public half of the signing key (what agents must trust).
    pub fn public_key(&self) -> Option<mayfly_trust::sign::TrustedKey> {
        self.signer.as_ref().map(|k| k.public().clone())
    }

    /// Append records computed from the current state, atomically: `decide` sees the locked
    /// state and returns the records to append (each folded in order, so the fold's
    /// invariants check them before anything is written) and a value for the caller. The
    /// actor dataplane writes through this: its intent is durable before it acts.
    pub async fn transact<R>(
        &self,
        actor: &str,
        decide: impl FnOnce(
            &ControlState,
        ) -> Result<(Vec<(EventKind, serde_json::Value)>, R), ControlError>,
    ) -> Result<R, ControlError> {
        let mut st = self.lock().await?;
        let (changes, r) = decide(&st)?;
        if changes.is_empty() {
            return Ok(r);
        }
        let mut events = Vec::new();
        self.mark_dirty();
        for (kind, payload) in changes {
            if let Err(e) = push_as(&mut st, &mut events, actor.to_owned(), None, kind, payload) {
                self.reload_after_failure(&mut st).await;
                return Err(e);
            }
        }
        self.append_folded(&mut st, events).await?;
        Ok(r)
    }

    /// Read the folded state (as this appender holds it: strongly consistent with its writes).
    pub async fn read<R>(&self, f: impl FnOnce(&ControlState) -> R) -> Result<R, ControlError> {
        let st = self.lock().await?;
        Ok(f(&st))
    }

    /// Published bundles, in digest order.
    pub async fn bundles(&self) -> Vec<mayfly_trust::sign::Signed> {
        self.lock()
            .await
            .map(|st| st.bundles.values().cloned().collect())
            .unwrap_or_default()
    }

    /// An agent's report: remember it, record a change of what it applied or refused, run
    /// the controller, and answer with the bundle the agent should enforce.
    pub async fn agent_report(&self, report: AgentReport) -> Result<AgentAnswer, ControlError> {
        let now = now_ms();
        let (pool, labels) = (report.record.pool.clone(), report.record.labels.clone());
        let record = report.record.clone();
        let live = {
            let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
            live.insert(
                record.agent.clone(),
                LiveAgent {
                    report,
                    last_seen_ms: now,
                },
            );
            live.clone()
        };
        let mut st = self.lock().await?;
        let mut events = Vec::new();
        self.mark_dirty();
        let folded = (|| {
            if st.agents.get(&record.agent) != Some(&record) {
                push_as(
                    &mut st,
                    &mut events,
                    format!("agent:{}", record.agent),
                    None,
                    EventKind::AgentReported,
                    json!(record),
                )?;
            }
            controller_decisions(&mut st, &mut events, now, &live)
        })();
        if let Err(e) = folded {
            self.reload_after_failure(&mut st).await;
            return Err(e);
        }
        self.append_folded(&mut st, events).await?;
        Ok(AgentAnswer {
            desired: st.desired_bundle(&pool, &labels).cloned(),
            now_ms: now,
        })
    }

    /// Run the controller once against the agents' latest reports (activation delays and
    /// inconsistency windows elapse without any report arriving).
    pub async fn reconcile(&self) -> Result<Option<u64>, ControlError> {
        let now = now_ms();
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut st = self.lock().await?;
        let mut events = Vec::new();
        self.mark_dirty();
        if let Err(e) = controller_decisions(&mut st, &mut events, now, &live) {
            self.reload_after_failure(&mut st).await;
            return Err(e);
        }
        self.append_folded(&mut st, events).await
    }

    /// Compact the stream (system admins): append a snapshot of the folded state and, in the
    /// same commit, delete the records it summarizes — all but the first (which names the
    /// log). Object histories, bundles, transitions and agents' records live on in the
    /// snapshot; the deleted records' chain ends in the snapshot's `head_hash`. A view that
    /// had not folded them bootstraps from the snapshot.
    pub async fn compact(&self, caller: &Caller) -> Result<CompactReport, ControlError> {
        if !(caller.tenant == crate::model::SYSTEM_TENANT && caller.role == Role::Admin) {
            return Err(ControlError::Forbidden(format!(
                "compacting the control stream needs an admin of the `{}` tenant",
                crate::model::SYSTEM_TENANT
            )));
        }
        let mut st = self.lock().await?;
        let through = st.seq;
        let from = 2;
        let mut events = Vec::new();
        let snap = crate::model::Snapshot::of(&st);
        self.push_or_reload(
            &mut st,
            &mut events,
            caller,
            EventKind::ControlSnapshot,
            json!(snap),
        )
        .await?;
        let compact = if through >= from {
            vec![mayfly_store::Compaction {
                execution_id: stream(),
                from_seq: from,
                through_seq: through,
            }]
        } else {
            Vec::new()
        };
        let deleted = compact
            .first()
            .map_or(0, |c| c.through_seq - c.from_seq + 1);
        let token = match self
            .store
            .append(Arc::new(Batch {
                events,
                compact,
                ..Default::default()
            }))
            .await
        {
            Ok(t) => {
                self.settled();
                t
            }
            Err(e) => {
                self.reload_after_failure(&mut st).await;
                return Err(e.into());
            }
        };
        if deleted > 0 {
            st.compacted = Some((from, through));
        }
        if let Some(t) = token {
            self.last_token
                .fetch_max(t, std::sync::atomic::Ordering::SeqCst);
        }
        Ok(CompactReport {
            snapshot_seq: through + 1,
            compacted: (deleted > 0).then_some((from, through)),
            deleted,
            accepted_token: token,
        })
    }

    /// Run [`Control::reconcile`] every `every` until the task is aborted.
    pub fn run_controller(
        self: &Arc<Self>,
        every: std::time::Duration,
    ) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                if let Err(e) = me.reconcile().await {
                    tracing::warn!(error = %e, "rollout controller");
                }
            }
        })
    }

    /// Cancel the in-progress transition of rollout `name`: agents return to the bundle in
    /// force before it.
    pub async fn cancel_rollout(
        &self,
        caller: &Caller,
        name: &str,
    ) -> Result<Option<u64>, ControlError> {
        if !(caller.tenant == crate::model::SYSTEM_TENANT && caller.role == Role::Admin) {
            return Err(ControlError::Forbidden(format!(
                "cancelling a rollout needs an admin of the `{}` tenant",
                crate::model::SYSTEM_TENANT
            )));
        }
        let mut st = self.lock().await?;
        let t = rollout_transition(&st, name)?;
        if !t.phase.active() {
            return Err(ControlError::Invalid(format!(
                "rollout `{name}` is not in progress (transition {} is {})",
                t.id,
                t.phase.as_str()
            )));
        }
        let c = TransitionChanged {
            id: t.id.clone(),
            phase: TPhase::Cancelled,
            reason: format!("cancelled by {}", caller.actor_ref()),
            rollout: name.to_owned(),
            spec: None,
            evidence: json!({}),
        };
        let mut events = Vec::new();
        self.push_or_reload(
            &mut st,
            &mut events,
            caller,
            EventKind::TransitionChanged,
            json!(c),
        )
        .await?;
        self.append_folded(&mut st, events).await
    }

    /// Every agent that has reported since this control plane started, with its last
    /// report, when it was heard from and whether it is live (what `/v1/workers` lists).
    pub fn agents(&self) -> Vec<(crate::rollout::LiveAgent, bool)> {
        let now = now_ms();
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.values().map(|a| (a.clone(), a.live(now))).collect()
    }

    /// Rollout `name`'s transition and, per targeted agent, what it acknowledged.
    pub async fn rollout_status(&self, name: &str) -> Result<RolloutStatus, ControlError> {
        let now = now_ms();
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let st = self.lock().await?;
        let t = rollout_transition(&st, name)?.clone();
        let mut agents = Vec::new();
        for (id, rec) in &st.agents {
            if !t.spec.target.matches(&rec.pool, &rec.labels) {
                continue;
            }
            let l = live.get(id);
            agents.push(AgentAck {
                agent: id.clone(),
                pool: rec.pool.clone(),
                applied: rec.applied.clone(),
                effective: rec.applied.as_deref() == Some(t.spec.bundle.as_str()),
                refused: rec.refused.clone(),
                live: l.is_some_and(|l| l.live(now)),
                last_seen_ms: l.map(|l| l.last_seen_ms),
            });
        }
        Ok(RolloutStatus {
            rollout: name.to_owned(),
            transition: t,
            agents,
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
        let mut st = self.lock().await?;
        let mut events = Vec::new();
        // Folded in place (no copy of the state): a failure before the commit re-reads the
        // stream, so nothing unwritten is ever served.
        let results = match self.stage(&mut st, &mut events, caller, manifests).await {
            Ok(r) => r,
            Err(e) => {
                self.reload_after_failure(&mut st).await;
                return Err(e);
            }
        };
        let accepted_token = self.append_folded(&mut st, events).await?;
        Ok(ApplyReport {
            results,
            accepted_token,
        })
    }

    /// Decide every object of an apply and fold the resulting records into `next`.
    async fn stage(
        &self,
        next: &mut ControlState,
        events: &mut Vec<Event>,
        caller: &Caller,
        manifests: &[Manifest],
    ) -> Result<Vec<ApplyResult>, ControlError> {
        let mut results = Vec::new();
        // Rollouts of this same apply hold their scopes too: a second intent on a scope an
        // earlier one of the apply takes conflicts with it.
        let mut claimed: Vec<(crate::rollout::Target, String, String)> = Vec::new();
        let keyed: Vec<(ObjectKey, &Manifest, Decision)> = manifests
            .iter()
            .map(|m| {
                let key = m.key(caller);
                let mut d = authorize(caller, &key);
                if d.allowed && key.kind == Kind::Rollout {
                    d = rollout_gate(next, &key, m);
                    if let Ok(spec) = RolloutSpec::deserialize(&m.spec) {
                        let id = spec.transition_id();
                        match claimed.iter().find(|(t, other, _)| *t == spec.target && *other != id) {
                            Some((_, other, name)) if d.allowed => {
                                d = Decision {
                                    allowed: false,
                                    reason: format!(
                                        "conflicted: rollout `{name}` of this apply ({other}) takes the same scope"
                                    ),
                                };
                            }
                            _ => claimed.push((spec.target, id, key.name.clone())),
                        }
                    }
                }
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
            let rollout = (key.kind == Kind::Rollout)
                .then(|| RolloutSpec::deserialize(&m.spec).ok())
                .flatten();
            // Only a refusal for a conflict (not for authorization) says what holds the scope.
            let conflicted = !decision.allowed && decision.reason.starts_with("conflicted");
            let conflict = rollout.as_ref().filter(|_| conflicted).and_then(|r| {
                own_active(next, &key)
                    .filter(|t| t.id != r.transition_id())
                    .or_else(|| {
                        next.active_on(&r.target)
                            .filter(|t| t.id != r.transition_id())
                    })
                    .map(|t| (t.id.clone(), t.rollout.clone()))
                    .or_else(|| {
                        claimed
                            .iter()
                            .find(|(t, id, _)| *t == r.target && *id != r.transition_id())
                            .map(|(_, id, name)| (id.clone(), name.clone()))
                    })
            });
            let result = |outcome, generation, reason: String| {
                ApplyResult {
                kind: key.kind,
                tenant: key.tenant.clone(),
                name: key.name.clone(),
                version: version.clone(),
                generation,
                outcome,
                retry_hint: conflict.as_ref().filter(|_| !decision.allowed).map(|(_, r)| {
                    format!("retry once rollout `{r}` completes or is cancelled (`mayfly rollout cancel {r}`)")
                }),
                reason,
            }
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
                results.push(result(Outcome::Denied, shown, decision.reason.clone()));
                self.push(next, events, caller, EventKind::ObjectDenied, json!(d))?;
                // Recorded as a conflicted transition when the intent is new (or conflicted
                // before); an intent whose transition ran already keeps its record.
                let fresh = rollout.as_ref().is_some_and(|r| {
                    next.transitions
                        .get(&r.transition_id())
                        .is_none_or(|t| t.phase == TPhase::Conflicted)
                });
                if let (Some(spec), Some(_), true) = (&rollout, &conflict, fresh) {
                    let c = TransitionChanged {
                        id: spec.transition_id(),
                        phase: TPhase::Conflicted,
                        reason: decision.reason.clone(),
                        rollout: key.name.clone(),
                        spec: Some(spec.clone()),
                        evidence: json!({}),
                    };
                    self.push(next, events, caller, EventKind::TransitionChanged, json!(c))?;
                }
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
            let mut reason = decision.reason;
            let planned = rollout.as_ref().filter(|r| {
                next.transitions
                    .get(&r.transition_id())
                    .is_none_or(|t| t.phase == TPhase::Conflicted)
            });
            if let Some(r) = &rollout
                && planned.is_none()
                && let Some(t) = next.transitions.get(&r.transition_id())
            {
                reason = format!(
                    "{reason}; same intent as transition {} ({}): nothing new to roll out",
                    t.id,
                    t.phase.as_str()
                );
            }
            results.push(result(outcome, generation + 1, reason));
            self.push(next, events, caller, EventKind::ObjectApplied, json!(a))?;
            if let Some(spec) = planned {
                let c = TransitionChanged {
                    id: spec.transition_id(),
                    phase: TPhase::Planned,
                    reason: format!(
                        "rollout `{}` asks for bundle {} on {}",
                        key.name,
                        spec.bundle,
                        serde_json::to_string(&spec.target).unwrap_or_default()
                    ),
                    rollout: key.name.clone(),
                    spec: Some(spec.clone()),
                    evidence: json!({}),
                };
                self.push(next, events, caller, EventKind::TransitionChanged, json!(c))?;
            }
        }
        Ok(results)
    }

    /// Append `events`, already folded into the locked `st` (no copy of the state: frequent
    /// writers — agent reports, the controller — stay O(events)).
    async fn append_folded(
        &self,
        st: &mut ControlState,
        events: Vec<Event>,
    ) -> Result<Option<u64>, ControlError> {
        if events.is_empty() {
            self.settled();
            return Ok(None);
        }
        match self
            .store
            .append(Arc::new(Batch {
                events,
                ..Default::default()
            }))
            .await
        {
            Ok(token) => {
                self.settled();
                if let Some(t) = token {
                    self.last_token
                        .fetch_max(t, std::sync::atomic::Ordering::SeqCst);
                }
                Ok(token)
            }
            Err(e) => {
                self.reload_after_failure(st).await;
                Err(e.into())
            }
        }
    }

    /// After a failed write, take the stream as stored, not as assumed: the commit may have
    /// landed even though it reported failure (a connection lost during COMMIT), or the
    /// state may hold events that were never written. If the stream cannot be re-read, the
    /// state is marked untrusted and the next operation re-reads it first (or fails).
    async fn reload_after_failure(&self, st: &mut ControlState) {
        match self
            .store
            .read_all(&stream())
            .await
            .map_err(ControlError::from)
            .and_then(|ev| fold(&ev))
        {
            Ok(stored) => {
                *st = stored;
                self.settled();
            }
            Err(re) => {
                tracing::error!(error = %re, "control stream could not be re-read after a failed write");
                self.untrusted
                    .store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
    }

    /// Records are being folded into the state ahead of their commit: until the commit (or a
    /// re-read) settles it, the state is not to be trusted — if the operation is abandoned
    /// midway (its request dropped), the next one re-reads the stream.
    fn mark_dirty(&self) {
        self.untrusted
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn settled(&self) {
        self.untrusted
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// The state, locked, re-read from the store first if a failed write left it untrusted.
    async fn lock(&self) -> Result<tokio::sync::MutexGuard<'_, ControlState>, ControlError> {
        let mut st = self.state.lock().await;
        if self.untrusted.load(std::sync::atomic::Ordering::SeqCst) {
            *st = fold(&self.store.read_all(&stream()).await?)?;
            self.untrusted
                .store(false, std::sync::atomic::Ordering::SeqCst);
        }
        Ok(st)
    }

    /// [`Control::push`] into the locked state; if it fails, re-read the stream (the state
    /// may hold part of what was being folded).
    async fn push_or_reload(
        &self,
        st: &mut ControlState,
        events: &mut Vec<Event>,
        caller: &Caller,
        kind: EventKind,
        payload: serde_json::Value,
    ) -> Result<(), ControlError> {
        let r = self.push(st, events, caller, kind, payload);
        if r.is_err() {
            self.reload_after_failure(st).await;
        }
        r
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
        self.mark_dirty();
        push_as(
            st,
            events,
            caller.actor_ref(),
            Some(caller.request_id.clone()),
            kind,
            payload,
        )
    }
}

/// Seal the next event of the stream, as `actor`, and fold it into `st`.
pub(crate) fn push_as(
    st: &mut ControlState,
    events: &mut Vec<Event>,
    actor: String,
    request_id: Option<String>,
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
        actor,
        request_id,
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

impl Control {
    /// The log position of this process's last control write (0: none yet).
    pub fn last_token(&self) -> u64 {
        self.last_token.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Objects of `kind` visible to `caller` (one, with `name`), as this appender sees them.
    pub async fn get(&self, caller: &Caller, kind: Kind, name: Option<&str>) -> Vec<ObjectView> {
        self.lock()
            .await
            .map(|st| st.objects_of(caller, kind, name))
            .unwrap_or_default()
    }

    /// Every revision of one object (oldest first), if visible to `caller`.
    pub async fn history(&self, caller: &Caller, kind: Kind, name: &str) -> Option<Vec<Revision>> {
        self.lock()
            .await
            .ok()
            .and_then(|st| st.history_of(caller, kind, name))
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
        compacted: st.compacted,
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

/// The rollout-specific refusal of an otherwise authorized Rollout: its bundle must be
/// published, and its scope free of another active transition (`conflicted`).
fn rollout_gate(st: &ControlState, key: &ObjectKey, m: &Manifest) -> Decision {
    let ok = Decision {
        allowed: true,
        reason: format!("admin of the `{}` tenant", crate::model::SYSTEM_TENANT),
    };
    let Ok(spec) = RolloutSpec::deserialize(&m.spec) else {
        return ok;
    };
    if !st.bundles.contains_key(&spec.bundle) {
        return Decision {
            allowed: false,
            reason: format!(
                "rollout `{}` names bundle {}, which is not published (`mayfly bundle publish`)",
                key.name, spec.bundle
            ),
        };
    }
    if let Some(t) = own_active(st, key).filter(|t| t.id != spec.transition_id()) {
        return Decision {
            allowed: false,
            reason: format!(
                "conflicted: rollout `{}` has transition {} {}; cancel it before changing its intent",
                key.name,
                t.id,
                t.phase.as_str()
            ),
        };
    }
    match st.active_on(&spec.target) {
        Some(t) if t.id != spec.transition_id() => Decision {
            allowed: false,
            reason: format!(
                "conflicted: transition {} (rollout `{}`) is {} on the same scope",
                t.id,
                t.rollout,
                t.phase.as_str()
            ),
        },
        _ => ok,
    }
}

/// The in-progress transition of the Rollout object `key` as it stands, if any.
fn own_active<'a>(st: &'a ControlState, key: &ObjectKey) -> Option<&'a crate::rollout::Transition> {
    let o = st.objects.get(key)?;
    let spec = RolloutSpec::deserialize(&o.spec).ok()?;
    st.transitions
        .get(&spec.transition_id())
        .filter(|t| t.phase.active())
}

/// Fold the controller's due decisions into `st`, each as a `transition.changed` event.
fn controller_decisions(
    st: &mut ControlState,
    events: &mut Vec<Event>,
    now: u64,
    live: &BTreeMap<String, LiveAgent>,
) -> Result<(), ControlError> {
    for c in st.reconcile(now, live) {
        push_as(
            st,
            events,
            "controller".into(),
            None,
            EventKind::TransitionChanged,
            json!(c),
        )?;
    }
    Ok(())
}
