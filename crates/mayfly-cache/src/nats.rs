//! The distributed backend: a JetStream object store bucket (chunked, so payloads are not
//! bounded by the NATS max message size). Object names are `t<hex tenant>/<hex digest>`.
//!
//! Retention needs a touch (a put of a stored payload) and a delete that cannot interleave:
//! both rewrite the object's meta record only if it is still the one they read (JetStream's
//! `Nats-Expected-Last-Subject-Sequence` on the meta subject), so a delete never lands on a
//! payload touched after its check, and a touch that loses to a delete stores the bytes anew.

use crate::{Cache, CacheError, Entry, check_key, key_of, tenant_dir, verify};
use async_nats::jetstream::{self, object_store};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::io::AsyncReadExt;

/// How long one payload read may take in all.
const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

fn unavailable(e: impl std::fmt::Display) -> CacheError {
    CacheError::Unavailable(e.to_string())
}

/// A cache in a NATS JetStream object store bucket.
pub struct NatsCache {
    store: object_store::ObjectStore,
    /// The bucket's stream (`OBJ_<bucket>`): its meta records, read and rewritten by sequence.
    stream: jetstream::stream::Stream,
    js: jetstream::Context,
    bucket: String,
}

/// An object's meta record and its stream sequence.
struct Meta {
    seq: u64,
    info: object_store::ObjectInfo,
}

impl NatsCache {
    /// Use bucket `bucket` on `client`, creating it if absent.
    pub async fn open(client: async_nats::Client, bucket: &str) -> Result<Self, CacheError> {
        let js = jetstream::new(client);
        let store = match js.get_object_store(bucket).await {
            Ok(s) => s,
            Err(_) => js
                .create_object_store(object_store::Config {
                    bucket: bucket.to_owned(),
                    description: Some("mayfly shared cache (content-addressed payloads)".into()),
                    ..Default::default()
                })
                .await
                .map_err(unavailable)?,
        };
        let stream = js
            .get_stream(format!("OBJ_{bucket}"))
            .await
            .map_err(unavailable)?;
        Ok(NatsCache {
            store,
            stream,
            js,
            bucket: bucket.to_owned(),
        })
    }

    fn meta_subject(&self, name: &str) -> String {
        use base64::Engine;
        format!(
            "$O.{}.M.{}",
            self.bucket,
            base64::engine::general_purpose::URL_SAFE.encode(name)
        )
    }

