//! Policy bundles and rollouts from the command line, the control plane's signing key, and
//! the options of a worker process's data-plane agent.
//!
//! The signing key lives in `MAYFLY_CONTROL_KEY` (base64 seed) or a key file (default
//! `$MAYFLY_HOME/control.key`, created with mode 0600 by the first `mayfly server`); its
//! public half is written next to it as `control.pub`, which workers trust.

use crate::remote::Client;
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use mayfly_runtime::agent::{Agent, AgentConfig};
use mayfly_trust::sign::{ControlKey, TrustedKey};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// Where the control plane's key is.
#[derive(Args, Clone, Debug)]
pub struct ControlKeyOpts {
    /// Control plane signing key (default: $MAYFLY_HOME/control.key, created on first start;
    /// MAYFLY_CONTROL_KEY overrides). Its public half is written to `control.pub` beside it.
    #[arg(long)]
    pub control_key_file: Option<PathBuf>,
}

impl ControlKeyOpts {
    /// The key, created (0600) with its `control.pub` when missing.
    pub fn load_or_create(&self) -> Result<ControlKey> {
        if let Ok(v) = std::env::var("MAYFLY_CONTROL_KEY") {
            return ControlKey::from_base64(&v).context("MAYFLY_CONTROL_KEY");
        }
        let path = self
            .control_key_file
            .clone()
            .unwrap_or_else(|| crate::keychain::mayfly_home().join("control.key"));
        let read = |path: &std::path::Path| -> Result<ControlKey> {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading control key {}", path.display()))?;
            ControlKey::from_base64(&text)
                .with_context(|| format!("control key {}", path.display()))
        };
        let key = match create_secret_file(&path, || ControlKey::generate().to_base64())? {
            Some(text) => {
                let key = ControlKey::from_base64(&text)?;
                eprintln!(
                    "created control plane key {} ({})",
                    path.display(),
                    key.public().id
                );
                key
            }
            None => read(&path)?,
        };
        let public = path.with_extension("pub");
        if std::fs::read_to_string(&public).ok().as_deref() != Some(key.public().key.as_str()) {
            let tmp = public.with_extension(format!("pub.{}", std::process::id()));
            std::fs::write(&tmp, &key.public().key)
                .and_then(|()| std::fs::rename(&tmp, &public))
                .with_context(|| format!("writing {}", public.display()))?;
        }
        Ok(key)
    }
}

/// Create `path` (mode 0600) holding `make()` unless it exists: `Some(contents)` when this
/// call created it, `None` when it was there (or another process created it meanwhile).
/// Written whole under a private name, then linked into place: a process starting at the
/// same moment either wins the link or reads the complete winner.
pub(crate) fn create_secret_file(
    path: &std::path::Path,
    make: impl FnOnce() -> String,
) -> Result<Option<String>> {
    if path.exists() {
        return Ok(None);
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let text = make();
    let tmp = path.with_extension(format!("new.{}", std::process::id()));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    std::io::Write::write_all(&mut f, text.as_bytes())?;
    f.sync_all()?;
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(None),
        Err(e) => Err(e).with_context(|| format!("creating {}", path.display())),
    }
}

/// The command channel's shared key (README "Distributed mode").
#[derive(Args, Clone, Debug)]
pub struct ChannelKeyOpts {
    /// The command channel's key, shared by a deployment's server and workers (default:
    /// $MAYFLY_HOME/channel.key, created by the first server; MAYFLY_CHANNEL_KEY overrides).
    #[arg(long)]
    pub channel_key_file: Option<PathBuf>,
}

impl ChannelKeyOpts {
    fn path(&self) -> PathBuf {
        self.channel_key_file
            .clone()
            .unwrap_or_else(|| crate::keychain::mayfly_home().join("channel.key"))
    }

