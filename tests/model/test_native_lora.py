"""The native multi-LoRA (model/native.py, csrc/lora.c) against a float64 reference.

Built here with the machine's C compiler, as the server builds it. Where the CPU has AVX-512 BF16,
bf16 modules with d_out % 16 == 0 and r_cap 8/16/32/48/64 take its vector path; the other shapes
below (r_cap 4 and 12, d_out 40, fp32) take the portable C path.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lorafleet_server.model import native
from lorafleet_server.model.lora import LoraBatch, LoraContext, MultiLoRALinear
from lorafleet_server.model.native import (
    NativeKernelError,
    NativeLora,
    choose_lora,
    find_compiler,
    load_native_pool,
)

CPU = torch.device("cpu")
SLOTS = 6

pytestmark = pytest.mark.skipif(find_compiler() is None, reason="no C compiler on this machine")


@pytest.fixture
def kernel(native_lora: NativeLora | None) -> NativeLora:
    assert native_lora is not None
    return native_lora


def _module(
    d_in: int, d_out: int, ranks: dict[int, int], dtype: torch.dtype, seed: int = 0, align: bool = False
) -> MultiLoRALinear:
    """A module whose slots hold random adapters of the given ranks (r_cap = the largest, exactly unless
    ``align``: the kernel's every path is tested on the shapes it may be given)."""
    m = MultiLoRALinear(
        nn.Linear(d_in, d_out, bias=False), d_in, d_out, SLOTS, 64, LoraContext(), dtype, CPU, align_ranks=align
    )
    g = torch.Generator().manual_seed(seed)
    for slot, r in ranks.items():
        m.write_slot(slot, torch.randn(r, d_in, generator=g) * 0.1, torch.randn(d_out, r, generator=g) * 0.1)
    return m


def _reference(y: torch.Tensor, x: torch.Tensor, m: MultiLoRALinear, slots: torch.Tensor) -> torch.Tensor:
    """y + each token's adapter in float64, from the module's stored (already rounded) weights."""
    a = m.lora_at.double()[slots]  # [N, in, r_cap]
    bt = m.lora_bt.double()[slots]  # [N, r_cap, out]
    return y.double() + torch.einsum("ni,nir,nro->no", x.double(), a, bt)


SHAPES = [  # (d_in, d_out, ranks per slot)
    (576, 576, {1: 8, 2: 8, 3: 8}),  # PEFT's default on SmolLM2's q_proj
    (576, 192, {1: 8, 2: 4, 4: 8}),  # k/v, a smaller rank padded to 8
    (576, 1536, {1: 16, 2: 16, 3: 8}),  # gate/up r=16
    (1536, 576, {1: 32, 3: 16}),
    (64, 48, {1: 48, 5: 20}),
    (37, 64, {1: 64, 2: 1}),  # d_in not a multiple of 16
    (64, 64, {1: 4, 2: 2}),  # r_cap 4: portable path
    (48, 40, {1: 8, 2: 8}),  # d_out 40: portable path
    (64, 32, {1: 12, 2: 5}),  # r_cap 12: portable path
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize(("d_in", "d_out", "ranks"), SHAPES)
def test_native_lora_adds_each_tokens_own_adapter(
    kernel: NativeLora, dtype: torch.dtype, d_in: int, d_out: int, ranks: dict[int, int]
) -> None:
    m = _module(d_in, d_out, ranks, dtype)
    g = torch.Generator().manual_seed(1)
    n = 40
    # slot 0 (base), loaded slots, and a free slot (rank 0 here: its adapter does not target the module)
    slots = torch.tensor([(0, 1, 2, 3, 4, 5)[i % 6] for i in range(n)])
    x = torch.randn(n, d_in, generator=g).to(dtype)
    y = torch.randn(n, d_out, generator=g).to(dtype)
    before = y.clone()
    kernel.add_(y, x, m.lora_at, m.lora_bt, slots, m.slot_rank_t)
    want = _reference(before, x, m, slots)
    # fp32 sums, one rounding of y + delta to the element type
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol)
    untouched = torch.tensor([int(s) == 0 or m.slot_ranks[int(s)] == 0 for s in slots])
    assert untouched.any() and torch.equal(y[untouched], before[untouched])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_a_token_gets_the_same_bits_alone_and_among_others(kernel: NativeLora, dtype: torch.dtype) -> None:
    m = _module(576, 576, {1: 8, 2: 16, 3: 4}, dtype)
    g = torch.Generator().manual_seed(2)
    slots = torch.tensor([1, 2, 3, 1, 0, 2, 3, 3])
    x = torch.randn(8, 576, generator=g).to(dtype)
    y0 = torch.randn(8, 576, generator=g).to(dtype)
    together = y0.clone()
    kernel.add_(together, x, m.lora_at, m.lora_bt, slots, m.slot_rank_t)
    for i in range(8):
        alone = y0[i : i + 1].clone()
        kernel.add_(alone, x[i : i + 1].contiguous(), m.lora_at, m.lora_bt, slots[i : i + 1], m.slot_rank_t)
        assert torch.equal(alone[0], together[i]), i


def _runs(lengths: list[tuple[int, int]]) -> torch.Tensor:
    """Slots [N] from (slot, run length) pairs: a step's prompt chunks, each one slot's run of tokens."""
    return torch.cat([torch.full((n,), slot, dtype=torch.long) for slot, n in lengths])


RUNS = [(1, 13), (2, 1), (3, 2), (0, 3), (1, 7), (4, 5), (2, 9), (3, 8), (1, 1), (2, 17), (5, 4), (3, 3)]
RUN_SHAPES = [  # (d_in, d_out, ranks per slot): r_cap 8 to 64, tails of d_in (mod 4, 16) and d_out (mod 32)
    (576, 576, {1: 8, 2: 4, 3: 8}),
    (37, 48, {1: 8, 2: 8, 3: 3}),
    (576, 576, {1: 16, 2: 8, 3: 16}),
    (1536, 576, {1: 16, 2: 16, 3: 4}),
    (38, 48, {1: 32, 2: 20, 3: 32}),
    (37, 80, {1: 48, 2: 48, 3: 1}),
    (65, 16, {1: 64, 2: 33, 3: 64}),
    (37, 44, {1: 24, 2: 8, 3: 24}),  # fp32 blocks of 8 columns; d_out 44: 8-wide chunks and 4 one by one
    (50, 44, {1: 16, 2: 16, 3: 5}),  # fp32 blocks of 16 columns; d_out 44: 16-, 8- and 1-wide outputs
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize(("d_in", "d_out", "ranks"), RUN_SHAPES)
def test_prompt_chunks_of_one_slot_get_their_adapter_and_the_bits_of_a_token_alone(
    kernel: NativeLora, dtype: torch.dtype, d_in: int, d_out: int, ranks: dict[int, int]
) -> None:
    """A prompt chunk is a run of tokens of one slot, which the AVX-512 path takes several at a time:
    the reference's numbers, and each token's bits those it gets on its own (runs of 1 to 17 tokens,
    of the base, of a slot the adapter does not target, of ranks below r_cap)."""
    m = _module(d_in, d_out, ranks, dtype, seed=7)
    g = torch.Generator().manual_seed(8)
    slots = _runs(RUNS)
    n = len(slots)
    x = torch.randn(n, d_in, generator=g).to(dtype)
    y0 = torch.randn(n, d_out, generator=g).to(dtype)
    together = y0.clone()
    kernel.add_(together, x, m.lora_at, m.lora_bt, slots, m.slot_rank_t)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(together.double(), _reference(y0, x, m, slots), rtol=tol, atol=tol)
    for i in range(n):
        alone = y0[i : i + 1].clone()
        kernel.add_(alone, x[i : i + 1].contiguous(), m.lora_at, m.lora_bt, slots[i : i + 1], m.slot_rank_t)
        assert torch.equal(alone[0], together[i]), i
    untouched = torch.tensor([int(s) == 0 or m.slot_ranks[int(s)] == 0 for s in slots])
    assert untouched.any() and torch.equal(together[untouched], y0[untouched])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("r_cap", [8, 16, 24, 32])
def test_blocks_add_a_tokens_partial_sums_in_its_own_order(kernel: NativeLora, r_cap: int, dtype: torch.dtype) -> None:
    """Random inputs rarely show the order of a token's fp32 sums through its bf16 output. Here every
    row of A is the same and x is +2^20 on rows 0 mod 4 and -2^20 on rows 2 mod 4 of the first 64
    (or the other way round), small and random on every other row, the tail past the last multiple
    of 16 included: partial sums 0 and 2 are huge and cancel, 1 and 3 are small, so adding them in
    another order, or a tail row into another partial sum, changes the output's bits."""
    d_in, d_out = 130, 32
    m = _module(d_in, d_out, {1: r_cap, 2: r_cap}, dtype, seed=9)
    g = torch.Generator().manual_seed(10)
    with torch.no_grad():
        m.lora_at[1:3] = m.lora_at[1:3, :1].clone()  # [2, in, r_cap]: every row that of row 0
    big = torch.zeros(d_in)  # [in]
    big[:64] = torch.tensor([1.0, 0.0, -1.0, 0.0]).repeat(16) * 2.0**20
    small = torch.randn(n_tokens := 17, d_in, generator=g) * (big == 0)  # [N, in]
    slots = _runs([(1, 8), (2, 3), (1, 5), (2, 1)])
    n = len(slots)
    assert n == n_tokens
    signs = torch.where(torch.rand(n, 1, generator=g) < 0.5, -1.0, 1.0)  # [N, 1]
    x = (big * signs + small).to(dtype)  # [N, in]
    y0 = torch.zeros(n, d_out, dtype=dtype)
    together = y0.clone()
    kernel.add_(together, x, m.lora_at, m.lora_bt, slots, m.slot_rank_t)
    for i in range(n):
        alone = y0[i : i + 1].clone()
        kernel.add_(alone, x[i : i + 1].contiguous(), m.lora_at, m.lora_bt, slots[i : i + 1], m.slot_rank_t)
        assert torch.equal(alone[0], together[i]), i


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.usefixtures("openmp_compiler")
def test_a_call_split_over_the_steps_threads_gives_the_same_bits(
    kernel: NativeLora, dtype: torch.dtype, torch_threads_kept: None
) -> None:
    """The tokens are cut into one range per thread of the caller's torch (OpenMP) team; a token's sums
    do not depend on which thread ran it."""
    assert kernel.threaded  # a compiler with OpenMP builds it so
    m = _module(576, 1536, {1: 16, 2: 8, 3: 16, 4: 4}, dtype)
    g = torch.Generator().manual_seed(4)
    slots = torch.cat([torch.tensor([(1, 2, 3, 4, 0)[i % 5] for i in range(37)]), _runs(RUNS)])  # decode, chunks
    x = torch.randn(len(slots), 576, generator=g).to(dtype)
    y0 = torch.randn(len(slots), 1536, generator=g).to(dtype)
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        y = y0.clone()
        kernel.add_(y, x, m.lora_at, m.lora_bt, slots, m.slot_rank_t)
        results.append(y)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
    assert not torch.equal(results[0], y0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_a_call_on_the_helper_pool_gives_the_same_bits(kernel: NativeLora, dtype: torch.dtype) -> None:
    """On a helper pool (the native bf16 Linear's) the tokens are cut into ranges the caller and the helpers
    take as they come: the one-thread bits, for any thread count."""
    m = _module(576, 1536, {1: 16, 2: 8, 3: 16, 4: 4}, dtype)
    g = torch.Generator().manual_seed(6)
    slots = torch.cat([torch.tensor([(1, 2, 3, 4, 0)[i % 5] for i in range(37)]), _runs(RUNS)])  # decode, chunks
    x = torch.randn(len(slots), 576, generator=g).to(dtype)
    y0 = torch.randn(len(slots), 1536, generator=g).to(dtype)
    alone = y0.clone()
    NativeLora(kernel.library).add_(alone, x, m.lora_at, m.lora_bt, slots, m.slot_rank_t)
    assert not torch.equal(alone, y0)
    for threads in (2, 3, 8):
        pooled = NativeLora(kernel.library, load_native_pool(kernel.library.parent, threads))
        for _ in range(3):
            y = y0.clone()
            pooled.add_(y, x, m.lora_at, m.lora_bt, slots, m.slot_rank_t)
            assert torch.equal(y, alone), threads


def test_choose_lora_names_the_threads_it_runs_on(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    pool = load_native_pool(tmp_path, threads=2)
    pooled = choose_lora("auto", cache_dir=tmp_path, device=CPU, pool=pool)
    assert (
        pooled.kernel is not None and pooled.kernel.pool is pool and "2 threads of the Linears' pool" in pooled.reason
    )
    request.getfixturevalue("openmp_compiler")  # without a pool: torch's OpenMP threads, where it builds
    plain = choose_lora("auto", cache_dir=tmp_path, device=CPU)
    assert plain.kernel is not None and plain.kernel.pool is None and "torch threads" in plain.reason


def test_without_openmp_the_kernel_runs_on_the_calling_thread(
    kernel: NativeLora, tmp_path: Path, torch_threads_kept: None
) -> None:
    """Built without OpenMP the kernel gives the OpenMP build's bits (a token's sums do not depend on the
    thread that runs them), within fp32's tolerance of the float64 reference."""
    plain = native.load_native_lora(tmp_path, openmp=False)
    assert not plain.threaded
    m = _module(64, 48, {1: 8, 2: 8}, torch.float32)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 64, generator=g)
    slots = torch.tensor([1, 2] * 8)
    torch.set_num_threads(2)
    y, threaded = torch.zeros(16, 48), torch.zeros(16, 48)
    plain.add_(y, x, m.lora_at, m.lora_bt, slots, m.slot_rank_t)
    kernel.add_(threaded, x, m.lora_at, m.lora_bt, slots, m.slot_rank_t)
    assert torch.equal(y, threaded)
    torch.testing.assert_close(y.double(), _reference(torch.zeros(16, 48), x, m, slots), rtol=1e-5, atol=1e-5)


def test_an_openmp_build_that_fails_falls_back_to_one_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A compiler without OpenMP (clang without libomp): the library is built without it, not refused."""
    monkeypatch.setattr(native, "OPENMP_CFLAGS", (*native.CFLAGS, "-fno-such-flag-for-the-test"))
    kernel = native.load_native_lora(tmp_path)
    assert not kernel.threaded
    choice = choose_lora("auto", cache_dir=tmp_path, device=CPU)
    assert choice.kernel is not None and "one thread per call" in choice.reason


def test_out_of_range_slots_and_ranks_are_refused_and_nothing_is_written(kernel: NativeLora) -> None:
    m = _module(32, 32, {1: 8}, torch.float32)
    x, y = torch.randn(2, 32), torch.randn(2, 32)
    before = y.clone()
    for slots, ranks in [
        (torch.tensor([1, SLOTS]), m.slot_rank_t),
        (torch.tensor([1, -1]), m.slot_rank_t),
        (torch.tensor([1, 1]), torch.tensor([0, 9, 0, 0, 0, 0])),  # a rank past r_cap
        (torch.tensor([1, 1]), torch.tensor([0, -1, 0, 0, 0, 0])),
    ]:
        with pytest.raises(NativeKernelError, match="refused its arguments"):
            kernel.add_(y, x, m.lora_at, m.lora_bt, slots, ranks)
        assert torch.equal(y, before)
    with pytest.raises(NativeKernelError, match="shape or dtype"):
        kernel.add_(y, torch.randn(2, 31), m.lora_at, m.lora_bt, torch.tensor([1, 1]), m.slot_rank_t)
    with pytest.raises(NativeKernelError, match="int64"):
        kernel.add_(y, x, m.lora_at, m.lora_bt, torch.tensor([1, 1], dtype=torch.int32), m.slot_rank_t)
    # The caller's takes() check, repeated in add_ (an outside review): x was read as dense fp32.
    for bad_x in (torch.randn(32, 2).t(), x.to(torch.bfloat16)):
        with pytest.raises(NativeKernelError, match="contiguous CPU fp32 or bf16 tensors of one dtype"):
            kernel.add_(y, bad_x, m.lora_at, m.lora_bt, torch.tensor([1, 1]), m.slot_rank_t)
    with pytest.raises(NativeKernelError, match="CPU tensors only"):  # a meta tensor's address is 0
        kernel.add_(y, x, m.lora_at.to("meta"), m.lora_bt, torch.tensor([1, 1]), m.slot_rank_t)
    assert torch.equal(y, before)


def test_the_module_runs_the_kernel_where_auto_prefers_it(kernel: NativeLora) -> None:
    """MultiLoRALinear: ``auto`` with the kernel, ``native``, and the torch kernels give the same rows."""
    m = _module(64, 64, {1: 8, 2: 8}, torch.float32)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(3))
    slots = torch.tensor([1, 0, 2, 2, 1])
    outs = {}
    for impl, nat in (("gather", None), ("auto", kernel), ("native", kernel)):
        m.context.batch = LoraBatch.build(slots, torch.float32, impl, nat)  # type: ignore[arg-type]
        outs[impl] = m(x)
    torch.testing.assert_close(outs["auto"], outs["gather"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs["native"], outs["gather"], rtol=1e-5, atol=1e-5)
    for r_cap in (8, 16, 24, 64):  # fp32 prompt chunks: the portable path's blocks, any CPU
        assert kernel.blocks(torch.float32, 40, r_cap)
    assert not kernel.blocks(torch.float32, 64, 12)  # r_cap 12: token by token
    assert not kernel.blocks(torch.bfloat16, 576, 12)  # r_cap 12: the portable path
    assert not kernel.blocks(torch.bfloat16, 40, 16)  # d_out 40: the portable path
    with pytest.raises(ValueError, match="needs the native kernel"):
        LoraBatch.build(slots, torch.float32, "native", None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("ranks", [{1: 4, 2: 12}, {1: 8, 2: 8}, {1: 24}], ids=["r4+r12", "r8", "r24"])
def test_auto_gives_a_token_the_same_bits_alone_and_in_any_step(
    kernel: NativeLora, dtype: torch.dtype, ranks: dict[int, int]
) -> None:
    """Found by an outside review: ``auto`` ran the native kernel for steps of up to 64 tokens and a
    torch kernel for longer ones at ranks without token blocks, so a token's LoRA (and the request's
    greedy text) changed with its neighbours and after a preemption's recompute. Now every call takes
    the kernel, and CPU modules align r_cap to its token blocks (r=4 and 12 run as 8 and 16)."""
    m = _module(576, 192, ranks, dtype, align=True)
    assert kernel.blocks(dtype, 192, m.rank_capacity)
    torch.nn.init.zeros_(m.base.weight)  # the LoRA alone (torch's own Linear varies with the rows: not ours)
    m.base.to(dtype)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(200, 576, generator=g).to(dtype)  # [N, in]
    first = next(iter(ranks))
    chunks = [s for s in ranks for _ in range(70)]
    slots = torch.tensor([first, *chunks, *[0] * (199 - len(chunks))])  # [N]: a decode token, chunks, base rows

    def run(rows: slice) -> torch.Tensor:
        m.context.batch = LoraBatch.build(slots[rows], dtype, "auto", kernel)  # type: ignore[arg-type]
        return m(x[rows])

    with torch.inference_mode():
        alone = run(slice(0, 1))  # a decode token of its own
        with_others = run(slice(0, 200))  # the same token first in a 200-token step of prompt chunks
        assert alone.abs().sum() > 0 and torch.equal(with_others[:1], alone)
        assert torch.equal(run(slice(1, 71))[-1:], with_others[70:71])  # a chunk's last token, alone vs mixed
        assert torch.equal(run(slice(70, 71)), with_others[70:71])  # ...and as a decode token


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("d_in", [576, 582, 44])  # past the last multiple of 16, and of 4
@pytest.mark.parametrize("tokens", [1, 70], ids=["decode", "chunk"])
def test_an_adapters_bits_do_not_change_when_a_larger_one_is_loaded_beside_it(
    kernel: NativeLora, dtype: torch.dtype, d_in: int, tokens: int
) -> None:
    """Found by an outside review: in bf16 the r_cap-8 path added its four partial sums in another
    order than the r_cap-16 path, so an r=8 adapter's numbers (and greedy text: 2 of 6 prompts on
    SmolLM2) changed once an r=16 adapter was loaded into another slot. r_cap 8 now sums as 16 does."""
    m = _module(d_in, 192, {1: 8}, dtype, align=True)
    torch.nn.init.zeros_(m.base.weight)  # the LoRA alone
    m.base.to(dtype)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(tokens, d_in, generator=g).to(dtype)  # [N, in]
    slots = torch.ones(tokens, dtype=torch.long)  # [N]

    def delta() -> torch.Tensor:
        m.context.batch = LoraBatch.build(slots, dtype, "auto", kernel)  # type: ignore[arg-type]
        with torch.inference_mode():
            return m(x).clone()

    alone = delta()
    for r in (16, 40, 64):  # r_cap 16, 48, 64
        m.write_slot(2, torch.randn(r, d_in, generator=g) * 0.1, torch.randn(192, r, generator=g) * 0.1)
        assert torch.equal(delta(), alone), m.rank_capacity


def test_choose_lora_builds_falls_back_or_refuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert choose_lora("auto", cache_dir=tmp_path, device=CPU).name == "native"
    assert choose_lora("token", cache_dir=tmp_path, device=CPU).kernel is None
    gpu = choose_lora("auto", cache_dir=tmp_path, device=torch.device("cuda"))
    assert gpu.kernel is None and "cuda" in gpu.reason
    with pytest.raises(NativeKernelError, match="CPU"):
        choose_lora("native", cache_dir=tmp_path, device=torch.device("cuda"))
    with pytest.raises(NativeKernelError, match="not-there' is not found"):
        choose_lora("native", cache_dir=tmp_path / "fresh", device=CPU, compiler=str(tmp_path / "not-there"))
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    fallback = choose_lora("auto", cache_dir=tmp_path / "fresh", device=CPU)
    assert fallback.kernel is None and "no C compiler" in fallback.reason
    with pytest.raises(NativeKernelError, match="no C compiler"):
        choose_lora("native", cache_dir=tmp_path / "fresh", device=CPU)
