//! What every SQL backend shares: the group-commit writer loop and row decoding.

use crate::{AuditRecord, Batch, CatalogEntry, ExecutionRow, StoreError};
use mayfly_types::{Event, EventKind, ExecutionId};
use sqlx::{ColumnIndex, Decode, Row, Type};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// Most batches folded into one transaction.
pub(crate) const MAX_GROUP: usize = 512;

/// One caller's batch waiting for the writer.
pub(crate) struct Job {
    pub(crate) batch: Arc<Batch>,
    pub(crate) reply: oneshot::Sender<Result<Option<u64>, StoreError>>,
}

/// A backend's "commit these batches in one transaction".
pub(crate) trait GroupWriter: Send + 'static {
    fn write_group(
        &mut self,
        jobs: &[Job],
    ) -> impl std::future::Future<Output = Result<Vec<Option<u64>>, StoreError>> + Send;
}

/// A row type from which events and executions can be decoded (SQLite and Postgres rows).
pub(crate) trait DbRow {
    fn i64(&self, col: &str) -> Result<i64, StoreError>;
    fn opt_i64(&self, col: &str) -> Result<Option<i64>, StoreError>;
    fn string(&self, col: &str) -> Result<String, StoreError>;
    fn opt_string(&self, col: &str) -> Result<Option<String>, StoreError>;
}

impl<R> DbRow for R
where
    R: Row,
    for<'a> &'a str: ColumnIndex<R>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
{
    fn i64(&self, col: &str) -> Result<i64, StoreError> {
        Ok(self.try_get::<i64, _>(col)?)
    }
    fn opt_i64(&self, col: &str) -> Result<Option<i64>, StoreError> {
        Ok(self.try_get::<Option<i64>, _>(col)?)
    }
    fn string(&self, col: &str) -> Result<String, StoreError> {
        Ok(self.try_get::<String, _>(col)?)
    }
    fn opt_string(&self, col: &str) -> Result<Option<String>, StoreError> {
        Ok(self.try_get::<Option<String>, _>(col)?)
    }
}

pub(crate) async fn writer_loop<W: GroupWriter>(mut conn: W, mut rx: mpsc::Receiver<Job>) {
    while let Some(first) = rx.recv().await {
        let mut jobs = vec![first];
        while jobs.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        match conn.write_group(&jobs).await {
            Ok(positions) => {
                for (job, pos) in jobs.into_iter().zip(positions) {
                    let _ = job.reply.send(Ok(pos));
                }
            }
            Err(_) if jobs.len() > 1 => {
                // Isolate the failing batch: every other caller still gets its commit.
                for job in jobs {
                    let r = conn
                        .write_group(std::slice::from_ref(&job))
                        .await
                        .map(|mut p| p.pop().flatten());
                    let _ = job.reply.send(r);
                }
            }
            Err(e) => {
                if let Some(job) = jobs.pop() {
                    let _ = job.reply.send(Err(e));
                }
            }
        }
    }
}

/// What an event changes in the executions projection (both backends project the same).
pub(crate) enum Projection<'a> {
    /// A new execution row, `pending`.
    Requested {
        path: &'a str,
        parent: Option<&'a str>,
        tenant: &'a str,
    },
    /// The execution's new status.
    Status(&'static str),
}

pub(crate) fn projection(e: &Event) -> Option<Projection<'_>> {
    Some(match e.kind {
        EventKind::ExecutionRequested => {
            let p = &e.payload;
            Projection::Requested {
                path: p.get("path").and_then(|v| v.as_str()).unwrap_or_default(),
                // A fire-and-forget child lists under the execution that started it.
                parent: p
                    .get("parent")
                    .or(p.get("origin"))
                    .and_then(|v| v.get("execution_id"))
                    .and_then(|v| v.as_str()),
                tenant: p
                    .get("tenant")
                    .and_then(|t| t.as_str())
                    .unwrap_or(mayfly_types::DEFAULT_TENANT),
            }
        }
        EventKind::ExecutionStarted => Projection::Status("running"),
        EventKind::ExecutionCompleted => Projection::Status("completed"),
        EventKind::ExecutionFailed => Projection::Status("failed"),
        EventKind::ExecutionCancelled => Projection::Status("cancelled"),
        _ => return None,
    })
}

