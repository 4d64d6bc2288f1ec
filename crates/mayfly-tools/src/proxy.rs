//! The egress proxy: how sandboxed tenant code reaches the network under a policy that
//! restricts it (`public`, an allow-list).
//!
//! A sandbox cannot check the addresses its code connects to, so it gets no network of its
//! own. Instead the runtime runs one proxy per tenant and rule set, listening on a Unix
//! socket that is bound into that tenant's sandboxes only; the sandbox's keeper
//! ([`crate::keeper`]) relays `127.0.0.1:3128` inside to it, and the sandbox's environment
//! names it as `http_proxy`/`https_proxy`/`all_proxy`. Every destination is resolved and
//! checked by the same [`Guard`] as the worker-side tools, and the proxy connects to the
//! checked address (a name that answers differently the second time gains nothing).
//!
//! It speaks HTTP proxy: `CONNECT host:port` (TLS and any other TCP stream) and
//! absolute-form `http://` requests (one per connection, forwarded with `Connection:
//! close`). A refusal is `403` with reason `egress_denied` and the why in the body;
//! a destination that does not answer is `502 connection_failed` (`504 timeout` after
//! 10 s).

use crate::egress::Guard;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener, UnixStream};

/// Where sandboxed code finds the proxy: the keeper's port inside the sandbox.
pub const PORT_INSIDE: u16 = 3128;
/// Where the proxy's socket is bound inside a sandbox.
pub const SOCKET_INSIDE: &str = "/run/mayfly-egress.sock";

/// A request head larger than this is refused (`431`).
const MAX_HEAD: usize = 64 * 1024;
/// Time for a client to send its request head, and for a destination to accept.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections one proxy serves at once (a tenant cannot exhaust the host's descriptors);
/// beyond it, new ones wait to be accepted.
const MAX_CONNECTIONS: usize = 512;

