//! The keeper: the first process inside a contained `process` actor's sandbox.
//!
//! The actor keeps its contract (serve HTTP on `$PORT`), but it runs in a network namespace
//! of its own, where nothing outside can reach that port and it can reach nothing. The
//! keeper is the one way in and the actor-side end of the lease:
//!
//! * it accepts on the provider's Unix socket, inherited as a descriptor (the socket's
//!   directory is not in the sandbox, so the actor can neither swap it nor reach it), and
//!   relays each connection to `127.0.0.1:$PORT` inside the namespace — the provider (which
//!   checks the epoch of every request) is the only ingress;
//! * it reads the provider's lease (`until` in a directory the provider rewrites on every
//!   renewed heartbeat, bound read-only) and ends the sandbox once the lease has run out: an
//!   actor whose provider froze stops serving before the control plane gives its epoch to
//!   another worker. A provider that dies takes the sandbox with it (`--die-with-parent`);
//! * when the actor exits, the keeper exits with its status, and the PID namespace ends.
//!
//! Small and single-purpose (std and one `fcntl`), so it starts in a millisecond inside the
//! sandbox.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Exit status when the lease ran out (EX_TEMPFAIL).
pub const LEASE_EXPIRED: i32 = 75;

/// What the keeper is told on its command line:
/// `--listen-fd N --port N [--lease FILE] -- COMMAND ARGS…`.
#[derive(Debug, PartialEq)]
pub struct Args {
    /// The inherited listening Unix socket.
    pub listen_fd: i32,
    pub port: u16,
    pub lease: Option<PathBuf>,
    pub command: Vec<OsString>,
}

impl Args {
    pub fn parse(mut it: impl Iterator<Item = OsString>) -> Result<Args, String> {
        let (mut listen, mut port, mut lease) = (None, None, None);
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
                "--port" => {
                    port = Some(
                        value
                            .to_string_lossy()
                            .parse::<u16>()
                            .map_err(|e| format!("--port: {e}"))?,
                    )
                }
                "--lease" => lease = Some(PathBuf::from(value)),
                other => return Err(format!("unknown flag `{other}`")),
            }
        }
        let command: Vec<OsString> = it.collect();
        if command.is_empty() {
            return Err("nothing to run after `--`".into());
        }
        Ok(Args {
            listen_fd: listen.ok_or("missing --listen-fd")?,
            port: port.ok_or("missing --port")?,
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
            eprintln!("mayfly actor keeper: {e}");
            return 2;
        }
    };
    if lease_expired(args.lease.as_ref()) {
        eprintln!("mayfly actor keeper: the provider's lease has run out; not starting");
        return LEASE_EXPIRED;
    }
    // SAFETY: the provider hands this descriptor over for the keeper alone; nothing else in
    // this process owns it. It is kept from the actor (close-on-exec).
    let listener = unsafe {
        use std::os::fd::FromRawFd;
        if libc::fcntl(args.listen_fd, libc::F_SETFD, libc::FD_CLOEXEC) != 0 {
            eprintln!(
                "mayfly actor keeper: descriptor {} is not open: {}",
                args.listen_fd,
                std::io::Error::last_os_error()
            );
            return 1;
        }
        UnixListener::from_raw_fd(args.listen_fd)
    };
    let mut child = match Command::new(&args.command[0])
        .args(&args.command[1..])
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "mayfly actor keeper: cannot start `{}`: {e}",
                args.command[0].to_string_lossy()
            );
            return 127;
        }
    };
    let port = args.port;
    // Ingress lost (the accept loop ended) ends the keeper too: an actor nobody can reach
    // must not look alive.
    let deaf = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = deaf.clone();
    let accept = std::thread::Builder::new().spawn(move || {
        for conn in listener.incoming() {
            match conn {
                // A connection the keeper has no thread for is dropped (the provider sees
                // the actor unreachable for that request), not a reason to stop listening.
                Ok(conn) => {
                    let _ = std::thread::Builder::new().spawn(move || relay(conn, port));
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    eprintln!("mayfly actor keeper: accept: {e}");
                    break;
                }
            }
        }
        flag.store(true, std::sync::atomic::Ordering::Release);
    });
    if let Err(e) = accept {
        eprintln!("mayfly actor keeper: no accept thread: {e}");
        return stop(&mut child, 1);
    }
    loop {
        if deaf.load(std::sync::atomic::Ordering::Acquire) {
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
            eprintln!("mayfly actor keeper: the provider's lease ran out; stopping the actor");
            return stop(&mut child, LEASE_EXPIRED);
        }
        std::thread::sleep(Duration::from_millis(25));
    }
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

/// One connection from the provider to the actor's port, both directions, half-closes
/// passed on.
fn relay(mut outer: UnixStream, port: u16) {
    let Ok(mut inner) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return;
    };
    let (Ok(mut outer2), Ok(mut inner2)) = (outer.try_clone(), inner.try_clone()) else {
        return;
    };
    let Ok(up) = std::thread::Builder::new().spawn(move || {
        let _ = copy(&mut outer2, &mut inner2);
        let _ = inner2.shutdown(std::net::Shutdown::Write);
    }) else {
        return;
    };
    let _ = copy(&mut inner, &mut outer);
    let _ = outer.shutdown(std::net::Shutdown::Write);
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
        assert_eq!((a.listen_fd, a.port), (3, 8080));
        assert_eq!(a.lease, Some(PathBuf::from("/l")));
        assert_eq!(a.command.len(), 3);
        assert!(parse(&["--listen-fd", "3", "--port", "8080", "--"]).is_err());
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
