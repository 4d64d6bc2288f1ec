//! Egress rules, pure: which addresses a tenant's connections may reach. The worker resolves
//! a name once, checks every address it got against every rule in force, and connects to a
//! checked address only (so a name cannot resolve to a public address for the check and to
//! loopback for the connection).

use crate::Egress;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// One entry of an allow-list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub target: Target,
    /// None: any port.
    pub port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// An exact host name (lowercase, no trailing dot).
    Host(String),
    /// `*.domain`: any name below `domain` (not `domain` itself).
    Suffix(String),
    /// An address range (a single address is a /32 or /128).
    Net(IpAddr, u8),
}

impl Rule {
    /// Parse `host`, `host:port`, `*.domain[:port]`, `ip[:port]`, `cidr[:port]`, `[v6]:port`.
    pub fn parse(s: &str) -> Result<Rule, String> {
        let s = s.trim();
        let bad = |why: &str| Err(format!("egress rule `{s}`: {why}"));
        if s.is_empty() {
            return bad("empty");
        }
        // `[v6]` or `[v6]:port`
        let (body, port) = if let Some(rest) = s.strip_prefix('[') {
            let Some((addr, tail)) = rest.split_once(']') else {
                return bad("unclosed `[`");
            };
            let port = match tail {
                "" => None,
                t => match t.strip_prefix(':').map(str::parse::<u16>) {
                    Some(Ok(p)) => Some(p),
                    _ => return bad("a port after `]` is `:<1-65535>`"),
                },
            };
            (addr.to_owned(), port)
        } else if s.matches(':').count() == 1 {
            let (h, p) = s.split_once(':').unwrap_or((s, ""));
            match p.parse::<u16>() {
                Ok(p) if p > 0 => (h.to_owned(), Some(p)),
                _ => return bad("the port must be a number from 1 to 65535"),
            }
        } else {
            // No colon, or an IPv6 address/range without a port.
            (s.to_owned(), None)
        };
        if port == Some(0) {
            return bad("the port must be a number from 1 to 65535");
        }
        let target = if let Some((net, len)) = body.split_once('/') {
            let Ok(ip) = net.parse::<IpAddr>() else {
                return bad("a range is `<address>/<prefix length>`");
            };
            let max = if ip.is_ipv4() { 32 } else { 128 };
            match len.parse::<u8>() {
                Ok(l) if l <= max => Target::Net(ip, l),
                _ => return bad("the prefix length is out of range"),
            }
        } else if let Ok(ip) = body.parse::<IpAddr>() {
            Target::Net(ip, if ip.is_ipv4() { 32 } else { 128 })
        } else if let Some(d) = body.strip_prefix("*.") {
            if !host_name(d) {
                return bad("`*.` must be followed by a domain name");
            }
            Target::Suffix(d.to_ascii_lowercase())
        } else if host_name(&body) {
            Target::Host(body.trim_end_matches('.').to_ascii_lowercase())
        } else {
            return bad("not a host name, address or range");
        };
        Ok(Rule { target, port })
    }

    /// Does a connection to `addr:port`, asked for by the name `host`, match?
    pub fn matches(&self, host: &str, addr: IpAddr, port: u16) -> bool {
        if self.port.is_some_and(|p| p != port) {
            return false;
        }
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        match &self.target {
            Target::Host(h) => *h == host,
            Target::Suffix(d) => host.len() > d.len() + 1 && host.ends_with(&format!(".{d}")),
            Target::Net(net, len) => in_net(canonical(addr), canonical(*net), *len),
        }
    }
}

fn host_name(s: &str) -> bool {
    let s = s.trim_end_matches('.');
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// An IPv4-mapped or -compatible IPv6 address as the IPv4 address it stands for.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

fn in_net(addr: IpAddr, net: IpAddr, len: u8) -> bool {
    match (addr, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - len)
            };
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// A globally routable unicast address: not loopback, unspecified, private (RFC 1918, ULA),
/// shared (CGNAT), link-local (cloud metadata lives there), multicast, broadcast,
/// documentation, benchmarking, reserved, 6to4/NAT64/Teredo (they embed IPv4 addresses).
pub fn is_public(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(a) => public_v4(a),
        IpAddr::V6(a) => public_v6(a),
    }
}

