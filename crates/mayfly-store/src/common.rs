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
