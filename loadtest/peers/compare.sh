#!/usr/bin/env bash
# TimerDB against its peers at the same rates, delays and payload size, in one go: BullMQ
# delayed jobs (Redis) and, with PEERS="bullmq rocketmq", RocketMQ 5 timer messages at each
# timer precision in ROCKETMQ_PRECISIONS (rocketmq/run.sh), and with PEERS=temporal Temporal
# durable timers (temporal/run.sh: the CLI's dev server with its SQLite file on a real disk,
# one workflow per timer that sleeps until its due time). Prints per peer and rate both
# systems' acknowledged rate and p99 lateness, and the TimerDB/peer ratios, then the
# highest rate each sustained (nothing lost or early, >= 95 % of the target acknowledged,
# p99 lateness <= P99_MS; and the same with p99 <= KEEP_UP_MS, i.e. still keeping up), and
# per system and rate p50/p99/max lateness, lost/early/duplicates, and the server
# processes' CPU seconds and peak RSS over the run (compare-resources.txt).
#
# Like for like: TimerDB fires into Kafka (TIMERDB_SINK=kafka, the default; deploy/local's
# Kafka at $TIMERDB_KAFKA, started if not running and left running) and its lateness is the
# loadtest consumer's receive time - due time (the report's recv_lateness_ms), as for the
# peers' consumers; the Kafka broker's CPU and RSS count on TimerDB's side. Server processes:
# TimerDB + Kafka; redis-server; RocketMQ broker + name server (rocketmq/run.sh); the
# Temporal dev server (temporal/run.sh: one process, a fresh one per rate). The Kafka
# broker is shared with whatever else uses deploy/local, so its CPU over a run includes any
# other load on it. TIMERDB_SINK=jsonl: the old set-up (JSON-lines file on tmpfs, lateness
# = the node's fired-at - due, no Kafka). BUILD=0: use the binaries already built.
#
#   loadtest/peers/compare.sh
#   RATES="5000 10000 20000" DURATION=20 loadtest/peers/compare.sh
#   PEERS="bullmq rocketmq" ROCKETMQ_PRECISIONS="1000 100" loadtest/peers/compare.sh
#   PEERS=rocketmq RATES=5000 loadtest/peers/compare.sh     # TimerDB and RocketMQ only
#   PEERS=temporal RATES="10 25 50 100 200" loadtest/peers/compare.sh
#
# All run on loopback; data on $DATA_DIR (tmpfs by default; with temporal among PEERS a real
# disk, /var/tmp/timerdb-compare, for every system: the issue asks for Temporal's SQLite file
# on a durable disk, and TimerDB gets the same disk). TimerDB syncs every commit; Redis runs
# with AOF fsync every second (its usual durable setting); RocketMQ's broker with
# ROCKETMQ_FLUSH (SYNC_FLUSH by default: a send is answered after the commit log's flush);
# Temporal's dev server with SQLite's defaults (rollback journal, synchronous=FULL: 4 fsyncs
# per commit). TEMPORAL_SQLITE_PRAGMAS (e.g. journal_mode=wal) passes --sqlite-pragma flags,
# reported under TEMPORAL_LABEL (default temporal).
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=SCRIPTDIR/../scripts/lib.sh
source loadtest/scripts/lib.sh

RATES=${RATES:-"5000 10000 20000 30000"}
DURATION=${DURATION:-20}
FIRE_MIN_MS=${FIRE_MIN_MS:-1000}
FIRE_MAX_MS=${FIRE_MAX_MS:-5000}
PAYLOAD_BYTES=${PAYLOAD_BYTES:-64}
P99_MS=${P99_MS:-10}
KEEP_UP_MS=${KEEP_UP_MS:-1000}
PEERS=${PEERS:-bullmq}
has_peer() { [[ " $PEERS " == *" $1 "* ]]; }
if has_peer temporal; then
  DATA_DIR=${DATA_DIR:-/var/tmp/timerdb-compare}
  # Temporal has no batch start: one StartWorkflowExecution per timer, paced. TimerDB's
  # loadtest sends batch k at k * BATCH / RATE s, so at Temporal's rates (tens to hundreds
  # per second) BATCH=1000 would send the whole run at once; BATCH=1 paces it like Temporal.
  BATCH=${BATCH:-1}
