//! The shared cache: the state vehicle between blocks (DESIGN §2, seeds: "compute/data
//! boundary"). Large step results leave the event log: the worker stores them here by content
//! digest and the event carries a [`CacheRef`]; the next block hydrates a ref only when one of
//! its templates binds it. Table-shaped results are stored as Arrow IPC, anything else as JSON.
//!
//! Keys are `(tenant, digest)`: a ref is only ever resolved in the tenant of the execution
//! that holds it, so a digest seen (or guessed) elsewhere cannot read another tenant's data.
//! Every read verifies the digest of the bytes it returns.
//!
//! Backends: [`LocalCache`] (a directory; the embedded default) and [`NatsCache`] (a JetStream
//! object store bucket; distributed mode). Both pass [`conformance`].

use async_trait::async_trait;
use bytes::Bytes;
use mayfly_types::{CacheFormat, CacheRef, is_sha256_digest};
use serde_json::{Map, Value};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

pub mod conformance;
mod local;
mod nats;
pub mod table;

pub use local::LocalCache;
pub use nats::NatsCache;

/// Default inline limit: results whose JSON is larger go to the cache (DESIGN §3: 16 KiB).
pub const DEFAULT_INLINE_LIMIT: usize = 16 * 1024;

/// Cache failures.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CacheError {
    #[error("cache unavailable: {0}")]
    Unavailable(String),
    #[error("invalid cache key: {0}")]
    BadKey(String),
    #[error("cached payload {0} is missing")]
    Missing(String),
    #[error("cached payload {digest} is corrupt: {detail}")]
    Corrupt { digest: String, detail: String },
}

impl CacheError {
    /// Stable error code (used as the step error code when a block cannot hydrate).
    pub fn code(&self) -> &'static str {
        match self {
            CacheError::Unavailable(_) => "cache_unavailable",
            CacheError::BadKey(_) => "cache_bad_key",
            CacheError::Missing(_) => "cache_missing",
            CacheError::Corrupt { .. } => "cache_corrupt",
        }
    }
}

/// One stored payload, as retention sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub tenant: String,
    pub digest: String,
    pub bytes: u64,
    /// When it was last stored (a put of a payload already there counts), unix ms.
    pub touched_ms: u64,
}

/// A content-addressed blob store scoped by tenant.
#[async_trait]
pub trait Cache: Send + Sync {
    /// Store `bytes`, whose digest must be `digest`, in `tenant`'s scope. Idempotent; a put
    /// of a payload already stored marks it touched now, so retention's grace period covers
    /// a writer that is about to reference it.
    async fn put(&self, tenant: &str, digest: &str, bytes: Bytes) -> Result<(), CacheError>;
    /// The bytes stored under `digest` in `tenant`'s scope (None when absent). Verified.
    async fn get(&self, tenant: &str, digest: &str) -> Result<Option<Bytes>, CacheError>;
    /// Every stored payload (retention's sweep).
    async fn list(&self) -> Result<Vec<Entry>, CacheError>;
    /// Delete a payload unless it was touched after `touched_ms` (a put since the listing
    /// that chose it keeps it). True when it was deleted.
    async fn delete(&self, tenant: &str, digest: &str, touched_ms: u64)
    -> Result<bool, CacheError>;
    /// Where the cache lives, for logs and `/healthz`.
    fn describe(&self) -> String;
}

/// Validate a key (shared by every backend). Any tenant name is a valid scope: backends
/// place it in paths and object names only hex-encoded ([`tenant_dir`]).
pub(crate) fn check_key(tenant: &str, digest: &str) -> Result<(), CacheError> {
    if tenant.is_empty() || tenant.len() > 256 {
        return Err(CacheError::BadKey(format!("tenant `{tenant}`")));
    }
    if !is_sha256_digest(digest) {
        return Err(CacheError::BadKey(format!("digest `{digest}`")));
    }
    Ok(())
}

/// The tenant's component of a path or object name: hex, so that no tenant name (spaces,
/// `/`, `..`) can escape its scope or collide with another's.
pub(crate) fn tenant_dir(tenant: &str) -> String {
    format!("t{}", hex::encode(tenant.as_bytes()))
}

/// The `(tenant, digest)` key a backend's stored name stands for: the inverse of
/// [`tenant_dir`] plus the digest's hex (None for anything else, e.g. temporary files).
pub(crate) fn key_of(tenant_part: &str, hex_digest: &str) -> Option<(String, String)> {
    let tenant = String::from_utf8(hex::decode(tenant_part.strip_prefix('t')?).ok()?).ok()?;
    let digest = format!("sha256:{hex_digest}");
    is_sha256_digest(&digest).then_some((tenant, digest))
}

