//! The actor dataplane contract (DESIGN §6, seed "dataplane pluggability"): what the control
//! plane asks of a provider and what a provider answers. Pure data and pure checks, no IO,
//! so that the control plane, both built-in providers and the conformance suite share one
//! definition of every rule.
//!
//! * Every op carries an `op_id` (idempotency: the same id with the same payload answers the
//!   first result; with a different payload it is refused, `op_id_conflict`) and an
//!   `assignment_epoch` (fencing: an op older than the actor's epoch is refused,
//!   `stale_epoch`).
//! * `assign` is level-triggered (a desired phase), `checkpoint` and `restore` are
//!   imperative; a restore binds a new epoch.
//! * A snapshot is a descriptor → manifest in canonical JSON; the manifest's envelope is
//!   signed by the control plane ([`mayfly_trust::sign::Purpose::Snapshot`]), never by the
//!   provider that wrote the blobs. [`verify_snapshot`] is the one restore-side check.
//! * Secrets and the actor's identity travel in [`Delivery`], fresh on every op that starts
//!   an actor; it is excluded from the payload digest and never persisted or snapshotted.

use mayfly_trust::sign::{Purpose, SignError, Signed, TrustedKey};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

/// The contract version a provider and the control plane negotiate once, at registration.
pub const CONTRACT_VERSION: &str = "mayfly.actors/v1";

/// Media type of a snapshot descriptor's target (the manifest).
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.mayfly.snapshot.manifest.v1+json";

/// Largest blob chunk a provider writes: snapshots are stored as chunks of this size so a
/// large durable dir never needs one object (or one buffer) of its full size downstream.
pub const BLOB_CHUNK: usize = 4 * 1024 * 1024;

/// What a checkpoint captures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Everything the sandbox can capture (for wasm: linear memory, globals, durable data).
    Full,
    /// Only the durable data (for process: the durable dirs).
    Data,
}

/// Where a checkpoint's blobs go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckpointKind {
    /// Kept by the provider that took it (a fast resume on the same provider).
    Local,
    /// Written to the shared snapshot store (required for a move to another provider).
    External,
}

/// The phase the control plane asks for (level-triggered).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Desired {
    Running,
    Suspended,
}

/// An actor's phase as the control plane records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActorPhase {
    Suspended,
    Resuming,
    Running,
    Checkpointing,
    Failed,
}

/// What the provider reports of one actor it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderPhase {
    Running,
    Stopped,
}

/// The readiness gate: Run/Restore succeed only once `GET path` answers 200, within
/// `deadline_ms` of the start.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Readiness {
    #[serde(default = "default_ready_path")]
    pub path: String,
    #[serde(default = "default_ready_deadline")]
    pub deadline_ms: u64,
}

fn default_ready_path() -> String {
    "/ready".into()
}
fn default_ready_deadline() -> u64 {
    10_000
}

impl Default for Readiness {
    fn default() -> Self {
        Readiness {
            path: default_ready_path(),
            deadline_ms: default_ready_deadline(),
        }
    }
}

/// What runs in the sandbox. The tag is the sandbox class.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "class", rename_all = "snake_case", deny_unknown_fields)]
pub enum Workload {
    /// A child process serving HTTP on the port in `$PORT`.
    Process {
        command: String,
        #[serde(default)]
        args: Vec<String>,
        #[serde(default)]
        env: BTreeMap<String, String>,
        /// Directories (relative to the actor's working dir) that Data scope captures.
        #[serde(default)]
        durable_dirs: Vec<String>,
        #[serde(default)]
        readiness: Readiness,
    },
    /// A WASM module (by digest, in the snapshot store) with an HTTP-style handler export.
    Wasm {
        module: String,
        #[serde(default = "default_handler")]
        handler: String,
    },
}

fn default_handler() -> String {
    "handle".into()
}

