//! The actor dataplane's durable state and its pure decisions (DESIGN §6).
//!
//! Desired state is two kinds of objects: an **ActorTemplate** (sandbox class and workload,
//! checkpoint scopes per trigger, idle timeout, golden snapshots on or off, worker selector)
//! and an **Actor** (its template). Everything observed is recorded in the same `control`
//! stream, so replay reproduces it:
//!
//! * `provider.registered` — a [`ProviderRecord`]: enrolled identity (certificate
//!   fingerprint) and endpoint; later its incarnation, contract and capabilities.
//! * `worker.changed` — a [`WorkerRecord`]: class, slots, labels, and `lost` once its lease
//!   expired. Leases themselves are soft (heartbeats never write the log); only a change of
//!   health is recorded.
//! * `actor.changed` — an [`ActorRecord`]: phase, assignment epoch, worker, the pending op
//!   (recorded *before* the provider is called, with a deterministic op id, so a control
//!   plane that dies mid-op re-issues the same id), and the last good snapshot.
//! * `snapshot.recorded` — a [`SnapshotRecord`]: the control-plane-signed manifest envelope
//!   of a checkpoint (or of a template's golden snapshot).
//!
//! The fold enforces the invariants: an actor's epoch never moves backwards, an actor
//! references only recorded snapshots and workers, and a snapshot's envelope is the
//! descriptor it claims.

use crate::model::{ControlState, Kind, ObjectKey};
use mayfly_actor_api::{
    ActorPhase, Capabilities, CheckpointPolicy, Descriptor, Scope, Workload, is_name,
};
use mayfly_trust::sign::Signed;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// How long a worker's lease lasts without a heartbeat.
pub const DEFAULT_LEASE_MS: u64 = 6_000;

fn default_idle() -> u64 {
    60_000
}
fn yes() -> bool {
    true
}

/// `ActorTemplate.spec`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActorTemplateSpec {
    pub workload: Workload,
    #[serde(default)]
    pub checkpoint: CheckpointPolicy,
    /// Checkpoint and release the slot after this long without a request (0: never).
    #[serde(
        default = "default_idle",
        rename = "idleTimeoutMs",
        alias = "idle_timeout_ms"
    )]
    pub idle_timeout_ms: u64,
    /// The first run of an actor restores the template's golden snapshot.
    #[serde(default = "yes")]
    pub golden: bool,
    /// Worker labels an actor of this template needs.
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    /// Secrets delivered fresh on every start and restore: name → keychain reference
    /// (`alias` for the whole credential, `alias.field` for one field), resolved in the
    /// actor's tenant; also served by the credential broker to the current epoch only.
    #[serde(default)]
    pub secrets: BTreeMap<String, String>,
}

impl ActorTemplateSpec {
    pub fn check(&self) -> Result<(), String> {
        self.workload
            .check()
            .map_err(|e| format!("workload: {}", e.message))?;
        self.checkpoint
            .check()
            .map_err(|e| format!("checkpoint: {}", e.message))?;
        for (name, reference) in &self.secrets {
            if !is_name(name, 128) || reference.is_empty() {
                return Err(format!(
                    "secrets.{name}: a name of [A-Za-z0-9._:-] and a keychain `alias` or `alias.field`"
                ));
            }
        }
        Ok(())
    }

    /// The scope a pause (idle, move) captures: the widest OnPause scope; when the template
    /// names none, the widest its worker's provider offers (`offered`).
    pub fn pause_scope(&self, offered: &[Scope]) -> Scope {
        let from: &[Scope] = if self.checkpoint.on_pause.is_empty() {
            offered
        } else {
            &self.checkpoint.on_pause
        };
        if from.contains(&Scope::Full) {
            Scope::Full
        } else {
            Scope::Data
        }
    }
}

/// `Actor.spec`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActorObjectSpec {
    pub template: String,
}

/// Actor names travel to providers as actor ids: they must be provider-safe names.
pub fn check_actor_name(name: &str) -> Result<(), String> {
    if !is_name(name, 64) || name.contains('/') {
        return Err(format!(
            "actor name `{name}` must be at most 64 characters of [a-z0-9._-]"
        ));
    }
    Ok(())
}

