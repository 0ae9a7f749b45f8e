#!/usr/bin/env bash
# Section 7 of docs/benchmarks.md in one command: TimerDB on the Cassandra store with the
# Kafka sink, at each of $RATES, for each slot count in $SLOTS (a fresh keyspace per run),
# then Cassandra's own insert ceiling with timer-shaped rows, all in the same session.
#
#   loadtest/scripts/bench-cassandra.sh
#
# Starts the local Kafka and Cassandra of deploy/local if they are not running (and leaves
# them running). A freshly started Cassandra is slow for its first minute or two (the first
# runs after `up` fired late by seconds), so the script first warms both servers with an
# unreported run of $WARMUP. Settings (env): RATES, SLOTS, RUNS, DURATION, FIRE, BATCH,
# PORT, OUT, CEILING_CONCURRENCY (empty: not measured), WARMUP (empty: none), NODE (node
# binary). Each run also reports Cassandra's CPU use over the run (warm-up and
# measurement, as a share of one core).
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=SCRIPTDIR/lib.sh
source loadtest/scripts/lib.sh

RATES=${RATES:-"5000 10000"}
SLOTS=${SLOTS:-"1024 64"}
RUNS=${RUNS:-1}
DURATION=${DURATION:-20s}
FIRE=${FIRE:-1s..5s}
BATCH=${BATCH:-1000}
PORT=${PORT:-17430}
CEILING_CONCURRENCY=${CEILING_CONCURRENCY:-"64 256"}
WARMUP=${WARMUP-60s}
OUT=${OUT:-$TARGET_DIR/loadtest-reports/cassandra-$(date +%Y%m%d-%H%M%S)}
NODE=${NODE:-$RELEASE/timerdb}
LOADTEST=$RELEASE/timerdb-loadtest
CEILING=$RELEASE/timerdb-cql-ceiling
NODE_PID=

cargo build --release -p timerdb -p timerdb-loadtest
eval "$(deploy/local/up)"
mkdir -p "$OUT"
for t in 0 1 2 3; do
  deploy/local/kafka-tool topics --create --if-not-exists --topic "lt-$t" --partitions 8 >/dev/null
done

trap stop_node EXIT

echo "machine: $(nproc) cores; Kafka $TIMERDB_KAFKA; Cassandra $TIMERDB_SCYLLA" | tee "$OUT/summary.txt"
n=0
# One node on a fresh keyspace with $1 slots, then one loadtest run at $2/s for $3 into $4.
run() {
  local slots=$1 rate=$2 duration=$3 dir=$4 keyspace
  n=$((n + 1))
  keyspace="bench_$(date +%s)_$n"
  "$NODE" serve --listen "127.0.0.1:$PORT" --metrics-listen "127.0.0.1:$((PORT + 1))" --slots "$slots" \
    --store "scylla://$TIMERDB_SCYLLA/$keyspace" --sink "kafka://$TIMERDB_KAFKA" \
    >"$OUT/node-$n.log" 2>&1 &
  NODE_PID=$!
  for _ in $(seq 1 100); do
    grep -q "timerdb ready" "$OUT/node-$n.log" && break
    sleep 0.2
  done
  local cass_pid cass_before started
  cass_pid=$(cat "${TIMERDB_LOCAL_DIR:-/tmp/timerdb-local}/cassandra.pid" 2>/dev/null || echo 0)
  cass_before=$(cpu_seconds "$cass_pid")
  started=$(date +%s.%N)
  "$LOADTEST" steady --rate "$rate" --duration "$duration" --fire "$FIRE" --batch "$BATCH" \
    --target "127.0.0.1:$PORT" --kafka "$TIMERDB_KAFKA" --topic-prefix lt --topics 4 \
    --partitions 8 --server-pid "$NODE_PID" --no-progress --report-dir "$dir" || true
  python3 -c 'import sys, time; b, a, t = map(float, sys.argv[1:]); print(f"cassandra cpu: {100 * (a - b) / (time.time() - t):.0f} % of a core over the run")' \
    "$cass_before" "$(cpu_seconds "$cass_pid")" "$started"
  # The node's store calls over the run: count and mean time per operation.
  curl -sf "http://127.0.0.1:$((PORT + 1))/metrics" | python3 -c '
import re, sys
ops = {}
for line in sys.stdin:
    m = re.match(r"timerdb_store_operation_duration_seconds_(sum|count)\{[^}]*op=\"([a-z_]+)\"[^}]*\} (\S+)", line)
    if m:
        ops.setdefault(m.group(2), {})[m.group(1)] = float(m.group(3))
parts = []
for op, v in sorted(ops.items()):
    count, total = v.get("count", 0), v.get("sum", 0)
    if count:
        parts.append("%s %d x %.1f ms" % (op, count, 1000 * total / count))
print("store ops: " + ", ".join(parts))
' || echo "store ops: metrics not read"
  stop_node
}
if [[ -n "$WARMUP" ]]; then
  # shellcheck disable=SC2086 # split into words on purpose
  set -- $SLOTS $RATES
  echo "== warm-up, not reported: $WARMUP" | tee -a "$OUT/summary.txt"
  run "$1" "${@: -1}" "$WARMUP" "$OUT/warmup" >/dev/null
fi
for slots in $SLOTS; do
  for rate in $RATES; do
    for r in $(seq 1 "$RUNS"); do
      echo "== slots $slots, rate $rate, run $r" | tee -a "$OUT/summary.txt"
      run "$slots" "$rate" "$DURATION" "$OUT/slots-$slots/rate-$rate" | tee -a "$OUT/summary.txt"
    done
  done
done
for c in $CEILING_CONCURRENCY; do
  echo "== Cassandra's own ceiling, $c in flight" | tee -a "$OUT/summary.txt"
  "$CEILING" --scylla "$TIMERDB_SCYLLA" --duration "$DURATION" --concurrency "$c" | tee -a "$OUT/summary.txt"
done
for slots in $SLOTS; do
  echo "== slots $slots" | tee -a "$OUT/summary.txt"
  python3 loadtest/scripts/summarize.py "$OUT/slots-$slots" | tee -a "$OUT/summary.txt"
done
