//! Child executions: a failing child fails its parent and the siblings still running are
//! cancelled with it (no orphans); fire-and-forget children (NoETL's default) outlive their
//! parent and stay bounded.

use mayfly_dsl::ParseOptions;
use mayfly_engine::Status;
use mayfly_runtime::{Runtime, RuntimeConfig, load_file};
use mayfly_store::{SqliteStore, Store};
use serde_json::Map;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The log, a runtime and playbook `file` of `dir` (the files a test wrote there).
async fn start(
    dir: &tempfile::TempDir,
    file: &str,
    cfg: RuntimeConfig,
) -> (Arc<SqliteStore>, Runtime, mayfly_dsl::Playbook) {
    let store = Arc::new(
        SqliteStore::open(dir.path().join("m.db"))
            .await
            .expect("store"),
    );
    let rt = Runtime::start(store.clone(), cfg).expect("rt");
    let pb = load_file(&dir.path().join(file), &ParseOptions::default()).expect("pb");
    (store, rt, pb)
}

#[tokio::test]
async fn a_failed_child_fails_the_parent_and_cancels_running_siblings() {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::write(
        dir.path().join("parent.yaml"),
        "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {name: parent}\nworkload: {xs: [fast_fail, slow]}\nworkflow:\n  - step: start\n    loop: {in: \"{{ xs }}\", iterator: x, spec: {mode: parallel}}\n    tool: {kind: playbook, path: child, return_result: true, input: {mode: \"{{ x }}\"}}\n",
    )
    .expect("write");
    std::fs::write(
        dir.path().join("child.yaml"),
        "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {name: child}\nworkload: {mode: x}\nworkflow:\n  - step: start\n    tool:\n      kind: python\n      input: {mode: \"{{ mode }}\"}\n      code: |\n        import time\n        if mode == 'fast_fail':\n            time.sleep(0.3)\n            raise ValueError('child says no')\n        time.sleep(20)\n        result = 'late'\n",
    )
    .expect("write");
    let (store, rt, pb) = start(&dir, "parent.yaml", RuntimeConfig::default()).await;
    let t = Instant::now();
    let report = rt.run(pb, Map::new()).await.expect("run");
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "the parent does not wait for the slow sibling"
    );
    assert_eq!(report.status, Status::Failed);
    let e = report.error.expect("error");
    assert_eq!(e.code, "child_failed");
    assert!(
        e.message.contains("ValueError: child says no"),
        "{}",
        e.message
    );
    let mut statuses: Vec<String> = store
        .list_executions(None, 10)
        .await
        .expect("list")
        .into_iter()
        .filter(|x| x.parent_execution_id.as_ref() == Some(&report.execution_id))
        .map(|x| x.status)
        .collect();
    statuses.sort();
    assert_eq!(statuses, ["cancelled", "failed"]);
    assert!(
        store.open_commands(None).await.expect("open").is_empty(),
        "no command left open"
    );
}

/// A playbook that calls itself twice per level would start 2^16 executions before the depth
/// limit: the whole tree's child count is capped, and the root fails with
/// `child_limit_exceeded`, not sixteen nested `child_failed`s.
#[tokio::test]
async fn a_self_calling_fan_out_stops_at_the_child_limit() {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::write(
        dir.path().join("boom.yaml"),
        "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {name: boom, path: boom}\nworkflow:\n  - step: start\n    loop: {in: [1, 2], iterator: i, spec: {mode: parallel}}\n    tool: {kind: playbook, path: boom, return_result: true}\n",
    )
    .expect("write");
    let (store, rt, pb) = start(
        &dir,
        "boom.yaml",
        RuntimeConfig {
            max_children: 40,
            ..Default::default()
        },
    )
    .await;
    let report = tokio::time::timeout(Duration::from_secs(60), rt.run(pb, Map::new()))
        .await
        .expect("ends")
        .expect("run");
    assert_eq!(report.status, Status::Failed);
    assert_eq!(
        report.error.map(|e| e.code),
        Some("child_limit_exceeded".to_owned())
    );
    let all = store.list_executions(None, 1000).await.expect("list");
    assert!(
        all.len() <= 41,
        "at most the root and its 40 children exist: {}",
        all.len()
    );
}

