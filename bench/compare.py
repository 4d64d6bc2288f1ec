#!/usr/bin/env python3
"""Side-by-side benchmark: mayfly (embedded, and Postgres+NATS) vs NoETL vs DBOS.

Run through bench/run.sh, which sets up the venv; see bench/README.md for what is measured.
Every figure is the median of --runs runs; the runs of the three workloads are interleaved
(run 1 of each, then run 2 of each, ...) so that drift of a shared machine hits all three.

  1-step wall       T(chain1)
  per-step overhead (T(chain40) - T(chain1)) / 39
  fan-out           1000 / (T(fanout1000) - T(chain1))   items/s
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WL = HERE / "workloads"
WORKLOADS = ("chain1", "chain40", "fanout1000")
FANOUT = 1000
CHAIN = 40

SYSTEMS = {
    # key: (label, kind of step)
    "mayfly": "mayfly embedded (SQLite log)",
    "mayfly-shell": "mayfly embedded, shell steps",
    "mayfly-dist": "mayfly Postgres+NATS, 4 workers",
    "noetl": "NoETL local runtime, shell steps",
    "dbos": "DBOS, in-process (launch excluded)",
    "dbos-proc": "DBOS, whole process",
}
DEFAULT_ORDER = ["mayfly", "mayfly-shell", "mayfly-dist", "noetl", "dbos", "dbos-proc"]
ALIASES = {"dist": "mayfly-dist", "postgres": "mayfly-dist", "pg": "mayfly-dist"}

PG_HOST = os.environ.get("BENCH_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("BENCH_PG_PORT", "5432"))
PG_USER = os.environ.get("BENCH_PG_USER", "postgres")
NATS_URL = os.environ.get("BENCH_NATS_URL", "nats://127.0.0.1:4222")
DIST_WORKERS = int(os.environ.get("BENCH_WORKERS", "4"))
POLL_S = 0.005  # mayfly-dist: how often the execution list is polled for the end


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Failed(Exception):
    pass


# ---------------------------------------------------------------- timing helpers


def time_cmd(argv: list[str], *, cwd: Path | None = None, check=None,
             env: dict | None = None) -> float:
    """Wall seconds of one whole command (process start included); it must exit 0, and
    check(stdout), if given, must return None (else the reason it failed)."""
    t0 = time.perf_counter()
    p = subprocess.run(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    dt = time.perf_counter() - t0
    out = p.stdout.decode(errors="replace") + p.stderr.decode(errors="replace")
    why = f"exit {p.returncode}" if p.returncode != 0 else (check(out) if check else None)
    if why:
        tail = out[-2000:]
        raise Failed(f"{' '.join(argv)} failed ({why}):\n{tail}")
    return dt


def interleave(runs: int, one) -> dict[str, list[float]]:
    """Call one(workload) -> seconds, runs times per workload, interleaved."""
    times: dict[str, list[float]] = {w: [] for w in WORKLOADS}
    for r in range(runs):
        for w in WORKLOADS:
            times[w].append(one(w))
        log(f"    run {r + 1}/{runs}: " + ", ".join(f"{w} {times[w][-1] * 1000:.0f} ms" for w in WORKLOADS))
    return times


def figures(times: dict[str, list[float]]) -> dict:
    med = {w: statistics.median(v) for w, v in times.items()}
    t1, t40, tf = med["chain1"], med["chain40"], med["fanout1000"]
    per_step = (t40 - t1) / (CHAIN - 1) * 1000.0
    fan = FANOUT / (tf - t1) if tf > t1 else float("inf")
    return {"median_s": med, "runs_s": times, "one_step_ms": t1 * 1000.0,
            "per_step_ms": per_step, "fanout_items_per_s": fan}


# ---------------------------------------------------------------- postgres / nats helpers


def psql(sql: str) -> None:
    subprocess.run(["psql", "-h", PG_HOST, "-p", str(PG_PORT), "-U", PG_USER, "-d", "postgres",
                    "-v", "ON_ERROR_STOP=1", "-qAtc", sql],
                   check=True, stdout=subprocess.DEVNULL,
                   env=dict(os.environ, PGOPTIONS="-c client_min_messages=warning"))


def pg_commit_ms(n: int = 200) -> float | None:
    """Median latency of a 1-row INSERT commit (synchronous_commit as configured): the
    fsync cost that every durable step here pays at least once."""
    try:
        import psycopg
    except ImportError:
        return None
    name = f"mayfly_cmp_probe_{os.getpid()}"
    admin = f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/postgres"
    try:
        psql(f'CREATE DATABASE "{name}"')
    except subprocess.CalledProcessError:
        return None
    try:
        with psycopg.connect(f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}", autocommit=True) as c:
            c.execute("CREATE TABLE t (x int)")
            lat = []
            for i in range(n):
                t0 = time.perf_counter()
                c.execute("INSERT INTO t VALUES (%s)", (i,))
                lat.append(time.perf_counter() - t0)
            return statistics.median(lat) * 1000.0
    except Exception:
        return None
    finally:
        psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def nats_request(subject: str, payload: bytes = b"", timeout: float = 5.0) -> bytes:
    """One request/reply over the plain NATS text protocol (no client library needed)."""
    m = re.match(r"nats://([^:/]+):(\d+)", NATS_URL)
    if not m:
        raise Failed(f"cannot parse NATS url {NATS_URL}")
    with socket.create_connection((m.group(1), int(m.group(2))), timeout=timeout) as s:
        f = s.makefile("rb")
        f.readline()  # INFO
        inbox = f"_INBOX.bench.{uuid.uuid4().hex}"
        s.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\n'
                  + f"SUB {inbox} 1\r\nPUB {subject} {inbox} {len(payload)}\r\n".encode()
                  + payload + b"\r\n")
        while True:
            line = f.readline()
            if not line:
                raise Failed("NATS closed the connection")
            if line.startswith(b"PING"):
                s.sendall(b"PONG\r\n")
            elif line.startswith(b"-ERR"):
                raise Failed(f"NATS: {line.decode().strip()}")
            elif line.startswith(b"MSG"):
                n = int(line.split()[-1])
                return f.read(n + 2)[:n]


def nats_delete_stream(name: str) -> None:
    try:
        reply = json.loads(nats_request(f"$JS.API.STREAM.DELETE.{name}"))
    except (OSError, Failed, ValueError) as e:
        log(f"warning: could not delete JetStream stream {name}: {e}")
        return
    err = reply.get("error")
    if err and err.get("err_code") != 10059:  # 10059: stream not found
        log(f"warning: deleting JetStream stream {name}: {err}")


# ---------------------------------------------------------------- the systems


class Bench:
    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.mayfly = str(Path(a.mayfly).resolve())
        self.venv_bin = HERE / ".venv" / "bin"
        self.tmp = Path(tempfile.mkdtemp(prefix="mayfly-cmp-"))
        # mayfly starts `python3` from PATH for its python steps. Point that at the real
        # interpreter (this venv's base python): a version-manager shim (pyenv's is a bash
        # script) would add ~150 ms to every interpreter start.
        self.pybin = Path(tempfile.mkdtemp(prefix="mayfly-cmp-bin-"))
        (self.pybin / "python3").symlink_to(Path(sys.executable).resolve())
        self.cleanups_final = [lambda: shutil.rmtree(self.pybin, ignore_errors=True)]
        self.procs: list[subprocess.Popen] = []
        self.cleanups: list = []

    # -- cleanup: processes we started (by pid), temp databases, streams, temp dir
    def cleanup(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        deadline = time.time() + 5
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()
        while self.cleanups:
            fn = self.cleanups.pop()
            try:
                fn()
            except Exception as e:  # keep cleaning
                log(f"warning: cleanup step failed: {e}")
        shutil.rmtree(self.tmp, ignore_errors=True)

    def final_cleanup(self) -> None:
        self.cleanup()
        for fn in self.cleanups_final:
            fn()

    def mayfly_env(self, **extra: str) -> dict:
        env = dict(os.environ, MAYFLY_HOME=str(self.tmp / "home"), **extra)
        env["PATH"] = f"{self.pybin}{os.pathsep}{env.get('PATH', '')}"
        env.pop("MAYFLY_URL", None)
        env.pop("MAYFLY_TOKEN", None)
        return env

    # -- A. mayfly embedded
    def run_mayfly(self, subdir: str = "") -> dict:
        d = WL / subdir if subdir else WL
        env = self.mayfly_env()
        return figures(interleave(self.a.runs, lambda w: time_cmd(
            [self.mayfly, "run", str(d / f"{w}.yaml"), "--quiet"], cwd=self.tmp, env=env)))

    # -- B. mayfly server + workers over Postgres and NATS JetStream
    def run_mayfly_dist(self) -> dict:
        tag = f"{os.getpid()}_{int(time.time())}"
        dbname = f"mayfly_bench_{tag}"
        stream = f"MAYFLY_CMP_{tag}"
        psql(f'CREATE DATABASE "{dbname}"')
        self.cleanups.append(lambda: psql(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)'))
        self.cleanups.append(lambda: nats_delete_stream(stream))
        self.cleanups.append(lambda: nats_delete_stream(f"OBJ_{stream}-cache"))
        env = self.mayfly_env(MAYFLY_LOG="error")
        db = f"postgres://{PG_USER}@{PG_HOST}:{PG_PORT}/{dbname}"
        server_log = self.tmp / "server.log"
        with open(server_log, "wb") as errf:
            self.procs.append(subprocess.Popen(
                [self.mayfly, "server", "--db", db, "--queue", NATS_URL, "--queue-name", stream,
                 "--listen", "127.0.0.1:0"],
                cwd=self.tmp, env=env, stdin=subprocess.DEVNULL, stdout=errf, stderr=errf))
        token = url = None
        deadline = time.time() + 60
        while url is None:
            if self.procs[-1].poll() is not None or time.time() > deadline:
                raise Failed("mayfly server did not become ready:\n" + server_log.read_text()[-2000:])
            for line in server_log.read_text(errors="replace").splitlines():
                if line.startswith("admin token"):
                    token = line.rsplit(" ", 1)[-1]
                elif line.startswith("mayfly gateway on "):
                    url = next(w for w in line.split() if w.startswith("http://"))
            time.sleep(0.05)
        if not token:
            raise Failed("the server printed no admin token (not a fresh database?)")
        log(f"    server ready at {url}; starting {DIST_WORKERS} workers")
        for i in range(DIST_WORKERS):
            wl = open(self.tmp / f"worker{i}.log", "wb")
            self.procs.append(subprocess.Popen(
                [self.mayfly, "worker", "--queue", NATS_URL, "--queue-name", stream,
                 "--id", f"bench{i}"],
                cwd=self.tmp, env=env, stdin=subprocess.DEVNULL, stdout=wl, stderr=wl))
            wl.close()

        def call(method: str, path: str, body: bytes | None = None, ctype="application/json"):
            req = urllib.request.Request(url + path, data=body, method=method, headers={
                "Authorization": f"Bearer {token}", "Content-Type": ctype})
            return urllib.request.urlopen(req, timeout=300)

        for w in WORKLOADS:
            with call("POST", "/v1/playbooks", (WL / f"{w}.yaml").read_bytes(), "application/yaml") as r:
                r.read()
        # Warm-up, untimed: the workers connect and their python pools start (a service
        # runs warm; DBOS gets the same warm-up in its process).
        for w in WORKLOADS:
            self.dist_one(call, w)

        def one(w: str) -> float:
            dead = [p.args[1] for p in self.procs if p.poll() is not None]
            if dead:
                raise Failed(f"a mayfly process exited: {dead}")
            return self.dist_one(call, w)

        return figures(interleave(self.a.runs, one))

    @staticmethod
    def dist_one(call, w: str) -> float:
        """POST /v1/executions, then poll the execution list (one cheap row read) every
        POLL_S until the execution has left `running`."""
        t0 = time.perf_counter()
        with call("POST", "/v1/executions", json.dumps({"path": f"bench/{w}"}).encode()) as r:
            eid = json.loads(r.read())["execution_id"]
        while True:
            with call("GET", "/v1/executions?limit=20") as r:
                rows = json.loads(r.read())["executions"]
            row = next((x for x in rows if x["execution_id"] == eid), None)
            if row is None:
                raise Failed(f"execution {eid} is not in the execution list")
            if row["status"] in ("completed", "failed", "cancelled"):
                break
            time.sleep(POLL_S)
        dt = time.perf_counter() - t0
        if row["status"] != "completed":
            with call("GET", f"/v1/executions/{eid}") as r:
                st = json.loads(r.read())
            raise Failed(f"execution {eid} of {w} ended {row['status']}: {json.dumps(st.get('error'))}")
        return dt

    # -- C. NoETL local runtime
    def run_noetl(self) -> dict:
        noetl = str(self.venv_bin / "noetl")
        # It exits 0 even when it skips a step whose tool it does not support, so every
        # step's "Step:" line is counted.
        want = {"chain1": 1, "chain40": CHAIN, "fanout1000": 1 + FANOUT}

        def one(w: str) -> float:
            def check(out: str):
                n = out.count("Step: ")
                if "not supported" in out or n != want[w]:
                    return f"ran {n} of {want[w]} steps"
                return None
            return time_cmd([noetl, "run", str(WL / "noetl" / f"{w}.yaml"), "--runtime", "local"],
                            cwd=self.tmp, check=check)

        return figures(interleave(self.a.runs, one))

    # -- D. DBOS
    def run_dbos(self) -> dict:
        dbname = f"dbos_bench_{os.getpid()}"
        self.cleanups.append(lambda: psql(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)'))
        p = subprocess.run([str(self.venv_bin / "python"), str(HERE / "dbos_bench.py"), "measure",
                            "--runs", str(self.a.runs), "--db", dbname, "--fanout", self.a.dbos_fanout],
                           cwd=self.tmp, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
        if p.returncode != 0:
            raise Failed("dbos_bench.py failed:\n" + p.stderr.decode(errors="replace")[-2000:])
        times = json.loads(p.stdout.decode().strip().splitlines()[-1])
        for r in range(self.a.runs):
            log(f"    run {r + 1}/{self.a.runs}: " + ", ".join(
                f"{w} {times[w][r] * 1000:.0f} ms" for w in WORKLOADS))
        return figures(times)

    def run_dbos_proc(self) -> dict:
        dbname = f"dbos_bench_proc_{os.getpid()}"
        py, script = str(self.venv_bin / "python"), str(HERE / "dbos_bench.py")
        base = [py, script, "--db", dbname, "--fanout", self.a.dbos_fanout]
        self.cleanups.append(lambda: psql(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)'))
        subprocess.run([py, script, "createdb", "--db", dbname], check=True)
        # One untimed run creates DBOS's schema, so that no timed run pays for migrations.
        time_cmd(base + ["once", "chain1"], cwd=self.tmp)
        return figures(interleave(self.a.runs, lambda w: time_cmd(base + ["once", w], cwd=self.tmp)))


# ---------------------------------------------------------------- report


def sqlite_commit_ms(n: int = 200) -> float | None:
    """Median latency of a 1-row INSERT commit in SQLite, WAL mode, synchronous=FULL (the
    settings of mayfly's embedded log), in a temporary directory on this disk."""
    import sqlite3
    d = tempfile.mkdtemp(prefix="mayfly-cmp-sqlite-")
    try:
        c = sqlite3.connect(os.path.join(d, "probe.db"), isolation_level=None)
        c.execute("PRAGMA journal_mode=WAL")
        c.execute("PRAGMA synchronous=FULL")
        c.execute("CREATE TABLE t (x int)")
        lat = []
        for i in range(n):
            t0 = time.perf_counter()
            c.execute("INSERT INTO t VALUES (?)", (i,))
            lat.append(time.perf_counter() - t0)
        c.close()
        return statistics.median(lat) * 1000.0
    except Exception:
        return None
    finally:
        shutil.rmtree(d, ignore_errors=True)


def span(xs: list) -> str | None:
    """'a–b' of the probe values that worked (before and after the runs), or None."""
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    return f"{xs[0]:.2f}" if f"{xs[0]:.2f}" == f"{xs[-1]:.2f}" else f"{xs[0]:.2f}–{xs[-1]:.2f}"


def machine_line(commit_ms: list | None = None, sqlite_ms: list | None = None) -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = []
    if span(sqlite_ms or []):
        parts.append(f"SQLite (WAL, synchronous=FULL) {span(sqlite_ms)} ms")
    if span(commit_ms or []):
        parts.append(f"Postgres (synchronous_commit=on) {span(commit_ms)} ms")
    pg = f"; 1-row commit latency before/after the runs: {', '.join(parts)}" if parts else ""
    return (f"Machine: {os.cpu_count()} CPUs ({model}), {mem} RAM, "
            f"{platform.system()} {platform.release()}{pg}; {now}")


def fmt(x: float | None, digits: int) -> str:
    if x is None:
        return "—"
    if x == float("inf"):
        return "∞"
    return f"{x:,.{digits}f}"


def table(results: dict, runs: int, commit_ms: list | None = None,
          sqlite_ms: list | None = None) -> str:
    base = results.get("mayfly")
    out = [
        f"| system | 1-step wall (ms) | per-step overhead (ms) | fan-out (items/s) "
        f"| per-step overhead vs mayfly embedded | fan-out vs mayfly embedded |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key, r in results.items():
        label = SYSTEMS[key]
        if "error" in r:
            out.append(f"| {label} | failed: {r['error']} | | | | |")
            continue
        rp = rf = "—"
        if base and "error" not in base:
            rp = f"{r['per_step_ms'] / base['per_step_ms']:.2f}×" if base["per_step_ms"] > 0 else "—"
            rf = f"{r['fanout_items_per_s'] / base['fanout_items_per_s']:.2f}×"
        out.append(f"| {label} | {fmt(r['one_step_ms'], 1)} | {fmt(r['per_step_ms'], 2)} "
                   f"| {fmt(r['fanout_items_per_s'], 0)} | {rp} | {rf} |")
    out.append("")
    out.append(f"Median of {runs} run{'s' if runs != 1 else ''}. Per-step overhead = (T(chain40) − T(chain1)) / 39; "
               f"fan-out = 1000 / (T(fanout1000) − T(chain1)). "
               "“vs mayfly embedded”: this system's figure ÷ mayfly embedded's "
               "(per-step: higher is slower; fan-out: lower is slower).")
    out.append(machine_line(commit_ms, sqlite_ms))
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--only", default="", help="comma list of: " + ",".join(DEFAULT_ORDER))
    p.add_argument("--skip", default="", help="comma list of systems to leave out")
    p.add_argument("--mayfly", default=str(ROOT / "target" / "release" / "mayfly"))
    p.add_argument("--dbos-fanout", choices=["start", "queue"], default="start")
    p.add_argument("--json", help="also write every measured time to this file")
    a = p.parse_args()
    if a.runs < 1:
        p.error("--runs must be at least 1")

    def keys(s: str) -> list[str]:
        out = []
        for k in filter(None, (x.strip() for x in s.split(","))):
            k = ALIASES.get(k, k)
            if k == "dbos-all":
                out += ["dbos", "dbos-proc"]
            elif k not in SYSTEMS:
                p.error(f"unknown system {k!r}; known: {', '.join(DEFAULT_ORDER)}")
            else:
                out.append(k)
        return out

    only = keys(a.only)
    skip = set(keys(a.skip))
    chosen = [k for k in DEFAULT_ORDER if (not only or k in only) and k not in skip]
    # mayfly embedded is the baseline of the ratios: always measured when any ratio is wanted.
    if "mayfly" not in chosen:
        log("note: mayfly embedded is not selected; the ratio columns stay empty")

    b = Bench(a)

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    results: dict = {}
    # Commit latency (fsync) of this disk, before and after the runs: it bounds every durable
    # step, and on a shared VM it moves a lot.
    commit_ms: list = []
    sqlite_ms: list = []

    def probe() -> None:
        if {"mayfly-dist", "dbos", "dbos-proc"} & set(chosen):
            commit_ms.append(pg_commit_ms())
        if {"mayfly", "mayfly-shell"} & set(chosen):
            sqlite_ms.append(sqlite_commit_ms())

    runners = {
        "mayfly": lambda: b.run_mayfly(),
        "mayfly-shell": lambda: b.run_mayfly("shell"),
        "mayfly-dist": b.run_mayfly_dist,
        "noetl": b.run_noetl,
        "dbos": b.run_dbos,
        "dbos-proc": b.run_dbos_proc,
    }
    try:
        probe()
        for k in chosen:
            log(f"== {SYSTEMS[k]}")
            try:
                results[k] = runners[k]()
            except (Failed, subprocess.CalledProcessError, urllib.error.URLError, OSError) as e:
                log(f"   FAILED: {e}")
                results[k] = {"error": str(e).splitlines()[0][:120]}
            finally:
                b.cleanup()
                b.tmp.mkdir(parents=True, exist_ok=True)
        probe()
    finally:
        b.final_cleanup()
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": machine_line(commit_ms, sqlite_ms),
                                            "runs": a.runs, "results": results}, indent=2))
    print(table(results, a.runs, commit_ms, sqlite_ms))
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as e:
        log(f"interrupted ({e or 'Ctrl-C'}); everything started was stopped and removed")
        sys.exit(130)
