//! `mayfly bench`: orchestration overhead per durable step and fan-out throughput on the
//! embedded store (SQLite, WAL, synchronous=FULL: every figure includes real fsyncs).

use anyhow::{Result, bail};
use clap::Args;
use mayfly_dsl::{ParseOptions, parse};
use mayfly_engine::Status;
use mayfly_runtime::{Runtime, RuntimeConfig};
use mayfly_store::SqliteStore;
use serde_json::{Map, json};
use std::fmt::Write as _;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

#[derive(Args, Clone)]
pub struct BenchArgs {
    /// Steps in each sequential chain.
    #[arg(long, default_value_t = 100)]
    steps: usize,
    /// Items in the noop fan-out.
    #[arg(long, default_value_t = 10_000)]
    items: usize,
    /// Items in the python fan-out.
    #[arg(long, default_value_t = 1_000)]
    python_items: usize,
    /// Items in the wide python fan-out (through a server only): enough for its throughput
    /// to be a steady state, not the ramp up and the tail.
    #[arg(long, default_value_t = 15_000)]
    wide_items: usize,
    /// Items in flight at once in the wide fan-out. A deep window is what a throughput-bound
    /// fan-out wants: each commit then dispatches, and each queue message carries, more blocks.
    #[arg(long, default_value_t = 1024)]
    wide_in_flight: usize,
    /// Slots of each `mayfly worker` the distributed bench spawns (blocks waiting for one of
    /// the worker's python interpreters hold a slot, not an interpreter).
    #[arg(long, default_value_t = 256)]
    worker_slots: usize,
    /// Runtime threads of each `mayfly worker` the distributed bench spawns (default: the
    /// workers together get one per CPU, at least one each).
    #[arg(long)]
    worker_threads: Option<usize>,
    /// Rows in the table hand-off (shared cache) scenario.
    #[arg(long, default_value_t = 10_000)]
    rows: usize,
    /// Repetitions of each scenario (the median is reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Print one JSON document.
    #[arg(long)]
    json: bool,
    /// Event log to measure: a `postgres://` URL (default: a temporary SQLite file).
    #[arg(long)]
    db: Option<String>,
    /// Benchmark the running server at MAYFLY_URL (token MAYFLY_TOKEN, role author) through
    /// its HTTP API instead of an embedded runtime.
    #[arg(long)]
    server: bool,
    /// Distributed mode: for each count in --worker-counts, spawn `mayfly server --db DB
    /// --queue URL` and that many `mayfly worker` processes, then benchmark the server.
    #[arg(long)]
    queue: Option<String>,
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    worker_counts: Vec<usize>,
    /// Control plane: read latency per freshness class (p50/p99 over a node's view) and the
    /// time a paused view takes to catch up with a gap of --gap control events.
    #[arg(long)]
    control: bool,
    /// Events in the control bench's catch-up gap.
    #[arg(long, default_value_t = 100_000)]
    gap: usize,
    /// Actor dataplane: resume latency through the router (process and wasm), wasm golden
    /// restore, checkpoint time and snapshot size against durable data, actors per provider.
    #[arg(long)]
    actors: bool,
    /// Payloads collected by the cache retention round (SQLite log, local cache).
    #[arg(long, default_value_t = 5000)]
    gc_payloads: usize,
    /// Wasm actors started on one provider by the actors bench.
    #[arg(long, default_value_t = 500)]
    wasm_actors: usize,
    /// Durable data sizes (MiB) of the actors bench's checkpoints.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    data_mib: Vec<u64>,
}

fn chain(kind: &str, n: usize) -> String {
    let mut s = String::from(
        "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {name: bench-chain}\nworkflow:\n",
    );
    for i in 0..n {
        let name = if i == 0 {
            "start".to_owned()
        } else {
            format!("s{i}")
        };
        let tool = match kind {
            "python" => "{kind: python, code: 'result = 1'}",
            "shell" => "{kind: shell, command: 'true'}",
            "keychain" => {
                "{kind: python, input: {t: \"{{ keychain.api.token }}\"}, code: 'result = len(t)'}"
            }
            _ => "{kind: noop}",
        };
        let _ = write!(s, "  - step: {name}\n    tool: {tool}\n");
        if i + 1 < n {
            let _ = writeln!(s, "    next: s{}", i + 1);
        }
    }
    s
}

fn fanout(kind: &str, n: usize) -> String {
    fanout_with(kind, n, 64)
}

/// A parallel loop of `n` items with at most `in_flight` running at once.
fn fanout_with(kind: &str, n: usize, in_flight: usize) -> String {
    let tool = match kind {
        "python" => "{kind: python, input: {i: \"{{ i }}\"}, code: 'result = i'}",
        _ => "{kind: noop}",
    };
    format!(
        "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {{name: bench-fanout}}\nworkflow:\n  - step: start\n    loop: {{in: \"{{{{ range({n}) }}}}\", iterator: i, spec: {{mode: parallel, max_in_flight: {in_flight}}}}}\n    tool: {tool}\n"
    )
}

/// One python step returns `n` rows, the next one reads them all.
fn handoff(n: usize) -> String {
    format!(
        "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {{name: bench-handoff}}\nworkflow:\n  - step: start\n    tool: {{kind: python, code: 'result = [{{\"id\": i, \"name\": \"user-%d\" % i, \"score\": i / 7}} for i in range({n})]'}}\n    next: sum\n  - step: sum\n    tool: {{kind: python, input: {{rows: \"{{{{ start }}}}\"}}, code: 'result = sum(r[\"score\"] for r in rows)'}}\n"
    )
}

/// One python step returns `n` rows, a duckdb step groups them (handed in by `tables:`).
fn duckdb_groupby(n: usize) -> String {
    format!(
        "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {{name: bench-duckdb}}\nworkflow:\n  - step: start\n    tool: {{kind: python, code: 'result = [{{\"id\": i, \"team\": \"t%d\" % (i % 10), \"score\": i / 7}} for i in range({n})]'}}\n    next: agg\n  - step: agg\n    tool: {{kind: duckdb, tables: {{rows: \"{{{{ start }}}}\"}}, query: 'select team, count(*) n, sum(score) s from rows group by team order by team'}}\n"
    )
}

