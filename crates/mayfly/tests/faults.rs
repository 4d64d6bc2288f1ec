//! Failure semantics through the real interface: a `mayfly server` whose Postgres log sits
//! behind a fault-injecting TCP proxy (`mayfly_testkit::fault`). For a cut and a blackholed
//! store, each request class gets a stable answer within the bound — never a 500, never a
//! hang — authentication keeps working from tokens verified before, and everything
//! answers again once the store is back.

mod common;

use common::{bin, start_server};
use mayfly_testkit::fault::{Fault, FaultProxy};
use serde_json::Value;
use std::time::{Duration, Instant};

const PG: &str = "postgres://postgres@127.0.0.1:5432/test";

/// A GET with `token`: status, the problem's code (or the body), and how long it took.
fn get(url: &str, token: &str, path: &str) -> (u16, Value, Duration) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let began = Instant::now();
    let r = reqwest::blocking::Client::new()
        .get(format!("{url}{path}"))
        .bearer_auth(token)
        .timeout(Duration::from_secs(30))
        .send()
        .expect("the server answers");
    let status = r.status().as_u16();
    let body: Value = r.json().unwrap_or(Value::Null);
    (status, body, began.elapsed())
}

#[test]
fn a_store_outage_answers_root_unavailable_within_the_bound_and_heals() {
    if !mayfly_testkit::postgres() {
        return;
    }
    let proxy = FaultProxy::start("127.0.0.1:5432".parse().expect("addr"));
    let schema = mayfly_testkit::unique("mayfly_faults");
    let db = format!(
        "postgres://postgres@127.0.0.1:{}/test?schema={schema}",
        proxy.port()
    );
    let dir = tempfile::tempdir().expect("tmp");
    let mut cmd = bin();
    cmd.env("MAYFLY_HOME", dir.path())
        .args(["server", "--listen", "127.0.0.1:0", "--db", &db])
        .args(["--store-timeout-ms", "1500"]);
    let (mut server, url, token) = start_server(cmd);
    let (st, body, _) = get(&url, &token, "/v1/executions");
    assert_eq!(st, 200, "{body}");

    for fault in [Fault::Cut, Fault::Blackhole] {
        proxy.set(fault);
        // A store read: 503 root_unavailable, within the bound (1.5 s) plus slack; the
        // token was verified before the fault, so the caller is still authenticated.
        for path in ["/v1/executions", "/v1/playbooks", "/v1/audit"] {
            let (st, body, took) = get(&url, &token, path);
            assert_eq!(
                (st, body["code"].as_str()),
                (503, Some("root_unavailable")),
                "{fault:?} {path}: {body}"
            );
            assert!(
                took < Duration::from_millis(2_500),
                "{fault:?} {path}: answered after {took:?}"
            );
        }
        // Control-plane reads come from the node's view: strong needs the store and says
        // so, within its bound; best_effort is then served, flagged fail-open with the
        // reason (and the marker is recorded once the store is back, below).
        let (st, body, took) = get(&url, &token, "/v1/objects/environments?consistency=strong");
        assert_eq!(
            (st, body["code"].as_str()),
            (503, Some("root_unavailable")),
            "{fault:?} strong: {body}"
        );
        assert!(took < Duration::from_millis(2_500), "{fault:?}: {took:?}");
        let (st, body, _) = get(&url, &token, "/v1/objects/environments");
        assert_eq!(st, 200, "{fault:?} best_effort: {body}");
        assert_eq!(
            body["fail_open"]["degraded_mode"], "root_unavailable",
            "{fault:?} best_effort: {body}"
        );
        assert_eq!(
            body["freshness"]["degraded_mode"], "root_unavailable",
            "{body}"
        );
        // The status page answers, and says what is down.
        let (st, body, took) = get(&url, &token, "/v1/status");
        assert_eq!(st, 200, "{fault:?}: {body}");
        assert_eq!(body["state"], "degraded", "{fault:?}: {body}");
        assert_eq!(body["down"], serde_json::json!(["store"]), "{body}");
        assert!(took < Duration::from_millis(2_500), "{fault:?}: {took:?}");
        // Liveness is the process; readiness names the store.
        let (st, body, _) = get(&url, "", "/healthz");
        assert_eq!(
            (st, body["status"].as_str()),
            (200, Some("alive")),
            "{body}"
        );
        let (st, body, took) = get(&url, "", "/readyz");
        assert_eq!(
            (st, body["status"].as_str(), body["store"].as_str()),
            (503, Some("degraded"), Some("down")),
            "{fault:?}: {body}"
        );
        assert!(took < Duration::from_millis(2_500), "{fault:?}: {took:?}");
        // A token the store never verified cannot be checked: 503, not 401 or 500.
        let (st, body, _) = get(&url, "never-seen-token", "/v1/executions");
        assert_eq!(
            (st, body["code"].as_str()),
            (503, Some("root_unavailable")),
            "{fault:?}: {body}"
        );
        // Back: answers again (the pool reconnects).
        proxy.set(Fault::Pass);
        let healed = Instant::now();
        loop {
            let (st, body, _) = get(&url, &token, "/v1/executions");
            let (ready, _, _) = get(&url, "", "/readyz");
            if st == 200 && ready == 200 {
                break;
            }
            assert!(
                healed.elapsed() < Duration::from_secs(20),
                "{fault:?}: still {st} {body} after the store came back"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    // The fail-open markers of reads served during the outages reached the audit once the
    // store was back: durable, not only on stderr.
    let marked = Instant::now();
    loop {
        let (st, body, _) = get(&url, &token, "/v1/audit?limit=1000");
        assert_eq!(st, 200, "{body}");
        let n = body["audit"]
            .as_array()
            .map(|a| a.iter().filter(|r| r["outcome"] == "fail_open").count())
            .unwrap_or(0);
        if n >= 2 {
            break;
        }
        assert!(
            marked.elapsed() < Duration::from_secs(30),
            "{n} fail_open markers stored: {body}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    server.kill().expect("stop");
    server.wait().expect("wait");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    rt.block_on(mayfly_store::PostgresStore::drop_schema(PG, &schema))
        .expect("drop schema");
}
