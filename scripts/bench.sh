#!/usr/bin/env bash
# The gRPC benchmark suite (not part of CI): builds the release binaries and runs, in
# one go, the server pinned to one core (SERVER_CPU) and the load on another
# (LOAD_CPU):
#   (a) h2load posting bodies of 100 length-prefixed single-sample IngestRequests to
#       /tidewatch.v1.TelemetryService/Ingest, against tidewatch and against
#       bare-tonic (same proto, constant verdict, no engine);
#   (b) the same with 100 samples per message;
#   (c) tidewatch-bench per-message latency, open loop at 50 % of the peak (the lower
#       of (a) and tidewatch-bench's own closed-loop peak of the same traffic), with
#       the load generator's own CPU share (`/usr/bin/time %P`; near 100 % its own
#       queueing would be in the numbers) and a timeline of the slow messages by
#       100 ms of intended send time (stalls or steady queueing);
#   (d) RSS for 1,000,000 devices x 2 metrics (windows full), and for 10,000 idle
#       Ingest streams.
# h2load counts any HTTP 200 as a success, so the suite reads the server's own
# counter of answered samples from GET /metrics (when the HTTP gateway serves it) and
# always decodes one full call with curl to check 100 answers and grpc-status 0.
# Results: target/bench/summary.md (and the raw outputs beside it).
# Settings (environment): DURATION (seconds per h2load run, default 10),
# SERVER_CPU (0), LOAD_CPU (1), H2_CONNECTIONS (4), H2_STREAMS (16 per connection),
# MEM_ROUNDS (samples per device in (d), default 50 = a full window), LAT_CONNECTIONS
# and LAT_STREAMS (streams of (c), default 2 x 4), LOAD_THREADS (tokio worker threads
# of tidewatch-bench in (c), default 1: a single-threaded runtime on the load core),
# PROFILE=1 to
# record `perf` profiles of the server during (a) and (b), PARTS ("a b c d", a subset
# runs only those parts), BIN (directory of the binaries, default target/release) and
# BUILD=0 to skip the release build (to measure saved binaries of an earlier commit
# while the tree changes: `cp target/release/{tidewatch,bare-tonic,tidewatch-bench}
# DIR`, then `BIN=DIR BUILD=0`).
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10}
SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
H2_CONNECTIONS=${H2_CONNECTIONS:-4}
H2_STREAMS=${H2_STREAMS:-16}
MEM_ROUNDS=${MEM_ROUNDS:-50}
LAT_CONNECTIONS=${LAT_CONNECTIONS:-2}
LAT_STREAMS=${LAT_STREAMS:-4}
LOAD_THREADS=${LOAD_THREADS:-1}
PROFILE=${PROFILE:-0}
PARTS=${PARTS:-"a b c d"}
OUT=${OUT:-target/bench}
PORT=${PORT:-50061}
HTTP_PORT=${HTTP_PORT:-50081}
BARE_PORT=${BARE_PORT:-50062}
BIN=${BIN:-target/release}
BUILD=${BUILD:-1}
PATH_INGEST=/tidewatch.v1.TelemetryService/Ingest

for tool in h2load taskset curl python3; do
  command -v "$tool" >/dev/null || { echo "bench.sh: $tool is required (apt-get install nghttp2-client util-linux curl python3)" >&2; exit 1; }
done

step() { printf '\n==> %s\n' "$*"; }

if [ "$BUILD" = 1 ]; then
  step "cargo build --release (tidewatch, tidewatch-bench, bare-tonic)"
  # The server alone, as the Dockerfile builds it: built together with the client,
  # cargo resolves the dependencies' features for both, and the binary differs.
  cargo build --release -p tidewatch-server --bin tidewatch
  cargo build --release -p tidewatch-client --bins
fi
mkdir -p "$OUT"

server_pid=""
stop_server() {
  if [ -n "$server_pid" ]; then
    kill -TERM "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=""
  fi
}
trap stop_server EXIT

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

