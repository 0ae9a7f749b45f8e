#!/usr/bin/env bash
# RocketMQ 5 timer messages as a peer of TimerDB: a local name server and one broker (from
# Maven Central's jars; no binary distribution, no Docker), the broker's timer wheel at each
# precision in PRECISIONS, and TimerPeer (src/main/java) sending the same timers as the
# other drivers (delivery time = send time + uniform FIRE_MIN_MS..FIRE_MAX_MS, PAYLOAD_BYTES
# bodies, RATE/s for DURATION s) and consuming them with a push consumer; one JSON result
# per precision and rate, the same figures as ../bullmq/bench.mjs prints.
#
#   loadtest/peers/rocketmq/run.sh                         # 5000/s for 20 s, precision 1000 and 100 ms
#   RATES="200" DURATION=20 loadtest/peers/rocketmq/run.sh # a smoke run
#   PRECISIONS=1000 RATES="5000 10000" OUT=/tmp/rmq loadtest/peers/rocketmq/run.sh
#
# Every run gets a fresh broker and store (on $DATA_DIR, tmpfs by default); the name server
# lives for the whole script. The broker's configuration is written to
# $OUT/broker-p<precision>-<rate>.conf and echoed, as the broker reports it, in the result's
# "broker" object. Needs Java 17 and Maven (installs Debian's maven when missing).
#
# Fairness: RocketMQ rounds a delivery time down to its precision slot and fires the slot
# when the clock has passed its end, so lateness is spread over 0..precision by design
# (timerPrecisionMs may only be 100, 200, 500 or 1000). FLUSH=SYNC_FLUSH (default) makes a
# send wait for the commit log's flush, as TimerDB's acknowledgement waits for its commit;
# FLUSH=ASYNC_FLUSH is RocketMQ's default. A send that waited in the broker's queue longer
# than SEND_QUEUE_WAIT_MS (RocketMQ's default 200) is refused ("broker busy", counted as
# failed: the adapter does not retry); on a loaded 2-core machine a few are, even at 200/s.
# Each result carries "server_resources": CPU seconds and peak RSS of the broker and the name
# server over the adapter's run (also $OUT/resources-rocketmq-p<precision>-<rate>.json).
set -euo pipefail
PEER=$(cd "$(dirname "$0")" && pwd)
cd "$PEER/../../.."
# shellcheck source=SCRIPTDIR/../../scripts/lib.sh
source loadtest/scripts/lib.sh

RATES=${RATES:-5000}
DURATION=${DURATION:-20}
FIRE_MIN_MS=${FIRE_MIN_MS:-1000}
FIRE_MAX_MS=${FIRE_MAX_MS:-5000}
PAYLOAD_BYTES=${PAYLOAD_BYTES:-64}
BATCH=${BATCH:-1000}
PRECISIONS=${PRECISIONS:-"1000 100"}
FLUSH=${FLUSH:-SYNC_FLUSH}
QUEUES=${QUEUES:-8}
CONSUME_THREADS=${CONSUME_THREADS:-20}
BROKER_HEAP=${BROKER_HEAP:-1g}
SEND_QUEUE_WAIT_MS=${SEND_QUEUE_WAIT_MS:-200}
DATA_DIR=${DATA_DIR:-/dev/shm/timerdb-rocketmq}
NAMESRV_PORT=${NAMESRV_PORT:-19876}
BROKER_PORT=${BROKER_PORT:-20911}
OUT=${OUT:-$TARGET_DIR/loadtest-reports/rocketmq-$(date +%Y%m%d-%H%M%S)}

if ! command -v mvn >/dev/null; then
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y maven
fi
# The adapter and every RocketMQ jar (broker, namesrv, client, tools) into $PEER/target.
if [[ ! -f "$PEER/target/.built" || "$PEER/pom.xml" -nt "$PEER/target/.built" ||
      -n "$(find "$PEER/src" -newer "$PEER/target/.built" -type f)" ]]; then
  mvn -q -B -f "$PEER/pom.xml" package dependency:copy-dependencies
  touch "$PEER/target/.built"
fi
CP="$PEER/target/classes:$PEER/target/lib/*"
# What RocketMQ's own start scripts pass to a JDK 9+.
JAVA_OPENS=(--add-exports=java.base/jdk.internal.ref=ALL-UNNAMED
  --add-exports=java.base/sun.nio.ch=ALL-UNNAMED --add-exports=jdk.unsupported/sun.misc=ALL-UNNAMED
  --add-opens=java.base/java.nio=ALL-UNNAMED --add-opens=java.base/sun.nio.ch=ALL-UNNAMED
  --add-opens=java.base/java.lang=ALL-UNNAMED --add-opens=java.base/java.lang.reflect=ALL-UNNAMED
  --add-opens=jdk.unsupported/sun.misc=ALL-UNNAMED -XX:+UseG1GC -XX:-OmitStackTraceInFastThrow)

