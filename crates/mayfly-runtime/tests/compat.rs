//! The NoETL compatibility suite: every playbook in `tests/compat/` pins one rule of
//! `noetl-compat.md` (a result shape, a scope, python wrapping, a pipeline rule, admission,
//! an error kind, a strictness rule) and states what it must produce in its header:
//!
//! ```text
//! # rule: one line naming the rule (required)
//! # set: {"key": "value"}          workload overrides; `$HTTP` is the local stub's base URL
//! # expect: <json>                 the execution completes with exactly this result
//! # expect-failed: <error code>    the execution fails with this error code
//! # expect-invalid: <text>         validation refuses the playbook with a message containing it
//! # needs: postgres                the playbook reads the local Postgres through alias `pg`
//! # needs: duckdb                  the playbook runs DuckDB (python3's `duckdb` package)
//! # needs: nats                    the local NATS, with KV bucket `mayfly_compat`; `$NATS` is its URL
//! ```
//!
//! The suite runs on the SQLite log and on the Postgres log; each case's chain is verified
//! and its state rebuilt by replay.

use axum::extract::{Path as UrlPath, Query};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{any, get};
use axum::{Json, Router};
use mayfly_dsl::ParseOptions;
use mayfly_engine::Status;
use mayfly_runtime::{Runtime, RuntimeConfig, load_file};
use mayfly_store::Store;
use serde_json::{Map, Value, json};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

mod common;
use common::assert_replays;

fn cases() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/compat");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/compat")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    v.sort();
    v
}

#[derive(Debug, Default)]
struct Header {
    rule: Option<String>,
    set: Map<String, Value>,
    expect: Option<Value>,
    failed: Option<String>,
    invalid: Option<String>,
    postgres: bool,
    duckdb: bool,
    nats: bool,
}

fn header(path: &Path, http: &str) -> Header {
    let text = std::fs::read_to_string(path).expect("read");
    let mut h = Header::default();
    for line in text.lines().take_while(|l| l.starts_with('#')) {
        let line = line.trim_start_matches('#').trim();
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let v = v
            .trim()
            .replace("$HTTP", http)
            .replace("$NATS", &mayfly_testkit::nats_url());
        let json = |v: &str| -> Value {
            serde_json::from_str(v)
                .unwrap_or_else(|e| panic!("{}: bad JSON `{v}`: {e}", path.display()))
        };
        match k.trim() {
            "rule" => h.rule = Some(v),
            "set" => h.set = json(&v).as_object().cloned().expect("set: an object"),
            "expect" => h.expect = Some(json(&v)),
            "expect-failed" => h.failed = Some(v),
            "expect-invalid" => h.invalid = Some(v),
            "needs" => match v.as_str() {
                "postgres" => h.postgres = true,
                "duckdb" => h.duckdb = true,
                "nats" => h.nats = true,
                other => panic!("{}: unknown need `{other}`", path.display()),
            },
            _ => {}
        }
    }
    assert!(h.rule.is_some(), "{}: no `# rule:` line", path.display());
    assert!(
        h.expect.is_some() as u8 + h.failed.is_some() as u8 + h.invalid.is_some() as u8 == 1,
        "{}: exactly one of expect, expect-failed, expect-invalid",
        path.display()
    );
    h
}