impl Workload {
    /// The sandbox class this workload needs.
    pub fn class(&self) -> &'static str {
        match self {
            Workload::Process { .. } => "process",
            Workload::Wasm { .. } => "wasm",
        }
    }

    /// Content digest of the workload (bound into every snapshot manifest).
    pub fn digest(&self) -> String {
        mayfly_trust::digest_of(self).unwrap_or_default()
    }

    /// Structural checks (the provider and the control plane both run them).
    pub fn check(&self) -> Result<(), Refusal> {
        match self {
            Workload::Process {
                command,
                durable_dirs,
                readiness,
                ..
            } => {
                if command.trim().is_empty() {
                    return Err(Refusal::invalid("workload.command is empty"));
                }
                for d in durable_dirs {
                    if !is_relative_clean(d) {
                        return Err(Refusal::invalid(format!(
                            "durable dir `{d}` must be a relative path without `..`"
                        )));
                    }
                }
                if !readiness.path.starts_with('/') {
                    return Err(Refusal::invalid("readiness.path must start with `/`"));
                }
                Ok(())
            }
            Workload::Wasm { module, handler } => {
                if !mayfly_types::is_sha256_digest(module) {
                    return Err(Refusal::invalid("workload.module must be a sha256 digest"));
                }
                if handler.is_empty() {
                    return Err(Refusal::invalid("workload.handler is empty"));
                }
                Ok(())
            }
        }
    }
}

/// A relative path with normal components only (no `..`, no root, no empty parts).
pub fn is_relative_clean(p: &str) -> bool {
    !p.is_empty()
        && !p.starts_with('/')
        && p.split('/')
            .all(|c| !c.is_empty() && c != "." && c != ".." && !c.contains('\0'))
}

/// Which scopes each checkpoint trigger captures. OnCommit ⊆ OnPause: a commit-time
/// checkpoint never captures more than a pause would.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointPolicy {
    #[serde(default, rename = "onPause", alias = "on_pause")]
    pub on_pause: Vec<Scope>,
    #[serde(default, rename = "onCommit", alias = "on_commit")]
    pub on_commit: Vec<Scope>,
}

impl CheckpointPolicy {
    pub fn check(&self) -> Result<(), Refusal> {
        let pause: BTreeSet<_> = self.on_pause.iter().collect();
        if let Some(s) = self.on_commit.iter().find(|s| !pause.contains(s)) {
            return Err(Refusal::invalid(format!(
                "checkpoint.onCommit scope {s:?} is not in onPause (OnCommit must be a subset of OnPause)"
            )));
        }
        Ok(())
    }
}

/// The actor as a provider sees it: enough to start it, bound to a tenant and template.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActorSpec {
    pub actor: String,
    pub tenant: String,
    pub template: String,
    pub workload: Workload,
}

/// Delivered fresh with every op that starts an actor; never stored, never in a snapshot,
/// never part of the payload digest.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// The actor's identity token (process: the file `/run/mayfly/actor-id` equivalent under
    /// the actor's runtime dir; wasm: the `MAYFLY_ACTOR_ID` env of the instance).
    pub identity: String,
    #[serde(default)]
    pub secrets: BTreeMap<String, String>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("identity", &"<redacted>")
            .field("secrets", &self.secrets.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// The operation itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Op {
    /// Level-triggered: make the actor's phase `desired` (Running starts it fresh when it
    /// is not running; Suspended stops it without a checkpoint).
    Assign { desired: Desired, spec: ActorSpec },
    /// Capture `scope`; `teardown` stops the actor after a successful capture.
    Checkpoint {
        kind: CheckpointKind,
        scope: Scope,
        #[serde(default)]
        teardown: bool,
    },
    /// Start the actor from a control-plane-signed snapshot, binding the op's epoch.
    Restore { snapshot: Signed, spec: ActorSpec },
}

impl Op {
    pub fn name(&self) -> &'static str {
        match self {
            Op::Assign { .. } => "assign",
            Op::Checkpoint { .. } => "checkpoint",
            Op::Restore { .. } => "restore",
        }
    }
}

