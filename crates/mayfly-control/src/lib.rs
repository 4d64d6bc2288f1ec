//! The control plane's desired state (DESIGN §5): declarative objects — Tenant, Environment,
//! Policy, Playbook, WorkerPool — each with an immutable version id (content digest), a
//! desired generation and a reconciliation status; every mutation and every refusal is an
//! event of the log's `control` stream (actor, decision and reason, before/after versions,
//! request id, the effective policy version), hash-chained like an execution's, so the
//! audit is tamper-evident and `verify` re-checks it end to end.
//!
//! [`model`] is the pure core (parsing, validation, versions, authorization, the fold);
//! [`service`] keeps the fold of one process's stream and appends to it.

pub mod dataplane;
pub mod model;
pub mod rollout;
pub mod service;
pub mod view;

pub use model::{
    API_VERSION, ActionClass, Admission, AdmissionDecision, AdmissionRequest, Caller, ControlState,
    Decision, DegradationRule, ExplainStep, Explanation, Kind, Manifest, ManifestError, Object,
    ObjectKey, ObjectView, Phase, Revision, Role, SYSTEM_TENANT, Status, authorize,
    parse_manifests, visible,
};
pub use service::{
    ApplyReport, ApplyResult, Control, ControlError, Outcome, STREAM, Verified, verify_stored,
};
pub use view::{
    CatchUp, Class, Degraded, Freshness, ReadRequest, Rejection, View, admits, check_reply,
};

#[cfg(test)]
mod rollout_tests;
#[cfg(test)]
mod tests;
