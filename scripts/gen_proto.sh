#!/usr/bin/env bash
# Regenerates the Python protobuf/gRPC code in clients/python/lorafleet/v1/ from proto/lorafleet/v1/.
#
#   scripts/gen_proto.sh           regenerate in place
#   scripts/gen_proto.sh --check   regenerate into a temp dir and diff against the committed files;
#                                  exits 1 when they are stale
#
# PYTHON overrides the interpreter (default: the repo's .venv), which must have grpcio-tools.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
OUT_PKG="lorafleet/v1"
COMMITTED="$ROOT/clients/python/$OUT_PKG"

mode="write"
case "${1:-}" in
  "") ;;
  --check) mode="check" ;;
  *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

generate() {  # $1: output root (the directory that holds lorafleet/)
  mkdir -p "$1/$OUT_PKG"
  (cd "$ROOT" && "$PYTHON" -m grpc_tools.protoc -Iproto \
    --python_out="$1" --pyi_out="$1" --grpc_python_out="$1" \
    proto/lorafleet/v1/*.proto)
}

generated_files() {  # $1: a lorafleet/v1 directory; prints the generated file names, sorted
  (cd "$1" && ls -1 -- *_pb2.py *_pb2.pyi *_pb2_grpc.py 2>/dev/null | sort)
}

if [[ "$mode" == "write" ]]; then
  generate "$ROOT/clients/python"
  echo "regenerated $COMMITTED" >&2
  exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
generate "$tmp"
fresh="$tmp/$OUT_PKG"

stale=0
if ! diff <(generated_files "$fresh") <(generated_files "$COMMITTED") >/dev/null; then
  echo "generated file sets differ (fresh vs committed):" >&2
  diff <(generated_files "$fresh") <(generated_files "$COMMITTED") >&2 || true
  stale=1
fi
while read -r name; do
  if [[ -f "$COMMITTED/$name" ]] && ! diff -u "$COMMITTED/$name" "$fresh/$name" >&2; then
    stale=1
  fi
done < <(generated_files "$fresh")

if [[ "$stale" -ne 0 ]]; then
  echo "clients/python/$OUT_PKG is stale: run scripts/gen_proto.sh" >&2
  exit 1
fi
echo "clients/python/$OUT_PKG is current" >&2
