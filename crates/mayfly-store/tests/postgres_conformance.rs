//! The shared store conformance suite against the real local Postgres.
//! Without Postgres the test is skipped loudly; with CI=true its absence is a failure.

use mayfly_store::{PostgresStore, Store, conformance};
use std::sync::Arc;

fn postgres_url() -> Option<String> {
    let url = std::env::var("MAYFLY_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let reachable = std::net::TcpStream::connect_timeout(
        &"127.0.0.1:5432".parse().expect("addr"),
        std::time::Duration::from_secs(2),
    )
    .is_ok();
    if reachable {
        return Some(url);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true but Postgres is not reachable at 127.0.0.1:5432");
    }
    eprintln!("SKIPPED: Postgres is not reachable at 127.0.0.1:5432 (start it to run this test)");
    None
}

fn schema() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("mayfly_t_{}_{nanos}", std::process::id())
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
