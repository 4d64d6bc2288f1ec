//! Postgres backend (distributed mode): the same contract as SQLite, shared by many
//! processes. Appenders take a transaction-scoped advisory lock so that global positions
//! become visible in commit order: a tail reading `position > last` never skips a row that
//! committed late (the classic BIGSERIAL gap problem).

use crate::common::{
    DbRow, GroupWriter, Job, Projection, catalog_row, opt_u64, projection, row_to_event,
    row_to_execution, writer_loop,
};
use crate::{AuditRecord, CatalogEntry, TokenGrant};
use crate::{
    Batch, CommandOp, CommandRow, ExecutionRow, SecretEntry, SecretOp, StoreError, StoredPlaybook,
};
use mayfly_types::{Event, ExecutionId, now_ms};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, PgConnection, PgPool, Postgres, Row};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use tokio::sync::{mpsc, oneshot};

crate::common::write_fns!(PgConnection);

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
    // One call applies command changes kind by kind (inserts, claims, extends, dones), which
    // is each batch's own order but not the order across batches: a group whose batches
    // both change commands is split so each call holds at most one of them. (Today only the
    // orchestrator changes commands, one commit at a time, so the hot path is one call.)
    let calls = split_calls(jobs.iter().map(|j| !j.batch.commands.is_empty()));
    let side = jobs.iter().any(|j| {
        let b = &j.batch;
        !(b.audit.is_empty() && b.tokens.is_empty() && b.secrets.is_empty() && b.compact.is_empty())
    });
    let mut positions = vec![None; jobs.len()];
    let mut record = |range: &std::ops::Range<usize>, rows: Vec<sqlx::postgres::PgRow>| {
        for r in rows {
            let job: i32 = r.try_get("job")?;
            let last: Option<i64> = r.try_get("last_position")?;
            if let Some(p) = usize::try_from(job)
                .ok()
                .and_then(|j| positions.get_mut(range.start + j))
            {
                *p = last.map(|l| l as u64);
            }
        }
        Ok::<(), StoreError>(())
    };
    if !side && calls.len() == 1 {
        // The hot path: one auto-committed statement, one round trip.
        let rows = Columns::of(jobs)?.call(fence).fetch_all(&mut *conn).await?;
        record(&calls[0], rows)?;
        return Ok(positions);
    }
    // Rare (audit, tokens, keychain, compaction, or several batches changing commands): the
    // calls and statements share one transaction.
    let mut tx = conn.begin().await?;
    for range in &calls {
        let group = &jobs[range.clone()];
        let rows = Columns::of(group)?.call(fence).fetch_all(&mut *tx).await?;
        record(range, rows)?;
    }
    for job in jobs {
        apply_side(&mut tx, &job.batch).await?;
    }
    tx.commit().await?;
    Ok(positions)
}

/// Consecutive ranges of a group's batches, each holding at most one batch that changes
/// commands (`has_commands` per batch, in order).
fn split_calls(has_commands: impl Iterator<Item = bool>) -> Vec<std::ops::Range<usize>> {
    let mut calls = Vec::new();
    let (mut start, mut len, mut with_commands) = (0, 0, false);
    for (i, has) in has_commands.enumerate() {
        if has {
            if with_commands {
                calls.push(start..i);
                start = i;
            }
            with_commands = true;
        }
        len = i + 1;
    }
    calls.push(start..len);
    calls
}

/// `mayfly_append` (migration 0010) with its 45 array arguments.
const APPEND: &str = "SELECT job, last_position FROM mayfly_append($1, $2, \
    $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, \
    $18, $19, $20, $21, $22, $23, $24, $25, $26, $27, $28, $29, $30, $31, $32, $33, \
    $34, $35, $36, $37, $38, $39, $40, $41, $42, $43, $44, $45)";

