use crate::*;

fn ok(src: &str) -> Playbook {
    for (i, l) in src.lines().enumerate() {
        eprintln!("{:3} {l}", i + 1);
    }
    match parse("pb.yaml", src, &ParseOptions::default()) {
        Ok(p) => p,
        Err(e) => panic!("unexpected error:\n{e}"),
    }
}

fn err(src: &str) -> DslError {
    match parse("pb.yaml", src, &ParseOptions::default()) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e,
    }
}

const HEAD: &str = "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata:\n  name: t\n";

#[test]
fn full_dialect_parses() {
    let src = format!(
        "{HEAD}{}",
        r#"  path: demo/full
workload:
  users: [1, 2]
  temp: 30
keychain:
  - name: pg
    kind: secret_manager
workbook:
  - name: compute
    tool: {kind: python, code: "result = 1", input: {a: 1}}
workflow:
  - step: start
    desc: entry
    tool: {kind: workbook, name: compute, input: {b: 2}}
    set: {ctx.flag: "{{ start }}", step.extra: 1, plain: 2}
    next:
      spec: {mode: inclusive}
      arcs:
        - {step: a, when: "{{ temp > 20 }}", set: {ctx.x: 1}}
        - step: b
  - step: a
    loop: {in: "{{ users }}", iterator: user, spec: {mode: parallel, max_in_flight: 4}}
    tool:
      - name: fetch
        kind: http
        url: "http://x/{{ user }}"
        spec:
          policy:
            rules:
              - when: "{{ output.status == 'error' }}"
                then: {do: retry, attempts: 5, delay: 0.1, backoff: exponential}
              - else:
                  then: {do: continue, set: {ctx.ok: true}}
      - name: post
        kind: python
        code: |
          return {'x': input_data}
    next: [end]
  - step: b
    tool: {kind: shell, cmds: ["echo hi"]}
    next: end
  - step: end
"#
    );
    let pb = ok(&src);
    assert_eq!(pb.path, "demo/full");
    assert!(pb.digest.starts_with("sha256:"));
    assert_eq!(pb.keychain.len(), 1);
    let start = pb.step("start").expect("start");
    assert_eq!(start.tasks.len(), 1);
    assert_eq!(start.tasks[0].name, "compute");
    assert_eq!(start.tasks[0].kind, ToolKind::Python);
    let input = start.tasks[0].config.get("input").expect("input").to_json();
    assert_eq!(input, serde_json::json!({"a": 1, "b": 2}));
    assert_eq!(start.set.len(), 3);
    assert_eq!(start.set[1].target, SetTarget::Step("extra".into()));
    assert_eq!(start.set[2].target, SetTarget::Ctx("plain".into()));
    assert_eq!(start.next.mode, NextMode::Inclusive);
    assert_eq!(start.next.arcs.len(), 2);
    let a = pb.step("a").expect("a");
    let l = a.looping.as_ref().expect("loop");
    assert_eq!((l.iterator.as_str(), l.mode), ("user", LoopMode::Parallel));
    assert_eq!(a.tasks.len(), 2);
    assert_eq!(a.tasks[0].rules.len(), 2);
    assert!(matches!(
        a.tasks[0].rules[0].directive,
        Directive::Retry {
            attempts: 5,
            backoff: Backoff::Exponential,
            ..
        }
    ));
    assert!(a.tasks[0].rules[1].when.is_none());
    assert!(pb.is_join("end"));
    assert!(!pb.is_join("a"));
    assert!(pb.reaches("start", "end"));
    assert!(!pb.reaches("end", "start"));
    assert!(pb.step("end").expect("end").is_inline());
}

#[test]
fn malformed_yaml_names_line_and_column() {
    let e = err("apiVersion: noetl.io/v2\nkind: [unclosed\n");
    let d = &e.diagnostics[0];
    assert!(d.message.starts_with("invalid YAML"), "{d}");
    assert!(d.loc.line >= 2, "{d}");
    assert!(e.to_string().starts_with("pb.yaml:"));
}

#[test]
fn unknown_tool_kind() {
    let e = err(&format!(
        "{HEAD}workflow:\n  - step: start\n    tool:\n      kind: teleport\n"
    ));
    let d = &e.diagnostics[0];
    assert_eq!((d.loc.line, d.loc.col), (8, 13));
    assert_eq!(d.step.as_deref(), Some("start"));
    assert!(d.message.contains("unknown tool kind `teleport`"), "{d}");
}

