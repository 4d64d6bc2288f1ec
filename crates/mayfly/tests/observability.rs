//! Observability end to end, in distributed mode (Postgres log, NATS JetStream queue, a
//! separate worker process): one OpenTelemetry trace runs from the gateway request that
//! starts an execution, through each command the orchestrator issues, across the queue to
//! the worker's block span and its tool call — continuing the trace the client sent in
//! `traceparent`, also across a `kill -9` and restart of the server mid-execution. Spans are
//! received by a real OTLP/HTTP endpoint served by the test. The worker's JSON logs carry
//! execution id, step, tenant and request id.

mod common;

use axum::extract::State;
use axum::routing::post;
use common::{Running, bin, start_server_banner, start_server_logged};
use serde_json::{Value, json};
use std::io::BufRead;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const PG: &str = "postgres://postgres@127.0.0.1:5432/test";
const NATS: &str = "nats://127.0.0.1:4222";

const CHAIN: &str = r#"apiVersion: noetl.io/v2
kind: Playbook
metadata: {name: traced, path: tests/traced}
workflow:
  - step: start
    tool: {kind: python, code: "import time\ntime.sleep(1.5)\nresult = {'n': 20}"}
    next: {arcs: [{step: end}]}
  - step: end
    tool: {kind: python, input: {n: "{{ start.n }}"}, code: "result = {'n': n + 1}"}
"#;

type Spans = Arc<Mutex<Vec<Value>>>;

/// An OTLP/HTTP (JSON) trace receiver: every span it is sent, flattened, with its service.
async fn otlp_receiver() -> (String, Spans) {
    let spans: Spans = Arc::default();
    async fn traces(State(spans): State<Spans>, body: axum::body::Bytes) -> &'static str {
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let mut out = spans.lock().unwrap_or_else(|p| p.into_inner());
        for rs in v["resourceSpans"].as_array().into_iter().flatten() {
            let service = rs["resource"]["attributes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|a| a["key"] == "service.name")
                .map(|a| a["value"]["stringValue"].clone())
                .unwrap_or(Value::Null);
            for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                for s in ss["spans"].as_array().into_iter().flatten() {
                    let mut s = s.clone();
                    s["service"] = service.clone();
                    out.push(s);
                }
            }
        }
        "{}"
    }
    let app = axum::Router::new()
        .route("/v1/traces", post(traces))
        .with_state(spans.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", l.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(l, app).await });
    (url, spans)
}