fn public_v4(a: Ipv4Addr) -> bool {
    const BLOCKED: [(Ipv4Addr, u8); 15] = [
        (Ipv4Addr::new(0, 0, 0, 0), 8),
        (Ipv4Addr::new(10, 0, 0, 0), 8),
        (Ipv4Addr::new(100, 64, 0, 0), 10),
        (Ipv4Addr::new(127, 0, 0, 0), 8),
        (Ipv4Addr::new(169, 254, 0, 0), 16),
        (Ipv4Addr::new(172, 16, 0, 0), 12),
        (Ipv4Addr::new(192, 0, 0, 0), 24),
        (Ipv4Addr::new(192, 0, 2, 0), 24),
        (Ipv4Addr::new(192, 88, 99, 0), 24),
        (Ipv4Addr::new(192, 168, 0, 0), 16),
        (Ipv4Addr::new(198, 18, 0, 0), 15),
        (Ipv4Addr::new(198, 51, 100, 0), 24),
        (Ipv4Addr::new(203, 0, 113, 0), 24),
        (Ipv4Addr::new(224, 0, 0, 0), 4),
        (Ipv4Addr::new(240, 0, 0, 0), 4),
    ];
    !BLOCKED
        .iter()
        .any(|(n, l)| in_net(IpAddr::V4(a), IpAddr::V4(*n), *l))
}

fn public_v6(a: Ipv6Addr) -> bool {
    const BLOCKED: [(Ipv6Addr, u8); 10] = [
        (Ipv6Addr::UNSPECIFIED, 128),
        (Ipv6Addr::LOCALHOST, 128),
        (Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 0), 96), // IPv4-compatible (deprecated)
        (Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0), 96), // NAT64
        (Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0, 0), 64), // discard
        (Ipv6Addr::new(0x2001, 0, 0, 0, 0, 0, 0, 0), 23), // IETF protocol assignments, Teredo
        (Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0), 32), // documentation
        (Ipv6Addr::new(0x2002, 0, 0, 0, 0, 0, 0, 0), 16), // 6to4
        (Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0), 7), // unique local
        (Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10), // link-local
    ];
    if a.segments()[0] & 0xff00 == 0xff00 {
        return false; // multicast
    }
    !BLOCKED
        .iter()
        .any(|(n, l)| in_net(IpAddr::V6(a), IpAddr::V6(*n), *l))
}

/// Check every rule of a layer list before it is accepted (a policy, a flag).
pub fn validate(rules: &[Egress]) -> Result<(), String> {
    for e in rules {
        if let Egress::Allow(list) = e {
            for r in list {
                Rule::parse(r)?;
            }
        }
    }
    Ok(())
}

/// The rules in force for one connection, compiled once per block.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    none: bool,
    public: bool,
    /// Each inner list is one layer's allow-list: the connection must match one entry of
    /// every list.
    allow: Vec<Vec<Rule>>,
    /// The host's own addresses (refused by `public`).
    own: Vec<IpAddr>,
}

impl Policy {
    /// Compile the layers' rules (empty: unrestricted). `own` are the host's addresses.
    pub fn new(layers: &[Egress], own: &[IpAddr]) -> Result<Policy, String> {
        let mut p = Policy {
            own: own.iter().copied().map(canonical).collect(),
            ..Policy::default()
        };
        for e in layers {
            match e {
                Egress::None => p.none = true,
                Egress::Public => p.public = true,
                Egress::Host => {}
                Egress::Allow(list) => p.allow.push(
                    list.iter()
                        .map(|r| Rule::parse(r))
                        .collect::<Result<_, _>>()?,
                ),
            }
        }
        Ok(p)
    }

    /// Nothing restricted: connections go as the host's would.
    pub fn unrestricted(&self) -> bool {
        !self.none && !self.public && self.allow.is_empty()
    }

    /// No connection at all.
    pub fn denies_all(&self) -> bool {
        self.none
    }

