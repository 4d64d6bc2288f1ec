//! The web UI in a real headless Chromium (Debian `chromium` + `chromium-driver`, which
//! `.ci/run` installs): log in with a token, start an execution, watch it complete live,
//! open an event, browse the catalog (graph, diff), keychain and workers pages. Screenshots
//! of every stage are saved under `target/ui-screenshots/` as test artifacts.
//!
//! Without chromedriver the test is skipped loudly — and fails under `CI=true`.

mod common;

use common::{bin, out, start_server};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";

const LOOPING: &str = r#"apiVersion: noetl.io/v2
kind: Playbook
metadata: {name: ui-demo, path: demo/ui}
workload:
  items: [a, b, c]
workflow:
  - step: start
    desc: Say which items will be processed
    tool: {kind: python, code: "result = {'count': len(items)}", input: {items: "{{ items }}"}}
    next: {arcs: [{step: each}]}
  - step: each
    desc: One slow block per item
    loop: {in: "{{ items }}", iterator: item, spec: {mode: sequential}}
    tool:
      kind: python
      input: {item: "{{ item }}"}
      code: |
        import time
        time.sleep(0.4)
        result = item.upper()
    next: {arcs: [{step: end}]}
  - step: end
    tool: {kind: python, input: {all: "{{ each }}"}, code: "result = {'joined': ''.join(all)}"}
"#;

fn screenshots() -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/ui-screenshots");
    std::fs::create_dir_all(&d).expect("screenshot dir");
    d
}

struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

async fn shot(c: &Client, name: &str) {
    let png = c.screenshot().await.expect("screenshot");
    std::fs::write(screenshots().join(format!("{name}.png")), png).expect("write screenshot");
}

async fn wait_css(c: &Client, css: &str) -> fantoccini::elements::Element {
    c.wait()
        .at_most(Duration::from_secs(30))
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("waiting for {css}: {e}"))
}

/// Poll `f` until it yields Some (or fail after 60 s, naming `what`).
async fn until<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let t0 = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn click(c: &Client, css: &str, what: &str) {
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"))
        .click()
        .await
        .unwrap_or_else(|e| panic!("clicking {what}: {e}"));
}

