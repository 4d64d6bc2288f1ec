//! decide() exercised through a deterministic in-memory driver that follows the appender
//! contract (apply immediately, decide FIFO) and simulates workers with a closure.

use crate::*;
use mayfly_dsl::{ParseOptions, Playbook, parse};
use mayfly_types::*;
use serde_json::{Map, Value, json};
use std::collections::VecDeque;

type Worker<'a> = dyn Fn(&str, Option<usize>, &Map<String, Value>) -> Result<Value, String> + 'a;

struct Sim {
    pb: Playbook,
    st: ExecState,
    log: Vec<Event>,
    /// Commands waiting for the simulated worker, in issue order.
    pending: VecDeque<(String, String, Option<usize>)>,
    max_concurrent: usize,
    max_in_flight_seen: usize,
}

impl Sim {
    fn new(src: &str) -> Sim {
        let pb = parse("t.yaml", src, &ParseOptions::default()).unwrap_or_else(|e| panic!("{e}"));
        Sim {
            pb,
            st: ExecState::new(ExecutionId::from("e1")),
            log: Vec::new(),
            pending: VecDeque::new(),
            max_concurrent: 0,
            max_in_flight_seen: 0,
        }
    }

    fn seal(&mut self, d: Draft) -> Event {
        let seq = self.st.last_seq + 1;
        let command_id = match d.kind {
            EventKind::CommandIssued => Some(command_id(&self.st.execution_id, seq)),
            _ => d.command_id,
        };
        Event {
            execution_id: self.st.execution_id.clone(),
            seq,
            kind: d.kind,
            step: d.step,
            attempt: d.attempt,
            command_id,
            at: 0,
            actor: "test".into(),
            request_id: None,
            playbook_digest: self.pb.digest.clone(),
            payload: d.payload,
            payload_ref: None,
            prev_hash: String::new(),
            hash: format!("h{seq}"),
            position: None,
        }
    }

    /// Append drafts following the contract; returns when the queue is drained.
    fn push(&mut self, drafts: Vec<Draft>) {
        let mut q = VecDeque::new();
        for d in drafts {
            let e = self.seal(d);
            self.st.apply(&e).expect("apply");
            self.log.push(e.clone());
            q.push_back(e);
        }
        while let Some(ev) = q.pop_front() {
            if ev.kind == EventKind::CommandIssued {
                let p: CommandIssued = serde_json::from_value(ev.payload.clone()).expect("cmd");
                self.pending
                    .push_back((ev.command_id.clone().expect("id"), p.step, p.index));
                self.max_in_flight_seen = self.max_in_flight_seen.max(self.pending.len());
            }
            for d in decide(&self.pb, &self.st, &ev) {
                let e = self.seal(d);
                self.st.apply(&e).expect("apply");
                self.log.push(e.clone());
                q.push_back(e);
            }
        }
    }

    fn run(&mut self, workload: Value, worker: &Worker<'_>) -> Report {
        let Value::Object(mut w) = json!(self.pb.workload) else {
            unreachable!()
        };
        if let Value::Object(o) = workload {
            w.extend(o);
        }
        let req = ExecutionRequested {
            path: self.pb.path.clone(),
            source: None,
            workload: w,
            origin: None,
            parent: None,
            tenant: None,
            limits: None,
            traceparent: None,
        };
        self.push(vec![Draft::new(EventKind::ExecutionRequested, json!(req))]);
        let mut guard = 0;
        while let Some((id, step, index)) = self.pending.pop_front() {
            guard += 1;
            assert!(guard < 100_000, "runaway");
            self.max_concurrent = self.max_concurrent.max(self.pending.len() + 1);
            let ctx = context(&self.st, None);
            let outcome = worker(&step, index, &ctx);
            let d = match outcome {
                Ok(result) => Draft::new(
                    EventKind::StepFinished,
                    json!(StepFinished {
                        index,
                        result,
                        set: Map::new(),
                        inline: false,
                        duration_ms: None,
                        logs: None
                    }),
                ),
                Err(m) => Draft::new(
                    EventKind::StepFailed,
                    json!(StepFailed {
                        index,
                        error: ErrorInfo::new("tool_error", m),
                        duration_ms: None,
                        logs: None
                    }),
                ),
            };
            let done = Draft::new(EventKind::CommandCompleted, json!({})).command(id.clone(), 1);
            self.push(vec![d.step(&step).command(id, 1), done]);
        }
        // Replay must reproduce the same state.
        let replayed = ExecState::fold(ExecutionId::from("e1"), &self.log).expect("fold");
        assert_eq!(replayed.report(), self.st.report());
        self.st.report()
    }

