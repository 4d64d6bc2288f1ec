//! The playbook schema: every key mayfly knows, per place. A key outside these lists is an
//! error (with a did-you-mean), and a legacy NoETL key that mayfly does not implement is an
//! error that names the supported alternative. Nothing is accepted and ignored.

/// Top level of a playbook document.
pub const ROOT: &[&str] = &[
    "apiVersion",
    "kind",
    "metadata",
    "workload",
    "keychain",
    "workbook",
    "workflow",
    "executor",
];

/// `metadata:` (descriptive only: nothing here changes what runs).
pub const METADATA: &[&str] = &[
    "name",
    "path",
    "version",
    "description",
    "labels",
    "annotations",
    "tags",
    "author",
    "owner",
];

/// `executor:` (NoETL's runtime requirements).
pub const EXECUTOR: &[&str] = &["profile", "version", "requires"];
pub const EXECUTOR_REQUIRES: &[&str] = &["tools", "features"];

/// A workflow step.
pub const STEP: &[&str] = &[
    "step",
    "when",
    "desc",
    "description",
    "tool",
    "input",
    "set",
    "loop",
    "next",
    "spec",
];

/// A step's `spec:`.
pub const STEP_SPEC: &[&str] = &["timeout", "policy", "next_mode"];
/// A step's `spec.policy:`.
pub const STEP_POLICY: &[&str] = &["rules", "admit"];
/// `spec.policy.admit:`.
pub const ADMIT: &[&str] = &["rules", "mode"];
/// A task's `spec:`.
pub const TASK_SPEC: &[&str] = &["timeout", "policy"];
/// A task's `spec.policy:`.
pub const TASK_POLICY: &[&str] = &["rules", "on_unmatched"];
/// A policy rule (`- when: … then: …` or `- else: {then: …}`).
pub const RULE: &[&str] = &["when", "then", "else", "desc"];
pub const RULE_ELSE: &[&str] = &["then"];
/// A task policy rule's `then:`.
pub const THEN: &[&str] = &[
    "do",
    "attempts",
    "max_attempts",
    "delay",
    "backoff",
    "max_delay",
    "to",
    "set",
];
/// An admission rule's `then:`.
pub const ADMIT_THEN: &[&str] = &["allow", "reason"];

/// `loop:`.
pub const LOOP: &[&str] = &[
    "in",
    "items",
    "iterator",
    "element",
    "spec",
    "mode",
    "concurrency",
];
/// `loop.spec:`.
pub const LOOP_SPEC: &[&str] = &["mode", "max_in_flight"];

/// `next:` as a router mapping.
pub const NEXT: &[&str] = &["spec", "arcs"];
pub const NEXT_SPEC: &[&str] = &["mode"];
/// One arc.
pub const ARC: &[&str] = &["step", "when", "set", "desc"];

/// A root `workbook:` entry.
pub const WORKBOOK: &[&str] = &["name", "tool", "desc", "description"];
/// A `kind: workbook` reference.
pub const WORKBOOK_REF: &[&str] = &["kind", "name", "input"];

/// A root `keychain:` entry: it declares an alias that is resolved from the tenant's keychain.
pub const KEYCHAIN: &[&str] = &["name", "kind", "scope", "description"];

/// Keys every task may carry, whatever its kind.
pub const TASK_COMMON: &[&str] = &[
    "kind",
    "name",
    "desc",
    "description",
    "spec",
    "input",
    "args",
    "auth",
    "timeout",
    "timeout_seconds",
    "set",
    "output_select",
    "output",
];

/// Keys of a tool's `output:` block.
pub const OUTPUT: &[&str] = &["output_select"];

/// Keys of a `transfer` task's `source`.
pub const TRANSFER_SOURCE: &[&str] = &[
    "type",
    "kind",
    "tool",
    "query",
    "auth",
    "connection",
    "connection_string",
    "host",
    "port",
    "database",
    "dbname",
    "user",
    "username",
    "password",
    "url",
    "method",
    "headers",
    "params",
    "data_path",
];

/// Keys of a `transfer` task's `target`.
pub const TRANSFER_TARGET: &[&str] = &[
    "type",
    "kind",
    "tool",
    "table",
    "mapping",
    "key",
    "conflict_columns",
    "auth",
    "connection",
    "connection_string",
    "host",
    "port",
    "database",
    "dbname",
    "user",
    "username",
    "password",
];

/// Keys of each tool kind, beside [`TASK_COMMON`].
pub fn tool_keys(kind: &str) -> &'static [&'static str] {
    match kind {
        "python" => &["code", "code_b64", "code_base64", "script", "libs", "env"],
        "shell" => &["command", "cmds", "cmd", "shell", "cwd", "env"],
        "http" => &[
            "method",
            "url",
            "endpoint",
            "headers",
            "params",
            "query",
            "json",
            "data",
            "form",
            "body",
            "follow_redirects",
            "response_type",
        ],
        "postgres" => &[
            "query",
            "command",
            "sql",
            "params",
            "parameters",
            "connection",
            "connection_string",
            "host",
            "port",
            "database",
            "dbname",
            "user",
            "username",
            "password",
            "schema",
            "as_objects",
        ],
        "duckdb" => &[
            "query",
            "command",
            "commands",
            "sql",
            "params",
            "parameters",
            "db_path",
            "database",
            "db",
            "as_objects",
            "tables",
        ],
        "nats" => &[
            "operation",
            "url",
            "user",
            "password",
            "token",
            "bucket",
            "key",
            "value",
            "pattern",
            "name",
            "data",
            "encoding",
            "description",
            "stream",
            "subject",
            "headers",
            "seq",
            "last",
            "consumer",
            "batch",
            "timeout_ms",
            "ack",
        ],
        "artifact" => &["action", "result_ref", "ref"],
        "transfer" => &["source", "target", "mode", "chunk_size"],
        "playbook" => &[
            "path",
            "version",
            "return_step",
            "return_result",
            "result_step",
        ],
        "noop" => &["result", "message"],
        "wait" | "callback" => &[],
        _ => &[],
    }
}

