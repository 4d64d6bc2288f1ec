//! The `mayfly` binary end to end: run, validate, events, replay, resume — including a real
//! `kill -9` of a running process and recovery from its log.

mod common;

use common::{Running, bin, start_server};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json(o: &Output) -> Value {
    serde_json::from_str(out(o).trim())
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}\nstderr: {}", out(o), err(o)))
}

fn last_execution(db: &Path) -> String {
    let o = bin()
        .args(["executions", "--db"])
        .arg(db)
        .output()
        .expect("executions");
    assert!(o.status.success(), "{}", err(&o));
    out(&o)
        .split_whitespace()
        .next()
        .expect("an execution")
        .to_owned()
}

/// `mayfly run FILE --db DB --json`, which must succeed; its report.
fn run_json(file: &Path, db: &Path) -> Value {
    let o = bin()
        .arg("run")
        .arg(file)
        .arg("--db")
        .arg(db)
        .arg("--json")
        .output()
        .expect("run");
    assert!(o.status.success(), "{}", err(&o));
    json(&o)
}

/// `mayfly events ID --json --db DB`, parsed.
fn events_json(db: &Path, id: &str) -> Vec<Value> {
    let o = bin()
        .args(["events", id, "--json", "--db"])
        .arg(db)
        .output()
        .expect("events");
    assert!(o.status.success(), "{}", err(&o));
    out(&o)
        .lines()
        .map(|l| serde_json::from_str(l).expect("event json"))
        .collect()
}

#[test]
fn run_prints_result_and_replay_reproduces_it() {
    let dir = tempfile::tempdir().expect("tmp");
    let db = dir.path().join("m.db");
    let report = run_json(&examples().join("loop.yaml"), &db);
    assert_eq!(report["status"], "completed");
    assert_eq!(report["result"]["sum_of_squares"], 204);
    let id = report["execution_id"].as_str().expect("id");
    let r = bin()
        .args(["replay", id, "--json", "--db"])
        .arg(&db)
        .output()
        .expect("replay");
    assert!(r.status.success(), "{}", err(&r));
    assert_eq!(json(&r), report, "replay prints the same final state");
    let lines = events_json(&db, id);
    assert_eq!(lines.len() as u64, report["events"].as_u64().expect("n"));
    assert_eq!(lines[0]["kind"], "execution.requested");
    assert_eq!(
        lines.last().map(|l| l["kind"].clone()),
        Some(Value::from("execution.completed"))
    );
}

#[test]
fn set_overrides_and_exit_codes() {
    let o = bin()
        .arg("run")
        .arg(examples().join("hello.yaml"))
        .args(["--set", "name=crew", "--set", "message=Yo"])
        .output()
        .expect("run");
    assert!(o.status.success(), "{}", err(&o));
    let result: Value = serde_json::from_str(&out(&o)).expect("result json");
    assert_eq!(result["data"]["message"], "Yo, crew!");
    let dir = tempfile::tempdir().expect("tmp");
    let o = bin()
        .arg("run")
        .arg(examples().join("retry.yaml"))
        .args(["--json", "--set", "succeed_on=9", "--set"])
        .arg(format!("counter_dir={}", dir.path().display()))
        .output()
        .expect("run");
    assert_eq!(
        o.status.code(),
        Some(1),
        "a failed execution exits non-zero"
    );
    assert_eq!(json(&o)["status"], "failed");
}

#[test]
fn validate_reports_file_line_col() {
    let dir = tempfile::tempdir().expect("tmp");
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {name: x}\nworkflow:\n  - step: start\n    tool: {kind: python, code: x}\n    next: [nowhere]\n").expect("write");
    let o = bin().arg("validate").arg(&bad).output().expect("validate");
    assert_eq!(o.status.code(), Some(2));
    assert!(
        err(&o).contains(&format!("{}:7:", bad.display())),
        "{}",
        err(&o)
    );
    assert!(err(&o).contains("unknown step `nowhere`"), "{}", err(&o));
    std::fs::write(
        &bad,
        "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {name: x\n",
    )
    .expect("write");
    let o = bin().arg("run").arg(&bad).output().expect("run");
    assert_eq!(o.status.code(), Some(2));
    assert!(err(&o).contains("invalid YAML"), "{}", err(&o));
    let o = bin()
        .arg("validate")
        .arg(examples().join("branching.yaml"))
        .output()
        .expect("validate");
    assert!(o.status.success());
    assert!(
        out(&o).starts_with("ok: examples/branching (7 steps"),
        "{}",
        out(&o)
    );
}

fn count(file: &Path, word: &str) -> usize {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter(|l| *l == word)
        .count()
}

