//! The actor dataplane end to end, all real processes: a `mayfly server` with its provider
//! listener, two `mayfly provider serve` processes enrolled through the CLI (mTLS both
//! ways), actors declared with `mayfly apply`, reached through the gateway's router —
//! scale from zero via the golden snapshot, a move with the old epoch refused, a provider
//! killed with its lease expiring and the actor restored elsewhere from its last snapshot,
//! idle suspension — and the conformance CLI against a live provider.

mod common;

use common::{bin, out, start_server_banner};
use serde_json::{Value, json};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A provider process: stopped with SIGINT (it stops its actors), then killed.
struct ProviderProc(Option<Child>);

impl ProviderProc {
    /// A crash: SIGKILL, its actors left behind as orphans.
    fn crash(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ProviderProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = Command::new("kill")
                .arg("-INT")
                .arg(c.id().to_string())
                .status();
            let end = Instant::now() + Duration::from_secs(10);
            while Instant::now() < end {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port")
}

fn wait_for(what: &str, limit: Duration, f: impl FnMut() -> bool) {
    wait_for_or(what, limit, String::new, f)
}

/// [`wait_for`], telling `why()` (logs) when it times out.
fn wait_for_or(
    what: &str,
    limit: Duration,
    why: impl FnOnce() -> String,
    mut f: impl FnMut() -> bool,
) {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}\n{}", why());
}

struct Env<'a> {
    home: &'a Path,
    url: String,
    admin: String,
}

impl Env<'_> {
    fn cli(&self, token: &str, args: &[&str]) -> Output {
        bin()
            .env("MAYFLY_HOME", self.home)
            .env("MAYFLY_URL", &self.url)
            .env("MAYFLY_TOKEN", token)
            .args(args)
            .output()
            .expect("cli")
    }

    fn json(&self, token: &str, args: &[&str]) -> Value {
        let o = self.cli(token, args);
        assert!(o.status.success(), "{args:?}: {}", out(&o));
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", out(&o)))
    }

    fn provider(&self, id: &str, labels: &[&str]) -> (ProviderProc, u16) {
        self.provider_of(id, "process", labels)
    }

    fn provider_of(&self, id: &str, class: &str, labels: &[&str]) -> (ProviderProc, u16) {
        self.provider_with(id, class, labels, &[])
    }

    /// Enroll provider `id` and serve it with `extra` flags.
    fn provider_with(
        &self,
        id: &str,
        class: &str,
        labels: &[&str],
        extra: &[&str],
    ) -> (ProviderProc, u16) {
        let port = free_port();
        let dir = self.home.join(id);
        let o = self.cli(
            &self.admin,
            &[
                "provider",
                "enroll",
                "--id",
                id,
                "--endpoint",
                &format!("https://127.0.0.1:{port}"),
                "--dir",
                dir.to_str().expect("dir"),
            ],
        );
        assert!(o.status.success(), "enroll: {}", out(&o));
        (self.serve_with(id, class, labels, extra), port)
    }

    /// Start (or restart) the enrolled provider `id`.
    fn serve(&self, id: &str, class: &str, labels: &[&str]) -> ProviderProc {
        self.serve_with(id, class, labels, &[])
    }

    fn serve_with(&self, id: &str, class: &str, labels: &[&str], extra: &[&str]) -> ProviderProc {
        let dir = self.home.join(id);
        let mut cmd = bin();
        cmd.env("MAYFLY_HOME", self.home)
            .args(["provider", "serve", "--slots", "4", "--heartbeat-ms", "250"])
            .args(["--class", class])
            .args(extra)
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::options()
                    .create(true)
                    .append(true)
                    .open(self.home.join(format!("{id}.log")))
                    .expect("provider log"),
            );
        for l in labels {
            cmd.args(["--label", l]);
        }
        ProviderProc(Some(cmd.spawn().expect("provider")))
    }

    fn actor(&self, token: &str, name: &str) -> Value {
        let v = self.json(token, &["actors", "list"]);
        v["actors"]
            .as_array()
            .and_then(|a| a.iter().find(|x| x["name"] == name).cloned())
            .unwrap_or(Value::Null)
    }
}

