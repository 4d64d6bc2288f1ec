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

/// How a message of a template that ran out of fuel begins.
pub const LIMIT_MESSAGE: &str = "template limit exceeded";

/// Fuel of one render (one fuel pays for one instruction, or 64 bytes produced): far above
/// what any playbook expression needs, far below `{{ [0] * 100000000 }}`'s gigabytes.
pub const TEMPLATE_FUEL: u64 = 2_000_000;

impl TemplateError {
    /// The stable error code: `template_limit` when the render ran out of fuel, else
    /// `template_error`.
    pub fn code(&self) -> &'static str {
        if self.message.starts_with(LIMIT_MESSAGE) {
            "template_limit"
        } else {
            "template_error"
        }
    }
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
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("b64encode", b64encode);
        env.add_filter("b64decode", b64decode);
        env.add_filter("fromjson", fromjson);
        env.add_filter("get", get_filter);
        env.add_filter("keys", keys_filter);
        env.add_filter("values", values_filter);
        Templates { env }
    }

    /// Compile an expression, after the nesting guard (untrusted text must never recurse
    /// the parser off the end of the stack).
    fn expr<'s>(&'s self, s: &'s str) -> Result<minijinja::Expression<'s, 's>, MjError> {
        nesting_guard(s, true)?;
        self.env.compile_expression(s)
    }

    fn tmpl<'s>(&'s self, s: &'s str) -> Result<minijinja::Template<'s, 's>, MjError> {
        nesting_guard(s, false)?;
        self.env.template_from_str(s)
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
        let out = if let Some(expr) = Self::single_expression(s) {
            let compiled = self.expr(expr).map_err(describe)?;
            let v = compiled.eval(ctx.clone()).map_err(describe)?;
            to_json(&v)?
        } else {
            let tmpl = self.tmpl(s).map_err(describe)?;
            Value::String(tmpl.render(ctx.clone()).map_err(describe)?)
        };
        Ok(retype(out))
    }

    /// Render a template as text (never a native value), e.g. python `code`.
    pub fn render_text(&self, s: &str, ctx: &MjValue) -> Result<String, String> {
        if !Self::is_template(s) {
            return Ok(s.to_owned());
        }
        self.tmpl(s)
            .and_then(|t| t.render(ctx.clone()))
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
                    let compiled = self.expr(expr).map_err(|e| err(describe(e)))?;
                    let v = compiled.eval(ctx.clone()).map_err(|e| err(describe(e)))?;
                    Ok(v.is_true())
                } else if Self::is_template(s) {
                    let out = self.render_str(s, ctx).map_err(err)?;
                    Ok(truthy(&out))
                } else {
                    // A bare expression without braces, as some fixtures write `when: x > 1`.
                    let compiled = self.expr(s).map_err(|e| err(describe(e)))?;
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
            self.expr(expr).map(|_| ()).map_err(describe)
        } else if Self::is_template(s) {
            self.tmpl(s).map(|_| ()).map_err(describe)
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
            self.expr(expr)
                .map_err(describe)?
                .undeclared_variables(nested)
        } else if Self::is_template(s) {
            self.tmpl(s).map_err(describe)?.undeclared_variables(nested)
        } else if bare_expression {
            self.expr(s).map_err(describe)?.undeclared_variables(nested)
        } else {
            Default::default()
        };
        Ok(set.into_iter().collect())
    }
}

/// NoETL's typing of a rendered template: text that is a JSON object or array (`{{ body |
/// tojson }}`, `'{"id": {{ id }}}'`) becomes that value, so a body built as text is sent as
/// the object it spells. Other text stays text (NoETL's Rust server also turns `"42"` and
/// `"True"` into scalars; mayfly leaves scalars to a lone `{{ expr }}`, which is native).
fn retype(v: Value) -> Value {
    let Value::String(s) = &v else { return v };
    let t = s.trim();
    let framed =
        (t.starts_with('{') && t.ends_with('}')) || (t.starts_with('[') && t.ends_with(']'));
    if framed && let Ok(parsed) = serde_json::from_str::<Value>(t) {
        return parsed;
    }
    v
}

/// Deepest bracket nesting, longest run of prefix operators (`not`, `-`, `+`), most `if`s in
/// one expression, and deepest `{% block %}` nesting that a template may have. minijinja's
/// parser recurses on each, and a run of prefix operators is not covered by its own
/// recursion limit: 10,000 `not`s overflow any stack (and 150 nested `if`s a small one).
pub const MAX_NESTING: usize = 32;

/// `{% … %}` tags that open a block (closed by `end…`).
const BLOCK_TAGS: &[&str] = &[
    "if",
    "for",
    "macro",
    "call",
    "filter",
    "with",
    "block",
    "autoescape",
];

