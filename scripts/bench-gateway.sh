#!/usr/bin/env bash
# wrk benchmark of the HTTP gateway: POST /ingest against tidewatch and, in the same
# run, against bare-axum (tools/loadgen), which reads the body, does the gateway's
# JSON parse into samples, and answers one verdict per sample in the same JSON
# encoding, without detection. bare-axum shares tidewatch's allocator (mimalloc, the
# workspace's features), tokio runtime (multi-thread, all drivers) and TCP_NODELAY.
# Two bodies (BODIES): `single`, one flat sample (34-byte fleet device id, a
# timestamp, 4 metrics), and `batch`, {"samples": [...]} of 100 such samples over 100
# devices. Each server is pinned to SERVER_CPU and wrk to WRK_CPU with taskset. The two
# targets alternate for ROUNDS rounds per body; prints both rates per round and the
# median ratio (goal >= 0.9).
# Not part of CI. Needs wrk (Debian package `wrk`) and taskset (util-linux).
#
#   scripts/bench-gateway.sh            # 3 rounds of 10 s per target and body
#   ROUNDS=5 DURATION=30s CONNECTIONS=64 BODIES=batch scripts/bench-gateway.sh
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION="${DURATION:-10s}"
CONNECTIONS="${CONNECTIONS:-32}"
SERVER_CPU="${SERVER_CPU:-0}"
WRK_CPU="${WRK_CPU:-1}"
GATEWAY_PORT="${GATEWAY_PORT:-18480}"
BARE_PORT="${BARE_PORT:-18481}"
ROUNDS="${ROUNDS:-3}"
BODIES="${BODIES:-single batch}"
BUILD="${BUILD:-1}"
BIN="${BIN:-target/release}"

# A flat sample of device N, as a fleet device sends it.
sample() {
  printf '{"timestamp": %d, "device_id": "fleet-eu-west/gw-%06d/dev-%06d", "cpu": %s, "rps": %d, "mem_used": %s, "temp_c": %s}' \
    $((1710000000 + $1)) $(($1 / 100)) "$1" "0.$((40 + $1 % 50))" $((100 + $1 % 77)) "0.$((60 + $1 % 30))" "$((30 + $1 % 20)).5"
}
SINGLE="$(sample 123)"
BATCH="{\"samples\": [$(for i in $(seq 0 99); do [ "$i" = 0 ] || printf ', '; sample "$i"; done)]}"

command -v wrk >/dev/null || { echo "wrk not found: apt-get install wrk" >&2; exit 1; }
command -v taskset >/dev/null || { echo "taskset not found: apt-get install util-linux" >&2; exit 1; }

# The server alone, as the Dockerfile builds it, then the baseline.
if [ "$BUILD" = 1 ]; then
  cargo build --release -p tidewatch-server --bin tidewatch
  cargo build --release -p tidewatch-loadgen --bin bare-axum
fi
bin=$BIN
work="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

for body in single batch; do
  if [ "$body" = single ]; then text=$SINGLE; else text=$BATCH; fi
  printf '%s' "$text" >"$work/$body.json"
  cat >"$work/$body.lua" <<LUA
wrk.method = "POST"
local f = io.open("$work/$body.json", "rb")
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
LUA
done

# Waits until POST /ingest on $1 answers 200.
wait_for() {
  for _ in $(seq 1 100); do
    if curl -fsS -o /dev/null -H 'Content-Type: application/json' --data-binary "@$work/single.json" "http://127.0.0.1:$1/ingest" 2>/dev/null; then
      return 0
    fi
    sleep 0.1
  done
  echo "nothing answers on port $1" >&2
  exit 1
}

# Runs wrk with body $2 against port $1 and prints its requests per second.
run_wrk() {
  local out="$work/wrk-$1-$2.txt"
  echo "+ taskset -c $WRK_CPU wrk -t1 -c$CONNECTIONS -d$DURATION --latency -s $2.lua http://127.0.0.1:$1/ingest" >&2
  taskset -c "$WRK_CPU" wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency -s "$work/$2.lua" \
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
echo "+ taskset -c $SERVER_CPU $bin/bare-axum --addr 127.0.0.1:$BARE_PORT" >&2
taskset -c "$SERVER_CPU" "$bin/bare-axum" --addr "127.0.0.1:$BARE_PORT" >/dev/null &
pids+=($!)
wait_for "$GATEWAY_PORT"
wait_for "$BARE_PORT"

# Alternate the two targets, ROUNDS times per body, so that a burst of load from
# elsewhere on the machine hits both alike; the ratio reported is the median of the
# rounds'.
for body in $BODIES; do
  ratios=()
  for round in $(seq 1 "$ROUNDS"); do
    gateway_rps="$(run_wrk "$GATEWAY_PORT" "$body")"
    bare_rps="$(run_wrk "$BARE_PORT" "$body")"
    ratio="$(awk -v g="$gateway_rps" -v b="$bare_rps" 'BEGIN { printf "%.2f", g / b }')"
    ratios+=("$ratio")
    echo "$body round $round: tidewatch $gateway_rps req/s, bare-axum $bare_rps req/s, ratio $ratio"
  done
  median="$(printf '%s\n' "${ratios[@]}" | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }')"
  echo "$body: median ratio $median (goal >= 0.90)"
done
