//! The block's side of the shared cache: hydrate the refs a block's templates bind before it
//! runs, and store the large parts of what it returns before the completion is recorded (so a
//! ref in an event always points at stored bytes).

use crate::Hydrated;
use mayfly_cache::{CacheError, Payloads};
use mayfly_engine::context::alias;
use mayfly_types::{CacheRef, ErrorInfo, StepFailed, StepFinished};
use serde_json::Value;

/// Replace, in the block's scope, the refs that its templates bind by their values. Refs the
/// block never reads stay refs (never fetched). A step result hydrated at the top level gets
/// its `.data` alias back.
pub async fn hydrate(p: &Payloads, h: &mut Hydrated) -> Result<(), CacheError> {
    if !h.context.values().any(CacheRef::any_in) {
        return Ok(());
    }
    let Some(step) = h.playbook.step(&h.block.step) else {
        return Ok(());
    };
    let paths = step.bound_paths();
    let tenant = h.tenant.clone();
    // Step results fetched here keep answering `_ref` & co. (see `REFS_KEY`).
    let mut fetched = serde_json::Map::new();
    for path in paths {
        let mut parts = path.split('.').peekable();
        let Some(root) = parts.next() else { continue };
        let is_step = h.playbook.step(root).is_some();
        let Some(mut node) = h.context.get_mut(root) else {
            continue;
        };
        let mut depth = 0;
        loop {
            // `s._ref` (and its family) reads the ref itself: never fetched for that.
            if parts
                .peek()
                .is_some_and(|k| mayfly_dsl::REF_KEYS.contains(k))
                && CacheRef::parse(node).is_some()
            {
                break;
            }
            // A hydrated value can be a ref again (an element of an aggregate of refs).
            let mut hydrated = false;
            let original = (depth == 0 && is_step)
                .then(|| CacheRef::parse(node).map(|_| node.clone()))
                .flatten();
            while let Some(r) = CacheRef::parse(node) {
                *node = p.hydrate(&tenant, &r).await?;
                hydrated = true;
            }
            if let Some(r) = original {
                fetched.insert(root.to_owned(), r);
            }
            if hydrated && depth == 0 && is_step {
                *node = alias(node);
            }
            let Some(key) = parts.next() else {
                p.hydrate_all(&tenant, node).await?;
                break;
            };
            node = match node {
                Value::Object(m) => match m.get_mut(key) {
                    Some(n) => n,
                    None => break,
                },
                _ => break,
            };
            depth += 1;
        }
    }
    if !fetched.is_empty() {
        h.context
            .insert(mayfly_dsl::REFS_KEY.into(), Value::Object(fetched));
    }
    Ok(())
}

/// Store the large parts of a block's outcome (its result and `set` values) in the cache.
///
/// Refs are minted here and nowhere else: a tool whose output already spells one (an HTTP
/// answer or a script forging `{"$ref": "sha256:…", …}` to make a later step read another
/// blob of the tenant's cache) fails the step with `forged_ref`.
pub async fn externalize(
    p: &Payloads,
    tenant: &str,
    outcome: &mut Result<StepFinished, StepFailed>,
) -> Result<(), CacheError> {
    if let Ok(f) = outcome
        && (CacheRef::any_in(&f.result) || f.set.values().any(CacheRef::any_in))
    {
        *outcome = Err(StepFailed {
            index: f.index,
            error: ErrorInfo::new(
                "forged_ref",
                "the tool's output contains a cache reference ({\"$ref\": \"sha256:…\", \"format\": …}); only mayfly mints those",
            ),
            duration_ms: f.duration_ms,
            logs: f.logs.take(),
        });
        return Ok(());
    }
    if let Ok(f) = outcome {
        let result = std::mem::take(&mut f.result);
        f.result = p.externalize(tenant, result).await?;
        for v in f.set.values_mut() {
            let value = std::mem::take(v);
            *v = p.externalize(tenant, value).await?;
        }
    }
    Ok(())
}
