"""Slot storage follows what is loaded: per module, rank capacity = the largest loaded rank there.

docs/architecture.md, "Multi-LoRA math and kernels": buffers grow when a bigger adapter arrives,
shrink when it leaves, hold nothing for modules no loaded adapter targets, and every kernel stays
exact through all of it.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lorafleet_adapters.device_slots import DeviceSlots
from lorafleet_adapters.ref import AdapterKey, AdapterRef
from lorafleet_adapters.store import AdapterStore
from lorafleet_server.app import make_slot_io
from lorafleet_server.model.loader import LoadedBase, load_base
from lorafleet_server.model.lora import (
    LoraBatch,
    LoraContext,
    MultiLoRALinear,
    aligned_rank,
    lora_delta,
    slot_memory_bytes,
)
from lorafleet_server.model.native import NativeLora
from lorafleet_server.model.runner import ModelRunner, RowStep

D_IN, D_OUT, SLOTS, R_MAX = 24, 40, 6, 32
IMPLS = ("gather", "dense", "token", "grouped", "auto")  # behind lora_delta; "native" is checked beside them
FP32 = 4


def _module(slots: int = SLOTS, align: bool = False) -> MultiLoRALinear:
    """Exact rank capacities unless ``align`` (the CPU default, tested on its own below)."""
    base = nn.Linear(D_IN, D_OUT)
    return MultiLoRALinear(
        base, D_IN, D_OUT, slots, R_MAX, LoraContext(), torch.float32, torch.device("cpu"), align_ranks=align
    )


def _pair(r: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """a [r, in], b_scaled [out, r]."""
    return torch.randn(r, D_IN, generator=gen), torch.randn(D_OUT, r, generator=gen)


def _bytes(slots: int, r_cap: int, d_in: int = D_IN, d_out: int = D_OUT) -> int:
    return slots * r_cap * (d_in + d_out) * FP32


def _expected(
    x: torch.Tensor, slots: torch.Tensor, loaded: dict[int, tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """Per-token loop over the weights as written, independent of how the module stores them."""
    rows = []
    for i in range(x.shape[0]):
        pair = loaded.get(int(slots[i]))
        rows.append(torch.zeros(D_OUT) if pair is None else (x[i] @ pair[0].T) @ pair[1].T)
    return torch.stack(rows)


def _check_all_kernels(
    m: MultiLoRALinear, loaded: dict[int, tuple[torch.Tensor, torch.Tensor]], seed: int, native: NativeLora | None
) -> None:
    g = torch.Generator().manual_seed(seed)
    for n_tokens in (1, 7, 300):
        x = torch.randn(n_tokens, D_IN, generator=g)
        slots = torch.randint(0, SLOTS, (n_tokens,), generator=g)
        want = _expected(x, slots, loaded)
        if native is not None and m.rank_capacity:  # the C kernel adds into y, reading slot_rank_t
            y = torch.zeros(n_tokens, D_OUT)
            native.add_(y, x, m.lora_at, m.lora_bt, slots, m.slot_rank_t)
            torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
        reference = None
        for impl in IMPLS:
            batch = LoraBatch.build(slots, torch.float32, impl)  # type: ignore[arg-type]
            if batch is None:
                assert not want.any()
                continue
            got = lora_delta(x, batch, m.slot_ranks, m.lora_a, m.lora_bt)
            got = torch.zeros(n_tokens, D_OUT) if got is None else got
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            if impl == "gather":
                reference = got
            elif reference is not None:
                torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)


def _check_zero_padding(m: MultiLoRALinear) -> None:
    """Rows past a slot's own rank (all of a free slot, all of slot 0) are zero: gather reads them."""
    for s, r in enumerate(m.slot_ranks):
        assert not m.lora_a[s, r:].any() and not m.lora_bt[s, r:].any()
    assert m.slot_ranks[0] == 0


def test_no_storage_before_any_adapter() -> None:
    m = _module()
    assert m.rank_capacity == 0 and m.slot_memory_bytes() == 0
    assert m.lora_a.shape == (SLOTS, 0, D_IN) and m.lora_bt.shape == (SLOTS, 0, D_OUT)
    x = torch.randn(3, D_IN)
    m.context.batch = LoraBatch.build(torch.tensor([1, 2, 0]), torch.float32, "auto")
    torch.testing.assert_close(m(x), m.base(x))
    for impl in IMPLS:
        batch = LoraBatch.build(torch.tensor([1, 2, 0]), torch.float32, impl)  # type: ignore[arg-type]
        assert batch is not None and lora_delta(x, batch, m.slot_ranks, m.lora_a, m.lora_bt) is None


