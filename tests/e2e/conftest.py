"""A real server on 127.0.0.1 (ephemeral port) serving the real default model, and real adapters."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from lorafleet import LoraFleetClient

from adapters.manifest import Manifest, sha256_file, utc_now_iso
from server.app import Service, build_service
from server.config import ServerConfig
from server.grpc.server import BackgroundServer

E2E_CONFIG = {
    "port": 0,
    "metrics_port": 0,
    "max_batch_size": 8,
    "max_seq_len": 512,
    "max_new_tokens": 128,
    "default_max_new_tokens": 32,
    "max_loaded_adapters": 4,
    "max_lora_rank": 32,
    "max_message_bytes": 1 << 20,
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


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


@pytest.fixture(scope="session")
def real_adapters(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("real-adapters")
    return {
        "support": make_real_adapter(default_model_dir, root / "support", 1, b_std=0.3, r=8, lora_alpha=16,
                                     target_modules=["q_proj", "v_proj"]),
        "legal": make_real_adapter(default_model_dir, root / "legal", 2, r=16, lora_alpha=32,
                                   target_modules="all-linear"),
    }


@dataclasses.dataclass
class LiveServer:
    service: Service
    port: int
    client: LoraFleetClient

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def store_root(self) -> Path:
        return self.service.config.store_root


@pytest.fixture(scope="session")
def live(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path,
         real_adapters: dict[str, Path]) -> Iterator[LiveServer]:
    data = tmp_path_factory.mktemp("e2e-data")
    config = ServerConfig(model=default_model_dir, data_dir=data, **E2E_CONFIG)  # type: ignore[arg-type]
    service = build_service(config)
    for name, d in real_adapters.items():
        service.store.import_peft(d, "acme", name, service.base.spec)
    server = BackgroundServer(service)
    port = server.start()
    client = LoraFleetClient(f"127.0.0.1:{port}", timeout=120, max_message_bytes=8 << 20)
    client.wait_for_ready(30)
    yield LiveServer(service=service, port=port, client=client)
    client.close()
    server.stop()


def plant_version(store_root: Path, tenant: str, name: str, version: int, files: dict[str, bytes],
                  base_fingerprint: str, rank: int = 8) -> None:
    """Write a version straight into the store (bypassing import's checks), with a valid manifest."""
    vdir = store_root / tenant / name / "versions" / str(version)
    vdir.mkdir(parents=True)
    for fname, data in files.items():
        (vdir / fname).write_bytes(data)
    manifest = Manifest(
        schema_version=1, tenant=tenant, name=name, version=version, kind="lora", method="lora",
        base_fingerprint=base_fingerprint, base_model="test", base_quantization="none", rank=rank,
        lora_alpha=16.0, use_rslora=False, target_modules=("q_proj",),
        files={f: sha256_file(vdir / f) for f in files}, created_at=utc_now_iso(), producer="test",
        training_data_fingerprint=None, eval_metrics={}, pii_scan=None,
    )
    (vdir / "manifest.json").write_text(manifest.to_json())
    (store_root / tenant / name / "latest").write_text(str(version))


def lora_config_json(r: int, targets: list[str]) -> bytes:
    return json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": 16, "target_modules": targets,
                       "bias": "none", "task_type": "CAUSAL_LM"}).encode()
