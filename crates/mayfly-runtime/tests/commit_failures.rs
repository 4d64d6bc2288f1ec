//! Group commits that fail under a python fan-out: a store whose appends are slow (so
//! claims and completions race with them) and fail one at a time loses and duplicates
//! nothing. The orchestrator forgets what a failed group touched (its in-memory state ran
//! ahead of the log), reloads those executions from the log, and the fan-out completes
//! with one `step.finished` per item and a chain that verifies.

use async_trait::async_trait;
use mayfly_dsl::{ParseOptions, parse};
use mayfly_engine::Status;
use mayfly_runtime::{Runtime, RuntimeConfig};
use mayfly_store::{
    AuditRecord, Batch, CatalogEntry, CommandRow, ExecutionRow, SecretEntry, SqliteStore, Store,
    StoreError, StoredPlaybook, TokenGrant,
};
use mayfly_types::{Event, EventKind, ExecutionId};
use serde_json::Map;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// SQLite behind appends that take a few milliseconds; the next `fail` of them fail.
struct Flaky {
    inner: Arc<SqliteStore>,
    fail: AtomicUsize,
    failed: AtomicUsize,
}

#[async_trait]
impl Store for Flaky {
    async fn log_id(&self) -> Result<String, StoreError> {
        self.inner.log_id().await
    }
    async fn append(&self, batch: Arc<Batch>) -> Result<Option<u64>, StoreError> {
        tokio::time::sleep(Duration::from_millis(3)).await;
        let take = self
            .fail
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if take.is_ok() {
            self.failed.fetch_add(1, Ordering::SeqCst);
            return Err(StoreError::Db("the database went away (test)".into()));
        }
        self.inner.append(batch).await
    }
    async fn read(
        &self,
        execution: &ExecutionId,
        from_seq: u64,
        limit: u32,
    ) -> Result<Vec<Event>, StoreError> {
        self.inner.read(execution, from_seq, limit).await
    }
    async fn get_playbook(&self, digest: &str) -> Result<Option<StoredPlaybook>, StoreError> {
        self.inner.get_playbook(digest).await
    }
    async fn get_execution(
        &self,
        execution: &ExecutionId,
    ) -> Result<Option<ExecutionRow>, StoreError> {
        self.inner.get_execution(execution).await
    }
    async fn list_executions(
        &self,
        tenant: Option<&str>,
        limit: u32,
    ) -> Result<Vec<ExecutionRow>, StoreError> {
        self.inner.list_executions(tenant, limit).await
    }
    async fn retained_cache_refs(
        &self,
        finished_before: u64,
    ) -> Result<Vec<(String, String)>, StoreError> {
        self.inner.retained_cache_refs(finished_before).await
    }
    async fn put_token(&self, hash: &str, grant: &TokenGrant) -> Result<(), StoreError> {
        self.inner.put_token(hash, grant).await
    }
    async fn find_token(&self, hash: &str) -> Result<Option<TokenGrant>, StoreError> {
        self.inner.find_token(hash).await
    }
    async fn count_tokens(&self) -> Result<u64, StoreError> {
        self.inner.count_tokens().await
    }
    async fn list_audit(
        &self,
        tenant: Option<&str>,
        limit: u32,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        self.inner.list_audit(tenant, limit).await
    }
    async fn open_commands(
        &self,
        execution: Option<&ExecutionId>,
    ) -> Result<Vec<CommandRow>, StoreError> {
        self.inner.open_commands(execution).await
    }
    async fn register(
        &self,
        tenant: &str,
        pb: StoredPlaybook,
    ) -> Result<(CatalogEntry, bool), StoreError> {
        self.inner.register(tenant, pb).await
    }
    async fn resolve(
        &self,
        tenant: &str,
        path: &str,
        version: Option<u32>,
    ) -> Result<Option<(CatalogEntry, StoredPlaybook)>, StoreError> {
        self.inner.resolve(tenant, path, version).await
    }
    async fn list_catalog(&self, tenant: &str) -> Result<Vec<CatalogEntry>, StoreError> {
        self.inner.list_catalog(tenant).await
    }
    async fn get_secret(&self, tenant: &str, alias: &str) -> Result<Option<String>, StoreError> {
        self.inner.get_secret(tenant, alias).await
    }
    async fn list_secrets(&self, tenant: &str) -> Result<Vec<SecretEntry>, StoreError> {
        self.inner.list_secrets(tenant).await
    }
    async fn head(&self) -> Result<u64, StoreError> {
        self.inner.head().await
    }
    async fn read_since(&self, after: u64, limit: u32) -> Result<Vec<Event>, StoreError> {
        self.inner.read_since(after, limit).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_group_commits_under_a_fan_out_lose_and_duplicate_nothing() {
    let dir = tempfile::tempdir().expect("tmp");
    let inner = Arc::new(
        SqliteStore::open(dir.path().join("m.db"))
            .await
            .expect("store"),
    );
    let store = Arc::new(Flaky {
        inner: inner.clone(),
        fail: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
    });
    let cfg = RuntimeConfig {
        workers: 16,
        ..Default::default()
    };
    let rt = Runtime::start(store.clone(), cfg).expect("runtime");
    let src = "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {name: flaky}\nworkflow:\n  - step: start\n    loop: {in: \"{{ range(300) }}\", iterator: i, spec: {mode: parallel, max_in_flight: 32}}\n    tool: {kind: python, input: {i: \"{{ i }}\"}, code: 'result = i * 2'}\n";
    let pb = parse("flaky.yaml", src, &ParseOptions::default()).expect("pb");
    let h = rt.handle();
    let id = h
        .start(Arc::new(pb), Map::new(), None)
        .await
        .expect("start");
    let finished = |evs: &[Event]| {
        evs.iter()
            .filter(|e| e.kind == EventKind::StepFinished)
            .count()
    };
    let began = Instant::now();
    while finished(&inner.read_all(&id).await.expect("events")) < 60 {
        assert!(
            began.elapsed() < Duration::from_secs(60),
            "the fan-out never got going"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // One commit fails at a time, with items in flight and the next group forming.
    for round in 1..=5 {
        store.fail.store(1, Ordering::SeqCst);
        while store.failed.load(Ordering::SeqCst) < round {
            assert!(
                began.elapsed() < Duration::from_secs(60),
                "no commit to fail"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tokio::time::sleep(Duration::from_millis(60)).await;
    }

    let report = loop {
        if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(5), h.wait(&id)).await
            && r.status.is_terminal()
        {
            break r;
        }
        assert!(
            began.elapsed() < Duration::from_secs(120),
            "never completed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(report.status, Status::Completed, "{:?}", report.error);
    let evs = inner.read_all(&id).await.expect("events");
    mayfly_trust::verify_chain(&evs).expect("the chain verifies");
    let mut per_index: BTreeMap<u64, Vec<&Event>> = BTreeMap::new();
    for e in evs.iter().filter(|e| e.kind == EventKind::StepFinished) {
        let i = e.payload["index"].as_u64().expect("an item's index");
        per_index.entry(i).or_default().push(e);
    }
    assert_eq!(per_index.len(), 300, "every item finished");
    for (i, fs) in &per_index {
        assert_eq!(fs.len(), 1, "item {i} finished {} times", fs.len());
        assert_eq!(fs[0].payload["result"], serde_json::json!(i * 2));
    }
    drop(rt);
}
