//! The control plane's side of the actor dataplane: enrollment, provider heartbeats and
//! worker leases, scheduling, fenced resume / suspend / move, snapshot signing, and the
//! router core. Durable state lives in the `control` stream (see
//! `mayfly_control::dataplane`); every intent is recorded there before a provider is called,
//! with a deterministic op id, so a retry after a crash re-issues the same op.
//!
//! Fencing is enforced at four places: the actor record (its epoch only rises), the
//! provider (ops and data-path requests of another epoch are refused), the router (a
//! request pinned to a stale epoch is refused before anything is resumed), and heartbeats
//! (a provider is told to stop any actor it runs at an epoch the record does not hold).

use crate::client::{ClientError, DataAnswer, ProviderClient};
use mayfly_actor_api::{
    ActorPhase, ActorSpec, CONTRACT_VERSION, CheckpointKind, Delivery, Desired, Manifest, Op,
    OpRequest, OpState, OpStatus, Refusal, RefusalCode, WorkerInfo,
};
use mayfly_cache::Cache;
use mayfly_control::dataplane::{
    ActorRecord, ActorTemplateSpec, DEFAULT_LEASE_MS, Lease, PendingOp, ProviderRecord,
    SnapshotRecord, WorkerRecord, golden_key, key, op_id,
};
use mayfly_control::{Caller, Control, ControlError, ControlState, Role, SYSTEM_TENANT};
use mayfly_pki::{Ca, Identity, Usage};
use mayfly_trust::sign::{ControlKey, Purpose, Signed, TrustedKey};
use mayfly_types::{EventKind, now_ms};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;

/// Why a dataplane request failed. `code()` is the stable API code.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    Invalid(String),
    #[error("no capacity: {0}")]
    NoCapacity(String),
    #[error("{0}")]
    Refused(Refusal),
    #[error("provider unavailable: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Control(#[from] ControlError),
}

impl DataplaneError {
    pub fn code(&self) -> &'static str {
        match self {
            DataplaneError::NotFound(_) => "not_found",
            DataplaneError::Forbidden(_) => "forbidden",
            DataplaneError::Unauthenticated(_) => "unauthenticated",
            DataplaneError::Invalid(_) => "invalid_request",
            DataplaneError::NoCapacity(_) => "no_capacity",
            DataplaneError::Refused(r) => r.code.as_str(),
            DataplaneError::Unavailable(_) => "provider_unavailable",
            DataplaneError::Control(ControlError::Forbidden(_)) => "forbidden",
            DataplaneError::Control(ControlError::NotFound(_)) => "not_found",
            DataplaneError::Control(_) => "internal",
        }
    }

    /// The HTTP status the gateway answers with.
    pub fn http_status(&self) -> u16 {
        match self {
            DataplaneError::NotFound(_) => 404,
            DataplaneError::Forbidden(_) => 403,
            DataplaneError::Unauthenticated(_) => 401,
            DataplaneError::Invalid(_) => 400,
            DataplaneError::NoCapacity(_) => 503,
            DataplaneError::Refused(r) => r.code.http_status(),
            DataplaneError::Unavailable(_) => 502,
            DataplaneError::Control(ControlError::Forbidden(_)) => 403,
            DataplaneError::Control(ControlError::NotFound(_)) => 404,
            DataplaneError::Control(_) => 500,
        }
    }
}

impl From<ClientError> for DataplaneError {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Refused(r) => DataplaneError::Refused(r),
            other => DataplaneError::Unavailable(other.to_string()),
        }
    }
}

/// Networks route targets (provider endpoints) may live in. Anything else — a cloud
/// metadata address, a public host — is refused at enrollment and again at route time.
#[derive(Clone, Debug)]
pub struct Networks(Vec<ipnet::IpNet>);

impl Networks {
    /// Loopback and the private ranges (RFC 1918, ULA).
    pub fn private() -> Networks {
        Networks(
            [
                "127.0.0.0/8",
                "::1/128",
                "10.0.0.0/8",
                "172.16.0.0/12",
                "192.168.0.0/16",
                "fc00::/7",
            ]
            .iter()
            .filter_map(|n| n.parse().ok())
            .collect(),
        )
    }

    /// Parse a comma-separated CIDR list.
    pub fn parse(s: &str) -> Result<Networks, String> {
        s.split(',')
            .map(str::trim)
            .filter(|x| !x.is_empty())
            .map(|n| n.parse().map_err(|e| format!("network `{n}`: {e}")))
            .collect::<Result<Vec<_>, _>>()
            .map(Networks)
    }

    /// The endpoint's host, if it is an https URL to an IP address inside these networks.
    pub fn admit(&self, endpoint: &str) -> Result<IpAddr, String> {
        let url = reqwest::Url::parse(endpoint).map_err(|e| format!("endpoint: {e}"))?;
        if url.scheme() != "https" {
            return Err("a provider endpoint must be https (mTLS)".into());
        }
        if url.path() != "/" || url.query().is_some() || !url.username().is_empty() {
            return Err("a provider endpoint is `https://IP:PORT`, nothing more".into());
        }
        let ip: IpAddr = match url.host() {
            Some(url::Host::Ipv4(v4)) => IpAddr::V4(v4),
            Some(url::Host::Ipv6(v6)) => IpAddr::V6(v6),
            _ => return Err("a provider endpoint must name an IP address".into()),
        };
        if !self.0.iter().any(|n| n.contains(&ip)) {
            return Err(format!("route target {ip} is outside the allowed networks"));
        }
        Ok(ip)
    }
}

/// Configuration of the dataplane driver.
#[derive(Clone, Debug)]
pub struct DataplaneConfig {
    pub lease_ms: u64,
    /// How long the control plane waits for one provider op.
    pub op_timeout: Duration,
    pub networks: Networks,
    /// The control plane's mTLS endpoint for providers (told at enrollment).
    pub provider_endpoint: Option<String>,
    /// That endpoint's certificate fingerprint: providers pin it.
    pub provider_endpoint_fingerprint: Option<String>,
    /// Most bytes one external checkpoint may write through the blob broker (its grant's
    /// write budget).
    pub max_snapshot_bytes: u64,
}

/// The default write budget of one external checkpoint (8 GiB).
pub const DEFAULT_MAX_SNAPSHOT_BYTES: u64 = 8 << 30;

impl Default for DataplaneConfig {
    fn default() -> Self {
        DataplaneConfig {
            lease_ms: DEFAULT_LEASE_MS,
            op_timeout: Duration::from_secs(60),
            networks: Networks::private(),
            provider_endpoint: None,
            provider_endpoint_fingerprint: None,
            max_snapshot_bytes: DEFAULT_MAX_SNAPSHOT_BYTES,
        }
    }
}

/// `POST /v1/providers/enroll`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    pub id: String,
    pub endpoint: String,
    pub csr: String,
}

/// The answer to an enrollment: everything a provider needs to serve and to heartbeat.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Enrollment {
    pub id: String,
    pub certificate: String,
    pub ca: String,
    /// The control plane's client certificate fingerprint: the only caller a provider admits.
    pub control_fingerprint: String,
    /// The key that signs snapshot envelopes.
    pub control_public_key: TrustedKey,
    /// Where to heartbeat (the control plane's mTLS endpoint), if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_endpoint: Option<String>,
    /// That endpoint's certificate fingerprint (providers pin it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_endpoint_fingerprint: Option<String>,
}

/// An actor a provider runs, as its heartbeat reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningActor {
    pub actor: String,
    pub tenant: String,
    pub epoch: u64,
}