/// One op as sent to `POST /v1/ops`.
/// (Unknown fields are refused by [`Op`]'s variants, which see every field not named here.)
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OpRequest {
    pub op_id: String,
    pub actor: String,
    pub tenant: String,
    pub assignment_epoch: u64,
    #[serde(flatten)]
    pub op: Op,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<Delivery>,
    /// The control plane's signed [`BlobGrant`] for this op's snapshot blobs (a provider
    /// under a control plane reaches the snapshot store only with it). Fresh on every send,
    /// so not part of the payload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<Signed>,
}

/// What one op may do in the snapshot store, signed by the control plane
/// ([`mayfly_trust::sign::Purpose::BlobGrant`]): the blobs of `tenant` it may read, how many
/// bytes it may write there, for which provider, until when. The blob broker refuses
/// anything else.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlobGrant {
    /// The enrolled provider's id (the broker checks the caller's certificate is its).
    pub provider: String,
    pub tenant: String,
    pub op_id: String,
    /// Digests it may read.
    #[serde(default)]
    pub read: Vec<String>,
    /// Bytes it may write in all (0: none).
    #[serde(default)]
    pub write_bytes: u64,
    /// Wall-clock ms after which it is refused.
    pub expires_ms: u64,
}

impl OpRequest {
    /// The snapshot blobs this op may need: what a [`BlobGrant`] for it names — the
    /// workload's assets (a wasm module) and a restored manifest's blobs to read, and
    /// whether it writes (an external checkpoint). The manifest is read unverified: the
    /// provider verifies the envelope before it reads a byte, and the grant only narrows.
    pub fn blob_needs(&self) -> (Vec<String>, bool) {
        let mut read = Vec::new();
        let mut write = false;
        let assets = |spec: &ActorSpec, read: &mut Vec<String>| {
            if let Workload::Wasm { module, .. } = &spec.workload {
                read.push(module.clone());
            }
        };
        match &self.op {
            Op::Assign {
                spec,
                desired: Desired::Running,
            } => assets(spec, &mut read),
            Op::Assign { .. } => {}
            Op::Restore { snapshot, spec } => {
                assets(spec, &mut read);
                if let Ok(m) = serde_json::from_value::<Manifest>(snapshot.body.clone()) {
                    read.extend(m.blobs.into_iter().map(|b| b.digest));
                }
            }
            Op::Checkpoint { kind, .. } => write = *kind == CheckpointKind::External,
        }
        read.sort();
        read.dedup();
        (read, write)
    }

    /// sha256 of everything but `op_id`, `delivery` and `grant`: "the same payload".
    pub fn payload_digest(&self) -> String {
        #[derive(Serialize)]
        struct P<'a> {
            actor: &'a str,
            tenant: &'a str,
            assignment_epoch: u64,
            #[serde(flatten)]
            op: &'a Op,
        }
        mayfly_trust::digest_of(&P {
            actor: &self.actor,
            tenant: &self.tenant,
            assignment_epoch: self.assignment_epoch,
            op: &self.op,
        })
        .unwrap_or_default()
    }

    /// Structural checks before anything is recorded.
    pub fn check(&self) -> Result<(), Refusal> {
        if !is_name(&self.op_id, 128) {
            return Err(Refusal::invalid(
                "op_id must be 1-128 chars of [A-Za-z0-9._:-]",
            ));
        }
        if !is_name(&self.actor, 128) || !is_name(&self.tenant, 128) {
            return Err(Refusal::invalid(
                "actor and tenant must be 1-128 chars of [A-Za-z0-9._:-]",
            ));
        }
        let spec = match &self.op {
            Op::Assign { spec, .. } | Op::Restore { spec, .. } => Some(spec),
            Op::Checkpoint { .. } => None,
        };
        if let Some(spec) = spec {
            if spec.actor != self.actor || spec.tenant != self.tenant {
                return Err(Refusal::invalid(
                    "spec.actor/spec.tenant differ from the op's actor/tenant",
                ));
            }
            if !is_name(&spec.template, 128) {
                return Err(Refusal::invalid("spec.template must be a name"));
            }
            spec.workload.check()?;
        }
        Ok(())
    }
}

