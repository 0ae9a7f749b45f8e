#!/usr/bin/env bash
# journeyx under load (the `journeys` scenario): one `journeyx run` on its embedded store,
# a benchmark journey entered by every `ping` event (send one message, exit, re-enter on
# the next), events for users drawn from USERS at each of RATES for DURATION, produced and
# read back by `journeyx-bench` (event -> message latency from the two Kafka timestamps).
# JOURNEYS=20 publishes twenty such journeys (each event then yields twenty messages).
# Before the runs, a plain consumer's rate on the same topic is measured (Kafka's own
# ceiling on this machine), so journeyx's rate can be read against it.
#
#   loadtest/scripts/journeys.sh
#   RATES="5000 20000" DURATION=20s JOURNEYS=20 loadtest/scripts/journeys.sh
#
# Settings (env): RATES, DURATION, USERS, JOURNEYS, QUEUES, OUT, BUILD (0: use the
# binaries already built), JOURNEYX (the journeyx binary to run; default the release
# build, e.g. a kept copy of an older build to compare with), STORE (`embedded`, the
# default, or `cassandra`: deploy/local's Cassandra, a fresh keyspace per run). Starts
# deploy/local's Kafka and Cassandra if they are not running. The embedded store is scratch
# (hundreds of MiB per run) and is removed on exit unless KEEP_STORE=1.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=SCRIPTDIR/lib.sh
source loadtest/scripts/lib.sh

RATES=${RATES:-"5000 10000 20000"}
DURATION=${DURATION:-20s}
USERS=${USERS:-1000000}
JOURNEYS=${JOURNEYS:-1}
QUEUES=${QUEUES:-512}
OUT=${OUT:-$TARGET_DIR/loadtest-reports/journeys-$(date +%Y%m%d-%H%M%S)}
JOURNEYX=${JOURNEYX:-$RELEASE/journeyx}
STORE=${STORE:-embedded}

if [[ ${BUILD:-1} == 1 ]]; then cargo build --release -p journeyx -p timerdb-loadtest; fi
mkdir -p "$OUT"
eval "$(deploy/local/up)"
run_id=$(date +%s)
EVENTS=jx-bench-events-$run_id
MESSAGES=jx-bench-messages-$run_id
deploy/local/kafka-tool topics --create --topic "$EVENTS" --partitions 8 >/dev/null
deploy/local/kafka-tool topics --create --topic "$MESSAGES" --partitions 8 >/dev/null
for j in $(seq 1 "$JOURNEYS"); do
  cat >"$OUT/bench-$j.yaml" <<YAML
{id: bench_$j, version: 1, app_id: bench, entry: {event: ping}, re_entry: always, start: hi,
 nodes: [{id: hi, actions: [{send: {channel: push, template: bench_$j}}, exit]}]}
YAML
done
case $STORE in
embedded) store_url=$OUT/store ;;
cassandra) store_url=scylla://$TIMERDB_SCYLLA/jx_bench_$run_id ;;
*)
  echo "STORE=$STORE: expected embedded or cassandra" >&2
  exit 2 ;;
esac
HTTP=127.0.0.1:$((20000 + RANDOM % 20000))
publish=()
for j in $(seq 1 "$JOURNEYS"); do publish+=(--publish "$OUT/bench-$j.yaml"); done
"$JOURNEYX" run --kafka "$TIMERDB_KAFKA" --store "$store_url" --events-topic "$EVENTS" \
  --messages-topic "$MESSAGES" --dead-letter-topic "" --group "bench-$run_id" --http "$HTTP" \
  --queues "$QUEUES" "${publish[@]}" >"$OUT/journeyx.log" 2>&1 &
JX=$!
stop_and_clean() {
  kill "$JX" 2>/dev/null || true
  wait "$JX" 2>/dev/null || true
  if [[ ${KEEP_STORE:-0} != 1 ]]; then rm -rf "$OUT/store"; fi
}
trap stop_and_clean EXIT
until curl -sf "http://$HTTP/api/journeys" >/dev/null; do sleep 0.2; done

{
  echo "machine: $(nproc) cores; journeyx $(sha256sum "$JOURNEYX" | cut -c1-12); $JOURNEYS journeys; $USERS users; $QUEUES queues; store $STORE"
  for rate in $RATES; do
    echo "== rate $rate/s for $DURATION"
    cpu0=$(cpu_seconds "$JX")
    "$RELEASE/journeyx-bench" --kafka "$TIMERDB_KAFKA" --events-topic "$EVENTS" \
      --messages-topic "$MESSAGES" --users "$USERS" --rate "$rate" --duration "$DURATION" \
      --fan-out "$JOURNEYS"
    cpu1=$(cpu_seconds "$JX")
    echo "journeyx  CPU $(python3 -c "print(round($cpu1 - $cpu0, 1))") s over the run; RSS peak $(awk '/VmHWM/ {print int($2/1024)}' "/proc/$JX/status") MiB"
  done
  "$RELEASE/journeyx-bench" --kafka "$TIMERDB_KAFKA" --events-topic "$EVENTS" --ceiling
} | tee "$OUT/summary.txt"
