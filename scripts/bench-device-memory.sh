#!/usr/bin/env bash
# What one device costs in memory, per detector and shape: the sizing table of
# docs/operations.md ("Sizing"). For each shape it starts the release server with the
# shape's settings (one shard, so that the window-value pool's last, partly used 4 MiB
# chunk is counted once), sends N devices with every window full (tidewatch-bench,
# one pass, as many rounds as the longest window, 34-byte fleet ids), then N more
# (36-byte uuid ids), and reports the RSS growth of the second N per device (the
# marginal cost: what the first N leave behind of fixed costs is not in it) beside
# what MEMORY_BUDGET charges per device (the server's tidewatch_memory_used_bytes
# gauge). Not part of CI.
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
  curl -sf "http://127.0.0.1:$HTTP_PORT/metrics" |
    awk -v n="$1" '$1 == n || index($1, n "{") == 1 {printf "%d", $NF}'
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
    ROBUST_MIN_SAMPLES=32 MEMORY_BUDGET=16GiB MAX_DEVICES=10000000 SHARDS=1 \
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
  local batch=$((metrics > 8 ? 100 : 1000))
  local before middle after used_middle used_after ids
  before=$(rss_kib "$server_pid")
  for ids in fleet uuid; do
    "$BIN/tidewatch-bench" --url "http://127.0.0.1:$PORT" -c 1 -s 4 --window 4 --batch "$batch" \
      --devices "$devices" --metrics "$metrics" --rounds "$rounds" --ids "$ids" \
      --messages $((devices * rounds / batch)) >"$OUT/$name.$ids.txt" 2>&1
    sleep 1
    if [ "$ids" = fleet ]; then
      middle=$(rss_kib "$server_pid")
      used_middle=$(gauge tidewatch_memory_used_bytes)
    fi
  done
  after=$(rss_kib "$server_pid")
  used_after=$(gauge tidewatch_memory_used_bytes)
  stop_server
  printf '| %s | %s | %s | %s | %s | %s | %s |\n' "$detector" "$metrics" "$window" "$devices" \
    "$(((after - middle) * 1024 / devices))" "$(((used_after - used_middle) / devices))" \
    "$(((middle - before) * 1024 / devices))" | tee -a "$OUT/device-memory.md"
}

{
  echo "| detector | metrics | window | devices | measured bytes/device (RSS, second N) | charged bytes/device (MEMORY_BUDGET) | RSS bytes/device, first N |"
  echo "|---|---|---|---|---|---|---|"
} | tee "$OUT/device-memory.md"
measure zscore-2x50 zscore 2 50 40000
measure zscore-32x50 zscore 32 50 2000
measure zscore-2x4096 zscore 2 4096 500
measure zscore-32x4096 zscore 32 4096 32
measure robust-2x128 robust 2 128 10000
measure robust-32x128 robust 32 128 500
measure robust-2x4096 robust 2 4096 500
measure robust-32x4096 robust 32 4096 32
echo "results in $OUT/device-memory.md"
