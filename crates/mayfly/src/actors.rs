//! The actor dataplane from the command line: the server's dataplane (CA, provider
//! listener, snapshot store, controller), `mayfly provider enroll|serve|conformance`, and
//! `mayfly actors` (list, move, suspend, snapshots).
//!
//! Files: the control plane keeps its CA and identities in `$MAYFLY_HOME/pki` (`ca.key`
//! never leaves it); a provider keeps its key, certificate, the CA and its enrollment in its
//! `--dir`.

use crate::remote::Client;
use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use mayfly_actors::dataplane::{Dataplane, DataplaneConfig, Enrollment, Networks};
use mayfly_cache::Cache;
use mayfly_pki::{Admit, Ca, Identity, Usage};
use mayfly_trust::sign::ControlKey;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// The server's actor dataplane options.
#[derive(Args, Clone, Debug)]
pub struct DataplaneOpts {
    /// Enable the actor dataplane: the mTLS address providers heartbeat to
    /// (e.g. 127.0.0.1:7443).
    #[arg(long, env = "MAYFLY_PROVIDER_LISTEN")]
    pub provider_listen: Option<String>,
    /// The snapshot store: a directory (default $MAYFLY_HOME/snapshots) or nats://… (the
    /// JetStream object store bucket `mayfly-snapshots`; the NATS credential flags apply).
    /// Providers reach it only through this server.
    #[arg(long, env = "MAYFLY_SNAPSHOTS")]
    pub snapshots: Option<String>,
    /// Networks provider endpoints (route targets) may be in, comma-separated CIDRs
    /// (default: loopback and private ranges).
    #[arg(long)]
    pub provider_networks: Option<String>,
    /// Worker lease: a worker not heard from for this long is lost.
    #[arg(long, default_value_t = mayfly_control::dataplane::DEFAULT_LEASE_MS)]
    pub lease_ms: u64,
}

pub fn is_nats_url(u: &str) -> bool {
    u.starts_with("nats://") || u.starts_with("tls://")
}

/// The snapshot store named by `spec` (see [`DataplaneOpts::snapshots`]); a NATS one
/// authenticates with the URL's credentials and `auth`'s.
pub async fn snapshot_store(
    spec: Option<&str>,
    auth: &crate::NatsAuthOpts,
) -> Result<Arc<dyn Cache>> {
    match spec {
        Some(u) if is_nats_url(u) => {
            let client = auth.to(u).connect().await?;
            Ok(Arc::new(
                mayfly_cache::NatsCache::open(client, "mayfly-snapshots").await?,
            ))
        }
        Some(dir) => Ok(Arc::new(mayfly_cache::LocalCache::new(dir))),
        None => Ok(Arc::new(mayfly_cache::LocalCache::new(
            crate::keychain::mayfly_home().join("snapshots"),
        ))),
    }
}

fn pki_dir() -> PathBuf {
    crate::keychain::mayfly_home().join("pki")
}

/// The control plane's client identity (what providers admit), issued once.
fn control_identity(ca: &Ca, dir: &Path) -> Result<Identity> {
    if dir.join("control.crt").exists() {
        return Identity::load(dir, "control").context("control identity");
    }
    let id = ca.issue(&[], Usage::Control, "mayfly-control")?;
    id.save(dir, "control")?;
    Ok(id)
}

/// Template secrets from the server's keychain (its store and master key).
struct KeychainSecrets {
    store: Arc<dyn mayfly_store::Store>,
    key: mayfly_trust::keychain::MasterKey,
}

#[async_trait::async_trait]
impl mayfly_actors::dataplane::Secrets for KeychainSecrets {
    async fn resolve(&self, tenant: &str, alias: &str) -> Result<serde_json::Value, String> {
        let sealed = self
            .store
            .get_secret(tenant, alias)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("no keychain alias `{alias}` in tenant `{tenant}`"))?;
        let bytes = self
            .key
            .open(tenant, alias, &sealed)
            .map_err(|e| e.to_string())?;
        Ok(serde_json::from_slice(&bytes).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned())
        }))
    }
}

