# shellcheck shell=bash
# Shared by the benchmark scripts (sourced, not run).

# Where cargo puts its output, as cargo itself reports it: honours CARGO_TARGET_DIR and
# build.target-dir, so the scripts find the binaries they just built.
target_dir() {
  cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])'
}
TARGET_DIR=$(target_dir)
# shellcheck disable=SC2034 # read by the scripts that source this
RELEASE=$TARGET_DIR/release

# Stops the node the script started in the background ($NODE_PID), if any.
stop_node() {
  if [[ -n "${NODE_PID:-}" ]]; then
    kill "$NODE_PID" 2>/dev/null || true
    wait "$NODE_PID" 2>/dev/null || true
    NODE_PID=
  fi
}

# CPU seconds process $1 has used so far (user + system, from /proc; 0 if it is gone).
cpu_seconds() {
  local f
  f=$(cat "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }
  f=${f##*) }
  python3 -c 'import os, sys; f = sys.argv[1].split(); print((int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK"))' "$f"
}

# Server resources over a run: `resources_start FILE name=pid ...` samples each process
# every 0.2 s in the background until `resources_stop`, which writes FILE (JSON): per
# process the CPU seconds it used over the window (user + system), its share of one core,
# the largest RSS sampled (peak_rss_bytes) and VmHWM (the process's lifetime peak, which for
# a long-lived server such as a shared Kafka predates the run); "total" sums CPU and takes
# the largest sampled sum of RSS; load_avg is the 1-minute load at the start, end and max.
RESOURCES_PID=
resources_start() {
  local out=$1
  shift
  python3 -c '
import json, os, signal, sys, time
out = sys.argv[1]
procs = dict(a.split("=", 1) for a in sys.argv[2:])
tck = os.sysconf("SC_CLK_TCK")
def cpu(pid):
    try:
        f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / tck
    except (OSError, ValueError, IndexError):
        return None
def status(pid, key):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None
def load():
    try:
        return float(open("/proc/loadavg").read().split()[0])
    except (OSError, ValueError):
        return None
stop = False
def on_term(*_):
    global stop
    stop = True
signal.signal(signal.SIGTERM, on_term)
t0, load0 = time.time(), load()
first = {n: cpu(p) for n, p in procs.items()}
last = dict(first)
peak = {n: 0 for n in procs}
hwm = {n: None for n in procs}
peak_total, load_max = 0, load0 or 0
while True:
    total = 0
    for n, p in procs.items():
        c = cpu(p)
        if c is not None:
            last[n] = c
        r = status(p, "VmRSS") or 0
        peak[n] = max(peak[n], r)
        total += r
        hwm[n] = status(p, "VmHWM") or hwm[n]
    peak_total = max(peak_total, total)
    load_max = max(load_max, load() or 0)
    if stop:
        break
    time.sleep(0.2)
window = time.time() - t0
res = {"window_s": round(window, 1), "load_avg": {"start": load0, "end": load(), "max": load_max}}
cpu_total = 0
for n, p in procs.items():
    c = (last[n] - first[n]) if first[n] is not None and last[n] is not None else None
    cpu_total += c or 0
    res[n] = {"pid": int(p), "cpu_s": round(c, 2) if c is not None else None, "cpu_pct": round(100 * c / window, 1) if c is not None else None,
              "peak_rss_bytes": peak[n], "vm_hwm_bytes": hwm[n]}
res["total"] = {"cpu_s": round(cpu_total, 2), "cpu_pct": round(100 * cpu_total / window, 1),
                "peak_rss_bytes": peak_total}
open(out, "w").write(json.dumps(res) + "\n")
' "$out" "$@" &
  RESOURCES_PID=$!
}
resources_stop() {
  if [[ -n "${RESOURCES_PID:-}" ]]; then
    kill -TERM "$RESOURCES_PID" 2>/dev/null || true
    wait "$RESOURCES_PID" 2>/dev/null || true
    RESOURCES_PID=
  fi
}
# Adds FILE2 (resources_start's JSON) as "server_resources" to the last JSON line of FILE1.
resources_merge() {
  python3 -c '
import json, sys
from pathlib import Path
f, r = Path(sys.argv[1]), Path(sys.argv[2])
try:
    res = json.loads(r.read_text())
    text = f.read_text()
    try:  # one JSON document (the timerdb-loadtest report)
        obj = json.loads(text)
        obj["server_resources"] = res
        f.write_text(json.dumps(obj, indent=2 if "\n" in text.strip() else None) + "\n")
    except ValueError:  # log lines, then one JSON object (the peer adapters)
        lines = text.rstrip("\n").split("\n")
        obj = json.loads(lines[-1])
        obj["server_resources"] = res
        lines[-1] = json.dumps(obj)
        f.write_text("\n".join(lines) + "\n")
except (OSError, ValueError, IndexError):
    pass
' "$1" "$2"
}
