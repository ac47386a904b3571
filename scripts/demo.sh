#!/usr/bin/env bash
# make demo: start a server on its own port and store, train and publish two companies' LoRA adapters
# and a third company's classifier head, then ask the running server the same questions with the base,
# each LoRA and each prompt adapter, and classify held-out messages with the head.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
PORT=${DEMO_PORT:-50061}
METRICS_PORT=${DEMO_METRICS_PORT:-9474}
HTTP_PORT=${DEMO_HTTP_PORT:-8010}  # its own, so the demo runs next to `make run` (HTTP on 8000)
WORK=data/demo
STORE=$WORK/store
mkdir -p "$STORE"
LOG=$WORK/server.log
"$BIN/lorafleet" serve --port "$PORT" --metrics-port "$METRICS_PORT" --http-port "$HTTP_PORT" \
  --adapter-store "$STORE" --adapter-poll-seconds 1 --max-seq-len 1024 --keys-file "$WORK/keys.json" >"$LOG" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  grep -q "lorafleet ready" "$LOG" && break
  kill -0 $SERVER 2>/dev/null || { cat "$LOG"; exit 1; }
  sleep 1
done
if ! grep "lorafleet ready" "$LOG"; then
  echo "demo: the server was not ready within 120 s; its log ends with:" >&2
  tail -n 30 "$LOG" >&2
  exit 1
fi
"$BIN/python" -m demo.run_demo --work "$WORK" --store "$STORE" --target "127.0.0.1:$PORT" "$@"
