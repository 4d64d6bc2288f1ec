//! The system of record: the append-only event log, the playbook catalog (immutable,
//! content-addressed versions) and the durable command table that backs the embedded
//! queue (transactional outbox with leases).
//!
//! Backends implement [`Store`]; every backend must pass [`conformance`].

use async_trait::async_trait;
use mayfly_types::{Event, ExecutionId};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

mod bounded;
mod common;
pub mod conformance;
mod postgres;
mod sqlite;

pub use bounded::{Bounded, DEFAULT_STORE_TIMEOUT};
pub use postgres::{AppenderLock, PostgresStore};
pub use sqlite::SqliteStore;

/// Open a store from a location: `postgres://…` / `postgresql://…` for Postgres (a
/// `schema=NAME` query parameter keeps every table in that schema, created if missing),
/// anything else is a SQLite file path.
pub async fn open(location: &str) -> Result<Arc<dyn Store>, StoreError> {
    if location.starts_with("postgres://") || location.starts_with("postgresql://") {
        match split_schema(location) {
            (url, Some(schema)) => Ok(Arc::new(
                PostgresStore::connect_schema(&url, &schema).await?,
            )),
            (url, None) => Ok(Arc::new(PostgresStore::connect(&url).await?)),
        }
    } else {
        Ok(Arc::new(SqliteStore::open(location).await?))
    }
}

/// Open the log at `location` as its appender: like [`open`], and for Postgres also
/// [`PostgresStore::take_over`] (appends are fenced by the epoch it takes). Hold the
/// [`AppenderLock`] first; SQLite's single-process lock is the caller's file lock.
pub async fn open_as_appender(location: &str) -> Result<Arc<dyn Store>, StoreError> {
    if location.starts_with("postgres://") || location.starts_with("postgresql://") {
        let store = match split_schema(location) {
            (url, Some(schema)) => PostgresStore::connect_schema(&url, &schema).await?,
            (url, None) => PostgresStore::connect(&url).await?,
        };
        let epoch = store.take_over().await?;
        tracing::info!(epoch, "appender of the postgres log");
        Ok(Arc::new(store))
    } else {
        open(location).await
    }
}

/// Take the appender lock of the Postgres log at `location` (a `postgres://` URL, with an
/// optional `?schema=`); see [`AppenderLock`].
pub async fn lock_appender(location: &str) -> Result<AppenderLock, StoreError> {
    let (url, schema) = split_schema(location);
    AppenderLock::acquire(&url, schema.as_deref(), std::time::Duration::from_secs(5)).await
}

/// Take `schema=…` out of a Postgres URL's query string.
fn split_schema(url: &str) -> (String, Option<String>) {
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_owned(), None);
    };
    let mut schema = None;
    let rest: Vec<&str> = query
        .split('&')
        .filter(|kv| match kv.strip_prefix("schema=") {
            Some(v) => {
                schema = Some(v.to_owned());
                false
            }
            None => !kv.is_empty(),
        })
        .collect();
    let url = if rest.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", rest.join("&"))
    };
    (url, schema)
}

#[cfg(test)]
mod error_tests {
    use super::StoreError;

    #[test]
    fn a_store_that_cannot_be_reached_is_unavailable_not_an_error() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        for e in [
            sqlx::Error::Io(io),
            sqlx::Error::PoolTimedOut,
            sqlx::Error::PoolClosed,
            sqlx::Error::WorkerCrashed,
        ] {
            assert!(StoreError::from(e).is_unavailable());
        }
        for e in [
            sqlx::Error::RowNotFound,
            sqlx::Error::ColumnNotFound("x".into()),
        ] {
            assert!(!StoreError::from(e).is_unavailable());
        }
    }
}

#[cfg(test)]
mod url_tests {
    #[test]
    fn schema_is_taken_out_of_the_query() {
        let s = super::split_schema;
        assert_eq!(s("postgres://h/db"), ("postgres://h/db".into(), None));
        assert_eq!(
            s("postgres://h/db?schema=t1"),
            ("postgres://h/db".into(), Some("t1".into()))
        );
        assert_eq!(
            s("postgres://h/db?sslmode=disable&schema=t1&application_name=x"),
            (
                "postgres://h/db?sslmode=disable&application_name=x".into(),
                Some("t1".into())
            )
        );
    }
}

/// Store failures. `Conflict` means an optimistic-concurrency check failed (another
/// appender got there first); nothing of the batch was written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
    #[error("database error: {0}")]
    Db(String),
    #[error("the store is closed")]
    Closed,
    /// Another process took over the log (a higher appender epoch): this one writes nothing.
    #[error("fenced: {0}")]
    Fenced(String),
    /// The store cannot be reached (connection refused, reset or timed out, the pool has no
    /// connection to give, the server is shutting down): the request may succeed later.
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
}

