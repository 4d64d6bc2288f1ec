-- Durable audit of refused requests (and, later, privileged actions). Append-only.
CREATE TABLE audit (
    id         BIGSERIAL PRIMARY KEY,
    at_ms      BIGINT NOT NULL,
    tenant     TEXT,
    actor      TEXT,
    action     TEXT   NOT NULL,
    outcome    TEXT   NOT NULL,
    detail     TEXT   NOT NULL,
    request_id TEXT   NOT NULL
);
CREATE INDEX audit_by_tenant ON audit (tenant, id);
CREATE FUNCTION mayfly_audit_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'audit is append-only';
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER audit_no_change BEFORE UPDATE OR DELETE ON audit
    FOR EACH ROW EXECUTE FUNCTION mayfly_audit_append_only();
