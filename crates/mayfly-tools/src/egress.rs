//! The worker side of the egress policy: resolve a name once, check every address against
//! the rules in force, and hand the tool only the addresses that passed, so it connects to
//! what was checked (a name that answers differently the second time gains nothing).

use crate::ToolError;
use mayfly_types::Egress;
use mayfly_types::egress::Policy;
use std::net::{IpAddr, SocketAddr};

/// The compiled rules of one block.
#[derive(Clone, Debug, Default)]
pub struct Guard {
    policy: Policy,
}

pub fn denied(msg: impl Into<String>) -> ToolError {
    ToolError::new("egress_denied", msg)
}

impl Guard {
    /// No rule: connections go as the host's would.
    pub fn open() -> Guard {
        Guard::default()
    }

    pub fn new(layers: &[Egress], own: &[IpAddr]) -> Result<Guard, ToolError> {
        Policy::new(layers, own)
            .map(|policy| Guard { policy })
            .map_err(|m| ToolError::new("bad_policy", m))
    }

    pub fn unrestricted(&self) -> bool {
        self.policy.unrestricted()
    }

    /// No connection at all (`none`).
    pub fn denies_all(&self) -> bool {
        self.policy.denies_all()
    }

    /// Tenant code may share the host's network only when nothing restricts it: a sandbox
    /// cannot check the addresses its code connects to, so under any rule it reaches the
    /// network only through the egress proxy ([`crate::proxy`]), which checks them.
    pub fn sandbox_network(&self) -> bool {
        self.unrestricted()
    }

    /// The addresses of `host:port` that the rules let a connection reach (at least one),
    /// or why none. Unrestricted: None (connect as usual, by name).
    pub async fn resolve(
        &self,
        host: &str,
        port: u16,
    ) -> Result<Option<Vec<SocketAddr>>, ToolError> {
        if self.unrestricted() {
            return Ok(None);
        }
        if self.policy.denies_all() {
            return Err(denied(format!(
                "{host}:{port}: the egress policy is `none`: no network"
            )));
        }
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let addrs: Vec<SocketAddr> = match bare.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => tokio::net::lookup_host((bare, port))
                .await
                .map_err(|e| {
                    ToolError::new("connection_failed", format!("cannot resolve {bare}: {e}"))
                })?
                .collect(),
        };
        let mut ok = Vec::new();
        let mut why = None;
        for a in addrs {
            match self.policy.refusal(bare, a.ip(), port) {
                None => ok.push(a),
                Some(r) => why = why.or(Some(r)),
            }
        }
        if ok.is_empty() {
            return Err(denied(
                why.unwrap_or_else(|| format!("{bare} has no address")),
            ));
        }
        Ok(Some(ok))
    }

    /// A unix socket path: local IPC, refused by any rule (the host's own services listen
    /// there: Postgres, NATS, the gateway).
    pub fn local_socket(&self, path: &str) -> Result<(), ToolError> {
        if self.unrestricted() {
            Ok(())
        } else {
            Err(denied(format!(
                "unix socket {path}: local sockets are not reachable under an egress policy"
            )))
        }
    }
}

/// The host's own addresses (every interface), refused by `public`: a tenant must not
/// reach the server's ports through its public address either.
pub fn own_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    #[cfg(target_os = "linux")]
    // SAFETY: getifaddrs fills a list freed once with freeifaddrs; each entry's address is
    // read according to its family.
    unsafe {
        let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
        if libc::getifaddrs(&mut head) == 0 {
            let mut p = head;
            while !p.is_null() {
                let a = (*p).ifa_addr;
                if !a.is_null() {
                    match i32::from((*a).sa_family) {
                        libc::AF_INET => {
                            let s = &*(a as *const libc::sockaddr_in);
                            out.push(IpAddr::from(u32::from_be(s.sin_addr.s_addr).to_be_bytes()));
                        }
                        libc::AF_INET6 => {
                            let s = &*(a as *const libc::sockaddr_in6);
                            out.push(IpAddr::from(s.sin6_addr.s6_addr));
                        }
                        _ => {}
                    }
                }
                p = (*p).ifa_next;
            }
            libc::freeifaddrs(head);
        }
    }
    out.sort();
    out.dedup();
    out
}