fn attr(span: &Value, key: &str) -> Option<String> {
    span["attributes"]
        .as_array()?
        .iter()
        .find(|a| a["key"] == key)
        .and_then(|a| {
            let v = &a["value"];
            v["stringValue"]
                .as_str()
                .map(str::to_owned)
                .or_else(|| v["intValue"].as_str().map(str::to_owned))
                .or_else(|| v["intValue"].as_i64().map(|i| i.to_string()))
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_from_request_to_tool_across_the_queue_and_json_logs() {
    if !(mayfly_testkit::postgres() && mayfly_testkit::nats()) {
        return;
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (otlp, spans) = otlp_receiver().await;
    let schema = mayfly_testkit::unique("mayfly_otel");
    let stream = mayfly_testkit::unique("MAYFLY_OTEL");
    let db = format!("{PG}?schema={schema}");
    let telemetry = |c: &mut std::process::Command| {
        c.args(["--otlp-endpoint", &otlp])
            .env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
            .env("OTEL_BSP_SCHEDULE_DELAY", "100")
            .env("MAYFLY_LOG_FORMAT", "json")
            .env("MAYFLY_LOG", "info");
    };
    let server_cmd = || {
        let mut cmd = bin();
        cmd.args(["server", "--listen", "127.0.0.1:0", "--db", &db])
            .args(["--queue", NATS, "--queue-name", &stream]);
        telemetry(&mut cmd);
        cmd
    };
    let (mut server, banner, server_logs) = start_server_logged(&mut server_cmd());
    let (url, token) = (
        banner.url.expect("ready"),
        banner.token.expect("admin token"),
    );
    let mut w = bin();
    w.args([
        "worker",
        "--queue",
        NATS,
        "--queue-name",
        &stream,
        "--id",
        "W",
    ]);
    telemetry(&mut w);
    let mut worker = Running(
        w.stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("worker"),
    );
    let logs: Arc<Mutex<Vec<String>>> = Arc::default();
    {
        let logs = logs.clone();
        let err = worker.0.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                logs.lock().unwrap_or_else(|p| p.into_inner()).push(l);
            }
        });
    }

    let http = reqwest::Client::new();
    let get = |url: String| {
        let (http, token) = (http.clone(), token.clone());
        async move {
            http.get(url)
                .bearer_auth(&token)
                .send()
                .await
                .expect("get")
                .json::<Value>()
                .await
                .expect("json")
        }
    };
    let r = http
        .post(format!("{url}/v1/playbooks"))
        .bearer_auth(&token)
        .body(CHAIN)
        .send()
        .await
        .expect("register");
    assert!(r.status().is_success());
    // The client's own trace: everything below must continue it.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let r = http
        .post(format!("{url}/v1/executions"))
        .bearer_auth(&token)
        .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .header("x-request-id", "req-otel-1")
        .body(json!({"path": "tests/traced"}).to_string())
        .send()
        .await
        .expect("start");
    assert_eq!(r.status(), reqwest::StatusCode::CREATED);
    let id = r.json::<Value>().await.expect("json")["execution_id"]
        .as_str()
        .expect("id")
        .to_owned();
    // While the first (slow) step runs on the worker, the server is killed and restarted:
    // the resumed execution's commands still join the client's trace.
    let t0 = Instant::now();
    loop {
        let v = get(format!("{url}/v1/executions/{id}/events")).await;
        let started = v["events"].as_array().is_some_and(|e| {
            e.iter()
                .any(|e| e["kind"] == "step.started" && e["step"] == "start")
        });
        if started {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "start never started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    server.0.kill().expect("kill -9 the server");
    let _ = server.0.wait();
    let (_server, banner) = start_server_banner(&mut server_cmd());
    let url = banner.url.expect("ready again");
    let t0 = Instant::now();
    loop {
        let s = get(format!("{url}/v1/executions/{id}")).await;
        if s["status"] == "completed" {
            assert_eq!(s["result"], json!({"n": 21}));
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "not completed: {s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The trace: request → command (per step) → block (on the worker) → tool.
    let of = |name: &str| -> Vec<Value> {
        spans
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|s| s["name"] == name && s["traceId"] == trace_id)
            .cloned()
            .collect()
    };
    let t0 = Instant::now();
    // Server and worker export in their own batches: wait for every span.
    let expected = [
        ("POST /v1/executions", 1),
        ("command start", 1),
        ("command end", 1),
        ("block start", 1),
        ("block end", 1),
        ("tool python", 2),
    ];
    while expected.iter().any(|(name, n)| of(name).len() < *n) {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "spans received: {:?}",
            spans
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|s| (s["name"].clone(), s["traceId"].clone()))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let request = of("POST /v1/executions");
    assert_eq!(
        request.len(),
        1,
        "the starting request, in the client's trace"
    );
    assert_eq!(request[0]["parentSpanId"], "00f067aa0ba902b7");
    assert_eq!(request[0]["service"], "mayfly-server");
    assert_eq!(
        attr(&request[0], "request_id").as_deref(),
        Some("req-otel-1")
    );
    assert_eq!(attr(&request[0], "tenant").as_deref(), Some("system"));
    // `start` was issued before the restart (and its open command again after it); `end`
    // only by the restarted server, from the context recorded in the log.
    for step in ["start", "end"] {
        let commands = of(&format!("command {step}"));
        for c in &commands {
            assert_eq!(c["parentSpanId"], request[0]["spanId"], "command {step}");
            assert_eq!(c["service"], "mayfly-server");
        }
        let blocks = of(&format!("block {step}"));
        for b in &blocks {
            assert!(
                commands.iter().any(|c| c["spanId"] == b["parentSpanId"]),
                "the worker continues a command's span across NATS: block {step}"
            );
            assert_eq!(b["service"], "mayfly-worker");
            assert_eq!(attr(b, "execution_id").as_deref(), Some(id.as_str()));
            assert_eq!(attr(b, "request_id").as_deref(), Some("req-otel-1"));
        }
        let tools = of("tool python")
            .into_iter()
            .filter(|t| blocks.iter().any(|b| b["spanId"] == t["parentSpanId"]))
            .count();
        assert!(tools >= 1, "the tool call inside block {step}");
    }

    // The worker's JSON logs: every line is JSON; a block's carries its identifiers.
    let t0 = Instant::now();
    let line = loop {
        let found = logs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["message"] == "block finished" && v["span"]["step"] == "end");
        if let Some(v) = found {
            break v;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "no block log line");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(line["span"]["execution_id"], id.as_str());
    assert_eq!(line["span"]["tenant"], "system");
    assert_eq!(line["span"]["request_id"], "req-otel-1");
    assert_eq!(line["level"], "INFO");
    // The server's JSON logs: the request that started the execution is logged with its
    // request id and tenant (its span's fields), and every line is JSON.
    let served = server_logs
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["message"] == "request served" && v["span"]["request_id"] == "req-otel-1")
        .expect("the server logged the start request");
    assert_eq!(served["span"]["tenant"], "system", "{served}");
    assert_eq!(served["status"], 201, "{served}");
    for l in server_logs
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|l| !l.starts_with("mayfly "))
    {
        assert!(
            serde_json::from_str::<Value>(l).is_ok(),
            "a server log line is not JSON: {l}"
        );
    }
    // Only the startup banner (readiness, for humans and supervisors) is plain text.
    for l in logs
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|l| !l.starts_with("mayfly worker W: "))
    {
        assert!(
            serde_json::from_str::<Value>(l).is_ok(),
            "a worker log line is not JSON: {l}"
        );
    }

    drop(worker);
    // The stream is the queue name scoped by the log's identity.
    let stream = {
        use mayfly_store::Store;
        let store = mayfly_store::PostgresStore::connect_schema(PG, &schema)
            .await
            .expect("postgres");
        format!("{stream}_{}", store.log_id().await.expect("log id"))
    };
    mayfly_queue::NatsQueue::delete(NATS, &stream)
        .await
        .expect("delete stream");
    let client = async_nats::connect(NATS).await.expect("nats");
    mayfly_cache::NatsCache::delete(client, &format!("{stream}-cache"))
        .await
        .expect("delete the cache bucket");
    mayfly_store::PostgresStore::drop_schema(PG, &schema)
        .await
        .expect("drop schema");
}
