#!/usr/bin/env bash
# The gRPC benchmark suite (not part of CI). It builds the release binaries and runs
# the server pinned to one core (SERVER_CPU) and the load on another (LOAD_CPU),
# tidewatch and its baseline alternating, PAIRS times, so that what else the machine
# does hits both alike; every run is recorded in $OUT/runs.tsv, not only the best.
#
# The baseline, bare-tonic (tools/loadgen), is an idiomatic tonic server on the same
# proto that answers a constant verdict per sample. It shares with tidewatch: the
# allocator (mimalloc, the workspace's feature set), the tokio runtime (multi-thread,
# one worker per core the process may run on, all drivers), TCP_NODELAY on accepted
# sockets, HTTP/2 keepalive (60 s / 20 s) and the message size limits. Both are pinned
# to the same core and get the same bytes from the same load generator.
#
# The traffic, for every part, is tidewatch-bench's default fleet
# (tools/loadgen/src/traffic.rs): 10,000 devices (all reached; the tool prints how
# many), ids of 34 bytes (`fleet-eu-west/gw-000123/dev-012345`), timestamps set, 2-8
# metrics per device, values with noise and drift, 1 % of samples with an injected
# spike (the summary gives the share the server judged anomalous, and its alerts),
# one WatchAnomalies subscriber attached during every run.
#
#   (a) 1 sample per message, closed loop (H2_CONNECTIONS x H2_STREAMS streams, 64
#       outstanding messages each): messages/s, tidewatch / bare-tonic per pair and
#       the median; server CPU per message (it hardly moves when other processes take
#       turns on the server's core);
#   (b) 100 samples per message, the same, once per detector in DETECTORS (the
#       server's DETECTOR): samples/s;
#   (c) per-message latency, open loop at 50 % of tidewatch's peak in (a), for both
#       servers at the same offered rate, LAT_PAIRS pairs: p50/p99, with a timeline of
#       the slow messages by 100 ms of intended send time (stalls or steady queueing);
#   (d) RSS for 1,000,000 devices x 2 metrics (windows full, realistic ids), and for
#       10,000 idle Ingest streams;
#   (t) with TLS=1 (or "t" in PARTS): the cost of TLS and token authentication,
#       100 samples per message, closed loop: tidewatch as (b) runs it, then tidewatch
#       with TLS (a certificate made with openssl for the run) and an API key checked
#       once per stream (AUTH_POLICY), alternating, PAIRS times: samples/s and p99 of
#       both, the ratio per pair and its median (goal >= 0.85).
# The server's own counter of answered samples (GET /metrics) must cover what the load
# generator counted.
# Results: $OUT/summary.md, $OUT/runs.tsv and the raw outputs beside them.
# Settings (environment): DURATION (seconds per run, default 10), PAIRS (5),
# LAT_PAIRS (3), SERVER_CPU (0), LOAD_CPU (1), H2_CONNECTIONS (4), H2_STREAMS (16 per
# connection), DEVICES (10000), DETECTORS ("zscore robust"), MEM_ROUNDS (samples per
# device in (d), default 50 = a full window), LAT_CONNECTIONS and LAT_STREAMS (streams
# of (c), default 2 x 4), LOAD_THREADS (tokio worker threads of tidewatch-bench,
# default 1: a single-threaded runtime on the load core), TRAFFIC (extra
# tidewatch-bench flags for every run, e.g. "--ids uuid --anomaly-rate 0.02"),
# PROFILE=1 to record `perf` profiles of the server during (a) and (b), PARTS
# ("a b c d", a subset runs only those parts; TLS=1 runs "t" alone), BIN (directory of the binaries, default
# target/release) and BUILD=0 to skip the release build (to measure saved binaries of
# an earlier commit while the tree changes: copy tidewatch, bare-tonic and
# tidewatch-bench from target/release to DIR, then `BIN=DIR BUILD=0`).
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10}
PAIRS=${PAIRS:-5}
LAT_PAIRS=${LAT_PAIRS:-3}
SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
H2_CONNECTIONS=${H2_CONNECTIONS:-4}
H2_STREAMS=${H2_STREAMS:-16}
DEVICES=${DEVICES:-10000}
DETECTORS=${DETECTORS:-"zscore robust"}
MEM_ROUNDS=${MEM_ROUNDS:-50}
LAT_CONNECTIONS=${LAT_CONNECTIONS:-2}
LAT_STREAMS=${LAT_STREAMS:-4}
LOAD_THREADS=${LOAD_THREADS:-1}
TRAFFIC=${TRAFFIC:-}
PROFILE=${PROFILE:-0}
TLS=${TLS:-0}
if [ "$TLS" = 1 ]; then PARTS=${PARTS:-"t"}; fi
PARTS=${PARTS:-"a b c d"}
OUT=${OUT:-target/bench}
PORT=${PORT:-50061}
HTTP_PORT=${HTTP_PORT:-50081}
BARE_PORT=${BARE_PORT:-50062}
ADMIN_PORT=${ADMIN_PORT:-50082}
BIN=${BIN:-target/release}
BUILD=${BUILD:-1}

