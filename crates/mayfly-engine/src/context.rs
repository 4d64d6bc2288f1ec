//! The template scope of an execution, exactly as the NoETL reference describes it.
//!
//! Later writes win: workload keys (bare and `workload.*`) < step results (bare `<name>`
//! with a `.data` alias, and `steps.<name>` envelopes) < ctx keys (bare and `ctx.*`).

use crate::state::ExecState;
use mayfly_types::CacheRef;
use serde_json::{Map, Value, json};
use std::collections::BTreeSet;

/// The loop iteration a block runs for.
#[derive(Clone, Copy, Debug)]
pub struct Iteration<'a> {
    pub iterator: &'a str,
    pub value: &'a Value,
    pub index: usize,
    /// Items in the loop.
    pub total: usize,
}

/// A step's data as exposed bare: objects gain a `.data` alias of themselves, so
/// `{{ fetch.x }}` and `{{ fetch.data.x }}` both work.
///
/// A cached ref stays a ref (the worker that hydrates it aliases the value).
pub fn alias(result: &Value) -> Value {
    match result {
        Value::Object(m) if CacheRef::parse(result).is_none() => {
            let mut out = m.clone();
            // A pipeline's `{label: data}` (every value an object): each task's fields are
            // also at the top, in task order, the last one winning (NoETL's flattening).
            if !m.is_empty() && m.values().all(Value::is_object) {
                for v in m.values() {
                    if let Value::Object(fields) = v {
                        for (k, x) in fields {
                            if !m.contains_key(k) {
                                out.insert(k.clone(), x.clone());
                            }
                        }
                    }
                }
            }
            // (`x.result.k` reads `x.k` in templates for every map: see `to_value`.)
            let flat = Value::Object(out.clone());
            out.entry("data").or_insert(flat);
            Value::Object(out)
        }
        other => other.clone(),
    }
}

/// Build the render context for a step (optionally inside a loop iteration).
pub fn context(st: &ExecState, iteration: Option<Iteration<'_>>) -> Map<String, Value> {
    let mut m = st.workload.clone();
    m.insert("workload".into(), Value::Object(st.workload.clone()));
    let mut steps = Map::new();
    for (name, rec) in &st.results {
        let mut env = Map::new();
        // NoETL's envelope status.
        let status = if rec.status == "ok" {
            "COMPLETED"
        } else {
            "FAILED"
        };
        env.insert("status".into(), Value::String(status.into()));
        env.insert("data".into(), rec.result.clone());
        if let Some(e) = &rec.error {
            env.insert("error".into(), json!(e));
        }
        steps.insert(name.clone(), Value::Object(env));
        m.insert(name.clone(), alias(&rec.result));
    }
    m.insert("steps".into(), Value::Object(steps));
    // Loop steps' results are lists that also answer `.results` / `.stats` in templates.
    let loops: Vec<Value> = st
        .loops
        .keys()
        .filter(|n| st.results.get(*n).is_some_and(|r| r.result.is_array()))
        .map(|n| Value::String(n.clone()))
        .collect();
    if !loops.is_empty() {
        m.insert(mayfly_dsl::template::LOOPS_KEY.into(), Value::Array(loops));
    }
    for (k, v) in &st.ctx {
        m.insert(k.clone(), v.clone());
    }
    m.insert("ctx".into(), Value::Object(st.ctx.clone()));
    if !st.waiting.is_empty() {
        // Where to send each parked step's callback (for a sibling branch to hand out).
        let mut cbs = Map::new();
        for (token, w) in &st.waiting {
            cbs.insert(
                w.step.clone(),
                json!({"token": token, "url": format!("/callbacks/{token}")}),
            );
        }
        m.insert("callbacks".into(), Value::Object(cbs));
    }
    m.insert(
        "execution_id".into(),
        Value::String(st.execution_id.0.clone()),
    );
    m.insert("path".into(), Value::String(st.path.clone()));
    if let Some(it) = iteration {
        m.insert(it.iterator.to_owned(), it.value.clone());
        m.insert("loop_index".into(), json!(it.index));
        m.insert("_index".into(), json!(it.index));
        m.insert("_total".into(), json!(it.total));
        m.insert(
            "iter".into(),
            json!({
                it.iterator: it.value,
                "index": it.index,
                "_index": it.index,
                "_total": it.total,
                "_first": it.index == 0,
                "_last": it.index + 1 == it.total,
            }),
        );
    }
    m
}

/// True when one of `paths` (see `Step::bound_paths`) reaches a cached ref in `ctx`, at the
/// path or beneath it: the block needs the shared cache, so it cannot complete inline.
pub fn binds_ref(ctx: &Map<String, Value>, paths: &BTreeSet<String>) -> bool {
    paths.iter().any(|p| {
        let mut parts = p.split('.');
        let Some(mut node) = parts.next().and_then(|root| ctx.get(root)) else {
            return false;
        };
        loop {
            if CacheRef::parse(node).is_some() {
                return true;
            }
            match parts.next() {
                None => return CacheRef::any_in(node),
                Some(k) => match node.get(k) {
                    Some(n) => node = n,
                    None => return false,
                },
            }
        }
    })
}