#[test]
fn missing_start() {
    let e = err(&format!("{HEAD}workflow:\n  - step: begin\n"));
    assert!(
        e.diagnostics
            .iter()
            .any(|d| d.message.contains("named `start`")),
        "{e}"
    );
}

#[test]
fn arc_to_unknown_step() {
    let e = err(&format!(
        "{HEAD}workflow:\n  - step: start\n    next:\n      arcs:\n        - step: nowhere\n"
    ));
    let d = &e.diagnostics[0];
    assert!(d.message.contains("unknown step `nowhere`"), "{d}");
    assert_eq!(d.loc.line, 9);
    assert_eq!(
        e.to_string(),
        format!("pb.yaml:9:11: {} (step `start`)", d.message)
    );
}

#[test]
fn template_syntax_error_is_located() {
    let e = err(&format!(
        "{HEAD}workflow:\n  - step: start\n    tool:\n      kind: shell\n      cmds: [\"echo {{{{ x + }}}}\"]\n"
    ));
    let d = &e.diagnostics[0];
    assert!(d.message.starts_with("template error"), "{d}");
    assert_eq!(d.loc.line, 9);
}

#[test]
fn undefined_variable_in_when_is_a_validation_error() {
    let src = format!(
        "{HEAD}workload: {{temp: 1}}\nworkflow:\n  - step: start\n    next:\n      arcs:\n        - {{step: end, when: \"{{{{ temprature > 1 }}}}\"}}\n  - step: end\n"
    );
    let e = err(&src);
    let d = &e.diagnostics[0];
    assert!(d.message.contains("undefined variable `temprature`"), "{d}");
    assert_eq!(d.loc.line, 10);
    // The same condition with the right name, or a --set override, is fine.
    ok(&src.replace("temprature", "temp"));
    let opts = ParseOptions {
        extra_vars: vec!["temprature".into()],
    };
    assert!(parse("pb.yaml", &src, &opts).is_ok());
}

#[test]
fn wrong_api_version_and_kind() {
    let e =
        err("apiVersion: noetl.io/v1\nkind: Job\nmetadata: {name: x}\nworkflow: [{step: start}]\n");
    assert_eq!(e.diagnostics.len(), 2, "{e}");
    assert!(e.diagnostics[0].message.contains("apiVersion"));
    assert!(e.diagnostics[1].message.contains("kind"));
}

#[test]
fn structural_errors() {
    let e = err(&format!(
        "{HEAD}workflow:\n  - step: start\n  - step: start\n"
    ));
    assert!(e.diagnostics[0].message.contains("duplicate step"), "{e}");
    let e = err(&format!(
        "{HEAD}workflow:\n  - step: start\n    tool: {{kind: python}}\n"
    ));
    assert!(e.diagnostics[0].message.contains("needs `code`"), "{e}");
    let e = err(&format!(
        "{HEAD}workflow:\n  - step: start\n    loop: {{iterator: x}}\n"
    ));
    assert!(e.diagnostics[0].message.contains("needs `in`"), "{e}");
    let e = err(&format!(
        "{HEAD}workflow:\n  - step: start\n    set: {{iter.x: 1}}\n"
    ));
    assert!(e.diagnostics[0].message.contains("block-local"), "{e}");
    let e = err(&format!(
        "{HEAD}workflow:\n  - step: start\n    tool:\n      - {{name: a, kind: noop, spec: {{policy: {{rules: [{{then: {{do: jump, to: zz}}}}]}}}}}}\n"
    ));
    assert!(
        e.diagnostics[0].message.contains("unknown task `zz`"),
        "{e}"
    );
    let e = err(&format!(
        "{HEAD}workflow:\n  - step: start\n    tool: {{kind: snowflake, query: x}}\n"
    ));
    assert!(e.diagnostics[0].message.contains("not available"), "{e}");
    let e = err(&format!(
        "{HEAD}workflow:\n  - step: start\n    tool: {{kind: postgres, auth: pg}}\n"
    ));
    assert!(
        e.diagnostics[0]
            .message
            .contains("needs `query` or `command`"),
        "{e}"
    );
    let e = err(&format!("{HEAD}workflow:\n  - step: start\n    case: []\n"));
    assert!(e.diagnostics[0].message.contains("case"), "{e}");
    let e = err(&format!("{HEAD}workflow: {{}}\n"));
    assert!(e.diagnostics[0].message.contains("list of steps"), "{e}");
}

