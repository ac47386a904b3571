"""The host tier holds adapter weights in the device slots' dtype and layout (adapter_manager.py):
half the bytes in a bf16 server, and a slot written from them holds exactly what a copy of the fp32
weights would have put there."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from enginelib import generate, request, tiny_service

from lorafleet_adapters.prompt import PromptTemplate
from lorafleet_server.engine import adapter_manager
from lorafleet_server.engine.adapter_manager import ABANDONED_LOAD_SECONDS


def test_bf16_host_weights_fill_slots_exactly_like_the_fp32_ones(
    tiny_model_dir: Path, tmp_path: Path, peft_adapter: Any
) -> None:
    adapter = peft_adapter(seed=7, r=8, lora_alpha=13, target_modules=["q_proj", "v_proj", "down_proj"])
    svc = tiny_service(tiny_model_dir, tmp_path / "store", dtype="bfloat16")
    try:
        assert svc.base.dtype == torch.bfloat16
        key = svc.store.import_peft(adapter, "acme", "bot", svc.base.spec)
        sink = generate(svc.engine, request("The capital of France is", adapter="acme/bot", max_new_tokens=2))
        assert sink.summary.adapter == "acme/bot@1"
        manager = svc.engine.adapters
        held = manager.host_cache.get(key)
        assert held is not None and held.dtype == torch.bfloat16
        fp32 = svc.store.load(key, svc.base.spec)  # the host form before: fp32, B [out, r]
        assert fp32.dtype == torch.float32 and held.nbytes * 2 == fp32.nbytes

        def slot_contents() -> dict[str, tuple[torch.Tensor, torch.Tensor] | None]:
            slot = manager.slot_snapshot()[key].slot
            out: dict[str, tuple[torch.Tensor, torch.Tensor] | None] = {}
            for name, layer in svc.base.lora_layers.items():
                r = layer.slot_ranks[slot]
                out[name] = (layer.lora_a[slot, :r].clone(), layer.lora_bt[slot, :r].clone()) if r else None
            return out

        contents = svc.engine.run(slot_contents)
        assert {n for n, c in contents.items() if c is not None} == set(fp32.modules)
        for name, (a, b_scaled) in fp32.modules.items():
            got = contents[name]
            assert got is not None
            assert torch.equal(got[0], a.to(torch.bfloat16))  # A [r, in]
            assert torch.equal(got[1], b_scaled.T.to(torch.bfloat16))  # B^T [r, out], scaled in fp32
    finally:
        svc.engine.shutdown(10)


def test_a_load_no_request_polls_again_is_dropped_and_its_weights_stay_bounded_by_the_host_cache(
    tiny_model_dir: Path, tmp_path: Path, peft_adapter: Any
) -> None:
    """A background load whose requests all went away (cancelled, timed out) used to keep its future,
    and so its host weights, outside --host-cache-bytes for good."""
    svc = tiny_service(tiny_model_dir, tmp_path / "store")
    manager = svc.engine.adapters
    key = svc.store.import_peft(peft_adapter(seed=3), "acme", "gone", svc.base.spec)
    assert manager._host_weights(key) is None  # starts the load, which no request will poll
    future = manager._pending[key]
    future.result(timeout=60)
    svc.engine.shutdown(10)  # from here the test drives the manager's clock: no engine thread beside it
    manager._done_seen.clear()
    manager._next_sweep = 0.0
    assert manager.drop_abandoned_loads(1000.0) == 0  # first seen done now
    assert manager.drop_abandoned_loads(1000.5) == 0  # sweeps at most once a second
    assert manager.drop_abandoned_loads(1000.0 + ABANDONED_LOAD_SECONDS - 0.5) == 0
    assert manager.drop_abandoned_loads(1000.0 + ABANDONED_LOAD_SECONDS + 1) == 1
    assert key not in manager._pending and not manager._done_seen
    assert manager._host_weights(key) is future.result()  # a later request finds it in the host cache


def test_manifests_and_prompt_templates_kept_are_bounded(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every version a server reads used to stay in these maps for good (weeks of retrains: gigabytes)."""
    monkeypatch.setattr(adapter_manager, "MANIFESTS_KEPT", 6)
    monkeypatch.setattr(adapter_manager, "PROMPT_BYTES_KEPT", 8_000)
    svc = tiny_service(tiny_model_dir, tmp_path / "store")
    try:
        manager = svc.engine.adapters
        keys = [
            svc.store.publish_prompt("acme", f"p{i}", PromptTemplate(f"{i} " + "x" * 1000), svc.base.spec)
            for i in range(20)
        ]
        for key in keys:
            assert manager.kind(key) == "prompt"
            assert manager.prompt(key).system.startswith(f"{key.name[1:]} ")
        assert len(manager._manifests) == 6
        assert 0 < manager._prompts.nbytes <= 8_000 and len(manager._prompts) < 20
        assert keys[0] not in manager._prompts  # the least recently used went first
        assert manager.prompt(keys[0]) == svc.store.load_prompt(keys[0])  # read again when asked again
    finally:
        svc.engine.shutdown(10)
