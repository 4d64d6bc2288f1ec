//! Red team, tool level: tenant code tries to reach what it must not, through the same
//! `Tools::run_in` a worker calls, in a real bubblewrap sandbox; connections of the
//! worker-side tools try loopback services under an egress policy. Each attempt must be
//! refused or contained, and the test asserts how.

use mayfly_tools::{Scope, ToolOutput, Tools, ToolsConfig};
use mayfly_types::{Egress, Limits};
use serde_json::{Map, Value, json};
use std::time::{Duration, Instant};

fn map(v: Value) -> Map<String, Value> {
    v.as_object().cloned().unwrap_or_default()
}

fn boxed() -> Option<Tools> {
    if !mayfly_testkit::bubblewrap() {
        return None;
    }
    let t = Tools::new(ToolsConfig {
        python_pool: 1,
        sandbox: true,
        default_egress: vec![Egress::Public],
        keeper: Some(mayfly_tools::sandbox::Keeper {
            exe: env!("CARGO_BIN_EXE_mayfly-sandbox-keeper").into(),
            args: Vec::new(),
        }),
        ..Default::default()
    })
    .expect("tools");
    assert!(
        t.sandboxed(),
        "the sandbox must start here: {:?}",
        t.sandbox_error()
    );
    Some(t)
}

/// Run a `kind` task with config `cfg` for `scope` (20 s at most).
async fn run(t: &Tools, scope: &Scope<'_>, kind: &str, cfg: Value) -> ToolOutput {
    t.run_in(
        scope,
        kind,
        &map(cfg),
        &Map::new(),
        Some(Duration::from_secs(20)),
    )
    .await
}

async fn sh(t: &Tools, scope: &Scope<'_>, cmd: &str) -> ToolOutput {
    run(t, scope, "shell", json!({ "command": cmd })).await
}

async fn py(t: &Tools, scope: &Scope<'_>, code: &str) -> ToolOutput {
    run(t, scope, "python", json!({ "code": code })).await
}

fn tenant(name: &str) -> Scope<'_> {
    Scope {
        tenant: name,
        limits: None,
    }
}

fn stdout(o: &ToolOutput) -> String {
    o.data["stdout"].as_str().unwrap_or_default().to_owned()
}

/// stdout and stderr together.
fn both(o: &ToolOutput) -> String {
    format!(
        "{} {}",
        stdout(o),
        o.data["stderr"].as_str().unwrap_or_default()
    )
}

#[tokio::test]
async fn shell_sees_none_of_the_servers_files_or_processes() {
    let Some(t) = boxed() else { return };
    // A stand-in for the server's home: a master key only root may read.
    let home = std::env::temp_dir().join(mayfly_testkit::unique("mayfly-home"));
    std::fs::create_dir_all(&home).expect("home");
    let key = home.join("master.key");
    std::fs::write(&key, "TOPSECRET-MASTER-KEY").expect("key");
    let s = tenant("acme");
    let o = sh(&t, &s, &format!("cat {} 2>&1; echo rc=$?", key.display())).await;
    assert!(o.ok, "{o:?}");
    assert!(stdout(&o).contains("No such file"), "{}", stdout(&o));
    assert!(!stdout(&o).contains("TOPSECRET"));
    // The root holds only what the sandbox binds.
    let o = sh(&t, &s, "ls /").await;
    let listing = stdout(&o);
    let mut top: Vec<&str> = listing.lines().collect();
    top.sort();
    for name in &top {
        assert!(
            [
                "bin", "dev", "etc", "lib", "lib32", "lib64", "libx32", "proc", "root", "run",
                "sbin", "tmp", "usr", "work"
            ]
            .contains(name),
            "unexpected /{name} in the sandbox: {top:?}"
        );
    }
    // /run holds the keeper (read-only) and the tenant's egress proxy socket, nothing else.
    let o = sh(&t, &s, "ls /run; touch /run/mayfly-keeper 2>&1; true").await;
    let out = stdout(&o);
    assert!(
        out.starts_with("mayfly-egress.sock\nmayfly-keeper\ntouch: ")
            && (out.contains("Read-only file system") || out.contains("Permission denied")),
        "{o:?}"
    );
    // /root holds only the python prefix's path (read-only), never the host's /root.
    let o = sh(
        &t,
        &s,
        "ls -a /root 2>&1; cat /etc/shadow 2>&1; ls /var/lib/postgresql 2>&1",
    )
    .await;
    assert!(!stdout(&o).contains(".bash_history"), "{}", stdout(&o));
    assert!(!stdout(&o).contains("root:"), "{}", stdout(&o));
    assert!(stdout(&o).contains("No such file"), "{}", stdout(&o));
    // Only the sandbox's own processes: the server's pid does not exist here, and no
    // process of the host (this test's binary among them) is listed.
    let me = std::process::id();
    let o = sh(
        &t,
        &s,
        &format!("cat /proc/[0-9]*/comm | sort | tr '\\n' ' '; echo; cat /proc/{me}/environ 2>&1"),
    )
    .await;
    let out = stdout(&o);
    let comms: Vec<&str> = out
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    for c in &comms {
        assert!(
            [
                "bwrap",
                "python3",
                "python3.11",
                "python",
                // The keeper, under the name it is bound at.
                "mayfly-keeper",
                "sh",
                "cat",
                "sort",
                "tr"
            ]
            .contains(c)
                || c.starts_with("python"),
            "a host process is visible in the sandbox: {c} (all: {comms:?})"
        );
    }
    assert!(out.contains("No such file"), "{out}");
    // Nothing writable outside /work and /tmp; no capabilities, no new privileges.
    let o = sh(
        &t,
        &s,
        "touch /usr/x 2>&1; touch /etc/x 2>&1; grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/self/status",
    )
    .await;
    let out = stdout(&o);
    assert!(
        out.matches("Read-only file system").count() + out.matches("Permission denied").count()
            >= 2,
        "{out}"
    );
    assert!(out.contains("CapEff:\t0000000000000000"), "{out}");
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");
    assert!(out.contains("Seccomp:\t2"), "{out}");
    let _ = std::fs::remove_dir_all(&home);
}