pub(crate) fn opt_u64(v: Option<i64>) -> Option<u64> {
    v.map(|x| x as u64)
}

pub(crate) fn row_to_event<R: DbRow>(r: &R) -> Result<Event, StoreError> {
    let seq = r.i64("seq")?;
    let execution_id = r.string("execution_id")?;
    let kind_s = r.string("kind")?;
    let kind = EventKind::parse(&kind_s).ok_or_else(|| {
        StoreError::Corrupt(format!(
            "execution {execution_id} seq {seq}: unknown event kind `{kind_s}`"
        ))
    })?;
    let payload_s = r.string("payload")?;
    let payload = serde_json::from_str(&payload_s).map_err(|e| {
        StoreError::Corrupt(format!(
            "execution {execution_id} seq {seq}: payload is not JSON: {e}"
        ))
    })?;
    Ok(Event {
        execution_id: ExecutionId(execution_id),
        seq: seq as u64,
        kind,
        step: r.opt_string("step")?,
        attempt: r.opt_i64("attempt")?.map(|a| a as u32),
        command_id: r.opt_string("command_id")?,
        at: r.i64("at")? as u64,
        actor: r.string("actor")?,
        request_id: r.opt_string("request_id")?,
        playbook_digest: r.string("playbook_digest")?,
        payload,
        payload_ref: r.opt_string("payload_ref")?,
        prev_hash: r.string("prev_hash")?,
        hash: r.string("hash")?,
        position: opt_u64(r.opt_i64("position")?),
    })
}

pub(crate) fn row_to_execution<R: DbRow>(r: &R) -> Result<ExecutionRow, StoreError> {
    Ok(ExecutionRow {
        execution_id: ExecutionId(r.string("execution_id")?),
        path: r.string("path")?,
        playbook_digest: r.string("playbook_digest")?,
        status: r.string("status")?,
        parent_execution_id: r.opt_string("parent_execution_id")?.map(ExecutionId),
        tenant: r.string("tenant")?,
        created_at: r.i64("created_at")? as u64,
        updated_at: r.i64("updated_at")? as u64,
    })
}

pub(crate) fn catalog_row<R: DbRow>(r: &R) -> Result<CatalogEntry, StoreError> {
    Ok(CatalogEntry {
        path: r.string("path")?,
        version: r.i64("version")? as u32,
        digest: r.string("digest")?,
        created_at: r.i64("created_at")? as u64,
    })
}

pub(crate) fn audit_row<R: DbRow>(r: &R) -> Result<AuditRecord, StoreError> {
    Ok(AuditRecord {
        id: r.i64("id")? as u64,
        at_ms: r.i64("at_ms")? as u64,
        tenant: r.opt_string("tenant")?,
        actor: r.opt_string("actor")?,
        action: r.string("action")?,
        outcome: r.string("outcome")?,
        detail: r.string("detail")?,
        request_id: r.string("request_id")?,
    })
}