/// `mayfly run PLAYBOOK --db DB` in the background, once `mark` exists (a step of it has
/// started), within `limit`.
fn run_until(pb: &Path, db: &Path, mark: &Path, limit: Duration) -> std::process::Child {
    let mut run = bin()
        .arg("run")
        .arg(pb)
        .arg("--db")
        .arg(db)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run");
    let t = Instant::now();
    while !mark.exists() {
        assert!(t.elapsed() < limit, "{} never appeared", mark.display());
        if let Some(st) = run.try_wait().expect("try_wait") {
            panic!("the run exited early with {st}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    run
}

#[test]
fn kill_dash_nine_then_resume_completes_without_rerunning_recorded_steps() {
    let dir = tempfile::tempdir().expect("tmp");
    let db = dir.path().join("crash.db");
    let marks = dir.path().join("marks.txt");
    let flag = dir.path().join("slept-once");
    let pb = dir.path().join("crash.yaml");
    std::fs::write(
        &pb,
        format!(
            r#"apiVersion: noetl.io/v2
kind: Playbook
metadata: {{name: crash}}
workload: {{marks: "{marks}", flag: "{flag}"}}
workflow:
  - step: start
    tool: {{kind: python, code: "open(marks, 'a').write('start\\n')\nresult = 'a'"}}
    input: {{marks: "{{{{ marks }}}}"}}
    next: slow
  - step: slow
    input: {{marks: "{{{{ marks }}}}", flag: "{{{{ flag }}}}"}}
    tool:
      kind: python
      code: |
        import os, time
        open(marks, 'a').write('slow\n')
        if not os.path.exists(flag):
            open(flag, 'w').write('1')
            time.sleep(60)
        result = 'b'
    next: end
  - step: end
    input: {{marks: "{{{{ marks }}}}", prev: "{{{{ slow }}}}"}}
    tool: {{kind: python, code: "open(marks, 'a').write('end\\n')\nresult = {{'prev': prev}}"}}
"#,
            marks = marks.display(),
            flag = flag.display()
        ),
    )
    .expect("write");
    // Wait until the slow step is running (it created its flag), then SIGKILL.
    let mut child = run_until(&pb, &db, &flag, Duration::from_secs(60));
    child.kill().expect("kill -9");
    let status = child.wait().expect("wait");
    assert!(!status.success());
    assert_eq!(count(&marks, "start"), 1);
    assert_eq!(count(&marks, "end"), 0);

    let id = last_execution(&db);
    let o = bin()
        .args(["resume", &id, "--json", "--db"])
        .arg(&db)
        .output()
        .expect("resume");
    assert!(o.status.success(), "resume failed: {}", err(&o));
    let report = json(&o);
    assert_eq!(report["status"], "completed");
    assert_eq!(report["result"], serde_json::json!({"prev": "b"}));
    assert_eq!(
        count(&marks, "start"),
        1,
        "a recorded step never runs again"
    );
    assert_eq!(
        count(&marks, "slow"),
        2,
        "the in-flight step is redelivered (at-least-once)"
    );
    assert_eq!(count(&marks, "end"), 1);

    let evs = events_json(&db, &id);
    let claims: Vec<u64> = evs
        .iter()
        .filter(|e| e["kind"] == "command.claimed" && e["step"] == "slow")
        .map(|e| e["attempt"].as_u64().expect("attempt"))
        .collect();
    assert_eq!(claims, [1, 2]);
    let finished = |s: &str| {
        evs.iter()
            .filter(|e| e["kind"] == "step.finished" && e["step"] == s)
            .count()
    };
    assert_eq!(
        (finished("start"), finished("slow"), finished("end")),
        (1, 1, 1)
    );
    let r = bin()
        .args(["replay", &id, "--json", "--db"])
        .arg(&db)
        .output()
        .expect("replay");
    assert_eq!(json(&r), report);
}

#[test]
fn a_corrupted_event_is_reported_by_seq_and_nothing_is_overwritten() {
    let dir = tempfile::tempdir().expect("tmp");
    let db = dir.path().join("m.db");
    let report = run_json(&examples().join("hello.yaml"), &db);
    let id = report["execution_id"].as_str().expect("id").to_owned();
    // Tamper with seq 4 behind mayfly's back (the trigger forbids it, so drop it first).
    let tamper = Command::new("python3")
        .arg("-c")
        .arg(
            "import sqlite3,sys\nc=sqlite3.connect(sys.argv[1])\nc.execute('DROP TRIGGER events_no_update')\n\
             c.execute(\"UPDATE events SET payload='{\\\"evil\\\":1}' WHERE execution_id=? AND seq=4\",(sys.argv[2],))\nc.commit()",
        )
        .arg(&db)
        .arg(&id)
        .output()
        .expect("python3");
    assert!(tamper.status.success(), "{}", err(&tamper));
    let before = std::fs::read(&db).expect("db bytes").len();
    for args in [vec!["replay", id.as_str()], vec!["resume", id.as_str()]] {
        let o = bin()
            .args(&args)
            .arg("--db")
            .arg(&db)
            .output()
            .expect("cmd");
        assert_eq!(o.status.code(), Some(1), "{args:?} must refuse");
        let e = err(&o);
        assert!(
            e.contains("corrupted at seq 4") && e.contains("hash mismatch"),
            "{args:?}: {e}"
        );
    }
    let evs = events_json(&db, &id);
    assert_eq!(
        evs[3]["payload"],
        serde_json::json!({"evil": 1}),
        "the damaged row is left for inspection"
    );
    assert_eq!(
        Some(evs.len() as u64),
        report["events"].as_u64(),
        "nothing was appended"
    );
    assert!(std::fs::read(&db).expect("db").len() >= before);
}

#[test]
fn one_process_per_database() {
    let dir = tempfile::tempdir().expect("tmp");
    let db = dir.path().join("m.db");
    let pb = dir.path().join("sleep.yaml");
    std::fs::write(&pb, "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {name: s}\nworkflow:\n  - step: start\n    tool: {kind: shell, cmds: ['sleep 3']}\n").expect("write");
    let mut first = bin()
        .arg("run")
        .arg(&pb)
        .arg("--db")
        .arg(&db)
        .arg("--quiet")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let lock = PathBuf::from(format!("{}.lock", db.display()));
    let t = Instant::now();
    while !lock.exists() || !db.exists() {
        assert!(t.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    let o = bin()
        .arg("run")
        .arg(&pb)
        .arg("--db")
        .arg(&db)
        .output()
        .expect("second");
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err(&o).contains("in use by another mayfly process"),
        "{}",
        err(&o)
    );
    assert!(first.wait().expect("first").success());
}

#[test]
fn a_crash_inside_a_child_playbook_resumes_through_the_child_or_the_parent() {
    let dir = tempfile::tempdir().expect("tmp");
    let db = dir.path().join("nested.db");
    let flag = dir.path().join("child-slept");
    std::fs::write(
        dir.path().join("parent.yaml"),
        "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {name: parent}\nworkflow:\n  - step: start\n    tool: {kind: playbook, path: child, return_result: true, input: {n: 21}}\n    next: end\n  - step: end\n    input: {doubled: \"{{ start.n2 }}\"}\n",
    )
    .expect("write");
    std::fs::write(
        dir.path().join("child.yaml"),
        format!(
            "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {{name: child}}\nworkload: {{n: 0}}\nworkflow:\n  - step: start\n    tool:\n      kind: python\n      input: {{n: \"{{{{ n }}}}\", flag: \"{}\"}}\n      code: |\n        import os, time\n        if not os.path.exists(flag):\n            open(flag, 'w').write('1')\n            time.sleep(60)\n        result = {{'n2': n * 2}}\n",
            flag.display()
        ),
    )
    .expect("write");
    let mut child = run_until(
        &dir.path().join("parent.yaml"),
        &db,
        &flag,
        Duration::from_secs(60),
    );
    child.kill().expect("kill -9");
    child.wait().expect("wait");
    let o = bin()
        .args(["executions", "--db"])
        .arg(&db)
        .output()
        .expect("executions");
    let listing = out(&o);
    let child_line = listing
        .lines()
        .find(|l| l.contains("child of"))
        .expect("child listed");
    let child_id = child_line.split_whitespace().next().expect("id").to_owned();
    let parent_id = listing
        .lines()
        .find(|l| !l.contains("child of"))
        .and_then(|l| l.split_whitespace().next())
        .expect("parent")
        .to_owned();
    // Resuming the child resumes it through its parent…
    let o = bin()
        .args(["resume", &child_id, "--json", "--db"])
        .arg(&db)
        .output()
        .expect("resume child");
    assert!(o.status.success(), "{}", err(&o));
    assert_eq!(json(&o)["result"], serde_json::json!({"n2": 42}));
    // …and the parent, resumed afterwards, receives the child's result and completes.
    let o = bin()
        .args(["resume", &parent_id, "--json", "--db"])
        .arg(&db)
        .output()
        .expect("resume parent");
    assert!(o.status.success(), "{}", err(&o));
    let report = json(&o);
    assert_eq!(report["status"], "completed");
    assert_eq!(report["result"], serde_json::json!({"doubled": 42}));
}

#[test]
fn run_and_replay_with_the_event_log_in_postgres() {
    if !mayfly_testkit::postgres() {
        return;
    }
    let url = mayfly_testkit::postgres_url();
    let o = bin()
        .arg("run")
        .arg(examples().join("nested.yaml"))
        .args(["--json", "--db", &url])
        .output()
        .expect("run");
    assert!(o.status.success(), "{}", err(&o));
    let report = json(&o);
    assert_eq!(report["result"]["best"], "ann");
    let id = report["execution_id"].as_str().expect("id");
    let r = bin()
        .args(["replay", id, "--json", "--db", &url])
        .output()
        .expect("replay");
    assert!(r.status.success(), "{}", err(&r));
    assert_eq!(json(&r), report, "replay from Postgres reproduces the run");
}

/// A local HTTP server (own thread and runtime) that echoes the request's Authorization.
fn echo_auth_server() -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt");
        rt.block_on(async move {
            use axum::{Json, Router, http::HeaderMap, routing::get};
            let app = Router::new().route(
                "/whoami",
                get(|h: HeaderMap| async move {
                    let auth = h
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned();
                    Json(serde_json::json!({"you_sent": auth}))
                }),
            );
            let l = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            tx.send(l.local_addr().expect("addr").port()).expect("send");
            axum::serve(l, app).await.expect("serve");
        });
    });
    format!("http://127.0.0.1:{}", rx.recv().expect("port"))
}

fn files_contain(dir: &Path, needle: &str) -> Vec<PathBuf> {
    let mut hits = Vec::new();
    for e in std::fs::read_dir(dir).expect("dir").flatten() {
        let p = e.path();
        if p.is_file()
            && std::fs::read(&p)
                .map(|b| b.windows(needle.len()).any(|w| w == needle.as_bytes()))
                .unwrap_or(false)
        {
            hits.push(p);
        }
    }
    hits
}

#[test]
fn keychain_secrets_resolve_inside_steps_and_never_reach_the_log_or_output() {
    const SECRET: &str = "s3cr3t-planted-XYZ-8472";
    let dir = tempfile::tempdir().expect("tmp");
    let home = dir.path().join("home");
    let db = dir.path().join("m.db");
    let kc = |args: &[&str]| {
        let mut c = bin();
        c.env("MAYFLY_HOME", &home)
            .env_remove("MAYFLY_MASTER_KEY")
            .arg("keychain")
            .args(args)
            .arg("--db")
            .arg(&db);
        c
    };
    let o = with_stdin(
        kc(&["set", "api"]),
        &format!("{{\"token\": \"{SECRET}\", \"user\": \"bob\"}}"),
    );
    assert!(o.status.success(), "{}", err(&o));
    assert!(
        home.join("master.key").exists(),
        "the master key file is created on first use"
    );
    let o = kc(&["list"]).output().expect("list");
    assert_eq!(out(&o).trim(), "api");
    assert!(!out(&o).contains(SECRET) && !err(&o).contains(SECRET));

    let base = echo_auth_server();
    let pb = dir.path().join("uses-secret.yaml");
    std::fs::write(
        &pb,
        format!(
            r#"apiVersion: noetl.io/v2
kind: Playbook
metadata: {{name: uses-secret}}
keychain:
  - {{name: api, kind: secret}}
workflow:
  - step: start
    tool: {{kind: http, url: "{base}/whoami", auth: api}}
    next: py
  - step: py
    tool:
      kind: python
      input: {{tok: "{{{{ keychain.api.token }}}}", who: "{{{{ keychain.api.user }}}}"}}
      code: |
        print("token is", tok)
        result = {{"echo": tok, "len": len(tok), "who": who}}
    next: end
  - step: end
    input: {{echoed: "{{{{ start.data.you_sent }}}}", py: "{{{{ py }}}}"}}
"#
        ),
    )
    .expect("write");
    let o = bin()
        .env("MAYFLY_HOME", &home)
        .env_remove("MAYFLY_MASTER_KEY")
        .arg("run")
        .arg(&pb)
        .arg("--db")
        .arg(&db)
        .arg("--json")
        .output()
        .expect("run");
    assert!(o.status.success(), "{}", err(&o));
    let report = json(&o);
    assert_eq!(report["status"], "completed");
    // The secret really was used (the server saw it, python computed on it)…
    assert_eq!(report["result"]["py"]["len"], SECRET.len());
    assert_eq!(
        report["result"]["py"]["who"], "bob",
        "short values (<4 chars… 'bob' is 3) are not secrets to redact"
    );
    // …and every place it surfaced is redacted.
    assert_eq!(report["result"]["echoed"], "Bearer [REDACTED]");
    assert_eq!(report["result"]["py"]["echo"], "[REDACTED]");
    assert!(
        !out(&o).contains(SECRET) && !err(&o).contains(SECRET),
        "not in the CLI output"
    );
    let id = report["execution_id"].as_str().expect("id");
    let e = bin()
        .args(["events", id, "--json", "--db"])
        .arg(&db)
        .output()
        .expect("events");
    assert!(
        out(&e).contains("token is [REDACTED]"),
        "captured stdout is redacted too"
    );
    assert!(!out(&e).contains(SECRET));
    assert!(
        files_contain(dir.path(), SECRET).is_empty(),
        "the secret is in no database file: {:?}",
        files_contain(dir.path(), SECRET)
    );

    // An error message carrying the secret is redacted as well.
    let bad = dir.path().join("leaks-in-error.yaml");
    std::fs::write(&bad, "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {name: leak}\nworkflow:\n  - step: start\n    tool: {kind: python, input: {t: \"{{ keychain.api.token }}\"}, code: \"raise ValueError('bad token ' + t)\"}\n").expect("write");
    let o = bin()
        .env("MAYFLY_HOME", &home)
        .env_remove("MAYFLY_MASTER_KEY")
        .arg("run")
        .arg(&bad)
        .arg("--db")
        .arg(&db)
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err(&o).contains("ValueError: bad token [REDACTED]"),
        "{}",
        err(&o)
    );
    assert!(!err(&o).contains(SECRET) && !out(&o).contains(SECRET));
    assert!(files_contain(dir.path(), SECRET).is_empty());

    // Fail closed: an unknown alias, or no master key at all.
    let missing = dir.path().join("missing.yaml");
    std::fs::write(&missing, "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {name: m}\nworkflow:\n  - step: start\n    tool: {kind: http, url: http://127.0.0.1:9/x, auth: nope}\n").expect("write");
    let o = bin()
        .env("MAYFLY_HOME", &home)
        .env_remove("MAYFLY_MASTER_KEY")
        .arg("run")
        .arg(&missing)
        .arg("--db")
        .arg(&db)
        .output()
        .expect("run");
    assert!(err(&o).contains("keychain_missing"), "{}", err(&o));
    let o = bin()
        .env("MAYFLY_HOME", dir.path().join("elsewhere"))
        .env_remove("MAYFLY_MASTER_KEY")
        .arg("run")
        .arg(&pb)
        .arg("--db")
        .arg(&db)
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(1));
    assert!(err(&o).contains("keychain_unavailable"), "{}", err(&o));

    // Rotation re-seals under a new key; the old key then no longer opens anything.
    let newkey = dir.path().join("new.key");
    let newkey_s = newkey.display().to_string();
    let o = kc(&["rotate", "--new-key-file", &newkey_s])
        .output()
        .expect("rotate");
    assert!(o.status.success(), "{}", err(&o));
    let o = bin()
        .env("MAYFLY_HOME", &home)
        .env_remove("MAYFLY_MASTER_KEY")
        .arg("run")
        .arg(&pb)
        .arg("--db")
        .arg(&db)
        .output()
        .expect("run");
    assert!(
        err(&o).contains("keychain_sealed"),
        "old key refused after rotation: {}",
        err(&o)
    );
    let o = bin()
        .env_remove("MAYFLY_MASTER_KEY")
        .arg("run")
        .arg(&pb)
        .arg("--db")
        .arg(&db)
        .arg("--master-key-file")
        .arg(&newkey)
        .arg("--json")
        .output()
        .expect("run");
    assert!(o.status.success(), "{}", err(&o));
    let o = kc(&["delete", "api"]).output().expect("delete");
    assert!(o.status.success());
    assert_eq!(out(&kc(&["list"]).output().expect("list")).trim(), "");
}