else
  DATA_DIR=${DATA_DIR:-/dev/shm/timerdb-compare}
  BATCH=${BATCH:-1000}
fi
TIMERDB_PORT=${TIMERDB_PORT:-17430}
REDIS_PORT=${REDIS_PORT:-16380}
OUT=${OUT:-$TARGET_DIR/loadtest-reports/compare-$(date +%Y%m%d-%H%M%S)}
ROCKETMQ_PRECISIONS=${ROCKETMQ_PRECISIONS:-"1000 100"}
ROCKETMQ_FLUSH=${ROCKETMQ_FLUSH:-SYNC_FLUSH}
TIMERDB_SINK=${TIMERDB_SINK:-kafka}
TOPIC_PREFIX=${TOPIC_PREFIX:-peercmp}
TOPICS=${TOPICS:-4}
PARTITIONS=${PARTITIONS:-8}
TEMPORAL_LABEL=${TEMPORAL_LABEL:-temporal}
TEMPORAL_SQLITE_PRAGMAS=${TEMPORAL_SQLITE_PRAGMAS:-}
# Result files are $OUT/<label>-<rate>.json; one label per peer setting.
LABELS=()
has_peer bullmq && LABELS+=(bullmq)
if has_peer rocketmq; then
  for p in $ROCKETMQ_PRECISIONS; do LABELS+=("rocketmq-p$p"); done
fi
has_peer temporal && LABELS+=("$TEMPORAL_LABEL")

