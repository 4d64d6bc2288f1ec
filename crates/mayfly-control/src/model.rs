//! The pure core of the control plane: manifests, validation, version ids, the authorization
//! decision for a mutation, and the fold of the `control` stream into current objects. No IO.

use mayfly_dsl::{Loc, Node, NodeV};
use mayfly_types::{Event, EventKind};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// `apiVersion` of mayfly's own resource kinds.
pub const API_VERSION: &str = "mayfly.dev/v1";
/// The tenant whose admins administer the platform (cluster-scoped kinds).
pub const SYSTEM_TENANT: &str = "system";

/// Resource kinds of the desired state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Kind {
    Tenant,
    Environment,
    Policy,
    Playbook,
    WorkerPool,
    Rollout,
    ActorTemplate,
    Actor,
}

impl Kind {
    pub const ALL: [Kind; 8] = [
        Kind::Tenant,
        Kind::Environment,
        Kind::Policy,
        Kind::Playbook,
        Kind::WorkerPool,
        Kind::Rollout,
        Kind::ActorTemplate,
        Kind::Actor,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Tenant => "Tenant",
            Kind::Environment => "Environment",
            Kind::Policy => "Policy",
            Kind::Playbook => "Playbook",
            Kind::WorkerPool => "WorkerPool",
            Kind::Rollout => "Rollout",
            Kind::ActorTemplate => "ActorTemplate",
            Kind::Actor => "Actor",
        }
    }

    /// Parse a kind as users type it: `WorkerPool`, `workerpool`, `workerpools`, `wp`.
    pub fn parse(s: &str) -> Option<Kind> {
        let l = s.to_ascii_lowercase();
        let l = l.strip_suffix('s').unwrap_or(&l);
        match l {
            "tenant" => Some(Kind::Tenant),
            "environment" | "env" => Some(Kind::Environment),
            "policy" | "policie" => Some(Kind::Policy),
            "playbook" | "pb" => Some(Kind::Playbook),
            "workerpool" | "wp" => Some(Kind::WorkerPool),
            "rollout" | "ro" => Some(Kind::Rollout),
            "actortemplate" | "template" | "at" => Some(Kind::ActorTemplate),
            "actor" => Some(Kind::Actor),
            _ => None,
        }
    }

    /// Cluster-scoped kinds belong to no tenant; only system admins write them (a Rollout
    /// changes what every tenant's blocks may do on the shared agents).
    pub fn cluster_scoped(self) -> bool {
        matches!(self, Kind::Tenant | Kind::Environment | Kind::Rollout)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Roles of a caller, weakest first (the gateway's roles).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Viewer,
    Operator,
    Author,
    Admin,
}

/// Who asks for a mutation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Caller {
    pub tenant: String,
    pub role: Role,
    /// The token's name (recorded as the actor).
    pub actor: String,
    pub request_id: String,
}

impl Caller {
    /// The `actor` field of the events this caller causes.
    pub fn actor_ref(&self) -> String {
        format!("token:{}@{}", self.actor, self.tenant)
    }
    fn system_admin(&self) -> bool {
        self.tenant == SYSTEM_TENANT && self.role == Role::Admin
    }
}

/// One declared object, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct Manifest {
    pub kind: Kind,
    pub name: String,
    /// The tenant the manifest names (None: the caller's, for tenant-scoped kinds).
    pub tenant: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// The spec as JSON (for a Playbook: `{"path", "digest"}`; its text is in `source`).
    pub spec: Value,
    /// A Playbook's YAML text (registered in the catalog as is).
    pub source: Option<String>,
    /// Where the document starts, for messages.
    pub at: String,
}

