//! Canonical JSON (RFC 8785 / JCS), sha256 digests and the per-execution hash chain.
//!
//! The hash chain is what lets `mayfly replay` prove that nobody edited the log: each
//! event's hash covers its canonical envelope including the previous event's hash.

use mayfly_types::{Event, GENESIS_HASH};
use serde::Serialize;
use sha2::{Digest, Sha256};

/// Errors from canonicalization and chain verification.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TrustError {
    #[error("cannot canonicalize value: {0}")]
    Canonical(String),
    #[error("event log of execution {execution} is corrupted at seq {seq}: {reason}")]
    Chain {
        execution: String,
        seq: u64,
        reason: String,
    },
}

/// RFC 8785 canonical JSON bytes of any serializable value.
pub fn canonical<T: Serialize>(value: &T) -> Result<Vec<u8>, TrustError> {
    serde_json_canonicalizer::to_vec(value).map_err(|e| TrustError::Canonical(e.to_string()))
}

/// `sha256:<hex>` of raw bytes.
pub fn sha256_digest(bytes: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(bytes);
    format!("sha256:{}", hex::encode(h.finalize()))
}

/// `sha256:<hex>` of the canonical JSON of a value (content addressing).
pub fn digest_of<T: Serialize>(value: &T) -> Result<String, TrustError> {
    Ok(sha256_digest(&canonical(value)?))
}

/// The hash an event must carry: canonical envelope without `hash` and `position`.
pub fn event_hash(event: &Event) -> Result<String, TrustError> {
    // Borrowing view so we never clone payloads just to hash them.
    #[derive(Serialize)]
    struct View<'a> {
        execution_id: &'a mayfly_types::ExecutionId,
        seq: u64,
        kind: mayfly_types::EventKind,
        #[serde(skip_serializing_if = "Option::is_none")]
        step: &'a Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        attempt: Option<u32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        command_id: &'a Option<String>,
        at: u64,
        actor: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        request_id: &'a Option<String>,
        playbook_digest: &'a str,
        payload: &'a serde_json::Value,
        #[serde(skip_serializing_if = "Option::is_none")]
        payload_ref: &'a Option<String>,
        prev_hash: &'a str,
    }
    let v = View {
        execution_id: &event.execution_id,
        seq: event.seq,
        kind: event.kind,
        step: &event.step,
        attempt: event.attempt,
        command_id: &event.command_id,
        at: event.at,
        actor: &event.actor,
        request_id: &event.request_id,
        playbook_digest: &event.playbook_digest,
        payload: &event.payload,
        payload_ref: &event.payload_ref,
        prev_hash: &event.prev_hash,
    };
    digest_of(&v)
}

/// Fill in `hash` for an event whose `prev_hash` and `seq` are already set.
pub fn seal(event: &mut Event) -> Result<(), TrustError> {
    event.hash = event_hash(event)?;
    Ok(())
}

/// Verifies one execution's events: dense seq from 1, prev_hash links, recomputed hashes.
/// The error names the first bad seq so an operator knows exactly which row is damaged.
pub fn verify_chain(events: &[Event]) -> Result<(), TrustError> {
    let mut prev = GENESIS_HASH.to_owned();
    for (i, ev) in events.iter().enumerate() {
        let expected_seq = i as u64 + 1;
        let bad = |reason: String| TrustError::Chain {
            execution: ev.execution_id.0.clone(),
            seq: ev.seq,
            reason,
        };
        if ev.seq != expected_seq {
            return Err(bad(format!("expected seq {expected_seq}")));
        }
        if ev.prev_hash != prev {
            return Err(bad("prev_hash does not link to the previous event".into()));
        }
        let h = event_hash(ev)?;
        if h != ev.hash {
            return Err(bad(format!(
                "hash mismatch (stored {}, computed {h})",
                ev.hash
            )));
        }
        prev = h;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mayfly_types::{EventKind, ExecutionId};
    use serde_json::json;

    fn chain(n: u64) -> Vec<Event> {
        let mut prev = GENESIS_HASH.to_owned();
        (1..=n)
            .map(|seq| {
                let mut e = Event {
                    execution_id: ExecutionId::from("x"),
                    seq,
                    kind: EventKind::StepFinished,
                    step: Some("s".into()),
                    attempt: None,
                    command_id: None,
                    at: 1000 + seq,
                    actor: "test".into(),
                    request_id: None,
                    playbook_digest: "sha256:pb".into(),
                    payload: json!({"result": seq, "b": [1, 2], "a": "z"}),
                    payload_ref: None,
                    prev_hash: prev.clone(),
                    hash: String::new(),
                    position: Some(seq * 10),
                };
                seal(&mut e).expect("seal");
                prev = e.hash.clone();
                e
            })
            .collect()
    }

    #[test]
    fn canonical_sorts_keys_and_is_stable() {
        let a = canonical(&json!({"b": 1, "a": [true, null, 1.5]})).expect("c");
        assert_eq!(
            String::from_utf8(a).expect("utf8"),
            r#"{"a":[true,null,1.5],"b":1}"#
        );
        assert_eq!(digest_of(&json!({"x": 1})), digest_of(&json!({"x": 1})));
        assert!(sha256_digest(b"").starts_with("sha256:e3b0c442"));
    }

    #[test]
    fn valid_chain_verifies_and_position_is_not_hashed() {
        let mut c = chain(5);
        assert_eq!(verify_chain(&c), Ok(()));
        c[2].position = Some(999);
        assert_eq!(verify_chain(&c), Ok(()));
    }

    #[test]
    fn tampered_payload_names_the_seq() {
        let mut c = chain(5);
        c[2].payload = json!({"result": 42});
        match verify_chain(&c) {
            Err(TrustError::Chain { seq, reason, .. }) => {
                assert_eq!(seq, 3);
                assert!(reason.contains("hash mismatch"));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn broken_link_and_gap_are_detected() {
        let mut c = chain(4);
        c[3].prev_hash = GENESIS_HASH.into();
        assert!(matches!(
            verify_chain(&c),
            Err(TrustError::Chain { seq: 4, .. })
        ));
        let mut c = chain(4);
        c.remove(1);
        assert!(matches!(
            verify_chain(&c),
            Err(TrustError::Chain { seq: 3, .. })
        ));
    }
}
pub mod keychain;
pub mod sign;
