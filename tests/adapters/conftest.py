"""Shared fixtures: the tiny base model's spec and real PEFT adapters saved to disk."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from adapters_testlib import MakeAdapter, make_base_model, spec_from_model

from lorafleet_adapters.peft_format import BaseModelSpec


@pytest.fixture(scope="session")
def spec() -> BaseModelSpec:
    return spec_from_model(make_base_model())


@pytest.fixture
def make_adapter(tmp_path: Path) -> MakeAdapter:
    """Build a real PEFT LoRA adapter (random A and B) and save it; returns (directory, peft model)."""
    counter = iter(range(1_000_000))

    def build(seed: int = 1, **lora: Any) -> tuple[Path, peft.PeftModel]:
        settings: dict[str, Any] = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
        settings.update(lora)
        model = make_base_model()
        torch.manual_seed(seed)
        peft_model = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **settings))
        out = tmp_path / f"adapter{next(counter)}"
        peft_model.save_pretrained(str(out))
        return out, peft_model

    return build


@pytest.fixture
def adapter_dir(make_adapter: MakeAdapter) -> Path:
    return make_adapter()[0]
