//! Distributed mode inside one test process, against the real local Postgres and NATS:
//! the orchestrator appends to a Postgres log and publishes commands to a JetStream work
//! queue; workers reach it only through NATS (`RemoteCoordinator`), never the store.
//! Skipped loudly when Postgres or NATS is down; with CI=true their absence is a failure.

use mayfly_dsl::ParseOptions;
use mayfly_engine::{Report, Status};
use mayfly_queue::{NatsQueue, QueueConfig};
use mayfly_runtime::remote::{Channel, RemoteCoordinator, discover, serve};
use mayfly_runtime::worker::worker_loop;
use mayfly_runtime::{Runtime, RuntimeConfig, load_file};
use mayfly_store::{PostgresStore, Store};
use mayfly_tools::{Tools, ToolsConfig};
use mayfly_trust::channel::ChannelKey;
use mayfly_types::EventKind;
use serde_json::{Map, Value, json};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

const PG: &str = "postgres://postgres@127.0.0.1:5432/test";
const NATS: &str = "nats://127.0.0.1:4222";

fn services() -> bool {
    mayfly_testkit::postgres() && mayfly_testkit::nats()
}

mod common;
use common::{assert_replays, example};

use mayfly_testkit::unique;

fn queue_config() -> QueueConfig {
    QueueConfig {
        ack_wait: Duration::from_secs(5),
        max_deliver: 100,
        backoff: vec![Duration::from_millis(50)],
    }
}

