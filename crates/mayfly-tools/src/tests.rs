use crate::*;
use serde_json::json;

fn input(v: Value) -> Map<String, Value> {
    v.as_object().cloned().unwrap_or_default()
}

fn tools(pool: usize) -> Tools {
    Tools::new(ToolsConfig {
        python_pool: pool,
        ..Default::default()
    })
    .expect("tools")
}

async fn py(t: &Tools, code: &str, inp: Value) -> ToolOutput {
    let cfg = input(json!({ "code": code }));
    t.run("python", &cfg, &input(inp), Some(Duration::from_secs(10)))
        .await
}

#[tokio::test]
async fn python_result_assignment_and_globals() {
    let t = tools(1);
    let o = py(
        &t,
        "result = {'msg': message.upper(), 'n': n + 1}",
        json!({"message": "hi", "n": 1}),
    )
    .await;
    assert!(o.ok, "{o:?}");
    assert_eq!(o.data, json!({"msg": "HI", "n": 2}));
}

#[tokio::test]
async fn python_top_level_return_with_input_data() {
    let t = tools(1);
    let code =
        "x = input_data.get('x', 0)\nif x > 1:\n    return {'big': x}\nreturn {'small': x}\n";
    assert_eq!(py(&t, code, json!({"x": 5})).await.data, json!({"big": 5}));
    assert_eq!(
        py(&t, code, json!({"x": 0})).await.data,
        json!({"small": 0})
    );
    // A return only inside a def is not top-level: plain exec semantics.
    let o = py(&t, "def f():\n    return 3\nresult = f()", json!({})).await;
    assert_eq!(o.data, json!(3));
    // main(**input) convention
    let o = py(
        &t,
        "def main(a, b):\n    return a * b",
        json!({"a": 6, "b": 7}),
    )
    .await;
    assert_eq!(o.data, json!(42));
}

#[tokio::test]
async fn python_exceptions_become_errors_with_traceback() {
    let t = tools(1);
    let o = py(&t, "print('before')\nraise ValueError('nope')", json!({})).await;
    assert!(!o.ok);
    let e = o.error.expect("error");
    assert_eq!(e.code, "python_exception");
    assert_eq!(e.message, "ValueError: nope");
    assert!(
        e.detail
            .as_ref()
            .and_then(Value::as_str)
            .is_some_and(|tb| tb.contains("Traceback"))
    );
    assert_eq!(o.logs.expect("logs")["stdout"], json!("before\n"));
    // the interpreter survives and is reused
    assert!(py(&t, "result = 1", json!({})).await.ok);
    let o = py(&t, "result = (", json!({})).await;
    assert_eq!(
        o.error.map(|e| e.message.starts_with("SyntaxError")),
        Some(true)
    );
}

/// The driver swaps the step's stdout/stderr in and out itself: whatever the step does to
/// them, or however it ends, the protocol and the next step's capture stay intact.
#[tokio::test]
async fn python_output_capture_survives_what_steps_do() {
    let t = tools(1);
    let o = py(
        &t,
        "import sys\nprint('out')\nprint('err', file=sys.stderr)\nresult = {'s': {1}}",
        json!({}),
    )
    .await;
    assert!(o.ok, "{:?}", o.error);
    // Not JSON-native: encoded with str(), as before.
    assert_eq!(o.data, json!({"s": "{1}"}));
    let logs = o.logs.expect("logs");
    assert_eq!(
        (&logs["stdout"], &logs["stderr"]),
        (&json!("out\n"), &json!("err\n"))
    );
    let o = py(
        &t,
        "import sys\nsys.stdout = None\nraise SystemExit(3)",
        json!({}),
    )
    .await;
    assert_eq!(
        o.error.map(|e| (e.code, e.message)),
        Some(("python_exception".into(), "SystemExit: 3".into()))
    );
    let o = py(&t, "a = []\na.append(a)\nresult = a", json!({})).await;
    assert_eq!(
        o.error.map(|e| e.message),
        Some("ValueError: Circular reference detected".into())
    );
    // The same interpreter, its streams restored.
    let o = py(&t, "print('again')\nresult = 2", json!({})).await;
    assert_eq!((o.ok, &o.data), (true, &json!(2)));
    assert_eq!(o.logs.expect("logs")["stdout"], json!("again\n"));
}