/// `impl Store` for a backend: the methods whose SQL is the same on SQLite and Postgres
/// (sqlx binds `$N` on both) are written once here, the backend's own ones passed in; `$order` is the column that keeps
/// open commands in insertion order (`rowid` / `ord`). Only the write path and catalog
/// registration (locking differs) are written per backend.
macro_rules! store_impl {
    ($ty:ty, $order:literal, { $($own:tt)* }) => {
        #[async_trait::async_trait]
        impl $crate::Store for $ty {
            $($own)*
    async fn log_id(&self) -> Result<String, StoreError> {
        let row = sqlx::query("SELECT log_id FROM log_identity WHERE id = 1")
            .fetch_one(&self.read)
            .await?;
        Ok(row.try_get("log_id")?)
    }
    async fn append(&self, batch: Arc<Batch>) -> Result<Option<u64>, StoreError> {
        if batch.events.is_empty()
            && batch.commands.is_empty()
            && batch.playbooks.is_empty()
            && batch.secrets.is_empty()
            && batch.tokens.is_empty()
            && batch.audit.is_empty()
            && batch.compact.is_empty()
        {
            return Ok(None);
        }
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job { batch, reply })
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }
    async fn read(
        &self,
        execution: &ExecutionId,
        from_seq: u64,
        limit: u32,
    ) -> Result<Vec<Event>, StoreError> {
        let rows = sqlx::query(
            "SELECT * FROM events WHERE execution_id = $1 AND seq >= $2 ORDER BY seq LIMIT $3",
        )
        .bind(&execution.0)
        .bind(from_seq as i64)
        .bind(i64::from(limit))
        .fetch_all(&self.read)
        .await?;
        rows.iter().map(row_to_event).collect()
    }
    async fn get_playbook(&self, digest: &str) -> Result<Option<StoredPlaybook>, StoreError> {
        let row = sqlx::query(
            "SELECT digest, path, source_name, content FROM playbooks WHERE digest = $1",
        )
        .bind(digest)
        .fetch_optional(&self.read)
        .await?;
        match row {
            None => Ok(None),
            Some(r) => Ok(Some(StoredPlaybook {
                digest: r.try_get("digest")?,
                path: r.try_get("path")?,
                source_name: r.try_get("source_name")?,
                content: r.try_get("content")?,
            })),
        }
    }
    async fn get_execution(
        &self,
        execution: &ExecutionId,
    ) -> Result<Option<ExecutionRow>, StoreError> {
        let row = sqlx::query("SELECT * FROM executions WHERE execution_id = $1")
            .bind(&execution.0)
            .fetch_optional(&self.read)
            .await?;
        row.as_ref().map(row_to_execution).transpose()
    }
    async fn list_executions(
        &self,
        tenant: Option<&str>,
        limit: u32,
    ) -> Result<Vec<ExecutionRow>, StoreError> {
        let rows = match tenant {
            Some(t) => sqlx::query("SELECT * FROM executions WHERE tenant = $1 ORDER BY created_at DESC, execution_id DESC LIMIT $2").bind(t).bind(i64::from(limit)).fetch_all(&self.read).await?,
            None => sqlx::query("SELECT * FROM executions ORDER BY created_at DESC, execution_id DESC LIMIT $1").bind(i64::from(limit)).fetch_all(&self.read).await?,
        };
        rows.iter().map(row_to_execution).collect()
    }
    async fn retained_cache_refs(
        &self,
        finished_before: u64,
    ) -> Result<Vec<(String, String)>, StoreError> {
        // Retained: live or recently ended executions, and every descendant of one (a parent
        // holds its child's result, which may be a ref to refs only the child's events name).
        let rows = sqlx::query(
            "WITH RECURSIVE kept (execution_id) AS ( \
                 SELECT execution_id FROM executions \
                 WHERE status NOT IN ('completed', 'failed', 'cancelled') OR updated_at >= $1 \
               UNION \
                 SELECT c.execution_id FROM executions c JOIN kept k ON c.parent_execution_id = k.execution_id) \
             SELECT DISTINCT x.tenant, r.digest FROM kept k \
             JOIN cache_refs r ON r.execution_id = k.execution_id \
             JOIN executions x ON x.execution_id = k.execution_id",
        )
        .bind(finished_before as i64)
        .fetch_all(&self.read)
        .await?;
        rows.iter()
            .map(|r| Ok((r.string("tenant")?, r.string("digest")?)))
            .collect()
    }
    async fn put_token(&self, hash: &str, grant: &TokenGrant) -> Result<(), StoreError> {
        self.append(Arc::new(Batch {
            tokens: vec![(hash.to_owned(), grant.clone())],
            ..Default::default()
        }))
        .await
        .map(|_| ())
    }
    async fn find_token(&self, hash: &str) -> Result<Option<TokenGrant>, StoreError> {
        let row = sqlx::query("SELECT tenant, role, name FROM tokens WHERE hash = $1")
            .bind(hash)
            .fetch_optional(&self.read)
            .await?;
        Ok(match row {
            Some(r) => Some(TokenGrant {
                tenant: r.try_get("tenant")?,
                role: r.try_get("role")?,
                name: r.try_get("name")?,
            }),
            None => None,
        })
    }
    async fn list_audit(
        &self,
        tenant: Option<&str>,
        limit: u32,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        let rows = match tenant {
            Some(t) => {
                sqlx::query("SELECT * FROM audit WHERE tenant = $1 ORDER BY id DESC LIMIT $2")
                    .bind(t)
                    .bind(i64::from(limit))
                    .fetch_all(&self.read)
                    .await?
            }
            None => {
                sqlx::query("SELECT * FROM audit ORDER BY id DESC LIMIT $1")
                    .bind(i64::from(limit))
                    .fetch_all(&self.read)
                    .await?
            }
        };
        rows.iter().map(crate::common::audit_row).collect()
    }
    async fn count_tokens(&self) -> Result<u64, StoreError> {
        let r = sqlx::query("SELECT COUNT(*) AS n FROM tokens")
            .fetch_one(&self.read)
            .await?;
        Ok(r.try_get::<i64, _>("n")? as u64)
    }
    async fn open_commands(
        &self,
        execution: Option<&ExecutionId>,
    ) -> Result<Vec<CommandRow>, StoreError> {
        let rows = match execution {
            Some(e) => sqlx::query(
                concat!("SELECT * FROM commands WHERE state <> 'done' AND execution_id = $1 ORDER BY ", $order),
            )
            .bind(&e.0)
            .fetch_all(&self.read)
            .await?,
            None => {
                sqlx::query(concat!("SELECT * FROM commands WHERE state <> 'done' ORDER BY ", $order))
                    .fetch_all(&self.read)
                    .await?
            }
        };
        rows.iter()
            .map(|r| {
                Ok(CommandRow {
                    command_id: r.try_get("command_id")?,
                    execution_id: ExecutionId(r.try_get("execution_id")?),
                    step: r.try_get("step")?,
                    index: r.try_get::<Option<i64>, _>("idx")?.map(|i| i as usize),
                    state: r.try_get("state")?,
                    deliveries: r.try_get::<i64, _>("deliveries")? as u32,
                    lease_until: opt_u64(r.try_get("lease_until")?),
                    worker: r.try_get("worker")?,
                })
            })
            .collect()
    }
    async fn resolve(
        &self,
        tenant: &str,
        path: &str,
        version: Option<u32>,
    ) -> Result<Option<(CatalogEntry, StoredPlaybook)>, StoreError> {
        let row = match version {
            Some(v) => sqlx::query("SELECT path, version, digest, created_at FROM catalog WHERE tenant = $1 AND path = $2 AND version = $3").bind(tenant).bind(path).bind(i64::from(v)).fetch_optional(&self.read).await?,
            None => sqlx::query("SELECT path, version, digest, created_at FROM catalog WHERE tenant = $1 AND path = $2 ORDER BY version DESC LIMIT 1").bind(tenant).bind(path).fetch_optional(&self.read).await?,
        };
        let Some(r) = row else { return Ok(None) };
        let e = catalog_row(&r)?;
        let pb = self.get_playbook(&e.digest).await?.ok_or_else(|| {
            StoreError::Corrupt(format!(
                "catalog {}@{} points at missing content {}",
                e.path, e.version, e.digest
            ))
        })?;
        Ok(Some((e, pb)))
    }
    async fn list_catalog(&self, tenant: &str) -> Result<Vec<CatalogEntry>, StoreError> {
        let rows = sqlx::query("SELECT path, version, digest, created_at FROM catalog WHERE tenant = $1 ORDER BY path, version").bind(tenant).fetch_all(&self.read).await?;
        rows.iter().map(catalog_row).collect()
    }
    async fn get_secret(&self, tenant: &str, alias: &str) -> Result<Option<String>, StoreError> {
        let row = sqlx::query("SELECT sealed FROM keychain WHERE tenant = $1 AND alias = $2")
            .bind(tenant)
            .bind(alias)
            .fetch_optional(&self.read)
            .await?;
        Ok(match row {
            Some(r) => Some(r.try_get::<String, _>("sealed")?),
            None => None,
        })
    }
    async fn list_secrets(&self, tenant: &str) -> Result<Vec<SecretEntry>, StoreError> {
        let rows =
            sqlx::query("SELECT alias, updated_at FROM keychain WHERE tenant = $1 ORDER BY alias")
                .bind(tenant)
                .fetch_all(&self.read)
                .await?;
        rows.iter()
            .map(|r| {
                Ok(SecretEntry {
                    alias: r.try_get("alias")?,
                    updated_at: r.try_get::<i64, _>("updated_at")? as u64,
                })
            })
            .collect()
    }
    async fn read_since(&self, after: u64, limit: u32) -> Result<Vec<Event>, StoreError> {
        let rows =
            sqlx::query("SELECT * FROM events WHERE position > $1 ORDER BY position LIMIT $2")
                .bind(after as i64)
                .bind(i64::from(limit))
                .fetch_all(&self.read)
                .await?;
        rows.iter().map(row_to_event).collect()
    }
    async fn head(&self) -> Result<u64, StoreError> {
        let row = sqlx::query("SELECT COALESCE(MAX(position), 0) AS p FROM events")
            .fetch_one(&self.read)
            .await?;
        Ok(row.try_get::<i64, _>("p")? as u64)
    }
        }
    };
}
pub(crate) use store_impl;

