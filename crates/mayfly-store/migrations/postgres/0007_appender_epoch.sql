-- Fencing token of the log's appender. A process that becomes the appender bumps `epoch`
-- (under the append lock) and every append checks it still holds the current one, so a
-- process that lost the appender lock without noticing yet writes nothing.
CREATE TABLE appender (
    id    INT PRIMARY KEY CHECK (id = 1),
    epoch BIGINT NOT NULL
);
INSERT INTO appender (id, epoch) VALUES (1, 0);
