-- Which shared-cache payloads each execution's events reference (filled by the writer in the
-- same transaction as the events). Cache retention keeps every payload a retained execution
-- names; the events themselves stay the system of record.
CREATE TABLE cache_refs (
    execution_id TEXT NOT NULL,
    digest       TEXT NOT NULL,
    PRIMARY KEY (execution_id, digest)
);
INSERT INTO cache_refs (execution_id, digest)
SELECT DISTINCT e.execution_id, m[1]
FROM events e, regexp_matches(e.payload, '"\$ref":"(sha256:[0-9a-f]{64})"', 'g') AS m
WHERE e.payload LIKE '%"$ref"%'
ON CONFLICT DO NOTHING;
-- Retention keeps a child's payloads while an ancestor is retained (its result may be a ref
-- to an aggregate of refs only the child's events name): the mark walks parent → children.
CREATE INDEX executions_by_parent ON executions (parent_execution_id);
