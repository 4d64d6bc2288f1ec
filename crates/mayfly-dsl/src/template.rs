//! minijinja templating with NoETL semantics.
//!
//! * A string that is exactly one `{{ expr }}` evaluates to the expression's *native* value
//!   (list, dict, number…), so `in: "{{ users }}"` yields a list, not its text.
//! * Anything else renders to a string.
//! * Undefined values are *chainable* at run time (NoETL compatibility: `{{ a.b.c }}` on a
//!   missing `a` is undefined, not an error). Typos in `when` conditions are caught earlier,
//!   statically, by [`Templates::variables`] during validation.

use crate::node::{Loc, Node, NodeV};
use base64::Engine as _;
use minijinja::{Environment, Error as MjError, ErrorKind, UndefinedBehavior, Value as MjValue};
use serde_json::{Map, Value};
use std::collections::BTreeSet;
use std::sync::LazyLock;

/// A template failure with the YAML location of the offending string.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{loc}: {message}")]
pub struct TemplateError {
    pub loc: Loc,
    pub message: String,
}

/// The shared template environment (filters, tests, undefined behaviour).
pub struct Templates {
    env: Environment<'static>,
}

static TEMPLATES: LazyLock<Templates> = LazyLock::new(Templates::new);

/// The process-wide template environment.
pub fn templates() -> &'static Templates {
    &TEMPLATES
}

fn b64encode(v: String) -> String {
    base64::engine::general_purpose::STANDARD.encode(v.as_bytes())
}

fn b64decode(v: String) -> Result<String, MjError> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(v.trim().as_bytes())
        .map_err(|e| MjError::new(ErrorKind::InvalidOperation, format!("b64decode: {e}")))?;
    String::from_utf8(bytes)
        .map_err(|e| MjError::new(ErrorKind::InvalidOperation, format!("b64decode: {e}")))
}

fn fromjson(v: String) -> Result<MjValue, MjError> {
    let parsed: Value = serde_json::from_str(&v)
        .map_err(|e| MjError::new(ErrorKind::InvalidOperation, format!("fromjson: {e}")))?;
    Ok(to_value(&parsed))
}

fn get_filter(map: MjValue, key: MjValue, default: Option<MjValue>) -> MjValue {
    match map.get_item(&key) {
        Ok(v) if !v.is_undefined() && !v.is_none() => v,
        _ => default.unwrap_or(MjValue::from(())),
    }
}

fn keys_filter(map: MjValue) -> Result<MjValue, MjError> {
    Ok(MjValue::from(map.try_iter()?.collect::<Vec<_>>()))
}

fn values_filter(map: MjValue) -> Result<MjValue, MjError> {
    let mut out = Vec::new();
    for k in map.try_iter()? {
        out.push(map.get_item(&k)?);
    }
    Ok(MjValue::from(out))
}

