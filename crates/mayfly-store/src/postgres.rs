//! Postgres backend (distributed mode): the same contract as SQLite, shared by many
//! processes. Appenders take a transaction-scoped advisory lock so that global positions
//! become visible in commit order: a tail reading `position > last` never skips a row that
//! committed late (the classic BIGSERIAL gap problem).

use crate::common::{
    GroupWriter, Job, catalog_row, opt_u64, row_to_event, row_to_execution, writer_loop,
};
use crate::{AuditRecord, CatalogEntry, TokenGrant};
use crate::{
    Batch, CommandOp, CommandRow, ExecutionRow, SecretEntry, SecretOp, Store, StoreError,
    StoredPlaybook,
};
use async_trait::async_trait;
use mayfly_types::{Event, EventKind, ExecutionId, now_ms};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{
    AssertSqlSafe, ConnectOptions, Connection, PgConnection, PgPool, Postgres, QueryBuilder, Row,
};
use std::str::FromStr;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// Most rows in one multi-row INSERT (Postgres allows 65535 bound parameters).
const CHUNK: usize = 1000;
/// Advisory lock key of the append path ("mayfly" in ASCII).
const APPEND_LOCK: i64 = 0x6d61_7966_6c79;

/// The Postgres store. Cheap to share behind an `Arc`.
pub struct PostgresStore {
    read: PgPool,
    tx: mpsc::Sender<Job>,
}

impl PostgresStore {
    /// Connect to `url` (e.g. `postgres://127.0.0.1:5432/test`) and migrate.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let opts = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::Db(format!("bad postgres url: {e}")))?;
        Self::open_with(opts).await
    }

    /// Connect with every table in `schema` (created if missing). Used to isolate test runs
    /// and tenants of a shared database.
    pub async fn connect_schema(url: &str, schema: &str) -> Result<Self, StoreError> {
        if !schema
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
            || schema.is_empty()
        {
            return Err(StoreError::Db(format!("invalid schema name `{schema}`")));
        }
        let base = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::Db(format!("bad postgres url: {e}")))?;
        let mut conn = base.connect().await?;
        sqlx::query(AssertSqlSafe(format!(
            "CREATE SCHEMA IF NOT EXISTS {schema}"
        )))
        .execute(&mut conn)
        .await?;
        conn.close().await?;
        Self::open_with(base.options([("search_path", schema)])).await
    }

    /// Drop a schema created by [`Self::connect_schema`] (tests clean up after themselves).
    pub async fn drop_schema(url: &str, schema: &str) -> Result<(), StoreError> {
        if !schema
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
            || schema.is_empty()
        {
            return Err(StoreError::Db(format!("invalid schema name `{schema}`")));
        }
        let mut conn = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::Db(e.to_string()))?
            .connect()
            .await?;
        sqlx::query(AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS {schema} CASCADE"
        )))
        .execute(&mut conn)
        .await?;
        Ok(())
    }

    async fn open_with(opts: PgConnectOptions) -> Result<Self, StoreError> {
        let mut writer = opts.connect().await?;
        // Several processes may start at once: migrate under a session advisory lock.
        sqlx::migrate!("./migrations/postgres")
            .run(&mut writer)
            .await
            .map_err(|e| StoreError::Db(format!("migrating postgres: {e}")))?;
        let read = PgPoolOptions::new()
            .max_connections(8)
            .connect_with(opts.clone())
            .await?;
        let (tx, rx) = mpsc::channel::<Job>(4096);
        tokio::spawn(writer_loop(
            PgWriter {
                conn: Some(writer),
                opts,
            },
            rx,
        ));
        Ok(PostgresStore { read, tx })
    }
}

/// The single writer connection. When Postgres goes away (restart, failover, a killed
/// backend) the failed group is reported to its callers — nothing half-written is retried
/// blindly — and the next group runs on a fresh connection.
struct PgWriter {
    conn: Option<PgConnection>,
    opts: PgConnectOptions,
}

