#!/usr/bin/env bash
# The web console end to end in real headless Chromium: starts target/release/tidewatch
# (or TIDEWATCH_BIN) on 127.0.0.1:0 and runs scripts/checks/console.mjs against it
# (playwright-core from scripts/package.json, Debian's chromium at /usr/bin/chromium).
# The screenshot it takes goes to target/console.png; CONSOLE_SCREENSHOT=docs/console.png
# refreshes the one the README shows.
set -euo pipefail
cd "$(dirname "$0")/../.."

server_bin="${TIDEWATCH_BIN:-target/release/tidewatch}"
[ -x "$server_bin" ] || { echo "console: $server_bin is missing (cargo build --release first)" >&2; exit 1; }
[ -x /usr/bin/chromium ] || { echo "console: /usr/bin/chromium is missing (apt-get install chromium)" >&2; exit 1; }
[ -d scripts/node_modules/playwright-core ] || { echo "console: playwright-core is missing (npm install in scripts/)" >&2; exit 1; }

work=$(mktemp -d)
log="$work/server.log"
# A threshold of 4 keeps the seeded noise (uniform ±2) clear of the band: the one
# anomaly is the spike the test sends.
"$server_bin" --grpc-addr 127.0.0.1:0 --listen-addr 127.0.0.1:0 --log-format json \
  --z-threshold 4 >"$log" 2>&1 &
server_pid=$!
trap 'kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; rm -rf "$work"' EXIT
addr=""
for _ in $(seq 1 200); do
  addr=$(grep -o '"http_addr":"[^"]*"' "$log" | head -1 | cut -d'"' -f4 || true)
  [ -n "$addr" ] && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$log" >&2; exit 1; }
  sleep 0.05
done
[ -n "$addr" ] || { echo "console: server did not report its HTTP address" >&2; cat "$log" >&2; exit 1; }

timeout 120 node scripts/checks/console.mjs \
  "http://$addr" "${CONSOLE_SCREENSHOT:-target/console.png}"
