//! The provider's durable memory (SQLite): every op it accepted, keyed by op id with the
//! digest of its payload, and the epoch each actor is bound to. This is what makes an op id
//! idempotent across reconnects and restarts, and what keeps a stale epoch refused after a
//! restart (the fence must not forget).

use mayfly_actor_api::{OpStatus, Refusal, RefusalCode};
use sqlx::Row;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use std::path::Path;
use std::str::FromStr;

/// Journal failures (the provider answers them as 500s; they are never an op's outcome).
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("op journal: {0}")]
    Db(#[from] sqlx::Error),
    #[error("op journal: stored status does not parse: {0}")]
    Corrupt(String),
}

/// What [`Journal::begin`] found.
#[derive(Debug)]
pub enum Begin {
    /// First time this op id is seen: it is now recorded as running.
    New,
    /// Seen before with the same payload: its (possibly still running) status.
    Existing(Box<OpStatus>),
    /// Seen before with a different payload.
    Conflict,
}

/// A durable op journal.
#[derive(Clone)]
pub struct Journal {
    pool: SqlitePool,
}

/// One actor's durable fence record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActorRow {
    pub actor: String,
    pub tenant: String,
    pub epoch: u64,
}

impl Journal {
    /// Open (creating) the journal at `path`. Ops that were running when the provider
    /// stopped are failed with `interrupted`: their outcome is unknown, so they are never
    /// reported as succeeded.
    pub async fn open(path: &Path) -> Result<Journal, JournalError> {
        let opts = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(std::time::Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await?;
        for ddl in [
            "CREATE TABLE IF NOT EXISTS ops (
                op_id TEXT PRIMARY KEY,
                payload_digest TEXT NOT NULL,
                actor TEXT NOT NULL,
                state TEXT NOT NULL,
                status TEXT NOT NULL
            )",
            "CREATE TABLE IF NOT EXISTS actors (
                tenant TEXT NOT NULL,
                actor TEXT NOT NULL,
                epoch INTEGER NOT NULL,
                pgid INTEGER, -- unused since the process sandbox records its own groups
                PRIMARY KEY (tenant, actor)
            )",
        ] {
            sqlx::query(ddl).execute(&pool).await?;
        }
        let j = Journal { pool };
        j.interrupt_running().await?;
        Ok(j)
    }

    async fn interrupt_running(&self) -> Result<(), JournalError> {
        let rows = sqlx::query("SELECT status FROM ops WHERE state = 'running'")
            .fetch_all(&self.pool)
            .await?;
        for r in rows {
            let mut st = parse(r.get::<String, _>(0))?;
            st.state = mayfly_actor_api::OpState::Failed;
            st.error = Some(Refusal::new(
                RefusalCode::Interrupted,
                "the provider restarted while this op ran",
            ));
            self.finish(&st).await?;
        }
        Ok(())
    }

    /// Record `running` for a new op id atomically, or report what the id already holds.
    pub async fn begin(
        &self,
        running: &OpStatus,
        payload_digest: &str,
    ) -> Result<Begin, JournalError> {
        let status =
            serde_json::to_string(running).map_err(|e| JournalError::Corrupt(e.to_string()))?;
        let inserted = sqlx::query(
            "INSERT INTO ops (op_id, payload_digest, actor, state, status) VALUES (?, ?, ?, 'running', ?)
             ON CONFLICT (op_id) DO NOTHING",
        )
        .bind(&running.op_id)
        .bind(payload_digest)
        .bind(&running.actor)
        .bind(status)
        .execute(&self.pool)
        .await?
        .rows_affected();
        if inserted == 1 {
            return Ok(Begin::New);
        }
        let row = sqlx::query("SELECT payload_digest, status FROM ops WHERE op_id = ?")
            .bind(&running.op_id)
            .fetch_one(&self.pool)
            .await?;
        if row.get::<String, _>(0) != payload_digest {
            return Ok(Begin::Conflict);
        }
        Ok(Begin::Existing(Box::new(parse(row.get::<String, _>(1))?)))
    }

    /// Record an op's final status.
    pub async fn finish(&self, status: &OpStatus) -> Result<(), JournalError> {
        let state = serde_json::to_value(status.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let text =
            serde_json::to_string(status).map_err(|e| JournalError::Corrupt(e.to_string()))?;
        sqlx::query("UPDATE ops SET state = ?, status = ? WHERE op_id = ?")
            .bind(state)
            .bind(text)
            .bind(&status.op_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The durable status of an op.
    pub async fn status(&self, op_id: &str) -> Result<Option<OpStatus>, JournalError> {
        let row = sqlx::query("SELECT status FROM ops WHERE op_id = ?")
            .bind(op_id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| parse(r.get::<String, _>(0))).transpose()
    }

    /// The fence record of `tenant`'s `actor`.
    pub async fn actor(&self, tenant: &str, actor: &str) -> Result<Option<ActorRow>, JournalError> {
        let row =
            sqlx::query("SELECT actor, tenant, epoch FROM actors WHERE tenant = ? AND actor = ?")
                .bind(tenant)
                .bind(actor)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(|r| ActorRow {
            actor: r.get(0),
            tenant: r.get(1),
            epoch: r.get::<i64, _>(2).max(0) as u64,
        }))
    }

    /// Every fence record.
    pub async fn actors(&self) -> Result<Vec<ActorRow>, JournalError> {
        let rows = sqlx::query("SELECT actor, tenant, epoch FROM actors ORDER BY actor")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| ActorRow {
                actor: r.get(0),
                tenant: r.get(1),
                epoch: r.get::<i64, _>(2).max(0) as u64,
            })
            .collect())
    }

    /// Bind an actor to `epoch` (never lowers it: the fence only moves forward).
    pub async fn bind(&self, row: &ActorRow) -> Result<(), JournalError> {
        sqlx::query(
            "INSERT INTO actors (actor, tenant, epoch) VALUES (?, ?, ?)
             ON CONFLICT (tenant, actor) DO UPDATE SET
               epoch = MAX(actors.epoch, excluded.epoch)",
        )
        .bind(&row.actor)
        .bind(&row.tenant)
        .bind(row.epoch as i64)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

fn parse(s: String) -> Result<OpStatus, JournalError> {
    serde_json::from_str(&s).map_err(|e| JournalError::Corrupt(e.to_string()))
}
