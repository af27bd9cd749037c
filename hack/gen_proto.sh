#!/usr/bin/env bash
# Regenerates the Python gRPC stubs of proto/ into OUT (default proto/_gen).
# Never edit the output by hand: run `make proto`. `make test` regenerates into a
# temporary folder and fails on any difference (drift check).
#   PY     python of the project venv (has grpcio-tools, mypy-protobuf)
#   PROTOL protoletariat's `protol` (own venv: it pins an older protobuf)
set -euo pipefail
OUT=${1:-proto/_gen}
PY=${PY:-.venv/bin/python}
PROTOL=${PROTOL:-.tools/protol/bin/protol}
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/out"
PATH="$(dirname "$PY"):$PATH" "$PY" -m grpc_tools.protoc -I proto \
  --python_out="$tmp/out" --grpc_python_out="$tmp/out" \
  --mypy_out="$tmp/out" --mypy_grpc_out="$tmp/out" \
  --descriptor_set_out="$tmp/fds.bin" --include_imports \
  proto/inferencecache/v1alpha1/inferencecache.proto 2>&1 | { grep -v "^Writing mypy" || true; }
# Package-relative imports (inference_cache.proto._gen is not a top-level package).
"$PROTOL" --in-place --python-out "$tmp/out" --create-package raw "$tmp/fds.bin" >/dev/null
rm -rf "$OUT"
mkdir -p "$OUT"
cp -r "$tmp/out/." "$OUT/"
# An empty top-level __init__ so the generated tree is one importable package.
touch "$OUT/__init__.py"
