//! The provider side of the actor dataplane (DESIGN §6).
//!
//! A [`Provider`] is the framework every sandbox shares; a [`Sandbox`] (the `process`
//! sandbox here, `wasm` in its own crate) only starts, captures, serves and stops one actor.
//! The framework owns the rules that must not differ between sandboxes:
//!
//! * **Op ids** — every op is recorded in the [`journal`] before it runs; the same id with
//!   the same payload answers the recorded status, a different payload is refused.
//! * **Epoch fence** — an actor's epoch only moves forward and is durable: `assign` may
//!   raise it, `restore` must raise it, `checkpoint` must match it; anything older is
//!   refused `stale_epoch`, and the data path refuses a request carrying any other epoch.
//! * **Snapshots** — captures are cut into [`mayfly_actor_api::BLOB_CHUNK`] blobs stored by
//!   content digest in the tenant's scope of the snapshot store (local, or external: under
//!   a control plane only through its blob broker, with the op's grant — [`broker`]); the
//!   manifest goes back to the control plane to be signed. A restore verifies the envelope
//!   ([`mayfly_actor_api::verify_snapshot`]) and every blob's digest before the sandbox sees
//!   a byte.
//! * **Delivery** — identity and secrets arrive with the op, go to the sandbox, and are
//!   never journaled.

use async_trait::async_trait;
use bytes::Bytes;
use mayfly_actor_api::{
    ActorSpec, ActorStatus, BLOB_CHUNK, BlobRef, Capabilities, CheckpointKind, Checkpointed,
    Delivery, Desired, Format, Manifest, Op, OpRequest, OpResult, OpState, OpStatus, ProviderInfo,
    ProviderPhase, Refusal, RefusalCode, Scope, WorkerInfo,
};
use mayfly_cache::Cache;
use mayfly_trust::sign::TrustedKey;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Mutex, RwLock, watch};

pub mod broker;
pub mod client;
pub mod conformance;
pub mod dataplane;
pub mod heartbeat;
pub mod http;
pub mod journal;
pub use mayfly_tools::keeper;
pub mod local;
pub mod process;

pub use journal::{Journal, JournalError};

/// Install the process-wide rustls crypto provider (ring) if none is; every TLS client and
/// server here needs one. Idempotent.
pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Named byte streams a sandbox captures and restores (`data`, `memory`, …).
pub type Streams = BTreeMap<String, Vec<u8>>;

/// One data-path request, buffered.
#[derive(Clone, Debug)]
pub struct DataRequest {
    pub method: String,
    pub path_and_query: String,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

/// One data-path response, buffered.
#[derive(Clone, Debug)]
pub struct DataResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

/// A sandbox class: how to start an actor (fresh or from restored streams).
#[async_trait]
pub trait Sandbox: Send + Sync + 'static {
    fn class(&self) -> &'static str;
    fn capabilities(&self) -> Capabilities;
    /// The snapshot format of a `scope` capture; None when the scope is unsupported.
    fn format(&self, scope: Scope) -> Option<Format>;
    /// Start `spec` bound to `epoch`, with a fresh `delivery`; ready when this returns.
    async fn start(
        &self,
        spec: &ActorSpec,
        epoch: u64,
        delivery: &Delivery,
        restored: Option<(Scope, Streams)>,
    ) -> Result<Box<dyn Instance>, Refusal>;
    /// The provider's lease was renewed until `until_ms` (wall clock; `None`: it holds no
    /// lease, no control plane is watching). A sandbox whose actors can outlive a frozen
    /// provider hands this to them, so they stop serving when it runs out.
    fn lease(&self, _until_ms: Option<u64>) {}
}

/// One running actor.
#[async_trait]
pub trait Instance: Send + Sync {
    fn address(&self) -> Option<String>;
    async fn alive(&self) -> bool;
    async fn handle(&self, req: DataRequest) -> Result<DataResponse, Refusal>;
    /// Capture `scope`; with `teardown` the actor is stopped (before or after the capture,
    /// whichever gives the sandbox a consistent image).
    async fn capture(&self, scope: Scope, teardown: bool) -> Result<Streams, Refusal>;
    async fn stop(&self);
}