def test_grows_for_a_bigger_adapter_and_shrinks_when_it_leaves(native_lora: NativeLora | None) -> None:
    g = torch.Generator().manual_seed(0)
    m = _module()
    small, big = _pair(4, g), _pair(16, g)
    m.write_slot(1, *small)
    assert (m.rank_capacity, m.slot_memory_bytes()) == (4, _bytes(SLOTS, 4))
    m.write_slot(3, *big)
    assert (m.rank_capacity, m.slot_memory_bytes()) == (16, _bytes(SLOTS, 16))
    _check_all_kernels(m, {1: small, 3: big}, seed=1, native=native_lora)  # slot 1 survived the grow
    m.clear_slot(3)
    assert (m.rank_capacity, m.slot_memory_bytes()) == (4, _bytes(SLOTS, 4))
    _check_all_kernels(m, {1: small}, seed=2, native=native_lora)  # and the shrink
    m.write_slot(2, None, None)  # an adapter that does not target this module takes no room here
    assert m.rank_capacity == 4
    m.clear_slot(1)
    assert (m.rank_capacity, m.slot_memory_bytes()) == (0, 0)
    _check_zero_padding(m)


def test_overwriting_the_largest_rank_with_a_smaller_one_shrinks() -> None:
    g = torch.Generator().manual_seed(3)
    m = _module()
    m.write_slot(1, *_pair(16, g))
    m.write_slot(2, *_pair(8, g))
    small = _pair(2, g)
    m.write_slot(1, *small)  # no clear in between: write_slot replaces the whole slot
    assert m.rank_capacity == 8 and m.slot_ranks[1] == 2
    _check_zero_padding(m)


def test_writes_after_the_module_moves_land_in_its_new_buffers() -> None:
    """Slot writes go through views cached per buffer; ``.to()`` replaces the buffers, and a write
    after it must reach the ones the forward reads, not the views of the old."""
    g = torch.Generator().manual_seed(4)
    m = _module()
    first, second = _pair(4, g), _pair(4, g)
    m.write_slot(1, *first)
    m.to(torch.float64)
    m.write_slot(2, *(t.double() for t in second))
    m.clear_slot(1)
    _check_all_kernels(m.float(), {2: second}, seed=7, native=None)
    _check_zero_padding(m)


def test_a_resize_that_fails_records_no_rank() -> None:
    """Out of memory while growing the buffers: the slot keeps its old rank, so the capacity still
    follows what is loaded (a clear afterwards frees it)."""
    g = torch.Generator().manual_seed(6)
    m = _module()
    m.write_slot(1, *_pair(4, g))
    fit = m._fit

    def no_memory() -> None:
        raise MemoryError("no room for r_cap 8")

    m._fit = no_memory  # type: ignore[method-assign]
    with pytest.raises(MemoryError):
        m.write_slot(2, *_pair(8, g))
    m._fit = fit  # type: ignore[method-assign]
    assert m.slot_ranks[2] == 0 and m.rank_capacity == 4
    m.clear_slot(1)
    assert m.rank_capacity == 0 and m.slot_memory_bytes() == 0


def test_a_rank_over_max_lora_rank_is_refused_and_changes_nothing() -> None:
    g = torch.Generator().manual_seed(4)
    m = _module()
    m.write_slot(1, *_pair(4, g))
    with pytest.raises(ValueError, match="exceeds max_lora_rank"):
        m.write_slot(2, *_pair(R_MAX + 1, g))
    assert m.rank_capacity == 4 and m.slot_ranks[2] == 0


@pytest.mark.parametrize("align", [False, True], ids=["exact", "aligned"])
def test_every_kernel_equals_gather_through_random_grows_and_shrinks(
    native_lora: NativeLora | None, align: bool
) -> None:
    rng = random.Random(5)
    g = torch.Generator().manual_seed(5)
    m = _module(align=align)
    loaded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for step in range(40):
        slot = rng.randrange(1, SLOTS)
        op = rng.random()
        if op < 0.3:
            m.clear_slot(slot)
            loaded.pop(slot, None)
        elif op < 0.4:
            m.write_slot(slot, None, None)  # loaded, but not on this module
            loaded.pop(slot, None)
        else:
            pair = _pair(rng.choice([1, 2, 4, 8, 16, 32]), g)
            m.write_slot(slot, *pair)
            loaded[slot] = pair
        want_cap = max((p[0].shape[0] for p in loaded.values()), default=0)
        want_cap = aligned_rank(want_cap) if align else want_cap
        assert m.rank_capacity == want_cap and m.slot_memory_bytes() == _bytes(SLOTS, want_cap)
        _check_zero_padding(m)
        if step % 4 == 0 or want_cap == 0:
            assert m.slot_rank_t.tolist() == m.slot_ranks
            _check_all_kernels(m, loaded, seed=100 + step, native=native_lora)


