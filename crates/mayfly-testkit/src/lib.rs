//! Support for integration tests that use the real local Postgres and NATS.
//!
//! A test calls [`postgres`] / [`nats`] first: when the service is down the test is skipped
//! *loudly* (a `SKIPPED:` line on stderr), and with `CI=true` its absence is a failure, never
//! a silent pass.

use std::time::Duration;

pub mod fault;

/// The Postgres every test uses (`MAYFLY_TEST_POSTGRES` overrides).
pub fn postgres_url() -> String {
    std::env::var("MAYFLY_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// The NATS every test uses (`MAYFLY_TEST_NATS` overrides).
pub fn nats_url() -> String {
    std::env::var("MAYFLY_TEST_NATS").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// True when `addr` accepts connections; otherwise print why the test is skipped, or panic
/// when running under CI.
pub fn service_up(addr: &str, what: &str) -> bool {
    let ok = addr
        .parse()
        .ok()
        .is_some_and(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok());
    if !ok {
        assert!(
            std::env::var("CI").map(|v| v != "true").unwrap_or(true),
            "CI=true but {what} is not reachable at {addr}"
        );
        eprintln!("SKIPPED: {what} is not reachable at {addr} (start it to run this test)");
    }
    ok
}

/// Postgres at 127.0.0.1:5432 (see [`service_up`]).
pub fn postgres() -> bool {
    service_up("127.0.0.1:5432", "Postgres")
}

/// DuckDB's Python package importable by the `python3` the tools run (the duckdb tool runs
/// through it): skipped loudly when absent, a failure under `CI=true`.
pub fn duckdb() -> bool {
    runs(
        "python3",
        &["-c", "import duckdb"],
        "python3 cannot import duckdb (python3 -m pip install duckdb)",
    )
}

/// True when `program args` runs successfully; otherwise print why the test is skipped, or
/// panic under `CI=true` (`missing` says what is missing and how to install it).
fn runs(program: &str, args: &[&str], missing: &str) -> bool {
    let ok = std::process::Command::new(program)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var("CI").map(|v| v != "true").unwrap_or(true),
            "CI=true but {missing}"
        );
        eprintln!("SKIPPED: {missing}");
    }
    ok
}

/// Bubblewrap (`bwrap`) on PATH, which the sandbox of tenant code needs: skipped loudly
/// when absent, a failure under `CI=true` (`.ci/run` installs it).
pub fn bubblewrap() -> bool {
    runs(
        "bwrap",
        &["--version"],
        "bwrap is not installed (apt-get install bubblewrap)",
    )
}

/// A NATS server of the test's own (JetStream on, `conf` appended to its configuration) on
/// a free loopback port, stopped when dropped; None (skipped loudly, a failure under
/// `CI=true`) without `nats-server`.
pub fn nats_server(conf: &str) -> Option<NatsServer> {
    let bin = [
        "/usr/sbin/nats-server",
        "/usr/bin/nats-server",
        "/usr/local/bin/nats-server",
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).exists())
    .map(str::to_owned)
    .or_else(|| {
        runs(
            "nats-server",
            &["--version"],
            "nats-server is not installed",
        )
        .then(|| "nats-server".to_owned())
    });
    let bin = bin?;
    let dir = tempfile::tempdir().expect("tmp");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port");
    let file = dir.path().join("nats.conf");
    std::fs::write(
        &file,
        format!(
            "host: 127.0.0.1\nport: {port}\njetstream {{ store_dir: \"{}\" }}\n{conf}\n",
            dir.path().join("js").display()
        ),
    )
    .expect("conf");
    let child = std::process::Command::new(bin)
        .arg("-c")
        .arg(&file)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("nats-server");
    let t = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(10),
            "nats-server did not listen"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Some(NatsServer {
        child,
        port,
        _dir: dir,
    })
}

/// A NATS server a test started (see [`nats_server`]).
pub struct NatsServer {
    child: std::process::Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Make KV bucket `bucket` on the NATS of `js` (idempotent). Its stream is made by hand:
/// async-nats' `create_key_value` sends fields that the NATS 2.9 of Debian does not parse.
pub async fn nats_kv_bucket(js: &async_nats::jetstream::Context, bucket: &str) {
    use async_nats::jetstream::stream;
    js.get_or_create_stream(stream::Config {
        name: format!("KV_{bucket}"),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        ..Default::default()
    })
    .await
    .expect("kv bucket");
}

/// NATS JetStream at 127.0.0.1:4222 (see [`service_up`]).
pub fn nats() -> bool {
    service_up("127.0.0.1:4222", "NATS")
}

/// A name no other test run uses (schemas, streams, buckets): `<prefix>_<pid>_<n>_<nanos>`.
pub fn unique(prefix: &str) -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}_{}_{n}_{nanos}", std::process::id())
}

/// Terminate every session of the local Postgres whose `application_name` is `app` (tests
/// proving recovery from a lost connection name their connections so); returns how many.
pub async fn terminate_postgres_sessions(app: &str) -> i64 {
    use sqlx::{ConnectOptions, postgres::PgConnectOptions};
    let opts: PgConnectOptions = postgres_url().parse().expect("postgres url");
    let mut admin = opts.connect().await.expect("admin connection");
    sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
    )
    .bind(app)
    .fetch_one(&mut admin)
    .await
    .expect("terminate")
}
