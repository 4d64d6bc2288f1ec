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
///
/// Every event is hashed when it is appended and again whenever its chain is verified, so
/// the envelope is written straight into a reused buffer by [`envelope`], not through a
/// generic canonicalizer (which buffers and re-parses every key of every object). The bytes
/// are the same: `envelope_matches_the_generic_canonicalizer` holds them to it.
pub fn event_hash(event: &Event) -> Result<String, TrustError> {
    thread_local! {
        static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    BUF.with(|buf| {
        let mut buf = buf.borrow_mut();
        buf.clear();
        envelope(event, &mut buf)?;
        let digest = sha256_digest(&buf);
        // A rare huge payload must not pin its size in every thread for good.
        if buf.capacity() > 1 << 20 {
            *buf = Vec::new();
        }
        Ok(digest)
    })
}

/// RFC 8785 bytes of an event's envelope: its fields but `hash` and `position`, absent
/// options left out, keys in canonical order.
fn envelope(e: &Event, out: &mut Vec<u8>) -> Result<(), TrustError> {
    // Keys in UTF-16 order (all ASCII here, so byte order).
    out.extend_from_slice(b"{\"actor\":");
    json_str(out, &e.actor);
    out.extend_from_slice(b",\"at\":");
    number_u64(out, e.at);
    if let Some(a) = e.attempt {
        out.extend_from_slice(b",\"attempt\":");
        number_u64(out, u64::from(a));
    }
    if let Some(c) = &e.command_id {
        out.extend_from_slice(b",\"command_id\":");
        json_str(out, c);
    }
    out.extend_from_slice(b",\"execution_id\":");
    json_str(out, &e.execution_id.0);
    out.extend_from_slice(b",\"kind\":");
    serde_json::to_writer(&mut *out, &e.kind)
        .map_err(|err| TrustError::Canonical(err.to_string()))?;
    out.extend_from_slice(b",\"payload\":");
    canonical_value(out, &e.payload)?;
    if let Some(r) = &e.payload_ref {
        out.extend_from_slice(b",\"payload_ref\":");
        json_str(out, r);
    }
    out.extend_from_slice(b",\"playbook_digest\":");
    json_str(out, &e.playbook_digest);
    out.extend_from_slice(b",\"prev_hash\":");
    json_str(out, &e.prev_hash);
    if let Some(r) = &e.request_id {
        out.extend_from_slice(b",\"request_id\":");
        json_str(out, r);
    }
    out.extend_from_slice(b",\"seq\":");
    number_u64(out, e.seq);
    if let Some(s) = &e.step {
        out.extend_from_slice(b",\"step\":");
        json_str(out, s);
    }
    out.push(b'}');
    Ok(())
}

/// A JSON string as JCS writes it: `"` and `\\` escaped, control characters as `\b \f \n
/// \r \t` or `\u00xx` (lower-case hex), everything else as is — which is also what
/// serde_json writes.
fn json_str(out: &mut Vec<u8>, s: &str) {
    // Writing a string into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// JCS numbers are IEEE doubles printed as ECMAScript does (integers too: past 2^53 they
/// round, as the canonicalizer rounds them).
fn number_f64(out: &mut Vec<u8>, v: f64) -> Result<(), TrustError> {
    if !v.is_finite() {
        return Err(TrustError::Canonical(
            "NaN and +/-Infinity are not permitted in JSON".into(),
        ));
    }
    out.extend_from_slice(ryu_js::Buffer::new().format_finite(v).as_bytes());
    Ok(())
}

fn number_u64(out: &mut Vec<u8>, v: u64) {
    // A u64 as a double is always finite.
    let _ = number_f64(out, v as f64);
}

fn canonical_value(out: &mut Vec<u8>, v: &serde_json::Value) -> Result<(), TrustError> {
    use serde_json::Value;
    match v {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                number_u64(out, u);
            } else if let Some(i) = n.as_i64() {
                number_f64(out, i as f64)?;
            } else if let Some(f) = n.as_f64() {
                number_f64(out, f)?;
            } else {
                return Err(TrustError::Canonical(format!("unrepresentable number {n}")));
            }
        }
        Value::String(s) => json_str(out, s),
        Value::Array(items) => {
            out.push(b'[');
            for (i, x) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                canonical_value(out, x)?;
            }
            out.push(b']');
        }
        Value::Object(map) => {
            out.push(b'{');
            // Keys sort by UTF-16 code units. A map already iterates in that order unless a
            // key holds a character past U+FFFF next to one in U+E000..=U+FFFF (byte and
            // UTF-16 order differ only there), or the map keeps insertion order.
            let ordered = map
                .keys()
                .zip(map.keys().skip(1))
                .all(|(a, b)| utf16_cmp(a, b).is_lt());
            let mut write = |i: usize, k: &str, x: &Value| {
                if i > 0 {
                    out.push(b',');
                }
                json_str(out, k);
                out.push(b':');
                canonical_value(out, x)
            };
            if ordered {
                for (i, (k, x)) in map.iter().enumerate() {
                    write(i, k, x)?;
                }
            } else {
                let mut entries: Vec<(&String, &Value)> = map.iter().collect();
                entries.sort_by(|a, b| utf16_cmp(a.0, b.0));
                for (i, (k, x)) in entries.into_iter().enumerate() {
                    write(i, k, x)?;
                }
            }
            out.push(b'}');
        }
    }
    Ok(())
}