/// Manifests that do not validate: every problem, each with file:line:col.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{}", .diagnostics.join("\n"))]
pub struct ManifestError {
    pub diagnostics: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct TenantSpec {
    display_name: Option<String>,
    quotas: Option<Quotas>,
    /// The Environment it runs in: platform policies scoped to that environment apply.
    environment: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Quotas {
    max_running_executions: Option<u32>,
    max_worker_slots: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct EnvironmentSpec {
    description: Option<String>,
}

/// What a Policy governs (evaluation comes with the policy work; the shape is fixed now).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct PolicySpec {
    #[serde(default)]
    scope: PolicyScope,
    tools: Option<AllowList>,
    keychain: Option<AllowList>,
    limits: Option<Limits>,
    /// What tenant code and the tools acting for it may connect to.
    egress: Option<mayfly_types::Egress>,
    /// A workload exception: it lifts restrictions (for `scope.playbook`, until
    /// `expires_at_ms`) instead of imposing any.
    #[serde(default)]
    exception: bool,
    /// Unix ms after which the policy is no longer in force.
    expires_at_ms: Option<u64>,
    /// What each action class does while the control plane is degraded.
    degradation: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct PolicyScope {
    environment: Option<String>,
    tenant: Option<String>,
    /// Only executions of this playbook (catalog path).
    playbook: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AllowList {
    allow: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Limits {
    step_timeout_s: Option<u64>,
    max_attempts: Option<u32>,
    memory_mb: Option<u64>,
    cpu_s: Option<u64>,
    processes: Option<u64>,
    open_files: Option<u64>,
    disk_mb: Option<u64>,
    max_events: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct WorkerPoolSpec {
    slots: u32,
    replicas: Option<u32>,
    queue: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

const TOOL_KINDS: [&str; 11] = [
    "python", "shell", "http", "playbook", "noop", "postgres", "duckdb", "nats", "artifact",
    "transfer", "wait",
];

/// Names: lowercase alphanumerics, `-`, `_`, `.`, `/`; at most 253 characters; start and
/// end alphanumeric (a Playbook's name is its catalog path, e.g. `team/etl`).
pub fn valid_name(s: &str) -> bool {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    !s.is_empty()
        && s.len() <= 253
        && s.chars().next().is_some_and(ok_char)
        && s.chars().last().is_some_and(ok_char)
        && s.chars()
            .all(|c| ok_char(c) || matches!(c, '-' | '_' | '.' | '/'))
}

/// Parse a file of manifests (`---`-separated YAML documents). A NoETL playbook
/// (`apiVersion: noetl.io/v2`, `kind: Playbook`) is a manifest too, alone in its file.
pub fn parse_manifests(file: &str, source: &str) -> Result<Vec<Manifest>, ManifestError> {
    let mut options = serde_saphyr::Options::default();
    options.strict_booleans = true;
    let docs: Vec<Node> =
        serde_saphyr::from_multiple_with_options(source, options).map_err(|e| {
            let loc = e
                .location()
                .map(|l| format!("{}:{}", l.line(), l.column()))
                .unwrap_or_else(|| "1:1".into());
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid YAML");
            ManifestError {
                diagnostics: vec![format!("{file}:{loc}: invalid YAML: {first}")],
            }
        })?;
    let mut out = Vec::new();
    let mut diags = Vec::new();
    let count = docs.iter().filter(|d| !d.is_null()).count();
    for doc in docs.iter().filter(|d| !d.is_null()) {
        match manifest(file, source, doc, count) {
            Ok(m) => out.push(m),
            Err(d) => diags.extend(d),
        }
    }
    if diags.is_empty() {
        Ok(out)
    } else {
        Err(ManifestError { diagnostics: diags })
    }
}

fn at(file: &str, loc: Loc) -> String {
    format!("{file}:{}:{}", loc.line, loc.col)
}

fn manifest(file: &str, source: &str, doc: &Node, docs: usize) -> Result<Manifest, Vec<String>> {
    let here = at(file, doc.loc);
    let Some(entries) = doc.as_map() else {
        return Err(vec![format!(
            "{here}: a manifest must be a mapping, got {}",
            doc.type_name()
        )]);
    };
    let api = doc.get("apiVersion").and_then(Node::as_str);
    let kind_node = doc.get("kind");
    let kind_str = kind_node.and_then(Node::as_str).unwrap_or_default();
    if api == Some("noetl.io/v2") && kind_str == "Playbook" {
        if docs != 1 {
            return Err(vec![format!(
                "{here}: a playbook must be alone in its file (it is registered as written)"
            )]);
        }
        let pb =
            mayfly_dsl::parse(file, source, &mayfly_dsl::ParseOptions::default()).map_err(|e| {
                e.diagnostics
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
            })?;
        let labels = labels(file, doc.get("metadata").and_then(|m| m.get("labels")))?;
        let tenant = doc
            .get("metadata")
            .and_then(|m| m.get("tenant"))
            .and_then(Node::as_str)
            .map(str::to_owned);
        return Ok(Manifest {
            kind: Kind::Playbook,
            name: pb.path.clone(),
            tenant,
            labels,
            spec: serde_json::json!({"path": pb.path, "digest": pb.digest}),
            source: Some(source.to_owned()),
            at: here,
        });
    }
    let mut diags = Vec::new();
    if api != Some(API_VERSION) {
        let loc = doc.get("apiVersion").map_or(doc.loc, |n| n.loc);
        diags.push(format!(
            "{}: `apiVersion` must be `{API_VERSION}` (or `noetl.io/v2` for a playbook)",
            at(file, loc)
        ));
    }
    let kind = match Kind::parse(kind_str).filter(|k| k.as_str() == kind_str) {
        Some(Kind::Playbook) | None => {
            let loc = kind_node.map_or(doc.loc, |n| n.loc);
            diags.push(format!(
                "{}: unknown kind `{kind_str}` (Tenant, Environment, Policy, WorkerPool, Rollout; a Playbook is a NoETL document)",
                at(file, loc)
            ));
            None
        }
        k => k,
    };
    for (k, loc, _) in entries {
        if !matches!(k.as_str(), "apiVersion" | "kind" | "metadata" | "spec") {
            diags.push(format!(
                "{}: unknown field `{k}` (apiVersion, kind, metadata, spec)",
                at(file, *loc)
            ));
        }
    }
    let meta = doc.get("metadata");
    let name = meta.and_then(|m| m.get("name"));
    let name_str = name.and_then(Node::as_str).unwrap_or_default().to_owned();
    if !valid_name(&name_str) {
        let loc = name.or(meta).map_or(doc.loc, |n| n.loc);
        diags.push(format!(
            "{}: `metadata.name` must be a lowercase name (a-z, 0-9, `-`, `_`, `.`), got `{name_str}`",
            at(file, loc)
        ));
    }
    let mut tenant = None;
    if let Some(m) = meta {
        for (k, loc, v) in m.as_map().unwrap_or_default() {
            match k.as_str() {
                "name" | "labels" => {}
                "tenant" => match v.as_str() {
                    Some(t) if !t.is_empty() => tenant = Some(t.to_owned()),
                    _ => diags.push(format!(
                        "{}: `metadata.tenant` must be a name",
                        at(file, v.loc)
                    )),
                },
                _ => diags.push(format!(
                    "{}: unknown field `metadata.{k}` (name, tenant, labels)",
                    at(file, *loc)
                )),
            }
        }
    }
    let labels = match labels(file, meta.and_then(|m| m.get("labels"))) {
        Ok(l) => l,
        Err(d) => {
            diags.extend(d);
            BTreeMap::new()
        }
    };
    let spec_node = doc.get("spec");
    let spec = spec_node.map_or(Value::Object(Map::new()), Node::to_json);
    if let Some(kind) = kind {
        if kind.cluster_scoped() && tenant.is_some() {
            diags.push(format!(
                "{here}: {kind} is cluster-scoped: it takes no `metadata.tenant`"
            ));
        }
        let spec_at = at(file, spec_node.map_or(doc.loc, |n| n.loc));
        if let Err(e) = check_spec(kind, &spec) {
            diags.push(format!("{spec_at}: {kind} `{name_str}`: spec: {e}"));
        }
        if kind == Kind::Actor
            && let Err(e) = crate::dataplane::check_actor_name(&name_str)
        {
            diags.push(format!("{here}: {e}"));
        }
    }
    match (kind, diags.is_empty()) {
        (Some(kind), true) => Ok(Manifest {
            kind,
            name: name_str,
            tenant,
            labels,
            spec,
            source: None,
            at: here,
        }),
        _ => Err(diags),
    }
}

fn labels(file: &str, n: Option<&Node>) -> Result<BTreeMap<String, String>, Vec<String>> {
    let Some(n) = n else {
        return Ok(BTreeMap::new());
    };
    let Some(entries) = n.as_map() else {
        return Err(vec![format!(
            "{}: `metadata.labels` must be a mapping of strings",
            at(file, n.loc)
        )]);
    };
    let mut out = BTreeMap::new();
    let mut diags = Vec::new();
    for (k, _, v) in entries {
        match &v.v {
            NodeV::Str(s) => {
                out.insert(k.clone(), s.clone());
            }
            _ => diags.push(format!(
                "{}: label `{k}` must be a string, got {}",
                at(file, v.loc),
                v.type_name()
            )),
        }
    }
    if diags.is_empty() {
        Ok(out)
    } else {
        Err(diags)
    }
}

fn check_spec(kind: Kind, spec: &Value) -> Result<(), String> {
    // Errors name the field path inside the spec (`target.zone: unknown field …`).
    fn typed<T: for<'de> Deserialize<'de>>(spec: &Value) -> Result<T, String> {
        serde_path_to_error::deserialize(spec).map_err(|e| {
            let path = e.path().to_string();
            if path == "." {
                e.inner().to_string()
            } else {
                format!("{path}: {}", e.inner())
            }
        })
    }
    match kind {
        Kind::Tenant => typed::<TenantSpec>(spec).map(drop),
        Kind::Environment => typed::<EnvironmentSpec>(spec).map(drop),
        Kind::WorkerPool => {
            let w: WorkerPoolSpec = typed(spec)?;
            if w.slots == 0 {
                return Err("`slots` must be at least 1".into());
            }
            Ok(())
        }
        Kind::Policy => {
            let p: PolicySpec = typed(spec)?;
            if p.exception && (p.scope.playbook.is_none() || p.expires_at_ms.is_none()) {
                return Err(
                    "an exception is time-bound and for one workload: it needs `scope.playbook` and `expires_at_ms`"
                        .into(),
                );
            }
            for (class, rule) in p.degradation.iter().flatten() {
                let privileged = match ActionClass::parse(class) {
                    Some(c) => c.privileged(),
                    None => {
                        return Err(format!(
                            "`degradation` names an unknown action class `{class}` (read, execute, write)"
                        ));
                    }
                };
                match rule.as_str() {
                    "fail_closed" => {}
                    "fail_open" if privileged => {
                        return Err(format!(
                            "`degradation.{class}`: privileged actions fail closed; only `read` may fail open"
                        ));
                    }
                    "fail_open" => {}
                    other => {
                        return Err(format!(
                            "`degradation.{class}` must be `fail_open` or `fail_closed`, got `{other}`"
                        ));
                    }
                }
            }
            if let Some(e) = &p.egress {
                mayfly_types::egress::validate(std::slice::from_ref(e))
                    .map_err(|m| format!("egress: {m}"))?;
            }
            if let Some(t) = &p.tools
                && let Some(bad) = t.allow.iter().find(|k| !TOOL_KINDS.contains(&k.as_str()))
            {
                return Err(format!(
                    "`tools.allow` names an unknown tool kind `{bad}` ({})",
                    TOOL_KINDS.join(", ")
                ));
            }
            Ok(())
        }
        Kind::Rollout => typed::<crate::rollout::RolloutSpec>(spec)?.check(),
        Kind::ActorTemplate => typed::<crate::dataplane::ActorTemplateSpec>(spec)?.check(),
        Kind::Actor => typed::<crate::dataplane::ActorObjectSpec>(spec).map(drop),
        Kind::Playbook => Ok(()),
    }
}

/// The identity of an object: kind, tenant (None for cluster-scoped kinds) and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ObjectKey {
    pub kind: Kind,
    pub tenant: Option<String>,
    pub name: String,
}

impl Manifest {
    /// The key this manifest writes when `caller` applies it.
    pub fn key(&self, caller: &Caller) -> ObjectKey {
        let tenant = if self.kind.cluster_scoped() {
            None
        } else {
            Some(self.tenant.clone().unwrap_or_else(|| caller.tenant.clone()))
        };
        ObjectKey {
            kind: self.kind,
            tenant,
            name: self.name.clone(),
        }
    }

    /// The immutable version id of this content: a Playbook's catalog digest, else the
    /// sha256 of the canonical JSON (RFC 8785) of kind, tenant, name, labels and spec — the
    /// same content gives the same version whatever its YAML spelling or key order.
    pub fn version(&self, key: &ObjectKey) -> String {
        if self.kind == Kind::Playbook
            && let Some(d) = self.spec.get("digest").and_then(Value::as_str)
        {
            return d.to_owned();
        }
        let doc = serde_json::json!({
            "kind": key.kind,
            "tenant": key.tenant,
            "name": key.name,
            "labels": self.labels,
            "spec": self.spec,
        });
        // Plain JSON values always canonicalize.
        mayfly_trust::digest_of(&doc).unwrap_or_default()
    }
}

/// The verdict on one mutation, with the reason recorded in the audit either way.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub allowed: bool,
    pub reason: String,
}

/// Decide whether `caller` may write `key`. Pure and total: every refusal says why.
pub fn authorize(caller: &Caller, key: &ObjectKey) -> Decision {
    let deny = |reason: String| Decision {
        allowed: false,
        reason,
    };
    if key.kind.cluster_scoped() {
        return if caller.system_admin() {
            Decision {
                allowed: true,
                reason: format!("admin of the `{SYSTEM_TENANT}` tenant"),
            }
        } else {
            deny(format!(
                "{} objects are cluster-scoped: only an admin of the `{SYSTEM_TENANT}` tenant may write them",
                key.kind
            ))
        };
    }
    let target = key.tenant.as_deref().unwrap_or_default();
    if target != caller.tenant && !caller.system_admin() {
        return deny(format!(
            "cross-tenant: a caller of tenant `{}` may not write objects of tenant `{target}`",
            caller.tenant
        ));
    }
    let need = match key.kind {
        Kind::Policy => Role::Admin,
        _ => Role::Author,
    };
    if caller.role < need && !caller.system_admin() {
        return deny(format!(
            "writing a {} needs the {need:?} role (caller has {:?})",
            key.kind, caller.role
        ));
    }
    Decision {
        allowed: true,
        reason: format!("{:?} of tenant `{}`", caller.role, caller.tenant),
    }
}

/// Payload of `object.applied`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Applied {
    pub key: ObjectKey,
    pub version: String,
    /// Desired generation: 1 on creation, +1 per change.
    pub generation: u64,
    /// The version this one replaced (None: created).
    pub before: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub spec: Value,
    pub decision: Decision,
    /// The policy set in effect for the object's tenant when this was decided.
    pub policy_version: Option<String>,
    /// Catalog version, for a Playbook.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catalog_version: Option<u32>,
}

/// Payload of `object.denied`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Denied {
    pub key: ObjectKey,
    /// The version the refused content would have had.
    pub attempted: String,
    /// The version in place, unchanged (None: none).
    pub current: Option<String>,
    pub decision: Decision,
    pub policy_version: Option<String>,
}

/// One change of an object, as the history shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Revision {
    pub generation: u64,
    pub version: String,
    pub before: Option<String>,
    /// Position of the change in the `control` stream (its audit record).
    pub seq: u64,
    pub at: u64,
    pub actor: String,
    pub request_id: Option<String>,
    pub policy_version: Option<String>,
}

/// Reconciliation phase: Pending, Progressing and Degraded are non-terminal; Ready and
/// Failed terminal (for the current generation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    Pending,
    Progressing,
    Degraded,
    Ready,
    Failed,
}

impl Phase {
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Ready | Phase::Failed)
    }
}

