//! A store whose every call answers within a time bound: what the gateway reads through, so
//! a store that is cut or blackholed gives a request a stable `root_unavailable` within the
//! bound instead of a hang (a query in flight on a connection that stopped answering would
//! otherwise wait for TCP to give up). Writes go through the appender, which has its own
//! recovery (a failed commit reloads from the log); this is for callers that can give up.

use crate::{
    Batch, CatalogEntry, CommandRow, ExecutionRow, SecretEntry, Store, StoreError, StoredPlaybook,
    TokenGrant,
};
use async_trait::async_trait;
use mayfly_types::{Event, ExecutionId};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// The default bound (connect, acquire and statement alike).
pub const DEFAULT_STORE_TIMEOUT: Duration = Duration::from_secs(2);

pub struct Bounded {
    inner: Arc<dyn Store>,
    timeout: Duration,
}

impl Bounded {
    pub fn new(inner: Arc<dyn Store>, timeout: Duration) -> Bounded {
        Bounded { inner, timeout }
    }

    async fn within<T>(
        &self,
        what: &str,
        f: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Unavailable(format!(
                "{what}: no answer within {} ms",
                self.timeout.as_millis()
            ))),
        }
    }
}

#[async_trait]
impl Store for Bounded {
    async fn log_id(&self) -> Result<String, StoreError> {
        self.within("log_id", self.inner.log_id()).await
    }
    async fn append(&self, batch: Arc<Batch>) -> Result<Option<u64>, StoreError> {
        self.within("append", self.inner.append(batch)).await
    }
    async fn read(
        &self,
        execution: &ExecutionId,
        from_seq: u64,
        limit: u32,
    ) -> Result<Vec<Event>, StoreError> {
        self.within("read", self.inner.read(execution, from_seq, limit))
            .await
    }
    async fn read_all(&self, execution: &ExecutionId) -> Result<Vec<Event>, StoreError> {
        self.within("read", self.inner.read_all(execution)).await
    }
    async fn put_playbook(&self, pb: StoredPlaybook) -> Result<(), StoreError> {
        self.within("put_playbook", self.inner.put_playbook(pb))
            .await
    }
    async fn get_playbook(&self, digest: &str) -> Result<Option<StoredPlaybook>, StoreError> {
        self.within("get_playbook", self.inner.get_playbook(digest))
            .await
    }
    async fn get_execution(
        &self,
        execution: &ExecutionId,
    ) -> Result<Option<ExecutionRow>, StoreError> {
        self.within("get_execution", self.inner.get_execution(execution))
            .await
    }
    async fn list_executions(
        &self,
        tenant: Option<&str>,
        limit: u32,
    ) -> Result<Vec<ExecutionRow>, StoreError> {
        self.within("list_executions", self.inner.list_executions(tenant, limit))
            .await
    }
    async fn retained_cache_refs(
        &self,
        finished_before: u64,
    ) -> Result<Vec<(String, String)>, StoreError> {
        self.within(
            "retained_cache_refs",
            self.inner.retained_cache_refs(finished_before),
        )
        .await
    }
    async fn put_token(&self, hash: &str, grant: &TokenGrant) -> Result<(), StoreError> {
        self.within("put_token", self.inner.put_token(hash, grant))
            .await
    }
    async fn find_token(&self, hash: &str) -> Result<Option<TokenGrant>, StoreError> {
        self.within("find_token", self.inner.find_token(hash)).await
    }
    async fn count_tokens(&self) -> Result<u64, StoreError> {
        self.within("count_tokens", self.inner.count_tokens()).await
    }
    async fn list_audit(
        &self,
        tenant: Option<&str>,
        limit: u32,
    ) -> Result<Vec<crate::AuditRecord>, StoreError> {
        self.within("list_audit", self.inner.list_audit(tenant, limit))
            .await
    }
    async fn open_commands(
        &self,
        execution: Option<&ExecutionId>,
    ) -> Result<Vec<CommandRow>, StoreError> {
        self.within("open_commands", self.inner.open_commands(execution))
            .await
    }
    async fn register(
        &self,
        tenant: &str,
        pb: StoredPlaybook,
    ) -> Result<(CatalogEntry, bool), StoreError> {
        self.within("register", self.inner.register(tenant, pb))
            .await
    }
    async fn resolve(
        &self,
        tenant: &str,
        path: &str,
        version: Option<u32>,
    ) -> Result<Option<(CatalogEntry, StoredPlaybook)>, StoreError> {
        self.within("resolve", self.inner.resolve(tenant, path, version))
            .await
    }
    async fn list_catalog(&self, tenant: &str) -> Result<Vec<CatalogEntry>, StoreError> {
        self.within("list_catalog", self.inner.list_catalog(tenant))
            .await
    }
    async fn get_secret(&self, tenant: &str, alias: &str) -> Result<Option<String>, StoreError> {
        self.within("get_secret", self.inner.get_secret(tenant, alias))
            .await
    }
    async fn list_secrets(&self, tenant: &str) -> Result<Vec<SecretEntry>, StoreError> {
        self.within("list_secrets", self.inner.list_secrets(tenant))
            .await
    }
    async fn head(&self) -> Result<u64, StoreError> {
        self.within("head", self.inner.head()).await
    }
    async fn read_since(&self, after: u64, limit: u32) -> Result<Vec<Event>, StoreError> {
        self.within("read_since", self.inner.read_since(after, limit))
            .await
    }
}