/// Static configuration of a provider process.
#[derive(Clone, Debug)]
pub struct ProviderConfig {
    /// The provider's id (its enrolled identity).
    pub id: String,
    /// Concurrent running actors.
    pub slots: u32,
    /// Control-plane keys trusted to sign snapshot envelopes.
    pub trusted: Vec<TrustedKey>,
    pub labels: BTreeMap<String, String>,
    /// `os/arch` recorded in manifests.
    pub platform: String,
}

impl ProviderConfig {
    pub fn platform_of_host() -> String {
        format!("{}/{}", std::env::consts::OS, std::env::consts::ARCH)
    }
}

/// Actors are keyed by tenant and name everywhere on a provider: two tenants' actors of the
/// same name are different actors.
fn akey(tenant: &str, actor: &str) -> String {
    format!("{tenant}/{actor}")
}

struct Running {
    epoch: u64,
    tenant: String,
    actor: String,
    spec: ActorSpec,
    instance: Arc<dyn Instance>,
    /// Held (read) by every request being served; a graceful teardown takes it (write)
    /// so no request is cut off mid-way.
    drain: Arc<tokio::sync::RwLock<()>>,
}

/// How long a graceful teardown waits for requests being served.
const DRAIN_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// The provider framework over one sandbox.
pub struct Provider {
    cfg: ProviderConfig,
    incarnation: String,
    sandbox: Arc<dyn Sandbox>,
    journal: Journal,
    local: Arc<dyn Cache>,
    external: broker::Blobs,
    /// Serializes ops per actor.
    locks: std::sync::Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// Running actors (the data path reads this without waiting behind an op).
    running: RwLock<HashMap<String, Running>>,
    inflight: std::sync::Mutex<HashMap<String, watch::Receiver<Option<OpStatus>>>>,
    /// Wall-clock ms until which the provider holds its lease; 0: no lease (no control
    /// plane). Past it, nothing is started and no request reaches an actor.
    lease_until: std::sync::atomic::AtomicU64,
}

/// Framework failures that are not an op's outcome (answered 500).
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Refused(#[from] Refusal),
}

impl Provider {
    /// A provider over `sandbox`, journaling to `journal`, keeping local checkpoints in
    /// `local` and external ones in `external` (the shared snapshot store, or the control
    /// plane's broker: [`broker::Blobs`]). (Building the sandbox reaps what an earlier
    /// incarnation left running.)
    pub async fn new(
        cfg: ProviderConfig,
        sandbox: Arc<dyn Sandbox>,
        journal: Journal,
        local: Arc<dyn Cache>,
        external: impl Into<broker::Blobs>,
    ) -> Result<Arc<Provider>, ProviderError> {
        Ok(Arc::new(Provider {
            cfg,
            incarnation: uuid::Uuid::now_v7().to_string(),
            sandbox,
            journal,
            local,
            external: external.into(),
            locks: Default::default(),
            running: Default::default(),
            inflight: Default::default(),
            lease_until: Default::default(),
        }))
    }

    pub fn id(&self) -> &str {
        &self.cfg.id
    }

    /// Identity, contract, capabilities and live capacity.
    pub async fn info(&self) -> ProviderInfo {
        let used = self.running.read().await.len() as u32;
        ProviderInfo {
            id: self.cfg.id.clone(),
            incarnation: self.incarnation.clone(),
            capabilities: self.sandbox.capabilities(),
            workers: vec![WorkerInfo {
                id: format!("{}/{}", self.cfg.id, self.sandbox.class()),
                class: self.sandbox.class().into(),
                slots: self.cfg.slots,
                used,
                healthy: true,
                labels: self.cfg.labels.clone(),
            }],
        }
    }

    /// Where `tenant`'s `actor` runs and under which epoch (None: never seen here).
    pub async fn actor(
        &self,
        tenant: &str,
        actor: &str,
    ) -> Result<Option<ActorStatus>, ProviderError> {
        if let Some(r) = self.running.read().await.get(&akey(tenant, actor)) {
            return Ok(Some(ActorStatus {
                actor: actor.into(),
                tenant: r.tenant.clone(),
                epoch: r.epoch,
                phase: ProviderPhase::Running,
                address: r.instance.address(),
            }));
        }
        Ok(self
            .journal
            .actor(tenant, actor)
            .await?
            .map(|row| ActorStatus {
                actor: row.actor,
                tenant: row.tenant,
                epoch: row.epoch,
                phase: ProviderPhase::Stopped,
                address: None,
            }))
    }