    fn kinds(&self) -> Vec<String> {
        self.log
            .iter()
            .map(|e| match &e.step {
                Some(s) => format!("{}:{s}", e.kind),
                None => e.kind.to_string(),
            })
            .collect()
    }

    fn count(&self, kind: EventKind, step: &str) -> usize {
        self.log
            .iter()
            .filter(|e| e.kind == kind && e.step.as_deref() == Some(step))
            .count()
    }
}

const H: &str = "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {name: t, path: tests/t}\n";

fn echo(step: &str, index: Option<usize>, _: &Map<String, Value>) -> Result<Value, String> {
    Ok(json!({"step": step, "index": index}))
}

#[test]
fn linear_chain_completes_with_last_result() {
    let mut s = Sim::new(&format!(
        "{H}workflow:\n  - step: start\n    tool: {{kind: python, code: x}}\n    next: b\n  - step: b\n    tool: {{kind: python, code: x}}\n    next: end\n  - step: end\n    tool: {{kind: python, code: x}}\n"
    ));
    let r = s.run(json!({}), &echo);
    assert_eq!(r.status, Status::Completed);
    assert_eq!(r.result, json!({"step": "end", "index": null}));
    assert_eq!(r.steps.len(), 3);
    let k = s.kinds();
    assert_eq!(
        &k[..3],
        [
            "execution.requested",
            "execution.started",
            "command.issued:start"
        ]
    );
    assert_eq!(k.last().map(String::as_str), Some("execution.completed"));
    assert_eq!(s.count(EventKind::CommandIssued, "b"), 1);
}

#[test]
fn set_and_scope_rules() {
    let src = format!(
        "{H}workload: {{message: hi, n: 2}}\nworkflow:\n  - step: start\n    tool: {{kind: python, code: x}}\n    set: {{ctx.seen: \"{{{{ start.v }}}}\", step.tag: extra, total: \"{{{{ n * 10 }}}}\"}}\n    next:\n      arcs:\n        - step: end\n          when: \"{{{{ ctx.seen == 7 and total == 20 and start.data.v == 7 and workload.message == message }}}}\"\n          set: {{ctx.arc: \"{{{{ seen + 1 }}}}\"}}\n  - step: end\n    input: {{msg: \"{{{{ message }}}}\", seen: \"{{{{ seen }}}}\", arc: \"{{{{ ctx.arc }}}}\", tag: \"{{{{ steps.start.data.tag }}}}\", st: \"{{{{ steps.start.status }}}}\"}}\n"
    );
    let mut s = Sim::new(&src);
    let r = s.run(json!({}), &|_, _, _| Ok(json!({"v": 7})));
    assert_eq!(r.status, Status::Completed, "{:?}", r.error);
    assert_eq!(
        r.ctx,
        json!({"seen": 7, "total": 20, "arc": 8})
            .as_object()
            .cloned()
            .expect("o")
    );
    assert_eq!(
        r.result,
        json!({"msg": "hi", "seen": 7, "arc": 8, "tag": "extra", "st": "COMPLETED"})
    );
    assert_eq!(r.steps["start"], json!({"v": 7, "tag": "extra"}));
}