impl GroupWriter for PgWriter {
    async fn write_group(&mut self, jobs: &[Job]) -> Result<Vec<Option<u64>>, StoreError> {
        let conn = match &mut self.conn {
            Some(c) => c,
            None => self.conn.insert(self.opts.connect().await?),
        };
        let r = write_group(conn, jobs).await;
        if r.is_err() && conn.ping().await.is_err() {
            tracing::warn!("postgres writer connection lost; reconnecting for the next commit");
            self.conn = None;
        }
        r
    }
}

async fn write_group(
    conn: &mut PgConnection,
    jobs: &[Job],
) -> Result<Vec<Option<u64>>, StoreError> {
    let mut tx = conn.begin().await?;
    // Serialize appenders (across processes too) so positions become visible in order.
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(APPEND_LOCK)
        .execute(&mut *tx)
        .await?;
    let mut positions = Vec::with_capacity(jobs.len());
    for job in jobs {
        let mut last = None;
        for chunk in job.batch.events.chunks(CHUNK) {
            let mut qb: QueryBuilder<Postgres> = QueryBuilder::new(
                "INSERT INTO events (execution_id, seq, kind, step, attempt, command_id, at, actor, request_id, \
                 playbook_digest, payload, payload_ref, prev_hash, hash) ",
            );
            let mut encode_err = None;
            qb.push_values(chunk, |mut b, e| {
                let payload = serde_json::to_string(&e.payload).unwrap_or_else(|err| {
                    encode_err = Some(err.to_string());
                    String::new()
                });
                b.push_bind(e.execution_id.0.clone())
                    .push_bind(e.seq as i64)
                    .push_bind(e.kind.as_str())
                    .push_bind(e.step.clone())
                    .push_bind(e.attempt.map(i64::from))
                    .push_bind(e.command_id.clone())
                    .push_bind(e.at as i64)
                    .push_bind(e.actor.clone())
                    .push_bind(e.request_id.clone())
                    .push_bind(e.playbook_digest.clone())
                    .push_bind(payload)
                    .push_bind(e.payload_ref.clone())
                    .push_bind(e.prev_hash.clone())
                    .push_bind(e.hash.clone());
            });
            if let Some(err) = encode_err {
                return Err(StoreError::Db(format!("cannot encode payload: {err}")));
            }
            qb.push(" RETURNING position");
            let rows = qb.build().fetch_all(&mut *tx).await?;
            last = rows
                .iter()
                .filter_map(|r| r.try_get::<i64, _>("position").ok())
                .max()
                .map(|p| p as u64)
                .or(last);
        }
        for pb in &job.batch.playbooks {
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
        }
        for a in &job.batch.audit {
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
        for (hash, g) in &job.batch.tokens {
            sqlx::query("INSERT INTO tokens (hash, tenant, role, name, created_at) VALUES ($1, $2, $3, $4, $5)")
                .bind(hash)
                .bind(&g.tenant)
                .bind(&g.role)
                .bind(&g.name)
                .bind(now_ms() as i64)
                .execute(&mut *tx)
                .await?;
        }
        for op in &job.batch.secrets {
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
        project_executions(&mut tx, &job.batch.events).await?;
        apply_commands(&mut tx, &job.batch.commands).await?;
        positions.push(last);
    }
    tx.commit().await?;
    Ok(positions)
}

async fn project_executions(tx: &mut PgConnection, events: &[Event]) -> Result<(), StoreError> {
    for e in events {
        let status = match e.kind {
            EventKind::ExecutionRequested => {
                let path = e
                    .payload
                    .get("path")
                    .and_then(|p| p.as_str())
                    .unwrap_or_default();
                let parent = e
                    .payload
                    .get("parent")
                    .and_then(|p| p.get("execution_id"))
                    .and_then(|p| p.as_str());
                sqlx::query(
                    "INSERT INTO executions (execution_id, path, playbook_digest, status, parent_execution_id, created_at, updated_at, tenant) \
                     VALUES ($1, $2, $3, 'pending', $4, $5, $6, $7) ON CONFLICT (execution_id) DO NOTHING",
                )
                .bind(&e.execution_id.0)
                .bind(path)
                .bind(&e.playbook_digest)
                .bind(parent)
                .bind(e.at as i64)
                .bind(e.at as i64)
                .bind(e.payload.get("tenant").and_then(|t| t.as_str()).unwrap_or(mayfly_types::DEFAULT_TENANT))
                .execute(&mut *tx)
                .await?;
                continue;
            }
            EventKind::ExecutionStarted => "running",
            EventKind::ExecutionCompleted => "completed",
            EventKind::ExecutionFailed => "failed",
            EventKind::ExecutionCancelled => "cancelled",
            _ => continue,
        };
        sqlx::query("UPDATE executions SET status = $1, updated_at = $2 WHERE execution_id = $3")
            .bind(status)
            .bind(e.at as i64)
            .bind(&e.execution_id.0)
            .execute(&mut *tx)
            .await?;
    }
    Ok(())
}

async fn apply_commands(tx: &mut PgConnection, ops: &[CommandOp]) -> Result<(), StoreError> {
    let now = now_ms() as i64;
    let inserts: Vec<&CommandOp> = ops
        .iter()
        .filter(|o| matches!(o, CommandOp::Insert { .. }))
        .collect();
    for chunk in inserts.chunks(CHUNK) {
        let mut qb: QueryBuilder<Postgres> = QueryBuilder::new(
            "INSERT INTO commands (command_id, execution_id, step, idx, state, deliveries, created_at) ",
        );
        qb.push_values(chunk, |mut b, op| {
            if let CommandOp::Insert {
                command_id,
                execution_id,
                step,
                index,
            } = op
            {
                b.push_bind(command_id.clone())
                    .push_bind(execution_id.0.clone())
                    .push_bind(step.clone())
                    .push_bind(index.map(|i| i as i64))
                    .push_bind("pending")
                    .push_bind(0i64)
                    .push_bind(now);
            }
        });
        qb.build().execute(&mut *tx).await?;
    }
    for op in ops {
        match op {
            CommandOp::Insert { .. } => {}
            CommandOp::Claim {
                command_id,
                worker,
                lease_until,
                deliveries,
            } => {
                let r = sqlx::query(
                    "UPDATE commands SET state = 'claimed', worker = $1, lease_until = $2, deliveries = $3 \
                     WHERE command_id = $4 AND state <> 'done'",
                )
                .bind(worker)
                .bind(*lease_until as i64)
                .bind(i64::from(*deliveries))
                .bind(command_id)
                .execute(&mut *tx)
                .await?;
                if r.rows_affected() == 0 {
                    return Err(StoreError::Conflict(format!(
                        "command {command_id} is done or unknown"
                    )));
                }
            }
            CommandOp::Extend {
                command_id,
                lease_until,
            } => {
                sqlx::query("UPDATE commands SET lease_until = $1 WHERE command_id = $2 AND state = 'claimed'")
                    .bind(*lease_until as i64)
                    .bind(command_id)
                    .execute(&mut *tx)
                    .await?;
            }
            CommandOp::Done { command_id } => {
                sqlx::query(
                    "UPDATE commands SET state = 'done', lease_until = NULL WHERE command_id = $1",
                )
                .bind(command_id)
                .execute(&mut *tx)
                .await?;
            }
        }
    }
    Ok(())
}

#[async_trait]
#[async_trait]
impl Store for PostgresStore {
    async fn append(&self, batch: Arc<Batch>) -> Result<Option<u64>, StoreError> {
        if batch.events.is_empty()
            && batch.commands.is_empty()
            && batch.playbooks.is_empty()
            && batch.secrets.is_empty()
            && batch.tokens.is_empty()
            && batch.audit.is_empty()
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
                "SELECT * FROM commands WHERE state <> 'done' AND execution_id = $1 ORDER BY ord",
            )
            .bind(&e.0)
            .fetch_all(&self.read)
            .await?,
            None => {
                sqlx::query("SELECT * FROM commands WHERE state <> 'done' ORDER BY ord")
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

    async fn register(
        &self,
        tenant: &str,
        pb: StoredPlaybook,
    ) -> Result<(CatalogEntry, bool), StoreError> {
        let mut tx = self.read.begin().await?;
        // Serialize registrations of one path (version numbers are dense).
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1 || '/' || $2))")
            .bind(tenant)
            .bind(&pb.path)
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO playbooks (digest, path, source_name, content, created_at) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (digest) DO NOTHING")
            .bind(&pb.digest)
            .bind(&pb.path)
            .bind(&pb.source_name)
            .bind(&pb.content)
            .bind(now_ms() as i64)
            .execute(&mut *tx)
            .await?;
        if let Some(r) = sqlx::query("SELECT path, version, digest, created_at FROM catalog WHERE tenant = $1 AND path = $2 AND digest = $3").bind(tenant).bind(&pb.path).bind(&pb.digest).fetch_optional(&mut *tx).await? {
            let e = catalog_row(&r)?;
            tx.commit().await?;
            return Ok((e, false));
        }
        let v: i64 = sqlx::query("SELECT COALESCE(MAX(version), 0) + 1 AS v FROM catalog WHERE tenant = $1 AND path = $2").bind(tenant).bind(&pb.path).fetch_one(&mut *tx).await?.try_get("v")?;
        let at = now_ms();
        sqlx::query("INSERT INTO catalog (tenant, path, version, digest, created_at) VALUES ($1, $2, $3, $4, $5)").bind(tenant).bind(&pb.path).bind(v).bind(&pb.digest).bind(at as i64).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok((
            CatalogEntry {
                path: pb.path,
                version: v as u32,
                digest: pb.digest,
                created_at: at,
            },
            true,
        ))
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

/// Exclusive right to append to one Postgres log (one schema): a session advisory lock held
/// on a dedicated connection for as long as this value lives. Two servers on one log would
/// otherwise both believe they own every execution (the SQLite log has its lock file).
///
/// The connection is checked every `check`; if it was lost (restart, killed backend) the
/// lock is taken again. If another process took it meanwhile, [`AppenderLock::lost`]
/// reports it and this process must stop appending.
pub struct AppenderLock {
    lost: tokio::sync::watch::Receiver<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl AppenderLock {
    /// Take the lock of the log at `url` (with an optional `schema`), or fail with
    /// [`StoreError::Conflict`] when another process holds it.
    pub async fn acquire(
        url: &str,
        schema: Option<&str>,
        check: std::time::Duration,
    ) -> Result<AppenderLock, StoreError> {
        let opts = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::Db(format!("bad postgres url: {e}")))?;
        let key = appender_key(schema.unwrap_or("public"));
        let mut conn = try_lock(&opts, key).await?.ok_or_else(|| {
            StoreError::Conflict(format!(
                "another mayfly process is the appender of this log (schema `{}`)",
                schema.unwrap_or("public")
            ))
        })?;
        let (tx, lost) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(check);
            tick.tick().await;
            loop {
                tick.tick().await;
                if sqlx::query("SELECT 1").execute(&mut conn).await.is_ok() {
                    continue;
                }
                tracing::warn!("appender lock connection lost; taking the lock again");
                match try_lock(&opts, key).await {
                    Ok(Some(c)) => conn = c,
                    Ok(None) => {
                        tracing::error!("another process took the appender lock of this log");
                        let _ = tx.send(true);
                        return;
                    }
                    // Postgres is unreachable: nobody else can take it either; retry.
                    Err(e) => tracing::warn!(error = %e, "appender lock: Postgres unreachable"),
                }
            }
        });
        Ok(AppenderLock { lost, task })
    }

    /// Resolves when the lock was lost to another process.
    pub async fn lost(&mut self) {
        let _ = self.lost.wait_for(|l| *l).await;
    }
}

impl Drop for AppenderLock {
    fn drop(&mut self) {
        // Dropping the connection ends the session, which releases the lock.
        self.task.abort();
    }
}

fn appender_key(schema: &str) -> i64 {
    let d = mayfly_trust::sha256_digest(format!("mayfly-appender:{schema}").as_bytes());
    let hex = d.trim_start_matches("sha256:");
    u64::from_str_radix(&hex[..16], 16).map_or(0, |v| v as i64)
}

async fn try_lock(opts: &PgConnectOptions, key: i64) -> Result<Option<PgConnection>, StoreError> {
    let mut conn = opts.connect().await?;
    let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(key)
        .fetch_one(&mut conn)
        .await?;
    Ok(got.then_some(conn))
}
