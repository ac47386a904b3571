"""Helpers shared by the adapter tests: a tiny random Llama, its BaseModelSpec, PEFT introspection."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import torch
import transformers

from lorafleet_adapters.peft_format import BaseModelSpec

FINGERPRINT = "sha256:" + "ab" * 32


def make_base_model() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    )
    return transformers.LlamaForCausalLM(config).eval()


def spec_from_model(model: torch.nn.Module, **overrides: Any) -> BaseModelSpec:
    shapes = {
        name: (module.out_features, module.in_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.startswith("model.layers.")
    }
    fields: dict[str, Any] = {
        "fingerprint": FINGERPRINT,
        "model_id": "tiny-llama",
        "quantization": "none",
        "target_shapes": shapes,
        "max_lora_rank": 16,
    }
    fields.update(overrides)
    return BaseModelSpec(**fields)


def lora_layers(peft_model: peft.PeftModel) -> dict[str, Any]:
    """Full module name (as in the base model) -> peft LoRA layer."""
    base: torch.nn.Module = peft_model.get_base_model()
    return {name: module for name, module in base.named_modules() if isinstance(module, peft.tuners.lora.LoraLayer)}


MakeAdapter = Callable[..., tuple[Path, peft.PeftModel]]


def edit_config(adapter_dir: Path, **changes: Any) -> None:
    path = adapter_dir / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def flip_last_byte_keeping_mtime(path: Path) -> None:
    """Change a file in place the way bit rot through the filesystem would: one byte, mtime put back
    (its ctime still moves, which is what an fstat identity check sees)."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    stat = path.stat()
    with open(path, "r+b") as handle:
        handle.write(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


# Names whose order as names and as S3 keys differ: "-" sorts before "/", so "a-b/..." comes before
# "a/...", while the name "a" comes before "a-b".
TRICKY_NAMES = ("a", "a-b", "a-b-c", "a0", "a_b", "ab", "b", "b-")


def pages(store: Any, limit: int, tenant: str | None = None) -> list[list[Any]]:
    """``store.list`` page by page, each continuing after the previous page's last adapter."""
    found: list[list[Any]] = []
    after = None
    while page := store.list(tenant, after=after, limit=limit):
        assert len(page) <= limit
        found.append(page)
        after = (page[-1].tenant, page[-1].name)
    return found