    /// Accept an op: refuse it synchronously (malformed, unsupported, an op id reused with
    /// another payload), or record it and run it in the background. Returns the op id.
    pub async fn submit(self: &Arc<Self>, req: OpRequest) -> Result<String, ProviderError> {
        req.check()?;
        self.supports(&req.op)?;
        let running = OpStatus {
            op_id: req.op_id.clone(),
            op: req.op.name().into(),
            actor: req.actor.clone(),
            state: OpState::Running,
            result: None,
            error: None,
        };
        match self.journal.begin(&running, &req.payload_digest()).await? {
            journal::Begin::Conflict => {
                return Err(Refusal::new(
                    RefusalCode::OpIdConflict,
                    format!(
                        "op id `{}` was used before with a different payload",
                        req.op_id
                    ),
                )
                .into());
            }
            journal::Begin::Existing(_) => return Ok(req.op_id),
            journal::Begin::New => {}
        }
        let (tx, rx) = watch::channel(None);
        if let Ok(mut m) = self.inflight.lock() {
            m.insert(req.op_id.clone(), rx);
        }
        let op_id = req.op_id.clone();
        let this = self.clone();
        tokio::spawn(async move {
            let op_id = req.op_id.clone();
            let mut status = running;
            match this.execute(req).await {
                Ok(r) => {
                    status.state = OpState::Succeeded;
                    status.result = Some(r);
                }
                Err(e) => {
                    status.state = OpState::Failed;
                    status.error = Some(e);
                }
            }
            if let Err(e) = this.journal.finish(&status).await {
                tracing::error!(op_id, error = %e, "op outcome not journaled");
            }
            let _ = tx.send(Some(status));
            if let Ok(mut m) = this.inflight.lock() {
                m.remove(&op_id);
            }
        });
        Ok(op_id)
    }

    /// The durable status of an op, waiting up to `wait` for it to leave `running`.
    pub async fn status(
        &self,
        op_id: &str,
        wait: Duration,
    ) -> Result<Option<OpStatus>, ProviderError> {
        let rx = self
            .inflight
            .lock()
            .ok()
            .and_then(|m| m.get(op_id).cloned());
        if let Some(mut rx) = rx {
            let _ = tokio::time::timeout(wait, rx.wait_for(|s| s.is_some())).await;
        }
        Ok(self.journal.status(op_id).await?)
    }

    fn supports(&self, op: &Op) -> Result<(), Refusal> {
        let caps = self.sandbox.capabilities();
        match op {
            Op::Assign { spec, .. } | Op::Restore { spec, .. } => {
                let class = spec.workload.class();
                if !caps.classes.iter().any(|c| c == class) {
                    return Err(Refusal::new(
                        RefusalCode::UnsupportedClass,
                        format!("this provider runs {:?}, not `{class}`", caps.classes),
                    ));
                }
            }
            Op::Checkpoint { kind, scope, .. } => {
                if !caps.scopes.contains(scope) {
                    return Err(Refusal::new(
                        RefusalCode::UnsupportedScope,
                        format!("scope {scope:?} is not supported by this provider"),
                    ));
                }
                if !caps.kinds.contains(kind) {
                    return Err(Refusal::new(
                        RefusalCode::UnsupportedKind,
                        format!("checkpoint kind {kind:?} is not supported"),
                    ));
                }
            }
        }
        Ok(())
    }

    fn lock_of(&self, actor: &str) -> Arc<Mutex<()>> {
        match self.locks.lock() {
            Ok(mut m) => m.entry(actor.to_owned()).or_default().clone(),
            Err(_) => Arc::new(Mutex::new(())),
        }
    }

