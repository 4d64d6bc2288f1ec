//! The control plane's signing key and signed envelopes (policy bundles).
//!
//! An envelope carries a JSON body, the sha256 of its canonical form (RFC 8785) and an
//! ed25519 signature over that digest, domain-separated so a signature made for one purpose
//! cannot be replayed as another. Verifiers hold the public keys they trust; anything signed
//! by another key, altered after signing, or malformed is refused with a stable code.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What a signature is for: it covers the purpose's domain as well as the digest, so a
/// signature made for one purpose (a policy bundle) never verifies as another (a snapshot).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    PolicyBundle,
    Snapshot,
    /// An actor's identity for one assignment epoch (the credential path checks it).
    ActorIdentity,
    /// A provider's capability to snapshot blobs for one operation (the blob broker checks it).
    BlobGrant,
}

impl Purpose {
    fn domain(self) -> &'static [u8] {
        match self {
            Purpose::PolicyBundle => b"mayfly.policy-bundle.v1\0",
            Purpose::Snapshot => b"mayfly.snapshot.v1\0",
            Purpose::ActorIdentity => b"mayfly.actor-identity.v1\0",
            Purpose::BlobGrant => b"mayfly.blob-grant.v1\0",
        }
    }
}

/// Why an envelope is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum SignError {
    #[error("signed by key `{0}`, which is not trusted here")]
    UnknownKey(String),
    #[error("the body does not hash to the digest it carries (altered after signing)")]
    DigestMismatch,
    #[error("the signature does not verify")]
    BadSignature,
    #[error("malformed: {0}")]
    Malformed(String),
}

impl SignError {
    /// The stable reason code agents report and the audit records.
    pub fn code(&self) -> &'static str {
        match self {
            SignError::UnknownKey(_) => "unknown_key",
            SignError::DigestMismatch => "digest_mismatch",
            SignError::BadSignature => "bad_signature",
            SignError::Malformed(_) => "malformed",
        }
    }
}

/// A public key a verifier trusts, with its id (`ed25519:` + 16 hex of its sha256).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustedKey {
    pub id: String,
    /// base64 of the 32-byte ed25519 public key.
    pub key: String,
}

impl TrustedKey {
    /// Parse the base64 public key (as `mayfly server` writes it to `control.pub`).
    pub fn from_base64(s: &str) -> Result<TrustedKey, SignError> {
        let bytes = B64
            .decode(s.trim())
            .map_err(|e| SignError::Malformed(format!("public key: {e}")))?;
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|_| SignError::Malformed("public key: expected 32 bytes".into()))?;
        VerifyingKey::from_bytes(&arr)
            .map_err(|e| SignError::Malformed(format!("public key: {e}")))?;
        Ok(TrustedKey {
            id: key_id(&arr),
            key: B64.encode(arr),
        })
    }

    fn verifying(&self) -> Result<VerifyingKey, SignError> {
        let bytes = B64
            .decode(&self.key)
            .map_err(|e| SignError::Malformed(format!("public key: {e}")))?;
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|_| SignError::Malformed("public key: expected 32 bytes".into()))?;
        VerifyingKey::from_bytes(&arr).map_err(|e| SignError::Malformed(format!("public key: {e}")))
    }
}

fn key_id(public: &[u8; 32]) -> String {
    let d = crate::sha256_digest(public);
    format!(
        "ed25519:{}",
        d.trim_start_matches("sha256:")
            .chars()
            .take(16)
            .collect::<String>()
    )
}

/// The control plane's private signing key. Never serialized; `Debug` shows only its id.
#[derive(Clone)]
pub struct ControlKey {
    key: SigningKey,
    public: TrustedKey,
}

impl std::fmt::Debug for ControlKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ControlKey({})", self.public.id)
    }
}

impl ControlKey {
    /// A fresh random key.
    pub fn generate() -> ControlKey {
        use chacha20poly1305::aead::Generate;
        let seed = chacha20poly1305::Key::generate();
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(seed.as_slice());
        ControlKey::from_seed(bytes)
    }

    fn from_seed(seed: [u8; 32]) -> ControlKey {
        let key = SigningKey::from_bytes(&seed);
        let public = key.verifying_key().to_bytes();
        ControlKey {
            key,
            public: TrustedKey {
                id: key_id(&public),
                key: B64.encode(public),
            },
        }
    }

    /// Parse the base64 seed (as stored in the key file).
    pub fn from_base64(s: &str) -> Result<ControlKey, SignError> {
        let bytes = B64
            .decode(s.trim())
            .map_err(|e| SignError::Malformed(format!("control key: {e}")))?;
        let seed: [u8; 32] = bytes
            .try_into()
            .map_err(|_| SignError::Malformed("control key: expected 32 bytes".into()))?;
        Ok(ControlKey::from_seed(seed))
    }

    /// The base64 seed, for the key file.
    pub fn to_base64(&self) -> String {
        B64.encode(self.key.to_bytes())
    }

    /// The public half, for verifiers.
    pub fn public(&self) -> &TrustedKey {
        &self.public
    }

    /// Sign `body` for `purpose`: canonical JSON → sha256 → ed25519 over the purpose's
    /// domain and the digest.
    pub fn sign(&self, purpose: Purpose, body: Value) -> Result<Signed, crate::TrustError> {
        let digest = crate::digest_of(&body)?;
        let sig = self.key.sign(&message(purpose, &digest));
        Ok(Signed {
            body,
            digest,
            key_id: self.public.id.clone(),
            signature: B64.encode(sig.to_bytes()),
        })
    }
}

