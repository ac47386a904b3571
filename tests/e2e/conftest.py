"""A real server on 127.0.0.1 (ephemeral port) serving the real default model, and real adapters."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from e2elib import LiveServer, make_real_adapter
from enginelib import server_config

from lorafleet import LoraFleetClient
from lorafleet_server.app import build_service
from lorafleet_server.grpc.server import BackgroundServer

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


@pytest.fixture(scope="session")
def real_adapters(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("real-adapters")
    return {
        "support": make_real_adapter(
            default_model_dir, root / "support", 1, b_std=0.3, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]
        ),
        "legal": make_real_adapter(
            default_model_dir, root / "legal", 2, r=16, lora_alpha=32, target_modules="all-linear"
        ),
    }


def _live(
    tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path, real_adapters: dict[str, Path], **overrides: str
) -> Iterator[LiveServer]:
    data = tmp_path_factory.mktemp("e2e-data")
    config = server_config(model=default_model_dir, data_dir=data, **E2E_CONFIG, **overrides)  # type: ignore[arg-type]
    service = build_service(config)
    for name, d in real_adapters.items():
        service.store.import_peft(d, "acme", name, service.base.spec)
    server = BackgroundServer(service)
    port = server.start()
    client = LoraFleetClient(f"127.0.0.1:{port}", timeout=120, max_message_bytes=8 << 20)
    client.wait_for_ready(30)
    yield LiveServer(service=service, port=port, metrics_port=server.metrics_port, client=client)
    client.close()
    server.stop()


@pytest.fixture(scope="session")
def live(
    tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path, real_adapters: dict[str, Path]
) -> Iterator[LiveServer]:
    """The server as `lorafleet serve` starts it: --dtype auto (bf16 where the CPU has native bf16)."""
    yield from _live(tmp_path_factory, default_model_dir, real_adapters)


@pytest.fixture(scope="module")
def live_fp32(
    tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path, real_adapters: dict[str, Path]
) -> Iterator[LiveServer]:
    """The same server computing in fp32 (--dtype float32): greedy outputs independent of the batch."""
    yield from _live(tmp_path_factory, default_model_dir, real_adapters, dtype="float32")