/// Poll the log until no execution is running (fire-and-forget children end on their own).
async fn settled(store: &dyn Store) -> Vec<mayfly_store::ExecutionRow> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let all = store.list_executions(None, 1000).await.expect("list");
        if all
            .iter()
            .all(|x| x.status != "running" && x.status != "requested")
        {
            return all;
        }
        assert!(
            Instant::now() < deadline,
            "executions still running: {all:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_fire_and_forget_child_outlives_its_parent_and_lists_under_it() {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::write(
        dir.path().join("parent.yaml"),
        "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {name: parent}\nworkflow:\n  - step: start\n    tool: {kind: playbook, path: child, input: {n: 2}}\n",
    )
    .expect("write");
    std::fs::write(
        dir.path().join("child.yaml"),
        "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {name: child}\nworkload: {n: 0}\nworkflow:\n  - step: start\n    tool:\n      kind: python\n      input: {n: \"{{ n }}\"}\n      code: |\n        import time\n        time.sleep(0.5)\n        result = n * 10\n",
    )
    .expect("write");
    let (store, rt, pb) = start(&dir, "parent.yaml", RuntimeConfig::default()).await;
    let report = rt.run(pb, Map::new()).await.expect("run");
    assert_eq!(report.status, Status::Completed, "{:?}", report.error);
    assert_eq!(report.result["status"], "started");
    assert_eq!(report.result["async"], true);
    assert_eq!(report.result["path"], "child");
    let child = mayfly_types::ExecutionId(
        report.result["execution_id"]
            .as_str()
            .expect("execution_id")
            .to_owned(),
    );
    let row = store
        .list_executions(None, 10)
        .await
        .expect("list")
        .into_iter()
        .find(|x| x.execution_id == child)
        .expect("the child is listed");
    assert_eq!(row.parent_execution_id.as_ref(), Some(&report.execution_id));
    assert_eq!(
        row.status, "running",
        "the parent completed while its child still ran"
    );
    let done = rt.handle().wait(&child).await.expect("wait child");
    assert_eq!(done.status, Status::Completed);
    assert_eq!(done.result, serde_json::json!(20));
}

/// A fire-and-forget self-call completes each parent at once, so nothing waits on the
/// chain: the depth limit still ends it at 16 executions.
#[tokio::test]
async fn a_fire_and_forget_self_call_stops_at_the_depth_limit() {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::write(
        dir.path().join("again.yaml"),
        "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {name: again, path: again}\nworkflow:\n  - step: start\n    tool: {kind: playbook, path: again}\n",
    )
    .expect("write");
    let (store, rt, pb) = start(&dir, "again.yaml", RuntimeConfig::default()).await;
    let report = rt.run(pb, Map::new()).await.expect("run");
    assert_eq!(report.status, Status::Completed);
    let all = settled(store.as_ref()).await;
    assert_eq!(all.len(), 16, "{all:?}");
    let failed: Vec<_> = all.iter().filter(|x| x.status == "failed").collect();
    assert_eq!(failed.len(), 1, "{all:?}");
    assert_eq!(
        all.iter().filter(|x| x.status == "completed").count(),
        15,
        "{all:?}"
    );
}

/// Two playbooks that wait on each other: the depth limit ends the chain, and its error
/// names the cycle.
#[tokio::test]
async fn an_awaited_cycle_stops_at_the_depth_limit_and_is_named() {
    let dir = tempfile::tempdir().expect("tmp");
    for (me, other) in [("ping", "pong"), ("pong", "ping")] {
        std::fs::write(
            dir.path().join(format!("{me}.yaml")),
            format!("apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {{name: {me}, path: lib/{me}}}\nworkflow:\n  - step: start\n    tool: {{kind: playbook, path: lib/{other}, return_result: true}}\n"),
        )
        .expect("write");
    }
    let (store, rt, pb) = start(&dir, "ping.yaml", RuntimeConfig::default()).await;
    mayfly_runtime::PlaybookIndex::scan(dir.path())
        .expect("scan")
        .register(store.as_ref(), "default")
        .await
        .expect("register");
    let report = rt.run(pb, Map::new()).await.expect("run");
    assert_eq!(report.status, Status::Failed);
    let e = report.error.expect("an error");
    assert!(
        e.message.contains("child_depth_exceeded") || e.code == "child_depth_exceeded",
        "{e:?}"
    );
    assert!(
        e.message
            .contains("a cycle — `lib/ping` starts itself again (lib/ping → lib/pong → lib/ping)"),
        "{e:?}"
    );
}