/// A condition of an object's status, with a machine-readable reason.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Condition {
    #[serde(rename = "type")]
    pub kind: String,
    pub status: bool,
    pub reason: String,
    pub message: String,
}

/// What the control plane observes of an object against what is desired.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub phase: Phase,
    pub desired_generation: u64,
    pub observed_generation: u64,
    pub conditions: Vec<Condition>,
}

/// An object as it currently stands, with its history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Object {
    pub key: ObjectKey,
    pub version: String,
    pub generation: u64,
    pub labels: BTreeMap<String, String>,
    pub spec: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catalog_version: Option<u32>,
    pub revisions: Vec<Revision>,
}

impl Object {
    /// The status of kinds whose desired state takes effect when stored (Tenant,
    /// Environment, Policy; a Playbook once the catalog holds the version): Ready at their
    /// current generation. [`ControlState::status_of`] covers the observed kinds.
    pub fn status(&self) -> Status {
        let (phase, observed, condition) = match self.key.kind {
            Kind::Playbook => (
                Phase::Ready,
                self.generation,
                Condition {
                    kind: "Registered".into(),
                    status: true,
                    reason: "InCatalog".into(),
                    message: format!(
                        "catalog version {} holds {}",
                        self.catalog_version.unwrap_or_default(),
                        self.version
                    ),
                },
            ),
            _ => (
                Phase::Ready,
                self.generation,
                Condition {
                    kind: "Accepted".into(),
                    status: true,
                    reason: "Stored".into(),
                    message: "validated and stored; effective as stored".into(),
                },
            ),
        };
        Status {
            phase,
            desired_generation: self.generation,
            observed_generation: observed,
            conditions: vec![condition],
        }
    }
}