#[test]
fn exclusive_picks_first_true_arc_in_order() {
    let src = format!(
        "{H}workload: {{t: 30}}\nworkflow:\n  - step: start\n    next:\n      spec: {{mode: exclusive}}\n      arcs:\n        - {{step: hot, when: \"{{{{ t >= 25 }}}}\"}}\n        - {{step: warm, when: \"{{{{ t >= 10 }}}}\"}}\n        - {{step: cold}}\n  - step: hot\n    next: end\n  - step: warm\n    next: end\n  - step: cold\n    next: end\n  - step: end\n"
    );
    for (t, want) in [(30, "hot"), (12, "warm"), (1, "cold")] {
        let mut s = Sim::new(&src);
        let r = s.run(json!({"t": t}), &echo);
        assert_eq!(r.status, Status::Completed);
        assert_eq!(r.steps.len(), 3, "t={t}");
        assert!(r.steps.contains_key(want), "t={t}");
        assert_eq!(s.count(EventKind::StepFinished, "end"), 1);
    }
}

#[test]
fn inclusive_fan_out_joins_once_after_both_branches() {
    let src = format!(
        "{H}workflow:\n  - step: start\n    next:\n      spec: {{mode: inclusive}}\n      arcs: [{{step: a}}, {{step: b}}, {{step: never, when: \"{{{{ false }}}}\"}}]\n  - step: a\n    tool: {{kind: python, code: x}}\n    next: a2\n  - step: a2\n    tool: {{kind: python, code: x}}\n    next: end\n  - step: b\n    tool: {{kind: python, code: x}}\n    next: end\n  - step: never\n    next: end\n  - step: end\n    input: {{a: \"{{{{ a2.step }}}}\", b: \"{{{{ b.step }}}}\"}}\n"
    );
    let mut s = Sim::new(&src);
    let r = s.run(json!({}), &echo);
    assert_eq!(r.status, Status::Completed);
    assert_eq!(
        s.count(EventKind::StepFinished, "end"),
        1,
        "{:#?}",
        s.kinds()
    );
    assert_eq!(s.count(EventKind::JoinReleased, "end"), 1);
    assert_eq!(r.result, json!({"a": "a2", "b": "b"}));
    assert!(!r.steps.contains_key("never"));
    // both branches were in flight together
    assert_eq!(s.max_in_flight_seen, 2);
}

#[test]
fn exclusive_branches_converging_do_not_wait_for_the_untaken_branch() {
    let src = format!(
        "{H}workload: {{hot: true}}\nworkflow:\n  - step: start\n    next:\n      arcs:\n        - {{step: h, when: \"{{{{ hot }}}}\"}}\n        - {{step: c}}\n  - step: h\n    tool: {{kind: python, code: x}}\n    next: end\n  - step: c\n    tool: {{kind: python, code: x}}\n    next: end\n  - step: end\n"
    );
    let mut s = Sim::new(&src);
    let r = s.run(json!({}), &echo);
    assert_eq!(r.status, Status::Completed);
    assert_eq!(s.count(EventKind::StepFinished, "end"), 1);
    assert!(!r.steps.contains_key("c"));
}

#[test]
fn sequential_loop_runs_one_at_a_time_in_order() {
    let src = format!(
        "{H}workload: {{xs: [3, 1, 2]}}\nworkflow:\n  - step: start\n    loop: {{in: \"{{{{ xs }}}}\", iterator: x, spec: {{mode: sequential}}}}\n    tool: {{kind: python, code: x}}\n    next:\n      arcs:\n        - {{step: end, when: \"{{{{ event.name == 'loop.done' }}}}\"}}\n  - step: end\n    input: {{n: \"{{{{ start | length }}}}\", all: \"{{{{ start }}}}\"}}\n"
    );
    let mut s = Sim::new(&src);
    let r = s.run(json!({}), &|_, i, _| Ok(json!(i.map(|i| i * 10))));
    assert_eq!(r.status, Status::Completed);
    assert_eq!(r.result, json!({"n": 3, "all": [0, 10, 20]}));
    assert_eq!(s.max_in_flight_seen, 1);
}

