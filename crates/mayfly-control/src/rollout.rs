//! Policy bundles, rollouts and transitions — the pure part.
//!
//! A **bundle** freezes every Policy object into canonical JSON, signed by the control
//! plane's key; its digest is its identity. A **Rollout** (a cluster-scoped object) asks for
//! a bundle to become effective on a target scope of data-plane agents (workers). Each
//! rollout intent is a **transition** with a deterministic id (the digest of scope, bundle and
//! revision) and phases: planned → admitted → completed, or cancelled / aborted (rolled back)
//! / superseded (a later rollout on the same scope completed); a conflicting intent is
//! recorded as conflicted and refused with a retry hint. Every phase change is an event of
//! the control stream carrying its evidence, so replay reproduces the decisions; the
//! controller that takes them ([`ControlState::reconcile`]) is a pure function of the
//! folded stream, the clock and the agents' latest reports.

use crate::model::{ControlState, Kind, ObjectKey};
use mayfly_trust::sign::Signed;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// Format id inside a bundle's body.
pub const BUNDLE_FORMAT: &str = "mayfly.policy-bundle/v1";

/// One policy as frozen into a bundle.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BundledPolicy {
    pub key: ObjectKey,
    pub version: String,
    pub spec: Value,
}

/// The signed body of a policy bundle. No timestamp: the same policies freeze to the same
/// digest, so publishing twice is a no-op.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BundleBody {
    pub format: String,
    pub policies: Vec<BundledPolicy>,
    /// Tenant → Environment (the environment layer's policies apply by it).
    #[serde(default)]
    pub environments: BTreeMap<String, String>,
}

impl BundleBody {
    /// Every Policy object of `st`, in key order.
    pub fn freeze(st: &ControlState) -> BundleBody {
        BundleBody {
            format: BUNDLE_FORMAT.into(),
            policies: st
                .objects
                .values()
                .filter(|o| o.key.kind == Kind::Policy)
                .map(|o| BundledPolicy {
                    key: o.key.clone(),
                    version: o.version.clone(),
                    spec: o.spec.clone(),
                })
                .collect(),
            environments: st
                .objects
                .values()
                .filter(|o| o.key.kind == Kind::Tenant)
                .filter_map(|o| {
                    o.spec
                        .get("environment")
                        .and_then(Value::as_str)
                        .map(|e| (o.key.name.clone(), e.to_owned()))
                })
                .collect(),
        }
    }

    /// A control state holding just these policies: the agent evaluates blocks against it
    /// with the same code admission uses.
    pub fn policy_state(&self) -> ControlState {
        let mut st = ControlState::default();
        for p in &self.policies {
            st.objects.insert(
                p.key.clone(),
                crate::model::Object {
                    key: p.key.clone(),
                    version: p.version.clone(),
                    generation: 1,
                    labels: BTreeMap::new(),
                    spec: p.spec.clone(),
                    catalog_version: None,
                    revisions: Vec::new(),
                },
            );
        }
        for (tenant, env) in &self.environments {
            let key = ObjectKey {
                kind: Kind::Tenant,
                tenant: None,
                name: tenant.clone(),
            };
            st.objects.insert(
                key.clone(),
                crate::model::Object {
                    key,
                    version: String::new(),
                    generation: 1,
                    labels: BTreeMap::new(),
                    spec: serde_json::json!({ "environment": env }),
                    catalog_version: None,
                    revisions: Vec::new(),
                },
            );
        }
        st
    }
}

/// Payload of `bundle.published`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Published {
    pub bundle: Signed,
    pub policies: usize,
}

/// Which agents a rollout targets: a worker pool and/or labels (empty: every agent).
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

impl Target {
    pub fn matches(&self, pool: &str, labels: &BTreeMap<String, String>) -> bool {
        self.pool.as_deref().is_none_or(|p| p == pool)
            && self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// When an admitted rollout may start: `after_ms` after it was planned.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Activation {
    #[serde(default)]
    pub after_ms: u64,
}

/// What rolls a rollout back automatically.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackTrigger {
    /// Agents that refuse the bundle (bad signature, unknown key …) before it rolls back.
    #[serde(default = "one")]
    pub failed_acks: u32,
    /// Failed blocks / blocks run on the targeted agents since admission.
    #[serde(default)]
    pub error_rate: Option<f64>,
    /// Blocks to observe before the error rate counts.
    #[serde(default = "twenty")]
    pub min_blocks: u64,
}

