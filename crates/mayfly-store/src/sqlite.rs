//! SQLite backend: WAL, `synchronous=FULL`, one writer task with group commit, a small
//! reader pool. Many concurrent blocks share one fsync.

use crate::common::{
    DbRow, GroupWriter, Job, catalog_row, opt_u64, row_to_event, row_to_execution, writer_loop,
};
use crate::{AuditRecord, CatalogEntry, TokenGrant};
use crate::{
    Batch, CommandOp, CommandRow, ExecutionRow, SecretEntry, SecretOp, StoreError, StoredPlaybook,
};
use mayfly_types::{Event, EventKind, ExecutionId, now_ms};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Connection, QueryBuilder, Row, Sqlite, SqliteConnection, SqlitePool};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

crate::common::write_fns!(Sqlite, SqliteConnection);

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

crate::common::store_impl!(SqliteStore, "rowid", {
    async fn register(
        &self,
        tenant: &str,
        pb: StoredPlaybook,
    ) -> Result<(CatalogEntry, bool), StoreError> {
        // BEGIN IMMEDIATE: take the write lock up front, so concurrent registrations serialize.
        let mut conn = SqliteConnection::connect_with(&options(&self.path)).await?;
        let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
        sqlx::query("INSERT INTO playbooks (digest, path, source_name, content, created_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT (digest) DO NOTHING")
            .bind(&pb.digest)
            .bind(&pb.path)
            .bind(&pb.source_name)
            .bind(&pb.content)
            .bind(now_ms() as i64)
            .execute(&mut *tx)
            .await?;
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
