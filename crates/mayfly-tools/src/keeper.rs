//! The keeper: the first process inside a sandbox that needs a way in or a way out.
//!
//! Sandboxed code runs in a network namespace of its own, where nothing outside can reach
//! its ports and it can reach nothing. The keeper is the one door, both ways:
//!
//! * **ingress** (contained `process` actors, `--listen-fd/--port`): it accepts on the
//!   provider's Unix socket, inherited as a descriptor (the socket's directory is not in the
//!   sandbox, so the actor can neither swap it nor reach it), and relays each connection to
//!   `127.0.0.1:$PORT` inside the namespace — the provider (which checks the epoch of every
//!   request) is the only ingress;
//! * **egress** (`--egress-port/--egress-sock`): it listens on `127.0.0.1:PORT` inside the
//!   namespace (the sandbox's `http_proxy`) and relays each connection to the runtime's
//!   egress proxy through a Unix socket bound into the sandbox; the proxy, outside, checks
//!   every destination against the tenant's egress policy ([`crate::proxy`]);
//! * **lease** (`--lease FILE`): it reads the provider's lease (`until` in a directory the
//!   provider rewrites on every renewed heartbeat, bound read-only) and ends the sandbox once
//!   the lease has run out: an actor whose provider froze stops serving before the control
//!   plane gives its epoch to another worker. A provider that dies takes the sandbox with it
//!   (`--die-with-parent`);
//! * when the command exits, the keeper exits with its status, and the PID namespace ends.
//!
//! Small and single-purpose (std and one `fcntl`), so it starts in a millisecond inside the
//! sandbox.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Exit status when the lease ran out (EX_TEMPFAIL).
pub const LEASE_EXPIRED: i32 = 75;

/// What the keeper is told on its command line:
/// `[--listen-fd N --port N] [--egress-port N --egress-sock PATH] [--lease FILE] -- COMMAND ARGS…`
/// (at least one of ingress and egress).
#[derive(Debug, PartialEq)]
pub struct Args {
    /// The inherited listening Unix socket and the port inside it relays to.
    pub ingress: Option<(i32, u16)>,
    /// The loopback port to listen on inside, and the proxy's socket it relays to.
    pub egress: Option<(u16, PathBuf)>,
    pub lease: Option<PathBuf>,
    pub command: Vec<OsString>,
}

impl Args {
    pub fn parse(mut it: impl Iterator<Item = OsString>) -> Result<Args, String> {
        let (mut listen, mut port, mut lease) = (None, None, None);
        let (mut egress_port, mut egress_sock) = (None, None);
        let port_of = |flag: &str, value: &OsString| {
            value
                .to_string_lossy()
                .parse::<u16>()
                .map_err(|e| format!("{flag}: {e}"))
        };
        loop {
            let Some(flag) = it.next() else {
                return Err("missing `-- COMMAND`".into());
            };
            let flag = flag.to_string_lossy().into_owned();
            if flag == "--" {
                break;
            }
            let value = it.next().ok_or_else(|| format!("`{flag}` needs a value"))?;
            match flag.as_str() {
                "--listen-fd" => {
                    listen = Some(
                        value
                            .to_string_lossy()
                            .parse::<i32>()
                            .ok()
                            .filter(|fd| *fd > 2)
                            .ok_or("--listen-fd: a descriptor number above 2")?,
                    )
                }
                "--port" => port = Some(port_of("--port", &value)?),
                "--egress-port" => egress_port = Some(port_of("--egress-port", &value)?),
                "--egress-sock" => egress_sock = Some(PathBuf::from(value)),
                "--lease" => lease = Some(PathBuf::from(value)),
                other => return Err(format!("unknown flag `{other}`")),
            }
        }
        let command: Vec<OsString> = it.collect();
        if command.is_empty() {
            return Err("nothing to run after `--`".into());
        }
        let ingress = match (listen, port) {
            (Some(fd), Some(p)) => Some((fd, p)),
            (None, None) => None,
            (Some(_), None) => return Err("missing --port".into()),
            (None, Some(_)) => return Err("missing --listen-fd".into()),
        };
        let egress = match (egress_port, egress_sock) {
            (Some(p), Some(s)) => Some((p, s)),
            (None, None) => None,
            (Some(_), None) => return Err("missing --egress-sock".into()),
            (None, Some(_)) => return Err("missing --egress-port".into()),
        };
        if ingress.is_none() && egress.is_none() {
            return Err(
                "nothing to keep: give --listen-fd/--port, --egress-port/--egress-sock or both"
                    .into(),
            );
        }
        Ok(Args {
            ingress,
            egress,
            lease,
            command,
        })
    }
}

