#!/usr/bin/env bash
# TimerDB against its peers at the same rates, delays and payload size, in one go: BullMQ
# delayed jobs (Redis) and, with PEERS="bullmq rocketmq", RocketMQ 5 timer messages at each
# timer precision in ROCKETMQ_PRECISIONS (rocketmq/run.sh). Prints per peer and rate both
# systems' acknowledged rate and p99 fire lateness, and the TimerDB/peer ratios, then the
# highest rate each sustained (nothing lost or early, >= 95 % of the target acknowledged,
# p99 lateness <= P99_MS; and the same with p99 <= KEEP_UP_MS, i.e. still keeping up).
#
#   loadtest/peers/compare.sh
#   RATES="5000 10000 20000" DURATION=20 loadtest/peers/compare.sh
#   PEERS="bullmq rocketmq" ROCKETMQ_PRECISIONS="1000 100" loadtest/peers/compare.sh
#   PEERS=rocketmq RATES=5000 loadtest/peers/compare.sh     # TimerDB and RocketMQ only
#
# All run on loopback; data on $DATA_DIR (tmpfs by default). TimerDB syncs every commit;
# Redis runs with AOF fsync every second (its usual durable setting); RocketMQ's broker with
# ROCKETMQ_FLUSH (SYNC_FLUSH by default: a send is answered after the commit log's flush).
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=SCRIPTDIR/../scripts/lib.sh
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
PEERS=${PEERS:-bullmq}
ROCKETMQ_PRECISIONS=${ROCKETMQ_PRECISIONS:-"1000 100"}
ROCKETMQ_FLUSH=${ROCKETMQ_FLUSH:-SYNC_FLUSH}
has_peer() { [[ " $PEERS " == *" $1 "* ]]; }
# Result files are $OUT/<label>-<rate>.json; one label per peer setting.
LABELS=()
has_peer bullmq && LABELS+=(bullmq)
if has_peer rocketmq; then
  for p in $ROCKETMQ_PRECISIONS; do LABELS+=("rocketmq-p$p"); done
fi

summarize() {
  python3 - "$OUT" "$P99_MS" "$RATES" "$KEEP_UP_MS" "${LABELS[*]}" <<'PY' | tee "$OUT/compare.txt"
import json, sys
from pathlib import Path
out, p99_max, rates = Path(sys.argv[1]), float(sys.argv[2]), [int(r) for r in sys.argv[3].split()]
keep_up = float(sys.argv[4])
labels = sys.argv[5].split()

def timerdb(rate):
    files = sorted((out / f"timerdb-{rate}").glob("*.json"))
    if not files:
        return None
    r = json.loads(files[0].read_text())
    return dict(acked_rate=r["acked_rate"], p99=r["lateness_ms"]["p99"],
                bad=r["counts"]["lost"] + r["counts"]["early"])

def peer(label, rate):
    """One JSON object per run, the last line of <label>-<rate>.json (bench.mjs, TimerPeer)."""
    try:
        r = json.loads((out / f"{label}-{rate}.json").read_text().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        return None
    return dict(acked_rate=r["acked_rate"], p99=r["lateness_ms"]["p99"], bad=r["lost"] + r["early"])

def name(label):
    if label.startswith("rocketmq-p"):
        return f"RocketMQ@{label[len('rocketmq-p'):]}ms"
    return {"bullmq": "BullMQ"}.get(label, label)

def floor_ms(label):
    """Lateness a peer has by design: RocketMQ fires a delivery time's slot after it ends."""
    return int(label[len("rocketmq-p"):]) if label.startswith("rocketmq-p") else 0

def delivered(r, rate, floor=0):
    """Kept up: everything delivered, the target rate taken, p99 lateness under keep_up (plus
    the peer's lateness by design, so a coarse timer wheel is not taken for falling behind)."""
    return r and r["bad"] == 0 and r["acked_rate"] >= 0.95 * rate and r["p99"] <= keep_up + floor

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

if has_peer bullmq; then
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$DATA_DIR/redis" --save '' \
    --appendonly yes --appendfsync everysec >"$OUT/redis.log" 2>&1 &
  REDIS_PID=$!
fi

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
  if has_peer bullmq; then
    echo "== rate $rate: BullMQ"
    node loadtest/peers/bullmq/bench.mjs --redis "127.0.0.1:$REDIS_PORT" --rate "$rate" \
      --duration "$DURATION" --fire-min-ms "$FIRE_MIN_MS" --fire-max-ms "$FIRE_MAX_MS" \
      --payload-bytes "$PAYLOAD_BYTES" --batch "$BATCH" | tee "$OUT/bullmq-$rate.json" || true
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
