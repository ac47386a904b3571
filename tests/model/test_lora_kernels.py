"""The multi-LoRA kernels on the served path: bf16 against PEFT, the ``token`` kernel's routing and storage.

docs/architecture.md, "Multi-LoRA math and kernels": every kernel, in bf16 (the default compute dtype
on CPUs with avx512_bf16) as in fp32, must give each row of a mixed batch PEFT's logits for its adapter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest
import torch
from peft import PeftModel
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorafleet_adapters.ref import AdapterRef
from lorafleet_adapters.store import AdapterStore
from lorafleet_server.app import make_slot_io
from lorafleet_server.model.loader import load_base
from lorafleet_server.model.lora import LoraBatch, LoraContext, MultiLoRALinear, lora_delta
from lorafleet_server.model.native import NativeLora
from lorafleet_server.model.options import LoraImpl
from lorafleet_server.model.runner import ModelRunner, RowStep

CPU = torch.device("cpu")
ADAPTERS: dict[str, dict[str, Any]] = {
    "peft-default": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
    "all-linear-r16": {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"},
    "mlp-r4": {"r": 4, "lora_alpha": 8, "target_modules": ["gate_proj", "down_proj"]},
}
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,"]


@pytest.fixture(scope="module")
def adapter_dirs(peft_adapter: Any) -> dict[str, Path]:
    return {name: peft_adapter(seed=60 + i, **cfg) for i, (name, cfg) in enumerate(ADAPTERS.items())}


@pytest.fixture(scope="module")
def peft_rows(tiny_model_dir: Path, adapter_dirs: dict[str, Path]) -> tuple[list[list[int]], torch.Tensor]:
    """Row i: prompt ids and PEFT fp32 last-token logits with adapter i (row 0: the base). [rows, vocab]"""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [tokenizer(PROMPTS[i % len(PROMPTS)], add_special_tokens=False).input_ids for i in range(4)]
    want = []
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        want.append(plain(torch.tensor([prompts[0]])).logits[0, -1].float())
        for i, d in enumerate(adapter_dirs.values(), start=1):
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), d)
            logits = model(torch.tensor([prompts[i]])).logits[0, -1].float()
            base_logits = plain(torch.tensor([prompts[i]])).logits[0, -1].float()
            assert (logits - base_logits).abs().max() > 0.5  # far beyond the tolerance below
            want.append(logits)
    return prompts, torch.stack(want)


def _served(
    tiny_model_dir: Path,
    dirs: dict[str, Path],
    tmp: Path,
    impl: str,
    prompts: list[list[int]],
    native: NativeLora | None = None,
) -> torch.Tensor:
    """Last-token logits [rows, vocab] served in bf16 with ``impl``: one ragged prefill (row i uses slot i,
    row 0 the base), then one decode token per row, where ``auto`` picks ``token`` (4 tokens, 3 adapters)."""
    base = load_base(tiny_model_dir, quantization="none", device=CPU, num_slots=4, max_lora_rank=16, dtype="bfloat16")
    assert base.dtype == torch.bfloat16
    store = AdapterStore(tmp)
    write, _ = make_slot_io(base.lora_layers)
    for slot, (name, d) in enumerate(dirs.items(), start=1):
        store.import_peft(d, "acme", name, base.spec)
        write(slot, store.load(store.resolve(AdapterRef("acme", name, None)), base.spec))
    assert {layer.lora_at.dtype for layer in base.lora_layers.values()} == {torch.bfloat16}
    kernel = cast(LoraImpl, impl)
    runner = ModelRunner(
        base.model,
        base.context,
        rows=8,
        max_seq_len=64,
        dtype=torch.bfloat16,
        device=CPU,
        lora_impl=kernel,
        native_lora=native,
    )
    runner.step([RowStep(i, 0, tuple(ids[:-1]), i, False, False) for i, ids in enumerate(prompts)])
    return runner.step([RowStep(i, len(ids) - 1, (ids[-1],), i, True, False) for i, ids in enumerate(prompts)]).logits


@pytest.fixture(scope="module")
def gather_rows(
    tiny_model_dir: Path,
    adapter_dirs: dict[str, Path],
    peft_rows: tuple[list[list[int]], torch.Tensor],
    tmp_path_factory: pytest.TempPathFactory,
) -> torch.Tensor:
    """The rows served in bf16 by the ``gather`` reference. [rows, vocab]"""
    return _served(tiny_model_dir, adapter_dirs, tmp_path_factory.mktemp("gather"), "gather", peft_rows[0])


@pytest.mark.parametrize("impl", ["dense", "token", "grouped", "auto", "native"])
def test_bf16_mixed_batch_matches_peft_for_every_kernel(
    impl: str,
    tiny_model_dir: Path,
    adapter_dirs: dict[str, Path],
    peft_rows: tuple[list[list[int]], torch.Tensor],
    gather_rows: torch.Tensor,
    tmp_path: Path,
    native_lora: NativeLora | None,
) -> None:
    if impl == "native" and native_lora is None:
        pytest.skip("no C compiler on this machine")
    prompts, want = peft_rows
    got = _served(tiny_model_dir, adapter_dirs, tmp_path, impl, prompts, native_lora)  # [rows, vocab]
    ref = gather_rows
    # The kernels agree with the gather reference to bf16 rounding, far closer than the bf16 model to fp32.
    # The native kernel (``auto`` picks it where it is built) keeps h and y + delta in fp32 and rounds
    # once, so it differs from the torch kernels by up to one bf16 step of the logits (~3e-2 at |8|)
    # and lies no farther from PEFT's fp32 logits than they do.
    native = impl == "native" or (impl == "auto" and native_lora is not None)
    torch.testing.assert_close(got, ref, rtol=0, atol=3e-2 if native else 1e-2)
    if native:
        assert float((got - want).abs().max()) <= float((ref - want).abs().max()) + 1e-2
    # bf16 keeps 8 mantissa bits: within 8e-2 of PEFT fp32 (each adapter moves its row by > 0.5; the
    # large all-linear r=16 one is the farthest, 5e-2), and the greedy token is PEFT's.
    torch.testing.assert_close(got, want, rtol=0, atol=8e-2)
    assert got.argmax(-1).tolist() == want.argmax(-1).tolist()


def test_token_kernel_skips_tokens_and_ranks_the_module_does_not_use() -> None:
    """Base rows and rows whose adapter does not target the module get empty bags; a step whose adapters
    all have a rank below the module's r_cap reads only that many rows of B."""
    d_in, d_out, slots_n = 20, 12, 5
    m = MultiLoRALinear(nn.Linear(d_in, d_out), d_in, d_out, slots_n, 16, LoraContext(), torch.float32, CPU)
    g = torch.Generator().manual_seed(3)
    pairs = {1: 16, 2: 4, 4: 2}  # slot 3: the adapter there does not target this module
    written = {}
    for slot, r in pairs.items():
        a, b = torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g)
        m.write_slot(slot, a, b)
        written[slot] = (a, b)
    assert m.rank_capacity == 16
    x = torch.randn(6, d_in, generator=g)
    slots = torch.tensor([2, 0, 3, 4, 2, 3])  # slot 1 (r=16) absent: the step's rank here is 4
    batch = LoraBatch.build(slots, torch.float32, "token")
    assert batch is not None
    route = batch.routing(m.slot_ranks)
    assert route is not None and route.rank == 4 and not route.all_tokens
    assert route.tokens.tolist() == [0, 3, 4]
    got = lora_delta(x, batch, m.slot_ranks, m.lora_a, m.lora_bt)
    assert got is not None
    want = torch.stack(
        [
            (x[i] @ written[int(s)][0].T) @ written[int(s)][1].T if int(s) in written else torch.zeros(d_out)
            for i, s in enumerate(slots)
        ]
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_is_stored_transposed_and_contiguous_for_the_token_kernel() -> None:
    m = MultiLoRALinear(nn.Linear(6, 10), 6, 10, 3, 8, LoraContext(), torch.bfloat16, CPU, align_ranks=False)
    a, b = torch.randn(4, 6), torch.randn(10, 4)
    m.write_slot(2, a, b)
    assert m.lora_at.shape == (3, 6, 4) and m.lora_at.is_contiguous()
    assert m.lora_a.shape == (3, 4, 6)  # the [slots, r_cap, in] view every other kernel reads
    torch.testing.assert_close(m.lora_a[2], a.to(torch.bfloat16), rtol=0, atol=0)
    torch.testing.assert_close(m.lora_bt[2], b.T.to(torch.bfloat16), rtol=0, atol=0)
    assert m.slot_memory_bytes() == 3 * 4 * (6 + 10) * 2
    m.write_slot(1, torch.randn(8, 6), torch.randn(10, 8))  # grows r_cap: slot 2's rows survive
    assert m.lora_at.shape == (3, 6, 8) and m.lora_at.is_contiguous()
    torch.testing.assert_close(m.lora_a[2, :4], a.to(torch.bfloat16), rtol=0, atol=0)
    assert not m.lora_a[2, 4:].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_kernel_is_batch_invariant(dtype: torch.dtype) -> None:
    """Each token's bags are summed alone and in a fixed order, so a row's delta is bit-equal whatever
    shares the step: alone, beside rows of other adapters and base rows, in a long step (``dense`` and
    ``grouped`` do not promise this in fp32; in bf16 they round like each other but not like ``token``)."""
    g = torch.Generator().manual_seed(5)
    n_slots, d_in, d_out, r = 9, 96, 160, 8
    a = (torch.randn(n_slots, r, d_in, generator=g) * 0.1).to(dtype)  # [S, r, in]
    bt = (torch.randn(n_slots, r, d_out, generator=g) * 0.1).to(dtype)  # [S, r, out]
    a[0], bt[0] = 0, 0
    ranks = [0] + [r] * (n_slots - 1)
    x = torch.randn(300, d_in, generator=g).to(dtype)  # [N, in]
    slots = torch.randint(0, n_slots, (300,), generator=g)
    batch = LoraBatch.build(slots, dtype, "token")
    assert batch is not None
    together = lora_delta(x, batch, ranks, a, bt)
    assert together is not None
    for i in (0, 1, 2, 50, 299):
        alone_batch = LoraBatch.build(slots[i : i + 1], dtype, "token")
        if alone_batch is None:
            assert not together[i].any()
            continue
        alone = lora_delta(x[i : i + 1], alone_batch, ranks, a, bt)
        assert alone is not None and torch.equal(alone[0], together[i]), i


@pytest.mark.parametrize("impl", ["dense", "grouped", "gather", "token"])
def test_one_adapters_overflow_stays_in_its_own_rows(impl: LoraImpl) -> None:
    """Slot 2's A holds infinities (finite weights can overflow in a product too): its rows come out
    non-finite, every other row of the step (other adapters, base rows) does not. ``dense`` multiplied
    every row by every adapter's block and then by a 0/1 mask, and 0 x inf is NaN."""
    g = torch.Generator().manual_seed(7)
    n_slots, d_in, d_out, r = 4, 16, 12, 4
    a = torch.randn(n_slots, r, d_in, generator=g)  # [S, r, in]
    bt = torch.randn(n_slots, r, d_out, generator=g)  # [S, r, out]
    a[0], bt[0] = 0, 0
    a[2, 1, 3] = float("inf")
    x = torch.randn(6, d_in, generator=g)  # [N, in]
    for slots in (torch.tensor([1, 2, 0, 3, 2, 1]), torch.tensor([2, 0, 0, 2, 0, 2])):  # U = 3; U = 1
        batch = LoraBatch.build(slots, torch.float32, impl)
        assert batch is not None
        got = lora_delta(x, batch, [0, r, r, r], a, bt)
        assert got is not None
        hostile = slots == 2
        assert not torch.isfinite(got[hostile]).all()
        assert torch.isfinite(got[~hostile]).all(), (impl, slots)