    /// The object's current meta record (None: never stored).
    async fn meta(&self, name: &str) -> Result<Option<Meta>, CacheError> {
        match self
            .stream
            .get_last_raw_message_by_subject(&self.meta_subject(name))
            .await
        {
            Ok(m) => Ok(Some(Meta {
                seq: m.sequence,
                info: serde_json::from_slice(&m.payload).map_err(unavailable)?,
            })),
            Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {
                Ok(None)
            }
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Replace the meta record with `info` if `seq` is still the latest; false when another
    /// writer got there first.
    async fn replace_meta(
        &self,
        name: &str,
        seq: u64,
        info: &object_store::ObjectInfo,
    ) -> Result<bool, CacheError> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(async_nats::header::NATS_ROLLUP, "sub");
        headers.insert(
            async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
            seq.to_string().as_str(),
        );
        let body = serde_json::to_vec(info).map_err(unavailable)?;
        let ack = self
            .js
            .publish_with_headers(self.meta_subject(name), headers, body.into())
            .await
            .map_err(unavailable)?;
        match ack.await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => {
                Ok(false)
            }
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Delete bucket `bucket` (tests clean up after themselves).
    pub async fn delete(client: async_nats::Client, bucket: &str) -> Result<(), CacheError> {
        jetstream::new(client)
            .delete_object_store(bucket)
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}

fn name(tenant: &str, digest: &str) -> String {
    format!(
        "{}/{}",
        tenant_dir(tenant),
        digest.trim_start_matches("sha256:")
    )
}

#[async_trait]
impl Cache for NatsCache {
    async fn put(&self, tenant: &str, digest: &str, bytes: Bytes) -> Result<(), CacheError> {
        check_key(tenant, digest)?;
        verify(digest, &bytes)?;
        let name = name(tenant, digest);
        // Already stored: touch it (an object's own mtime is its first put's). A rejected
        // touch means another writer rewrote the record: if it is still stored, that writer
        // just touched it; if a delete won, the bytes are stored anew below. (A full put over
        // a stored object would purge chunks a reader may be streaming.)
        if let Some(Meta { seq, mut info }) = self.meta(&name).await?
            && !info.deleted
        {
            info.description = Some(touched_now());
            if self.replace_meta(&name, seq, &info).await? {
                return Ok(());
            }
            if self.meta(&name).await?.is_some_and(|m| !m.info.deleted) {
                return Ok(());
            }
        }
        self.store
            .put(name.as_str(), &mut bytes.as_ref())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn get(&self, tenant: &str, digest: &str) -> Result<Option<Bytes>, CacheError> {
        check_key(tenant, digest)?;
        let mut obj = match self.store.get(name(tenant, digest)).await {
            Ok(o) => o,
            Err(e) if e.kind() == object_store::GetErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(unavailable(e)),
        };
        let mut buf = Vec::with_capacity(obj.info().size);
        // Chunks purged under a reader (a delete racing it) never arrive: give up rather
        // than wait forever (the block is given back and runs again).
        tokio::time::timeout(READ_TIMEOUT, obj.read_to_end(&mut buf))
            .await
            .map_err(|_| unavailable(format!("reading {digest} stalled")))?
            .map_err(unavailable)?;
        verify(digest, &buf)?;
        Ok(Some(Bytes::from(buf)))
    }

    async fn list(&self) -> Result<Vec<Entry>, CacheError> {
        let mut list = self.store.list().await.map_err(unavailable)?;
        let mut out = Vec::new();
        while let Some(info) = list.next().await {
            let info = info.map_err(unavailable)?;
            if info.deleted {
                continue;
            }
            let Some((tenant, digest)) = info
                .name
                .split_once('/')
                .and_then(|(t, hex)| key_of(t, hex))
            else {
                continue;
            };
            out.push(Entry {
                tenant,
                digest,
                bytes: info.size as u64,
                touched_ms: touched_ms(&info),
            });
        }
        Ok(out)
    }

    async fn delete(&self, tenant: &str, digest: &str, touched: u64) -> Result<bool, CacheError> {
        check_key(tenant, digest)?;
        let name = name(tenant, digest);
        let Some(Meta { seq, info }) = self.meta(&name).await? else {
            return Ok(false);
        };
        if info.deleted || touched_ms(&info) > touched {
            return Ok(false);
        }
        let nuid = info.nuid.clone();
        let gone = object_store::ObjectInfo {
            deleted: true,
            size: 0,
            chunks: 0,
            ..info
        };
        // Only if nothing touched it since this check; then its chunks go.
        if !self.replace_meta(&name, seq, &gone).await? {
            return Ok(false);
        }
        self.stream
            .purge()
            .filter(format!("$O.{}.C.{nuid}", self.bucket))
            .await
            .map_err(unavailable)?;
        Ok(true)
    }

    fn describe(&self) -> String {
        format!("nats-object-store:{}", self.bucket)
    }
}

/// The description a touched object carries (`touched:<unix ms>`).
fn touched_now() -> String {
    format!("touched:{}", mayfly_types::now_ms())
}

/// When an object was last stored or touched, unix ms.
fn touched_ms(info: &object_store::ObjectInfo) -> u64 {
    let put = info
        .modified
        .map_or(0, |t| (t.unix_timestamp_nanos() / 1_000_000).max(0) as u64);
    let touched = info
        .description
        .as_deref()
        .and_then(|d| d.strip_prefix("touched:"))
        .and_then(|ms| ms.parse::<u64>().ok())
        .unwrap_or(0);
    put.max(touched)
}
