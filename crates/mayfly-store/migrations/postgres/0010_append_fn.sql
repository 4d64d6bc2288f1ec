-- One round trip per group commit. A commit used to be about eight statements (BEGIN, the
-- append lock, the epoch check, the events, the projections, the commands, COMMIT), and
-- under load each round trip cost more than the work it carried. The writer now sends the
-- whole group as arrays to this function in one auto-committed statement; its plans are
-- prepared once per session.
--
-- Errors keep their meaning: a duplicate event or completion is a unique violation (23505);
-- a stale appender epoch raises MF001; a claim of a done or unknown command raises MF002.
CREATE FUNCTION mayfly_append(
    p_lock BIGINT,
    p_fence BIGINT,
    -- events, with the index of the caller's batch each belongs to
    e_job INT[], e_exec TEXT[], e_seq BIGINT[], e_kind TEXT[], e_step TEXT[],
    e_attempt BIGINT[], e_cmd TEXT[], e_at BIGINT[], e_actor TEXT[], e_req TEXT[],
    e_digest TEXT[], e_payload TEXT[], e_ref TEXT[], e_prev TEXT[], e_hash TEXT[],
    -- playbook versions (idempotent by digest)
    p_digest TEXT[], p_path TEXT[], p_source TEXT[], p_content TEXT[], p_at BIGINT,
    -- cache payloads named by the events (retention index)
    r_exec TEXT[], r_digest TEXT[],
    -- executions requested
    x_id TEXT[], x_path TEXT[], x_digest TEXT[], x_parent TEXT[], x_at BIGINT[], x_tenant TEXT[],
    -- the last status change of each execution
    s_id TEXT[], s_status TEXT[], s_at BIGINT[],
    -- commands: issued, claimed, extended, done
    c_id TEXT[], c_exec TEXT[], c_step TEXT[], c_idx BIGINT[], c_at BIGINT,
    k_id TEXT[], k_worker TEXT[], k_lease BIGINT[], k_deliveries BIGINT[],
    l_id TEXT[], l_lease BIGINT[],
    d_id TEXT[]
) RETURNS TABLE (job INT, last_position BIGINT) LANGUAGE plpgsql
-- The commands table holds only open commands (tens of rows) but churns several row versions
-- per command between two vacuums. A plan cached while the table looked small would scan
-- every dead version on each call; lookups by key must go through the key.
SET enable_seqscan = off
AS $$
DECLARE
    current_epoch BIGINT;
    n BIGINT;
BEGIN
    -- Serialize appenders (across processes) so positions become visible in order.
    PERFORM pg_advisory_xact_lock(p_lock);
    IF p_fence > 0 THEN
        SELECT epoch INTO current_epoch FROM appender WHERE id = 1;
        IF current_epoch IS DISTINCT FROM p_fence THEN
            RAISE EXCEPTION 'another process took over this log (appender epoch %, ours %)',
                current_epoch, p_fence USING ERRCODE = 'MF001';
        END IF;
    END IF;
    -- Most groups touch a few of these tables: a statement over empty arrays still costs
    -- its executor start, so each runs only when it has rows.
    IF cardinality(e_job) > 0 THEN
        RETURN QUERY
        WITH ins AS (
            INSERT INTO events (execution_id, seq, kind, step, attempt, command_id, at, actor,
                                request_id, playbook_digest, payload, payload_ref, prev_hash, hash)
            SELECT * FROM unnest(e_exec, e_seq, e_kind, e_step, e_attempt, e_cmd, e_at, e_actor,
                                 e_req, e_digest, e_payload, e_ref, e_prev, e_hash)
            RETURNING execution_id, seq, position
        )
        SELECT j.job, max(ins.position)
        FROM ins JOIN unnest(e_exec, e_seq, e_job) AS j (x, s, job)
            ON ins.execution_id = j.x AND ins.seq = j.s
        GROUP BY j.job;
    END IF;
    IF cardinality(p_digest) > 0 THEN
        INSERT INTO playbooks (digest, path, source_name, content, created_at)
        SELECT d, p, s, c, p_at FROM unnest(p_digest, p_path, p_source, p_content) AS t (d, p, s, c)
        ON CONFLICT (digest) DO NOTHING;
    END IF;
    IF cardinality(r_exec) > 0 THEN
        INSERT INTO cache_refs (execution_id, digest)
        SELECT * FROM unnest(r_exec, r_digest)
        ON CONFLICT DO NOTHING;
    END IF;
    IF cardinality(x_id) > 0 THEN
        INSERT INTO executions (execution_id, path, playbook_digest, status,
                                parent_execution_id, created_at, updated_at, tenant)
        SELECT i, p, d, 'pending', par, a, a, t
        FROM unnest(x_id, x_path, x_digest, x_parent, x_at, x_tenant) AS u (i, p, d, par, a, t)
        ON CONFLICT (execution_id) DO NOTHING;
    END IF;
    IF cardinality(s_id) > 0 THEN
        UPDATE executions SET status = u.st, updated_at = u.a
        FROM unnest(s_id, s_status, s_at) AS u (i, st, a)
        WHERE executions.execution_id = u.i;
    END IF;
    IF cardinality(c_id) > 0 THEN
        INSERT INTO commands (command_id, execution_id, step, idx, state, deliveries, created_at)
        SELECT i, x, s, ix, 'pending', 0, c_at
        FROM unnest(c_id, c_exec, c_step, c_idx) AS u (i, x, s, ix);
    END IF;
    IF cardinality(k_id) > 0 THEN
        UPDATE commands SET state = 'claimed', worker = u.w, lease_until = u.l, deliveries = u.d
        FROM unnest(k_id, k_worker, k_lease, k_deliveries) AS u (i, w, l, d)
        WHERE commands.command_id = u.i AND commands.state <> 'done';
        GET DIAGNOSTICS n = ROW_COUNT;
        IF n <> cardinality(k_id) THEN
            RAISE EXCEPTION '% of % claimed commands are done or unknown',
                cardinality(k_id) - n, cardinality(k_id) USING ERRCODE = 'MF002';
        END IF;
    END IF;
    IF cardinality(l_id) > 0 THEN
        UPDATE commands SET lease_until = u.l
        FROM unnest(l_id, l_lease) AS u (i, l)
        WHERE commands.command_id = u.i AND commands.state = 'claimed';
    END IF;
    IF cardinality(d_id) > 0 THEN
        DELETE FROM commands WHERE command_id = ANY (d_id);
    END IF;
END $$;

-- A claim rewrites a command's state, worker and lease in place. With no index naming those
-- columns (the partial index did, in its predicate) the update is HOT: no new index entries,
-- and the room left on each page keeps the new version beside the old.
DROP INDEX commands_open;
CREATE INDEX commands_by_execution ON commands (execution_id);
ALTER TABLE commands SET (fillfactor = 50);
