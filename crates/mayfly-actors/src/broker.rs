//! Snapshot blobs by capability: a provider under a control plane holds no credentials for
//! the snapshot store. Each op that touches blobs carries a grant the control plane signed
//! for it ([`BlobGrant`]: this provider, this tenant, these digests to read, this many bytes
//! to write, until then), and the provider reads and writes through the control plane's
//! blob broker (`GET`/`PUT /v1/blobs/{digest}` on its provider listener, mTLS), which
//! checks the grant against the caller's certificate before it touches the store. A
//! provider cannot list the store, nor read a blob of another tenant, of another op, or
//! after the grant's time.

use bytes::Bytes;
use mayfly_actor_api::{BlobGrant, OpRequest, Refusal, RefusalCode};
use mayfly_cache::{Cache, CacheError};
use mayfly_trust::sign::{ControlKey, Purpose, Signed, TrustedKey};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The header a grant travels in (base64url of its JSON envelope).
pub const GRANT_HEADER: &str = "x-mayfly-grant";

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The grant `req` needs when provider `provider` runs it (None: it touches no blob),
/// valid for `ttl`, writing at most `max_write` bytes.
pub fn grant_for(
    key: &ControlKey,
    provider: &str,
    req: &OpRequest,
    ttl: Duration,
    max_write: u64,
) -> Result<Option<Signed>, mayfly_trust::TrustError> {
    let (read, write) = req.blob_needs();
    if read.is_empty() && !write {
        return Ok(None);
    }
    let grant = BlobGrant {
        provider: provider.to_owned(),
        tenant: req.tenant.clone(),
        op_id: req.op_id.clone(),
        read,
        write_bytes: if write { max_write } else { 0 },
        expires_ms: now_ms().saturating_add(ttl.as_millis() as u64),
    };
    let body = serde_json::to_value(&grant)
        .map_err(|e| mayfly_trust::TrustError::Canonical(format!("grant: {e}")))?;
    key.sign(Purpose::BlobGrant, body).map(Some)
}

/// A grant as a header value, and back.
pub fn encode(grant: &Signed) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(serde_json::to_vec(grant).unwrap_or_default())
}

pub fn decode(header: &str) -> Option<Signed> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header.trim())
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Why the broker refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BrokerError {
    #[error("{0}")]
    Denied(String),
    #[error("blob {0} is not in the snapshot store")]
    NotFound(String),
    #[error("the snapshot store: {0}")]
    Store(String),
    #[error("{0}")]
    Invalid(String),
}

impl BrokerError {
    pub fn code(&self) -> &'static str {
        match self {
            BrokerError::Denied(_) => "blob_access_denied",
            BrokerError::NotFound(_) => "not_found",
            BrokerError::Store(_) => "unavailable",
            BrokerError::Invalid(_) => "invalid",
        }
    }

    pub fn http_status(&self) -> u16 {
        match self {
            BrokerError::Denied(_) => 403,
            BrokerError::NotFound(_) => 404,
            BrokerError::Store(_) => 503,
            BrokerError::Invalid(_) => 400,
        }
    }
}

/// The control plane's side: the snapshot store, opened only for what a grant names.
pub struct Broker {
    store: Arc<dyn Cache>,
    trusted: Vec<TrustedKey>,
    /// Bytes written per grant (by its digest), and when it expires (then forgotten).
    written: Mutex<HashMap<String, (u64, u64)>>,
}

impl Broker {
    /// A broker over `store` honouring grants signed by `trusted` (the control key).
    pub fn new(store: Arc<dyn Cache>, trusted: Vec<TrustedKey>) -> Broker {
        Broker {
            store,
            trusted,
            written: Mutex::default(),
        }
    }

    /// The grant, if it is genuine, live and `provider`'s.
    fn check(&self, provider: &str, grant: &Signed) -> Result<BlobGrant, BrokerError> {
        grant
            .verify(Purpose::BlobGrant, &self.trusted)
            .map_err(|e| BrokerError::Denied(format!("grant: {e} ({})", e.code())))?;
        let g: BlobGrant = serde_json::from_value(grant.body.clone())
            .map_err(|e| BrokerError::Denied(format!("grant: {e}")))?;
        if g.provider != provider {
            return Err(BrokerError::Denied(format!(
                "the grant is provider {}'s, not this caller's",
                g.provider
            )));
        }
        if now_ms() >= g.expires_ms {
            return Err(BrokerError::Denied(format!(
                "the grant of op {} has expired",
                g.op_id
            )));
        }
        Ok(g)
    }