impl Templates {
    fn new() -> Self {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Chainable);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("b64encode", b64encode);
        env.add_filter("b64decode", b64decode);
        env.add_filter("fromjson", fromjson);
        env.add_filter("get", get_filter);
        env.add_filter("keys", keys_filter);
        env.add_filter("values", values_filter);
        Templates { env }
    }

    /// True when the string contains template syntax at all.
    pub fn is_template(s: &str) -> bool {
        s.contains("{{") || s.contains("{%")
    }

    /// If `s` is exactly one `{{ expr }}`, the expression inside.
    pub fn single_expression(s: &str) -> Option<&str> {
        let t = s.trim();
        let inner = t.strip_prefix("{{")?.strip_suffix("}}")?;
        if inner.contains("{{") || inner.contains("}}") || inner.contains("{%") {
            return None;
        }
        Some(inner.trim())
    }

    /// Render one string: native value for a single expression, else the rendered text.
    pub fn render_str(&self, s: &str, ctx: &MjValue) -> Result<Value, String> {
        if !Self::is_template(s) {
            return Ok(Value::String(s.to_owned()));
        }
        if let Some(expr) = Self::single_expression(s) {
            let compiled = self.env.compile_expression(expr).map_err(describe)?;
            let v = compiled.eval(ctx.clone()).map_err(describe)?;
            return to_json(&v);
        }
        let tmpl = self.env.template_from_str(s).map_err(describe)?;
        tmpl.render(ctx.clone())
            .map(Value::String)
            .map_err(describe)
    }

    /// Render every string inside a node, recursively.
    pub fn render_node(&self, n: &Node, ctx: &MjValue) -> Result<Value, TemplateError> {
        Ok(match &n.v {
            NodeV::Str(s) => self.render_str(s, ctx).map_err(|message| TemplateError {
                loc: n.loc,
                message,
            })?,
            NodeV::Seq(items) => Value::Array(
                items
                    .iter()
                    .map(|i| self.render_node(i, ctx))
                    .collect::<Result<_, _>>()?,
            ),
            NodeV::Map(entries) => {
                let mut m = Map::new();
                for (k, _, v) in entries {
                    m.insert(k.clone(), self.render_node(v, ctx)?);
                }
                Value::Object(m)
            }
            _ => n.to_json(),
        })
    }

    /// Evaluate a condition (`when`). Non-string scalars are constants.
    pub fn eval_condition(&self, n: &Node, ctx: &MjValue) -> Result<bool, TemplateError> {
        let err = |message: String| TemplateError {
            loc: n.loc,
            message,
        };
        match &n.v {
            NodeV::Str(s) => {
                if let Some(expr) = Self::single_expression(s) {
                    let compiled = self
                        .env
                        .compile_expression(expr)
                        .map_err(|e| err(describe(e)))?;
                    let v = compiled.eval(ctx.clone()).map_err(|e| err(describe(e)))?;
                    Ok(v.is_true())
                } else if Self::is_template(s) {
                    let out = self.render_str(s, ctx).map_err(err)?;
                    Ok(truthy(&out))
                } else {
                    // A bare expression without braces, as some fixtures write `when: x > 1`.
                    let compiled = self
                        .env
                        .compile_expression(s)
                        .map_err(|e| err(describe(e)))?;
                    let v = compiled.eval(ctx.clone()).map_err(|e| err(describe(e)))?;
                    Ok(v.is_true())
                }
            }
            other => Ok(truthy(
                &Node {
                    loc: n.loc,
                    v: other.clone(),
                }
                .to_json(),
            )),
        }
    }

    /// Syntax check of one string (no rendering).
    pub fn check(&self, s: &str) -> Result<(), String> {
        if let Some(expr) = Self::single_expression(s) {
            self.env
                .compile_expression(expr)
                .map(|_| ())
                .map_err(describe)
        } else if Self::is_template(s) {
            self.env.template_from_str(s).map(|_| ()).map_err(describe)
        } else {
            Ok(())
        }
    }

    /// Variable paths a template (or bare condition expression) reads, as far as they are
    /// static attribute chains (`fetch.rows` for `{{ fetch.rows[0].id }}`).
    pub fn paths(&self, s: &str, bare_expression: bool) -> Result<BTreeSet<String>, String> {
        self.undeclared(s, bare_expression, true)
    }

    /// Root variable names a template (or bare condition expression) reads.
    pub fn variables(&self, s: &str, bare_expression: bool) -> Result<BTreeSet<String>, String> {
        self.undeclared(s, bare_expression, false)
    }

    fn undeclared(
        &self,
        s: &str,
        bare_expression: bool,
        nested: bool,
    ) -> Result<BTreeSet<String>, String> {
        let set = if let Some(expr) = Self::single_expression(s) {
            self.env
                .compile_expression(expr)
                .map_err(describe)?
                .undeclared_variables(nested)
        } else if Self::is_template(s) {
            self.env
                .template_from_str(s)
                .map_err(describe)?
                .undeclared_variables(nested)
        } else if bare_expression {
            self.env
                .compile_expression(s)
                .map_err(describe)?
                .undeclared_variables(nested)
        } else {
            Default::default()
        };
        Ok(set.into_iter().collect())
    }
}

/// Convert any serializable value (typically `serde_json::Value`) into a template value.
pub fn to_value<T: serde::Serialize>(v: &T) -> MjValue {
    MjValue::from(minijinja::value::Serde(v))
}

/// Truthiness of a rendered value (strings follow Jinja's `"False"` rendering).
pub fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => {
            let t = s.trim();
            !(t.is_empty()
                || t.eq_ignore_ascii_case("false")
                || t.eq_ignore_ascii_case("none")
                || t.eq_ignore_ascii_case("null")
                || t == "0")
        }
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

fn to_json(v: &MjValue) -> Result<Value, String> {
    if v.is_undefined() {
        return Ok(Value::Null);
    }
    serde_json::to_value(v).map_err(|e| format!("template produced a value that is not JSON: {e}"))
}