#[test]
fn parallel_loop_respects_window_and_keeps_item_order() {
    let xs: Vec<u32> = (0..10).collect();
    let src = format!(
        "{H}workload: {{xs: {xs:?}}}\nworkflow:\n  - step: start\n    loop: {{in: \"{{{{ xs }}}}\", iterator: x, spec: {{mode: parallel, max_in_flight: 3}}}}\n    tool: {{kind: python, code: x}}\n"
    );
    let mut s = Sim::new(&src);
    let r = s.run(json!({}), &|_, i, _| Ok(json!(i)));
    assert_eq!(r.status, Status::Completed);
    assert_eq!(r.result, json!(xs));
    assert_eq!(s.max_in_flight_seen, 3);
    assert_eq!(s.count(EventKind::CommandIssued, "start"), 10);
}

#[test]
fn inline_noop_loop_fans_out_without_commands() {
    let src = format!(
        "{H}workflow:\n  - step: start\n    loop: {{in: \"{{{{ range(1000) }}}}\", iterator: i, spec: {{mode: parallel}}}}\n    tool: {{kind: noop}}\n    input: {{sq: \"{{{{ i * i }}}}\", at: \"{{{{ loop_index }}}}\", it: \"{{{{ iter.i }}}}\"}}\n"
    );
    let mut s = Sim::new(&src);
    let r = s.run(json!({}), &echo);
    assert_eq!(r.status, Status::Completed);
    let arr = r.result.as_array().expect("array");
    assert_eq!(arr.len(), 1000);
    assert_eq!(arr[999], json!({"sq": 998001, "at": 999, "it": 999}));
    assert_eq!(
        s.log
            .iter()
            .filter(|e| e.kind == EventKind::CommandIssued)
            .count(),
        0
    );
    assert_eq!(s.count(EventKind::StepFinished, "start"), 1000);
    assert_eq!(s.count(EventKind::LoopDone, "start"), 1);
}

#[test]
fn sequential_inline_loop_and_empty_loop() {
    let src = format!(
        "{H}workflow:\n  - step: start\n    loop: {{in: [a, b], iterator: v}}\n    next: e\n  - step: e\n    loop: {{in: [], iterator: v}}\n    tool: {{kind: python, code: x}}\n"
    );
    let mut s = Sim::new(&src);
    let r = s.run(json!({}), &echo);
    assert_eq!(r.status, Status::Completed);
    assert_eq!(r.steps["start"], json!(["a", "b"]));
    assert_eq!(r.result, json!([]));
}

#[test]
fn failure_without_error_arc_fails_execution() {
    let src = format!(
        "{H}workflow:\n  - step: start\n    tool: {{kind: python, code: x}}\n    next: end\n  - step: end\n"
    );
    let mut s = Sim::new(&src);
    let r = s.run(json!({}), &|_, _, _| Err("boom".into()));
    assert_eq!(r.status, Status::Failed);
    assert_eq!(r.failed_step.as_deref(), Some("start"));
    assert_eq!(r.error.as_ref().map(|e| e.message.as_str()), Some("boom"));
    assert!(!r.steps.contains_key("end"));
}

#[test]
fn error_arcs_catch_failures() {
    let src = format!(
        "{H}workflow:\n  - step: start\n    tool: {{kind: python, code: x}}\n    next:\n      arcs:\n        - {{step: ok}}\n        - {{step: handle, when: \"{{{{ event.name == 'call.error' }}}}\", set: {{ctx.why: \"{{{{ error.message }}}}\"}}}}\n  - step: ok\n  - step: handle\n"
    );
    let mut s = Sim::new(&src);
    let r = s.run(json!({}), &|_, _, _| Err("bad".into()));
    assert_eq!(r.status, Status::Completed);
    assert!(r.steps.contains_key("handle") && !r.steps.contains_key("ok"));
    assert_eq!(r.ctx["why"], json!("bad"));
}

