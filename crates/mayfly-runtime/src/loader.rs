//! Loading playbooks from files (embedded mode) for `mayfly run` and child playbooks.

use mayfly_dsl::{ParseOptions, Playbook};
use std::path::{Path, PathBuf};

/// Why a playbook could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(#[from] mayfly_dsl::DslError),
    #[error("playbook `{path}` not found (looked for {tried})")]
    NotFound { path: String, tried: String },
}

/// Read and validate a playbook file.
pub fn load_file(path: &Path, opts: &ParseOptions) -> Result<Playbook, LoadError> {
    let bytes = std::fs::read(path).map_err(|source| LoadError::Io {
        path: path.display().to_string(),
        source,
    })?;
    Ok(mayfly_dsl::parse_bytes(
        &path.display().to_string(),
        &bytes,
        opts,
    )?)
}

/// Resolve a `playbook` tool `path` relative to the parent playbook's file.
///
/// Tries, in order: the path as given, with `.yaml`/`.yml`, and the last path segment
/// with those suffixes (so a catalog-style path like `tests/user_scorer` finds a sibling
/// `user_scorer.yaml`).
pub fn resolve_child(parent_source: Option<&str>, child: &str) -> Result<PathBuf, LoadError> {
    let base = parent_source
        .and_then(|p| Path::new(p).parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("."));
    let child_path = Path::new(child);
    let root = if child_path.is_absolute() {
        child_path.to_path_buf()
    } else {
        base.join(child_path)
    };
    let mut candidates = vec![
        root.clone(),
        root.with_extension("yaml"),
        root.with_extension("yml"),
    ];
    if let Some(name) = child_path.file_name() {
        let leaf = base.join(name);
        candidates.extend([leaf.with_extension("yaml"), leaf.with_extension("yml")]);
    }
    for c in &candidates {
        if c.is_file() {
            return Ok(c.clone());
        }
    }
    Err(LoadError::NotFound {
        path: child.to_owned(),
        tried: candidates
            .iter()
            .map(|c| c.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    })
}
