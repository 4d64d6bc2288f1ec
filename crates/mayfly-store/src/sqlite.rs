//! SQLite backend: WAL, `synchronous=FULL`, one writer task with group commit, a small
//! reader pool. Many concurrent blocks share one fsync.

use crate::common::{
    DbRow, GroupWriter, Job, Projection, catalog_row, opt_u64, projection, row_to_event,
    row_to_execution, writer_loop,
};
use crate::{AuditRecord, CatalogEntry, TokenGrant};
use crate::{
    Batch, CommandOp, CommandRow, ExecutionRow, SecretEntry, SecretOp, StoreError, StoredPlaybook,
};
use mayfly_types::{Event, ExecutionId, now_ms};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Connection, QueryBuilder, Row, Sqlite, SqliteConnection, SqlitePool};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

crate::common::write_fns!(SqliteConnection);

/// Most rows in one multi-row INSERT (SQLite allows 32766 bound parameters).
const CHUNK: usize = 1000;

/// The embedded store. Cheap to share behind an `Arc`.
pub struct SqliteStore {
    read: SqlitePool,
    tx: mpsc::Sender<Job>,
    path: PathBuf,
}

fn options(path: &Path) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(Duration::from_secs(10))
}

impl SqliteStore {
    /// Open (creating and migrating if needed) the database at `path`.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::Db(format!("{}: {e}", dir.display())))?;
        }
        let mut writer = SqliteConnection::connect_with(&options(&path)).await?;
        sqlx::migrate!("./migrations/sqlite")
            .run(&mut writer)
            .await
            .map_err(|e| StoreError::Db(format!("migrating {}: {e}", path.display())))?;
        let read = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options(&path).read_only(true))
            .await?;
        let (tx, rx) = mpsc::channel::<Job>(4096);
        tokio::spawn(writer_loop(SqliteWriter(writer), rx));
        Ok(SqliteStore { read, tx, path })
    }

    /// Where the database lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A plain connection for tests and tools (e.g. to prove tamper detection).
    pub async fn raw_connection(path: impl AsRef<Path>) -> Result<SqliteConnection, StoreError> {
        Ok(SqliteConnection::connect_with(&options(path.as_ref())).await?)
    }
}

struct SqliteWriter(SqliteConnection);

impl GroupWriter for SqliteWriter {
    async fn write_group(&mut self, jobs: &[Job]) -> Result<Vec<Option<u64>>, StoreError> {
        write_group(&mut self.0, jobs).await
    }
}

