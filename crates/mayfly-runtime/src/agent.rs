//! The data-plane agent of a worker process: it fetches the policy bundle the control plane
//! wants it to enforce, verifies the signature against the keys it trusts, applies it, and
//! acknowledges what it applied (or why it refused) on every report. Blocks are checked
//! against the applied bundle before they run — the worker enforces policy itself instead
//! of trusting that admission saw the same policies.

use mayfly_control::rollout::{AgentAnswer, AgentRecord, AgentReport, BundleBody, Refusal};
use mayfly_control::{AdmissionRequest, ControlState};
use mayfly_trust::sign::{Signed, TrustedKey};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// The answer to a report, on its way.
pub type HubFuture<'a> = Pin<Box<dyn Future<Output = Result<AgentAnswer, String>> + Send + 'a>>;

/// Where an agent reports: the control plane in process, or over NATS to the server.
pub trait AgentHub: Send + Sync + 'static {
    fn report(&self, report: AgentReport) -> HubFuture<'_>;
}

impl AgentHub for mayfly_control::Control {
    fn report(&self, report: AgentReport) -> HubFuture<'_> {
        Box::pin(async move { self.agent_report(report).await.map_err(|e| e.to_string()) })
    }
}

/// Who the agent is and whom it trusts.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub id: String,
    pub pool: String,
    pub labels: BTreeMap<String, String>,
    /// Keys whose signatures it accepts (none: it refuses every bundle, `unknown_key`).
    pub trusted: Vec<TrustedKey>,
    pub interval: Duration,
}

struct Applied {
    digest: String,
    policies: ControlState,
}

/// One worker process's agent.
pub struct Agent {
    cfg: AgentConfig,
    applied: RwLock<Option<Applied>>,
    refused: Mutex<Option<Refusal>>,
    /// The bundle the control plane last asked it to enforce (None: no bundle in force).
    wanted: Mutex<Option<String>>,
    ok: AtomicU64,
    failed: AtomicU64,
    /// Control plane clock minus this process's, as of the last answer.
    skew_ms: std::sync::atomic::AtomicI64,
    /// Whether the control plane has answered once (workers take no block before).
    synced: tokio::sync::watch::Sender<bool>,
}

impl Agent {
    pub fn new(cfg: AgentConfig) -> Agent {
        Agent {
            cfg,
            applied: RwLock::new(None),
            refused: Mutex::new(None),
            wanted: Mutex::new(None),
            ok: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            skew_ms: std::sync::atomic::AtomicI64::new(0),
            synced: tokio::sync::watch::Sender::new(false),
        }
    }

    pub fn id(&self) -> &str {
        &self.cfg.id
    }

    /// Wait until the control plane has answered once: until then the agent cannot know
    /// whether a bundle is in force, so its workers take no block (fail closed).
    pub async fn ready(&self) {
        let mut rx = self.synced.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Whether a bundle is applied (blocks are checked only then).
    pub fn enforcing(&self) -> bool {
        self.applied
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Why this worker must run nothing: the control plane has a bundle in force and this
    /// agent holds none (it refused the bundle, say for an unknown signing key). Running
    /// unchecked would let through what the bundle forbids (fail closed).
    pub fn missing_bundle(&self) -> Option<String> {
        let wanted = self
            .wanted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()?;
        if self.enforcing() {
            return None;
        }
        let why = self
            .refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|r| format!(": it refused it ({}: {})", r.code, r.message))
            .unwrap_or_default();
        Some(format!(
            "policy bundle {wanted} is in force and worker `{}` holds none{why}",
            self.cfg.id
        ))
    }

    /// The digest of the bundle it enforces.
    pub fn applied(&self) -> Option<String> {
        self.applied
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|a| a.digest.clone())
    }