/// An enrolled provider.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProviderRecord {
    pub id: String,
    /// The provider API's base URL (`https://host:port`).
    pub endpoint: String,
    /// sha256 of the enrolled certificate: the provider's identity.
    pub fingerprint: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incarnation: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Capabilities>,
}

/// A worker (one sandbox class's slot pool on a provider).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkerRecord {
    pub id: String,
    pub provider: String,
    pub class: String,
    pub slots: u32,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Its lease expired (no heartbeat): nothing runs on it until it heartbeats again.
    pub lost: bool,
}

/// An op recorded as issued before the provider is called.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingOp {
    pub id: String,
    pub action: String,
}

/// The observed state of an Actor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ActorRecord {
    pub tenant: String,
    pub name: String,
    pub template: String,
    pub phase: ActorPhase,
    /// The assignment epoch: every placement and every fence raises it.
    pub epoch: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub op: Option<PendingOp>,
    /// Digest of the last good snapshot (a failed checkpoint never replaces it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// Why the last change happened (machine-readable).
    pub reason: String,
}

/// A verified, control-plane-signed snapshot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub tenant: String,
    pub template: String,
    /// None for a template's golden snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    pub descriptor: Descriptor,
    pub envelope: Signed,
    /// Bytes of blob data.
    pub data_size: u64,
}

/// `tenant/name`: the key of actors.
pub fn key(tenant: &str, name: &str) -> String {
    format!("{tenant}/{name}")
}

/// The key of a golden snapshot: per template *and* workload, so a changed workload gets a
/// golden image of its own instead of one it cannot restore.
pub fn golden_key(tenant: &str, template: &str, workload_digest: &str) -> String {
    format!("{tenant}/{template}@{workload_digest}")
}

impl SnapshotRecord {
    /// The workload digest the signed manifest is bound to.
    pub fn workload_digest(&self) -> &str {
        self.envelope
            .body
            .get("workload_digest")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
    }
}

/// The deterministic op id of `action` on an actor at `epoch` (a retry after a crash
/// re-issues the same id; the provider answers the first result).
///
/// Tenants and actor names may both contain `.`, so the actor is named by a digest of
/// `tenant \0 name`: `t1.a`/`b` and `t1`/`a.b` get different ids (a provider journals ops
/// by id alone), and the id stays within a provider's 128-character limit for any names.
pub fn op_id(tenant: &str, name: &str, epoch: u64, action: &str) -> String {
    format!("{action}.e{epoch}.{}", actor_tag(tenant, name))
}

/// 32 hex digits naming `tenant`'s actor `name` unambiguously (128 bits of sha256).
pub fn actor_tag(tenant: &str, name: &str) -> String {
    let d = mayfly_trust::sha256_digest(format!("{tenant}\0{name}").as_bytes());
    d["sha256:".len().."sha256:".len() + 32].to_owned()
}

/// A worker's soft liveness: lease expiry and slots in use, from heartbeats.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Lease {
    pub expires_ms: u64,
    pub used: u32,
}

impl ControlState {
    pub(crate) fn fold_provider(&mut self, p: ProviderRecord) -> Result<(), String> {
        if p.fingerprint.is_empty() || !is_name(&p.id, 64) {
            return Err("a provider needs an id and a certificate fingerprint".into());
        }
        self.providers.insert(p.id.clone(), p);
        Ok(())
    }

    pub(crate) fn fold_worker(&mut self, w: WorkerRecord) -> Result<(), String> {
        if !self.providers.contains_key(&w.provider) {
            return Err(format!(
                "worker {} of unknown provider {}",
                w.id, w.provider
            ));
        }
        self.workers.insert(w.id.clone(), w);
        Ok(())
    }

    pub(crate) fn fold_actor(&mut self, a: ActorRecord) -> Result<(), String> {
        let k = key(&a.tenant, &a.name);
        if let Some(old) = self.actors.get(&k)
            && a.epoch < old.epoch
        {
            return Err(format!(
                "actor {k}: epoch {} moves backwards from {}",
                a.epoch, old.epoch
            ));
        }
        if let Some(s) = &a.snapshot
            && !self.snapshots.contains_key(s)
        {
            return Err(format!("actor {k} references unrecorded snapshot {s}"));
        }
        if let Some(w) = &a.worker
            && !self.workers.contains_key(w)
        {
            return Err(format!("actor {k} placed on unknown worker {w}"));
        }
        if matches!(a.phase, ActorPhase::Running | ActorPhase::Resuming) && a.worker.is_none() {
            return Err(format!("actor {k} is {:?} on no worker", a.phase));
        }
        self.actors.insert(k, a);
        Ok(())
    }