fn one() -> u32 {
    1
}
fn twenty() -> u64 {
    20
}
fn full() -> f64 {
    1.0
}
fn minute() -> u64 {
    60_000
}

impl Default for RollbackTrigger {
    fn default() -> Self {
        RollbackTrigger {
            failed_acks: 1,
            error_rate: None,
            min_blocks: 20,
        }
    }
}

/// The spec of a Rollout object.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutSpec {
    /// Digest of a published bundle.
    pub bundle: String,
    #[serde(default)]
    pub target: Target,
    #[serde(default)]
    pub activation: Activation,
    /// Fraction of the targeted agents that must observe the bundle effective (0 < q ≤ 1).
    #[serde(default = "full")]
    pub quorum: f64,
    #[serde(default)]
    pub rollback: RollbackTrigger,
    /// How long agents may disagree before the rollout is rolled back.
    #[serde(default = "minute")]
    pub max_inconsistency_ms: u64,
    /// Bump to retry an intent whose transition ended (the id covers it).
    #[serde(default)]
    pub revision: u32,
}

impl RolloutSpec {
    /// Check the bounds serde cannot.
    pub fn check(&self) -> Result<(), String> {
        if !self.bundle.starts_with("sha256:") {
            return Err("`bundle` must be a bundle digest (`sha256:…`)".into());
        }
        if !(self.quorum > 0.0 && self.quorum <= 1.0) {
            return Err("`quorum` must be a fraction in (0, 1]".into());
        }
        if let Some(r) = self.rollback.error_rate
            && !(0.0..=1.0).contains(&r)
        {
            return Err("`rollback.error_rate` must be a fraction in [0, 1]".into());
        }
        if self.rollback.failed_acks == 0 {
            return Err("`rollback.failed_acks` must be at least 1".into());
        }
        Ok(())
    }

    /// The deterministic id of this intent: the same scope, bundle and revision always give
    /// the same id (publishing it twice is a no-op).
    pub fn transition_id(&self) -> String {
        let intent = serde_json::json!({
            "kind": "rollout",
            "target": self.target,
            "bundle": self.bundle,
            "revision": self.revision,
        });
        let d = mayfly_trust::digest_of(&intent).unwrap_or_default();
        format!("tr-{}", &d.trim_start_matches("sha256:")[..16.min(d.len())])
    }
}

/// Phases of a transition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TPhase {
    Planned,
    Admitted,
    Completed,
    Cancelled,
    Conflicted,
    Superseded,
    Aborted,
}

impl TPhase {
    /// Planned and admitted transitions hold their scope; the rest are over.
    pub fn active(self) -> bool {
        matches!(self, TPhase::Planned | TPhase::Admitted)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            TPhase::Planned => "planned",
            TPhase::Admitted => "admitted",
            TPhase::Completed => "completed",
            TPhase::Cancelled => "cancelled",
            TPhase::Conflicted => "conflicted",
            TPhase::Superseded => "superseded",
            TPhase::Aborted => "aborted",
        }
    }
}

/// Payload of `transition.changed`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TransitionChanged {
    pub id: String,
    pub phase: TPhase,
    pub reason: String,
    /// The Rollout object that declared it.
    pub rollout: String,
    /// The intent, carried on `planned` and `conflicted` (the fold needs nothing else).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<RolloutSpec>,
    /// What the decision was based on (counts, agents, baselines).
    #[serde(default)]
    pub evidence: Value,
}

/// A transition as folded.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Transition {
    pub id: String,
    pub rollout: String,
    pub spec: RolloutSpec,
    pub phase: TPhase,
    pub reason: String,
    pub planned_at: u64,
    pub planned_seq: u64,
    pub admitted_at: Option<u64>,
    /// Per-agent (ok, failed) block counters at admission (error-rate baseline).
    pub baseline: BTreeMap<String, (u64, u64)>,
    pub phases: Vec<PhaseRecord>,
}

/// One phase change, as the transition's history shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PhaseRecord {
    pub phase: TPhase,
    pub seq: u64,
    pub at: u64,
    pub reason: String,
}

