#!/usr/bin/env bash
# A/B: two TimerDB node binaries under the same steady load, alternating run by run in one
# session, so the comparison is a ratio measured under the same machine conditions.
#
#   A=/path/to/old/timerdb B=target/release/timerdb RATES="60000 100000" RUNS=3 \
#     loadtest/scripts/ab.sh
#
# Settings (env): A, B (node binaries), RATES, RUNS, DURATION, FIRE, BATCH, DATA_DIR, PORT, OUT.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=SCRIPTDIR/lib.sh
source loadtest/scripts/lib.sh

A=${A:?set A to the first node binary}
B=${B:-$RELEASE/timerdb}
RATES=${RATES:-"60000 100000"}
RUNS=${RUNS:-3}
DURATION=${DURATION:-20s}
FIRE=${FIRE:-1s..5s}
BATCH=${BATCH:-1000}
DATA_DIR=${DATA_DIR:-/dev/shm/timerdb-ab}
PORT=${PORT:-17420}
OUT=${OUT:-$TARGET_DIR/loadtest-reports/ab-$(date +%Y%m%d-%H%M%S)}
LOADTEST=$RELEASE/timerdb-loadtest
SINK=$DATA_DIR/fired.jsonl
NODE_PID=

cargo build --release -p timerdb-loadtest
mkdir -p "$OUT"

stop_and_clean() {
  stop_node
  rm -rf "$DATA_DIR"
}
trap stop_and_clean EXIT

{
  echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); data dir $DATA_DIR"
  echo "A = $A ($(sha256sum "$A" | cut -c1-12))"
  echo "B = $B ($(sha256sum "$B" | cut -c1-12))"
} | tee "$OUT/summary.txt"

for rate in $RATES; do
  for _ in $(seq 1 "$RUNS"); do
    for side in A B; do
      stop_and_clean
      mkdir -p "$DATA_DIR"
      : > "$SINK"
      "${!side}" serve --listen "127.0.0.1:$PORT" --metrics-listen off \
        --store "embedded://$DATA_DIR/data" --sink "jsonl://$SINK" >"$OUT/node-$side.log" 2>&1 &
      NODE_PID=$!
      sleep 1
      "$LOADTEST" steady --rate "$rate" --duration "$DURATION" --fire "$FIRE" \
        --target "127.0.0.1:$PORT" --jsonl "$SINK" --server-pid "$NODE_PID" --batch "$BATCH" \
        --report-dir "$OUT/$side-rate-$rate" --no-progress | tee -a "$OUT/summary.txt" || true
    done
  done
done
stop_and_clean
for side in A B; do
  echo "== $side" | tee -a "$OUT/summary.txt"
  mkdir -p "$OUT/by-side/$side"
  for d in "$OUT"/"$side"-rate-*; do ln -sfn "$(realpath "$d")" "$OUT/by-side/$side/${d##*/"$side"-}"; done
  python3 loadtest/scripts/summarize.py "$OUT/by-side/$side" | tee -a "$OUT/summary.txt"
done