#[test]
fn next_shorthands() {
    let pb = ok(&format!(
        "{HEAD}workflow:\n  - step: start\n    next: a\n  - step: a\n    next: [{{step: b, when: \"{{{{ true }}}}\"}}, c]\n  - step: b\n    next: {{step: c}}\n  - step: c\n"
    ));
    assert_eq!(pb.step("start").expect("s").next.arcs[0].step, "a");
    assert_eq!(pb.step("a").expect("a").next.arcs.len(), 2);
    assert_eq!(pb.step("b").expect("b").next.arcs[0].step, "c");
    assert!(pb.is_join("c"));
}

#[test]
fn yaml_1_2_booleans_keep_short_keys_as_strings() {
    let pb = ok(&format!(
        "{HEAD}workload: {{n: 2, y: on, flag: true}}\nworkflow:\n  - step: start\n"
    ));
    assert_eq!(pb.workload.get("n"), Some(&serde_json::json!(2)));
    assert_eq!(pb.workload.get("y"), Some(&serde_json::json!("on")));
    assert_eq!(pb.workload.get("flag"), Some(&serde_json::json!(true)));
}

#[test]
fn numbers_must_be_finite_and_in_range() {
    for bad in [
        "delay: .nan",
        "delay: .inf",
        "delay: -1",
        "max_delay: 1e30",
        "attempts: 1e40",
    ] {
        let src = format!(
            "{HEAD}workflow:\n  - step: start\n    tool:\n      kind: noop\n      spec: {{policy: {{rules: [{{then: {{do: retry, {bad}}}}}]}}}}\n"
        );
        let e = err(&src);
        let m = &e.diagnostics[0].message;
        assert!(
            m.contains("between 0 and") || m.contains("non-finite"),
            "{bad}: {e}"
        );
    }
    let e = err(&format!(
        "{HEAD}workflow:\n  - step: start\n    spec: {{timeout: 1e20}}\n"
    ));
    assert!(e.diagnostics[0].message.contains("between 0 and"), "{e}");
}

#[test]
fn template_paths_follow_static_attribute_chains() {
    let t = crate::templates();
    let p = t
        .paths(
            "{{ fetch.rows[0].id }} {{ steps.fetch.data | length }} {{ row }}",
            false,
        )
        .expect("paths");
    assert!(p.contains("fetch.rows"), "{p:?}");
    assert!(p.contains("steps.fetch.data"), "{p:?}");
    assert!(p.contains("row"), "{p:?}");
    let v = t.variables("{{ fetch.rows[0].id }}", false).expect("vars");
    assert_eq!(v.into_iter().collect::<Vec<_>>(), vec!["fetch".to_owned()]);
    assert!(
        t.paths("x > 1 and y.z", true)
            .expect("bare")
            .contains("y.z")
    );
    assert!(t.paths("plain text", false).expect("none").is_empty());
}

