//! The `mayfly` binary.

mod actors;
mod bench;
mod bench_actors;
mod control;
mod keychain;
mod progress;
mod remote;
mod retention;
mod rollout;
mod telemetry;

/// The orchestrator and workers allocate per event and per message (JSON, hashing, NATS
/// frames); mimalloc's thread-local free lists cut that cost against the system allocator.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Parser, Subcommand};
use mayfly_dsl::ParseOptions;
use mayfly_engine::{ExecState, Report, Status};
use mayfly_runtime::{Runtime, RuntimeConfig, load_file};
use mayfly_store::Store;
use mayfly_trust::sign::ControlKey;
use mayfly_types::ExecutionId;
use serde_json::{Map, Value};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "mayfly",
    version,
    about = "A runtime for short-lived compute and trust: durable NoETL v2 playbooks on an append-only event log."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Export OpenTelemetry traces over OTLP/HTTP to this collector base URL (e.g.
    /// http://127.0.0.1:4318; traces go to its /v1/traces). Off by default.
    #[arg(long, global = true)]
    otlp_endpoint: Option<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a playbook locally (embedded SQLite log, in-process workers) and print its result.
    /// PLAYBOOK is a file, or with --db a catalog reference `path[@version]`.
    Run {
        playbook: PathBuf,
        /// Workload override `key=value` (value parsed as JSON when it is JSON, else a string).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Event log database (default: a temporary one, removed afterwards).
        #[arg(long)]
        db: Option<PathBuf>,
        #[command(flatten)]
        opts: RunOpts,
    },
    /// Validate a playbook: prints every problem as file:line:col.
    Validate {
        playbook: PathBuf,
        /// Workload keys that will be provided with --set at run time.
        #[arg(long = "var")]
        vars: Vec<String>,
    },
    /// Print an execution's events (without --db: from the server at MAYFLY_URL).
    Events {
        execution_id: String,
        #[arg(long)]
        db: Option<PathBuf>,
        /// First seq to print.
        #[arg(long, default_value_t = 1)]
        from: u64,
        #[arg(long, default_value_t = u32::MAX)]
        limit: u32,
        /// One JSON event per line.
        #[arg(long)]
        json: bool,
    },
    /// Rebuild an execution's state from its events (verifying the hash chain) and print it.
    Replay {
        execution_id: String,
        #[arg(long)]
        db: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Continue an unfinished execution (e.g. after a crash) from its log.
    Resume {
        execution_id: String,
        #[arg(long)]
        db: PathBuf,
        #[command(flatten)]
        opts: RunOpts,
    },
    /// List executions in a database, most recent first.
    Executions {
        #[arg(long)]
        db: PathBuf,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Measure orchestration overhead and fan-out throughput on the embedded store.
    Bench(bench::BenchArgs),
    /// Serve the gateway (HTTP API, SSE) with an embedded runtime: SQLite (or Postgres) log,
    /// in-process workers. Prints an admin token on first start.
    Server(ServerArgs),
    /// The shared cache: `gc` deletes payloads no retained execution names.
    Cache {
        #[command(subcommand)]
        cmd: retention::CacheCmd,
    },
    /// A stateless worker process for a distributed server (`server --queue nats://…`):
    /// pulls blocks from the JetStream work queue, claims, runs and completes them.
    /// Needs only NATS (and the master key when steps use the keychain).
    Worker(WorkerArgs),
    /// Apply desired state: manifest files (or directories of *.yaml) of Tenant,
    /// Environment, Policy, WorkerPool objects and NoETL playbooks, each file all or nothing,
    /// on the server at MAYFLY_URL (token MAYFLY_TOKEN).
    Apply {
        #[arg(short = 'f', long = "file", required = true)]
        files: Vec<PathBuf>,
    },
    /// List objects of a KIND (tenants, environments, policies, playbooks, workerpools) with
    /// their status, or one by NAME.
    Get {
        kind: String,
        name: Option<String>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        fresh: control::FreshArgs,
    },
    /// One object: spec, version, generation, status and conditions (JSON).
    Describe {
        kind: String,
        name: String,
        #[command(flatten)]
        fresh: control::FreshArgs,
    },
    /// Every revision of an object: version, the version it replaced, actor, request id.
    History {
        kind: String,
        name: String,
        #[command(flatten)]
        fresh: control::FreshArgs,
    },
    /// Policies: `explain PATH[@VERSION]` shows how the policies in force for your tenant
    /// judge a catalog playbook, layer by layer, and which one decides.
    Policy {
        #[command(subcommand)]
        cmd: control::PolicyCmd,
    },
    /// Compact the control stream on the server at MAYFLY_URL: a snapshot replaces the
    /// records it summarizes (system admins).
    Compact,
    /// Policy bundles: `publish` freezes every Policy into a bundle signed by the control
    /// plane key; `list` shows the published ones (system tenant).
    Bundle {
        #[command(subcommand)]
        cmd: rollout::BundleCmd,
    },
    /// Actor dataplane providers: `enroll` with the control plane, `serve` the provider
    /// API (mTLS) and heartbeat, `conformance` to check a provider against the contract.
    Provider {
        #[command(subcommand)]
        cmd: actors::ProviderCmd,
    },
    /// Actors on the server at MAYFLY_URL: list, suspend, move, snapshots, providers.
    Actors {
        #[command(subcommand)]
        cmd: actors::ActorsCmd,
    },
    /// Rollouts of policy bundles to the workers' agents (declared as Rollout objects with
    /// `mayfly apply`): `status NAME` shows the transition and per-agent acknowledged
    /// bundles; `cancel NAME` stops one in progress.
    Rollout {
        #[command(subcommand)]
        cmd: rollout::RolloutCmd,
    },
    /// The server's state: ready or degraded (and what is down), its role (appender or
    /// replica), pending publishes, admission outcomes, its control view's freshness.
    Status,
    /// Create an API token on the server (admin; printed once, stored only as a hash).
    Token {
        /// Role: viewer, operator, author or admin.
        #[arg(long)]
        role: String,
        /// A name for the token (recorded as the actor of what it does).
        #[arg(long)]
        name: String,
        /// Tenant (default: the caller's; other tenants need a system admin).
        #[arg(long)]
        tenant: Option<String>,
    },
    /// The control plane's audit (the hash-chained `control` stream).
    Audit {
        #[command(subcommand)]
        cmd: control::AuditCmd,
    },
    /// Register a playbook file in the catalog: a new immutable version (or `unchanged`).
    /// Without --db it registers on the server at MAYFLY_URL (token MAYFLY_TOKEN).
    Register {
        playbook: PathBuf,
        #[arg(long)]
        db: Option<PathBuf>,
        #[arg(long, default_value = "default")]
        tenant: String,
    },
    /// List the catalog (every version).
    Catalog {
        #[arg(long)]
        db: PathBuf,
        #[arg(long, default_value = "default")]
        tenant: String,
    },
    /// Executions on a server (MAYFLY_URL, MAYFLY_TOKEN): start, status, watch, cancel, list.
    Exec {
        #[command(subcommand)]
        cmd: remote::ExecCmd,
    },
    /// Manage credentials: stored sealed, resolved by alias only inside steps.
    Keychain {
        #[command(subcommand)]
        cmd: keychain::KeychainCmd,
        #[command(flatten)]
        key: keychain::KeyOpts,
    },
}

/// `mayfly worker`.
#[derive(Args)]
struct WorkerArgs {
    #[command(flatten)]
    dist: DistOpts,
    /// Concurrent blocks in this process.
    #[arg(long, default_value_t = 16)]
    slots: usize,
    /// Seconds a worker told to stop (SIGTERM or SIGINT) lets its running blocks finish.
    #[arg(long, default_value_t = 30.0)]
    drain_timeout: f64,
    /// Runtime threads (default: one per CPU). A worker mostly waits on NATS and on its
    /// tools' processes; several workers sharing few CPUs spend less on thread wake-ups
    /// with one each.
    #[arg(long)]
    threads: Option<usize>,
    /// Warm python interpreters.
    #[arg(long)]
    python_pool: Option<usize>,
    #[command(flatten)]
    contain: ContainOpts,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9101).
    #[arg(long)]
    metrics_listen: Option<String>,
    /// Worker id recorded on its claims (default: host-pid).
    #[arg(long)]
    id: Option<String>,
    /// The event log whose commands this worker runs (its id, as the server's banner and
    /// `/v1/status` show it). Without it the worker asks the servers of `--queue-name`,
    /// and refuses to guess when servers of several logs answer.
    #[arg(long, env = "MAYFLY_LOG_ID")]
    log_id: Option<String>,
    #[command(flatten)]
    key: keychain::KeyOpts,
    #[command(flatten)]
    cache: CacheOpts,
    #[command(flatten)]
    agent: rollout::AgentOpts,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_in_db_urls_are_never_shown() {
        assert_eq!(
            shown(Path::new("postgres://u:secret@h:5432/db")),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(shown(Path::new("/tmp/x.db")), "/tmp/x.db");
        assert!(!shown(Path::new("postgresql://u:p%40ss@h/db")).contains("p%40ss"));
    }

    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        // Every flag's value type matches its field (clap checks that only when parsing).
        for args in [
            &["mayfly", "server"][..],
            &[
                "mayfly",
                "server",
                "--cache-keep",
                "off",
                "--cache-gc-every",
                "30s",
            ],
            &[
                "mayfly",
                "cache",
                "gc",
                "--db",
                "x.db",
                "--keep",
                "1d",
                "--dry-run",
            ],
            &["mayfly", "worker", "--queue", "nats://127.0.0.1:4222"],
            &["mayfly", "run", "x.yaml"],
        ] {
            let cli = Cli::try_parse_from(args.iter().copied())
                .unwrap_or_else(|e| panic!("{args:?}: {e}"));
            if let Cmd::Server(a) = cli.cmd {
                let p = a.retention.policy().expect("policy");
                assert_eq!(p.is_none(), args.contains(&"off"));
            }
        }
        assert!(Cli::try_parse_from(["mayfly", "server", "--cache-keep", "soon"]).is_err());
    }

    #[test]
    fn set_values_parse_as_json_or_strings() {
        let m =
            overrides(&["n=5".into(), "s=bob".into(), "l=[1,2]".into(), "e=".into()]).expect("ok");
        assert_eq!(
            Value::Object(m),
            serde_json::json!({"n": 5, "s": "bob", "l": [1, 2], "e": ""})
        );
        assert!(overrides(&["novalue".into()]).is_err());
        assert!(overrides(&["=x".into()]).is_err());
    }
}

/// `mayfly server`.
#[derive(Args)]
struct ServerArgs {
    /// Event log: a SQLite file or a postgres:// URL.
    #[arg(long, default_value = "mayfly.db")]
    db: PathBuf,
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// A view-only node of a Postgres log another server appends to: it keeps its own
    /// view of the control plane fed by the log tail and serves reads (executions,
    /// events, catalog, control-plane objects under their freshness class); every write
    /// answers `not_leader`.
    #[arg(long)]
    replica: bool,
    #[command(flatten)]
    opts: RunOpts,
    #[command(flatten)]
    dist: DistOpts,
    #[command(flatten)]
    control_key: rollout::ControlKeyOpts,
    #[command(flatten)]
    agent: rollout::AgentOpts,
    #[command(flatten)]
    dataplane: actors::DataplaneOpts,
    #[command(flatten)]
    retention: retention::RetentionOpts,
    #[command(flatten)]
    api: ApiOpts,
}

/// How the API answers when its store is slow or gone (README "Operations").
#[derive(Args, Clone, Copy)]
struct ApiOpts {
    /// The most an API request waits on the store (connect, pool and query alike) before it
    /// answers `503 root_unavailable`.
    #[arg(long, default_value_t = 2000, value_name = "MS")]
    store_timeout_ms: u64,
    /// How long a token the store verified is trusted without asking it again (revocations
    /// and role changes take effect within it; 0: ask every time).
    #[arg(long, default_value_t = 60_000, value_name = "MS")]
    token_cache_ms: u64,
}

impl ApiOpts {
    /// The gateway's view of `store` (every call bounded) and its token cache.
    fn gateway_parts(
        &self,
        store: &Arc<dyn mayfly_store::Store>,
    ) -> (
        Arc<dyn mayfly_store::Store>,
        Arc<mayfly_gateway::tokens::TokenCache>,
    ) {
        (
            Arc::new(mayfly_store::Bounded::new(
                store.clone(),
                std::time::Duration::from_millis(self.store_timeout_ms.max(1)),
            )),
            Arc::new(mayfly_gateway::tokens::TokenCache::new(
                std::time::Duration::from_millis(self.token_cache_ms),
            )),
        )
    }
}

/// Distributed mode: where commands go and how long a claim lives.
#[derive(Args, Clone)]
struct DistOpts {
    /// Command queue: a nats:// URL (JetStream). Without it the server runs blocks itself.
    #[arg(long, env = "MAYFLY_QUEUE")]
    queue: Option<String>,
    /// The command queue's name: its JetStream stream and subjects are
    /// `{name}_{log id}` (scoped by the event log's identity).
    #[arg(long, default_value = "mayfly")]
    queue_name: String,
    /// Seconds a claim stays valid without a heartbeat (the queue's ack_wait).
    #[arg(long, default_value_t = 30.0)]
    lease: f64,
    #[command(flatten)]
    channel_key: rollout::ChannelKeyOpts,
    #[command(flatten)]
    nats_auth: NatsAuthOpts,
}

/// Credentials for NATS beyond those in the URL (`nats://user:password@…`, `nats://token@…`).
#[derive(Args, Clone, Debug, Default)]
pub(crate) struct NatsAuthOpts {
    /// A NATS credentials file (user JWT and nkey seed, as `nsc` writes it).
    #[arg(long, env = "MAYFLY_NATS_CREDS", value_name = "FILE")]
    nats_creds: Option<PathBuf>,
    /// A file holding a NATS nkey seed (`SU…`) to authenticate with.
    #[arg(long, env = "MAYFLY_NATS_NKEY", value_name = "FILE")]
    nats_nkey: Option<PathBuf>,
    /// A CA certificate (PEM) to verify the NATS server's TLS certificate with; TLS is then
    /// required.
    #[arg(long, env = "MAYFLY_NATS_CA", value_name = "FILE")]
    nats_ca: Option<PathBuf>,
}

impl NatsAuthOpts {
    /// Refused when any is given: there is no NATS server to use them on.
    fn unused(&self) -> Result<()> {
        if self.nats_creds.is_some() || self.nats_nkey.is_some() || self.nats_ca.is_some() {
            bail!("--nats-creds, --nats-nkey and --nats-ca need --queue nats://…");
        }
        Ok(())
    }

    pub(crate) fn to(&self, url: &str) -> mayfly_queue::NatsConnect {
        mayfly_queue::NatsConnect {
            url: url.to_owned(),
            creds: self.nats_creds.clone(),
            nkey: self.nats_nkey.clone(),
            ca: self.nats_ca.clone(),
        }
    }
}

impl DistOpts {
    fn lease(&self) -> Result<std::time::Duration> {
        std::time::Duration::try_from_secs_f64(self.lease)
            .ok()
            .filter(|d| *d >= std::time::Duration::from_millis(100))
            .ok_or_else(|| anyhow::anyhow!("--lease must be at least 0.1 seconds"))
    }

    fn queue_config(&self) -> Result<mayfly_queue::QueueConfig> {
        Ok(mayfly_queue::QueueConfig {
            ack_wait: self.lease()?,
            // A block lost with its worker this many times is given up by the queue; the
            // orchestrator's lease reaper still re-dispatches it (nothing is silently lost).
            max_deliver: 100,
            backoff: vec![
                std::time::Duration::from_millis(100),
                std::time::Duration::from_secs(1),
                std::time::Duration::from_secs(5),
            ],
        })
    }

    /// The NATS server of `--queue`, with its credentials.
    fn nats(&self) -> Result<Option<mayfly_queue::NatsConnect>> {
        self.nats_for(false)
    }

    /// [`DistOpts::nats`]; `other`: something else uses the credentials (a server's
    /// `--snapshots nats://…`), so they are not refused without `--queue`.
    fn nats_for(&self, other: bool) -> Result<Option<mayfly_queue::NatsConnect>> {
        match self.queue.as_deref() {
            None => {
                if !other {
                    self.nats_auth.unused()?;
                }
                Ok(None)
            }
            Some(u) if u.starts_with("nats://") || u.starts_with("tls://") => {
                Ok(Some(self.nats_auth.to(u)))
            }
            Some(u) => bail!("--queue must be a nats:// URL, not `{u}`"),
        }
    }
}

/// How tenant code is contained (README "Security").
#[derive(Args, Clone)]
struct ContainOpts {
    /// Run shell, python and duckdb steps in a bubblewrap sandbox: `auto` is on for
    /// `server` and `worker`, off for `run` (your own code on your own machine).
    #[arg(long, value_enum, default_value = "auto")]
    sandbox: SandboxChoice,
    /// Egress of tenants whose policies set none: `public`, `none`, `host`, or
    /// `allow:RULE,RULE…` (default: `public` for `server` and `worker`, `host` for `run`).
    #[arg(long, value_name = "RULE")]
    egress: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum SandboxChoice {
    Auto,
    On,
    Off,
}

impl ContainOpts {
    /// Apply to `cfg`; `served`: a server or worker (tenants' code), not `mayfly run`.
    fn apply(&self, cfg: &mut mayfly_tools::ToolsConfig, served: bool) -> Result<()> {
        cfg.sandbox = match self.sandbox {
            SandboxChoice::Auto => served,
            SandboxChoice::On => true,
            SandboxChoice::Off => false,
        };
        if cfg.sandbox {
            // Sandboxed code reaches the network through this binary as its keeper.
            cfg.keeper = Some(mayfly_tools::sandbox::Keeper {
                exe: std::env::current_exe().context("the runtime's own executable")?,
                args: vec![actors::KEEPER_ARG.into()],
            });
        }
        use mayfly_types::Egress;
        cfg.default_egress = match self.egress.as_deref() {
            None if served => vec![Egress::Public],
            None | Some("host") => Vec::new(),
            Some("public") => vec![Egress::Public],
            Some("none") => vec![Egress::None],
            Some(rules) if rules.starts_with("allow:") => {
                let list: Vec<String> = rules["allow:".len()..]
                    .split(',')
                    .map(|r| r.trim().to_owned())
                    .filter(|r| !r.is_empty())
                    .collect();
                let e = vec![Egress::Allow(list)];
                mayfly_types::egress::validate(&e).map_err(|m| anyhow::anyhow!("--egress: {m}"))?;
                e
            }
            Some(other) => {
                bail!("--egress must be public, none, host or allow:RULE,RULE…, not `{other}`")
            }
        };
        Ok(())
    }
}

#[derive(Args, Clone)]
struct RunOpts {
    #[command(flatten)]
    contain: ContainOpts,
    /// Print only the final report as one JSON document.
    #[arg(long)]
    json: bool,
    /// Concurrent blocks (worker tasks).
    #[arg(long, default_value_t = 16)]
    workers: usize,
    /// Warm python interpreters.
    #[arg(long)]
    python_pool: Option<usize>,
    /// Hide the live progress display.
    #[arg(long)]
    quiet: bool,
    /// Claims of one block (its workers died or lost the lease each time) after which the
    /// step fails with `worker_lost`.
    #[arg(long, default_value_t = mayfly_runtime::DEFAULT_MAX_ATTEMPTS)]
    max_attempts: u32,
    /// Child playbooks, as NoETL names them (catalog path `metadata.path`, optional
    /// `version`): every playbook under DIR is registered into this run's catalog first
    /// (default: the directory of the playbook run, when it has child steps).
    #[arg(long, value_name = "DIR")]
    playbooks: Option<PathBuf>,
    #[command(flatten)]
    key: keychain::KeyOpts,
    #[command(flatten)]
    cache: CacheOpts,
}

/// The shared cache (results above the inline limit are stored by reference).
#[derive(Args, Clone)]
struct CacheOpts {
    /// Step results (and parts of them) whose JSON exceeds this many bytes are stored in the
    /// shared cache — Arrow IPC for tables — and events carry a ref instead.
    #[arg(long, default_value_t = mayfly_cache::DEFAULT_INLINE_LIMIT)]
    inline_limit: usize,
}

impl CacheOpts {
    /// Embedded: a directory next to the SQLite log (`<db>.cache`; `./mayfly-cache` for a
    /// Postgres log served by one process).
    fn local(&self, db: &Path) -> Arc<mayfly_cache::Payloads> {
        let dir = if is_postgres(db) {
            PathBuf::from("mayfly-cache")
        } else {
            PathBuf::from(format!("{}.cache", db.display()))
        };
        Arc::new(mayfly_cache::Payloads::new(
            Arc::new(mayfly_cache::LocalCache::new(dir)),
            self.inline_limit,
        ))
    }

    /// Distributed: the JetStream object store bucket `<channel prefix>-cache`, shared by
    /// the server's workers wherever they run.
    async fn nats(
        &self,
        client: async_nats::Client,
        queue_name: &str,
    ) -> Result<Arc<mayfly_cache::Payloads>> {
        let bucket: String = format!("{queue_name}-cache")
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let cache = mayfly_cache::NatsCache::open(client, &bucket)
            .await
            .with_context(|| format!("opening the shared cache (object store `{bucket}`)"))?;
        Ok(Arc::new(mayfly_cache::Payloads::new(
            Arc::new(cache),
            self.inline_limit,
        )))
    }
}

fn main() -> ExitCode {
    if std::env::args_os().nth(1).as_deref() == Some(std::ffi::OsStr::new(actors::KEEPER_ARG)) {
        // Inside a sandbox: no telemetry, no runtime, nothing else.
        let code = mayfly_tools::keeper::main(std::env::args_os().skip(2));
        return ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    let cli = Cli::parse();
    // A command that only prints (to a pager, `head`, a closed pipe) ends quietly when its
    // reader goes away, as Unix tools do, instead of panicking on the write. Commands that
    // run tools keep SIGPIPE ignored: a dead interpreter's pipe must not kill the runtime.
    let printer = matches!(
        cli.cmd,
        Cmd::Validate { .. }
            | Cmd::Events { .. }
            | Cmd::Replay { .. }
            | Cmd::Executions { .. }
            | Cmd::Apply { .. }
            | Cmd::Get { .. }
            | Cmd::Describe { .. }
            | Cmd::History { .. }
            | Cmd::Policy { .. }
            | Cmd::Compact
            | Cmd::Bundle { .. }
            | Cmd::Actors { .. }
            | Cmd::Rollout { .. }
            | Cmd::Status
            | Cmd::Token { .. }
            | Cmd::Audit { .. }
            | Cmd::Register { .. }
            | Cmd::Catalog { .. }
            | Cmd::Exec { .. }
    );
    if printer {
        // SAFETY: setting a signal's disposition to its default has no preconditions; no
        // other thread exists yet.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let service = match &cli.cmd {
        Cmd::Server(_) => "mayfly-server",
        Cmd::Worker(_) => "mayfly-worker",
        _ => "mayfly",
    };
    let _telemetry = match telemetry::init(
        service,
        telemetry::otlp_endpoint(cli.otlp_endpoint.as_deref()),
    ) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Cmd::Worker(WorkerArgs {
        threads: Some(n), ..
    }) = &cli.cmd
    {
        builder.worker_threads((*n).max(1));
    }
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(dispatch(cli.cmd)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn dispatch(cmd: Cmd) -> Result<ExitCode> {
    match cmd {
        Cmd::Run {
            playbook,
            set,
            db,
            opts,
        } => run(&playbook, &set, db.as_deref(), &opts).await,
        Cmd::Validate { playbook, vars } => validate(&playbook, vars),
        Cmd::Events {
            execution_id,
            db,
            from,
            limit,
            json,
        } => {
            let evs = match db {
                Some(db) => {
                    let store = open_existing(&db).await?;
                    store
                        .read(&ExecutionId::from(execution_id.as_str()), from, limit)
                        .await?
                }
                None => {
                    remote::Client::from_env()?
                        .events(&execution_id, from, limit)
                        .await?
                }
            };
            events(&execution_id, &evs, from, json)
        }
        Cmd::Replay {
            execution_id,
            db,
            json,
        } => replay(&db, &execution_id, json).await,
        Cmd::Resume {
            execution_id,
            db,
            opts,
        } => resume(&db, &execution_id, &opts).await,
        Cmd::Executions { db, limit } => executions(&db, limit).await,
        Cmd::Bench(args) => bench::run(args).await,
        Cmd::Server(a) if a.replica => replica(&a.db, &a.listen, &a.api).await,
        Cmd::Server(a) => server(&a).await,
        Cmd::Cache { cmd } => cache_cmd(cmd).await,
        Cmd::Provider { cmd } => actors::provider(cmd).await,
        Cmd::Actors { cmd } => actors::actors(cmd).await,
        Cmd::Worker(w) => worker(&w).await,
        Cmd::Register {
            playbook,
            db,
            tenant,
        } => match db {
            Some(db) => register(&db, &playbook, &tenant).await,
            None => remote::register(&playbook).await,
        },
        Cmd::Catalog { db, tenant } => catalog(&db, &tenant).await,
        Cmd::Apply { files } => control::apply(&files).await,
        Cmd::Status => remote::status().await,
        Cmd::Policy { cmd } => control::policy(cmd).await,
        Cmd::Bundle { cmd } => rollout::bundle(cmd).await,
        Cmd::Compact => control::compact().await,
        Cmd::Rollout { cmd } => rollout::rollout(cmd).await,
        Cmd::Token { role, name, tenant } => remote::token(&role, &name, tenant).await,
        Cmd::Get {
            kind,
            name,
            json,
            fresh,
        } => control::get(&kind, name.as_deref(), json, &fresh).await,
        Cmd::Describe { kind, name, fresh } => control::describe(&kind, &name, &fresh).await,
        Cmd::History { kind, name, fresh } => control::history(&kind, &name, &fresh).await,
        Cmd::Audit { cmd } => {
            let store = match &cmd {
                control::AuditCmd::Verify { db: Some(db) } => {
                    Some(open_db(db, true, false).await?.0)
                }
                control::AuditCmd::Verify { db: None } => None,
            };
            control::audit(cmd, store).await
        }
        Cmd::Exec { cmd } => remote::exec(cmd, overrides).await,
        Cmd::Keychain { cmd, key } => {
            keychain::run(cmd, key, async |db: &Path| {
                open_db(db, false, false).await.map(|(s, _)| s)
            })
            .await
        }
    }
}

/// Parse `--set key=value` pairs; values are JSON when they parse as JSON.
pub(crate) fn overrides(pairs: &[String]) -> Result<Map<String, Value>> {
    let mut m = Map::new();
    for p in pairs {
        let (k, v) = p
            .split_once('=')
            .ok_or_else(|| anyhow!("--set expects KEY=VALUE, got `{p}`"))?;
        let k = k.trim();
        if k.is_empty() {
            bail!("--set expects KEY=VALUE, got `{p}`");
        }
        let v = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_owned()));
        m.insert(k.to_owned(), v);
    }
    Ok(m)
}

/// This process's exclusive right to append to its log (held while the value lives).
enum LogLock {
    File(#[allow(dead_code)] File),
    Postgres(mayfly_store::AppenderLock),
}

impl LogLock {
    /// Resolves if another process took the log over (never, for a file lock).
    async fn lost(&mut self) {
        match self {
            LogLock::Postgres(l) => l.lost().await,
            LogLock::File(_) => std::future::pending().await,
        }
    }
}

/// Run `f` unless another process takes the log over first (then stop: fail closed).
/// Wait for every execution `root` started, transitively (children that ran detached
/// included), in the order they were started.
async fn wait_started(
    handle: &mayfly_runtime::RuntimeHandle,
    log: &dyn Store,
    root: &ExecutionId,
) -> Result<Vec<(ExecutionId, Report)>> {
    let mut out = Vec::new();
    let mut queue = std::collections::VecDeque::from([root.clone()]);
    while let Some(id) = queue.pop_front() {
        for e in log.read(&id, 1, u32::MAX).await? {
            if e.kind != mayfly_types::EventKind::ChildStarted {
                continue;
            }
            if let Some(c) = e.payload.get("child_execution_id").and_then(Value::as_str) {
                let c = ExecutionId(c.to_owned());
                out.push((c.clone(), handle.wait(&c).await?));
                queue.push_back(c);
            }
        }
    }
    Ok(out)
}

async fn until_lost<T>(
    lock: &mut Option<LogLock>,
    f: impl std::future::Future<Output = T>,
) -> Result<T> {
    let lost = async {
        match lock {
            Some(l) => l.lost().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        r = f => Ok(r),
        _ = lost => bail!("another process took over the event log; stopping (fail closed)"),
    }
}

/// An exclusive lock on the database for this process: embedded mode has one runner per
/// log, so a resumed run may safely take over every claim left by a dead one.
fn lock_db(db: &Path) -> Result<File> {
    let lock_path = PathBuf::from(format!("{}.lock", db.display()));
    if let Some(dir) = lock_path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let f =
        File::create(&lock_path).with_context(|| format!("creating {}", lock_path.display()))?;
    if f.try_lock().is_err() {
        bail!(
            "database {} is in use by another mayfly process",
            db.display()
        );
    }
    Ok(f)
}

/// The runtime of `mayfly run`/`resume` (`served`: false) or of `mayfly server`.
fn runtime_config(opts: &RunOpts, db: &Path, served: bool) -> Result<RuntimeConfig> {
    let mut cfg = RuntimeConfig {
        workers: opts.workers.max(1),
        cache: Some(opts.cache.local(db)),
        max_attempts: opts.max_attempts.max(1),
        ..Default::default()
    };
    if let Some(n) = opts.python_pool {
        cfg.tools.python_pool = n.max(1);
    }
    opts.contain.apply(&mut cfg.tools, served)?;
    cfg.keychain = keychain::master_key(&opts.key, false)?;
    Ok(cfg)
}

fn print_report(r: &Report, json: bool, elapsed: Option<std::time::Duration>) -> Result<ExitCode> {
    if json {
        println!("{}", serde_json::to_string(r)?);
    } else {
        let took = elapsed
            .map(|d| format!(" in {:.3}s", d.as_secs_f64()))
            .unwrap_or_default();
        eprintln!(
            "{} {}{took} ({} events)",
            status_word(r.status),
            r.execution_id,
            r.events
        );
        if let Some(e) = &r.error {
            eprintln!("  step: {}", r.failed_step.as_deref().unwrap_or("-"));
            eprintln!("  error: {e}");
        }
        println!("{}", serde_json::to_string_pretty(&r.result)?);
    }
    Ok(if r.status == Status::Completed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn status_word(s: Status) -> &'static str {
    match s {
        Status::Completed => "completed",
        Status::Failed => "FAILED",
        Status::Cancelled => "cancelled",
        Status::Running => "running",
        Status::Pending => "pending",
    }
}

async fn run(
    playbook: &Path,
    set: &[String],
    db: Option<&Path>,
    opts: &RunOpts,
) -> Result<ExitCode> {
    let ov = overrides(set)?;
    let parse_opts = ParseOptions {
        extra_vars: ov.keys().cloned().collect(),
    };
    let tmp;
    let db_path = match db {
        Some(p) => p.to_path_buf(),
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().join("mayfly.db")
        }
    };
    let (store, mut lock) = open_db(&db_path, false, true).await?;
    // A file, or (with --db) a catalog reference `path[@version]`.
    let loaded = if playbook.exists() || db.is_none() {
        load_file(playbook, &parse_opts).map_err(|e| e.to_string())
    } else {
        from_catalog(
            store.as_ref(),
            &opts.key.tenant,
            &playbook.to_string_lossy(),
            &parse_opts,
        )
        .await?
    };
    let pb = match loaded {
        Ok(pb) => pb,
        Err(e) => {
            eprintln!("{e}");
            return Ok(ExitCode::from(2));
        }
    };
    if !opts.json {
        print_warnings(&pb, ov.keys());
    }
    let cfg = runtime_config(opts, &db_path, false)?;
    // Children by catalog path: the playbooks under --playbooks, or beside the file run.
    let root = opts.playbooks.clone().or_else(|| {
        (playbook.exists() && pb.steps.iter().any(|s| s.playbook_task().is_some()))
            .then(|| playbook.parent().map(Path::to_path_buf))
            .flatten()
            .map(|p| {
                if p.as_os_str().is_empty() {
                    PathBuf::from(".")
                } else {
                    p
                }
            })
    });
    if let Some(root) = root {
        // Registered into this run's catalog (the tenant's, in --db when given): children
        // resolve there by catalog path and version, as on a server.
        let registered = match mayfly_runtime::PlaybookIndex::scan(&root) {
            Ok(idx) => idx.register(store.as_ref(), &opts.key.tenant).await,
            Err(e) => Err(e),
        };
        match registered {
            Ok(r) => {
                for (path, files) in &r.ambiguous {
                    eprintln!(
                        "warning: catalog path `{path}` is claimed by {} files under {} and is not registered: {}",
                        files.len(),
                        root.display(),
                        files
                            .iter()
                            .map(|f| f.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
            }
            Err(e) => {
                eprintln!("{e}");
                return Ok(ExitCode::from(2));
            }
        }
    }
    let payloads = cfg.cache.clone();
    let log = store.clone();
    let runtime = Runtime::start(store, cfg)?;
    let handle = runtime.handle();
    let events = handle.subscribe();
    let pb = Arc::new(pb);
    let began = std::time::Instant::now();
    let id = handle
        .start_as(pb.clone(), ov, None, Some(opts.key.tenant.clone()))
        .await?;
    if !opts.json && db.is_some() {
        eprintln!("execution {id} (db {})", shown(&db_path));
    }
    let display =
        (!opts.json && !opts.quiet).then(|| progress::spawn(events, pb.clone(), id.clone()));
    let mut report = until_lost(&mut lock, handle.wait(&id)).await??;
    // Fire-and-forget children (NoETL's default) run on after their parent: a local run
    // ends when every execution it started has, and says which of them failed.
    let started = until_lost(&mut lock, wait_started(&handle, log.as_ref(), &id)).await??;
    if let Some(d) = display {
        d.finish().await;
    }
    for (child, r) in &started {
        if r.status != Status::Completed && !opts.json {
            let why = r
                .error
                .as_ref()
                .map(|e| format!("{}: {}", e.code, e.message))
                .unwrap_or_default();
            eprintln!(
                "warning: child execution {child} ended {} ({why})",
                r.status.as_str()
            );
        }
    }
    // A local run prints what the playbook produced: refs resolved from the local cache.
    if let Some(p) = payloads
        && let Err(e) = p.hydrate_all(&opts.key.tenant, &mut report.result).await
    {
        eprintln!("warning: the result holds a cached payload that could not be read: {e}");
    }
    print_report(&report, opts.json, Some(began.elapsed()))
}

async fn cache_cmd(cmd: retention::CacheCmd) -> Result<ExitCode> {
    let retention::CacheCmd::Gc {
        db,
        keep,
        grace,
        dry_run,
        json,
        queue,
        queue_name,
        nats_auth,
    } = cmd;
    if queue.is_none() {
        nats_auth.unused()?;
    }
    // Must exist: an empty log marks nothing, and the sweep would take every payload.
    let (store, _) = open_db(&db, true, false).await?;
    let opts = CacheOpts {
        inline_limit: mayfly_cache::DEFAULT_INLINE_LIMIT,
    };
    let payloads = match queue.as_deref() {
        Some(url) => {
            let client = nats_auth.to(url).connect().await?;
            // The bucket of this log's channel.
            opts.nats(client, &format!("{queue_name}_{}", store.log_id().await?))
                .await?
        }
        None => opts.local(&db),
    };
    let rep = mayfly_runtime::retention::collect(
        store.as_ref(),
        payloads.cache().as_ref(),
        mayfly_runtime::retention::Retention { keep, grace },
        mayfly_types::now_ms(),
        dry_run,
    )
    .await?;
    retention::print(&rep, dry_run, json);
    Ok(ExitCode::SUCCESS)
}

async fn resume(db: &Path, id: &str, opts: &RunOpts) -> Result<ExitCode> {
    let (store, mut lock) = open_db(db, true, true).await?;
    let runtime = Runtime::start(store, runtime_config(opts, db, false)?)?;
    let handle = runtime.handle();
    let id = ExecutionId::from(id);
    let began = std::time::Instant::now();
    handle.resume(&id).await?;
    let report = until_lost(&mut lock, handle.wait(&id)).await??;
    print_report(&report, opts.json, Some(began.elapsed()))
}

/// A playbook's warnings, and `--set` keys it does not declare in `workload` (a typo there
/// silently adds a variable nothing reads), on stderr.
fn print_warnings<'k>(pb: &mayfly_dsl::Playbook, set: impl Iterator<Item = &'k String>) {
    for w in &pb.warnings {
        eprintln!("warning: {w}");
    }
    for k in set {
        if !pb.workload.contains_key(k) {
            let hint = mayfly_dsl::schema::did_you_mean(
                k,
                &pb.workload.keys().map(String::as_str).collect::<Vec<_>>(),
            )
            .map(|m| format!("; did you mean `{m}`?"))
            .unwrap_or_default();
            eprintln!("warning: --set {k}: the playbook's workload does not declare `{k}`{hint}");
        }
    }
}

fn validate(playbook: &Path, vars: Vec<String>) -> Result<ExitCode> {
    match load_file(
        playbook,
        &ParseOptions {
            extra_vars: vars.clone(),
        },
    ) {
        Ok(pb) => {
            print_warnings(&pb, std::iter::empty());
            println!(
                "ok: {} ({} steps, digest {})",
                pb.path,
                pb.steps.len(),
                pb.digest
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("{e}");
            Ok(ExitCode::from(2))
        }
    }
}

/// `mayfly server --replica`: reads only, from this node's own view of a shared log.
async fn replica(db: &Path, listen: &str, api: &ApiOpts) -> Result<ExitCode> {
    if !is_postgres(db) {
        bail!("a replica serves a shared Postgres log (--db postgres://…), not a SQLite file");
    }
    let (store, _) = open_db(db, true, false).await?;
    let view = mayfly_control::View::start(store.clone(), true);
    let (store, tokens) = api.gateway_parts(&store);
    let app = mayfly_gateway::router(mayfly_gateway::Gateway {
        control: None,
        view,
        store,
        runtime: None,
        admissions: Default::default(),
        metrics: mayfly_gateway::install_metrics(),
        dataplane: None,
        tokens,
    });
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    eprintln!(
        "{}",
        mayfly_gateway::banner::ready_line(
            listener.local_addr()?,
            &format!("db {}, view-only replica", shown(db))
        )
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(ExitCode::SUCCESS)
}

async fn server(a: &ServerArgs) -> Result<ExitCode> {
    let ServerArgs {
        db,
        listen,
        opts,
        dist,
        control_key,
        agent: agent_opts,
        dataplane: dataplane_opts,
        retention,
        ..
    } = a;
    let (db, listen) = (db.as_path(), listen.as_str());
    let retain = retention.policy()?;
    let (store, lock) = open_db(db, false, true).await?;
    let key = control_key.load_or_create()?;
    if opts.playbooks.is_some() {
        bail!(
            "--playbooks is for `mayfly run`: a server runs children from the tenant's catalog (register them)"
        );
    }
    let mut cfg = runtime_config(opts, db, true)?;
    // A tenant's child playbooks come from its catalog, never from this host's files.
    cfg.children_from_catalog = true;
    cfg.lease = dist.lease()?;
    // The in-process workers' agent trusts this server's own key.
    let agent = agent_opts.agent(cfg.worker_id.clone(), Some(key.public().clone()))?;
    cfg.agent = Some(agent.clone());
    let mut nats = None;
    // The snapshot store on NATS authenticates with the same credentials.
    let nats_snapshots = dataplane_opts
        .snapshots
        .as_deref()
        .is_some_and(actors::is_nats_url);
    if let Some(nc) = dist.nats_for(nats_snapshots)? {
        // The channel of this log: its own stream and subjects, its own message key.
        let channel = mayfly_runtime::remote::Channel::new(
            &dist.queue_name,
            dist.channel_key
                .load_or_create()?
                .for_log(&store.log_id().await?),
        );
        let queue =
            mayfly_queue::NatsQueue::connect_to(&nc, &channel.prefix(), dist.queue_config()?)
                .await
                .context("connecting to the queue")?;
        cfg.queue = Some(Arc::new(channel.seal(queue)));
        cfg.workers = 0;
        let client = nc.connect().await?;
        cfg.cache = Some(opts.cache.nats(client.clone(), &channel.prefix()).await?);
        nats = Some((client, channel));
    }
    // The shared cache's retention (a mark from the log, a sweep of the cache).
    let _retention = match (retain, &cfg.cache) {
        (Some(r), Some(p)) => Some(mayfly_runtime::retention::spawn_periodic(
            store.clone(),
            p.cache().clone(),
            r,
            retention.cache_gc_every,
        )),
        _ => None,
    };
    let runtime = Runtime::start(store.clone(), cfg)?;
    let mode = match &nats {
        Some((_, channel)) => format!(
            "queue {}, stream {}, log {}",
            dist.nats()?.map(|n| n.shown()).unwrap_or_default(),
            channel.prefix(),
            channel.log_id()
        ),
        None => "in-process workers".into(),
    };
    let _rpc = match nats {
        Some((client, channel)) => {
            Some(mayfly_runtime::remote::serve(runtime.handle(), client, &channel).await?)
        }
        None => None,
    };
    // Resume whatever was in flight when the previous server stopped.
    for x in store.list_executions(None, 10_000).await? {
        if matches!(x.status.as_str(), "pending" | "running")
            && x.parent_execution_id.is_none()
            && let Err(e) = runtime.handle().resume(&x.execution_id).await
        {
            eprintln!("warning: could not resume {}: {e}", x.execution_id);
        }
    }
    if let Some(token) = mayfly_gateway::bootstrap_admin(store.as_ref()).await? {
        eprintln!("{}", mayfly_gateway::banner::token_line(&token));
    }
    let control = Arc::new(
        mayfly_control::Control::open(store.clone())
            .await
            .context("loading the control plane's stream")?
            .with_signer(ControlKey::from_base64(&key.to_base64())?),
    );
    let secrets = keychain::master_key(&opts.key, false)?.map(|k| (store.clone(), k));
    let dataplane = actors::start(
        dataplane_opts,
        &dist.nats_auth,
        control.clone(),
        &key,
        secrets,
    )
    .await?;
    runtime.handle().set_agent_hub(control.clone());
    let _controller = control.run_controller(std::time::Duration::from_millis(500));
    if dist.queue.is_none() {
        tokio::spawn(agent.run(control.clone()));
    }
    let view = mayfly_control::View::start(store.clone(), false);
    let (store, tokens) = a.api.gateway_parts(&store);
    let app = mayfly_gateway::router(mayfly_gateway::Gateway {
        control: Some(control),
        view,
        store,
        runtime: Some(runtime.handle()),
        admissions: Default::default(),
        metrics: mayfly_gateway::install_metrics(),
        dataplane,
        tokens,
    });
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    eprintln!(
        "{}",
        mayfly_gateway::banner::ready_line(
            listener.local_addr()?,
            &format!("db {}, {mode}", shown(db))
        )
    );
    let mut lock = lock;
    let serve = axum::serve(listener, app).with_graceful_shutdown(async {
        let _ = tokio::signal::ctrl_c().await;
    });
    until_lost(&mut lock, serve.into_future()).await??;
    Ok(ExitCode::SUCCESS)
}

async fn worker(w: &WorkerArgs) -> Result<ExitCode> {
    let WorkerArgs {
        dist,
        slots,
        python_pool,
        contain,
        metrics_listen,
        id,
        key,
        cache,
        agent: agent_opts,
        threads: _,
        drain_timeout,
        log_id,
    } = w;
    let drain_timeout = *drain_timeout;
    let (slots, python_pool, metrics_listen, id) =
        (*slots, *python_pool, metrics_listen.as_deref(), id.clone());
    let Some(nc) = dist.nats()? else {
        bail!("a worker needs --queue nats://… (or MAYFLY_QUEUE)");
    };
    let url = nc.shown();
    let channel_key = dist.channel_key.load()?;
    let client = nc.connect().await?;
    // Which log's commands: the pinned one (its messages authenticate themselves; no
    // server needs to be up yet), or the one the servers of this queue name introduce
    // (waiting up to a minute for one).
    let channel = match log_id.as_deref() {
        Some(id) if mayfly_runtime::remote::is_log_id(id) => mayfly_runtime::remote::Channel::new(
            &dist.queue_name,
            channel_key.for_log(&id.to_ascii_lowercase()),
        ),
        Some(id) => bail!("--log-id `{id}` is not a log id (32 hex digits)"),
        None => {
            mayfly_runtime::remote::discover(
                &client,
                &dist.queue_name,
                &channel_key,
                None,
                std::time::Duration::from_secs(60),
            )
            .await?
        }
    };
    let coord =
        mayfly_runtime::remote::RemoteCoordinator::connect_to(&nc, &channel, dist.queue_config()?)
            .await?;
    let payloads = cache.nats(client, &channel.prefix()).await?;
    let mut tools_cfg = RuntimeConfig::default().tools;
    if let Some(n) = python_pool {
        tools_cfg.python_pool = n.max(1);
    }
    contain.apply(&mut tools_cfg, true)?;
    let tools = Arc::new(mayfly_tools::Tools::new(tools_cfg)?);
    if let Some(e) = tools.sandbox_error() {
        tracing::error!(error = %e.message, "no sandbox: shell, python and duckdb steps will fail sandbox_unavailable");
        eprintln!(
            "warning: {}: shell, python and duckdb steps fail until it is fixed",
            e.message
        );
    }
    let key = keychain::master_key(key, false)?;
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "worker".into());
    let id = id.unwrap_or_else(|| format!("{host}-{}", std::process::id()));
    if let Some(addr) = metrics_listen {
        let handle = mayfly_gateway::install_metrics();
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let h = handle.clone();
                async move { h.map(|h| h.render()).unwrap_or_default() }
            }),
        );
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening on {addr}"))?;
        eprintln!("worker metrics on http://{}/metrics", l.local_addr()?);
        tokio::spawn(async move {
            let _ = axum::serve(l, app).await;
        });
    }
    eprintln!(
        "mayfly worker {id}: {slots} slots on {url} (stream {}, log {})",
        channel.prefix(),
        channel.log_id()
    );
    let agent = agent_opts.agent(id.clone(), None)?;
    let _agent = tokio::spawn(agent.clone().run(Arc::new(coord.clone())));
    let mut loops = tokio::task::JoinSet::new();
    for i in 0..slots.max(1) {
        loops.spawn(mayfly_runtime::worker::worker_loop(
            coord.clone(),
            tools.clone(),
            key.clone(),
            Some(payloads.clone()),
            Some(agent.clone()),
            format!("{id}/{i}"),
        ));
    }
    tokio::select! {
        _ = shutdown_signal() => {
            // Scale-down, not a crash: finish what runs, hand back what waits, then exit.
            let grace = std::time::Duration::try_from_secs_f64(drain_timeout.max(0.0))
                .unwrap_or(std::time::Duration::MAX);
            eprintln!(
                "mayfly worker {id}: draining (running blocks finish, up to {}s; a second signal stops at once)",
                grace.as_secs_f64()
            );
            coord.drain();
            let all_done = async { while loops.join_next().await.is_some() {} };
            tokio::select! {
                r = tokio::time::timeout(grace, all_done) => if r.is_err() {
                    eprintln!("mayfly worker {id}: drain timed out; unfinished blocks will be redelivered");
                },
                _ = shutdown_signal() => {}
            }
        }
        _ = loops.join_next() => {}
    }
    coord.flush().await;
    Ok(ExitCode::SUCCESS)
}

/// SIGINT or SIGTERM (what a service manager or Kubernetes sends to stop a process).
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Resolve `path[@version]` from the tenant's catalog (outer error: the store failed;
/// inner: not found or invalid).
async fn from_catalog(
    store: &dyn Store,
    tenant: &str,
    reference: &str,
    opts: &ParseOptions,
) -> Result<Result<mayfly_dsl::Playbook, String>> {
    let (path, version) = match reference.rsplit_once('@') {
        Some((p, v)) => match v.parse::<u32>() {
            Ok(v) => (p, Some(v)),
            Err(_) => return Ok(Err(format!("bad catalog version in `{reference}`"))),
        },
        None => (reference, None),
    };
    let Some((entry, stored)) = store.resolve(tenant, path, version).await? else {
        return Ok(Err(format!(
            "`{reference}` is neither a file nor a playbook in the catalog of tenant `{tenant}`"
        )));
    };
    Ok(mayfly_dsl::parse(
        &format!("{}@{}", entry.path, entry.version),
        &stored.content,
        opts,
    )
    .map_err(|e| e.to_string()))
}

async fn register(db: &Path, file: &Path, tenant: &str) -> Result<ExitCode> {
    let pb = match load_file(file, &ParseOptions::default()) {
        Ok(pb) => pb,
        Err(e) => {
            eprintln!("{e}");
            return Ok(ExitCode::from(2));
        }
    };
    let store = open_db(db, false, false).await?.0;
    let stored = mayfly_store::StoredPlaybook {
        digest: pb.digest.clone(),
        path: pb.path.clone(),
        source_name: pb.file.clone(),
        content: pb.source.clone(),
    };
    let (e, created) = store.register(tenant, stored).await?;
    let what = if created { "registered" } else { "unchanged" };
    println!("{what} {}@{} {}", e.path, e.version, e.digest);
    Ok(ExitCode::SUCCESS)
}

async fn catalog(db: &Path, tenant: &str) -> Result<ExitCode> {
    let store = open_existing(db).await?;
    for e in store.list_catalog(tenant).await? {
        println!("{}@{}  {}", e.path, e.version, e.digest);
    }
    Ok(ExitCode::SUCCESS)
}

async fn open_existing(db: &Path) -> Result<Arc<dyn Store>> {
    Ok(open_db(db, true, false).await?.0)
}

/// A database location fit for printing: a URL's password is never shown.
fn shown(db: &Path) -> String {
    let s = db.to_string_lossy().into_owned();
    match (s.find("://"), s.find('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let user_pass = &s[scheme + 3..at];
            let user = user_pass.split(':').next().unwrap_or_default();
            format!("{}{user}:***{}", &s[..scheme + 3], &s[at..])
        }
        _ => s,
    }
}

fn is_postgres(db: &Path) -> bool {
    let s = db.to_string_lossy();
    s.starts_with("postgres://") || s.starts_with("postgresql://")
}

/// Open the event log at `db`: a SQLite file, or a `postgres://` URL. With `lock`, this
/// process becomes the log's only appender (a lock file for SQLite, a session advisory lock
/// per schema for Postgres); readers take no lock.
async fn open_db(
    db: &Path,
    must_exist: bool,
    lock: bool,
) -> Result<(Arc<dyn Store>, Option<LogLock>)> {
    let location = db.to_string_lossy().into_owned();
    if is_postgres(db) {
        let guard = if lock {
            // A predecessor killed a moment ago may still hold its session for a little while.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            let l = loop {
                match mayfly_store::lock_appender(&location).await {
                    Err(mayfly_store::StoreError::Conflict(_))
                        if std::time::Instant::now() < deadline =>
                    {
                        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                    }
                    r => break r.context("locking the Postgres log for this process")?,
                }
            };
            Some(LogLock::Postgres(l))
        } else {
            None
        };
        // The lock holder also takes the log's fencing epoch: should it lose the lock
        // without noticing, its appends are refused instead of interleaving.
        let store = if lock {
            mayfly_store::open_as_appender(&location).await
        } else {
            mayfly_store::open(&location).await
        }
        .context("connecting to postgres")?;
        return Ok((store, guard));
    }
    if must_exist && !db.exists() {
        bail!("no database at {}", db.display());
    }
    let guard = if lock {
        Some(LogLock::File(lock_db(db)?))
    } else {
        None
    };
    let store = mayfly_store::open(&location)
        .await
        .with_context(|| format!("opening {}", db.display()))?;
    Ok((store, guard))
}

fn events(id: &str, evs: &[mayfly_types::Event], from: u64, json: bool) -> Result<ExitCode> {
    if evs.is_empty() && from <= 1 {
        bail!("no events for execution {id}");
    }
    for e in evs {
        if json {
            println!("{}", serde_json::to_string(e)?);
        } else {
            let step = e.step.as_deref().unwrap_or("");
            let attempt = e.attempt.map(|a| format!(" #{a}")).unwrap_or_default();
            let mut payload = serde_json::to_string(&e.payload)?;
            if payload.len() > 160 {
                let mut cut = 157;
                while !payload.is_char_boundary(cut) {
                    cut -= 1;
                }
                payload.truncate(cut);
                payload.push_str("...");
            }
            println!(
                "{:>5}  {:<20} {:<16}{attempt:<4} {:<14} {payload}",
                e.seq,
                e.kind.as_str(),
                step,
                e.actor
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn replay(db: &Path, id: &str, json: bool) -> Result<ExitCode> {
    let store = open_existing(db).await?;
    let id = ExecutionId::from(id);
    let evs = store.read_all(&id).await?;
    if evs.is_empty() {
        bail!("no events for execution {id}");
    }
    mayfly_trust::verify_chain(&evs)?;
    let st = ExecState::fold(id, &evs)?;
    if !json {
        eprintln!("hash chain verified: {} events", evs.len());
    }
    print_report(&st.report(), json, None)
}

async fn executions(db: &Path, limit: u32) -> Result<ExitCode> {
    let store = open_existing(db).await?;
    for x in store.list_executions(None, limit).await? {
        let parent = x
            .parent_execution_id
            .map(|p| format!(" (child of {p})"))
            .unwrap_or_default();
        println!("{}  {:<10} {}{parent}", x.execution_id, x.status, x.path);
    }
    Ok(ExitCode::SUCCESS)
}
