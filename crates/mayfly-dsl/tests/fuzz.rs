//! Fuzzing parse + validate + render with generated input (proptest): whatever a tenant
//! submits — valid or not, deeply nested, truncated, not UTF-8 — the DSL answers with a
//! playbook or located diagnostics, never a panic or a stack overflow. Every case runs on a
//! thread with a 1 MiB stack (smaller than any thread the runtime renders on), so recursion
//! that would only overflow a small stack is caught too. Bounded: `PROPTEST_CASES` cases per
//! property (default 512).

use mayfly_dsl::{ParseOptions, parse_bytes, templates, to_value};
use proptest::prelude::*;
use serde_json::json;

/// Run `f` on a thread with a small stack; a panic (or overflow) there fails the case.
fn small_stack(f: impl FnOnce() + Send + 'static) {
    std::thread::Builder::new()
        .stack_size(1 << 20)
        .spawn(f)
        .expect("spawn")
        .join()
        .expect("no panic on a 1 MiB stack");
}

fn cases() -> ProptestConfig {
    let n = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512);
    ProptestConfig {
        cases: n,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Template-ish text from the tokens that stress the parser and the evaluator.
fn template_text() -> impl Strategy<Value = String> {
    let tok = prop_oneof![
        Just("{{".to_owned()),
        Just("}}".to_owned()),
        Just("{%".to_owned()),
        Just("%}".to_owned()),
        Just(" not ".to_owned()),
        Just("(".to_owned()),
        Just(")".to_owned()),
        Just("[".to_owned()),
        Just("]".to_owned()),
        Just("-".to_owned()),
        Just(" + ".to_owned()),
        Just(" * ".to_owned()),
        Just("'s'".to_owned()),
        Just("x".to_owned()),
        Just("x.y".to_owned()),
        Just(" | length".to_owned()),
        Just(" | tojson".to_owned()),
        Just(" if x else ".to_owned()),
        Just("1".to_owned()),
        Just(",".to_owned()),
        Just("{".to_owned()),
        Just("}".to_owned()),
        Just(":".to_owned()),
        "[a-z]{1,4}",
    ];
    prop::collection::vec(tok, 0..60).prop_map(|v| v.concat())
}

/// A token repeated many times inside one expression: the shape that overflowed stacks.
fn deep_expression() -> impl Strategy<Value = String> {
    (
        prop_oneof![
            Just("not "),
            Just("-"),
            Just("+"),
            Just("("),
            Just("["),
            Just("{'a': "),
            Just("x if "),
        ],
        1usize..5000,
    )
        .prop_map(|(t, n)| format!("{{{{ {} 1 }}}}", t.repeat(n)))
}

/// A playbook assembled from real keys, typos and hostile values.
fn playbook_text() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        Just("tool"),
        Just("next"),
        Just("nxt"),
        Just("loop"),
        Just("set"),
        Just("input"),
        Just("spec"),
        Just("when"),
        Just("case"),
        Just("desc"),
    ];
    let value = prop_oneof![
        template_text().prop_map(|t| format!("{t:?}")),
        deep_expression().prop_map(|t| format!("{t:?}")),
        Just("{kind: python, code: \"result = 1\"}".to_owned()),
        Just("{kind: noop, result: {a: 1}}".to_owned()),
        Just("[{step: start}]".to_owned()),
        Just("{arcs: [{step: start, when: \"{{ x }}\"}]}".to_owned()),
        Just("{in: [1, 2], iterator: i}".to_owned()),
        Just("{policy: {admit: {rules: [{else: {then: {allow: false}}}]}}}".to_owned()),
        Just("[".repeat(70) + &"]".repeat(70)),
        "[ -~]{0,40}".prop_map(|s| format!("{s:?}")),
    ];
    prop::collection::vec(prop::collection::vec((key, value), 0..4), 1..4).prop_map(|steps| {
        let mut out = String::from(
            "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {name: fuzz}\nworkload: {x: 1}\nworkflow:\n",
        );
        for (i, fields) in steps.iter().enumerate() {
            let name = if i == 0 {
                "start".to_owned()
            } else {
                format!("s{i}")
            };
            out.push_str(&format!("  - step: {name}\n"));
            for (k, v) in fields {
                out.push_str(&format!("    {k}: {v}\n"));
            }
        }
        out
    })
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn templates_never_panic_or_overflow(t in template_text()) {
        small_stack(move || {
            let ctx = to_value(&json!({"x": {"y": [1, 2]}, "s": "str"}));
            let _ = templates().check(&t);
            let _ = templates().render_str(&t, &ctx);
            let _ = templates().variables(&t, true);
        });
    }

    #[test]
    fn deep_expressions_are_refused_not_overflowed(t in deep_expression()) {
        small_stack(move || {
            let ctx = to_value(&json!({"x": 1}));
            let _ = templates().check(&t);
            let _ = templates().render_str(&t, &ctx);
        });
    }

    #[test]
    fn playbooks_parse_or_fail_with_locations(src in playbook_text()) {
        small_stack(move || {
            match parse_bytes("fuzz.yaml", src.as_bytes(), &ParseOptions::default()) {
                Ok(pb) => {
                    // A valid playbook's templates render against its workload.
                    let ctx = to_value(&pb.workload);
                    for s in &pb.steps {
                        if let Some(i) = &s.input {
                            let _ = templates().render_node(i, &ctx);
                        }
                        for a in &s.next.arcs {
                            if let Some(w) = &a.when {
                                let _ = templates().eval_condition(w, &ctx);
                            }
                        }
                    }
                }
                Err(e) => {
                    assert!(!e.diagnostics.is_empty());
                    for d in &e.diagnostics {
                        assert!(d.loc.line >= 1, "{d}");
                    }
                }
            }
        });
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        small_stack(move || {
            if let Err(e) = parse_bytes("bytes.yaml", &bytes, &ParseOptions::default()) {
                assert!(e.diagnostics.iter().all(|d| d.loc.line >= 1));
            }
        });
    }
}

#[test]
fn ten_thousand_nots_are_a_located_error() {
    let src = format!(
        "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {{name: n}}\nworkflow:\n  - step: start\n    next:\n      arcs:\n        - step: start\n          when: \"{{{{ {}true }}}}\"\n",
        "not ".repeat(10_000)
    );
    small_stack(move || {
        let e = parse_bytes("deep.yaml", src.as_bytes(), &ParseOptions::default())
            .expect_err("refused");
        assert!(
            e.to_string().contains("deep.yaml:9:17: template error"),
            "{e}"
        );
        assert!(e.to_string().contains("nested too deeply"), "{e}");
    });
}

#[test]
fn invalid_utf8_is_reported_at_its_byte_offset() {
    let mut src = b"apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {name: ".to_vec();
    src.extend_from_slice(&[0xff, b'}']);
    let e = parse_bytes("bad.yaml", &src, &ParseOptions::default()).expect_err("refused");
    assert_eq!(
        e.to_string(),
        "bad.yaml:3:18: invalid UTF-8 at byte offset 56"
    );
}

#[test]
fn deep_yaml_is_refused_on_a_small_stack() {
    for n in [30usize, 63, 65, 500] {
        let src = format!(
            "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {{name: fuzz}}\nworkflow:\n  - step: start\n    input: {}{}\n",
            "[".repeat(n),
            "]".repeat(n)
        );
        small_stack(move || {
            let r = parse_bytes("d.yaml", src.as_bytes(), &ParseOptions::default());
            if n > 64 {
                let e = r.expect_err("too deep");
                assert!(e.to_string().starts_with("d.yaml:"), "{e}");
            }
        });
    }
}