/// The `control` stream folded: current objects, bundles, transitions, agents' recorded
/// reports, the chain's head, counts.
#[derive(Clone, Debug, Default)]
pub struct ControlState {
    pub objects: BTreeMap<ObjectKey, Object>,
    /// Published policy bundles by digest.
    pub bundles: BTreeMap<String, mayfly_trust::sign::Signed>,
    /// Transitions (rollouts) by id.
    pub transitions: BTreeMap<String, crate::rollout::Transition>,
    /// Each agent's last recorded report (applied bundle or refusal).
    pub agents: BTreeMap<String, crate::rollout::AgentRecord>,
    /// Last seq of the stream (0: empty).
    pub seq: u64,
    pub last_hash: String,
    pub denied: u64,
    /// The seq range this fold did not see because it was compacted (taken from a snapshot).
    pub compacted: Option<(u64, u64)>,
    /// Actor dataplane: enrolled providers by id.
    pub providers: BTreeMap<String, crate::dataplane::ProviderRecord>,
    /// Actor dataplane: workers by id.
    pub workers: BTreeMap<String, crate::dataplane::WorkerRecord>,
    /// Actor dataplane: observed actors by `tenant/name`.
    pub actors: BTreeMap<String, crate::dataplane::ActorRecord>,
    /// Actor dataplane: signed snapshots by descriptor digest.
    pub snapshots: BTreeMap<String, crate::dataplane::SnapshotRecord>,
    /// Actor dataplane: each template's golden snapshot (`dataplane::golden_key` → digest).
    pub goldens: BTreeMap<String, String>,
}

/// Payload of `control.snapshot`: the whole folded state through `through_seq`, so the
/// records it summarizes can be compacted and a view that missed them can bootstrap.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub through_seq: u64,
    /// The hash of record `through_seq` (an archive of the compacted records verifies
    /// against it).
    pub head_hash: String,
    pub objects: Vec<Object>,
    pub bundles: BTreeMap<String, mayfly_trust::sign::Signed>,
    pub transitions: BTreeMap<String, crate::rollout::Transition>,
    pub agents: BTreeMap<String, crate::rollout::AgentRecord>,
    pub denied: u64,
    #[serde(default)]
    pub providers: BTreeMap<String, crate::dataplane::ProviderRecord>,
    #[serde(default)]
    pub workers: BTreeMap<String, crate::dataplane::WorkerRecord>,
    #[serde(default)]
    pub actors: BTreeMap<String, crate::dataplane::ActorRecord>,
    #[serde(default)]
    pub snapshots: BTreeMap<String, crate::dataplane::SnapshotRecord>,
    #[serde(default)]
    pub goldens: BTreeMap<String, String>,
}

impl Snapshot {
    /// The snapshot of `st` as folded so far.
    pub fn of(st: &ControlState) -> Snapshot {
        Snapshot {
            through_seq: st.seq,
            head_hash: if st.seq == 0 {
                mayfly_types::GENESIS_HASH.to_owned()
            } else {
                st.last_hash.clone()
            },
            objects: st.objects.values().cloned().collect(),
            bundles: st.bundles.clone(),
            transitions: st.transitions.clone(),
            agents: st.agents.clone(),
            denied: st.denied,
            providers: st.providers.clone(),
            workers: st.workers.clone(),
            actors: st.actors.clone(),
            snapshots: st.snapshots.clone(),
            goldens: st.goldens.clone(),
        }
    }

