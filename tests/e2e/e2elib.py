"""Helpers shared by the end-to-end tests (fixtures live in conftest.py)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from lorafleet import LoraFleetClient
from lorafleet_adapters.manifest import Manifest, sha256_file, utc_now_iso
from lorafleet_server.app import Service


def make_real_adapter(model_dir: Path, out: Path, seed: int, b_std: float = 0.02, **lora: Any) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(init_lora_weights=False, **lora))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, b_std)
    model.save_pretrained(out)
    return out


@dataclasses.dataclass
class LiveServer:
    service: Service
    port: int
    metrics_port: int
    client: LoraFleetClient

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def store_root(self) -> Path:
        return self.service.config.store_root


def plant_version(
    store_root: Path,
    tenant: str,
    name: str,
    version: int,
    files: dict[str, bytes],
    base_fingerprint: str,
    rank: int = 8,
) -> None:
    """Write a version straight into the store (bypassing import's checks), with a valid manifest."""
    vdir = store_root / tenant / name / "versions" / str(version)
    vdir.mkdir(parents=True)
    for fname, data in files.items():
        (vdir / fname).write_bytes(data)
    manifest = Manifest(
        schema_version=1,
        tenant=tenant,
        name=name,
        version=version,
        kind="lora",
        method="lora",
        base_fingerprint=base_fingerprint,
        base_model="test",
        base_quantization="none",
        rank=rank,
        lora_alpha=16.0,
        use_rslora=False,
        target_modules=("q_proj",),
        files={f: sha256_file(vdir / f) for f in files},
        created_at=utc_now_iso(),
        producer="test",
        training_data_fingerprint=None,
        eval_metrics={},
        pii_scan=None,
    )
    (vdir / "manifest.json").write_text(manifest.to_json())
    (store_root / tenant / name / "latest").write_text(str(version))


def lora_config_json(r: int, targets: list[str]) -> bytes:
    return json.dumps(
        {
            "peft_type": "LORA",
            "r": r,
            "lora_alpha": 16,
            "target_modules": targets,
            "bias": "none",
            "task_type": "CAUSAL_LM",
        }
    ).encode()