#[test]
fn failed_iteration_fails_loop_once() {
    let src = format!(
        "{H}workflow:\n  - step: start\n    loop: {{in: \"{{{{ range(6) }}}}\", iterator: i, spec: {{mode: parallel, max_in_flight: 3}}}}\n    tool: {{kind: python, code: x}}\n    next: end\n  - step: end\n"
    );
    let mut s = Sim::new(&src);
    let r = s.run(json!({}), &|_, i, _| {
        if i == Some(1) || i == Some(2) {
            Err(format!("item {i:?}"))
        } else {
            Ok(json!(i))
        }
    });
    assert_eq!(r.status, Status::Failed);
    assert_eq!(
        r.error.as_ref().map(|e| e.message.as_str()),
        Some("item Some(1)")
    );
    assert_eq!(
        s.log
            .iter()
            .filter(|e| e.kind == EventKind::ExecutionFailed)
            .count(),
        1
    );
    // No new items were issued after the failure.
    assert!(s.count(EventKind::CommandIssued, "start") <= 4);
}

/// The window is a number, a plain string or a template over the execution (read each time
/// an item ends); anything else fails the step with its location.
#[test]
fn parallel_loop_window_forms() {
    for (window, expect) in [
        ("2", Ok(2)),
        ("'4'", Ok(4)),
        ("\"{{ workload.w }}\"", Ok(3)),
        ("\"{{ workload.w * 2 }}\"", Ok(6)),
        ("lots", Err("bad_max_in_flight")),
        ("\"{{ 1 / 0 }}\"", Err("template_error")),
    ] {
        let src = format!(
            "{H}workload: {{w: 3}}\nworkflow:\n  - step: start\n    loop: {{in: \"{{{{ range(10) }}}}\", iterator: x, spec: {{mode: parallel, max_in_flight: {window}}}}}\n    tool: {{kind: python, code: x}}\n"
        );
        let mut s = Sim::new(&src);
        let r = s.run(json!({}), &|_, i, _| Ok(json!(i)));
        match expect {
            Ok(n) => {
                assert_eq!(r.status, Status::Completed, "{window}: {:?}", r.error);
                assert_eq!(s.max_in_flight_seen, n, "{window}");
                assert_eq!(s.count(EventKind::CommandIssued, "start"), 10, "{window}");
            }
            Err(code) => {
                let e = r.error.expect("error");
                assert_eq!(e.code, code, "{window}: {}", e.message);
                assert!(e.message.starts_with("t.yaml:"), "{}", e.message);
            }
        }
    }
}

#[test]
fn runtime_template_errors_fail_with_location() {
    let src = format!(
        "{H}workload: {{xs: 5}}\nworkflow:\n  - step: start\n    loop: {{in: \"{{{{ xs }}}}\", iterator: x}}\n    tool: {{kind: python, code: x}}\n"
    );
    let mut s = Sim::new(&src);
    let r = s.run(json!({}), &echo);
    assert_eq!(r.status, Status::Failed);
    let e = r.error.expect("error");
    assert_eq!(e.code, "loop_not_a_list");
    assert!(e.message.starts_with("t.yaml:7:"), "{}", e.message);
    let src = format!("{H}workflow:\n  - step: start\n    input: {{x: \"{{{{ 1 / 0 }}}}\"}}\n");
    let r = Sim::new(&src).run(json!({}), &echo);
    let e = r.error.expect("error");
    assert_eq!(e.code, "template_error");
    assert!(
        e.message.starts_with("t.yaml:6:") && e.message.contains("(step `start`)"),
        "{}",
        e.message
    );
}

