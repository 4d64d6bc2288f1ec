//! Distributed mode with real processes: `mayfly server --db postgres://… --queue nats://…`
//! and `mayfly worker` processes, one of which is killed with SIGKILL in the middle of a
//! step. Needs the local Postgres and NATS (skipped loudly without them; with CI=true their
//! absence is a failure).

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const PG: &str = "postgres://postgres@127.0.0.1:5432/test";
const NATS: &str = "nats://127.0.0.1:4222";

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mayfly"));
    c.env("MAYFLY_LOG", "warn");
    c.env_remove("MAYFLY_QUEUE");
    c
}

/// Child processes killed when the test ends, however it ends.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

use mayfly_testkit::unique;

fn events(db: &str, id: &str) -> Vec<Value> {
    let o = bin()
        .args(["events", id, "--json", "--db", db])
        .output()
        .expect("events");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("event json"))
        .collect()
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let began = Instant::now();
    while !f() {
        assert!(began.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn worker(stream: &str, id: &str, slots: &str) -> Child {
    bin()
        .args([
            "worker",
            "--queue",
            NATS,
            "--queue-name",
            stream,
            "--lease",
            "2",
        ])
        .args(["--slots", slots, "--python-pool", "1", "--id", id])
        .stderr(Stdio::null())
        .spawn()
        .expect("worker")
}

const SLOW: &str = r#"apiVersion: noetl.io/v2
kind: Playbook
metadata: {name: slow, path: tests/slow}
workflow:
  - step: start
    tool: {kind: python, code: "import time\ntime.sleep(4)\nresult = {'slept': 4}"}
    next: [{step: end}]
  - step: end
    tool: {kind: python, input: {slept: "{{ start.slept }}"}, code: "result = {'after': slept * 10}"}
"#;

/// A distributed server (procs[0]) and worker A (procs[1]) running the `start` step of
/// [`SLOW`]; None when Postgres or NATS is absent (skipped loudly).
struct Running {
    schema: String,
    stream: String,
    db: String,
    _dir: tempfile::TempDir,
    procs: Procs,
    url: String,
    token: String,
    id: String,
}

fn slow_step_running(tag: &str, a_slots: &str) -> Option<Running> {
    if !(mayfly_testkit::postgres() && mayfly_testkit::nats()) {
        return None;
    }
    let schema = unique(&format!("mayfly_{tag}"));
    let stream = unique(&format!("MAYFLY_{}", tag.to_uppercase()));
    let db = format!("{PG}?schema={schema}");
    let dir = tempfile::tempdir().expect("tmp");
    let mut procs = Procs(Vec::new());
    let (server, url, token) = start_server(&db, &stream);
    let token = token.expect("first start prints the admin token");
    procs.0.push(server);
    procs.0.push(worker(&stream, "A", a_slots));
    let file = dir.path().join("slow.yaml");
    std::fs::write(&file, SLOW).expect("write");
    remote(&url, &token, &["register", file.to_str().expect("path")]);
    let id = remote(&url, &token, &["exec", "start", "tests/slow"]);
    wait_for("A to start the slow step", Duration::from_secs(30), || {
        events(&db, &id).iter().any(|e| {
            e["kind"] == "step.started"
                && e["step"] == "start"
                && e["actor"]
                    .as_str()
                    .is_some_and(|a| a.starts_with("worker:A/"))
        })
    });
    Some(Running {
        schema,
        stream,
        db,
        _dir: dir,
        procs,
        url,
        token,
        id,
    })
}

impl Running {
    /// Kill every process, then delete the stream and the schema.
    fn cleanup(self) {
        let Running {
            schema,
            stream,
            procs,
            ..
        } = self;
        drop(procs);
        teardown(&stream, &schema);
    }
}

/// The JetStream stream of queue `queue` for the log in `schema`: `{queue}_{log id}`.
async fn stream_of(queue: &str, schema: &str) -> String {
    use mayfly_store::Store;
    let store = mayfly_store::PostgresStore::connect_schema(PG, schema)
        .await
        .expect("postgres");
    format!("{queue}_{}", store.log_id().await.expect("log id"))
}

/// Delete a test's stream, its cache bucket and its schema.
fn teardown(queue: &str, schema: &str) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    rt.block_on(async {
        let stream = &stream_of(queue, schema).await;
        mayfly_queue::NatsQueue::delete(NATS, stream)
            .await
            .expect("delete stream");
        let client = async_nats::connect(NATS).await.expect("nats");
        let _ = mayfly_cache::NatsCache::delete(client, &format!("{stream}-cache")).await;
        mayfly_store::PostgresStore::drop_schema(PG, schema)
            .await
            .expect("drop schema");
    });
}

#[test]
fn a_worker_killed_mid_step_is_replaced_and_the_step_finishes_exactly_once() {
    let Some(mut r) = slow_step_running("kill", "1") else {
        return;
    };
    let procs = &mut r.procs;
    // Worker A is killed while the step sleeps.
    let a = procs.0.get_mut(1).expect("worker A");
    a.kill().expect("SIGKILL worker A");
    a.wait().expect("reaped");

    // Worker B gets the redelivered command and the execution completes.
    procs.0.push(worker(&r.stream, "B", "2"));
    completes(&r.url, &r.token, &r.id);

    let evs = events(&r.db, &r.id);
    let claims: Vec<(u64, String)> = of(&evs, "command.claimed", "start")
        .iter()
        .map(|e| {
            (
                e["attempt"].as_u64().expect("attempt"),
                e["payload"]["worker"].as_str().expect("worker").to_owned(),
            )
        })
        .collect();
    assert_eq!(claims.len(), 2, "claimed by A, then by B: {claims:?}");
    assert!(
        claims[0].0 == 1 && claims[0].1.starts_with("A/"),
        "{claims:?}"
    );
    assert!(
        claims[1].0 == 2 && claims[1].1.starts_with("B/"),
        "{claims:?}"
    );
    let finished = of(&evs, "step.finished", "start");
    assert_eq!(
        finished.len(),
        1,
        "exactly one step.finished for the command"
    );
    assert_eq!(finished[0]["attempt"], 2);
    assert_eq!(of(&evs, "command.completed", "start").len(), 1);
    assert_eq!(
        evs.last().map(|e| e["kind"].clone()),
        Some(Value::from("execution.completed"))
    );
    r.cleanup();
}

/// Messages of queue `queue` (of the log in `schema`) not yet acknowledged: waiting plus
/// delivered-but-unacked.
fn unacked(queue: &str, schema: &str) -> u64 {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    rt.block_on(async {
        let stream = stream_of(queue, schema).await;
        let js = async_nats::jetstream::new(async_nats::connect(NATS).await.expect("nats"));
        let s = js.get_stream(stream).await.expect("stream");
        let mut c: async_nats::jetstream::consumer::PullConsumer =
            s.get_consumer("workers").await.expect("consumer");
        let i = c.info().await.expect("consumer info");
        i.num_pending + i.num_ack_pending as u64
    })
}

#[test]
fn a_worker_told_to_stop_finishes_its_running_step_then_exits() {
    let Some(mut r) = slow_step_running("drain", "1") else {
        return;
    };
    let procs = &mut r.procs;
    // SIGTERM while worker A's step sleeps: A finishes it, then exits on its own.
    let a = procs.0.get_mut(1).expect("worker A");
    let pid = libc::pid_t::try_from(a.id()).expect("pid");
    // SAFETY: signals a child process this test started and still owns.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0, "SIGTERM A");
    let began = Instant::now();
    let exit = loop {
        if let Some(s) = a.try_wait().expect("try_wait") {
            break s;
        }
        assert!(
            began.elapsed() < Duration::from_secs(30),
            "worker A did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "worker A exited {exit:?}");

    let evs = events(&r.db, &r.id);
    let claims = of(&evs, "command.claimed", "start");
    assert_eq!(claims.len(), 1, "claimed once, by A: {claims:?}");
    assert!(
        claims[0]["payload"]["worker"]
            .as_str()
            .is_some_and(|w| w.starts_with("A/")),
        "{claims:?}"
    );
    let finished = of(&evs, "step.finished", "start");
    assert_eq!(finished.len(), 1, "A finished the step it was running");
    assert_eq!(finished[0]["attempt"], 1);
    assert!(
        of(&evs, "command.claimed", "end").is_empty(),
        "a draining worker takes no new block"
    );
    // A's ack reached JetStream before it exited: only the next step's command is left.
    assert_eq!(
        unacked(&r.stream, &r.schema),
        1,
        "the `end` command and nothing else"
    );

    // The next step waits for another worker.
    procs.0.push(worker(&r.stream, "B", "1"));
    completes(&r.url, &r.token, &r.id);
    let evs = events(&r.db, &r.id);
    let end_claims = of(&evs, "command.claimed", "end");
    assert_eq!(end_claims.len(), 1, "{end_claims:?}");
    assert!(
        end_claims[0]["payload"]["worker"]
            .as_str()
            .is_some_and(|w| w.starts_with("B/"))
    );
    r.cleanup();
}

/// Start a distributed server; (child, base url, admin token if this start printed one).
fn start_server(db: &str, stream: &str) -> (Child, String, Option<String>) {
    spawn_server(&[
        "--db",
        db,
        "--queue",
        NATS,
        "--queue-name",
        stream,
        "--lease",
        "2",
    ])
}

/// `mayfly server --listen 127.0.0.1:0 ARGS`, once ready: (child, base url, admin token if
/// this start printed one).
fn spawn_server(args: &[&str]) -> (Child, String, Option<String>) {
    spawn_server_in(None, args)
}

/// [`spawn_server`] with the server's working directory at `cwd`.
fn spawn_server_in(
    cwd: Option<&std::path::Path>,
    args: &[&str],
) -> (Child, String, Option<String>) {
    spawn_server_with(cwd, &[], args)
}

/// [`spawn_server_in`] with environment variables `envs`.
fn spawn_server_with(
    cwd: Option<&std::path::Path>,
    envs: &[(&str, &str)],
    args: &[&str],
) -> (Child, String, Option<String>) {
    let mut cmd = bin();
    if let Some(d) = cwd {
        cmd.current_dir(d);
    }
    cmd.envs(envs.iter().copied());
    let mut server = cmd
        .args(["server", "--listen", "127.0.0.1:0"])
        .args(args)
        .stderr(Stdio::piped())
        .spawn()
        .expect("server");
    let stderr = server.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines().map_while(Result::ok);
    let mut banner = mayfly_gateway::banner::Banner::default();
    let mut seen = Vec::new();
    for l in lines.by_ref() {
        let ready = banner.feed(&l);
        seen.push(l);
        if ready {
            break;
        }
    }
    let url = banner
        .url
        .unwrap_or_else(|| panic!("the server exited before it was ready: {seen:?}"));
    let token = banner.token;
    // Keep draining the server's stderr so it never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (server, url, token)
}

fn remote(url: &str, token: &str, args: &[&str]) -> String {
    let o = bin()
        .args(args)
        .env("MAYFLY_URL", url)
        .env("MAYFLY_TOKEN", token)
        .output()
        .expect("cli");
    let stdout = String::from_utf8_lossy(&o.stdout).trim().to_owned();
    assert!(
        o.status.success(),
        "{args:?}: {stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    stdout
}

fn status(url: &str, token: &str, id: &str) -> Value {
    serde_json::from_str(&remote(url, token, &["exec", "status", id])).expect("status")
}

/// Wait for [`SLOW`] execution `id` to complete, with its result.
fn completes(url: &str, token: &str, id: &str) {
    wait_for("the execution to complete", Duration::from_secs(60), || {
        status(url, token, id)["status"] == "completed"
    });
    assert_eq!(
        status(url, token, id)["result"],
        serde_json::json!({"after": 40})
    );
}

/// The events of `kind` for `step`.
fn of<'a>(evs: &'a [Value], kind: &str, step: &str) -> Vec<&'a Value> {
    evs.iter()
        .filter(|e| e["kind"] == kind && e["step"] == step)
        .collect()
}

#[test]
fn the_server_killed_mid_step_restarts_and_the_execution_completes_once() {
    let Some(mut r) = slow_step_running("srvkill", "2") else {
        return;
    };
    let (db, token, id, stream) = (
        r.db.clone(),
        r.token.clone(),
        r.id.clone(),
        r.stream.clone(),
    );
    let procs = &mut r.procs;

    // The server dies with the step in flight, and comes back on the same log and queue.
    let s = procs.0.get_mut(0).expect("server");
    s.kill().expect("SIGKILL server");
    s.wait().expect("reaped");
    let (server, url, again) = start_server(&db, &stream);
    assert!(again.is_none(), "the admin token is printed only once");
    procs.0[0] = server;
    completes(&url, &token, &id);
    let evs = events(&db, &id);
    let finished: Vec<&Value> = evs
        .iter()
        .filter(|e| e["kind"] == "step.finished" && e["step"] == "start")
        .collect();
    assert_eq!(
        finished.len(),
        1,
        "one step.finished for the step, whoever ran it"
    );
    let completed = evs
        .iter()
        .filter(|e| e["kind"] == "execution.completed")
        .count();
    assert_eq!(completed, 1);
    // `mayfly events` without --db reads the same log through the server's API.
    let via_api: Vec<Value> = remote(&url, &token, &["events", &id, "--json"])
        .lines()
        .map(|l| serde_json::from_str(l).expect("event json"))
        .collect();
    assert_eq!(via_api, evs);
    let o = bin()
        .args(["replay", &id, "--json", "--db", &db])
        .output()
        .expect("replay");
    assert!(o.status.success(), "the chain verifies after the crash");
    r.cleanup();
}

/// One appender per log: a second `mayfly server` on the same Postgres schema is refused
/// (after waiting out a possibly dying predecessor), and the first keeps serving.
#[test]
fn a_second_server_on_the_same_postgres_log_is_refused() {
    let Some(r) = slow_step_running("lock", "1") else {
        return;
    };
    let second = bin()
        .args(["server", "--db", &r.db, "--listen", "127.0.0.1:0"])
        .args(["--queue", NATS, "--queue-name", &r.stream, "--lease", "2"])
        .output()
        .expect("second server");
    assert!(!second.status.success(), "the second server must not start");
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        err.contains("another mayfly process is the appender of this log"),
        "{err}"
    );
    wait_for(
        "the first server to finish the execution",
        Duration::from_secs(60),
        || status(&r.url, &r.token, &r.id)["status"] == "completed",
    );
    r.cleanup();
}

/// A view-only node (`server --replica`) on the same Postgres log as the appending server:
/// it serves control-plane reads from its own tail-fed view — a write's accepted token read
/// back there (read-your-writes across processes), strong reads confirmed at the store,
/// `view_only` reported — and answers every write `not_leader`.
#[test]
fn a_replica_process_serves_reads_from_its_own_view_and_refuses_writes() {
    if !mayfly_testkit::postgres() {
        return;
    }
    let schema = unique("mayfly_replica");
    let db = format!("{PG}?schema={schema}");
    let (leader, leader_url, token) = spawn_server(&["--db", &db]);
    let token = token.expect("the leader prints the admin token");
    let (replica, replica_url, _) = spawn_server(&["--replica", "--db", &db]);
    let _procs = Procs(vec![leader, replica]);
    let dir = tempfile::tempdir().expect("tmp");
    let session = dir.path().join("session.json");
    let pool = dir.path().join("pool.yaml");
    std::fs::write(
        &pool,
        "apiVersion: mayfly.dev/v1\nkind: WorkerPool\nmetadata: {name: gpu}\nspec: {slots: 3}\n",
    )
    .expect("write");
    let cli = |url: &str, args: &[&str]| {
        bin()
            .env("MAYFLY_URL", url)
            .env("MAYFLY_TOKEN", &token)
            .env("MAYFLY_SESSION", &session)
            .args(args)
            .output()
            .expect("cli")
    };
    let o = cli(&leader_url, &["apply", "-f", pool.to_str().expect("path")]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let floors: Value =
        serde_json::from_str(&std::fs::read_to_string(&session).expect("session")).expect("json");
    let log = floors["urls"][leader_url.as_str()]
        .as_str()
        .expect("the leader's log");
    let accepted = floors["floors"][log].as_u64().expect("accepted token");
    // No --min-token: the session's floor is per log, and the replica serves the same log.
    let o = cli(&replica_url, &["get", "workerpool", "gpu"]);
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    );
    assert!(o.status.success(), "{err}");
    assert!(out.contains("gpu"), "{out}");
    // Verifying the audit chain is a read: a replica does it on its own.
    let o = cli(&replica_url, &["audit", "verify"]);
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        err.contains("ViewOnly"),
        "the replica says what it is: {err}"
    );
    let served: u64 = err
        .split_whitespace()
        .nth(2)
        .and_then(|v| v.parse().ok())
        .expect("served token");
    assert!(served >= accepted, "{err}");
    let o = cli(
        &replica_url,
        &["get", "workerpools", "--consistency", "strong"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = cli(&replica_url, &["apply", "-f", pool.to_str().expect("path")]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("not_leader"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = cli(&replica_url, &["exec", "list"]);
    assert!(o.status.success(), "reads of the log work on a replica too");
    drop(_procs);
    let rt = tokio::runtime::Runtime::new().expect("rt");
    rt.block_on(mayfly_store::PostgresStore::drop_schema(PG, &schema))
        .expect("drop schema");
}

/// A fire-and-forget `playbook` task inside a pipeline run by a remote worker: the worker
/// asks the server (over NATS, for its live claim) to start the child, which then runs on
/// a worker too.
#[test]
fn a_remote_worker_starts_a_pipeline_child_through_the_server() {
    if !(mayfly_testkit::postgres() && mayfly_testkit::nats()) {
        return;
    }
    let schema = unique("mayfly_pipechild");
    let stream = unique("MAYFLY_PIPECHILD");
    let db = format!("{PG}?schema={schema}");
    let dir = tempfile::tempdir().expect("tmp");
    let mut procs = Procs(Vec::new());
    // A server finds children in the tenant's catalog only: a file in its working
    // directory named like the child is never read.
    std::fs::create_dir_all(dir.path().join("tests")).expect("mkdir");
    std::fs::write(
        dir.path().join("tests/pipechild.yaml"),
        "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {name: pipechild}\nworkflow:\n  - step: start\n    tool: {kind: noop, result: ON-DISK}\n",
    )
    .expect("write");
    let (server, url, token) = spawn_server_in(
        Some(dir.path()),
        &[
            "--db",
            &db,
            "--queue",
            NATS,
            "--queue-name",
            &stream,
            "--lease",
            "2",
        ],
    );
    let token = token.expect("first start prints the admin token");
    procs.0.push(server);
    procs.0.push(worker(&stream, "A", "2"));
    let parent = dir.path().join("parent.yaml");
    std::fs::write(
        &parent,
        "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {name: pipeparent, path: tests/pipeparent}\nworkflow:\n  - step: start\n    tool:\n      - {name: prep, kind: python, code: \"result = {'n': 3}\"}\n      - {name: go, kind: playbook, path: pipechild, input: {n: \"{{ prep.n }}\"}}\n",
    )
    .expect("write");
    let child = dir.path().join("registered-child.yaml");
    std::fs::write(
        &child,
        "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {name: pipechild}\nworkload: {n: 0}\nworkflow:\n  - step: start\n    tool: {kind: python, input: {n: \"{{ n }}\"}, code: \"result = n * 7\"}\n",
    )
    .expect("write");
    remote(&url, &token, &["register", parent.to_str().expect("path")]);
    remote(&url, &token, &["register", child.to_str().expect("path")]);
    let id = remote(&url, &token, &["exec", "start", "tests/pipeparent"]);
    wait_for("the parent to complete", Duration::from_secs(60), || {
        status(&url, &token, &id)["status"] == "completed"
    });
    let go = status(&url, &token, &id)["result"]["go"].clone();
    assert_eq!(go["status"], "started", "{go}");
    let child = go["execution_id"].as_str().expect("child id").to_owned();
    wait_for("the child to complete", Duration::from_secs(60), || {
        status(&url, &token, &child)["status"] == "completed"
    });
    assert_eq!(
        status(&url, &token, &child)["result"],
        serde_json::json!(21)
    );
    drop(procs);
    teardown(&stream, &schema);
}

/// A worker pinned to its log (`--log-id`) needs no server to start: started first, it waits,
/// then runs the work once the server is up. A malformed id is refused at once.
#[test]
fn a_worker_pinned_to_its_log_starts_before_the_server() {
    if !(mayfly_testkit::postgres() && mayfly_testkit::nats()) {
        return;
    }
    let schema = unique("mayfly_pin");
    let queue = unique("MAYFLY_PIN");
    let db = format!("{PG}?schema={schema}");
    // The log (and its identity) exists before any server runs.
    let log = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt")
        .block_on(async {
            use mayfly_store::Store;
            mayfly_store::PostgresStore::connect_schema(PG, &schema)
                .await
                .expect("postgres")
                .log_id()
                .await
                .expect("log id")
        });
    let key = mayfly_trust::channel::ChannelKey::generate().to_base64();
    let worker_cmd = |log: &str| {
        let mut c = bin();
        c.args(["worker", "--queue", NATS, "--queue-name", &queue])
            .args(["--log-id", log, "--lease", "2", "--slots", "2"])
            .args(["--python-pool", "1", "--id", "P"])
            .env("MAYFLY_CHANNEL_KEY", &key);
        c
    };
    let o = worker_cmd("not-a-log").output().expect("worker");
    let text = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && text.contains("is not a log id"),
        "{text}"
    );
    let mut procs = Procs(Vec::new());
    procs.0.push(
        worker_cmd(&log)
            .stderr(Stdio::null())
            .spawn()
            .expect("worker"),
    );
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        procs.0[0].try_wait().expect("try_wait").is_none(),
        "the pinned worker waits for its server"
    );
    let (server, url, token) = spawn_server_with(
        None,
        &[("MAYFLY_CHANNEL_KEY", &key)],
        &[
            "--db",
            &db,
            "--queue",
            NATS,
            "--queue-name",
            &queue,
            "--lease",
            "2",
        ],
    );
    procs.0.push(server);
    let token = token.expect("admin token");
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("pin.yaml");
    std::fs::write(
        &file,
        "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {name: pin, path: tests/pin}\nworkflow:\n  - step: start\n    tool: {kind: python, code: \"result = 7\"}\n",
    )
    .expect("write");
    remote(&url, &token, &["register", file.to_str().expect("path")]);
    let id = remote(&url, &token, &["exec", "start", "tests/pin"]);
    wait_for("the execution to complete", Duration::from_secs(60), || {
        status(&url, &token, &id)["status"] == "completed"
    });
    let evs = events(&db, &id);
    let claims = of(&evs, "command.claimed", "start");
    assert!(
        claims.iter().all(|e| e["payload"]["worker"]
            .as_str()
            .is_some_and(|w| w.starts_with("P/"))),
        "{claims:?}"
    );
    drop(procs);
    teardown(&queue, &schema);
}