async fn write_group(
    conn: &mut SqliteConnection,
    jobs: &[Job],
) -> Result<Vec<Option<u64>>, StoreError> {
    let mut tx = conn.begin().await?;
    let mut positions = Vec::with_capacity(jobs.len());
    for job in jobs {
        let mut last = None;
        for chunk in job.batch.events.chunks(CHUNK) {
            let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(
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
            let r = qb.build().execute(&mut *tx).await?;
            last = Some(r.last_insert_rowid() as u64);
        }
        apply_records(&mut tx, &job.batch).await?;
        positions.push(last);
    }
    tx.commit().await?;
    Ok(positions)
}

async fn project_executions(tx: &mut SqliteConnection, events: &[Event]) -> Result<(), StoreError> {
    // The cache payloads the events name, for retention (most events name none): one
    // statement per chunk of distinct pairs.
    let mut refs = std::collections::BTreeSet::new();
    let mut digests = Vec::new();
    for e in events {
        digests.clear();
        mayfly_types::CacheRef::digests_in(&e.payload, &mut digests);
        refs.extend(digests.iter().map(|d| (e.execution_id.0.as_str(), *d)));
    }
    let refs: Vec<_> = refs.into_iter().collect();
    for chunk in refs.chunks(1000) {
        let mut qb: sqlx::QueryBuilder<Sqlite> =
            sqlx::QueryBuilder::new("INSERT INTO cache_refs (execution_id, digest) ");
        qb.push_values(chunk, |mut b, (x, d)| {
            b.push_bind(*x).push_bind(*d);
        });
        qb.push(" ON CONFLICT DO NOTHING");
        qb.build().execute(&mut *tx).await?;
    }
    for e in events {
        let status = match projection(e) {
            Some(Projection::Requested {
                path,
                parent,
                tenant,
            }) => {
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
                .bind(tenant)
                .execute(&mut *tx)
                .await?;
                continue;
            }
            Some(Projection::Status(st)) => st,
            None => continue,
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

async fn apply_commands(tx: &mut SqliteConnection, ops: &[CommandOp]) -> Result<(), StoreError> {
    let now = now_ms() as i64;
    let inserts: Vec<&CommandOp> = ops
        .iter()
        .filter(|o| matches!(o, CommandOp::Insert { .. }))
        .collect();
    for chunk in inserts.chunks(CHUNK) {
        let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(
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
    // One statement per kind and chunk, not one per command: a fan-out commits hundreds of
    // claims and completions per batch, and a round trip each dominated the writer. Kinds
    // apply in lifecycle order (claim, extend, done); the orchestrator never puts a claim
    // after a done of the same command in one batch (a done command is gone from memory).
    // Done commands leave the table: it holds open commands only (the log keeps the
    // history), so a claim batch joined against it stays cheap however long the log is.
    let mut claims: Vec<(&String, &String, i64, i64)> = Vec::new();
    let mut seen = std::collections::HashMap::new();
    for op in ops {
        if let CommandOp::Claim {
            command_id,
            worker,
            lease_until,
            deliveries,
        } = op
        {
            let row = (
                command_id,
                worker,
                *lease_until as i64,
                i64::from(*deliveries),
            );
            match seen.get(command_id) {
                // A later claim of the same command in one batch supersedes the earlier.
                Some(&i) => claims[i] = row,
                None => {
                    seen.insert(command_id, claims.len());
                    claims.push(row);
                }
            }
        }
    }
    for chunk in claims.chunks(CHUNK) {
        let mut qb: QueryBuilder<Sqlite> =
            QueryBuilder::new("WITH u (id, worker, lease_until, deliveries) AS (");
        qb.push_values(chunk, |mut b, (id, worker, lease, deliveries)| {
            b.push_bind((*id).clone())
                .push_bind((*worker).clone())
                .push_bind(*lease)
                .push_bind(*deliveries);
        });
        qb.push(
            ") UPDATE commands SET state = 'claimed', worker = u.worker, lease_until = u.lease_until, \
             deliveries = u.deliveries FROM u WHERE commands.command_id = u.id AND commands.state <> 'done'",
        );
        let r = qb.build().execute(&mut *tx).await?;
        if r.rows_affected() != chunk.len() as u64 {
            return Err(StoreError::Conflict(format!(
                "{} of {} claimed commands are done or unknown",
                chunk.len() as u64 - r.rows_affected(),
                chunk.len()
            )));
        }
    }
    for op in ops {
        if let CommandOp::Extend {
            command_id,
            lease_until,
        } = op
        {
            sqlx::query(
                "UPDATE commands SET lease_until = $1 WHERE command_id = $2 AND state = 'claimed'",
            )
            .bind(*lease_until as i64)
            .bind(command_id)
            .execute(&mut *tx)
            .await?;
        }
    }
    let dones: Vec<&String> = ops
        .iter()
        .filter_map(|o| match o {
            CommandOp::Done { command_id } => Some(command_id),
            _ => None,
        })
        .collect();
    for chunk in dones.chunks(CHUNK) {
        let mut qb: QueryBuilder<Sqlite> =
            QueryBuilder::new("DELETE FROM commands WHERE command_id IN (");
        let mut ids = qb.separated(", ");
        for id in chunk {
            ids.push_bind((*id).clone());
        }
        qb.push(")");
        qb.build().execute(&mut *tx).await?;
    }
    Ok(())
}

/// Everything of a batch but its events: the side tables, the executions projection and
/// the commands table, inside the writer's transaction.
async fn apply_records(tx: &mut SqliteConnection, batch: &Batch) -> Result<(), StoreError> {
    for pb in &batch.playbooks {
        insert_playbook(tx, pb).await?;
    }
    apply_side(tx, batch).await?;
    project_executions(tx, &batch.events).await?;
    apply_commands(tx, &batch.commands).await
}

crate::common::store_impl!(SqliteStore, "rowid", {
    async fn register(
        &self,
        tenant: &str,
        pb: StoredPlaybook,
    ) -> Result<(CatalogEntry, bool), StoreError> {
        // BEGIN IMMEDIATE: take the write lock up front, so concurrent registrations serialize.
        let mut conn = SqliteConnection::connect_with(&options(&self.path)).await?;
        let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
        insert_playbook(&mut tx, &pb).await?;
        if let Some(r) = sqlx::query("SELECT path, version, digest, created_at FROM catalog WHERE tenant = ? AND path = ? AND digest = ?").bind(tenant).bind(&pb.path).bind(&pb.digest).fetch_optional(&mut *tx).await? {
            let e = catalog_row(&r)?;
            tx.commit().await?;
            return Ok((e, false));
        }
        let v: i64 = sqlx::query(
            "SELECT COALESCE(MAX(version), 0) + 1 AS v FROM catalog WHERE tenant = ? AND path = ?",
        )
        .bind(tenant)
        .bind(&pb.path)
        .fetch_one(&mut *tx)
        .await?
        .try_get("v")?;
        let at = now_ms();
        sqlx::query("INSERT INTO catalog (tenant, path, version, digest, created_at) VALUES (?, ?, ?, ?, ?)").bind(tenant).bind(&pb.path).bind(v).bind(&pb.digest).bind(at as i64).execute(&mut *tx).await?;
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
