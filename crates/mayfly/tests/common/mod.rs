//! Shared by the binary's end-to-end tests: the binary, its output, and a `mayfly server`
//! started and read until its banner says it is ready.
#![allow(dead_code)]

use std::io::BufRead;
use std::process::{Child, Command, Output, Stdio};

/// The `mayfly` binary, quiet.
pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mayfly"));
    c.env("MAYFLY_LOG", "error");
    c
}

/// stdout then stderr, for assertion messages.
pub fn out(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A child process killed when dropped.
pub struct Running(pub Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl std::ops::Deref for Running {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Running {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

/// Spawn `cmd` (a `mayfly server …` on a fresh log), read its stderr until the banner says
/// it is ready, and keep draining it. Returns the process, its URL and the admin token the
/// first start prints.
pub fn start_server(mut cmd: Command) -> (Running, String, String) {
    let (server, banner) = start_server_banner(&mut cmd);
    let token = banner.token.expect("first start prints the admin token");
    (server, banner.url.expect("ready"), token)
}

/// The same, returning the whole banner (e.g. a restart prints no token).
pub fn start_server_banner(cmd: &mut Command) -> (Running, mayfly_gateway::banner::Banner) {
    let (server, banner, _) = spawn_server(cmd, false);
    (server, banner)
}

/// The same, also keeping every stderr line after the banner (the server's logs).
pub fn start_server_logged(cmd: &mut Command) -> (Running, mayfly_gateway::banner::Banner, Logs) {
    spawn_server(cmd, true)
}

/// Lines a process wrote, collected as they arrive.
pub type Logs = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

fn spawn_server(cmd: &mut Command, keep: bool) -> (Running, mayfly_gateway::banner::Banner, Logs) {
    let mut server = Running(
        cmd.stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("server"),
    );
    let mut banner = mayfly_gateway::banner::Banner::default();
    let mut lines = std::io::BufReader::new(server.0.stderr.take().expect("stderr")).lines();
    for l in lines.by_ref() {
        if banner.feed(&l.expect("line")) {
            break;
        }
    }
    // Keep draining stderr so the server never blocks on a full pipe.
    let logs = Logs::default();
    let sink = logs.clone();
    std::thread::spawn(move || {
        for l in lines.map_while(Result::ok) {
            if keep {
                sink.lock().unwrap_or_else(|p| p.into_inner()).push(l);
            }
        }
    });
    (server, banner, logs)
}
