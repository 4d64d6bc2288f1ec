//! The distributed backend: a JetStream object store bucket (chunked, so payloads are not
//! bounded by the NATS max message size). Object names are `t<hex tenant>/<hex digest>`.

use crate::{Cache, CacheError, check_key, tenant_dir, verify};
use async_nats::jetstream::{self, object_store};
use async_trait::async_trait;
use bytes::Bytes;
use tokio::io::AsyncReadExt;

fn unavailable(e: impl std::fmt::Display) -> CacheError {
    CacheError::Unavailable(e.to_string())
}

/// A cache in a NATS JetStream object store bucket.
pub struct NatsCache {
    store: object_store::ObjectStore,
    bucket: String,
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
        Ok(NatsCache {
            store,
            bucket: bucket.to_owned(),
        })
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
        match self.store.info(&name).await {
            Ok(info) if !info.deleted => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == object_store::InfoErrorKind::NotFound => {}
            Err(e) => return Err(unavailable(e)),
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
        obj.read_to_end(&mut buf).await.map_err(unavailable)?;
        verify(digest, &buf)?;
        Ok(Some(Bytes::from(buf)))
    }

    fn describe(&self) -> String {
        format!("nats-object-store:{}", self.bucket)
    }
}