    fn read(path: &std::path::Path) -> Result<mayfly_trust::channel::ChannelKey> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading channel key {}", path.display()))?;
        mayfly_trust::channel::ChannelKey::from_base64(&text)
            .with_context(|| format!("channel key {}", path.display()))
    }

    /// A server's key: created (0600) when missing.
    pub fn load_or_create(&self) -> Result<mayfly_trust::channel::ChannelKey> {
        if let Ok(v) = std::env::var("MAYFLY_CHANNEL_KEY") {
            return mayfly_trust::channel::ChannelKey::from_base64(&v)
                .context("MAYFLY_CHANNEL_KEY");
        }
        let path = self.path();
        match create_secret_file(&path, || {
            mayfly_trust::channel::ChannelKey::generate().to_base64()
        })? {
            Some(text) => {
                let key = mayfly_trust::channel::ChannelKey::from_base64(&text)?;
                eprintln!(
                    "created command channel key {} ({}): give your workers a copy",
                    path.display(),
                    key.fingerprint()
                );
                Ok(key)
            }
            None => Self::read(&path),
        }
    }

    /// A worker's key: it must be there (a worker never makes one up).
    pub fn load(&self) -> Result<mayfly_trust::channel::ChannelKey> {
        if let Ok(v) = std::env::var("MAYFLY_CHANNEL_KEY") {
            return mayfly_trust::channel::ChannelKey::from_base64(&v)
                .context("MAYFLY_CHANNEL_KEY");
        }
        let path = self.path();
        Self::read(&path).with_context(|| {
            "a worker needs its server's command channel key: copy the server's channel.key here, pass --channel-key-file, or set MAYFLY_CHANNEL_KEY"
        })
    }
}

/// A worker process's agent: which pool it serves and whose bundles it trusts.
#[derive(Args, Clone, Debug)]
pub struct AgentOpts {
    /// The WorkerPool this worker reports against (rollouts target pools).
    #[arg(long, default_value = "default")]
    pub pool: String,
    /// A label rollouts can target, `name=value` (repeatable).
    #[arg(long = "label", value_name = "NAME=VALUE")]
    pub labels: Vec<String>,
    /// The control plane's public key (base64, as in `control.pub`) that bundles must be
    /// signed with (default: MAYFLY_CONTROL_PUBKEY, else $MAYFLY_HOME/control.pub). Without
    /// one, every bundle is refused (`unknown_key`).
    #[arg(long)]
    pub control_pubkey_file: Option<PathBuf>,
    /// How often the agent reports and fetches its bundle.
    #[arg(long, env = "MAYFLY_AGENT_INTERVAL_MS", default_value_t = 2000)]
    pub agent_interval_ms: u64,
}

impl AgentOpts {
    /// The agent `id` runs, trusting `trusted` or the configured public key.
    pub fn agent(&self, id: String, trusted: Option<TrustedKey>) -> Result<Arc<Agent>> {
        let mut labels = BTreeMap::new();
        for l in &self.labels {
            let (k, v) = l
                .split_once('=')
                .with_context(|| format!("--label expects NAME=VALUE, got `{l}`"))?;
            labels.insert(k.to_owned(), v.to_owned());
        }
        let trusted = match trusted {
            Some(k) => vec![k],
            None => {
                let text = match std::env::var("MAYFLY_CONTROL_PUBKEY") {
                    Ok(v) => Some(v),
                    Err(_) => {
                        let path = self
                            .control_pubkey_file
                            .clone()
                            .unwrap_or_else(|| crate::keychain::mayfly_home().join("control.pub"));
                        std::fs::read_to_string(&path).ok()
                    }
                };
                match text {
                    Some(t) => vec![TrustedKey::from_base64(&t).context("control public key")?],
                    None => {
                        eprintln!(
                            "warning: no control plane public key configured: this worker refuses every policy bundle"
                        );
                        Vec::new()
                    }
                }
            }
        };
        Ok(Arc::new(Agent::new(AgentConfig {
            id,
            pool: self.pool.clone(),
            labels,
            trusted,
            interval: Duration::from_millis(self.agent_interval_ms.max(50)),
        })))
    }
}

