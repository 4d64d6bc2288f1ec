-- The log's identity, created with it: what scopes its command channel (NATS stream,
-- subjects, channel MAC key) so two deployments on one NATS never share work. Random, set
-- once; a copy of the database file is the same log.
CREATE TABLE log_identity (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    log_id     TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
INSERT INTO log_identity (id, log_id, created_at)
VALUES (1, lower(hex(randomblob(16))), CAST(strftime('%s', 'now') AS INTEGER) * 1000);
