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
