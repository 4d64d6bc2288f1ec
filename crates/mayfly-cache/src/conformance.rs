//! The cache conformance suite: every backend runs exactly these checks on an empty cache.

use crate::{Cache, CacheError, Payloads};
use bytes::Bytes;
use serde_json::{Value, json};
use std::sync::Arc;

fn digest(b: &[u8]) -> String {
    mayfly_trust::sha256_digest(b)
}

/// Run every check.
pub async fn run_all(c: Arc<dyn Cache>) {
    put_get_round_trip(c.as_ref()).await;
    absent_is_none(c.as_ref()).await;
    put_is_idempotent(c.as_ref()).await;
    tenants_are_isolated(c.as_ref()).await;
    wrong_digest_is_refused(c.as_ref()).await;
    bad_keys_are_refused(c.as_ref()).await;
    large_payloads_round_trip(c.as_ref()).await;
    concurrent_puts_of_one_payload(c.clone()).await;
    list_touch_and_delete(c.as_ref()).await;
    payloads_externalize_and_hydrate(c).await;
}

pub async fn put_get_round_trip(c: &dyn Cache) {
    let b = Bytes::from_static(b"hello cache");
    c.put("acme", &digest(&b), b.clone()).await.expect("put");
    assert_eq!(c.get("acme", &digest(&b)).await.expect("get"), Some(b));
}

pub async fn absent_is_none(c: &dyn Cache) {
    let d = digest(b"never stored");
    assert_eq!(c.get("acme", &d).await.expect("get"), None);
}

pub async fn put_is_idempotent(c: &dyn Cache) {
    let b = Bytes::from_static(b"twice");
    c.put("acme", &digest(&b), b.clone())
        .await
        .expect("first put");
    c.put("acme", &digest(&b), b.clone())
        .await
        .expect("second put");
    assert_eq!(c.get("acme", &digest(&b)).await.expect("get"), Some(b));
}

/// Retention's view: the listing names each payload with its tenant (any tenant name), size
/// and touch time; a put of a stored payload touches it; a delete spares a payload touched
/// after the listing that chose it, and removes only that tenant's copy.
pub async fn list_touch_and_delete(c: &dyn Cache) {
    let b = Bytes::from_static(b"retained or not");
    let d = digest(&b);
    let (t1, t2) = ("retention", "retention/../ x");
    c.put(t1, &d, b.clone()).await.expect("put");
    c.put(t2, &d, b.clone()).await.expect("put");
    let entry = |t: &'static str| {
        let d = d.clone();
        async move {
            c.list()
                .await
                .expect("list")
                .into_iter()
                .find(|e| e.tenant == t && e.digest == d)
        }
    };
    let first = entry(t1).await.expect("listed");
    assert_eq!(first.bytes, b.len() as u64);
    assert!(first.touched_ms > 0);
    assert!(
        entry(t2).await.is_some(),
        "the other tenant's copy is listed"
    );
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    c.put(t1, &d, b.clone()).await.expect("put again");
    let again = entry(t1).await.expect("listed");
    assert!(
        again.touched_ms > first.touched_ms,
        "a put of a stored payload touches it ({} → {})",
        first.touched_ms,
        again.touched_ms
    );
    assert!(
        !c.delete(t1, &d, first.touched_ms).await.expect("delete"),
        "touched after the listing: spared"
    );
    assert_eq!(c.get(t1, &d).await.expect("get"), Some(b.clone()));
    assert!(c.delete(t1, &d, again.touched_ms).await.expect("delete"));
    assert_eq!(c.get(t1, &d).await.expect("get"), None);
    assert!(entry(t1).await.is_none(), "gone from the listing");
    assert!(
        !c.delete(t1, &d, u64::MAX).await.expect("delete"),
        "deleting what is absent is a no-op"
    );
    assert_eq!(
        c.get(t2, &d).await.expect("get"),
        Some(b.clone()),
        "the other tenant's copy stays"
    );
    c.put(t1, &d, b.clone())
        .await
        .expect("stored again after a delete");
    assert_eq!(c.get(t1, &d).await.expect("get"), Some(b));
}

