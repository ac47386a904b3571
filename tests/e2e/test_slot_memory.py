"""Slot memory as operators see it: GetModelInfo's adapter_slot_memory_bytes and the Prometheus gauge.

Both read the live slot buffers, which follow the ranks of the loaded adapters (docs/architecture.md,
"Multi-LoRA math and kernels"), so they agree with each other and move when an adapter comes and goes.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
import torch
from e2elib import LiveServer, make_real_adapter

GAUGE = "lorafleet_adapter_slot_memory_bytes"


def gauge(live: LiveServer) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{live.metrics_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    assert f"# HELP {GAUGE} " in text and f"# TYPE {GAUGE} gauge" in text
    values = [line.split()[1] for line in text.splitlines() if line.startswith(f"{GAUGE} ")]
    assert len(values) == 1, "one unlabelled series"
    return int(float(values[0]))


def reported(live: LiveServer) -> tuple[int, int]:
    """(GetModelInfo's value, the gauge's value), read one right after the other."""
    return live.client.model_info().adapter_slot_memory_bytes, gauge(live)


@pytest.fixture(scope="module")
def widest_adapter(live: LiveServer, default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """r = the server's max_lora_rank on every Linear: loading it pads every module to that rank."""
    rank = live.service.config.max_lora_rank
    d = make_real_adapter(
        default_model_dir, tmp_path_factory.mktemp("widest"), 7, r=rank, lora_alpha=rank, target_modules="all-linear"
    )
    live.service.store.import_peft(d, "slotmem", "widest", live.service.base.spec)
    return "slotmem/widest"


def test_model_info_and_gauge_agree_and_follow_a_load(live: LiveServer, widest_adapter: str) -> None:
    before, before_gauge = reported(live)
    assert before == before_gauge

    live.client.load_adapter(widest_adapter)
    loaded, loaded_gauge = reported(live)
    assert loaded == loaded_gauge
    config = live.service.config
    slots = config.max_loaded_adapters + 1  # slot 0 is the all-zero "no adapter" slot
    itemsize = torch.empty((), dtype=live.service.base.dtype).element_size()
    every_linear_at_max_rank = sum(
        slots * config.max_lora_rank * (m.in_features + m.out_features) * itemsize
        for m in live.service.base.lora_layers.values()
    )
    assert loaded == every_linear_at_max_rank
    assert loaded > before  # the fixture's adapters are r=8 q/v and r=16 all-linear: smaller everywhere

    assert live.client.unload_adapter(widest_adapter).unloaded
    assert reported(live) == (before, before)
