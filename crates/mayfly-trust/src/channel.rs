//! The command channel's authentication: every message between a server and its workers
//! (queued commands, requests, answers) carries an HMAC-SHA256 tag under a key of *that
//! log*: `HMAC(channel key, "mayfly.channel.v1\0" ‖ log id)`. A deployment's servers and
//! workers share the channel key (a file, like the master key); two logs never share a
//! message key even when their deployments share the channel key, and nothing without the
//! key can put a command in front of a worker or answer one.
//!
//! Frame: `MFY1` ‖ 32-byte tag ‖ body. The tag covers a domain (what kind of message), a
//! binding (the request's verb; an answer's reply subject, so an answer cannot be replayed
//! to another request) and the body. A replayed command or request within one log is
//! harmless: claims and completions are fenced by command id and attempt.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use sha2::Sha256;

const MAGIC: &[u8; 4] = b"MFY1";
const TAG: usize = 32;
/// Bytes a frame adds to a body.
pub const OVERHEAD: usize = MAGIC.len() + TAG;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChannelError {
    #[error("bad channel key: {0}")]
    BadKey(String),
    #[error("message is not framed for an authenticated channel")]
    Unframed,
    #[error("message tag does not verify: another deployment's log, another key, or altered")]
    BadTag,
}

/// The deployment's shared channel secret. `Debug` shows a fingerprint only.
#[derive(Clone)]
pub struct ChannelKey {
    bytes: [u8; 32],
}

impl std::fmt::Debug for ChannelKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChannelKey({})", self.fingerprint())
    }
}

impl ChannelKey {
    pub fn generate() -> ChannelKey {
        // The keychain's key generator: the OS's randomness.
        use chacha20poly1305::aead::Generate;
        let k = chacha20poly1305::Key::generate();
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(k.as_slice());
        ChannelKey { bytes }
    }

    /// The base64 form (a key file, `MAYFLY_CHANNEL_KEY`).
    pub fn from_base64(s: &str) -> Result<ChannelKey, ChannelError> {
        let raw = B64
            .decode(s.trim().as_bytes())
            .map_err(|_| ChannelError::BadKey("not base64".into()))?;
        let bytes: [u8; 32] = raw
            .try_into()
            .map_err(|_| ChannelError::BadKey("must be 32 bytes".into()))?;
        Ok(ChannelKey { bytes })
    }

    pub fn to_base64(&self) -> String {
        B64.encode(self.bytes)
    }

    /// A public fingerprint (16 hex digits), to tell keys apart in messages.
    pub fn fingerprint(&self) -> String {
        crate::sha256_digest(&self.bytes)["sha256:".len()..]
            .chars()
            .take(16)
            .collect()
    }

    /// The message key of log `log_id`.
    pub fn for_log(&self, log_id: &str) -> LogKey {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.bytes)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(b"mayfly.channel.v1\0");
        mac.update(log_id.as_bytes());
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(&mac.finalize().into_bytes());
        LogKey {
            bytes,
            log_id: log_id.to_owned(),
        }
    }
}

/// What a message is, bound into its tag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A queued command group (server → workers).
    Command,
    /// A request (worker → server), bound to its verb.
    Request,
    /// An answer, bound to the subject it is sent to (the request's reply inbox).
    Answer,
    /// A server's introduction (which log it appends), bound to the asker's inbox.
    Hello,
}

impl Kind {
    fn domain(self) -> &'static [u8] {
        match self {
            Kind::Command => b"command\0",
            Kind::Request => b"request\0",
            Kind::Answer => b"answer\0",
            Kind::Hello => b"hello\0",
        }
    }
}

/// One log's message key.
#[derive(Clone)]
pub struct LogKey {
    bytes: [u8; 32],
    log_id: String,
}

impl std::fmt::Debug for LogKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LogKey({})", self.log_id)
    }
}

impl LogKey {
    pub fn log_id(&self) -> &str {
        &self.log_id
    }

    fn mac(&self, kind: Kind, binding: &str, body: &[u8]) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.bytes)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(kind.domain());
        mac.update(&(binding.len() as u64).to_be_bytes());
        mac.update(binding.as_bytes());
        mac.update(body);
        mac
    }

    /// `body` framed with its tag.
    pub fn seal(&self, kind: Kind, binding: &str, body: &[u8]) -> Vec<u8> {
        let tag = self.mac(kind, binding, body).finalize().into_bytes();
        let mut out = Vec::with_capacity(OVERHEAD + body.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&tag);
        out.extend_from_slice(body);
        out
    }

    /// The body of a frame whose tag verifies (in constant time).
    pub fn open<'a>(
        &self,
        kind: Kind,
        binding: &str,
        frame: &'a [u8],
    ) -> Result<&'a [u8], ChannelError> {
        if frame.len() < OVERHEAD || &frame[..MAGIC.len()] != MAGIC {
            return Err(ChannelError::Unframed);
        }
        let (tag, body) = frame[MAGIC.len()..].split_at(TAG);
        self.mac(kind, binding, body)
            .verify_slice(tag)
            .map_err(|_| ChannelError::BadTag)?;
        Ok(body)
    }
}

/// The first 16 bytes of a frame's tag: what a replay cache remembers it by (None for
/// something that is not a frame).
pub fn tag_prefix(frame: &[u8]) -> Option<[u8; 16]> {
    if frame.len() < OVERHEAD || &frame[..MAGIC.len()] != MAGIC {
        return None;
    }
    frame[MAGIC.len()..MAGIC.len() + 16].try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_open_only_under_their_log_kind_and_binding() {
        let ck = ChannelKey::generate();
        let a = ck.for_log("aaaa");
        let sealed = a.seal(Kind::Request, "claims", b"[1,2]");
        assert_eq!(a.open(Kind::Request, "claims", &sealed).unwrap(), b"[1,2]");
        // Another log of the same deployment, another deployment, another kind or binding.
        assert_eq!(
            ck.for_log("bbbb").open(Kind::Request, "claims", &sealed),
            Err(ChannelError::BadTag)
        );
        assert_eq!(
            ChannelKey::generate()
                .for_log("aaaa")
                .open(Kind::Request, "claims", &sealed),
            Err(ChannelError::BadTag)
        );
        assert_eq!(
            a.open(Kind::Answer, "claims", &sealed),
            Err(ChannelError::BadTag)
        );
        assert_eq!(
            a.open(Kind::Request, "completes", &sealed),
            Err(ChannelError::BadTag)
        );
        // Altered body, truncated, unframed.
        let mut bad = sealed.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(
            a.open(Kind::Request, "claims", &bad),
            Err(ChannelError::BadTag)
        );
        assert_eq!(
            a.open(Kind::Request, "claims", &sealed[..10]),
            Err(ChannelError::Unframed)
        );
        assert_eq!(
            a.open(Kind::Request, "claims", b"[1,2]"),
            Err(ChannelError::Unframed)
        );
        // Binding boundaries cannot be shifted between binding and body.
        let x = a.seal(Kind::Answer, "ab", b"c");
        assert!(a.open(Kind::Answer, "a", &x).is_err());
    }

    #[test]
    fn keys_round_trip_and_never_show() {
        let ck = ChannelKey::generate();
        let back = ChannelKey::from_base64(&ck.to_base64()).unwrap();
        assert_eq!(back.fingerprint(), ck.fingerprint());
        assert!(!format!("{ck:?}").contains(&ck.to_base64()));
        assert!(ChannelKey::from_base64("nope").is_err());
        assert!(ChannelKey::from_base64(&B64.encode([0u8; 16])).is_err());
    }
}
