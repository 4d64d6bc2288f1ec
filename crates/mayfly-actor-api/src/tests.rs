use super::*;
use mayfly_trust::sign::ControlKey;
use serde_json::json;

fn spec(actor: &str, tenant: &str) -> ActorSpec {
    ActorSpec {
        actor: actor.into(),
        tenant: tenant.into(),
        template: "counter".into(),
        workload: Workload::Process {
            command: "python3".into(),
            args: vec!["-m".into(), "http.server".into()],
            env: BTreeMap::new(),
            durable_dirs: vec!["data".into()],
            readiness: Readiness::default(),
        },
    }
}

fn assign(op_id: &str, epoch: u64) -> OpRequest {
    OpRequest {
        op_id: op_id.into(),
        actor: "a1".into(),
        tenant: "t1".into(),
        assignment_epoch: epoch,
        op: Op::Assign {
            desired: Desired::Running,
            spec: spec("a1", "t1"),
        },
        delivery: None,
        grant: None,
    }
}

fn format() -> Format {
    Format {
        id: "mayfly.process.data".into(),
        version: 1,
    }
}

fn manifest(s: &ActorSpec) -> Manifest {
    Manifest {
        format: format(),
        scope: Scope::Data,
        blobs: vec![BlobRef {
            name: "data".into(),
            digest: mayfly_trust::sha256_digest(b"x"),
            size: 1,
        }],
        platform: "linux/x86_64".into(),
        tenant: s.tenant.clone(),
        template: s.template.clone(),
        actor: Some(s.actor.clone()),
        workload_digest: s.workload.digest(),
        assets: vec![],
    }
}

#[test]
fn the_wire_shape_is_flat_and_tagged_by_op() {
    let r = assign("op-1", 3);
    let v = serde_json::to_value(&r).unwrap();
    assert_eq!(v["op"], "assign");
    assert_eq!(v["desired"], "running");
    assert_eq!(v["spec"]["workload"]["class"], "process");
    assert_eq!(v["assignment_epoch"], 3);
    let back: OpRequest = serde_json::from_value(v).unwrap();
    assert_eq!(back, r);
    let err = serde_json::from_value::<OpRequest>(json!({
        "op_id": "x", "actor": "a", "tenant": "t", "assignment_epoch": 1,
        "op": "checkpoint", "kind": "external", "scope": "data", "surprise": 1
    }));
    assert!(err.is_err(), "unknown fields are refused");
}

#[test]
fn the_payload_digest_ignores_the_op_id_and_the_delivery_but_nothing_else() {
    let a = assign("op-1", 3);
    let mut b = assign("op-2", 3);
    b.delivery = Some(Delivery {
        identity: "id".into(),
        secrets: BTreeMap::from([("k".into(), "s3cret".into())]),
    });
    assert_eq!(a.payload_digest(), b.payload_digest());
    let c = assign("op-1", 4);
    assert_ne!(
        a.payload_digest(),
        c.payload_digest(),
        "the epoch is payload"
    );
    let mut d = assign("op-1", 3);
    d.op = Op::Assign {
        desired: Desired::Suspended,
        spec: spec("a1", "t1"),
    };
    assert_ne!(a.payload_digest(), d.payload_digest());
}

#[test]
fn a_delivery_never_prints_its_values() {
    let d = Delivery {
        identity: "actor-token-123".into(),
        secrets: BTreeMap::from([("db".into(), "hunter2".into())]),
    };
    let s = format!("{d:?}");
    assert!(
        !s.contains("hunter2") && !s.contains("actor-token-123"),
        "{s}"
    );
    assert!(s.contains("db"));
}

#[test]
fn requests_are_checked_before_anything_is_recorded() {
    assert!(assign("op-1", 1).check().is_ok());
    let cases: Vec<(OpRequest, &str)> = vec![
        (assign("", 1), "op_id"),
        (assign("op/../1", 1), "op_id"),
        (
            OpRequest {
                actor: "other".into(),
                ..assign("op", 1)
            },
            "differ",
        ),
        (
            OpRequest {
                op: Op::Assign {
                    desired: Desired::Running,
                    spec: ActorSpec {
                        workload: Workload::Process {
                            command: "x".into(),
                            args: vec![],
                            env: BTreeMap::new(),
                            durable_dirs: vec!["../etc".into()],
                            readiness: Readiness::default(),
                        },
                        ..spec("a1", "t1")
                    },
                },
                ..assign("op", 1)
            },
            "durable dir",
        ),
        (
            OpRequest {
                op: Op::Assign {
                    desired: Desired::Running,
                    spec: ActorSpec {
                        workload: Workload::Wasm {
                            module: "not-a-digest".into(),
                            handler: "handle".into(),
                        },
                        ..spec("a1", "t1")
                    },
                },
                ..assign("op", 1)
            },
            "sha256",
        ),
    ];
    for (r, needle) in cases {
        let e = r.check().unwrap_err();
        assert_eq!(e.code, RefusalCode::InvalidRequest);
        assert!(e.message.contains(needle), "{needle}: {e}");
    }
}

#[test]
fn paths_and_names() {
    for ok in ["data", "a/b", "x.y"] {
        assert!(is_relative_clean(ok), "{ok}");
    }
    for bad in ["", "/abs", "a/../b", "a//b", "./a", ".."] {
        assert!(!is_relative_clean(bad), "{bad}");
    }
    assert!(is_name("op-1:a.b_c", 16));
    assert!(!is_name("a b", 16) && !is_name("..", 16) && !is_name(&"x".repeat(17), 16));
}

