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
