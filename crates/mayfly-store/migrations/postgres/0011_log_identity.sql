-- The log's identity, created with it: what scopes its command channel (NATS stream,
-- subjects, channel MAC key) so two deployments on one NATS never share work. Random, set
-- once (per schema: each schema is its own log).
CREATE TABLE log_identity (
    id         INT PRIMARY KEY CHECK (id = 1),
    log_id     TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
INSERT INTO log_identity (id, log_id, created_at)
VALUES (1, replace(gen_random_uuid()::text, '-', ''), (extract(epoch FROM now()) * 1000)::bigint);
