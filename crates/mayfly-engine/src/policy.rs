//! Task policy rules (`tool.spec.policy.rules`): which rule applies, and retry delays.
//!
//! The pipeline itself runs inside the worker (one command = one block, as in NoETL);
//! this module holds the pure decisions so they can be tested exhaustively.

use mayfly_dsl::{Backoff, Directive, Rule, TemplateError, templates};

/// The rule that applies to a task outcome, if any. `ctx` must contain `output`.
/// The first rule whose `when` holds wins; an `else` rule matches anything.
pub fn select_rule<'r>(
    rules: &'r [Rule],
    ctx: &minijinja::Value,
) -> Result<Option<&'r Rule>, TemplateError> {
    for r in rules {
        match &r.when {
            None => return Ok(Some(r)),
            Some(w) => {
                if templates().eval_condition(w, ctx)? {
                    return Ok(Some(r));
                }
            }
        }
    }
    Ok(None)
}

/// What to do when no rule matched: a success continues; an error does what the task's
/// `on_unmatched` says, which is `fail` unless the author wrote `on_unmatched: continue`.
/// (NoETL continues on unmatched errors by default; silently swallowing a failure because
/// a retry rule did not match is a trap, so mayfly fails closed.)
pub fn default_directive(ok: bool, on_unmatched_error: &Directive) -> Directive {
    if ok {
        Directive::Continue
    } else {
        on_unmatched_error.clone()
    }
}

/// Delay before retry number `retry` (1-based), in seconds, capped at `max_delay_s`.
pub fn backoff_delay(backoff: Backoff, delay_s: f64, retry: u32, max_delay_s: f64) -> f64 {
    let n = retry.max(1) as f64;
    let d = match backoff {
        Backoff::Fixed => delay_s,
        Backoff::Linear => delay_s * n,
        Backoff::Exponential => delay_s * 2f64.powf(n - 1.0),
    };
    d.clamp(0.0, max_delay_s.max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mayfly_dsl::{Loc, Node, NodeV, to_value};
    use serde_json::json;

    fn rule(when: Option<&str>, d: Directive) -> Rule {
        Rule {
            when: when.map(|w| Node {
                loc: Loc::default(),
                v: NodeV::Str(w.into()),
            }),
            directive: d,
            set: Vec::new(),
            loc: Loc::default(),
        }
    }

    #[test]
    fn first_matching_rule_wins_and_else_catches_all() {
        let rules = vec![
            rule(Some("{{ output.status == 'error' }}"), Directive::Fail),
            rule(Some("{{ output.data.n > 1 }}"), Directive::Break),
            rule(None, Directive::Continue),
        ];
        let ctx = |v| to_value(&json!({"output": v}));
        let pick = |v| {
            select_rule(&rules, &ctx(v))
                .expect("eval")
                .map(|r| r.directive.clone())
        };
        assert_eq!(pick(json!({"status": "error"})), Some(Directive::Fail));
        assert_eq!(
            pick(json!({"status": "ok", "data": {"n": 2}})),
            Some(Directive::Break)
        );
        assert_eq!(
            pick(json!({"status": "ok", "data": {"n": 0}})),
            Some(Directive::Continue)
        );
        assert_eq!(
            select_rule(&rules[..2], &ctx(json!({"status": "ok", "data": {"n": 0}}))).expect("e"),
            None
        );
    }

    #[test]
    fn defaults() {
        assert_eq!(
            default_directive(true, &Directive::Fail),
            Directive::Continue
        );
        assert_eq!(default_directive(false, &Directive::Fail), Directive::Fail);
        assert_eq!(
            default_directive(false, &Directive::Continue),
            Directive::Continue
        );
    }

    #[test]
    fn backoff_curves() {
        assert_eq!(backoff_delay(Backoff::Fixed, 0.5, 3, 10.0), 0.5);
        assert_eq!(backoff_delay(Backoff::Linear, 0.5, 3, 10.0), 1.5);
        assert_eq!(backoff_delay(Backoff::Exponential, 0.5, 1, 10.0), 0.5);
        assert_eq!(backoff_delay(Backoff::Exponential, 0.5, 4, 10.0), 4.0);
        assert_eq!(backoff_delay(Backoff::Exponential, 0.5, 10, 10.0), 10.0);
        assert_eq!(backoff_delay(Backoff::Fixed, -1.0, 1, 10.0), 0.0);
    }
}
