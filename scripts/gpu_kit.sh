#!/usr/bin/env bash
# Pack what a GPU device machine lacks for scripts/gpu_check.sh into .gpu-kit/ (git-ignored):
#   wheels/  the pinned packages its image does not hold (bitsandbytes, transformers, peft), for
#            CPython 3.12 on x86-64 (the device image's Python); torch, CUDA and pytest are there.
#   model/   the default model's config and tokenizer files, no weights (the GGUF is ~98 MB and the
#            kit travels under a 64 MiB limit); gpu_check.sh fills the weights at random, which is
#            all the gpu tests (a tiny random model plus the real tokenizer) and a throughput bench
#            need. Quality numbers are measured here, on the real weights, not there.
# Run here (it needs the package registry and a prepared model: `make model`), then on the device:
#   device run --carry .gpu-kit -- bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
KIT=.gpu-kit
MODEL_DIR=${MODEL_DIR:-data/models/SmolLM2-135M-Instruct}
rm -rf "$KIT" && mkdir -p "$KIT/wheels" "$KIT/model"
"$BIN/python" -m pip download -q --no-deps --only-binary=:all: \
    --python-version 3.12 --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 \
    -d "$KIT/wheels" bitsandbytes==0.50.2 transformers==5.24.0 peft==0.21.2
for f in config.json generation_config.json tokenizer.json tokenizer_config.json special_tokens_map.json \
    chat_template.jinja lorafleet-source.json; do
    if [ -f "$MODEL_DIR/$f" ]; then cp "$MODEL_DIR/$f" "$KIT/model/"; fi
done
[ -f "$KIT/model/config.json" ] || { echo "no model config in $MODEL_DIR: run make model first" >&2; exit 1; }
du -sh "$KIT"
# The device tool carries the working tree (tracked and untracked files git does not ignore) and the kit
# under 64 MiB in all: fail here, not there after the machine has started (61 MiB on 6 December 2026,
# 41 of them the bitsandbytes wheel).
tree=$(git ls-files -z -co --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
kit=$(du -sb "$KIT" | cut -f1)
total=$(( (tree + kit) / 1048576 ))
echo "working tree + kit: ${total} MiB (the device tool carries at most 64)"
[ "$total" -le 63 ] || { echo "over 63 MiB: leave untracked files out of the tree, or trim the kit" >&2; exit 1; }