fn utf16_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    if a.is_ascii() && b.is_ascii() {
        return a.as_bytes().cmp(b.as_bytes());
    }
    a.encode_utf16().cmp(b.encode_utf16())
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

    /// The envelope as `event_hash` wrote it before the direct writer: a borrowing view
    /// through the generic canonicalizer. Stored logs were hashed this way.
    fn reference_hash(event: &Event) -> String {
        #[derive(Serialize)]
        struct View<'a> {
            execution_id: &'a ExecutionId,
            seq: u64,
            kind: EventKind,
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
        digest_of(&View {
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
        })
        .expect("reference canonical")
    }

    /// xorshift64*: deterministic, so a failure names its case.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
            &xs[(self.next() % xs.len() as u64) as usize]
        }
    }

    const TEXTS: &[&str] = &[
        "",
        "a",
        "b",
        "A",
        "_",
        "ab",
        "a\u{1}",
        "quote\"back\\slash/",
        "tab\tnl\nff\u{c}cr\r",
        "\u{7f}del",
        "\u{1f}",
        "é",
        "ü",
        "\u{e000}",
        "\u{ffff}",
        "😀",
        "𝄞",
        "\u{2028}",
        "日本",
        "result",
        "index",
        "$ref",
    ];

    fn random_value(r: &mut Rng, depth: u32) -> serde_json::Value {
        use serde_json::Value;
        let numbers = [
            json!(0),
            json!(1),
            json!(-1),
            json!(42),
            json!(9_007_199_254_740_992u64),
            json!(9_007_199_254_740_993u64),
            json!(u64::MAX),
            json!(i64::MIN),
            json!(-9_007_199_254_740_993i64),
            json!(0.1),
            json!(1.0),
            json!(-0.0),
            json!(1e21),
            json!(1e-7),
            json!(123.456e30),
            json!(5e-324),
            json!(f64::MAX),
            json!(1.0 / 7.0),
        ];
        match r.next() % if depth > 3 { 4 } else { 6 } {
            0 => Value::Null,
            1 => Value::Bool(r.next().is_multiple_of(2)),
            2 => r.pick(&numbers).clone(),
            3 => Value::String(r.pick(TEXTS).to_string()),
            4 => Value::Array(
                (0..r.next() % 5)
                    .map(|_| random_value(r, depth + 1))
                    .collect(),
            ),
            _ => Value::Object(
                (0..r.next() % 6)
                    .map(|_| (r.pick(TEXTS).to_string(), random_value(r, depth + 1)))
                    .collect(),
            ),
        }
    }

    #[test]
    fn envelope_matches_the_generic_canonicalizer() {
        let mut r = Rng(0x9E37_79B9_7F4A_7C15);
        let opt = |r: &mut Rng| (r.next().is_multiple_of(2)).then(|| r.pick(TEXTS).to_string());
        for case in 0..5000 {
            let e = Event {
                execution_id: ExecutionId(r.pick(TEXTS).to_string()),
                seq: r.next() >> (r.next() % 64),
                kind: *r.pick(&[
                    EventKind::StepFinished,
                    EventKind::CommandIssued,
                    EventKind::ExecutionRequested,
                ]),
                step: opt(&mut r),
                attempt: (r.next().is_multiple_of(2)).then(|| r.next() as u32),
                command_id: opt(&mut r),
                at: r.next() >> (r.next() % 64),
                actor: r.pick(TEXTS).to_string(),
                request_id: opt(&mut r),
                playbook_digest: r.pick(TEXTS).to_string(),
                payload: random_value(&mut r, 0),
                payload_ref: opt(&mut r),
                prev_hash: r.pick(TEXTS).to_string(),
                hash: String::new(),
                position: None,
            };
            assert_eq!(
                event_hash(&e).expect("hash"),
                reference_hash(&e),
                "case {case}: {e:?}"
            );
        }
    }

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
pub mod channel;
pub mod keychain;
pub mod sign;
