#!/usr/bin/env bash
# kill -9 under load, then restart: what is lost (must be nothing), what fires early (must
# be nothing), what is delivered again and how far back (the re-delivery window), and how
# long the restarted node takes to answer its first call.
#
#   RATES="10000 100000" RUNS=3 loadtest/scripts/crash.sh           # duplicates per crash
#   BACKLOG=10000000 RATES=100000 COUNT=100000 FIRE=fixed:10s KILL_AT=3s RUNS=1 \
#     DATA_DIR=target/crash-disk loadtest/scripts/crash.sh           # restart at scale
#
# Settings (env): RATES, RUNS, DURATION (or COUNT), FIRE, KILL_AT, DOWN_FOR, BACKLOG
# (far-future timers stored first), BATCH, DATA_DIR (a real disk for restart figures),
# PORT, OUT.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=SCRIPTDIR/lib.sh
source loadtest/scripts/lib.sh

RATES=${RATES:-"10000 100000"}
RUNS=${RUNS:-3}
DURATION=${DURATION:-20s}
COUNT=${COUNT:-}
FIRE=${FIRE:-1s..5s}
KILL_AT=${KILL_AT:-8s}
DOWN_FOR=${DOWN_FOR:-0s}
BACKLOG=${BACKLOG:-0}
BATCH=${BATCH:-1000}
DATA_DIR=${DATA_DIR:-/dev/shm/timerdb-crash}
PORT=${PORT:-17430}
OUT=${OUT:-$TARGET_DIR/loadtest-reports/crash-$(date +%Y%m%d-%H%M%S)}
NODE=$RELEASE/timerdb
LOADTEST=$RELEASE/timerdb-loadtest
SINK=$DATA_DIR/fired.jsonl
PIDFILE=$DATA_DIR/node.pid
NODE_PID=

cargo build --release -p timerdb -p timerdb-loadtest
mkdir -p "$OUT"

stop_and_clean() {
  if [[ -f "$PIDFILE" ]]; then
    kill "$(cat "$PIDFILE")" 2>/dev/null || true
    sleep 1
  fi
  rm -rf "$DATA_DIR"
}
trap stop_and_clean EXIT

# Starts the node in the background and records its pid; the restart command is the same
# line run again after the kill, followed by a wait for the first answered call.
start_line="$NODE serve --listen 127.0.0.1:$PORT --metrics-listen off \
  --store embedded://$(realpath -m "$DATA_DIR")/data --sink jsonl://$(realpath -m "$SINK") \
  >>$DATA_DIR/node.log 2>&1 & echo \$! > $PIDFILE"
# The killed process may take a moment to be gone (and release the store's file lock).
gone_line="while [ -e /proc/\$(cat $PIDFILE) ]; do sleep 0.005; done"
# Answered = any gRPC answer (NOT_FOUND for a made-up id): the node is serving. Counted
# from the start command; gives up after 120 s.
wait_line="t0=\$(date +%s%3N); n=0; until $NODE get 00000000000000000000000000000001 \
  --server 127.0.0.1:$PORT 2>&1 | grep -q 'not found'; do sleep 0.02; n=\$((n+1)); \
  [ \$n -lt 6000 ] || exit 1; done; echo \$(( \$(date +%s%3N) - t0 )) > $DATA_DIR/first-call-ms"

{
  echo "machine: $(nproc) cores; data dir $DATA_DIR ($(df -T "$(dirname "$(realpath -m "$DATA_DIR")")" | awk 'NR==2{print $2}'))"
  echo "node: $NODE ($(sha256sum "$NODE" | cut -c1-12)); kill at $KILL_AT, down $DOWN_FOR, backlog $BACKLOG"
} | tee "$OUT/machine.txt"

for rate in $RATES; do
  for run in $(seq 1 "$RUNS"); do
    rm -rf "$DATA_DIR"
    mkdir -p "$DATA_DIR"
    : > "$SINK"
    sh -c "$start_line"
    sleep 1
    args=(crash --target "127.0.0.1:$PORT" --jsonl "$SINK" --rate "$rate" --fire "$FIRE"
      --batch "$BATCH" --kill-at "$KILL_AT" --down-for "$DOWN_FOR" --no-progress
      --server-pid "$(cat "$PIDFILE")" --report-dir "$OUT"
      --restart-cmd "$gone_line; $start_line; $wait_line")
    if [[ -n "$COUNT" ]]; then args+=(--count "$COUNT"); else args+=(--duration "$DURATION"); fi
    if [[ "$BACKLOG" != 0 ]]; then args+=(--backlog-count "$BACKLOG"); fi
    echo "== rate $rate run $run"
    "$LOADTEST" "${args[@]}" | tee "$OUT/rate-$rate-run-$run.txt" || echo "run FAILED (see above)"
    echo "first call answered $(cat "$DATA_DIR/first-call-ms" 2>/dev/null || echo '?') ms after the restart command" \
      | tee -a "$OUT/rate-$rate-run-$run.txt"
    grep -E "open|repair" "$DATA_DIR/node.log" | tail -n 3 || true
    kill "$(cat "$PIDFILE")" 2>/dev/null || true
    sleep 2
  done
done
echo "reports in $OUT"
