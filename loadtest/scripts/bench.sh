#!/usr/bin/env bash
# The benchmarks of docs/benchmarks.md: one TimerDB node (embedded store, JSON-lines sink)
# on loopback, driven by timerdb-loadtest.
#
#   loadtest/scripts/bench.sh rates    # steady at each of $RATES, $RUNS runs each, medians
#   loadtest/scripts/bench.sh backlog  # steady on an empty store, then with $BACKLOG stored
#   loadtest/scripts/bench.sh burst    # $BURST_COUNTS timers each all due in one millisecond
#
# Settings (env): DATA_DIR (node data and sink file; default on tmpfs), RATES, RUNS,
# DURATION, FIRE, BATCH, BACKLOG, BACKLOG_RATE, STEADY_RATE, BURST_COUNTS, BURST_RATE, PORT,
# OUT (report dir).
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=SCRIPTDIR/lib.sh
source loadtest/scripts/lib.sh

MODE=${1:-rates}
DATA_DIR=${DATA_DIR:-/dev/shm/timerdb-bench}
RATES=${RATES:-"10000 20000 30000 40000 50000"}
RUNS=${RUNS:-3}
DURATION=${DURATION:-20s}
FIRE=${FIRE:-1s..5s}
BATCH=${BATCH:-1000}
BACKLOG=${BACKLOG:-10000000}
BACKLOG_RATE=${BACKLOG_RATE:-1000000}
STEADY_RATE=${STEADY_RATE:-10000}
BURST_COUNTS=${BURST_COUNTS:-"100000 1000000"}
BURST_RATE=${BURST_RATE:-50000}
PORT=${PORT:-17420}
OUT=${OUT:-$TARGET_DIR/loadtest-reports/$MODE-$(date +%Y%m%d-%H%M%S)}

cargo build --release -p timerdb -p timerdb-loadtest
NODE=$RELEASE/timerdb
LOADTEST=$RELEASE/timerdb-loadtest
SINK=$DATA_DIR/fired.jsonl
mkdir -p "$OUT"
NODE_PID=

start_node() {
  stop_node
  rm -rf "$DATA_DIR"
  mkdir -p "$DATA_DIR"
  : > "$SINK"
  "$NODE" serve --listen "127.0.0.1:$PORT" --metrics-listen off \
    --store "embedded://$DATA_DIR/data" --sink "jsonl://$SINK" >"$OUT/node.log" 2>&1 &
  NODE_PID=$!
}

trap stop_node EXIT

# One loadtest run into $OUT/$1; the sink file is emptied first (the node appends with
# O_APPEND, so truncating it is safe) to keep tmpfs use bounded.
load() {
  local dir=$1
  shift
  : > "$SINK"
  "$LOADTEST" "$@" --target "127.0.0.1:$PORT" --jsonl "$SINK" --server-pid "$NODE_PID" \
    --batch "$BATCH" --report-dir "$OUT/$dir" --no-progress | tee -a "$OUT/summary.txt" || true
}

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)," \
  "$(free -g | awk '/Mem:/ {print $2}') GiB; data dir $DATA_DIR ($(df --output=fstype "$(dirname "$DATA_DIR")" | tail -1))" \
  | tee "$OUT/summary.txt"
echo "commit $(git rev-parse --short HEAD)" \
  "$(git status --porcelain -- . ':!loadtest' ':!docs/benchmarks.md' | grep -q . && echo '(uncommitted changes)')" | tee -a "$OUT/summary.txt"

case "$MODE" in
  rates)
    for rate in $RATES; do
      start_node
      for _ in $(seq 1 "$RUNS"); do
        load "rate-$rate" steady --rate "$rate" --duration "$DURATION" --fire "$FIRE"
      done
      stop_node
    done
    ;;
  backlog)
    start_node
    load empty steady --rate "$STEADY_RATE" --duration "$DURATION" --fire "$FIRE"
    load backlog backlog --backlog-count "$BACKLOG" --backlog-rate "$BACKLOG_RATE" \
      --rate "$STEADY_RATE" --duration "$DURATION" --fire "$FIRE"
    du -sh "$DATA_DIR/data" | tee -a "$OUT/summary.txt"
    stop_node
    ;;
  burst)
    for count in $BURST_COUNTS; do
      start_node
      # Due 10 s after the last one should have been sent, so all are stored before.
      load "burst-$count" burst --count "$count" --rate "$BURST_RATE" \
        --fire "burst:$((count / BURST_RATE + 10))s"
      stop_node
    done
    ;;
  *)
    echo "usage: $0 rates|backlog|burst" >&2
    exit 2
    ;;
esac
python3 loadtest/scripts/summarize.py "$OUT" | tee -a "$OUT/summary.txt"