/// Reject expressions nested deeper than [`MAX_NESTING`]. `bare`: the whole text is one
/// expression; otherwise only `{{ … }}` and `{% … %}` regions are expressions.
fn nesting_guard(s: &str, bare: bool) -> Result<(), MjError> {
    let b = s.as_bytes();
    let too_deep = |what: &str| {
        Err(MjError::new(
            ErrorKind::SyntaxError,
            format!("expression nested too deeply ({what} beyond {MAX_NESTING} levels)"),
        ))
    };
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let keyword = |i: usize, k: &[u8]| {
        b[i..].starts_with(k)
            && (i == 0 || !word(b[i - 1]))
            && !b.get(i + k.len()).copied().is_some_and(word)
    };
    let (mut i, mut in_expr, mut depth, mut run, mut ifs) = (0usize, bare, 0usize, 0usize, 0usize);
    let mut blocks = 0usize;
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        if !in_expr {
            if c == b'{' && matches!(next, Some(b'{') | Some(b'%')) {
                if next == Some(b'%') {
                    // The tag's first word: a block opener or an `end…`.
                    let rest = s[i + 2..].trim_start_matches(['-', '+', ' ', '\t', '\n', '\r']);
                    let tag: String = rest
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    if BLOCK_TAGS.contains(&tag.as_str()) {
                        blocks += 1;
                        if blocks > MAX_NESTING {
                            return too_deep("nested `{% … %}` blocks");
                        }
                    } else if tag.starts_with("end") {
                        blocks = blocks.saturating_sub(1);
                    }
                }
                in_expr = true;
                depth = 0;
                run = 0;
                ifs = 0;
                i += 2;
            } else {
                i += 1;
            }
            continue;
        }
        match c {
            b'}' | b'%' if !bare && depth == 0 && next == Some(b'}') => {
                in_expr = false;
                i += 2;
                continue;
            }
            b'\'' | b'"' => {
                // Skip the string literal.
                i += 1;
                while i < b.len() && b[i] != c {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                run = 0;
            }
            b'(' | b'[' | b'{' => {
                depth += 1;
                if depth > MAX_NESTING {
                    return too_deep("brackets");
                }
            }
            b')' | b']' | b'}' => {
                depth = depth.saturating_sub(1);
                run = 0;
            }
            b'-' | b'+' => {
                run += 1;
                if run > MAX_NESTING {
                    return too_deep("prefix operators");
                }
            }
            b' ' | b'\t' | b'\n' | b'\r' => {}
            b'n' if keyword(i, b"not") => {
                run += 1;
                if run > MAX_NESTING {
                    return too_deep("`not`");
                }
                i += 3;
                continue;
            }
            b'i' if keyword(i, b"if") => {
                ifs += 1;
                if ifs > MAX_NESTING {
                    return too_deep("`if`");
                }
                run = 0;
                i += 2;
                continue;
            }
            _ => run = 0,
        }
        i += 1;
    }
    Ok(())
}

/// JSON a template scope is built from: a whole context (`Map`) or one value.
pub trait Json {
    fn template_value(&self) -> MjValue;
}

impl Json for Value {
    fn template_value(&self) -> MjValue {
        from_json(self)
    }
}

impl Json for Map<String, Value> {
    fn template_value(&self) -> MjValue {
        object(self)
    }
}

/// Convert JSON into a template value. As on NoETL's server, a JSON `null` held by a key
/// is *undefined* there: `x | default('d')` gives `'d'`, `{{ x }}` renders empty and
/// `x is defined` is false (a null list element stays `none`).
pub fn to_value<T: Json + ?Sized>(v: &T) -> MjValue {
    v.template_value()
}

/// The context key naming the loop steps whose results are in the context (see
/// [`LoopAggregate`]); never a template variable itself.
pub const LOOPS_KEY: &str = "__mayfly_loops__";

/// The context key holding, by step name, the cache refs a worker fetched for its block:
/// the fetched value still answers [`REF_KEYS`]. Never a template variable itself.
pub const REFS_KEY: &str = "__mayfly_refs__";