/// `[A-Za-z0-9._:-]{1,max}`: ids that are safe in paths, headers and SQL text.
pub fn is_name(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
        && s != "."
        && s != ".."
}

/// Why an op (or a request) is refused. Codes are stable: the conformance suite, the
/// control plane and the router match on them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalCode {
    InvalidRequest,
    /// The op's epoch is older than the actor's.
    StaleEpoch,
    /// The op id was used before with a different payload.
    OpIdConflict,
    UnsupportedClass,
    UnsupportedScope,
    UnsupportedKind,
    /// The snapshot envelope is not signed by a trusted control-plane key, or was altered.
    SnapshotUntrusted,
    /// The manifest cannot be parsed or is of an unknown format.
    ManifestUnreadable,
    /// The snapshot belongs to another tenant, actor or template.
    ForeignSnapshot,
    /// A blob is missing or does not hash to its digest.
    BlobDigestMismatch,
    /// The actor is not on this provider (checkpoint of an unknown actor).
    UnknownActor,
    /// The readiness probe did not answer 200 before the deadline.
    NotReady,
    CapacityExhausted,
    /// The sandbox failed (start, capture or restore).
    SandboxFailed,
    /// The provider restarted while the op ran; its outcome is unknown and it did nothing
    /// durable (a retry under a new op id is safe).
    Interrupted,
    Unauthenticated,
    /// The snapshot store refused the op's blob grant (none, expired, another provider's or
    /// tenant's, a blob it does not name, over its write budget).
    BlobAccessDenied,
}

impl RefusalCode {
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalCode::InvalidRequest => "invalid_request",
            RefusalCode::StaleEpoch => "stale_epoch",
            RefusalCode::OpIdConflict => "op_id_conflict",
            RefusalCode::UnsupportedClass => "unsupported_class",
            RefusalCode::UnsupportedScope => "unsupported_scope",
            RefusalCode::UnsupportedKind => "unsupported_kind",
            RefusalCode::SnapshotUntrusted => "snapshot_untrusted",
            RefusalCode::ManifestUnreadable => "manifest_unreadable",
            RefusalCode::ForeignSnapshot => "foreign_snapshot",
            RefusalCode::BlobDigestMismatch => "blob_digest_mismatch",
            RefusalCode::UnknownActor => "unknown_actor",
            RefusalCode::NotReady => "not_ready",
            RefusalCode::CapacityExhausted => "capacity_exhausted",
            RefusalCode::SandboxFailed => "sandbox_failed",
            RefusalCode::Interrupted => "interrupted",
            RefusalCode::Unauthenticated => "unauthenticated",
            RefusalCode::BlobAccessDenied => "blob_access_denied",
        }
    }

    /// The HTTP status a provider answers a synchronous refusal with.
    pub fn http_status(self) -> u16 {
        match self {
            RefusalCode::InvalidRequest
            | RefusalCode::UnsupportedClass
            | RefusalCode::UnsupportedScope
            | RefusalCode::UnsupportedKind => 400,
            RefusalCode::Unauthenticated => 401,
            RefusalCode::BlobAccessDenied => 403,
            RefusalCode::UnknownActor => 404,
            RefusalCode::StaleEpoch | RefusalCode::OpIdConflict => 409,
            RefusalCode::SnapshotUntrusted
            | RefusalCode::ManifestUnreadable
            | RefusalCode::ForeignSnapshot
            | RefusalCode::BlobDigestMismatch => 422,
            RefusalCode::CapacityExhausted => 429,
            RefusalCode::NotReady | RefusalCode::SandboxFailed | RefusalCode::Interrupted => 500,
        }
    }
}