async fn text(c: &Client, css: &str) -> String {
    match c.find(Locator::Css(css)).await {
        Ok(e) => e.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_in_start_watch_open_an_event_and_browse() {
    if !Path::new(CHROMEDRIVER).exists() || !Path::new(CHROMIUM).exists() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true but {CHROMEDRIVER} or {CHROMIUM} is missing (.ci/run installs chromium and chromium-driver)"
        );
        eprintln!(
            "SKIPPED: the web UI browser test needs {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver)"
        );
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let db = dir.path().join("ui.db");
    let key = dir.path().join("master.key");
    // A credential in the system tenant's keychain: its alias is listed, its value never.
    let o = bin()
        .args(["keychain", "set", "warehouse", "--tenant", "system", "--db"])
        .arg(&db)
        .arg("--master-key-file")
        .arg(&key)
        .args(["--field", "password=pw-never-shown-7431"])
        .output()
        .expect("keychain set");
    assert!(o.status.success(), "{}", out(&o));
    let mut cmd = bin();
    cmd.args(["server", "--listen", "127.0.0.1:0", "--db"])
        .arg(&db)
        .args(["--provider-listen", "127.0.0.1:0"])
        .arg("--snapshots")
        .arg(dir.path().join("snapshots"))
        .env("MAYFLY_AGENT_INTERVAL_MS", "200")
        .arg("--master-key-file")
        .arg(&key)
        .arg("--control-key-file")
        .arg(dir.path().join("control.key"));
    let (_server, url, token) = start_server(cmd);

    // Two versions of the playbook in the catalog (the second for the diff).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::new();
    for body in [
        LOOPING.to_owned(),
        LOOPING.replace("time.sleep(0.4)", "time.sleep(0.3)"),
    ] {
        let r = http
            .post(format!("{url}/v1/playbooks"))
            .bearer_auth(&token)
            .body(body)
            .send()
            .await
            .expect("register");
        assert!(
            r.status().is_success(),
            "{}",
            r.text().await.unwrap_or_default()
        );
    }

    let port = free_port();
    let _driver = Driver(
        Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver"),
    );
    let caps: serde_json::Map<String, Value> = serde_json::from_value(json!({
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": CHROMIUM,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1700"],
        }
    }))
    .expect("caps");
    let driver_url = format!("http://127.0.0.1:{port}");
    let c = until("chromedriver accepts a session", || {
        let caps = caps.clone();
        let driver_url = driver_url.clone();
        async move {
            ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                .capabilities(caps)
                .connect(&driver_url)
                .await
                .ok()
        }
    })
    .await;

    // Log in: a wrong token is refused, the right one opens a session.
    c.goto(&format!("{url}/ui/")).await.expect("open ui");
    let input = wait_css(&c, "#token").await;
    input.send_keys("mf_not-a-token").await.expect("type");
    click(&c, "#login-button", "button").await;
    until("the wrong token is refused", || async {
        (text(&c, "#login-error").await == "Unknown token.").then_some(())
    })
    .await;
    shot(&c, "01-login-refused").await;
    let input = c.find(Locator::Css("#token")).await.expect("token input");
    input.clear().await.expect("clear");
    input.send_keys(&token).await.expect("type");
    click(&c, "#login-button", "button").await;
    until("logged in", || async {
        text(&c, "#who").await.contains("system").then_some(())
    })
    .await;
    // The session cookie is HttpOnly: the page's scripts cannot read it, nor the token.
    let cookies = c
        .execute("return document.cookie", vec![])
        .await
        .expect("js");
    assert_eq!(
        cookies,
        json!(""),
        "the session cookie is not readable by scripts"
    );

    // Start an execution from the executions page.
    wait_css(&c, "#start-button").await;
    let wl = c
        .find(Locator::Css("#start-workload"))
        .await
        .expect("workload");
    wl.send_keys(r#"{"items": ["x", "y", "z"]}"#)
        .await
        .expect("type workload");
    shot(&c, "02-executions").await;
    click(&c, "#start-button", "start").await;
    let id = until("navigated to the execution", || async {
        let u = c.current_url().await.ok()?;
        u.fragment()?
            .strip_prefix("/executions/")
            .map(str::to_owned)
    })
    .await;
    // Live: the graph shows the loop running before the execution completes.
    wait_css(&c, "g.gnode[data-step='each']").await;
    until("the loop is seen running", || async {
        let e = c
            .find(Locator::Css("g.gnode[data-step='each']"))
            .await
            .ok()?;
        (e.attr("data-state").await.ok()?? == "running").then_some(())
    })
    .await;
    shot(&c, "03-execution-running").await;
    until("the execution completes", || async {
        (text(&c, "#exec-status").await == "completed").then_some(())
    })
    .await;
    // Every step is drawn done and the loop's progress reads 3/3 (the graph is redrawn
    // shortly after the last event).
    until("every step drawn done, the loop at 3/3", || async {
        for step in ["start", "each", "end"] {
            let css = format!("g.gnode[data-step='{step}'][data-state='done']");
            c.find(Locator::Css(&css)).await.ok()?;
        }
        (text(&c, "text[data-loop='each']").await == "3/3").then_some(())
    })
    .await;
    until("the result is shown", || async {
        text(&c, "#result").await.contains("XYZ").then_some(())
    })
    .await;
    let kinds = c
        .find_all(Locator::Css("#timeline li"))
        .await
        .expect("timeline");
    assert!(kinds.len() > 10, "events: {}", kinds.len());
    wait_css(&c, "#timeline li[data-kind='execution.completed']").await;
    // Open an event: a loop iteration's step.finished.
    click(
        &c,
        "#timeline li[data-kind='step.finished']",
        "a step.finished event",
    )
    .await;
    let detail = text(&c, "#event-detail").await;
    assert!(detail.contains("\"kind\": \"step.finished\""), "{detail}");
    assert!(
        detail.contains(&format!("\"execution_id\": \"{id}\"")),
        "{detail}"
    );
    shot(&c, "04-execution-completed-event-open").await;

    // The list shows it completed, and filters.
    c.goto(&format!("{url}/ui/#/executions"))
        .await
        .expect("list");
    let row = wait_css(&c, &format!("tr[data-id='{id}']")).await;
    assert!(row.text().await.expect("row").contains("completed"));
    c.find(Locator::Css("#f-status"))
        .await
        .expect("filter")
        .select_by_value("failed")
        .await
        .expect("select");
    until("the filter hides it", || async {
        c.find(Locator::Css(&format!("tr[data-id='{id}']")))
            .await
            .is_err()
            .then_some(())
    })
    .await;

    // Catalog: versions, graph and the diff of v1 → v2.
    c.goto(&format!("{url}/ui/#/catalog/demo%2Fui"))
        .await
        .expect("catalog");
    wait_css(&c, "#graph g.gnode[data-step='end']").await;
    let diff = until("the diff", || async {
        let d = text(&c, "#diff").await;
        d.contains("@@").then_some(d)
    })
    .await;
    assert!(diff.contains("-        time.sleep(0.4)"), "{diff}");
    assert!(diff.contains("+        time.sleep(0.3)"), "{diff}");
    shot(&c, "05-catalog-graph-diff").await;

    // Keychain: the alias, never the value.
    c.goto(&format!("{url}/ui/#/keychain"))
        .await
        .expect("keychain");
    let aliases = wait_css(&c, "#aliases").await;
    assert!(aliases.text().await.expect("aliases").contains("warehouse"));
    assert!(
        !c.source()
            .await
            .expect("source")
            .contains("pw-never-shown-7431"),
        "a keychain value reached the page"
    );
    shot(&c, "06-keychain").await;

    // Workers and queue.
    c.goto(&format!("{url}/ui/#/workers"))
        .await
        .expect("workers");
    until("queue stats", || async {
        (text(&c, "#q-up").await == "up").then_some(())
    })
    .await;
    shot(&c, "07-workers").await;

    // A large execution: a 1,000-item fan-out (5,000+ events) opens with its whole timeline
    // and its graph. The time it takes is this page's figure (printed; README reports it).
    let fanout = LOOPING
        .replace("path: demo/ui", "path: demo/fanout")
        .replace("mode: sequential", "mode: parallel, max_in_flight: 64")
        .replace("time.sleep(0.4)", "pass");
    let r = http
        .post(format!("{url}/v1/playbooks"))
        .bearer_auth(&token)
        .body(fanout)
        .send()
        .await
        .expect("register");
    assert!(r.status().is_success());
    let items: Vec<String> = (0..1000).map(|i| format!("i{i}")).collect();
    let r: Value = http
        .post(format!("{url}/v1/executions"))
        .bearer_auth(&token)
        // `note` is over the inline limit: the request records it by ref (opened below).
        .body(
            json!({"path": "demo/fanout", "workload": {"items": items, "note": "n".repeat(20_000)}})
                .to_string(),
        )
        .send()
        .await
        .expect("start")
        .json()
        .await
        .expect("json");
    let big = r["execution_id"].as_str().expect("id").to_owned();
    let total = until("the fan-out completes", || async {
        let s: Value = http
            .get(format!("{url}/v1/executions/{big}"))
            .bearer_auth(&token)
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (s["status"] == "completed").then(|| s["events"].as_u64().unwrap_or(0))
    })
    .await;
    assert!(total > 5000, "events: {total}");
    let t0 = Instant::now();
    c.goto(&format!("{url}/ui/#/executions/{big}"))
        .await
        .expect("open the fan-out");
    until("the whole timeline and a finished graph", || async {
        let n = text(&c, "#event-count").await;
        let done = c
            .find(Locator::Css("g.gnode[data-step='each'][data-state='done']"))
            .await
            .is_ok();
        let progress = text(&c, "text[data-loop='each']").await;
        (done && n == format!("({total})") && progress == "1000/1000").then_some(())
    })
    .await;
    let opened = t0.elapsed();
    until("the fan-out's status and result", || async {
        (text(&c, "#exec-status").await == "completed"
            && text(&c, "#result").await.contains("I999"))
        .then_some(())
    })
    .await;
    shot(&c, "08-fanout-1000").await;
    // A payload ref opens from the timeline: the request's workload carries `note` by ref;
    // its chip shows the ref (digest, format, size), never bytes the gateway would have to read.
    click(
        &c,
        "#timeline li[data-kind='execution.requested']",
        "the execution.requested event",
    )
    .await;
    click(&c, "#event-detail span.ref", "the note's cache ref").await;
    let opened_ref = until("the ref opens", || async {
        let d = text(&c, "#event-detail").await;
        d.starts_with("cache reference sha256:").then_some(d)
    })
    .await;
    assert!(opened_ref.contains("\"format\": \"json\""), "{opened_ref}");
    assert!(opened_ref.contains("\"bytes\": 20002"), "{opened_ref}");
    assert!(
        !opened_ref.contains("nnnn"),
        "the payload itself is not shown"
    );
    shot(&c, "09-payload-ref-open").await;
    eprintln!(
        "ui figure: a {total}-event execution (1,000-item fan-out) opens with its graph and whole timeline in {} ms",
        opened.as_millis()
    );

    // Rollouts: a policy bundle rolled out to the server's own workers; the page shows, per
    // agent, the bundle it acknowledged and whether it is effective.
    let post = |path: &str, body: String| {
        http.post(format!("{url}{path}"))
            .bearer_auth(&token)
            .body(body)
            .send()
    };
    let r = post(
        "/v1/apply",
        "apiVersion: mayfly.dev/v1\nkind: Policy\nmetadata: {name: no-shell}\nspec:\n  tools: {allow: [noop, python]}\n".into(),
    )
    .await
    .expect("apply policy");
    assert!(
        r.status().is_success(),
        "{}",
        r.text().await.unwrap_or_default()
    );
    let b: Value = post("/v1/bundles", String::new())
        .await
        .expect("publish")
        .json()
        .await
        .expect("json");
    let digest = b["digest"].as_str().expect("bundle digest").to_owned();
    let r = post(
        "/v1/apply",
        format!("apiVersion: mayfly.dev/v1\nkind: Rollout\nmetadata: {{name: no-shell}}\nspec:\n  bundle: \"{digest}\"\n  target: {{pool: default}}\n"),
    )
    .await
    .expect("apply rollout");
    assert!(
        r.status().is_success(),
        "{}",
        r.text().await.unwrap_or_default()
    );
    c.goto(&format!("{url}/ui/#/rollouts"))
        .await
        .expect("rollouts");
    until("the agent acknowledges the bundle", || async {
        let t = text(&c, "[data-rollout='no-shell']").await;
        if t.contains(&digest[..19]) && t.contains("ok") && t.contains("live") {
            return Some(());
        }
        c.refresh().await.ok()?;
        wait_css(&c, "[data-rollout='no-shell']").await;
        None
    })
    .await;
    shot(&c, "10-rollouts").await;

    // Actors: declared, not yet placed; the page lists phase and epoch, and its snapshots.
    let actors = [
        json!({"apiVersion": "mayfly.dev/v1", "kind": "ActorTemplate",
               "metadata": {"name": "counter", "tenant": "acme"},
               "spec": {"workload": mayfly_actors::conformance::process_workload()}}),
        json!({"apiVersion": "mayfly.dev/v1", "kind": "Actor",
               "metadata": {"name": "ui-actor", "tenant": "acme"}, "spec": {"template": "counter"}}),
    ];
    let body: Vec<String> = actors.iter().map(Value::to_string).collect();
    let r = post("/v1/apply", body.join("\n---\n"))
        .await
        .expect("apply actors");
    assert!(
        r.status().is_success(),
        "{}",
        r.text().await.unwrap_or_default()
    );
    c.goto(&format!("{url}/ui/#/actors")).await.expect("actors");
    let row = wait_css(&c, "tr[data-actor='ui-actor']").await;
    let t = row.text().await.expect("row");
    assert!(t.contains("acme") && t.contains("counter"), "{t}");
    row.click().await.expect("open snapshots");
    until("the snapshot list", || async {
        (text(&c, "#snapshots").await == "[]").then_some(())
    })
    .await;
    shot(&c, "11-actors").await;

    // Log out: the session is gone.
    click(&c, "#logout", "logout").await;
    wait_css(&c, "#login:not([hidden])").await;
    let r = c
        .execute("return fetch('/v1/whoami').then(r => r.status)", vec![])
        .await
        .expect("js");
    assert_eq!(r, json!(401));
    c.close().await.expect("close");
}