/// Run the keeper; the process's exit code.
pub fn main(args: impl Iterator<Item = OsString>) -> i32 {
    let args = match Args::parse(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("mayfly keeper: {e}");
            return 2;
        }
    };
    if lease_expired(args.lease.as_ref()) {
        eprintln!("mayfly keeper: the provider's lease has run out; not starting");
        return LEASE_EXPIRED;
    }
    let ingress = match args.ingress {
        None => None,
        // SAFETY: the provider hands this descriptor over for the keeper alone; nothing
        // else in this process owns it. It is kept from the actor (close-on-exec).
        Some((fd, port)) => unsafe {
            use std::os::fd::FromRawFd;
            if libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) != 0 {
                eprintln!(
                    "mayfly keeper: descriptor {fd} is not open: {}",
                    std::io::Error::last_os_error()
                );
                return 1;
            }
            Some((UnixListener::from_raw_fd(fd), port))
        },
    };
    // Listening before the command starts: its first request finds the door open.
    let egress = match &args.egress {
        None => None,
        Some((port, sock)) => match TcpListener::bind(("127.0.0.1", *port)) {
            Ok(l) => Some((l, sock.clone())),
            Err(e) => {
                eprintln!("mayfly keeper: cannot listen on 127.0.0.1:{port}: {e}");
                return 1;
            }
        },
    };
    let mut child = match Command::new(&args.command[0])
        .args(&args.command[1..])
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "mayfly keeper: cannot start `{}`: {e}",
                args.command[0].to_string_lossy()
            );
            return 127;
        }
    };
    // A lost door (an accept loop that ended) ends the keeper too: an actor nobody can reach
    // must not look alive, and code whose egress vanished must not carry on half-connected.
    let lost = Arc::new(AtomicBool::new(false));
    if let Some((listener, port)) = ingress {
        let conns = std::iter::from_fn(move || Some(listener.accept().map(|(c, _)| c)));
        let open = move || TcpStream::connect(("127.0.0.1", port));
        if let Err(e) = serve(conns, open, lost.clone()) {
            eprintln!("mayfly keeper: no accept thread: {e}");
            return stop(&mut child, 1);
        }
    }
    if let Some((listener, sock)) = egress {
        let conns = std::iter::from_fn(move || Some(listener.accept().map(|(c, _)| c)));
        let open = move || UnixStream::connect(&sock);
        if let Err(e) = serve(conns, open, lost.clone()) {
            eprintln!("mayfly keeper: no accept thread: {e}");
            return stop(&mut child, 1);
        }
    }
    loop {
        if lost.load(Ordering::Acquire) {
            return stop(&mut child, 1);
        }
        match child.try_wait() {
            Ok(Some(status)) => {
                use std::os::unix::process::ExitStatusExt;
                return status
                    .code()
                    .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
            }
            Ok(None) => {}
            Err(_) => return stop(&mut child, 1),
        }
        if lease_expired(args.lease.as_ref()) {
            eprintln!("mayfly keeper: the provider's lease ran out; stopping the actor");
            return stop(&mut child, LEASE_EXPIRED);
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Accept on `conns` in a thread of its own, relaying each connection to a fresh `open()`;
/// sets `lost` when accepting fails for good.
fn serve<A, B>(
    conns: impl Iterator<Item = std::io::Result<A>> + Send + 'static,
    open: impl Fn() -> std::io::Result<B> + Send + Sync + 'static,
    lost: Arc<AtomicBool>,
) -> std::io::Result<()>
where
    A: Duplex,
    B: Duplex,
{
    let open = Arc::new(open);
    std::thread::Builder::new()
        .spawn(move || {
            for conn in conns {
                match conn {
                    // A connection the keeper has no thread for is dropped (its peer sees
                    // it closed), not a reason to stop listening.
                    Ok(conn) => {
                        let open = open.clone();
                        let _ = std::thread::Builder::new().spawn(move || {
                            if let Ok(other) = open() {
                                relay(conn, other);
                            }
                        });
                    }
                    Err(e) if transient(&e) => {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => {
                        eprintln!("mayfly keeper: accept: {e}");
                        break;
                    }
                }
            }
            lost.store(true, Ordering::Release);
        })
        .map(|_| ())
}

/// Accept errors that pass: a signal, a peer gone before it was accepted, descriptors or
/// memory short for a moment.
fn transient(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::Interrupted
        || matches!(
            e.raw_os_error(),
            Some(libc::ECONNABORTED | libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
        )
}

fn stop(child: &mut Child, code: i32) -> i32 {
    let _ = child.kill();
    let _ = child.wait();
    code
}

/// The lease file holds the wall-clock millisecond until which the provider holds its
/// lease, or `none` (a provider under no control plane). Unreadable or malformed counts as
/// expired: the keeper fails closed.
fn lease_expired(path: Option<&PathBuf>) -> bool {
    let Some(path) = path else { return false };
    let Ok(text) = std::fs::read_to_string(path) else {
        return true;
    };
    let text = text.trim();
    if text == "none" {
        return false;
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    text.parse::<u64>().map_or(true, |until| now >= until)
}

/// A stream the keeper relays: a second handle on it, and a half-close.
trait Duplex: Read + Write + Send + Sized + 'static {
    fn twin(&self) -> std::io::Result<Self>;
    fn half_close(&self);
}

impl Duplex for UnixStream {
    fn twin(&self) -> std::io::Result<Self> {
        self.try_clone()
    }
    fn half_close(&self) {
        let _ = self.shutdown(std::net::Shutdown::Write);
    }
}

impl Duplex for TcpStream {
    fn twin(&self) -> std::io::Result<Self> {
        self.try_clone()
    }
    fn half_close(&self) {
        let _ = self.shutdown(std::net::Shutdown::Write);
    }
}

/// One connection, both directions, half-closes passed on.
fn relay(mut a: impl Duplex, mut b: impl Duplex) {
    let (Ok(mut a2), Ok(mut b2)) = (a.twin(), b.twin()) else {
        return;
    };
    let Ok(up) = std::thread::Builder::new().spawn(move || {
        let _ = copy(&mut a2, &mut b2);
        b2.half_close();
    }) else {
        return;
    };
    let _ = copy(&mut b, &mut a);
    a.half_close();
    let _ = up.join();
}

fn copy(from: &mut impl Read, to: &mut impl Write) -> std::io::Result<()> {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = from.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        to.write_all(&buf[..n])?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(a: &[&str]) -> Result<Args, String> {
        Args::parse(a.iter().map(OsString::from))
    }

    #[test]
    fn arguments_are_strict() {
        let a = parse(&[
            "--listen-fd",
            "3",
            "--port",
            "8080",
            "--lease",
            "/l",
            "--",
            "python3",
            "-c",
            "x",
        ])
        .unwrap();
        assert_eq!(a.ingress, Some((3, 8080)));
        assert_eq!(a.egress, None);
        assert_eq!(a.lease, Some(PathBuf::from("/l")));
        assert_eq!(a.command.len(), 3);
        assert!(parse(&["--listen-fd", "3", "--port", "8080", "--"]).is_err());
        let e = parse(&["--egress-port", "3128", "--egress-sock", "/s", "--", "x"]).unwrap();
        assert_eq!(
            (e.ingress, e.egress),
            (None, Some((3128, PathBuf::from("/s"))))
        );
        assert!(parse(&["--egress-port", "3128", "--", "x"]).is_err());
        assert!(parse(&["--", "x"]).unwrap_err().contains("nothing to keep"));
        assert!(parse(&["--listen-fd", "3", "--", "x"]).is_err());
        assert!(parse(&["--listen-fd", "1", "--port", "1", "--", "x"]).is_err());
        assert!(parse(&["--listen-fd", "3", "--port", "x", "--", "x"]).is_err());
        assert!(
            parse(&["--listen-fd", "3", "--port", "1", "--bogus", "1", "--", "x"])
                .unwrap_err()
                .contains("--bogus")
        );
    }

    #[test]
    fn the_lease_fails_closed() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("until");
        assert!(!lease_expired(None));
        assert!(lease_expired(Some(&f)), "missing");
        std::fs::write(&f, "none").unwrap();
        assert!(!lease_expired(Some(&f)));
        std::fs::write(&f, "garbage").unwrap();
        assert!(lease_expired(Some(&f)));
        std::fs::write(&f, "1").unwrap();
        assert!(lease_expired(Some(&f)));
        let later = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
            + 60_000;
        std::fs::write(&f, later.to_string()).unwrap();
        assert!(!lease_expired(Some(&f)));
    }
}
