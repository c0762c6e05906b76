#!/usr/bin/env bash
# What one device costs in memory, per detector and shape: the sizing table of
# docs/operations.md ("Memory"). For each shape it starts the release server with
# the shape's settings, waits for it to settle, sends DEVICES devices with every
# window full (tidewatch-bench, one pass, as many rounds as the longest window), and
# reports the RSS growth per device beside what MEMORY_BUDGET charges per device
# (the server's tidewatch_memory_used_bytes gauge). Not part of CI.
#
# Shapes: zscore and robust, each with 2 metrics x 50 values (the README's device), 32
# metrics x 50 values, and 2 and 32 metrics with a window (robust: a baseline) of
# 4,096. Results: a Markdown table on standard output and in $OUT/device-memory.md.
# Settings (environment): BIN (default target/release; BUILD=0 skips the release
# build), SCALE (device counts multiplied by it, default 1), OUT.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${BIN:-target/release}
BUILD=${BUILD:-1}
SCALE=${SCALE:-1}
OUT=${OUT:-$(mktemp -d)}
PORT=${PORT:-58051}
HTTP_PORT=${HTTP_PORT:-58080}
mkdir -p "$OUT"

if [ "$BUILD" = 1 ]; then
  cargo build --release -p tidewatch-server --bin tidewatch
  cargo build --release -p tidewatch-loadgen --bin tidewatch-bench
fi

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
gauge() {
  curl -sf "http://127.0.0.1:$HTTP_PORT/metrics" | awk -v n="$1" '$1 == n {printf "%d", $2}'
}

server_pid=""
stop_server() {
  if [ -n "$server_pid" ]; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=""
  fi
}
trap stop_server EXIT

# measure NAME DETECTOR METRICS WINDOW DEVICES
measure() {
  local name=$1 detector=$2 metrics=$3 window=$4 devices=$(($5 * SCALE))
  local rolling=50 robust=128 rounds
  if [ "$detector" = zscore ]; then rolling=$window; else robust=$window; fi
  rounds=$((rolling > robust ? rolling : robust))
  [ "$detector" = zscore ] && rounds=$rolling
  env GRPC_ADDR="127.0.0.1:$PORT" LISTEN_ADDR="127.0.0.1:$HTTP_PORT" LOG_FORMAT=json \
    DETECTOR="$detector" WINDOW_SIZE="$rolling" MIN_SAMPLES=5 ROBUST_WINDOW="$robust" \
    ROBUST_MIN_SAMPLES=32 MEMORY_BUDGET=16GiB MAX_DEVICES=10000000 \
    "$BIN/tidewatch" >"$OUT/$name.log" 2>&1 &
  server_pid=$!
  for _ in $(seq 1 200); do
    grep -q 'grpc listening' "$OUT/$name.log" && break
    sleep 0.05
  done
  # Warm up the runtime and the allocator with a few devices of another id range.
  "$BIN/tidewatch-bench" --url "http://127.0.0.1:$PORT" -c 1 -s 1 --batch 100 --devices 100 \
    --metrics "$metrics" --rounds 2 --messages 2 --ids short >/dev/null 2>&1
  sleep 1
  local before after used warm
  before=$(rss_kib "$server_pid")
  warm=$(gauge tidewatch_memory_used_bytes)
  local batch=$((metrics > 8 ? 100 : 1000))
  "$BIN/tidewatch-bench" --url "http://127.0.0.1:$PORT" -c 1 -s 4 --window 4 --batch "$batch" \
    --devices "$devices" --metrics "$metrics" --rounds "$rounds" \
    --messages $((devices * rounds / batch)) >"$OUT/$name.bench.txt" 2>&1
  sleep 1
  after=$(rss_kib "$server_pid")
  used=$(gauge tidewatch_memory_used_bytes)
  stop_server
  local rss_per=$(((after - before) * 1024 / devices))
  local charged=$(((used - warm) / devices))
  printf '| %s | %s | %s | %s | %s | %s |\n' "$detector" "$metrics" "$window" "$devices" \
    "$rss_per" "$charged" | tee -a "$OUT/device-memory.md"
}

{
  echo "| detector | metrics | window | devices | measured bytes/device (RSS) | charged bytes/device (MEMORY_BUDGET) |"
  echo "|---|---|---|---|---|---|"
} | tee "$OUT/device-memory.md"
measure zscore-2x50 zscore 2 50 100000
measure zscore-32x50 zscore 32 50 4000
measure zscore-2x4096 zscore 2 4096 500
measure zscore-32x4096 zscore 32 4096 40
measure robust-2x128 robust 2 128 20000
measure robust-32x128 robust 32 128 1000
measure robust-2x4096 robust 2 4096 500
measure robust-32x4096 robust 32 4096 40
echo "results in $OUT/device-memory.md"