#[test]
fn register_in_the_catalog_and_run_by_path_and_version() {
    let dir = tempfile::tempdir().expect("tmp");
    let db = dir.path().join("m.db");
    let file = dir.path().join("flow.yaml");
    let v1 = "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {name: flow, path: team/flow}\nworkflow:\n  - step: start\n    input: {v: 1}\n";
    std::fs::write(&file, v1).expect("write");
    let reg = || {
        bin()
            .arg("register")
            .arg(&file)
            .arg("--db")
            .arg(&db)
            .output()
            .expect("register")
    };
    let o = reg();
    assert!(o.status.success(), "{}", err(&o));
    assert!(
        out(&o).starts_with("registered team/flow@1 sha256:"),
        "{}",
        out(&o)
    );
    assert!(
        out(&reg()).starts_with("unchanged team/flow@1 "),
        "identical content is a no-op"
    );
    std::fs::write(&file, v1.replace("v: 1", "v: 2")).expect("write");
    assert!(out(&reg()).starts_with("registered team/flow@2 "));
    let run = |r: &str| {
        bin()
            .args(["run", r, "--json", "--db"])
            .arg(&db)
            .output()
            .expect("run")
    };
    assert_eq!(
        json(&run("team/flow"))["result"],
        serde_json::json!({"v": 2}),
        "latest by default"
    );
    assert_eq!(
        json(&run("team/flow@1"))["result"],
        serde_json::json!({"v": 1})
    );
    let o = run("team/flow@7");
    assert_eq!(o.status.code(), Some(2));
    assert!(
        err(&o).contains("neither a file nor a playbook in the catalog"),
        "{}",
        err(&o)
    );
    let o = bin()
        .args(["catalog", "--db"])
        .arg(&db)
        .output()
        .expect("catalog");
    assert_eq!(out(&o).lines().count(), 2);
    // Invalid content is refused at registration with its location.
    std::fs::write(&file, "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {name: x}\nworkflow:\n  - step: begin\n").expect("write");
    let o = reg();
    assert_eq!(o.status.code(), Some(2));
    assert!(err(&o).contains("named `start`"), "{}", err(&o));
}

fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut buf = String::new();
    s.read_to_string(&mut buf).expect("read");
    buf
}

#[test]
fn server_prints_an_admin_token_once_and_serves_the_api() {
    let dir = tempfile::tempdir().expect("tmp");
    let db = dir.path().join("srv.db");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let start = || {
        bin()
            .args(["server", "--listen", &format!("127.0.0.1:{port}"), "--db"])
            .arg(&db)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("server")
    };
    let read_banner = |child: &mut std::process::Child| {
        use std::io::BufRead;
        let mut lines = std::io::BufReader::new(child.stderr.take().expect("stderr")).lines();
        let mut seen = Vec::new();
        for l in lines.by_ref() {
            let l = l.expect("line");
            let done = l.starts_with("mayfly gateway on");
            seen.push(l);
            if done {
                break;
            }
        }
        seen
    };
    let mut first = start();
    let banner = read_banner(&mut first);
    assert!(
        banner
            .iter()
            .any(|l| l.contains("admin token") && l.contains("mf_")),
        "{banner:?}"
    );
    let health = http_get(port, "/healthz");
    assert!(
        health.starts_with("HTTP/1.1 200") && health.contains("\"alive\""),
        "{health}"
    );
    let ready = http_get(port, "/readyz");
    assert!(
        ready.starts_with("HTTP/1.1 200") && ready.contains("\"ready\""),
        "{ready}"
    );
    let unauth = http_get(port, "/v1/executions");
    assert!(
        unauth.starts_with("HTTP/1.1 401") && unauth.contains("application/problem+json"),
        "{unauth}"
    );
    first.kill().expect("stop");
    first.wait().expect("wait");
    let mut second = start();
    let banner = read_banner(&mut second);
    assert!(
        !banner.iter().any(|l| l.contains("admin token")),
        "the token is shown only on first start: {banner:?}"
    );
    second.kill().expect("stop");
    second.wait().expect("wait");
}

/// An embedded `mayfly server` on `db`: (child, base url, the admin token it printed).
/// The CLI against the server at `url`, as `token`.
/// Run `cmd` with `input` on its standard input; its output.
fn with_stdin(mut cmd: Command, input: &str) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    std::io::Write::write_all(child.stdin.as_mut().expect("stdin"), input.as_bytes())
        .expect("write");
    child.wait_with_output().expect("wait")
}