impl StoreError {
    /// The store could not be reached (as opposed to answering with an error).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        if let sqlx::Error::Database(d) = &e {
            if d.is_unique_violation() {
                return StoreError::Conflict(d.message().to_owned());
            }
            match d.code().as_deref() {
                // Raised by Postgres' `mayfly_append` (migration 0010).
                Some("MF001") => return StoreError::Fenced(d.message().to_owned()),
                Some("MF002") => return StoreError::Conflict(d.message().to_owned()),
                // Connection exceptions; the server shutting down or not accepting yet.
                Some(c) if c.starts_with("08") || matches!(c, "57P01" | "57P02" | "57P03") => {
                    return StoreError::Unavailable(d.message().to_owned());
                }
                _ => {}
            }
        }
        match e {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => StoreError::Unavailable(e.to_string()),
            e => StoreError::Db(e.to_string()),
        }
    }
}

/// A change to the durable command table, committed atomically with events.
#[derive(Clone, Debug, PartialEq)]
pub enum CommandOp {
    /// A new command (its `command.issued` event is in the same batch).
    Insert {
        command_id: String,
        execution_id: ExecutionId,
        step: String,
        index: Option<usize>,
    },
    /// A worker claimed it until `lease_until` (unix ms).
    Claim {
        command_id: String,
        worker: String,
        lease_until: u64,
        deliveries: u32,
    },
    /// Lease extension for a long block (no event).
    Extend {
        command_id: String,
        lease_until: u64,
    },
    /// Completed (its `command.completed` event is in the same batch): the row is removed,
    /// the table holds open commands only. Claiming it afterwards conflicts.
    Done { command_id: String },
}

/// One atomic unit: events (already sealed) plus command-table changes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Batch {
    pub events: Vec<Event>,
    pub commands: Vec<CommandOp>,
    /// Playbook versions to store (idempotent by digest).
    pub playbooks: Vec<StoredPlaybook>,
    /// Keychain changes (values are already sealed).
    pub secrets: Vec<SecretOp>,
    /// New API tokens: (sha256 of the token, grant). The token itself is never stored.
    pub tokens: Vec<(String, TokenGrant)>,
    /// Audit records (append-only).
    pub audit: Vec<AuditRecord>,
    /// Ranges of a stream's events to delete — compaction, after a snapshot event that
    /// summarizes them was appended (in this batch or an earlier one). The only way events
    /// ever leave the log.
    pub compact: Vec<Compaction>,
}

/// Delete the events of `execution_id` with `from_seq <= seq <= through_seq`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compaction {
    pub execution_id: ExecutionId,
    pub from_seq: u64,
    pub through_seq: u64,
}

/// One audit record: who tried what, and what became of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Assigned by the store (0 before it is stored).
    pub id: u64,
    pub at_ms: u64,
    /// The caller's tenant (None: the caller was not authenticated).
    pub tenant: Option<String>,
    /// The token's name.
    pub actor: Option<String>,
    /// `METHOD /path`.
    pub action: String,
    /// `unauthenticated`, `forbidden`, `cross_tenant`, …
    pub outcome: String,
    pub detail: String,
    pub request_id: String,
}

/// What an API token grants: a role within one tenant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenGrant {
    pub tenant: String,
    pub role: String,
    pub name: String,
}

/// One catalog version of a playbook.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogEntry {
    pub path: String,
    pub version: u32,
    pub digest: String,
    pub created_at: u64,
}

/// A keychain change. The store only ever sees sealed values.
#[derive(Clone, Debug, PartialEq)]
pub enum SecretOp {
    Put {
        tenant: String,
        alias: String,
        sealed: String,
    },
    Delete {
        tenant: String,
        alias: String,
    },
}

/// A keychain entry as listed (never the value).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SecretEntry {
    pub alias: String,
    pub updated_at: u64,
}

/// A command that is not done yet.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CommandRow {
    pub command_id: String,
    pub execution_id: ExecutionId,
    pub step: String,
    pub index: Option<usize>,
    /// `pending` or `claimed`.
    pub state: String,
    pub deliveries: u32,
    pub lease_until: Option<u64>,
    pub worker: Option<String>,
}

/// A stored playbook version.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredPlaybook {
    pub digest: String,
    pub path: String,
    pub source_name: String,
    pub content: String,
}

/// Execution projection row.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExecutionRow {
    pub execution_id: ExecutionId,
    pub path: String,
    pub playbook_digest: String,
    pub status: String,
    pub parent_execution_id: Option<ExecutionId>,
    pub tenant: String,
    pub created_at: u64,
    pub updated_at: u64,
}