/// Payload of `agent.reported`: an agent's applied bundle or refusal changed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub agent: String,
    pub pool: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Digest of the bundle the agent enforces (None: none).
    pub applied: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<Refusal>,
}

/// A bundle an agent would not apply, and why (a [`mayfly_trust::sign::SignError`] code).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub bundle: String,
    pub code: String,
    pub message: String,
}

/// What an agent tells the control plane on every report (soft state: liveness and counters
/// live in memory; a change of `applied`/`refused` is recorded as `agent.reported`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentReport {
    #[serde(flatten)]
    pub record: AgentRecord,
    /// Blocks finished and failed since the agent started.
    pub blocks_ok: u64,
    pub blocks_failed: u64,
    /// How often it reports (liveness is judged against it).
    pub interval_ms: u64,
}

/// The control plane's answer: the bundle the agent should enforce (None: none).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentAnswer {
    pub desired: Option<Signed>,
    /// The control plane's clock when it answered: agents judge policy expiry by it, never
    /// by their own clock (time-bound exceptions are immune to worker clock skew).
    #[serde(default)]
    pub now_ms: u64,
}

/// An agent as the controller sees it now.
#[derive(Clone, Debug, PartialEq)]
pub struct LiveAgent {
    pub report: AgentReport,
    pub last_seen_ms: u64,
}

impl LiveAgent {
    /// Heard from within three report intervals (and a second of slack).
    pub fn live(&self, now_ms: u64) -> bool {
        now_ms.saturating_sub(self.last_seen_ms)
            <= self
                .report
                .interval_ms
                .saturating_mul(3)
                .saturating_add(1000)
    }
}

impl ControlState {
    /// The bundle `pool`/`labels` should enforce: that of the latest-planned admitted or
    /// completed transition whose target matches (a rolled-back or cancelled one no longer
    /// counts, so the previous bundle is what agents return to).
    pub fn desired_bundle(&self, pool: &str, labels: &BTreeMap<String, String>) -> Option<&Signed> {
        self.transitions
            .values()
            .filter(|t| matches!(t.phase, TPhase::Admitted | TPhase::Completed))
            .filter(|t| t.spec.target.matches(pool, labels))
            .max_by_key(|t| t.planned_seq)
            .and_then(|t| self.bundles.get(&t.spec.bundle))
    }

    /// The active transition on `target`, if any.
    pub fn active_on(&self, target: &Target) -> Option<&Transition> {
        self.transitions
            .values()
            .find(|t| t.phase.active() && &t.spec.target == target)
    }