/// The local stand-in for the web services real playbooks call.
async fn stub() -> String {
    let flaky: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let app = Router::new()
        // JSON served as text/plain: NoETL decodes JSON whatever the content type.
        .route(
            "/users",
            get(|| async {
                (
                    [("content-type", "text/plain")],
                    r#"{"items": [{"id": 1, "name": "ann"}, {"id": 2, "name": "bob"}], "next": null}"#,
                )
            }),
        )
        .route("/text", get(|| async { "plain words" }))
        .route(
            "/status/{code}",
            any(|UrlPath(code): UrlPath<u16>| async move {
                (
                    StatusCode::from_u16(code).unwrap_or(StatusCode::IM_A_TEAPOT),
                    Json(json!({"detail": format!("status {code}")})),
                )
            }),
        )
        .route(
            "/echo",
            any(
                |Query(q): Query<HashMap<String, String>>, headers: HeaderMap, body: String| async move {
                    Json(json!({
                        "query": q,
                        "body": body,
                        "content_type": headers.get("content-type").and_then(|v| v.to_str().ok()),
                        "x_token": headers.get("x-token").and_then(|v| v.to_str().ok()),
                    }))
                },
            ),
        )
        .route(
            "/flaky/{key}/{fails}",
            get(move |UrlPath((key, fails)): UrlPath<(String, u32)>| {
                let flaky = flaky.clone();
                async move {
                    let n = {
                        let mut m = flaky.lock().expect("lock");
                        let n = m.entry(key).or_insert(0);
                        *n += 1;
                        *n
                    };
                    if n <= fails {
                        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"try": n})))
                    } else {
                        (StatusCode::OK, Json(json!({"try": n})))
                    }
                }
            }),
        )
        .route(
            "/pages/{n}",
            get(|UrlPath(n): UrlPath<u32>| async move {
                Json(json!({"page": n, "items": [n * 10, n * 10 + 1], "next": if n < 3 { Some(n + 1) } else { None }}))
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}")
}

async fn with_pg_alias(store: &dyn Store, key: &mayfly_trust::keychain::MasterKey) {
    let dsn = json!({"dsn": mayfly_testkit::postgres_url()}).to_string();
    let sealed = key.seal("default", "pg", dsn.as_bytes()).expect("seal");
    store
        .append(Arc::new(mayfly_store::Batch {
            secrets: vec![mayfly_store::SecretOp::Put {
                tenant: "default".into(),
                alias: "pg".into(),
                sealed,
            }],
            ..Default::default()
        }))
        .await
        .expect("put alias");
}

/// Run every case on `store`; returns the failures (one line each).
/// KV bucket `mayfly_compat` on the local NATS.
async fn compat_bucket() -> bool {
    let client = async_nats::connect(mayfly_testkit::nats_url())
        .await
        .expect("nats");
    mayfly_testkit::nats_kv_bucket(&async_nats::jetstream::new(client), "mayfly_compat").await;
    true
}

async fn suite(store: Arc<dyn Store>) -> Vec<String> {
    let http = stub().await;
    let key = mayfly_trust::keychain::MasterKey::generate();
    with_pg_alias(store.as_ref(), &key).await;
    // A shared cache as `mayfly run` has: results over 16 KiB go by reference.
    let cache_dir = tempfile::tempdir().expect("cache dir");
    let payloads = Arc::new(mayfly_cache::Payloads::new(
        Arc::new(mayfly_cache::LocalCache::new(cache_dir.path())),
        mayfly_cache::DEFAULT_INLINE_LIMIT,
    ));
    let rt = Runtime::start(
        store.clone(),
        RuntimeConfig {
            keychain: Some(key),
            cache: Some(payloads.clone()),
            ..Default::default()
        },
    )
    .expect("runtime");
    let mut failures = Vec::new();
    let duckdb = mayfly_testkit::duckdb();
    let nats = mayfly_testkit::nats() && compat_bucket().await;
    let all = cases();
    assert!(
        all.len() >= 60,
        "the suite has {} cases (≥ 60 wanted)",
        all.len()
    );
    for path in all {
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        let h = header(&path, &http);
        if (h.duckdb && !duckdb) || (h.nats && !nats) {
            continue;
        }
        let opts = ParseOptions {
            extra_vars: h.set.keys().cloned().collect(),
        };
        let pb = match load_file(&path, &opts) {
            Ok(pb) => pb,
            Err(e) => {
                match &h.invalid {
                    Some(want) if e.to_string().contains(want.as_str()) => {}
                    Some(want) => failures.push(format!(
                        "{name}: invalid as expected, but `{e}` lacks `{want}`"
                    )),
                    None => failures.push(format!("{name}: invalid: {e}")),
                }
                continue;
            }
        };
        if let Some(want) = &h.invalid {
            failures.push(format!(
                "{name}: validated, but should be refused with `{want}`"
            ));
            continue;
        }
        let run = tokio::time::timeout(
            std::time::Duration::from_secs(60),
            rt.run(pb, h.set.clone()),
        )
        .await;
        let mut report = match run {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                failures.push(format!("{name}: runtime error {e}"));
                continue;
            }
            Err(_) => {
                failures.push(format!("{name}: did not finish in 60 s"));
                continue;
            }
        };
        assert_replays(store.as_ref(), &report).await;
        payloads
            .hydrate_all("default", &mut report.result)
            .await
            .expect("hydrate the result");
        match (&h.expect, &h.failed) {
            (Some(want), _) => {
                if report.status != Status::Completed || &report.result != want {
                    failures.push(format!(
                        "{name}: wanted completed with {want}, got {:?} with {} (error {:?})",
                        report.status, report.result, report.error
                    ));
                }
            }
            (None, Some(code)) => {
                let got = report.error.as_ref().map(|e| e.code.as_str());
                if report.status != Status::Failed || got != Some(code.as_str()) {
                    failures.push(format!(
                        "{name}: wanted failed with `{code}`, got {:?} with {:?}",
                        report.status, report.error
                    ));
                }
            }
            _ => unreachable!(),
        }
    }
    failures
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compat_suite_on_sqlite() {
    // The postgres cases read the local Postgres whatever the log's backend.
    if !mayfly_testkit::postgres() {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let store: Arc<dyn Store> = Arc::new(
        mayfly_store::SqliteStore::open(dir.path().join("m.db"))
            .await
            .expect("store"),
    );
    let failures = suite(store).await;
    assert!(
        failures.is_empty(),
        "{} failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compat_suite_on_postgres() {
    if !mayfly_testkit::postgres() {
        return;
    }
    let url = mayfly_testkit::postgres_url();
    let schema = mayfly_testkit::unique("mayfly_compat");
    let store: Arc<dyn Store> = Arc::new(
        mayfly_store::PostgresStore::connect_schema(&url, &schema)
            .await
            .expect("postgres"),
    );
    let failures = suite(store).await;
    let _ = mayfly_store::PostgresStore::drop_schema(&url, &schema).await;
    assert!(
        failures.is_empty(),
        "{} failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn validation_and_the_worker_know_the_same_nats_operations() {
    assert_eq!(mayfly_dsl::NATS_OPERATIONS, mayfly_tools::NATS_OPERATIONS);
}
