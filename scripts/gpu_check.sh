#!/usr/bin/env bash
# The GPU check, as one script for a lent device machine (an H200 with CUDA, torch and pytest in its
# image, no network): the `gpu` tests (NF4 / int8 / fp bases on CUDA equal to PEFT) and a short CUDA
# bench (NF4 base, base only vs 32 distinct adapters), in well under 8 minutes.
# Needs the kit from scripts/gpu_kit.sh (run here first), carried as .gpu-kit. Logs and the bench's
# JSON go to $OUT when set (the device tool returns that folder), else to bench/results.
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=${KIT:-.gpu-kit}
OUT=${OUT:-bench/results}
PY=${PYTHON:-python3}
WORK=$(mktemp -d /tmp/lorafleet-gpu.XXXXXX)
mkdir -p "$OUT"
[ -d "$KIT/wheels" ] || { echo "no $KIT: run scripts/gpu_kit.sh here and carry .gpu-kit" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

# A venv over the image's packages (its CUDA torch), plus the kit's pinned wheels.
"$PY" -m venv --system-site-packages "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install -q --no-index --no-deps "$KIT"/wheels/*.whl
export PYTHONPATH="server:adapters:training:proto/python:clients/python:."
export LORAFLEET_DATA_DIR="$WORK/data" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
"$VPY" - "$KIT/model" "$WORK/data/models/SmolLM2-135M-Instruct" <<'PYEOF'
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
"$VPY" -c "import torch, transformers, bitsandbytes, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'bitsandbytes', bitsandbytes.__version__, 'peft', peft.__version__)" \
    | tee "$OUT/versions.txt"

status=0
timeout 300 "$VPY" -m pytest tests/gpu -m gpu -q -p no:cacheprovider -o addopts="" --timeout 240 2>&1 \
    | tee "$OUT/gpu-tests.log" || status=$?
timeout 240 "$VPY" -m bench.engine_direct --device cuda --quantization nf4 --counts 32 \
    --model "$LORAFLEET_DATA_DIR/models/SmolLM2-135M-Instruct" --out "$OUT" 2>&1 \
    | grep -v Warning | tee "$OUT/bench.log" || status=$?
rm -rf "$WORK"
exit "$status"
