//! The embedded backend: one file per payload under `<dir>/t<hex tenant>/<hex[..2]>/<hex>`.
//! Writes go to a temporary file in the same directory and are renamed into place, so a
//! reader sees a payload whole or not at all, and a crash never leaves a torn payload.

use crate::{Cache, CacheError, Entry, check_key, key_of, tenant_dir, verify};
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
            let p = path.clone();
            let touched = tokio::task::spawn_blocking(move || touch(&p))
                .await
                .map_err(|e| CacheError::Unavailable(e.to_string()))??;
            if touched {
                return Ok(());
            }
            // Deleted since the check: store it anew.
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
        let path = self.path(tenant, digest);
        for last in [false, true] {
            match tokio::fs::read(&path).await {
                Ok(b) => {
                    verify(digest, &b)?;
                    return Ok(Some(Bytes::from(b)));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    // Moved aside by a delete that may yet spare it: look again once.
                    let p = path.clone();
                    let judged = tokio::task::spawn_blocking(move || being_judged(&p))
                        .await
                        .unwrap_or(false);
                    if last || !judged {
                        return Ok(None);
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Err(e) => return Err(io(e)),
            }
        }
        Ok(None)
    }

    async fn list(&self) -> Result<Vec<Entry>, CacheError> {
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || list_dir(&dir))
            .await
            .map_err(|e| CacheError::Unavailable(e.to_string()))?
    }

    async fn delete(
        &self,
        tenant: &str,
        digest: &str,
        touched_ms: u64,
    ) -> Result<bool, CacheError> {
        check_key(tenant, digest)?;
        let path = self.path(tenant, digest);
        tokio::task::spawn_blocking(move || {
            match std::fs::metadata(&path) {
                Ok(m) if mtime_ms(&m) > touched_ms => return Ok(false),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
                Err(e) => return Err(io(e)),
            }
            // Out of the way, then judged again: a touch after the rename finds no file (or
            // sees its file moved) and stores the payload anew; one before it shows in the
            // tombstone's mtime.
            let tomb = path.with_extension(format!("gc-{}", std::process::id()));
            match std::fs::rename(&path, &tomb) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
                Err(e) => return Err(io(e)),
            }
            let m = std::fs::metadata(&tomb).map_err(io)?;
            if mtime_ms(&m) > touched_ms {
                std::fs::rename(&tomb, &path).map_err(io)?;
                return Ok(false);
            }
            std::fs::remove_file(&tomb).map_err(io)?;
            Ok(true)
        })
        .await
        .map_err(|e| CacheError::Unavailable(e.to_string()))?
    }

    fn describe(&self) -> String {
        format!("dir:{}", self.dir.display())
    }
}

fn mtime_ms(m: &std::fs::Metadata) -> u64 {
    m.modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64)
}

/// Mark a stored payload as just written (retention's grace period starts again); false
/// when it is gone (a delete got there first).
fn touch(path: &Path) -> Result<bool, CacheError> {
    use std::os::unix::fs::MetadataExt;
    let f = match std::fs::OpenOptions::new().append(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io(e)),
    };
    f.set_modified(std::time::SystemTime::now()).map_err(io)?;
    // A delete may have moved the file aside meanwhile: only a file still in place counts.
    let mine = f.metadata().map_err(io)?;
    match std::fs::metadata(path) {
        Ok(m) => Ok(m.dev() == mine.dev() && m.ino() == mine.ino()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io(e)),
    }
}

/// True when a delete has `path` moved aside right now (it may still be spared).
fn being_judged(path: &Path) -> bool {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return false;
    };
    let prefix = format!("{name}.gc-");
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries.flatten().any(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(&prefix))
        })
    })
}

/// `<dir>/t<hex tenant>/<xx>/<hex>`: every payload file (temporary files are skipped).
fn list_dir(dir: &Path) -> Result<Vec<Entry>, CacheError> {
    let read = |p: &Path| match std::fs::read_dir(p) {
        Ok(r) => Ok(Some(r)),
        Err(_) if !p.is_dir() => Ok(None),
        Err(e) => Err(io(e)),
    };
    let mut out = Vec::new();
    let Some(tenants) = read(dir)? else {
        return Ok(out);
    };
    for t in tenants {
        let t = t.map_err(io)?;
        let Some(tenant_part) = t.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        for shard in read(&t.path())?.into_iter().flatten() {
            let shard = shard.map_err(io)?;
            for f in read(&shard.path())?.into_iter().flatten() {
                let f = f.map_err(io)?;
                let Some((tenant, digest)) =
                    f.file_name().to_str().and_then(|n| key_of(&tenant_part, n))
                else {
                    continue;
                };
                let m = match f.metadata() {
                    Ok(m) => m,
                    // Deleted since the directory was read (another collection).
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(io(e)),
                };
                out.push(Entry {
                    tenant,
                    digest,
                    bytes: m.len(),
                    touched_ms: mtime_ms(&m),
                });
            }
        }
    }
    Ok(out)
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