/// Fire-and-forget children that fan out are counted against the tree's child limit even
/// after the executions that started them have ended.
#[tokio::test]
async fn a_fire_and_forget_fan_out_stops_at_the_child_limit() {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::write(
        dir.path().join("boom.yaml"),
        "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {name: boom, path: boom}\nworkflow:\n  - step: start\n    loop: {in: [1, 2], iterator: i, spec: {mode: parallel}}\n    tool: {kind: playbook, path: boom}\n",
    )
    .expect("write");
    let (store, rt, pb) = start(
        &dir,
        "boom.yaml",
        RuntimeConfig {
            max_children: 40,
            ..Default::default()
        },
    )
    .await;
    let report = rt.run(pb, Map::new()).await.expect("run");
    assert_eq!(report.status, Status::Completed);
    let all = settled(store.as_ref()).await;
    assert!(
        all.len() <= 41,
        "at most the root and its 40 children exist: {}",
        all.len()
    );
    assert!(
        all.iter().any(|x| x.status == "failed"),
        "the child that hit the limit failed: {all:?}"
    );
}

/// A fire-and-forget playbook task inside a pipeline starts its child through the worker's
/// coordinator: the child runs, is listed under the parent, and later tasks see its id.
#[tokio::test]
async fn a_playbook_task_in_a_pipeline_starts_a_detached_child() {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::write(
        dir.path().join("parent.yaml"),
        "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {name: parent}\nworkflow:\n  - step: start\n    tool:\n      - {name: prep, kind: python, code: \"result = {'n': 4}\"}\n      - {name: go, kind: playbook, path: child, input: {n: \"{{ prep.n }}\"}}\n",
    )
    .expect("write");
    std::fs::write(
        dir.path().join("child.yaml"),
        "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {name: child}\nworkload: {n: 0}\nworkflow:\n  - step: start\n    tool: {kind: python, input: {n: \"{{ n }}\"}, code: \"result = n * 100\"}\n",
    )
    .expect("write");
    let (store, rt, pb) = start(&dir, "parent.yaml", RuntimeConfig::default()).await;
    let report = rt.run(pb, Map::new()).await.expect("run");
    assert_eq!(report.status, Status::Completed, "{:?}", report.error);
    assert_eq!(report.result["go"]["status"], "started");
    let child = mayfly_types::ExecutionId(
        report.result["go"]["execution_id"]
            .as_str()
            .expect("id")
            .to_owned(),
    );
    let done = rt.handle().wait(&child).await.expect("wait");
    assert_eq!(done.status, Status::Completed);
    assert_eq!(done.result, serde_json::json!(400));
    let row = store
        .list_executions(None, 10)
        .await
        .expect("list")
        .into_iter()
        .find(|x| x.execution_id == child)
        .expect("listed");
    assert_eq!(row.parent_execution_id.as_ref(), Some(&report.execution_id));
}

/// A waiting child's `timeout`: `return_step` gets NoETL's `{status: timeout, …}` success,
/// and the child is cancelled rather than left running with no one waiting for it.
#[tokio::test]
async fn a_child_wait_times_out_and_the_child_is_cancelled() {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::write(
        dir.path().join("parent.yaml"),
        "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {name: parent}\nworkflow:\n  - step: start\n    tool: {kind: playbook, path: child, return_step: true, timeout: 0.5}\n",
    )
    .expect("write");
    std::fs::write(
        dir.path().join("child.yaml"),
        "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {name: child}\nworkflow:\n  - step: start\n    tool: {kind: python, code: \"import time\\ntime.sleep(30)\"}\n",
    )
    .expect("write");
    let (_store, rt, pb) = start(&dir, "parent.yaml", RuntimeConfig::default()).await;
    let t = Instant::now();
    let report = rt.run(pb, Map::new()).await.expect("run");
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    assert_eq!(report.status, Status::Completed, "{:?}", report.error);
    assert_eq!(report.result["status"], "timeout");
    assert_eq!(report.result["timeout_seconds"], 0.5);
    let child = mayfly_types::ExecutionId(
        report.result["execution_id"]
            .as_str()
            .expect("id")
            .to_owned(),
    );
    let done = rt.handle().wait(&child).await.expect("wait");
    assert_eq!(done.status, Status::Cancelled);
}