#[test]
fn a_steps_bound_paths_cover_what_its_block_renders_once_computed() {
    let pb = ok(&format!(
        "{HEAD}{}",
        r#"workload: {users: [1], base: x}
workflow:
  - step: start
    next: a
  - step: a
    loop: {in: "{{ users }}", iterator: user}
    input: {who: "{{ user.name }}"}
    tool:
      - name: fetch
        kind: http
        url: "http://{{ base }}/{{ start.data.id }}"
        spec:
          policy:
            rules:
              - when: "{{ output.status == 'error' }}"
                then: {do: continue, set: {ctx.seen: "{{ steps.start.data }}"}}
      - name: post
        kind: python
        code: "result = never.bound"
        input: {rows: "{{ fetch.rows }}"}
"#
    ));
    let before = pb.clone();
    let a = pb.step("a").expect("step a");
    let want: std::collections::BTreeSet<String> = [
        "user.name",
        "base",
        "start.data.id",
        "output.status",
        "steps.start.data",
        "fetch.rows",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    assert_eq!(a.bound_paths(), &want, "python code is never rendered");
    // Kept after the first call.
    assert!(std::ptr::eq(a.bound_paths(), a.bound_paths()));
    assert_eq!(
        before.step("a"),
        pb.step("a"),
        "the kept paths take no part in equality"
    );
}

#[test]
fn unreachable_steps_and_inline_cycles_are_warnings() {
    let pb = ok(&format!(
        "{HEAD}workflow:\n  - step: start\n    next: [a]\n  - step: a\n    next: [b]\n  - step: b\n    next: [a]\n  - step: orphan\n    tool: {{kind: python, code: x}}\n"
    ));
    let w: Vec<String> = pb.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(w.len(), 2, "{w:?}");
    assert_eq!(
        w[0],
        "pb.yaml:12:5: step `orphan` is unreachable from `start` (step `orphan`)"
    );
    assert!(
        w[1].starts_with("pb.yaml:8:5: steps `a`, `b` form a cycle of inline steps"),
        "{}",
        w[1]
    );
    // A cycle through a step that runs a tool is not inline: no warning.
    let pb = ok(&format!(
        "{HEAD}workflow:\n  - step: start\n    next: [a]\n  - step: a\n    tool: {{kind: python, code: x}}\n    next: [start]\n"
    ));
    assert!(pb.warnings.is_empty(), "{:?}", pb.warnings);
}

#[test]
fn every_place_is_strict_with_a_did_you_mean() {
    let cases = [
        (
            "  - step: start\n    tool: {kind: noop}\n    nxt: [start]\n",
            "unknown key `nxt` in a step; did you mean `next`?",
        ),
        (
            "  - step: start\n    tool: {kind: http, url: x, methd: GET}\n",
            "unknown key `methd` in a `http` task; did you mean `method`?",
        ),
        (
            "  - step: start\n    loop: {in: [1], iterator: i, spec: {mod: parallel}}\n",
            "unknown key `mod` in `loop.spec`; did you mean `mode`?",
        ),
        (
            "  - step: start\n    next: {spec: {mode: inclusive}, arks: [start]}\n",
            "`next` must be a step name, a list of arcs, or {spec, arcs}",
        ),
        (
            "  - step: start\n    next: {arcs: [{step: start, wen: x}]}\n",
            "unknown key `wen` in an arc; did you mean `when`?",
        ),
        (
            "  - step: start\n    spec: {timout: 3}\n",
            "unknown key `timout` in a step's `spec`; did you mean `timeout`?",
        ),
        (
            "  - step: start\n    spec: {policy: {rules: [{else: {then: {do: fail, sett: {}}}}]}}\n",
            "unknown key `sett` in a policy rule's `then`; did you mean `set`?",
        ),
        (
            "  - step: start\n    spec: {on_error: x}\n",
            "`spec.on_error` is never read by NoETL",
        ),
    ];
    for (steps, want) in cases {
        let e = err(&format!("{HEAD}workflow:\n{steps}")).to_string();
        assert!(e.contains(want), "{steps}\n→ {e}\nwanted: {want}");
    }
    let e = err(&format!(
        "{HEAD}  lables: {{}}\nworkflow:\n  - step: start\n"
    ))
    .to_string();
    assert!(
        e.contains("unknown key `lables` in `metadata`; did you mean `labels`?"),
        "{e}"
    );
    let e = err(&format!(
        "{HEAD}keychain:\n  - {{name: a, kind: oauth2, token_url: x}}\nworkflow:\n  - step: start\n"
    ))
    .to_string();
    assert!(
        e.contains("unknown key `token_url` in a keychain entry"),
        "{e}"
    );
}

#[test]
fn a_childs_version_is_a_catalog_version_given_once() {
    let step = |tool: &str| format!("{HEAD}workflow:\n  - step: start\n    tool: {tool}\n");
    ok(&step("{kind: playbook, path: team/etl, version: 3}"));
    ok(&step("{kind: playbook, path: team/etl, version: latest}"));
    ok(&step("{kind: playbook, path: team/etl@3}"));
    ok(&step(
        "{kind: playbook, path: team/etl, version: \"{{ workload.v }}\"}",
    ));
    for (tool, want) in [
        ("{kind: playbook, path: team/etl, version: 0}", "pb.yaml:7:"),
        (
            "{kind: playbook, path: team/etl, version: abc}",
            "a child's `version` is a catalog version",
        ),
        (
            "{kind: playbook, path: team/etl@2, version: 3}",
            "given twice",
        ),
        (
            "{kind: python, code: x, version: 3}",
            "`version` names a child playbook's catalog version",
        ),
    ] {
        let e = err(&step(tool)).to_string();
        assert!(e.contains(want), "{tool}: {e}");
    }
    assert_eq!(split_child_version("team/etl@12"), ("team/etl", Some(12)));
    assert_eq!(split_child_version("team/etl"), ("team/etl", None));
    assert_eq!(split_child_version("a@b"), ("a@b", None));
    assert_eq!(split_child_version("a@0"), ("a@0", None));
    assert_eq!(split_child_version("@3"), ("@3", None));
    assert_eq!(child_version(&serde_json::json!("7")), Ok(Some(7)));
    assert_eq!(child_version(&serde_json::json!(null)), Ok(None));
    assert!(child_version(&serde_json::json!(-1)).is_err());
}
