//! The NoETL v2 playbook dialect: span-preserving parsing, validation and templating.
//!
//! Pure: no IO. Every error names `file:line:col` and, where relevant, the step.

pub mod graph;
pub mod node;
pub mod playbook;
pub mod schema;
pub mod template;

pub use graph::{Graph, GraphEdge, GraphNode, graph};
pub use node::{Loc, Node, NodeV};
pub use playbook::{
    Admit, AdmitRule, Arc, Backoff, Diagnostic, Directive, DslError, ENTRY_STEP, KeychainEntry,
    LoopMode, LoopSpec, NATS_OPERATIONS, Next, NextMode, ParseOptions, Playbook, Reach, Rule,
    SetOp, SetTarget, Step, TOOL_KINDS, Task, ToolKind, child_path_refusal, child_version, parse,
    parse_bytes, split_child_version, versioned_child_path,
};
pub use template::{REF_KEYS, REFS_KEY, TemplateError, Templates, templates, to_value, truthy};

#[cfg(test)]
mod tests;
