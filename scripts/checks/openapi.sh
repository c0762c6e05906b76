#!/usr/bin/env bash
# Holds the real gateway to its OpenAPI document: starts target/release/tidewatch (or
# TIDEWATCH_BIN) on 127.0.0.1:0, reads GET /openapi.json and runs schemathesis
# (scripts/requirements-dev.txt) over every operation with every check: statuses,
# content types, response schemas, positive and negative data, unsupported methods.
# Zero failures or the check fails. GET /anomalies is a stream that does not end, so
# schemathesis leaves it out; server/tests/sse.rs tests it.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="$PWD/.venv/bin:$PATH"

server_bin="${TIDEWATCH_BIN:-target/release/tidewatch}"
[ -x "$server_bin" ] || { echo "openapi: $server_bin is missing (cargo build --release first)" >&2; exit 1; }
command -v schemathesis >/dev/null || { echo "openapi: schemathesis is missing (pip install -r scripts/requirements-dev.txt)" >&2; exit 1; }

work=$(mktemp -d)
log="$work/server.log"
"$server_bin" --grpc-addr 127.0.0.1:0 --listen-addr 127.0.0.1:0 --log-format json \
  --log-level warn,tidewatch_server=info >"$log" 2>&1 &
server_pid=$!
trap 'kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; rm -rf "$work"' EXIT
addr=""
for _ in $(seq 1 200); do
  addr=$(grep -o '"http_addr":"[^"]*"' "$log" | head -1 | cut -d'"' -f4 || true)
  [ -n "$addr" ] && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$log" >&2; exit 1; }
  sleep 0.05
done
[ -n "$addr" ] || { echo "openapi: server did not report its HTTP address" >&2; cat "$log" >&2; exit 1; }
for _ in $(seq 1 100); do
  curl -fsS "http://$addr/readyz" >/dev/null 2>&1 && break
  sleep 0.05
done

echo "openapi: schemathesis against http://$addr/openapi.json"
# openapi_hooks.py drops the one failure JSON Schema cannot rule out (see its header).
export PYTHONPATH="$PWD/scripts/checks${PYTHONPATH:+:$PYTHONPATH}"
export SCHEMATHESIS_HOOKS=openapi_hooks
# Deterministic generation keeps the run reproducible; --max-examples bounds each
# operation. One worker: hypothesis parses lambdas' source with ast, which CPython
# 3.11 does not allow from two threads at once.
# From the scratch directory, so its caches stay out of the checkout.
(cd "$work" && schemathesis run "http://$addr/openapi.json" \
  --url "http://$addr" \
  --checks all \
  --exclude-path /anomalies \
  --max-examples "${OPENAPI_EXAMPLES:-60}" \
  --generation-deterministic \
  --request-timeout 10 \
  --workers 1 \
  --report junit --report-dir "$work/report" \
  --warnings off)
echo "openapi: no failures"
