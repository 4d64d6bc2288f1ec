//! A fault-injecting TCP proxy the tests control, put between a node and Postgres or NATS:
//! it passes traffic, **cuts** it (every open connection is closed, new ones are closed at
//! once: what a restarting database or a reset looks like), **blackholes** it (connections
//! are accepted and held, nothing moves either way: a partition or a frozen peer), or
//! **delays** every chunk. It runs on a thread of its own, so synchronous tests (which
//! drive real `mayfly` processes) use it as readily as async ones.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does to traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    Pass,
    Cut,
    Blackhole,
    Delay(Duration),
}

/// A running proxy; stops (dropping every connection) when dropped.
pub struct FaultProxy {
    addr: SocketAddr,
    mode: Arc<watch::Sender<Fault>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FaultProxy {
    /// A proxy on a free loopback port forwarding to `target`, passing traffic.
    pub fn start(target: SocketAddr) -> FaultProxy {
        let std_listener =
            std::net::TcpListener::bind("127.0.0.1:0").expect("a loopback port for the proxy");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let addr = std_listener.local_addr().expect("addr");
        let (mode, _) = watch::channel(Fault::Pass);
        let mode = Arc::new(mode);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let m = mode.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("proxy runtime");
            rt.block_on(async move {
                let listener = TcpListener::from_std(std_listener).expect("listener");
                tokio::select! {
                    _ = accept_loop(listener, target, m) => {}
                    _ = stopped => {}
                }
            });
        });
        FaultProxy {
            addr,
            mode,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// From now on, do `f` (to open connections as well as new ones).
    pub fn set(&self, f: Fault) {
        self.mode.send_replace(f);
    }

    pub fn fault(&self) -> Fault {
        *self.mode.borrow()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn accept_loop(listener: TcpListener, target: SocketAddr, mode: Arc<watch::Sender<Fault>>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let rx = mode.subscribe();
        tokio::spawn(connection(client, target, rx));
    }
}

/// One client connection: dialled upstream only while traffic passes.
async fn connection(client: TcpStream, target: SocketAddr, mut mode: watch::Receiver<Fault>) {
    // Held until the fault lets traffic through (a blackholed connect hangs), dropped on
    // a cut.
    if passable(&mut mode).await.is_none() {
        return;
    }
    let Ok(upstream) = TcpStream::connect(target).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (ur, uw) = upstream.into_split();
    let up = pump(cr, uw, mode.clone());
    let down = pump(ur, cw, mode.clone());
    // Either direction ending (or a cut) ends the connection: both halves drop.
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

/// Wait while traffic is held (blackhole); the fault that lets it through (pass or delay),
/// or None on a cut (or the proxy stopping).
async fn passable(mode: &mut watch::Receiver<Fault>) -> Option<Fault> {
    loop {
        let f = *mode.borrow_and_update();
        match f {
            Fault::Cut => return None,
            Fault::Blackhole => mode.changed().await.ok()?,
            Fault::Pass | Fault::Delay(_) => return Some(f),
        }
    }
}

/// Copy `from` → `to`, chunk by chunk, as the fault allows.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<Fault>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            changed = mode.changed() => {
                if changed.is_err() || *mode.borrow() == Fault::Cut {
                    return;
                }
                continue;
            }
        };
        // The chunk waits while the traffic is held; a cut drops it and the connection.
        match passable(&mut mode).await {
            None => return,
            Some(Fault::Delay(d)) => tokio::time::sleep(d).await,
            Some(_) => {}
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