impl std::fmt::Display for RefusalCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A typed refusal: a stable code and a message for humans (never carries secrets).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Refusal {
    pub code: RefusalCode,
    pub message: String,
}

impl Refusal {
    pub fn new(code: RefusalCode, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
        }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Refusal::new(RefusalCode::InvalidRequest, message)
    }
}

/// Durable state of an op.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpState {
    Running,
    Succeeded,
    Failed,
}

/// What a successful op leaves behind.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct OpResult {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ProviderPhase>,
    /// The data-path address of a running actor (`http://127.0.0.1:PORT`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// The epoch the actor is bound to after the op.
    pub epoch: u64,
    /// A checkpoint's outcome: the manifest to sign and its descriptor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<Checkpointed>,
}

/// A checkpoint's product, for the control plane to verify and sign.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Checkpointed {
    pub descriptor: Descriptor,
    pub manifest: Manifest,
    pub kind: CheckpointKind,
}

/// `GET /v1/ops/{op_id}` (and the answer to `POST /v1/ops`). Durable: it survives a
/// disconnect and a provider restart.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OpStatus {
    pub op_id: String,
    pub op: String,
    pub actor: String,
    pub state: OpState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<OpResult>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Refusal>,
}

/// Snapshot format: an id and a version, both in the manifest.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Format {
    pub id: String,
    pub version: u32,
}

/// One content-addressed blob of a snapshot (a chunk of a named stream).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlobRef {
    /// The stream this chunk belongs to (`data`, `memory`, …); chunks of one stream are
    /// concatenated in manifest order.
    pub name: String,
    pub digest: String,
    pub size: u64,
}

/// The snapshot manifest, in canonical JSON; its digest is the descriptor's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: Format,
    pub scope: Scope,
    pub blobs: Vec<BlobRef>,
    /// `os/arch` of the provider that took it.
    pub platform: String,
    pub tenant: String,
    pub template: String,
    /// None for a golden snapshot (bound to its template, restorable by any of its actors).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    pub workload_digest: String,
    #[serde(default)]
    pub assets: Vec<String>,
}

/// The pointer the control plane keeps: {digest, media_type, size}.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    pub digest: String,
    pub media_type: String,
    pub size: u64,
}

impl Manifest {
    /// Canonical bytes and the descriptor that points at them.
    pub fn descriptor(&self) -> Descriptor {
        let bytes = mayfly_trust::canonical(self).unwrap_or_default();
        Descriptor {
            digest: mayfly_trust::sha256_digest(&bytes),
            media_type: MANIFEST_MEDIA_TYPE.into(),
            size: bytes.len() as u64,
        }
    }

    /// Structural checks: digests are sha256, stream names are sane, sizes add up.
    pub fn check(&self) -> Result<(), Refusal> {
        let bad = |m: String| Refusal::new(RefusalCode::ManifestUnreadable, m);
        if self.format.id.is_empty() || self.format.version == 0 {
            return Err(bad("format id/version missing".into()));
        }
        if !mayfly_types::is_sha256_digest(&self.workload_digest) {
            return Err(bad("workload_digest is not a sha256 digest".into()));
        }
        for b in &self.blobs {
            if !mayfly_types::is_sha256_digest(&b.digest) {
                return Err(bad(format!("blob digest `{}` is not sha256", b.digest)));
            }
            if !is_name(&b.name, 64) {
                return Err(bad(format!("blob name `{}` is not a name", b.name)));
            }
            if b.size > BLOB_CHUNK as u64 {
                return Err(bad(format!("blob {} is larger than a chunk", b.digest)));
            }
        }
        Ok(())
    }

    /// Bytes of every blob.
    pub fn data_size(&self) -> u64 {
        self.blobs.iter().map(|b| b.size).sum()
    }
}

