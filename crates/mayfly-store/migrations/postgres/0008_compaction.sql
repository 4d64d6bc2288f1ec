-- Compaction: the one sanctioned way events leave the log. The writer names a stream in
-- `compacting` inside the same transaction as the DELETE (after a snapshot event that
-- summarizes the range was appended) and clears it before committing; any other update or
-- delete is still refused by the database.
CREATE TABLE compacting (execution_id TEXT PRIMARY KEY);
CREATE OR REPLACE FUNCTION mayfly_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' AND EXISTS (SELECT 1 FROM compacting WHERE execution_id = OLD.execution_id) THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'the event log is append-only';
END $$;
