"""The native layer driver (model/native_layers.py, csrc/layers.c) against the runner's own layer loop.

The driver makes the loop's kernel calls from C, so every step it takes must give the loop's numbers
bit for bit: logits and the K/V it writes. Checked on a random 3-layer Llama with adapters of several
ranks in its slots, in fp32 (the AVX2 Linear: every machine here) and in bf16 (the AMX Linear where
the CPU has AMX, and the AVX-512 BF16 one where it has avx512_bf16; on the helper pool and without),
through prompt chunks, decode steps with and without adapters, a lone token, long prompt chunks of the
base and of an adapter the native LoRA takes in token blocks (which it takes) and one whose adapter's
rank the native LoRA does not take on long steps (which it leaves to the loop), and a slot table that
grows between steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lorafleet_server.model.loader import wrap_targets
from lorafleet_server.model.lora import LoraContext, MultiLoRALinear
from lorafleet_server.model.native import (
    NativeKernelError,
    find_compiler,
    load_native_attention,
    load_native_lora,
)
from lorafleet_server.model.native_layers import (
    PROJECTIONS,
    SHORT_STEP_TOKENS,
    NativeLayers,
    choose_layers,
    load_native_layers,
)
from lorafleet_server.model.options import LinearKernel, LoraImpl
from lorafleet_server.model.packed import NativeLinearModule, pack_base
from lorafleet_server.model.runner import ModelRunner, RowStep

pytestmark = pytest.mark.skipif(find_compiler() is None, reason="no C compiler on this machine")

CPU = torch.device("cpu")
SLOTS = 5
ROWS = 4


@pytest.fixture(scope="module")
def kernels_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kernels")


@pytest.fixture(scope="module")
def layers_lib(kernels_dir: Path) -> NativeLayers:
    return load_native_layers(kernels_dir)


def _model(dtype: torch.dtype) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval().to(dtype)


def _write(wrapped: dict[str, MultiLoRALinear], slot: int, rank: int, only: tuple[str, ...] = ()) -> None:
    """A random adapter of ``rank`` in ``slot`` on every module (or those whose name ends in ``only``)."""
    g = torch.Generator().manual_seed(slot * 100 + rank)
    for name, m in wrapped.items():
        if only and not name.endswith(only):
            m.write_slot(slot, None, None)
            continue
        a = torch.randn(rank, m.in_features, generator=g) * 0.2
        b = torch.randn(m.out_features, rank, generator=g) * 0.2
        m.write_slot(slot, a, b)


def _runner(
    dtype: torch.dtype,
    kernels_dir: Path,
    layers: NativeLayers | None,
    threads: int,
    lora_impl: LoraImpl = "auto",
    linear_kernel: LinearKernel = "native",
) -> tuple[ModelRunner, dict[str, MultiLoRALinear]]:
    model = _model(dtype)
    context = LoraContext()
    wrapped = wrap_targets(model, SLOTS, 64, context, dtype, CPU)
    try:
        linear = pack_base(
            model,
            list(wrapped.values()),
            linear_kernel,
            eligible=None,
            cache_dir=kernels_dir,
            dtype=dtype,
            threads=threads,
        )
    except NativeKernelError as exc:
        pytest.skip(f"no {linear_kernel} Linear for {dtype} on this CPU: {exc}")
    attention = load_native_attention(kernels_dir, pool=linear.pool)
    lora = load_native_lora(kernels_dir, pool=linear.pool)
    _write(wrapped, 1, 8)
    _write(wrapped, 2, 8, only=("q_proj", "v_proj"))
    _write(wrapped, 3, 2, only=("down_proj", "o_proj", "gate_proj"))
    runner = ModelRunner(
        model,
        context,
        rows=ROWS,
        max_seq_len=256,
        dtype=dtype,
        device=CPU,
        native_attention=attention,
        native_lora=lora,
        native_layers=layers,
        lora_impl=lora_impl,
    )
    return runner, wrapped


def _steps() -> tuple[list[list[RowStep]], dict[int, int]]:
    """Prompt chunks, then mixed decode steps: adapters of several ranks, a base-only row, a lone
    token, a step of base rows only, and one longer than the driver takes."""
    prompts = {0: (1, [5, 17, 33, 9, 100, 2, 7]), 1: (2, [11, 12, 13]), 2: (0, list(range(40, 60))), 3: (3, [8, 9])}
    length = {row: 0 for row in prompts}
    steps: list[list[RowStep]] = []

    def step(*rows: tuple[int, list[int], int]) -> None:  # (KV row, tokens, slot)
        steps.append([RowStep(row, length[row], tuple(ids), slot, True, False) for row, ids, slot in rows])
        for row, ids, _ in rows:
            length[row] += len(ids)

    step(*((row, ids, slot) for row, (slot, ids) in prompts.items()))
    for i in range(4):
        step(*((row, [60 + i + row], slot) for row, (slot, _) in prompts.items()))
    step((1, [70], 2))  # a lone token (runs as two rows)
    step((0, [71], 0), (2, [71], 0))  # no adapter in the step
    step((3, list(range(100, 100 + SHORT_STEP_TOKENS + 5)), 0))  # a long prompt chunk of the base
    # a long chunk of an adapter (rank 8 = r_cap on every module): the native LoRA's token blocks
    step((0, list(range(200, 200 + SHORT_STEP_TOKENS + 5)), 1))
    step((0, [72], 4), (1, [73], 1), (2, [74], 2), (3, [75], 3))  # after slot 4's larger rank (below)
    # a long chunk of rank 12 (r_cap aligned to 16: token blocks again)
    step((2, list(range(150, 150 + SHORT_STEP_TOKENS + 5)), 4))
    return steps, length


CASES = [  # bf16 "native": AMX where the CPU has it, else AVX-512 BF16; "avx512": that one everywhere it runs
    pytest.param(torch.float32, 1, "auto", "native", id="fp32-avx2"),
    pytest.param(torch.float32, 1, "native", "native", id="fp32-avx2-lora-native"),
    pytest.param(torch.bfloat16, 1, "auto", "native", id="bf16-native"),
    pytest.param(torch.bfloat16, 2, "auto", "native", id="bf16-native-pool"),
    pytest.param(torch.bfloat16, 1, "auto", "avx512", id="bf16-avx512"),
    pytest.param(torch.bfloat16, 2, "auto", "avx512", id="bf16-avx512-pool"),
]


@pytest.mark.parametrize(("dtype", "threads", "lora_impl", "linear_kernel"), CASES)
def test_every_step_it_takes_gives_the_loops_bits(
    dtype: torch.dtype,
    threads: int,
    lora_impl: LoraImpl,
    linear_kernel: LinearKernel,
    kernels_dir: Path,
    layers_lib: NativeLayers,
    torch_threads_kept: None,
) -> None:
    loop, loop_slots = _runner(dtype, kernels_dir, None, threads, lora_impl, linear_kernel)
    fast, fast_slots = _runner(dtype, kernels_dir, layers_lib, threads, lora_impl, linear_kernel)
    assert loop.layer_driver is None
    driver = fast.layer_driver
    assert driver is not None, fast.layer_driver_reason
    ran: list[int] = []
    real_run = driver.run

    def counted(*args: object, **kwargs: object) -> bool:
        done = real_run(*args, **kwargs)  # type: ignore[arg-type]
        ran.append(int(done))
        return done

    driver.run = counted  # type: ignore[method-assign]
    torch.set_num_threads(2)
    steps, length = _steps()
    for i, step in enumerate(steps):
        if i == 9:  # a larger rank than any before: every slot table grows (new addresses) between steps
            _write(loop_slots, 4, 12)
            _write(fast_slots, 4, 12)
        want, got = loop.step(step).logits, fast.step(step).logits
        assert torch.equal(got, want), f"step {i}: {(got - want).abs().max().item()}"
    # the driver took every step: the native LoRA takes every call, --lora-impl auto or native
    assert ran == [1] * 11 and len(steps) == 11
    for a, b in zip((*loop.kv.k, *loop.kv.v), (*fast.kv.k, *fast.kv.v), strict=True):  # [R, KVH, L, D]
        for row, n in length.items():
            assert torch.equal(a[row, :, :n], b[row, :, :n])


@pytest.mark.parametrize(
    ("dtype", "threads"), [(torch.float32, 1), (torch.bfloat16, 2)], ids=["fp32-avx2", "bf16-native-pool"]
)
def test_reused_logits_are_the_native_heads_output_in_one_buffer(
    dtype: torch.dtype, threads: int, kernels_dir: Path, layers_lib: NativeLayers, torch_threads_kept: None
) -> None:
    """The engine's steps (``reuse_logits``): the native LM head writes into the runner's one buffer in
    the compute dtype, the fresh fp32 logits widened from it, and ``greedy_tokens`` (the native argmax)
    picks their ``max(-1).indices``."""
    fresh, _ = _runner(dtype, kernels_dir, layers_lib, threads)
    reusing, _ = _runner(dtype, kernels_dir, layers_lib, threads)
    assert isinstance(reusing.model.lm_head, NativeLinearModule)
    torch.set_num_threads(2)
    storage = set()
    for step in _steps()[0]:
        want = fresh.step(step).logits  # [rows, vocab] fp32
        got = reusing.step(step, reuse_logits=True).logits
        assert got.dtype == dtype and torch.equal(got.float(), want)
        assert reusing.greedy_tokens(got) == want.max(-1).indices.tolist()
        storage.add(got.untyped_storage().data_ptr())
    assert len(storage) == 1, "a step's logits were not written into the runner's buffer"


def test_a_slot_write_after_a_step_is_seen_by_the_next(
    kernels_dir: Path, layers_lib: NativeLayers, torch_threads_kept: None
) -> None:
    """Writing a slot of the same rank reuses the tables (same addresses); the next step reads it."""
    runner, wrapped = _runner(torch.float32, kernels_dir, layers_lib, 1)
    step = [RowStep(0, 0, (5, 6, 7), 1, True, False)]
    before = runner.step(step).logits
    _write(wrapped, 1, 8, only=("q_proj",))  # same rank on q; nothing elsewhere
    after = runner.step(step).logits
    runner.layer_driver = None
    assert torch.equal(runner.step(step).logits, after) and not torch.equal(before, after)


def test_where_a_layer_is_not_native_the_loop_runs_and_says_why(kernels_dir: Path, layers_lib: NativeLayers) -> None:
    model = _model(torch.float32)
    context = LoraContext()
    wrap_targets(model, SLOTS, 64, context, torch.float32, CPU)  # torch's Linears under the wrappers
    attention = load_native_attention(kernels_dir)
    lora = load_native_lora(kernels_dir)

    def reason(**kernels: Any) -> str:
        runner = ModelRunner(
            model, context, rows=2, max_seq_len=32, dtype=torch.float32, device=CPU, native_layers=layers_lib, **kernels
        )
        assert runner.layer_driver is None
        return runner.layer_driver_reason

    assert "not a native Linear" in reason(native_attention=attention, native_lora=lora)
    assert "torch's attention" in reason()
    assert "multi-LoRA" in reason(native_attention=attention, lora_impl="gather")


def test_choose_layers_builds_falls_back_or_refuses(kernels_dir: Path, layers_lib: NativeLayers) -> None:
    attention = load_native_attention(kernels_dir)
    lora = load_native_lora(kernels_dir)
    assert choose_layers("python", cache_dir=kernels_dir, attention=attention, lora=lora).kernel is None
    chosen = choose_layers("auto", cache_dir=kernels_dir, attention=attention, lora=lora)
    assert chosen.name == "native" and chosen.kernel is not None
    without = choose_layers("auto", cache_dir=kernels_dir, attention=None, lora=lora)
    assert without.kernel is None and "torch's attention" in without.reason
    with pytest.raises(NativeKernelError, match="needs the native attention and multi-LoRA"):
        choose_layers("native", cache_dir=kernels_dir, attention=attention, lora=None)


def test_a_call_the_kernels_refuse_names_its_layer_and_projection(
    kernels_dir: Path, layers_lib: NativeLayers, torch_threads_kept: None
) -> None:
    """The driver's return code (layer * 32 + op + 1, csrc/layers.c) decoded into the error: a table
    entry broken after the driver built it (the shapes it checks when built cannot be wrong otherwise)
    makes that layer's Linear, or its LoRA, refuse the call."""
    runner, _ = _runner(torch.float32, kernels_dir, layers_lib, 1)
    driver = runner.layer_driver
    assert driver is not None, runner.layer_driver_reason
    step = [RowStep(0, 0, (5, 6, 7), 1, True, False)]  # slot 1: rank 8 on every module
    runner.step(step)
    table = driver._layer_table()
    assert table is not None
    o, v = PROJECTIONS.index("o"), PROJECTIONS.index("v")
    d_in, r_cap = table[1].proj[o].d_in, table[2].proj[v].r_cap
    table[1].proj[o].d_in = 0  # no Linear takes an input of width 0
    with pytest.raises(NativeKernelError, match="layer 1's o refused its arguments"):
        runner.step([RowStep(1, 0, (8, 9), 1, True, False)])
    table[1].proj[o].d_in = d_in
    table[2].proj[v].r_cap = 100_000  # past the native LoRA's largest rank
    with pytest.raises(NativeKernelError, match="layer 2's v's LoRA refused its arguments"):
        runner.step([RowStep(2, 0, (8, 9), 1, True, False)])
    table[2].proj[v].r_cap = r_cap
    again = [RowStep(3, 0, (8, 9), 1, True, False)]  # a fresh KV row: whole again, the loop's bits
    loop, _ = _runner(torch.float32, kernels_dir, None, 1)
    assert torch.equal(runner.step(again).logits, loop.step(again).logits)
