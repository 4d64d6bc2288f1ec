#!/usr/bin/env python3
"""The three benchmark workloads as DBOS (Transact, Python) workflows on Postgres.

  chain1      a workflow of 1 step
  chain40     a workflow of 40 sequential steps
  fanout1000  a workflow of 1 step, then 1,000 child workflows (one step each) started
              concurrently and awaited

Every step is a trivial Python function (`result = 1`) run in this process; DBOS checkpoints
each step's output and each workflow's status in its system database (Postgres), so every
step is durable, as a mayfly step is.

Modes:
  measure [--runs N]   create a fresh database, launch DBOS once, warm up, then time each
                       workload N times inside this process (launch excluded); print JSON
                       {"chain1": [s, ...], ...}; drop the database at the end.
  once WORKLOAD        launch DBOS on --db, run WORKLOAD once, exit (for timing the whole
                       process from outside, like the other systems' CLIs).
  createdb / dropdb    create (fresh) or drop --db.

Fan-out (--fanout): `start` (default) calls DBOS.start_workflow for each item: each child
runs at once on DBOS's executor thread pool. `queue` enqueues each item on a DBOS queue with
--concurrency (default 64, mayfly's max_in_flight) and a 10 ms polling interval.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import psycopg

ADMIN_URL = os.environ.get("BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
WORKLOADS = ("chain1", "chain40", "fanout1000")


def db_url(name: str) -> str:
    base = ADMIN_URL.rsplit("/", 1)[0]
    return f"{base}/{name}"


def createdb(name: str) -> None:
    with psycopg.connect(ADMIN_URL, autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        c.execute(f'CREATE DATABASE "{name}"')


def dropdb(name: str) -> None:
    with psycopg.connect(ADMIN_URL, autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def setup(dbname: str, fanout_mode: str, concurrency: int):
    """Define the workflows, launch DBOS, and return {workload: callable}."""
    from dbos import DBOS

    DBOS(
        config={
            "name": "mayfly-bench",
            "system_database_url": db_url(dbname),
            "log_level": "WARNING",
        }
    )

    @DBOS.step()
    def trivial() -> int:
        result = 1
        return result

    @DBOS.workflow()
    def chain(n: int) -> int:
        total = 0
        for _ in range(n):
            total += trivial()
        return total

    @DBOS.workflow()
    def item(i: int) -> int:
        return trivial()

    queue_box: dict = {}

    @DBOS.workflow()
    def fanout(n: int) -> int:
        trivial()
        if fanout_mode == "queue":
            q = queue_box["q"]
            handles = [q.enqueue(item, i) for i in range(n)]
        else:
            handles = [DBOS.start_workflow(item, i) for i in range(n)]
        return sum(h.get_result() for h in handles)

    DBOS.launch()
    if fanout_mode == "queue":
        queue_box["q"] = DBOS.register_queue(
            "bench_fanout", worker_concurrency=concurrency, polling_interval_sec=0.01
        )

    def check(got: int, want: int) -> None:
        if got != want:
            raise RuntimeError(f"workflow returned {got}, expected {want}")

    return {
        "chain1": lambda: check(chain(1), 1),
        "chain40": lambda: check(chain(40), 40),
        "fanout1000": lambda: check(fanout(1000), 1000),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["measure", "once", "createdb", "dropdb"])
    p.add_argument("workload", nargs="?", choices=WORKLOADS)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--db", default="dbos_bench", help="database name (default dbos_bench)")
    p.add_argument("--fanout", choices=["start", "queue"], default="start")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--keep", action="store_true", help="measure: keep the database")
    a = p.parse_args()
    logging.getLogger("dbos").setLevel(logging.WARNING)

    if a.mode == "createdb":
        createdb(a.db)
        return 0
    if a.mode == "dropdb":
        dropdb(a.db)
        return 0

    from dbos import DBOS

    if a.mode == "once":
        if not a.workload:
            p.error("once needs a WORKLOAD")
        fns = setup(a.db, a.fanout, a.concurrency)
        try:
            fns[a.workload]()
        finally:
            DBOS.destroy()
        return 0

    # measure
    createdb(a.db)
    try:
        fns = setup(a.db, a.fanout, a.concurrency)
        try:
            for w in WORKLOADS:  # warm-up: connections, thread pool, plan caches
                fns[w]()
            out: dict[str, list[float]] = {w: [] for w in WORKLOADS}
            for _ in range(a.runs):
                for w in WORKLOADS:
                    t0 = time.perf_counter()
                    fns[w]()
                    out[w].append(time.perf_counter() - t0)
        finally:
            DBOS.destroy()
    finally:
        if not a.keep:
            dropdb(a.db)
    json.dump(out, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