fn object(m: &Map<String, Value>) -> MjValue {
    let loops: Vec<&str> = match m.get(LOOPS_KEY) {
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    let refs = m.get(REFS_KEY).and_then(Value::as_object);
    let map: std::collections::BTreeMap<MjValue, MjValue> = m
        .iter()
        .filter(|(k, v)| !v.is_null() && k.as_str() != LOOPS_KEY && k.as_str() != REFS_KEY)
        .map(|(k, v)| {
            let fetched = refs
                .and_then(|r| r.get(k))
                .and_then(Value::as_object)
                .and_then(cache_ref_fields);
            let value = match (v, fetched) {
                (Value::Array(items), _) if loops.contains(&k.as_str()) => {
                    LoopAggregate::value(items)
                }
                (Value::Array(items), Some(fields)) => MjValue::from_object(RefList {
                    items: items.iter().map(from_json).collect(),
                    fields,
                }),
                (Value::Object(o), Some(fields)) => {
                    match object(o).downcast_object::<ResultProxy>() {
                        Some(p) => MjValue::from_object(ResultProxy(p.0.clone(), Some(fields))),
                        None => from_json(v),
                    }
                }
                _ => from_json(v),
            };
            (MjValue::from(k.as_str()), value)
        })
        .collect();
    MjValue::from_object(ResultProxy(map, cache_ref_fields(m)))
}

/// Keys a result held in the shared cache by reference answers without being fetched
/// (NoETL's externalised result: `_ref`, `_size_bytes`, `_store`, and `_count` for a list).
pub const REF_KEYS: &[&str] = &["_ref", "_size_bytes", "_store", "_count"];

/// The `_ref` family of a cache ref (`{"$ref": "sha256:…", "format": …, "bytes": …}`):
/// `_ref` is `mayfly://cache/<format>/<digest>` (an `artifact` task with `action: get`
/// fetches it), `_size_bytes` the stored size, `_store` `cache`, `_count` its elements.
fn cache_ref_fields(
    m: &Map<String, Value>,
) -> Option<std::collections::BTreeMap<&'static str, MjValue>> {
    let digest = m.get("$ref")?.as_str()?;
    let format = m.get("format")?.as_str()?;
    if !digest.starts_with("sha256:") {
        return None;
    }
    let mut f = std::collections::BTreeMap::new();
    let item = match m.get("item").and_then(Value::as_u64) {
        Some(i) => format!("#{i}"),
        None => String::new(),
    };
    f.insert(
        "_ref",
        MjValue::from(format!("mayfly://cache/{format}/{digest}{item}")),
    );
    if let Some(b) = m.get("bytes").and_then(Value::as_u64) {
        f.insert("_size_bytes", MjValue::from(b));
    }
    f.insert("_store", MjValue::from("cache"));
    if let Some(c) = m.get("count").and_then(Value::as_u64) {
        f.insert("_count", MjValue::from(c));
    }
    Some(f)
}

/// A JSON object in templates: a map whose `.result` reads the map itself when it has no
/// `result` key of its own (NoETL's `.result` fall-through: `s.result.k` is `s.k`), without
/// the key appearing in its length, keys or `tojson`.
#[derive(Debug)]
struct ResultProxy(
    std::collections::BTreeMap<MjValue, MjValue>,
    /// For a cache ref: its [`REF_KEYS`] (answered, never listed).
    Option<std::collections::BTreeMap<&'static str, MjValue>>,
);

impl minijinja::value::Object for ResultProxy {
    fn repr(self: &std::sync::Arc<Self>) -> minijinja::value::ObjectRepr {
        minijinja::value::ObjectRepr::Map
    }

    fn get_value(self: &std::sync::Arc<Self>, key: &MjValue) -> Option<MjValue> {
        match self.0.get(key) {
            Some(v) => Some(v.clone()),
            None if key.as_str() == Some("result") => Some(MjValue::from_dyn_object(self.clone())),
            None => self.1.as_ref()?.get(key.as_str()?).cloned(),
        }
    }

    fn enumerate(self: &std::sync::Arc<Self>) -> minijinja::value::Enumerator {
        use minijinja::value::ObjectExt as _;
        self.mapped_enumerator(|this| Box::new(this.0.keys().cloned()))
    }

    fn enumerator_len(self: &std::sync::Arc<Self>) -> Option<usize> {
        Some(self.0.len())
    }
}

/// Element `key` of a list object (a negative index counts from the end, as for lists).
fn index(items: &[MjValue], key: &MjValue) -> Option<MjValue> {
    let i = i64::try_from(key.clone()).ok()?;
    let i = if i < 0 { items.len() as i64 + i } else { i };
    items.get(usize::try_from(i).ok()?).cloned()
}

/// A list a worker fetched from the shared cache: it indexes, iterates and has a length as
/// the list does, and also answers the ref's [`REF_KEYS`].
#[derive(Debug)]
struct RefList {
    items: Vec<MjValue>,
    fields: std::collections::BTreeMap<&'static str, MjValue>,
}

impl minijinja::value::Object for RefList {
    fn repr(self: &std::sync::Arc<Self>) -> minijinja::value::ObjectRepr {
        minijinja::value::ObjectRepr::Seq
    }