pub(crate) fn verify(digest: &str, bytes: &[u8]) -> Result<(), CacheError> {
    let actual = mayfly_trust::sha256_digest(bytes);
    if actual != digest {
        return Err(CacheError::Corrupt {
            digest: digest.to_owned(),
            detail: format!("content hashes to {actual}"),
        });
    }
    Ok(())
}

/// One payload to store: its ref and its bytes.
#[derive(Clone, Debug)]
pub struct Blob {
    pub cache_ref: CacheRef,
    pub bytes: Bytes,
}

/// Serialized size without building the text (this runs for every result recorded).
pub fn json_len(v: &Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    match serde_json::to_writer(&mut c, v) {
        Ok(()) => c.0,
        Err(_) => usize::MAX,
    }
}

/// Encode a whole value as one blob: Arrow when table-shaped, JSON otherwise.
pub fn encode(v: &Value) -> Blob {
    if let Some((bytes, columns)) = table::encode(v) {
        let count = v.as_array().map(|a| a.len() as u64);
        return Blob {
            cache_ref: CacheRef {
                digest: mayfly_trust::sha256_digest(&bytes),
                format: CacheFormat::Arrow,
                bytes: bytes.len() as u64,
                count,
                columns,
                item: None,
            },
            bytes: Bytes::from(bytes),
        };
    }
    let bytes = serde_json::to_vec(v).unwrap_or_default();
    Blob {
        cache_ref: CacheRef {
            digest: mayfly_trust::sha256_digest(&bytes),
            format: CacheFormat::Json,
            bytes: bytes.len() as u64,
            count: v.as_array().map(|a| a.len() as u64),
            columns: Vec::new(),
            item: None,
        },
        bytes: Bytes::from(bytes),
    }
}

/// Decode a blob's bytes (the whole payload; `item` is applied by the caller).
pub fn decode(format: CacheFormat, bytes: &[u8]) -> Result<Value, String> {
    match format {
        CacheFormat::Json => serde_json::from_slice(bytes).map_err(|e| format!("json: {e}")),
        CacheFormat::Arrow => table::decode(bytes),
    }
}

/// Split a value for an event: parts whose JSON exceeds `limit` bytes are replaced by refs
/// (pure; the blobs are returned for the caller to store). A record keeps its small fields
/// inline so routing conditions can still read them (its largest fields go first); a table
/// becomes one Arrow blob; any other large value one JSON blob. A stored value may itself
/// hold refs (a loop's aggregate of per-item refs): hydration follows them.
pub fn split(v: Value, limit: usize) -> (Value, Vec<Blob>) {
    let mut blobs = Vec::new();
    let out = split_into(v, limit, &mut blobs);
    (out, blobs)
}

fn split_into(v: Value, limit: usize, blobs: &mut Vec<Blob>) -> Value {
    if json_len(&v) <= limit || CacheRef::parse(&v).is_some() {
        return v;
    }
    if let Value::Object(m) = &v
        && !table::is_table(&v)
    {
        // A record stays a record (its small fields remain readable by routing, and `set`
        // can still add to it): its largest fields go by ref until it fits.
        let mut out = Map::new();
        let mut inner = Vec::new();
        for (k, field) in m {
            out.insert(k.clone(), split_into(field.clone(), limit, &mut inner));
        }
        let mut sizes: Vec<(usize, String)> = out
            .iter()
            .filter(|(_, f)| CacheRef::parse(f).is_none())
            .map(|(k, f)| (json_len(f), k.clone()))
            .collect();
        sizes.sort_by(|a, b| b.cmp(a));
        for (_, k) in sizes {
            if json_len(&Value::Object(out.clone())) <= limit {
                break;
            }
            if let Some(f) = out.get_mut(&k) {
                let blob = encode(f);
                *f = blob.cache_ref.to_value();
                inner.push(blob);
            }
        }
        let out = Value::Object(out);
        if json_len(&out) <= limit {
            blobs.extend(inner);
            return out;
        }
        // Thousands of tiny fields: no field is worth a ref; store the record whole.
    }
    let blob = encode(&v);
    let r = blob.cache_ref.to_value();
    blobs.push(blob);
    r
}

/// Bounded memo of decoded payloads (a worker hydrating loop items reads one table once).
struct Memo {
    entries: HashMap<(String, String), (Arc<Value>, u64)>,
    order: VecDeque<(String, String)>,
    bytes: u64,
}

const MEMO_BYTES: u64 = 64 * 1024 * 1024;