#[test]
fn on_commit_must_be_a_subset_of_on_pause() {
    let ok = CheckpointPolicy {
        on_pause: vec![Scope::Full, Scope::Data],
        on_commit: vec![Scope::Data],
    };
    assert!(ok.check().is_ok());
    let bad = CheckpointPolicy {
        on_pause: vec![Scope::Data],
        on_commit: vec![Scope::Full],
    };
    assert!(bad.check().unwrap_err().message.contains("subset"));
    let parsed: CheckpointPolicy =
        serde_json::from_value(json!({"onPause": ["full"], "onCommit": []})).unwrap();
    assert_eq!(parsed.on_pause, vec![Scope::Full]);
}

#[test]
fn a_manifest_is_content_addressed_and_checked() {
    let s = spec("a1", "t1");
    let m = manifest(&s);
    let d = m.descriptor();
    assert!(mayfly_types::is_sha256_digest(&d.digest));
    assert_eq!(d.media_type, MANIFEST_MEDIA_TYPE);
    assert_eq!(d, m.clone().descriptor(), "deterministic");
    let mut other = m.clone();
    other.blobs[0].size = 2;
    assert_ne!(other.descriptor().digest, d.digest);
    assert!(m.check().is_ok());
    let mut bad = m.clone();
    bad.blobs[0].digest = "md5:x".into();
    assert_eq!(
        bad.check().unwrap_err().code,
        RefusalCode::ManifestUnreadable
    );
    // The signed envelope's digest is the descriptor's digest: one identity.
    let k = ControlKey::generate();
    let env = k
        .sign(Purpose::Snapshot, serde_json::to_value(&m).unwrap())
        .unwrap();
    assert_eq!(env.digest, d.digest);
}

#[test]
fn verify_snapshot_refuses_each_kind_of_foreign_or_broken_envelope() {
    let k = ControlKey::generate();
    let trusted = vec![k.public().clone()];
    let formats = vec![format()];
    let s = spec("a1", "t1");
    let sign = |m: &Manifest| {
        k.sign(Purpose::Snapshot, serde_json::to_value(m).unwrap())
            .unwrap()
    };
    let good = sign(&manifest(&s));
    assert_eq!(
        verify_snapshot(&good, &trusted, &formats, &s).unwrap(),
        manifest(&s)
    );

    let code = |env: &Signed, spec: &ActorSpec| {
        verify_snapshot(env, &trusted, &formats, spec)
            .unwrap_err()
            .code
    };
    // Another key, a policy-bundle signature, an altered body.
    let stranger = ControlKey::generate()
        .sign(Purpose::Snapshot, good.body.clone())
        .unwrap();
    assert_eq!(code(&stranger, &s), RefusalCode::SnapshotUntrusted);
    let wrong_purpose = k.sign(Purpose::PolicyBundle, good.body.clone()).unwrap();
    assert_eq!(code(&wrong_purpose, &s), RefusalCode::SnapshotUntrusted);
    let mut altered = good.clone();
    altered.body["tenant"] = json!("t2");
    assert_eq!(code(&altered, &s), RefusalCode::SnapshotUntrusted);
    // Signed, but unreadable or of an unknown format.
    let garbage = k.sign(Purpose::Snapshot, json!({"hello": 1})).unwrap();
    assert_eq!(code(&garbage, &s), RefusalCode::ManifestUnreadable);
    let mut m = manifest(&s);
    m.format.version = 9;
    assert_eq!(code(&sign(&m), &s), RefusalCode::ManifestUnreadable);
    // Signed and readable, but bound elsewhere.
    assert_eq!(code(&good, &spec("a1", "t2")), RefusalCode::ForeignSnapshot);
    assert_eq!(code(&good, &spec("a2", "t1")), RefusalCode::ForeignSnapshot);
    let mut other_template = spec("a1", "t1");
    other_template.template = "other".into();
    assert_eq!(code(&good, &other_template), RefusalCode::ForeignSnapshot);
    let mut other_workload = spec("a1", "t1");
    if let Workload::Process { args, .. } = &mut other_workload.workload {
        args.push("--evil".into());
    }
    assert_eq!(code(&good, &other_workload), RefusalCode::ForeignSnapshot);
    // A golden snapshot (no actor) restores into any actor of its template and tenant.
    let mut golden = manifest(&s);
    golden.actor = None;
    let golden = sign(&golden);
    assert!(verify_snapshot(&golden, &trusted, &formats, &spec("a9", "t1")).is_ok());
    assert_eq!(
        code(&golden, &spec("a9", "t2")),
        RefusalCode::ForeignSnapshot
    );
}

#[test]
fn every_refusal_code_has_a_stable_name_and_status() {
    use RefusalCode::*;
    let all = [
        InvalidRequest,
        StaleEpoch,
        OpIdConflict,
        UnsupportedClass,
        UnsupportedScope,
        UnsupportedKind,
        SnapshotUntrusted,
        ManifestUnreadable,
        ForeignSnapshot,
        BlobDigestMismatch,
        UnknownActor,
        NotReady,
        CapacityExhausted,
        SandboxFailed,
        Interrupted,
        Unauthenticated,
    ];
    for c in all {
        let v = serde_json::to_value(c).unwrap();
        assert_eq!(v, json!(c.as_str()), "serde name = code");
        assert!((400..600).contains(&c.http_status()));
        let p = problem(&Refusal::new(c, "m"));
        assert_eq!(p["code"], c.as_str());
    }
}