/// A server's children come from the parent tenant's catalog, looked up off the appender:
/// a registered child runs (by its catalog path, at its latest version); a file beside the
/// parent on this host is never read; another tenant's catalog is not this tenant's.
#[tokio::test]
async fn catalog_children_come_from_the_tenants_catalog_only() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = Arc::new(
        SqliteStore::open(dir.path().join("m.db"))
            .await
            .expect("store"),
    );
    let register = |tenant: &'static str, src: &'static str| {
        let store = store.clone();
        async move {
            let pb = mayfly_dsl::parse("r.yaml", src, &ParseOptions::default()).expect("pb");
            store
                .register(
                    tenant,
                    mayfly_store::StoredPlaybook {
                        digest: pb.digest.clone(),
                        path: pb.path.clone(),
                        source_name: pb.path.clone(),
                        content: pb.source.clone(),
                    },
                )
                .await
                .expect("register");
        }
    };
    register(
        "acme",
        "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {name: scorer, path: shared/scorer}\nworkload: {n: 0}\nworkflow:\n  - step: start\n    tool: {kind: noop, result: {v: 1}}\n",
    )
    .await;
    // A newer version: the latest is the one that runs.
    register(
        "acme",
        "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {name: scorer, path: shared/scorer}\nworkload: {n: 0}\nworkflow:\n  - step: start\n    tool: {kind: noop, result: {v: 2, n: \"{{ n }}\"}}\n",
    )
    .await;
    register(
        "other",
        "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {name: theirs, path: other/only}\nworkflow:\n  - step: start\n    tool: {kind: noop}\n",
    )
    .await;
    // On this host's disk, beside where a parent "file" would be: never read.
    std::fs::write(
        dir.path().join("ondisk.yaml"),
        "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {name: ondisk}\nworkflow:\n  - step: start\n    tool: {kind: noop}\n",
    )
    .expect("write");
    let rt = Runtime::start(
        store.clone(),
        RuntimeConfig {
            children_from_catalog: true,
            ..Default::default()
        },
    )
    .expect("rt");
    let parent = |child: &str| {
        let src = format!(
            "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {{name: parent}}\nworkflow:\n  - step: start\n    tool: {{kind: playbook, path: {child}, return_result: true, input: {{n: 4}}}}\n"
        );
        let mut pb = mayfly_dsl::parse("parent.yaml", &src, &ParseOptions::default()).expect("pb");
        pb.file = dir.path().join("parent.yaml").display().to_string();
        Arc::new(pb)
    };
    let run = |pb: Arc<mayfly_dsl::Playbook>| {
        let h = rt.handle();
        async move {
            let id = h
                .start_as(pb, Map::new(), None, Some("acme".into()))
                .await
                .expect("start");
            h.wait(&id).await.expect("wait")
        }
    };
    let r = run(parent("shared/scorer")).await;
    assert_eq!(r.status, Status::Completed, "{:?}", r.error);
    assert_eq!(r.result, serde_json::json!({"v": 2, "n": 4}), "{r:?}");
    // A version by `@N` or by `version:` runs that version.
    let r = run(parent("shared/scorer@1")).await;
    assert_eq!(r.result, serde_json::json!({"v": 1}), "{r:?}");
    let r = run(parent("shared/scorer, version: 1")).await;
    assert_eq!(r.result, serde_json::json!({"v": 1}), "{r:?}");
    for (child, why) in [
        ("ondisk", "is not in tenant `acme`'s catalog"),
        ("other/only", "is not in tenant `acme`'s catalog"),
        (
            "shared/scorer@9",
            "`shared/scorer` version 9 is not in tenant `acme`'s catalog",
        ),
    ] {
        let r = run(parent(child)).await;
        let e = r.error.expect("refused");
        assert_eq!(
            (r.status, e.code.as_str()),
            (Status::Failed, "child_load_failed"),
            "{e:?}"
        );
        assert!(e.message.contains(why), "{child}: {}", e.message);
    }
}