fn message(purpose: Purpose, digest: &str) -> Vec<u8> {
    let mut m = purpose.domain().to_vec();
    m.extend_from_slice(digest.as_bytes());
    m
}

/// A signed envelope.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Signed {
    pub body: Value,
    /// `sha256:<hex>` of the body's canonical JSON: the envelope's identity.
    pub digest: String,
    pub key_id: String,
    /// base64 ed25519 signature.
    pub signature: String,
}

impl Signed {
    /// Verify against `trusted` for `purpose`: the key is trusted, the body hashes to the
    /// digest and the signature, made for this purpose, verifies.
    pub fn verify(&self, purpose: Purpose, trusted: &[TrustedKey]) -> Result<(), SignError> {
        let key = trusted
            .iter()
            .find(|k| k.id == self.key_id)
            .ok_or_else(|| SignError::UnknownKey(self.key_id.clone()))?;
        let digest =
            crate::digest_of(&self.body).map_err(|e| SignError::Malformed(e.to_string()))?;
        if digest != self.digest {
            return Err(SignError::DigestMismatch);
        }
        let bytes = B64
            .decode(&self.signature)
            .map_err(|e| SignError::Malformed(format!("signature: {e}")))?;
        let sig = Signature::from_slice(&bytes).map_err(|_| SignError::BadSignature)?;
        key.verifying()?
            .verify(&message(purpose, &self.digest), &sig)
            .map_err(|_| SignError::BadSignature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_signed_envelope_verifies_and_its_digest_is_content_addressed() {
        let k = ControlKey::generate();
        let a = k
            .sign(Purpose::PolicyBundle, json!({"b": 1, "a": [1, 2]}))
            .unwrap();
        let b = k
            .sign(Purpose::PolicyBundle, json!({"a": [1, 2], "b": 1}))
            .unwrap();
        assert_eq!(a.digest, b.digest, "key order does not change the digest");
        assert!(a.key_id.starts_with("ed25519:"));
        a.verify(Purpose::PolicyBundle, std::slice::from_ref(k.public()))
            .unwrap();
    }

    #[test]
    fn tampering_an_unknown_key_and_garbage_are_refused_with_stable_codes() {
        let k = ControlKey::generate();
        let trusted = vec![k.public().clone()];
        let good = k
            .sign(Purpose::PolicyBundle, json!({"policies": ["p"]}))
            .unwrap();

        let mut altered = good.clone();
        altered.body = json!({"policies": ["q"]});
        assert_eq!(
            altered.verify(Purpose::PolicyBundle, &trusted),
            Err(SignError::DigestMismatch)
        );

        // Re-hashed after altering: the digest matches, the signature does not.
        let mut forged = altered.clone();
        forged.digest = crate::digest_of(&forged.body).unwrap();
        assert_eq!(
            forged.verify(Purpose::PolicyBundle, &trusted),
            Err(SignError::BadSignature)
        );

        let other = ControlKey::generate();
        let foreign = other
            .sign(Purpose::PolicyBundle, json!({"policies": ["p"]}))
            .unwrap();
        let err = foreign.verify(Purpose::PolicyBundle, &trusted).unwrap_err();
        assert_eq!(err.code(), "unknown_key");

        // Another key claiming the trusted key's id does not verify either.
        let mut impostor = foreign.clone();
        impostor.key_id = k.public().id.clone();
        assert_eq!(
            impostor.verify(Purpose::PolicyBundle, &trusted),
            Err(SignError::BadSignature)
        );

        let mut garbage = good.clone();
        garbage.signature = "not base64!".into();
        assert_eq!(
            garbage
                .verify(Purpose::PolicyBundle, &trusted)
                .unwrap_err()
                .code(),
            "malformed"
        );
    }

    #[test]
    fn a_signature_for_one_purpose_does_not_verify_as_another() {
        let k = ControlKey::generate();
        let trusted = vec![k.public().clone()];
        let bundle = k
            .sign(Purpose::PolicyBundle, json!({"policies": []}))
            .unwrap();
        bundle.verify(Purpose::PolicyBundle, &trusted).unwrap();
        assert_eq!(
            bundle.verify(Purpose::Snapshot, &trusted),
            Err(SignError::BadSignature)
        );
        let snap = k.sign(Purpose::Snapshot, json!({"policies": []})).unwrap();
        assert_eq!(snap.digest, bundle.digest, "same body, same digest");
        assert_eq!(
            snap.verify(Purpose::PolicyBundle, &trusted),
            Err(SignError::BadSignature)
        );
    }

    #[test]
    fn keys_round_trip_through_their_text_forms() {
        let k = ControlKey::generate();
        let again = ControlKey::from_base64(&k.to_base64()).unwrap();
        assert_eq!(again.public(), k.public());
        let public = TrustedKey::from_base64(&k.public().key).unwrap();
        assert_eq!(&public, k.public());
        assert!(ControlKey::from_base64("c2hvcnQ=").is_err());
        assert!(format!("{k:?}").contains(&k.public().id));
        assert!(!format!("{k:?}").contains(&k.to_base64()));
    }
}