    async fn execute(&self, req: OpRequest) -> Result<OpResult, Refusal> {
        let k = akey(&req.tenant, &req.actor);
        let lock = self.lock_of(&k);
        let _serial = lock.lock().await;
        let journal_err = |e: JournalError| Refusal::new(RefusalCode::SandboxFailed, e.to_string());
        let row = self
            .journal
            .actor(&req.tenant, &req.actor)
            .await
            .map_err(journal_err)?;
        let current = row.as_ref().map_or(0, |r| r.epoch);
        let stale = |what: &str| {
            Refusal::new(
                RefusalCode::StaleEpoch,
                format!(
                    "{what}: op epoch {} but the actor is at epoch {current}",
                    req.assignment_epoch
                ),
            )
        };
        let epoch = req.assignment_epoch;
        let grant = req.grant.clone();
        match req.op {
            Op::Assign { desired, spec } => {
                if epoch < current {
                    return Err(stale("assign"));
                }
                self.bind(&req.actor, &req.tenant, epoch).await?;
                match desired {
                    Desired::Suspended => {
                        self.stop(&k).await;
                        Ok(OpResult {
                            phase: Some(ProviderPhase::Stopped),
                            address: None,
                            epoch,
                            snapshot: None,
                        })
                    }
                    Desired::Running => {
                        // The same assignment (spec and epoch) is already satisfied; a new
                        // epoch is a new assignment: restarted, with a fresh delivery.
                        let current = self
                            .running
                            .read()
                            .await
                            .get(&k)
                            .filter(|r| r.spec == spec && r.epoch == epoch)
                            .map(|r| r.instance.clone());
                        let same = match current {
                            Some(i) => i.alive().await,
                            None => false,
                        };
                        if !same {
                            self.stop(&k).await;
                            self.stage(&spec, grant.as_ref()).await?;
                            let delivery = req.delivery.unwrap_or_default();
                            self.start(spec, epoch, &delivery, None).await?;
                        }
                        self.running_result(&k).await
                    }
                }
            }
            Op::Checkpoint {
                kind,
                scope,
                teardown,
            } => {
                if epoch != current {
                    return Err(stale("checkpoint"));
                }
                let (spec, instance) = match self.running.read().await.get(&k) {
                    Some(r) => (r.spec.clone(), r.instance.clone()),
                    None => {
                        return Err(Refusal::new(
                            RefusalCode::UnknownActor,
                            "the actor is not running on this provider",
                        ));
                    }
                };
                let format = self.sandbox.format(scope).ok_or_else(|| {
                    Refusal::new(RefusalCode::UnsupportedScope, format!("{scope:?}"))
                })?;
                let mut drained = None;
                if teardown {
                    // The route goes first: no request reaches an actor being torn down;
                    // those already being served are answered first.
                    let gone = self.running.write().await.remove(&k);
                    if let Some(r) = gone {
                        match tokio::time::timeout(DRAIN_WAIT, r.drain.clone().write_owned()).await
                        {
                            // Held until the actor is stopped: nothing is served meanwhile.
                            Ok(g) => drained = Some(g),
                            Err(_) => tracing::warn!(
                                actor = %req.actor,
                                "requests still in flight after {DRAIN_WAIT:?}: torn down anyway"
                            ),
                        }
                    }
                }
                let captured = instance.capture(scope, teardown).await;
                if teardown {
                    instance.stop().await;
                    drop(drained);
                    self.bind(&req.actor, &req.tenant, epoch).await?;
                }
                let streams = captured?;
                let local = broker::Blobs::Direct(self.local.clone());
                let store = match kind {
                    CheckpointKind::Local => &local,
                    CheckpointKind::External => &self.external,
                };
                let blobs = put_streams(store, &req.tenant, &streams, grant.as_ref()).await?;
                let manifest = Manifest {
                    format,
                    scope,
                    blobs,
                    platform: self.cfg.platform.clone(),
                    tenant: req.tenant.clone(),
                    template: spec.template.clone(),
                    actor: Some(req.actor.clone()),
                    workload_digest: spec.workload.digest(),
                    assets: vec![],
                };
                Ok(OpResult {
                    phase: Some(if teardown {
                        ProviderPhase::Stopped
                    } else {
                        ProviderPhase::Running
                    }),
                    address: None,
                    epoch,
                    snapshot: Some(Checkpointed {
                        descriptor: manifest.descriptor(),
                        manifest,
                        kind,
                    }),
                })
            }
            Op::Restore { snapshot, spec } => {
                if row.is_some() && epoch <= current {
                    return Err(stale("restore must bind a newer epoch"));
                }
                let caps = self.sandbox.capabilities();
                let manifest = mayfly_actor_api::verify_snapshot(
                    &snapshot,
                    &self.cfg.trusted,
                    &caps.formats,
                    &spec,
                )?;
                let streams = self.fetch(&req.tenant, &manifest, grant.as_ref()).await?;
                self.stage(&spec, grant.as_ref()).await?;
                self.stop(&k).await;
                self.bind(&req.actor, &req.tenant, epoch).await?;
                let delivery = req.delivery.unwrap_or_default();
                self.start(spec, epoch, &delivery, Some((manifest.scope, streams)))
                    .await?;
                self.running_result(&k).await
            }
        }
    }

