#!/usr/bin/env bash
# Instructions per request of POST /ingest, tidewatch against bare-axum (tools/loadgen),
# under callgrind: steadier than wrk's rates on a shared machine. Each server runs
# twice under `valgrind --tool=callgrind`, once answering WARM requests and once
# WARM + REQUESTS, over one keep-alive connection, with the bodies of
# scripts/bench-gateway.sh (BODIES: `single`, one flat sample; `batch`, 100 of them
# over 100 devices); the difference of the two totals over REQUESTS is the cost of a
# request in the server, startup and shutdown excluded. The callgrind files of the
# longer runs stay in OUT for callgrind_annotate.
# Not part of CI. Needs valgrind, curl and python3.
#
#   scripts/callgrind-gateway.sh                      # release binaries of target/release
#   BIN=DIR BODIES=batch REQUESTS=400 scripts/callgrind-gateway.sh
set -euo pipefail
cd "$(dirname "$0")/.."

BIN="${BIN:-target/release}"
BODIES="${BODIES:-single batch}"
REQUESTS="${REQUESTS:-200}"
WARM="${WARM:-20}"
PORT="${PORT:-18490}"
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"

command -v valgrind >/dev/null || { echo "valgrind not found" >&2; exit 1; }

# The bodies of scripts/bench-gateway.sh.
python3 - "$OUT" <<'PY'
import sys
out = sys.argv[1]
def sample(n):
    return ('{"timestamp": %d, "device_id": "fleet-eu-west/gw-%06d/dev-%06d", "cpu": 0.%d, '
            '"rps": %d, "mem_used": 0.%d, "temp_c": %d.5}'
            % (1710000000 + n, n // 100, n, 40 + n % 50, 100 + n % 77, 60 + n % 30, 30 + n % 20))
open(out + "/single.json", "w").write(sample(123))
open(out + "/batch.json", "w").write('{"samples": [' + ", ".join(sample(i) for i in range(100)) + "]}")
PY

# Posts body $2 to port $1, $3 times over one connection; fails on any non-200.
post() {
  python3 - "$1" "$2" "$3" <<'PY'
import http.client, sys
port, path, count = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
body = open(path, "rb").read()
conn = http.client.HTTPConnection("127.0.0.1", port)
for _ in range(count):
    conn.request("POST", "/ingest", body, {"Content-Type": "application/json"})
    answer = conn.getresponse()
    answer.read()
    if answer.status != 200:
        sys.exit(f"HTTP {answer.status} from port {port}")
PY
}

# Runs server $1 under callgrind, answering $3 requests of body $2; prints the total
# instruction count.
measure() {
  local server=$1 body=$2 count=$3 file="$OUT/callgrind.$1.$2.$3"
  local -a cmd
  if [ "$server" = tidewatch ]; then
    cmd=("$BIN/tidewatch")
  else
    cmd=("$BIN/bare-axum" --addr "127.0.0.1:$PORT")
  fi
  LISTEN_ADDR="127.0.0.1:$PORT" GRPC_ADDR=127.0.0.1:0 LOG_LEVEL=warn \
    valgrind --tool=callgrind --callgrind-out-file="$file" --log-file="$file.log" "${cmd[@]}" >/dev/null &
  local pid=$!
  for _ in $(seq 1 300); do
    if curl -fsS -o /dev/null -H 'Content-Type: application/json' --data-binary "@$OUT/single.json" \
      "http://127.0.0.1:$PORT/ingest" 2>/dev/null; then
      break
    fi
    sleep 0.2
  done
  post "$PORT" "$OUT/$body.json" "$count"
  kill -INT "$pid"
  wait "$pid" || true
  awk '/Collected :/ { print $NF }' "$file.log"
}

for body in $BODIES; do
  for server in tidewatch bare-axum; do
    short=$(measure "$server" "$body" "$WARM")
    long=$(measure "$server" "$body" $((WARM + REQUESTS)))
    per=$(( (long - short) / REQUESTS ))
    echo "$body $server: $per instructions per request ($REQUESTS requests; callgrind files in $OUT)"
  done
done