/// Start the dataplane when `--provider-listen` is given: the CA, the provider listener
/// (mTLS) and the controller. With a master key, templates' secrets resolve from the
/// keychain.
pub async fn start(
    opts: &DataplaneOpts,
    nats_auth: &crate::NatsAuthOpts,
    control: Arc<mayfly_control::Control>,
    key: &ControlKey,
    keychain: Option<(
        Arc<dyn mayfly_store::Store>,
        mayfly_trust::keychain::MasterKey,
    )>,
) -> Result<Option<Arc<Dataplane>>> {
    let Some(listen) = &opts.provider_listen else {
        return Ok(None);
    };
    mayfly_actors::install_crypto();
    let dir = pki_dir();
    let ca = Ca::load_or_create(&dir).context("the control plane CA")?;
    let identity = control_identity(&ca, &dir)?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening for providers on {listen}"))?;
    let addr = listener.local_addr()?;
    // The listener's certificate names its address and is kept (providers pin it); a new
    // address gets a new one, and providers enrolled before must enroll again.
    let ip = addr.ip().to_string();
    let server = match (
        std::fs::read_to_string(dir.join("server.ip")),
        Identity::load(&dir, "server"),
    ) {
        (Ok(saved), Ok(id)) if saved.trim() == ip => id,
        _ => {
            let id = ca.issue(std::slice::from_ref(&ip), Usage::Provider, "mayfly-control")?;
            id.save(&dir, "server")?;
            std::fs::write(dir.join("server.ip"), &ip)?;
            id
        }
    };
    let networks = match &opts.provider_networks {
        Some(n) => Networks::parse(n).map_err(anyhow::Error::msg)?,
        None => Networks::private(),
    };
    let store = snapshot_store(opts.snapshots.as_deref(), nats_auth).await?;
    let dp = Dataplane::new(
        control,
        ControlKey::from_base64(&key.to_base64())?,
        Ca::from_pem(
            ca.cert_pem(),
            &std::fs::read_to_string(dir.join("ca.key")).context("ca.key")?,
        )?,
        identity,
        store,
        DataplaneConfig {
            lease_ms: opts.lease_ms,
            networks,
            provider_endpoint: Some(format!("https://{addr}")),
            provider_endpoint_fingerprint: Some(server.fingerprint()?),
            ..Default::default()
        },
    )
    .await?;
    if let Some((store, key)) = keychain {
        dp.set_secrets(Arc::new(KeychainSecrets { store, key }));
    }
    let tls = mayfly_pki::server_config(ca.cert_pem(), &server)?;
    let app = mayfly_actors::dataplane::provider_router(dp.clone());
    tokio::spawn(async move {
        if let Err(e) = mayfly_pki::serve(listener, app, tls, Admit::AnyIssued).await {
            tracing::error!(error = %e, "provider listener stopped");
        }
    });
    dp.run_controller(Duration::from_millis(500));
    eprintln!("actor dataplane: providers heartbeat to https://{addr}");
    Ok(Some(dp))
}

#[derive(Subcommand, Debug)]
pub enum ProviderCmd {
    /// Enroll a provider with the control plane at MAYFLY_URL (a system admin's
    /// MAYFLY_TOKEN): a key and CSR are made here, the control plane's CA signs the CSR
    /// for the endpoint's address; key, certificate, CA and enrollment go to --dir.
    Enroll {
        #[arg(long)]
        id: String,
        /// The provider API's address, `https://IP:PORT` (where `serve` will listen).
        #[arg(long)]
        endpoint: String,
        #[arg(long)]
        dir: PathBuf,
    },
    /// Run an enrolled provider: serves the provider API over mTLS (admitting only the
    /// control plane) and heartbeats its workers to the control plane.
    Serve {
        #[arg(long)]
        dir: PathBuf,
        /// Sandbox class: `process` or `wasm`.
        #[arg(long, default_value = "process")]
        class: String,
        /// Concurrent actors.
        #[arg(long, default_value_t = 16)]
        slots: u32,
        /// Worker labels, `k=v` (repeatable).
        #[arg(long = "label")]
        labels: Vec<String>,
        /// Only for a provider enrolled without a control endpoint: its snapshot store (a
        /// directory or nats://…). Under a control plane a provider holds no store: it
        /// reads and writes snapshot blobs through the control plane's blob broker, under a
        /// grant signed for each op.
        #[arg(long)]
        snapshots: Option<String>,
        #[arg(long, default_value_t = 1000)]
        heartbeat_ms: u64,
        /// Contain each `process` actor in a bubblewrap sandbox (`on`, the default: own
        /// namespaces, no network, only its own dirs) or run it as a plain child process
        /// (`off`: trusted code on a development machine only).
        #[arg(long, value_enum, default_value = "on")]
        sandbox: ActorSandbox,
    },
    /// Run the provider conformance suite against ENDPOINT, as the control plane of
    /// $MAYFLY_HOME (its pki/ identity and control key). Exit status 1 when a check fails.
    Conformance {
        #[arg(long)]
        endpoint: String,
        /// The provider's certificate fingerprint to pin (default: any our CA issued).
        #[arg(long)]
        pin: Option<String>,
        /// The provider's snapshot directory, for the corrupted-blob check.
        #[arg(long)]
        snapshot_dir: Option<PathBuf>,
        #[arg(long, default_value = "conformance")]
        tenant: String,
        #[command(flatten)]
        control_key: crate::rollout::ControlKeyOpts,
    },
}