pub async fn tenants_are_isolated(c: &dyn Cache) {
    let b = Bytes::from_static(b"only for acme");
    c.put("acme", &digest(&b), b.clone()).await.expect("put");
    assert_eq!(
        c.get("globex", &digest(&b)).await.expect("get"),
        None,
        "a digest never reads another tenant's payload"
    );
}

pub async fn wrong_digest_is_refused(c: &dyn Cache) {
    let d = digest(b"the real content");
    let err = c
        .put("acme", &d, Bytes::from_static(b"something else"))
        .await
        .expect_err("bytes must match their digest");
    assert!(matches!(err, CacheError::Corrupt { .. }), "{err}");
    assert_eq!(c.get("acme", &d).await.expect("get"), None);
}

pub async fn bad_keys_are_refused(c: &dyn Cache) {
    let b = Bytes::from_static(b"x");
    let err = c
        .put("", &digest(&b), b.clone())
        .await
        .expect_err("empty tenant");
    assert!(matches!(err, CacheError::BadKey(_)), "{err}");
    // Any other tenant name is its own scope, whatever characters it holds.
    for tenant in ["../x", "a/b", ".x", "Acme Corp"] {
        c.put(tenant, &digest(&b), b.clone()).await.expect("put");
        assert_eq!(
            c.get(tenant, &digest(&b)).await.expect("get"),
            Some(b.clone())
        );
    }
    assert_eq!(
        c.get("ab", &digest(&b)).await.expect("get"),
        None,
        "`a/b` is not `ab`"
    );
    let err = c
        .get("acme", "sha256:nothex")
        .await
        .expect_err("bad digest");
    assert!(matches!(err, CacheError::BadKey(_)), "{err}");
}

/// Larger than a NATS message (1 MiB): the backend must chunk.
pub async fn large_payloads_round_trip(c: &dyn Cache) {
    let b: Bytes = (0..3 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect::<Vec<u8>>()
        .into();
    c.put("acme", &digest(&b), b.clone()).await.expect("put");
    let got = c
        .get("acme", &digest(&b))
        .await
        .expect("get")
        .expect("present");
    assert_eq!(got.len(), b.len());
    assert!(got == b, "content differs");
}

pub async fn concurrent_puts_of_one_payload(c: Arc<dyn Cache>) {
    let b = Bytes::from(vec![7u8; 200_000]);
    let d = digest(&b);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (c, b, d) = (c.clone(), b.clone(), d.clone());
        tasks.push(tokio::spawn(async move { c.put("acme", &d, b).await }));
    }
    for t in tasks {
        t.await.expect("join").expect("put");
    }
    assert_eq!(c.get("acme", &d).await.expect("get"), Some(b));
}

/// The block-facing layer on top of the backend: a result with a large table and a large
/// text externalizes to refs, and hydrates back to the same value (and one item of it).
pub async fn payloads_externalize_and_hydrate(c: Arc<dyn Cache>) {
    let p = Payloads::new(c, 1024);
    let rows: Vec<Value> = (0..1500)
        .map(|i| json!({"id": i, "name": format!("n{i}"), "score": i as f64 * 0.5}))
        .collect();
    let original = json!({"status": "ok", "rows": rows, "text": "t".repeat(3000)});
    let stored = p
        .externalize("acme", original.clone())
        .await
        .expect("externalize");
    assert_eq!(stored["status"], "ok");
    let r = mayfly_types::CacheRef::parse(&stored["rows"]).expect("rows by ref");
    assert_eq!(r.count, Some(1500));
    let mut back = stored.clone();
    p.hydrate_all("acme", &mut back).await.expect("hydrate");
    assert_eq!(back, original);
    let item = p.hydrate("acme", &r.element(7)).await.expect("item");
    assert_eq!(item, json!({"id": 7, "name": "n7", "score": 3.5}));
    let err = p
        .hydrate("acme", &r.element(1500))
        .await
        .expect_err("out of range");
    assert!(matches!(err, CacheError::Corrupt { .. }));
    let mut other = stored;
    let err = p
        .hydrate_all("globex", &mut other)
        .await
        .expect_err("another tenant cannot hydrate it");
    assert!(matches!(err, CacheError::Missing(_)), "{err}");
}
