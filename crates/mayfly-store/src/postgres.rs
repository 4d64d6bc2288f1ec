//! Postgres backend (distributed mode): the same contract as SQLite, shared by many
//! processes. Appenders take a transaction-scoped advisory lock so that global positions
//! become visible in commit order: a tail reading `position > last` never skips a row that
//! committed late (the classic BIGSERIAL gap problem).

use crate::common::{
    DbRow, GroupWriter, Job, catalog_row, opt_u64, row_to_event, row_to_execution, writer_loop,
};
use crate::{AuditRecord, CatalogEntry, TokenGrant};
use crate::{
    Batch, CommandOp, CommandRow, ExecutionRow, SecretEntry, SecretOp, StoreError, StoredPlaybook,
};
use mayfly_types::{Event, EventKind, ExecutionId, now_ms};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{
    AssertSqlSafe, ConnectOptions, Connection, PgConnection, PgPool, Postgres, QueryBuilder, Row,
};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use tokio::sync::{mpsc, oneshot};

crate::common::write_fns!(Postgres, PgConnection);

/// Most rows in one multi-row INSERT (Postgres allows 65535 bound parameters).
const CHUNK: usize = 1000;
/// Advisory lock key of the append path ("mayfly" in ASCII).
const APPEND_LOCK: i64 = 0x6d61_7966_6c79;

/// The Postgres store. Cheap to share behind an `Arc`.
pub struct PostgresStore {
    read: PgPool,
    tx: mpsc::Sender<Job>,
    /// The appender epoch this store writes under (0: unfenced; see [`Self::take_over`]).
    fence: Arc<AtomicI64>,
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
        let fence = Arc::new(AtomicI64::new(0));
        tokio::spawn(writer_loop(
            PgWriter {
                conn: Some(writer),
                opts,
                fence: fence.clone(),
            },
            rx,
        ));
        Ok(PostgresStore { read, tx, fence })
    }

    /// Become the log's appender: bump its fencing epoch (serialised with every append by
    /// the append lock) and write under it from now on. Every append checks, inside its
    /// transaction, that the epoch is still this one; once another process has taken over,
    /// this store's appends fail with [`StoreError::Fenced`] and write nothing — the
    /// window between losing the [`AppenderLock`] and noticing it is closed.
    pub async fn take_over(&self) -> Result<u64, StoreError> {
        let mut tx = self.read.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(APPEND_LOCK)
            .execute(&mut *tx)
            .await?;
        let epoch: i64 =
            sqlx::query("UPDATE appender SET epoch = epoch + 1 WHERE id = 1 RETURNING epoch")
                .fetch_one(&mut *tx)
                .await?
                .try_get("epoch")?;
        tx.commit().await?;
        self.fence.store(epoch, Ordering::SeqCst);
        Ok(epoch as u64)
    }
}

/// The single writer connection. When Postgres goes away (restart, failover, a killed
/// backend) the failed group is reported to its callers — nothing half-written is retried
/// blindly — and the next group runs on a fresh connection.
struct PgWriter {
    conn: Option<PgConnection>,
    opts: PgConnectOptions,
    fence: Arc<AtomicI64>,
}

impl GroupWriter for PgWriter {
    async fn write_group(&mut self, jobs: &[Job]) -> Result<Vec<Option<u64>>, StoreError> {
        let conn = match &mut self.conn {
            Some(c) => c,
            None => self.conn.insert(self.opts.connect().await?),
        };
        let r = write_group(conn, jobs, self.fence.load(Ordering::SeqCst)).await;
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
    fence: i64,
) -> Result<Vec<Option<u64>>, StoreError> {
    let mut tx = conn.begin().await?;
    // Serialize appenders (across processes too) so positions become visible in order.
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(APPEND_LOCK)
        .execute(&mut *tx)
        .await?;
    if fence > 0 {
        // Under the append lock, so no take-over can slip in between check and commit.
        let current: i64 = sqlx::query("SELECT epoch FROM appender WHERE id = 1")
            .fetch_one(&mut *tx)
            .await?
            .try_get("epoch")?;
        if current != fence {
            return Err(StoreError::Fenced(format!(
                "another process took over this log (appender epoch {current}, ours {fence})"
            )));
        }
    }
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
        apply_records(&mut tx, &job.batch).await?;
        positions.push(last);
    }
    tx.commit().await?;
    Ok(positions)
}

crate::common::store_impl!(PostgresStore, "ord", {
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
});

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
            // Refusals in a row: our own dead session may hold the lock until the server
            // notices it is gone, so one refusal is not yet a takeover.
            let mut refused = 0;
            loop {
                tick.tick().await;
                let alive = tokio::time::timeout(check, sqlx::query("SELECT 1").execute(&mut conn))
                    .await
                    .is_ok_and(|r| r.is_ok());
                if alive && refused == 0 {
                    continue;
                }
                tracing::warn!("appender lock connection lost; taking the lock again");
                match try_lock(&opts, key).await {
                    Ok(Some(c)) => {
                        conn = c;
                        refused = 0;
                    }
                    Ok(None) if refused < 20 => refused += 1,
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