#[derive(Subcommand)]
pub enum BundleCmd {
    /// Freeze every Policy into a bundle signed by the control plane key (no-op when the
    /// policies did not change); prints its digest.
    Publish,
    /// Published bundles.
    List,
}

#[derive(Subcommand)]
pub enum RolloutCmd {
    /// A rollout's transition (phase, reason, history) and each targeted agent's
    /// acknowledged bundle; exit 0 when completed, 1 when failed, 3 while in progress.
    Status { name: String },
    /// Stop an in-progress rollout: agents return to the bundle in force before it.
    Cancel { name: String },
}

/// `mayfly bundle …`.
pub async fn bundle(cmd: BundleCmd) -> Result<ExitCode> {
    let c = Client::from_env()?;
    match cmd {
        BundleCmd::Publish => {
            let v = c.send(reqwest::Method::POST, "/v1/bundles", None).await?;
            println!(
                "{} bundle {} ({} policies, signed by {})",
                if v["created"] == true {
                    "published"
                } else {
                    "unchanged"
                },
                v["digest"].as_str().unwrap_or_default(),
                v["policies"],
                v["key_id"].as_str().unwrap_or_default()
            );
        }
        BundleCmd::List => {
            let v = c.send(reqwest::Method::GET, "/v1/bundles", None).await?;
            for b in v["bundles"].as_array().cloned().unwrap_or_default() {
                println!(
                    "{}  {}  {} policies",
                    b["digest"].as_str().unwrap_or_default(),
                    b["key_id"].as_str().unwrap_or_default(),
                    b["body"]["policies"].as_array().map_or(0, Vec::len)
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `mayfly rollout …`.
pub async fn rollout(cmd: RolloutCmd) -> Result<ExitCode> {
    let c = Client::from_env()?;
    match cmd {
        RolloutCmd::Status { name } => {
            let v = c
                .send(reqwest::Method::GET, &format!("/v1/rollouts/{name}"), None)
                .await?;
            let t = &v["transition"];
            let phase = t["phase"].as_str().unwrap_or_default();
            println!(
                "rollout {name}: transition {} {phase} — {}",
                t["id"].as_str().unwrap_or_default(),
                t["reason"].as_str().unwrap_or_default()
            );
            println!(
                "  bundle {}",
                t["spec"]["bundle"].as_str().unwrap_or_default()
            );
            for p in t["phases"].as_array().cloned().unwrap_or_default() {
                println!(
                    "  #{:<6} {:<10} {}",
                    p["seq"],
                    p["phase"].as_str().unwrap_or_default(),
                    p["reason"].as_str().unwrap_or_default()
                );
            }
            println!(
                "  {:<24} {:<10} {:<6} {:<9} acknowledged",
                "AGENT", "POOL", "LIVE", "EFFECTIVE"
            );
            for a in v["agents"].as_array().cloned().unwrap_or_default() {
                let ack = match (&a["applied"], &a["refused"]) {
                    (_, r) if r.is_object() => format!(
                        "refused {} ({})",
                        r["bundle"].as_str().unwrap_or_default(),
                        r["code"].as_str().unwrap_or_default()
                    ),
                    (Value::String(d), _) => d.clone(),
                    _ => "-".into(),
                };
                println!(
                    "  {:<24} {:<10} {:<6} {:<9} {ack}",
                    a["agent"].as_str().unwrap_or_default(),
                    a["pool"].as_str().unwrap_or_default(),
                    a["live"],
                    a["effective"]
                );
            }
            Ok(match phase {
                "completed" | "superseded" => ExitCode::SUCCESS,
                "planned" | "admitted" => ExitCode::from(3),
                _ => ExitCode::from(1),
            })
        }
        RolloutCmd::Cancel { name } => {
            c.send(
                reqwest::Method::POST,
                &format!("/v1/rollouts/{name}/cancel"),
                None,
            )
            .await?;
            println!("rollout {name} cancelled");
            Ok(ExitCode::SUCCESS)
        }
    }
}
