#!/usr/bin/env bash
# What a release publishes, checked offline on every run: actionlint finds nothing in
# .github/workflows/; every package carries the workspace's version (and k8s/base
# deploys that image tag); and the packages build here as release.yml builds them:
#   - `cargo package --workspace --no-verify`: the three crates' manifests are
#     publishable (versions on every path dependency, licence, description) and each
#     .crate holds the files it needs and nothing large. --no-verify: the packaged
#     sources are not compiled again here (scripts/test compiled the same sources;
#     `cargo publish` in release.yml verifies them), which would take minutes.
#   - `python -m build` for clients/python: sdist and wheel, with the generated code,
#     py.typed and the tidewatch-send entry point.
#   - `npm pack` for clients/typescript, after `npm ci` and `npm run build`: the tarball
#     holds the compiled dist/src.
# Needs the .venv from scripts/requirements-dev.txt (actionlint, build) and npm.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
export PATH="$root/.venv/bin:$PATH"
for tool in actionlint cargo npm python; do
  command -v "$tool" >/dev/null || { echo "release.sh: $tool not found (run .ci/run)" >&2; exit 1; }
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
checks=0
pass() { checks=$((checks + 1)); echo "release: ok - $*"; }

actionlint -no-color .github/workflows/*.yml
pass "actionlint: $(ls .github/workflows/*.yml | wc -l) workflows"

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
py_version=$(sed -n 's/^version = "\(.*\)"/\1/p' clients/python/pyproject.toml | head -1)
py_module_version=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' clients/python/src/tidewatch/__init__.py)
npm_version=$(node -p 'require("./clients/typescript/package.json").version')
k8s_tag=$(sed -n 's/^ *newTag: *//p' k8s/base/kustomization.yaml)
for pair in "pyproject.toml:$py_version" "tidewatch.__version__:$py_module_version" \
            "package.json:$npm_version" "k8s/base newTag:$k8s_tag"; do
  if [ "${pair#*:}" != "$version" ]; then
    echo "release.sh: ${pair%%:*} says ${pair#*:}, Cargo.toml says $version" >&2
    exit 1
  fi
done
pass "every package is version $version"

echo "--> cargo package --workspace --no-verify"
cargo package --workspace --no-verify --allow-dirty --locked --quiet \
  --target-dir "$work/cargo"
for crate in tidewatch-proto tidewatch-server tidewatch-client; do
  file="$work/cargo/package/$crate-$version.crate"
  [ -f "$file" ] || { echo "release.sh: $file was not made" >&2; exit 1; }
  size=$(stat -c %s "$file")
  # crates.io refuses more than 10 MB; anything near 1 MB means data slipped in.
  [ "$size" -lt 1000000 ] || { echo "release.sh: $crate is $size bytes" >&2; exit 1; }
  tar -tzf "$file" >"$work/$crate.files"
done
for f in build.rs proto/lib.rs proto/tidewatch/v1/telemetry.proto; do
  grep -qx "tidewatch-proto-$version/$f" "$work/tidewatch-proto.files" \
    || { echo "release.sh: tidewatch-proto lacks $f" >&2; exit 1; }
done
grep -qx "tidewatch-server-$version/src/main.rs" "$work/tidewatch-server.files"
grep -qx "tidewatch-client-$version/src/lib.rs" "$work/tidewatch-client.files"
pass "3 crates packaged ($(cat "$work"/*.files | wc -l) files)"

echo "--> python -m build clients/python"
python -m build --outdir "$work/python" clients/python >"$work/build.log" 2>&1 \
  || { cat "$work/build.log" >&2; exit 1; }
wheel=$(ls "$work/python"/tidewatch_client-"$version"-py3-none-any.whl)
ls "$work/python"/tidewatch_client-"$version".tar.gz >/dev/null
python - "$wheel" <<'PY'
import sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
for need in ("tidewatch/__init__.py", "tidewatch/sync.py", "tidewatch/py.typed",
             "tidewatch/v1/telemetry_pb2.py", "tidewatch/v1/telemetry_pb2.pyi"):
    assert need in names, f"wheel lacks {need}"
entry = next(n for n in names if n.endswith("entry_points.txt"))
assert "tidewatch-send = tidewatch.cli:main" in zipfile.ZipFile(sys.argv[1]).read(entry).decode()
PY
pass "Python sdist and wheel built"

echo "--> npm pack clients/typescript"
(cd clients/typescript && npm ci --no-audit --no-fund --silent && npm run build --silent \
  && npm pack --silent --pack-destination "$work" >/dev/null)
tarball="$work/tidewatch-client-$version.tgz"
tar -tzf "$tarball" >"$work/npm.files"
for f in package/package.json package/dist/src/index.js package/dist/src/index.d.ts; do
  grep -qx "$f" "$work/npm.files" || { echo "release.sh: npm package lacks $f" >&2; exit 1; }
done
pass "npm package packed"

echo "release: all $checks release checks passed"
