#!/usr/bin/env bash
# The server's CPU per sample with gzip (docs/benchmarking.md, "Compression"): one
# tidewatch (GRPC_COMPRESSION=gzip) pinned to SERVER_CPU (0), tidewatch-bench on
# LOAD_CPU (1) sending MESSAGES (20000) closed-loop messages of BATCH (100) samples
# (short ids, 2 metrics, 10,000 devices) on 1 connection x 4 streams, in three modes
# alternating RUNS (3) times: uncompressed, gzip requests (`--gzip`), gzip both ways
# (`--gzip --accept-gzip`). The server's CPU time over each run (/proc/PID/stat) is
# divided by the samples answered. Needs the release binaries (`cargo build --release
# -p tidewatch-server -p tidewatch-loadgen`) in BIN (target/release).
set -euo pipefail
cd "$(dirname "$0")/.."
SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
RUNS=${RUNS:-3}
MESSAGES=${MESSAGES:-20000}
BATCH=${BATCH:-100}
BIN=${BIN:-target/release}
OUT=${OUT:-target/bench-compression}
mkdir -p "$OUT"

GRPC_ADDR=127.0.0.1:0 LISTEN_ADDR=127.0.0.1:0 GRPC_COMPRESSION=gzip LOG_FORMAT=json \
  taskset -c "$SERVER_CPU" "$BIN/tidewatch" >"$OUT/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 1 200); do
  grep -q 'grpc listening' "$OUT/server.log" && break
  sleep 0.05
done
addr=$(sed -n 's/.*"grpc_addr":"\([^"]*\)".*/\1/p' "$OUT/server.log" | head -1)
[ -n "$addr" ] || { cat "$OUT/server.log" >&2; exit 1; }

cpu_ticks() { awk '{print $14 + $15}' "/proc/$server/stat"; }

run() { # mode flags...
  local mode=$1 t0 t1
  shift
  t0=$(cpu_ticks)
  taskset -c "$LOAD_CPU" "$BIN/tidewatch-bench" --url "http://$addr" -c 1 -s 4 --threads 1 \
    --rate 0 --window 16 --batch "$BATCH" --ids short --metrics 2 --devices 10000 \
    --messages "$MESSAGES" "$@" >"$OUT/$mode.txt" 2>&1
  t1=$(cpu_ticks)
  local answered
  answered=$(sed -n 's/^ *samples answered *\([0-9]*\).*/\1/p' "$OUT/$mode.txt" | head -1)
  python3 -c "
ticks, samples = $t1 - $t0, ${answered:-0}
us = ticks / $(getconf CLK_TCK) * 1e6 / max(1, samples)
print(f'{\"$mode\":<12} {samples:>9} samples  server CPU {us:6.3f} us/sample')"
}

# Warm the windows once, then alternate.
run warm-up >/dev/null
for _ in $(seq 1 "$RUNS"); do
  run plain
  run gzip-in --gzip
  run gzip-both --gzip --accept-gzip
done
