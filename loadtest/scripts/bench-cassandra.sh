#!/usr/bin/env bash
# Section 7 of docs/benchmarks.md in one command: TimerDB on the Cassandra store with the
# Kafka sink, at each of $RATES, for each slot count in $SLOTS (a fresh keyspace per run),
# then Cassandra's own insert ceiling with timer-shaped rows, all in the same session.
#
#   loadtest/scripts/bench-cassandra.sh
#
# Starts the local Kafka and Cassandra of deploy/local if they are not running (and leaves
# them running). Settings (env): RATES, SLOTS, RUNS, DURATION, FIRE, BATCH, PORT, OUT,
# CEILING_CONCURRENCY.
set -euo pipefail
cd "$(dirname "$0")/../.."

RATES=${RATES:-"5000 10000"}
SLOTS=${SLOTS:-"1024 64"}
RUNS=${RUNS:-1}
DURATION=${DURATION:-20s}
FIRE=${FIRE:-1s..5s}
BATCH=${BATCH:-1000}
PORT=${PORT:-17430}
CEILING_CONCURRENCY=${CEILING_CONCURRENCY:-"64 256"}
OUT=${OUT:-target/loadtest-reports/cassandra-$(date +%Y%m%d-%H%M%S)}
NODE=target/release/timerdb
LOADTEST=target/release/timerdb-loadtest
CEILING=target/release/timerdb-cql-ceiling
NODE_PID=

cargo build --release -p timerdb -p timerdb-loadtest
eval "$(deploy/local/up)"
mkdir -p "$OUT"
for t in 0 1 2 3; do
  deploy/local/kafka-tool topics --create --if-not-exists --topic "lt-$t" --partitions 8 >/dev/null
done

# shellcheck source=lib.sh
source loadtest/scripts/lib.sh
trap stop_node EXIT

echo "machine: $(nproc) cores; Kafka $TIMERDB_KAFKA; Cassandra $TIMERDB_SCYLLA" | tee "$OUT/summary.txt"
n=0
for slots in $SLOTS; do
  for rate in $RATES; do
    for run in $(seq 1 "$RUNS"); do
      n=$((n + 1))
      keyspace="bench_$(date +%s)_$n"
      "$NODE" serve --listen "127.0.0.1:$PORT" --metrics-listen off --slots "$slots" \
        --store "scylla://$TIMERDB_SCYLLA/$keyspace" --sink "kafka://$TIMERDB_KAFKA" \
        >"$OUT/node-$n.log" 2>&1 &
      NODE_PID=$!
      for _ in $(seq 1 100); do
        grep -q "timerdb ready" "$OUT/node-$n.log" && break
        sleep 0.2
      done
      echo "== slots $slots, rate $rate, run $run (keyspace $keyspace)" | tee -a "$OUT/summary.txt"
      "$LOADTEST" steady --rate "$rate" --duration "$DURATION" --fire "$FIRE" --batch "$BATCH" \
        --target "127.0.0.1:$PORT" --kafka "$TIMERDB_KAFKA" --topic-prefix lt --topics 4 \
        --partitions 8 --server-pid "$NODE_PID" --no-progress \
        --report-dir "$OUT/slots-$slots/rate-$rate" | tee -a "$OUT/summary.txt" || true
      stop_node
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