#[tokio::test]
async fn secrets_in_env_never_reach_a_command_line() {
    let Some(t) = boxed() else { return };
    let cfg = map(json!({
        "command": "echo \"$TOKEN\" | wc -c; cat /proc/1/cmdline /proc/self/cmdline | tr '\\0' ' '",
        "env": {"TOKEN": "s3cr3t-value-xyz"},
    }));
    let o = run(&t, &tenant("acme"), "shell", Value::Object(cfg.clone())).await;
    assert!(o.ok, "{o:?}");
    let out = stdout(&o);
    assert!(out.starts_with("17"), "the step sees its env: {out}");
    assert!(
        !out.contains("s3cr3t"),
        "an env value is on a command line: {out}"
    );
}

#[tokio::test]
async fn the_kernel_surface_is_filtered() {
    let Some(t) = boxed() else { return };
    let s = tenant("acme");
    let code = r#"
import ctypes, errno, os
libc = ctypes.CDLL(None, use_errno=True)
def attempt(f, *a):
    r = f(*a)
    return errno.errorcode.get(ctypes.get_errno(), str(ctypes.get_errno())) if r != 0 else "ALLOWED"
result = {
    "unshare_user": attempt(libc.unshare, 0x10000000),
    "unshare_net": attempt(libc.unshare, 0x40000000),
    "mount": attempt(libc.mount, b"none", b"/work", b"tmpfs", 0, None),
    "ptrace": "EPERM" if libc.ptrace(16, 1, 0, 0) != 0 and ctypes.get_errno() == errno.EPERM else "ALLOWED",
    "uid": os.getuid(),
}
"#;
    let o = py(&t, &s, code).await;
    assert!(o.ok, "{o:?}");
    for k in ["unshare_user", "unshare_net", "mount", "ptrace"] {
        assert_eq!(o.data[k], json!("EPERM"), "{k}: {o:?}");
    }
    // Run by root, the tenant's code is not root.
    assert_ne!(o.data["uid"], json!(0), "{o:?}");
    // Threads and subprocesses still work (clone3 falls back to clone).
    let o = py(
        &t,
        &s,
        "import subprocess, threading\nth = threading.Thread(target=lambda: None); th.start(); th.join()\nresult = subprocess.run(['sh', '-c', 'echo hi'], capture_output=True, text=True).stdout",
    )
    .await;
    assert_eq!(o.data, json!("hi\n"), "{o:?}");
}

#[tokio::test]
async fn loopback_services_are_unreachable_from_tenant_code() {
    let Some(t) = boxed() else { return };
    if !mayfly_testkit::postgres() {
        return;
    }
    let code = r#"
import socket
out = {}
for port in (5432, 4222):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        out[str(port)] = "CONNECTED"
    except OSError as e:
        out[str(port)] = type(e).__name__
result = out
"#;
    let o = py(&t, &tenant("acme"), code).await;
    assert!(o.ok, "{o:?}");
    assert_eq!(o.data["5432"], json!("ConnectionRefusedError"), "{o:?}");
    assert_eq!(o.data["4222"], json!("ConnectionRefusedError"), "{o:?}");
    // With the platform's explicit opt-out the host's network is shared.
    let open = Limits {
        egress: vec![Egress::Host],
        ..Limits::default()
    };
    let s = Scope {
        tenant: "platform-ops",
        limits: Some(&open),
    };
    let o = py(&t, &s, code).await;
    assert_eq!(o.data["5432"], json!("CONNECTED"), "{o:?}");
}