    /// The controller: the phase changes that are due now, each with its reason and evidence.
    /// Pure: the same stream, clock and reports give the same decisions.
    pub fn reconcile(
        &self,
        now_ms: u64,
        agents: &BTreeMap<String, LiveAgent>,
    ) -> Vec<TransitionChanged> {
        let mut out = Vec::new();
        for t in self.transitions.values().filter(|t| t.phase.active()) {
            let targeted: Vec<&LiveAgent> = agents
                .values()
                .filter(|a| a.live(now_ms))
                .filter(|a| {
                    t.spec
                        .target
                        .matches(&a.report.record.pool, &a.report.record.labels)
                })
                .collect();
            let change = |phase, reason: String, evidence: Value| TransitionChanged {
                id: t.id.clone(),
                phase,
                reason,
                rollout: t.rollout.clone(),
                spec: None,
                evidence,
            };
            match t.phase {
                TPhase::Planned => {
                    let due = t.planned_at.saturating_add(t.spec.activation.after_ms);
                    if now_ms < due || targeted.is_empty() {
                        continue;
                    }
                    let baseline: BTreeMap<String, (u64, u64)> = targeted
                        .iter()
                        .map(|a| {
                            (
                                a.report.record.agent.clone(),
                                (a.report.blocks_ok, a.report.blocks_failed),
                            )
                        })
                        .collect();
                    out.push(change(
                        TPhase::Admitted,
                        format!(
                            "activation condition met; {} targeted agent(s) fetch the bundle",
                            targeted.len()
                        ),
                        serde_json::json!({"targeted": baseline.keys().collect::<Vec<_>>(), "baseline": baseline}),
                    ));
                }
                TPhase::Admitted => {
                    if let Some(c) = self.judge(t, &targeted, now_ms) {
                        let completed = c.phase == TPhase::Completed;
                        out.push(c);
                        if completed {
                            let already: Vec<String> = out
                                .iter()
                                .filter(|c| c.phase == TPhase::Superseded)
                                .map(|c| c.id.clone())
                                .collect();
                            for old in self.transitions.values().filter(|o| {
                                o.phase == TPhase::Completed
                                    && o.spec.target == t.spec.target
                                    && !already.contains(&o.id)
                            }) {
                                out.push(TransitionChanged {
                                    id: old.id.clone(),
                                    phase: TPhase::Superseded,
                                    reason: format!("superseded by {} on the same scope", t.id),
                                    rollout: old.rollout.clone(),
                                    spec: None,
                                    evidence: serde_json::json!({"by": t.id}),
                                });
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        out
    }

    /// Decide an admitted transition: completed on quorum, aborted on a rollback trigger.
    fn judge(
        &self,
        t: &Transition,
        targeted: &[&LiveAgent],
        now_ms: u64,
    ) -> Option<TransitionChanged> {
        let recorded = |id: &str| self.agents.get(id);
        let effective: Vec<&str> = targeted
            .iter()
            .map(|a| a.report.record.agent.as_str())
            .filter(|id| {
                recorded(id).and_then(|r| r.applied.as_deref()) == Some(t.spec.bundle.as_str())
            })
            .collect();
        let refused: Vec<&str> = targeted
            .iter()
            .map(|a| a.report.record.agent.as_str())
            .filter(|id| {
                recorded(id)
                    .and_then(|r| r.refused.as_ref())
                    .is_some_and(|r| r.bundle == t.spec.bundle)
            })
            .collect();
        let (mut ran, mut failed) = (0u64, 0u64);
        for a in targeted {
            // Only agents admitted with a baseline count: a late joiner's lifetime counters
            // say nothing about this bundle.
            let Some(&(ok0, f0)) = t.baseline.get(&a.report.record.agent) else {
                continue;
            };
            let f = a.report.blocks_failed.saturating_sub(f0);
            ran = ran.saturating_add(a.report.blocks_ok.saturating_sub(ok0).saturating_add(f));
            failed = failed.saturating_add(f);
        }
        // The quorum is of every agent targeted at admission (one that went silent since
        // still counts, never as effective) and every live one targeted now.
        let population = t
            .baseline
            .keys()
            .map(String::as_str)
            .chain(targeted.iter().map(|a| a.report.record.agent.as_str()))
            .collect::<std::collections::BTreeSet<_>>()
            .len();
        let need = ((t.spec.quorum * population as f64).ceil() as usize).max(1);
        let evidence = serde_json::json!({
            "targeted": population,
            "effective": effective,
            "refused": refused,
            "quorum": need,
            "blocks": ran,
            "failed_blocks": failed,
        });
        let change = |phase, reason: String| {
            Some(TransitionChanged {
                id: t.id.clone(),
                phase,
                reason,
                rollout: t.rollout.clone(),
                spec: None,
                evidence: evidence.clone(),
            })
        };
        if refused.len() >= t.spec.rollback.failed_acks as usize {
            return change(
                TPhase::Aborted,
                format!(
                    "rolled back: {} agent(s) refused the bundle (trigger: {} failed ack(s))",
                    refused.len(),
                    t.spec.rollback.failed_acks
                ),
            );
        }
        if let Some(max) = t.spec.rollback.error_rate
            && ran >= t.spec.rollback.min_blocks
            && ran > 0
            && failed as f64 / ran as f64 >= max
        {
            return change(
                TPhase::Aborted,
                format!(
                    "rolled back: {failed} of {ran} blocks failed since admission (trigger: error rate {max})"
                ),
            );
        }
        if !targeted.is_empty() && effective.len() >= need {
            return change(
                TPhase::Completed,
                format!(
                    "{} of {} targeted agent(s) observe the bundle effective (quorum {need})",
                    effective.len(),
                    targeted.len()
                ),
            );
        }
        let since = t.admitted_at.unwrap_or(t.planned_at);
        if now_ms.saturating_sub(since) > t.spec.max_inconsistency_ms {
            return change(
                TPhase::Aborted,
                format!(
                    "rolled back: {} of {} agent(s) effective after {} ms (max inconsistency window {} ms, quorum {need})",
                    effective.len(),
                    targeted.len(),
                    now_ms.saturating_sub(since),
                    t.spec.max_inconsistency_ms
                ),
            );
        }
        None
    }

    /// Fold a `transition.changed` payload (the model's fold calls this).
    pub(crate) fn fold_transition(
        &mut self,
        c: TransitionChanged,
        seq: u64,
        at: u64,
    ) -> Result<(), String> {
        let record = PhaseRecord {
            phase: c.phase,
            seq,
            at,
            reason: c.reason.clone(),
        };
        if let Some(spec) = c.spec {
            // A conflicted intent may be declared again (and conflict again, or be planned
            // once its scope is free); any other id is planned once.
            let mut phases = Vec::new();
            if let Some(old) = self.transitions.get(&c.id) {
                if old.phase != TPhase::Conflicted {
                    return Err(format!("transition {} planned twice", c.id));
                }
                phases = old.phases.clone();
            }
            if !matches!(c.phase, TPhase::Planned | TPhase::Conflicted) {
                return Err(format!("transition {} starts {}", c.id, c.phase.as_str()));
            }
            phases.push(record);
            self.transitions.insert(
                c.id.clone(),
                Transition {
                    id: c.id.clone(),
                    rollout: c.rollout,
                    spec,
                    phase: c.phase,
                    reason: c.reason,
                    planned_at: at,
                    planned_seq: seq,
                    admitted_at: None,
                    baseline: BTreeMap::new(),
                    phases,
                },
            );
            return Ok(());
        }
        let t = self
            .transitions
            .get_mut(&c.id)
            .ok_or_else(|| format!("unknown transition {}", c.id))?;
        let allowed = matches!(
            (t.phase, c.phase),
            (
                TPhase::Planned,
                TPhase::Admitted | TPhase::Cancelled | TPhase::Aborted
            ) | (
                TPhase::Admitted,
                TPhase::Completed | TPhase::Cancelled | TPhase::Aborted
            ) | (TPhase::Completed, TPhase::Superseded)
        );
        if !allowed {
            return Err(format!(
                "transition {} cannot go from {} to {}",
                c.id,
                t.phase.as_str(),
                c.phase.as_str()
            ));
        }
        if c.phase == TPhase::Admitted {
            t.admitted_at = Some(at);
            if let Some(b) = c.evidence.get("baseline")
                && let Ok(b) = BTreeMap::<String, (u64, u64)>::deserialize(b)
            {
                t.baseline = b;
            }
        }
        t.phase = c.phase;
        t.reason = c.reason;
        t.phases.push(record);
        Ok(())
    }
}

impl ControlState {
    /// An object's status. A WorkerPool is observed through the agents that reported
    /// against it; a Rollout through its transition; other kinds take effect when stored.
    pub fn status_of(&self, o: &crate::model::Object) -> crate::model::Status {
        use crate::model::{Condition, Phase, Status};
        let status = |phase, observed, kind: &str, ok, reason: &str, message: String| Status {
            phase,
            desired_generation: o.generation,
            observed_generation: observed,
            conditions: vec![Condition {
                kind: kind.into(),
                status: ok,
                reason: reason.into(),
                message,
            }],
        };
        match o.key.kind {
            Kind::WorkerPool => {
                let agents: Vec<&str> = self
                    .agents
                    .values()
                    .filter(|a| a.pool == o.key.name)
                    .map(|a| a.agent.as_str())
                    .collect();
                if agents.is_empty() {
                    status(
                        Phase::Pending,
                        0,
                        "Observed",
                        false,
                        "NoAgentReports",
                        "no worker has reported against this pool yet".into(),
                    )
                } else {
                    status(
                        Phase::Ready,
                        o.generation,
                        "Observed",
                        true,
                        "AgentsReporting",
                        format!(
                            "{} agent(s) have reported against this pool: {}",
                            agents.len(),
                            agents.join(", ")
                        ),
                    )
                }
            }
            Kind::Rollout => {
                let spec = RolloutSpec::deserialize(&o.spec).ok();
                let t = spec
                    .as_ref()
                    .and_then(|s| self.transitions.get(&s.transition_id()));
                let Some(t) = t else {
                    return status(
                        Phase::Pending,
                        0,
                        "Transition",
                        false,
                        "NotPlanned",
                        "no transition is recorded for this rollout".into(),
                    );
                };
                let msg = format!("transition {} {}: {}", t.id, t.phase.as_str(), t.reason);
                let waiting = t.phase == TPhase::Planned;
                let (phase, ok, reason) = match t.phase {
                    TPhase::Planned => (Phase::Pending, false, "Planned"),
                    TPhase::Admitted => (Phase::Progressing, false, "Admitted"),
                    TPhase::Completed => (Phase::Ready, true, "Completed"),
                    TPhase::Superseded => (Phase::Ready, true, "Superseded"),
                    TPhase::Cancelled => (Phase::Failed, false, "Cancelled"),
                    TPhase::Conflicted => (Phase::Failed, false, "Conflicted"),
                    TPhase::Aborted => (Phase::Failed, false, "RolledBack"),
                };
                let reason = if waiting
                    && !self
                        .agents
                        .values()
                        .any(|a| t.spec.target.matches(&a.pool, &a.labels))
                {
                    "NoMatchingAgents"
                } else {
                    reason
                };
                let observed = if phase.is_terminal() { o.generation } else { 0 };
                status(phase, observed, "Transition", ok, reason, msg)
            }
            Kind::Actor => {
                use mayfly_actor_api::ActorPhase as A;
                let tenant = o.key.tenant.as_deref().unwrap_or_default();
                let rec = self.actors.get(&crate::dataplane::key(tenant, &o.key.name));
                let Some(a) = rec else {
                    return status(
                        Phase::Ready,
                        o.generation,
                        "Placed",
                        false,
                        "Suspended",
                        "never run: resumed on its first request".into(),
                    );
                };
                let msg = format!(
                    "{:?} at epoch {}{}{} ({})",
                    a.phase,
                    a.epoch,
                    a.worker
                        .as_deref()
                        .map(|w| format!(" on {w}"))
                        .unwrap_or_default(),
                    a.snapshot
                        .as_deref()
                        .map(|s| format!(", last snapshot {s}"))
                        .unwrap_or_default(),
                    a.reason
                );
                match a.phase {
                    A::Running => {
                        status(Phase::Ready, o.generation, "Placed", true, "Running", msg)
                    }
                    A::Suspended => status(
                        Phase::Ready,
                        o.generation,
                        "Placed",
                        false,
                        "Suspended",
                        msg,
                    ),
                    A::Resuming => status(Phase::Progressing, 0, "Placed", false, "Resuming", msg),
                    A::Checkpointing => {
                        status(Phase::Progressing, 0, "Placed", true, "Checkpointing", msg)
                    }
                    A::Failed => {
                        status(Phase::Failed, o.generation, "Placed", false, "Failed", msg)
                    }
                }
            }
            Kind::ActorTemplate => {
                let tenant = o.key.tenant.as_deref().unwrap_or_default();
                let wd =
                    serde_json::from_value::<crate::dataplane::ActorTemplateSpec>(o.spec.clone())
                        .map(|t| t.workload.digest())
                        .unwrap_or_default();
                let golden =
                    self.goldens
                        .get(&crate::dataplane::golden_key(tenant, &o.key.name, &wd));
                let wants = o.spec.get("golden").and_then(Value::as_bool) != Some(false);
                match (wants, golden) {
                    (true, None) => status(
                        Phase::Pending,
                        0,
                        "Golden",
                        false,
                        "NoGoldenSnapshot",
                        "the golden snapshot is taken on the first resume of an actor".into(),
                    ),
                    (true, Some(d)) => status(
                        Phase::Ready,
                        o.generation,
                        "Golden",
                        true,
                        "GoldenRecorded",
                        format!("golden snapshot {d}"),
                    ),
                    (false, _) => o.status(),
                }
            }
            Kind::Tenant => {
                let env = o.spec.get("environment").and_then(Value::as_str);
                match env {
                    Some(e)
                        if !self.objects.contains_key(&ObjectKey {
                            kind: Kind::Environment,
                            tenant: None,
                            name: e.to_owned(),
                        }) =>
                    {
                        status(
                            Phase::Degraded,
                            o.generation,
                            "Environment",
                            false,
                            "UnknownEnvironment",
                            format!(
                                "environment `{e}` does not exist: its environment layer of policies cannot apply"
                            ),
                        )
                    }
                    _ => o.status(),
                }
            }
            _ => o.status(),
        }
    }
}