fn call(
    http: &reqwest::blocking::Client,
    url: &str,
    token: &str,
    method: reqwest::Method,
    actor: &str,
    epoch: Option<u64>,
) -> (u16, Option<u64>, Value) {
    let mut rb = http
        .request(method, format!("{url}/actors/{actor}/"))
        .bearer_auth(token);
    if let Some(e) = epoch {
        rb = rb.header("x-mayfly-epoch", e.to_string());
    }
    let r = rb.send().expect("route");
    let status = r.status().as_u16();
    let epoch = r
        .headers()
        .get("x-mayfly-epoch")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let body: Value = r.json().unwrap_or(Value::Null);
    (status, epoch, body)
}

#[test]
fn actors_scale_from_zero_move_survive_a_lost_provider_and_idle_out() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().expect("tmp");
    let home = dir.path();
    // A credential in acme's keychain, set before the server holds the log.
    const PLANTED: &str = "planted-actor-secret-5e1f";
    let o = bin()
        .env("MAYFLY_HOME", home)
        .args(["keychain", "set", "api", "--tenant", "acme", "--field"])
        .arg(format!("token={PLANTED}"))
        .arg("--db")
        .arg(home.join("m.db"))
        .output()
        .expect("keychain");
    assert!(o.status.success(), "{}", out(&o));
    let mut server = bin();
    server
        .env("MAYFLY_HOME", home)
        .args([
            "server",
            "--listen",
            "127.0.0.1:0",
            "--provider-listen",
            "127.0.0.1:0",
            "--lease-ms",
            "2500",
        ])
        .arg("--db")
        .arg(home.join("m.db"))
        .arg("--snapshots")
        .arg(home.join("snapshots"));
    let (_server, banner) = start_server_banner(&mut server);
    let env = Env {
        home,
        url: banner.url.expect("url"),
        admin: banner.token.expect("token"),
    };
    let token = |tenant: &str, role: &str| {
        let o = env.cli(
            &env.admin,
            &["token", "--role", role, "--name", "t", "--tenant", tenant],
        );
        assert!(o.status.success(), "{}", out(&o));
        String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .last()
            .expect("token")
            .to_owned()
    };
    let acme = token("acme", "operator");
    let other = token("beta", "operator");

    // A provider endpoint outside the allowed networks is refused at enrollment.
    let o = env.cli(
        &env.admin,
        &[
            "provider",
            "enroll",
            "--id",
            "evil",
            "--endpoint",
            "https://169.254.169.254:443",
            "--dir",
            home.join("evil").to_str().expect("dir"),
        ],
    );
    assert!(
        !o.status.success() && out(&o).contains("outside the allowed networks"),
        "{}",
        out(&o)
    );
    // Enrollment needs a system admin.
    let o = env.cli(
        &acme,
        &[
            "provider",
            "enroll",
            "--id",
            "x",
            "--endpoint",
            "https://127.0.0.1:1",
            "--dir",
            "/tmp/x",
        ],
    );
    assert!(
        !o.status.success() && out(&o).contains("403"),
        "{}",
        out(&o)
    );

    let (p1, p1_port) = env.provider("p1", &["zone=a"]);
    let (p2, p2_port) = env.provider("p2", &["zone=b"]);
    let logs =
        |id: &str| std::fs::read_to_string(home.join(format!("{id}.log"))).unwrap_or_default();
    wait_for_or(
        "two live workers",
        Duration::from_secs(30),
        || logs("p1") + &logs("p2"),
        || {
            let v = env.json(&env.admin, &["actors", "providers"]);
            v["workers"].as_array().is_some_and(|w| {
                w.len() == 2
                    && w.iter()
                        .all(|x| x["lease_ms_left"].as_u64().unwrap_or(0) > 0)
            })
        },
    );

    let workload = mayfly_actors::conformance::process_workload();
    let manifests = [
        json!({"apiVersion": "mayfly.dev/v1", "kind": "ActorTemplate",
               "metadata": {"name": "counter", "tenant": "acme"},
               "spec": {"workload": workload, "idleTimeoutMs": 0,
                        "secrets": {"token": "api.token"},
                        "checkpoint": {"onPause": ["data"], "onCommit": ["data"]}}}),
        json!({"apiVersion": "mayfly.dev/v1", "kind": "ActorTemplate",
               "metadata": {"name": "sleepy", "tenant": "acme"},
               "spec": {"workload": workload, "idleTimeoutMs": 1500}}),
        json!({"apiVersion": "mayfly.dev/v1", "kind": "Actor",
               "metadata": {"name": "c1", "tenant": "acme"}, "spec": {"template": "counter"}}),
        json!({"apiVersion": "mayfly.dev/v1", "kind": "Actor",
               "metadata": {"name": "s1", "tenant": "acme"}, "spec": {"template": "sleepy"}}),
    ];
    let text: Vec<String> = manifests.iter().map(|m| m.to_string()).collect();
    let file = home.join("actors.yaml");
    std::fs::write(&file, text.join("\n---\n")).expect("write");
    let o = env.cli(&env.admin, &["apply", "-f", file.to_str().expect("f")]);
    assert!(o.status.success(), "{}", out(&o));

    let http = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .expect("http");
    // Scale from zero: the first request takes the golden snapshot, restores it into c1.
    let (st, epoch, v) = call(&http, &env.url, &acme, reqwest::Method::POST, "c1", None);
    assert_eq!(st, 200, "{v}");
    assert_eq!(epoch, Some(1));
    assert_eq!(v["counter"], 1);
    let identity1 = v["identity"].as_str().expect("identity").to_owned();
    assert!(
        identity1.starts_with("acme/c1@1."),
        "identity delivered fresh: {identity1}"
    );
    let planted_sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(PLANTED.as_bytes()))
    };
    assert_eq!(
        v["secret_sha256"],
        planted_sha.as_str(),
        "the keychain secret was delivered"
    );
    for _ in 0..2 {
        call(&http, &env.url, &acme, reqwest::Method::POST, "c1", None);
    }
    let a = env.actor(&acme, "c1");
    assert_eq!(a["phase"], "Running", "{a}");
    let first_worker = a["worker"].as_str().expect("worker").to_owned();
    let t = env.json(&acme, &["get", "actortemplate", "counter", "--json"]);
    assert!(t.to_string().contains("GoldenRecorded"), "{t}");
    // Another tenant does not see, and cannot reach, acme's actor.
    let (st, _, _) = call(&http, &env.url, &other, reqwest::Method::GET, "c1", None);
    assert_eq!(st, 404);
    // The path and query reach the actor; a path that climbs (`..`, even percent-encoded,
    // sent raw) is refused before anything is forwarded.
    let r = http
        .get(format!("{}/actors/c1/items/7?page=2", env.url))
        .bearer_auth(&acme)
        .send()
        .expect("get");
    let body: Value = r.json().expect("json");
    assert_eq!(body["path"], "/items/7?page=2", "{body}");
    let raw = {
        use std::io::{Read, Write};
        let host = env.url.trim_start_matches("http://").to_owned();
        let mut s = std::net::TcpStream::connect(&host).expect("connect");
        write!(
            s,
            "POST /actors/c1/%2e%2e/%2e%2e/%2e%2e/%2e%2e/v1/ops HTTP/1.1\r\nhost: {host}\r\nauthorization: Bearer {acme}\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{{}}"
        )
        .expect("write");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    };
    assert!(raw.starts_with("HTTP/1.1 400"), "{raw}");
    // Another tenant's actor of the same name is its own actor, on the same providers.
    let beta_docs = [
        json!({"apiVersion": "mayfly.dev/v1", "kind": "ActorTemplate",
               "metadata": {"name": "counter", "tenant": "beta"},
               "spec": {"workload": mayfly_actors::conformance::process_workload(), "idleTimeoutMs": 0}}),
        json!({"apiVersion": "mayfly.dev/v1", "kind": "Actor",
               "metadata": {"name": "c1", "tenant": "beta"}, "spec": {"template": "counter"}}),
    ];
    let beta_file = home.join("beta.yaml");
    let text: Vec<String> = beta_docs.iter().map(|m| m.to_string()).collect();
    std::fs::write(&beta_file, text.join("\n---\n")).expect("write");
    let o = env.cli(&env.admin, &["apply", "-f", beta_file.to_str().expect("f")]);
    assert!(o.status.success(), "{}", out(&o));
    let (st, _, v) = call(&http, &env.url, &other, reqwest::Method::POST, "c1", None);
    assert_eq!((st, v["counter"].clone()), (200, json!(1)), "{v}");
    let (_, _, v) = call(&http, &env.url, &acme, reqwest::Method::GET, "c1", None);
    assert_eq!(v["counter"], 3, "acme's c1 is untouched by beta's");
    env.json(&other, &["actors", "suspend", "c1"]);

    // Move: checkpoint → epoch 2 → restore on the other worker; the data comes along.
    let m = env.json(&acme, &["actors", "move", "c1"]);
    assert_eq!(m["epoch"], 2, "{m}");
    assert_ne!(m["worker"], first_worker.as_str());
    let (st, epoch, v) = call(&http, &env.url, &acme, reqwest::Method::GET, "c1", None);
    assert_eq!((st, epoch), (200, Some(2)), "{v}");
    assert_eq!(v["counter"], 3);
    // A late request pinned to the old epoch is refused by the router.
    let (st, _, v) = call(&http, &env.url, &acme, reqwest::Method::GET, "c1", Some(1));
    assert_eq!(st, 409, "{v}");
    assert_eq!(v["code"], "stale_epoch");
    // The credential path: the old epoch's identity is refused, the current one served.
    let broker = |identity: &str| {
        let r = http
            .post(format!("{}/actor-credentials", env.url))
            .header("authorization", format!("Actor {identity}"))
            .send()
            .expect("broker");
        (
            r.status().as_u16(),
            r.json::<Value>().unwrap_or(Value::Null),
        )
    };
    let (st, b) = broker(&identity1);
    assert_eq!((st, b["code"].as_str()), (409, Some("stale_epoch")), "{b}");
    let (_, _, now) = call(&http, &env.url, &acme, reqwest::Method::GET, "c1", None);
    let identity2 = now["identity"].as_str().expect("identity").to_owned();
    assert!(identity2.starts_with("acme/c1@2."), "{identity2}");
    assert_eq!(
        now["secret_sha256"],
        planted_sha.as_str(),
        "secrets delivered on restore"
    );
    let (st, b) = broker(&identity2);
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["secrets"]["token"], PLANTED);
    let forged = format!("{}x", identity2.trim_end_matches('='));
    assert_eq!(broker(&forged).0, 401);
    assert_eq!(broker("acme/c1@2.AAAA").0, 401);
    let snaps = env.json(&acme, &["actors", "snapshots", "c1"]);
    assert!(!snaps["snapshots"].as_array().expect("s").is_empty());

    // One more write after the move's snapshot, then the hosting provider dies.
    let (_, _, v) = call(&http, &env.url, &acme, reqwest::Method::POST, "c1", None);
    assert_eq!(v["counter"], 4);
    let hosting = env.actor(&acme, "c1")["worker"]
        .as_str()
        .expect("w")
        .to_owned();
    let (mut p1, mut p2) = (p1, p2);
    let (crashed, survivor, survivor_port) = if hosting.starts_with("p1/") {
        p1.crash();
        ("p1", p2, p2_port)
    } else {
        p2.crash();
        ("p2", p1, p1_port)
    };
    // Its contained actors die with it: nothing keeps serving, or writing, for an epoch
    // the control plane is about to give to another worker.
    let sandbox = home.join(crashed).join("sandbox");
    let recorded = actor_groups(&sandbox);
    assert!(!recorded.is_empty(), "the crash left its pgid records");
    wait_for(
        "the crashed provider's actors to die with it",
        Duration::from_secs(5),
        || recorded.iter().all(|p| !alive(*p)),
    );
    wait_for(
        "the lost worker's actor to be fenced",
        Duration::from_secs(20),
        || {
            let a = env.actor(&acme, "c1");
            a["phase"] == "Suspended" && a["reason"] == "WorkerLost"
        },
    );
    let a = env.actor(&acme, "c1");
    assert_eq!(a["epoch"], 3, "a lost worker raises the epoch: {a}");
    assert!(a.get("worker").is_none_or(Value::is_null), "{a}");
    // The next request restores it elsewhere from its last snapshot (taken at the move).
    let (st, epoch, v) = call(&http, &env.url, &acme, reqwest::Method::GET, "c1", None);
    assert_eq!((st, epoch), (200, Some(4)), "{v}");
    assert_eq!(v["counter"], 3, "restored from the last external snapshot");

    // Idle: s1 runs, then is checkpointed and its slot released; it comes back on demand.
    let (st, _, _) = call(&http, &env.url, &acme, reqwest::Method::POST, "s1", None);
    assert_eq!(st, 200);
    wait_for("s1 to idle out", Duration::from_secs(20), || {
        let a = env.actor(&acme, "s1");
        a["phase"] == "Suspended" && a["reason"] == "Idle"
    });
    assert!(env.actor(&acme, "s1")["snapshot"].is_string());
    let (st, _, v) = call(&http, &env.url, &acme, reqwest::Method::GET, "s1", None);
    assert_eq!((st, v["counter"].clone()), (200, json!(1)), "{v}");

    // An explicit suspend: checkpointed, slot released (nothing else moves under the
    // conformance run below).
    let v = env.json(&acme, &["actors", "suspend", "s1"]);
    assert!(
        v["snapshot"]["digest"].is_string() || env.actor(&acme, "s1")["phase"] == "Suspended",
        "{v}"
    );
    assert_eq!(env.actor(&acme, "s1")["phase"], "Suspended");

    // A wasm actor: its module uploaded by digest, a wasm provider, scale from zero through
    // the golden snapshot (its `init` ran once), Full-scope suspend and restore.
    let (_p3, _) = env.provider_of("p3", "wasm", &[]);
    let wat = home.join("counter.wat");
    std::fs::write(&wat, mayfly_actors::conformance::WASM_ACTOR).expect("write");
    let up = env.json(
        &env.admin,
        &["actors", "upload-module", wat.to_str().expect("p")],
    );
    assert!(up["digest"].is_string(), "{up}");
    // The module lives in the tenant that uploads it: acme's author uploads acme's.
    let author = token("acme", "author");
    let up = env.json(
        &author,
        &["actors", "upload-module", wat.to_str().expect("p")],
    );
    let wasm = [
        json!({"apiVersion": "mayfly.dev/v1", "kind": "ActorTemplate",
               "metadata": {"name": "wcounter", "tenant": "acme"},
               "spec": {"workload": {"class": "wasm", "module": up["digest"]}, "idleTimeoutMs": 0}}),
        json!({"apiVersion": "mayfly.dev/v1", "kind": "Actor",
               "metadata": {"name": "w1", "tenant": "acme"}, "spec": {"template": "wcounter"}}),
    ];
    let text: Vec<String> = wasm.iter().map(|m| m.to_string()).collect();
    std::fs::write(&file, text.join("\n---\n")).expect("write");
    let o = env.cli(&env.admin, &["apply", "-f", file.to_str().expect("f")]);
    assert!(o.status.success(), "{}", out(&o));
    wait_for("the wasm worker", Duration::from_secs(30), || {
        let v = env.json(&env.admin, &["actors", "providers"]);
        v["workers"].as_array().is_some_and(|w| {
            w.iter().any(|x| {
                x["worker"]["class"] == "wasm" && x["lease_ms_left"].as_u64().unwrap_or(0) > 0
            })
        })
    });
    let (st, epoch, v) = call(&http, &env.url, &acme, reqwest::Method::POST, "w1", None);
    assert_eq!((st, epoch), (200, Some(1)), "{v}");
    assert_eq!(v["counter"], 1);
    assert!(
        v["identity"]
            .as_str()
            .is_some_and(|i| i.starts_with("acme/w1@1.")),
        "{v}"
    );
    let boot = v["boot"].clone();
    call(&http, &env.url, &acme, reqwest::Method::POST, "w1", None);
    env.json(&acme, &["actors", "suspend", "w1"]);
    let (st, epoch, v) = call(&http, &env.url, &acme, reqwest::Method::GET, "w1", None);
    assert_eq!((st, epoch), (200, Some(2)), "{v}");
    assert_eq!(v["counter"], 2, "linear memory came back");
    assert_eq!(
        v["boot"], boot,
        "globals came back (init did not run again)"
    );
    assert!(
        v["identity"]
            .as_str()
            .is_some_and(|i| i.starts_with("acme/w1@2.")),
        "identity fresh on restore: {v}"
    );

    // The control stream with all of this verifies end to end.
    let o = env.cli(&env.admin, &["audit", "verify"]);
    assert!(o.status.success(), "{}", out(&o));
    // The planted secret is nowhere at rest: not in the log (events, audit), not in any
    // snapshot blob, not in a provider's journal or files — only in the running process
    // actor's run dir, which is its delivery.
    let mut leaks = Vec::new();
    let mut stack = vec![home.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p) {
                let plain = zstd::decode_all(&bytes[..]).unwrap_or_default();
                if [&bytes[..], &plain[..]]
                    .iter()
                    .any(|h| h.windows(PLANTED.len()).any(|w| w == PLANTED.as_bytes()))
                {
                    leaks.push(p);
                }
            }
        }
    }
    leaks.retain(|p| !p.to_string_lossy().contains("/run/secrets/"));
    assert!(leaks.is_empty(), "the secret is at rest in {leaks:?}");

    // The conformance CLI passes against the surviving provider (as this control plane).
    let o = bin()
        .env("MAYFLY_HOME", home)
        .args(["provider", "conformance", "--endpoint"])
        .arg(format!("https://127.0.0.1:{survivor_port}"))
        .arg("--snapshot-dir")
        .arg(home.join("snapshots"))
        .output()
        .expect("conformance");
    assert!(o.status.success(), "{}", out(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(" 0 failed"),
        "{}",
        out(&o)
    );
    // Without the control plane's identity the provider admits nobody.
    let stranger = tempfile::tempdir().expect("tmp");
    std::fs::create_dir_all(stranger.path().join("pki")).expect("mkdir");
    let ca = mayfly_pki::Ca::load_or_create(&stranger.path().join("pki")).expect("ca");
    ca.issue(&[], mayfly_pki::Usage::Control, "x")
        .expect("issue")
        .save(&stranger.path().join("pki"), "control")
        .expect("save");
    let o = bin()
        .env("MAYFLY_HOME", stranger.path())
        .args(["provider", "conformance", "--endpoint"])
        .arg(format!("https://127.0.0.1:{survivor_port}"))
        .output()
        .expect("conformance");
    assert!(
        !o.status.success(),
        "a foreign identity passed: {}",
        out(&o)
    );
    drop(survivor);
    // The crashed provider, restarted, clears the records its crash left.
    let restarted = env.serve(crashed, "process", &[]);
    wait_for(
        "the crash's records cleared",
        Duration::from_secs(20),
        || actor_groups(&sandbox).is_empty(),
    );
    drop(restarted);
}

