//! `mayfly bench --actors`: the actor dataplane's figures, in one process but over the real
//! seams — a control plane on a SQLite log, its provider listener and both built-in
//! providers each behind mTLS on loopback, heartbeating as in production.
//!
//! * resume from suspended through the router (restore + first request), p50/p99, per
//!   provider class;
//! * golden restore on the wasm provider: the provider op (HTTP, journal, signature and
//!   blob checks, instantiate, memory write) and the sandbox alone;
//! * checkpoint time and snapshot size against durable data size (process provider);
//! * actors held by one wasm provider (start rate, resident memory per actor).

use anyhow::{Context, Result, bail};
use mayfly_actor_api::{
    ActorSpec, Delivery, Desired, Op, OpRequest, OpState, Readiness, Scope, Workload,
};
use mayfly_actors::Sandbox;
use mayfly_actors::local::LocalDataplane;
use mayfly_control::Control;
use mayfly_trust::sign::ControlKey;
use serde_json::json;
use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn pct(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v.get(i).copied().unwrap_or(0.0)
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

async fn rig(dir: &std::path::Path, wasm_slots: u32) -> Result<LocalDataplane> {
    let store_db = mayfly_store::SqliteStore::open(dir.join("control.db")).await?;
    let key = ControlKey::generate();
    let control = Arc::new(
        Control::open(Arc::new(store_db))
            .await?
            .with_signer(ControlKey::from_base64(&key.to_base64())?),
    );
    let mut rig = LocalDataplane::start(control, &key, dir, 6_000).await?;
    let contained = |yes: &str| BTreeMap::from([("contained".to_owned(), yes.to_owned())]);
    rig.add_provider_labeled(
        "bench-process",
        64,
        contained("no"),
        Box::new(|_, d| {
            Ok(Arc::new(mayfly_actors::process::ProcessSandbox::new(
                d.join("sandbox"),
            )?) as Arc<dyn Sandbox>)
        }),
    )
    .await?;
    // The same, each actor in its own sandbox (what `mayfly provider serve` runs).
    let contain = crate::actors::actor_containment()?;
    rig.add_provider_labeled(
        "bench-contained",
        64,
        contained("yes"),
        Box::new(move |_, d| {
            Ok(Arc::new(mayfly_actors::process::ProcessSandbox::contained(
                d.join("sandbox"),
                contain.clone(),
            )?) as Arc<dyn Sandbox>)
        }),
    )
    .await?;
    rig.add_provider(
        "bench-wasm",
        wasm_slots,
        Box::new(|store, _| {
            Ok(Arc::new(mayfly_provider_wasm::WasmSandbox::new(store)?) as Arc<dyn Sandbox>)
        }),
    )
    .await?;
    rig.wait_live(3, Duration::from_secs(20)).await?;
    Ok(rig)
}

pub async fn run(
    runs: usize,
    wasm_actors: usize,
    data_mib: &[u64],
    json_out: bool,
) -> Result<ExitCode> {
    let dir = tempfile::tempdir()?;
    let mut rig = rig(dir.path(), (wasm_actors as u32).max(64) + 64).await?;
    // Both process providers run the same interpreter binary (a `python3` on PATH may be a
    // shim on the host but the system's own inside a sandbox).
    let python = mayfly_tools::sandbox::python_layout("python3")
        .map(|(exe, _)| exe.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "python3".into());
    let process_workload = || match mayfly_actors::conformance::process_workload() {
        Workload::Process {
            args,
            env,
            durable_dirs,
            readiness,
            ..
        } => Workload::Process {
            command: python.clone(),
            args,
            env,
            durable_dirs,
            readiness,
        },
        other => other,
    };
    let wasm_module = mayfly_actors::conformance::WASM_ACTOR.as_bytes();
    let module = mayfly_trust::sha256_digest(wasm_module);
    rig.store
        .put("bench", &module, wasm_module.to_vec().into())
        .await?;
    let mut docs = vec![
        json!({"apiVersion": "mayfly.dev/v1", "kind": "ActorTemplate",
               "metadata": {"name": "pcounter", "tenant": "bench"},
               "spec": {"workload": process_workload(), "idleTimeoutMs": 0,
                        "selector": {"contained": "no"}}}),
        json!({"apiVersion": "mayfly.dev/v1", "kind": "ActorTemplate",
               "metadata": {"name": "ccounter", "tenant": "bench"},
               "spec": {"workload": process_workload(), "idleTimeoutMs": 0,
                        "selector": {"contained": "yes"}}}),
        json!({"apiVersion": "mayfly.dev/v1", "kind": "Actor",
               "metadata": {"name": "c1", "tenant": "bench"}, "spec": {"template": "ccounter"}}),
        json!({"apiVersion": "mayfly.dev/v1", "kind": "ActorTemplate",
               "metadata": {"name": "wcounter", "tenant": "bench"},
               "spec": {"workload": {"class": "wasm", "module": module}, "idleTimeoutMs": 0}}),
        json!({"apiVersion": "mayfly.dev/v1", "kind": "Actor",
               "metadata": {"name": "p1", "tenant": "bench"}, "spec": {"template": "pcounter"}}),
        json!({"apiVersion": "mayfly.dev/v1", "kind": "Actor",
               "metadata": {"name": "w1", "tenant": "bench"}, "spec": {"template": "wcounter"}}),
    ];
    for mib in data_mib {
        let workload = Workload::Process {
            command: "sh".into(),
            args: vec![
                "-c".into(),
                format!(
                    "mkdir -p data && [ -f data/blob ] || head -c {} /dev/urandom > data/blob; touch ready; exec python3 -m http.server \"$PORT\" --bind 127.0.0.1",
                    mib << 20
                ),
            ],
            env: BTreeMap::new(),
            durable_dirs: vec!["data".into()],
            readiness: Readiness {
                path: "/ready".into(),
                deadline_ms: 30_000,
            },
        };
        docs.push(
            json!({"apiVersion": "mayfly.dev/v1", "kind": "ActorTemplate",
               "metadata": {"name": format!("blob{mib}"), "tenant": "bench"},
               "spec": {"workload": workload, "idleTimeoutMs": 0, "golden": false,
                        "selector": {"contained": "no"}}}),
        );
        docs.push(json!({"apiVersion": "mayfly.dev/v1", "kind": "Actor",
               "metadata": {"name": format!("b{mib}"), "tenant": "bench"},
               "spec": {"template": format!("blob{mib}")}}));
    }
    rig.apply(&docs).await?;
    let get = |actor: &str| {
        let rig = &rig;
        let actor = actor.to_owned();
        async move { rig.get("bench", &actor).await }
    };

    // 1. Resume from suspended through the router.
    let mut resume = BTreeMap::new();
    for (class, actor) in [
        ("process", "p1"),
        ("process, contained", "c1"),
        ("wasm", "w1"),
    ] {
        get(actor).await?; // first run: golden snapshot + restore
        let mut samples = Vec::new();
        for _ in 0..runs {
            rig.dp.suspend("bench", actor, "Bench").await?;
            let t = Instant::now();
            get(actor).await?;
            samples.push(ms(t.elapsed()));
        }
        resume.insert(class, (pct(&samples, 0.5), pct(&samples, 0.99)));
    }

    // 1b. A fresh start (assign, ready, first answer) on each process provider, and its stop.
    let mut starts = BTreeMap::new();
    for (class, provider) in [
        ("process", "bench-process"),
        ("process, contained", "bench-contained"),
    ] {
        let client = rig.client(provider)?;
        let mut samples = Vec::new();
        for i in 0..runs.max(10) {
            let a = format!("fresh{i}");
            let req = OpRequest {
                op_id: format!("{a}.run"),
                actor: a.clone(),
                tenant: "bench".into(),
                assignment_epoch: 1,
                op: Op::Assign {
                    desired: Desired::Running,
                    spec: ActorSpec {
                        actor: a.clone(),
                        tenant: "bench".into(),
                        template: "pcounter".into(),
                        workload: process_workload(),
                    },
                },
                delivery: Some(Delivery {
                    identity: a.clone(),
                    secrets: BTreeMap::new(),
                }),
                grant: None,
            };
            let t = Instant::now();
            let st = client.run(&req, Duration::from_secs(30)).await?;
            samples.push(ms(t.elapsed()));
            if st.state != OpState::Succeeded {
                bail!("{class} start failed: {:?}", st.error);
            }
            let stop = OpRequest {
                op_id: format!("{a}.stop"),
                op: Op::Assign {
                    desired: Desired::Suspended,
                    spec: match req.op {
                        Op::Assign { spec, .. } => spec,
                        _ => unreachable!("built as an assign above"),
                    },
                },
                ..req
            };
            client.run(&stop, Duration::from_secs(30)).await?;
        }
        starts.insert(class, (pct(&samples, 0.5), pct(&samples, 0.99)));
    }

    // 2. Golden restore on the wasm provider.
    let golden = rig
        .control
        .read(|st| {
            st.goldens
                .get(&mayfly_control::dataplane::golden_key(
                    "bench",
                    "wcounter",
                    &Workload::Wasm {
                        module: module.clone(),
                        handler: "handle".into(),
                    }
                    .digest(),
                ))
                .and_then(|d| st.snapshots.get(d))
                .cloned()
        })
        .await?
        .context("no wasm golden snapshot")?;
    let wasm_client = rig.client("bench-wasm")?;
    let spec = |a: &str| ActorSpec {
        actor: a.into(),
        tenant: "bench".into(),
        template: "wcounter".into(),
        workload: Workload::Wasm {
            module: module.clone(),
            handler: "handle".into(),
        },
    };
    let mut op_samples = Vec::new();
    for i in 0..runs.max(20) {
        let a = format!("gr{i}");
        let req = OpRequest {
            op_id: format!("{a}.restore"),
            actor: a.clone(),
            tenant: "bench".into(),
            assignment_epoch: 1,
            op: Op::Restore {
                snapshot: golden.envelope.clone(),
                spec: spec(&a),
            },
            delivery: Some(Delivery {
                identity: a.clone(),
                secrets: BTreeMap::new(),
            }),
            grant: None,
        };
        // As the control plane sends it: with the grant for its blobs.
        let req = OpRequest {
            grant: rig.dp.grant_for("bench-wasm", &req)?,
            ..req
        };
        let t = Instant::now();
        let st = wasm_client.run(&req, Duration::from_secs(30)).await?;
        op_samples.push(ms(t.elapsed()));
        if st.state != OpState::Succeeded {
            bail!("golden restore failed: {:?}", st.error);
        }
    }
    let sandbox = mayfly_provider_wasm::WasmSandbox::new(rig.store.clone())?;
    let manifest: mayfly_actor_api::Manifest =
        serde_json::from_value(golden.envelope.body.clone())?;
    let mut streams = mayfly_actors::Streams::new();
    for b in &manifest.blobs {
        let bytes = rig.store.get("bench", &b.digest).await?.context("blob")?;
        streams
            .entry(b.name.clone())
            .or_default()
            .extend_from_slice(&bytes);
    }
    let delivery = Delivery::default();
    sandbox.start(&spec("warm"), 1, &delivery, None).await?; // compile once
    let mut sandbox_samples = Vec::new();
    for i in 0..runs.max(20) * 5 {
        let t = Instant::now();
        let inst = sandbox
            .start(
                &spec(&format!("s{i}")),
                1,
                &delivery,
                Some((Scope::Full, streams.clone())),
            )
            .await?;
        sandbox_samples.push(ms(t.elapsed()));
        inst.stop().await;
    }

    // 3. Checkpoint time and snapshot size against durable data.
    let mut ckpt = Vec::new();
    for mib in data_mib {
        let actor = format!("b{mib}");
        get(&actor).await?;
        let t = Instant::now();
        let snap = rig
            .dp
            .suspend("bench", &actor, "Bench")
            .await?
            .context("no snapshot")?;
        let checkpoint = ms(t.elapsed());
        let t = Instant::now();
        get(&actor).await?;
        let restore = ms(t.elapsed());
        ckpt.push((*mib, checkpoint, snap.data_size, restore));
    }

    // 4. Actors held by one wasm provider.
    let mut before = rss_bytes();
    let t = Instant::now();
    let mut started = 0usize;
    let mut warm = 0usize;
    for (n, chunk) in (0..wasm_actors).collect::<Vec<_>>().chunks(16).enumerate() {
        if n == 1 {
            // The first chunk warms the allocator and the connection pool.
            before = rss_bytes();
            warm = started;
        }
        let mut tasks = Vec::new();
        for i in chunk {
            let c = wasm_client.clone();
            let a = format!("many{i}");
            let req = OpRequest {
                op_id: format!("{a}.run"),
                actor: a.clone(),
                tenant: "bench".into(),
                assignment_epoch: 1,
                op: Op::Assign {
                    desired: Desired::Running,
                    spec: spec(&a),
                },
                delivery: Some(Delivery {
                    identity: a.clone(),
                    secrets: BTreeMap::new(),
                }),
                grant: None,
            };
            let req = OpRequest {
                grant: rig.dp.grant_for("bench-wasm", &req)?,
                ..req
            };
            tasks.push(tokio::spawn(async move {
                c.run(&req, Duration::from_secs(30)).await
            }));
        }
        for t in tasks {
            if t.await?
                .map(|s| s.state == OpState::Succeeded)
                .unwrap_or(false)
            {
                started += 1;
            }
        }
    }
    let start_s = t.elapsed().as_secs_f64();
    let rss_per = rss_bytes().saturating_sub(before) / (started - warm).max(1) as u64;
    let held = rig.providers[1].provider.running().await.len();

    let out = json!({
        "process_start_ms": starts.iter().map(|(c, (p50, p99))| (c.to_string(), json!({"p50": p50, "p99": p99}))).collect::<serde_json::Map<_, _>>(),
        "resume_from_suspended_ms": resume.iter().map(|(c, (p50, p99))| (c.to_string(), json!({"p50": p50, "p99": p99}))).collect::<serde_json::Map<_, _>>(),
        "wasm_golden_restore_ms": {
            "provider_op_p50": pct(&op_samples, 0.5), "provider_op_p99": pct(&op_samples, 0.99),
            "sandbox_p50": pct(&sandbox_samples, 0.5), "sandbox_p99": pct(&sandbox_samples, 0.99),
        },
        "checkpoint_vs_data": ckpt.iter().map(|(mib, c, size, r)| json!({"data_mib": mib, "checkpoint_ms": c, "snapshot_bytes": size, "restore_ms": r})).collect::<Vec<_>>(),
        "wasm_actors": {"started": started, "held": held, "seconds": start_s, "per_second": started as f64 / start_s.max(1e-9), "rss_bytes_per_actor": rss_per},
    });
    rig.shutdown().await;
    if json_out {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("actor dataplane (in process, mTLS on loopback, SQLite log, {runs} samples)");
    for (c, (p50, p99)) in &starts {
        println!(
            "  fresh start (provider op, until ready), {c:<18}  p50 {p50:>8.2} ms   p99 {p99:>8.2} ms"
        );
    }
    for (c, (p50, p99)) in &resume {
        println!(
            "  resume from suspended via the router, {c:<19}  p50 {p50:>8.2} ms   p99 {p99:>8.2} ms"
        );
    }
    println!(
        "  wasm golden restore: provider op p50 {:.2} ms p99 {:.2} ms; sandbox alone p50 {:.3} ms p99 {:.3} ms (target ≤ 5 ms)",
        pct(&op_samples, 0.5),
        pct(&op_samples, 0.99),
        pct(&sandbox_samples, 0.5),
        pct(&sandbox_samples, 0.99)
    );
    for (mib, c, size, r) in &ckpt {
        println!(
            "  process checkpoint of {mib} MiB durable data: {c:.1} ms, snapshot {:.2} MiB, restore+first request {r:.1} ms",
            *size as f64 / (1024.0 * 1024.0)
        );
    }
    println!(
        "  wasm actors on one provider: {started} started in {start_s:.2} s ({:.0}/s), {held} held, ~{} KiB resident each",
        started as f64 / start_s.max(1e-9),
        rss_per / 1024
    );
    Ok(ExitCode::SUCCESS)
}