/// The cache as blocks use it: store a result's large parts, hydrate refs.
pub struct Payloads {
    cache: Arc<dyn Cache>,
    inline_limit: usize,
    memo: Mutex<Memo>,
}

impl Payloads {
    pub fn new(cache: Arc<dyn Cache>, inline_limit: usize) -> Self {
        Payloads {
            cache,
            inline_limit,
            memo: Mutex::new(Memo {
                entries: HashMap::new(),
                order: VecDeque::new(),
                bytes: 0,
            }),
        }
    }

    /// Results up to this many bytes of JSON stay inline.
    pub fn inline_limit(&self) -> usize {
        self.inline_limit
    }

    pub fn cache(&self) -> &Arc<dyn Cache> {
        &self.cache
    }

    /// Replace the large parts of `v` by refs, storing them first (so a ref in an event
    /// always points at stored bytes).
    pub async fn externalize(&self, tenant: &str, v: Value) -> Result<Value, CacheError> {
        let (out, blobs) = split(v, self.inline_limit);
        for b in blobs {
            self.cache.put(tenant, &b.cache_ref.digest, b.bytes).await?;
        }
        Ok(out)
    }

    /// The value a ref stands for (one element when the ref names an `item`).
    pub async fn hydrate(&self, tenant: &str, r: &CacheRef) -> Result<Value, CacheError> {
        let whole = self.whole(tenant, r).await?;
        match r.item {
            None => Ok((*whole).clone()),
            Some(i) => whole
                .as_array()
                .and_then(|a| a.get(i as usize))
                .cloned()
                .ok_or_else(|| CacheError::Corrupt {
                    digest: r.digest.clone(),
                    detail: format!("has no item {i}"),
                }),
        }
    }