    fn into_state(self) -> ControlState {
        ControlState {
            objects: self
                .objects
                .into_iter()
                .map(|o| (o.key.clone(), o))
                .collect(),
            bundles: self.bundles,
            transitions: self.transitions,
            agents: self.agents,
            seq: self.through_seq,
            last_hash: self.head_hash,
            denied: self.denied,
            compacted: None,
            providers: self.providers,
            workers: self.workers,
            actors: self.actors,
            snapshots: self.snapshots,
            goldens: self.goldens,
        }
    }
}

/// A control event that does not fold.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("control event #{seq} ({kind}): {reason}")]
pub struct FoldError {
    pub seq: u64,
    pub kind: String,
    pub reason: String,
}

impl ControlState {
    /// Fold one event of the `control` stream (in seq order).
    pub fn apply(&mut self, e: &Event) -> Result<(), FoldError> {
        let fail = |reason: String| FoldError {
            seq: e.seq,
            kind: e.kind.to_string(),
            reason,
        };
        // A snapshot may follow a gap: the records it summarizes were compacted away, and a
        // fold that had not seen them takes the snapshot as its base (bootstrap).
        let bootstrap = e.kind == EventKind::ControlSnapshot && e.seq > self.seq + 1;
        if e.seq != self.seq + 1 && !bootstrap {
            return Err(fail(format!("expected seq {}", self.seq + 1)));
        }
        // The fold is the chain's verifier too: whoever folds (the appender, every view)
        // refuses a record that does not link or whose hash does not match.
        let prev = if self.seq == 0 {
            mayfly_types::GENESIS_HASH
        } else {
            self.last_hash.as_str()
        };
        if e.prev_hash != prev && !bootstrap {
            return Err(fail(
                "prev_hash does not link to the previous record".into(),
            ));
        }
        match mayfly_trust::event_hash(e) {
            Ok(h) if h == e.hash => {}
            _ => return Err(fail("hash mismatch (the record was altered)".into())),
        }
        match e.kind {
            EventKind::ObjectApplied => {
                let a = Applied::deserialize(&e.payload)
                    .map_err(|err| fail(format!("bad payload: {err}")))?;
                let rev = Revision {
                    generation: a.generation,
                    version: a.version.clone(),
                    before: a.before.clone(),
                    seq: e.seq,
                    at: e.at,
                    actor: e.actor.clone(),
                    request_id: e.request_id.clone(),
                    policy_version: a.policy_version.clone(),
                };
                let obj = self.objects.entry(a.key.clone()).or_insert_with(|| Object {
                    key: a.key.clone(),
                    version: String::new(),
                    generation: 0,
                    labels: BTreeMap::new(),
                    spec: Value::Null,
                    catalog_version: None,
                    revisions: Vec::new(),
                });
                if a.generation != obj.generation + 1 {
                    return Err(fail(format!(
                        "generation {} does not follow {}",
                        a.generation, obj.generation
                    )));
                }
                obj.version = a.version;
                obj.generation = a.generation;
                obj.labels = a.labels;
                obj.spec = a.spec;
                obj.catalog_version = a.catalog_version;
                obj.revisions.push(rev);
            }
            EventKind::ObjectDenied => {
                Denied::deserialize(&e.payload)
                    .map_err(|err| fail(format!("bad payload: {err}")))?;
                self.denied += 1;
            }
            EventKind::BundlePublished => {
                let p = crate::rollout::Published::deserialize(&e.payload)
                    .map_err(|err| fail(format!("bad payload: {err}")))?;
                if self.bundles.contains_key(&p.bundle.digest) {
                    return Err(fail(format!("bundle {} published twice", p.bundle.digest)));
                }
                self.bundles.insert(p.bundle.digest.clone(), p.bundle);
            }
            EventKind::TransitionChanged => {
                let c = crate::rollout::TransitionChanged::deserialize(&e.payload)
                    .map_err(|err| fail(format!("bad payload: {err}")))?;
                self.fold_transition(c, e.seq, e.at).map_err(fail)?;
            }
            EventKind::AgentReported => {
                let r = crate::rollout::AgentRecord::deserialize(&e.payload)
                    .map_err(|err| fail(format!("bad payload: {err}")))?;
                self.agents.insert(r.agent.clone(), r);
            }
            EventKind::ProviderRegistered => {
                let p = crate::dataplane::ProviderRecord::deserialize(&e.payload)
                    .map_err(|err| fail(format!("bad payload: {err}")))?;
                self.fold_provider(p).map_err(fail)?;
            }
            EventKind::WorkerChanged => {
                let w = crate::dataplane::WorkerRecord::deserialize(&e.payload)
                    .map_err(|err| fail(format!("bad payload: {err}")))?;
                self.fold_worker(w).map_err(fail)?;
            }
            EventKind::ActorChanged => {
                let a = crate::dataplane::ActorRecord::deserialize(&e.payload)
                    .map_err(|err| fail(format!("bad payload: {err}")))?;
                self.fold_actor(a).map_err(fail)?;
            }
            EventKind::SnapshotRecorded => {
                let s = crate::dataplane::SnapshotRecord::deserialize(&e.payload)
                    .map_err(|err| fail(format!("bad payload: {err}")))?;
                self.fold_snapshot(s).map_err(fail)?;
            }
            EventKind::ControlSnapshot => {
                let snap = Snapshot::deserialize(&e.payload)
                    .map_err(|err| fail(format!("bad payload: {err}")))?;
                if snap.through_seq + 1 != e.seq || snap.head_hash != e.prev_hash {
                    return Err(fail(
                        "the snapshot does not name the record it follows".into(),
                    ));
                }
                if bootstrap {
                    let compacted_from = self.seq + 1;
                    *self = snap.into_state();
                    self.compacted = Some((compacted_from, e.seq - 1));
                } else if Snapshot::of(self) != snap {
                    // Whoever follows the stream checks that the summary is true.
                    return Err(fail(
                        "the snapshot does not match the records it summarizes".into(),
                    ));
                }
            }
            k => return Err(fail(format!("`{k}` does not belong in the control stream"))),
        }
        self.seq = e.seq;
        self.last_hash = e.hash.clone();
        Ok(())
    }

