//! The wasm provider over its real HTTP API: the conformance suite (Full scope), and the
//! wasm-specific promises — identity never in a snapshot, golden restore.

use mayfly_actor_api::{
    ActorSpec, CheckpointKind, Delivery, Desired, Op, OpRequest, OpState, RefusalCode, Scope,
};
use mayfly_actors::client::ProviderClient;
use mayfly_actors::conformance::{self, Outcome, WASM_ACTOR, wasm_workload};
use mayfly_actors::{Journal, Provider, ProviderConfig};
use mayfly_cache::{Cache, LocalCache};
use mayfly_provider_wasm::WasmSandbox;
use mayfly_trust::sign::{ControlKey, Purpose};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

async fn start(root: &Path, key: &ControlKey) -> (Arc<Provider>, ProviderClient, PathBuf) {
    mayfly_actors::install_crypto();
    let external = root.join("snapshots");
    let store: Arc<dyn Cache> = Arc::new(LocalCache::new(&external));
    let provider = Provider::new(
        ProviderConfig {
            id: "wasm-test".into(),
            slots: 8,
            trusted: vec![key.public().clone()],
            labels: BTreeMap::new(),
            platform: ProviderConfig::platform_of_host(),
        },
        Arc::new(WasmSandbox::new(store.clone()).unwrap()),
        Journal::open(&root.join("journal.db")).await.unwrap(),
        Arc::new(LocalCache::new(root.join("local"))),
        store,
    )
    .await
    .unwrap();
    let (client, _server) = mayfly_actors::local::serve_plain(provider.clone())
        .await
        .unwrap();
    (provider, client, external)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wasm_provider_passes_the_conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    let key = ControlKey::generate();
    let (p, client, external) = start(dir.path(), &key).await;
    let report = conformance::run(conformance::Config {
        client,
        key,
        tenant: "conformance".into(),
        snapshot_dir: Some(external),
        workloads: BTreeMap::new(),
    })
    .await;
    for (name, o) in &report.checks {
        eprintln!("{name}: {o:?}");
    }
    assert_eq!(report.failed(), 0, "{:#?}", report.checks);
    let skipped: Vec<_> = report
        .checks
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::Skipped(_)))
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(skipped, vec!["wasm: checkpoint_restore_round_trip_Data"]);
    p.shutdown().await;
}

fn spec(actor: &str) -> ActorSpec {
    ActorSpec {
        actor: actor.into(),
        tenant: "t1".into(),
        template: "tpl".into(),
        workload: wasm_workload(),
    }
}

fn req(actor: &str, id: &str, epoch: u64, op: Op, identity: &str) -> OpRequest {
    OpRequest {
        op_id: id.into(),
        actor: actor.into(),
        tenant: "t1".into(),
        assignment_epoch: epoch,
        op,
        delivery: Some(Delivery {
            identity: identity.into(),
            secrets: BTreeMap::new(),
        }),
        grant: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_never_reaches_a_snapshot_and_golden_restores_share_one_image() {
    let dir = tempfile::tempdir().unwrap();
    let key = ControlKey::generate();
    let (p, client, external) = start(dir.path(), &key).await;
    let store = LocalCache::new(&external);
    let w = wasm_workload();
    let mayfly_actor_api::Workload::Wasm { module, .. } = &w else {
        unreachable!()
    };
    store
        .put(
            "t1",
            module,
            bytes::Bytes::from_static(WASM_ACTOR.as_bytes()),
        )
        .await
        .unwrap();
    let wait = Duration::from_secs(60);
    let run = req(
        "g",
        "g-run",
        1,
        Op::Assign {
            desired: Desired::Running,
            spec: spec("g"),
        },
        "IDENTITY-SECRET-91ab",
    );
    assert_eq!(
        client.run(&run, wait).await.unwrap().state,
        OpState::Succeeded
    );
    let a = client
        .call("t1", "g", 1, reqwest::Method::POST, "/", vec![])
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
    assert_eq!(v["identity"], "IDENTITY-SECRET-91ab", "{v}");
    assert_eq!(v["counter"], 1);
    let ck = req(
        "g",
        "g-ckpt",
        1,
        Op::Checkpoint {
            kind: CheckpointKind::External,
            scope: Scope::Full,
            teardown: true,
        },
        "",
    );
    let st = client.run(&ck, wait).await.unwrap();
    let snap = st.result.unwrap().snapshot.unwrap();
    for b in &snap.manifest.blobs {
        let bytes = store.get("t1", &b.digest).await.unwrap().unwrap();
        let plain = zstd::decode_all(&bytes[..]).unwrap_or_else(|_| bytes.to_vec());
        assert!(
            !plain.windows(20).any(|w| w == b"IDENTITY-SECRET-91ab"),
            "the identity was captured in stream {}",
            b.name
        );
    }
    // Golden: the manifest without its actor, signed; many actors restore it at once.
    let mut golden = snap.manifest.clone();
    golden.actor = None;
    let env = key
        .sign(Purpose::Snapshot, serde_json::to_value(&golden).unwrap())
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..6 {
        let client = client.clone();
        let env = env.clone();
        tasks.push(tokio::spawn(async move {
            let a = format!("a{i}");
            let r = req(
                &a,
                &format!("{a}-restore"),
                1,
                Op::Restore {
                    snapshot: env,
                    spec: spec(&a),
                },
                &format!("id-{a}"),
            );
            let st = client.run(&r, Duration::from_secs(60)).await.unwrap();
            assert_eq!(st.state, OpState::Succeeded, "{st:?}");
            let v: serde_json::Value = serde_json::from_slice(
                &client
                    .call("t1", &a, 1, reqwest::Method::GET, "/", vec![])
                    .await
                    .unwrap()
                    .body,
            )
            .unwrap();
            (
                v["counter"].clone(),
                v["boot"].clone(),
                v["identity"].clone(),
            )
        }));
    }
    let mut boots = std::collections::BTreeSet::new();
    for (i, t) in tasks.into_iter().enumerate() {
        let (counter, boot, identity) = t.await.unwrap();
        assert_eq!(counter, 1, "pre-initialized state from the golden image");
        assert_eq!(identity, format!("id-a{i}"), "identity fresh per restore");
        boots.insert(boot.to_string());
    }
    assert_eq!(
        boots.len(),
        1,
        "every restore carries the golden instance's globals"
    );
    // A Data-scope checkpoint is refused honestly.
    let d = req(
        "a0",
        "a0-data",
        1,
        Op::Checkpoint {
            kind: CheckpointKind::External,
            scope: Scope::Data,
            teardown: false,
        },
        "",
    );
    let e = client.submit(&d, wait).await.unwrap_err();
    assert_eq!(e.code(), Some(RefusalCode::UnsupportedScope));
    p.shutdown().await;
}