for tool in taskset curl python3; do
  command -v "$tool" >/dev/null || { echo "bench.sh: $tool is required (apt-get install util-linux curl python3)" >&2; exit 1; }
done

step() { printf '\n==> %s\n' "$*"; }

if [ "$BUILD" = 1 ]; then
  step "cargo build --release (tidewatch; tidewatch-bench and bare-tonic)"
  # The server alone, as the Dockerfile builds it: built together with other packages,
  # cargo resolves the dependencies' features for all of them, and the binary differs.
  cargo build --release -p tidewatch-server --bin tidewatch
  cargo build --release -p tidewatch-loadgen --bins
fi
mkdir -p "$OUT"
printf 'part\tpair\tserver\tdetector\tmessages_per_s\tsamples_per_s\tserver_cpu_us_per_msg\tp50_us\tp99_us\tanomalous_pct\talerts\twatch_events\tloadgen_cpu_pct\n' >"$OUT/runs.tsv"

source scripts/lib/bench-server.sh

# Waits until the server's log has its "grpc listening" line.
wait_listening() {
  local log=$1
  for _ in $(seq 1 200); do
    if grep -q 'grpc listening' "$log"; then return 0; fi
    kill -0 "$server_pid" 2>/dev/null || { cat "$log" >&2; echo "server exited" >&2; exit 1; }
    sleep 0.05
  done
  echo "server did not start: $log" >&2
  exit 1
}

start_tidewatch() { # [VAR=value ...]
  env GRPC_ADDR="127.0.0.1:$PORT" LISTEN_ADDR="127.0.0.1:$HTTP_PORT" LOG_FORMAT=json "$@" \
    taskset -c "$SERVER_CPU" "$BIN/tidewatch" >"$OUT/tidewatch.log" 2>&1 &
  server_pid=$!
  wait_listening "$OUT/tidewatch.log"
}

start_bare() {
  taskset -c "$SERVER_CPU" "$BIN/bare-tonic" --addr "127.0.0.1:$BARE_PORT" >"$OUT/bare.log" 2>&1 &
  server_pid=$!
  wait_listening "$OUT/bare.log"
}

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

# Where samples_answered (scripts/lib/bench-server.sh) reads the server's counter: with
# TLS on, the admin listener serves /metrics in plain HTTP.
METRICS_URL="http://127.0.0.1:$HTTP_PORT/metrics"

perf_pid=""
profile_during() {
  local name=$1
  if [ "$PROFILE" = 1 ] && command -v perf >/dev/null; then
    (sleep 2; perf record -F 999 -g -p "$server_pid" -o "$OUT/$name.perf.data" -- sleep 5 >/dev/null 2>&1 || true) &
    perf_pid=$!
  fi
}