/// One running proxy; stops (and removes its socket) when dropped.
#[derive(Debug)]
pub struct EgressProxy {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl EgressProxy {
    /// Listen on `path` (connectable by anyone who can reach the file: its directory is the
    /// gate) and serve every connection under `guard`. Needs a tokio runtime.
    pub fn start(guard: Guard, path: PathBuf) -> std::io::Result<EgressProxy> {
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)?;
        // Sandboxed code may run as the tenant's own uid (the runtime run by root).
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))?;
        let guard = Arc::new(guard);
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        let task = tokio::spawn(async move {
            loop {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                match listener.accept().await {
                    Ok((conn, _)) => {
                        let guard = guard.clone();
                        tokio::spawn(async move {
                            let _ = serve(conn, &guard).await;
                            drop(slot);
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "egress proxy: accept");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
        Ok(EgressProxy { path, task })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for EgressProxy {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// An answer the proxy gives instead of a connection.
struct Refusal {
    status: &'static str,
    code: &'static str,
    message: String,
}

fn refuse(status: &'static str, code: &'static str, message: impl Into<String>) -> Refusal {
    Refusal {
        status,
        code,
        message: message.into(),
    }
}

async fn serve(mut conn: UnixStream, guard: &Guard) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(4096);
    let head = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut conn, &mut buf)).await {
        Ok(Ok(Some(n))) => n,
        Ok(Ok(None)) => {
            return answer(
                &mut conn,
                refuse("431", "bad_request", "request head too large"),
            )
            .await;
        }
        Ok(Err(e)) => return Err(e),
        Err(_) => return Ok(()),
    };
    match open(guard, &buf[..head]).await {
        Err(r) => answer(&mut conn, r).await,
        Ok((mut upstream, first)) => {
            match first {
                // CONNECT: the tunnel is up; whatever the client sent after its head is
                // the stream's first bytes.
                None => {
                    conn.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                        .await?
                }
                Some(head) => upstream.write_all(&head).await?,
            }
            upstream.write_all(&buf[head..]).await?;
            tokio::io::copy_bidirectional(&mut conn, &mut upstream).await?;
            Ok(())
        }
    }
}

/// Read until the end of the request head; its length, or None when it is too large.
async fn read_head(conn: &mut UnixStream, buf: &mut Vec<u8>) -> std::io::Result<Option<usize>> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Ok(Some(i + 4));
        }
        if buf.len() > MAX_HEAD {
            return Ok(None);
        }
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Check and connect the request of `head`: the upstream stream, and the head to send it
/// first (None for a CONNECT tunnel).
async fn open(guard: &Guard, head: &[u8]) -> Result<(TcpStream, Option<Vec<u8>>), Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) | Err(_) => {
            return Err(refuse("400", "bad_request", "not an HTTP proxy request"));
        }
    }
    let (Some(method), Some(target)) = (req.method, req.path) else {
        return Err(refuse("400", "bad_request", "not an HTTP proxy request"));
    };
    if method.eq_ignore_ascii_case("CONNECT") {
        let (host, port) = authority(target).ok_or_else(|| {
            refuse(
                "400",
                "bad_request",
                format!("CONNECT `{target}`: not host:port"),
            )
        })?;
        return Ok((dial(guard, &host, port).await?, None));
    }
    let url = url::Url::parse(target).map_err(|_| {
        refuse(
            "400",
            "bad_request",
            format!("`{target}`: the egress proxy takes absolute http:// URLs and CONNECT"),
        )
    })?;
    if url.scheme() != "http" {
        return Err(refuse(
            "400",
            "bad_request",
            format!("`{target}`: only http:// is forwarded (use CONNECT for TLS)"),
        ));
    }
    let host = url
        .host_str()
        .ok_or_else(|| refuse("400", "bad_request", format!("`{target}` has no host")))?
        .to_owned();
    let port = url.port_or_known_default().unwrap_or(80);
    let upstream = dial(guard, &host, port).await?;
    let mut out = format!("{method} {}", url.path());
    if let Some(q) = url.query() {
        out.push('?');
        out.push_str(q);
    }
    out.push_str(&format!(" HTTP/1.{}\r\n", req.version.unwrap_or(1)));
    let mut out = out.into_bytes();
    for h in req.headers.iter() {
        let name = h.name.to_ascii_lowercase();
        // Hop-by-hop: the proxy's own, and keep-alive (one request per connection).
        if matches!(
            name.as_str(),
            "proxy-connection" | "proxy-authorization" | "connection" | "keep-alive"
        ) {
            continue;
        }
        out.extend_from_slice(h.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"Connection: close\r\n\r\n");
    Ok((upstream, Some(out)))
}

/// `host:port` or `[v6]:port`.
fn authority(target: &str) -> Option<(String, u16)> {
    let (host, port) = target.rsplit_once(':')?;
    let port = port.parse::<u16>().ok()?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then(|| (host.to_owned(), port))
}

/// Connect to a checked address of `host:port`.
async fn dial(guard: &Guard, host: &str, port: u16) -> Result<TcpStream, Refusal> {
    let addrs = match guard.resolve(host, port).await {
        Ok(Some(a)) => a,
        // No rule (a proxy is only started under one, but never connect unchecked).
        Ok(None) => {
            return Err(refuse(
                "403",
                "egress_denied",
                "the egress proxy serves restricted policies only",
            ));
        }
        Err(e) if e.code == "egress_denied" => {
            return Err(refuse("403", "egress_denied", e.message));
        }
        Err(e) => return Err(refuse("502", "connection_failed", e.message)),
    };
    let mut last = String::new();
    for a in addrs {
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(a)).await {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(e)) => last = format!("{host}:{port} ({a}): {e}"),
            Err(_) => {
                return Err(refuse(
                    "504",
                    "timeout",
                    format!("{host}:{port} ({a}): no answer within {CONNECT_TIMEOUT:?}"),
                ));
            }
        }
    }
    Err(refuse("502", "connection_failed", last))
}

