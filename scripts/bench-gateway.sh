#!/usr/bin/env bash
# wrk benchmark of the HTTP gateway: POST /ingest with one sample per request against
# tidewatch and, in the same run, against a bare axum endpoint that parses the same JSON
# and answers a constant (server/examples/bare_gateway.rs). Each server is pinned to
# CPU 0 and wrk to CPU 1 with taskset. The two targets alternate for ROUNDS rounds;
# prints both rates per round and the median ratio (goal >= 0.7).
# Not part of CI. Needs wrk (Debian package `wrk`) and taskset (util-linux).
#
#   scripts/bench-gateway.sh            # 3 rounds of 10 s per target, 32 connections
#   ROUNDS=5 DURATION=30s CONNECTIONS=64 scripts/bench-gateway.sh
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION="${DURATION:-10s}"
CONNECTIONS="${CONNECTIONS:-32}"
SERVER_CPU="${SERVER_CPU:-0}"
WRK_CPU="${WRK_CPU:-1}"
GATEWAY_PORT="${GATEWAY_PORT:-18480}"
BARE_PORT="${BARE_PORT:-18481}"
ROUNDS="${ROUNDS:-3}"
BODY='{"timestamp": 1710000000, "device_id": "sensor-1", "cpu": 0.75, "rps": 150}'

command -v wrk >/dev/null || { echo "wrk not found: apt-get install wrk" >&2; exit 1; }
command -v taskset >/dev/null || { echo "taskset not found: apt-get install util-linux" >&2; exit 1; }

# The binary as scripts/test builds it, then the example (apart: an example build
# unifies dev-dependency features and would rebuild the binary otherwise).
cargo build --release --workspace --bins
cargo build --release --example bare_gateway
bin=target/release
work="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

cat >"$work/ingest.lua" <<LUA
wrk.method = "POST"
wrk.body = '$BODY'
wrk.headers["Content-Type"] = "application/json"
LUA

# Waits until POST /ingest on $1 answers 200.
wait_for() {
  for _ in $(seq 1 100); do
    if curl -fsS -o /dev/null -H 'Content-Type: application/json' -d "$BODY" "http://127.0.0.1:$1/ingest" 2>/dev/null; then
      return 0
    fi
    sleep 0.1
  done
  echo "nothing answers on port $1" >&2
  exit 1
}

# Runs wrk against port $1 and prints its requests per second.
run_wrk() {
  local out="$work/wrk-$1.txt"
  echo "+ taskset -c $WRK_CPU wrk -t1 -c$CONNECTIONS -d$DURATION --latency -s ingest.lua http://127.0.0.1:$1/ingest" >&2
  taskset -c "$WRK_CPU" wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency -s "$work/ingest.lua" \
    "http://127.0.0.1:$1/ingest" | tee "$out" >&2
  if grep -q "Non-2xx" "$out"; then
    echo "non-2xx answers from port $1" >&2
    exit 1
  fi
  awk '/^Requests\/sec:/ { print $2 }' "$out"
}

echo "+ taskset -c $SERVER_CPU $bin/tidewatch (LISTEN_ADDR=127.0.0.1:$GATEWAY_PORT, LOG_LEVEL=warn)" >&2
LISTEN_ADDR="127.0.0.1:$GATEWAY_PORT" GRPC_ADDR="127.0.0.1:0" LOG_LEVEL=warn \
  taskset -c "$SERVER_CPU" "$bin/tidewatch" &
pids+=($!)
echo "+ taskset -c $SERVER_CPU $bin/examples/bare_gateway 127.0.0.1:$BARE_PORT" >&2
taskset -c "$SERVER_CPU" "$bin/examples/bare_gateway" "127.0.0.1:$BARE_PORT" >/dev/null &
pids+=($!)
wait_for "$GATEWAY_PORT"
wait_for "$BARE_PORT"

# Alternate the two targets, ROUNDS times, so that a burst of load from elsewhere on
# the machine hits both alike; the ratio reported is the median of the rounds'.
ratios=()
for round in $(seq 1 "$ROUNDS"); do
  gateway_rps="$(run_wrk "$GATEWAY_PORT")"
  bare_rps="$(run_wrk "$BARE_PORT")"
  ratio="$(awk -v g="$gateway_rps" -v b="$bare_rps" 'BEGIN { printf "%.2f", g / b }')"
  ratios+=("$ratio")
  echo "round $round: tidewatch $gateway_rps req/s, bare $bare_rps req/s, ratio $ratio"
done
median="$(printf '%s\n' "${ratios[@]}" | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }')"
echo "median ratio: $median (goal >= 0.70)"