#[test]
fn child_playbook_request_carries_rendered_input() {
    let src = format!(
        "{H}workload: {{users: [{{id: 1}}, {{id: 2}}]}}\nworkflow:\n  - step: start\n    loop: {{in: \"{{{{ users }}}}\", iterator: user}}\n    tool:\n      - {{kind: playbook, path: ./child.yaml, input: {{user_data: \"{{{{ user }}}}\"}}}}\n"
    );
    let mut s = Sim::new(&src);
    s.run(json!({}), &echo);
    let reqs: Vec<&Event> = s
        .log
        .iter()
        .filter(|e| e.kind == EventKind::ChildRequested)
        .collect();
    assert_eq!(
        reqs.len(),
        1,
        "sequential: the next child waits for the first"
    );
    assert_eq!(
        reqs[0].payload,
        json!({"index": 0, "path": "./child.yaml", "input": {"user_data": {"id": 1}}})
    );
    assert_eq!(s.st.status, Status::Running);
    // Simulate the child finishing; the loop continues.
    s.push(vec![
        Draft::new(
            EventKind::StepFinished,
            json!({"index": 0, "result": {"score": 1}}),
        )
        .step("start"),
    ]);
    assert_eq!(
        s.log
            .iter()
            .filter(|e| e.kind == EventKind::ChildRequested)
            .count(),
        2
    );
    s.push(vec![
        Draft::new(
            EventKind::StepFinished,
            json!({"index": 1, "result": {"score": 2}}),
        )
        .step("start"),
    ]);
    assert_eq!(s.st.status, Status::Completed);
    assert_eq!(s.st.result, Some(json!([{"score": 1}, {"score": 2}])));
}

#[test]
fn cycles_rerun_steps_until_condition() {
    let src = format!(
        "{H}workflow:\n  - step: start\n    set: {{ctx.i: 0}}\n    next: body\n  - step: body\n    set: {{ctx.i: \"{{{{ i + 1 }}}}\"}}\n    next:\n      arcs:\n        - {{step: body, when: \"{{{{ i < 5 }}}}\"}}\n        - {{step: done}}\n  - step: done\n    input: {{i: \"{{{{ i }}}}\"}}\n"
    );
    let mut s = Sim::new(&src);
    let r = s.run(json!({}), &echo);
    assert_eq!(r.status, Status::Completed);
    assert_eq!(r.result, json!({"i": 5}));
    assert_eq!(s.count(EventKind::StepFinished, "body"), 5);
}

#[test]
fn terminal_state_ignores_further_events() {
    let src = format!("{H}workflow:\n  - step: start\n");
    let mut s = Sim::new(&src);
    s.run(json!({}), &echo);
    let n = s.log.len();
    let last = s.log[n - 1].clone();
    assert!(decide(&s.pb, &s.st, &last).is_empty());
}

#[test]
fn chained_joins_release_in_order_and_run_once() {
    // start → a, b, c; a,b → ab (join); ab, c → final (join). c finishes first, then a, b.
    let src = format!(
        "{H}workflow:\n  - step: start\n    next:\n      spec: {{mode: inclusive}}\n      arcs: [{{step: a}}, {{step: b}}, {{step: c}}]\n  - step: a\n    tool: {{kind: python, code: x}}\n    next: ab\n  - step: b\n    tool: {{kind: python, code: x}}\n    next: ab\n  - step: c\n    next: final\n  - step: ab\n    next: final\n  - step: final\n    input: {{a: \"{{{{ a.step }}}}\", b: \"{{{{ b.step }}}}\"}}\n"
    );
    let mut s = Sim::new(&src);
    let r = s.run(json!({}), &echo);
    assert_eq!(r.status, Status::Completed);
    assert_eq!(
        s.count(EventKind::StepFinished, "final"),
        1,
        "{:#?}",
        s.kinds()
    );
    assert_eq!(s.count(EventKind::StepFinished, "ab"), 1);
    assert_eq!(r.result, json!({"a": "a", "b": "b"}));
}

