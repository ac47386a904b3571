#!/usr/bin/env bash
# The GPU check, as one script for a lent device machine (an H200 with CUDA, torch and pytest in its
# image, no network): the `gpu` tests (NF4 / int8 / fp bases on CUDA equal to PEFT) and a short CUDA
# bench (NF4 base, base only vs 32 distinct adapters), in well under 8 minutes.
# Needs the kit from scripts/gpu_kit.sh (run here first), carried as .gpu-kit. Logs and the bench's
# JSON go to $OUT when set (the device tool returns that folder), else to bench/results.
# PARTS=tests or PARTS=bench runs one part alone (a rerun of the part that failed); default: both.
# It takes ~3 minutes; every part is bounded so a hang still leaves device time for one rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=${KIT:-.gpu-kit}
OUT=${OUT:-bench/results}
PY=${PYTHON:-python3}
PARTS=${PARTS:-all}
case "$PARTS" in all|tests|bench) ;; *) echo "PARTS must be all, tests or bench, not $PARTS" >&2; exit 2 ;; esac
WORK=$(mktemp -d /tmp/lorafleet-gpu.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
[ -d "$KIT/wheels" ] || { echo "no $KIT: run scripts/gpu_kit.sh here and carry .gpu-kit" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

# The kit's pinned wheels in a folder of their own, ahead of the image's packages on PYTHONPATH. Not a
# venv: the image's python3 is itself a venv's, and a venv made from it with --system-site-packages
# would see the base interpreter's packages, not the image's CUDA torch.
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" "$KIT"/wheels/*.whl
export PYTHONPATH="$WORK/site:server:adapters:training:proto/python:clients/python:."
export LORAFLEET_DATA_DIR="$WORK/data" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# Seconds, before anything slow: torch sees the GPU and bitsandbytes' CUDA library computes on it (a
# library that does not load falls back quietly, and the first error would come inside the tests).
"$PY" -c "
import torch, bitsandbytes.functional as F
assert torch.cuda.is_available(), 'torch sees no CUDA device'
packed, state = F.quantize_4bit(torch.randn(64, 64, device='cuda', dtype=torch.bfloat16), quant_type='nf4')
assert F.dequantize_4bit(packed, state).is_cuda
print('CUDA and bitsandbytes answer on', torch.cuda.get_device_name())
" 2>&1 | tee "$OUT/smoke.txt"
"$PY" - "$KIT/model" "$WORK/data/models/SmolLM2-135M-Instruct" <<'PYEOF'
# The default model's architecture and tokenizer with random weights (see gpu_kit.sh for why).
import shutil, sys
from pathlib import Path
import torch
from transformers import AutoConfig, AutoModelForCausalLM
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
shutil.copytree(src, dst)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(dst), dtype=torch.float32)
model.save_pretrained(dst)
print("random-weight model:", dst, sum(p.numel() for p in model.parameters()), "parameters")
PYEOF
"$PY" -c "import sys, torch, transformers, bitsandbytes, peft; print('python', sys.version.split()[0], 'torch', \
torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'bitsandbytes', \
bitsandbytes.__version__, 'peft', peft.__version__)" | tee "$OUT/versions.txt"
# The image's CUDA torch, not the project's pin: say so when they differ (results hold for that torch).
pinned=$(sed -n 's/^TORCH_SPEC ?= torch==//p' Makefile)
"$PY" -c "import sys, torch; v = torch.__version__.split('+')[0]; sys.exit(v != sys.argv[1])" "$pinned" \
    || echo "warning: torch $("$PY" -c 'import torch; print(torch.__version__)') here, the project pins $pinned" \
    | tee -a "$OUT/versions.txt"
# pytest-timeout where the image has it (the kit does not carry it; each test takes seconds); the outer
# timeouts bound both parts to 4.5 minutes in all, so a hang still leaves time to rerun one part.
per_test=()
"$PY" -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout 60)

# Each part runs even when the one before failed; the exit status says whether any did. Without a GPU
# the gpu tests fail (LORAFLEET_REQUIRE_GPU) instead of being skipped, which would read as passed.
status=0
if [ "$PARTS" != bench ]; then
    LORAFLEET_REQUIRE_GPU=1 timeout 150 "$PY" -m pytest tests/gpu -m gpu -v -rP -p no:cacheprovider -o addopts="" \
        "${per_test[@]}" 2>&1 | tee "$OUT/gpu-tests.log" || status=$?
fi
if [ "$PARTS" != tests ]; then
    timeout 120 "$PY" -m bench.engine_direct --device cuda --quantization nf4 --counts 32 \
        --model "$LORAFLEET_DATA_DIR/models/SmolLM2-135M-Instruct" --out "$OUT" 2>&1 \
        | grep --line-buffered -v Warning | tee "$OUT/bench.log" || status=$?
fi
exit "$status"