    /// Consider the bundle the control plane wants enforced: verify and apply it, or refuse
    /// it (keeping the bundle in force — a bad bundle never loosens or drops enforcement).
    /// `None` means no bundle: enforcement stops.
    pub fn offer(&self, desired: Option<&Signed>) {
        *self.wanted.lock().unwrap_or_else(|p| p.into_inner()) = desired.map(|b| b.digest.clone());
        let current = self.applied();
        let Some(bundle) = desired else {
            if current.is_some() {
                *self.applied.write().unwrap_or_else(|p| p.into_inner()) = None;
                tracing::info!(agent = %self.cfg.id, "policy bundle withdrawn");
            }
            *self.refused.lock().unwrap_or_else(|p| p.into_inner()) = None;
            return;
        };
        if current.as_deref() == Some(bundle.digest.as_str()) {
            return;
        }
        let verdict = bundle
            .verify(mayfly_trust::sign::Purpose::PolicyBundle, &self.cfg.trusted)
            .map_err(|e| (e.code().to_owned(), e.to_string()))
            .and_then(|()| {
                serde_json::from_value::<BundleBody>(bundle.body.clone())
                    .map_err(|e| ("malformed".to_owned(), format!("bundle body: {e}")))
            })
            .and_then(|b| {
                if b.format == mayfly_control::rollout::BUNDLE_FORMAT {
                    Ok(b)
                } else {
                    Err((
                        "malformed".to_owned(),
                        format!("unknown bundle format `{}`", b.format),
                    ))
                }
            });
        match verdict {
            Ok(body) => {
                *self.applied.write().unwrap_or_else(|p| p.into_inner()) = Some(Applied {
                    digest: bundle.digest.clone(),
                    policies: body.policy_state(),
                });
                *self.refused.lock().unwrap_or_else(|p| p.into_inner()) = None;
                tracing::info!(agent = %self.cfg.id, bundle = %bundle.digest, "policy bundle applied");
            }
            Err((code, message)) => {
                tracing::warn!(agent = %self.cfg.id, bundle = %bundle.digest, code, "policy bundle refused: {message}");
                *self.refused.lock().unwrap_or_else(|p| p.into_inner()) = Some(Refusal {
                    bundle: bundle.digest.clone(),
                    code,
                    message,
                });
            }
        }
    }

    /// Check a block against the applied bundle: the refusal reason, or None to run it.
    pub fn check(
        &self,
        tenant: &str,
        playbook: &str,
        tools: BTreeSet<String>,
        aliases: BTreeSet<String>,
    ) -> Option<String> {
        let g = self.applied.read().unwrap_or_else(|p| p.into_inner());
        let a = g.as_ref()?;
        let ex = a.policies.explain(&AdmissionRequest {
            tenant: tenant.to_owned(),
            playbook: playbook.to_owned(),
            now_ms: self.control_now(),
            tools,
            aliases,
            ..Default::default()
        });
        (!ex.allowed).then(|| format!("{} (bundle {})", ex.reason, a.digest))
    }

    /// The control plane's clock, as estimated from its last answer.
    pub fn control_now(&self) -> u64 {
        let local = mayfly_types::now_ms() as i64;
        (local + self.skew_ms.load(Ordering::Relaxed)).max(0) as u64
    }

    /// Take the control plane's clock from an answer.
    pub fn observe_clock(&self, control_now_ms: u64) {
        if control_now_ms > 0 {
            let skew = control_now_ms as i64 - mayfly_types::now_ms() as i64;
            self.skew_ms.store(skew, Ordering::Relaxed);
        }
    }

    /// Count a finished block (for the rollback trigger's error rate).
    pub fn count(&self, ok: bool) {
        let c = if ok { &self.ok } else { &self.failed };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// What it tells the control plane now.
    pub fn report(&self) -> AgentReport {
        AgentReport {
            record: AgentRecord {
                agent: self.cfg.id.clone(),
                pool: self.cfg.pool.clone(),
                labels: self.cfg.labels.clone(),
                applied: self.applied(),
                refused: self
                    .refused
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone(),
            },
            blocks_ok: self.ok.load(Ordering::Relaxed),
            blocks_failed: self.failed.load(Ordering::Relaxed),
            interval_ms: self.cfg.interval.as_millis() as u64,
        }
    }

    /// Report, take the answer, and report again at once when what it applied changed (so
    /// the acknowledgement does not wait a whole interval).
    pub async fn sync(&self, hub: &dyn AgentHub) -> Result<(), String> {
        for _ in 0..2 {
            let before = (self.applied(), self.refused_digest());
            let answer = hub.report(self.report()).await?;
            self.observe_clock(answer.now_ms);
            self.offer(answer.desired.as_ref());
            self.synced.send_replace(true);
            if (self.applied(), self.refused_digest()) == before {
                break;
            }
        }
        Ok(())
    }

    fn refused_digest(&self) -> Option<String> {
        self.refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|r| r.bundle.clone())
    }

    /// Sync every interval until aborted.
    pub async fn run(self: Arc<Self>, hub: Arc<dyn AgentHub>) {
        let mut tick = tokio::time::interval(self.cfg.interval);
        loop {
            tick.tick().await;
            if let Err(e) = self.sync(hub.as_ref()).await {
                tracing::debug!(agent = %self.cfg.id, error = %e, "control plane unreachable; keeping the applied bundle");
            }
        }
    }
}
