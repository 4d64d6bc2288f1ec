-- The catalog: immutable, numbered versions of playbooks per tenant and path. Content lives
-- in `playbooks` (by digest); registering identical content again is a no-op.
CREATE TABLE catalog (
    tenant     TEXT    NOT NULL,
    path       TEXT    NOT NULL,
    version    BIGINT  NOT NULL,
    digest     TEXT    NOT NULL,
    created_at BIGINT  NOT NULL,
    PRIMARY KEY (tenant, path, version),
    UNIQUE (tenant, path, digest)
);