/// A server half (orchestrator + RPC) and `workers` remote worker "processes" with
/// `slots` block loops each, every one on its own NATS connection.
struct Cluster {
    /// The queue name (the channel's prefix without the log id).
    name: String,
    schema: String,
    stream: String,
    channel: Channel,
    channel_key: ChannelKey,
    bucket: String,
    cache: Arc<mayfly_cache::Payloads>,
    store: Arc<PostgresStore>,
    rt: Runtime,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Cluster {
    async fn start(
        workers: usize,
        slots: usize,
        key: Option<mayfly_trust::keychain::MasterKey>,
    ) -> Cluster {
        let name = unique("MAYFLY_DIST");
        Self::start_on(&name, &name, ChannelKey::generate(), workers, slots, key).await
    }

    /// A deployment on queue `name` with channel key `channel_key` (two deployments may
    /// share both); its workers pin its log and sign their claims `w{n}/{slot}@{tag}`.
    async fn start_on(
        name: &str,
        tag: &str,
        channel_key: ChannelKey,
        workers: usize,
        slots: usize,
        key: Option<mayfly_trust::keychain::MasterKey>,
    ) -> Cluster {
        let schema = unique("mayfly_dist");
        let store = Arc::new(
            PostgresStore::connect_schema(PG, &schema)
                .await
                .expect("postgres"),
        );
        let channel = Channel::new(
            name,
            channel_key.for_log(&store.log_id().await.expect("id")),
        );
        let stream = channel.prefix();
        let queue = NatsQueue::connect(NATS, &stream, queue_config())
            .await
            .expect("queue");
        let client = async_nats::connect(NATS).await.expect("nats");
        let bucket = unique("mayfly_cache");
        let cache = Arc::new(mayfly_cache::Payloads::new(
            Arc::new(
                mayfly_cache::NatsCache::open(client.clone(), &bucket)
                    .await
                    .expect("object store"),
            ),
            mayfly_cache::DEFAULT_INLINE_LIMIT,
        ));
        let cfg = RuntimeConfig {
            workers: 0,
            lease: Duration::from_secs(5),
            queue: Some(Arc::new(channel.seal(queue))),
            // The orchestrator holds no master key: only workers open secrets.
            keychain: None,
            cache: Some(cache.clone()),
            ..Default::default()
        };
        let rt = Runtime::start(store.clone(), cfg).expect("runtime");
        let mut tasks = vec![
            serve(rt.handle(), client.clone(), &channel)
                .await
                .expect("serve"),
        ];
        for w in 0..workers {
            // As `mayfly worker` finds its channel: the log it names, authenticated.
            let found = discover(
                &client,
                name,
                &channel_key,
                Some(channel.log_id()),
                Duration::from_secs(10),
            )
            .await
            .expect("the worker finds its log");
            assert_eq!(found.prefix(), stream);
            let coord = RemoteCoordinator::connect(NATS, &found, queue_config())
                .await
                .expect("worker connects");
            let tools = Arc::new(
                Tools::new(ToolsConfig {
                    python_pool: slots,
                    ..Default::default()
                })
                .expect("tools"),
            );
            for s in 0..slots {
                tasks.push(tokio::spawn(worker_loop(
                    coord.clone(),
                    tools.clone(),
                    key.clone(),
                    Some(cache.clone()),
                    None,
                    format!("w{w}/{s}@{tag}"),
                )));
            }
        }
        Cluster {
            name: name.to_owned(),
            schema,
            stream,
            channel,
            channel_key,
            bucket,
            cache,
            store,
            rt,
            tasks,
        }
    }

    async fn run(&self, name: &str, overrides: Value) -> Report {
        let overrides: Map<String, Value> = overrides.as_object().cloned().unwrap_or_default();
        let opts = ParseOptions {
            extra_vars: overrides.keys().cloned().collect(),
        };
        let pb = load_file(&example(name), &opts).unwrap_or_else(|e| panic!("{e}"));
        self.run_pb(pb, overrides).await
    }

    async fn run_pb(&self, pb: mayfly_dsl::Playbook, overrides: Map<String, Value>) -> Report {
        let report = tokio::time::timeout(Duration::from_secs(60), self.rt.run(pb, overrides))
            .await
            .expect("finishes in time")
            .expect("run");
        assert_replays(self.store.as_ref(), &report).await;
        report
    }

    async fn stop(self) {
        for t in &self.tasks {
            t.abort();
        }
        drop(self.rt);
        NatsQueue::delete(NATS, &self.stream)
            .await
            .expect("delete stream");
        let client = async_nats::connect(NATS).await.expect("nats");
        mayfly_cache::NatsCache::delete(client, &self.bucket)
            .await
            .expect("delete bucket");
        PostgresStore::drop_schema(PG, &self.schema)
            .await
            .expect("drop schema");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn examples_run_on_remote_workers_over_nats() {
    if !services() {
        return;
    }
    let c = Cluster::start(2, 4, None).await;

    let r = c.run("loop.yaml", json!({})).await;
    assert_eq!(r.status, Status::Completed, "{:?}", r.error);
    assert_eq!(r.result["sum_of_squares"], json!(204));
    assert_eq!(r.result["order"], json!([0, 1, 2]));

    let r = c.run("branching.yaml", json!({})).await;
    assert_eq!(
        r.result,
        json!({"path": "hot", "advice": ["drink water", "close the blinds"]})
    );

    let dir = tempfile::tempdir().expect("tmp");
    let r = c
        .run(
            "retry.yaml",
            json!({"counter_dir": dir.path().display().to_string()}),
        )
        .await;
    assert_eq!(r.result, json!({"recovered_after": 3}));

    let r = c.run("nested.yaml", json!({})).await;
    assert_eq!(r.result["best"], json!("ann"));

    // Large results go through the NATS object store: the rows leave one worker as an
    // Arrow table and reach others by ref (the event carries only the ref).
    let r = c.run("table.yaml", json!({})).await;
    assert_eq!(r.status, Status::Completed, "{:?}", r.error);
    assert_eq!(
        r.result,
        json!({"n": 1000, "total": 49950.0, "top": "user-321", "evens": 500})
    );
    let finished = c
        .store
        .read_all(&r.execution_id)
        .await
        .expect("events")
        .into_iter()
        .find(|e| e.kind == EventKind::StepFinished && e.step.as_deref() == Some("start"))
        .expect("start finished");
    let rows = mayfly_types::CacheRef::parse(&finished.payload["result"]["rows"]).expect("ref");
    let stored = c
        .cache
        .cache()
        .get("default", &rows.digest)
        .await
        .expect("object store")
        .expect("stored");
    assert_eq!(stored.len() as u64, rows.bytes);

    // Every block was claimed by a remote worker, and both worker processes took work.
    let mut who = BTreeSet::new();
    for x in c.store.list_executions(None, 100).await.expect("list") {
        for e in c.store.read_all(&x.execution_id).await.expect("events") {
            if e.kind == EventKind::CommandClaimed {
                let w = e.payload["worker"].as_str().expect("worker").to_owned();
                who.insert(w.split('/').next().unwrap_or_default().to_owned());
            }
        }
    }
    assert_eq!(
        who,
        BTreeSet::from(["w0".to_owned(), "w1".to_owned()]),
        "both workers ran blocks"
    );
    c.stop().await;
}

/// Claims travel in batches, and a batch's answer must fit one NATS message (1 MiB): 16
/// parallel items whose contexts each carry ~600 KB (20 workload values of 15 KB, each below
/// the inline limit so none goes by ref, each seen as `kN` and `workload.kN`) cannot share
/// one. Such claims are granted without their context and the worker fetches each on its
/// own; every item still runs with its full context. A context that fits no message at all
/// fails the step with a clear code.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn claims_whose_contexts_overflow_one_message_fetch_them_separately() {
    if !services() {
        return;
    }
    let c = Cluster::start(1, 16, None).await;
    let src = r#"
apiVersion: noetl.io/v2
kind: Playbook
metadata: {name: big-context}
workflow:
  - step: start
    loop:
      in: "{{ range(16) }}"
      iterator: i
      spec: {mode: parallel, max_in_flight: 16}
    tool:
      kind: python
      input: {n: "{{ k0 | length }}", i: "{{ i }}"}
      code: "result = n + i"
"#;
    let run = |values: usize| {
        let keys: Vec<String> = (0..values).map(|k| format!("k{k}")).collect();
        let opts = ParseOptions {
            extra_vars: keys.clone(),
        };
        let pb = mayfly_dsl::parse("big-context.yaml", src, &opts).expect("parse");
        let overrides: Map<String, Value> = keys
            .into_iter()
            .map(|k| (k, json!("x".repeat(15_000))))
            .collect();
        c.run_pb(pb, overrides)
    };
    let r = run(20).await;
    assert_eq!(r.status, Status::Completed, "{:?}", r.error);
    let events = c.store.read_all(&r.execution_id).await.expect("events");
    let done = events
        .iter()
        .find(|e| e.kind == EventKind::LoopDone)
        .expect("loop.done");
    let mut results: Vec<i64> =
        serde_json::from_value(done.payload["results"].clone()).expect("inline results");
    results.sort_unstable();
    assert_eq!(results, (0..16).map(|i| 15_000 + i).collect::<Vec<i64>>());

    let r = run(40).await;
    assert_eq!(r.status, Status::Failed);
    let error = r.error.expect("error");
    assert_eq!(error.code, "context_too_large", "{error:?}");
    c.stop().await;
}

/// Blocks dispatched together travel in one queue message, and that message settles as a
/// whole: while one of its blocks asks to be delivered again, the finished ones are not
/// acked on their own. On the redelivery the finished blocks' claims are answered `done`
/// (none runs twice) and the one given back runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn blocks_sharing_a_queue_message_settle_it_together() {
    use mayfly_queue::CommandQueue;
    use mayfly_runtime::worker::{Coordinator, Settle};
    use mayfly_runtime::{Claim, Completion};
    if !services() {
        return;
    }
    let c = Cluster::start(0, 0, None).await;
    let src = r#"
apiVersion: noetl.io/v2
kind: Playbook
metadata: {name: grouped}
workflow:
  - step: start
    loop:
      in: "{{ range(6) }}"
      iterator: i
      spec: {mode: parallel, max_in_flight: 6}
    tool: {kind: python, input: {i: "{{ i }}"}, code: "result = i * 10"}
"#;
    let pb = mayfly_dsl::parse("grouped.yaml", src, &ParseOptions::default()).expect("parse");
    let coord = RemoteCoordinator::connect(NATS, &c.channel, queue_config())
        .await
        .expect("worker connects");
    let by_hand = async {
        let mut got = Vec::new();
        while got.len() < 6 {
            let next = tokio::time::timeout(Duration::from_secs(20), coord.next());
            got.push(next.await.expect("six blocks arrive").expect("a block"));
        }
        // Six blocks, fewer messages: every message the worker holds is unacknowledged.
        let queue = NatsQueue::connect(NATS, &c.stream, queue_config())
            .await
            .expect("queue");
        let messages = queue.depth().await.expect("depth");
        assert!(
            (1..6).contains(&messages),
            "six blocks dispatched together arrived in {messages} messages"
        );
        let mut got = got.into_iter();
        let (given_back, ticket) = got.next().expect("first block");
        coord.settle(ticket, Settle::Retry(Duration::ZERO)).await;
        for (block, ticket) in got {
            let Claim::Granted(h) = coord.claim(block, "by-hand").await.expect("claim") else {
                panic!("a first claim is granted");
            };
            let done = Completion {
                block: h.block.clone(),
                attempt: h.attempt,
                worker: "by-hand".into(),
                outcome: Ok(mayfly_types::StepFinished {
                    index: h.block.index,
                    result: json!("by hand"),
                    set: Map::new(),
                    inline: false,
                    duration_ms: None,
                    logs: None,
                }),
            };
            coord.complete(&done).await.expect("complete");
            coord.settle(ticket, Settle::Ack).await;
        }
        // The message comes back whole; a worker finishes what was given back.
        let tools = Arc::new(Tools::new(ToolsConfig::default()).expect("tools"));
        tokio::spawn(worker_loop(
            coord.clone(),
            tools,
            None,
            Some(c.cache.clone()),
            None,
            "w0/0".into(),
        ));
        given_back.index
    };
    let (report, given_back) = tokio::join!(c.run_pb(pb, Map::new()), by_hand);
    assert_eq!(report.status, Status::Completed, "{:?}", report.error);
    let events = c
        .store
        .read_all(&report.execution_id)
        .await
        .expect("events");
    let count = |kind: EventKind| {
        let mut per: std::collections::BTreeMap<String, usize> = Default::default();
        for e in events.iter().filter(|e| e.kind == kind) {
            *per.entry(e.command_id.clone().expect("command id"))
                .or_default() += 1;
        }
        per
    };
    let claimed = count(EventKind::CommandClaimed);
    assert_eq!(claimed.len(), 6);
    assert!(
        claimed.values().all(|n| *n == 1),
        "claimed once each: {claimed:?}"
    );
    let finished = count(EventKind::StepFinished);
    assert_eq!(finished.len(), 6);
    assert!(
        finished.values().all(|n| *n == 1),
        "finished once each: {finished:?}"
    );
    let done = events
        .iter()
        .find(|e| e.kind == EventKind::LoopDone)
        .expect("loop.done");
    let results = done.payload["results"].as_array().expect("results").clone();
    let i = given_back.expect("a loop item");
    for (k, r) in results.iter().enumerate() {
        let want = if k == i {
            json!(10 * i)
        } else {
            json!("by hand")
        };
        assert_eq!(r, &want, "item {k}");
    }
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn remote_workers_open_keychain_values_the_orchestrator_never_sees() {
    if !services() {
        return;
    }
    let key = mayfly_trust::keychain::MasterKey::generate();
    let c = Cluster::start(1, 2, Some(key.clone())).await;
    let dsn = "postgres://postgres@127.0.0.1:5432/test";
    let sealed = key
        .seal(
            "default",
            "pg_local",
            format!(r#"{{"dsn": "{dsn}"}}"#).as_bytes(),
        )
        .expect("seal");
    c.store
        .append(Arc::new(mayfly_store::Batch {
            secrets: vec![mayfly_store::SecretOp::Put {
                tenant: "default".into(),
                alias: "pg_local".into(),
                sealed,
            }],
            ..Default::default()
        }))
        .await
        .expect("put");
    let r = c.run("postgres.yaml", json!({})).await;
    assert_eq!(r.status, Status::Completed, "{:?}", r.error);
    assert_eq!(r.result, json!({"top": "ann", "total": 22, "rows": 3}));
    let events = c.store.read_all(&r.execution_id).await.expect("events");
    let text = serde_json::to_string(&events).expect("json");
    assert!(
        !text.contains(dsn),
        "the resolved DSN never reaches the log"
    );
    c.stop().await;
}

/// Postgres drops every connection of the runtime while a step runs: the completion's
/// commit fails, the execution is reloaded from the log once the store answers again, and
/// it completes with exactly one `step.finished` for the step.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_going_away_mid_run_loses_and_duplicates_nothing() {
    if !mayfly_testkit::postgres() {
        return;
    }
    let schema = unique("mayfly_pgloss");
    let app = format!("mayfly_{schema}");
    let store = Arc::new(
        PostgresStore::connect_schema(&format!("{PG}?application_name={app}"), &schema)
            .await
            .expect("postgres"),
    );
    let cfg = RuntimeConfig {
        workers: 2,
        lease: Duration::from_secs(2),
        ..Default::default()
    };
    let rt = Runtime::start(store.clone(), cfg).expect("runtime");
    let src = "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {name: pgloss}\nworkflow:\n  - step: start\n    tool: {kind: python, code: \"import time\\ntime.sleep(1)\\nresult = 7\"}\n    next: [{step: end}]\n  - step: end\n    tool: {kind: python, input: {v: \"{{ start }}\"}, code: \"result = v * 6\"}\n";
    let pb = mayfly_dsl::parse("pgloss.yaml", src, &ParseOptions::default()).expect("pb");
    let h = rt.handle();
    let id = h
        .start(Arc::new(pb), Map::new(), None)
        .await
        .expect("start");
    loop {
        let evs = store.read_all(&id).await.expect("events");
        if evs.iter().any(|e| e.kind == EventKind::StepStarted) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let killed = mayfly_testkit::terminate_postgres_sessions(&app).await;
    assert!(killed >= 1);
    let began = std::time::Instant::now();
    let report = loop {
        if let Ok(r) = h.wait(&id).await
            && r.status.is_terminal()
        {
            break r;
        }
        assert!(began.elapsed() < Duration::from_secs(60), "never completed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(report.status, Status::Completed, "{:?}", report.error);
    assert_eq!(report.result, json!(42));
    let evs = store.read_all(&id).await.expect("events");
    mayfly_trust::verify_chain(&evs).expect("chain");
    let finished = evs
        .iter()
        .filter(|e| e.kind == EventKind::StepFinished && e.step.as_deref() == Some("start"))
        .count();
    assert_eq!(finished, 1, "exactly one step.finished for the step");
    drop(rt);
    PostgresStore::drop_schema(PG, &schema)
        .await
        .expect("drop schema");
}

/// A remote worker's agent reaches the control plane only over NATS (the `agent` verb):
/// it fetches the rolled-out bundle, verifies and applies it, acknowledges it (the rollout
/// completes on the Postgres log), and the worker enforces it on the blocks it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn remote_agents_fetch_verify_apply_and_acknowledge_bundles_over_nats() {
    if !services() {
        return;
    }
    use mayfly_control::{Caller, Control, Role, parse_manifests, rollout::TPhase};
    use mayfly_runtime::agent::{Agent, AgentConfig};
    let mut c = Cluster::start(0, 0, None).await;
    let key = mayfly_trust::sign::ControlKey::generate();
    let store: Arc<dyn Store> = c.store.clone();
    let control = Arc::new(
        Control::open(store)
            .await
            .expect("control")
            .with_signer(key.clone()),
    );
    c.rt.handle().set_agent_hub(control.clone());
    let admin = |tenant: &str| Caller {
        tenant: tenant.into(),
        role: Role::Admin,
        actor: "admin".into(),
        request_id: "r".into(),
    };
    let policy = parse_manifests(
        "p.yaml",
        "apiVersion: mayfly.dev/v1\nkind: Policy\nmetadata: {name: no-shell, tenant: default}\nspec:\n  tools: {allow: [noop, python]}\n",
    )
    .expect("policy");
    control
        .apply(&admin("default"), &policy)
        .await
        .expect("apply");
    let b = control
        .publish_bundle(&admin("system"))
        .await
        .expect("publish")
        .digest;
    let rollout = parse_manifests(
        "r.yaml",
        &format!("apiVersion: mayfly.dev/v1\nkind: Rollout\nmetadata: {{name: no-shell}}\nspec:\n  bundle: \"{b}\"\n  target: {{pool: edge}}\n"),
    )
    .expect("rollout");
    control
        .apply(&admin("system"), &rollout)
        .await
        .expect("rollout");

    let coord = RemoteCoordinator::connect(NATS, &c.channel, queue_config())
        .await
        .expect("worker connects");
    let agent = Arc::new(Agent::new(AgentConfig {
        id: "edge-1".into(),
        pool: "edge".into(),
        labels: Default::default(),
        trusted: vec![key.public().clone()],
        interval: Duration::from_millis(200),
    }));
    agent.sync(&coord).await.expect("sync over NATS");
    assert_eq!(agent.applied(), Some(b.clone()));
    let st = control.rollout_status("no-shell").await.expect("status");
    assert_eq!(st.transition.phase, TPhase::Completed, "{st:?}");

    let tools = Arc::new(Tools::new(ToolsConfig::default()).expect("tools"));
    c.tasks.push(tokio::spawn(worker_loop(
        coord.clone(),
        tools,
        None,
        Some(c.cache.clone()),
        Some(agent.clone()),
        "edge-1/0".into(),
    )));
    let r = c.run("branching.yaml", json!({})).await;
    assert_eq!(r.status, Status::Failed, "the shell step is refused");
    let e = r.error.expect("error");
    assert_eq!(e.code, "policy_denied", "{e:?}");
    c.stop().await;
}

/// Every worker claim recorded in `store`'s log, by worker id.
async fn claimants(store: &PostgresStore) -> BTreeSet<String> {
    let mut who = BTreeSet::new();
    for x in store.list_executions(None, 100).await.expect("list") {
        for e in store.read_all(&x.execution_id).await.expect("events") {
            if e.kind == EventKind::CommandClaimed {
                who.insert(e.payload["worker"].as_str().expect("worker").to_owned());
            }
        }
    }
    who
}

/// Two deployments on one NATS with the same queue name and the same channel key (one
/// MAYFLY_HOME): each log has its own stream and subjects and its own message key, so each
/// runs its own work to the end and neither's workers ever claim the other's blocks; a worker
/// told neither log refuses to guess.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_deployments_on_one_nats_never_touch_each_others_work() {
    if !services() {
        return;
    }
    let name = unique("MAYFLY_TWO");
    let key = ChannelKey::generate();
    let a = Cluster::start_on(&name, "a", key.clone(), 1, 2, None).await;
    let b = Cluster::start_on(&name, "b", key.clone(), 1, 2, None).await;
    assert_ne!(a.stream, b.stream);
    let (ra, rb) = tokio::join!(a.run("loop.yaml", json!({})), b.run("loop.yaml", json!({})));
    assert_eq!(ra.status, Status::Completed, "{:?}", ra.error);
    assert_eq!(rb.status, Status::Completed, "{:?}", rb.error);
    let (wa, wb) = (claimants(&a.store).await, claimants(&b.store).await);
    assert!(
        !wa.is_empty() && wa.iter().all(|w| w.ends_with("@a")),
        "{wa:?}"
    );
    assert!(
        !wb.is_empty() && wb.iter().all(|w| w.ends_with("@b")),
        "{wb:?}"
    );
    // Nothing was refused: neither saw the other's traffic at all.
    for c in [&a, &b] {
        let ch = c.rt.handle().channel().expect("a channel");
        assert_eq!(ch.refused, 0, "{ch:?}");
        assert_eq!(ch.stream, c.stream);
    }
    // Unpinned, a worker sees two logs answer on the name and refuses to pick one.
    let client = async_nats::connect(NATS).await.expect("nats");
    let e = discover(&client, &name, &key, None, Duration::from_secs(5))
        .await
        .expect_err("ambiguous");
    assert!(e.to_string().contains("--log-id"), "{e}");
    // A worker holding another deployment's key finds nothing it can trust.
    let e = discover(
        &client,
        &name,
        &ChannelKey::generate(),
        None,
        Duration::from_secs(2),
    )
    .await
    .expect_err("foreign key");
    assert!(e.to_string().contains("did not verify"), "{e}");
    a.stop().await;
    b.stop().await;
}

/// The next block `coord` is handed is claimed and refused `not_owned` (the server's
/// verified answer), then given back for a later delivery (never acked).
async fn claim_refused_not_owned(coord: &RemoteCoordinator) {
    use mayfly_runtime::worker::Coordinator;
    let (b, ticket) = tokio::time::timeout(Duration::from_secs(10), coord.next())
        .await
        .expect("delivered")
        .expect("a block");
    let e = coord.claim(b, "by-hand").await.expect_err("refused");
    assert!(
        matches!(e, mayfly_runtime::RuntimeError::NotOwned(_)),
        "the server's answer: {e}"
    );
    coord
        .settle(
            ticket,
            mayfly_runtime::worker::Settle::Retry(Duration::from_secs(30)),
        )
        .await;
}

/// Forgeries on the channel: a command in the stream that is not sealed with the log's key
/// is terminated by the worker (never run, counted); a request that is not sealed gets no
/// answer (counted on the server); a sealed command for an execution this log never had is
/// refused `not_owned` — never acknowledged — and shows in the server's status.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forged_and_foreign_messages_are_refused_and_counted() {
    use mayfly_queue::CommandQueue;
    if !services() {
        return;
    }
    let c = Cluster::start(0, 0, None).await;
    let client = async_nats::connect(NATS).await.expect("nats");
    let block = |exec: &str| {
        serde_json::to_vec(&json!([{
            "execution_id": exec, "command_id": format!("{exec}-c1"), "step": "start", "index": null
        }]))
        .expect("json")
    };
    // 1. A forged command: published straight into the stream, without the log's tag.
    let raw = NatsQueue::connect(NATS, &c.stream, queue_config())
        .await
        .expect("queue");
    raw.publish("forged-1", &block("forged"))
        .await
        .expect("publish");
    // The worker's own view of the channel (its refusals are its own).
    let mine = discover(
        &client,
        &c.name,
        &c.channel_key,
        Some(c.channel.log_id()),
        Duration::from_secs(10),
    )
    .await
    .expect("discover");
    let coord = RemoteCoordinator::connect(NATS, &mine, queue_config())
        .await
        .expect("worker connects");
    use mayfly_runtime::worker::Coordinator;
    let next = tokio::time::timeout(Duration::from_secs(3), coord.next()).await;
    assert!(next.is_err(), "a forged command reached a slot");
    let worker_side = mine.reading();
    assert_eq!(worker_side.refused, 1, "{worker_side:?}");
    assert!(
        worker_side
            .last_refusal
            .as_ref()
            .is_some_and(|(_, why)| why.starts_with("unauthenticated_command")),
        "{worker_side:?}"
    );
    assert_eq!(
        raw.depth().await.expect("depth"),
        0,
        "terminated, not left to loop"
    );
    // 2. A forged request: no answer, counted by the server.
    let asked = client
        .request(format!("{}.rpc.claims", c.stream), "[]".into())
        .await;
    assert!(asked.is_err(), "a forged request was answered");
    let server = c.rt.handle().channel().expect("channel");
    assert_eq!(server.refused, 1, "{server:?}");
    // 3. A sealed command for an execution this log does not have: refused, never acked.
    let sealed = c.channel.seal(
        NatsQueue::connect(NATS, &c.stream, queue_config())
            .await
            .expect("queue"),
    );
    sealed
        .publish("ghost-1", &block("ghost"))
        .await
        .expect("publish");
    claim_refused_not_owned(&coord).await;
    let server = c.rt.handle().channel().expect("channel");
    assert_eq!(server.refused, 2, "{server:?}");
    assert!(
        server
            .last_refusal
            .as_ref()
            .is_some_and(|(_, why)| why.starts_with("not_owned") && why.contains("ghost")),
        "{server:?}"
    );
    assert_eq!(
        raw.depth().await.expect("depth"),
        1,
        "still in the queue, not acked"
    );
    // 4. Anyone on NATS answers a worker's request first, with garbage: the worker skips
    // it (counted) and takes the server's verified answer. The request is captured too.
    use futures_util::StreamExt;
    let mut tap = client
        .subscribe(format!("{}.rpc.claims", c.stream))
        .await
        .expect("tap");
    let spoofer = client.clone();
    let captured = tokio::spawn(async move {
        let m = tap.next().await.expect("a claim request");
        if let Some(r) = &m.reply {
            let _ = spoofer.publish(r.clone(), "garbage first".into()).await;
        }
        m
    });
    sealed
        .publish("ghost-2", &block("ghost2"))
        .await
        .expect("publish");
    let worker_refusals = mine.reading().refused;
    claim_refused_not_owned(&coord).await;
    let worker_side = mine.reading();
    assert_eq!(worker_side.refused, worker_refusals + 1, "{worker_side:?}");
    assert!(
        worker_side
            .last_refusal
            .as_ref()
            .is_some_and(|(_, why)| why.starts_with("unauthenticated_answer")),
        "{worker_side:?}"
    );
    let captured = captured.await.expect("captured");
    let subject = captured.subject.to_string();
    let reply = captured.reply.clone().expect("a reply inbox").to_string();
    // 5. The captured request replayed, to its own inbox and to a fresh one: not answered.
    let refusal = |before: u64| {
        let c = &c;
        async move {
            for _ in 0..100 {
                let r = c.rt.handle().channel().expect("channel");
                if r.refused > before {
                    return r.last_refusal.expect("a refusal").1;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("nothing refused");
        }
    };
    let before = c.rt.handle().channel().expect("channel").refused;
    client
        .publish_with_reply(subject.clone(), reply, captured.payload.clone())
        .await
        .expect("replay");
    assert!(refusal(before).await.starts_with("replayed_request"));
    let before = c.rt.handle().channel().expect("channel").refused;
    let asked = client
        .request(subject.clone(), captured.payload.clone())
        .await;
    assert!(asked.is_err(), "a replayed request was answered");
    assert!(refusal(before).await.starts_with("unauthenticated_request"));
    // 6. Sealed with the log's key but stamped two minutes ago: not answered.
    let key = c.channel_key.for_log(c.channel.log_id());
    let inbox = client.new_inbox();
    let mut stamped = (mayfly_types::now_ms() - 120_000).to_be_bytes().to_vec();
    stamped.extend_from_slice(b"[]");
    let frame = key.seal(
        mayfly_trust::channel::Kind::Request,
        &format!("claims\n{inbox}"),
        &stamped,
    );
    let before = c.rt.handle().channel().expect("channel").refused;
    client
        .publish_with_reply(subject, inbox, frame.into())
        .await
        .expect("publish");
    assert!(refusal(before).await.starts_with("stale_request"));
    c.stop().await;
}