    fn get_value(self: &std::sync::Arc<Self>, key: &MjValue) -> Option<MjValue> {
        match key.as_str() {
            Some(k) => self.fields.get(k).cloned(),
            None => index(&self.items, key),
        }
    }

    fn enumerate(self: &std::sync::Arc<Self>) -> minijinja::value::Enumerator {
        minijinja::value::Enumerator::Seq(self.items.len())
    }
}

/// A loop step's result in templates: the list of item results (it indexes, iterates and
/// has a length, as NoETL's Rust runtime's array does) that also answers `.results` (the
/// same list) and `.stats` (`{total, success, failed}`), NoETL's Python runtime's shape.
#[derive(Debug)]
struct LoopAggregate {
    items: Vec<MjValue>,
    stats: MjValue,
}

impl LoopAggregate {
    fn value(items: &[Value]) -> MjValue {
        // A failed item's slot is `{"error": …}` (see the loop fold).
        let failed = items
            .iter()
            .filter(|i| {
                i.as_object()
                    .is_some_and(|o| o.len() == 1 && o.contains_key("error"))
            })
            .count();
        let stats = from_json(&serde_json::json!({
            "total": items.len(),
            "success": items.len() - failed,
            "failed": failed,
        }));
        MjValue::from_object(LoopAggregate {
            items: items.iter().map(from_json).collect(),
            stats,
        })
    }
}

impl minijinja::value::Object for LoopAggregate {
    fn repr(self: &std::sync::Arc<Self>) -> minijinja::value::ObjectRepr {
        minijinja::value::ObjectRepr::Seq
    }

    fn get_value(self: &std::sync::Arc<Self>, key: &MjValue) -> Option<MjValue> {
        match key.as_str() {
            Some("results") => Some(MjValue::from(self.items.clone())),
            Some("stats") => Some(self.stats.clone()),
            Some(_) => None,
            None => index(&self.items, key),
        }
    }

    fn enumerate(self: &std::sync::Arc<Self>) -> minijinja::value::Enumerator {
        minijinja::value::Enumerator::Seq(self.items.len())
    }
}

fn from_json(v: &Value) -> MjValue {
    match v {
        Value::Null => MjValue::from(()),
        Value::Bool(b) => MjValue::from(*b),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => MjValue::from(i),
            (None, Some(u)) => MjValue::from(u),
            _ => MjValue::from(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => MjValue::from(s.as_str()),
        Value::Array(a) => MjValue::from_iter(a.iter().map(from_json)),
        Value::Object(m) => object(m),
    }
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

/// Most items (list elements and map entries, all levels) one rendered value may hold. A
/// lazy value (`[0] * 100000000` repeats a list without allocating) is refused here,
/// before it is materialized.
pub const MAX_RESULT_ITEMS: usize = 1_000_000;

fn to_json(v: &MjValue) -> Result<Value, String> {
    if v.is_undefined() {
        return Ok(Value::Null);
    }
    fn items(v: &MjValue, budget: &mut usize) -> bool {
        use minijinja::value::ValueKind;
        if !matches!(
            v.kind(),
            ValueKind::Seq | ValueKind::Map | ValueKind::Iterable
        ) {
            return true;
        }
        let n = v.len().unwrap_or(0);
        if n > *budget {
            return false;
        }
        *budget -= n;
        match v.try_iter() {
            Ok(it) => it.take(n + 1).all(|k| match v.kind() {
                ValueKind::Map => v.get_item(&k).map(|x| items(&x, budget)).unwrap_or(true),
                _ => items(&k, budget),
            }),
            Err(_) => true,
        }
    }
    let mut budget = MAX_RESULT_ITEMS;
    if !items(v, &mut budget) {
        return Err(format!(
            "{LIMIT_MESSAGE}: the value has more than {MAX_RESULT_ITEMS} items"
        ));
    }
    serde_json::to_value(v).map_err(|e| format!("template produced a value that is not JSON: {e}"))
}

fn describe(e: MjError) -> String {
    if e.kind() == ErrorKind::OutOfFuel {
        return format!(
            "{LIMIT_MESSAGE}: the expression needs more than {TEMPLATE_FUEL} fuel (instructions, or 64 bytes each of data it produces)"
        );
    }
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
        // JSON text is typed back into its value (NoETL), inside a larger text it stays text.
        assert_eq!(t.render_str("{{ m | tojson }}", &c), Ok(json!({"k": "v"})));
        assert_eq!(
            t.render_str("m={{ m | tojson }}", &c),
            Ok(json!("m={\"k\": \"v\"}"))
        );
        assert_eq!(t.render_str("[{{ m.k }}]", &c), Ok(json!("[v]")));
        assert_eq!(t.render_str("[\"{{ m.k }}\"]", &c), Ok(json!(["v"])));
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
