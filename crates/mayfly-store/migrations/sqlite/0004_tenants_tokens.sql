-- Executions belong to a tenant; API tokens (hashed) grant a tenant-scoped role.
ALTER TABLE executions ADD COLUMN tenant TEXT NOT NULL DEFAULT 'default';
CREATE INDEX executions_by_tenant ON executions (tenant, created_at);
CREATE TABLE tokens (
    hash       TEXT PRIMARY KEY,
    tenant     TEXT    NOT NULL,
    role       TEXT    NOT NULL,
    name       TEXT    NOT NULL,
    created_at INTEGER NOT NULL
);