/// A provider's heartbeat (its first one registers it).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Heartbeat {
    pub incarnation: String,
    pub capabilities: mayfly_actor_api::Capabilities,
    pub workers: Vec<WorkerInfo>,
    #[serde(default)]
    pub running: Vec<RunningActor>,
}

/// The answer: how long the lease runs, and which actors the provider must stop (it runs
/// them at an epoch the control plane no longer assigns to it).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HeartbeatAnswer {
    pub lease_ms: u64,
    pub stop: Vec<RunningActor>,
}

/// Where a request for an actor goes.
#[derive(Clone)]
pub struct Route {
    pub client: ProviderClient,
    pub actor: String,
    pub epoch: u64,
    pub worker: String,
}

/// Where a resume may place an actor.
#[derive(Clone, Copy, Debug)]
enum Placement<'a> {
    Any,
    Avoid(&'a str),
}

/// Where template secrets come from: the keychain of the actor's tenant. Values never
/// leave this path except in a [`Delivery`] or a credential-broker answer.
#[async_trait::async_trait]
pub trait Secrets: Send + Sync {
    /// The credential stored under `alias` in `tenant` (JSON or a string).
    async fn resolve(&self, tenant: &str, alias: &str) -> Result<Value, String>;
}

/// The dataplane driver of the appending control-plane node.
pub struct Dataplane {
    secrets: std::sync::OnceLock<Arc<dyn Secrets>>,
    control: Arc<Control>,
    key: ControlKey,
    ca: Ca,
    identity: Identity,
    store: Arc<dyn Cache>,
    /// Providers reach `store` only through it, op by op.
    broker: crate::broker::Broker,
    cfg: DataplaneConfig,
    leases: std::sync::Mutex<BTreeMap<String, Lease>>,
    clients: std::sync::Mutex<HashMap<String, (String, ProviderClient)>>,
    locks: std::sync::Mutex<HashMap<String, Arc<Mutex<()>>>>,
    activity: std::sync::Mutex<HashMap<String, u64>>,
    /// Requests being routed per actor: an actor with one on its way in or being served is
    /// never idle.
    inflight: std::sync::Mutex<HashMap<String, u32>>,
}

/// One routed request, counted in `inflight` until it is answered (or dropped).
struct InFlight<'a> {
    dp: &'a Dataplane,
    key: String,
}

impl<'a> InFlight<'a> {
    fn new(dp: &'a Dataplane, tenant: &str, name: &str) -> InFlight<'a> {
        let key = key(tenant, name);
        *dp.inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default() += 1;
        InFlight { dp, key }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        // Idleness counts from the end of the last request.
        self.dp
            .activity
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(self.key.clone(), now_ms());
        let mut m = self.dp.inflight.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.key);
            }
        }
    }
}

const WHO: &str = "dataplane";

fn rec_json(r: &impl Serialize) -> Value {
    serde_json::to_value(r).unwrap_or(Value::Null)
}

impl Dataplane {
    /// A driver over `control`, signing snapshots with `key`, calling providers as
    /// `identity` (issued by `ca`), reading snapshot blobs from `store`. Workers recorded
    /// healthy get one lease period from now to heartbeat (a restarted control plane does
    /// not declare everything lost at once).
    pub async fn new(
        control: Arc<Control>,
        key: ControlKey,
        ca: Ca,
        identity: Identity,
        store: Arc<dyn Cache>,
        cfg: DataplaneConfig,
    ) -> Result<Arc<Dataplane>, DataplaneError> {
        crate::install_crypto();
        let now = now_ms();
        let leases = control
            .read(|st| {
                st.workers
                    .values()
                    .filter(|w| !w.lost)
                    .map(|w| {
                        (
                            w.id.clone(),
                            Lease {
                                expires_ms: now + cfg.lease_ms,
                                used: 0,
                            },
                        )
                    })
                    .collect()
            })
            .await?;
        let broker = crate::broker::Broker::new(store.clone(), vec![key.public().clone()]);
        Ok(Arc::new(Dataplane {
            broker,
            secrets: std::sync::OnceLock::new(),
            control,
            key,
            ca,
            identity,
            store,
            cfg,
            leases: std::sync::Mutex::new(leases),
            clients: Default::default(),
            locks: Default::default(),
            activity: Default::default(),
            inflight: Default::default(),
        }))
    }

    pub fn config(&self) -> &DataplaneConfig {
        &self.cfg
    }

    /// Resolve template secrets from `secrets` (set once, at start).
    pub fn set_secrets(&self, secrets: Arc<dyn Secrets>) {
        let _ = self.secrets.set(secrets);
    }

    /// The identity an actor receives for one epoch: `tenant/name@epoch.<signature>`, signed
    /// by the control plane key (purpose `actor-identity`). The credential broker accepts it
    /// only while `epoch` is the actor's current one.
    pub fn identity_token(&self, tenant: &str, name: &str, epoch: u64) -> String {
        let sig = self
            .key
            .sign(Purpose::ActorIdentity, identity_body(tenant, name, epoch))
            .map(|s| s.signature)
            .unwrap_or_default();
        format!("{tenant}/{name}@{epoch}.{sig}")
    }

    /// The secrets of `tpl`, resolved in `tenant` (names → values).
    async fn resolve_secrets(
        &self,
        tenant: &str,
        tpl: &ActorTemplateSpec,
    ) -> Result<BTreeMap<String, String>, DataplaneError> {
        let mut out = BTreeMap::new();
        if tpl.secrets.is_empty() {
            return Ok(out);
        }
        let src = self.secrets.get().ok_or_else(|| {
            DataplaneError::Invalid(
                "the template names secrets but this control plane has no keychain (master key)"
                    .into(),
            )
        })?;
        for (name, reference) in &tpl.secrets {
            let (alias, field) = match reference.split_once('.') {
                Some((a, f)) => (a, Some(f)),
                None => (reference.as_str(), None),
            };
            let v = src.resolve(tenant, alias).await.map_err(|e| {
                DataplaneError::Invalid(format!("secret `{name}` (keychain `{alias}`): {e}"))
            })?;
            let v = match field {
                Some(f) => v.get(f).cloned().ok_or_else(|| {
                    DataplaneError::Invalid(format!(
                        "secret `{name}`: keychain `{alias}` has no field `{f}`"
                    ))
                })?,
                None => v,
            };
            let text = match v {
                Value::String(s) => s,
                other => other.to_string(),
            };
            out.insert(name.clone(), text);
        }
        Ok(out)
    }

    /// What an actor receives fresh with every start: its identity for this epoch and its
    /// template's secrets.
    async fn delivery(
        &self,
        tenant: &str,
        name: &str,
        epoch: u64,
        tpl: &ActorTemplateSpec,
    ) -> Result<Delivery, DataplaneError> {
        Ok(Delivery {
            identity: self.identity_token(tenant, name, epoch),
            secrets: self.resolve_secrets(tenant, tpl).await?,
        })
    }

