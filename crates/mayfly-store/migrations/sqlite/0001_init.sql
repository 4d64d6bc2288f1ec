-- The event log: append-only, hash-chained per execution. `position` is the global order.
CREATE TABLE events (
    position        INTEGER PRIMARY KEY AUTOINCREMENT,
    execution_id    TEXT    NOT NULL,
    seq             INTEGER NOT NULL,
    kind            TEXT    NOT NULL,
    step            TEXT,
    attempt         INTEGER,
    command_id      TEXT,
    at              INTEGER NOT NULL,
    actor           TEXT    NOT NULL,
    request_id      TEXT,
    playbook_digest TEXT    NOT NULL,
    payload         TEXT    NOT NULL,
    payload_ref     TEXT,
    prev_hash       TEXT    NOT NULL,
    hash            TEXT    NOT NULL,
    UNIQUE (execution_id, seq)
);

-- A completion for (command_id, attempt) is recorded at most once.
CREATE UNIQUE INDEX events_one_completion
    ON events (command_id, attempt)
    WHERE kind IN ('step.finished', 'step.failed') AND command_id IS NOT NULL;

-- Append-only: the log refuses edits and deletes at the database level.
CREATE TRIGGER events_no_update BEFORE UPDATE ON events
BEGIN SELECT RAISE(ABORT, 'the event log is append-only'); END;
CREATE TRIGGER events_no_delete BEFORE DELETE ON events
BEGIN SELECT RAISE(ABORT, 'the event log is append-only'); END;

-- Projection of executions (derived from events in the same transaction).
CREATE TABLE executions (
    execution_id        TEXT PRIMARY KEY,
    path                TEXT NOT NULL,
    playbook_digest     TEXT NOT NULL,
    status              TEXT NOT NULL,
    parent_execution_id TEXT,
    created_at          INTEGER NOT NULL,
    updated_at          INTEGER NOT NULL
);

-- Immutable playbook versions, addressed by content digest.
CREATE TABLE playbooks (
    digest      TEXT PRIMARY KEY,
    path        TEXT NOT NULL,
    source_name TEXT NOT NULL,
    content     TEXT NOT NULL,
    created_at  INTEGER NOT NULL
);

-- Durable commands (transactional outbox + embedded queue with leases).
CREATE TABLE commands (
    command_id   TEXT PRIMARY KEY,
    execution_id TEXT    NOT NULL,
    step         TEXT    NOT NULL,
    idx          INTEGER,
    state        TEXT    NOT NULL,
    deliveries   INTEGER NOT NULL DEFAULT 0,
    lease_until  INTEGER,
    worker       TEXT,
    created_at   INTEGER NOT NULL
);
CREATE INDEX commands_open ON commands (execution_id) WHERE state <> 'done';
