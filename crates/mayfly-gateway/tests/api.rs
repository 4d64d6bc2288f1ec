//! The gateway over real HTTP: authentication and tenant scoping, problem+json errors,
//! catalog registration, starting and following executions (status, events, SSE resume).

use mayfly_gateway::{Gateway, bootstrap_admin, router};
use mayfly_runtime::{Runtime, RuntimeConfig};
use mayfly_store::{SqliteStore, Store};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

struct Server {
    store: Arc<dyn Store>,
    view: mayfly_control::View,
    base: String,
    admin: String,
    _rt: Runtime,
    _dir: tempfile::TempDir,
    http: reqwest::Client,
}

async fn server() -> Server {
    let dir = tempfile::tempdir().expect("tmp");
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(dir.path().join("m.db"))
            .await
            .expect("store"),
    );
    server_on(store, dir).await
}

async fn server_on(store: Arc<dyn Store>, dir: tempfile::TempDir) -> Server {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = Runtime::start(store.clone(), RuntimeConfig::default()).expect("runtime");
    let admin = bootstrap_admin(store.as_ref())
        .await
        .expect("bootstrap")
        .expect("first start mints a token");
    assert!(
        bootstrap_admin(store.as_ref())
            .await
            .expect("again")
            .is_none(),
        "only once"
    );
    let control = Arc::new(
        mayfly_control::Control::open(store.clone())
            .await
            .expect("control"),
    );
    let view = mayfly_control::View::start(store.clone(), false);
    let app = router(Gateway {
        control: Some(control),
        view: view.clone(),
        store: store.clone(),
        runtime: Some(rt.handle()),
        admissions: Default::default(),
        metrics: mayfly_gateway::install_metrics(),
        dataplane: None,
        tokens: std::sync::Arc::new(mayfly_gateway::tokens::TokenCache::new(
            mayfly_gateway::tokens::DEFAULT_TTL,
        )),
    });
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", l.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(l, app).await });
    Server {
        store,
        base,
        view,
        admin,
        _rt: rt,
        _dir: dir,
        http: reqwest::Client::new(),
    }
}

