"""The GPU path: NF4 / int8 bitsandbytes bases on CUDA, equal to PEFT on the same base."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorafleet_adapters.ref import AdapterRef
from lorafleet_adapters.store import AdapterStore
from lorafleet_server.app import make_slot_io
from lorafleet_server.model.loader import load_base, quantization_config, resolve_quantization
from lorafleet_server.model.runner import ModelRunner, RowStep

pytestmark = pytest.mark.gpu

# PEFT upcasts a bf16 model's adapters to fp32 (``autocast_adapter_dtype``); the server keeps them in the
# compute dtype, as a PEFT model whose LoRA weights are cast back to bf16 does. Both are PEFT's own
# numbers on the same base, so their distance is the rounding this comparison must allow: our rows may
# lie this many times as far from the default reference (never less than the floor, bf16's resolution
# of these logits).
BF16_ERROR_FACTOR = 2.0
BF16_ERROR_FLOOR = 1e-2
# An int8 row is not its own alone: LLM.int8 takes the input columns over its outlier threshold (6.0)
# across every token of the matmul, so an adapter row's activations move a base row's outlier columns
# (bitsandbytes' CPU path, the same algorithm: base row 0.0057 from its reference alone, 0.0000 with
# the threshold at 0). Its own floor, with margin for CUDA's rounding; NF4 and unquantized rows are
# exactly PEFT's on CPU with eager attention.
INT8_ERROR_FLOOR = 3e-2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _peft_logits(
    model_dir: Path, quantization: str, dtype: torch.dtype, adapter: Path | None, ids: list[int], upcast: bool
) -> torch.Tensor:
    """PEFT's last-token logits on the same bitsandbytes base in ``dtype``, the adapter upcast to fp32
    or not; [vocab] fp32."""
    from peft import PeftModel

    # eager attention: the server's own is the same math; SDPA's kernels round differently
    kwargs: dict[str, Any] = {"dtype": dtype, "device_map": {"": "cuda:0"}, "attn_implementation": "eager"}
    if quantization != "none":  # the server's own config, not a copy of it
        kwargs["quantization_config"] = quantization_config(quantization, dtype)
    ref: Any = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if adapter is not None:
        ref = PeftModel.from_pretrained(ref, adapter)  # upcasts the adapter to fp32
        if not upcast:  # as the server keeps it, on any base (a quantized one's LoRA dtype is PEFT's choice)
            for name, param in ref.named_parameters():
                if "lora_" in name:
                    param.data = param.data.to(dtype)
    with torch.no_grad():
        return ref(torch.tensor([ids], device="cuda:0")).logits[0, -1].float()


def test_auto_quantization_is_nf4_on_cuda() -> None:
    assert resolve_quantization("auto", torch.device("cuda:0")) == "nf4"


@pytest.mark.parametrize("quantization", ["nf4", "int8", "none"])
def test_mixed_batch_matches_peft_on_cuda(
    quantization: str, tiny_model_dir: Path, peft_adapter: Any, tmp_path: Path
) -> None:
    """Three rows in one step (base, r=8 q/v, r=16 all-linear) against PEFT with each row's adapter alone
    on the same quantized base: within bf16's rounding, measured as the distance between PEFT with its
    adapter upcast to fp32 (its default) and kept in bf16 (as the server keeps it), and each row
    nearest its own adapter's reference (no mis-routing)."""
    dev = torch.device("cuda:0")
    dirs = [
        peft_adapter(seed=1, r=8, target_modules=["q_proj", "v_proj"]),
        peft_adapter(seed=2, r=16, lora_alpha=32, target_modules="all-linear"),
    ]
    base = load_base(tiny_model_dir, quantization=quantization, device=dev, num_slots=3, max_lora_rank=16)
    assert base.dtype == torch.bfloat16
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
    want = [_peft_logits(tiny_model_dir, quantization, base.dtype, d, ids, upcast=True) for d in [None, *dirs]]
    # the base row has no adapter to keep in bf16: its reference is the same model
    want_bf16 = [want[0], *(_peft_logits(tiny_model_dir, quantization, base.dtype, d, ids, upcast=False) for d in dirs)]
    ours = [_rel(out.logits[i], want[i]) for i in range(3)]
    spread = [_rel(want_bf16[i], want[i]) for i in range(3)]
    report = [
        f"row {i}: ours {ours[i]:.4f}, PEFT's bf16 adapter {spread[i]:.4f}, "
        f"ours vs that {_rel(out.logits[i], want_bf16[i]):.4f}"
        for i in range(3)
    ]
    print(f"{quantization}: relative error of the last-token logits against PEFT", *report, sep="\n  ")
    floor = INT8_ERROR_FLOOR if quantization == "int8" else BF16_ERROR_FLOOR
    for i in range(3):
        assert ours[i] <= max(floor, BF16_ERROR_FACTOR * spread[i]), report[i]
        # Routing: the row is nearest its own adapter's reference, and the adapters move the logits
        # far more than the rounding does (a row that lost its delta cannot pass for its adapter's).
        distances = [_rel(out.logits[i], w) for w in want]
        assert min(range(3), key=distances.__getitem__) == i, (report[i], distances)
        if i:
            assert _rel(want[i], want[0]) > 5 * max(BF16_ERROR_FLOOR, ours[i]), report[i]


@pytest.mark.parametrize("quantization", ["nf4", "none"])
def test_reused_logits_on_cuda_sample_as_the_fresh_ones(quantization: str, tiny_model_dir: Path) -> None:
    """The engine's steps (``reuse_logits``) on CUDA: the LM head's output copied into the runner's one
    device buffer in the compute dtype; widened it is the fresh fp32 logits, its greedy tokens (torch's
    max: no native kernel on CUDA) are theirs, and every sampling row picks what it picks from them."""
    from lorafleet_server.model.sampler import RowSampling, sample_rows

    dev = torch.device("cuda:0")
    base = load_base(tiny_model_dir, quantization=quantization, device=dev, num_slots=2, max_lora_rank=8)
    runners = [ModelRunner(base.model, base.context, rows=3, max_seq_len=32, dtype=base.dtype, device=dev)]
    runners.append(ModelRunner(base.model, base.context, rows=3, max_seq_len=32, dtype=base.dtype, device=dev))
    steps = [
        [RowStep(0, 0, (5, 17, 33, 9), 0, True, False), RowStep(1, 0, (11, 12), 0, True, False)],
        [RowStep(0, 4, (40,), 0, True, False), RowStep(1, 2, (41,), 0, True, False)],
    ]

    def sampling(n: int) -> list[RowSampling]:  # seeded afresh for each call
        seen = torch.tensor([5, 9], device=dev)
        return [RowSampling(0.9, 0.8, 0, 1.2, seen, torch.Generator(dev).manual_seed(3 + i)) for i in range(n)]

    storage = set()
    for rows in steps:
        fresh = runners[0].step(rows).logits
        reused = runners[1].step(rows, reuse_logits=True).logits
        assert reused.device.type == "cuda" and reused.dtype == base.dtype
        assert torch.equal(reused.float(), fresh)
        assert runners[1].greedy_tokens(reused) == fresh.max(-1).indices.tolist()
        assert sample_rows(reused, sampling(len(rows))) == sample_rows(fresh, sampling(len(rows)))
        storage.add(reused.untyped_storage().data_ptr())
    assert len(storage) == 1
