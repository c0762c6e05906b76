# Helpers the benchmark scripts share (sourced, not run): the server process they
# start, its CPU time, and what it says it answered.
#
# Needs: HTTP_PORT (the server's plain HTTP listener, where /metrics is served).
# Sets: server_pid (the scripts assign it when they start the server), and an EXIT
# trap that stops it.

server_pid=""

# Stops the server started last (SIGTERM, then waits for it), if any.
stop_server() {
  if [ -n "$server_pid" ]; then
    kill -TERM "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=""
  fi
}
trap stop_server EXIT

# The samples the server has answered over gRPC so far, from its own counter; empty
# when the server has no /metrics (the bare baselines).
samples_answered() {
  curl -sf "${METRICS_URL:-http://127.0.0.1:$HTTP_PORT/metrics}" 2>/dev/null |
    awk '/^tidewatch_samples_total\{/ && /transport="grpc"/ {s += $NF; n++} END {if (n) printf "%d", s}' || true
}

# CPU time (user + system, in clock ticks) process $1 has used so far.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
