//! How mayfly connects to NATS: one place, so every connection of a process (queue, RPC,
//! shared cache) authenticates the same way.

use crate::QueueError;
use std::path::PathBuf;

/// A NATS server and the credentials to reach it: the URL (`nats://` or `tls://`, or a
/// comma-separated list of them for a cluster; `user:password@host` or `token@host` are
/// credentials, the same for every server of a list), and optionally a credentials file (JWT
/// and nkey seed, as `nsc` writes it), an nkey seed file, and a CA certificate for TLS
/// (which then is required). Its `Debug` never shows a password or token.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct NatsConnect {
    pub url: String,
    pub creds: Option<PathBuf>,
    pub nkey: Option<PathBuf>,
    pub ca: Option<PathBuf>,
}

impl std::fmt::Debug for NatsConnect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsConnect")
            .field("url", &self.shown())
            .field("creds", &self.creds)
            .field("nkey", &self.nkey)
            .field("ca", &self.ca)
            .finish()
    }
}

/// (user or token, password).
type UrlCredentials = (String, Option<String>);

/// One server address with its userinfo masked; an unparsable one with everything between
/// the scheme and the last `@` masked (it may hold a password that broke the parse).
fn mask(one: &str) -> String {
    match url::Url::parse(one) {
        Ok(mut u) if !u.username().is_empty() => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            } else {
                let _ = u.set_username("***");
            }
            u.to_string()
        }
        Ok(_) => one.to_owned(),
        Err(_) => match (one.find("://"), one.rfind('@')) {
            (Some(s), Some(at)) if at > s + 3 => format!("{}***{}", &one[..s + 3], &one[at..]),
            _ => one.to_owned(),
        },
    }
}

fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

impl NatsConnect {
    /// A server by URL alone.
    pub fn url(url: &str) -> NatsConnect {
        NatsConnect {
            url: url.to_owned(),
            ..Default::default()
        }
    }

    /// The servers without credentials, and the credentials they carried: (user, password)
    /// or a token (a user without a password).
    fn split(&self) -> Result<(Vec<String>, Option<UrlCredentials>), QueueError> {
        let mut servers = Vec::new();
        let mut found: Option<UrlCredentials> = None;
        for one in self.url.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let bad = |why: String| QueueError::Other(format!("NATS URL {}: {why}", mask(one)));
            let mut u = url::Url::parse(one).map_err(|e| bad(e.to_string()))?;
            if !matches!(u.scheme(), "nats" | "tls") {
                return Err(bad("the scheme must be nats:// or tls://".into()));
            }
            if !u.username().is_empty() {
                let creds = (decode(u.username()), u.password().map(decode));
                if found.as_ref().is_some_and(|f| *f != creds) {
                    return Err(bad(
                        "the servers of a list must carry the same credentials".into()
                    ));
                }
                found = Some(creds);
            }
            let _ = u.set_username("");
            let _ = u.set_password(None);
            servers.push(u.to_string());
        }
        if servers.is_empty() {
            return Err(QueueError::Other("no NATS server given".into()));
        }
        Ok((servers, found))
    }

    /// The URL with any password or token masked (for messages and banners).
    pub fn shown(&self) -> String {
        self.url
            .split(',')
            .map(|s| mask(s.trim()))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Connect, with `tune` applied to the options (timeouts and the like).
    pub async fn connect_with(
        &self,
        tune: impl FnOnce(async_nats::ConnectOptions) -> async_nats::ConnectOptions,
    ) -> Result<async_nats::Client, QueueError> {
        let unavailable =
            |e: String| QueueError::Unavailable(format!("NATS at {}: {e}", self.shown()));
        let (servers, creds) = self.split()?;
        let mut o = async_nats::ConnectOptions::new();
        match creds {
            Some((user, Some(pass))) => o = o.user_and_password(user, pass),
            Some((token, None)) => o = o.token(token),
            None => {}
        }
        if let Some(path) = &self.creds {
            o = o.credentials_file(path).await.map_err(|e| {
                QueueError::Other(format!("NATS credentials {}: {e}", path.display()))
            })?;
        }
        if let Some(path) = &self.nkey {
            let seed = std::fs::read_to_string(path)
                .map_err(|e| QueueError::Other(format!("NATS nkey {}: {e}", path.display())))?;
            o = o.nkey(seed.trim().to_owned());
        }
        if let Some(ca) = &self.ca {
            o = o.add_root_certificates(ca.clone()).require_tls(true);
        }
        let addrs = servers
            .iter()
            .map(|s| s.parse::<async_nats::ServerAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| unavailable(e.to_string()))?;
        tune(o)
            .connect(addrs)
            .await
            .map_err(|e| unavailable(e.to_string()))
    }

    pub async fn connect(&self) -> Result<async_nats::Client, QueueError> {
        self.connect_with(|o| o).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_come_out_of_the_url_and_never_show() {
        let c = NatsConnect::url("nats://alice:s%40c+ret@127.0.0.1:4222");
        let (servers, creds) = c.split().unwrap();
        assert_eq!(servers, ["nats://127.0.0.1:4222"]);
        assert_eq!(creds, Some(("alice".into(), Some("s@c+ret".into()))));
        assert!(!c.shown().contains("ret"), "{}", c.shown());
        assert!(!format!("{c:?}").contains("ret"));
        let t = NatsConnect::url("tls://t0ken@nats.example:4222");
        assert_eq!(t.split().unwrap().1, Some(("t0ken".into(), None)));
        assert!(!t.shown().contains("t0ken"));
        assert_eq!(NatsConnect::url("nats://h:4222").split().unwrap().1, None);
        assert!(NatsConnect::url("http://h:4222").split().is_err());
        // A password that breaks the parse never shows in the error.
        let broken = NatsConnect::url("nats://svc:ab#cd@nats:4222");
        let e = broken.split().unwrap_err().to_string();
        assert!(!e.contains("ab#cd") && !e.contains("#cd"), "{e}");
        assert!(!broken.shown().contains("ab#"), "{}", broken.shown());
        // A cluster: every server, one set of credentials.
        let list = NatsConnect::url("nats://u:p@a:4222, nats://u:p@b:4222");
        let (servers, creds) = list.split().unwrap();
        assert_eq!(servers, ["nats://a:4222", "nats://b:4222"]);
        assert_eq!(creds, Some(("u".into(), Some("p".into()))));
        assert!(!list.shown().contains(":p@"), "{}", list.shown());
        assert!(
            NatsConnect::url("nats://u:p@a:4222,nats://v:q@b:4222")
                .split()
                .is_err()
        );
    }
}