fn duckdb_available() -> bool {
    std::process::Command::new("python3")
        .args(["-c", "import duckdb"])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `program` is on PATH.
fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median seconds of `runs` executions of `src` on a fresh runtime over one database.
async fn measure(src: &str, runs: usize, warm_python: bool, db: Option<&str>) -> Result<f64> {
    measure_with(
        src,
        runs,
        warm_python,
        db,
        mayfly_cache::DEFAULT_INLINE_LIMIT,
        false,
    )
    .await
}

/// [`measure`] with a given inline limit for the shared cache (a local directory).
async fn measure_with(
    src: &str,
    runs: usize,
    warm_python: bool,
    db: Option<&str>,
    inline_limit: usize,
    sandbox: bool,
) -> Result<f64> {
    let pb =
        parse("bench.yaml", src, &ParseOptions::default()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let dir = tempfile::tempdir()?;
    let store: Arc<dyn mayfly_store::Store> = match db {
        Some(url) => mayfly_store::open(url).await?,
        None => Arc::new(SqliteStore::open(dir.path().join("bench.db")).await?),
    };
    // Every scenario gets a keychain with one credential; only the `keychain` chain reads it.
    let key = mayfly_trust::keychain::MasterKey::generate();
    let sealed = key.seal("default", "api", br#"{"token": "bench-token-0123456789"}"#)?;
    let op = mayfly_store::SecretOp::Put {
        tenant: "default".into(),
        alias: "api".into(),
        sealed,
    };
    store
        .append(Arc::new(mayfly_store::Batch {
            secrets: vec![op],
            ..Default::default()
        }))
        .await?;
    let cfg = RuntimeConfig {
        keychain: Some(key),
        cache: Some(Arc::new(mayfly_cache::Payloads::new(
            Arc::new(mayfly_cache::LocalCache::new(dir.path().join("cache"))),
            inline_limit,
        ))),
        ..Default::default()
    };
    let mut cfg = cfg;
    cfg.tools.sandbox = sandbox;
    if sandbox {
        // As a server runs tenant code: `public` egress, so the interpreter starts under
        // the keeper with the egress proxy in reach.
        cfg.tools.default_egress = vec![mayfly_types::Egress::Public];
        cfg.tools.keeper = Some(bench_keeper()?);
    }
    let rt = Runtime::start(store, cfg)?;
    if let Some(e) = rt.tools.sandbox_error() {
        bail!("{}", e.message);
    }
    if warm_python {
        rt.tools
            .python
            .warm()
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    // One untimed warm-up run (page cache, interpreter imports).
    let r = rt.run(pb.clone(), Map::new()).await?;
    if r.status != Status::Completed {
        bail!("benchmark playbook failed: {:?}", r.error);
    }
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        let r = rt.run(pb.clone(), Map::new()).await?;
        times.push(t.elapsed().as_secs_f64());
        if r.status != Status::Completed {
            bail!("benchmark playbook failed: {:?}", r.error);
        }
    }
    Ok(median(times))
}

fn bench_keeper() -> Result<mayfly_tools::sandbox::Keeper> {
    Ok(mayfly_tools::sandbox::Keeper {
        exe: std::env::current_exe()?,
        args: vec![crate::actors::KEEPER_ARG.into()],
    })
}

/// Python in the sandbox, `n` HTTP GETs to a local origin: through the tenant's egress
/// proxy (an allow-list naming the origin) against the host's network (`host`), each the
/// median of `runs` steps; ms per request.
async fn egress_proxy_round(n: usize, runs: usize) -> Result<(f64, f64)> {
    use mayfly_types::{Egress, Limits};
    let origin = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = origin.local_addr()?.port();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for conn in origin.incoming() {
            let Ok(mut c) = conn else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let _ = c.read(&mut buf);
                let _ = c.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                );
            });
        }
    });
    let tools = mayfly_tools::Tools::new(mayfly_tools::ToolsConfig {
        python_pool: 1,
        sandbox: true,
        keeper: Some(bench_keeper()?),
        ..Default::default()
    })
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let code = format!(
        "import time, urllib.request\nt = time.perf_counter()\nfor _ in range({n}):\n    urllib.request.urlopen('http://127.0.0.1:{port}/', timeout=5).read()\nresult = (time.perf_counter() - t) * 1000 / {n}"
    );
    let mut cfg = serde_json::Map::new();
    cfg.insert("code".into(), json!(code));
    let per = |limits: Limits| {
        let tools = &tools;
        let cfg = cfg.clone();
        async move {
            let scope = mayfly_tools::Scope {
                tenant: "bench",
                limits: Some(&limits),
            };
            let mut lat = Vec::new();
            for _ in 0..runs.max(1) + 1 {
                let o = tools
                    .run_in(&scope, "python", &cfg, &Map::new(), None)
                    .await;
                if !o.ok {
                    bail!("egress bench step failed: {:?}", o.error);
                }
                lat.push(o.data.as_f64().unwrap_or(f64::NAN));
            }
            lat.remove(0);
            Ok::<f64, anyhow::Error>(percentile(lat, 0.5))
        }
    };
    let proxied = per(Limits {
        egress: vec![Egress::Allow(vec![format!("127.0.0.1:{port}")])],
        ..Limits::default()
    })
    .await?;
    let direct = per(Limits {
        egress: vec![Egress::Host],
        ..Limits::default()
    })
    .await?;
    Ok((proxied, direct))
}