#[tokio::test]
async fn sandboxed_code_reaches_the_network_only_through_the_egress_proxy() {
    use axum::{Router, routing::get};
    let Some(t) = boxed() else { return };
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = l.local_addr().expect("addr").port();
    tokio::spawn(async move {
        let app = Router::new().route("/hello", get(|| async { "hello from the host" }));
        axum::serve(l, app).await
    });
    // Plain http through the proxy variables, a CONNECT tunnel, and a raw socket.
    let code = format!(
        r#"
import os, socket, http.client, urllib.request, urllib.error
out = {{"proxy": os.environ.get("https_proxy")}}
def attempt(name, f):
    try:
        out[name] = f()
    except urllib.error.HTTPError as e:
        out[name] = "HTTP %d %s" % (e.code, e.read().decode().strip())
    except OSError as e:
        out[name] = "%s: %s" % (type(e).__name__, e)
attempt("http", lambda: urllib.request.urlopen("http://127.0.0.1:{port}/hello", timeout=5).read().decode())
def tunnel(host, port):
    c = http.client.HTTPConnection("127.0.0.1", 3128, timeout=5)
    c.set_tunnel(host, port)
    c.request("GET", "/hello")
    return c.getresponse().read().decode()
attempt("connect", lambda: tunnel("127.0.0.1", {port}))
attempt("connect_pg", lambda: tunnel("127.0.0.1", 5432))
attempt("metadata", lambda: urllib.request.urlopen("http://169.254.169.254/latest/", timeout=5).read().decode())
def raw():
    socket.create_connection(("127.0.0.1", {port}), timeout=2).close()
    return "CONNECTED"
attempt("raw", raw)
result = out
"#
    );
    let listed = Limits {
        egress: vec![Egress::Allow(vec![format!("127.0.0.1:{port}")])],
        ..Limits::default()
    };
    let s = Scope {
        tenant: "acme",
        limits: Some(&listed),
    };
    let o = py(&t, &s, &code).await;
    assert!(o.ok, "{o:?}");
    assert_eq!(o.data["proxy"], json!("http://127.0.0.1:3128"), "{o:?}");
    assert_eq!(o.data["http"], json!("hello from the host"), "{o:?}");
    assert_eq!(o.data["connect"], json!("hello from the host"), "{o:?}");
    let refused = |k: &str| o.data[k].as_str().unwrap_or_default().to_owned();
    assert!(
        refused("connect_pg").contains("Tunnel connection failed: 403 egress_denied"),
        "{o:?}"
    );
    assert!(
        refused("metadata").starts_with("HTTP 403 egress_denied: ")
            && refused("metadata").contains("169.254.169.254"),
        "{o:?}"
    );
    // The proxy is the only way out: the sandbox's own loopback has nothing of the host's.
    assert!(
        refused("raw").starts_with("ConnectionRefusedError"),
        "{o:?}"
    );

    // `public` (the server default): the same loopback origin is refused with the reason.
    let o = py(&t, &tenant("acme"), &code).await;
    assert!(o.ok, "{o:?}");
    assert!(
        refused_of(&o, "http").starts_with("HTTP 403 egress_denied: ")
            && refused_of(&o, "http").contains("not a public address"),
        "{o:?}"
    );
    assert!(
        refused_of(&o, "connect").contains("403 egress_denied"),
        "{o:?}"
    );

    // Shell commands of the same pool see the same proxy.
    let o = sh(&t, &s, "echo $http_proxy $HTTPS_PROXY").await;
    assert_eq!(
        stdout(&o),
        "http://127.0.0.1:3128 http://127.0.0.1:3128\n",
        "{o:?}"
    );

    // `none`: no proxy at all, nothing reachable.
    let none = Limits {
        egress: vec![Egress::None],
        ..Limits::default()
    };
    let s = Scope {
        tenant: "acme",
        limits: Some(&none),
    };
    let o = py(&t, &s, &code).await;
    assert!(o.ok, "{o:?}");
    assert_eq!(o.data["proxy"], json!(null), "{o:?}");
    for k in ["http", "connect", "raw"] {
        assert!(
            refused_of(&o, k).starts_with("URLError")
                || refused_of(&o, k).starts_with("ConnectionRefusedError"),
            "{k}: {o:?}"
        );
    }
}

