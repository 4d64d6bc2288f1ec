-- The event log: append-only, hash-chained per execution. `position` is the global order;
-- appenders hold a transaction-level advisory lock, so positions become visible in order and
-- a tail reading `position > last` never skips a row committed late.
CREATE TABLE events (
    position        BIGSERIAL PRIMARY KEY,
    execution_id    TEXT    NOT NULL,
    seq             BIGINT  NOT NULL,
    kind            TEXT    NOT NULL,
    step            TEXT,
    attempt         BIGINT,
    command_id      TEXT,
    at              BIGINT  NOT NULL,
    actor           TEXT    NOT NULL,
    request_id      TEXT,
    playbook_digest TEXT    NOT NULL,
    payload         TEXT    NOT NULL,
    payload_ref     TEXT,
    prev_hash       TEXT    NOT NULL,
    hash            TEXT    NOT NULL,
    UNIQUE (execution_id, seq)
);

CREATE UNIQUE INDEX events_one_completion
    ON events (command_id, attempt)
    WHERE kind IN ('step.finished', 'step.failed') AND command_id IS NOT NULL;

CREATE FUNCTION mayfly_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the event log is append-only';
END $$;
CREATE TRIGGER events_no_update BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION mayfly_events_append_only();

CREATE TABLE executions (
    execution_id        TEXT PRIMARY KEY,
    path                TEXT   NOT NULL,
    playbook_digest     TEXT   NOT NULL,
    status              TEXT   NOT NULL,
    parent_execution_id TEXT,
    created_at          BIGINT NOT NULL,
    updated_at          BIGINT NOT NULL
);

CREATE TABLE playbooks (
    digest      TEXT PRIMARY KEY,
    path        TEXT   NOT NULL,
    source_name TEXT   NOT NULL,
    content     TEXT   NOT NULL,
    created_at  BIGINT NOT NULL
);

CREATE TABLE commands (
    command_id   TEXT PRIMARY KEY,
    execution_id TEXT   NOT NULL,
    step         TEXT   NOT NULL,
    idx          BIGINT,
    state        TEXT   NOT NULL,
    deliveries   BIGINT NOT NULL DEFAULT 0,
    lease_until  BIGINT,
    worker       TEXT,
    created_at   BIGINT NOT NULL,
    ord          BIGSERIAL
);
CREATE INDEX commands_open ON commands (execution_id) WHERE state <> 'done';
