-- Which shared-cache payloads each execution's events reference (filled by the writer in the
-- same transaction as the events). Cache retention keeps every payload a retained execution
-- names; the events themselves stay the system of record.
CREATE TABLE cache_refs (
    execution_id TEXT NOT NULL,
    digest       TEXT NOT NULL,
    PRIMARY KEY (execution_id, digest)
);
INSERT OR IGNORE INTO cache_refs (execution_id, digest)
SELECT e.execution_id, j.value
FROM events e, json_tree(e.payload) j
WHERE e.payload LIKE '%"$ref"%' AND j.key = '$ref' AND j.type = 'text' AND j.value LIKE 'sha256:%';
-- Retention keeps a child's payloads while an ancestor is retained (its result may be a ref
-- to an aggregate of refs only the child's events name): the mark walks parent → children.
CREATE INDEX executions_by_parent ON executions (parent_execution_id);
