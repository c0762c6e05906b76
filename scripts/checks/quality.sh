#!/usr/bin/env bash
# Detection quality: runs tidewatch-eval on the synthetic data set and on the
# NAB development subset, and fails when the recommended detector (`robust`) misses a
# bar (`Bars` in server/src/eval.rs, the figures it reaches: synthetic `anomaly` recall
# and false positives, NAB `alert` scores of all three profiles, the share of NAB's
# normal rows that `anomaly` flags). Then replays everything
# through the real `tidewatch` binary over gRPC and fails if any verdict differs from
# the in-process replay. The NAB subset travels with the repository (data/nab-dev, with
# its source and MIT licence in data/nab-dev/README.md); NAB_DIR points elsewhere.
# A missing corpus is a failure, not a skip.
set -euo pipefail
cd "$(dirname "$0")/../.."

eval_bin=target/release/tidewatch-eval
server_bin=target/release/tidewatch
for b in "$eval_bin" "$server_bin"; do
  [ -x "$b" ] || { echo "quality: $b is missing (cargo build --release first)" >&2; exit 1; }
done

nab_dir="${NAB_DIR:-data/nab-dev}"
if [ ! -f "$nab_dir/windows.json" ]; then
  echo "quality: no NAB corpus at $nab_dir (data/nab-dev is part of the repository; NAB_DIR overrides it)" >&2
  exit 1
fi

echo "quality: in-process evaluation with the bars (NAB corpus: $nab_dir)"
"$eval_bin" --nab-dir "$nab_dir" --check-bars

echo "quality: the same replay through the real server over gRPC"
log=$(mktemp)
"$server_bin" --grpc-addr 127.0.0.1:0 --listen-addr 127.0.0.1:0 --log-format json >"$log" 2>&1 &
server_pid=$!
trap 'kill "$server_pid" 2>/dev/null || true; rm -f "$log"' EXIT
addr=""
for _ in $(seq 1 200); do
  addr=$(grep -o '"grpc_addr":"[^"]*"' "$log" | head -1 | cut -d'"' -f4 || true)
  [ -n "$addr" ] && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$log" >&2; exit 1; }
  sleep 0.05
done
[ -n "$addr" ] || { echo "quality: server did not report its gRPC address" >&2; cat "$log" >&2; exit 1; }
"$eval_bin" --nab-dir "$nab_dir" --grpc "http://$addr" --check-bars >/dev/null
echo "quality: gRPC and in-process verdicts agree; all bars met"