    /// The credential broker: an actor presents its identity token and receives its
    /// template's secrets — only while the token's epoch is the actor's current one and the
    /// actor runs. A token of an earlier epoch (a moved or fenced actor) is refused
    /// `stale_epoch`; a token that does not verify is `unauthenticated`.
    pub async fn credentials(&self, token: &str) -> Result<Value, DataplaneError> {
        let bad = || DataplaneError::Unauthenticated("not an actor identity token".into());
        let (head, sig) = token.rsplit_once('.').ok_or_else(bad)?;
        let (who, epoch) = head.rsplit_once('@').ok_or_else(bad)?;
        let (tenant, name) = who.rsplit_once('/').ok_or_else(bad)?;
        let epoch: u64 = epoch.parse().map_err(|_| bad())?;
        let body = identity_body(tenant, name, epoch);
        let envelope = Signed {
            digest: mayfly_trust::digest_of(&body).map_err(|_| bad())?,
            body,
            key_id: self.key.public().id.clone(),
            signature: sig.to_owned(),
        };
        envelope
            .verify(
                Purpose::ActorIdentity,
                std::slice::from_ref(self.key.public()),
            )
            .map_err(|_| bad())?;
        let (tpl, _, rec) = self.load(tenant, name).await?;
        let current = rec
            .as_ref()
            .filter(|r| r.phase == ActorPhase::Running)
            .map(|r| r.epoch);
        if current != Some(epoch) {
            return Err(DataplaneError::Refused(Refusal::new(
                RefusalCode::StaleEpoch,
                format!(
                    "identity of epoch {epoch}; the actor is {}",
                    current.map_or("not running".into(), |c| format!("at epoch {c}"))
                ),
            )));
        }
        let secrets = self.resolve_secrets(tenant, &tpl).await?;
        Ok(json!({ "actor": name, "tenant": tenant, "epoch": epoch, "secrets": secrets }))
    }

    /// Serialize on `k` (an actor, or a template's golden capture): held until the guard
    /// drops.
    async fn serialize(&self, k: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = self
            .locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(k.to_owned())
            .or_default()
            .clone();
        lock.lock_owned().await
    }