pub async fn provider(cmd: ProviderCmd) -> Result<ExitCode> {
    mayfly_actors::install_crypto();
    match cmd {
        ProviderCmd::Enroll { id, endpoint, dir } => enroll(&id, &endpoint, &dir).await,
        ProviderCmd::Serve {
            dir,
            class,
            slots,
            labels,
            snapshots,
            heartbeat_ms,
            sandbox,
        } => {
            serve(
                &dir,
                &class,
                slots,
                &labels,
                snapshots.as_deref(),
                heartbeat_ms,
                sandbox,
            )
            .await
        }
        ProviderCmd::Conformance {
            endpoint,
            pin,
            snapshot_dir,
            tenant,
            control_key,
        } => conformance(&endpoint, pin, snapshot_dir, &tenant, &control_key).await,
    }
}

async fn enroll(id: &str, endpoint: &str, dir: &Path) -> Result<ExitCode> {
    let client = Client::from_env()?;
    let (csr, key) = mayfly_pki::new_csr(&format!("provider:{id}"))?;
    let v = client
        .send(
            reqwest::Method::POST,
            "/v1/providers/enroll",
            Some(json!({"id": id, "endpoint": endpoint, "csr": csr}).to_string()),
        )
        .await?;
    let e: Enrollment = serde_json::from_value(v).context("the enrollment answer")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    Identity {
        cert_pem: e.certificate.clone(),
        key_pem: key,
    }
    .save(dir, "provider")?;
    std::fs::write(dir.join("ca.crt"), &e.ca)?;
    let record = json!({
        "id": e.id,
        "endpoint": endpoint.trim_end_matches('/'),
        "control_fingerprint": e.control_fingerprint,
        "control_public_key": e.control_public_key,
        "control_endpoint": e.control_endpoint,
        "control_endpoint_fingerprint": e.control_endpoint_fingerprint,
    });
    std::fs::write(
        dir.join("enrollment.json"),
        serde_json::to_vec_pretty(&record)?,
    )?;
    println!(
        "enrolled provider {id} ({}); serve it with: mayfly provider serve --dir {}",
        mayfly_pki::fingerprint(&e.certificate)?,
        dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

#[derive(serde::Deserialize)]
struct Enrolled {
    id: String,
    endpoint: String,
    control_fingerprint: String,
    control_public_key: mayfly_trust::sign::TrustedKey,
    control_endpoint: Option<String>,
    #[serde(default)]
    control_endpoint_fingerprint: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ActorSandbox {
    On,
    Off,
}

/// The argument that makes this binary a sandbox's keeper (it runs inside a contained actor's
/// sandbox, or a python pool's that reaches the network through the egress proxy; `main`
/// hands it over before anything else starts).
pub const KEEPER_ARG: &str = "__keeper";

/// How this provider contains `process` actors: bubblewrap with this binary (bound
/// read-only) as each sandbox's keeper, and python3's prefix bound when there is one (actors are often
/// python). Fails closed: no bubblewrap, no provider (unless `--sandbox off`).
pub(crate) fn actor_containment() -> Result<mayfly_actors::process::Contain> {
    let exe = std::env::current_exe().context("the provider's own executable")?;
    let mut extra = Vec::new();
    if let Ok((py, dirs)) = mayfly_tools::sandbox::python_layout("python3") {
        extra.push(py);
        extra.extend(dirs);
    }
    let sandbox = mayfly_tools::sandbox::Sandbox::detect(&extra)
        .map_err(|e| anyhow::anyhow!("{}: {}", e.code, e.message))
        .context("actors cannot be contained (start with --sandbox off to run them uncontained)")?;
    Ok(mayfly_actors::process::Contain {
        sandbox: Arc::new(sandbox),
        keeper: exe,
        keeper_args: vec![KEEPER_ARG.into()],
        limits: mayfly_types::Limits::default(),
    })
}

async fn serve(
    dir: &Path,
    class: &str,
    slots: u32,
    labels: &[String],
    snapshots: Option<&str>,
    heartbeat_ms: u64,
    contain: ActorSandbox,
) -> Result<ExitCode> {
    if class != "process" && class != "wasm" {
        bail!("sandbox class `{class}` is not built into this provider (process, wasm)");
    }
    let e: Enrolled = serde_json::from_slice(
        &std::fs::read(dir.join("enrollment.json"))
            .with_context(|| format!("{}: not enrolled (mayfly provider enroll)", dir.display()))?,
    )?;
    let identity = Identity::load(dir, "provider")?;
    let ca = std::fs::read_to_string(dir.join("ca.crt")).context("ca.crt")?;
    let mut label_map = BTreeMap::new();
    for l in labels {
        let (k, v) = l
            .split_once('=')
            .with_context(|| format!("label `{l}` is not k=v"))?;
        label_map.insert(k.to_owned(), v.to_owned());
    }
    let cfg = mayfly_actors::ProviderConfig {
        id: e.id.clone(),
        slots,
        trusted: vec![e.control_public_key.clone()],
        labels: label_map,
        platform: mayfly_actors::ProviderConfig::platform_of_host(),
    };
    // The control plane's client (heartbeats, the blob broker), pinned to its certificate.
    let control_http = match &e.control_endpoint {
        Some(_) => Some(mayfly_pki::client(
            &ca,
            &identity,
            e.control_endpoint_fingerprint.clone(),
        )?),
        None => None,
    };
    let external: mayfly_actors::broker::Blobs = match (
        &e.control_endpoint,
        &control_http,
        snapshots,
    ) {
        (Some(_), _, Some(_)) => bail!(
            "this provider is enrolled under a control plane: it reaches snapshot blobs only through the control plane, under a grant for each op, and holds no store of its own; drop --snapshots"
        ),
        (Some(control), Some(http), None) => mayfly_actors::broker::Blobs::Brokered(
            mayfly_actors::broker::BrokerClient::new(control, http.clone()),
        ),
        // No control plane (a development provider): a store of its own, URL credentials.
        _ => mayfly_actors::broker::Blobs::Direct(
            snapshot_store(snapshots, &crate::NatsAuthOpts::default()).await?,
        ),
    };
    let local: Arc<dyn mayfly_cache::Cache> =
        Arc::new(mayfly_cache::LocalCache::new(dir.join("local")));
    let sandbox: Arc<dyn mayfly_actors::Sandbox> = if class == "wasm" {
        // Modules are staged into the local store (under the op's grant) before a start.
        Arc::new(mayfly_provider_wasm::WasmSandbox::new(local.clone())?)
    } else {
        let root = dir.join("sandbox");
        Arc::new(match contain {
            ActorSandbox::Off => {
                eprintln!(
                    "warning: --sandbox off: actors run uncontained, as this provider's user"
                );
                mayfly_actors::process::ProcessSandbox::new(root)?
            }
            ActorSandbox::On => {
                mayfly_actors::process::ProcessSandbox::contained(root, actor_containment()?)?
            }
        })
    };
    let provider = mayfly_actors::Provider::new(
        cfg,
        sandbox,
        mayfly_actors::Journal::open(&dir.join("journal.db")).await?,
        local,
        external,
    )
    .await?;
    let url = reqwest::Url::parse(&e.endpoint)?;
    let host = url.host_str().context("endpoint host")?;
    let port = url.port().context("endpoint port")?;
    let listener = tokio::net::TcpListener::bind((host.trim_matches(['[', ']']), port))
        .await
        .with_context(|| format!("listening on {}", e.endpoint))?;
    let tls = mayfly_pki::server_config(&ca, &identity)?;
    let app = mayfly_actors::http::router(provider.clone());
    let admit = Admit::Only([e.control_fingerprint.clone()].into());
    let server = tokio::spawn(mayfly_pki::serve(listener, app, tls, admit));
    if let (Some(control), Some(http)) = (e.control_endpoint.clone(), control_http) {
        tokio::spawn(mayfly_actors::heartbeat::run(
            provider.clone(),
            http,
            control,
            Duration::from_millis(heartbeat_ms),
        ));
    } else {
        eprintln!("warning: the control plane gave no provider endpoint: no heartbeats");
    }
    eprintln!(
        "provider {} ({class}, {slots} slots) serving on {}",
        e.id, e.endpoint
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = server => { r??; }
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    provider.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

async fn conformance(
    endpoint: &str,
    pin: Option<String>,
    snapshot_dir: Option<PathBuf>,
    tenant: &str,
    control_key: &crate::rollout::ControlKeyOpts,
) -> Result<ExitCode> {
    let dir = pki_dir();
    let ca = std::fs::read_to_string(dir.join("ca.crt"))
        .with_context(|| format!("{}: no control plane CA here", dir.display()))?;
    let identity = Identity::load(&dir, "control")?;
    let http = mayfly_pki::client(&ca, &identity, pin)?;
    let report = mayfly_actors::conformance::run(mayfly_actors::conformance::Config {
        client: mayfly_actors::client::ProviderClient::new(endpoint, http),
        key: control_key.load_or_create()?,
        tenant: tenant.to_owned(),
        snapshot_dir,
        workloads: BTreeMap::new(),
    })
    .await;
    use mayfly_actors::conformance::Outcome;
    for (name, o) in &report.checks {
        match o {
            Outcome::Passed => println!("PASS  {name}"),
            Outcome::Failed(why) => println!("FAIL  {name}: {why}"),
            Outcome::Skipped(why) => println!("SKIP  {name}: {why}"),
        }
    }
    println!(
        "{} passed, {} failed, {} skipped",
        report.passed(),
        report.failed(),
        report.skipped()
    );
    Ok(if report.failed() == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

#[derive(Subcommand, Debug)]
pub enum ActorsCmd {
    /// List the tenant's actors (phase, epoch, worker, last snapshot).
    List,
    /// Checkpoint an actor and release its slot.
    Suspend { name: String },
    /// Move an actor to another worker (checkpoint → new epoch → restore).
    Move { name: String },
    /// Start an actor over: drop its snapshot (e.g. after its template's workload changed).
    Reset { name: String },
    /// An actor's signed snapshots.
    Snapshots { name: String },
    /// Providers, workers and leases (system tenant).
    Providers,
    /// Upload a workload module (a .wasm or .wat file) into the tenant's scope of the
    /// snapshot store; prints its digest (what an ActorTemplate's `workload.module` names).
    UploadModule { file: PathBuf },
}

pub async fn actors(cmd: ActorsCmd) -> Result<ExitCode> {
    let c = Client::from_env()?;
    let v = match cmd {
        ActorsCmd::List => c.send(reqwest::Method::GET, "/v1/actors", None).await?,
        ActorsCmd::Suspend { name } => {
            c.send(
                reqwest::Method::POST,
                &format!("/v1/actors/{name}/suspend"),
                None,
            )
            .await?
        }
        ActorsCmd::Reset { name } => {
            c.send(
                reqwest::Method::POST,
                &format!("/v1/actors/{name}/reset"),
                None,
            )
            .await?
        }
        ActorsCmd::Move { name } => {
            c.send(
                reqwest::Method::POST,
                &format!("/v1/actors/{name}/move"),
                None,
            )
            .await?
        }
        ActorsCmd::Snapshots { name } => {
            c.send(
                reqwest::Method::GET,
                &format!("/v1/actors/{name}/snapshots"),
                None,
            )
            .await?
        }
        ActorsCmd::Providers => c.send(reqwest::Method::GET, "/v1/providers", None).await?,
        ActorsCmd::UploadModule { file } => {
            use base64::Engine;
            let bytes =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
            c.send(
                reqwest::Method::POST,
                "/v1/modules",
                Some(json!({ "module_base64": b64 }).to_string()),
            )
            .await?
        }
    };
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(ExitCode::SUCCESS)
}