# One tidewatch-bench run against the running server; appends a row to runs.tsv and
# prints "<messages/s> <server CPU µs per message> <p99 µs>".
# Arguments: part pair server detector port name tidewatch-bench flags...
# (server "tidewatch-tls" is tidewatch over TLS with a token: URL and flags from TLS_ARGS)
bench_run() {
  local part=$1 pair=$2 server=$3 detector=$4 port=$5 name=$6
  shift 6
  local t0 t1 before after url="http://127.0.0.1:$port" extra=()
  if [ "$server" = tidewatch-tls ]; then url="https://localhost:$port"; extra=("${TLS_ARGS[@]}"); fi
  before=$(if [ "$server" != bare ]; then samples_answered; fi)
  t0=$(cpu_ticks "$server_pid")
  # shellcheck disable=SC2086 # TRAFFIC is a list of flags
  taskset -c "$LOAD_CPU" "$BIN/tidewatch-bench" --url "$url" "${extra[@]}" --threads "$LOAD_THREADS" \
    --devices "$DEVICES" --watchers 1 --duration "${DURATION}s" --output "$OUT/$name.json" $TRAFFIC "$@" \
    >"$OUT/$name.txt" 2>&1 || { cat "$OUT/$name.txt" >&2; exit 1; }
  t1=$(cpu_ticks "$server_pid")
  if [ "$server" != bare ]; then
    after=$(samples_answered)
    local claimed
    claimed=$(python3 -c "import json; print(json.load(open('$OUT/$name.json'))['tags']['samples_answered'])")
    if [ -n "$before" ] && [ -n "$after" ] && [ $((after - before)) -lt "$claimed" ]; then
      echo "FAIL: tidewatch-bench counted $claimed verdicts, the server answered $((after - before)) samples" >&2
      exit 1
    fi
  fi
  python3 - "$OUT/$name.json" "$((t1 - t0))" "$(getconf CLK_TCK)" "$part" "$pair" "$server" "$detector" "$OUT/runs.tsv" <<'PY'
import json, sys
path, ticks, hz, part, pair, server, detector, tsv = sys.argv[1:]
r = json.load(open(path))
t = r["tags"]
ok = r["statusCodeDistribution"].get("OK", 0)
assert ok == r["count"] and not r["errorDistribution"], f"{path}: not every message answered OK: {r['statusCodeDistribution']}"
assert t["sample_errors"] == "0", f"{path}: per-sample errors"
seconds = r["total"] / 1e9
samples = int(t["samples_answered"])
cpu_us = int(ticks) / int(hz) * 1e6 / max(1, ok)
d = {x["percentage"]: x["latency"] / 1000 for x in r["latencyDistribution"]}
anomalous = 100 * int(t["anomalous_samples"]) / max(1, samples)
row = [part, pair, server, detector, f"{r['rps']:.0f}", f"{samples / seconds:.0f}", f"{cpu_us:.3f}",
       f"{d[50]:.0f}", f"{d[99]:.0f}", f"{anomalous:.2f}", t["alerts"], t["watch_events"], t["loadgen_cpu_percent"]]
open(tsv, "a").write("\t".join(row) + "\n")
print(f"{r['rps']:.0f} {cpu_us:.3f} {d[99]:.0f}")
PY
}

median() { python3 -c "import statistics, sys; print(f'{statistics.median(float(x) for x in sys.argv[1:]):.2f}')" "$@"; }

