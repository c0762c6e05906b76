#!/usr/bin/env bash
# (c) of the gRPC suite by offered rate: tidewatch and bare tonic both pinned to
# SERVER_CPU (0), tidewatch-bench on LOAD_CPU (1) at each of RATES, paced single-sample
# messages on 2 connections x 4 streams, 8 s each. Prints p50/p99 and the load
# generator's own CPU share (`/usr/bin/time %P`): above ~95 % the load generator is
# saturated and its queueing is in the numbers. Needs the release binaries
# (`cargo build --release -p tidewatch-server -p tidewatch-client --bins`).
set -euo pipefail
cd "$(dirname "$0")/.."
SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
RATES=${RATES:-"850000 400000 200000"}
OUT=${OUT:-target/bench-latency}
mkdir -p "$OUT"
run() { # name url rate
  /usr/bin/time -f "loadgen cpu %P (user %U s, sys %S s, wall %e s)" \
    taskset -c "$LOAD_CPU" target/release/tidewatch-bench --url "$2" -c 2 -s 4 --threads 1 \
    --rate "$3" --batch 1 --devices 10000 --duration 8s --output "$OUT/$1-$3.json" >"$OUT/$1-$3.txt" 2>&1
  local p
  p=$(python3 -c "import json; r=json.load(open('$OUT/$1-$3.json')); d={x['percentage']:x['latency']/1000 for x in r['latencyDistribution']}; print(f\"p50 {d[50]:.0f} us, p99 {d[99]:.0f} us, rps {r['rps']:.0f}\")")
  echo "$1 rate $3: $p; $(grep 'loadgen cpu' "$OUT/$1-$3.txt")"
}
GRPC_ADDR=127.0.0.1:50061 LISTEN_ADDR=127.0.0.1:50081 taskset -c "$SERVER_CPU" target/release/tidewatch >"$OUT/tidewatch.log" 2>&1 &
tw=$!
taskset -c "$SERVER_CPU" target/release/bare-tonic --addr 127.0.0.1:50062 >"$OUT/bare.log" 2>&1 &
bare=$!
trap 'kill $tw $bare 2>/dev/null || true' EXIT
sleep 1
for rate in $RATES; do
  run tidewatch http://127.0.0.1:50061 "$rate"
  run bare http://127.0.0.1:50062 "$rate"
done