/// Keys NoETL (or an older mayfly) has that mayfly rejects, with what to write instead.
/// `place` is the schema place (`step`, `tool`, `arc`, …).
pub fn legacy(place: &str, key: &str) -> Option<&'static str> {
    Some(match (place, key) {
        ("root", "vars") => {
            "root `vars` is not part of NoETL v2 (its runtimes never read it); put the values in `workload`"
        }
        ("step", "vars") => {
            "step `vars` is legacy and never read by NoETL's runtime; use `set:` (ctx) or tool `input:`"
        }
        ("step", "case") => "legacy `case` routing is not supported; use `next: {arcs: [...]}`",
        ("step", "args") => "step `args` is not supported; use `input:` on the step or the tool",
        ("step", "tools") => "`tools` is not a step key; write `tool:` (one task or a list)",
        ("step", "output") | ("step", "output_select") => {
            "`output_select` belongs on the tool (`tool: {…, output_select: [paths]}`); a result over the inline budget (16 KiB) goes to the shared cache by reference anyway: `{{ s._ref }}` names it and reading `{{ s }}` fetches it"
        }
        ("output", _) => {
            "of a tool's `output:` block only `output_select` is supported: large results go to mayfly's shared cache by reference (no store tiers, scopes or accumulation to choose)"
        }
        ("step", "sink") | ("step", "save") => {
            "`sink`/`save` blocks were removed from NoETL v2; write to the target with a tool task"
        }
        ("tool", "retry") => {
            "tool-level `retry` is legacy; use `spec.policy.rules: [{when: \"{{ output.status == 'error' }}\", then: {do: retry, attempts: N}}]`"
        }
        ("tool", "python") => {
            "choosing the interpreter per task is not supported; the worker's `python3` runs every python task"
        }
        ("tool", "credentials") => {
            "duckdb `credentials` (secrets for ATTACH) are not supported: DuckDB's extensions are downloaded at run time, which a worker never does; read the rows with a postgres task and hand them in with duckdb `tables:`"
        }
        ("tool", "ttl") => {
            "a per-key `ttl` is not something NATS KV has (NoETL ignores it): give the bucket a `max_age`"
        }
        ("tool", "catalog_id") => "children are named by `path`; `catalog_id` is not supported",
        ("tool", "version") => {
            "`version` names a child playbook's catalog version (`kind: playbook`)"
        }
        ("tool", "payload") => "pass a child's values with `input:`",
        ("tool", "capture") => "shell output is always captured; remove `capture`",
        ("tool", "verify_ssl") => "TLS certificates are always verified; remove `verify_ssl`",
        ("step_spec", "on_error") => {
            "`spec.on_error` is never read by NoETL; route failures with an arc `when: \"{{ event.name == 'call.error' }}\"`"
        }
        ("step_policy", "lifecycle") | ("step_policy", "failure") | ("step_policy", "emit") => {
            "only `spec.policy.rules` and `spec.policy.admit` are supported on a step"
        }
        ("arc", "args") => "arc `args` is legacy; pass values with `set:` on the arc",
        ("arc", "spec") => "arc `spec` is not supported",
        ("loop_spec", "policy") => {
            "`loop.spec.policy` is not supported: where items run is the deployment's choice"
        }
        ("loop_spec", "cursor") | ("loop_spec", "frame") | ("loop", "cursor") => {
            "cursor loops (`mode: cursor`) are not supported; claim rows in a step and loop over them"
        }
        ("next_spec", "on_no_match") => {
            "`on_no_match` is not supported: a branch with no matching arc ends"
        }
        _ => return None,
    })
}

/// The closest known key to `key`, if one is close enough to be a likely typo.
pub fn did_you_mean<'k>(key: &str, known: &[&'k str]) -> Option<&'k str> {
    let limit = (key.chars().count() / 3).max(1);
    known
        .iter()
        .map(|k| (strsim::damerau_levenshtein(key, k), *k))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn did_you_mean_finds_typos_and_not_strangers() {
        assert_eq!(did_you_mean("nxt", STEP), Some("next"));
        assert_eq!(did_you_mean("whne", RULE), Some("when"));
        assert_eq!(
            did_you_mean("timeout_secs", TASK_COMMON),
            Some("timeout_seconds")
        );
        assert_eq!(did_you_mean("tol", STEP), Some("tool"));
        assert_eq!(did_you_mean("zzzzzz", STEP), None);
    }

    #[test]
    fn every_kind_has_its_keys() {
        for k in ["python", "shell", "http", "postgres", "playbook", "noop"] {
            assert!(!tool_keys(k).is_empty(), "{k}");
        }
    }
}