/// `mayfly run` registers its playbook tree into a local catalog: children resolve there by
/// catalog path and version (kept across runs against one log), a child that is not there
/// is looked for beside its parent's file, and a version nothing registered is refused.
#[tokio::test]
async fn a_local_tree_is_a_catalog_with_versions() {
    let dir = tempfile::tempdir().expect("tmp");
    let child = |v: u32| {
        format!(
            "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {{name: child, path: lib/child}}\nworkflow:\n  - step: start\n    tool: {{kind: noop, result: {{v: {v}}}}}\n"
        )
    };
    std::fs::write(dir.path().join("child.yaml"), child(1)).expect("write");
    // Two files claiming one catalog path: neither is registered, and the run is told.
    for f in ["twin_a.yaml", "twin_b.yaml"] {
        std::fs::write(
            dir.path().join(f),
            "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {name: twin, path: lib/twin}\nworkflow:\n  - step: start\n    tool: {kind: noop}\n",
        )
        .expect("write");
    }
    let store = Arc::new(
        SqliteStore::open(dir.path().join("m.db"))
            .await
            .expect("store"),
    );
    let register = || async {
        mayfly_runtime::PlaybookIndex::scan(dir.path())
            .expect("scan")
            .register(store.as_ref(), "default")
            .await
            .expect("register")
    };
    let r = register().await;
    assert_eq!(r.ambiguous.len(), 1, "{r:?}");
    assert_eq!(r.ambiguous[0].0, "lib/twin");
    assert_eq!(r.entries.len(), 1, "{r:?}");
    assert!(r.entries[0].1, "a new version");
    // Unchanged: the same version again; changed: a new one.
    assert!(!register().await.entries[0].1);
    std::fs::write(dir.path().join("child.yaml"), child(2)).expect("write");
    let r = register().await;
    assert_eq!((r.entries[0].0.version, r.entries[0].1), (2, true));

    let rt = Runtime::start(store.clone(), RuntimeConfig::default()).expect("rt");
    let run = |child: &str| {
        let src = format!(
            "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {{name: parent}}\nworkflow:\n  - step: start\n    tool: {{kind: playbook, path: {child}, return_result: true}}\n"
        );
        let mut pb = mayfly_dsl::parse("parent.yaml", &src, &ParseOptions::default()).expect("pb");
        pb.file = dir.path().join("parent.yaml").display().to_string();
        let h = rt.handle();
        async move {
            let id = h
                .start(Arc::new(pb), Map::new(), None)
                .await
                .expect("start");
            h.wait(&id).await.expect("wait")
        }
    };
    for (child, v) in [
        ("lib/child", 2),
        ("lib/child, version: 1", 1),
        ("lib/child@2", 2),
        // Not a catalog path: the file beside the parent (as it is now).
        ("./child.yaml", 2),
    ] {
        let r = run(child).await;
        assert_eq!(r.status, Status::Completed, "{child}: {:?}", r.error);
        assert_eq!(r.result, serde_json::json!({"v": v}), "{child}");
    }
    for (child, why) in [
        (
            "lib/child, version: 9",
            "`lib/child` version 9 is not in the local catalog",
        ),
        (
            "nowhere",
            "is not in the local catalog, nor a file beside its parent",
        ),
        (
            "lib/twin",
            "is not in the local catalog, nor a file beside its parent",
        ),
    ] {
        let r = run(child).await;
        let e = r.error.expect("refused");
        assert_eq!(
            (r.status, e.code.as_str()),
            (Status::Failed, "child_load_failed"),
            "{e:?}"
        );
        assert!(e.message.contains(why), "{child}: {}", e.message);
    }
}