    /// The version of the policy set in effect for `tenant`: the digest of the (name,
    /// version) pairs of every Policy that applies to it (its own, and those scoped to no
    /// tenant), or None when there is none.
    pub fn policy_version(&self, tenant: Option<&str>) -> Option<String> {
        // Cluster-scoped objects answer to the platform's unscoped policies only.
        let set: Vec<(&str, &str)> = self
            .policies_for(tenant.unwrap_or_default())
            .map(|o| (o.key.name.as_str(), o.version.as_str()))
            .collect();
        if set.is_empty() {
            return None;
        }
        mayfly_trust::digest_of(&set).ok()
    }
}

/// An object with its status, as reads return it.
#[derive(Clone, Debug, Serialize)]
pub struct ObjectView {
    #[serde(flatten)]
    pub object: Object,
    pub status: Status,
}

/// What a caller may read: the system tenant sees everything; others see their tenant's
/// objects, every Environment, and their own Tenant object.
pub fn visible(caller: &Caller, key: &ObjectKey) -> bool {
    if caller.tenant == SYSTEM_TENANT {
        return true;
    }
    match key.kind {
        Kind::Environment => true,
        Kind::Tenant => key.name == caller.tenant,
        _ => key.tenant.as_deref() == Some(caller.tenant.as_str()),
    }
}

impl ControlState {
    /// Objects of `kind` visible to `caller` (one, with `name`), with status.
    pub fn objects_of(&self, caller: &Caller, kind: Kind, name: Option<&str>) -> Vec<ObjectView> {
        self.objects
            .values()
            .filter(|o| o.key.kind == kind && name.is_none_or(|n| o.key.name == n))
            .filter(|o| visible(caller, &o.key))
            .map(|o| ObjectView {
                object: o.clone(),
                status: self.status_of(o),
            })
            .collect()
    }

    /// One object visible to `caller`, with status: `tenant`'s when given, else the first
    /// (a system caller may see objects of that name in several tenants).
    pub fn object_of(
        &self,
        caller: &Caller,
        kind: Kind,
        name: &str,
        tenant: Option<&str>,
    ) -> Option<ObjectView> {
        self.objects_of(caller, kind, Some(name))
            .into_iter()
            .find(|o| tenant.is_none() || o.object.key.tenant.as_deref() == tenant)
    }

    /// Every revision of one object (oldest first), if visible to `caller`.
    pub fn history_of(&self, caller: &Caller, kind: Kind, name: &str) -> Option<Vec<Revision>> {
        self.object_of(caller, kind, name, None)
            .map(|o| o.object.revisions)
    }
}

/// The stable reason of a block/execution admission decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdmissionDecision {
    Accepted,
    /// The dispatch backlog is at its limit: try again later.
    QueueSaturated,
    /// The tenant runs as many executions as its Tenant object allows.
    TenantQuota,
    /// A policy in force for the tenant does not allow what the playbook uses.
    PolicyDenied,
    /// This node does not append (a replica).
    NotLeader,
    /// This node was the appender, but another process took over the log (fencing epoch).
    EpochMismatch,
}

impl AdmissionDecision {
    pub fn as_str(self) -> &'static str {
        match self {
            AdmissionDecision::Accepted => "accepted",
            AdmissionDecision::QueueSaturated => "queue_saturated",
            AdmissionDecision::TenantQuota => "tenant_quota",
            AdmissionDecision::PolicyDenied => "policy_denied",
            AdmissionDecision::NotLeader => "not_leader",
            AdmissionDecision::EpochMismatch => "epoch_mismatch",
        }
    }
}

/// One policy's part in an evaluation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExplainStep {
    /// `owner/name` of the policy.
    pub policy: String,
    /// `platform` (the system tenant's), `environment` (the platform's, scoped to the tenant's
    /// Environment), `tenant`, or `workload` (scoped to one playbook).
    pub layer: String,
    pub version: String,
    /// What it did: allows, denies …, lifts …, not in force …
    pub outcome: String,
}

/// How the policies in force judge a request, layer by layer (`mayfly policy explain`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Explanation {
    pub allowed: bool,
    pub reason: String,
    /// The policy that decided a refusal.
    pub decided_by: Option<String>,
    pub steps: Vec<ExplainStep>,
    pub policy_version: Option<String>,
    /// The tightest step budgets of the policies in force (each layer can only narrow).
    pub limits: mayfly_types::Limits,
    /// Each layer's version (layers are versioned independently).
    pub layers: Vec<LayerVersion>,
    /// The Environment of the tenant, whose environment layer applies.
    pub environment: Option<String>,
}

/// An admission decision with its reason and the policy version it was decided under.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Admission {
    pub decision: AdmissionDecision,
    pub reason: String,
    pub policy_version: Option<String>,
    /// Step budgets the execution runs under (None: no policy sets any).
    pub limits: Option<mayfly_types::Limits>,
}

/// What is asked to run, and the load it would join.
#[derive(Clone, Debug, Default)]
pub struct AdmissionRequest {
    pub tenant: String,
    /// The playbook's catalog path (workload-scoped policies and exceptions match it).
    pub playbook: String,
    /// Evaluation time (unix ms): expiry is decided against it, so evaluation stays pure.
    pub now_ms: u64,
    pub tools: BTreeSet<String>,
    pub aliases: BTreeSet<String>,
    /// Some keychain alias is chosen by a template at run time.
    pub templated_auth: bool,
    /// The tenant's executions now pending or running.
    pub running: u64,
    pub pending_publishes: u64,
    /// Backlog beyond which new work is refused (`queue_saturated`).
    pub max_pending_publishes: u64,
}

