#!/usr/bin/env bash
# The Python and TypeScript SDKs: generated code is fresh against proto/ (buf generate,
# buf.gen.yaml: needs .venv's grpcio-tools and the SDK's protoc-gen-es), then each SDK's
# suite runs against the real server binary (target/release/tidewatch, built by
# scripts/test): `pip install ./clients/python[test]` into a fresh venv + pytest, and
# `npm ci && npm run build && npm test` in clients/typescript.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD

export TIDEWATCH_BIN="$root/target/release/tidewatch"
if [ ! -x "$TIDEWATCH_BIN" ]; then
  echo "sdk.sh: $TIDEWATCH_BIN is missing (cargo build --release -p tidewatch-server)" >&2
  exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "--> npm ci (clients/typescript)"
(cd clients/typescript && npm ci --no-audit --no-fund --silent)

echo "--> generated SDK code is fresh (buf generate, buf.gen.yaml)"
# Regenerated into a scratch directory: every generated file must be committed as is,
# and nothing else may sit in the generated directories.
PATH="$root/scripts/node_modules/.bin:$PATH" buf generate -o "$work/gen"
stale=0
for dir in clients/python/src/tidewatch/v1 clients/typescript/src/gen; do
  diff -ru "$work/gen/$dir" "$dir" || stale=1
done
if [ "$stale" != 0 ]; then
  echo "sdk.sh: generated SDK code is stale against proto/: run buf generate and commit" >&2
  exit 1
fi

echo "--> Python SDK: fresh venv, pip install ./clients/python[test], pytest"
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q --upgrade pip
"$work/venv/bin/pip" install -q "./clients/python[test]"
# Run from the tests' directory so `tidewatch` is the installed package, not src/.
(cd clients/python && "$work/venv/bin/python" -m pytest -q -p no:cacheprovider tests)

echo "--> TypeScript SDK: npm run build, npm test"
(cd clients/typescript && npm run build --silent && npm test)
