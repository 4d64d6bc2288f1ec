//! The embedded backend: one file per payload under `<dir>/t<hex tenant>/<hex[..2]>/<hex>`.
//! Writes go to a temporary file in the same directory and are renamed into place, so a
//! reader sees a payload whole or not at all, and a crash never leaves a torn payload.

use crate::{Cache, CacheError, check_key, tenant_dir, verify};
use async_trait::async_trait;
use bytes::Bytes;
use std::path::{Path, PathBuf};

/// A cache in a local directory.
pub struct LocalCache {
    dir: PathBuf,
}

impl LocalCache {
    /// A cache rooted at `dir` (created on first write).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        LocalCache { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where `digest` of `tenant` lives (for tools that inspect or repair the store).
    pub fn path_of(&self, tenant: &str, digest: &str) -> Result<PathBuf, CacheError> {
        check_key(tenant, digest)?;
        Ok(self.path(tenant, digest))
    }

    fn path(&self, tenant: &str, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir.join(tenant_dir(tenant)).join(&hex[..2]).join(hex)
    }
}

fn io(e: std::io::Error) -> CacheError {
    CacheError::Unavailable(e.to_string())
}

#[async_trait]
impl Cache for LocalCache {
    async fn put(&self, tenant: &str, digest: &str, bytes: Bytes) -> Result<(), CacheError> {
        check_key(tenant, digest)?;
        verify(digest, &bytes)?;
        let path = self.path(tenant, digest);
        if tokio::fs::try_exists(&path).await.map_err(io)? {
            return Ok(());
        }
        let parent = path
            .parent()
            .ok_or_else(|| CacheError::BadKey(digest.to_owned()))?
            .to_path_buf();
        tokio::task::spawn_blocking(move || -> Result<(), CacheError> {
            std::fs::create_dir_all(&parent).map_err(io)?;
            let mut tmp = tempfile_in(&parent)?;
            std::io::Write::write_all(&mut tmp.1, &bytes).map_err(io)?;
            tmp.1.sync_all().map_err(io)?;
            std::fs::rename(&tmp.0, &path).map_err(io)?;
            Ok(())
        })
        .await
        .map_err(|e| CacheError::Unavailable(e.to_string()))?
    }

    async fn get(&self, tenant: &str, digest: &str) -> Result<Option<Bytes>, CacheError> {
        check_key(tenant, digest)?;
        match tokio::fs::read(self.path(tenant, digest)).await {
            Ok(b) => {
                verify(digest, &b)?;
                Ok(Some(Bytes::from(b)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(e)),
        }
    }

    fn describe(&self) -> String {
        format!("dir:{}", self.dir.display())
    }
}

/// A uniquely named new file in `dir` (concurrent writers of one payload never share one).
fn tempfile_in(dir: &Path) -> Result<(PathBuf, std::fs::File), CacheError> {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let p = dir.join(format!(".tmp-{}-{n}", std::process::id()));
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&p)
        .map_err(io)?;
    Ok((p, f))
}