/// A group's rows as the column arrays `mayfly_append` takes. Rows that one statement would
/// otherwise touch twice are folded here: the last status of an execution, the last claim
/// or lease extension of a command (a later one supersedes an earlier one in the batches'
/// order).
#[derive(Default)]
struct Columns<'a> {
    e_job: Vec<i32>,
    e_exec: Vec<&'a str>,
    e_seq: Vec<i64>,
    e_kind: Vec<&'a str>,
    e_step: Vec<Option<&'a str>>,
    e_attempt: Vec<Option<i64>>,
    e_cmd: Vec<Option<&'a str>>,
    e_at: Vec<i64>,
    e_actor: Vec<&'a str>,
    e_req: Vec<Option<&'a str>>,
    e_digest: Vec<&'a str>,
    e_payload: Vec<String>,
    e_ref: Vec<Option<&'a str>>,
    e_prev: Vec<&'a str>,
    e_hash: Vec<&'a str>,
    p_digest: Vec<&'a str>,
    p_path: Vec<&'a str>,
    p_source: Vec<&'a str>,
    p_content: Vec<&'a str>,
    r_exec: Vec<&'a str>,
    r_digest: Vec<&'a str>,
    x_id: Vec<&'a str>,
    x_path: Vec<&'a str>,
    x_digest: Vec<&'a str>,
    x_parent: Vec<Option<&'a str>>,
    x_at: Vec<i64>,
    x_tenant: Vec<&'a str>,
    s_id: Vec<&'a str>,
    s_status: Vec<&'a str>,
    s_at: Vec<i64>,
    c_id: Vec<&'a str>,
    c_exec: Vec<&'a str>,
    c_step: Vec<&'a str>,
    c_idx: Vec<Option<i64>>,
    k_id: Vec<&'a str>,
    k_worker: Vec<&'a str>,
    k_lease: Vec<i64>,
    k_deliveries: Vec<i64>,
    l_id: Vec<&'a str>,
    l_lease: Vec<i64>,
    d_id: Vec<&'a str>,
}

impl<'a> Columns<'a> {
    fn of(jobs: &'a [Job]) -> Result<Self, StoreError> {
        let mut c = Columns::default();
        let mut playbooks = HashSet::new();
        let mut refs = BTreeSet::new();
        let mut requested = HashSet::new();
        let mut status: HashMap<&str, usize> = HashMap::new();
        let mut claims: HashMap<&str, usize> = HashMap::new();
        let mut extends: HashMap<&str, usize> = HashMap::new();
        let mut digests = Vec::new();
        for (j, job) in jobs.iter().enumerate() {
            let b = &job.batch;
            for e in &b.events {
                let payload = serde_json::to_string(&e.payload)
                    .map_err(|err| StoreError::Db(format!("cannot encode payload: {err}")))?;
                c.e_job.push(j as i32);
                c.e_exec.push(&e.execution_id.0);
                c.e_seq.push(e.seq as i64);
                c.e_kind.push(e.kind.as_str());
                c.e_step.push(e.step.as_deref());
                c.e_attempt.push(e.attempt.map(i64::from));
                c.e_cmd.push(e.command_id.as_deref());
                c.e_at.push(e.at as i64);
                c.e_actor.push(&e.actor);
                c.e_req.push(e.request_id.as_deref());
                c.e_digest.push(&e.playbook_digest);
                c.e_payload.push(payload);
                c.e_ref.push(e.payload_ref.as_deref());
                c.e_prev.push(&e.prev_hash);
                c.e_hash.push(&e.hash);
                digests.clear();
                mayfly_types::CacheRef::digests_in(&e.payload, &mut digests);
                refs.extend(digests.iter().map(|d| (e.execution_id.0.as_str(), *d)));
                let st = match projection(e) {
                    Some(Projection::Requested {
                        path,
                        parent,
                        tenant,
                    }) => {
                        if requested.insert(e.execution_id.0.as_str()) {
                            c.x_id.push(&e.execution_id.0);
                            c.x_path.push(path);
                            c.x_digest.push(&e.playbook_digest);
                            c.x_parent.push(parent);
                            c.x_at.push(e.at as i64);
                            c.x_tenant.push(tenant);
                        }
                        continue;
                    }
                    Some(Projection::Status(st)) => st,
                    None => continue,
                };
                match status.get(e.execution_id.0.as_str()) {
                    Some(&i) => {
                        c.s_status[i] = st;
                        c.s_at[i] = e.at as i64;
                    }
                    None => {
                        status.insert(&e.execution_id.0, c.s_id.len());
                        c.s_id.push(&e.execution_id.0);
                        c.s_status.push(st);
                        c.s_at.push(e.at as i64);
                    }
                }
            }
            for pb in &b.playbooks {
                if playbooks.insert(pb.digest.as_str()) {
                    c.p_digest.push(&pb.digest);
                    c.p_path.push(&pb.path);
                    c.p_source.push(&pb.source_name);
                    c.p_content.push(&pb.content);
                }
            }
            for op in &b.commands {
                match op {
                    CommandOp::Insert {
                        command_id,
                        execution_id,
                        step,
                        index,
                    } => {
                        c.c_id.push(command_id);
                        c.c_exec.push(&execution_id.0);
                        c.c_step.push(step);
                        c.c_idx.push(index.map(|i| i as i64));
                    }
                    CommandOp::Claim {
                        command_id,
                        worker,
                        lease_until,
                        deliveries,
                    } => match claims.get(command_id.as_str()) {
                        Some(&i) => {
                            c.k_worker[i] = worker;
                            c.k_lease[i] = *lease_until as i64;
                            c.k_deliveries[i] = i64::from(*deliveries);
                        }
                        None => {
                            claims.insert(command_id, c.k_id.len());
                            c.k_id.push(command_id);
                            c.k_worker.push(worker);
                            c.k_lease.push(*lease_until as i64);
                            c.k_deliveries.push(i64::from(*deliveries));
                        }
                    },
                    CommandOp::Extend {
                        command_id,
                        lease_until,
                    } => match extends.get(command_id.as_str()) {
                        Some(&i) => c.l_lease[i] = *lease_until as i64,
                        None => {
                            extends.insert(command_id, c.l_id.len());
                            c.l_id.push(command_id);
                            c.l_lease.push(*lease_until as i64);
                        }
                    },
                    CommandOp::Done { command_id } => c.d_id.push(command_id),
                }
            }
        }
        (c.r_exec, c.r_digest) = refs.into_iter().unzip();
        Ok(c)
    }