summarize() {
  python3 - "$OUT" "$P99_MS" "$RATES" "$KEEP_UP_MS" "${LABELS[*]}" <<'PY' | tee "$OUT/compare.txt"
import json, sys
from pathlib import Path
out, p99_max, rates = Path(sys.argv[1]), float(sys.argv[2]), [int(r) for r in sys.argv[3].split()]
keep_up = float(sys.argv[4])
labels = sys.argv[5].split()

def resources(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None

def timerdb(rate):
    """Receive lateness (consumer clock - due) with the Kafka sink, else the node's fired-at - due."""
    files = sorted((out / f"timerdb-{rate}").glob("*.json"))
    if not files:
        return None
    r = json.loads(files[0].read_text())
    lat = r.get("recv_lateness_ms") or r["lateness_ms"]
    c = r["counts"]
    return dict(acked_rate=r["acked_rate"], p99=lat["p99"], p50=lat["p50"], max=lat["max"],
                bad=c["lost"] + c["early"], lost=c["lost"], early=c["early"], dup=c["duplicates"],
                failed=c["failed"] + c["rejected"] + r.get("unsent", 0),
                recv=bool(r.get("recv_lateness_ms")),
                share=c["acked"] / max(1, c["sent"] + r.get("unsent", 0)),
                res=resources(out / f"resources-timerdb-{rate}.json"))

def peer(label, rate):
    """One JSON object per run, the last line of <label>-<rate>.json (bench.mjs, TimerPeer)."""
    try:
        r = json.loads((out / f"{label}-{rate}.json").read_text().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        return None
    lat = r["lateness_ms"]
    return dict(acked_rate=r["acked_rate"], p99=lat["p99"], p50=lat["p50"], max=lat["max"],
                bad=r["lost"] + r["early"], lost=r["lost"], early=r["early"], dup=r["duplicates"],
                failed=r.get("failed", 0), share=r["acked"] / max(1, r.get("total") or r["acked"]), res=resources(out / f"resources-{label}-{rate}.json"))

def name(label):
    if label.startswith("rocketmq-p"):
        return f"RocketMQ@{label[len('rocketmq-p'):]}ms"
    if label.startswith("temporal"):
        return "Temporal" + label[len("temporal"):]
    return {"bullmq": "BullMQ"}.get(label, label)

def floor_ms(label):
    """Lateness a peer has by design: RocketMQ fires a delivery time's slot after it ends."""
    return int(label[len("rocketmq-p"):]) if label.startswith("rocketmq-p") else 0

def delivered(r, rate, floor=0):
    """Kept up: everything delivered, the target rate taken (>= 95 % of the timers offered
    acknowledged, at >= 95 % of the rate), p99 lateness under keep_up (plus the peer's
    lateness by design, so a coarse timer wheel is not taken for falling behind)."""
    return (r and r["bad"] == 0 and r["acked_rate"] >= 0.95 * rate and r["share"] >= 0.95
            and r["p99"] <= keep_up + floor)

def ok(r, rate):
    return delivered(r, rate) and r["p99"] <= p99_max

def ratio(a, b):
    return f"{a / b:.3g}" if a and b else "n/a"

for n, label in enumerate(labels):
    P, floor = name(label), floor_ms(label)
    w = max(14, len(P) + 8)
    if n:
        print()
    print(f"{'rate':>7} | {'TimerDB acked/s':>15} {'p99 ms':>7} | {P + ' acked/s':>{w}} {'p99 ms':>7} | "
          f"{'rate ratio':>10} {'p99 ratio':>9}")
    best = {k: {"timerdb": 0, "peer": 0} for k in ("delivered", "p99")}
    for rate in rates:
        t, b = timerdb(rate), peer(label, rate)
        for who, r in (("timerdb", t), ("peer", b)):
            if delivered(r, rate, floor if who == "peer" else 0): best["delivered"][who] = rate
            if ok(r, rate): best["p99"][who] = rate
        if not (t and b):
            print(f"{rate:>7} | missing result (timerdb {bool(t)}, {label} {bool(b)})")
            continue
        print(f"{rate:>7} | {t['acked_rate']:>15.0f} {t['p99']:>7.0f} | {b['acked_rate']:>{w}.0f} {b['p99']:>7.0f} | "
              f"{ratio(t['acked_rate'], b['acked_rate']):>10} {ratio(t['p99'], b['p99']):>9}"
              + ("" if t["bad"] == 0 and b["bad"] == 0
                 else f"  (lost/early/undelivered by end of drain: timerdb {t['bad']}, {label} {b['bad']})"))
    d, p = best["delivered"], best["p99"]
    print(f"highest rate kept up with (every timer delivered, >= 95% of the target acknowledged, "
          f"p99 lateness <= {keep_up:g} ms" + (f", {P}: {keep_up + floor:g} ms" if floor else "") + "): "
          f"TimerDB {d['timerdb']}/s, {P} {d['peer']}/s, ratio {ratio(d['timerdb'], d['peer'])}")
    print(f"... and also p99 lateness <= {p99_max:g} ms: TimerDB {p['timerdb']}/s, {P} {p['peer']}/s, "
          f"ratio {ratio(p['timerdb'], p['peer'])}")

def res_cols(res):
    """CPU seconds over the run (share of one core) and peak RSS of the server processes."""
    if not res:
        return f"{'n/a':>16} {'n/a':>9}  n/a"
    t = res["total"]
    parts = ", ".join(f"{n} {v['cpu_s']:.1f}s/{v['peak_rss_bytes'] / 2**20:.0f}M"
                      for n, v in res.items() if isinstance(v, dict) and "pid" in v)
    la = res.get("load_avg", {})
    return (f"{t['cpu_s']:>7.1f} ({t['cpu_pct']:>4.0f}%) {t['peak_rss_bytes'] / 2**20:>9.0f}  "
            f"{la.get('start') or 0:.1f}/{la.get('max') or 0:.1f}  {parts}")

systems = [("TimerDB" + ("+Kafka" if any((timerdb(r) or {}).get("recv") for r in rates) else ""), None)] + \
    [(name(l), l) for l in labels]
lines = [f"{'system':<16} {'rate':>6} | {'acked/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} | "
         f"{'lost':>6} {'early':>5} {'dup':>4} {'failed':>6} {'acked%':>6} | {'CPU s (core%)':>16} {'peak RSS MiB':>9}  "
         f"load start/max  per process (CPU s/peak RSS)"]
for P, label in systems:
    best = 0
    for rate in rates:
        r = timerdb(rate) if label is None else peer(label, rate)
        if r is None:
            lines.append(f"{P:<16} {rate:>6} | missing result")
            continue
        if delivered(r, rate, 0 if label is None else floor_ms(label)):
            best = rate
        lines.append(f"{P:<16} {rate:>6} | {r['acked_rate']:>8.0f} {r['p50']:>7.0f} {r['p99']:>7.0f} {r['max']:>7.0f} | "
                     f"{r['lost']:>6} {r['early']:>5} {r['dup']:>4} {r['failed']:>6} {100 * r['share']:>6.1f} | {res_cols(r['res'])}")
    lines.append(f"{P:<16} highest rate kept up with: {best}/s")
print()
print("\n".join(lines))
(out / "compare-resources.txt").write_text("\n".join(lines) + "\n")
print("failed: sends refused (RocketMQ: broker busy) or calls that failed; acked%: acknowledged / offered; "
      "lost: acknowledged, not received when the drain ended.")
print(f"lateness: receive time at the consumer - due time" + ("" if systems[0][0].endswith("Kafka") else
      " (TimerDB: the node's fired-at - due, JSON-lines sink)") + "; CPU s: user + system seconds of the "
      "server processes from the start of sending to the end of the drain; peak RSS: the largest sampled "
      "sum of their RSS; load: the machine's 1-minute load average.")
print(f"ratios are TimerDB/peer: p99 ratio < 1 means TimerDB fires closer to the epoch; rate ratio > 1 "
      "means TimerDB took timers faster. Undelivered means the peer's consumer had not received the "
      "timer when the drain ended (it fell behind), not that the broker dropped it. RocketMQ@Nms "
      "rounds each delivery time down to its N ms slot and fires the slot after it ends, so its "
      "lateness spans 0..N ms by design; its keep-up bound is raised by N.")
PY
}
if [[ -n "${SUMMARY_ONLY:-}" ]]; then
  summarize
  exit 0
fi

if has_peer bullmq && ! command -v redis-server >/dev/null; then
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server
fi
if has_peer bullmq && [[ ! -d loadtest/peers/bullmq/node_modules ]]; then
  # package.json pins msgpackr-extract to 3.0.4 (overrides): 3.0.6 and 3.0.7 name
  # platform packages (darwin, win32, linux-arm) the registry does not have, so no lock
  # file could list them and npm 11's `npm ci` refused every lock made with them.
  (cd loadtest/peers/bullmq && npm ci --no-audit --no-fund)
fi
if [[ ${BUILD:-1} == 1 ]]; then cargo build --release -p timerdb -p timerdb-loadtest; fi
KAFKA_PID=
if [[ $TIMERDB_SINK == kafka ]]; then
  # deploy/local's Kafka (started if not running; left running): `up` prints the exports.
  if [[ -z ${TIMERDB_KAFKA:-} ]]; then eval "$(deploy/local/up)"; fi
  KAFKA_PID=$(cat "${TIMERDB_LOCAL_DIR:-/tmp/timerdb-local}/kafka.pid")
  for ((t = 0; t < TOPICS; t++)); do
    deploy/local/kafka-tool topics --create --if-not-exists --topic "$TOPIC_PREFIX-$t" \
      --partitions "$PARTITIONS" >/dev/null
  done
elif [[ $TIMERDB_SINK != jsonl ]]; then
  echo "TIMERDB_SINK must be kafka or jsonl" >&2
  exit 2
fi

mkdir -p "$OUT"
rm -rf "$DATA_DIR"
mkdir -p "$DATA_DIR/redis"
NODE_PID=
REDIS_PID=
cleanup() {
  resources_stop
  [[ -n "$NODE_PID" ]] && kill "$NODE_PID" 2>/dev/null && wait "$NODE_PID" 2>/dev/null
  [[ -n "$REDIS_PID" ]] && kill "$REDIS_PID" 2>/dev/null && wait "$REDIS_PID" 2>/dev/null
  rm -rf "$DATA_DIR"
}
trap cleanup EXIT

if has_peer bullmq; then
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$DATA_DIR/redis" --save '' \
    --appendonly yes --appendfsync everysec >"$OUT/redis.log" 2>&1 &
  REDIS_PID=$!
fi

for rate in $RATES; do
  rm -rf "$DATA_DIR/timerdb"
  mkdir -p "$DATA_DIR/timerdb"
  if [[ $TIMERDB_SINK == kafka ]]; then
    sink=(--sink "kafka://$TIMERDB_KAFKA")
    source_args=(--kafka "$TIMERDB_KAFKA" --topic-prefix "$TOPIC_PREFIX" --topics "$TOPICS"
      --partitions "$PARTITIONS")
    servers=(timerdb=PID kafka="$KAFKA_PID")
  else
    : >"$DATA_DIR/timerdb/fired.jsonl"
    sink=(--sink "jsonl://$DATA_DIR/timerdb/fired.jsonl")
    source_args=(--jsonl "$DATA_DIR/timerdb/fired.jsonl")
    servers=(timerdb=PID)
  fi
  "$RELEASE/timerdb" serve --listen "127.0.0.1:$TIMERDB_PORT" --metrics-listen off \
    --store "embedded://$DATA_DIR/timerdb/data" "${sink[@]}" >"$OUT/timerdb-$rate.log" 2>&1 &
  NODE_PID=$!
  for _ in $(seq 1 100); do
    grep -q "timerdb ready" "$OUT/timerdb-$rate.log" && break
    sleep 0.2
  done
  echo "== rate $rate: TimerDB ($TIMERDB_SINK sink)"
  resources_start "$OUT/resources-timerdb-$rate.json" "${servers[@]/PID/$NODE_PID}"
  "$RELEASE/timerdb-loadtest" steady --target "127.0.0.1:$TIMERDB_PORT" "${source_args[@]}" \
    --server-pid "$NODE_PID" --rate "$rate" \
    --duration "${DURATION}s" --fire "${FIRE_MIN_MS}ms..${FIRE_MAX_MS}ms" \
    --payload-bytes "$PAYLOAD_BYTES" --batch "$BATCH" --no-progress \
    --report-dir "$OUT/timerdb-$rate" || true
  resources_stop
  for f in "$OUT/timerdb-$rate"/*.json; do
    [[ -f $f ]] && resources_merge "$f" "$OUT/resources-timerdb-$rate.json"
  done
  kill "$NODE_PID"
  wait "$NODE_PID" 2>/dev/null || true
  NODE_PID=
  if has_peer bullmq; then
    echo "== rate $rate: BullMQ"
    resources_start "$OUT/resources-bullmq-$rate.json" redis="$REDIS_PID"
    node loadtest/peers/bullmq/bench.mjs --redis "127.0.0.1:$REDIS_PORT" --rate "$rate" \
      --duration "$DURATION" --fire-min-ms "$FIRE_MIN_MS" --fire-max-ms "$FIRE_MAX_MS" \
      --payload-bytes "$PAYLOAD_BYTES" --batch "$BATCH" | tee "$OUT/bullmq-$rate.json" || true
    resources_stop
    resources_merge "$OUT/bullmq-$rate.json" "$OUT/resources-bullmq-$rate.json"
  fi
  if has_peer temporal; then
    # A fresh dev server and SQLite file per rate (on $DATA_DIR/temporal); writes
    # $OUT/$TEMPORAL_LABEL-<rate>.json with its server_resources and configuration.
    RATES="$rate" DURATION="$DURATION" FIRE_MIN_MS="$FIRE_MIN_MS" FIRE_MAX_MS="$FIRE_MAX_MS" \
      PAYLOAD_BYTES="$PAYLOAD_BYTES" BATCH="$BATCH" DATA_DIR="$DATA_DIR/temporal" OUT="$OUT" \
      LABEL="$TEMPORAL_LABEL" SQLITE_PRAGMAS="$TEMPORAL_SQLITE_PRAGMAS" \
      loadtest/peers/temporal/run.sh || true
  fi
done
if has_peer rocketmq; then
  # Its own name server and a fresh broker per precision and rate; writes
  # $OUT/rocketmq-p<precision>-<rate>.json and the broker configurations beside them.
  RATES="$RATES" DURATION="$DURATION" FIRE_MIN_MS="$FIRE_MIN_MS" FIRE_MAX_MS="$FIRE_MAX_MS" \
    PAYLOAD_BYTES="$PAYLOAD_BYTES" BATCH="$BATCH" PRECISIONS="$ROCKETMQ_PRECISIONS" \
    FLUSH="$ROCKETMQ_FLUSH" DATA_DIR="$DATA_DIR/rocketmq" OUT="$OUT" \
    loadtest/peers/rocketmq/run.sh || true
fi

summarize
