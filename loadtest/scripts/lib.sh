# Shared by the benchmark scripts (sourced, not run).

# Stops the node the script started in the background ($NODE_PID), if any.
stop_node() {
  if [[ -n "${NODE_PID:-}" ]]; then
    kill "$NODE_PID" 2>/dev/null || true
    wait "$NODE_PID" 2>/dev/null || true
    NODE_PID=
  fi
}