fn remote_cli<'a>(url: &'a str, token: &'a str) -> impl Fn(&[&str]) -> std::process::Output + 'a {
    move |args| {
        bin()
            .env("MAYFLY_URL", url)
            .env("MAYFLY_TOKEN", token)
            .args(args)
            .output()
            .expect("cli")
    }
}

fn local_server(db: &std::path::Path) -> (Running, String, String) {
    local_server_at(db, "127.0.0.1:0")
}

/// The same, listening on `listen`.
fn local_server_at(db: &std::path::Path, listen: &str) -> (Running, String, String) {
    // The control plane key lives beside the log, not in the user's home.
    let key = db.with_extension("control.key");
    let mut server = bin();
    server
        .args(["server", "--listen", listen, "--db"])
        .arg(db)
        .arg("--control-key-file")
        .arg(&key)
        .env("MAYFLY_AGENT_INTERVAL_MS", "200");
    start_server(server)
}

#[test]
fn cli_against_a_server_registers_starts_watches_and_lists() {
    let dir = tempfile::tempdir().expect("tmp");
    let (mut server, url, token) = local_server(&dir.path().join("srv.db"));
    let remote = remote_cli(&url, &token);
    let o = remote(&[
        "register",
        examples().join("hello.yaml").to_str().expect("path"),
    ]);
    assert!(o.status.success(), "{}", err(&o));
    assert!(
        out(&o).starts_with("registered examples/hello@1 "),
        "{}",
        out(&o)
    );
    let o = remote(&[
        "exec",
        "start",
        "examples/hello",
        "--set",
        "name=cli",
        "--watch",
    ]);
    assert!(o.status.success(), "{}", err(&o));
    let result: Value = serde_json::from_str(&out(&o)).expect("result json");
    assert_eq!(result["data"]["message"], "Hello World, cli!");
    assert!(
        err(&o).contains("execution.completed"),
        "watch shows the events: {}",
        err(&o)
    );
    let o = remote(&["exec", "list"]);
    let id = out(&o)
        .split_whitespace()
        .next()
        .expect("an execution")
        .to_owned();
    assert!(out(&o).contains("completed"));
    let o = remote(&["exec", "status", &id]);
    assert!(o.status.success());
    assert_eq!(json(&o)["status"], "completed");
    let o = bin()
        .env("MAYFLY_URL", &url)
        .env("MAYFLY_TOKEN", "mf_wrong")
        .args(["exec", "list"])
        .output()
        .expect("cli");
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err(&o).contains("401") && err(&o).contains("unauthenticated"),
        "{}",
        err(&o)
    );
    server.kill().expect("stop");
    server.wait().expect("wait");
}