    /// Blob `digest` of the grant's tenant, if the grant names it.
    pub async fn get(
        &self,
        provider: &str,
        grant: &Signed,
        digest: &str,
    ) -> Result<Bytes, BrokerError> {
        let g = self.check(provider, grant)?;
        if !g.read.iter().any(|d| d == digest) {
            return Err(BrokerError::Denied(format!(
                "the grant of op {} does not name blob {digest}",
                g.op_id
            )));
        }
        match self.store.get(&g.tenant, digest).await {
            Ok(Some(b)) => Ok(b),
            Ok(None) => Err(BrokerError::NotFound(digest.to_owned())),
            // A blob that does not hash to its name is not served (the provider would
            // refuse it anyway): it is reported as the mismatch it is.
            Err(CacheError::Corrupt { digest, detail }) => Err(BrokerError::Invalid(format!(
                "blob {digest} is corrupt: {detail}"
            ))),
            Err(e) => Err(BrokerError::Store(e.to_string())),
        }
    }

    /// Store `bytes` under `digest` in the grant's tenant, within its write budget.
    pub async fn put(
        &self,
        provider: &str,
        grant: &Signed,
        digest: &str,
        bytes: Bytes,
    ) -> Result<(), BrokerError> {
        let g = self.check(provider, grant)?;
        let n = bytes.len() as u64;
        {
            let mut w = self.written.lock().unwrap_or_else(|p| p.into_inner());
            let now = now_ms();
            w.retain(|_, (_, until)| *until > now);
            let used = w.entry(grant.digest.clone()).or_insert((0, g.expires_ms));
            if used.0.saturating_add(n) > g.write_bytes {
                return Err(BrokerError::Denied(format!(
                    "the grant of op {} allows {} bytes of writes; {} are used",
                    g.op_id, g.write_bytes, used.0
                )));
            }
            used.0 += n;
        }
        match self.store.put(&g.tenant, digest, bytes).await {
            Ok(()) => Ok(()),
            Err(e) => {
                // Not written: not counted.
                if let Some(u) = self
                    .written
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_mut(&grant.digest)
                {
                    u.0 = u.0.saturating_sub(n);
                }
                Err(match e {
                    CacheError::Corrupt { .. } | CacheError::BadKey(_) => {
                        BrokerError::Invalid(e.to_string())
                    }
                    e => BrokerError::Store(e.to_string()),
                })
            }
        }
    }
}

/// The provider's side: the broker at the control plane's provider endpoint, over the
/// provider's mTLS client.
#[derive(Clone)]
pub struct BrokerClient {
    base: String,
    http: reqwest::Client,
}

impl BrokerClient {
    pub fn new(control_endpoint: &str, http: reqwest::Client) -> BrokerClient {
        BrokerClient {
            base: control_endpoint.trim_end_matches('/').to_owned(),
            http,
        }
    }

    fn refusal(status: u16, body: &str) -> Refusal {
        let detail = serde_json::from_str::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v["detail"].as_str().map(str::to_owned))
            .unwrap_or_else(|| body.chars().take(300).collect());
        let code = match status {
            403 => RefusalCode::BlobAccessDenied,
            404 | 400 => RefusalCode::BlobDigestMismatch,
            _ => RefusalCode::SandboxFailed,
        };
        Refusal::new(code, format!("snapshot store (broker): {detail}"))
    }

    async fn send(r: reqwest::RequestBuilder) -> Result<reqwest::Response, Refusal> {
        r.send().await.map_err(|e| {
            Refusal::new(
                RefusalCode::SandboxFailed,
                format!("snapshot store (broker) unreachable: {e}"),
            )
        })
    }

    /// Blob `digest` under `grant` (None when the store does not hold it).
    pub async fn get(&self, grant: &Signed, digest: &str) -> Result<Option<Bytes>, Refusal> {
        let r = Self::send(
            self.http
                .get(format!("{}/v1/blobs/{digest}", self.base))
                .header(GRANT_HEADER, encode(grant)),
        )
        .await?;
        let status = r.status().as_u16();
        let body = r.bytes().await.map_err(|e| {
            Refusal::new(RefusalCode::SandboxFailed, format!("snapshot store: {e}"))
        })?;
        match status {
            200 => Ok(Some(body)),
            404 => Ok(None),
            s => Err(Self::refusal(s, &String::from_utf8_lossy(&body))),
        }
    }

    /// Store `bytes` (whose digest is `digest`) under `grant`.
    pub async fn put(&self, grant: &Signed, digest: &str, bytes: Bytes) -> Result<(), Refusal> {
        let r = Self::send(
            self.http
                .put(format!("{}/v1/blobs/{digest}", self.base))
                .header(GRANT_HEADER, encode(grant))
                .body(bytes),
        )
        .await?;
        let status = r.status().as_u16();
        if status == 204 || status == 200 {
            return Ok(());
        }
        let body = r.text().await.unwrap_or_default();
        Err(Self::refusal(status, &body))
    }
}