    /// The workload's assets (a wasm module) in this provider's local store, fetched from
    /// the shared store under the op's `grant` when they are not there yet: sandboxes read
    /// them locally, never from the shared store.
    async fn stage(
        &self,
        spec: &ActorSpec,
        grant: Option<&mayfly_trust::sign::Signed>,
    ) -> Result<(), Refusal> {
        let mayfly_actor_api::Workload::Wasm { module, .. } = &spec.workload else {
            return Ok(());
        };
        let local = broker::Blobs::Direct(self.local.clone());
        if local.get(&spec.tenant, module, None).await?.is_some() {
            return Ok(());
        }
        // Absent from the shared store too: the sandbox reports it, as it always has.
        if let Some(bytes) = self.external.get(&spec.tenant, module, grant).await? {
            local.put(&spec.tenant, module, bytes, None).await?;
        }
        Ok(())
    }

    async fn bind(&self, actor: &str, tenant: &str, epoch: u64) -> Result<(), Refusal> {
        self.journal
            .bind(&journal::ActorRow {
                actor: actor.into(),
                tenant: tenant.into(),
                epoch,
            })
            .await
            .map_err(|e| Refusal::new(RefusalCode::SandboxFailed, e.to_string()))
    }

    async fn start(
        &self,
        spec: ActorSpec,
        epoch: u64,
        delivery: &Delivery,
        restored: Option<(Scope, Streams)>,
    ) -> Result<(), Refusal> {
        self.check_lease()?;
        if self.running.read().await.len() as u32 >= self.cfg.slots {
            return Err(Refusal::new(
                RefusalCode::CapacityExhausted,
                format!("all {} slots are in use", self.cfg.slots),
            ));
        }
        let instance: Arc<dyn Instance> =
            Arc::from(self.sandbox.start(&spec, epoch, delivery, restored).await?);
        self.bind(&spec.actor, &spec.tenant, epoch).await?;
        self.running.write().await.insert(
            akey(&spec.tenant, &spec.actor),
            Running {
                epoch,
                tenant: spec.tenant.clone(),
                actor: spec.actor.clone(),
                spec,
                instance,
                drain: Default::default(),
            },
        );
        Ok(())
    }

    async fn stop(&self, actor: &str) {
        let gone = self.running.write().await.remove(actor);
        if let Some(r) = gone {
            r.instance.stop().await;
        }
    }

    async fn running_result(&self, actor: &str) -> Result<OpResult, Refusal> {
        let running = self.running.read().await;
        let r = running.get(actor).ok_or_else(|| {
            Refusal::new(
                RefusalCode::SandboxFailed,
                "the actor stopped while starting",
            )
        })?;
        Ok(OpResult {
            phase: Some(ProviderPhase::Running),
            address: r.instance.address(),
            epoch: r.epoch,
            snapshot: None,
        })
    }

    /// Every blob of `manifest`, verified, reassembled into streams. Local checkpoints are
    /// looked up first, then the shared store (under the op's `grant`).
    async fn fetch(
        &self,
        tenant: &str,
        manifest: &Manifest,
        grant: Option<&mayfly_trust::sign::Signed>,
    ) -> Result<Streams, Refusal> {
        let mut streams = Streams::new();
        let local = broker::Blobs::Direct(self.local.clone());
        for b in &manifest.blobs {
            let mut bytes = local.get(tenant, &b.digest, None).await?;
            if bytes.is_none() {
                bytes = self.external.get(tenant, &b.digest, grant).await?;
            }
            let bytes = bytes.ok_or_else(|| {
                Refusal::new(
                    RefusalCode::BlobDigestMismatch,
                    format!("blob {} is not in the snapshot store", b.digest),
                )
            })?;
            if bytes.len() as u64 != b.size {
                return Err(Refusal::new(
                    RefusalCode::BlobDigestMismatch,
                    format!("blob {} has the wrong size", b.digest),
                ));
            }
            streams
                .entry(b.name.clone())
                .or_default()
                .extend_from_slice(&bytes);
        }
        Ok(streams)
    }