declare -A RESULT
# Alternating closed-loop pairs: bare-tonic, then tidewatch, PAIRS times.
# Arguments: part detector batch
closed_pairs() {
  local part=$1 detector=$2 batch=$3 ratios=() cpu_ratios=() tw_rates=() i
  for i in $(seq 1 "$PAIRS"); do
    step "($part) pair $i/$PAIRS: bare-tonic, then tidewatch (DETECTOR=$detector), $batch sample(s)/message, ${DURATION}s each"
    start_bare
    read -r bare_rps bare_cpu _ < <(bench_run "$part" "$i" bare "$detector" "$BARE_PORT" "bare-$part-$detector-$i" \
      -c "$H2_CONNECTIONS" -s "$H2_STREAMS" --rate 0 --window 64 --batch "$batch")
    stop_server
    start_tidewatch DETECTOR="$detector"
    profile_during "tidewatch-$part-$detector-$i"
    read -r tw_rps tw_cpu _ < <(bench_run "$part" "$i" tidewatch "$detector" "$PORT" "tidewatch-$part-$detector-$i" \
      -c "$H2_CONNECTIONS" -s "$H2_STREAMS" --rate 0 --window 64 --batch "$batch")
    if [ -n "$perf_pid" ]; then wait "$perf_pid" || true; perf_pid=""; fi
    stop_server
    ratios+=("$(python3 -c "print(f'{$tw_rps / $bare_rps:.2f}')")")
    cpu_ratios+=("$(python3 -c "print(f'{$bare_cpu / $tw_cpu:.2f}')")")
    tw_rates+=("$tw_rps")
    echo "bare-tonic $bare_rps msg/s ($bare_cpu µs CPU/msg); tidewatch $tw_rps msg/s ($tw_cpu µs CPU/msg)"
  done
  RESULT[$part.$detector.ratio]=$(median "${ratios[@]}")
  RESULT[$part.$detector.cpu_ratio]=$(median "${cpu_ratios[@]}")
  RESULT[$part.$detector.tw_msgs]=$(median "${tw_rates[@]}")
  RESULT[$part.$detector.tw_samples]=$(python3 -c "print(round(${RESULT[$part.$detector.tw_msgs]} * $batch))")
  RESULT[$part.$detector.pairs]="${ratios[*]}"
}

want() { [[ " $PARTS " == *" $1 "* ]]; }
ZSCORE=${DETECTORS%% *}
RESULT[a.$ZSCORE.tw_msgs]="-" RESULT[a.$ZSCORE.ratio]="-" RESULT[a.$ZSCORE.cpu_ratio]="-"
RATE="-" LAT="-" RSS_EMPTY=0 RSS_DEVICES=0 RSS_BASE=0 RSS_IDLE=0
want a && closed_pairs a "$ZSCORE" 1
if want b; then
  for detector in $DETECTORS; do closed_pairs b "$detector" 100; done
fi

