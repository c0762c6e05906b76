#!/usr/bin/env bash
# Two builds of the tidewatch server against each other on the gRPC suite's traffic of
# part (b) (scripts/bench.sh): closed loop, 100 samples per message over DEVICES
# devices (tidewatch-bench's realistic fleet, one watcher), DETECTOR as the server's
# detector. For a change whose effect is on cache misses (detector state of many
# devices), which instruction counts do not show. Each run starts the server, fills
# the devices' state for WARM seconds, then measures for DURATION seconds: the
# server's CPU time (user + system, /proc/PID/stat) per sample it answered meanwhile
# (its own `tidewatch_samples_total`). The builds alternate PAIRS times, server on
# SERVER_CPU, load on LOAD_CPU; prints every run and the median per build.
# Not part of CI. Needs taskset, curl and python3.
#
#   cp target/release/tidewatch /tmp/old/          # before the change
#   OLD=/tmp/old NEW=target/release scripts/bench-ab.sh
#   DETECTOR=zscore DEVICES=100000 PAIRS=5 scripts/bench-ab.sh
set -euo pipefail
cd "$(dirname "$0")/.."

OLD=${OLD:?directory of the old tidewatch binary}
NEW=${NEW:-target/release}
LOADGEN=${LOADGEN:-target/release}
DETECTOR=${DETECTOR:-robust}
DEVICES=${DEVICES:-10000}
WARM=${WARM:-15}
DURATION=${DURATION:-10}
PAIRS=${PAIRS:-3}
SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
PORT=${PORT:-50071}
HTTP_PORT=${HTTP_PORT:-50091}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"

source scripts/lib/bench-server.sh

load() { # seconds name
  taskset -c "$LOAD_CPU" "$LOADGEN/tidewatch-bench" --url "http://127.0.0.1:$PORT" --threads 1 \
    --devices "$DEVICES" --watchers 1 --duration "$1s" -c 4 -s 16 --rate 0 --window 64 \
    --batch 100 >"$OUT/$2.txt" 2>&1 || { cat "$OUT/$2.txt" >&2; exit 1; }
}

# One run of the server in directory $1; prints its CPU µs per sample.
run() {
  local dir=$1 name=$2
  env GRPC_ADDR="127.0.0.1:$PORT" LISTEN_ADDR="127.0.0.1:$HTTP_PORT" LOG_LEVEL=warn \
    DETECTOR="$DETECTOR" taskset -c "$SERVER_CPU" "$dir/tidewatch" >"$OUT/$name.log" 2>&1 &
  server_pid=$!
  for _ in $(seq 1 200); do
    curl -sf -o /dev/null "http://127.0.0.1:$HTTP_PORT/readyz" && break
    sleep 0.05
  done
  load "$WARM" "$name-warm"
  local s0 t0 s1 t1
  s0=$(samples_answered)
  t0=$(cpu_ticks "$server_pid")
  load "$DURATION" "$name"
  t1=$(cpu_ticks "$server_pid")
  s1=$(samples_answered)
  stop_server
  python3 -c "print(f'{($t1 - $t0) / $(getconf CLK_TCK) * 1e6 / max(1, $s1 - $s0):.3f} {($s1 - $s0) / $DURATION:.0f}')"
}

old=()
new=()
for pair in $(seq 1 "$PAIRS"); do
  read -r o orate < <(run "$OLD" "old-$pair")
  read -r n nrate < <(run "$NEW" "new-$pair")
  old+=("$o")
  new+=("$n")
  echo "pair $pair: old $o µs/sample ($orate samples/s), new $n µs/sample ($nrate samples/s), new/old $(python3 -c "print(f'{$n / $o:.3f}')")"
done
python3 - "${old[*]}" "${new[*]}" <<'PY'
import statistics, sys
old, new = ([float(x) for x in a.split()] for a in sys.argv[1:])
print(f"median server CPU per sample: old {statistics.median(old):.3f} µs, new {statistics.median(new):.3f} µs, "
      f"new/old {statistics.median(new) / statistics.median(old):.3f}")
PY
