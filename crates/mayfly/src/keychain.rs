//! `mayfly keychain set|list|delete|rotate` and the master key's location.
//!
//! The master key comes from `MAYFLY_MASTER_KEY` (base64 of 32 bytes) or a key file
//! (`--master-key-file`, default `$MAYFLY_HOME/master.key`, `MAYFLY_HOME` defaulting to
//! `~/.mayfly`). `set` creates the key file (mode 0600) on first use. Values are read from
//! `--field k=v` pairs or standard input and are never printed back.

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use mayfly_store::{Batch, SecretOp, Store};
use mayfly_trust::keychain::MasterKey;
use serde_json::{Map, Value};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Args, Clone, Debug)]
pub struct KeyOpts {
    /// Master key file (default: $MAYFLY_HOME/master.key; MAYFLY_MASTER_KEY overrides).
    #[arg(long, global = true)]
    pub master_key_file: Option<PathBuf>,
    /// Tenant whose keychain to use.
    #[arg(long, global = true, default_value = "default")]
    pub tenant: String,
}

#[derive(Subcommand)]
pub enum KeychainCmd {
    /// Store a credential under ALIAS (value from --field pairs or stdin, JSON or text).
    Set {
        alias: String,
        #[arg(long)]
        db: PathBuf,
        /// A field of the credential, `name=value` (repeatable).
        #[arg(long = "field", value_name = "NAME=VALUE")]
        fields: Vec<String>,
    },
    /// List aliases (never values).
    List {
        #[arg(long)]
        db: PathBuf,
    },
    /// Remove an alias.
    Delete {
        alias: String,
        #[arg(long)]
        db: PathBuf,
    },
    /// Re-seal every credential of the tenant under a new master key (then switch to it).
    Rotate {
        #[arg(long)]
        db: PathBuf,
        /// The new key file (created if missing).
        #[arg(long)]
        new_key_file: PathBuf,
    },
}

/// `$MAYFLY_HOME`, default `~/.mayfly`: where keys and the CLI session live.
pub fn mayfly_home() -> PathBuf {
    std::env::var_os("MAYFLY_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("."))
                .join(".mayfly")
        })
}

fn default_key_file() -> PathBuf {
    mayfly_home().join("master.key")
}

fn read_key_file(path: &Path) -> Result<MasterKey> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading master key {}", path.display()))?;
    MasterKey::from_base64(&text).with_context(|| format!("master key {}", path.display()))
}

fn create_key_file(path: &Path) -> Result<MasterKey> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let key = MasterKey::generate();
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .with_context(|| format!("creating master key {}", path.display()))?;
    std::io::Write::write_all(&mut f, key.to_base64().as_bytes())?;
    eprintln!(
        "created master key {} (id {}); back it up: credentials cannot be opened without it",
        path.display(),
        key.id()
    );
    Ok(key)
}

/// The configured master key, if any (`create`: make the default key file when missing).
pub fn master_key(opts: &KeyOpts, create: bool) -> Result<Option<MasterKey>> {
    if let Ok(v) = std::env::var("MAYFLY_MASTER_KEY") {
        return Ok(Some(
            MasterKey::from_base64(&v).context("MAYFLY_MASTER_KEY")?,
        ));
    }
    let path = opts
        .master_key_file
        .clone()
        .unwrap_or_else(default_key_file);
    if path.exists() {
        return Ok(Some(read_key_file(&path)?));
    }
    if create {
        return Ok(Some(create_key_file(&path)?));
    }
    Ok(None)
}

fn read_value(fields: &[String]) -> Result<Value> {
    if !fields.is_empty() {
        let mut m = Map::new();
        for f in fields {
            let (k, v) = f.split_once('=').with_context(|| {
                format!(
                    "--field expects NAME=VALUE, got `{}`",
                    f.split('=').next().unwrap_or("")
                )
            })?;
            m.insert(k.to_owned(), Value::String(v.to_owned()));
        }
        return Ok(Value::Object(m));
    }
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .context("reading the credential from stdin")?;
    let text = text.trim_end_matches(['\n', '\r']).to_owned();
    if text.is_empty() {
        bail!("no value: pass --field NAME=VALUE or pipe the credential on stdin");
    }
    Ok(serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

fn valid_alias(a: &str) -> Result<()> {
    if a.is_empty()
        || !a
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        bail!("alias `{a}` must be letters, digits, `_` or `-`");
    }
    Ok(())
}

pub async fn run(
    cmd: KeychainCmd,
    opts: KeyOpts,
    open: impl AsyncFnOnce(&Path) -> Result<Arc<dyn Store>>,
) -> Result<ExitCode> {
    match cmd {
        KeychainCmd::Set { alias, db, fields } => {
            valid_alias(&alias)?;
            let value = read_value(&fields)?;
            let key = master_key(&opts, true)?.context("no master key")?;
            let store = open(&db).await?;
            let sealed = key.seal(
                &opts.tenant,
                &alias,
                serde_json::to_string(&value)?.as_bytes(),
            )?;
            let op = SecretOp::Put {
                tenant: opts.tenant.clone(),
                alias: alias.clone(),
                sealed,
            };
            store
                .append(Arc::new(Batch {
                    secrets: vec![op],
                    ..Default::default()
                }))
                .await?;
            println!("set {alias} (tenant {})", opts.tenant);
        }
        KeychainCmd::List { db } => {
            let store = open(&db).await?;
            for e in store.list_secrets(&opts.tenant).await? {
                println!("{}", e.alias);
            }
        }
        KeychainCmd::Delete { alias, db } => {
            let store = open(&db).await?;
            if store.get_secret(&opts.tenant, &alias).await?.is_none() {
                bail!("no alias `{alias}` in tenant `{}`", opts.tenant);
            }
            let op = SecretOp::Delete {
                tenant: opts.tenant.clone(),
                alias: alias.clone(),
            };
            store
                .append(Arc::new(Batch {
                    secrets: vec![op],
                    ..Default::default()
                }))
                .await?;
            println!("deleted {alias} (tenant {})", opts.tenant);
        }
        KeychainCmd::Rotate { db, new_key_file } => {
            let old = master_key(&opts, false)?.context("no current master key to rotate from")?;
            let new = if new_key_file.exists() {
                read_key_file(&new_key_file)?
            } else {
                create_key_file(&new_key_file)?
            };
            let store = open(&db).await?;
            let mut ops = Vec::new();
            for e in store.list_secrets(&opts.tenant).await? {
                let Some(sealed) = store.get_secret(&opts.tenant, &e.alias).await? else {
                    continue;
                };
                if MasterKey::sealed_with(&sealed) == Some(new.id()) {
                    continue;
                }
                let plain = old
                    .open(&opts.tenant, &e.alias, &sealed)
                    .with_context(|| format!("opening `{}`", e.alias))?;
                let resealed = new.seal(&opts.tenant, &e.alias, &plain)?;
                ops.push(SecretOp::Put {
                    tenant: opts.tenant.clone(),
                    alias: e.alias,
                    sealed: resealed,
                });
            }
            let n = ops.len();
            // All or nothing: one transaction.
            store
                .append(Arc::new(Batch {
                    secrets: ops,
                    ..Default::default()
                }))
                .await?;
            println!(
                "re-sealed {n} credentials of tenant {} under key {}; now use {} as the master key",
                opts.tenant,
                new.id(),
                new_key_file.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
