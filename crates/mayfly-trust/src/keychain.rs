//! Keychain encryption at rest: XChaCha20-Poly1305 under a 256-bit master key.
//!
//! A sealed credential is bound to its slot: the tenant and alias are the AEAD's associated
//! data, so a ciphertext copied to another tenant or alias does not open. The sealed form
//! names the key it was sealed with (`mk1.<key id>.<nonce>.<ciphertext>`), which is what makes
//! rotation (re-seal everything under a new key) checkable.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use chacha20poly1305::XChaCha20Poly1305;
use chacha20poly1305::XNonce;
use chacha20poly1305::aead::{Aead, Generate, KeyInit, Payload};

/// Keychain errors. Messages never contain key material or plaintext.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeychainError {
    #[error("invalid master key: {0}")]
    BadKey(String),
    #[error("credential is sealed with master key {found}, not the configured key {expected}")]
    WrongKey { expected: String, found: String },
    #[error("credential does not open: tampered with, or moved from another tenant or alias")]
    Tampered,
    #[error("malformed sealed credential")]
    Malformed,
}

/// The master key. Its `Debug` never shows the key.
#[derive(Clone)]
pub struct MasterKey {
    bytes: [u8; 32],
    id: String,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MasterKey({})", self.id)
    }
}

fn aad(tenant: &str, alias: &str) -> Vec<u8> {
    // Length-prefixed so ("ab","c") and ("a","bc") differ.
    let mut v = Vec::with_capacity(tenant.len() + alias.len() + 16);
    v.extend_from_slice(&(tenant.len() as u64).to_be_bytes());
    v.extend_from_slice(tenant.as_bytes());
    v.extend_from_slice(alias.as_bytes());
    v
}

impl MasterKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        let key = chacha20poly1305::Key::generate();
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(key.as_slice());
        Self::from_bytes(bytes)
    }

    fn from_bytes(bytes: [u8; 32]) -> Self {
        let digest = crate::sha256_digest(&bytes);
        // A short public fingerprint: enough to tell keys apart, useless to an attacker.
        let id = digest
            .trim_start_matches("sha256:")
            .chars()
            .take(16)
            .collect();
        MasterKey { bytes, id }
    }

    /// Parse the base64 form (as stored in a key file or `MAYFLY_MASTER_KEY`).
    pub fn from_base64(s: &str) -> Result<Self, KeychainError> {
        let raw = B64
            .decode(s.trim().as_bytes())
            .map_err(|_| KeychainError::BadKey("not base64".into()))?;
        let bytes: [u8; 32] = raw
            .try_into()
            .map_err(|_| KeychainError::BadKey("must be 32 bytes".into()))?;
        Ok(Self::from_bytes(bytes))
    }

    /// The base64 form, for writing a key file.
    pub fn to_base64(&self) -> String {
        B64.encode(self.bytes)
    }

    /// Public fingerprint of the key.
    pub fn id(&self) -> &str {
        &self.id
    }

    fn cipher(&self) -> Result<XChaCha20Poly1305, KeychainError> {
        XChaCha20Poly1305::new_from_slice(&self.bytes)
            .map_err(|_| KeychainError::BadKey("length".into()))
    }

    /// Encrypt `plaintext` for slot (tenant, alias).
    pub fn seal(
        &self,
        tenant: &str,
        alias: &str,
        plaintext: &[u8],
    ) -> Result<String, KeychainError> {
        let nonce = XNonce::generate();
        let aad = aad(tenant, alias);
        let ct = self
            .cipher()?
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext,
                    aad: &aad,
                },
            )
            .map_err(|_| KeychainError::Malformed)?;
        Ok(format!(
            "mk1.{}.{}.{}",
            self.id,
            B64.encode(nonce.as_slice()),
            B64.encode(ct)
        ))
    }

    /// Decrypt a sealed credential of slot (tenant, alias).
    pub fn open(&self, tenant: &str, alias: &str, sealed: &str) -> Result<Vec<u8>, KeychainError> {
        let mut parts = sealed.split('.');
        let (Some("mk1"), Some(key_id), Some(nonce), Some(ct), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(KeychainError::Malformed);
        };
        if key_id != self.id {
            return Err(KeychainError::WrongKey {
                expected: self.id.clone(),
                found: key_id.to_owned(),
            });
        }
        let nonce = B64.decode(nonce).map_err(|_| KeychainError::Malformed)?;
        let nonce = XNonce::try_from(nonce.as_slice()).map_err(|_| KeychainError::Malformed)?;
        let ct = B64.decode(ct).map_err(|_| KeychainError::Malformed)?;
        let aad = aad(tenant, alias);
        self.cipher()?
            .decrypt(
                &nonce,
                Payload {
                    msg: &ct,
                    aad: &aad,
                },
            )
            .map_err(|_| KeychainError::Tampered)
    }

    /// The key id a sealed credential was sealed with.
    pub fn sealed_with(sealed: &str) -> Option<&str> {
        let mut p = sealed.split('.');
        (p.next() == Some("mk1")).then(|| p.next()).flatten()
    }
}

/// A fresh random secret token with a prefix (e.g. an API token `mf_…`), 256 bits of entropy.
pub fn random_token(prefix: &str) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let key = chacha20poly1305::Key::generate();
    format!("{prefix}{}", URL_SAFE_NO_PAD.encode(key.as_slice()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_and_slot_binding() {
        let k = MasterKey::generate();
        let s = k
            .seal("acme", "db", b"{\"password\":\"hunter2\"}")
            .expect("seal");
        assert!(!s.contains("hunter2"));
        assert_eq!(
            k.open("acme", "db", &s).expect("open"),
            b"{\"password\":\"hunter2\"}"
        );
        assert_eq!(
            k.open("other", "db", &s),
            Err(KeychainError::Tampered),
            "tenant-bound"
        );
        assert_eq!(
            k.open("acme", "db2", &s),
            Err(KeychainError::Tampered),
            "alias-bound"
        );
        // two seals of the same value differ (random nonce)
        assert_ne!(
            s,
            k.seal("acme", "db", b"{\"password\":\"hunter2\"}")
                .expect("seal")
        );
        assert_eq!(MasterKey::sealed_with(&s), Some(k.id()));
    }

    #[test]
    fn wrong_key_tamper_and_garbage_are_refused() {
        let k = MasterKey::generate();
        let other = MasterKey::generate();
        let s = k.seal("t", "a", b"v").expect("seal");
        assert!(matches!(
            other.open("t", "a", &s),
            Err(KeychainError::WrongKey { .. })
        ));
        let mut bytes: Vec<char> = s.chars().collect();
        let last = bytes.len() - 3;
        bytes[last] = if bytes[last] == 'A' { 'B' } else { 'A' };
        let tampered: String = bytes.into_iter().collect();
        assert!(matches!(
            k.open("t", "a", &tampered),
            Err(KeychainError::Tampered | KeychainError::Malformed)
        ));
        assert_eq!(k.open("t", "a", "nope"), Err(KeychainError::Malformed));
    }

    #[test]
    fn key_serialization_and_debug_do_not_leak() {
        let k = MasterKey::generate();
        let back = MasterKey::from_base64(&k.to_base64()).expect("parse");
        assert_eq!(back.id(), k.id());
        assert!(!format!("{k:?}").contains(&k.to_base64()));
        assert!(MasterKey::from_base64("c2hvcnQ=").is_err());
    }
}
