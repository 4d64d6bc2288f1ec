//! The shared store conformance suite against the real local Postgres.
//! Without Postgres the test is skipped loudly; with CI=true its absence is a failure.

use mayfly_store::{PostgresStore, Store, conformance};
use std::sync::Arc;

fn postgres_url() -> Option<String> {
    mayfly_testkit::postgres().then(mayfly_testkit::postgres_url)
}

fn schema() -> String {
    mayfly_testkit::unique("mayfly_t")
}

#[tokio::test]
async fn postgres_passes_the_conformance_suite() {
    let Some(url) = postgres_url() else { return };
    let schema = schema();
    let store = PostgresStore::connect_schema(&url, &schema)
        .await
        .expect("connect");
    conformance::run_all(Arc::new(store)).await;
    PostgresStore::drop_schema(&url, &schema)
        .await
        .expect("cleanup");
}

#[tokio::test]
async fn postgres_log_is_append_only_and_reopenable() {
    let Some(url) = postgres_url() else { return };
    let schema = schema();
    let evs = conformance::chain(
        "pg-keep",
        1,
        mayfly_types::GENESIS_HASH,
        &[(
            mayfly_types::EventKind::ExecutionStarted,
            None,
            serde_json::json!({"k": 1}),
        )],
    );
    {
        let store = PostgresStore::connect_schema(&url, &schema)
            .await
            .expect("connect");
        store
            .append(Arc::new(mayfly_store::Batch {
                events: evs,
                ..Default::default()
            }))
            .await
            .expect("append");
    }
    // A second process (here: a second store) sees the same log; migrations are idempotent.
    let store = PostgresStore::connect_schema(&url, &schema)
        .await
        .expect("reconnect");
    let back = store
        .read_all(&mayfly_types::ExecutionId::from("pg-keep"))
        .await
        .expect("read");
    assert_eq!(back.len(), 1);
    mayfly_trust::verify_chain(&back).expect("chain");
    let mut conn = {
        use sqlx::{ConnectOptions, postgres::PgConnectOptions};
        let opts: PgConnectOptions = url.parse().expect("url");
        opts.options([("search_path", schema.as_str())])
            .connect()
            .await
            .expect("conn")
    };
    let upd = sqlx::query("UPDATE events SET payload = '{}'")
        .execute(&mut conn)
        .await;
    assert!(upd.is_err_and(|e| e.to_string().contains("append-only")));
    let del = sqlx::query("DELETE FROM events").execute(&mut conn).await;
    assert!(del.is_err_and(|e| e.to_string().contains("append-only")));
    PostgresStore::drop_schema(&url, &schema)
        .await
        .expect("cleanup");
}

#[tokio::test]
async fn postgres_tail_never_skips_rows_committed_out_of_order_by_separate_writers() {
    let Some(url) = postgres_url() else { return };
    let schema = schema();
    let mut writers: Vec<Arc<dyn Store>> = Vec::new();
    for _ in 0..4 {
        writers.push(Arc::new(
            PostgresStore::connect_schema(&url, &schema)
                .await
                .expect("writer"),
        ));
    }
    let reader: Arc<dyn Store> = Arc::new(
        PostgresStore::connect_schema(&url, &schema)
            .await
            .expect("reader"),
    );
    conformance::tail_never_skips_concurrent_commits(&writers, reader).await;
    PostgresStore::drop_schema(&url, &schema)
        .await
        .expect("cleanup");
}

/// Postgres goes away under the writer (its backend is killed): the commit in flight fails
/// cleanly, the next one runs on a fresh connection, and the log has no gap or duplicate.
#[tokio::test]
async fn postgres_writer_reconnects_after_losing_its_connection() {
    let Some(url) = postgres_url() else { return };
    let schema = schema();
    let app = format!("mayfly_{schema}");
    let sep = if url.contains('?') { '&' } else { '?' };
    let store =
        PostgresStore::connect_schema(&format!("{url}{sep}application_name={app}"), &schema)
            .await
            .expect("connect");
    let k = mayfly_types::EventKind::ExecutionStarted;
    let evs = conformance::chain(
        "pg-lost",
        1,
        mayfly_types::GENESIS_HASH,
        &[
            (k, None, serde_json::json!({"n": 1})),
            (k, None, serde_json::json!({"n": 2})),
        ],
    );
    let append = |e: mayfly_types::Event| {
        store.append(Arc::new(mayfly_store::Batch {
            events: vec![e],
            ..Default::default()
        }))
    };
    append(evs[0].clone()).await.expect("first append");
    let killed = mayfly_testkit::terminate_postgres_sessions(&app).await;
    assert!(killed >= 1, "the store's connections were found and killed");
    // The first commit after the loss may fail (its connection is dead); the next succeeds.
    if append(evs[1].clone()).await.is_err() {
        append(evs[1].clone())
            .await
            .expect("the writer reconnected");
    }
    let back = store
        .read_all(&mayfly_types::ExecutionId::from("pg-lost"))
        .await
        .expect("read");
    assert_eq!(back.len(), 2, "no gap, no duplicate");
    mayfly_trust::verify_chain(&back).expect("chain");
    PostgresStore::drop_schema(&url, &schema)
        .await
        .expect("cleanup");
}