/// The write-path helper shared by both backends (same SQL; `$conn` names the sqlx
/// connection type): the rarely written side tables and compaction, inside the writer's
/// transaction. The hot tables (events, projections, commands) are written per backend:
/// SQLite statement by statement, Postgres in one call of `mayfly_append`.
macro_rules! write_fns {
    ($conn:ty) => {

/// Store a playbook version (idempotent by digest).
async fn insert_playbook(tx: &mut $conn, pb: &$crate::StoredPlaybook) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO playbooks (digest, path, source_name, content, created_at) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (digest) DO NOTHING",
    )
    .bind(&pb.digest)
    .bind(&pb.path)
    .bind(&pb.source_name)
    .bind(&pb.content)
    .bind(now_ms() as i64)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// A batch's audit records, tokens, keychain changes and compactions.
async fn apply_side(tx: &mut $conn, batch: &$crate::Batch) -> Result<(), StoreError> {
    for a in &batch.audit {
        sqlx::query(
            "INSERT INTO audit (at_ms, tenant, actor, action, outcome, detail, request_id) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(a.at_ms as i64)
        .bind(&a.tenant)
        .bind(&a.actor)
        .bind(&a.action)
        .bind(&a.outcome)
        .bind(&a.detail)
        .bind(&a.request_id)
        .execute(&mut *tx)
        .await?;
    }
    for (hash, g) in &batch.tokens {
        sqlx::query("INSERT INTO tokens (hash, tenant, role, name, created_at) VALUES ($1, $2, $3, $4, $5)")
            .bind(hash)
            .bind(&g.tenant)
            .bind(&g.role)
            .bind(&g.name)
            .bind(now_ms() as i64)
            .execute(&mut *tx)
            .await?;
    }
    for op in &batch.secrets {
        match op {
            SecretOp::Put {
                tenant,
                alias,
                sealed,
            } => {
                sqlx::query("INSERT INTO keychain (tenant, alias, sealed, updated_at) VALUES ($1, $2, $3, $4) ON CONFLICT (tenant, alias) DO UPDATE SET sealed = excluded.sealed, updated_at = excluded.updated_at")
                    .bind(tenant)
                    .bind(alias)
                    .bind(sealed)
                    .bind(now_ms() as i64)
                    .execute(&mut *tx)
                    .await?;
            }
            SecretOp::Delete { tenant, alias } => {
                sqlx::query("DELETE FROM keychain WHERE tenant = $1 AND alias = $2")
                    .bind(tenant)
                    .bind(alias)
                    .execute(&mut *tx)
                    .await?;
            }
        }
    }
    for c in &batch.compact {
        // The database refuses deletes unless the stream is named in `compacting` within
        // the same transaction (migration 0007/0008).
        sqlx::query("INSERT INTO compacting (execution_id) VALUES ($1) ON CONFLICT (execution_id) DO NOTHING")
            .bind(&c.execution_id.0)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM events WHERE execution_id = $1 AND seq >= $2 AND seq <= $3")
            .bind(&c.execution_id.0)
            .bind(c.from_seq as i64)
            .bind(c.through_seq as i64)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM compacting WHERE execution_id = $1")
            .bind(&c.execution_id.0)
            .execute(&mut *tx)
            .await?;
    }
    Ok(())
}
    };
}
pub(crate) use write_fns;