start_tidewatch() {
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

# Samples the server has answered over gRPC, from its Prometheus counter; empty when
# the server has no /metrics (a build without the HTTP gateway).
samples_answered() {
  curl -sf "http://127.0.0.1:$HTTP_PORT/metrics" 2>/dev/null |
    awk '/^tidewatch_samples_total\{/ && /transport="grpc"/ {s += $NF; n++} END {if (n) printf "%d", s}' || true
}

# Posts one body with curl and checks the answer: one response message per request
# message, each with `spm` verdicts, and grpc-status 0 in the trailers.
verify_call() {
  local port=$1 body=$2 spm=$3 name=$4
  curl -sS --http2-prior-knowledge -H 'content-type: application/grpc' -H 'te: trailers' \
    --data-binary "@$body" -D "$OUT/$name.headers" -o "$OUT/$name.response" \
    "http://127.0.0.1:$port$PATH_INGEST"
  python3 - "$OUT/$name.response" "$OUT/$name.headers" "$spm" <<'PY'
import sys
data = open(sys.argv[1], "rb").read()
headers = open(sys.argv[2], "r", errors="replace").read().lower()
spm = int(sys.argv[3])
def varint(b, i):
    v = s = 0
    while True:
        x = b[i]; i += 1; v |= (x & 0x7F) << s; s += 7
        if x < 0x80: return v, i
i = messages = 0
while i < len(data):
    length = int.from_bytes(data[i + 1:i + 5], "big"); msg = data[i + 5:i + 5 + length]; i += 5 + length
    verdicts = j = 0
    while j < len(msg):
        key, j = varint(msg, j)
        if key & 7 == 2:
            n, j = varint(msg, j); j += n
            verdicts += key >> 3 == 1
        elif key & 7 == 0: _, j = varint(msg, j)
        elif key & 7 == 1: j += 8
        elif key & 7 == 5: j += 4
    assert verdicts == spm, f"a response with {verdicts} verdicts, expected {spm}"
    messages += 1
assert messages == 100, f"{messages} responses to 100 requests"
assert "grpc-status: 0" in headers, "no grpc-status 0 in the trailers"
print(f"verified one call: 100 responses x {spm} verdicts, grpc-status 0")
PY
}

# CPU time (user + system, in clock ticks) the process has used so far.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# The server's share of its core between mark_server and server_share, in percent.
mark_server() { MARK_TICKS=$(cpu_ticks "$server_pid"); MARK_AT=$(date +%s.%N); }
server_share() {
  python3 -c "print(round(100 * ($(cpu_ticks "$server_pid") - $MARK_TICKS) / $(getconf CLK_TCK) / ($(date +%s.%N) - $MARK_AT)))"
}

# Runs h2load; prints "<calls/s> <succeeded calls> <server CPU µs per message>". The
# CPU time is the server's own (user + system) over h2load's measured period (after
# its 1 s warm-up): unlike the rate, it hardly moves when other processes take turns
# on the server's core, so it compares servers on a busy machine.
h2load_run() {
  local name=$1 port=$2 body=$3
  taskset -c "$LOAD_CPU" h2load -c "$H2_CONNECTIONS" -m "$H2_STREAMS" -t 1 -D "$DURATION" --warm-up-time 1 \
    -d "$body" -H 'content-type: application/grpc' -H 'te: trailers' \
    "http://127.0.0.1:$port$PATH_INGEST" >"$OUT/$name.h2load.txt" 2>&1 &
  local h2load_pid=$! t0 t1
  sleep 1
  t0=$(cpu_ticks "$server_pid")
  wait "$h2load_pid"
  t1=$(cpu_ticks "$server_pid")
  local rps ok
  rps=$(grep -oP 'finished in [0-9.]+m?s, \K[0-9.]+(?= req/s)' "$OUT/$name.h2load.txt")
  ok=$(grep -oP '^requests: .*?\K[0-9]+(?= succeeded)' "$OUT/$name.h2load.txt")
  echo "$rps $ok $(python3 -c "print(f'{($t1 - $t0) * 1e6 / $(getconf CLK_TCK) / max(1, $ok * 100):.3f}')")"
}

perf_pid=""
profile_during() {
  local name=$1
  if [ "$PROFILE" = 1 ] && command -v perf >/dev/null; then
    (sleep 2; perf record -F 999 -g -p "$server_pid" -o "$OUT/$name.perf.data" -- sleep 5 >/dev/null 2>&1 || true) &
    perf_pid=$!
  fi
}

step "h2load bodies (tidewatch-bench --write-h2load-body)"
"$BIN/tidewatch-bench" --write-h2load-body "$OUT/single.body" --batch 1 --devices 10000 --body-messages 100
"$BIN/tidewatch-bench" --write-h2load-body "$OUT/batch100.body" --batch 100 --devices 10000 --body-messages 100

declare -A RESULT
run_pair() { # label body samples-per-message
  local label=$1 body=$2 spm=$3
  step "($label) bare-tonic, h2load ${H2_CONNECTIONS}x${H2_STREAMS}, ${DURATION}s, $spm sample(s)/message"
  start_bare
  verify_call "$BARE_PORT" "$body" "$spm" "bare-$label"
  read -r bare_rps bare_ok bare_cpu < <(h2load_run "bare-$label" "$BARE_PORT" "$body")
  stop_server
  step "($label) tidewatch, same load"
  start_tidewatch
  verify_call "$PORT" "$body" "$spm" "tidewatch-$label"
  local before after
  before=$(samples_answered)
  profile_during "tidewatch-$label"
  read -r tw_rps tw_ok tw_cpu < <(h2load_run "tidewatch-$label" "$PORT" "$body")
  after=$(samples_answered)
  if [ -n "$perf_pid" ]; then wait "$perf_pid" || true; perf_pid=""; fi
  local answered="n/a (no /metrics in this build)"
  if [ -n "$before" ] && [ -n "$after" ]; then
    answered=$((after - before))
    local claimed=$((tw_ok * 100 * spm))
    if [ "$answered" -lt "$claimed" ]; then
      echo "FAIL: h2load counted $claimed samples in successful calls, the server answered $answered" >&2
      exit 1
    fi
  fi
  stop_server
  RESULT[$label.bare_msgs]=$(python3 -c "print(round($bare_rps * 100))")
  RESULT[$label.tw_msgs]=$(python3 -c "print(round($tw_rps * 100))")
  RESULT[$label.ratio]=$(python3 -c "print(f'{$tw_rps / $bare_rps:.2f}')")
  RESULT[$label.tw_samples]=$(python3 -c "print(round($tw_rps * 100 * $spm))")
  RESULT[$label.bare_samples]=$(python3 -c "print(round($bare_rps * 100 * $spm))")
  RESULT[$label.answered]=$answered
  RESULT[$label.calls]=$tw_ok
  RESULT[$label.cpu]="$bare_cpu / $tw_cpu µs = $(python3 -c "print(f'{$bare_cpu / $tw_cpu:.2f}')") x"
  echo "bare-tonic ${RESULT[$label.bare_msgs]} msg/s; tidewatch ${RESULT[$label.tw_msgs]} msg/s (${RESULT[$label.tw_samples]} samples/s) = ${RESULT[$label.ratio]} x bare; server counted $answered samples; server CPU per message bare / tidewatch ${RESULT[$label.cpu]}"
}

want() { [[ " $PARTS " == *" $1 "* ]]; }
for key in a.bare_msgs a.tw_msgs a.ratio a.tw_samples a.bare_samples a.answered a.cpu b.bare_msgs b.tw_msgs b.ratio b.tw_samples b.bare_samples b.answered b.cpu; do
  RESULT[$key]="-"
done
SLOW_SLICES="- | -" RATE="-" LOAD_CPU_SHARE="-" SERVER_CPU_SHARE="-" PEAK_C="-" P50_US="-" P99_US="-" BARE_P50_US="-" BARE_P99_US="-" RSS_EMPTY=0 RSS_DEVICES=0 RSS_BASE=0 RSS_IDLE=0
want a && run_pair a "$OUT/single.body" 1
want b && run_pair b "$OUT/batch100.body" 100

if want c; then
step "(c) tidewatch-bench: closed-loop peak of paced single messages, then latency at 50 % of the peak"
start_tidewatch
# The peak of this traffic shape (each message sent on its own, as devices do); h2load's
# peak in (a) packs 100 messages per call and is higher. 50 % of the lower of the two.
taskset -c "$LOAD_CPU" "$BIN/tidewatch-bench" --url "http://127.0.0.1:$PORT" -c "$LAT_CONNECTIONS" -s "$LAT_STREAMS" --rate 0 \
  --threads "$LOAD_THREADS" --window 64 --batch 1 --devices 10000 --duration "${DURATION}s" --output "$OUT/peak.json" | tee "$OUT/peak.txt"
PEAK_C=$(python3 -c "import json; print(round(json.load(open('$OUT/peak.json'))['rps']))")
RATE=$(python3 -c "a='${RESULT[a.tw_msgs]}'; p=$PEAK_C; print(round(min(p, int(a)) / 2 if a.isdigit() else p / 2))")
mark_server
/usr/bin/time -f "%P" -o "$OUT/latency.cpu" taskset -c "$LOAD_CPU" "$BIN/tidewatch-bench" --url "http://127.0.0.1:$PORT" -c "$LAT_CONNECTIONS" -s "$LAT_STREAMS" --rate "$RATE" \
  --threads "$LOAD_THREADS" --batch 1 --devices 10000 --duration "${DURATION}s" --output "$OUT/latency.json" \
  --timeline "$OUT/latency-timeline.csv" | tee "$OUT/latency.txt"
TW_SHARE=$(server_share)
stop_server
# Baseline in the same run: the same paced load against bare tonic, so the load
# generator's and the machine's own tail shows beside tidewatch's.
step "(c) baseline: the same paced load against bare-tonic"
start_bare
mark_server
/usr/bin/time -f "%P" -o "$OUT/latency-bare.cpu" taskset -c "$LOAD_CPU" "$BIN/tidewatch-bench" --url "http://127.0.0.1:$BARE_PORT" -c "$LAT_CONNECTIONS" -s "$LAT_STREAMS" --rate "$RATE" \
  --threads "$LOAD_THREADS" --batch 1 --devices 10000 --duration "${DURATION}s" --output "$OUT/latency-bare.json" \
  --timeline "$OUT/latency-bare-timeline.csv" | tee "$OUT/latency-bare.txt"
BARE_SHARE=$(server_share)
stop_server
percentile() { # report percentage
  python3 -c "import json; r=json.load(open('$1')); print(next(d['latency'] for d in r['latencyDistribution'] if d['percentage']==$2)/1000)"
}
# Where the messages over 1 ms were: in a few 100 ms slices (stalls) or spread over the
# run (steady queueing).
slow_slices() { # timeline.csv
  python3 -c "
import csv
rows = list(csv.DictReader(open('$1')))
slow = sorted((int(r['over_1ms']) for r in rows), reverse=True)
total = sum(slow)
share = 100 * sum(slow[:3]) / total if total else 0
print(f'{sum(1 for n in slow if n)} of {len(rows)}, the worst 3 with {share:.0f} %')"
}
SLOW_SLICES="$(slow_slices "$OUT/latency-bare-timeline.csv") | $(slow_slices "$OUT/latency-timeline.csv")"
P99_US=$(percentile "$OUT/latency.json" 99)
P50_US=$(percentile "$OUT/latency.json" 50)
BARE_P99_US=$(percentile "$OUT/latency-bare.json" 99)
BARE_P50_US=$(percentile "$OUT/latency-bare.json" 50)
LOAD_CPU_SHARE="$(tail -1 "$OUT/latency.cpu") / $(tail -1 "$OUT/latency-bare.cpu")"
SERVER_CPU_SHARE="$TW_SHARE% / $BARE_SHARE%"
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

cat >"$OUT/summary.md" <<EOF
| run | bare tonic | tidewatch | goal |
|---|---|---|---|
| (a) 1 sample/message, messages/s | ${RESULT[a.bare_msgs]} | ${RESULT[a.tw_msgs]} (${RESULT[a.ratio]} x bare) | >= 0.8 x bare |
| (b) 100 samples/message, samples/s | ${RESULT[b.bare_samples]} | ${RESULT[b.tw_samples]} (${RESULT[b.ratio]} x bare) | >= 5,000,000 |
| server-counted samples in (a) / (b) | | ${RESULT[a.answered]} / ${RESULT[b.answered]} | >= h2load's successes x 100 x samples |
| server CPU per message in (a) / (b), bare / tidewatch | | ${RESULT[a.cpu]} / ${RESULT[b.cpu]} | |
| (c) latency at ${RATE} msg/s (50 % of peak): p50 / p99 | ${BARE_P50_US} µs / ${BARE_P99_US} µs | ${P50_US} µs / ${P99_US} µs | p99 < 1 ms |
| (c) 100 ms slices (of intended send time) holding a message over 1 ms | ${SLOW_SLICES} | few: stalls; most: queueing |
| (c) load generator's CPU share, tidewatch / bare run | | ${LOAD_CPU_SHARE} | well below 100 % |
| (c) server's share of its core, tidewatch / bare | | ${SERVER_CPU_SHARE} | (near 100 %: the server queues) |
| (d) RSS, 1M devices x 2 metrics x ${MEM_ROUNDS} values | | ${DEV_MIB} MiB (empty server: $((RSS_EMPTY / 1024)) MiB) | <= 1 GiB |
| (d) RSS per idle Ingest stream (10,000 streams) | | ${PER_STREAM} bytes ($((RSS_BASE / 1024)) -> $((RSS_IDLE / 1024)) MiB) | measured |
EOF
step "summary ($OUT/summary.md; server core $SERVER_CPU, load core $LOAD_CPU, ${DURATION}s runs)"
cat "$OUT/summary.md"