pub async fn run(a: BenchArgs) -> Result<ExitCode> {
    if a.server {
        let c = crate::remote::Client::from_env()?;
        let out = against_server(&c, &a).await?;
        print_remote(&a, &[("server".into(), out)]);
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(q) = a.queue.clone() {
        let mut rows = Vec::new();
        for &n in &a.worker_counts {
            let out = distributed(&a, &q, n).await?;
            rows.push((format!("{n} worker{}", if n == 1 { "" } else { "s" }), out));
        }
        print_remote(&a, &rows);
        return Ok(ExitCode::SUCCESS);
    }
    if a.control {
        return control(&a).await;
    }
    if a.actors {
        return crate::bench_actors::run(a.runs.max(5) * 4, a.wasm_actors, &a.data_mib, a.json)
            .await;
    }
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let db = a.db.as_deref();
    let store_name = if db.is_some() {
        "postgres"
    } else {
        "sqlite (WAL, synchronous=FULL)"
    };
    let noop_chain = measure(&chain("noop", a.steps), a.runs, false, db).await?;
    let py_chain = measure(&chain("python", a.steps), a.runs, true, db).await?;
    let noop_fan = measure(&fanout("noop", a.items), a.runs, false, db).await?;
    let py_fan = measure(&fanout("python", a.python_items), a.runs, true, db).await?;
    let kc_chain = measure(&chain("keychain", a.steps), a.runs, true, db).await?;
    let by_ref = measure(&handoff(a.rows), a.runs, true, db).await?;
    let inline = measure_with(&handoff(a.rows), a.runs, true, db, usize::MAX, false).await?;
    // Tenant code in bubblewrap (server and worker default) against the same unsandboxed.
    let sh_chain = measure(&chain("shell", a.steps), a.runs, false, db).await?;
    let limit = mayfly_cache::DEFAULT_INLINE_LIMIT;
    let boxed = |kind: &str| chain(kind, a.steps);
    let (py_boxed, sh_boxed) = if which("bwrap") {
        (
            Some(measure_with(&boxed("python"), a.runs, false, db, limit, true).await?),
            Some(measure_with(&boxed("shell"), a.runs, false, db, limit, true).await?),
        )
    } else {
        (None, None)
    };
    let egress = if which("bwrap") {
        Some(egress_proxy_round(200, a.runs).await?)
    } else {
        None
    };
    let codec = table_codec(a.rows)?;
    // DuckDB runs through python3's `duckdb` package; a machine without it has no figure.
    let duck = if duckdb_available() {
        Some(measure(&duckdb_groupby(a.rows), a.runs, true, db).await?)
    } else {
        None
    };
    let (gc_dry, gc_ms) = retention_round(a.gc_payloads).await?;
    // Strict parse + validate (schema, templates, static `when` check, graph warnings) of a
    // playbook as `run`, `register` and the API do it: median of 200.
    let validate_ms = {
        let src = chain("keychain", a.steps);
        let mut lat = Vec::with_capacity(200);
        for _ in 0..200 {
            let t = Instant::now();
            parse("bench.yaml", &src, &ParseOptions::default())
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            lat.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        percentile(lat, 0.5)
    };
    let out = json!({
        "machine": {"cpus": cpus, "store": store_name},
        "noop_chain": {"steps": a.steps, "seconds": noop_chain, "ms_per_step": noop_chain * 1000.0 / a.steps as f64},
        "python_chain": {"steps": a.steps, "seconds": py_chain, "ms_per_step": py_chain * 1000.0 / a.steps as f64},
        "noop_fanout": {"items": a.items, "seconds": noop_fan, "steps_per_second": a.items as f64 / noop_fan},
        "python_fanout": {"items": a.python_items, "seconds": py_fan, "steps_per_second": a.python_items as f64 / py_fan},
        "shell_chain": {"steps": a.steps, "seconds": sh_chain, "ms_per_step": sh_chain * 1000.0 / a.steps as f64},
        "sandboxed_python_chain": {"steps": a.steps, "ms_per_step": py_boxed.map(|s| s * 1000.0 / a.steps as f64)},
        "sandboxed_shell_chain": {"steps": a.steps, "ms_per_step": sh_boxed.map(|s| s * 1000.0 / a.steps as f64)},
        "sandboxed_http_get": {"requests": 200, "proxy_ms": egress.map(|e| e.0), "host_network_ms": egress.map(|e| e.1)},
        "keychain_python_chain": {"steps": a.steps, "seconds": kc_chain, "ms_per_step": kc_chain * 1000.0 / a.steps as f64},
        "table_handoff": {"rows": a.rows, "by_ref_ms": by_ref * 1000.0, "inline_ms": inline * 1000.0},
        "table_codec": codec,
        "duckdb_groupby": {"rows": a.rows, "ms": duck.map(|d| d * 1000.0)},
        "cache_retention": {"payloads": a.gc_payloads, "dry_run_ms": gc_dry, "collect_ms": gc_ms},
        "parse_validate": {"steps": a.steps, "ms": validate_ms},
    });
    if a.json {
        println!("{out}");
    } else {
        println!(
            "mayfly bench — {store_name} event log, {cpus} CPUs, median of {} runs",
            a.runs
        );
        println!(
            "  {:<44} {:>10.3} ms/step",
            format!("sequential chain, {} noop steps", a.steps),
            out["noop_chain"]["ms_per_step"].as_f64().unwrap_or(0.0)
        );
        println!(
            "  {:<44} {:>10.3} ms/step",
            format!("sequential chain, {} python steps", a.steps),
            out["python_chain"]["ms_per_step"].as_f64().unwrap_or(0.0)
        );
        let per = |s: f64| s * 1000.0 / a.steps as f64;
        match (py_boxed, sh_boxed) {
            (Some(p), Some(sh)) => {
                println!(
                    "  {:<44} {:>10.3} ms/step (unsandboxed {:.3})",
                    format!("chain, {} python steps in the sandbox", a.steps),
                    per(p),
                    per(py_chain)
                );
                println!(
                    "  {:<44} {:>10.3} ms/step (unsandboxed {:.3})",
                    format!("chain, {} shell steps in the sandbox", a.steps),
                    per(sh),
                    per(sh_chain)
                );
            }
            _ => println!(
                "  {:<44} {:>10}",
                "sandboxed chains", "no bwrap on this machine"
            ),
        }
        if let Some((proxied, direct)) = egress {
            println!(
                "  {:<44} {:>10.3} ms/req (host network {:.3})",
                "sandboxed python GET via the egress proxy", proxied, direct
            );
        }
        println!(
            "  {:<44} {:>10.0} steps/s",
            format!("parallel fan-out, {} noop items", a.items),
            out["noop_fanout"]["steps_per_second"]
                .as_f64()
                .unwrap_or(0.0)
        );
        println!(
            "  {:<44} {:>10.0} steps/s",
            format!("parallel fan-out, {} python items", a.python_items),
            out["python_fanout"]["steps_per_second"]
                .as_f64()
                .unwrap_or(0.0)
        );
        println!(
            "  {:<44} {:>10.3} ms/step",
            format!("chain, {} python steps reading a secret", a.steps),
            out["keychain_python_chain"]["ms_per_step"]
                .as_f64()
                .unwrap_or(0.0)
        );
        println!(
            "  {:<44} {:>10.1} ms (inline in events: {:.1} ms)",
            format!("table hand-off, {} rows by ref", a.rows),
            by_ref * 1000.0,
            inline * 1000.0
        );
        println!(
            "  {:<44} {:>10.1} ms encode, {:.1} ms decode ({} KiB JSON -> {} KiB Arrow)",
            format!("arrow codec, {} rows", a.rows),
            codec["encode_ms"].as_f64().unwrap_or(0.0),
            codec["decode_ms"].as_f64().unwrap_or(0.0),
            codec["json_bytes"].as_u64().unwrap_or(0) / 1024,
            codec["arrow_bytes"].as_u64().unwrap_or(0) / 1024,
        );
        match duck {
            Some(d) => println!(
                "  {:<44} {:>10.1} ms (python reading them: {:.1} ms)",
                format!("{} rows to a duckdb group-by", a.rows),
                d * 1000.0,
                by_ref * 1000.0
            ),
            None => println!(
                "  {:<44} {:>10}",
                format!("{} rows to a duckdb group-by", a.rows),
                "python3 has no duckdb package"
            ),
        }
        println!(
            "  {:<44} {:>10.1} ms (mark + list only: {:.1} ms)",
            format!("cache retention, {} payloads collected", a.gc_payloads),
            gc_ms,
            gc_dry
        );
        println!(
            "  {:<44} {:>10.2} ms",
            format!("strict parse + validate, {}-step playbook", a.steps),
            validate_ms
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v.get(i).copied().unwrap_or(0.0)
}

/// `mayfly bench --control`: reads per freshness class over a node's view of the control
/// stream (in process: the view, not HTTP), then the catch-up of a paused view.
async fn control(a: &BenchArgs) -> Result<ExitCode> {
    use mayfly_control::{Caller, Class, Control, ReadRequest, Role, View, parse_manifests};
    let dir = tempfile::tempdir()?;
    let (store, schema): (Arc<dyn mayfly_store::Store>, Option<String>) = match &a.db {
        Some(url) => {
            let schema = format!("mayfly_bench_control_{}", std::process::id());
            let s = mayfly_store::PostgresStore::connect_schema(url, &schema).await?;
            (Arc::new(s), Some(schema))
        }
        None => (
            Arc::new(SqliteStore::open(dir.path().join("control.db")).await?),
            None,
        ),
    };
    let store_name = if a.db.is_some() { "postgres" } else { "sqlite" };
    let control = Control::open(store.clone())
        .await?
        .with_signer(mayfly_trust::sign::ControlKey::generate());
    let caller = Caller {
        tenant: "bench".into(),
        role: Role::Admin,
        actor: "bench".into(),
        request_id: "bench".into(),
    };
    // 1,000 pools; each round changes every one (1,000 events per commit).
    let pools = |round: usize| -> Result<Vec<mayfly_control::Manifest>> {
        let text: Vec<String> = (0..1000)
            .map(|i| {
                format!(
                    "apiVersion: mayfly.dev/v1\nkind: WorkerPool\nmetadata: {{name: pool-{i}}}\nspec: {{slots: {}}}\n",
                    round + 1
                )
            })
            .collect();
        parse_manifests("bench.yaml", &text.join("---\n")).map_err(|e| anyhow::anyhow!("{e}"))
    };
    control.apply(&caller, &pools(0)?).await?;
    let view = View::start(store.clone(), false);
    let strong = ReadRequest {
        class: Class::Strong,
        ..Default::default()
    };
    let read = |st: &mayfly_control::ControlState| {
        st.objects_of(&caller, mayfly_control::Kind::WorkerPool, Some("pool-7"))
            .len()
    };
    view.read(&strong, read).await?;
    let mut rows = Vec::new();
    for (name, req) in [
        ("best_effort", ReadRequest::default()),
        (
            "bounded (max_lag 1000)",
            ReadRequest {
                class: Class::Bounded,
                max_lag: Some(1000),
                ..Default::default()
            },
        ),
        ("strong", strong.clone()),
    ] {
        let mut lat = Vec::with_capacity(2000);
        for _ in 0..2000 {
            let t = Instant::now();
            let (n, _) = view.read(&req, read).await?;
            lat.push(t.elapsed().as_secs_f64() * 1e6);
            if n != 1 {
                bail!("the view lost pool-7");
            }
        }
        rows.push((name, percentile(lat.clone(), 0.5), percentile(lat, 0.99)));
    }
    // Catch-up: pause the view, write a gap of `gap` events, resume, time until fresh.
    view.pause().await;
    let rounds = a.gap.div_ceil(1000);
    let t = Instant::now();
    for r in 0..rounds {
        control.apply(&caller, &pools(r + 1)?).await?;
    }
    let write_s = t.elapsed().as_secs_f64();
    let head = store.head().await?;
    let gap = head - view.served();
    let t = Instant::now();
    view.resume();
    let long = ReadRequest {
        class: Class::Strong,
        deadline: Some(std::time::Duration::from_secs(600)),
        ..Default::default()
    };
    view.read(&long, read).await?;
    let catch_up = t.elapsed().as_secs_f64();
    let rollout = rollout_bench(&control, 100).await?;
    if let (Some(url), Some(schema)) = (&a.db, &schema) {
        mayfly_store::PostgresStore::drop_schema(url, schema).await?;
    }
    let out = json!({
        "store": store_name,
        "rollout": rollout,
        "reads_us": rows.iter().map(|(n, p50, p99)| json!({"class": n, "p50": p50, "p99": p99})).collect::<Vec<_>>(),
        "catch_up": {"events": gap, "seconds": catch_up, "events_per_second": gap as f64 / catch_up},
        "apply": {"events": rounds * 1000, "seconds": write_s},
    });
    if a.json {
        println!("{out}");
        return Ok(ExitCode::SUCCESS);
    }
    println!("mayfly bench --control — {store_name} log, reads over a node's view (2,000 each)");
    for (name, p50, p99) in &rows {
        println!("  read, {name:<32} p50 {p50:>8.1} µs   p99 {p99:>8.1} µs");
    }
    println!(
        "  catch-up of a paused view, {gap} events     {:>8.2} s ({:.0} events/s)",
        catch_up,
        gap as f64 / catch_up
    );
    println!(
        "  apply, {} object changes in commits of 1,000   {:>8.2} s",
        rounds * 1000,
        write_s
    );
    println!(
        "  bundle of {} policies: publish (freeze+sign+append) {:.2} ms, agent verify+apply p50 {:.1} µs",
        rollout["policies"],
        rollout["publish_ms"].as_f64().unwrap_or(0.0),
        rollout["verify_apply_us_p50"].as_f64().unwrap_or(0.0)
    );
    println!(
        "  rollout to {} agents: completed in {:.1} ms ({} report rounds)",
        rollout["agents"],
        rollout["converge_ms"].as_f64().unwrap_or(0.0),
        rollout["rounds"]
    );
    Ok(ExitCode::SUCCESS)
}

/// Publish a bundle of 20 policies, time an agent's verify+apply, and roll it out to
/// `agents` in-process agents reporting to `control` until the transition completes.
async fn rollout_bench(
    control: &mayfly_control::Control,
    agents: usize,
) -> Result<serde_json::Value> {
    use mayfly_control::{Caller, Role, parse_manifests};
    use mayfly_runtime::agent::{Agent, AgentConfig};
    let sys = Caller {
        tenant: mayfly_control::SYSTEM_TENANT.into(),
        role: Role::Admin,
        actor: "bench".into(),
        request_id: "bench".into(),
    };
    let docs: Vec<String> = (0..20)
        .map(|i| format!("apiVersion: mayfly.dev/v1\nkind: Policy\nmetadata: {{name: p{i}, tenant: t{i}}}\nspec:\n  tools: {{allow: [noop, python]}}\n  limits: {{step_timeout_s: 60}}\n"))
        .collect();
    let policies = parse_manifests("policies.yaml", &docs.join("---\n"))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    control.apply(&sys, &policies).await?;
    let t = Instant::now();
    let b = control.publish_bundle(&sys).await?;
    let publish_ms = t.elapsed().as_secs_f64() * 1000.0;
    let bundle = control
        .bundles()
        .await
        .into_iter()
        .find(|x| x.digest == b.digest)
        .ok_or_else(|| anyhow::anyhow!("the bundle was not published"))?;
    let trusted = vec![bundle_key(control, &bundle)?];
    let make = |id: String| {
        Arc::new(Agent::new(AgentConfig {
            id,
            pool: "bench".into(),
            labels: Default::default(),
            trusted: trusted.clone(),
            interval: std::time::Duration::from_secs(1),
        }))
    };
    let mut lat = Vec::with_capacity(200);
    for i in 0..200 {
        let a = make(format!("probe-{i}"));
        let t = Instant::now();
        a.offer(Some(&bundle));
        lat.push(t.elapsed().as_secs_f64() * 1e6);
        if a.applied().as_deref() != Some(b.digest.as_str()) {
            bail!("the agent refused a good bundle");
        }
    }
    let fleet: Vec<Arc<Agent>> = (0..agents).map(|i| make(format!("agent-{i}"))).collect();
    for a in &fleet {
        control.agent_report(a.report()).await?;
    }
    let ro = parse_manifests(
        "rollout.yaml",
        &format!("apiVersion: mayfly.dev/v1\nkind: Rollout\nmetadata: {{name: bench}}\nspec:\n  bundle: \"{}\"\n  target: {{pool: bench}}\n", b.digest),
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let t = Instant::now();
    control.apply(&sys, &ro).await?;
    let mut rounds = 0;
    loop {
        rounds += 1;
        for a in &fleet {
            a.sync(control).await.map_err(|e| anyhow::anyhow!(e))?;
        }
        let st = control.rollout_status("bench").await?;
        if st.transition.phase == mayfly_control::rollout::TPhase::Completed {
            break;
        }
        if rounds > 10 {
            bail!("the rollout did not complete: {:?}", st.transition.phase);
        }
    }
    let converge_ms = t.elapsed().as_secs_f64() * 1000.0;
    Ok(json!({
        "policies": b.policies,
        "publish_ms": publish_ms,
        "verify_apply_us_p50": percentile(lat, 0.5),
        "agents": agents,
        "converge_ms": converge_ms,
        "rounds": rounds,
    }))
}

/// One retention round over `n` payloads on a SQLite log and a local cache: every payload is
/// named by its own finished execution (`cache_refs` holds `n` rows), and `keep = 0`
/// collects them all. Returns (dry-run ms, collecting ms).
async fn retention_round(n: usize) -> Result<(f64, f64)> {
    use mayfly_cache::Cache;
    use mayfly_store::{Batch, Store};
    use mayfly_types::{EventKind, GENESIS_HASH};
    let dir = tempfile::tempdir()?;
    let store = SqliteStore::open(dir.path().join("gc.db")).await?;
    let cache = mayfly_cache::LocalCache::new(dir.path().join("gc.cache"));
    let pad = "x".repeat(1024);
    for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
        let mut events = Vec::new();
        for &i in chunk {
            let blob = mayfly_cache::encode(&json!({"payload": i, "pad": pad}));
            cache
                .put(
                    mayfly_types::DEFAULT_TENANT,
                    &blob.cache_ref.digest,
                    blob.bytes,
                )
                .await?;
            events.extend(mayfly_store::conformance::chain(
                &format!("gc-{i}"),
                1,
                GENESIS_HASH,
                &[
                    (
                        EventKind::ExecutionRequested,
                        None,
                        json!({"path": "gc", "workload": {}}),
                    ),
                    (EventKind::ExecutionStarted, None, json!({})),
                    (
                        EventKind::ExecutionCompleted,
                        None,
                        json!({"result": blob.cache_ref.to_value()}),
                    ),
                ],
            ));
        }
        store
            .append(std::sync::Arc::new(Batch {
                events,
                ..Default::default()
            }))
            .await?;
    }
    let policy = mayfly_runtime::retention::Retention {
        keep: std::time::Duration::ZERO,
        grace: std::time::Duration::ZERO,
    };
    let now = mayfly_types::now_ms() + 1;
    let t = Instant::now();
    let dry = mayfly_runtime::retention::collect(&store, &cache, policy, now, true).await?;
    let dry_ms = t.elapsed().as_secs_f64() * 1000.0;
    let t = Instant::now();
    let done = mayfly_runtime::retention::collect(&store, &cache, policy, now, false).await?;
    let gc_ms = t.elapsed().as_secs_f64() * 1000.0;
    if dry.deleted != n || done.deleted != n {
        bail!(
            "retention bench: expected {n} collected, got {} (dry run {})",
            done.deleted,
            dry.deleted
        );
    }
    Ok((dry_ms, gc_ms))
}

/// The public key a published bundle is signed with, as agents are configured with it.
fn bundle_key(
    control: &mayfly_control::Control,
    bundle: &mayfly_trust::sign::Signed,
) -> Result<mayfly_trust::sign::TrustedKey> {
    control
        .public_key()
        .filter(|k| k.id == bundle.key_id)
        .ok_or_else(|| anyhow::anyhow!("the bench control plane has no signing key"))
}

/// Median encode/decode time of a `rows`-row table through the cache's Arrow codec.
fn table_codec(rows: usize) -> Result<serde_json::Value> {
    let v = serde_json::Value::Array(
        (0..rows)
            .map(|i| json!({"id": i, "name": format!("user-{i}"), "score": i as f64 / 7.0}))
            .collect(),
    );
    let json_bytes = serde_json::to_vec(&v)?.len();
    let (mut enc, mut dec) = (Vec::new(), Vec::new());
    let mut arrow_bytes = 0;
    for _ in 0..5 {
        let t = Instant::now();
        let blob = mayfly_cache::encode(&v);
        enc.push(t.elapsed().as_secs_f64() * 1000.0);
        arrow_bytes = blob.bytes.len();
        let t = Instant::now();
        let back = mayfly_cache::decode(blob.cache_ref.format, &blob.bytes)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        dec.push(t.elapsed().as_secs_f64() * 1000.0);
        if back != v {
            bail!("arrow round trip changed the table");
        }
    }
    Ok(
        json!({"rows": rows, "json_bytes": json_bytes, "arrow_bytes": arrow_bytes,
              "encode_ms": median(enc), "decode_ms": median(dec)}),
    )
}

/// Median seconds of `runs` executions of catalog playbook `path` on a server (after one
/// untimed warm-up run), each timed from the start request to the end of its SSE stream,
/// and the id of the last run.
async fn measure_remote(
    c: &crate::remote::Client,
    path: &str,
    runs: usize,
) -> Result<(f64, String)> {
    let mut times = Vec::with_capacity(runs);
    let mut last = String::new();
    for i in 0..=runs.max(1) {
        let t = Instant::now();
        let v = c
            .send(
                reqwest::Method::POST,
                "/v1/executions",
                Some(json!({"path": path}).to_string()),
            )
            .await?;
        let id = v["execution_id"].as_str().unwrap_or_default().to_owned();
        c.wait_ended(&id).await?;
        let took = t.elapsed().as_secs_f64();
        // Untimed: the status read verifies the whole hash chain, which is not the run.
        let end = c
            .send(reqwest::Method::GET, &format!("/v1/executions/{id}"), None)
            .await?;
        if end["status"] != "completed" {
            bail!(
                "benchmark execution {id} ended {}: {}",
                end["status"],
                end["error"]
            );
        }
        if i > 0 {
            times.push(took);
        }
        last = id;
    }
    Ok((median(times), last))
}

/// Mean milliseconds an item of a loop spent between the stages its events record, read
/// off the log's `at` stamps (taken by the orchestrator as it handles each message).
#[derive(Debug, Clone, PartialEq)]
struct Stages {
    /// Items with all three stages in the log.
    items: usize,
    /// `command.issued` → `command.claimed`: the issuing commit, the queue, the worker's
    /// fetch and its claim reaching the orchestrator.
    issued_to_claimed: f64,
    /// `command.claimed` → `step.finished`: the claim's commit and grant, the tool, and
    /// the completion reaching the orchestrator.
    claimed_to_finished: f64,
    /// The tool's own run, as the worker reported it (`duration_ms`).
    tool: f64,
}

impl Stages {
    fn json(&self) -> serde_json::Value {
        json!({
            "items": self.items,
            "issued_to_claimed_ms": self.issued_to_claimed,
            "claimed_to_finished_ms": self.claimed_to_finished,
            "tool_ms": self.tool,
        })
    }
}

/// The stages of every command of an execution's events. A command delivered more than
/// once counts from its issue to its last claim and the finish of that claim's attempt;
/// commands without all three stages are left out.
fn stages(events: &[mayfly_types::Event]) -> Option<Stages> {
    use mayfly_types::EventKind;
    #[derive(Default)]
    struct Item {
        issued: Option<u64>,
        claimed: Option<(Option<u32>, u64)>,
        finished: Option<(Option<u32>, u64, u64)>,
    }
    let mut items: std::collections::HashMap<&str, Item> = std::collections::HashMap::new();
    for e in events {
        let Some(cmd) = e.command_id.as_deref() else {
            continue;
        };
        let it = items.entry(cmd).or_default();
        match e.kind {
            EventKind::CommandIssued => {
                it.issued.get_or_insert(e.at);
            }
            EventKind::CommandClaimed => it.claimed = Some((e.attempt, e.at)),
            EventKind::StepFinished => {
                let tool = e.payload["duration_ms"].as_u64().unwrap_or(0);
                it.finished = Some((e.attempt, e.at, tool));
            }
            _ => {}
        }
    }
    let (mut n, mut a, mut b, mut t) = (0usize, 0u64, 0u64, 0u64);
    for it in items.values() {
        if let (Some(i), Some((ca, c)), Some((fa, f, tool))) = (it.issued, it.claimed, it.finished)
            && ca == fa
        {
            n += 1;
            a += c.saturating_sub(i);
            b += f.saturating_sub(c);
            t += tool;
        }
    }
    (n > 0).then(|| Stages {
        items: n,
        issued_to_claimed: a as f64 / n as f64,
        claimed_to_finished: b as f64 / n as f64,
        tool: t as f64 / n as f64,
    })
}

/// The stages of execution `id`'s items, its events read through the paged events API
/// (untimed, after the runs).
async fn remote_stages(c: &crate::remote::Client, id: &str) -> Result<Option<Stages>> {
    Ok(stages(&c.events(id, 1, u32::MAX).await?))
}

/// The worker-bound scenarios through a server's API: python chain, python fan-out (64 in
/// flight) and the wide python fan-out.
async fn against_server(c: &crate::remote::Client, a: &BenchArgs) -> Result<serde_json::Value> {
    for src in [
        chain("python", a.steps).replace("bench-chain", "bench-python-chain"),
        fanout("python", a.python_items).replace("bench-fanout", "bench-python-fanout"),
        fanout_with("python", a.wide_items, a.wide_in_flight)
            .replace("bench-fanout", "bench-python-fanout-wide"),
    ] {
        c.send(reqwest::Method::POST, "/v1/playbooks", Some(src))
            .await?;
    }
    let (py_chain, _) = measure_remote(c, "bench-python-chain", a.runs).await?;
    let (py_fan, fan_id) = measure_remote(c, "bench-python-fanout", a.runs).await?;
    let fan_stages = remote_stages(c, &fan_id).await?;
    // `--wide-items 0` skips it (e.g. against a shared server).
    let wide = match a.wide_items {
        0 => serde_json::Value::Null,
        n => {
            let (t, id) = measure_remote(c, "bench-python-fanout-wide", a.runs).await?;
            let st = remote_stages(c, &id).await?;
            json!({"items": n, "in_flight": a.wide_in_flight, "seconds": t, "steps_per_second": n as f64 / t,
                   "stages": st.map(|s| s.json())})
        }
    };
    Ok(json!({
        "python_chain": {"steps": a.steps, "seconds": py_chain, "ms_per_step": py_chain * 1000.0 / a.steps as f64},
        "python_fanout": {"items": a.python_items, "in_flight": 64, "seconds": py_fan, "steps_per_second": a.python_items as f64 / py_fan,
                          "stages": fan_stages.map(|s| s.json())},
        "python_fanout_wide": wide,
    }))
}

/// A bench process started the way a service runs: in a session of its own. Linux's
/// autogroup scheduler shares the CPUs fairly between sessions, not processes; Postgres and
/// NATS each run in one of their own, so a server and its workers all left in the bench's
/// one session would share a single service's share between them. The process is killed
/// with the bench (it no longer gets the terminal's Ctrl-C).
fn service(exe: &std::path::Path) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(exe);
    #[cfg(unix)]
    // SAFETY: between fork and exec only async-signal-safe calls are made (setsid, prctl).
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            #[cfg(target_os = "linux")]
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// Spawn a distributed server and `workers` worker processes, benchmark, tear down.
async fn distributed(a: &BenchArgs, queue: &str, workers: usize) -> Result<serde_json::Value> {
    use tokio::io::AsyncBufReadExt;
    let exe = std::env::current_exe()?;
    let tag = format!("{}_{}", std::process::id(), workers);
    let name = format!("MAYFLY_BENCH_{tag}");
    let stream = name.clone();
    let dir = tempfile::tempdir()?;
    let (db, schema) = match &a.db {
        Some(url) => {
            let schema = format!("mayfly_bench_{tag}");
            let sep = if url.contains('?') { '&' } else { '?' };
            (format!("{url}{sep}schema={schema}"), Some(schema))
        }
        None => (dir.path().join("bench.db").display().to_string(), None),
    };
    let mut server = service(&exe)
        .args(["server", "--db", &db, "--listen", "127.0.0.1:0"])
        .args(["--queue", queue, "--queue-name", &name])
        .env("MAYFLY_LOG", "error")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stderr = server
        .stderr
        .take()
        .ok_or_else(|| anyhow::anyhow!("no server stderr"))?;
    let mut lines = tokio::io::BufReader::new(stderr).lines();
    let mut banner = mayfly_gateway::banner::Banner::default();
    loop {
        let Some(l) = lines.next_line().await? else {
            bail!("the server exited before it was ready");
        };
        if l.starts_with("error") {
            bail!("server: {l}");
        }
        if banner.feed(&l) {
            break;
        }
    }
    let (token, url) = (banner.token, banner.url);
    // The queue's stream is scoped by the log's identity: the server says which.
    let stream = banner.stream.unwrap_or(stream);
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = a
        .worker_threads
        .unwrap_or_else(|| cpus.div_ceil(workers.max(1)))
        .max(1);
    let mut procs = Vec::new();
    for i in 0..workers {
        procs.push(
            service(&exe)
                .args(["worker", "--queue", queue, "--queue-name", &name])
                .args(["--id", &format!("bench{i}")])
                .args(["--slots", &a.worker_slots.to_string()])
                .args(["--threads", &threads.to_string()])
                .env("MAYFLY_LOG", "error")
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()?,
        );
    }
    let c = crate::remote::Client::new(
        url.as_deref().unwrap_or_default(),
        token.as_deref().unwrap_or_default(),
    );
    let out = against_server(&c, a).await;
    for mut p in procs.into_iter().chain([server]) {
        let _ = p.kill().await;
    }
    if let Err(e) = mayfly_queue::NatsQueue::delete(queue, &stream).await {
        eprintln!("warning: could not delete stream {stream}: {e}");
    }
    // The server's shared cache bucket is named after the stream.
    if let Ok(client) = async_nats::connect(queue).await
        && let Err(e) = mayfly_cache::NatsCache::delete(client, &format!("{stream}-cache")).await
    {
        eprintln!("warning: could not delete the cache bucket {stream}-cache: {e}");
    }
    if let (Some(url), Some(schema)) = (&a.db, schema)
        && let Err(e) = mayfly_store::PostgresStore::drop_schema(url, &schema).await
    {
        eprintln!("warning: could not drop schema {schema}: {e}");
    }
    out
}

fn print_remote(a: &BenchArgs, rows: &[(String, serde_json::Value)]) {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    if a.json {
        let m: Map<String, serde_json::Value> =
            rows.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        println!("{}", json!({"machine": {"cpus": cpus}, "runs": m}));
        return;
    }
    // With --server the log is whatever that server runs.
    let setup = match (&a.queue, &a.db) {
        (None, _) => "the server at MAYFLY_URL",
        (Some(_), Some(_)) => "postgres log, NATS JetStream queue, worker processes",
        (Some(_), None) => "sqlite log, NATS JetStream queue, worker processes",
    };
    println!(
        "mayfly bench — through the server's API ({setup}), {cpus} CPUs, median of {} runs",
        a.runs
    );
    for (name, v) in rows {
        println!(
            "  {:<14} {:<40} {:>8.3} ms/step",
            name,
            format!("sequential chain, {} python steps", a.steps),
            v["python_chain"]["ms_per_step"].as_f64().unwrap_or(0.0)
        );
        println!(
            "  {:<14} {:<40} {:>8.0} steps/s",
            name,
            format!("parallel fan-out, {} python items", a.python_items),
            v["python_fanout"]["steps_per_second"]
                .as_f64()
                .unwrap_or(0.0)
        );
        print_stages(&v["python_fanout"]["stages"]);
        if v["python_fanout_wide"].is_null() {
            continue;
        }
        println!(
            "  {:<14} {:<40} {:>8.0} steps/s",
            name,
            format!(
                "fan-out, {} python items, {} in flight",
                a.wide_items, a.wide_in_flight
            ),
            v["python_fanout_wide"]["steps_per_second"]
                .as_f64()
                .unwrap_or(0.0)
        );
        print_stages(&v["python_fanout_wide"]["stages"]);
    }
}

/// The line under a fan-out row: where its items' time went (last run, mean per item).
fn print_stages(s: &serde_json::Value) {
    let ms = |k: &str| s[k].as_f64().unwrap_or(0.0);
    if s.is_null() {
        return;
    }
    println!(
        "  {:<14}   per item: issued → claimed {:.1} ms, claimed → finished {:.1} ms (the tool {:.1} ms)",
        "",
        ms("issued_to_claimed_ms"),
        ms("claimed_to_finished_ms"),
        ms("tool_ms")
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: &str, cmd: &str, attempt: Option<u32>, at: u64) -> mayfly_types::Event {
        serde_json::from_value(json!({
            "execution_id": "x", "seq": 1, "kind": kind, "command_id": cmd, "attempt": attempt,
            "at": at, "actor": "engine", "playbook_digest": "d", "payload": {},
            "prev_hash": "p", "hash": "h",
        }))
        .expect("a well-formed event")
    }

    #[test]
    fn stages_average_each_commands_intervals() {
        let mut finished_a = ev("step.finished", "a", Some(1), 20);
        finished_a.payload = json!({"duration_ms": 4});
        let mut finished_b = ev("step.finished", "b", Some(1), 40);
        finished_b.payload = json!({"duration_ms": 2});
        let mut started = ev("execution.started", "a", None, 0);
        started.command_id = None;
        let events = vec![
            started,
            ev("command.issued", "a", None, 0),
            ev("command.issued", "b", None, 10),
            ev("command.claimed", "a", Some(1), 6),
            ev("command.claimed", "b", Some(1), 12),
            finished_a,
            finished_b,
            ev("command.completed", "a", Some(1), 20),
        ];
        let s = stages(&events).expect("two complete items");
        assert_eq!(
            s,
            Stages {
                items: 2,
                issued_to_claimed: 4.0,
                claimed_to_finished: 21.0,
                tool: 3.0,
            }
        );
    }

    #[test]
    fn a_redelivered_command_counts_from_its_issue_to_its_last_attempt() {
        let events = vec![
            ev("command.issued", "a", None, 100),
            ev("command.claimed", "a", Some(1), 101),
            // The first claim's worker died; the second attempt finished.
            ev("command.claimed", "a", Some(2), 150),
            ev("step.finished", "a", Some(2), 160),
        ];
        let s = stages(&events).expect("one item");
        assert_eq!(
            (s.items, s.issued_to_claimed, s.claimed_to_finished),
            (1, 50.0, 10.0)
        );
    }

    #[test]
    fn items_missing_a_stage_are_left_out() {
        let events = vec![
            ev("command.issued", "a", None, 0),
            ev("command.claimed", "a", Some(1), 5),
            // b never finished; c finished an attempt other than its last claim.
            ev("command.issued", "b", None, 0),
            ev("command.claimed", "b", Some(1), 5),
            ev("command.issued", "c", None, 0),
            ev("command.claimed", "c", Some(2), 5),
            ev("step.finished", "c", Some(1), 9),
        ];
        assert_eq!(stages(&events), None);
        assert_eq!(stages(&[]), None);
    }
}