impl Server {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<String>,
    ) -> (StatusCode, Value, reqwest::header::HeaderMap) {
        let mut r = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header("x-request-id", "req-test-1");
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        if let Some(b) = body {
            r = r.body(b);
        }
        let resp = r.send().await.expect("send");
        let status = resp.status();
        let headers = resp.headers().clone();
        let text = resp.text().await.expect("body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
            headers,
        )
    }

    /// The audit visible to `token`, once it holds at least `n` records (they are written
    /// in the background, in batches).
    async fn audit(&self, token: &str, n: usize) -> Vec<Value> {
        for _ in 0..200 {
            let (st, v, _) = self
                .call(reqwest::Method::GET, "/v1/audit", Some(token), None)
                .await;
            assert_eq!(st, StatusCode::OK, "{v}");
            let rows = v["audit"].as_array().cloned().unwrap_or_default();
            if rows.len() >= n {
                return rows;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("fewer than {n} audit records appeared");
    }

    async fn token(&self, tenant: &str, role: &str) -> String {
        let body =
            json!({"tenant": tenant, "role": role, "name": format!("{tenant}-{role}")}).to_string();
        let (s, v, _) = self
            .call(
                reqwest::Method::POST,
                "/v1/tokens",
                Some(&self.admin),
                Some(body),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        v["token"].as_str().expect("token").to_owned()
    }
}

const HELLO: &str = "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {name: hi, path: team/hi}\nworkload: {who: world}\nworkflow:\n  - step: start\n    tool: {kind: python, input: {who: \"{{ who }}\"}, code: \"result = {'hello': who}\"}\n";

#[tokio::test]
async fn authentication_roles_and_problem_json() {
    let s = server().await;
    use reqwest::Method as M;
    let (st, v, h) = s.call(M::GET, "/v1/playbooks", None, None).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    assert_eq!(v["code"], "unauthenticated");
    assert_eq!(
        h.get("content-type").and_then(|v| v.to_str().ok()),
        Some("application/problem+json")
    );
    assert_eq!(
        h.get("x-request-id").and_then(|v| v.to_str().ok()),
        Some("req-test-1"),
        "request id echoed"
    );
    let (st, v, _) = s
        .call(M::GET, "/v1/playbooks", Some("mf_not-a-token"), None)
        .await;
    assert_eq!(
        (st, v["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("unauthenticated"))
    );

    let viewer = s.token("acme", "viewer").await;
    let (st, v, _) = s
        .call(M::POST, "/v1/playbooks", Some(&viewer), Some(HELLO.into()))
        .await;
    assert_eq!(
        (st, v["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("forbidden"))
    );
    // A tenant admin cannot mint tokens for another tenant.
    let acme_admin = s.token("acme", "admin").await;
    let (st, _, _) = s
        .call(
            M::POST,
            "/v1/tokens",
            Some(&acme_admin),
            Some(json!({"tenant": "beta", "role": "admin", "name": "x"}).to_string()),
        )
        .await;
    assert_eq!(st, StatusCode::FORBIDDEN);

    let author = s.token("acme", "author").await;
    let bad = "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {name: x}\nworkflow:\n  - step: start\n    next: nowhere\n";
    let (st, v, _) = s
        .call(M::POST, "/v1/playbooks", Some(&author), Some(bad.into()))
        .await;
    assert_eq!(
        (st, v["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_playbook"))
    );
    assert_eq!(v["diagnostics"][0]["line"], 6);
    assert!(
        v["diagnostics"][0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("nowhere"))
    );
    let big = "x".repeat(2 << 20);
    let (st, v, _) = s
        .call(M::POST, "/v1/playbooks", Some(&author), Some(big))
        .await;
    assert_eq!(
        (st, v["code"].as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, Some("payload_too_large"))
    );
    let (st, v, _) = s.call(M::GET, "/openapi.json", None, None).await;
    assert_eq!(st, StatusCode::OK);
    assert!(v["paths"]["/v1/executions/{id}/stream"].is_object());

    // Every refusal is in the durable audit: the system admin sees all four, acme's admin
    // only acme's, and a viewer none at all.
    let all = s.audit(&s.admin, 4).await;
    let outcomes: Vec<(&str, &str, &str)> = all
        .iter()
        .map(|a| {
            (
                a["outcome"].as_str().unwrap_or(""),
                a["tenant"].as_str().unwrap_or("-"),
                a["action"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        outcomes,
        [
            ("forbidden", "acme", "POST /v1/tokens"),
            ("forbidden", "acme", "POST /v1/playbooks"),
            ("unauthenticated", "-", "GET /v1/playbooks"),
            ("unauthenticated", "-", "GET /v1/playbooks"),
        ]
    );
    assert!(all.iter().all(|a| a["request_id"] == "req-test-1"));
    let acme = s.audit(&acme_admin, 2).await;
    assert!(acme.iter().all(|a| a["tenant"] == "acme"));
    let (st, v, _) = s.call(M::GET, "/v1/audit", Some(&viewer), None).await;
    assert_eq!(
        (st, v["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("forbidden"))
    );
}

#[tokio::test]
async fn register_start_follow_and_tenant_isolation() {
    let s = server().await;
    use reqwest::Method as M;
    let author = s.token("acme", "author").await;
    let (st, v, _) = s
        .call(M::POST, "/v1/playbooks", Some(&author), Some(HELLO.into()))
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(
        (
            v["path"].as_str(),
            v["version"].as_u64(),
            v["created"].as_bool()
        ),
        (Some("team/hi"), Some(1), Some(true))
    );
    let (st, v, _) = s
        .call(M::POST, "/v1/playbooks", Some(&author), Some(HELLO.into()))
        .await;
    assert_eq!(
        (st, v["created"].as_bool()),
        (StatusCode::OK, Some(false)),
        "re-registering is a no-op"
    );
    let (st, v, _) = s
        .call(M::GET, "/v1/playbooks/team/hi", Some(&author), None)
        .await;
    assert_eq!((st, v["content"].as_str()), (StatusCode::OK, Some(HELLO)));

    let (st, v, _) = s
        .call(
            M::POST,
            "/v1/executions",
            Some(&author),
            Some(json!({"path": "team/nope"}).to_string()),
        )
        .await;
    assert_eq!(
        (st, v["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );
    let (st, v, _) = s
        .call(
            M::POST,
            "/v1/executions",
            Some(&author),
            Some(json!({"path": "team/hi", "workload": {"who": "gw"}}).to_string()),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let id = v["execution_id"].as_str().expect("id").to_owned();

    // SSE: follow to the end.
    let resp = s
        .http
        .get(format!("{}/v1/executions/{id}/stream", s.base))
        .bearer_auth(&author)
        .send()
        .await
        .expect("sse");
    assert_eq!(resp.status(), StatusCode::OK);
    let text = tokio::time::timeout(Duration::from_secs(30), resp.text())
        .await
        .expect("stream ends")
        .expect("body");
    assert!(
        text.contains("event: execution.requested") && text.contains("event: execution.completed"),
        "{text}"
    );
    let ids: Vec<u64> = text
        .lines()
        .filter_map(|l| l.strip_prefix("id: "))
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    assert_eq!(
        ids,
        (1..=ids.len() as u64).collect::<Vec<_>>(),
        "every event once, in order"
    );
    // Resume after event 3: only the later ones.
    let resp = s
        .http
        .get(format!("{}/v1/executions/{id}/stream", s.base))
        .bearer_auth(&author)
        .header("last-event-id", "3")
        .send()
        .await
        .expect("sse");
    let text = resp.text().await.expect("body");
    let first = text
        .lines()
        .find_map(|l| l.strip_prefix("id: "))
        .expect("an id");
    assert_eq!(first.trim(), "4");

    let (st, v, _) = s
        .call(M::GET, &format!("/v1/executions/{id}"), Some(&author), None)
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        (v["status"].as_str(), &v["result"]),
        (Some("completed"), &json!({"hello": "gw"}))
    );
    let (_, v, _) = s
        .call(
            M::GET,
            &format!("/v1/executions/{id}/events?limit=2"),
            Some(&author),
            None,
        )
        .await;
    assert_eq!(v["events"].as_array().map(Vec::len), Some(2));
    assert_eq!(v["next"], 3);
    assert_eq!(
        v["events"][0]["request_id"], "req-test-1",
        "the request id is carried into events"
    );
    let (_, v, _) = s.call(M::GET, "/v1/executions", Some(&author), None).await;
    assert_eq!(v["executions"].as_array().map(Vec::len), Some(1));
    let (st, m, _) = s.call(M::GET, "/metrics", None, None).await;
    assert_eq!(st, StatusCode::OK);
    let m = m.as_str().unwrap_or_default().to_owned();
    for name in [
        "mayfly_events_appended_total",
        "mayfly_event_append_seconds_bucket",
        "mayfly_blocks_total{status=\"ok\"}",
        "mayfly_step_duration_seconds_bucket",
        "mayfly_queue_depth",
        "mayfly_blocks_in_flight",
    ] {
        assert!(m.contains(name), "{name} missing from /metrics:\n{m}");
    }

    // Another tenant sees nothing of acme's.
    let beta = s.token("beta", "admin").await;
    let (st, v, _) = s
        .call(M::GET, &format!("/v1/executions/{id}"), Some(&beta), None)
        .await;
    assert_eq!(
        (st, v["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );
    let (st, _, _) = s
        .call(
            M::GET,
            &format!("/v1/executions/{id}/stream"),
            Some(&beta),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (_, v, _) = s.call(M::GET, "/v1/executions", Some(&beta), None).await;
    assert_eq!(v["executions"].as_array().map(Vec::len), Some(0));
    let (st, _, _) = s
        .call(M::GET, "/v1/playbooks/team/hi", Some(&beta), None)
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND, "catalogs are per tenant");

    // The two cross-tenant reads of an existing execution are in beta's audit (the answer
    // was a plain 404; the record says what it was).
    let audit = s.audit(&beta, 2).await;
    let got: Vec<(&str, &str)> = audit
        .iter()
        .map(|a| {
            (
                a["outcome"].as_str().unwrap_or(""),
                a["action"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (
                "cross_tenant",
                format!("GET /v1/executions/{id}/stream").as_str()
            ),
            ("cross_tenant", format!("GET /v1/executions/{id}").as_str()),
        ]
    );
    assert_eq!(audit[0]["tenant"], "beta");
    assert_eq!(audit[0]["actor"], "beta-admin");
}

#[tokio::test]
async fn cancel_stops_a_running_execution() {
    let s = server().await;
    use reqwest::Method as M;
    let op = s.token("acme", "author").await;
    let viewer = s.token("acme", "viewer").await;
    let slow = "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {name: slow, path: team/slow}\nworkflow:\n  - step: start\n    tool: {kind: shell, cmds: ['sleep 20']}\n    next: after\n  - step: after\n";
    let (st, _, _) = s
        .call(M::POST, "/v1/playbooks", Some(&op), Some(slow.into()))
        .await;
    assert_eq!(st, StatusCode::CREATED);
    let (_, v, _) = s
        .call(
            M::POST,
            "/v1/executions",
            Some(&op),
            Some(json!({"path": "team/slow"}).to_string()),
        )
        .await;
    let id = v["execution_id"].as_str().expect("id").to_owned();
    // Wait until the block is running.
    for _ in 0..100 {
        let (_, v, _) = s
            .call(
                M::GET,
                &format!("/v1/executions/{id}/events"),
                Some(&op),
                None,
            )
            .await;
        if v["events"]
            .as_array()
            .is_some_and(|e| e.iter().any(|e| e["kind"] == "step.started"))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (st, _, _) = s
        .call(
            M::POST,
            &format!("/v1/executions/{id}/cancel"),
            Some(&viewer),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    let (st, v, _) = s
        .call(
            M::POST,
            &format!("/v1/executions/{id}/cancel"),
            Some(&op),
            None,
        )
        .await;
    assert_eq!(
        (st, v["status"].as_str()),
        (StatusCode::OK, Some("cancelled")),
        "{v}"
    );
    let (_, v, _) = s
        .call(M::GET, &format!("/v1/executions/{id}"), Some(&op), None)
        .await;
    assert_eq!(v["status"], "cancelled");
    assert!(v["steps"].get("after").is_none());
    let (st, v, _) = s
        .call(
            M::POST,
            &format!("/v1/executions/{id}/cancel"),
            Some(&op),
            None,
        )
        .await;
    assert_eq!(
        (st, v["code"].as_str()),
        (StatusCode::CONFLICT, Some("already_ended"))
    );
    let (_, v, _) = s.call(M::GET, "/v1/executions", Some(&op), None).await;
    assert_eq!(v["executions"][0]["status"], "cancelled");
}

#[tokio::test]
async fn callbacks_resume_a_parked_step_once() {
    let s = server().await;
    use reqwest::Method as M;
    let op = s.token("acme", "author").await;
    let pb = "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {name: approve, path: team/approve}\nworkflow:\n  - step: start\n    tool: {kind: wait}\n    next: end\n  - step: end\n    input: {ok: \"{{ start.approved }}\"}\n";
    s.call(M::POST, "/v1/playbooks", Some(&op), Some(pb.into()))
        .await;
    let (_, v, _) = s
        .call(
            M::POST,
            "/v1/executions",
            Some(&op),
            Some(json!({"path": "team/approve"}).to_string()),
        )
        .await;
    let id = v["execution_id"].as_str().expect("id").to_owned();
    let mut token = String::new();
    for _ in 0..100 {
        let (_, v, _) = s
            .call(
                M::GET,
                &format!("/v1/executions/{id}/events"),
                Some(&op),
                None,
            )
            .await;
        if let Some(t) = v["events"]
            .as_array()
            .and_then(|e| e.iter().find(|e| e["kind"] == "step.waiting"))
            .and_then(|e| e["payload"]["token"].as_str())
        {
            token = t.to_owned();
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(token.starts_with("cb_"));
    // A viewer reads the parked step's token redacted: it is a capability to resume it.
    let viewer = s.token("acme", "viewer").await;
    let (_, v, _) = s
        .call(
            M::GET,
            &format!("/v1/executions/{id}/events"),
            Some(&viewer),
            None,
        )
        .await;
    let waiting = v["events"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["kind"] == "step.waiting"))
        .expect("the viewer sees the event");
    assert_eq!(waiting["payload"]["token"], "[redacted]");
    assert!(!v.to_string().contains(&token), "{v}");
    // The live stream redacts it the same way (the execution is parked: read until it shows).
    let mut resp = s
        .http
        .get(format!("{}/v1/executions/{id}/stream", s.base))
        .bearer_auth(&viewer)
        .send()
        .await
        .expect("sse");
    let mut text = String::new();
    let waiting_data = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let chunk = resp.chunk().await.expect("chunk").expect("stream open");
            text.push_str(&String::from_utf8_lossy(&chunk));
            if let Some(at) = text.find("event: step.waiting")
                && let Some(line) = text[at..].lines().find_map(|l| l.strip_prefix("data: "))
                && text[at..].contains("\n\n")
            {
                return line.to_owned();
            }
        }
    })
    .await
    .expect("step.waiting streamed");
    let ev: Value = serde_json::from_str(&waiting_data).expect("event json");
    assert_eq!(ev["payload"]["token"], "[redacted]", "{ev}");
    assert!(!text.contains(&token), "{text}");
    // A body spelling a cache ref is refused (refs are minted by mayfly) and spends nothing.
    let forged = json!({"approved": {"$ref": format!("sha256:{}", "a".repeat(64)), "format": "json", "bytes": 9}});
    let (st, v, _) = s
        .call(
            M::POST,
            &format!("/callbacks/{token}"),
            None,
            Some(forged.to_string()),
        )
        .await;
    assert_eq!(
        (st, v["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("forged_ref")),
        "{v}"
    );
    let (st, v, _) = s
        .call(
            M::POST,
            "/v1/executions",
            Some(&op),
            Some(json!({"path": "team/approve", "workload": {"w": [1, forged]}}).to_string()),
        )
        .await;
    assert_eq!(
        (st, v["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("forged_ref")),
        "{v}"
    );
    // No bearer token: the callback token is the credential.
    let (st, v, _) = s
        .call(
            M::POST,
            &format!("/callbacks/{token}"),
            None,
            Some(json!({"approved": true}).to_string()),
        )
        .await;
    assert_eq!(
        (st, v["step"].as_str()),
        (StatusCode::OK, Some("start")),
        "{v}"
    );
    let (st, v, _) = s
        .call(
            M::POST,
            &format!("/callbacks/{token}"),
            None,
            Some("{}".into()),
        )
        .await;
    assert_eq!(
        (st, v["code"].as_str()),
        (StatusCode::CONFLICT, Some("callback_used"))
    );
    let (st, v, _) = s
        .call(M::POST, "/callbacks/cb_unknown", None, Some("{}".into()))
        .await;
    assert_eq!(
        (st, v["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("unknown_callback"))
    );
    for _ in 0..100 {
        let (_, v, _) = s
            .call(M::GET, &format!("/v1/executions/{id}"), Some(&op), None)
            .await;
        if v["status"] == "completed" {
            assert_eq!(v["result"], json!({"ok": true}));
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("execution did not complete after its callback");
}

/// Streams opened while an execution runs follow its commits live (from the broadcast, not
/// by re-reading the log), and several at once each get every event once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_follows_a_running_execution_live_every_event_once_in_order() {
    let s = server().await;
    use reqwest::Method as M;
    let author = s.token("acme", "author").await;
    let pb = "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {name: live, path: team/live}\nworkflow:\n  - step: start\n    loop: {in: \"{{ range(40) }}\", iterator: i, spec: {mode: sequential}}\n    tool: {kind: python, input: {i: \"{{ i }}\"}, code: \"result = i\"}\n";
    let (st, v, _) = s
        .call(M::POST, "/v1/playbooks", Some(&author), Some(pb.into()))
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let (st, v, _) = s
        .call(
            M::POST,
            "/v1/executions",
            Some(&author),
            Some(json!({"path": "team/live"}).to_string()),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let id = v["execution_id"].as_str().expect("id").to_owned();
    let follow = |last: Option<u64>, query: &str| {
        let mut r = s
            .http
            .get(format!("{}/v1/executions/{id}/stream{query}", s.base))
            .bearer_auth(&author);
        if let Some(l) = last {
            r = r.header("last-event-id", l.to_string());
        }
        async move {
            let text = tokio::time::timeout(Duration::from_secs(60), async {
                r.send().await.expect("sse").text().await.expect("body")
            })
            .await
            .expect("stream ends");
            text.lines()
                .filter_map(|l| l.strip_prefix("id: "))
                .filter_map(|v| v.trim().parse::<u64>().ok())
                .collect::<Vec<u64>>()
        }
    };
    // The fourth asks for step results and the execution's own events only.
    let (a, b, c, only) = tokio::join!(
        follow(None, ""),
        follow(None, ""),
        follow(Some(2), ""),
        follow(None, "?kinds=step.finished,execution.*")
    );
    let (st, v, _) = s
        .call(M::GET, &format!("/v1/executions/{id}"), Some(&author), None)
        .await;
    assert_eq!(
        (st, v["status"].as_str()),
        (StatusCode::OK, Some("completed"))
    );
    let (_, ev, _) = s
        .call(
            M::GET,
            &format!("/v1/executions/{id}/events?limit=1000"),
            Some(&author),
            None,
        )
        .await;
    let n = ev["events"].as_array().map(Vec::len).expect("events") as u64;
    assert!(n > 160, "40 blocks make well over 160 events: {n}");
    assert_eq!(a, (1..=n).collect::<Vec<_>>(), "every event once, in order");
    assert_eq!(b, a);
    assert_eq!(c, (3..=n).collect::<Vec<_>>());
    let wanted: Vec<u64> = ev["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| {
            let k = e["kind"].as_str().unwrap_or("");
            k == "step.finished" || k.starts_with("execution.")
        })
        .filter_map(|e| e["seq"].as_u64())
        .collect();
    assert_eq!(
        wanted.len(),
        40 + 3,
        "40 results, requested, started, completed"
    );
    assert_eq!(
        only, wanted,
        "only the asked-for kinds, each once, in order"
    );
    // The filter is checked before anything streams: an unknown kind or family is a 400.
    for bad in ["step.finish", "step*", "nothing.*", "executions.*"] {
        let resp = s
            .http
            .get(format!("{}/v1/executions/{id}/stream?kinds={bad}", s.base))
            .bearer_auth(&author)
            .send()
            .await
            .expect("sse");
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{bad}");
        let v: Value = resp.json().await.expect("problem");
        assert_eq!(v["code"], "invalid_request", "{bad}: {v}");
    }
}

/// Desired state through the API: apply (created, unchanged, configured), read with status,
/// history with before/after versions and request ids, refusals recorded and answered 403
/// (all or nothing), invalid manifests 400 with file:line:col, and the audit chain verifies.
#[tokio::test]
async fn apply_get_history_and_audit_verify() {
    let s = server().await;
    use reqwest::Method as M;
    let author = s.token("acme", "author").await;
    let pool =
        "apiVersion: mayfly.dev/v1\nkind: WorkerPool\nmetadata: {name: gpu}\nspec: {slots: 4}\n";
    let pb = "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {name: hi, path: team/hi}\nworkflow:\n  - step: start\n    tool: {kind: noop}\n";
    let (st, v, _) = s
        .call(
            M::POST,
            "/v1/apply?file=pool.yaml",
            Some(&author),
            Some(pool.into()),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["results"][0]["outcome"], "created");
    assert!(v["accepted_token"].as_u64().is_some(), "{v}");
    let (_, v, _) = s
        .call(M::POST, "/v1/apply", Some(&author), Some(pool.into()))
        .await;
    assert_eq!(v["results"][0]["outcome"], "unchanged");
    assert_eq!(v["accepted_token"], Value::Null);
    let (st, v, _) = s
        .call(M::POST, "/v1/apply", Some(&author), Some(pb.into()))
        .await;
    assert_eq!(
        (st, &v["results"][0]["outcome"]),
        (StatusCode::OK, &json!("created")),
        "{v}"
    );
    // The playbook landed in the catalog, so executions can start from it.
    let (st, v, _) = s
        .call(M::GET, "/v1/playbooks/team/hi", Some(&author), None)
        .await;
    assert_eq!(
        (st, v["version"].as_u64()),
        (StatusCode::OK, Some(1)),
        "{v}"
    );
    // A second version, then back to the first: the desired state decides what runs.
    let pb2 = pb.replace("name: hi,", "name: hi, description: two,");
    let (_, v, _) = s.call(M::POST, "/v1/apply", Some(&author), Some(pb2)).await;
    assert_eq!(v["results"][0]["outcome"], "configured", "{v}");
    let (_, v, _) = s
        .call(M::POST, "/v1/apply", Some(&author), Some(pb.into()))
        .await;
    assert_eq!(v["results"][0]["outcome"], "configured", "rolled back: {v}");
    let (st, v, _) = s
        .call(
            M::POST,
            "/v1/executions",
            Some(&author),
            Some(json!({"path": "team/hi"}).to_string()),
        )
        .await;
    assert_eq!(
        (st, v["version"].as_u64()),
        (StatusCode::CREATED, Some(1)),
        "runs the rolled-back version: {v}"
    );
    let (st, v, _) = s
        .call(
            M::POST,
            "/v1/apply",
            Some(&author),
            Some(pool.replace("slots: 4", "slots: 6")),
        )
        .await;
    assert_eq!(
        (st, &v["results"][0]["outcome"]),
        (StatusCode::OK, &json!("configured"))
    );
    assert_eq!(v["results"][0]["generation"], 2);
    // Reads are served from the node's view: ask for this write's token to read it.
    let token = v["accepted_token"].as_u64().expect("accepted_token");
    let (st, v, h) = s
        .call(
            M::GET,
            &format!("/v1/objects/workerpools/gpu?min_token={token}&consistency=strong"),
            Some(&author),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["freshness"]["serving_class"], "strong");
    assert_eq!(v["freshness"]["lag"], 0);
    assert!(v["freshness"]["served_token"].as_u64() >= Some(token));
    assert_eq!(h["x-mayfly-serving-class"], "strong");
    let (st, v, _) = s
        .call(
            M::GET,
            &format!(
                "/v1/objects/workerpools/gpu?min_token={}&deadline_ms=100",
                token + 1000
            ),
            Some(&author),
            None,
        )
        .await;
    assert_eq!(
        (st, v["code"].as_str()),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Some("min_token_not_reached")
        ),
        "never served under a weaker requirement: {v}"
    );
    let (st, v, _) = s
        .call(
            M::GET,
            "/v1/objects/workerpools/gpu?consistency=bounded",
            Some(&author),
            None,
        )
        .await;
    assert_eq!(
        (st, v["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_request"))
    );

    let (st, v, _) = s
        .call(M::GET, "/v1/objects/workerpools/gpu", Some(&author), None)
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["spec"]["slots"], 6);
    assert_eq!(v["status"]["desired_generation"], 2);
    assert!(
        v["version"]
            .as_str()
            .is_some_and(|d| d.starts_with("sha256:"))
    );
    let (_, v, _) = s
        .call(M::GET, "/v1/objects/Playbook/team/hi", Some(&author), None)
        .await;
    assert_eq!(v["status"]["phase"], "Ready", "{v}");
    let (st, h, _) = s
        .call(M::GET, "/v1/history/WorkerPool/gpu", Some(&author), None)
        .await;
    assert_eq!(st, StatusCode::OK);
    let revs = h["revisions"].as_array().expect("revisions");
    assert_eq!(revs.len(), 2);
    assert_eq!(revs[1]["before"], revs[0]["version"]);
    assert_eq!(revs[1]["request_id"], "req-test-1");

    // Another tenant sees none of it.
    let other = s.token("beta", "admin").await;
    let (st, _, _) = s
        .call(M::GET, "/v1/objects/WorkerPool/gpu", Some(&other), None)
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);

    // Refused: a cluster-scoped Tenant by a tenant author, beside an allowed pool change.
    let mixed = format!(
        "apiVersion: mayfly.dev/v1\nkind: Tenant\nmetadata: {{name: acme}}\n---\n{}",
        pool.replace("slots: 4", "slots: 99")
    );
    let (st, v, _) = s
        .call(M::POST, "/v1/apply", Some(&author), Some(mixed))
        .await;
    assert_eq!(
        (st, v["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("denied")),
        "{v}"
    );
    assert_eq!(v["results"][0]["outcome"], "denied");
    assert_eq!(v["results"][1]["outcome"], "skipped");
    let (_, v, _) = s
        .call(
            M::GET,
            "/v1/objects/WorkerPool/gpu?consistency=strong",
            Some(&author),
            None,
        )
        .await;
    assert_eq!(v["spec"]["slots"], 6, "nothing of a refused apply changed");

    let (st, v, _) = s
        .call(
            M::POST,
            "/v1/apply?file=bad.yaml",
            Some(&author),
            Some("apiVersion: mayfly.dev/v1\nkind: WorkerPool\nmetadata: {name: x}\nspec: {slots: many}\n".into()),
        )
        .await;
    assert_eq!(
        (st, v["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_manifest"))
    );
    assert!(
        v["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with("bad.yaml:4:")),
        "{v}"
    );

    let (st, _, _) = s
        .call(M::GET, "/v1/audit/verify", Some(&author), None)
        .await;
    assert_eq!(
        st,
        StatusCode::FORBIDDEN,
        "the whole record is the system tenant's to verify"
    );
    let (st, v, _) = s
        .call(M::GET, "/v1/audit/verify", Some(&s.admin), None)
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["ok"], true);
    assert_eq!(v["verified"]["applied"], 5, "pool ×2, playbook ×3");
    assert_eq!(v["verified"]["denied"], 1);
    let viewer = s.token("acme", "viewer").await;
    let (st, _, _) = s
        .call(M::POST, "/v1/apply", Some(&viewer), Some(pool.into()))
        .await;
    assert_eq!(st, StatusCode::FORBIDDEN);

    // A system caller sees objects of every tenant: ?tenant= says whose.
    let two = "apiVersion: mayfly.dev/v1\nkind: Policy\nmetadata: {name: shared}\nspec: {limits: {max_attempts: 1}}\n---\napiVersion: mayfly.dev/v1\nkind: Policy\nmetadata: {name: shared, tenant: acme}\nspec: {limits: {max_attempts: 2}}\n";
    let (st, v, _) = s
        .call(M::POST, "/v1/apply", Some(&s.admin), Some(two.into()))
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    for (tenant, attempts) in [("acme", 2), ("system", 1)] {
        let (st, v, _) = s
            .call(
                M::GET,
                &format!("/v1/objects/Policy/shared?tenant={tenant}&consistency=strong"),
                Some(&s.admin),
                None,
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{v}");
        assert_eq!(v["spec"]["limits"]["max_attempts"], attempts, "{v}");
        let (_, h, _) = s
            .call(
                M::GET,
                &format!("/v1/history/Policy/shared?tenant={tenant}"),
                Some(&s.admin),
                None,
            )
            .await;
        assert_eq!(h["tenant"], tenant, "{h}");
    }
}

/// Admission of new executions: the policies in force (platform and tenant layers) and the
/// tenant's quota decide, with a stable reason, on this node's fresh view; `/v1/status`
/// counts the outcomes.
#[tokio::test]
async fn admission_enforces_policies_and_quotas_with_stable_reasons() {
    let s = server().await;
    use reqwest::Method as M;
    let author = s.token("acme", "author").await;
    let park = "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {name: park, path: team/park}\nworkflow:\n  - step: start\n    tool: {kind: wait}\n";
    for pb in [HELLO, park] {
        let (st, v, _) = s
            .call(M::POST, "/v1/playbooks", Some(&author), Some(pb.into()))
            .await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
    }
    let platform = |tools: &str| {
        format!(
            "apiVersion: mayfly.dev/v1\nkind: Policy\nmetadata: {{name: platform}}\nspec:\n  tools: {{allow: [{tools}]}}\n---\napiVersion: mayfly.dev/v1\nkind: Tenant\nmetadata: {{name: acme}}\nspec: {{quotas: {{max_running_executions: 1}}}}\n"
        )
    };
    let (st, v, _) = s
        .call(
            M::POST,
            "/v1/apply",
            Some(&s.admin),
            Some(platform("noop, wait")),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let s = &s;
    let start = |path: &str| {
        let body = json!({"path": path}).to_string();
        let token = author.clone();
        async move {
            s.call(M::POST, "/v1/executions", Some(&token), Some(body))
                .await
        }
    };
    let (st, v, _) = start("team/hi").await;
    assert_eq!(
        (st, v["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("policy_denied")),
        "{v}"
    );
    assert!(
        v["detail"].as_str().is_some_and(|d| d.contains("`python`")),
        "{v}"
    );
    assert!(v["admission"]["policy_version"].as_str().is_some(), "{v}");
    // The parked execution is admitted and holds the tenant's only slot.
    let (st, v, _) = start("team/park").await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(v["admission"]["decision"], "accepted");
    let (st, v, _) = s
        .call(
            M::POST,
            "/v1/apply",
            Some(&s.admin),
            Some(platform("noop, wait, python")),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let (st, v, _) = start("team/hi").await;
    assert_eq!(
        (st, v["code"].as_str()),
        (StatusCode::TOO_MANY_REQUESTS, Some("tenant_quota")),
        "the policy change is seen at once; the quota is not: {v}"
    );
    let (st, v, _) = s.call(M::GET, "/v1/status", Some(&author), None).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(
        (v["state"].as_str(), v["role"].as_str()),
        (Some("ready"), Some("appender"))
    );
    assert_eq!(
        v["admissions"],
        json!({"accepted": 1, "policy_denied": 1, "tenant_quota": 1})
    );
    assert!(v["pending_publishes"].as_u64().is_some());
    // The same document at /status, authenticated like every request.
    let (st, alias, _) = s.call(M::GET, "/status", Some(&author), None).await;
    assert_eq!(st, StatusCode::OK, "{alias}");
    assert_eq!(alias["admissions"], v["admissions"]);
    let (st, _, _) = s.call(M::GET, "/status", None, None).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
}

/// Bounded autonomy: the step budgets of the policies in force (the tightest of each layer)
/// are recorded with the execution and cap what the playbook asks for — a task that would
/// retry five times gets the policy's two attempts, a step that would sleep gets the
/// policy's timeout.
#[tokio::test]
async fn policy_budgets_cap_retries_and_timeouts() {
    let s = server().await;
    use reqwest::Method as M;
    let admin = s.token("acme", "admin").await;
    let dir = tempfile::tempdir().expect("tmp");
    let counter = dir.path().join("attempts");
    let flaky = format!(
        "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {{name: flaky, path: team/flaky}}\nworkflow:\n  - step: start\n    tool:\n      - name: flaky\n        kind: python\n        input: {{counter: \"{}\"}}\n        code: |\n          import os\n          n = int(open(counter).read()) + 1 if os.path.exists(counter) else 1\n          open(counter, 'w').write(str(n))\n          raise RuntimeError(f'attempt {{n}} failed')\n        spec:\n          policy:\n            rules:\n              - when: \"{{{{ output.status == 'error' }}}}\"\n                then: {{do: retry, attempts: 5, delay: 0.01}}\n",
        counter.display()
    );
    let slow = "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {name: slow, path: team/slow}\nworkflow:\n  - step: start\n    tool: {kind: python, code: \"import time\\ntime.sleep(30)\\nresult = 1\"}\n";
    for pb in [flaky.as_str(), slow] {
        let (st, v, _) = s
            .call(M::POST, "/v1/playbooks", Some(&admin), Some(pb.into()))
            .await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
    }
    let policies = "apiVersion: mayfly.dev/v1\nkind: Policy\nmetadata: {name: budgets}\nspec:\n  limits: {step_timeout_s: 1, max_attempts: 3}\n---\napiVersion: mayfly.dev/v1\nkind: Policy\nmetadata: {name: tighter}\nspec:\n  limits: {max_attempts: 2}\n";
    let (st, v, _) = s
        .call(M::POST, "/v1/apply", Some(&admin), Some(policies.into()))
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let run = |path: &'static str| {
        let s = &s;
        let admin = admin.clone();
        async move {
            let (st, v, _) = s
                .call(
                    M::POST,
                    "/v1/executions",
                    Some(&admin),
                    Some(json!({"path": path}).to_string()),
                )
                .await;
            assert_eq!(st, StatusCode::CREATED, "{v}");
            assert_eq!(
                v["admission"]["limits"],
                json!({"step_timeout_s": 1, "max_attempts": 2})
            );
            let id = v["execution_id"].as_str().expect("id").to_owned();
            for _ in 0..300 {
                let (_, v, _) = s
                    .call(M::GET, &format!("/v1/executions/{id}"), Some(&admin), None)
                    .await;
                if v["status"] != "running" && v["status"] != "pending" {
                    return v;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("execution {id} did not end");
        }
    };
    let v = run("team/flaky").await;
    assert_eq!(v["status"], "failed", "{v}");
    assert_eq!(
        std::fs::read_to_string(&counter).expect("counter"),
        "2",
        "the playbook asked for 5 attempts; the policy allows 2"
    );
    let v = run("team/slow").await;
    assert_eq!(
        (v["status"].as_str(), v["error"]["code"].as_str()),
        (Some("failed"), Some("timeout")),
        "the step asked to sleep 30 s; the policy's budget is 1 s: {v}"
    );
}

/// The degradation rule per action class: while the control plane is degraded (here, the
/// node's tail is paused), low-risk reads fail open — served, flagged and recorded in the
/// audit for review — unless a policy in force for the tenant closes them; privileged
/// classes cannot be declared fail-open.
#[tokio::test]
async fn degraded_reads_fail_open_with_a_marker_unless_a_policy_closes_them() {
    use reqwest::Method as M;
    let s = server().await;
    let acme = s.token("acme", "admin").await;
    let beta = s.token("beta", "admin").await;
    let closed = "apiVersion: mayfly.dev/v1\nkind: Policy\nmetadata: {name: strict}\nspec:\n  degradation: {read: fail_closed}\n";
    let (st, v, _) = s
        .call(M::POST, "/v1/apply", Some(&acme), Some(closed.into()))
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let open = "apiVersion: mayfly.dev/v1\nkind: Policy\nmetadata: {name: lax}\nspec:\n  degradation: {execute: fail_open}\n";
    let (st, v, _) = s
        .call(
            M::POST,
            "/v1/apply?file=lax.yaml",
            Some(&beta),
            Some(open.into()),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("privileged actions fail closed"),
        "{v}"
    );
    // Healthy: both tenants read, unflagged.
    let (st, v, h) = s
        .call(M::GET, "/v1/objects/policies", Some(&acme), None)
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert!(v.get("fail_open").is_none() && h.get("x-mayfly-fail-open").is_none());

    s.view.pause().await;
    tokio::time::sleep(Duration::from_millis(2_300)).await;
    let (st, v, _) = s
        .call(M::GET, "/v1/objects/policies", Some(&acme), None)
        .await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(v["code"], "control_degraded");
    assert!(
        v["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("policy acme/strict (tenant)"),
        "{v}"
    );
    assert_eq!(v["freshness"]["degraded_mode"], "root_lagging");
    let (st, v, h) = s
        .call(M::GET, "/v1/objects/policies", Some(&beta), None)
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(
        h.get("x-mayfly-fail-open").and_then(|v| v.to_str().ok()),
        Some("read")
    );
    assert_eq!(v["fail_open"]["class"], "read");
    assert_eq!(v["fail_open"]["degraded_mode"], "root_lagging");
    s.view.resume();
    // The marker is in beta's audit, for review.
    let rows = s.audit(&beta, 1).await;
    assert!(
        rows.iter().any(|r| r["outcome"] == "fail_open"
            && r["detail"]
                .as_str()
                .unwrap_or_default()
                .contains("root_lagging")),
        "{rows:?}"
    );
}

/// The execution plane's `epoch_mismatch`: a server whose Postgres log was taken over by
/// another appender (a higher fencing epoch) refuses new executions with that stable reason
/// and writes nothing. Skipped loudly without Postgres (a failure under CI=true).
#[tokio::test]
async fn a_superseded_appender_refuses_starts_with_epoch_mismatch() {
    use reqwest::Method as M;
    if !mayfly_testkit::postgres() {
        return;
    }
    let url = mayfly_testkit::postgres_url();
    let schema = mayfly_testkit::unique("mayfly_gw_fence");
    let ours = mayfly_store::PostgresStore::connect_schema(&url, &schema)
        .await
        .expect("postgres");
    ours.take_over().await.expect("appender");
    let s = server_on(Arc::new(ours), tempfile::tempdir().expect("tmp")).await;
    let author = s.token("acme", "author").await;
    let (st, v, _) = s
        .call(M::POST, "/v1/playbooks", Some(&author), Some(HELLO.into()))
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let start = json!({"path": "team/hi"}).to_string();
    let (st, v, _) = s
        .call(
            M::POST,
            "/v1/executions",
            Some(&author),
            Some(start.clone()),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");

    let successor = mayfly_store::PostgresStore::connect_schema(&url, &schema)
        .await
        .expect("postgres");
    successor.take_over().await.expect("take over");
    let before = successor
        .list_executions(None, 100)
        .await
        .expect("list")
        .len();
    let (st, v, _) = s
        .call(M::POST, "/v1/executions", Some(&author), Some(start))
        .await;
    assert_eq!(
        (st, v["code"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("epoch_mismatch")),
        "{v}"
    );
    assert_eq!(
        successor
            .list_executions(None, 100)
            .await
            .expect("list")
            .len(),
        before,
        "nothing was written"
    );
    mayfly_store::PostgresStore::drop_schema(&url, &schema)
        .await
        .expect("drop");
}

/// A browser session: opened with a token, carried by an HttpOnly cookie, refused when
/// forged, and unable to write without the UI header (no cross-site form can send it).
#[tokio::test]
async fn browser_sessions_cookies_csrf_and_logout() {
    let s = server().await;
    let author = s.token("acme", "author").await;
    let r = s
        .http
        .post(format!("{}/ui/session", s.base))
        .header("x-mayfly-ui", "1")
        .body(json!({"token": "mf_wrong"}).to_string())
        .send()
        .await
        .expect("login");
    let st = r.status();
    let v: Value = r.json().await.expect("problem");
    assert_eq!(
        (st, v["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("unauthenticated"))
    );
    // Without the UI header another site could log a browser in (login CSRF): refused.
    let r = s
        .http
        .post(format!("{}/ui/session", s.base))
        .body(json!({"token": author}).to_string())
        .send()
        .await
        .expect("login");
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = s
        .http
        .post(format!("{}/ui/session", s.base))
        .header("x-mayfly-ui", "1")
        .body(json!({"token": author}).to_string())
        .send()
        .await
        .expect("login");
    assert_eq!(r.status(), StatusCode::OK);
    let set = r
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .expect("a session cookie")
        .to_owned();
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict"),
        "{set}"
    );
    assert!(
        !set.contains(&author),
        "the token itself is never in the cookie"
    );
    let cookie = set.split(';').next().expect("pair").to_owned();
    let with_cookie = |m: reqwest::Method, path: &str| {
        s.http
            .request(m, format!("{}{path}", s.base))
            .header("cookie", cookie.clone())
    };
    let me: Value = with_cookie(reqwest::Method::GET, "/v1/whoami")
        .send()
        .await
        .expect("whoami")
        .json()
        .await
        .expect("json");
    assert_eq!(
        (me["tenant"].as_str(), me["role"].as_str()),
        (Some("acme"), Some("author"))
    );
    // A write without the UI header is refused (CSRF), with it accepted.
    let r = with_cookie(reqwest::Method::POST, "/v1/playbooks")
        .body(HELLO)
        .send()
        .await
        .expect("register");
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let p: Value = r.json().await.expect("problem");
    assert_eq!(p["code"], "csrf");
    let r = with_cookie(reqwest::Method::POST, "/v1/playbooks")
        .header("x-mayfly-ui", "1")
        .body(HELLO)
        .send()
        .await
        .expect("register");
    assert_eq!(r.status(), StatusCode::CREATED);
    // The actor router takes no session: an actor's answer is served on this origin.
    let r = with_cookie(reqwest::Method::GET, "/actors/some-actor/")
        .send()
        .await
        .expect("actor");
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // A tampered cookie is refused.
    let forged = format!("{}x", cookie);
    let r = s
        .http
        .get(format!("{}/v1/whoami", s.base))
        .header("cookie", forged)
        .send()
        .await
        .expect("forged");
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // Logging out clears the cookie.
    let r = s
        .http
        .delete(format!("{}/ui/session", s.base))
        .send()
        .await
        .expect("logout");
    assert!(
        r.headers()
            .get("set-cookie")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|c| c.contains("Max-Age=0"))
    );
    // The UI itself is served with a strict content security policy.
    let r = s
        .http
        .get(format!("{}/ui/", s.base))
        .send()
        .await
        .expect("ui");
    assert_eq!(r.status(), StatusCode::OK);
    let csp = r
        .headers()
        .get("content-security-policy")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(
        csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    assert!(r.text().await.expect("html").contains("/ui/app.js"));
}

/// The read models behind the UI: a catalog playbook's graph, the diff of two versions,
/// keychain aliases (never values), the queue, and filtered execution lists.
#[tokio::test]
async fn graph_diff_keychain_workers_and_filters() {
    let s = server().await;
    let author = s.token("acme", "author").await;
    let v2 = HELLO.replace("'hello': who", "'hi': who");
    for body in [HELLO.to_owned(), v2] {
        let (st, v, _) = s
            .call(
                reqwest::Method::POST,
                "/v1/playbooks",
                Some(&author),
                Some(body),
            )
            .await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
    }
    let (st, g, _) = s
        .call(
            reqwest::Method::GET,
            "/v1/catalog/graph?path=team/hi&version=1",
            Some(&author),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{g}");
    assert_eq!(g["version"], 1);
    assert_eq!(g["graph"]["nodes"][0]["name"], "start");
    assert_eq!(g["graph"]["nodes"][0]["tools"], json!(["python"]));
    let (st, d, _) = s
        .call(
            reqwest::Method::GET,
            "/v1/catalog/diff?path=team/hi&from=1",
            Some(&author),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{d}");
    assert_eq!(
        (d["from"]["version"].as_u64(), d["to"]["version"].as_u64()),
        (Some(1), Some(2))
    );
    assert_eq!(
        (d["added"].as_u64(), d["removed"].as_u64()),
        (Some(1), Some(1))
    );
    let u = d["unified"].as_str().expect("unified");
    assert!(
        u.contains("--- team/hi@1") && u.contains("+++ team/hi@2"),
        "{u}"
    );
    assert!(u.contains("-    tool: {kind: python, input: {who: \"{{ who }}\"}, code: \"result = {'hello': who}\"}"), "{u}");
    // Unknown version and another tenant's playbook: 404.
    let (st, _, _) = s
        .call(
            reqwest::Method::GET,
            "/v1/catalog/diff?path=team/hi&from=9",
            Some(&author),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let other = s.token("globex", "viewer").await;
    let (st, _, _) = s
        .call(
            reqwest::Method::GET,
            "/v1/catalog/graph?path=team/hi",
            Some(&other),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    // Keychain aliases: the tenant's own, never a (sealed) value.
    let put = |tenant: &str, alias: &str| mayfly_store::SecretOp::Put {
        tenant: tenant.into(),
        alias: alias.into(),
        sealed: format!("sealed-bytes-of-{alias}"),
    };
    s.store
        .append(Arc::new(mayfly_store::Batch {
            secrets: vec![put("acme", "warehouse"), put("globex", "their-db")],
            ..Default::default()
        }))
        .await
        .expect("secrets");
    let (st, k, _) = s
        .call(reqwest::Method::GET, "/v1/keychain", Some(&author), None)
        .await;
    assert_eq!(st, StatusCode::OK, "{k}");
    let aliases: Vec<&str> = k["aliases"]
        .as_array()
        .expect("aliases")
        .iter()
        .filter_map(|a| a["alias"].as_str())
        .collect();
    assert_eq!(aliases, vec!["warehouse"]);
    assert!(!k.to_string().contains("sealed-bytes"), "{k}");
    // Queue stats for every tenant; worker agents for the platform tenant only.
    let (st, w, _) = s
        .call(reqwest::Method::GET, "/v1/workers", Some(&author), None)
        .await;
    assert_eq!(st, StatusCode::OK, "{w}");
    assert_eq!(w["queue"]["up"], true);
    assert!(w["queue"]["stats"]["depth"].is_u64(), "{w}");
    assert!(w["agents"].is_null(), "{w}");
    let (_, w, _) = s
        .call(reqwest::Method::GET, "/v1/workers", Some(&s.admin), None)
        .await;
    assert!(w["agents"].is_array(), "{w}");
    // Executions filtered by status and path.
    let (st, v, _) = s
        .call(
            reqwest::Method::POST,
            "/v1/executions",
            Some(&author),
            Some(json!({"path": "team/hi"}).to_string()),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let id = v["execution_id"].as_str().expect("id").to_owned();
    for _ in 0..200 {
        let (_, r, _) = s
            .call(
                reqwest::Method::GET,
                "/v1/executions?status=completed",
                Some(&author),
                None,
            )
            .await;
        if r["executions"].as_array().is_some_and(|a| a.len() == 1) {
            assert_eq!(r["executions"][0]["execution_id"], id.as_str());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (query, n) in [
        ("status=completed", 1),
        ("status=failed", 0),
        ("path=nope", 0),
        ("path=team", 1),
        ("status=completed&path=team/hi", 1),
    ] {
        let (_, r, _) = s
            .call(
                reqwest::Method::GET,
                &format!("/v1/executions?{query}"),
                Some(&author),
                None,
            )
            .await;
        assert_eq!(
            r["executions"].as_array().map(Vec::len),
            Some(n),
            "{query}: {r}"
        );
    }
}