/// One appender per Postgres log: a second lock on the same schema is refused while the
/// first lives (another schema is independent); when the lock's connection is killed, the
/// holder takes it again; once dropped, it can be taken.
#[tokio::test]
async fn one_appender_per_postgres_log() {
    use mayfly_store::{AppenderLock, StoreError};
    use std::time::Duration;
    let Some(url) = postgres_url() else { return };
    let (a, b) = (schema(), format!("{}_other", schema()));
    let app = format!("mayfly_lock_{a}");
    let sep = if url.contains('?') { '&' } else { '?' };
    let named = format!("{url}{sep}application_name={app}");
    let check = Duration::from_millis(100);
    let first = AppenderLock::acquire(&named, Some(&a), check)
        .await
        .expect("first lock");
    let second = AppenderLock::acquire(&url, Some(&a), check).await;
    assert!(matches!(second, Err(StoreError::Conflict(_))), "refused");
    let other = AppenderLock::acquire(&url, Some(&b), check)
        .await
        .expect("another schema is another log");
    drop(other);

    let mut admin = {
        use sqlx::{ConnectOptions, postgres::PgConnectOptions};
        let opts: PgConnectOptions = url.parse().expect("url");
        opts.connect().await.expect("admin conn")
    };
    let old = session_pids(&mut admin, &app).await.expect("pids");
    assert_eq!(old.len(), 1, "one session holds the lock");
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(old[0])
        .execute(&mut admin)
        .await
        .expect("terminate");
    // The holder notices within a check or two and takes the lock again (a new session).
    let mut held_again = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = session_pids(&mut admin, &app).await.expect("pids");
        if now.len() == 1 && now[0] != old[0] {
            let locks: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND pid = $1",
            )
            .bind(now[0])
            .fetch_one(&mut admin)
            .await
            .expect("locks");
            if locks == 1 {
                held_again = true;
                break;
            }
        }
    }
    assert!(held_again, "the holder reconnected");
    assert!(
        matches!(
            AppenderLock::acquire(&url, Some(&a), check).await,
            Err(StoreError::Conflict(_))
        ),
        "still held after the reconnect"
    );
    drop(first);
    // Dropping ends the session; the server releases the lock as it notices.
    let mut taken = false;
    for _ in 0..50 {
        if AppenderLock::acquire(&url, Some(&a), check).await.is_ok() {
            taken = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(taken, "free once the holder is gone");
}

async fn session_pids(admin: &mut sqlx::PgConnection, app: &str) -> Result<Vec<i32>, sqlx::Error> {
    sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE application_name = $1")
        .bind(app)
        .fetch_all(admin)
        .await
}

/// Fencing: a process that took over the log bumps its appender epoch; from then on the
/// previous appender's commits are refused inside their transaction and write nothing, even
/// though it has not noticed losing its lock. The new appender writes; a reader (no epoch)
/// is never fenced.
#[tokio::test]
async fn a_superseded_appender_is_fenced_and_writes_nothing() {
    use mayfly_store::StoreError;
    use mayfly_types::{EventKind, ExecutionId, GENESIS_HASH};
    let Some(url) = postgres_url() else { return };
    let schema = schema();
    let old = PostgresStore::connect_schema(&url, &schema)
        .await
        .expect("old");
    let e1 = old.take_over().await.expect("take over");
    let batch = |exec: &str| {
        let evs = conformance::chain(
            exec,
            1,
            GENESIS_HASH,
            &[(EventKind::ExecutionStarted, None, serde_json::json!({}))],
        );
        Arc::new(mayfly_store::Batch {
            events: evs,
            ..Default::default()
        })
    };
    old.append(batch("fence-a")).await.expect("appender writes");
    let new = PostgresStore::connect_schema(&url, &schema)
        .await
        .expect("new");
    let e2 = new.take_over().await.expect("take over again");
    assert!(e2 > e1, "epochs increase: {e1} then {e2}");
    let r = old.append(batch("fence-b")).await;
    assert!(
        matches!(&r, Err(StoreError::Fenced(m)) if m.contains("took over")),
        "the superseded appender is refused: {r:?}"
    );
    new.append(batch("fence-c"))
        .await
        .expect("new appender writes");
    let reader = PostgresStore::connect_schema(&url, &schema)
        .await
        .expect("reader");
    for (exec, n) in [("fence-a", 1), ("fence-b", 0), ("fence-c", 1)] {
        let got = reader
            .read_all(&ExecutionId::from(exec))
            .await
            .expect("read");
        assert_eq!(got.len(), n, "{exec}");
    }
    PostgresStore::drop_schema(&url, &schema)
        .await
        .expect("cleanup");
}

#[tokio::test]
async fn each_schema_is_a_log_of_its_own_identity() {
    let Some(url) = postgres_url() else { return };
    let (s1, s2) = (schema(), format!("{}b", schema()));
    let a = PostgresStore::connect_schema(&url, &s1).await.expect("a");
    let b = PostgresStore::connect_schema(&url, &s2).await.expect("b");
    let id = a.log_id().await.expect("id");
    assert_ne!(id, b.log_id().await.expect("id"));
    drop(a);
    let again = PostgresStore::connect_schema(&url, &s1)
        .await
        .expect("reopen");
    assert_eq!(again.log_id().await.expect("id"), id);
    for s in [s1, s2] {
        PostgresStore::drop_schema(&url, &s).await.expect("cleanup");
    }
}