    fn leases(&self) -> BTreeMap<String, Lease> {
        self.leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn reserve(&self, worker: &str, delta: i64) {
        let mut l = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = l.get_mut(worker) {
            l.used = (i64::from(l.used) + delta).clamp(0, i64::from(u32::MAX)) as u32;
        }
    }

    /// The checkpoint scopes `worker`'s provider offers.
    async fn offered(&self, worker: &str) -> Result<Vec<mayfly_actor_api::Scope>, DataplaneError> {
        Ok(self
            .control
            .read(|st| {
                st.workers
                    .get(worker)
                    .and_then(|w| st.providers.get(&w.provider))
                    .and_then(|p| p.capabilities.as_ref())
                    .map(|c| c.scopes.clone())
                    .unwrap_or_default()
            })
            .await?)
    }

    /// The mTLS client of a provider, pinned to its enrolled certificate.
    fn client(&self, p: &ProviderRecord) -> Result<ProviderClient, DataplaneError> {
        self.cfg
            .networks
            .admit(&p.endpoint)
            .map_err(|e| DataplaneError::Forbidden(format!("provider {}: {e}", p.id)))?;
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((fp, c)) = clients.get(&p.id)
            && fp == &p.fingerprint
        {
            return Ok(c.clone());
        }
        let http = mayfly_pki::client(
            self.ca.cert_pem(),
            &self.identity,
            Some(p.fingerprint.clone()),
        )
        .map_err(|e| DataplaneError::Unavailable(e.to_string()))?;
        let c = ProviderClient::new(p.endpoint.clone(), http).with_provider(&p.id);
        clients.insert(p.id.clone(), (p.fingerprint.clone(), c.clone()));
        Ok(c)
    }

    async fn client_of_worker(&self, worker: &str) -> Result<ProviderClient, DataplaneError> {
        let p = self
            .control
            .read(|st| {
                st.workers
                    .get(worker)
                    .and_then(|w| st.providers.get(&w.provider))
                    .cloned()
            })
            .await?
            .ok_or_else(|| DataplaneError::NotFound(format!("worker {worker}")))?;
        self.client(&p)
    }

    /// Enroll a provider (system admins): sign its CSR for its endpoint's address and record
    /// its identity. Re-enrolling an id rotates its certificate (the old one stops working).
    pub async fn enroll(
        &self,
        caller: &Caller,
        req: EnrollRequest,
    ) -> Result<Enrollment, DataplaneError> {
        if !(caller.tenant == SYSTEM_TENANT && caller.role == Role::Admin) {
            return Err(DataplaneError::Forbidden(format!(
                "enrolling a provider needs an admin of the `{SYSTEM_TENANT}` tenant"
            )));
        }
        if !mayfly_actor_api::is_name(&req.id, 64) || req.id.contains('/') {
            return Err(DataplaneError::Invalid(format!("provider id `{}`", req.id)));
        }
        let ip = self
            .cfg
            .networks
            .admit(&req.endpoint)
            .map_err(DataplaneError::Forbidden)?;
        let endpoint = req.endpoint.trim_end_matches('/').to_owned();
        let cert = self
            .ca
            .sign_csr(
                &req.csr,
                &[ip.to_string()],
                Usage::Provider,
                &format!("provider:{}", req.id),
            )
            .map_err(|e| DataplaneError::Invalid(e.to_string()))?;
        let fingerprint =
            mayfly_pki::fingerprint(&cert).map_err(|e| DataplaneError::Invalid(e.to_string()))?;
        let record = ProviderRecord {
            id: req.id.clone(),
            endpoint,
            fingerprint,
            incarnation: None,
            capabilities: None,
        };
        self.control
            .transact(&caller.actor_ref(), |st| {
                // Its workers are fenced: nothing placed under the old identity keeps running.
                let mut changes = vec![(EventKind::ProviderRegistered, rec_json(&record))];
                for w in st.workers.values().filter(|w| w.provider == req.id) {
                    for a in st.fence_worker(&w.id, "ProviderReenrolled") {
                        changes.push((EventKind::ActorChanged, rec_json(&a)));
                    }
                }
                Ok((changes, ()))
            })
            .await?;
        Ok(Enrollment {
            id: req.id,
            certificate: cert,
            ca: self.ca.cert_pem().to_owned(),
            control_fingerprint: self
                .identity
                .fingerprint()
                .map_err(|e| DataplaneError::Invalid(e.to_string()))?,
            control_public_key: self.key.public().clone(),
            control_endpoint: self.cfg.provider_endpoint.clone(),
            control_endpoint_fingerprint: self.cfg.provider_endpoint_fingerprint.clone(),
        })
    }

    /// A provider's heartbeat, authenticated by its certificate's fingerprint: record what
    /// changed (incarnation, capabilities, workers, health), renew its workers' leases, and
    /// tell it which actors to stop.
    pub async fn heartbeat(
        &self,
        fingerprint: &str,
        hb: Heartbeat,
    ) -> Result<HeartbeatAnswer, DataplaneError> {
        if hb.capabilities.contract != CONTRACT_VERSION {
            return Err(DataplaneError::Invalid(format!(
                "contract `{}` is not `{CONTRACT_VERSION}`",
                hb.capabilities.contract
            )));
        }
        let now = now_ms();
        let provider = self
            .control
            .read(|st| {
                st.providers
                    .values()
                    .find(|p| p.fingerprint == fingerprint)
                    .cloned()
            })
            .await?
            .ok_or_else(|| {
                DataplaneError::Unauthenticated(
                    "this certificate is not an enrolled provider".into(),
                )
            })?;
        for w in &hb.workers {
            if !w.id.starts_with(&format!("{}/", provider.id))
                || !hb.capabilities.classes.contains(&w.class)
            {
                return Err(DataplaneError::Invalid(format!(
                    "worker `{}` is not a worker of provider {} with an advertised class",
                    w.id, provider.id
                )));
            }
        }
        let stop = self
            .control
            .transact(&format!("provider:{}", provider.id), |st| {
                // Re-checked under the lock: a re-enrollment (certificate rotation) that
                // landed since the lookup above wins, and the old certificate writes nothing.
                let provider = match st.providers.get(&provider.id) {
                    Some(p) if p.fingerprint == fingerprint => p.clone(),
                    _ => {
                        return Err(ControlError::Forbidden(
                            "this certificate is no longer the provider's enrolled one".into(),
                        ));
                    }
                };
                let mut changes = Vec::new();
                let restarted = provider.incarnation.as_deref() != Some(hb.incarnation.as_str());
                if restarted || provider.capabilities.as_ref() != Some(&hb.capabilities) {
                    let rec = ProviderRecord {
                        incarnation: Some(hb.incarnation.clone()),
                        capabilities: Some(hb.capabilities.clone()),
                        ..provider.clone()
                    };
                    changes.push((EventKind::ProviderRegistered, rec_json(&rec)));
                }
                if restarted && provider.incarnation.is_some() {
                    // A new incarnation runs nothing of the old one's.
                    for w in st.workers.values().filter(|w| w.provider == provider.id) {
                        for a in st.fence_worker(&w.id, "ProviderRestarted") {
                            changes.push((EventKind::ActorChanged, rec_json(&a)));
                        }
                    }
                }
                for w in &hb.workers {
                    let rec = WorkerRecord {
                        id: w.id.clone(),
                        provider: provider.id.clone(),
                        class: w.class.clone(),
                        slots: w.slots,
                        labels: w.labels.clone(),
                        lost: !w.healthy,
                    };
                    if st.workers.get(&w.id) != Some(&rec) {
                        changes.push((EventKind::WorkerChanged, rec_json(&rec)));
                    }
                }
                let stop: Vec<RunningActor> = hb
                    .running
                    .iter()
                    .filter(|r| !assigned_here(st, &provider.id, r))
                    .cloned()
                    .collect();
                // The leases are renewed under the control lock, before the worker records
                // land: a controller round (which reads the leases under the same lock)
                // never sees a worker's record without the lease of the heartbeat that
                // wrote it, and so never declares a worker that just joined lost.
                let mut leases = self.leases.lock().unwrap_or_else(|p| p.into_inner());
                for w in hb.workers.iter().filter(|w| w.healthy) {
                    leases.insert(
                        w.id.clone(),
                        Lease {
                            expires_ms: now + self.cfg.lease_ms,
                            used: w.used,
                        },
                    );
                }
                Ok((changes, stop))
            })
            .await?;
        Ok(HeartbeatAnswer {
            lease_ms: self.cfg.lease_ms,
            stop,
        })
    }

    /// One controller round: workers whose lease expired are recorded lost and their actors
    /// fenced (Suspended, epoch raised) durably; idle actors are suspended.
    pub async fn tick(self: &Arc<Self>) -> Result<(), DataplaneError> {
        let now = now_ms();
        self.control
            .transact(WHO, |st| {
                // Read under the control lock, as heartbeats renew them (see `heartbeat`).
                let leases = self.leases();
                let mut changes = Vec::new();
                for id in st.expired_workers(&leases, now) {
                    if let Some(w) = st.workers.get(&id) {
                        let lost = WorkerRecord {
                            lost: true,
                            ..w.clone()
                        };
                        changes.push((EventKind::WorkerChanged, rec_json(&lost)));
                        for a in st.fence_worker(&id, "WorkerLost") {
                            changes.push((EventKind::ActorChanged, rec_json(&a)));
                        }
                    }
                }
                Ok((changes, ()))
            })
            .await?;
        let idle: Vec<(String, String)> = {
            // An actor this process has not seen serve yet (a restarted control plane) counts
            // as active now, not as idle since the epoch.
            let running: Vec<String> = self
                .control
                .read(|st| {
                    st.actors
                        .values()
                        .filter(|a| a.phase == ActorPhase::Running)
                        .map(|a| key(&a.tenant, &a.name))
                        .collect()
                })
                .await?;
            let activity = {
                let mut act = self.activity.lock().unwrap_or_else(|p| p.into_inner());
                for k in running {
                    act.entry(k).or_insert(now);
                }
                act.clone()
            };
            let busy = self
                .inflight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            self.control
                .read(|st| {
                    st.actors
                        .values()
                        .filter(|a| a.phase == ActorPhase::Running)
                        .filter(|a| {
                            let t = st
                                .template_of(&a.tenant, &a.template)
                                .map_or(0, |t| t.idle_timeout_ms);
                            let k = key(&a.tenant, &a.name);
                            let last = activity.get(&k).copied().unwrap_or(0);
                            t > 0 && !busy.contains_key(&k) && now.saturating_sub(last) >= t
                        })
                        .map(|a| (a.tenant.clone(), a.name.clone()))
                        .collect()
                })
                .await?
        };
        for (tenant, name) in idle {
            let this = self.clone();
            tokio::spawn(async move {
                if let Err(e) = this.suspend(&tenant, &name, "Idle").await {
                    tracing::warn!(%tenant, actor = %name, error = %e, "idle checkpoint failed");
                }
            });
        }
        Ok(())
    }

    /// Run [`Dataplane::tick`] every `every` until the process ends.
    pub fn run_controller(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut t = tokio::time::interval(every);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                t.tick().await;
                if let Err(e) = this.tick().await {
                    tracing::warn!(error = %e, "dataplane controller round failed");
                }
            }
        })
    }

    async fn load(
        &self,
        tenant: &str,
        name: &str,
    ) -> Result<(ActorTemplateSpec, String, Option<ActorRecord>), DataplaneError> {
        self.control
            .read(|st| {
                let template = st.actor_template(tenant, name).ok_or_else(|| {
                    DataplaneError::NotFound(format!("no Actor `{name}` in tenant `{tenant}`"))
                })?;
                let spec = st.template_of(tenant, &template).ok_or_else(|| {
                    DataplaneError::NotFound(format!(
                        "Actor `{name}` names ActorTemplate `{template}`, which does not exist"
                    ))
                })?;
                Ok((spec, template, st.actors.get(&key(tenant, name)).cloned()))
            })
            .await?
    }

    fn spec(tenant: &str, actor: &str, template: &str, tpl: &ActorTemplateSpec) -> ActorSpec {
        ActorSpec {
            actor: actor.into(),
            tenant: tenant.into(),
            template: template.into(),
            workload: tpl.workload.clone(),
        }
    }

    /// Where `tenant/name` serves now, resuming it (scale from zero) when it does not run.
    pub async fn resume(&self, tenant: &str, name: &str) -> Result<Route, DataplaneError> {
        self.resume_with(tenant, name, Placement::Any).await
    }

    async fn resume_with(
        &self,
        tenant: &str,
        name: &str,
        placement: Placement<'_>,
    ) -> Result<Route, DataplaneError> {
        let _serial = self.serialize(&key(tenant, name)).await;
        self.resume_locked(tenant, name, placement).await
    }

    /// [`Dataplane::resume_with`] with the actor's lock held.
    async fn resume_locked(
        &self,
        tenant: &str,
        name: &str,
        placement: Placement<'_>,
    ) -> Result<Route, DataplaneError> {
        let (tpl, template, rec) = self.load(tenant, name).await?;
        if let Some(r) = &rec
            && r.phase == ActorPhase::Running
            && let Some(w) = &r.worker
            && matches!(placement, Placement::Any)
        {
            let healthy = self
                .control
                .read(|st| st.workers.get(w).is_some_and(|w| !w.lost))
                .await?;
            if healthy {
                return Ok(Route {
                    client: self.client_of_worker(w).await?,
                    actor: name.into(),
                    epoch: r.epoch,
                    worker: w.clone(),
                });
            }
        }
        let now = now_ms();
        let avoid = match placement {
            Placement::Avoid(w) => Some(w),
            Placement::Any => None,
        };
        let worker = self
            .control
            .read(|st| st.schedule(&tpl, &self.leases(), now, avoid))
            .await?
            .map_err(DataplaneError::NoCapacity)?;
        // A snapshot of another workload (the template changed since) would be refused by
        // every provider: say so once, durably, instead of failing every placement.
        if let Some(r) = &rec
            && let Some(d) = &r.snapshot
        {
            let wd = self
                .control
                .read(|st| st.snapshots.get(d).map(|s| s.workload_digest().to_owned()))
                .await?
                .unwrap_or_default();
            if wd != tpl.workload.digest() {
                if r.phase != ActorPhase::Failed || r.reason != "WorkloadChanged" {
                    let failed = ActorRecord {
                        phase: ActorPhase::Failed,
                        worker: None,
                        op: None,
                        reason: "WorkloadChanged".into(),
                        ..r.clone()
                    };
                    self.record(vec![(EventKind::ActorChanged, rec_json(&failed))])
                        .await?;
                }
                return Err(DataplaneError::Refused(Refusal::new(
                    RefusalCode::ForeignSnapshot,
                    format!(
                        "the template's workload changed since `{name}`'s last snapshot; `mayfly actors reset {name}` starts it over from the new workload"
                    ),
                )));
            }
        }
        let snapshot = match rec.as_ref().and_then(|r| r.snapshot.clone()) {
            Some(d) => Some(d),
            None if tpl.golden => Some(self.golden(tenant, &template, &tpl).await?),
            None => None,
        };
        let envelope = match &snapshot {
            Some(d) => Some(
                self.control
                    .read(|st| st.snapshots.get(d).map(|s| s.envelope.clone()))
                    .await?
                    .ok_or_else(|| DataplaneError::NotFound(format!("snapshot {d}")))?,
            ),
            None => None,
        };
        let epoch = rec.as_ref().map_or(0, |r| r.epoch) + 1;
        let spec = Self::spec(tenant, name, &template, &tpl);
        let (action, op) = match envelope {
            Some(env) => (
                "restore",
                Op::Restore {
                    snapshot: env,
                    spec,
                },
            ),
            None => (
                "run",
                Op::Assign {
                    desired: Desired::Running,
                    spec,
                },
            ),
        };
        let id = op_id(tenant, name, epoch, action);
        // Resolved before anything is recorded: a missing secret places nothing.
        let delivery = self.delivery(tenant, name, epoch, &tpl).await?;
        let base = ActorRecord {
            tenant: tenant.into(),
            name: name.into(),
            template: template.clone(),
            phase: ActorPhase::Resuming,
            epoch,
            worker: Some(worker.clone()),
            op: Some(PendingOp {
                id: id.clone(),
                action: action.into(),
            }),
            snapshot: snapshot.clone(),
            reason: "Resuming".into(),
        };
        self.record(vec![(EventKind::ActorChanged, rec_json(&base))])
            .await?;
        self.reserve(&worker, 1);
        let req = OpRequest {
            op_id: id,
            actor: name.into(),
            tenant: tenant.into(),
            assignment_epoch: epoch,
            op,
            delivery: Some(delivery),
            grant: None,
        };
        let client = self.client_of_worker(&worker).await;
        let outcome = match client {
            Ok(c) => self.run_op(&c, &req).await.map(|_| c),
            Err(e) => Err(e),
        };
        match outcome {
            Ok(client) => {
                let running = ActorRecord {
                    phase: ActorPhase::Running,
                    op: None,
                    reason: if action == "restore" {
                        "Restored"
                    } else {
                        "Started"
                    }
                    .into(),
                    ..base
                };
                self.record(vec![(EventKind::ActorChanged, rec_json(&running))])
                    .await?;
                self.touch(tenant, name);
                Ok(Route {
                    client,
                    actor: name.into(),
                    epoch,
                    worker,
                })
            }
            Err(e) => {
                self.reserve(&worker, -1);
                // A snapshot that cannot be trusted or read will not restore anywhere: the
                // actor is Failed (every request retries, and reports why). Anything else
                // (capacity, a provider down) leaves it Suspended.
                let broken = matches!(
                    &e,
                    DataplaneError::Refused(r) if matches!(
                        r.code,
                        RefusalCode::SnapshotUntrusted
                            | RefusalCode::ManifestUnreadable
                            | RefusalCode::ForeignSnapshot
                            | RefusalCode::BlobDigestMismatch
                    )
                );
                let failed = ActorRecord {
                    phase: if broken {
                        ActorPhase::Failed
                    } else {
                        ActorPhase::Suspended
                    },
                    worker: None,
                    op: None,
                    reason: format!("ResumeFailed: {}", e.code()),
                    ..base
                };
                self.record(vec![(EventKind::ActorChanged, rec_json(&failed))])
                    .await?;
                Err(e)
            }
        }
    }

    async fn record(&self, changes: Vec<(EventKind, Value)>) -> Result<(), DataplaneError> {
        self.control
            .transact(WHO, |_| Ok((changes, ())))
            .await
            .map_err(DataplaneError::from)
    }

    async fn run_op(
        &self,
        c: &ProviderClient,
        req: &OpRequest,
    ) -> Result<OpStatus, DataplaneError> {
        // The op's blobs, granted to the provider that runs it for this send only.
        let mut req = req.clone();
        if let Some(p) = c.provider() {
            req.grant = self.grant_for(p, &req)?;
        }
        let st = c.run(&req, self.cfg.op_timeout).await?;
        match st.state {
            OpState::Succeeded => Ok(st),
            _ => Err(DataplaneError::Refused(st.error.unwrap_or_else(|| {
                Refusal::new(RefusalCode::SandboxFailed, "the op failed without a reason")
            }))),
        }
    }

    /// The blob grant enrolled provider `provider` needs to run `req` (None: it touches no
    /// blob), valid for this send: the op timeout and a minute.
    pub fn grant_for(
        &self,
        provider: &str,
        req: &OpRequest,
    ) -> Result<Option<mayfly_trust::sign::Signed>, DataplaneError> {
        crate::broker::grant_for(
            &self.key,
            provider,
            req,
            self.cfg.op_timeout + Duration::from_secs(60),
            self.cfg.max_snapshot_bytes,
        )
        .map_err(|e| DataplaneError::Unavailable(format!("blob grant: {e}")))
    }

    /// No request in flight, and none for `timeout_ms` (checked under the actor's lock,
    /// which a request's resume also takes).
    fn idle(&self, tenant: &str, name: &str, timeout_ms: u64) -> bool {
        let k = key(tenant, name);
        let busy = self
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&k);
        let last = self
            .activity
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&k)
            .copied()
            .unwrap_or(0);
        timeout_ms > 0 && !busy && now_ms().saturating_sub(last) >= timeout_ms
    }

    /// Record that the actor served a request now (idle suspension counts from here).
    pub fn touch(&self, tenant: &str, name: &str) {
        self.activity
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key(tenant, name), now_ms());
    }

    /// The template's golden snapshot, taken on first use: a fresh actor of the template is
    /// started, made ready, checkpointed and torn down; the control plane signs its
    /// manifest bound to the template (no actor), and every first run restores it.
    async fn golden(
        &self,
        tenant: &str,
        template: &str,
        tpl: &ActorTemplateSpec,
    ) -> Result<String, DataplaneError> {
        let _serial = self
            .serialize(&format!("golden:{}", key(tenant, template)))
            .await;
        let gkey = golden_key(tenant, template, &tpl.workload.digest());
        if let Some(d) = self
            .control
            .read(|st| st.goldens.get(&gkey).cloned())
            .await?
        {
            return Ok(d);
        }
        let worker = self
            .control
            .read(|st| st.schedule(tpl, &self.leases(), now_ms(), None))
            .await?
            .map_err(DataplaneError::NoCapacity)?;
        let client = self.client_of_worker(&worker).await?;
        let actor = format!(
            "golden-{}",
            &mayfly_trust::sha256_digest(key(tenant, template).as_bytes())[7..23]
        );
        // Each attempt binds a newer epoch on the provider (its fence is durable).
        let epoch = now_ms();
        let spec = Self::spec(tenant, &actor, template, tpl);
        self.reserve(&worker, 1);
        let result = async {
            self.run_op(
                &client,
                &OpRequest {
                    op_id: op_id(tenant, &actor, epoch, "run"),
                    actor: actor.clone(),
                    tenant: tenant.into(),
                    assignment_epoch: epoch,
                    op: Op::Assign {
                        desired: Desired::Running,
                        spec: spec.clone(),
                    },
                    // A golden image is the template's, not an actor's: it gets no secrets,
                    // so none can be baked into it.
                    delivery: Some(Delivery {
                        identity: format!("golden:{}", key(tenant, template)),
                        secrets: BTreeMap::new(),
                    }),
                    grant: None,
                },
            )
            .await?;
            let mut manifest = self
                .capture(
                    &client,
                    op_id(tenant, &actor, epoch, "capture"),
                    &spec,
                    epoch,
                    tpl,
                    &worker,
                )
                .await?;
            manifest.actor = None;
            self.sign_and_record(manifest, vec![]).await
        }
        .await;
        self.reserve(&worker, -1);
        result.map(|r| r.descriptor.digest)
    }

    /// Checkpoint `spec`'s actor externally with teardown (op `op_id` at `epoch`) and verify
    /// the manifest the provider returns ([`Dataplane::verify_capture`]).
    async fn capture(
        &self,
        client: &ProviderClient,
        op_id: String,
        spec: &ActorSpec,
        epoch: u64,
        tpl: &ActorTemplateSpec,
        worker: &str,
    ) -> Result<Manifest, DataplaneError> {
        let st = self
            .run_op(
                client,
                &OpRequest {
                    op_id,
                    actor: spec.actor.clone(),
                    tenant: spec.tenant.clone(),
                    assignment_epoch: epoch,
                    op: Op::Checkpoint {
                        kind: CheckpointKind::External,
                        scope: tpl.pause_scope(&self.offered(worker).await?),
                        teardown: true,
                    },
                    delivery: None,
                    grant: None,
                },
            )
            .await?;
        let snap = st.result.and_then(|r| r.snapshot).ok_or_else(|| {
            DataplaneError::Unavailable("the checkpoint returned no snapshot".into())
        })?;
        self.verify_capture(&snap.manifest, spec, worker).await
    }

    /// Check a provider's manifest before the control plane signs it: bound to exactly the
    /// tenant, actor, template and workload the control plane placed (rebinding: the
    /// provider does not choose them), in a format its provider advertised, and every blob
    /// present in the snapshot store with the digest and size it claims (re-read here).
    async fn verify_capture(
        &self,
        m: &Manifest,
        spec: &ActorSpec,
        worker: &str,
    ) -> Result<Manifest, DataplaneError> {
        let bad = |msg: String| {
            DataplaneError::Refused(Refusal::new(RefusalCode::ManifestUnreadable, msg))
        };
        m.check().map_err(DataplaneError::Refused)?;
        if m.tenant != spec.tenant
            || m.actor.as_deref() != Some(spec.actor.as_str())
            || m.template != spec.template
            || m.workload_digest != spec.workload.digest()
        {
            return Err(DataplaneError::Refused(Refusal::new(
                RefusalCode::ForeignSnapshot,
                "the provider's manifest is bound to another tenant, actor, template or workload",
            )));
        }
        let formats = self
            .control
            .read(|st| {
                st.workers
                    .get(worker)
                    .and_then(|w| st.providers.get(&w.provider))
                    .and_then(|p| p.capabilities.as_ref())
                    .map(|c| c.formats.clone())
                    .unwrap_or_default()
            })
            .await?;
        if !formats.contains(&m.format) {
            return Err(bad(format!(
                "format {}/v{} was not advertised by its provider",
                m.format.id, m.format.version
            )));
        }
        for b in &m.blobs {
            match self.store.get(&spec.tenant, &b.digest).await {
                Ok(Some(bytes)) if bytes.len() as u64 == b.size => {}
                Ok(Some(_)) => return Err(bad(format!("blob {} has the wrong size", b.digest))),
                Ok(None) => {
                    return Err(DataplaneError::Refused(Refusal::new(
                        RefusalCode::BlobDigestMismatch,
                        format!("blob {} is not in the snapshot store", b.digest),
                    )));
                }
                Err(e) => {
                    return Err(DataplaneError::Refused(Refusal::new(
                        RefusalCode::BlobDigestMismatch,
                        format!("blob {}: {e}", b.digest),
                    )));
                }
            }
        }
        Ok(m.clone())
    }

    async fn sign_and_record(
        &self,
        manifest: Manifest,
        mut also: Vec<(EventKind, Value)>,
    ) -> Result<SnapshotRecord, DataplaneError> {
        let descriptor = manifest.descriptor();
        let envelope: Signed = self
            .key
            .sign(Purpose::Snapshot, rec_json(&manifest))
            .map_err(|e| DataplaneError::Invalid(e.to_string()))?;
        let rec = SnapshotRecord {
            tenant: manifest.tenant.clone(),
            template: manifest.template.clone(),
            actor: manifest.actor.clone(),
            data_size: manifest.data_size(),
            descriptor,
            envelope,
        };
        let mut changes = vec![(EventKind::SnapshotRecorded, rec_json(&rec))];
        changes.append(&mut also);
        self.record(changes).await?;
        Ok(rec)
    }

    /// Checkpoint a running actor externally and release its slot (idle, or before a move).
    /// On success its last good snapshot is the new one; on any failure the old one stays,
    /// the actor is Suspended with its epoch raised (whatever the provider still holds is
    /// fenced) and the provider is told to stop it.
    pub async fn suspend(
        &self,
        tenant: &str,
        name: &str,
        reason: &str,
    ) -> Result<Option<SnapshotRecord>, DataplaneError> {
        let _serial = self.serialize(&key(tenant, name)).await;
        self.suspend_locked(tenant, name, reason).await
    }

    async fn suspend_locked(
        &self,
        tenant: &str,
        name: &str,
        reason: &str,
    ) -> Result<Option<SnapshotRecord>, DataplaneError> {
        let (tpl, template, rec) = self.load(tenant, name).await?;
        let Some(rec) = rec.filter(|r| r.phase == ActorPhase::Running) else {
            return Ok(None);
        };
        if reason == "Idle" && !self.idle(tenant, name, tpl.idle_timeout_ms) {
            // A request came in since the controller looked: not idle after all.
            return Ok(None);
        }
        let Some(worker) = rec.worker.clone() else {
            return Ok(None);
        };
        let id = op_id(tenant, name, rec.epoch, "pause");
        let checkpointing = ActorRecord {
            phase: ActorPhase::Checkpointing,
            op: Some(PendingOp {
                id: id.clone(),
                action: "pause".into(),
            }),
            reason: reason.into(),
            ..rec.clone()
        };
        self.record(vec![(EventKind::ActorChanged, rec_json(&checkpointing))])
            .await?;
        let spec = Self::spec(tenant, name, &template, &tpl);
        let client = self.client_of_worker(&worker).await;
        let captured = async {
            self.capture(&client?, id, &spec, rec.epoch, &tpl, &worker)
                .await
        }
        .await;
        self.reserve(&worker, -1);
        match captured {
            Ok(manifest) => {
                let digest = manifest.descriptor().digest;
                let suspended = ActorRecord {
                    phase: ActorPhase::Suspended,
                    worker: None,
                    op: None,
                    snapshot: Some(digest),
                    reason: reason.into(),
                    ..rec
                };
                let snap = self
                    .sign_and_record(
                        manifest,
                        vec![(EventKind::ActorChanged, rec_json(&suspended))],
                    )
                    .await?;
                Ok(Some(snap))
            }
            Err(e) => {
                let fenced = ActorRecord {
                    phase: ActorPhase::Suspended,
                    epoch: rec.epoch + 1,
                    worker: None,
                    op: None,
                    reason: format!("CheckpointFailed: {}", e.code()),
                    ..rec
                };
                self.record(vec![(EventKind::ActorChanged, rec_json(&fenced))])
                    .await?;
                if let Ok(c) = self.client_of_worker(&worker).await {
                    let stop = OpRequest {
                        op_id: op_id(tenant, name, fenced.epoch, "stop"),
                        actor: name.into(),
                        tenant: tenant.into(),
                        assignment_epoch: fenced.epoch,
                        op: Op::Assign {
                            desired: Desired::Suspended,
                            spec,
                        },
                        delivery: None,
                        grant: None,
                    };
                    let _ = c.run(&stop, self.cfg.op_timeout).await;
                }
                Err(e)
            }
        }
    }

    /// Move an actor to another worker: checkpoint external → raise the epoch → restore
    /// elsewhere. A late call at the old epoch is refused everywhere.
    pub async fn move_actor(
        &self,
        caller: &Caller,
        tenant: &str,
        name: &str,
    ) -> Result<Route, DataplaneError> {
        if caller.role < Role::Operator
            || (caller.tenant != tenant && caller.tenant != SYSTEM_TENANT)
        {
            return Err(DataplaneError::Forbidden(
                "moving an actor needs the operator role in its tenant".into(),
            ));
        }
        let from = self
            .control
            .read(|st| {
                st.actors
                    .get(&key(tenant, name))
                    .and_then(|a| a.worker.clone())
            })
            .await?;
        // One critical section: no request can resume the actor between its checkpoint and
        // its restore elsewhere.
        let _serial = self.serialize(&key(tenant, name)).await;
        self.suspend_locked(tenant, name, "Moving").await?;
        match &from {
            Some(w) => self.resume_locked(tenant, name, Placement::Avoid(w)).await,
            None => self.resume_locked(tenant, name, Placement::Any).await,
        }
    }

    /// Route one data-path request: refuse a request pinned to a stale epoch, resume the
    /// actor if needed, and forward at the current epoch (re-resolving once if the actor
    /// moved in between).
    #[allow(clippy::too_many_arguments)]
    pub async fn route(
        &self,
        tenant: &str,
        name: &str,
        pinned_epoch: Option<u64>,
        method: reqwest::Method,
        path: &str,
        query: Option<&str>,
        headers: &[(String, String)],
        body: Vec<u8>,
    ) -> Result<(DataAnswer, u64), DataplaneError> {
        if let Some(want) = pinned_epoch {
            let current = self
                .control
                .read(|st| st.actors.get(&key(tenant, name)).map(|a| a.epoch))
                .await?;
            if current != Some(want) {
                return Err(DataplaneError::Refused(Refusal::new(
                    RefusalCode::StaleEpoch,
                    format!(
                        "request pinned to epoch {want}; the actor is at {}",
                        current.map_or("none".into(), |c| c.to_string())
                    ),
                )));
            }
        }
        // Counted before the resume: an actor is never torn down for idleness while a
        // request is on its way in or being served.
        let _inflight = InFlight::new(self, tenant, name);
        for attempt in 0..2 {
            let route = self.resume(tenant, name).await?;
            self.touch(tenant, name);
            let answer = route
                .client
                .call_with(
                    tenant,
                    &route.actor,
                    route.epoch,
                    method.clone(),
                    path,
                    query,
                    headers,
                    body.clone(),
                )
                .await?;
            self.touch(tenant, name);
            let stale = answer.refusal.as_ref().is_some_and(|r| {
                matches!(r.code, RefusalCode::StaleEpoch | RefusalCode::UnknownActor)
            });
            if stale && attempt == 0 && pinned_epoch.is_none() {
                continue;
            }
            return Ok((answer, route.epoch));
        }
        Err(DataplaneError::Unavailable(
            "the actor moved twice during one request".into(),
        ))
    }

    /// Start an actor over (operators): its snapshot is dropped and its epoch raised, so the
    /// next request runs it fresh (from the template's current golden image); a copy still
    /// running anywhere is fenced.
    pub async fn reset(&self, caller: &Caller, name: &str) -> Result<u64, DataplaneError> {
        if caller.role < Role::Operator {
            return Err(DataplaneError::Forbidden(
                "resetting an actor needs the operator role".into(),
            ));
        }
        let tenant = caller.tenant.as_str();
        let _serial = self.serialize(&key(tenant, name)).await;
        let (tpl, template, rec) = self.load(tenant, name).await?;
        let Some(rec) = rec else {
            return Ok(0);
        };
        let reset = ActorRecord {
            phase: ActorPhase::Suspended,
            epoch: rec.epoch + 1,
            worker: None,
            op: None,
            snapshot: None,
            reason: "Reset".into(),
            ..rec.clone()
        };
        self.record(vec![(EventKind::ActorChanged, rec_json(&reset))])
            .await?;
        if let Some(w) = &rec.worker {
            self.reserve(w, -1);
            if let Ok(c) = self.client_of_worker(w).await {
                let stop = OpRequest {
                    op_id: op_id(tenant, name, reset.epoch, "stop"),
                    actor: name.into(),
                    tenant: tenant.into(),
                    assignment_epoch: reset.epoch,
                    op: Op::Assign {
                        desired: Desired::Suspended,
                        spec: Self::spec(tenant, name, &template, &tpl),
                    },
                    delivery: None,
                    grant: None,
                };
                let _ = c.run(&stop, self.cfg.op_timeout).await;
            }
        }
        Ok(reset.epoch)
    }

    /// Store a WASM module (or any workload asset) in the caller's tenant scope of the
    /// snapshot store, by content digest (authors and up). Templates name it by digest.
    pub async fn put_module(
        &self,
        caller: &Caller,
        bytes: Vec<u8>,
    ) -> Result<String, DataplaneError> {
        if caller.role < Role::Author {
            return Err(DataplaneError::Forbidden(
                "uploading a module needs the author role".into(),
            ));
        }
        if bytes.is_empty() {
            return Err(DataplaneError::Invalid("the module is empty".into()));
        }
        let digest = mayfly_trust::sha256_digest(&bytes);
        self.store
            .put(&caller.tenant, &digest, bytes.into())
            .await
            .map_err(|e| DataplaneError::Unavailable(format!("snapshot store: {e}")))?;
        Ok(digest)
    }

    /// Actors visible to `caller` (system admins see every tenant's).
    pub async fn actors(&self, caller: &Caller) -> Result<Vec<ActorRecord>, DataplaneError> {
        let all = caller.tenant == SYSTEM_TENANT;
        Ok(self
            .control
            .read(|st| {
                st.actors_of((!all).then_some(caller.tenant.as_str()))
                    .into_iter()
                    .cloned()
                    .collect()
            })
            .await?)
    }

    /// Providers and workers with their live leases (system tenant).
    pub async fn providers(&self, caller: &Caller) -> Result<Value, DataplaneError> {
        if caller.tenant != SYSTEM_TENANT {
            return Err(DataplaneError::Forbidden(
                "providers are visible to the system tenant".into(),
            ));
        }
        let now = now_ms();
        let leases = self.leases();
        Ok(self
            .control
            .read(|st| {
                json!({
                    "providers": st.providers.values().collect::<Vec<_>>(),
                    "workers": st.workers.values().map(|w| {
                        let l = leases.get(&w.id);
                        json!({
                            "worker": w,
                            "used": l.map_or(0, |l| l.used),
                            "lease_ms_left": l.map_or(0, |l| l.expires_ms.saturating_sub(now)),
                        })
                    }).collect::<Vec<_>>(),
                })
            })
            .await?)
    }

    /// Snapshot descriptors of an actor (its last good one first), tenant-scoped.
    pub async fn snapshots_of(
        &self,
        tenant: &str,
        name: &str,
    ) -> Result<Vec<SnapshotRecord>, DataplaneError> {
        Ok(self
            .control
            .read(|st| {
                let last = st
                    .actors
                    .get(&key(tenant, name))
                    .and_then(|a| a.snapshot.clone());
                let mut v: Vec<SnapshotRecord> = st
                    .snapshots
                    .values()
                    .filter(|s| s.tenant == tenant && s.actor.as_deref() == Some(name))
                    .cloned()
                    .collect();
                v.sort_by_key(|s| Some(&s.descriptor.digest) != last.as_ref());
                v
            })
            .await?)
    }
}