#[test]
fn re_entered_loop_ignores_completions_from_its_previous_run() {
    let src = format!(
        "{H}workflow:\n  - step: start\n    loop: {{in: [a, b, c], iterator: x, spec: {{mode: parallel, max_in_flight: 3}}}}\n    tool: {{kind: python, code: x}}\n    next:\n      arcs:\n        - {{step: start, when: \"{{{{ event.name == 'call.error' }}}}\"}}\n        - {{step: end, when: \"{{{{ event.name == 'loop.done' }}}}\"}}\n  - step: end\n    input: {{r: \"{{{{ start }}}}\"}}\n"
    );
    let calls = std::cell::Cell::new(0u32);
    let worker = |_: &str, i: Option<usize>, _: &Map<String, Value>| {
        calls.set(calls.get() + 1);
        if calls.get() == 1 {
            Err("first item fails once".to_owned())
        } else {
            Ok(json!(format!(
                "call{}-item{}",
                calls.get(),
                i.unwrap_or(99)
            )))
        }
    };
    let mut s = Sim::new(&src);
    let r = s.run(json!({}), &worker);
    assert_eq!(r.status, Status::Completed, "{:?}", r.error);
    assert_eq!(s.count(EventKind::LoopStarted, "start"), 2);
    assert_eq!(s.count(EventKind::LoopDone, "start"), 1);
    // Calls 2 and 3 were the first run's items 1 and 2 (stale); the new run is calls 4..6.
    assert_eq!(
        r.result,
        json!({"r": ["call4-item0", "call5-item1", "call6-item2"]})
    );
    assert_eq!(s.st.stale.len(), 2);
}

#[test]
fn wait_steps_park_without_commands_and_expose_their_callback() {
    let src = format!(
        "{H}workflow:\n  - step: start\n    next:\n      spec: {{mode: inclusive}}\n      arcs: [{{step: approval}}, {{step: notify}}]\n  - step: approval\n    tool: {{kind: wait, timeout: 60}}\n    next: done\n  - step: notify\n    tool: {{kind: python, code: x}}\n  - step: done\n    input: {{by: \"{{{{ approval.by }}}}\"}}\n"
    );
    let mut s = Sim::new(&src);
    // A worker step hydrated after the wait began sees where to send the callback.
    s.run(json!({}), &|step: &str, _, ctx: &Map<String, Value>| {
        Ok(if step == "notify" {
            json!({"url": ctx["callbacks"]["approval"]["url"]})
        } else {
            Value::Null
        })
    });
    let waiting: Vec<&Event> = s
        .log
        .iter()
        .filter(|e| e.kind == EventKind::StepWaiting)
        .collect();
    assert_eq!(waiting.len(), 1);
    assert_eq!(
        waiting[0].payload,
        json!({"token": "", "timeout_ms": 60000}),
        "decide leaves the token to the appender"
    );
    assert_eq!(
        s.count(EventKind::CommandIssued, "approval"),
        0,
        "no command for a waiting step"
    );
    assert_eq!(s.st.status, Status::Running);
    assert_eq!(s.st.waiting.len(), 1);
    // (The simulator does not mint tokens, so the URL ends at the prefix.)
    assert_eq!(s.st.results["notify"].result, json!({"url": "/callbacks/"}));
    // The callback arrives: the step finishes with the payload and routing continues.
    s.push(vec![
        Draft::new(EventKind::CallbackReceived, json!({"token": ""})).step("approval"),
        Draft::new(EventKind::StepFinished, json!({"result": {"by": "ann"}})).step("approval"),
    ]);
    assert!(s.st.waiting.is_empty());
    assert_eq!(s.st.status, Status::Completed);
    assert_eq!(s.st.result, Some(json!({"by": "ann"})));
}

const REF_DIGEST: &str = "sha256:5d5b09f6dcb2d53a5fffc60c4ac0d55fabdf556069d6631545f42aa6e3500f2e";

fn table_ref(count: u64) -> Value {
    json!({"$ref": REF_DIGEST, "format": "arrow", "bytes": 4096, "count": count, "columns": ["id"]})
}