/// Process groups a process provider recorded under `sandbox` (`actors/*/*/pgid`).
fn actor_groups(sandbox: &Path) -> Vec<i32> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(sandbox.join("actors"))
        .into_iter()
        .flatten()
        .flatten()
    {
        for a in std::fs::read_dir(t.path()).into_iter().flatten().flatten() {
            if let Ok(text) = std::fs::read_to_string(a.path().join("pgid"))
                && let Some(p) = text.split_whitespace().next().and_then(|p| p.parse().ok())
            {
                out.push(p);
            }
        }
    }
    out
}

/// Whether a process (not a zombie) is `pid`.
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

/// Processes whose environment names actor `actor` (the sandbox, its keeper, the actor).
fn processes_of(actor: &str) -> usize {
    let want = format!("MAYFLY_ACTOR={actor}");
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            std::fs::read(e.path().join("environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|kv| kv == want.as_bytes()))
        })
        .count()
}

/// A provider SIGKILLed while an actor is starting (before it is ready, before anything
/// about it is journaled) leaves no process behind — contained or not.
#[test]
fn a_provider_killed_during_an_actor_start_leaves_no_orphan() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    if !mayfly_testkit::bubblewrap() {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let home = dir.path();
    let mut server = bin();
    server
        .env("MAYFLY_HOME", home)
        .args([
            "server",
            "--listen",
            "127.0.0.1:0",
            "--provider-listen",
            "127.0.0.1:0",
        ])
        .arg("--db")
        .arg(home.join("m.db"));
    let (_server, banner) = start_server_banner(&mut server);
    let env = Env {
        home,
        url: banner.url.expect("url"),
        admin: banner.token.expect("token"),
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    for (i, mode) in ["on", "off"].into_iter().enumerate() {
        let id = format!("p{i}");
        let (mut provider, port) = env.provider_with(&id, "process", &[], &["--sandbox", mode]);
        let pki = home.join("pki");
        let ca = std::fs::read_to_string(pki.join("ca.crt")).expect("ca");
        let identity = mayfly_pki::Identity::load(&pki, "control").expect("control identity");
        let client = mayfly_actors::client::ProviderClient::new(
            format!("https://127.0.0.1:{port}"),
            mayfly_pki::client(&ca, &identity, None).expect("client"),
        );
        wait_for("the provider to answer", Duration::from_secs(30), || {
            rt.block_on(client.info()).is_ok()
        });
        let actor = format!("slow-{mode}");
        let req = mayfly_actor_api::OpRequest {
            op_id: format!("start-{mode}"),
            actor: actor.clone(),
            tenant: "t1".into(),
            assignment_epoch: 1,
            op: mayfly_actor_api::Op::Assign {
                desired: mayfly_actor_api::Desired::Running,
                spec: mayfly_actor_api::ActorSpec {
                    actor: actor.clone(),
                    tenant: "t1".into(),
                    template: "tpl".into(),
                    // Never ready: the start is in its readiness wait when the kill lands.
                    workload: mayfly_actor_api::Workload::Process {
                        command: "sleep".into(),
                        args: vec!["120".into()],
                        env: Default::default(),
                        durable_dirs: vec![],
                        readiness: mayfly_actor_api::Readiness {
                            path: "/ready".into(),
                            deadline_ms: 60_000,
                        },
                    },
                },
            },
            delivery: None,
            grant: None,
        };
        let submit = {
            let client = client.clone();
            rt.spawn(async move { client.submit(&req, Duration::ZERO).await })
        };
        wait_for("the actor to be starting", Duration::from_secs(30), || {
            processes_of(&actor) > 0
        });
        provider.crash();
        wait_for(
            &format!("no process of {actor} (sandbox {mode})"),
            Duration::from_secs(5),
            || processes_of(&actor) == 0,
        );
        submit.abort();
        // Restarted, it clears the record of the start it never finished.
        let restarted = env.serve_with(&id, "process", &[], &["--sandbox", mode]);
        wait_for(
            "the provider to answer again",
            Duration::from_secs(30),
            || rt.block_on(client.info()).is_ok(),
        );
        assert!(actor_groups(&home.join(&id).join("sandbox")).is_empty());
        drop(restarted);
    }
}

/// A server's snapshot store on NATS authenticates with the NATS credential flags (no
/// `--queue` needed): with an nkey seed it starts and a module upload lands in the bucket;
/// without credentials it does not start, and says why.
#[test]
fn a_nats_snapshot_store_takes_the_nats_credential_flags() {
    let user = nkeys::KeyPair::new_user();
    let Some(nats) = mayfly_testkit::nats_server(&format!(
        "authorization {{ users = [ {{nkey: {}}} ] }}",
        user.public_key()
    )) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tmp");
    let home = dir.path();
    let seed = home.join("user.nk");
    std::fs::write(&seed, user.seed().expect("seed")).expect("write");
    let url = format!("nats://127.0.0.1:{}", nats.port);
    let server = |with_seed: bool| {
        let mut c = bin();
        c.env("MAYFLY_HOME", home)
            .args(["server", "--listen", "127.0.0.1:0"])
            .args(["--provider-listen", "127.0.0.1:0", "--snapshots", &url])
            .arg("--db")
            .arg(home.join(if with_seed { "m.db" } else { "refused.db" }));
        if with_seed {
            c.arg("--nats-nkey").arg(&seed);
        }
        c
    };
    // No credentials: the store cannot be opened, the server does not start.
    let o = server(false)
        .stdout(Stdio::null())
        .output()
        .expect("server");
    assert!(!o.status.success());
    let text = String::from_utf8_lossy(&o.stderr).to_lowercase();
    assert!(text.contains("auth"), "{text}");
    let (_server, banner) = start_server_banner(&mut server(true));
    let o = bin()
        .env("MAYFLY_HOME", home)
        .env("MAYFLY_URL", banner.url.expect("url"))
        .env("MAYFLY_TOKEN", banner.token.expect("token"))
        .args(["actors", "upload-module"])
        .arg({
            let wat = home.join("m.wat");
            std::fs::write(&wat, mayfly_actors::conformance::WASM_ACTOR).expect("write");
            wat
        })
        .output()
        .expect("upload");
    assert!(o.status.success(), "{}", out(&o));
    let up: Value = serde_json::from_slice(&o.stdout).expect("json");
    let digest = up["digest"].as_str().expect("digest").to_owned();
    // In the bucket, read back with the same credentials.
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let found = rt.block_on(async {
        let client = mayfly_queue::NatsConnect {
            url: url.clone(),
            nkey: Some(seed.clone()),
            ..Default::default()
        }
        .connect()
        .await
        .expect("connect");
        let cache = mayfly_cache::NatsCache::open(client, "mayfly-snapshots")
            .await
            .expect("bucket");
        use mayfly_cache::Cache;
        cache.get("system", &digest).await.expect("get")
    });
    assert!(found.is_some(), "the module is not in the NATS bucket");
}
