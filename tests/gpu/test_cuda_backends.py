"""The GPU path: NF4 / int8 bitsandbytes bases on CUDA, equal to PEFT on the same base."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from lorafleet_adapters.ref import AdapterRef
from lorafleet_adapters.store import AdapterStore
from lorafleet_server.app import make_slot_io
from lorafleet_server.model.loader import load_base, resolve_quantization
from lorafleet_server.model.runner import ModelRunner, RowStep

pytestmark = pytest.mark.gpu


def test_auto_quantization_is_nf4_on_cuda() -> None:
    assert resolve_quantization("auto", torch.device("cuda:0")) == "nf4"


@pytest.mark.parametrize("quantization", ["nf4", "int8", "none"])
def test_mixed_batch_matches_peft_on_cuda(
    quantization: str, tiny_model_dir: Path, peft_adapter: Any, tmp_path: Path
) -> None:
    from peft import PeftModel

    dev = torch.device("cuda:0")
    dirs = [
        peft_adapter(seed=1, r=8, target_modules=["q_proj", "v_proj"]),
        peft_adapter(seed=2, r=16, lora_alpha=32, target_modules="all-linear"),
    ]
    base = load_base(tiny_model_dir, quantization=quantization, device=dev, num_slots=3, max_lora_rank=16)
    store = AdapterStore(tmp_path / "store")
    write, _ = make_slot_io(base.lora_layers)
    for slot, d in enumerate(dirs, start=1):
        store.import_peft(d, "t", f"a{slot}", base.spec)
        w = store.load(store.resolve(AdapterRef("t", f"a{slot}", None)), base.spec)
        write(slot, w)
    runner = ModelRunner(base.model, base.context, rows=4, max_seq_len=64, dtype=base.dtype, device=dev)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok("The capital of France is", add_special_tokens=False).input_ids
    out = runner.step([RowStep(i, 0, tuple(ids), i, True, False) for i in range(3)])
    kwargs: dict[str, Any] = {"dtype": base.dtype, "device_map": {"": "cuda:0"}}
    if quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=base.dtype
        )
    elif quantization == "int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    for i, d in enumerate([None, *dirs]):
        ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir, **kwargs)
        if d is not None:
            ref = PeftModel.from_pretrained(ref, d)
        with torch.no_grad():
            want = ref(torch.tensor([ids], device=dev)).logits[0, -1].float()
        rel = (out.logits[i] - want).norm() / want.norm()
        assert rel < 2e-2, f"row {i}: relative error {rel:.4f}"
