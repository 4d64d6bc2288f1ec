-- Compaction: the one sanctioned way events leave the log. The writer names a stream in
-- `compacting` inside the same transaction as the DELETE (after a snapshot event that
-- summarizes the range was appended) and clears it before committing; any other delete is
-- still refused by the database.
CREATE TABLE compacting (execution_id TEXT PRIMARY KEY);
DROP TRIGGER events_no_delete;
CREATE TRIGGER events_no_delete BEFORE DELETE ON events
WHEN NOT EXISTS (SELECT 1 FROM compacting WHERE execution_id = OLD.execution_id)
BEGIN SELECT RAISE(ABORT, 'the event log is append-only'); END;