#[test]
fn loop_over_a_cached_result_iterates_by_element_ref() {
    let src = format!(
        "{H}workflow:\n  - step: start\n    tool: {{kind: python, code: x}}\n    next:\n      arcs:\n        - {{step: each, when: \"{{{{ start.rows.count > 2 and start.status == 'ok' }}}}\"}}\n  - step: each\n    loop: {{in: \"{{{{ start.rows }}}}\", iterator: row, spec: {{mode: parallel}}}}\n    tool: {{kind: python, code: x}}\n"
    );
    let mut s = Sim::new(&src);
    let r = s.run(json!({}), &|step, i, ctx| match step {
        "start" => Ok(json!({"status": "ok", "rows": table_ref(3)})),
        _ => {
            // The bare step name exposes the ref itself (no `.data` alias inside a ref).
            assert_eq!(ctx["start"]["rows"], table_ref(3));
            Ok(json!(i))
        }
    });
    assert_eq!(r.status, Status::Completed, "{:?}", r.error);
    assert_eq!(r.result, json!([0, 1, 2]));
    let started = s
        .log
        .iter()
        .find(|e| e.kind == EventKind::LoopStarted)
        .expect("loop.started");
    let l: LoopStarted = serde_json::from_value(started.payload.clone()).expect("payload");
    assert!(l.items.is_empty(), "the list is not copied into the log");
    assert_eq!(l.source.as_ref().and_then(|r| r.count), Some(3));
    assert_eq!(s.count(EventKind::CommandIssued, "each"), 3);
}

#[test]
fn loop_state_hands_out_element_refs() {
    let r = CacheRef::parse(&table_ref(2)).expect("ref");
    let l = LoopState {
        source: Some(r.clone()),
        ..Default::default()
    };
    assert_eq!(l.len(), 2);
    assert_eq!(l.item(1), Some(r.element(1).to_value()));
    assert_eq!(l.item(2), None);
    assert_eq!(alias(&table_ref(2)), table_ref(2));
}

#[test]
fn a_ref_without_a_count_is_not_a_list() {
    let src = format!(
        "{H}workflow:\n  - step: start\n    tool: {{kind: python, code: x}}\n    next: each\n  - step: each\n    loop: {{in: \"{{{{ start }}}}\", iterator: row}}\n    tool: {{kind: python, code: x}}\n"
    );
    let mut s = Sim::new(&src);
    let r = s.run(json!({}), &|_, _, _| {
        Ok(json!({"$ref": REF_DIGEST, "format": "json", "bytes": 99999}))
    });
    assert_eq!(r.status, Status::Failed);
    assert_eq!(r.error.map(|e| e.code), Some("loop_not_a_list".into()));
}

#[test]
fn a_forged_ref_count_cannot_size_a_loop() {
    let src = format!(
        "{H}workflow:\n  - step: start\n    tool: {{kind: python, code: x}}\n    next: each\n  - step: each\n    loop: {{in: \"{{{{ start }}}}\", iterator: row}}\n    tool: {{kind: python, code: x}}\n"
    );
    let mut s = Sim::new(&src);
    let r = s.run(json!({}), &|_, _, _| {
        Ok(json!({"$ref": REF_DIGEST, "format": "json", "bytes": 10, "count": 1u64 << 60}))
    });
    assert_eq!(r.status, Status::Failed);
    assert_eq!(r.error.map(|e| e.code), Some("loop_too_large".into()));
}

#[test]
fn step_fields_never_corrupt_a_ref() {
    let src = format!(
        "{H}workflow:\n  - step: start\n    tool: {{kind: python, code: x}}\n    set: {{step.note: tagged}}\n"
    );
    let mut s = Sim::new(&src);
    let r = s.run(json!({}), &|_, _, _| Ok(table_ref(5)));
    assert_eq!(r.status, Status::Completed, "{:?}", r.error);
    // Like any non-record result, the ref is replaced by the step's fields, not merged into.
    assert_eq!(r.steps["start"], json!({"note": "tagged"}));
}
