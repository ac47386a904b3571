#!/usr/bin/env bash
# Regenerates the Python protobuf/gRPC code of the lorafleet-proto distribution
# (proto/python/lorafleet_proto/v1/) from proto/lorafleet/v1/*.proto.
#
#   scripts/gen_proto.sh           regenerate in place
#   scripts/gen_proto.sh --check   regenerate into a temp dir and diff against the committed files;
#                                  exits 1 when they are stale
#
# protoc names Python modules after the proto paths (lorafleet/v1/...). The generated code lives in its
# own import package, lorafleet_proto, so that no distribution claims the generic `lorafleet.v1`
# next to the client's `lorafleet`: the one cross-module import protoc writes is rewritten to match.
#
# PYTHON overrides the interpreter (default: the repo's .venv), which must have grpcio-tools.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
COMMITTED="$ROOT/proto/python/lorafleet_proto/v1"

mode="write"
case "${1:-}" in
  "") ;;
  --check) mode="check" ;;
  *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

generate() {  # $1: the directory to fill with the generated modules (a lorafleet_proto/v1 folder)
  local raw status=0
  raw="$(mktemp -d)"
  (cd "$ROOT" && "$PYTHON" -m grpc_tools.protoc -Iproto \
    --python_out="$raw" --pyi_out="$raw" --grpc_python_out="$raw" \
    proto/lorafleet/v1/*.proto) || status=1
  if [[ "$status" -eq 0 ]]; then
    mkdir -p "$1"
    for f in "$raw"/lorafleet/v1/*; do
      sed -e 's/^from lorafleet\.v1 import /from lorafleet_proto.v1 import /' "$f" >"$1/$(basename "$f")" || status=1
    done
  fi
  rm -rf "$raw"  # also when protoc or sed failed
  return "$status"
}

generated_files() {  # $1: a lorafleet_proto/v1 directory; prints the generated file names, sorted
  (cd "$1" && ls -1 -- *_pb2.py *_pb2.pyi *_pb2_grpc.py 2>/dev/null | sort)
}

if [[ "$mode" == "write" ]]; then
  fresh="$(mktemp -d)"
  trap 'rm -rf "$fresh"' EXIT
  generate "$fresh/v1"
  # Generated modules of a .proto that is gone go too (--check would call them stale for ever).
  mkdir -p "$COMMITTED"
  (cd "$COMMITTED" && rm -f -- *_pb2.py *_pb2.pyi *_pb2_grpc.py)
  cp "$fresh"/v1/* "$COMMITTED"/
  echo "regenerated $COMMITTED" >&2
  exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
generate "$tmp/v1"
fresh="$tmp/v1"

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
  echo "proto/python/lorafleet_proto/v1 is stale: run scripts/gen_proto.sh" >&2
  exit 1
fi
echo "proto/python/lorafleet_proto/v1 is current" >&2
