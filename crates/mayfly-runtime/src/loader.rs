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
    #[error("the local catalog: {0}")]
    Catalog(#[source] mayfly_store::StoreError),
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

/// Playbooks under a root directory by their catalog path (`metadata.path`): how `mayfly
/// run` resolves a child named the way NoETL names it (a catalog key, not a file name).
#[derive(Debug, Default, Clone)]
pub struct PlaybookIndex {
    root: PathBuf,
    by_path: std::collections::BTreeMap<String, Vec<PathBuf>>,
}

/// What [`PlaybookIndex::register`] did: each catalog entry (and whether it is a new
/// version), and the catalog paths left out because several files claim them.
#[derive(Debug, Default)]
pub struct Registered {
    pub entries: Vec<(mayfly_store::CatalogEntry, bool)>,
    pub ambiguous: Vec<(String, Vec<PathBuf>)>,
}

/// Most files a playbook root may hold (a root of the wrong size is a mistake, not a tree
/// to parse forever).
pub const MAX_INDEXED_FILES: usize = 10_000;

/// Deepest directory level under a playbook root that is searched.
pub const MAX_INDEX_DEPTH: usize = 8;

impl PlaybookIndex {
    /// Every `*.yaml`/`*.yml` under `root` (hidden directories and `target` skipped) that is
    /// a valid playbook, by its catalog path. Files that are not playbooks are skipped.
    pub fn scan(root: &Path) -> Result<PlaybookIndex, LoadError> {
        let io = |source| LoadError::Io {
            path: root.display().to_string(),
            source,
        };
        let mut idx = PlaybookIndex {
            root: root.to_path_buf(),
            by_path: Default::default(),
        };
        let mut stack = vec![(root.to_path_buf(), 0usize)];
        let mut files = 0usize;
        while let Some((dir, depth)) = stack.pop() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(&dir)
                .map_err(io)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .collect();
            entries.sort();
            for p in entries {
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                if p.is_dir() {
                    if depth < MAX_INDEX_DEPTH
                        && !name.starts_with('.')
                        && name != "target"
                        && name != "node_modules"
                    {
                        stack.push((p, depth + 1));
                    }
                    continue;
                }
                if !(name.ends_with(".yaml") || name.ends_with(".yml")) {
                    continue;
                }
                files += 1;
                if files > MAX_INDEXED_FILES {
                    return Err(LoadError::NotFound {
                        path: root.display().to_string(),
                        tried: format!(
                            "more than {MAX_INDEXED_FILES} YAML files under the playbook root; name a smaller one with --playbooks"
                        ),
                    });
                }
                if let Ok(pb) = load_file(&p, &ParseOptions::default()) {
                    idx.by_path.entry(pb.path).or_default().push(p);
                }
            }
        }
        Ok(idx)
    }

    /// The file whose catalog path is `path` (a trailing `.yaml`/`.yml` ignored), if any;
    /// an error when several files claim it.
    pub fn find(&self, path: &str) -> Option<Result<PathBuf, LoadError>> {
        let key = path
            .trim_end_matches(".yaml")
            .trim_end_matches(".yml")
            .trim_start_matches("./");
        let files = self.by_path.get(key)?;
        Some(match files.as_slice() {
            [one] => Ok(one.clone()),
            many => Err(LoadError::NotFound {
                path: path.to_owned(),
                tried: format!(
                    "catalog path `{key}` is claimed by {} files under {}: {}",
                    many.len(),
                    self.root.display(),
                    many.iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }),
        })
    }

    pub fn len(&self) -> usize {
        self.by_path.len()
    }

    /// Register every playbook of the tree into `tenant`'s catalog in `store` — a new
    /// version where a file's content changed since it was last registered there, else the
    /// version it has: how `mayfly run` gives its children a catalog of its own (versions
    /// included, kept across runs with `--db`). A catalog path claimed by several files is
    /// registered for none of them; those come back in [`Registered::ambiguous`].
    pub async fn register(
        &self,
        store: &dyn mayfly_store::Store,
        tenant: &str,
    ) -> Result<Registered, LoadError> {
        let mut out = Registered::default();
        for (path, files) in &self.by_path {
            let [file] = files.as_slice() else {
                out.ambiguous.push((path.clone(), files.clone()));
                continue;
            };
            let pb = load_file(file, &ParseOptions::default())?;
            let stored = mayfly_store::StoredPlaybook {
                digest: pb.digest.clone(),
                path: pb.path.clone(),
                source_name: pb.file.clone(),
                content: pb.source.clone(),
            };
            let (entry, created) = store
                .register(tenant, stored)
                .await
                .map_err(LoadError::Catalog)?;
            out.entries.push((entry, created));
        }
        Ok(out)
    }

    pub fn is_empty(&self) -> bool {
        self.by_path.is_empty()
    }
}