    /// The lease was renewed until `until_ms` (wall clock), or is held by no one (`None`).
    pub fn set_lease(&self, until_ms: Option<u64>) {
        self.lease_until
            .store(until_ms.unwrap_or(0), std::sync::atomic::Ordering::Release);
        self.sandbox.lease(until_ms);
    }

    /// Refused once the lease has run out: the control plane may by now have given this
    /// provider's epochs to another worker.
    fn check_lease(&self) -> Result<(), Refusal> {
        let until = self.lease_until.load(std::sync::atomic::Ordering::Acquire);
        if until != 0 && mayfly_types::now_ms() >= until {
            return Err(Refusal::new(
                RefusalCode::StaleEpoch,
                "the provider's lease has run out: its actors may be assigned elsewhere",
            ));
        }
        Ok(())
    }

    /// Route a data-path request to `tenant`'s `actor`, which must be running at exactly
    /// `epoch`.
    pub async fn call(
        &self,
        tenant: &str,
        actor: &str,
        epoch: u64,
        req: DataRequest,
    ) -> Result<DataResponse, Refusal> {
        self.check_lease()?;
        let (instance, _serving) = {
            let running = self.running.read().await;
            let r = running.get(&akey(tenant, actor)).ok_or_else(|| {
                Refusal::new(
                    RefusalCode::UnknownActor,
                    "the actor is not running on this provider",
                )
            })?;
            if r.epoch != epoch {
                return Err(Refusal::new(
                    RefusalCode::StaleEpoch,
                    format!("request epoch {epoch}, actor epoch {}", r.epoch),
                ));
            }
            // Taken while the route is still there: a teardown (which removes the route
            // first, then waits for these) cannot slip in between.
            let serving = r.drain.clone().try_read_owned().map_err(|_| {
                Refusal::new(RefusalCode::UnknownActor, "the actor is being torn down")
            })?;
            (r.instance.clone(), serving)
        };
        instance.handle(req).await
    }

    /// Actors running here, with their epochs (what a heartbeat reports).
    pub async fn running(&self) -> Vec<dataplane::RunningActor> {
        self.running
            .read()
            .await
            .values()
            .map(|r| dataplane::RunningActor {
                actor: r.actor.clone(),
                tenant: r.tenant.clone(),
                epoch: r.epoch,
            })
            .collect()
    }

    /// Stop `actor` if it still runs at `epoch` (the control plane assigned it elsewhere).
    pub async fn fence(&self, tenant: &str, actor: &str, epoch: u64) {
        let k = akey(tenant, actor);
        let lock = self.lock_of(&k);
        let _serial = lock.lock().await;
        let stale = self
            .running
            .read()
            .await
            .get(&k)
            .is_some_and(|r| r.epoch == epoch);
        if stale {
            tracing::warn!(
                actor,
                epoch,
                "fenced: the control plane assigns this actor elsewhere"
            );
            self.stop(&k).await;
        }
    }

    /// Stop every actor (provider shutdown).
    pub async fn shutdown(&self) {
        let all: Vec<_> = self.running.write().await.drain().collect();
        for (_, r) in all {
            r.instance.stop().await;
        }
    }
}

/// Cut streams into chunks, store each by digest in `tenant`'s scope, and list them.
async fn put_streams(
    store: &broker::Blobs,
    tenant: &str,
    streams: &Streams,
    grant: Option<&mayfly_trust::sign::Signed>,
) -> Result<Vec<BlobRef>, Refusal> {
    let mut blobs = Vec::new();
    for (name, data) in streams {
        for chunk in data.chunks(BLOB_CHUNK) {
            let digest = mayfly_trust::sha256_digest(chunk);
            store
                .put(tenant, &digest, Bytes::copy_from_slice(chunk), grant)
                .await?;
            blobs.push(BlobRef {
                name: name.clone(),
                digest,
                size: chunk.len() as u64,
            });
        }
    }
    Ok(blobs)
}