impl ControlState {
    /// Decide whether a new execution may start. Pure and deterministic: policies first
    /// (each policy in force can only narrow what is allowed — an allow-list of every
    /// layer must admit each tool kind and keychain alias), then the tenant's quota, then
    /// the dispatch backlog.
    pub fn admit(&self, req: &AdmissionRequest) -> Admission {
        let policy_version = self.policy_version(Some(&req.tenant));
        let ex = self.explain(req);
        let limits = (ex.limits != mayfly_types::Limits::default()).then_some(ex.limits);
        let verdict = |decision, reason: String| Admission {
            decision,
            reason,
            policy_version: policy_version.clone(),
            limits,
        };
        if !ex.allowed {
            return verdict(AdmissionDecision::PolicyDenied, ex.reason);
        }
        let quota = self
            .objects
            .get(&ObjectKey {
                kind: Kind::Tenant,
                tenant: None,
                name: req.tenant.clone(),
            })
            .and_then(|t| t.spec.pointer("/quotas/max_running_executions"))
            .and_then(Value::as_u64);
        if let Some(max) = quota
            && req.running >= max
        {
            return verdict(
                AdmissionDecision::TenantQuota,
                format!(
                    "tenant `{}` runs {} executions, its quota is {max}",
                    req.tenant, req.running
                ),
            );
        }
        if req.pending_publishes >= req.max_pending_publishes {
            return verdict(
                AdmissionDecision::QueueSaturated,
                format!(
                    "{} blocks are waiting to be dispatched (limit {})",
                    req.pending_publishes, req.max_pending_publishes
                ),
            );
        }
        verdict(
            AdmissionDecision::Accepted,
            "within policy, quota and capacity".into(),
        )
    }

    /// Evaluate the policies that apply to `req` — platform layer, then the tenant's, each
    /// owner's workload-scoped ones after its unscoped ones — deterministically, recording
    /// what each did. Restrictions only narrow: every allow-list must admit every tool kind
    /// and keychain alias. A time-bound workload exception (`exception: true`) lifts what its
    /// own level and the levels below it deny: a platform exception any denial, a tenant's
    /// only its own tenant's. Expired policies are listed, not applied.
    pub fn explain(&self, req: &AdmissionRequest) -> Explanation {
        let layer_of = |p: &Object| {
            let platform = p.key.tenant.as_deref() == Some(SYSTEM_TENANT);
            (platform, layer(p))
        };
        let name_of =
            |p: &Object| format!("{}/{}", p.key.tenant.as_deref().unwrap_or("-"), p.key.name);
        let mut steps = Vec::new();
        let mut in_force: Vec<&Object> = Vec::new();
        for p in self.policies_for(&req.tenant) {
            let scoped = p.spec.pointer("/scope/playbook").and_then(Value::as_str);
            if scoped.is_some_and(|s| s != req.playbook) {
                continue;
            }
            if let Some(t) = p.spec.get("expires_at_ms").and_then(Value::as_u64)
                && t <= req.now_ms
            {
                steps.push(ExplainStep {
                    policy: name_of(p),
                    layer: layer_of(p).1.into(),
                    version: p.version.clone(),
                    outcome: format!("not in force: expired at {t}"),
                });
                continue;
            }
            in_force.push(p);
        }
        let is_exception =
            |p: &Object| p.spec.get("exception").and_then(Value::as_bool) == Some(true);
        // The exception that lifts `item` of `list` denied at a platform (or tenant) level.
        let lifted_by = |list: &str, item: &str, platform_level: bool| {
            in_force.iter().find_map(|e| {
                let lifts = is_exception(e)
                    && allow_list(&e.spec, list).is_some_and(|a| a.contains(item))
                    && (layer_of(e).0 || !platform_level);
                lifts.then(|| {
                    format!(
                        "{} until {}",
                        name_of(e),
                        e.spec
                            .get("expires_at_ms")
                            .and_then(Value::as_u64)
                            .unwrap_or(0)
                    )
                })
            })
        };
        let mut refusal: Option<(String, String)> = None;
        let mut limits = mayfly_types::Limits::default();
        for p in in_force.iter().copied() {
            if !is_exception(p)
                && let Some(l) = p.spec.get("limits")
            {
                let n = |k: &str| l.get(k).and_then(Value::as_u64);
                limits = limits.narrow(mayfly_types::Limits {
                    step_timeout_s: n("step_timeout_s"),
                    max_attempts: n("max_attempts").map(|a| a.min(u64::from(u32::MAX)) as u32),
                    memory_mb: n("memory_mb"),
                    cpu_s: n("cpu_s"),
                    processes: n("processes"),
                    open_files: n("open_files"),
                    disk_mb: n("disk_mb"),
                    max_events: n("max_events"),
                    egress: Vec::new(),
                });
            }
            if !is_exception(p)
                && let Some(e) = p.spec.get("egress")
                && let Ok(e) = serde_json::from_value::<mayfly_types::Egress>(e.clone())
            {
                limits = limits.narrow(mayfly_types::Limits {
                    egress: vec![e],
                    ..mayfly_types::Limits::default()
                });
            }
            let (platform, layer) = layer_of(p);
            let name = name_of(p);
            let mut notes = Vec::new();
            let mut denied = None;
            if is_exception(p) {
                notes.push("exception: lifts what it lists".to_owned());
            } else {
                for (list, what, items) in [
                    ("/tools/allow", "tool kind", &req.tools),
                    ("/keychain/allow", "keychain alias", &req.aliases),
                ] {
                    let Some(allow) = allow_list(&p.spec, list) else {
                        continue;
                    };
                    if list == "/keychain/allow" && req.templated_auth && denied.is_none() {
                        denied = Some(
                            "restricts keychain aliases and the playbook chooses one by template (fail closed)"
                                .to_owned(),
                        );
                    }
                    for item in items.iter().filter(|i| !allow.contains(i.as_str())) {
                        match lifted_by(list, item, platform) {
                            Some(by) => notes
                                .push(format!("denies {what} `{item}`, lifted by exception {by}")),
                            None if denied.is_none() => {
                                denied = Some(format!("does not allow {what} `{item}`"));
                            }
                            None => {}
                        }
                    }
                }
            }
            let outcome = match &denied {
                Some(d) => d.clone(),
                None if notes.is_empty() => "allows".to_owned(),
                None => notes.join("; "),
            };
            if let (Some(d), None) = (&denied, &refusal) {
                refusal = Some((name.clone(), format!("policy {name} ({layer}) {d}")));
            }
            steps.push(ExplainStep {
                policy: name,
                layer: layer.into(),
                version: p.version.clone(),
                outcome,
            });
        }
        let policy_version = self.policy_version(Some(&req.tenant));
        // Each layer's own version: the digest of its policies in force (in layer order, as
        // `policies_for` sorts them).
        let mut grouped: Vec<(&str, Vec<(String, &str)>)> = Vec::new();
        for p in &in_force {
            let l = layer(p);
            match grouped.last_mut() {
                Some((last, set)) if *last == l => set.push((name_of(p), p.version.as_str())),
                _ => grouped.push((l, vec![(name_of(p), p.version.as_str())])),
            }
        }
        let layers = grouped
            .into_iter()
            .map(|(layer, set)| LayerVersion {
                layer: layer.into(),
                version: mayfly_trust::digest_of(&set).unwrap_or_default(),
                policies: set.len(),
            })
            .collect();
        let environment = self.environment_of(&req.tenant).map(str::to_owned);
        match refusal {
            Some((by, reason)) => Explanation {
                allowed: false,
                reason,
                decided_by: Some(by),
                steps,
                policy_version,
                limits,
                layers,
                environment,
            },
            None => Explanation {
                allowed: true,
                reason: if in_force.is_empty() {
                    "no policy is in force".into()
                } else {
                    "every policy in force allows it".into()
                },
                decided_by: None,
                steps,
                policy_version,
                limits,
                layers,
                environment,
            },
        }
    }