/// May `provider` keep running `r`? Not if the control plane records that actor as
/// assigned elsewhere or at another epoch. Actors it has no record of (a golden capture in
/// progress, a conformance run) are not its to fence.
fn assigned_here(st: &ControlState, provider: &str, r: &RunningActor) -> bool {
    let Some(a) = st.actors.get(&key(&r.tenant, &r.actor)) else {
        return true;
    };
    {
        a.epoch == r.epoch
            && matches!(
                a.phase,
                ActorPhase::Running | ActorPhase::Resuming | ActorPhase::Checkpointing
            )
            && a.worker
                .as_deref()
                .and_then(|w| st.workers.get(w))
                .is_some_and(|w| w.provider == provider)
    }
}

fn identity_body(tenant: &str, name: &str, epoch: u64) -> Value {
    json!({ "tenant": tenant, "actor": name, "epoch": epoch })
}

/// The control plane's provider-facing API, served over mTLS
/// ([`mayfly_pki::serve`] with `Admit::AnyIssued`): the verified certificate's fingerprint
/// identifies the provider.
///
/// * `POST /v1/providers/heartbeat` — [`Heartbeat`] → [`HeartbeatAnswer`]
/// * `GET`/`PUT /v1/blobs/{digest}` — the blob broker: one snapshot blob, under the op's
///   grant in [`crate::broker::GRANT_HEADER`] (the caller must be the grant's provider)
pub fn provider_router(dp: Arc<Dataplane>) -> axum::Router {
    use axum::routing::{get, post};
    axum::Router::new()
        .route("/v1/providers/heartbeat", post(heartbeat_handler))
        .route("/v1/blobs/{digest}", get(blob_get).put(blob_put))
        .layer(axum::extract::DefaultBodyLimit::max(
            mayfly_actor_api::BLOB_CHUNK + 64 * 1024,
        ))
        .with_state(dp)
}