TLS_ROW=""
if want t; then
  # A CA and a certificate for localhost, and a policy with one API key, for this run.
  TLS_DIR="$OUT/tls"
  mkdir -p "$TLS_DIR"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=bench-ca \
    -keyout "$TLS_DIR/ca.key" -out "$TLS_DIR/ca.pem" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=localhost \
    -keyout "$TLS_DIR/server.key" -out "$TLS_DIR/server.csr" 2>/dev/null
  printf 'subjectAltName=DNS:localhost\n' >"$TLS_DIR/san.ext"
  openssl x509 -req -in "$TLS_DIR/server.csr" -CA "$TLS_DIR/ca.pem" -CAkey "$TLS_DIR/ca.key" \
    -CAcreateserial -days 1 -extfile "$TLS_DIR/san.ext" -out "$TLS_DIR/server.pem" 2>/dev/null
  KEY=$(openssl rand -hex 32)
  HASH=$(printf %s "$KEY" | sha256sum | cut -d' ' -f1)
  printf '{"principals": [{"name": "bench", "scopes": ["ingest", "analyze", "watch"], "devices": ["*"], "api_keys_sha256": ["%s"]}]}\n' \
    "$HASH" >"$TLS_DIR/policy.json"
  TLS_ARGS=(--cacert "$TLS_DIR/ca.pem" --token "$KEY")
  ratios=() plain_rates=() tls_rates=() p99s=""
  for i in $(seq 1 "$PAIRS"); do
    step "(t) pair $i/$PAIRS: tidewatch, then tidewatch with TLS and a token, 100 samples/message, ${DURATION}s each"
    METRICS_URL="http://127.0.0.1:$HTTP_PORT/metrics"
    start_tidewatch DETECTOR="$ZSCORE"
    read -r plain_rps _ plain_p99 < <(bench_run t "$i" tidewatch "$ZSCORE" "$PORT" "plain-t-$i" \
      -c "$H2_CONNECTIONS" -s "$H2_STREAMS" --rate 0 --window 64 --batch 100)
    stop_server
    METRICS_URL="http://127.0.0.1:$ADMIN_PORT/metrics"
    start_tidewatch DETECTOR="$ZSCORE" TLS_CERT="$TLS_DIR/server.pem" TLS_KEY="$TLS_DIR/server.key" \
      AUTH_POLICY="$TLS_DIR/policy.json" ADMIN_ADDR="127.0.0.1:$ADMIN_PORT"
    read -r tls_rps _ tls_p99 < <(bench_run t "$i" tidewatch-tls "$ZSCORE" "$PORT" "tls-t-$i" \
      -c "$H2_CONNECTIONS" -s "$H2_STREAMS" --rate 0 --window 64 --batch 100)
    stop_server
    ratios+=("$(python3 -c "print(f'{$tls_rps / $plain_rps:.2f}')")")
    plain_rates+=("$plain_rps") tls_rates+=("$tls_rps")
    p99s="$p99s $tls_p99/$plain_p99"
    echo "plain $((plain_rps * 100)) samples/s (p99 $plain_p99 µs); TLS + token $((tls_rps * 100)) samples/s (p99 $tls_p99 µs)"
  done
  TLS_ROW="
| (t) 100 samples/message with TLS + token: samples/s (median), TLS / plain per pair; p99 TLS/plain µs | $(python3 -c "print(round($(median "${tls_rates[@]}") * 100))") (plain $(python3 -c "print(round($(median "${plain_rates[@]}") * 100))")) | ${ratios[*]} (median $(median "${ratios[@]}")); p99${p99s} | >= 0.85 x plain |"
fi

if want c; then
  if [ "${RESULT[a.$ZSCORE.tw_msgs]}" = "-" ]; then
    step "(c) tidewatch's closed-loop peak of single-sample messages"
    start_tidewatch
    read -r peak _ _ < <(bench_run c 0 tidewatch "$ZSCORE" "$PORT" peak -c "$H2_CONNECTIONS" -s "$H2_STREAMS" --rate 0 --window 64 --batch 1)
    stop_server
  else
    peak=${RESULT[a.$ZSCORE.tw_msgs]}
  fi
  RATE=$(python3 -c "print(round($peak / 2))")
  LAT=""
  for i in $(seq 1 "$LAT_PAIRS"); do
    step "(c) pair $i/$LAT_PAIRS: $RATE msg/s (50 % of $peak) against bare-tonic, then tidewatch"
    start_bare
    read -r _ _ bare_p99 < <(bench_run c "$i" bare "$ZSCORE" "$BARE_PORT" "latency-bare-$i" -c "$LAT_CONNECTIONS" -s "$LAT_STREAMS" \
      --rate "$RATE" --batch 1 --timeline "$OUT/latency-bare-$i.csv")
    stop_server
    start_tidewatch
    read -r _ _ tw_p99 < <(bench_run c "$i" tidewatch "$ZSCORE" "$PORT" "latency-tidewatch-$i" -c "$LAT_CONNECTIONS" -s "$LAT_STREAMS" \
      --rate "$RATE" --batch 1 --timeline "$OUT/latency-tidewatch-$i.csv")
    stop_server
    echo "p99 bare-tonic $bare_p99 µs, tidewatch $tw_p99 µs"
    LAT="$LAT $tw_p99/$bare_p99"
  done
