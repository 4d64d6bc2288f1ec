//! How mayfly connects to NATS: one place, so every connection of a process (queue, RPC,
//! shared cache) authenticates the same way.

use crate::QueueError;
use std::path::PathBuf;

/// A NATS server and the credentials to reach it: the URL (`nats://` or `tls://`;
/// `user:password@host` or `token@host` in it are credentials), and optionally a
/// credentials file (JWT and nkey seed, as `nsc` writes it), an nkey seed file, and a CA
/// certificate for TLS (which then is required).
/// (user or token, password).
type UrlCredentials = (String, Option<String>);

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NatsConnect {
    pub url: String,
    pub creds: Option<PathBuf>,
    pub nkey: Option<PathBuf>,
    pub ca: Option<PathBuf>,
}

impl NatsConnect {
    /// A server by URL alone.
    pub fn url(url: &str) -> NatsConnect {
        NatsConnect {
            url: url.to_owned(),
            ..Default::default()
        }
    }

    /// The URL without credentials, and the credentials it carried: (user, password) or a
    /// token (a user without a password).
    fn split(&self) -> Result<(String, Option<UrlCredentials>), QueueError> {
        let bad = |why: String| QueueError::Other(format!("NATS URL {}: {why}", self.shown()));
        let mut u = url::Url::parse(&self.url).map_err(|e| bad(e.to_string()))?;
        if !matches!(u.scheme(), "nats" | "tls") {
            return Err(bad("the scheme must be nats:// or tls://".into()));
        }
        let decode = |s: &str| {
            url::form_urlencoded::parse(format!("x={s}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default()
        };
        let creds =
            (!u.username().is_empty()).then(|| (decode(u.username()), u.password().map(decode)));
        let _ = u.set_username("");
        let _ = u.set_password(None);
        Ok((u.to_string(), creds))
    }

    /// The URL with any password or token masked (for messages and banners).
    pub fn shown(&self) -> String {
        match url::Url::parse(&self.url) {
            Ok(mut u) if !u.username().is_empty() => {
                if u.password().is_some() {
                    let _ = u.set_password(Some("***"));
                } else {
                    let _ = u.set_username("***");
                }
                u.to_string()
            }
            _ => self.url.clone(),
        }
    }

    /// Connect, with `tune` applied to the options (timeouts and the like).
    pub async fn connect_with(
        &self,
        tune: impl FnOnce(async_nats::ConnectOptions) -> async_nats::ConnectOptions,
    ) -> Result<async_nats::Client, QueueError> {
        let unavailable =
            |e: String| QueueError::Unavailable(format!("NATS at {}: {e}", self.shown()));
        let (url, creds) = self.split()?;
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
        tune(o)
            .connect(url.as_str())
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
        let c = NatsConnect::url("nats://alice:s%40cret@127.0.0.1:4222");
        let (url, creds) = c.split().unwrap();
        assert_eq!(url, "nats://127.0.0.1:4222");
        assert_eq!(creds, Some(("alice".into(), Some("s@cret".into()))));
        assert!(!c.shown().contains("cret"), "{}", c.shown());
        let t = NatsConnect::url("tls://t0ken@nats.example:4222");
        assert_eq!(t.split().unwrap().1, Some(("t0ken".into(), None)));
        assert!(!t.shown().contains("t0ken"));
        assert_eq!(NatsConnect::url("nats://h:4222").split().unwrap().1, None);
        assert!(NatsConnect::url("http://h:4222").split().is_err());
    }
}
