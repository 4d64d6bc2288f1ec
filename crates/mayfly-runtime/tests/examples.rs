//! Every example in `examples/` run on the embedded runtime, with its result asserted,
//! its hash chain verified and its state rebuilt by replay.

use mayfly_dsl::ParseOptions;
use mayfly_engine::{Report, Status};
use mayfly_runtime::{Runtime, RuntimeConfig, load_file};
use mayfly_store::{SqliteStore, Store};
use mayfly_types::EventKind;
use serde_json::{Map, Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

mod common;
use common::{assert_replays, example};

struct Env {
    _dir: tempfile::TempDir,
    store: Arc<SqliteStore>,
    rt: Runtime,
    cache: Arc<CountingCache>,
}

async fn env() -> Env {
    let dir = tempfile::tempdir().expect("tmp");
    let store = Arc::new(
        SqliteStore::open(dir.path().join("m.db"))
            .await
            .expect("store"),
    );
    let cache = Arc::new(CountingCache {
        inner: mayfly_cache::LocalCache::new(dir.path().join("cache")),
        gets: AtomicUsize::new(0),
    });
    let cfg = RuntimeConfig {
        cache: Some(Arc::new(mayfly_cache::Payloads::new(
            cache.clone(),
            mayfly_cache::DEFAULT_INLINE_LIMIT,
        ))),
        ..Default::default()
    };
    let rt = Runtime::start(store.clone(), cfg).expect("runtime");
    Env {
        _dir: dir,
        store,
        rt,
        cache,
    }
}

/// The real local cache, counting reads (to show refs are hydrated only when bound).
struct CountingCache {
    inner: mayfly_cache::LocalCache,
    gets: AtomicUsize,
}

#[async_trait::async_trait]
impl mayfly_cache::Cache for CountingCache {
    async fn put(
        &self,
        tenant: &str,
        digest: &str,
        bytes: bytes::Bytes,
    ) -> Result<(), mayfly_cache::CacheError> {
        self.inner.put(tenant, digest, bytes).await
    }
    async fn get(
        &self,
        tenant: &str,
        digest: &str,
    ) -> Result<Option<bytes::Bytes>, mayfly_cache::CacheError> {
        self.gets.fetch_add(1, Ordering::SeqCst);
        self.inner.get(tenant, digest).await
    }
    async fn list(&self) -> Result<Vec<mayfly_cache::Entry>, mayfly_cache::CacheError> {
        self.inner.list().await
    }
    async fn delete(
        &self,
        tenant: &str,
        digest: &str,
        touched_ms: u64,
    ) -> Result<bool, mayfly_cache::CacheError> {
        self.inner.delete(tenant, digest, touched_ms).await
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

async fn run(env: &Env, name: &str, overrides: Value) -> Report {
    let overrides: Map<String, Value> = overrides.as_object().cloned().unwrap_or_default();
    let opts = ParseOptions {
        extra_vars: overrides.keys().cloned().collect(),
    };
    let pb = load_file(&example(name), &opts).unwrap_or_else(|e| panic!("{e}"));
    let report = env.rt.run(pb, overrides).await.expect("run");
    assert_replays(env.store.as_ref(), &report).await;
    report
}

#[tokio::test]
async fn hello() {
    let env = env().await;
    let r = run(&env, "hello.yaml", json!({})).await;
    assert_eq!(r.status, Status::Completed, "{:?}", r.error);
    assert_eq!(
        r.result,
        json!({"status": "ok", "data": {"message": "Hello World, mayfly!", "chars": 11}})
    );
    assert_eq!(
        r.steps["start"],
        json!({"message": "Hello World", "length": 11})
    );
    let r = run(
        &env,
        "hello.yaml",
        json!({"message": "  Hi  ", "name": "you"}),
    )
    .await;
    assert_eq!(r.result["data"]["message"], json!("Hi, you!"));
    // the print() in the last step was captured into its step.finished event
    let events = env.store.read_all(&r.execution_id).await.expect("events");
    let end = events
        .iter()
        .find(|e| e.kind == EventKind::StepFinished && e.step.as_deref() == Some("end"))
        .expect("end");
    assert_eq!(end.payload["logs"]["stdout"], json!("done: Hi, you!\n"));
}

#[tokio::test]
async fn branching_hot_fans_out_and_joins_once() {
    let env = env().await;
    let r = run(&env, "branching.yaml", json!({})).await;
    assert_eq!(r.status, Status::Completed, "{:?}", r.error);
    assert_eq!(
        r.result,
        json!({"path": "hot", "advice": ["drink water", "close the blinds"]})
    );
    assert!(!r.steps.contains_key("cold_path"));
    let events = env.store.read_all(&r.execution_id).await.expect("events");
    let ends = events
        .iter()
        .filter(|e| e.kind == EventKind::StepFinished && e.step.as_deref() == Some("end"))
        .count();
    assert_eq!(ends, 1, "the join runs exactly once");
    let r = run(&env, "branching.yaml", json!({"temperature_c": 5})).await;
    assert_eq!(r.result, json!({"path": "cold", "advice": ["wear a coat"]}));
    assert!(!r.steps.contains_key("hot_task_a"));
}

#[tokio::test]
async fn loops_sequential_and_parallel() {
    let env = env().await;
    let r = run(&env, "loop.yaml", json!({})).await;
    assert_eq!(r.status, Status::Completed, "{:?}", r.error);
    assert_eq!(
        r.result,
        json!({"adults": ["ann", "cyd"], "order": [0, 1, 2], "sum_of_squares": 204, "squares": [1, 4, 9, 16, 25, 36, 49, 64]})
    );
    // the parallel loop never had more than 4 items claimed at once
    let events = env.store.read_all(&r.execution_id).await.expect("events");
    let mut open = 0i32;
    let mut peak = 0;
    for e in events
        .iter()
        .filter(|e| e.step.as_deref() == Some("squares"))
    {
        match e.kind {
            EventKind::CommandIssued => open += 1,
            EventKind::CommandCompleted => open -= 1,
            _ => {}
        }
        peak = peak.max(open);
    }
    assert_eq!(peak, 4);
}

#[tokio::test]
async fn retry_with_backoff_recovers() {
    let env = env().await;
    let dir = tempfile::tempdir().expect("tmp");
    let r = run(
        &env,
        "retry.yaml",
        json!({"counter_dir": dir.path().display().to_string()}),
    )
    .await;
    assert_eq!(r.status, Status::Completed, "{:?}", r.error);
    assert_eq!(r.result, json!({"recovered_after": 3}));
    assert_eq!(r.ctx["flaky_attempts"], json!(3));
    // Too few attempts: the policy gives up and the execution fails with the python error.
    let r = run(
        &env,
        "retry.yaml",
        json!({"counter_dir": dir.path().display().to_string(), "succeed_on": 9}),
    )
    .await;
    assert_eq!(r.status, Status::Failed);
    let e = r.error.expect("error");
    assert_eq!(e.code, "python_exception");
    assert!(
        e.message.starts_with("RuntimeError: attempt 5 failed"),
        "{}",
        e.message
    );
}

async fn weather_server() -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    use axum::{Json, Router, extract::Query, http::StatusCode, routing::get, routing::post};
    use std::sync::atomic::{AtomicUsize, Ordering};
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let app = Router::new()
        .route(
            "/weather",
            get(
                move |Query(q): Query<std::collections::HashMap<String, String>>| {
                    let h = h.clone();
                    async move {
                        // The first call fails with 503 to exercise the retry rule.
                        if h.fetch_add(1, Ordering::SeqCst) == 0 {
                            return Err(StatusCode::SERVICE_UNAVAILABLE);
                        }
                        Ok(Json(json!({"city": q.get("city"), "temperature": 21.5})))
                    }
                },
            ),
        )
        .route(
            "/reports",
            post(|Json(v): Json<Value>| async move {
                (StatusCode::CREATED, Json(json!({"stored": v})))
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), hits)
}

#[tokio::test]
async fn http_against_a_local_server() {
    let env = env().await;
    let (base, hits) = weather_server().await;
    let r = run(&env, "http.yaml", json!({"base_url": base})).await;
    assert_eq!(r.status, Status::Completed, "{:?}", r.error);
    assert_eq!(
        r.result,
        json!({"temperature": 21.5, "stored": {"city": "Lisbon", "temperature": 21.5}, "status": 201})
    );
    assert_eq!(
        hits.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "one 503, one retry"
    );
}

#[tokio::test]
async fn http_connection_refused_fails_cleanly() {
    let env = env().await;
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    drop(l);
    let r = run(
        &env,
        "http.yaml",
        json!({"base_url": format!("http://127.0.0.1:{port}")}),
    )
    .await;
    assert_eq!(r.status, Status::Failed);
    assert_eq!(r.failed_step.as_deref(), Some("start"));
    assert_eq!(
        r.error.map(|e| e.code),
        Some("connection_failed".to_owned())
    );
}

#[tokio::test]
async fn nested_playbooks_in_a_loop() {
    let env = env().await;
    let r = run(&env, "nested.yaml", json!({})).await;
    assert_eq!(r.status, Status::Completed, "{:?}", r.error);
    assert_eq!(
        r.result,
        json!({"scores": [{"name": "ann", "score": 120}, {"name": "bob", "score": 30}, {"name": "cyd", "score": 70}], "best": "ann"})
    );
    // three child executions, each linked to its parent, each with a valid chain
    let children: Vec<_> = env
        .store
        .list_executions(None, 100)
        .await
        .expect("list")
        .into_iter()
        .filter(|x| x.parent_execution_id.as_ref() == Some(&r.execution_id))
        .collect();
    assert_eq!(children.len(), 3);
    for c in children {
        assert_eq!(c.status, "completed");
        assert_eq!(c.path, "examples/children/user_scorer");
        let ev = env.store.read_all(&c.execution_id).await.expect("events");
        mayfly_trust::verify_chain(&ev).expect("child chain");
    }
}

#[tokio::test]
async fn postgres_through_a_keychain_credential() {
    if !mayfly_testkit::postgres() {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let store = Arc::new(
        SqliteStore::open(dir.path().join("m.db"))
            .await
            .expect("store"),
    );
    let key = mayfly_trust::keychain::MasterKey::generate();
    let sealed = key
        .seal(
            "default",
            "pg_local",
            br#"{"dsn": "postgres://postgres@127.0.0.1:5432/test"}"#,
        )
        .expect("seal");
    let op = mayfly_store::SecretOp::Put {
        tenant: "default".into(),
        alias: "pg_local".into(),
        sealed,
    };
    store
        .append(Arc::new(mayfly_store::Batch {
            secrets: vec![op],
            ..Default::default()
        }))
        .await
        .expect("put");
    let cfg = RuntimeConfig {
        keychain: Some(key),
        ..Default::default()
    };
    let rt = Runtime::start(store.clone(), cfg).expect("rt");
    let pb = load_file(&example("postgres.yaml"), &ParseOptions::default()).expect("pb");
    let r = rt.run(pb, Map::new()).await.expect("run");
    assert_eq!(r.status, Status::Completed, "{:?}", r.error);
    assert_eq!(r.result, json!({"top": "ann", "total": 22, "rows": 3}));
    let events = store.read_all(&r.execution_id).await.expect("events");
    let text = serde_json::to_string(&events).expect("json");
    assert!(
        !text.contains("postgres://postgres@"),
        "the dsn never reaches the log"
    );
}

#[tokio::test]
async fn table_results_travel_by_reference() {
    use mayfly_cache::Cache as _;
    use mayfly_types::{CacheFormat, CacheRef, LoopStarted};
    let env = env().await;
    let r = run(&env, "table.yaml", json!({})).await;
    assert_eq!(r.status, Status::Completed, "{:?}", r.error);
    assert_eq!(
        r.result,
        json!({"n": 1000, "total": 49950.0, "top": "user-321", "evens": 500})
    );
    let events = env.store.read_all(&r.execution_id).await.expect("events");
    let finished = events
        .iter()
        .find(|e| e.kind == EventKind::StepFinished && e.step.as_deref() == Some("start"))
        .expect("start finished");
    assert_eq!(
        finished.payload["result"]["status"], "ok",
        "small fields stay inline"
    );
    let rows = CacheRef::parse(&finished.payload["result"]["rows"]).expect("rows by ref");
    assert_eq!(rows.format, CacheFormat::Arrow);
    assert_eq!(rows.count, Some(1000));
    assert_eq!(rows.columns, vec!["id", "name", "score"]);
    // The stored table is real Arrow IPC holding the rows.
    let bytes = env
        .cache
        .inner
        .get("default", &rows.digest)
        .await
        .expect("cache")
        .expect("stored");
    let table = mayfly_cache::decode(CacheFormat::Arrow, &bytes).expect("arrow");
    assert_eq!(
        table[321],
        json!({"id": 321, "name": "user-321", "score": 99.9})
    );
    // The loop iterates the cached rows without copying them into the log.
    let started = events
        .iter()
        .find(|e| e.kind == EventKind::LoopStarted)
        .expect("loop.started");
    let l: LoopStarted = serde_json::from_value(started.payload.clone()).expect("payload");
    assert!(l.items.is_empty());
    assert_eq!(l.source.map(|s| s.digest), Some(rows.digest.clone()));
    // Items bind a cached row, so they ran on workers rather than inline.
    let issued = events
        .iter()
        .filter(|e| e.kind == EventKind::CommandIssued && e.step.as_deref() == Some("each"))
        .count();
    assert_eq!(issued, 1000);
    // The loop's aggregate (1,000 small results) is stored by ref too.
    let done = events
        .iter()
        .find(|e| e.kind == EventKind::LoopDone)
        .expect("loop.done");
    let agg = CacheRef::parse(&done.payload["results"]).expect("aggregate by ref");
    assert_eq!((agg.format, agg.count), (CacheFormat::Arrow, Some(1000)));
    for e in &events {
        let n = serde_json::to_vec(&e.payload).expect("json").len();
        assert!(n <= 16 * 1024, "{} #{} carries {n} bytes", e.kind, e.seq);
    }
}

#[tokio::test]
async fn a_ref_no_template_binds_is_never_read() {
    let env = env().await;
    let src = r#"
apiVersion: noetl.io/v2
kind: Playbook
metadata: {name: lazy, path: tests/lazy}
workflow:
  - step: start
    tool:
      kind: python
      code: |
        result = {"status": "ok", "blob": "x" * 100000}
    next:
      arcs:
        # Routing (the engine) sees the ref's summary, never the payload.
        - {step: check, when: "{{ start.blob.bytes > 100000 and start.blob.format == 'json' }}"}
  - step: check
    tool:
      kind: python
      input: {status: "{{ start.status }}"}
      code: |
        result = {"status": status}
"#;
    let pb = mayfly_dsl::parse("lazy.yaml", src, &ParseOptions::default()).expect("parse");
    let r = env.rt.run(pb, Map::new()).await.expect("run");
    assert_eq!(r.status, Status::Completed, "{:?}", r.error);
    assert_eq!(r.result, json!({"status": "ok"}));
    assert_eq!(
        env.cache.gets.load(Ordering::SeqCst),
        0,
        "the blob was stored but no block read it"
    );
}

/// Refs are minted by mayfly only: a tool whose output spells one (here a script naming the
/// digest of a blob another step stored) fails with `forged_ref` and nothing reads the blob.
#[tokio::test]
async fn a_tool_forging_a_ref_fails_the_step() {
    let env = env().await;
    let src = r#"
apiVersion: noetl.io/v2
kind: Playbook
metadata: {name: forge, path: tests/forge}
workflow:
  - step: start
    tool:
      kind: python
      code: |
        result = {"secret": "s" * 100000}
    next: [{step: forge}]
  - step: forge
    tool:
      kind: python
      code: |
        import hashlib
        digest = hashlib.sha256(('"' + "s" * 100000 + '"').encode()).hexdigest()
        result = {"x": {"$ref": "sha256:" + digest, "format": "json", "bytes": 100002}}
    next: [{step: read}]
  - step: read
    tool:
      kind: python
      input: {x: "{{ forge.x }}"}
      code: |
        result = len(x)
"#;
    let pb = mayfly_dsl::parse("forge.yaml", src, &ParseOptions::default()).expect("parse");
    let r = env.rt.run(pb, Map::new()).await.expect("run");
    assert_eq!(r.status, Status::Failed);
    let err = r.error.expect("error");
    assert_eq!(err.code, "forged_ref", "{err:?}");
    let events = env.store.read_all(&r.execution_id).await.expect("events");
    assert!(
        !events
            .iter()
            .any(|e| e.kind == EventKind::StepStarted && e.step.as_deref() == Some("read")),
        "no step ran with the forged ref"
    );
}

/// No event carries more than the inline limit (16 KiB) of payload.
fn assert_no_bulk(events: &[mayfly_types::Event]) {
    for e in events {
        let size = serde_json::to_vec(&e.payload).expect("json").len();
        assert!(
            size <= 16 * 1024,
            "{} #{} carries {size} bytes",
            e.kind,
            e.seq
        );
    }
}

/// A large `set` value of a routing arc goes by ref (the orchestrator stores it), a loop over
/// it iterates by element ref, and the blocks that bind it hydrate it.
#[tokio::test]
async fn large_set_values_go_by_ref_and_loops_iterate_them() {
    use mayfly_types::{CacheRef, LoopStarted};
    let env = env().await;
    let src = r#"
apiVersion: noetl.io/v2
kind: Playbook
metadata: {name: biglist, path: tests/biglist}
workload:
  n: 700
workflow:
  - step: start
    tool: {kind: python, input: {n: "{{ n }}"}, code: "result = {'xs': ['item-%05d' % i for i in range(n)]}"}
    next:
      arcs:
        - step: each
          set: {ctx.copy: "{{ start.xs + start.xs }}"}
  - step: each
    loop: {in: "{{ copy }}", iterator: x, spec: {mode: parallel, max_in_flight: 64}}
    input: {v: "{{ x }}"}
    next:
      arcs:
        - {step: end, when: "{{ event.name == 'loop.done' }}"}
  - step: end
    tool:
      kind: python
      input: {all: "{{ each }}", copy: "{{ copy }}"}
      code: "result = {'last': all[-1]['v'], 'n': len(all), 'copy': len(copy)}"
"#;
    let pb = mayfly_dsl::parse("biglist.yaml", src, &ParseOptions::default()).expect("parse");
    let r = env.rt.run(pb, Map::new()).await.expect("run");
    assert_eq!(r.status, Status::Completed, "{:?}", r.error);
    assert_eq!(
        r.result,
        json!({"last": "item-00699", "n": 1400, "copy": 1400})
    );
    assert_replays(env.store.as_ref(), &r).await;
    let events = env.store.read_all(&r.execution_id).await.expect("events");
    let routed = events
        .iter()
        .find(|e| e.kind == EventKind::StepRouted && e.step.as_deref() == Some("start"))
        .expect("routed");
    assert!(
        CacheRef::parse(&routed.payload["set"]["copy"]).is_some(),
        "set value by ref: {}",
        routed.payload
    );
    let started = events
        .iter()
        .find(|e| e.kind == EventKind::LoopStarted)
        .expect("loop.started");
    let l: LoopStarted = serde_json::from_value(started.payload.clone()).expect("payload");
    assert!(l.items.is_empty());
    assert_eq!(l.source.and_then(|s| s.count), Some(1400));
    assert_no_bulk(&events);
}

/// A list the engine computes itself (`range(…)`) over the inline limit leaves the log too
/// when workers consume its items: `loop.started` records a ref, not the list, each block
/// hydrates its element, and the aggregate comes out right. A loop whose items the engine
/// consumes itself (an inline step) keeps its list: the engine never reads the cache.
#[tokio::test]
async fn large_computed_loop_lists_go_by_ref() {
    use mayfly_types::{CacheRef, LoopStarted};
    let env = env().await;
    let src = r#"
apiVersion: noetl.io/v2
kind: Playbook
metadata: {name: biggen, path: tests/biggen}
workload: {n: 4000}
workflow:
  - step: start
    loop: {in: "{{ range(n) }}", iterator: i, spec: {mode: parallel, max_in_flight: 64}}
    tool: {kind: noop, result: "{{ i }}"}
    next:
      arcs:
        - {step: doubled, when: "{{ event.name == 'loop.done' }}"}
  - step: doubled
    loop: {in: "{{ range(n) }}", iterator: i, spec: {mode: parallel, max_in_flight: 64}}
    tool: {kind: python, input: {i: "{{ i }}"}, code: "result = {'v': i * 2}"}
    next:
      arcs:
        - {step: end, when: "{{ event.name == 'loop.done' }}"}
  - step: end
    tool:
      kind: python
      input: {a: "{{ start }}", b: "{{ doubled }}"}
      code: "result = {'a': sum(a), 'b': sum(x['v'] for x in b), 'n': len(b)}"
"#;
    let pb = mayfly_dsl::parse("biggen.yaml", src, &ParseOptions::default()).expect("parse");
    let r = env.rt.run(pb, Map::new()).await.expect("run");
    assert_eq!(r.status, Status::Completed, "{:?}", r.error);
    let sum: i64 = (0..4000).sum();
    assert_eq!(r.result, json!({"a": sum, "b": 2 * sum, "n": 4000}));
    assert_replays(env.store.as_ref(), &r).await;
    let events = env.store.read_all(&r.execution_id).await.expect("events");
    let loop_of = |step: &str| -> LoopStarted {
        let e = events
            .iter()
            .find(|e| e.kind == EventKind::LoopStarted && e.step.as_deref() == Some(step))
            .expect("loop.started");
        serde_json::from_value(e.payload.clone()).expect("payload")
    };
    // Workers consume `doubled`'s items: its list is a ref.
    let l = loop_of("doubled");
    assert!(l.items.is_empty(), "the list is not in the log");
    assert_eq!(l.source.and_then(|s| s.count), Some(4000));
    // The engine completes `start`'s (noop) items itself, with their values.
    let l = loop_of("start");
    assert_eq!((l.items.len(), l.source), (4000, None));
    let inline = events
        .iter()
        .find(|e| e.kind == EventKind::StepFinished && e.step.as_deref() == Some("start"))
        .expect("an item of start");
    assert!(!CacheRef::any_in(&inline.payload), "{}", inline.payload);
    let others: Vec<_> = events
        .iter()
        .filter(|e| e.step.as_deref() != Some("start"))
        .cloned()
        .collect();
    assert_no_bulk(&others);
    // A list under the limit stays inline.
    let small = src.replace("{n: 4000}", "{n: 10}");
    let pb = mayfly_dsl::parse("biggen.yaml", &small, &ParseOptions::default()).expect("parse");
    let r = env.rt.run(pb, Map::new()).await.expect("run");
    assert_eq!(r.result, json!({"a": 45, "b": 90, "n": 10}));
    let events = env.store.read_all(&r.execution_id).await.expect("events");
    let started = events
        .iter()
        .find(|e| e.kind == EventKind::LoopStarted)
        .expect("loop.started");
    assert_eq!(started.payload["items"], json!((0..10).collect::<Vec<_>>()));
}

/// A large workload value goes by ref too (the request's event stays small): a loop iterates
/// it by element ref, an inline step routing on it sees its summary, and the blocks that bind
/// it hydrate it. Small workload values stay inline.
#[tokio::test]
async fn large_workload_values_go_by_ref() {
    use mayfly_types::CacheRef;
    let env = env().await;
    let src = r#"
apiVersion: noetl.io/v2
kind: Playbook
metadata: {name: bigwork, path: tests/bigwork}
workload: {users: [], tag: small}
workflow:
  - step: start
    loop:
      in: "{{ users }}"
      iterator: u
      spec: {mode: parallel, max_in_flight: 8}
    tool:
      kind: python
      input: {u: "{{ u }}"}
      code: "result = u['age']"
    next:
      arcs:
        - {step: end, when: "{{ event.name == 'loop.done' }}"}
  - step: end
    tool:
      kind: python
      input: {ages: "{{ start }}", users: "{{ users }}", tag: "{{ tag }}"}
      code: "result = {'sum': sum(ages), 'n': len(users), 'tag': tag}"
"#;
    let opts = ParseOptions {
        extra_vars: vec!["users".into()],
    };
    let pb = mayfly_dsl::parse("bigwork.yaml", src, &opts).expect("parse");
    let users: Vec<Value> = (0..600)
        .map(|i| json!({"name": format!("user-{i:05}"), "age": i % 90, "bio": "x".repeat(40)}))
        .collect();
    let expected: i64 = (0..600).map(|i| i % 90).sum();
    let mut ov = Map::new();
    ov.insert("users".into(), Value::Array(users));
    let r = env.rt.run(pb, ov).await.expect("run");
    assert_eq!(r.status, Status::Completed, "{:?}", r.error);
    assert_eq!(r.result, json!({"sum": expected, "n": 600, "tag": "small"}));
    assert_replays(env.store.as_ref(), &r).await;
    let events = env.store.read_all(&r.execution_id).await.expect("events");
    let req = &events[0];
    assert_eq!(req.kind, EventKind::ExecutionRequested);
    assert!(
        CacheRef::parse(&req.payload["workload"]["users"]).is_some(),
        "the large value is a ref: {}",
        req.payload
    );
    assert_eq!(req.payload["workload"]["tag"], "small");
    assert_no_bulk(&events);
}