#[tokio::test]
async fn python_pool_is_warm_and_isolated() {
    let t = tools(1);
    t.python.warm().await.expect("warm");
    let a = py(&t, "import os\nleak = 1\nresult = os.getpid()", json!({}))
        .await
        .data;
    let b = py(
        &t,
        "import os\nresult = [os.getpid(), 'leak' in globals()]",
        json!({}),
    )
    .await
    .data;
    assert_eq!(b, json!([a, false]), "same interpreter, fresh globals");
}

#[tokio::test]
async fn python_reruns_of_one_step_share_its_compiled_code_not_its_state() {
    let t = tools(1);
    let code = "seen = globals().get('seen', 0) + 1\nif n < 0:\n    raise ValueError(n)\nresult = [n * 2, seen]";
    for n in [1, 2, 3] {
        let o = py(&t, code, json!({"n": n})).await;
        assert_eq!(
            o.data,
            json!([n * 2, 1]),
            "run {n}: fresh globals, its own input"
        );
    }
    // Another step ran in between; the cached step's traceback still shows its own line.
    assert!(py(&t, "result = 'other'", json!({})).await.ok);
    let o = py(&t, code, json!({"n": -1})).await;
    let tb = o
        .error
        .and_then(|e| e.detail)
        .and_then(|d| d.as_str().map(str::to_owned))
        .unwrap_or_default();
    assert!(tb.contains("raise ValueError(n)"), "{tb}");
    // Top-level return wraps the code in a function; cached the same way.
    for n in [4, 5] {
        let o = py(&t, "return n + 1", json!({"n": n})).await;
        assert_eq!(o.data, json!(n + 1));
    }
}

#[tokio::test]
async fn python_timeout_kills_and_replaces_the_interpreter() {
    let t = tools(1);
    let pid = py(&t, "import os\nresult = os.getpid()", json!({}))
        .await
        .data;
    let cfg = input(json!({"code": "import time\ntime.sleep(30)"}));
    let o = t
        .run(
            "python",
            &cfg,
            &Map::new(),
            Some(Duration::from_millis(300)),
        )
        .await;
    assert_eq!(o.error.map(|e| e.code), Some("timeout".to_owned()));
    let pid2 = py(&t, "import os\nresult = os.getpid()", json!({}))
        .await
        .data;
    assert_ne!(pid, pid2, "a timed-out interpreter is never reused");
}

#[tokio::test]
async fn python_stray_stdout_does_not_break_the_protocol() {
    let t = tools(1);
    let o = py(
        &t,
        "import os\nos.write(1, b'raw line\\n')\nresult = 'fine'",
        json!({}),
    )
    .await;
    assert_eq!(o.data, json!("fine"));
    let o = py(&t, "import os\nos._exit(3)", json!({})).await;
    assert_eq!(o.error.map(|e| e.code), Some("python_crashed".to_owned()));
    assert!(
        py(&t, "result = 2", json!({})).await.ok,
        "pool recovers after a crash"
    );
}

#[tokio::test]
async fn shell_runs_commands_in_order() {
    let t = tools(1);
    let cfg = input(
        json!({"cmds": ["echo one", "echo $GREETING >&2", "echo two"], "env": {"GREETING": "hey"}}),
    );
    let o = t.run("shell", &cfg, &Map::new(), None).await;
    assert!(o.ok);
    assert_eq!(o.data["stdout"], json!("one\ntwo\n"));
    assert_eq!(o.data["stderr"], json!("hey\n"));
    assert_eq!(o.data["exit_code"], json!(0));
    assert_eq!(o.data["returncode"], json!(0));
    let cmds = o.data["commands"].as_array().expect("commands");
    assert_eq!(cmds.len(), 3);
    assert_eq!(cmds[1]["cmd"], json!("echo $GREETING >&2"));
    assert_eq!(cmds[1]["stderr"], json!("hey\n"));
    let cfg = input(json!({"cmds": ["echo a", "exit 3", "echo never"]}));
    let o = t.run("shell", &cfg, &Map::new(), None).await;
    assert!(!o.ok);
    assert_eq!(o.data["exit_code"], json!(3));
    assert_eq!(o.data["stdout"], json!("a\n"));
    let cfg = input(json!({"command": "sleep 5"}));
    let o = t
        .run("shell", &cfg, &Map::new(), Some(Duration::from_millis(200)))
        .await;
    assert_eq!(o.error.map(|e| e.code), Some("timeout".to_owned()));
}