    /// Replace every ref inside `v` by its value.
    pub async fn hydrate_all(&self, tenant: &str, v: &mut Value) -> Result<(), CacheError> {
        if let Some(r) = CacheRef::parse(v) {
            *v = self.hydrate(tenant, &r).await?;
            // A stored value can hold refs of its own (an aggregate of per-item refs).
            return Box::pin(self.hydrate_all(tenant, v)).await;
        }
        match v {
            Value::Object(m) => {
                for field in m.values_mut() {
                    Box::pin(self.hydrate_all(tenant, field)).await?;
                }
            }
            Value::Array(a) => {
                for item in a.iter_mut() {
                    Box::pin(self.hydrate_all(tenant, item)).await?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    async fn whole(&self, tenant: &str, r: &CacheRef) -> Result<Arc<Value>, CacheError> {
        let key = (tenant.to_owned(), r.digest.clone());
        if let Some(v) = self.memo_get(&key) {
            return Ok(v);
        }
        let bytes = self
            .cache
            .get(tenant, &r.digest)
            .await?
            .ok_or_else(|| CacheError::Missing(r.digest.clone()))?;
        let v = Arc::new(
            decode(r.format, &bytes).map_err(|detail| CacheError::Corrupt {
                digest: r.digest.clone(),
                detail,
            })?,
        );
        self.memo_put(key, v.clone(), bytes.len() as u64);
        Ok(v)
    }

    fn memo_get(&self, key: &(String, String)) -> Option<Arc<Value>> {
        self.memo
            .lock()
            .ok()?
            .entries
            .get(key)
            .map(|(v, _)| v.clone())
    }

    fn memo_put(&self, key: (String, String), v: Arc<Value>, size: u64) {
        let Ok(mut m) = self.memo.lock() else { return };
        if size > MEMO_BYTES / 4 || m.entries.contains_key(&key) {
            return;
        }
        // Oldest first out; sizes are the stored sizes, a proxy for decoded memory.
        while m.bytes + size > MEMO_BYTES {
            let Some(old) = m.order.pop_front() else {
                break;
            };
            if let Some((_, n)) = m.entries.remove(&old) {
                m.bytes = m.bytes.saturating_sub(n);
            }
        }
        m.order.push_back(key.clone());
        m.entries.insert(key, (v, size));
        m.bytes += size;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rows(n: usize) -> Value {
        Value::Array(
            (0..n)
                .map(|i| json!({"id": i, "name": format!("user-{i}")}))
                .collect(),
        )
    }

    #[test]
    fn small_values_stay_inline() {
        for v in [
            json!(null),
            json!(1),
            json!("x"),
            json!({"a": [1, 2]}),
            rows(3),
        ] {
            let (out, blobs) = split(v.clone(), 1024);
            assert_eq!(out, v);
            assert!(blobs.is_empty());
        }
    }

    #[test]
    fn a_large_table_becomes_one_arrow_ref() {
        let v = rows(2000);
        let (out, blobs) = split(v.clone(), 1024);
        let r = CacheRef::parse(&out).expect("a ref");
        assert_eq!(r.format, CacheFormat::Arrow);
        assert_eq!(r.count, Some(2000));
        assert_eq!(r.columns, vec!["id", "name"]);
        assert_eq!(blobs.len(), 1);
        assert_eq!(blobs[0].cache_ref, r);
        assert_eq!(r.digest, mayfly_trust::sha256_digest(&blobs[0].bytes));
        assert_eq!(decode(r.format, &blobs[0].bytes).expect("decodes"), v);
    }

    #[test]
    fn a_record_keeps_small_fields_inline() {
        let v = json!({"status": "ok", "rows": rows(2000), "blob": "x".repeat(5000)});
        let (out, blobs) = split(v, 1024);
        assert_eq!(out["status"], "ok");
        let rows_ref = CacheRef::parse(&out["rows"]).expect("rows by ref");
        assert_eq!(rows_ref.format, CacheFormat::Arrow);
        let blob_ref = CacheRef::parse(&out["blob"]).expect("blob by ref");
        assert_eq!(blob_ref.format, CacheFormat::Json);
        assert_eq!(blob_ref.count, None);
        assert_eq!(blobs.len(), 2);
    }

    #[test]
    fn a_record_of_medium_fields_sheds_its_largest_until_it_fits() {
        let mut m = Map::new();
        m.insert("status".into(), json!("ok"));
        for i in 0..8 {
            m.insert(format!("f{i}"), json!("y".repeat(300 + i * 10)));
        }
        let (out, blobs) = split(Value::Object(m), 2048);
        assert_eq!(out["status"], "ok", "still a record");
        assert!(json_len(&out) <= 2048);
        assert!(
            CacheRef::parse(&out["f7"]).is_some(),
            "the largest went first"
        );
        assert!(out["f0"].is_string(), "small enough ones stay");
        let refs = out.as_object().map_or(0, |o| {
            o.values().filter(|f| CacheRef::parse(f).is_some()).count()
        });
        assert_eq!(blobs.len(), refs);
    }

    #[test]
    fn a_record_of_many_tiny_fields_is_stored_whole() {
        let mut m = Map::new();
        for i in 0..400 {
            m.insert(format!("f{i}"), json!(i));
        }
        let v = Value::Object(m);
        let (out, blobs) = split(v.clone(), 1024);
        let r = CacheRef::parse(&out).expect("whole record by ref");
        assert_eq!(blobs.len(), 1, "no orphan blobs");
        assert_eq!(decode(r.format, &blobs[0].bytes).expect("decodes"), v);
    }

    #[test]
    fn large_non_table_lists_are_json_refs_with_a_count() {
        let v = Value::Array((0..3000).map(|i| json!([i, i])).collect());
        let (out, blobs) = split(v.clone(), 1024);
        let r = CacheRef::parse(&out).expect("a ref");
        assert_eq!((r.format, r.count), (CacheFormat::Json, Some(3000)));
        assert_eq!(decode(r.format, &blobs[0].bytes).expect("decodes"), v);
    }

    #[test]
    fn existing_refs_are_not_stored_again() {
        let (out, _) = split(rows(2000), 1024);
        let (again, blobs) = split(out.clone(), 10);
        assert_eq!(again, out);
        assert!(blobs.is_empty());
    }

    #[test]
    fn splitting_is_deterministic() {
        let v = json!({"a": rows(500), "b": "z".repeat(4000)});
        let (a, _) = split(v.clone(), 1024);
        let (b, _) = split(v, 1024);
        assert_eq!(a, b);
    }

    #[test]
    fn keys_are_validated() {
        let d = mayfly_trust::sha256_digest(b"x");
        assert!(check_key("acme", &d).is_ok());
        assert!(matches!(check_key("", &d), Err(CacheError::BadKey(_))));
        for t in ["../etc", "a/b", ".hidden", "Acme Corp"] {
            assert!(check_key(t, &d).is_ok(), "{t}");
            assert!(
                tenant_dir(t).bytes().all(|b| b.is_ascii_alphanumeric()),
                "{t}"
            );
        }
        assert_ne!(tenant_dir("ab"), tenant_dir("a/b"));
        assert!(check_key("acme", "sha256:zz").is_err());
        assert!(verify(&d, b"y").is_err());
        assert!(verify(&d, b"x").is_ok());
    }
}