/// The one restore-side check of a snapshot envelope, before any blob is read: signed by a
/// trusted control-plane key for the snapshot purpose, a readable manifest of a format this
/// provider restores, bound to the restoring actor's tenant and to the actor itself (or,
/// for a golden snapshot, to its template).
pub fn verify_snapshot(
    envelope: &Signed,
    trusted: &[TrustedKey],
    formats: &[Format],
    spec: &ActorSpec,
) -> Result<Manifest, Refusal> {
    envelope
        .verify(Purpose::Snapshot, trusted)
        .map_err(|e: SignError| {
            Refusal::new(
                RefusalCode::SnapshotUntrusted,
                format!("snapshot envelope: {e} ({})", e.code()),
            )
        })?;
    let manifest: Manifest = serde_json::from_value(envelope.body.clone()).map_err(|e| {
        Refusal::new(
            RefusalCode::ManifestUnreadable,
            format!("manifest does not parse: {e}"),
        )
    })?;
    manifest.check()?;
    if !formats.contains(&manifest.format) {
        return Err(Refusal::new(
            RefusalCode::ManifestUnreadable,
            format!(
                "snapshot format {}/v{} is not one this provider restores",
                manifest.format.id, manifest.format.version
            ),
        ));
    }
    if manifest.tenant != spec.tenant {
        return Err(Refusal::new(
            RefusalCode::ForeignSnapshot,
            "the snapshot belongs to another tenant",
        ));
    }
    match &manifest.actor {
        Some(a) if a != &spec.actor => {
            return Err(Refusal::new(
                RefusalCode::ForeignSnapshot,
                "the snapshot belongs to another actor",
            ));
        }
        _ => {}
    }
    if manifest.template != spec.template {
        return Err(Refusal::new(
            RefusalCode::ForeignSnapshot,
            "the snapshot belongs to another template",
        ));
    }
    if manifest.workload_digest != spec.workload.digest() {
        return Err(Refusal::new(
            RefusalCode::ForeignSnapshot,
            "the snapshot was taken of another workload",
        ));
    }
    Ok(manifest)
}

/// Overhead a sandbox adds per actor (the scheduler's input, not a guarantee).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Overhead {
    pub memory_bytes: u64,
    pub start_ms: u64,
}

/// What a provider advertises at registration; the scheduler matches on it and the
/// conformance suite checks it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    pub contract: String,
    pub classes: Vec<String>,
    pub scopes: Vec<Scope>,
    pub kinds: Vec<CheckpointKind>,
    pub formats: Vec<Format>,
    pub golden_restore: bool,
    pub overhead: Overhead,
}

/// One worker (a slot pool of one sandbox class) a provider runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub id: String,
    pub class: String,
    pub slots: u32,
    pub used: u32,
    pub healthy: bool,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// `GET /v1/provider`: identity, contract, capabilities and live capacity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderInfo {
    pub id: String,
    /// Changes on every provider start: the control plane tells a restart from a stall.
    pub incarnation: String,
    pub capabilities: Capabilities,
    pub workers: Vec<WorkerInfo>,
}

/// `GET /v1/actors/{actor}`: where a running actor serves, bound to its epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActorStatus {
    pub actor: String,
    pub tenant: String,
    pub epoch: u64,
    pub phase: ProviderPhase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
}

/// Header the router and the control plane send with data-path requests; a provider (and
/// the router) refuse a request whose epoch is not the actor's current one.
pub const EPOCH_HEADER: &str = "x-mayfly-epoch";

/// A JSON problem body for a refusal (the provider's HTTP error shape).
pub fn problem(r: &Refusal) -> Value {
    serde_json::json!({
        "type": format!("https://mayfly.dev/problems/{}", r.code.as_str()),
        "title": r.code.as_str(),
        "status": r.code.http_status(),
        "code": r.code.as_str(),
        "detail": r.message,
    })
}

#[cfg(test)]
mod tests;