fn describe(e: MjError) -> String {
    let mut msg = match e.detail() {
        Some(d) => format!("{}: {}", e.kind(), d),
        None => e.kind().to_string(),
    };
    if let Some(line) = e.line()
        && line > 1
    {
        msg.push_str(&format!(" (template line {line})"));
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ctx(v: Value) -> MjValue {
        to_value(&v)
    }

    #[test]
    fn single_expression_yields_native_values() {
        let t = templates();
        let c = ctx(json!({"users": [{"id": 1}, {"id": 2}], "n": 3}));
        assert_eq!(
            t.render_str("{{ users }}", &c),
            Ok(json!([{"id": 1}, {"id": 2}]))
        );
        assert_eq!(t.render_str(" {{ n + 1 }} ", &c), Ok(json!(4)));
        assert_eq!(t.render_str("n={{ n }}", &c), Ok(json!("n=3")));
        assert_eq!(t.render_str("plain", &c), Ok(json!("plain")));
        assert_eq!(t.render_str("{{ missing }}", &c), Ok(Value::Null));
    }

    #[test]
    fn chainable_undefined_is_lenient() {
        let t = templates();
        let c = ctx(json!({}));
        assert_eq!(t.render_str("{{ a.b.c }}", &c), Ok(Value::Null));
        assert_eq!(t.render_str("x{{ a.b }}y", &c), Ok(json!("xy")));
    }

    #[test]
    fn filters_and_pycompat_methods() {
        let t = templates();
        let c = ctx(json!({"m": {"k": "v"}, "s": "aGk="}));
        assert_eq!(
            t.render_str("{{ 'hi' | b64encode }}", &c),
            Ok(json!("aGk="))
        );
        assert_eq!(t.render_str("{{ s | b64decode }}", &c), Ok(json!("hi")));
        assert_eq!(
            t.render_str("{{ '{\"a\": 1}' | fromjson }}", &c),
            Ok(json!({"a": 1}))
        );
        assert_eq!(t.render_str("{{ m.get('k') }}", &c), Ok(json!("v")));
        assert_eq!(t.render_str("{{ m | get('z', 'd') }}", &c), Ok(json!("d")));
        assert_eq!(t.render_str("{{ m | keys | list }}", &c), Ok(json!(["k"])));
        assert_eq!(
            t.render_str("{{ m | tojson }}", &c),
            Ok(json!("{\"k\": \"v\"}"))
        );
        assert!(
            t.render_str("{{ b64 | b64decode }}", &ctx(json!({"b64": "!!"})))
                .is_err()
        );
    }

    #[test]
    fn conditions() {
        let t = templates();
        let c = ctx(json!({"x": {"is_hot": true}, "n": 0}));
        let node = |s: &str| Node {
            loc: Loc { line: 3, col: 9 },
            v: NodeV::Str(s.into()),
        };
        assert_eq!(
            t.eval_condition(&node("{{ x.is_hot == true }}"), &c),
            Ok(true)
        );
        assert_eq!(t.eval_condition(&node("{{ n > 0 }}"), &c), Ok(false));
        assert_eq!(t.eval_condition(&node("n == 0"), &c), Ok(true));
        assert_eq!(
            t.eval_condition(&node("{% if n %}yes{% endif %}"), &c),
            Ok(false)
        );
        assert_eq!(
            t.eval_condition(
                &Node {
                    loc: Loc::default(),
                    v: NodeV::Bool(true)
                },
                &c
            ),
            Ok(true)
        );
        let e = t
            .eval_condition(&node("{{ n + }}"), &c)
            .expect_err("syntax");
        assert_eq!(e.loc, Loc { line: 3, col: 9 });
        assert!(e.message.contains("syntax error"), "{}", e.message);
    }

    #[test]
    fn variables_are_extracted() {
        let t = templates();
        let v = t
            .variables("{{ a.b == c and range(3) }}", false)
            .expect("vars");
        assert!(v.contains("a") && v.contains("c"));
        assert!(t.variables("plain", false).expect("vars").is_empty());
        assert!(t.variables("x > y", true).expect("vars").contains("y"));
    }

    #[test]
    fn truthiness() {
        for v in [
            json!(null),
            json!(false),
            json!(0),
            json!(""),
            json!("False"),
            json!("none"),
            json!([]),
        ] {
            assert!(!truthy(&v), "{v}");
        }
        for v in [
            json!(true),
            json!(1),
            json!("True"),
            json!("x"),
            json!([1]),
            json!({"a": 1}),
        ] {
            assert!(truthy(&v), "{v}");
        }
    }

    #[test]
    fn render_node_reports_location() {
        let t = templates();
        let n: Node =
            serde_saphyr::from_str("a:\n  b: \"{{ x | nosuchfilter }}\"\n").expect("yaml");
        let e = t
            .render_node(&n, &ctx(json!({"x": 1})))
            .expect_err("unknown filter");
        assert_eq!(e.loc.line, 2);
        assert!(
            e.message.contains("nosuchfilter") || e.message.contains("unknown filter"),
            "{}",
            e.message
        );
    }
}