fi

if want d; then
  step "(d) RSS: 1,000,000 devices x 2 metrics, $MEM_ROUNDS samples each"
  start_tidewatch
  RSS_EMPTY=$(rss_kib "$server_pid")
  taskset -c "$LOAD_CPU" "$BIN/tidewatch-bench" --url "http://127.0.0.1:$PORT" -c 1 -s 4 --window 4 \
    --batch 1000 --devices 1000000 --metrics 2 --messages $((1000 * MEM_ROUNDS)) | tee "$OUT/devices.txt"
  RSS_DEVICES=$(rss_kib "$server_pid")
  stop_server

  step "(d) RSS: 10,000 idle Ingest streams"
  start_tidewatch
  RSS_BASE=$(rss_kib "$server_pid")
  taskset -c "$LOAD_CPU" "$BIN/tidewatch-bench" --url "http://127.0.0.1:$PORT" --idle-streams 10000 --hold 60s \
    >"$OUT/idle.txt" 2>&1 &
  idle_pid=$!
  for _ in $(seq 1 1200); do
    grep -q 'idle streams open' "$OUT/idle.txt" && break
    kill -0 "$idle_pid" 2>/dev/null || { cat "$OUT/idle.txt" >&2; exit 1; }
    sleep 0.05
  done
  grep -q 'idle streams open' "$OUT/idle.txt" || { echo "idle streams did not open" >&2; exit 1; }
  RSS_IDLE=$(rss_kib "$server_pid")
  kill -INT "$idle_pid" 2>/dev/null || true
  wait "$idle_pid" 2>/dev/null || true
  stop_server
fi

PER_STREAM=$(python3 -c "print(round(($RSS_IDLE - $RSS_BASE) * 1024 / 10000))")
DEV_MIB=$(python3 -c "print(round($RSS_DEVICES / 1024))")
B_ROWS=""
for detector in $DETECTORS; do
  B_ROWS="$B_ROWS
| (b) 100 samples/message, DETECTOR=$detector: samples/s (median), tidewatch / bare per pair | ${RESULT[b.$detector.tw_samples]:--} | ${RESULT[b.$detector.pairs]:--} | >= 5,000,000 (zscore), >= 2,500,000 (robust) |"
done

cat >"$OUT/summary.md" <<EOF
| run | tidewatch | ratio to bare-tonic | goal |
|---|---|---|---|
| (a) 1 sample/message: messages/s (median of $PAIRS pairs), tidewatch / bare per pair | ${RESULT[a.$ZSCORE.tw_msgs]} | ${RESULT[a.$ZSCORE.pairs]:--} (median ${RESULT[a.$ZSCORE.ratio]}; server CPU per message, bare / tidewatch ${RESULT[a.$ZSCORE.cpu_ratio]}) | >= 1.3 x bare |${B_ROWS}
| (c) latency at ${RATE} msg/s (50 % of peak), p99 tidewatch / bare per pair, µs | ${LAT} | | tidewatch's p99 <= bare's in most pairs |
| (d) RSS, 1M devices x 2 metrics x ${MEM_ROUNDS} values | ${DEV_MIB} MiB (empty server: $((RSS_EMPTY / 1024)) MiB) | | <= 1 GiB |
| (d) RSS per idle Ingest stream (10,000 streams) | ${PER_STREAM} bytes ($((RSS_BASE / 1024)) -> $((RSS_IDLE / 1024)) MiB) | | measured |${TLS_ROW}
EOF
step "summary ($OUT/summary.md, every run in $OUT/runs.tsv; server core $SERVER_CPU, load core $LOAD_CPU, ${DURATION}s runs)"
cat "$OUT/summary.md"
column -t -s $'\t' "$OUT/runs.tsv" || cat "$OUT/runs.tsv"