    pub(crate) fn fold_snapshot(&mut self, s: SnapshotRecord) -> Result<(), String> {
        if s.envelope.digest != s.descriptor.digest {
            return Err("the envelope is not the descriptor's manifest".into());
        }
        if s.actor.is_none() {
            self.goldens.insert(
                golden_key(&s.tenant, &s.template, s.workload_digest()),
                s.descriptor.digest.clone(),
            );
        }
        self.snapshots.insert(s.descriptor.digest.clone(), s);
        Ok(())
    }

    /// The template of an actor object, parsed.
    pub fn template_of(&self, tenant: &str, template: &str) -> Option<ActorTemplateSpec> {
        let o = self.objects.get(&ObjectKey {
            kind: Kind::ActorTemplate,
            tenant: Some(tenant.into()),
            name: template.into(),
        })?;
        serde_json::from_value(o.spec.clone()).ok()
    }

    /// The declared Actor object's template name.
    pub fn actor_template(&self, tenant: &str, name: &str) -> Option<String> {
        let o = self.objects.get(&ObjectKey {
            kind: Kind::Actor,
            tenant: Some(tenant.into()),
            name: name.into(),
        })?;
        serde_json::from_value::<ActorObjectSpec>(o.spec.clone())
            .ok()
            .map(|s| s.template)
    }

    /// Pick a worker for an actor of `tpl`: healthy with an unexpired lease, the template's
    /// sandbox class and selector, a provider advertising the scopes its checkpoints need,
    /// and a free slot; the most free slots wins, then the lowest id (deterministic).
    /// `avoid` excludes a worker (a move goes elsewhere).
    pub fn schedule(
        &self,
        tpl: &ActorTemplateSpec,
        leases: &BTreeMap<String, Lease>,
        now_ms: u64,
        avoid: Option<&str>,
    ) -> Result<String, String> {
        let class = tpl.workload.class();
        // The scopes its checkpoints need; a template that names none needs some scope (it
        // is suspended when idle and moved by checkpoint).
        let mut need: Vec<Scope> = tpl.checkpoint.on_pause.clone();
        need.extend(tpl.checkpoint.on_commit.iter().copied());
        let mut best: Option<(u32, &str)> = None;
        let mut why = Vec::new();
        for w in self.workers.values() {
            if Some(w.id.as_str()) == avoid {
                continue;
            }
            if w.class != class {
                continue;
            }
            let lease = leases.get(&w.id);
            if w.lost || lease.is_none_or(|l| l.expires_ms <= now_ms) {
                why.push(format!("{}: no live lease", w.id));
                continue;
            }
            if !tpl.selector.iter().all(|(k, v)| w.labels.get(k) == Some(v)) {
                why.push(format!("{}: selector", w.id));
                continue;
            }
            let caps = self
                .providers
                .get(&w.provider)
                .and_then(|p| p.capabilities.as_ref());
            if !caps.is_some_and(|c| {
                c.classes.iter().any(|x| x == class)
                    && !c.scopes.is_empty()
                    && need.iter().all(|s| c.scopes.contains(s))
            }) {
                why.push(format!("{}: lacks scopes {need:?}", w.id));
                continue;
            }
            let used = lease.map_or(0, |l| l.used);
            let free = w.slots.saturating_sub(used);
            if free == 0 {
                why.push(format!("{}: no free slot", w.id));
                continue;
            }
            if best.is_none_or(|(f, id)| free > f || (free == f && w.id.as_str() < id)) {
                best = Some((free, &w.id));
            }
        }
        best.map(|(_, id)| id.to_owned()).ok_or_else(|| {
            if why.is_empty() {
                format!("no worker runs sandbox class `{class}`")
            } else {
                format!("no worker can take it ({})", why.join("; "))
            }
        })
    }

    /// Healthy workers whose lease has expired.
    pub fn expired_workers(&self, leases: &BTreeMap<String, Lease>, now_ms: u64) -> Vec<String> {
        self.workers
            .values()
            .filter(|w| !w.lost && leases.get(&w.id).is_none_or(|l| l.expires_ms <= now_ms))
            .map(|w| w.id.clone())
            .collect()
    }