fn refused_of(o: &ToolOutput, k: &str) -> String {
    o.data[k].as_str().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn memory_processes_disk_and_cpu_are_bounded() {
    let Some(t) = boxed() else { return };
    let tight = Limits {
        memory_mb: Some(256),
        processes: Some(16),
        disk_mb: Some(8),
        cpu_s: Some(1),
        ..Limits::default()
    };
    let s = Scope {
        tenant: "greedy",
        limits: Some(&tight),
    };
    let o = py(&t, &s, "x = bytearray(1 << 30)\nresult = len(x)").await;
    assert!(!o.ok);
    assert!(
        o.error
            .as_ref()
            .is_some_and(|e| e.message.starts_with("MemoryError")),
        "{o:?}"
    );
    // The pooled interpreter survived its step's MemoryError.
    assert_eq!(py(&t, &s, "result = 1").await.data, json!(1));
    let o = sh(
        &t,
        &s,
        "i=0; while [ $i -lt 64 ]; do (sleep 3) & i=$((i+1)); done 2>&1 | tail -1; echo done",
    )
    .await;
    let all = both(&o);
    assert!(
        all.contains("fork") || all.contains("Resource temporarily unavailable"),
        "64 processes under a limit of 16 must fail to fork: {all}"
    );
    let o = sh(
        &t,
        &s,
        "dd if=/dev/zero of=/work/fill bs=1M count=64 2>&1; ls -la /work/fill",
    )
    .await;
    let all = both(&o);
    assert!(
        all.contains("File size limit exceeded") || all.contains("No space left"),
        "64 MiB into an 8 MiB work dir: {o:?}"
    );
    assert!(
        !all.contains(" 67108864 "),
        "the file grew to 64 MiB: {all}"
    );
    let began = Instant::now();
    let o = sh(&t, &s, "while :; do :; done").await;
    assert_eq!(
        o.error.as_ref().map(|e| e.code.as_str()),
        Some("resource_limit"),
        "{o:?}"
    );
    assert!(began.elapsed() < Duration::from_secs(15));
}

#[tokio::test]
async fn python_steps_start_clean_and_tenants_never_share_an_interpreter() {
    let Some(t) = boxed() else { return };
    let a = tenant("tenant-a");
    let o = py(
        &t,
        &a,
        "open('/work/left-behind', 'w').write('x')\nimport json\njson.marker = 'a'\nresult = sorted(__import__('os').listdir('/work'))",
    )
    .await;
    assert_eq!(o.data, json!(["left-behind"]), "{o:?}");
    // The same tenant's next step: same warm interpreter (the module state is there), but
    // an empty work dir.
    let o = py(
        &t,
        &a,
        "import json, os\nresult = [getattr(json, 'marker', None), os.listdir('/work'), os.getcwd()]",
    )
    .await;
    assert_eq!(o.data, json!(["a", [], "/work"]), "{o:?}");
    // Another tenant: another interpreter.
    let o = py(
        &t,
        &tenant("tenant-b"),
        "import json\nresult = str(getattr(json, 'marker', None))",
    )
    .await;
    assert_eq!(o.data, json!("None"), "{o:?}");
}

#[tokio::test]
async fn worker_side_tools_refuse_loopback_under_public_egress() {
    let Some(t) = boxed() else { return };
    let s = tenant("acme");
    let cases = [
        ("http", json!({"url": "http://127.0.0.1:4222/"})),
        ("http", json!({"url": "http://localhost:5432/"})),
        (
            "http",
            json!({"url": "http://169.254.169.254/latest/meta-data/"}),
        ),
        ("http", json!({"url": "http://[::ffff:127.0.0.1]:5432/"})),
        ("http", json!({"url": "http://0.0.0.0:5432/"})),
        (
            "postgres",
            json!({"query": "select 1", "connection_string": "postgres://postgres@127.0.0.1:5432/test"}),
        ),
        (
            "postgres",
            json!({"query": "select 1", "connection_string": "postgres://postgres@localhost/test?host=/var/run/postgresql"}),
        ),
        (
            "nats",
            json!({"operation": "publish", "url": "nats://127.0.0.1:4222", "subject": "x", "data": "y"}),
        ),
    ];
    for (kind, cfg) in cases {
        let began = Instant::now();
        let o = run(&t, &s, kind, cfg.clone()).await;
        assert_eq!(
            o.error.as_ref().map(|e| e.code.as_str()),
            Some("egress_denied"),
            "{kind} {cfg}: {o:?}"
        );
        assert!(began.elapsed() < Duration::from_secs(2), "refused at once");
    }
    // `none`: nothing at all, whatever the address.
    let none = Limits {
        egress: vec![Egress::None],
        ..Limits::default()
    };
    let o = run(
        &t,
        &Scope {
            tenant: "acme",
            limits: Some(&none),
        },
        "http",
        json!({"url": "http://1.1.1.1/"}),
    )
    .await;
    assert_eq!(o.error.map(|e| e.code), Some("egress_denied".into()));
}

/// An allow-list opens exactly what it names; a redirect to anything else is refused at
/// that hop, and the credential header is not carried to another host.
#[tokio::test]
async fn an_allow_list_opens_what_it_names_and_redirects_are_checked_per_hop() {
    use axum::{Router, http::HeaderMap, response::Redirect, routing::get};
    let Some(t) = boxed() else { return };
    let other = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let other_port = other.local_addr().expect("addr").port();
    tokio::spawn(async move {
        let app = Router::new().route(
            "/",
            get(|h: HeaderMap| async move { format!("auth={:?}", h.get("authorization")) }),
        );
        axum::serve(other, app).await
    });
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = l.local_addr().expect("addr").port();
    tokio::spawn(async move {
        let app = Router::new()
            .route("/ok", get(|| async { "fine" }))
            .route(
                "/away",
                get(move || async move {
                    Redirect::temporary(&format!("http://127.0.0.1:{other_port}/"))
                }),
            )
            .route(
                "/via-localhost",
                get(move || async move {
                    Redirect::temporary(&format!("http://localhost:{other_port}/"))
                }),
            );
        axum::serve(l, app).await
    });
    let allow = |rules: Vec<String>| Limits {
        egress: vec![Egress::Allow(rules)],
        ..Limits::default()
    };
    let only_first = allow(vec![format!("127.0.0.1:{port}")]);
    let s = Scope {
        tenant: "acme",
        limits: Some(&only_first),
    };
    let get = |url: String| map(json!({"url": url, "headers": {"Authorization": "Bearer t0k3n"}}));
    let o = run(
        &t,
        &s,
        "http",
        Value::Object(get(format!("http://127.0.0.1:{port}/ok"))),
    )
    .await;
    assert!(o.ok, "{o:?}");
    assert_eq!(o.data["body"], json!("fine"));
    let o = run(
        &t,
        &s,
        "http",
        Value::Object(get(format!("http://127.0.0.1:{port}/away"))),
    )
    .await;
    assert_eq!(
        o.error.as_ref().map(|e| e.code.as_str()),
        Some("egress_denied"),
        "{o:?}"
    );
    // Both ports allowed: the redirect is followed, without the credential.
    let both = allow(vec![
        format!("127.0.0.1:{port}"),
        format!("127.0.0.1:{other_port}"),
        format!("localhost:{other_port}"),
    ]);
    let s = Scope {
        tenant: "acme",
        limits: Some(&both),
    };
    let o = run(
        &t,
        &s,
        "http",
        Value::Object(get(format!("http://127.0.0.1:{port}/via-localhost"))),
    )
    .await;
    assert!(o.ok, "{o:?}");
    assert_eq!(o.data["body"], json!("auth=None"), "{o:?}");
    // The same host keeps it.
    let o = run(
        &t,
        &s,
        "http",
        Value::Object(get(format!("http://127.0.0.1:{port}/away"))),
    )
    .await;
    assert_eq!(
        o.data["body"],
        json!("auth=None"),
        "a port change is another origin: {o:?}"
    );
}

#[tokio::test]
async fn duckdb_runs_in_the_tenants_sandbox() {
    let Some(t) = boxed() else { return };
    if !mayfly_testkit::duckdb() {
        return;
    }
    let cfg = map(json!({
        "query": "select count(*) as n from range(100000); copy (select 1) to '/work/out.csv'",
        "db_path": "/work/scratch.duckdb",
    }));
    let o = run(&t, &tenant("acme"), "duckdb", Value::Object(cfg.clone())).await;
    assert!(o.ok, "{o:?}");
    assert_eq!(o.data["command_0"]["rows"], json!([{"n": 100000}]), "{o:?}");
    // Its files lived in the step's work dir: the next step (same tenant, same sandbox)
    // finds it empty, and the host never had them.
    let o = py(
        &t,
        &tenant("acme"),
        "import os\nresult = os.listdir('/work')",
    )
    .await;
    assert_eq!(o.data, json!([]), "{o:?}");
    assert!(!std::path::Path::new("/work/scratch.duckdb").exists());
}