/// The enrolled provider a certificate fingerprint is, and the grant a request carries.
async fn blob_caller(
    dp: &Dataplane,
    peer: &str,
    headers: &axum::http::HeaderMap,
) -> Result<(String, Signed), crate::broker::BrokerError> {
    use crate::broker::BrokerError;
    let provider = dp
        .control
        .read(|st| {
            st.providers
                .values()
                .find(|p| p.fingerprint == peer)
                .map(|p| p.id.clone())
        })
        .await
        .map_err(|e| BrokerError::Store(e.to_string()))?
        .ok_or_else(|| {
            BrokerError::Denied("this certificate is not an enrolled provider".into())
        })?;
    let grant = headers
        .get(crate::broker::GRANT_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::broker::decode)
        .ok_or_else(|| {
            BrokerError::Denied(format!(
                "no readable grant in `{}`",
                crate::broker::GRANT_HEADER
            ))
        })?;
    Ok((provider, grant))
}

fn broker_answer(
    r: Result<axum::response::Response, crate::broker::BrokerError>,
) -> axum::response::Response {
    match r {
        Ok(r) => r,
        Err(e) => problem(e.http_status(), e.code(), &e.to_string()),
    }
}

/// A problem+json answer of the provider listener.
fn problem(status: u16, code: &str, detail: &str) -> axum::response::Response {
    use axum::response::IntoResponse;
    let status = axum::http::StatusCode::from_u16(status)
        .unwrap_or(axum::http::StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        [("content-type", "application/problem+json")],
        json!({"title": code, "code": code, "status": status.as_u16(), "detail": detail})
            .to_string(),
    )
        .into_response()
}

