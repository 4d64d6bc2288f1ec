//! Task pipelines under policy rules, run for real: jump loops with block-local `iter.*`
//! state (pagination), break, fail, and `on_unmatched`.

use mayfly_dsl::{ParseOptions, parse};
use mayfly_engine::Status;
use mayfly_runtime::{Runtime, RuntimeConfig};
use mayfly_store::SqliteStore;
use serde_json::{Map, json};
use std::sync::Arc;

async fn run(src: &str) -> mayfly_engine::Report {
    let dir = tempfile::tempdir().expect("tmp");
    let store = Arc::new(
        SqliteStore::open(dir.path().join("m.db"))
            .await
            .expect("store"),
    );
    let rt = Runtime::start(store, RuntimeConfig::default()).expect("rt");
    let pb = parse("policy.yaml", src, &ParseOptions::default()).unwrap_or_else(|e| panic!("{e}"));
    rt.run(pb, Map::new()).await.expect("run")
}

#[tokio::test]
async fn pagination_with_jump_and_iter_state() {
    let r = run(r#"
apiVersion: noetl.io/v2
kind: Playbook
metadata: {name: pages}
workflow:
  - step: start
    tool:
      - name: init
        kind: noop
        spec: {policy: {rules: [{else: {then: {do: continue, set: {iter.page: 1, iter.acc: []}}}}]}}
      - name: fetch
        kind: python
        input: {page: "{{ iter.page }}", acc: "{{ iter.acc }}"}
        code: |
          items = [page * 10 + i for i in range(2)]
          result = {"items": acc + items, "has_more": page < 3}
        spec:
          policy:
            rules:
              - when: "{{ output.data.has_more }}"
                then: {do: jump, to: fetch, set: {iter.page: "{{ iter.page + 1 }}", iter.acc: "{{ output.data.items }}"}}
              - else:
                  then: {do: break, set: {step.pages: "{{ page }}", ctx.fetched: "{{ output.data.items | length }}"}}
      - name: never
        kind: python
        code: "raise SystemExit('break must skip me')"
"#)
    .await;
    assert_eq!(r.status, Status::Completed, "{:?}", r.error);
    // A pipeline's result is each task's data under its label (NoETL's task_sequence).
    assert_eq!(
        r.result,
        json!({
            "init": {"status": "ok", "message": "noop"},
            "fetch": {"items": [10, 11, 20, 21, 30, 31], "has_more": false},
            "pages": 3
        })
    );
    assert_eq!(r.ctx["fetched"], json!(6));
    assert!(
        !r.ctx.contains_key("page"),
        "iter.* is block-local, never persisted"
    );
}

#[tokio::test]
async fn fail_directive_and_on_unmatched() {
    let r = run(r#"
apiVersion: noetl.io/v2
kind: Playbook
metadata: {name: unmatched}
workflow:
  - step: start
    tool:
      - name: boom
        kind: python
        code: "raise ValueError('soft failure')"
        spec:
          policy:
            on_unmatched: continue
            rules:
              - when: "{{ output.status == 'error' and 'hard' in output.error.message }}"
                then: {do: fail}
      - name: after
        kind: python
        input: {prev: "{{ _prev }}"}
        code: "result = {'saw': prev['status'], 'msg': prev['error']['message']}"
    next: check
  - step: check
    tool:
      kind: python
      code: "result = {'ok': True}"
      spec:
        policy:
          rules:
            - when: "{{ output.data.ok }}"
              then: {do: fail}
"#)
    .await;
    assert_eq!(r.status, Status::Failed);
    assert_eq!(
        r.steps["start"]["after"],
        json!({"saw": "error", "msg": "ValueError: soft failure"})
    );
    assert_eq!(r.steps["start"]["boom"]["error"]["kind"], json!("schema"));
    assert_eq!(r.failed_step.as_deref(), Some("check"));
    assert_eq!(r.error.map(|e| e.code), Some("policy_fail".to_owned()));
}