/// Where a provider's external snapshots live: a store it opens itself (no control plane:
/// tests, the embedded dataplane) or the control plane's broker, op by op.
#[derive(Clone)]
pub enum Blobs {
    Direct(Arc<dyn Cache>),
    Brokered(BrokerClient),
}

impl From<Arc<dyn Cache>> for Blobs {
    fn from(c: Arc<dyn Cache>) -> Blobs {
        Blobs::Direct(c)
    }
}

fn no_grant(what: &str) -> Refusal {
    Refusal::new(
        RefusalCode::BlobAccessDenied,
        format!(
            "{what}: the op carries no blob grant (snapshot blobs are reached only through the control plane's grants)"
        ),
    )
}

impl Blobs {
    pub async fn get(
        &self,
        tenant: &str,
        digest: &str,
        grant: Option<&Signed>,
    ) -> Result<Option<Bytes>, Refusal> {
        match self {
            Blobs::Direct(c) => match c.get(tenant, digest).await {
                Ok(b) => Ok(b),
                Err(CacheError::Corrupt { digest, detail }) => Err(Refusal::new(
                    RefusalCode::BlobDigestMismatch,
                    format!("blob {digest}: {detail}"),
                )),
                Err(e) => Err(Refusal::new(RefusalCode::SandboxFailed, e.to_string())),
            },
            Blobs::Brokered(b) => {
                let grant = grant.ok_or_else(|| no_grant(&format!("blob {digest}")))?;
                b.get(grant, digest).await
            }
        }
    }