mkdir -p "$OUT"
rm -rf "$DATA_DIR"
mkdir -p "$DATA_DIR/home"
NAMESRV_PID=
BROKER_PID=
stop() { # pid: TERM, then KILL after 20 s
  local pid=$1 i
  [[ -n "$pid" ]] || return 0
  kill "$pid" 2>/dev/null || return 0
  for ((i = 0; i < 200; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  resources_stop
  stop "$BROKER_PID"
  stop "$NAMESRV_PID"
  rm -rf "$DATA_DIR"
}
trap cleanup EXIT
wait_for() { # log, text, pid
  local i
  for ((i = 0; i < 600; i++)); do
    grep -q "$2" "$1" 2>/dev/null && return 0
    kill -0 "$3" 2>/dev/null || { echo "exited before '$2':" >&2; tail -20 "$1" >&2; return 1; }
    sleep 0.1
  done
  echo "no '$2' in 60 s:" >&2
  tail -20 "$1" >&2
  return 1
}

# Logs of every JVM go to user.home/logs/rocketmqlogs, so user.home is the run's directory.
# One classpath holds every jar, so each JVM names its logging configuration (RocketMQ's
# logback would otherwise take the first it finds, the broker's, for all three).
cat >"$OUT/namesrv.conf" <<EOF
listenPort=$NAMESRV_PORT
EOF
ROCKETMQ_HOME=$DATA_DIR/home java -Xms256m -Xmx256m "${JAVA_OPENS[@]}" \
  -Duser.home="$DATA_DIR/home" -Drocketmq.home.dir="$DATA_DIR/home" \
  -Drmq.logback.configurationFile=rmq.namesrv.logback.xml -cp "$CP" \
  org.apache.rocketmq.namesrv.NamesrvStartup -c "$OUT/namesrv.conf" >"$OUT/namesrv.log" 2>&1 &
NAMESRV_PID=$!
wait_for "$OUT/namesrv.log" "boot success" "$NAMESRV_PID"

for precision in $PRECISIONS; do
  for rate in $RATES; do
    name=p$precision-$rate
    store=$DATA_DIR/store-$name
    rm -rf "$store"
    mkdir -p "$store"
    cat >"$OUT/broker-$name.conf" <<EOF
brokerClusterName=TimerdbPeer
brokerName=broker-a
brokerId=0
brokerRole=ASYNC_MASTER
brokerIP1=127.0.0.1
listenPort=$BROKER_PORT
namesrvAddr=127.0.0.1:$NAMESRV_PORT
storePathRootDir=$store
storePathCommitLog=$store/commitlog
flushDiskType=$FLUSH
autoCreateTopicEnable=false
autoCreateSubscriptionGroup=true
timerWheelEnable=true
timerPrecisionMs=$precision
waitTimeMillsInSendQueue=$SEND_QUEUE_WAIT_MS
EOF
    echo "== RocketMQ, timer precision $precision ms, rate $rate/s"
    ROCKETMQ_HOME=$DATA_DIR/home java -Xms"$BROKER_HEAP" -Xmx"$BROKER_HEAP" "${JAVA_OPENS[@]}" \
      -XX:MaxDirectMemorySize=2g -Duser.home="$DATA_DIR/home" -Drocketmq.home.dir="$DATA_DIR/home" \
      -Drmq.logback.configurationFile=rmq.broker.logback.xml \
      -cp "$CP" org.apache.rocketmq.broker.BrokerStartup -c "$OUT/broker-$name.conf" \
      >"$OUT/broker-$name.log" 2>&1 &
    BROKER_PID=$!
    wait_for "$OUT/broker-$name.log" "boot success" "$BROKER_PID"
    # The server processes' CPU and RSS over the adapter's run (not the broker's boot).
    resources_start "$OUT/resources-rocketmq-$name.json" broker="$BROKER_PID" namesrv="$NAMESRV_PID"
    java -Xms512m -Xmx1g -XX:+UseG1GC -Duser.home="$DATA_DIR/home" \
      -Drmq.logback.configurationFile=rmq.client.logback.xml -cp "$CP" timerdb.peer.TimerPeer \
      --namesrv "127.0.0.1:$NAMESRV_PORT" --rate "$rate" --duration "$DURATION" \
      --fire-min-ms "$FIRE_MIN_MS" --fire-max-ms "$FIRE_MAX_MS" --payload-bytes "$PAYLOAD_BYTES" \
      --batch "$BATCH" --queues "$QUEUES" --consume-threads "$CONSUME_THREADS" \
      2>"$OUT/adapter-$name.log" | tee "$OUT/rocketmq-$name.json" || true
    resources_stop
    resources_merge "$OUT/rocketmq-$name.json" "$OUT/resources-rocketmq-$name.json"
    stop "$BROKER_PID"
    BROKER_PID=
    cp -r "$DATA_DIR/home/logs" "$OUT/logs-$name" 2>/dev/null || true
    rm -rf "$store" "$DATA_DIR/home/logs"
  done
done

python3 - "$OUT" <<'PY' | tee "$OUT/rocketmq.txt"
import json, sys
from pathlib import Path
print(f"{'precision':>9} {'rate':>7} | {'acked/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} | "
      f"{'lost':>5} {'early':>5} {'dup':>4} {'failed':>6} | {'CPU s':>6} {'RSS MiB':>7}")
for f in sorted(Path(sys.argv[1]).glob("rocketmq-p*.json"), key=lambda p: [int(x) for x in p.stem.split("-p")[1].split("-")]):
    try:
        r = json.loads(f.read_text().strip().splitlines()[-1])
    except (ValueError, IndexError):
        print(f"{f.stem}: no result"); continue
    l = r["lateness_ms"]
    print(f"{r['precision_ms']:>9} {r['rate']:>7} | {r['acked_rate']:>8.0f} {l['p50']:>7.0f} {l['p99']:>7.0f} "
          f"{l['max']:>7.0f} | {r['lost']:>5} {r['early']:>5} {r['duplicates']:>4} {r['failed']:>6} | "
          + (f"{t['cpu_s']:>6.1f} {t['peak_rss_bytes'] / 2**20:>7.0f}" if (t := r.get("server_resources", {}).get("total")) else "   n/a     n/a"))
PY