    /// What a lost worker means for its actors: every one not suspended is reset to
    /// Suspended, off the worker, with its epoch raised (fencing anything the lost worker
    /// may still serve); its last good snapshot is kept for a restore elsewhere.
    pub fn fence_worker(&self, worker: &str, reason: &str) -> Vec<ActorRecord> {
        self.actors
            .values()
            .filter(|a| a.worker.as_deref() == Some(worker))
            .map(|a| ActorRecord {
                phase: ActorPhase::Suspended,
                epoch: a.epoch + 1,
                worker: None,
                op: None,
                reason: reason.into(),
                ..a.clone()
            })
            .collect()
    }

    /// Actors of a tenant visible to it.
    pub fn actors_of(&self, tenant: Option<&str>) -> Vec<&ActorRecord> {
        self.actors
            .values()
            .filter(|a| tenant.is_none_or(|t| a.tenant == t))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mayfly_actor_api::{CheckpointKind, Format, Overhead, Readiness};

    fn tpl(selector: &[(&str, &str)]) -> ActorTemplateSpec {
        ActorTemplateSpec {
            workload: Workload::Process {
                command: "x".into(),
                args: vec![],
                env: BTreeMap::new(),
                durable_dirs: vec![],
                readiness: Readiness::default(),
            },
            checkpoint: CheckpointPolicy::default(),
            idle_timeout_ms: 0,
            golden: true,
            selector: selector
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
            secrets: BTreeMap::new(),
        }
    }

    fn caps(scopes: Vec<Scope>) -> Capabilities {
        Capabilities {
            contract: mayfly_actor_api::CONTRACT_VERSION.into(),
            classes: vec!["process".into()],
            scopes,
            kinds: vec![CheckpointKind::External],
            formats: vec![Format {
                id: "f".into(),
                version: 1,
            }],
            golden_restore: true,
            overhead: Overhead::default(),
        }
    }

    fn state() -> ControlState {
        let mut st = ControlState::default();
        for (p, scopes) in [
            ("p1", vec![Scope::Data]),
            ("p2", vec![Scope::Data, Scope::Full]),
        ] {
            st.fold_provider(ProviderRecord {
                id: p.into(),
                endpoint: format!("https://{p}"),
                fingerprint: format!("sha256:{p}"),
                incarnation: Some("i".into()),
                capabilities: Some(caps(scopes)),
            })
            .unwrap();
        }
        for (w, p, slots, zone) in [("w1", "p1", 2, "a"), ("w2", "p2", 4, "b")] {
            st.fold_worker(WorkerRecord {
                id: w.into(),
                provider: p.into(),
                class: "process".into(),
                slots,
                labels: BTreeMap::from([("zone".into(), zone.into())]),
                lost: false,
            })
            .unwrap();
        }
        st
    }

    fn leases(used: &[(&str, u32)], expires: u64) -> BTreeMap<String, Lease> {
        used.iter()
            .map(|(w, u)| {
                (
                    (*w).to_owned(),
                    Lease {
                        expires_ms: expires,
                        used: *u,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn scheduling_matches_class_selector_scopes_then_free_slots() {
        let st = state();
        let l = leases(&[("w1", 0), ("w2", 0)], 1_000);
        assert_eq!(
            st.schedule(&tpl(&[]), &l, 10, None).unwrap(),
            "w2",
            "most free"
        );
        let l2 = leases(&[("w1", 0), ("w2", 3)], 1_000);
        assert_eq!(st.schedule(&tpl(&[]), &l2, 10, None).unwrap(), "w1");
        assert_eq!(
            st.schedule(&tpl(&[("zone", "a")]), &l, 10, None).unwrap(),
            "w1"
        );
        assert_eq!(st.schedule(&tpl(&[]), &l, 10, Some("w2")).unwrap(), "w1");
        let mut full = tpl(&[]);
        full.checkpoint.on_pause = vec![Scope::Full];
        assert_eq!(st.schedule(&full, &l, 10, None).unwrap(), "w2");
        assert!(
            st.schedule(&full, &l, 10, Some("w2"))
                .unwrap_err()
                .contains("lacks scopes")
        );
        // Expired leases and full workers place nothing.
        assert!(st.schedule(&tpl(&[]), &l, 2_000, None).is_err());
        let busy = leases(&[("w1", 2), ("w2", 4)], 1_000);
        assert!(
            st.schedule(&tpl(&[]), &busy, 10, None)
                .unwrap_err()
                .contains("no free slot")
        );
        let mut wasm = tpl(&[]);
        wasm.workload = Workload::Wasm {
            module: mayfly_trust::sha256_digest(b"m"),
            handler: "handle".into(),
        };
        assert!(
            st.schedule(&wasm, &l, 10, None)
                .unwrap_err()
                .contains("sandbox class `wasm`")
        );
    }

    #[test]
    fn a_lost_worker_fences_its_actors_and_epochs_never_move_back() {
        let mut st = state();
        let a = ActorRecord {
            tenant: "t".into(),
            name: "a".into(),
            template: "tpl".into(),
            phase: ActorPhase::Running,
            epoch: 3,
            worker: Some("w1".into()),
            op: None,
            snapshot: None,
            reason: "Resumed".into(),
        };
        st.fold_actor(a.clone()).unwrap();
        let l = leases(&[("w1", 1), ("w2", 0)], 1_000);
        assert!(st.expired_workers(&l, 10).is_empty());
        assert_eq!(st.expired_workers(&l, 1_000), vec!["w1", "w2"]);
        let fenced = st.fence_worker("w1", "WorkerLost");
        assert_eq!(fenced.len(), 1);
        assert_eq!(fenced[0].phase, ActorPhase::Suspended);
        assert_eq!(fenced[0].epoch, 4);
        assert_eq!(fenced[0].worker, None);
        st.fold_actor(fenced[0].clone()).unwrap();
        let back = ActorRecord {
            epoch: 2,
            ..a.clone()
        };
        assert!(st.fold_actor(back).unwrap_err().contains("backwards"));
        let nowhere = ActorRecord {
            worker: None,
            epoch: 5,
            ..a.clone()
        };
        assert!(st.fold_actor(nowhere).unwrap_err().contains("on no worker"));
        let phantom = ActorRecord {
            epoch: 5,
            snapshot: Some("sha256:none".into()),
            ..a
        };
        assert!(st.fold_actor(phantom).unwrap_err().contains("unrecorded"));
    }

    #[test]
    fn op_ids_are_deterministic_and_provider_safe() {
        let id = op_id("acme", "counter-1", 7, "restore");
        assert_eq!(id, op_id("acme", "counter-1", 7, "restore"));
        assert!(id.starts_with("restore.e7.") && is_name(&id, 128), "{id}");
        // Dots in tenants and names cannot make two actors share an id.
        assert_ne!(op_id("t1.a", "b", 1, "run"), op_id("t1", "a.b", 1, "run"));
        assert_ne!(op_id("t1", "a", 1, "run"), op_id("t1", "a", 2, "run"));
        assert_ne!(op_id("t1", "a", 1, "run"), op_id("t1", "a", 1, "pause"));
        let long = "x".repeat(128);
        assert!(is_name(&op_id(&long, &long, u64::MAX, "restore"), 128));
        assert!(check_actor_name("counter-1").is_ok());
        assert!(check_actor_name("a/b").is_err());
    }

    #[test]
    fn template_specs_are_checked() {
        let bad: Result<ActorTemplateSpec, _> = serde_json::from_value(serde_json::json!({
            "workload": {"class": "process", "command": "x"},
            "checkpoint": {"onPause": ["data"], "onCommit": ["full"]},
        }));
        let bad = bad.unwrap();
        assert!(bad.check().unwrap_err().contains("subset"));
        let ok: ActorTemplateSpec = serde_json::from_value(serde_json::json!({
            "workload": {"class": "process", "command": "x", "durable_dirs": ["data"]},
            "idleTimeoutMs": 500,
        }))
        .unwrap();
        assert!(ok.check().is_ok());
        assert_eq!((ok.idle_timeout_ms, ok.golden), (500, true));
        assert_eq!(ok.pause_scope(&[Scope::Data]), Scope::Data);
        assert_eq!(
            ok.pause_scope(&[Scope::Full]),
            Scope::Full,
            "the provider's offer"
        );
        let mut named = ok.clone();
        named.checkpoint.on_pause = vec![Scope::Data];
        assert_eq!(named.pause_scope(&[Scope::Full, Scope::Data]), Scope::Data);
    }
}