    pub async fn put(
        &self,
        tenant: &str,
        digest: &str,
        bytes: Bytes,
        grant: Option<&Signed>,
    ) -> Result<(), Refusal> {
        match self {
            Blobs::Direct(c) => c.put(tenant, digest, bytes).await.map_err(|e| {
                Refusal::new(RefusalCode::SandboxFailed, format!("snapshot store: {e}"))
            }),
            Blobs::Brokered(b) => {
                let grant = grant.ok_or_else(|| no_grant("a checkpoint"))?;
                b.put(grant, digest, bytes).await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mayfly_actor_api::{ActorSpec, CheckpointKind, Desired, Op, Scope, Workload};

    fn op(op: Op) -> OpRequest {
        OpRequest {
            op_id: "run.e1.x".into(),
            actor: "a".into(),
            tenant: "acme".into(),
            assignment_epoch: 1,
            op,
            delivery: None,
            grant: None,
        }
    }

    fn wasm(module: &str) -> ActorSpec {
        ActorSpec {
            actor: "a".into(),
            tenant: "acme".into(),
            template: "t".into(),
            workload: Workload::Wasm {
                module: module.into(),
                handler: "handle".into(),
            },
        }
    }

    fn denied<T: std::fmt::Debug>(r: Result<T, BrokerError>) -> String {
        match r {
            Err(BrokerError::Denied(m)) => m,
            other => panic!("not denied: {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_grant_opens_exactly_what_it_names() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Cache> = Arc::new(mayfly_cache::LocalCache::new(dir.path()));
        let key = ControlKey::generate();
        let broker = Broker::new(store.clone(), vec![key.public().clone()]);
        let blob = Bytes::from_static(b"module bytes");
        let digest = mayfly_trust::sha256_digest(&blob);
        let other = Bytes::from_static(b"another blob");
        let other_digest = mayfly_trust::sha256_digest(&other);
        store.put("acme", &digest, blob.clone()).await.unwrap();
        store
            .put("acme", &other_digest, other.clone())
            .await
            .unwrap();
        store.put("globex", &digest, blob.clone()).await.unwrap();
        let ttl = Duration::from_secs(60);

        // An assign of a wasm actor reads its module, nothing else, and writes nothing.
        let assign = op(Op::Assign {
            desired: Desired::Running,
            spec: wasm(&digest),
        });
        let g = grant_for(&key, "p1", &assign, ttl, 1 << 20)
            .unwrap()
            .unwrap();
        assert_eq!(broker.get("p1", &g, &digest).await.unwrap(), blob);
        assert!(denied(broker.get("p1", &g, &other_digest).await).contains("does not name"));
        assert!(denied(broker.get("p2", &g, &digest).await).contains("provider p1's"));
        assert!(
            denied(broker.put("p1", &g, &other_digest, other.clone()).await)
                .contains("allows 0 bytes")
        );
        // Altered (another tenant's scope), or signed by another key: refused.
        let mut forged = g.clone();
        forged.body["tenant"] = "globex".into();
        assert!(denied(broker.get("p1", &forged, &digest).await).contains("digest_mismatch"));
        let stranger = ControlKey::generate();
        let g2 = grant_for(&stranger, "p1", &assign, ttl, 0)
            .unwrap()
            .unwrap();
        assert!(denied(broker.get("p1", &g2, &digest).await).contains("unknown_key"));
        // Expired.
        let old = grant_for(&key, "p1", &assign, Duration::ZERO, 0)
            .unwrap()
            .unwrap();
        assert!(denied(broker.get("p1", &old, &digest).await).contains("expired"));
        // The header form round-trips; garbage does not decode.
        assert_eq!(decode(&encode(&g)), Some(g.clone()));
        assert_eq!(decode("not base64!"), None);

        // An external checkpoint writes within its budget, reads nothing.
        let ck = op(Op::Checkpoint {
            kind: CheckpointKind::External,
            scope: Scope::Data,
            teardown: false,
        });
        let g = grant_for(&key, "p1", &ck, ttl, 20).unwrap().unwrap();
        let a = Bytes::from_static(b"0123456789");
        let a_digest = mayfly_trust::sha256_digest(&a);
        broker.put("p1", &g, &a_digest, a.clone()).await.unwrap();
        assert_eq!(store.get("acme", &a_digest).await.unwrap(), Some(a.clone()));
        assert!(store.get("globex", &a_digest).await.unwrap().is_none());
        broker.put("p1", &g, &a_digest, a.clone()).await.unwrap();
        assert!(denied(broker.put("p1", &g, &a_digest, a.clone()).await).contains("20 bytes"));
        assert!(denied(broker.get("p1", &g, &a_digest).await).contains("does not name"));
        // A body that is not its digest is refused by the store, and not counted.
        let g = grant_for(&key, "p1", &ck, ttl, 20).unwrap().unwrap();
        assert!(matches!(
            broker
                .put("p1", &g, &a_digest, Bytes::from_static(b"9876543210"))
                .await,
            Err(BrokerError::Invalid(_))
        ));
        broker.put("p1", &g, &a_digest, a.clone()).await.unwrap();

        // A local checkpoint and a suspend touch no blob: no grant at all.
        let local = op(Op::Checkpoint {
            kind: CheckpointKind::Local,
            scope: Scope::Data,
            teardown: true,
        });
        assert!(grant_for(&key, "p1", &local, ttl, 20).unwrap().is_none());
    }

    #[tokio::test]
    async fn brokered_blobs_need_a_grant() {
        crate::install_crypto();
        let b = Blobs::Brokered(BrokerClient::new(
            "https://127.0.0.1:9",
            reqwest::Client::new(),
        ));
        let e = b.get("acme", "sha256:00", None).await.unwrap_err();
        assert_eq!(e.code, RefusalCode::BlobAccessDenied);
        let e = b
            .put("acme", "sha256:00", Bytes::new(), None)
            .await
            .unwrap_err();
        assert_eq!(e.code, RefusalCode::BlobAccessDenied);
    }
}