/// The storage contract every backend implements.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The log's identity: 32 lowercase hex digits, random, created with the log and never
    /// changed (a copy of the log is the same log). It scopes the log's command channel.
    async fn log_id(&self) -> Result<String, StoreError>;

    /// Append batches atomically, each all-or-nothing. Backends may commit several
    /// concurrent callers' batches in one transaction (group commit); a failing batch
    /// never takes others down with it. Returns the global position of the last event.
    async fn append(&self, batch: Arc<Batch>) -> Result<Option<u64>, StoreError>;

    /// Events of one execution with `seq >= from_seq`, in seq order, at most `limit`.
    async fn read(
        &self,
        execution: &ExecutionId,
        from_seq: u64,
        limit: u32,
    ) -> Result<Vec<Event>, StoreError>;

    /// Every event of one execution.
    async fn read_all(&self, execution: &ExecutionId) -> Result<Vec<Event>, StoreError> {
        let mut out = Vec::new();
        loop {
            let from = out.last().map(|e: &Event| e.seq + 1).unwrap_or(1);
            let page = self.read(execution, from, 10_000).await?;
            let done = page.len() < 10_000;
            out.extend(page);
            if done {
                return Ok(out);
            }
        }
    }

    /// Store a playbook version (idempotent by digest).
    async fn put_playbook(&self, pb: StoredPlaybook) -> Result<(), StoreError> {
        self.append(Arc::new(Batch {
            playbooks: vec![pb],
            ..Default::default()
        }))
        .await
        .map(|_| ())
    }
    async fn get_playbook(&self, digest: &str) -> Result<Option<StoredPlaybook>, StoreError>;

    async fn get_execution(
        &self,
        execution: &ExecutionId,
    ) -> Result<Option<ExecutionRow>, StoreError>;
    /// Most recent first; only `tenant`'s when given.
    async fn list_executions(
        &self,
        tenant: Option<&str>,
        limit: u32,
    ) -> Result<Vec<ExecutionRow>, StoreError>;

    /// `(tenant, digest)` of every shared-cache payload named by the events of an execution
    /// that is still live or ended at or after `finished_before` (unix ms), or that descends
    /// from such an execution: what cache retention must keep.
    async fn retained_cache_refs(
        &self,
        finished_before: u64,
    ) -> Result<Vec<(String, String)>, StoreError>;

    /// Store a token grant under the token's hash.
    async fn put_token(&self, hash: &str, grant: &TokenGrant) -> Result<(), StoreError>;
    /// The grant of a token hash.
    async fn find_token(&self, hash: &str) -> Result<Option<TokenGrant>, StoreError>;
    /// How many tokens exist (0 = the server must bootstrap an admin token).
    async fn count_tokens(&self) -> Result<u64, StoreError>;
    /// Audit records, most recent first: one tenant's, or every one (None).
    async fn list_audit(
        &self,
        tenant: Option<&str>,
        limit: u32,
    ) -> Result<Vec<AuditRecord>, StoreError>;

    /// Commands not done yet (optionally of one execution), oldest first.
    async fn open_commands(
        &self,
        execution: Option<&ExecutionId>,
    ) -> Result<Vec<CommandRow>, StoreError>;

    /// Register `pb` in `tenant`'s catalog under `pb.path`: a new immutable version, or the
    /// existing one when identical content was registered before (returned with `false`).
    async fn register(
        &self,
        tenant: &str,
        pb: StoredPlaybook,
    ) -> Result<(CatalogEntry, bool), StoreError>;
    /// A catalog version (the latest when `version` is None) with its content.
    async fn resolve(
        &self,
        tenant: &str,
        path: &str,
        version: Option<u32>,
    ) -> Result<Option<(CatalogEntry, StoredPlaybook)>, StoreError>;
    /// Every version in a tenant's catalog, by path then version.
    async fn list_catalog(&self, tenant: &str) -> Result<Vec<CatalogEntry>, StoreError>;

    /// The sealed value of a keychain alias.
    async fn get_secret(&self, tenant: &str, alias: &str) -> Result<Option<String>, StoreError>;
    /// Aliases of a tenant, sorted (values are never listed).
    async fn list_secrets(&self, tenant: &str) -> Result<Vec<SecretEntry>, StoreError>;

    /// The current global log position (0 when empty).
    async fn head(&self) -> Result<u64, StoreError>;

    /// Events of every execution with `position > after`, in position order, at most
    /// `limit`. A tail that repeats this with the last position it saw never skips an event,
    /// even when appenders commit concurrently.
    async fn read_since(&self, after: u64, limit: u32) -> Result<Vec<Event>, StoreError>;
}