async fn answer(conn: &mut UnixStream, r: Refusal) -> std::io::Result<()> {
    let body = format!("{}: {}\n", r.code, r.message);
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nX-Mayfly-Error: {}\r\nConnection: close\r\n\r\n",
        r.status,
        r.code,
        body.len(),
        r.code
    );
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(body.as_bytes()).await?;
    conn.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities() {
        assert_eq!(
            authority("example.com:443"),
            Some(("example.com".into(), 443))
        );
        assert_eq!(authority("[::1]:8080"), Some(("::1".into(), 8080)));
        assert_eq!(authority("example.com"), None);
        assert_eq!(authority(":443"), None);
        assert_eq!(authority("h:99999"), None);
    }

    async fn ask(proxy: &EgressProxy, request: &str) -> String {
        let mut c = UnixStream::connect(proxy.path()).await.unwrap();
        c.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn forwards_what_the_rules_allow_and_refuses_the_rest() {
        // An origin on loopback, allowed by name and port only.
        let origin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = origin.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = origin.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let n = s.read(&mut buf).await.unwrap();
                    let seen = String::from_utf8_lossy(&buf[..n]).replace("\r\n", "|");
                    let body = format!("seen {seen}");
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = s.write_all(reply.as_bytes()).await;
                });
            }
        });
        let guard = Guard::new(
            &[mayfly_types::Egress::Allow(vec![format!(
                "127.0.0.1:{port}"
            )])],
            &[],
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let proxy = EgressProxy::start(guard, dir.path().join("p.sock")).unwrap();

        // Plain http, absolute form: rewritten to origin form, proxy headers dropped.
        let r = ask(
            &proxy,
            &format!("GET http://127.0.0.1:{port}/a?b=1 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nProxy-Authorization: x\r\nConnection: keep-alive\r\n\r\n"),
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 200 OK"), "{r}");
        assert!(r.contains("seen GET /a?b=1 HTTP/1.1|"), "{r}");
        assert!(
            !r.contains("Proxy-Authorization") && r.contains("Connection: close"),
            "{r}"
        );

        // CONNECT: a tunnel, then whatever the client speaks over it.
        let r = ask(
            &proxy,
            &format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\nPING /x HTTP/1.1\r\n\r\n"),
        )
        .await;
        assert!(
            r.starts_with("HTTP/1.1 200 Connection established\r\n\r\nHTTP/1.1 200 OK"),
            "{r}"
        );
        assert!(r.contains("seen PING /x"), "{r}");

        // Off the list: another port, a name that resolves to loopback, metadata.
        for target in [
            format!("127.0.0.1:{}", port.wrapping_add(1)),
            "localhost:5432".into(),
            "169.254.169.254:80".into(),
        ] {
            let r = ask(&proxy, &format!("CONNECT {target} HTTP/1.1\r\n\r\n")).await;
            assert!(
                r.starts_with("HTTP/1.1 403 egress_denied\r\n"),
                "{target}: {r}"
            );
            assert!(r.contains("X-Mayfly-Error: egress_denied"), "{r}");
        }
        let r = ask(&proxy, "GET http://10.0.0.1/ HTTP/1.1\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 403 egress_denied"), "{r}");

        // Not proxy requests.
        let r = ask(&proxy, "GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 400 bad_request"), "{r}");
        let r = ask(&proxy, "GET https://example.com/ HTTP/1.1\r\n\r\n").await;
        assert!(
            r.starts_with("HTTP/1.1 400 bad_request") && r.contains("CONNECT"),
            "{r}"
        );
        let r = ask(&proxy, "\x16\x03\x01garbage\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 400 bad_request"), "{r}");

        // Its socket goes with it.
        let path = proxy.path().to_owned();
        drop(proxy);
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn none_refuses_everything() {
        let guard = Guard::new(&[mayfly_types::Egress::None], &[]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let proxy = EgressProxy::start(guard, dir.path().join("p.sock")).unwrap();
        let r = ask(&proxy, "CONNECT 1.1.1.1:443 HTTP/1.1\r\n\r\n").await;
        assert!(
            r.starts_with("HTTP/1.1 403 egress_denied") && r.contains("`none`"),
            "{r}"
        );
    }
}
