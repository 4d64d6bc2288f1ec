//! A whole dataplane in one process, over the real seams: a control plane's [`Dataplane`]
//! with its provider listener, and any number of providers, each behind mTLS on loopback
//! and heartbeating as in production. The benchmark and the fault-injection tests run on it.

use crate::client::ProviderClient;
use crate::dataplane::{Dataplane, DataplaneConfig, DataplaneError, EnrollRequest};
use crate::{Journal, Provider, ProviderConfig, Sandbox};
use mayfly_cache::{Cache, LocalCache};
use mayfly_control::{Caller, Control, Role, SYSTEM_TENANT, parse_manifests};
use mayfly_pki::{Admit, Ca, Identity, Usage};
use mayfly_trust::sign::ControlKey;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Builds a provider's sandbox from the snapshot store and the provider's directory.
pub type MakeSandbox =
    Box<dyn FnOnce(Arc<dyn Cache>, &Path) -> Result<Arc<dyn Sandbox>, mayfly_actor_api::Refusal>>;

/// One in-process provider.
pub struct LocalProvider {
    pub id: String,
    pub endpoint: String,
    pub provider: Arc<Provider>,
    pub identity: Identity,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// The in-process dataplane.
pub struct LocalDataplane {
    pub dp: Arc<Dataplane>,
    pub control: Arc<Control>,
    /// A system admin.
    pub admin: Caller,
    pub ca: Ca,
    /// The control plane's client identity (what providers admit).
    pub control_id: Identity,
    /// The shared snapshot store.
    pub store: Arc<dyn Cache>,
    pub providers: Vec<LocalProvider>,
    dir: PathBuf,
}

fn err(e: impl std::fmt::Display) -> DataplaneError {
    DataplaneError::Invalid(e.to_string())
}

impl LocalDataplane {
    /// A control plane over `control` (which must sign: its key is the snapshot key), its
    /// provider listener on loopback, the snapshot store in `dir/snapshots`.
    pub async fn start(
        control: Arc<Control>,
        key: &ControlKey,
        dir: &Path,
        lease_ms: u64,
    ) -> Result<LocalDataplane, DataplaneError> {
        crate::install_crypto();
        let (ca, ca_key) = Ca::generate("local CA").map_err(err)?;
        let control_id = ca
            .issue(&[], Usage::Control, "mayfly-control")
            .map_err(err)?;
        let store: Arc<dyn Cache> = Arc::new(LocalCache::new(dir.join("snapshots")));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(err)?;
        let addr = listener.local_addr().map_err(err)?;
        let server = ca
            .issue(&[addr.ip().to_string()], Usage::Provider, "control")
            .map_err(err)?;
        let dp = Dataplane::new(
            control.clone(),
            ControlKey::from_base64(&key.to_base64()).map_err(err)?,
            Ca::from_pem(ca.cert_pem(), &ca_key).map_err(err)?,
            control_id.clone(),
            store.clone(),
            DataplaneConfig {
                lease_ms,
                provider_endpoint: Some(format!("https://{addr}")),
                provider_endpoint_fingerprint: Some(server.fingerprint().map_err(err)?),
                ..Default::default()
            },
        )
        .await?;
        tokio::spawn(mayfly_pki::serve(
            listener,
            crate::dataplane::provider_router(dp.clone()),
            mayfly_pki::server_config(ca.cert_pem(), &server).map_err(err)?,
            Admit::AnyIssued,
        ));
        dp.run_controller(Duration::from_millis(200));
        Ok(LocalDataplane {
            dp,
            control,
            admin: Caller {
                tenant: SYSTEM_TENANT.into(),
                role: Role::Admin,
                actor: "local".into(),
                request_id: "local".into(),
            },
            ca,
            control_id,
            store,
            providers: Vec::new(),
            dir: dir.to_path_buf(),
        })
    }

    /// Enroll and start a provider `id` with `slots` over the sandbox `make` builds; it
    /// heartbeats every 200 ms.
    pub async fn add_provider(
        &mut self,
        id: &str,
        slots: u32,
        make: MakeSandbox,
    ) -> Result<(), DataplaneError> {
        self.add_provider_labeled(id, slots, BTreeMap::new(), make)
            .await
    }