# -- a whole (tiny) model: targeted modules only, slot reuse without stale weights ----------------

R16_ALL = {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"}
R4_QV = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
PROMPT = (5, 17, 33, 9, 100, 2, 7)


@pytest.fixture(scope="module")
def model_adapters(peft_adapter: Any) -> dict[str, Path]:
    return {
        "big": peft_adapter(seed=11, **R16_ALL),
        "small": peft_adapter(seed=12, **R4_QV),
        "other": peft_adapter(seed=13, **R16_ALL),
    }


def _base(tiny_model_dir: Path) -> LoadedBase:
    # F.linear, not fp32's timed choice: tests here compare logits of two loads bit for bit
    return load_base(
        tiny_model_dir,
        quantization="none",
        device=torch.device("cpu"),
        num_slots=4,
        max_lora_rank=32,
        linear_kernel="torch",
    )


def _weights(store: AdapterStore, base: LoadedBase, name: str) -> Any:
    return store.load(store.resolve(AdapterRef("acme", name, None)), base.spec)


def _logits(base: LoadedBase, impl: str, slot: int, native: NativeLora | None = None) -> torch.Tensor:
    runner = ModelRunner(
        base.model,
        base.context,
        rows=2,
        max_seq_len=32,
        dtype=torch.float32,
        device=torch.device("cpu"),
        lora_impl=impl,  # type: ignore[arg-type]
        native_lora=native if impl == "native" else None,
    )
    return runner.step([RowStep(0, 0, PROMPT, slot, True, False), RowStep(1, 0, PROMPT, 0, True, False)]).logits


def test_model_memory_follows_the_loaded_adapters(
    tiny_model_dir: Path, model_adapters: dict[str, Path], tmp_path: Path
) -> None:
    base = _base(tiny_model_dir)
    store = AdapterStore(tmp_path / "store")
    for name, d in model_adapters.items():
        store.import_peft(d, "acme", name, base.spec)
    layers = base.lora_layers
    write, clear = make_slot_io(layers)
    assert slot_memory_bytes(layers.values()) == 0

    write(2, _weights(store, base, "small"))
    qv = {n for n in layers if n.endswith((".q_proj", ".v_proj"))}
    assert {n for n, m in layers.items() if m.rank_capacity} == qv
    assert all(layers[n].rank_capacity == 8 for n in qv)  # rank 4, aligned to the native kernel's 8 on CPU
    small_bytes = sum(_bytes(4, 8, m.in_features, m.out_features) for n, m in layers.items() if n in qv)
    assert slot_memory_bytes(layers.values()) == small_bytes

    write(1, _weights(store, base, "big"))
    assert all(m.rank_capacity == 16 for m in layers.values())
    assert slot_memory_bytes(layers.values()) == sum(
        _bytes(4, 16, m.in_features, m.out_features) for m in layers.values()
    )

    clear(1)
    assert slot_memory_bytes(layers.values()) == small_bytes
    clear(2)
    assert slot_memory_bytes(layers.values()) == 0


@pytest.mark.parametrize("impl", (*IMPLS, "native"))
@pytest.mark.parametrize("other_resident", [False, True], ids=["shrinks", "keeps-capacity"])
def test_a_reused_slot_holds_no_stale_weights(
    impl: str,
    other_resident: bool,
    tiny_model_dir: Path,
    model_adapters: dict[str, Path],
    tmp_path: Path,
    native_lora: NativeLora | None,
) -> None:
    """DeviceSlots evicts the r=16 all-linear adapter for the r=4 q/v one in the same slot.

    With another r=16 all-linear adapter resident the buffers keep r_cap 16, so only zeroing the slot
    stands between the new adapter and the old one's rows; without it they shrink and regrow.
    """
    reused = _base(tiny_model_dir)
    store = AdapterStore(tmp_path / "store")
    for name, d in model_adapters.items():
        store.import_peft(d, "acme", name, reused.spec)
    write, clear = make_slot_io(reused.lora_layers)
    slots = DeviceSlots(2 if other_resident else 1, write, clear)
    assert slots.install(AdapterKey("acme", "big", 1), _weights(store, reused, "big")) == 1
    if other_resident:
        assert slots.install(AdapterKey("acme", "other", 1), _weights(store, reused, "other")) == 2
    if impl == "native" and native_lora is None:
        pytest.skip("no C compiler on this machine")
    _logits(reused, impl, 1, native_lora)  # serve a step with it, then let it go
    assert slots.install(AdapterKey("acme", "small", 1), _weights(store, reused, "small")) == 1  # LRU victim

    fresh = _base(tiny_model_dir)
    fresh_write, _ = make_slot_io(fresh.lora_layers)
    fresh_write(1, _weights(store, fresh, "small"))
    if other_resident:
        fresh_write(2, _weights(store, fresh, "other"))
    got, want = _logits(reused, impl, 1, native_lora), _logits(fresh, impl, 1, native_lora)
    assert torch.equal(got, want)
    assert slot_memory_bytes(reused.lora_layers.values()) == slot_memory_bytes(fresh.lora_layers.values())
    assert all(m.rank_capacity == (16 if other_resident else 0) for n, m in reused.lora_layers.items() if "mlp" in n)
    assert not torch.equal(got[0], got[1])  # the adapter row differs from the base row beside it


def test_an_install_refused_partway_leaves_the_slot_all_zeros(
    tiny_model_dir: Path, model_adapters: dict[str, Path], tmp_path: Path
) -> None:
    """A module late in the model refuses its weights after earlier ones were staged: the slot the
    evicted adapter held must still be zeros everywhere (gather reads every row), not keep its rows
    on the modules the new adapter does not target."""
    base = _base(tiny_model_dir)
    store = AdapterStore(tmp_path / "store")
    for name, d in model_adapters.items():
        store.import_peft(d, "acme", name, base.spec)
    write, clear = make_slot_io(base.lora_layers)
    slots = DeviceSlots(2, write, clear)
    assert slots.install(AdapterKey("acme", "big", 1), _weights(store, base, "big")) == 1
    assert slots.install(AdapterKey("acme", "other", 1), _weights(store, base, "other")) == 2  # keeps r_cap 16
    small = _weights(store, base, "small")
    last = list(base.lora_layers)[-1]
    layer = base.lora_layers[last]
    bad = (torch.zeros(R_MAX + 1, layer.in_features), torch.zeros(layer.out_features, R_MAX + 1))
    broken = dataclasses.replace(small, modules={**small.modules, last: bad})
    with pytest.raises(ValueError, match="exceeds max_lora_rank"):
        slots.install(AdapterKey("acme", "broken", 1), broken)  # evicts "big", the least recently used
    assert AdapterKey("acme", "big", 1) not in slots
    for name, m in base.lora_layers.items():
        assert m.slot_ranks[1] == 0, name
        assert not m.lora_at[1].any() and not m.lora_bt[1].any(), name
        _check_zero_padding(m)


def test_on_cpu_the_rank_capacity_is_aligned_to_the_native_kernels_token_blocks() -> None:
    """A CPU module pads r_cap up to the next rank the native LoRA takes a run of tokens at a time
    (8, 16, 32, 48, 64): at r_cap 12 its token-by-token path was 7-25x slower on prompt chunks, and the
    torch kernels it was traded for made a request's text depend on its neighbours. Zeros only: the
    adapter's numbers are unchanged."""
    assert [aligned_rank(r) for r in (0, 1, 4, 8, 9, 12, 16, 17, 24, 33, 40, 48, 64, 65, 128)] == [
        0, 8, 8, 8, 16, 16, 16, 32, 32, 48, 48, 48, 64, 65, 128,
    ]  # fmt: skip
    m = _module(align=True)
    g = torch.Generator().manual_seed(9)
    twelve = _pair(12, g)
    m.write_slot(1, *twelve)
    assert (m.rank_capacity, m.slot_ranks[1], m.slot_memory_bytes()) == (16, 12, _bytes(SLOTS, 16))
    _check_zero_padding(m)
    m.write_slot(2, *_pair(20, g))
    assert m.rank_capacity == 32
    m.clear_slot(2)  # back to what the rank-12 adapter needs
    assert m.rank_capacity == 16
    x = torch.randn(3, D_IN, generator=g)
    batch = LoraBatch.build(torch.tensor([1, 0, 1]), torch.float32, "gather")
    got = lora_delta(x, batch, m.slot_ranks, m.lora_a, m.lora_bt)
    torch.testing.assert_close(got, _expected(x, torch.tensor([1, 0, 1]), {1: twelve}), rtol=1e-5, atol=1e-5)
    assert (
        MultiLoRALinear(
            nn.Linear(D_IN, D_OUT), D_IN, D_OUT, 2, R_MAX, LoraContext(), torch.float32, torch.device("meta")
        ).align_ranks
        is False
    )  # off CPU (CUDA): exact, no native kernel to align for
