#!/usr/bin/env bash
# A three-node cluster on Cassandra + Kafka under steady load spread over every node, while
# one member is hit mid-run: what is lost (must be nothing), what fires early (must be
# nothing), how long the member's ranges stay silent, how late its timers fire, and how
# many timers fire twice.
#
#   loadtest/scripts/failover.sh                       # MODES="kill drain" RATES=10000 RUNS=3
#   MODES=steady RATES="10000 15000" loadtest/scripts/failover.sh   # no fault: the baseline
#
# Modes: `kill` (SIGKILL member $KILL at $KILL_AT, start it again $DOWN_FOR later: its
# ranges move to the others on missed heartbeats, then back when it rejoins), `drain`
# (`timerdb admin drain $KILL`, then SIGTERM, at $KILL_AT; not restarted), `steady` (the
# same load and cluster, no fault). Every run gets a fresh cluster on a fresh keyspace
# (deploy/local/cluster up), so runs do not share ranges or stored timers.
#
# RETRY=1 sends every timer with an idempotency key and retries failed calls on another
# node (each key costs Cassandra a Paxos round: use lower rates).
#
# Settings (env): MODES, RATES, RUNS, NODES, KILL, KILL_AT, DOWN_FOR, DURATION, FIRE,
# BATCH, RETRY, OUT, BUILD (0: use the binaries already built). Starts deploy/local's Kafka
# and Cassandra if they are not running. Reports, and each run's node logs (logs/<run>/),
# go to $OUT.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=SCRIPTDIR/lib.sh
source loadtest/scripts/lib.sh

MODES=${MODES:-"kill drain"}
RATES=${RATES:-10000}
RUNS=${RUNS:-3}
NODES=${NODES:-3}
KILL=${KILL:-2}
KILL_AT=${KILL_AT:-10s}
DOWN_FOR=${DOWN_FOR:-10s}
DURATION=${DURATION:-30s}
FIRE=${FIRE:-1s..5s}
BATCH=${BATCH:-1000}
RETRY=${RETRY:-0}
OUT=${OUT:-$TARGET_DIR/loadtest-reports/failover-$(date +%Y%m%d-%H%M%S)}
LOADTEST=$RELEASE/timerdb-loadtest
export TIMERDB_BIN=$RELEASE/timerdb
CLUSTER=deploy/local/cluster

if [[ ${BUILD:-1} == 1 ]]; then cargo build --release -p timerdb -p timerdb-loadtest; fi
mkdir -p "$OUT"
eval "$(deploy/local/up)"
for t in 0 1 2 3; do
  deploy/local/kafka-tool topics --create --if-not-exists --topic "lt-$t" --partitions 8 >/dev/null
done
trap '$CLUSTER down || true' EXIT

{
  echo "machine: $(nproc) cores; $NODES nodes; member $KILL hit at $KILL_AT (kill: down $DOWN_FOR)"
  echo "node: $TIMERDB_BIN ($(sha256sum "$TIMERDB_BIN" | cut -c1-12))"
} | tee "$OUT/machine.txt"

for mode in $MODES; do
  for rate in $RATES; do
    for run in $(seq 1 "$RUNS"); do
      eval "$($CLUSTER up "$NODES")"
      pid=$(cat "$TIMERDB_CLUSTER_DIR/node-$KILL.pid")
      args=(--target "$TIMERDB_NODES" --kafka "$TIMERDB_KAFKA" --rate "$rate"
        --duration "$DURATION" --fire "$FIRE" --batch "$BATCH" --topic-prefix lt --topics 4
        --partitions 8 --no-progress --report-dir "$OUT" --server-pid "$pid")
      if [[ $RETRY == 1 ]]; then args+=(--retry); fi
      case $mode in
      kill)
        args=(failover "${args[@]}" --kill-node "$KILL" --kill-at "$KILL_AT"
          --down-for "$DOWN_FOR" --restart-cmd "$CLUSTER start $KILL") ;;
      drain)
        args=(failover "${args[@]}" --kill-node "$KILL" --kill-at "$KILL_AT" --down-for 0s
          --fault-cmd "$TIMERDB_BIN admin --server ${TIMERDB_NODES%%,*} drain $KILL && $CLUSTER stop $KILL"
          --restart-cmd true) ;;
      steady)
        args=(steady "${args[@]}") ;;
      *)
        echo "unknown mode $mode (kill, drain, steady)" >&2
        exit 2 ;;
      esac
      name="$mode-retry$RETRY-rate-$rate-run-$run"
      echo "== $mode rate $rate run $run (retry $RETRY)"
      "$LOADTEST" "${args[@]}" | tee "$OUT/$name.txt" || echo "run FAILED (see above)"
      $CLUSTER down
      # The next `cluster up` starts from an empty directory: keep this run's node logs.
      mkdir -p "$OUT/logs/$name"
      cp "$TIMERDB_CLUSTER_DIR"/node-*.log "$OUT/logs/$name/" 2>/dev/null || true
    done
  done
done
echo "reports in $OUT"