async fn server() -> String {
    use axum::{Json, Router, extract::Query, http::StatusCode, routing::get, routing::post};
    let app = Router::new()
        .route(
            "/hello",
            get(
                |Query(q): Query<std::collections::HashMap<String, String>>| async move {
                    Json(json!({"hello": q.get("name")}))
                },
            ),
        )
        .route(
            "/echo",
            post(|Json(v): Json<Value>| async move { Json(json!({"got": v})) }),
        )
        .route(
            "/fail",
            get(|| async { (StatusCode::SERVICE_UNAVAILABLE, "down") }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

#[tokio::test]
async fn http_get_post_and_errors() {
    let t = tools(1);
    let base = server().await;
    let cfg = input(json!({"url": format!("{base}/hello"), "params": {"name": "ann"}}));
    let o = t.run("http", &cfg, &Map::new(), None).await;
    assert!(o.ok, "{o:?}");
    assert_eq!(o.data["status_code"], json!(200));
    assert_eq!(o.data["data"], json!({"hello": "ann"}));
    assert_eq!(o.data["body"], json!({"hello": "ann"}));
    assert!(o.data["elapsed"].as_f64().is_some());
    assert_eq!(o.as_output()["http"]["status"], json!(200));
    assert_eq!(o.as_output()["status"], json!("success"));
    assert_eq!(o.as_output()["error"], Value::Null);
    let cfg = input(
        json!({"url": format!("{base}/echo"), "method": "post", "json": {"a": [1, 2]}, "headers": {"x-t": "1"}}),
    );
    assert_eq!(
        t.run("http", &cfg, &Map::new(), None).await.data["data"],
        json!({"got": {"a": [1, 2]}})
    );
    let cfg = input(json!({"url": format!("{base}/fail")}));
    let o = t.run("http", &cfg, &Map::new(), None).await;
    assert!(!o.ok);
    assert_eq!(o.data["body"], json!("down"));
    assert_eq!(o.as_output()["status"], json!("error"));
    assert_eq!(o.as_output()["http"]["status"], json!(503));
    assert_eq!(o.as_output()["error"]["kind"], json!("server_error"));
    assert_eq!(o.as_output()["error"]["retryable"], json!(true));
    assert_eq!(o.as_output()["error"]["status"], json!(503));
    assert_eq!(o.as_output()["response"]["status_code"], json!(503));
    // connection refused: a port nobody listens on
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    drop(l);
    let cfg = input(json!({"url": format!("http://127.0.0.1:{port}/x")}));
    let o = t.run("http", &cfg, &Map::new(), None).await;
    assert_eq!(o.as_output()["error"]["kind"], json!("connection"));
    let e = o.error.expect("error");
    assert_eq!(e.code, "connection_failed");
    assert!(
        e.message.to_lowercase().contains("refused"),
        "{}",
        e.message
    );
}

fn pg() -> Option<Value> {
    if !mayfly_testkit::postgres() {
        return None;
    }
    Some(json!({"host": "127.0.0.1", "port": 5432, "user": "postgres", "database": "test"}))
}

#[tokio::test]
async fn postgres_commands_queries_params_and_types() {
    let Some(cred) = pg() else { return };
    let t = tools(1);
    let table = format!("mayfly_tool_t_{}", std::process::id());
    let auth = input(json!({ "auth": cred }));
    let run = |cfg: Value| {
        let cfg = input(cfg);
        let auth = auth.clone();
        let t = &t;
        async move {
            t.run("postgres", &cfg, &auth, Some(Duration::from_secs(20)))
                .await
        }
    };
    let o = run(json!({"command": format!("DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (id int primary key, name text, score numeric(6,2), meta jsonb, at timestamptz default '2026-01-02T03:04:05Z')")})).await;
    assert!(o.ok, "{o:?}");
    let o = run(json!({"command": format!("INSERT INTO {table} (id, name, score, meta) VALUES ($1, $2, $3, $4::jsonb), ($5, $6, $7, $8::jsonb)"),
        "params": [1, "ann", 12.5, {"tags": ["a"]}, 2, "bob", 3, null]})).await;
    assert!(o.ok, "{o:?}");
    assert_eq!(o.data["affected_rows"], json!(2));
    assert_eq!(o.data["command_0"]["affected_rows"], json!(2));
    let o = run(json!({"query": format!("SELECT id, name, score, meta, at FROM {table} WHERE id >= $1 ORDER BY id;"), "params": [1]})).await;
    assert!(o.ok, "{o:?}");
    assert_eq!(
        o.data["columns"],
        json!(["id", "name", "score", "meta", "at"])
    );
    assert_eq!(o.data["row_count"], json!(2));
    assert_eq!(
        o.data["rows"],
        json!([
            {"id": 1, "name": "ann", "score": "12.50", "meta": {"tags": ["a"]}, "at": "2026-01-02T03:04:05+00:00"},
            {"id": 2, "name": "bob", "score": "3.00", "meta": null, "at": "2026-01-02T03:04:05+00:00"}
        ]),
        "numeric is an exact decimal string (NoETL)"
    );
    let o = run(json!({"query": format!("INSERT INTO {table} (id, name) VALUES (3, 'cyd') RETURNING id, name")})).await;
    assert_eq!(
        o.data["rows"],
        json!([{"id": 3, "name": "cyd"}]),
        "INSERT … RETURNING keeps its rows"
    );
    let o = run(json!({"query": format!("SELECT * FROM {table} WHERE id > 100")})).await;
    assert_eq!(o.data["rows"], json!([]));
    assert_eq!(o.data["row_count"], json!(0));
    let o = run(json!({"query": "SELEC nope"})).await;
    let e = o.error.expect("error");
    assert_eq!(e.code, "postgres_error");
    assert!(e.message.contains("SQLSTATE 42601"), "{}", e.message);
    let o = run(json!({"command": format!("INSERT INTO {table} (id) VALUES (1)")})).await;
    assert_eq!(o.as_output()["pg"]["sqlstate"], json!("23505"));
    assert_eq!(o.as_output()["error"]["kind"], json!("db_constraint"));
    assert!(o.error.expect("dup").message.contains("23505"));
    let o = run(json!({"command": format!("DROP TABLE {table}")})).await;
    assert!(o.ok);
    // A credential that cannot connect fails cleanly.
    let bad = input(json!({"auth": {"host": "127.0.0.1", "port": 1, "user": "x"}}));
    let o = t
        .run(
            "postgres",
            &input(json!({"query": "select 1"})),
            &bad,
            Some(Duration::from_secs(2)),
        )
        .await;
    assert_eq!(
        o.error.map(|e| e.code),
        Some("connection_failed".to_owned())
    );
    let o = t
        .run(
            "postgres",
            &input(json!({"query": "select 1"})),
            &Map::new(),
            None,
        )
        .await;
    assert_eq!(o.error.map(|e| e.code), Some("bad_config".to_owned()));
}

/// Steps queued for one interpreter are written to it together. The ones behind a step that
/// times out, or that crashes the interpreter, had not started: they run on its replacement,
/// each once, with its own result.
#[tokio::test]
async fn python_steps_queued_behind_a_failure_run_on_the_replacement() {
    let t = tools(1);
    let pool = &t.python;
    let long = Duration::from_secs(20);
    let pid = "import os\nresult = [i, os.getpid()]";
    for failing in [
        ("import time\ntime.sleep(30)", "timeout"),
        ("import os\nos._exit(3)", "python_crashed"),
    ] {
        let before = pool.run(pid, &json!({"i": 0}), long).await.data[1].clone();
        // All queued before the interpreter takes any: one batch, the failure second.
        let (i1, i2, i3, none) = (json!({"i": 1}), json!({"i": 2}), json!({"i": 3}), json!({}));
        let (a, bad, b, c) = tokio::join!(
            pool.run(pid, &i1, long),
            pool.run(failing.0, &none, Duration::from_millis(500)),
            pool.run(pid, &i2, long),
            pool.run(pid, &i3, long)
        );
        assert_eq!(bad.error.map(|e| e.code), Some(failing.1.to_owned()));
        assert_eq!(
            a.data,
            json!([1, before]),
            "ran before the failure, same interpreter"
        );
        for (i, o) in [(2, &b), (3, &c)] {
            assert!(o.ok, "{:?}", o.error);
            assert_eq!(o.data[0], json!(i));
            assert_ne!(
                o.data[1], before,
                "queued behind the failure: ran on the replacement"
            );
        }
        assert_eq!(b.data[1], c.data[1]);
    }
}

/// Many steps with large inputs and outputs queued at once: the batches written to an
/// interpreter stay within its pipe, so neither side blocks the other.
#[tokio::test]
async fn python_queued_steps_with_large_payloads_do_not_deadlock() {
    let t = tools(2);
    let blob = "x".repeat(20_000);
    let runs = (0..24).map(|i| {
        let input = json!({"i": i, "blob": blob});
        let pool = &t.python;
        async move {
            pool.run(
                "result = [i, len(blob), blob * 5]",
                &input,
                Duration::from_secs(30),
            )
            .await
        }
    });
    let outs = tokio::time::timeout(
        Duration::from_secs(60),
        futures_util::future::join_all(runs),
    )
    .await
    .expect("no deadlock");
    for (i, o) in outs.iter().enumerate() {
        assert!(o.ok, "{:?}", o.error);
        assert_eq!(o.data[0], json!(i));
        assert_eq!(o.data[1], json!(20_000));
        assert_eq!(o.data[2].as_str().map(str::len), Some(100_000));
    }
}

async fn duck(t: &Tools, cfg: Value) -> ToolOutput {
    t.run(
        "duckdb",
        &input(cfg),
        &Map::new(),
        Some(Duration::from_secs(30)),
    )
    .await
}

#[tokio::test]
async fn duckdb_maps_values_as_the_postgres_tool_does() {
    if !mayfly_testkit::duckdb() {
        return;
    }
    let t = tools(1);
    let o = duck(
        &t,
        json!({"query": "select 12345678901234567890123::hugeint as big, 1.25::decimal(5,2) as d, \
                 timestamp '2026-01-02 03:04:05.5' as ts, date '2026-01-02' as day, \
                 'abc'::blob as b, [1, 2] as l, {'k': 'v'} as s, 'nan'::double as f, \
                 null as n, interval 90 second as i"}),
    )
    .await;
    assert!(o.ok, "{o:?}");
    assert_eq!(
        o.data["rows"][0],
        json!({"big": "12345678901234567890123", "d": "1.25", "ts": "2026-01-02T03:04:05.500000",
               "day": "2026-01-02", "b": "YWJj", "l": [1, 2], "s": {"k": "v"}, "f": null,
               "n": null, "i": 90.0})
    );
    assert_eq!(o.data["statement_count"], json!(1));
}

#[tokio::test]
async fn duckdb_refuses_bad_config_before_running() {
    let t = tools(1);
    for (cfg, want) in [
        (json!({}), "needs `query`"),
        (
            json!({"query": "select 1", "tables": {"x y": [{"a": 1}]}}),
            "identifier",
        ),
        (json!({"query": "select 1", "tables": {"t": []}}), "no rows"),
        (
            json!({"query": "select 1", "tables": {"t": [1, 2]}}),
            "list of records",
        ),
        (
            json!({"query": "select 1", "as_objects": "yes"}),
            "true or false",
        ),
    ] {
        let o = duck(&t, cfg.clone()).await;
        let e = o.error.expect("an error");
        assert_eq!(e.code, "bad_config", "{cfg}");
        assert!(e.message.contains(want), "{cfg}: {}", e.message);
    }
}

#[tokio::test]
async fn duckdb_params_refuse_a_script() {
    if !mayfly_testkit::duckdb() {
        return;
    }
    let t = tools(1);
    let o = duck(&t, json!({"query": "select ?; select 2", "params": [1]})).await;
    let e = o.error.expect("an error");
    assert_eq!(e.code, "duckdb_error");
    assert!(
        e.message.contains("bind a single statement"),
        "{}",
        e.message
    );
}

#[tokio::test]
async fn duckdb_without_its_package_says_how_to_install_it() {
    // An interpreter that cannot see site-packages stands for a machine without duckdb.
    let dir = std::env::temp_dir().join(format!("mayfly_noduck_{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let py = dir.join("python-no-site");
    std::fs::write(&py, "#!/bin/sh\nexec python3 -S \"$@\"\n").expect("write");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&py, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let t = Tools::new(ToolsConfig {
        python: py.display().to_string(),
        python_pool: 1,
        ..Default::default()
    })
    .expect("tools");
    let o = duck(&t, json!({"query": "select 1"})).await;
    let _ = std::fs::remove_dir_all(&dir);
    let e = o.error.clone().expect("an error");
    assert_eq!(e.code, "tool_unavailable", "{e:?}");
    assert!(e.message.contains("-m pip install duckdb"), "{}", e.message);
    assert_eq!(o.as_output()["error"]["kind"], json!("config"));
}

async fn nats_op(t: &Tools, cfg: Value) -> ToolOutput {
    let mut cfg = input(cfg);
    cfg.insert("url".into(), json!(mayfly_testkit::nats_url()));
    t.run("nats", &cfg, &Map::new(), Some(Duration::from_secs(10)))
        .await
}

#[tokio::test]
async fn nats_kv_object_and_jetstream_operations_have_noetls_shapes() {
    if !mayfly_testkit::nats() {
        return;
    }
    let client = async_nats::connect(mayfly_testkit::nats_url())
        .await
        .expect("nats");
    let js = async_nats::jetstream::new(client.clone());
    let bucket = mayfly_testkit::unique("tool_kv");
    mayfly_testkit::nats_kv_bucket(&js, &bucket).await;
    let t = tools(1);

    let o = nats_op(
        &t,
        json!({"operation": "kv_put", "bucket": bucket, "key": "a.b", "value": {"n": 1}}),
    )
    .await;
    assert!(o.ok, "{o:?}");
    assert_eq!(o.data["status"], json!("success"));
    assert!(o.data["revision"].as_u64().is_some_and(|r| r >= 1));
    nats_op(
        &t,
        json!({"operation": "kv_put", "bucket": bucket, "key": "c", "value": "text"}),
    )
    .await;
    let o = nats_op(
        &t,
        json!({"operation": "kv_get", "bucket": bucket, "key": "a.b"}),
    )
    .await;
    assert_eq!(
        o.data,
        json!({"status": "success", "bucket": bucket, "key": "a.b", "value": {"n": 1}})
    );
    let o = nats_op(
        &t,
        json!({"operation": "kv_get", "bucket": bucket, "key": "c"}),
    )
    .await;
    assert_eq!(o.data["value"], json!("text"));
    let o = nats_op(
        &t,
        json!({"operation": "kv_keys", "bucket": bucket, "pattern": "a*"}),
    )
    .await;
    assert_eq!(o.data["keys"], json!(["a.b"]));
    assert_eq!(o.data["count"], json!(1));
    nats_op(
        &t,
        json!({"operation": "kv_delete", "bucket": bucket, "key": "c"}),
    )
    .await;
    let o = nats_op(
        &t,
        json!({"operation": "kv_get", "bucket": bucket, "key": "c"}),
    )
    .await;
    assert!(o.ok, "a missing key is a result, not a failure: {o:?}");
    assert_eq!(o.data["status"], json!("not_found"));
    assert_eq!(o.data["value"], Value::Null);

    let objects = mayfly_testkit::unique("tool_obj");
    js.create_object_store(async_nats::jetstream::object_store::Config {
        bucket: objects.clone(),
        ..Default::default()
    })
    .await
    .expect("object bucket");
    let o = nats_op(&t, json!({"operation": "object_put", "bucket": objects, "name": "f", "data": "aGVsbG8=", "encoding": "base64"})).await;
    assert_eq!(o.data["size"], json!(5), "{o:?}");
    let o = nats_op(
        &t,
        json!({"operation": "object_get", "bucket": objects, "name": "f"}),
    )
    .await;
    assert_eq!(o.data["data"], json!("hello"));
    let o = nats_op(&t, json!({"operation": "object_list", "bucket": objects})).await;
    assert_eq!(o.data["count"], json!(1));
    assert_eq!(o.data["objects"][0]["name"], json!("f"));

    let stream = mayfly_testkit::unique("TOOLS");
    let subject = format!("{stream}.events");
    let s = js
        .create_stream(async_nats::jetstream::stream::Config {
            name: stream.clone(),
            subjects: vec![subject.clone()],
            ..Default::default()
        })
        .await
        .expect("stream");
    s.create_consumer(async_nats::jetstream::consumer::pull::Config {
        durable_name: Some("c".into()),
        ..Default::default()
    })
    .await
    .expect("consumer");
    for i in 0..3 {
        let o = nats_op(&t, json!({"operation": "js_publish", "subject": subject, "data": {"i": i}, "headers": {"h": "v"}})).await;
        assert_eq!(o.data["seq"], json!(i + 1), "{o:?}");
        assert_eq!(o.data["stream"], json!(stream));
    }
    let o = nats_op(
        &t,
        json!({"operation": "js_get_msg", "stream": stream, "last": true}),
    )
    .await;
    assert_eq!(o.data["data"], json!({"i": 2}), "{o:?}");
    assert_eq!(o.data["seq"], json!(3));
    let o = nats_op(&t, json!({"operation": "js_consume", "stream": stream, "consumer": "c", "batch": 2, "timeout_ms": 500})).await;
    assert_eq!(o.data["count"], json!(2), "{o:?}");
    assert_eq!(o.data["messages"][0]["data"], json!({"i": 0}));
    assert_eq!(o.data["messages"][0]["headers"]["h"], json!("v"));
    // Bounded: an idle consumer answers within its wait (capped at 5 s), empty.
    let started = std::time::Instant::now();
    let o = nats_op(
        &t,
        json!({"operation": "js_consume", "stream": stream, "consumer": "c", "timeout_ms": 60000}),
    )
    .await;
    assert_eq!(o.data["count"], json!(1), "{o:?}");
    let o = nats_op(
        &t,
        json!({"operation": "js_consume", "stream": stream, "consumer": "c", "timeout_ms": 60000}),
    )
    .await;
    assert_eq!(o.data["count"], json!(0), "{o:?}");
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "{:?}",
        started.elapsed()
    );
    let o = nats_op(&t, json!({"operation": "js_stream_info", "stream": stream})).await;
    assert_eq!(o.data["state"]["messages"], json!(3), "{o:?}");

    let _ = js.delete_stream(format!("KV_{bucket}")).await;
    let _ = js.delete_object_store(&objects).await;
    let _ = js.delete_stream(&stream).await;
}

#[tokio::test]
async fn nats_request_reply_and_its_failures() {
    if !mayfly_testkit::nats() {
        return;
    }
    let client = async_nats::connect(mayfly_testkit::nats_url())
        .await
        .expect("nats");
    let subject = mayfly_testkit::unique("tool.echo");
    let mut sub = client.subscribe(subject.clone()).await.expect("sub");
    let responder = client.clone();
    tokio::spawn(async move {
        use futures_util::StreamExt;
        while let Some(m) = sub.next().await {
            if let Some(reply) = m.reply {
                let body = format!("{{\"got\": {}}}", String::from_utf8_lossy(&m.payload));
                let _ = responder.publish(reply, body.into()).await;
            }
        }
    });
    client.flush().await.expect("flush");
    let t = tools(1);
    let o = nats_op(
        &t,
        json!({"operation": "request", "subject": subject, "data": {"q": 1}}),
    )
    .await;
    assert!(o.ok, "{o:?}");
    assert_eq!(o.data["data"], json!({"got": {"q": 1}}));

    let o = nats_op(
        &t,
        json!({"operation": "request", "subject": mayfly_testkit::unique("nobody.home")}),
    )
    .await;
    let e = o.error.clone().expect("no responders");
    assert_eq!(e.code, "not_found", "{e:?}");
    assert_eq!(o.as_output()["error"]["kind"], json!("not_found"));

    let o = nats_op(
        &t,
        json!({"operation": "kv_get", "bucket": "no_such_bucket_here", "key": "k"}),
    )
    .await;
    assert_eq!(o.error.expect("no bucket").code, "nats_error");
    let o = nats_op(&t, json!({"operation": "kv_gett"})).await;
    let e = o.error.expect("unknown op");
    assert_eq!(e.code, "bad_config");
    assert!(e.message.contains("kv_get"), "{}", e.message);
}

#[tokio::test]
async fn nats_unreachable_server_is_a_connection_failure() {
    let t = tools(1);
    let mut cfg = input(json!({"operation": "kv_get", "bucket": "b", "key": "k"}));
    // A port nothing listens on.
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    drop(l);
    cfg.insert("url".into(), json!(format!("nats://127.0.0.1:{port}")));
    let o = t
        .run("nats", &cfg, &Map::new(), Some(Duration::from_secs(5)))
        .await;
    let e = o.error.clone().expect("an error");
    assert_eq!(e.code, "connection_failed", "{e:?}");
    assert_eq!(o.as_output()["error"]["kind"], json!("connection"));
    assert_eq!(o.as_output()["error"]["retryable"], json!(true));
}