    /// The Environment tenant `tenant` runs in (its Tenant object's `spec.environment`).
    pub fn environment_of(&self, tenant: &str) -> Option<&str> {
        self.objects
            .get(&ObjectKey {
                kind: Kind::Tenant,
                tenant: None,
                name: tenant.to_owned(),
            })
            .and_then(|t| t.spec.get("environment"))
            .and_then(Value::as_str)
    }

    /// The policies that apply to `tenant`, in a deterministic order: platform, environment
    /// (platform policies scoped to the tenant's Environment), tenant, workload; within a
    /// layer the platform's before the tenant's, then by name.
    fn policies_for<'a>(&'a self, tenant: &'a str) -> impl Iterator<Item = &'a Object> + 'a {
        let env = self.environment_of(tenant);
        let mut v: Vec<&Object> = self
            .objects
            .values()
            .filter(move |o| o.key.kind == Kind::Policy)
            .filter(move |o| {
                let scoped = o.spec.pointer("/scope/tenant").and_then(Value::as_str);
                let in_env = o.spec.pointer("/scope/environment").and_then(Value::as_str);
                let owner = o.key.tenant.as_deref();
                scoped.is_none_or(|s| s == tenant)
                    && in_env.is_none_or(|e| Some(e) == env)
                    && (owner == Some(tenant) || owner == Some(SYSTEM_TENANT))
            })
            .collect();
        v.sort_by_key(|o| {
            (
                LAYERS.iter().position(|l| *l == layer(o)),
                o.key.tenant.as_deref() != Some(SYSTEM_TENANT),
                o.key.name.clone(),
            )
        });
        v.into_iter()
    }
}

/// What an action risks when the control plane cannot vouch for its answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionClass {
    /// Low-risk reads of desired state: may fail open, with a marker for review.
    Read,
    /// Starting executions (privileged: runs code with credentials): always fails closed.
    Execute,
    /// Mutations of desired state (privileged): always fails closed.
    Write,
}

impl ActionClass {
    pub fn parse(s: &str) -> Option<ActionClass> {
        match s {
            "read" => Some(ActionClass::Read),
            "execute" => Some(ActionClass::Execute),
            "write" => Some(ActionClass::Write),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            ActionClass::Read => "read",
            ActionClass::Execute => "execute",
            ActionClass::Write => "write",
        }
    }
    pub fn privileged(self) -> bool {
        !matches!(self, ActionClass::Read)
    }
}

/// The degradation rule in force for an action class, and why.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DegradationRule {
    pub class: ActionClass,
    pub fail_open: bool,
    /// The policy that closed a low-risk class (None: the default, or privileged).
    pub decided_by: Option<String>,
    pub reason: String,
}

impl ControlState {
    /// What `class` does for `tenant` while the control plane is degraded. Privileged
    /// classes fail closed whatever any policy says (validation refuses saying otherwise);
    /// reads fail open — with a marker — unless a policy in force for the tenant closes them
    /// (like allow-lists, a layer can only narrow). Pure.
    pub fn degradation(&self, tenant: &str, class: ActionClass, now_ms: u64) -> DegradationRule {
        if class.privileged() {
            return DegradationRule {
                class,
                fail_open: false,
                decided_by: None,
                reason: format!("`{}` is privileged: it fails closed", class.as_str()),
            };
        }
        let closing = self.policies_for(tenant).find(|p| {
            let in_force = p
                .spec
                .get("expires_at_ms")
                .and_then(Value::as_u64)
                .is_none_or(|t| t > now_ms);
            in_force
                && p.spec
                    .pointer(&format!("/degradation/{}", class.as_str()))
                    .and_then(Value::as_str)
                    == Some("fail_closed")
        });
        match closing {
            Some(p) => {
                let name = format!("{}/{}", p.key.tenant.as_deref().unwrap_or("-"), p.key.name);
                DegradationRule {
                    class,
                    fail_open: false,
                    reason: format!(
                        "policy {name} ({}) closes `{}` while the control plane is degraded",
                        layer(p),
                        class.as_str()
                    ),
                    decided_by: Some(name),
                }
            }
            None => DegradationRule {
                class,
                fail_open: true,
                decided_by: None,
                reason: format!(
                    "`{}` is low-risk: served while degraded, flagged and recorded for review",
                    class.as_str()
                ),
            },
        }
    }
}

/// Policy layers, in evaluation order (DESIGN: global → environment → tenant → workload).
pub const LAYERS: [&str; 4] = ["platform", "environment", "tenant", "workload"];

/// The layer of a policy: `workload` when scoped to a playbook, else `environment` when a
/// platform policy is scoped to an Environment, else `platform` (the system tenant's) or
/// `tenant`.
fn layer(p: &Object) -> &'static str {
    let platform = p.key.tenant.as_deref() == Some(SYSTEM_TENANT);
    if p.spec.pointer("/scope/playbook").is_some() {
        "workload"
    } else if platform && p.spec.pointer("/scope/environment").is_some() {
        "environment"
    } else if platform {
        "platform"
    } else {
        "tenant"
    }
}

/// One layer's version: the digest of its policies in force (layers change independently).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerVersion {
    pub layer: String,
    pub version: String,
    pub policies: usize,
}

fn allow_list<'a>(spec: &'a Value, pointer: &str) -> Option<BTreeSet<&'a str>> {
    spec.pointer(pointer)
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
}
