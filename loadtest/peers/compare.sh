#!/usr/bin/env bash
# TimerDB against BullMQ delayed jobs (Redis), at the same rates, delays and payload size,
# in one go; prints per rate both systems' acknowledged rate and p99 fire lateness, and the
# TimerDB/BullMQ ratios, then the highest rate each sustained (nothing lost or early,
# >= 95 % of the target acknowledged, p99 lateness <= P99_MS; and the same with p99 <=
# KEEP_UP_MS, i.e. still keeping up).
#
#   loadtest/peers/compare.sh
#   RATES="5000 10000 20000" DURATION=20 loadtest/peers/compare.sh
#
# Both run on loopback; data on $DATA_DIR (tmpfs by default). TimerDB syncs every commit;
# Redis runs with AOF fsync every second (its usual durable setting).
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=../scripts/lib.sh
source loadtest/scripts/lib.sh

RATES=${RATES:-"5000 10000 20000 30000"}
DURATION=${DURATION:-20}
FIRE_MIN_MS=${FIRE_MIN_MS:-1000}
FIRE_MAX_MS=${FIRE_MAX_MS:-5000}
PAYLOAD_BYTES=${PAYLOAD_BYTES:-64}
BATCH=${BATCH:-1000}
P99_MS=${P99_MS:-10}
KEEP_UP_MS=${KEEP_UP_MS:-1000}
DATA_DIR=${DATA_DIR:-/dev/shm/timerdb-compare}
TIMERDB_PORT=${TIMERDB_PORT:-17430}
REDIS_PORT=${REDIS_PORT:-16380}
OUT=${OUT:-$TARGET_DIR/loadtest-reports/compare-$(date +%Y%m%d-%H%M%S)}