async fn blob_get(
    axum::extract::State(dp): axum::extract::State<Arc<Dataplane>>,
    axum::Extension(peer): axum::Extension<mayfly_pki::PeerIdentity>,
    axum::extract::Path(digest): axum::extract::Path<String>,
    headers: axum::http::HeaderMap,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    broker_answer(
        async {
            let (provider, grant) = blob_caller(&dp, &peer.0, &headers).await?;
            let bytes = dp.broker.get(&provider, &grant, &digest).await?;
            Ok(([("content-type", "application/octet-stream")], bytes).into_response())
        }
        .await,
    )
}

async fn blob_put(
    axum::extract::State(dp): axum::extract::State<Arc<Dataplane>>,
    axum::Extension(peer): axum::Extension<mayfly_pki::PeerIdentity>,
    axum::extract::Path(digest): axum::extract::Path<String>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    broker_answer(
        async {
            let (provider, grant) = blob_caller(&dp, &peer.0, &headers).await?;
            dp.broker.put(&provider, &grant, &digest, body).await?;
            Ok(axum::http::StatusCode::NO_CONTENT.into_response())
        }
        .await,
    )
}

async fn heartbeat_handler(
    axum::extract::State(dp): axum::extract::State<Arc<Dataplane>>,
    axum::Extension(peer): axum::Extension<mayfly_pki::PeerIdentity>,
    body: axum::body::Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let answer = match serde_json::from_slice::<Heartbeat>(&body) {
        Ok(hb) => dp.heartbeat(&peer.0, hb).await,
        Err(e) => Err(DataplaneError::Invalid(format!("heartbeat: {e}"))),
    };
    match answer {
        Ok(a) => axum::Json(a).into_response(),
        Err(e) => problem(e.http_status(), e.code(), &e.to_string()),
    }
}