    fn call(&'a self, fence: i64) -> sqlx::query::Query<'a, Postgres, sqlx::postgres::PgArguments> {
        let now = now_ms() as i64;
        sqlx::query(APPEND)
            .bind(APPEND_LOCK)
            .bind(fence)
            .bind(&self.e_job)
            .bind(&self.e_exec)
            .bind(&self.e_seq)
            .bind(&self.e_kind)
            .bind(&self.e_step)
            .bind(&self.e_attempt)
            .bind(&self.e_cmd)
            .bind(&self.e_at)
            .bind(&self.e_actor)
            .bind(&self.e_req)
            .bind(&self.e_digest)
            .bind(&self.e_payload)
            .bind(&self.e_ref)
            .bind(&self.e_prev)
            .bind(&self.e_hash)
            .bind(&self.p_digest)
            .bind(&self.p_path)
            .bind(&self.p_source)
            .bind(&self.p_content)
            .bind(now)
            .bind(&self.r_exec)
            .bind(&self.r_digest)
            .bind(&self.x_id)
            .bind(&self.x_path)
            .bind(&self.x_digest)
            .bind(&self.x_parent)
            .bind(&self.x_at)
            .bind(&self.x_tenant)
            .bind(&self.s_id)
            .bind(&self.s_status)
            .bind(&self.s_at)
            .bind(&self.c_id)
            .bind(&self.c_exec)
            .bind(&self.c_step)
            .bind(&self.c_idx)
            .bind(now)
            .bind(&self.k_id)
            .bind(&self.k_worker)
            .bind(&self.k_lease)
            .bind(&self.k_deliveries)
            .bind(&self.l_id)
            .bind(&self.l_lease)
            .bind(&self.d_id)
    }
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
        insert_playbook(&mut tx, &pb).await?;
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

#[cfg(test)]
mod tests {
    use super::split_calls;

    #[test]
    fn a_call_holds_at_most_one_batch_that_changes_commands() {
        let split = |v: &[bool]| split_calls(v.iter().copied());
        assert_eq!(split(&[]), vec![0..0]);
        assert_eq!(split(&[false, false]), vec![0..2]);
        assert_eq!(split(&[true, false, false]), vec![0..3]);
        assert_eq!(split(&[false, true, false, true]), vec![0..3, 3..4]);
        assert_eq!(split(&[true, true, true]), vec![0..1, 1..2, 2..3]);
        assert_eq!(split(&[true, false, true, false]), vec![0..2, 2..4]);
    }
}