summarize() {
  python3 - "$OUT" "$P99_MS" "$RATES" "$KEEP_UP_MS" <<'PY' | tee "$OUT/compare.txt"
import json, sys
from pathlib import Path
out, p99_max, rates = Path(sys.argv[1]), float(sys.argv[2]), [int(r) for r in sys.argv[3].split()]
keep_up = float(sys.argv[4])

def timerdb(rate):
    files = sorted((out / f"timerdb-{rate}").glob("*.json"))
    if not files:
        return None
    r = json.loads(files[0].read_text())
    return dict(acked_rate=r["acked_rate"], p99=r["lateness_ms"]["p99"],
                bad=r["counts"]["lost"] + r["counts"]["early"])

def bullmq(rate):
    try:
        r = json.loads((out / f"bullmq-{rate}.json").read_text().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        return None
    return dict(acked_rate=r["acked_rate"], p99=r["lateness_ms"]["p99"], bad=r["lost"] + r["early"])

def delivered(r, rate):
    """Kept up: everything delivered, the target rate taken, p99 lateness under keep_up."""
    return r and r["bad"] == 0 and r["acked_rate"] >= 0.95 * rate and r["p99"] <= keep_up

def ok(r, rate):
    return delivered(r, rate) and r["p99"] <= p99_max

def ratio(a, b):
    return f"{a / b:.3g}" if a and b else "n/a"

print(f"{'rate':>7} | {'TimerDB acked/s':>15} {'p99 ms':>7} | {'BullMQ acked/s':>14} {'p99 ms':>7} | "
      f"{'rate ratio':>10} {'p99 ratio':>9}")
best = {k: {"timerdb": 0, "bullmq": 0} for k in ("delivered", "p99")}
for rate in rates:
    t, b = timerdb(rate), bullmq(rate)
    for name, r in (("timerdb", t), ("bullmq", b)):
        if delivered(r, rate): best["delivered"][name] = rate
        if ok(r, rate): best["p99"][name] = rate
    if not (t and b):
        print(f"{rate:>7} | missing result (timerdb {bool(t)}, bullmq {bool(b)})")
        continue
    print(f"{rate:>7} | {t['acked_rate']:>15.0f} {t['p99']:>7.0f} | {b['acked_rate']:>14.0f} {b['p99']:>7.0f} | "
          f"{ratio(t['acked_rate'], b['acked_rate']):>10} {ratio(t['p99'], b['p99']):>9}"
          + ("" if t["bad"] == 0 and b["bad"] == 0
             else f"  (lost/early/undelivered by end of drain: timerdb {t['bad']}, bullmq {b['bad']})"))
d, p = best["delivered"], best["p99"]
print(f"highest rate kept up with (every timer delivered, >= 95% of the target acknowledged, "
      f"p99 lateness <= {keep_up:g} ms): "
      f"TimerDB {d['timerdb']}/s, BullMQ {d['bullmq']}/s, ratio {ratio(d['timerdb'], d['bullmq'])}")
print(f"... and also p99 lateness <= {p99_max:g} ms: TimerDB {p['timerdb']}/s, BullMQ {p['bullmq']}/s, "
      f"ratio {ratio(p['timerdb'], p['bullmq'])}")
print("ratios are TimerDB/BullMQ: p99 ratio < 1 means TimerDB fires closer to the epoch; rate ratio > 1 "
      "means TimerDB took timers faster. For BullMQ, undelivered means its worker had not received the "
      "job when the drain ended (it fell behind), not that Redis dropped it.")
PY
}
if [[ -n "${SUMMARY_ONLY:-}" ]]; then
  summarize
  exit 0
fi

if ! command -v redis-server >/dev/null; then
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server
fi
if [[ ! -d loadtest/peers/bullmq/node_modules ]]; then
  # `npm install` with the lock file's versions, not `npm ci`: npm 10-11 refuse this lock in
  # `npm ci` over platform-specific optional packages of msgpackr-extract it cannot record
  # for other platforms (npm/cli#4828, fixed by npm/cli#9083), whoever generates it.
  # --no-save: the lock file is read, never rewritten.
  (cd loadtest/peers/bullmq && npm install --no-audit --no-fund --no-save)
fi
cargo build --release -p timerdb -p timerdb-loadtest

mkdir -p "$OUT"
rm -rf "$DATA_DIR"
mkdir -p "$DATA_DIR/redis"
NODE_PID=
REDIS_PID=
cleanup() {
  [[ -n "$NODE_PID" ]] && kill "$NODE_PID" 2>/dev/null && wait "$NODE_PID" 2>/dev/null
  [[ -n "$REDIS_PID" ]] && kill "$REDIS_PID" 2>/dev/null && wait "$REDIS_PID" 2>/dev/null
  rm -rf "$DATA_DIR"
}
trap cleanup EXIT

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$DATA_DIR/redis" --save '' \
  --appendonly yes --appendfsync everysec >"$OUT/redis.log" 2>&1 &
REDIS_PID=$!

for rate in $RATES; do
  rm -rf "$DATA_DIR/timerdb"
  mkdir -p "$DATA_DIR/timerdb"
  : >"$DATA_DIR/timerdb/fired.jsonl"
  "$RELEASE/timerdb" serve --listen "127.0.0.1:$TIMERDB_PORT" --metrics-listen off \
    --store "embedded://$DATA_DIR/timerdb/data" --sink "jsonl://$DATA_DIR/timerdb/fired.jsonl" \
    >"$OUT/timerdb-$rate.log" 2>&1 &
  NODE_PID=$!
  echo "== rate $rate: TimerDB"
  "$RELEASE/timerdb-loadtest" steady --target "127.0.0.1:$TIMERDB_PORT" \
    --jsonl "$DATA_DIR/timerdb/fired.jsonl" --server-pid "$NODE_PID" --rate "$rate" \
    --duration "${DURATION}s" --fire "${FIRE_MIN_MS}ms..${FIRE_MAX_MS}ms" \
    --payload-bytes "$PAYLOAD_BYTES" --batch "$BATCH" --no-progress \
    --report-dir "$OUT/timerdb-$rate" || true
  kill "$NODE_PID"
  wait "$NODE_PID" 2>/dev/null || true
  NODE_PID=
  echo "== rate $rate: BullMQ"
  node loadtest/peers/bullmq/bench.mjs --redis "127.0.0.1:$REDIS_PORT" --rate "$rate" \
    --duration "$DURATION" --fire-min-ms "$FIRE_MIN_MS" --fire-max-ms "$FIRE_MAX_MS" \
    --payload-bytes "$PAYLOAD_BYTES" --batch "$BATCH" | tee "$OUT/bullmq-$rate.json" || true
done

summarize
