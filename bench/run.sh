#!/usr/bin/env bash
# Side-by-side benchmark: mayfly (embedded; Postgres+NATS) vs NoETL vs DBOS.
#
#   bench/run.sh [--runs N] [--only mayfly,noetl,...] [--skip dbos-proc,...]
#                [--mayfly PATH] [--dbos-fanout start|queue] [--json FILE]
#
# Systems: mayfly, mayfly-shell, mayfly-dist, noetl, dbos, dbos-proc (see README.md).
# BENCH_ONLY / BENCH_SKIP / BENCH_RUNS in the environment do the same as the flags.
# Needs: the release binary (cargo build --release -p mayfly), python3 >= 3.10, psql;
# mayfly-dist and dbos need Postgres at 127.0.0.1:5432 (user postgres, trust auth) and
# mayfly-dist NATS JetStream at 127.0.0.1:4222 (BENCH_PG_HOST/PORT/USER, BENCH_NATS_URL).
# Prints one Markdown table on stdout; progress goes to stderr.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
venv="$here/.venv"
# Versions measured in README.md; override to try others.
NOETL_SPEC="${NOETL_SPEC:-noetl==5.3.2}"
DBOS_SPEC="${DBOS_SPEC:-dbos==3.4.0}"

args=()
[[ -n "${BENCH_RUNS:-}" ]] && args+=(--runs "$BENCH_RUNS")
[[ -n "${BENCH_ONLY:-}" ]] && args+=(--only "$BENCH_ONLY")
[[ -n "${BENCH_SKIP:-}" ]] && args+=(--skip "$BENCH_SKIP")
args+=("$@")

mayfly="$root/target/release/mayfly"
for ((i = 0; i < ${#args[@]}; i++)); do
  [[ "${args[$i]}" == "--mayfly" ]] && mayfly="${args[$((i + 1))]}"
done
if [[ ! -x "$mayfly" ]]; then
  echo "no mayfly binary at $mayfly: build it with 'cargo build --release -p mayfly'" >&2
  exit 2
fi

if [[ ! -x "$venv/bin/noetl" || ! -x "$venv/bin/python" ]] \
  || ! "$venv/bin/python" -c 'import dbos, psycopg' 2>/dev/null; then
  echo "setting up $venv ($NOETL_SPEC, $DBOS_SPEC)" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "$NOETL_SPEC" "$DBOS_SPEC"
fi

# compare.py stops and removes everything it started (servers, workers, databases, streams)
# on exit, error, Ctrl-C or SIGTERM; the trap forwards a signal to it.
"$venv/bin/python" "$here/compare.py" --mayfly "$mayfly" "${args[@]}" &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; exit 130' INT TERM HUP
wait "$pid"
