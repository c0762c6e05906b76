#!/usr/bin/env bash
# (c) of the gRPC suite by offered rate: tidewatch and bare tonic both pinned to
# SERVER_CPU (0), tidewatch-bench on LOAD_CPU (1) at each of RATES, paced single-sample
# messages on 2 connections x 4 streams, DURATION (8s) each, RUNS (1) times per rate,
# tidewatch and bare tonic alternating. Prints p50/p99/p99.9 and the load generator's
# own CPU: its share of the core (`/usr/bin/time %P`; above ~95 % the load generator is
# saturated and its queueing is in the numbers) and its CPU time per answered message,
# and the server's share of its core over the run (a server near 100 % queues, and
# that is its tail).
# The traffic is tidewatch-bench's default fleet (realistic ids, timestamps, 2-8
# metrics, 1 % injected anomalies) with one WatchAnomalies subscriber; bare-tonic
# shares tidewatch's allocator, runtime and socket options (see scripts/bench.sh).
# Needs the release binaries (`cargo build --release -p tidewatch-server -p
# tidewatch-loadgen`); BIN (target/release) is where they are, BARE the bare tonic
# binary (default $BIN/bare-tonic). Environment such as MIMALLOC_PURGE_DELAY reaches
# both servers (the load generator does not use mimalloc).
set -euo pipefail
cd "$(dirname "$0")/.."
SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
RATES=${RATES:-"850000 400000 200000"}
RUNS=${RUNS:-1}
DURATION=${DURATION:-8s}
BIN=${BIN:-target/release}
BARE=${BARE:-$BIN/bare-tonic}
OUT=${OUT:-target/bench-latency}
mkdir -p "$OUT"

wait_listening() { # log pid
  for _ in $(seq 1 200); do
    grep -q 'grpc listening' "$1" && return 0
    kill -0 "$2" 2>/dev/null || { cat "$1" >&2; echo "server exited" >&2; exit 1; }
    sleep 0.05
  done
  echo "server did not start: $1" >&2
  exit 1
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

run() { # name url rate run server-pid
  local name="$1-$3-$4" t0 t1 s0 s1
  t0=$(cpu_ticks "$5")
  s0=$(date +%s.%N)
  /usr/bin/time -f "loadgen cpu %P user %U sys %S wall %e" \
    taskset -c "$LOAD_CPU" "$BIN/tidewatch-bench" --url "$2" -c 2 -s 4 --threads 1 --watchers 1 \
    --rate "$3" --batch 1 --devices 10000 --duration "$DURATION" --output "$OUT/$name.json" >"$OUT/$name.txt" 2>&1
  t1=$(cpu_ticks "$5")
  s1=$(date +%s.%N)
  local server_share
  server_share=$(python3 -c "print(round(100 * ($t1 - $t0) / $(getconf CLK_TCK) / ($s1 - $s0)))")
  python3 - "$OUT/$name.json" "$OUT/$name.txt" "$1" "$3" "$server_share" <<'PY'
import json, re, sys
r = json.load(open(sys.argv[1]))
text = open(sys.argv[2]).read()
d = {x["percentage"]: x["latency"] / 1000 for x in r["latencyDistribution"]}
p999 = int(r["tags"]["p99.9_ns"]) / 1000
m = re.search(r"loadgen cpu (\d+)% user ([\d.]+) sys ([\d.]+)", text)
share, user, system = m.group(1), float(m.group(2)), float(m.group(3))
per_message = (user + system) * 1e6 / max(1, r["count"])
ok = r["statusCodeDistribution"].get("OK", 0)
print(f"{sys.argv[3]:<9} rate {sys.argv[4]:>7}: p50 {d[50]:7.0f} us  p99 {d[99]:8.0f} us  p99.9 {p999:8.0f} us  "
      f"rps {r['rps']:8.0f}  ok {ok}/{r['count']}  loadgen cpu {share:>3}% = {per_message:.3f} us/msg  "
      f"server cpu {sys.argv[5]:>3}%")
PY
}

env GRPC_ADDR=127.0.0.1:50061 LISTEN_ADDR=127.0.0.1:50081 taskset -c "$SERVER_CPU" "$BIN/tidewatch" >"$OUT/tidewatch.log" 2>&1 &
tw=$!
taskset -c "$SERVER_CPU" "$BARE" --addr 127.0.0.1:50062 >"$OUT/bare.log" 2>&1 &
bare=$!
trap 'kill $tw $bare 2>/dev/null || true' EXIT
wait_listening "$OUT/tidewatch.log" "$tw"
wait_listening "$OUT/bare.log" "$bare"
for rate in $RATES; do
  for i in $(seq 1 "$RUNS"); do
    run tidewatch http://127.0.0.1:50061 "$rate" "$i" "$tw"
    run bare http://127.0.0.1:50062 "$rate" "$i" "$bare"
  done
done