/// Desired state from the CLI: `apply -f DIR` (manifests and a playbook), `get`,
/// `history`, a refused apply (exit 1, reason printed), and `audit verify` against the
/// server and, once it is stopped, against the log file itself.
#[test]
fn cli_applies_desired_state_and_verifies_the_audit() {
    let dir = tempfile::tempdir().expect("tmp");
    let db = dir.path().join("ctl.db");
    let (mut server, url, token) = local_server(&db);
    let m = dir.path().join("manifests");
    std::fs::create_dir(&m).expect("dir");
    std::fs::write(
        m.join("10-env.yaml"),
        "apiVersion: mayfly.dev/v1\nkind: Environment\nmetadata: {name: prod}\n---\napiVersion: mayfly.dev/v1\nkind: WorkerPool\nmetadata: {name: gpu, tenant: acme}\nspec: {slots: 4}\n",
    )
    .expect("write");
    std::fs::copy(examples().join("hello.yaml"), m.join("20-hello.yaml")).expect("copy");
    std::fs::write(m.join("notes.txt"), "not a manifest").expect("write");
    let session = dir.path().join("session.json");
    let remote = |token: &str, args: &[&str]| {
        bin()
            .env("MAYFLY_URL", &url)
            .env("MAYFLY_TOKEN", token)
            .env("MAYFLY_SESSION", &session)
            .args(args)
            .output()
            .expect("cli")
    };
    let o = remote(&token, &["apply", "-f", m.to_str().expect("path")]);
    assert!(o.status.success(), "{}", err(&o));
    let text = out(&o);
    for want in [
        "environment/prod created (generation 1, sha256:",
        "workerpool/gpu created",
        "playbook/examples/hello created",
    ] {
        assert!(text.contains(want), "missing `{want}`:\n{text}");
    }
    let o = remote(&token, &["apply", "-f", m.to_str().expect("path")]);
    assert!(out(&o).contains("workerpool/gpu unchanged"), "{}", out(&o));
    // The session floor: reads ask for at least what this session wrote, and say how
    // fresh they were.
    let floors: Value =
        serde_json::from_str(&std::fs::read_to_string(&session).expect("session")).expect("json");
    let log = floors["urls"][url.as_str()]
        .as_str()
        .expect("this server's log");
    let floor = floors["floors"][log]
        .as_u64()
        .expect("a floor for this log");
    let o = remote(&token, &["get", "workerpools", "--consistency", "strong"]);
    assert!(o.status.success(), "{}", err(&o));
    let served: u64 = err(&o)
        .split_whitespace()
        .nth(2)
        .and_then(|t| t.parse().ok())
        .expect("served token on stderr");
    assert!(served >= floor, "{}", err(&o));
    assert!(
        err(&o).contains("lag 0") && err(&o).contains("strong"),
        "{}",
        err(&o)
    );
    let o = remote(&token, &["get", "workerpools", "--consistency", "bounded"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(err(&o).contains("needs max_lag"), "{}", err(&o));
    let o = remote(&token, &["get", "workerpools"]);
    assert!(o.status.success(), "{}", err(&o));
    assert!(
        out(&o).contains("gpu") && out(&o).contains("acme") && out(&o).contains("Pending"),
        "{}",
        out(&o)
    );
    std::fs::write(
        m.join("10-env.yaml"),
        "apiVersion: mayfly.dev/v1\nkind: WorkerPool\nmetadata: {name: gpu, tenant: acme}\nspec: {slots: 8}\n",
    )
    .expect("write");
    let o = remote(
        &token,
        &["apply", "-f", m.join("10-env.yaml").to_str().expect("path")],
    );
    assert!(
        out(&o).contains("workerpool/gpu configured (generation 2"),
        "{}",
        out(&o)
    );
    let o = remote(&token, &["history", "workerpool", "gpu"]);
    let lines: Vec<String> = out(&o).lines().map(str::to_owned).collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(
        lines[1].contains("generation 2") && lines[1].contains("by token:"),
        "{lines:?}"
    );

    // A tenant author may not write an Environment: exit 1 with the reason, recorded.
    let o = remote(
        &token,
        &[
            "token", "--tenant", "acme", "--role", "author", "--name", "dev",
        ],
    );
    assert!(o.status.success(), "{}", err(&o));
    let author = out(&o).trim().to_owned();
    assert!(author.starts_with("mf_"), "{author}");
    let env = dir.path().join("env.yaml");
    std::fs::write(
        &env,
        "apiVersion: mayfly.dev/v1\nkind: Environment\nmetadata: {name: qa}\n",
    )
    .expect("write");
    let o = remote(&author, &["apply", "-f", env.to_str().expect("path")]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        out(&o).contains("environment/qa denied: Environment objects are cluster-scoped"),
        "{}\n{}",
        out(&o),
        err(&o)
    );
    // Nothing was written: no generation, no digest.
    assert!(
        !out(&o).contains("generation") && !out(&o).contains("sha256:"),
        "{}",
        out(&o)
    );
    let o = remote(&author, &["get", "environments"]);
    assert!(!out(&o).contains("qa"), "nothing of a refused apply exists");
    // A strong read with a deadline of the caller's own.
    let o = remote(
        &author,
        &[
            "get",
            "environments",
            "--consistency",
            "strong",
            "--deadline-ms",
            "30000",
        ],
    );
    assert!(o.status.success(), "{}", err(&o));

    // Explain: which layer decides for a catalog playbook.
    let pol = dir.path().join("policy.yaml");
    std::fs::write(
        &pol,
        "apiVersion: mayfly.dev/v1\nkind: Policy\nmetadata: {name: platform}\nspec:\n  tools: {allow: [noop]}\n",
    )
    .expect("write");
    let o = remote(&token, &["apply", "-f", pol.to_str().expect("path")]);
    assert!(o.status.success(), "{}", err(&o));
    let o = remote(&token, &["policy", "explain", "examples/hello"]);
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    assert!(
        out(&o).contains("platform  system/platform")
            && out(&o).contains(
                "refused: policy system/platform (platform) does not allow tool kind `python`"
            ),
        "{}",
        out(&o)
    );
    let o = remote(&token, &["status"]);
    assert!(o.status.success(), "{}", err(&o));
    let st: Value = serde_json::from_str(&out(&o)).expect("status json");
    assert_eq!(
        (st["state"].as_str(), st["role"].as_str()),
        (Some("ready"), Some("appender"))
    );
    let o = remote(&token, &["audit", "verify"]);
    assert!(o.status.success(), "{}", err(&o));
    assert!(out(&o).starts_with("ok: "), "{}", out(&o));
    server.kill().expect("stop");
    server.wait().expect("wait");
    let o = bin()
        .args(["audit", "verify", "--db"])
        .arg(&db)
        .output()
        .expect("cli");
    assert!(o.status.success(), "{}", err(&o));
    assert!(out(&o).contains("control events"), "{}", out(&o));
}

/// The session floor belongs to a log, not to a URL: a server that comes back at the same
/// address with another log (recreated, restored) is read from zero, with a note, instead of
/// refusing every read for a token it will never reach.
#[test]
fn the_session_floor_starts_over_on_another_log_at_the_same_url() {
    let dir = tempfile::tempdir().expect("tmp");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let session = dir.path().join("session.json");
    let pool = dir.path().join("pool.yaml");
    let url = format!("http://127.0.0.1:{port}");
    let start = |db: &str| {
        let (server, _, token) =
            local_server_at(&dir.path().join(db), &format!("127.0.0.1:{port}"));
        (server, token)
    };
    let cli = |token: &str, args: &[&str]| {
        bin()
            .env("MAYFLY_URL", &url)
            .env("MAYFLY_TOKEN", token)
            .env("MAYFLY_SESSION", &session)
            .args(args)
            .output()
            .expect("cli")
    };
    let write_pool = |name: &str, slots: u32| {
        std::fs::write(
            &pool,
            format!("apiVersion: mayfly.dev/v1\nkind: WorkerPool\nmetadata: {{name: {name}}}\nspec: {{slots: {slots}}}\n"),
        )
        .expect("write");
    };
    // Log one: several writes, a high floor.
    let (mut first, token) = start("one.db");
    for slots in 2..8 {
        write_pool("gpu", slots);
        let o = cli(&token, &["apply", "-f", pool.to_str().expect("path")]);
        assert!(o.status.success(), "{}", err(&o));
    }
    first.kill().expect("stop");
    first.wait().expect("wait");
    // Log two at the same address: its head is below the old floor.
    let (mut second, token) = start("two.db");
    let o = cli(&token, &["get", "workerpools"]);
    assert!(o.status.success(), "{}", err(&o));
    assert!(err(&o).contains("serves another log"), "{}", err(&o));
    write_pool("tpu", 1);
    let o = cli(&token, &["apply", "-f", pool.to_str().expect("path")]);
    assert!(o.status.success(), "{}", err(&o));
    let o = cli(&token, &["get", "workerpools"]);
    assert!(o.status.success(), "{}", err(&o));
    assert!(
        out(&o).contains("tpu") && !out(&o).contains("gpu"),
        "{}",
        out(&o)
    );
    second.kill().expect("stop");
    second.wait().expect("wait");
}

/// Policy bundles end to end: publish (idempotent), roll out with a Rollout object, and
/// `rollout status` shows the embedded workers' agent acknowledging the bundle as effective;
/// that worker then refuses blocks the bundle does not allow.
#[test]
fn bundles_roll_out_to_the_servers_workers_and_are_enforced() {
    let dir = tempfile::tempdir().expect("tmp");
    let (mut server, url, token) = local_server(&dir.path().join("srv.db"));
    let remote = remote_cli(&url, &token);
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        "apiVersion: mayfly.dev/v1\nkind: Policy\nmetadata: {name: no-shell}\nspec:\n  tools: {allow: [noop, python]}\n",
    )
    .expect("write");
    let o = remote(&["apply", "-f", policy.to_str().expect("path")]);
    assert!(o.status.success(), "{}", err(&o));
    let o = remote(&["bundle", "publish"]);
    assert!(o.status.success(), "{}", err(&o));
    let line = out(&o);
    assert!(line.starts_with("published bundle sha256:"), "{line}");
    let digest = line.split_whitespace().nth(2).expect("digest").to_owned();
    let o = remote(&["bundle", "publish"]);
    assert!(
        out(&o).starts_with(&format!("unchanged bundle {digest}")),
        "{}",
        out(&o)
    );
    let o = remote(&["bundle", "list"]);
    assert!(out(&o).contains(&digest), "{}", out(&o));

    let ro = dir.path().join("rollout.yaml");
    std::fs::write(
        &ro,
        format!("apiVersion: mayfly.dev/v1\nkind: Rollout\nmetadata: {{name: no-shell}}\nspec:\n  bundle: \"{digest}\"\n  target: {{pool: default}}\n"),
    )
    .expect("write");
    let o = remote(&["apply", "-f", ro.to_str().expect("path")]);
    assert!(o.status.success(), "{}", err(&o));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        let o = remote(&["rollout", "status", "no-shell"]);
        if o.status.code() != Some(3) || std::time::Instant::now() > deadline {
            break o;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(status.status.success(), "{}{}", out(&status), err(&status));
    let text = out(&status);
    assert!(text.contains("completed"), "{text}");
    assert!(text.contains(&digest), "{text}");
    assert!(
        text.lines()
            .any(|l| l.contains("local-") && l.contains("true") && l.contains(&digest)),
        "the embedded agent acknowledged it: {text}"
    );

    // The worker enforces the bundle it applied, not the latest policies: once the policy
    // allows shell again, admission lets the execution start, and the worker — still under
    // the rolled-out bundle — refuses the block.
    std::fs::write(
        &policy,
        "apiVersion: mayfly.dev/v1\nkind: Policy\nmetadata: {name: no-shell}\nspec:\n  tools: {allow: [noop, python, shell]}\n",
    )
    .expect("write");
    let o = remote(&["apply", "-f", policy.to_str().expect("path")]);
    assert!(o.status.success(), "{}", err(&o));
    let sh = dir.path().join("sh.yaml");
    std::fs::write(
        &sh,
        "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {name: sh, path: t/sh}\nworkflow:\n  - step: start\n    tool: {kind: shell, cmds: [\"echo hi\"]}\n",
    )
    .expect("write");
    let o = remote(&["register", sh.to_str().expect("path")]);
    assert!(o.status.success(), "{}", err(&o));
    let o = remote(&["exec", "start", "t/sh", "--watch"]);
    let text = format!("{}{}", out(&o), err(&o));
    assert!(
        text.contains("policy_denied") && text.contains(&digest),
        "{text}"
    );

    let o = remote(&["rollout", "cancel", "no-shell"]);
    assert!(
        !o.status.success(),
        "a completed rollout cannot be cancelled"
    );
    assert!(err(&o).contains("not in progress"), "{}", err(&o));

    // Compaction keeps what the records said: the rollout, the audit verification.
    let o = remote(&["compact"]);
    assert!(o.status.success(), "{}", err(&o));
    assert!(
        out(&o).starts_with("compacted control records #2.."),
        "{}",
        out(&o)
    );
    let o = remote(&["rollout", "status", "no-shell"]);
    assert!(
        o.status.success() && out(&o).contains("completed"),
        "{}",
        out(&o)
    );
    let o = remote(&["audit", "verify"]);
    assert!(o.status.success(), "{}{}", out(&o), err(&o));
    server.kill().expect("stop");
    server.wait().expect("wait");
}

/// Files under `dir`, recursively (the local shared cache).
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// `mayfly cache gc` on an embedded log: a dry run deletes nothing, a payload within the
/// keep window stays, one past it goes, and the execution still replays from its log.
#[test]
fn cache_gc_collects_the_payloads_of_ended_executions() {
    let dir = tempfile::tempdir().expect("tmp");
    let db = dir.path().join("m.db");
    let report = run_json(&examples().join("table.yaml"), &db);
    assert_eq!(report["status"], "completed");
    let cache = dir.path().join("m.db.cache");
    let stored = files_under(&cache).len();
    assert!(
        stored >= 2,
        "the table and the loop's aggregate are cached: {stored}"
    );
    let gc = |args: &[&str]| {
        let o = bin()
            .args(["cache", "gc", "--json", "--db"])
            .arg(&db)
            .args(args)
            .output()
            .expect("gc");
        assert!(o.status.success(), "{}", err(&o));
        json(&o)
    };
    // A log that does not exist is refused, not created (its empty mark would sweep all).
    let o = bin()
        .args(["cache", "gc", "--db"])
        .arg(dir.path().join("typo.db"))
        .output()
        .expect("gc");
    assert!(!o.status.success());
    assert!(!dir.path().join("typo.db").exists());
    // NATS credentials without a NATS server to use them on: refused, not ignored.
    let o = bin()
        .args(["cache", "gc", "--nats-ca", "/nowhere.pem", "--db"])
        .arg(&db)
        .output()
        .expect("gc");
    assert!(
        !o.status.success() && err(&o).contains("need --queue"),
        "{}",
        err(&o)
    );
    let v = gc(&["--keep", "1h", "--grace", "0s"]);
    assert_eq!(v["report"]["deleted"], 0, "{v}");
    assert_eq!(v["report"]["referenced"], stored, "{v}");
    let v = gc(&["--keep", "0s", "--grace", "0s", "--dry-run"]);
    assert_eq!(v["dry_run"], true);
    assert_eq!(v["report"]["deleted"], stored, "{v}");
    assert_eq!(
        files_under(&cache).len(),
        stored,
        "a dry run deletes nothing"
    );
    let v = gc(&["--keep", "0s", "--grace", "0s"]);
    assert_eq!(v["report"]["deleted"], stored, "{v}");
    assert!(
        v["report"]["deleted_bytes"].as_u64().unwrap_or(0) > 10_000,
        "{v}"
    );
    assert!(files_under(&cache).is_empty());
    // The log is the record: replay still verifies and reproduces the execution.
    let id = report["execution_id"].as_str().expect("id");
    let o = bin()
        .args(["replay", id, "--json", "--db"])
        .arg(&db)
        .output()
        .expect("replay");
    assert!(o.status.success(), "{}", err(&o));
    assert_eq!(json(&o)["status"], "completed");
}

/// The server collects on its own (`--cache-gc-every`), keeping what live executions name.
#[test]
fn the_server_collects_the_cache_periodically() {
    let dir = tempfile::tempdir().expect("tmp");
    let db = dir.path().join("m.db");
    let mut server = bin();
    server
        .args(["server", "--listen", "127.0.0.1:0", "--db"])
        .arg(&db)
        .arg("--control-key-file")
        .arg(dir.path().join("control.key"))
        // A grace period covers a payload stored just before the completion naming it.
        .args([
            "--cache-keep",
            "0s",
            "--cache-grace",
            "2s",
            "--cache-gc-every",
            "1s",
        ]);
    let (_server, url, token) = start_server(server);
    let cli = remote_cli(&url, &token);
    let o = cli(&[
        "register",
        examples().join("table.yaml").to_str().expect("path"),
    ]);
    assert!(o.status.success(), "{}", err(&o));
    let o = cli(&["exec", "start", "examples/table", "--watch"]);
    assert!(o.status.success(), "{}{}", out(&o), err(&o));
    assert!(err(&o).contains("execution.completed"), "{}", err(&o));
    let cache = dir.path().join("m.db.cache");
    assert!(
        cache.is_dir(),
        "the execution stored payloads (its directories stay)"
    );
    let t0 = Instant::now();
    while !files_under(&cache).is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the server never collected: {:?}",
            files_under(&cache)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Strictness through the CLI: an unknown key fails `validate` (exit 2) at its line:col with a
/// did-you-mean; warnings (an unreachable step, a `--set` key the workload does not declare)
/// go to stderr and the playbook still runs; a file that is not UTF-8 is refused at its byte
/// offset.
#[test]
fn validate_is_strict_and_warns() {
    let dir = tempfile::tempdir().expect("tmp");
    let typo = dir.path().join("typo.yaml");
    std::fs::write(
        &typo,
        "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {name: t}\nworkflow:\n  - step: start\n    tool: {kind: noop}\n    nxt: [start]\n",
    )
    .expect("write");
    let o = bin().arg("validate").arg(&typo).output().expect("validate");
    assert_eq!(o.status.code(), Some(2));
    assert!(
        err(&o).contains(
            "typo.yaml:7:5: unknown key `nxt` in a step; did you mean `next`? (step `start`)"
        ),
        "{}",
        err(&o)
    );
    let warn = dir.path().join("warn.yaml");
    std::fs::write(
        &warn,
        "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {name: w}\nworkload: {msg: hi}\nworkflow:\n  - step: start\n    tool: {kind: noop, result: {m: \"{{ msg }}\"}}\n  - step: orphan\n    tool: {kind: noop}\n",
    )
    .expect("write");
    let o = bin().arg("validate").arg(&warn).output().expect("validate");
    assert!(o.status.success(), "{}", err(&o));
    assert!(
        err(&o).contains("warning: ")
            && err(&o).contains("warn.yaml:8:5: step `orphan` is unreachable from `start`"),
        "{}",
        err(&o)
    );
    let o = bin()
        .args(["run", "--json", "--set", "mgs=x"])
        .arg(&warn)
        .output()
        .expect("run");
    assert!(o.status.success(), "{}", err(&o));
    assert_eq!(json(&o)["result"]["m"], "hi");
    let o = bin()
        .args(["run", "--quiet", "--set", "mgs=x"])
        .arg(&warn)
        .output()
        .expect("run");
    assert!(
        err(&o).contains("warning: --set mgs: the playbook's workload does not declare `mgs`; did you mean `msg`?"),
        "{}",
        err(&o)
    );
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, b"apiVersion: noetl.io/v2\nkind: \xff\n").expect("write");
    let o = bin().arg("validate").arg(&bad).output().expect("validate");
    assert_eq!(o.status.code(), Some(2));
    assert!(
        err(&o).contains("bad.yaml:2:7: invalid UTF-8 at byte offset 30"),
        "{}",
        err(&o)
    );
}

/// NoETL names a child by its catalog path (`metadata.path`), not by its file: `mayfly run`
/// finds it among the playbooks under `--playbooks DIR` (default: the directory of the file
/// run, subdirectories included); a path two files claim is an error naming both.
#[test]
fn children_resolve_by_catalog_path() {
    let dir = tempfile::tempdir().expect("tmp");
    let parents = dir.path().join("flows");
    let lib = dir.path().join("lib/deep");
    std::fs::create_dir_all(&parents).expect("mkdir");
    std::fs::create_dir_all(&lib).expect("mkdir");
    let parent = parents.join("parent.yaml");
    std::fs::write(
        &parent,
        "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {name: parent}\nworkflow:\n  - step: start\n    tool: {kind: playbook, path: shared/scorer, return_result: true, input: {n: 4}}\n",
    )
    .expect("write");
    std::fs::write(
        lib.join("whatever_file_name.yaml"),
        "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {name: scorer, path: shared/scorer}\nworkload: {n: 0}\nworkflow:\n  - step: start\n    tool: {kind: noop, result: {score: \"{{ n * 10 }}\"}}\n",
    )
    .expect("write");
    // Beside the parent it is not: without a root that holds it, the run fails loudly.
    let run =
        |args: &[&str], file: &std::path::Path| bin().args(args).arg(file).output().expect("run");
    let o = run(&["run", "--json"], &parent);
    assert_eq!(json(&o)["status"], "failed");
    assert_eq!(json(&o)["error"]["code"], "child_load_failed");
    let root = dir.path().to_string_lossy().into_owned();
    let o = run(&["run", "--json", "--playbooks", &root], &parent);
    assert!(o.status.success(), "{}", err(&o));
    assert_eq!(json(&o)["result"], json!({"score": 40}));
    // The default root is the directory of the file run.
    let local = dir.path().join("local.yaml");
    std::fs::write(
        &local,
        "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {name: local}\nworkflow:\n  - step: start\n    tool: {kind: playbook, path: shared/scorer, return_result: true, input: {n: 2}}\n",
    )
    .expect("write");
    let o = run(&["run", "--json"], &local);
    assert!(o.status.success(), "{}", err(&o));
    assert_eq!(json(&o)["result"], json!({"score": 20}));
    // Two files claiming one catalog path: neither is registered, both are named, and the
    // child is not found.
    std::fs::write(
        dir.path().join("lib/twin.yaml"),
        "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {name: twin, path: shared/scorer}\nworkflow:\n  - step: start\n",
    )
    .expect("write");
    let o = bin()
        .args(["run", "--json"])
        .arg(&local)
        .output()
        .expect("run");
    let report = json(&o);
    assert_eq!(report["status"], "failed");
    let msg = report["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("is not in the local catalog"), "{msg}");
    let warning = err(&o);
    assert!(
        warning.contains("catalog path `shared/scorer` is claimed by 2 files")
            && warning.contains("twin.yaml")
            && warning.contains("whatever_file_name.yaml"),
        "{warning}"
    );
}

/// A child started without `return_step`/`return_result` runs detached (NoETL's default):
/// the parent completes with `{status: started, …}` at once, and `mayfly run` still ends
/// only when the child has, warning about a child that failed.
#[test]
fn run_waits_for_fire_and_forget_children_and_reports_their_failures() {
    let dir = tempfile::tempdir().expect("tmp");
    let done = dir.path().join("child-done");
    std::fs::write(
        dir.path().join("parent.yaml"),
        "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {name: parent}\nworkflow:\n  - step: start\n    tool:\n      - {name: ok, kind: playbook, path: slow}\n    next: [bad]\n  - step: bad\n    tool: {kind: playbook, path: boom}\n    next: [report]\n  - step: report\n    tool: {kind: noop, result: {first: \"{{ start.status }}\", async: \"{{ bad.async }}\"}}\n",
    )
    .expect("write");
    std::fs::write(
        dir.path().join("slow.yaml"),
        format!(
            "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {{name: slow}}\nworkflow:\n  - step: start\n    tool:\n      kind: python\n      code: |\n        import time\n        time.sleep(0.5)\n        open({:?}, 'w').write('done')\n",
            done.display().to_string()
        ),
    )
    .expect("write");
    std::fs::write(
        dir.path().join("boom.yaml"),
        "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {name: boom}\nworkflow:\n  - step: start\n    tool: {kind: python, code: \"raise ValueError('detached child says no')\"}\n",
    )
    .expect("write");
    let o = bin()
        .args(["run", "--json"])
        .arg(dir.path().join("parent.yaml"))
        .output()
        .expect("run");
    assert!(o.status.success(), "{}", err(&o));
    assert_eq!(
        json(&o)["result"],
        json!({"first": "started", "async": true})
    );
    assert!(
        done.exists(),
        "the detached child finished before the run ended"
    );
    let o = bin()
        .args(["run"])
        .arg(dir.path().join("parent.yaml"))
        .output()
        .expect("run");
    assert!(o.status.success(), "{}", err(&o));
    let e = err(&o);
    assert!(
        e.contains("warning: child execution") && e.contains("detached child says no"),
        "{e}"
    );
}

/// `kill -9` of `mayfly run` takes its python interpreters and shell commands with it: a
/// step in flight never finishes behind the back of the run that resumes it.
#[test]
fn a_killed_run_takes_its_interpreters_and_commands_with_it() {
    for kind in ["python", "shell"] {
        let dir = tempfile::tempdir().expect("tmp");
        let started = dir.path().join("started");
        let late = dir.path().join("late");
        let tool = match kind {
            "python" => format!(
                "{{kind: python, code: \"import time\\nopen('{s}', 'w').write('1')\\ntime.sleep(3)\\nopen('{l}', 'w').write('1')\"}}",
                s = started.display(),
                l = late.display()
            ),
            _ => format!(
                "{{kind: shell, command: \"touch {} && sleep 3 && touch {}\"}}",
                started.display(),
                late.display()
            ),
        };
        let pb = dir.path().join("pb.yaml");
        std::fs::write(
            &pb,
            format!("apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {{name: pdeath}}\nworkflow:\n  - step: start\n    tool: {tool}\n"),
        )
        .expect("write");
        let mut run = run_until(
            &pb,
            &dir.path().join("m.db"),
            &started,
            Duration::from_secs(30),
        );
        run.kill().expect("SIGKILL");
        run.wait().expect("reaped");
        std::thread::sleep(std::time::Duration::from_secs(4));
        assert!(
            !late.exists(),
            "{kind}: the step finished after its run was killed"
        );
    }
}

/// Crash trials: a chain of python and shell steps, each recording its side effect as it
/// starts; `mayfly run` is SIGKILLed at a different point of the chain in every trial, then
/// resumed. Across all trials every step's effect happens, and at most one block per trial
/// (the one in flight at the kill) repeats it.
#[test]
fn crash_trials_repeat_at_most_the_block_in_flight() {
    const STEPS: usize = 6;
    const TRIALS: u64 = 16;
    let mut repeated_total = 0;
    for trial in 0..TRIALS {
        let dir = tempfile::tempdir().expect("tmp");
        let marks = dir.path().join("marks.txt");
        let mut workflow = String::new();
        for i in 0..STEPS {
            let next = if i + 1 < STEPS {
                format!("\n    next: s{}", i + 1)
            } else {
                String::new()
            };
            let tool = if i % 2 == 0 {
                format!(
                    "{{kind: python, code: \"import time\\nopen('{m}', 'a').write('s{i}\\\\n')\\ntime.sleep(0.15)\\nresult = {i}\"}}",
                    m = marks.display()
                )
            } else {
                format!(
                    "{{kind: shell, command: \"echo s{i} >> {m} && sleep 0.15\"}}",
                    m = marks.display()
                )
            };
            let name = if i == 0 {
                "start".to_owned()
            } else {
                format!("s{i}")
            };
            workflow.push_str(&format!("  - step: {name}\n    tool: {tool}{next}\n"));
        }
        let pb = dir.path().join("trial.yaml");
        std::fs::write(
            &pb,
            format!("apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {{name: trial}}\nworkflow:\n{workflow}"),
        )
        .expect("write");
        let db = dir.path().join("t.db");
        let mut run = run_until(&pb, &db, &marks, Duration::from_secs(30));
        // Spread the kills over the whole chain (~6 × 150 ms), a different point per trial.
        std::thread::sleep(Duration::from_millis(trial * 997 % 900));
        run.kill().expect("SIGKILL");
        run.wait().expect("reaped");
        let id = last_execution(&db);
        let o = bin()
            .args(["resume", &id, "--json", "--db"])
            .arg(&db)
            .output()
            .expect("resume");
        assert!(
            o.status.success(),
            "trial {trial}: resume failed: {}",
            err(&o)
        );
        assert_eq!(json(&o)["status"], "completed", "trial {trial}");
        let mut repeated = 0;
        for i in 0..STEPS {
            let n = count(&marks, &format!("s{i}"));
            assert!(n >= 1, "trial {trial}: step s{i} never ran");
            repeated += n - 1;
        }
        assert!(
            repeated <= 1,
            "trial {trial}: {repeated} side effects repeated: {}",
            std::fs::read_to_string(&marks).unwrap_or_default()
        );
        repeated_total += repeated;
    }
    // Printed, not asserted: how often the kill landed on a block in flight.
    eprintln!("{repeated_total} repeated side effects over {TRIALS} trials");
}

/// Red team through the API: a tenant's author registers and starts playbooks on a
/// multi-tenant server; its shell step cannot read the server's log, keys or home, and its
/// http step cannot reach the server's own gateway (egress `public` by default), nor can its
/// python, directly or through the egress proxy.
#[test]
fn a_tenant_author_cannot_reach_the_servers_files_or_ports() {
    if !mayfly_testkit::bubblewrap() {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let db = dir.path().join("srv.db");
    let (mut server, url, token) = local_server(&db);
    let admin = remote_cli(&url, &token);
    let o = admin(&[
        "token", "--tenant", "acme", "--role", "author", "--name", "dev",
    ]);
    assert!(o.status.success(), "{}", err(&o));
    let author_token = out(&o).trim().to_owned();
    let author = remote_cli(&url, &author_token);
    let control_key = db.with_extension("control.key");
    assert!(control_key.exists(), "the server made its control key");
    let probe = dir.path().join("probe.yaml");
    std::fs::write(
        &probe,
        format!(
            "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {{name: probe, path: t/probe}}\nworkflow:\n  - step: start\n    tool: {{kind: shell, command: \"head -c 64 {db} 2>&1; echo; cat {key} 2>&1; ls {dir} 2>&1; echo done\"}}\n",
            db = db.display(),
            key = control_key.display(),
            dir = dir.path().display(),
        ),
    )
    .expect("write");
    let o = author(&["register", probe.to_str().expect("path")]);
    assert!(o.status.success(), "{}", err(&o));
    let o = author(&["exec", "start", "t/probe", "--watch"]);
    assert!(o.status.success(), "{}{}", out(&o), err(&o));
    let text = out(&o);
    assert!(text.contains("done"), "the step ran: {text}");
    assert_eq!(
        text.matches("No such file or directory").count(),
        3,
        "the log, the control key and the server's directory are not there: {text}"
    );
    assert!(!text.contains("SQLite format"), "{text}");
    let secret = std::fs::read_to_string(&control_key).unwrap_or_default();
    assert!(
        secret.len() > 8 && !text.contains(secret.trim()),
        "the control key leaked"
    );
    // The gateway's own port, by the http tool: refused before any connection.
    let port = url
        .rsplit(':')
        .next()
        .unwrap_or_default()
        .trim_end_matches('/');
    let call = dir.path().join("call.yaml");
    std::fs::write(
        &call,
        format!(
            "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {{name: call, path: t/call}}\nworkflow:\n  - step: start\n    tool: {{kind: http, url: \"http://127.0.0.1:{port}/v1/executions\"}}\n"
        ),
    )
    .expect("write");
    let o = author(&["register", call.to_str().expect("path")]);
    assert!(o.status.success(), "{}", err(&o));
    let o = author(&["exec", "start", "t/call", "--watch"]);
    let text = format!("{}{}", out(&o), err(&o));
    assert!(!o.status.success(), "{text}");
    assert!(text.contains("egress_denied"), "{text}");
    // Python, the same author: the server's process is not in its PID namespace, and the
    // host's Postgres, NATS and the gateway are not on its loopback.
    let pyprobe = dir.path().join("pyprobe.yaml");
    std::fs::write(
        &pyprobe,
        format!(
            r#"apiVersion: noetl.io/v2
kind: Playbook
metadata: {{name: pyprobe, path: t/pyprobe}}
workflow:
  - step: start
    tool:
      kind: python
      code: |
        import os, socket
        def connect(port):
            s = socket.socket()
            s.settimeout(1)
            try:
                s.connect(("127.0.0.1", port))
                return "connected"
            except Exception as e:
                return type(e).__name__
            finally:
                s.close()
        def environ(pid):
            try:
                open("/proc/%d/environ" % pid, "rb").read()
                return "read"
            except Exception as e:
                return type(e).__name__
        def proxied(port):
            import urllib.request, urllib.error
            try:
                urllib.request.urlopen("http://127.0.0.1:%d/v1/executions" % port, timeout=5)
                return "connected"
            except urllib.error.HTTPError as e:
                return "HTTP%d%s" % (e.code, e.reason)
            except Exception as e:
                return type(e).__name__
        result = {{"verdict": "probe-{{}}-{{}}-{{}}-{{}}-{{}}-{{}}".format(
            environ({pid}), connect(5432), connect(4222), connect({port}),
            len([p for p in os.listdir("/proc") if p.isdigit()]) < 10, proxied({port}))}}
"#,
            pid = server.0.id(),
        ),
    )
    .expect("write");
    let o = author(&["register", pyprobe.to_str().expect("path")]);
    assert!(o.status.success(), "{}", err(&o));
    let o = author(&["exec", "start", "t/pyprobe", "--watch"]);
    let text = format!("{}{}", out(&o), err(&o));
    assert!(o.status.success(), "{text}");
    let verdict = text
        .split("probe-")
        .nth(1)
        .and_then(|v| v.split('"').next())
        .unwrap_or_else(|| panic!("no verdict: {text}"));
    let parts: Vec<&str> = verdict.split('-').collect();
    assert_eq!(
        parts[0], "FileNotFoundError",
        "the server's environ: {verdict}"
    );
    for (what, r) in ["postgres", "nats", "gateway"].iter().zip(&parts[1..4]) {
        assert_ne!(
            *r, "connected",
            "{what} reachable from tenant python: {verdict}"
        );
    }
    assert_eq!(parts[4], "True", "host processes visible: {verdict}");
    // Through the egress proxy (the sandbox's http_proxy), the gateway is refused by policy.
    assert_eq!(parts[5], "HTTP403egress_denied", "{verdict}");
    server.kill().expect("stop");
    server.wait().expect("wait");
}

/// Red team through the API, tenant against tenant on one server: globex's author cannot
/// resolve acme's keychain credential (the same alias is simply not globex's), and a globex
/// step running while an acme step holds files in its work dir sees none of them, nor
/// acme's processes.
#[test]
fn a_tenant_reaches_neither_another_tenants_secrets_nor_its_work() {
    if !mayfly_testkit::bubblewrap() {
        return;
    }
    const SECRET: &str = "acme-only-secret-5521";
    let dir = tempfile::tempdir().expect("tmp");
    let home = dir.path().join("home");
    let db = dir.path().join("srv.db");
    let mut set = bin();
    set.env("MAYFLY_HOME", &home)
        .env_remove("MAYFLY_MASTER_KEY")
        .args(["keychain", "set", "api", "--tenant", "acme", "--db"])
        .arg(&db);
    let o = with_stdin(set, &format!("{{\"token\": \"{SECRET}\"}}"));
    assert!(o.status.success(), "{}", err(&o));
    let mut server = bin();
    server
        .env("MAYFLY_HOME", &home)
        .env_remove("MAYFLY_MASTER_KEY")
        .args(["server", "--listen", "127.0.0.1:0", "--db"])
        .arg(&db)
        .arg("--control-key-file")
        .arg(db.with_extension("control.key"));
    let (mut server, url, token) = start_server(server);
    let admin = remote_cli(&url, &token);
    let author = |tenant: &str| {
        let o = admin(&[
            "token", "--tenant", tenant, "--role", "author", "--name", "dev",
        ]);
        assert!(o.status.success(), "{}", err(&o));
        out(&o).trim().to_owned()
    };
    let (acme, globex) = (author("acme"), author("globex"));
    let register = |token: &str, name: &str, body: &str| {
        let f = dir.path().join(format!("{name}.yaml"));
        std::fs::write(
            &f,
            format!(
                "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {{name: {name}, path: t/{name}}}\n{body}"
            ),
        )
        .expect("write");
        let o = remote_cli(&url, token)(&["register", f.to_str().expect("path")]);
        assert!(o.status.success(), "{}", err(&o));
    };
    // The same playbook in both tenants: it resolves for acme, is missing for globex.
    let uses = "keychain:\n  - {name: api, kind: secret}\nworkflow:\n  - step: start\n    tool:\n      kind: python\n      input: {tok: \"{{ keychain.api.token }}\"}\n      code: |\n        result = {\"ok\": tok == \"acme-only-secret-5521\"}\n";
    register(&acme, "uses", uses);
    register(&globex, "uses", uses);
    let o = remote_cli(&url, &acme)(&["exec", "start", "t/uses", "--watch"]);
    assert!(o.status.success(), "{}{}", out(&o), err(&o));
    assert!(out(&o).contains("\"ok\": true"), "{}", out(&o));
    let o = remote_cli(&url, &globex)(&["exec", "start", "t/uses", "--watch"]);
    let text = format!("{}{}", out(&o), err(&o));
    assert!(!o.status.success(), "{text}");
    assert!(text.contains("keychain_missing"), "{text}");
    assert!(!text.contains(SECRET), "{text}");

    // acme's step holds a file in its work dir (and /tmp) for a while; globex looks for it.
    register(
        &acme,
        "holder",
        "workflow:\n  - step: start\n    tool:\n      kind: python\n      code: |\n        import time\n        open('/work/acme-private', 'w').write('x')\n        open('/tmp/acme-private', 'w').write('x')\n        time.sleep(6)\n        result = 'held'\n",
    );
    register(
        &globex,
        "seeker",
        "workflow:\n  - step: start\n    tool:\n      kind: python\n      code: |\n        import os\n        found = []\n        for top in ('/work', '/tmp', '/run', '/proc'):\n            for root, dirs, files in os.walk(top):\n                if root.startswith('/proc/') and root.count('/') > 2:\n                    dirs[:] = []\n                found += [os.path.join(root, f) for f in files if 'acme' in f]\n        cmdlines = []\n        for p in os.listdir('/proc'):\n            if p.isdigit():\n                try:\n                    cmdlines.append(open('/proc/%s/cmdline' % p, 'rb').read().decode(errors='replace'))\n                except OSError:\n                    pass\n        result = {'found': found, 'sleepers': [c for c in cmdlines if 'acme' in c or 'holder' in c]}\n",
    );
    let o = remote_cli(&url, &acme)(&["exec", "start", "t/holder"]);
    assert!(o.status.success(), "{}{}", out(&o), err(&o));
    // The holder has written its files by the time the seeker looks (2 s into its 6 s).
    std::thread::sleep(Duration::from_secs(2));
    let o = remote_cli(&url, &globex)(&["exec", "start", "t/seeker", "--watch"]);
    assert!(o.status.success(), "{}{}", out(&o), err(&o));
    let text = out(&o);
    assert!(
        text.contains("\"found\": []") && text.contains("\"sleepers\": []"),
        "globex saw acme's work: {text}"
    );
    server.kill().expect("stop");
    server.wait().expect("wait");
}

/// A printing command whose reader goes away (`| head`, a closed pipe) ends quietly — killed
/// by SIGPIPE as Unix tools are — and never panics on the write.
#[test]
fn a_closed_pipe_ends_a_printing_command_quietly() {
    let dir = tempfile::tempdir().expect("tmp");
    let db = dir.path().join("m.db");
    let report = run_json(&examples().join("hello.yaml"), &db);
    let id = report["execution_id"].as_str().expect("id").to_owned();
    for _ in 0..3 {
        let mut child = bin()
            .args(["events", &id, "--json", "--db"])
            .arg(&db)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("events");
        // The reader is gone before the first line is written.
        drop(child.stdout.take());
        let o = child.wait_with_output().expect("wait");
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!stderr.contains("panicked"), "{stderr}");
        use std::os::unix::process::ExitStatusExt;
        assert!(
            o.status.success() || o.status.signal() == Some(libc::SIGPIPE),
            "{:?}: {stderr}",
            o.status
        );
    }
}