    /// Why `host` → `addr:port` is refused, if it is.
    pub fn refusal(&self, host: &str, addr: IpAddr, port: u16) -> Option<String> {
        let addr = canonical(addr);
        if self.none {
            return Some("the egress policy is `none`: no network".into());
        }
        // An allow-list names what a layer wants reachable, private addresses included;
        // `public` of another layer still refuses those.
        if self.public && (!is_public(addr) || self.own.contains(&addr)) {
            return Some(format!(
                "{addr} is not a public address, and the egress policy is `public`"
            ));
        }
        if self
            .allow
            .iter()
            .any(|list| !list.iter().any(|r| r.matches(host, addr, port)))
        {
            return Some(format!(
                "{host}:{port} ({addr}) is not on the egress allow-list"
            ));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
    }

    #[test]
    fn public_refuses_what_a_tenant_must_not_reach() {
        for a in [
            "127.0.0.1",
            "127.1.2.3",
            "0.0.0.0",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "fe80::1",
            "fd00::1",
            "fc00::1",
            "ff02::1",
            "64:ff9b::7f00:1",
            "2002:7f00:1::",
            "::127.0.0.1",
        ] {
            assert!(!is_public(ip(a)), "{a} must not count as public");
        }
        for a in ["1.1.1.1", "8.8.8.8", "172.32.0.1", "2606:4700::1111"] {
            assert!(is_public(ip(a)), "{a} is public");
        }
    }

    #[test]
    fn rules_parse_every_documented_form_and_refuse_the_rest() {
        let r = |s: &str| Rule::parse(s);
        assert_eq!(
            r("db.example.com:5432"),
            Ok(Rule {
                target: Target::Host("db.example.com".into()),
                port: Some(5432)
            })
        );
        assert_eq!(
            r("*.Example.com").map(|r| r.target),
            Ok(Target::Suffix("example.com".into()))
        );
        assert_eq!(
            r("10.0.0.0/8:443"),
            Ok(Rule {
                target: Target::Net(ip("10.0.0.0"), 8),
                port: Some(443)
            })
        );
        assert_eq!(
            r("[::1]:80").map(|r| (r.target, r.port)),
            Ok((Target::Net(ip("::1"), 128), Some(80)))
        );
        assert_eq!(
            r("fd00::/8").map(|r| r.target),
            Ok(Target::Net(ip("fd00::"), 8))
        );
        for bad in [
            "",
            "host:0",
            "host:99999",
            "10.0.0.0/33",
            "*.",
            "a b",
            "[::1",
            "-x.com",
        ] {
            assert!(r(bad).is_err(), "`{bad}` must be refused");
        }
    }

    #[test]
    fn layers_add_up() {
        let own = [ip("203.0.114.7")];
        let p = Policy::new(&[Egress::Public], &own).unwrap_or_default();
        assert!(p.refusal("x", ip("127.0.0.1"), 5432).is_some());
        assert!(
            p.refusal("x", ip("203.0.114.7"), 443).is_some(),
            "own address"
        );
        assert!(p.refusal("x", ip("1.1.1.1"), 443).is_none());
        let allow = Egress::Allow(vec!["db.internal:5432".into(), "*.example.com".into()]);
        let p = Policy::new(std::slice::from_ref(&allow), &own).unwrap_or_default();
        assert!(p.refusal("db.internal", ip("10.0.0.5"), 5432).is_none());
        assert!(p.refusal("db.internal", ip("10.0.0.5"), 5433).is_some());
        assert!(p.refusal("api.example.com", ip("1.2.3.4"), 443).is_none());
        assert!(p.refusal("example.com", ip("1.2.3.4"), 443).is_some());
        // public and an allow-list: both must pass.
        let p = Policy::new(&[allow, Egress::Public], &own).unwrap_or_default();
        assert!(p.refusal("db.internal", ip("10.0.0.5"), 5432).is_some());
        assert!(p.refusal("api.example.com", ip("1.2.3.4"), 443).is_none());
        let p = Policy::new(&[Egress::Host, Egress::None], &own).unwrap_or_default();
        assert!(p.denies_all());
        assert!(p.refusal("example.com", ip("1.1.1.1"), 443).is_some());
        assert!(
            Policy::new(&[Egress::Host], &own)
                .unwrap_or_default()
                .unrestricted()
        );
    }

    proptest! {
        /// An IPv4 address and its IPv4-mapped IPv6 spelling are judged alike, by every
        /// rule: the mapped form is no way around a check.
        #[test]
        fn mapped_addresses_are_judged_as_their_ipv4(a in any::<u32>(), port in 1u16..) {
            let v4 = IpAddr::V4(Ipv4Addr::from(a));
            let v6 = IpAddr::V6(Ipv4Addr::from(a).to_ipv6_mapped());
            prop_assert_eq!(is_public(v4), is_public(v6));
            let p = Policy::new(
                &[Egress::Public, Egress::Allow(vec!["10.0.0.0/8".into(), "1.0.0.0/8:443".into()])],
                &[],
            ).unwrap_or_default();
            prop_assert_eq!(p.refusal("h", v4, port).is_none(), p.refusal("h", v6, port).is_none());
        }

        /// A loopback address is never reachable under `public`, whatever else is allowed.
        #[test]
        fn loopback_never_passes_public(b in any::<[u8; 3]>(), port in 1u16..) {
            let a = IpAddr::V4(Ipv4Addr::new(127, b[0], b[1], b[2]));
            let p = Policy::new(&[Egress::Public, Egress::Allow(vec!["0.0.0.0/0".into()])], &[]).unwrap_or_default();
            prop_assert!(p.refusal("localhost", a, port).is_some());
        }
    }
}