    /// [`LocalDataplane::add_provider`] with worker labels (for template selectors).
    pub async fn add_provider_labeled(
        &mut self,
        id: &str,
        slots: u32,
        labels: BTreeMap<String, String>,
        make: MakeSandbox,
    ) -> Result<(), DataplaneError> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(err)?
            .port();
        let endpoint = format!("https://127.0.0.1:{port}");
        let (csr, pkey) = mayfly_pki::new_csr(id).map_err(err)?;
        let e = self
            .dp
            .enroll(
                &self.admin,
                EnrollRequest {
                    id: id.into(),
                    endpoint: endpoint.clone(),
                    csr,
                },
            )
            .await?;
        let identity = Identity {
            cert_pem: e.certificate.clone(),
            key_pem: pkey,
        };
        let pdir = self.dir.join(id);
        std::fs::create_dir_all(&pdir).map_err(err)?;
        // As a provider under a real control plane: it holds no snapshot store, reaching
        // blobs through the broker with each op's grant; sandboxes read its local store
        // (wasm modules are staged there).
        let local: Arc<dyn Cache> = Arc::new(LocalCache::new(pdir.join("local")));
        let control_http =
            mayfly_pki::client(&e.ca, &identity, e.control_endpoint_fingerprint.clone())
                .map_err(err)?;
        let control_endpoint = e.control_endpoint.clone().unwrap_or_default();
        let sandbox = make(local.clone(), &pdir).map_err(DataplaneError::Refused)?;
        let provider = Provider::new(
            ProviderConfig {
                id: id.into(),
                slots,
                trusted: vec![e.control_public_key.clone()],
                labels,
                platform: ProviderConfig::platform_of_host(),
            },
            sandbox,
            Journal::open(&pdir.join("journal.db")).await.map_err(err)?,
            local,
            crate::broker::Blobs::Brokered(crate::broker::BrokerClient::new(
                &control_endpoint,
                control_http.clone(),
            )),
        )
        .await
        .map_err(err)?;
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .map_err(err)?;
        let serve = tokio::spawn({
            let app = crate::http::router(provider.clone());
            let tls = mayfly_pki::server_config(&e.ca, &identity).map_err(err)?;
            let admit = Admit::Only([e.control_fingerprint.clone()].into());
            async move {
                let _ = mayfly_pki::serve(listener, app, tls, admit).await;
            }
        });
        let beat = tokio::spawn(crate::heartbeat::run(
            provider.clone(),
            control_http,
            control_endpoint,
            Duration::from_millis(200),
        ));
        self.providers.push(LocalProvider {
            id: id.into(),
            endpoint,
            provider,
            identity,
            tasks: vec![serve, beat],
        });
        Ok(())
    }

    /// Wait until `n` workers hold a live lease.
    pub async fn wait_live(&self, n: usize, limit: Duration) -> Result<(), DataplaneError> {
        let end = Instant::now() + limit;
        loop {
            let v = self.dp.providers(&self.admin).await?;
            let live = v["workers"].as_array().map_or(0, |w| {
                w.iter()
                    .filter(|x| x["lease_ms_left"].as_u64().unwrap_or(0) > 0)
                    .count()
            });
            if live >= n {
                return Ok(());
            }
            if Instant::now() > end {
                return Err(DataplaneError::Unavailable(format!(
                    "{live} of {n} workers live: {v}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Apply manifests (JSON documents) as the system admin.
    pub async fn apply(&self, docs: &[serde_json::Value]) -> Result<(), DataplaneError> {
        let text: Vec<String> = docs.iter().map(|d| d.to_string()).collect();
        let ms = parse_manifests("local.yaml", &text.join("\n---\n")).map_err(err)?;
        let r = self.control.apply(&self.admin, &ms).await?;
        if r.denied() {
            return Err(DataplaneError::Forbidden(format!("{:?}", r.results)));
        }
        Ok(())
    }

    /// A GET through the router, as JSON.
    pub async fn get(
        &self,
        tenant: &str,
        actor: &str,
    ) -> Result<serde_json::Value, DataplaneError> {
        self.call(tenant, actor, reqwest::Method::GET).await
    }

    /// One request through the router: its JSON body, or its text (non-200 is an error).
    pub async fn call(
        &self,
        tenant: &str,
        actor: &str,
        method: reqwest::Method,
    ) -> Result<serde_json::Value, DataplaneError> {
        let (a, _) = self
            .dp
            .route(tenant, actor, None, method, "/", None, &[], vec![])
            .await?;
        if a.status != 200 {
            return Err(DataplaneError::Unavailable(format!(
                "{actor}: {} {}",
                a.status,
                String::from_utf8_lossy(&a.body)
            )));
        }
        // JSON when the actor answers JSON, else its text.
        Ok(serde_json::from_slice(&a.body).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(&a.body).into_owned())
        }))
    }

    /// The control plane's client of provider `id`.
    pub fn client(&self, id: &str) -> Result<ProviderClient, DataplaneError> {
        let p = self
            .providers
            .iter()
            .find(|p| p.id == id)
            .ok_or_else(|| DataplaneError::NotFound(id.into()))?;
        Ok(ProviderClient::new(
            p.endpoint.clone(),
            mayfly_pki::client(self.ca.cert_pem(), &self.control_id, None).map_err(err)?,
        ))
    }

    /// Stop a provider's API and heartbeats without stopping its actors (a partition or a
    /// crash, as the control plane sees it).
    pub fn cut(&mut self, id: &str) {
        if let Some(p) = self.providers.iter_mut().find(|p| p.id == id) {
            for t in p.tasks.drain(..) {
                t.abort();
            }
        }
    }

    /// Stop every provider and its actors.
    pub async fn shutdown(&mut self) {
        for p in &mut self.providers {
            for t in p.tasks.drain(..) {
                t.abort();
            }
            p.provider.shutdown().await;
        }
    }
}

/// Serve `provider`'s op API over plain HTTP on a loopback port, for tests and benches that
/// exercise the provider itself (the dataplane always speaks mTLS). Returns a client for
/// it and the serving task.
pub async fn serve_plain(
    provider: Arc<Provider>,
) -> std::io::Result<(ProviderClient, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = crate::http::router(provider);
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let http = reqwest::Client::builder()
        .no_proxy()
        .build()
        .map_err(std::io::Error::other)?;
    Ok((ProviderClient::new(format!("http://{addr}"), http), server))
}
