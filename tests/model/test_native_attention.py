"""The native decode attention (model/native.py, csrc/attention.c) against torch in fp32.

The kernel is built here with the machine's C compiler for this CPU, as the server builds it: on a
CPU with AVX-512 BF16, bf16 slabs of head_dim 32k take its intrinsics path and the rest the portable
C path, so the shapes below cover both where the CPU has them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from processlib import run_python
from transformers import LlamaConfig, LlamaForCausalLM

from lorafleet_server.model import native
from lorafleet_server.model.cpu import cpu_features
from lorafleet_server.model.lora import LoraContext
from lorafleet_server.model.native import (
    AttentionRows,
    NativeAttention,
    NativeKernelError,
    build_library,
    choose_attention,
    find_compiler,
    load_native_attention,
    load_native_pool,
)
from lorafleet_server.model.runner import ModelRunner, RowStep, rotate_half

CPU = torch.device("cpu")

pytestmark = pytest.mark.skipif(find_compiler() is None, reason="no C compiler on this machine")


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> NativeAttention:
    return load_native_attention(tmp_path_factory.mktemp("kernels"))


@pytest.fixture(scope="module", params=["server", "clang"])
def any_kernel(
    request: pytest.FixtureRequest, kernel: NativeAttention, tmp_path_factory: pytest.TempPathFactory
) -> NativeAttention:
    """The server's build, and a clang build where clang is on the PATH (``CC=clang``): its
    ``-ffp-contract`` and AMX macros differ from GCC's (native.for_compiler, csrc/amx.h)."""
    if request.param == "server":
        return kernel
    clang = shutil.which("clang")
    if clang is None:
        pytest.skip("no clang on this machine")
    return load_native_attention(tmp_path_factory.mktemp("clang-kernels"), compiler=clang)


def reference(
    q: torch.Tensor, k_slab: torch.Tensor, v_slab: torch.Tensor, rows: AttentionRows, scale: float
) -> dict[int, torch.Tensor]:
    """Each decoding row's output in fp32 from the same (already rounded) inputs: token -> [H, D]."""
    heads, kv_heads = q.shape[1], k_slab.shape[1]
    out: dict[int, torch.Tensor] = {}
    for tok, row, n in zip(rows.tok.tolist(), rows.kv_row.tolist(), rows.length.tolist(), strict=True):
        k = k_slab[row, :, :n].float().repeat_interleave(heads // kv_heads, 0)  # [H, n, D]
        v = v_slab[row, :, :n].float().repeat_interleave(heads // kv_heads, 0)
        p = torch.softmax((k @ q[tok].float()[:, :, None])[..., 0] * scale, dim=-1)  # [H, n]
        out[tok] = (p[:, None, :] @ v)[:, 0]  # [H, D]
    return out


def random_case(
    heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, lengths: list[int], seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionRows]:
    """Queries for len(lengths) + 2 tokens (two are not decoding rows), slabs with rows in shuffled
    order and NaN past every row's length (a kernel that read past it would return NaN)."""
    gen = torch.Generator().manual_seed(seed)
    b = len(lengths)
    slab_rows, max_len = b + 3, max(lengths) + 5
    q = torch.randn(b + 2, heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(slab_rows, kv_heads, max_len, head_dim, generator=gen).mul(2).to(dtype)
    v = torch.randn(slab_rows, kv_heads, max_len, head_dim, generator=gen).to(dtype)
    kv_row = torch.randperm(slab_rows, generator=gen)[:b]
    tok = torch.randperm(b + 2, generator=gen)[:b]
    for row, n in zip(kv_row.tolist(), lengths, strict=True):
        k[row, :, n:] = float("nan")
        v[row, :, n:] = float("nan")
    return q, k, v, AttentionRows.of(tok.tolist(), kv_row.tolist(), lengths)


LENGTHS = [1, 2, 15, 16, 17, 31, 32, 33, 48, 100, 300]  # on AMX CPUs rows of 32 keys or more take AMX scores


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim"),
    [(9, 3, 64), (4, 4, 128), (8, 2, 32), (6, 1, 96), (8, 2, 48), (4, 2, 16), (32, 2, 8), (16, 2, 64), (32, 4, 128)],
)
def test_native_matches_fp32_attention_and_writes_only_decoding_rows(
    kernel: NativeAttention, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int
) -> None:
    q, k, v, rows = random_case(heads, kv_heads, head_dim, dtype, LENGTHS)
    out = torch.full_like(q, 7.0)
    scale = head_dim**-0.5
    kernel(q, k, v, out, rows, scale)
    want = reference(q, k, v, rows, scale)
    for tok in range(q.shape[0]):
        if tok in want:
            # bf16: the output is rounded once (2^-9 relative), the sums are fp32 as in the reference
            tol = 1e-2 if dtype == torch.bfloat16 else 2e-5
            torch.testing.assert_close(out[tok].float(), want[tok], rtol=tol, atol=tol)
        else:
            assert (out[tok] == 7.0).all(), "a token that is not a decoding row was written"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_a_row_is_the_same_alone_and_among_others(kernel: NativeAttention, dtype: torch.dtype) -> None:
    """Batch invariance: a row's output, bit for bit, does not depend on the other rows or their lengths."""
    q, k, v, rows = random_case(9, 3, 64, dtype, LENGTHS, seed=1)
    together = torch.zeros_like(q)
    kernel(q, k, v, together, rows, 0.125)
    for i in range(rows.count):
        alone = torch.zeros_like(q)
        one = AttentionRows(rows.tok[i : i + 1], rows.kv_row[i : i + 1], rows.length[i : i + 1])
        kernel(q, k, v, alone, one, 0.125)
        tok = int(rows.tok[i])
        assert torch.equal(alone[tok], together[tok])


@pytest.mark.usefixtures("torch_threads_kept")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize(
    "lengths",
    [[int(n) for n in torch.randint(1, 400, (40,), generator=torch.Generator().manual_seed(3))], [700], [1, 900, 1, 1]],
    ids=["40-rows", "one-row", "one-long-row-among-short"],
)
def test_rows_split_over_threads_give_the_one_thread_numbers(
    kernel: NativeAttention, dtype: torch.dtype, lengths: list[int]
) -> None:
    """A call splits its rows over the step's torch threads (the library is built with OpenMP here);
    every row's output, bit for bit, is the one a single thread computes, however the rows are split."""
    q, k, v, rows = random_case(9, 3, 64, dtype, lengths, seed=4)
    torch.set_num_threads(1)
    alone = torch.zeros_like(q)
    kernel(q, k, v, alone, rows, 0.125)
    for threads in (2, 3, 8):
        torch.set_num_threads(threads)
        split = torch.zeros_like(q)
        kernel(q, k, v, split, rows, 0.125)
        assert torch.equal(split, alone), f"{threads} threads changed the output"
    want = reference(q, k, v, rows, 0.125)
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-5
    for tok, expected in want.items():
        torch.testing.assert_close(alone[tok].float(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize(
    "lengths",
    [[int(n) for n in torch.randint(1, 400, (40,), generator=torch.Generator().manual_seed(5))], [700], [1, 900, 1, 1]],
    ids=["40-rows", "one-row", "one-long-row-among-short"],
)
def test_rows_split_over_the_helper_pool_give_the_one_thread_numbers(
    kernel: NativeAttention, dtype: torch.dtype, lengths: list[int]
) -> None:
    """On a helper pool (the native bf16 Linear's, model/native.py NativePool) a call cuts its rows into ranges
    that the caller and the helpers take as they come: every row's output is the one-thread output,
    bit for bit, for any thread count (more than this machine's CPUs included)."""
    q, k, v, rows = random_case(9, 3, 64, dtype, lengths, seed=6)
    alone = torch.zeros_like(q)
    NativeAttention(kernel.library)(q, k, v, alone, rows, 0.125)
    for threads in (2, 3, 8):
        pooled = NativeAttention(kernel.library, load_native_pool(kernel.library.parent, threads))
        assert pooled.pool is not None and pooled.pool.threads == threads
        for _ in range(3):  # helpers come late or early from one call to the next
            split = torch.zeros_like(q)
            pooled(q, k, v, split, rows, 0.125)
            assert torch.equal(split, alone), f"{threads} pooled threads changed the output"
    assert 1 <= load_native_pool(kernel.library.parent, 2).helpers <= max(1, len(os.sched_getaffinity(0)) - 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("tokens", [1, 7, 40])
def test_the_glue_on_the_helper_pool_gives_the_calling_threads_numbers(
    kernel: NativeAttention, dtype: torch.dtype, tokens: int
) -> None:
    """RoPE + K/V write, residual add + RMSNorm and SiLU times up cut their tokens over the pool: the
    same bits as on the calling thread alone."""
    pooled = NativeAttention(kernel.library, load_native_pool(kernel.library.parent, 2))
    gen = torch.Generator().manual_seed(tokens)
    q = torch.randn(tokens, 9, 64, generator=gen).to(dtype)
    k = torch.randn(tokens, 3, 64, generator=gen).to(dtype)
    v = torch.randn(tokens, 3, 64, generator=gen).to(dtype)
    cos, sin = torch.randn(tokens, 64, generator=gen).to(dtype), torch.randn(tokens, 64, generator=gen).to(dtype)
    kv_row = torch.randint(0, 4, (tokens,), generator=gen)
    pos = torch.randperm(30, generator=gen)[:tokens] if tokens <= 30 else torch.arange(tokens)
    x = torch.randn(tokens, 576, generator=gen).to(dtype)
    delta = torch.randn(tokens, 576, generator=gen).to(dtype)
    w = torch.randn(576, generator=gen).to(dtype)
    gate, up = torch.randn(tokens, 1536, generator=gen).to(dtype), torch.randn(tokens, 1536, generator=gen).to(dtype)
    outs = []
    for each in (kernel, pooled):
        qq = q.clone()
        slabs = torch.zeros(2, 4, 3, 48, 64, dtype=dtype)  # K and V: [rows, KVH, L, D]
        each.rope_kv_(qq, k, v, cos, sin, slabs[0], slabs[1], kv_row, pos)
        xx = x.clone()
        normed = each.add_rmsnorm_(xx, delta, w, 1e-5)
        outs.append((qq, slabs, xx, normed, each.silu_mul(gate, up)))
    for one, two in zip(*outs, strict=True):
        assert torch.equal(one, two)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("cols", [1, 5, 16, 17, 40, 49152])
def test_argmax_rows_is_torchs_max_indices_with_ties_nan_and_infinities(
    kernel: NativeAttention, dtype: torch.dtype, cols: int
) -> None:
    """Greedy decoding's choice read in place: per row the index of ``x.float().max(-1).indices``, the
    first of tied maxima and the first NaN, on the calling thread and on the helper pool."""
    pooled = NativeAttention(kernel.library, load_native_pool(kernel.library.parent, 2))
    gen = torch.Generator().manual_seed(cols)
    for trial in range(20):
        x = torch.randint(-3, 3, (9, cols), generator=gen).float()  # many ties
        if trial % 2:
            x = x + torch.randn(9, cols, generator=gen)
        if trial % 3 == 0:
            x[torch.rand(9, cols, generator=gen) < 0.05] = float("nan")
        x[1] = float("-inf")
        x[2, -1] = float("inf")
        x[3, cols // 2 :] = float("nan")
        x = x.to(dtype)
        want = x.float().max(-1).indices
        for each in (kernel, pooled):
            assert torch.equal(each.argmax_rows(x), want), (trial, each.pool)
    with pytest.raises(NativeKernelError, match="contiguous"):
        kernel.argmax_rows(torch.zeros(4, 6, dtype=dtype).t())
    with pytest.raises(NativeKernelError, match="fp32 or bf16"):
        kernel.argmax_rows(torch.zeros(4, 6, dtype=torch.float64))
    assert kernel.argmax_rows(torch.zeros(0, 6, dtype=dtype)).shape == (0,)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_silu_times_up_matches_transformers(kernel: NativeAttention, dtype: torch.dtype) -> None:
    """``act_fn(gate) * up`` of transformers' Llama MLP (SiLU): in fp32 within a few fp32 ulps; in bf16
    each output is torch's or one bf16 step away (where the SiLU's last fp32 bit rounds differently),
    and almost all are torch's. Gates far out on either side stay finite."""
    gen = torch.Generator().manual_seed(9)
    gate = torch.cat([torch.randn(63, 1536, generator=gen) * 4, torch.linspace(-120, 120, 1536)[None]]).to(dtype)
    up = torch.randn(64, 1536, generator=gen).to(dtype)
    with torch.inference_mode():
        want = (torch.nn.functional.silu(gate) * up).float()
    got = kernel.silu_mul(gate, up)
    assert got.dtype == dtype and got.shape == gate.shape and got.isfinite().all()
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-30)
    else:
        one_step = want.abs() * 2.0**-7 + 1e-30  # bf16 keeps 8 significant bits
        assert ((got.float() - want).abs() <= one_step).all()
        assert (got.float() == want).float().mean() > 0.99
    with pytest.raises(NativeKernelError, match="both fp32 or both bf16"):
        kernel.silu_mul(gate, up.half())
    with pytest.raises(NativeKernelError, match="differ in shape"):
        kernel.silu_mul(gate, up[:, :8].contiguous())


@pytest.mark.skipif(
    "avx512_bf16" not in cpu_features().flags,
    reason="without AVX-512 BF16 every column takes the one scalar loop: no lane split to depend on the batch",
)
@pytest.mark.parametrize("threads", [1, 2])
def test_bf16_silu_times_up_of_a_row_is_the_same_alone_and_in_any_batch(kernel: NativeAttention, threads: int) -> None:
    """Rows of 24 (16 lanes on the AVX-512 path, 8 on the scalar tail, which differ only for results
    below 2^-126) with gates and ups that make such results: every row's bits are the same alone, in
    batches of any size, on one thread or split over the pool."""
    pool = load_native_pool(kernel.library.parent, threads=2) if threads == 2 else None
    runner = NativeAttention(kernel.library, pool) if pool is not None else kernel
    gen = torch.Generator().manual_seed(13)
    tiny = torch.tensor([2.0**-130, -(2.0**-131), 2.0**-120, 3.0])  # fp32 denormal gates, and a normal one
    gate = tiny[torch.randint(0, 4, (9, 24), generator=gen)].to(torch.bfloat16)  # [9, 24]
    ups = torch.tensor([1.0, -0.75, 2.0**-128, 3 * 2.0**-129])  # with the normal gate: products below 2^-126
    up = ups[torch.randint(0, 4, (9, 24), generator=gen)].to(torch.bfloat16)
    alone = torch.cat([runner.silu_mul(gate[i : i + 1].contiguous(), up[i : i + 1].contiguous()) for i in range(9)])
    for rows in (2, 3, 9):
        together = runner.silu_mul(gate[:rows].contiguous(), up[:rows].contiguous())
        assert torch.equal(together.view(torch.int16), alone[:rows].view(torch.int16)), rows


_FEWER_THREADS_SCRIPT = """
import sys, torch
from pathlib import Path
from lorafleet_server.model.native import AttentionRows, load_native_attention
kernel = load_native_attention(Path(sys.argv[1]))
gen = torch.Generator().manual_seed(0)
q = torch.randn(8, 9, 64, generator=gen)
k = torch.randn(8, 3, 320, 64, generator=gen)
v = torch.randn(8, 3, 320, 64, generator=gen)
rows = AttentionRows.of(list(range(8)), list(range(8)), [300] * 8)
outs = []
for threads in (1, 4):
    torch.set_num_threads(threads)
    out = torch.full_like(q, float("nan"))
    kernel(q, k, v, out, rows, 0.125)
    outs.append(out)
print("same" if torch.equal(outs[0], outs[1]) else "differ", int(outs[1].isnan().any(dim=-1).any(dim=-1).sum()))
"""


def test_a_team_smaller_than_asked_still_computes_every_row(tmp_path: Path) -> None:
    """OpenMP may start fewer threads than a call asks for (here OMP_THREAD_LIMIT=2 against 4): every
    row is still computed, with the one-thread numbers (a fresh process: libgomp reads it at start)."""
    load_native_attention(tmp_path / "kernels")  # built here, so the child only loads it
    out = run_python(_FEWER_THREADS_SCRIPT, str(tmp_path / "kernels"), env={"OMP_THREAD_LIMIT": "2"})
    assert out.split() == ["same", "0"]


@pytest.mark.parametrize("special", [False, True], ids=["normal", "special-values"])
@pytest.mark.parametrize("d", [64, 48])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_and_kv_write_are_transformers_bit_for_bit(
    any_kernel: NativeAttention, dtype: torch.dtype, d: int, special: bool
) -> None:
    """q rotated in place and k rotated as ``x * cos + rotate_half(x) * sin`` (the same roundings as
    torch's ops in the dtype), k and v written at each token's row and position, nothing else of the
    slabs touched. d 64 takes the bf16 AVX-512 path where the CPU has it, 48 the portable one; with
    special values (infinities, overflow, denormals, zeros of both signs, NaN) every value that is a
    number is torch's bit for bit and every NaN is a NaN."""
    gen = torch.Generator().manual_seed(11 + d)
    n, heads, kv_heads, rows, length = 7, 9, 3, 5, 40
    q = torch.randn(n, heads, d, generator=gen).to(dtype)
    k = torch.randn(n, kv_heads, d, generator=gen).to(dtype)
    if special:
        for x in (q, k):
            pick = torch.rand(x.shape, generator=gen)
            x[pick < 0.03] = float("inf")
            x[(pick >= 0.03) & (pick < 0.06)] = -float("inf")
            x[(pick >= 0.06) & (pick < 0.1)] = 3e38  # a product or sum of two overflows
            x[(pick >= 0.1) & (pick < 0.14)] = 1e-39
            x[(pick >= 0.14) & (pick < 0.17)] = -0.0
            x[(pick >= 0.17) & (pick < 0.19)] = float("nan")
    v = torch.randn(n, kv_heads, d, generator=gen).to(dtype)
    angles = torch.rand(n, d // 2, generator=gen) * 30
    cos = torch.cat([angles.cos()] * 2, dim=-1).to(dtype)  # [n, d]
    sin = torch.cat([angles.sin()] * 2, dim=-1).to(dtype)
    k_slab = torch.randn(rows, kv_heads, length, d, generator=gen).to(dtype)
    v_slab = torch.randn(rows, kv_heads, length, d, generator=gen).to(dtype)
    kv_row = torch.tensor([0, 4, 2, 2, 1, 3, 0])
    pos = torch.tensor([0, 39, 5, 6, 17, 1, 1])
    want_q = q * cos[:, None] + rotate_half(q) * sin[:, None]
    want_k, want_v = k_slab.clone(), v_slab.clone()
    want_k[kv_row, :, pos] = k * cos[:, None] + rotate_half(k) * sin[:, None]
    want_v[kv_row, :, pos] = v
    any_kernel.rope_kv_(q, k, v, cos, sin, k_slab, v_slab, kv_row, pos)
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    for got, want in ((q, want_q), (k_slab, want_k), (v_slab, want_v)):
        nan = want.isnan()
        assert torch.equal(got.isnan(), nan)
        assert torch.equal(got[~nan].view(bits), want[~nan].view(bits))  # -0.0 and 0.0 told apart


def test_rope_refuses_mixed_dtypes(kernel: NativeAttention) -> None:
    q, k, v = torch.zeros(1, 2, 8, dtype=torch.bfloat16), torch.zeros(1, 1, 8), torch.ones(1, 1, 8)
    cos, sin = torch.ones(1, 8), torch.zeros(1, 8)
    k_slab, v_slab = torch.zeros(5, 1, 40, 8), torch.zeros(5, 1, 40, 8)
    with pytest.raises(NativeKernelError, match="all fp32 or all bf16"):
        kernel.rope_kv_(q, k, v, cos, sin, k_slab, v_slab, torch.tensor([0]), torch.tensor([0]))
    q = q.float()
    with pytest.raises(NativeKernelError, match="CPU tensors only"):  # a meta tensor's address is 0
        kernel.rope_kv_(q, k, v, cos, sin, k_slab, v_slab, torch.tensor([0]), torch.tensor([0], device="meta"))
    assert not v_slab.any(), "a refused call wrote"


@pytest.mark.parametrize(("row", "position"), [(5, 0), (-1, 0), (0, 40), (0, -1)])
def test_rope_refuses_rows_and_positions_outside_the_slab(kernel: NativeAttention, row: int, position: int) -> None:
    q, k, v = torch.zeros(1, 2, 8), torch.zeros(1, 1, 8), torch.ones(1, 1, 8)
    cos, sin = torch.ones(1, 8), torch.zeros(1, 8)
    k_slab, v_slab = torch.zeros(5, 1, 40, 8), torch.zeros(5, 1, 40, 8)
    with pytest.raises(NativeKernelError, match="refused"):
        kernel.rope_kv_(q, k, v, cos, sin, k_slab, v_slab, torch.tensor([row]), torch.tensor([position]))
    assert not v_slab.any(), "a refused call wrote"
    with pytest.raises(NativeKernelError, match="differ in shape"):
        kernel.rope_kv_(q, k, v, cos[:, :4], sin, k_slab, v_slab, torch.tensor([0]), torch.tensor([0]))
    # A strided view of positions [0, 1] (found by an outside review): the kernel read [0, 7] and wrote
    # the second token's K/V at position 7.
    q2, k2, v2 = torch.zeros(2, 2, 8), torch.zeros(2, 1, 8), torch.ones(2, 1, 8)
    cos2, sin2 = torch.ones(2, 8), torch.zeros(2, 8)
    with pytest.raises(NativeKernelError, match="differ in shape"):
        kernel.rope_kv_(q2, k2, v2, cos2, sin2, k_slab, v_slab, torch.tensor([0, 0]), torch.tensor([0, 7, 1])[::2])
    assert not v_slab.any(), "a refused call wrote"


@pytest.mark.parametrize("d", [576, 8, 13])
def test_residual_add_and_rmsnorm_match_transformers(kernel: NativeAttention, d: int) -> None:
    """x += delta in place (torch's add, bit for bit), then transformers' Llama RMSNorm to fp32 rounding."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    gen = torch.Generator().manual_seed(d)
    norm = LlamaRMSNorm(d, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(d, generator=gen))
    x = torch.randn(6, d, generator=gen) * 3
    delta = torch.randn(6, d, generator=gen)
    with torch.inference_mode():
        want_x = x + delta
        want = norm(want_x)
        out = kernel.add_rmsnorm_(x, delta, norm.weight, 1e-5)
        assert torch.equal(x, want_x)
        torch.testing.assert_close(out, want, rtol=2e-6, atol=2e-6)
        torch.testing.assert_close(kernel.add_rmsnorm_(x, None, norm.weight, 1e-5), want, rtol=2e-6, atol=2e-6)
        assert torch.equal(x, want_x)  # no delta: x as it was
        alone = kernel.add_rmsnorm_(x[3:4].clone(), None, norm.weight, 1e-5)
        assert torch.equal(alone[0], out[3])  # a row alone: the same numbers as among others
    with pytest.raises(NativeKernelError, match="differ in shape"):
        kernel.add_rmsnorm_(x, delta[:, :1].contiguous(), norm.weight, 1e-5)
    with pytest.raises(NativeKernelError, match="all fp32 or all bf16"):
        kernel.add_rmsnorm_(x.to(torch.bfloat16), None, norm.weight, 1e-5)
    with pytest.raises(NativeKernelError, match="all fp32 or all bf16"):
        kernel.add_rmsnorm_(x.half(), None, norm.weight.half(), 1e-5)


@pytest.mark.parametrize("d", [576, 8, 13])
def test_residual_add_and_rmsnorm_in_bf16_match_transformers(kernel: NativeAttention, d: int) -> None:
    """In bf16 the add and the output round where torch's bf16 ops do: the add bit for bit; the output
    is transformers' bf16 LlamaRMSNorm but where the fp32 statistics' last bit (its own order of the sum
    of squares) moves a value across a bf16 rounding boundary, by one bf16 step at most."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    gen = torch.Generator().manual_seed(100 + d)
    norm = LlamaRMSNorm(d, eps=1e-5).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(d, generator=gen))
    x = (torch.randn(64, d, generator=gen) * 3).to(torch.bfloat16)
    delta = torch.randn(64, d, generator=gen).to(torch.bfloat16)
    with torch.inference_mode():
        want_x = x + delta
        want = norm(want_x).float()
        out = kernel.add_rmsnorm_(x, delta, norm.weight, 1e-5)
        assert out.dtype == torch.bfloat16
        assert torch.equal(x, want_x)
        one_step = want.abs() * 2.0**-7 + 1e-30  # bf16 keeps 8 significant bits
        assert ((out.float() - want).abs() <= one_step).all()
        assert (out.float() == want).float().mean() > 0.99
        alone = kernel.add_rmsnorm_(x[5:6].clone(), None, norm.weight, 1e-5)
        assert torch.equal(alone[0], kernel.add_rmsnorm_(x.clone(), None, norm.weight, 1e-5)[5])


@pytest.mark.parametrize("d", [576, 64, 40, 13])
def test_bf16_rmsnorm_is_its_stated_arithmetic_bit_for_bit(kernel: NativeAttention, d: int) -> None:
    """The bf16 add + RMSNorm is exactly the arithmetic csrc/attention.c states, on its AVX-512 path (d a
    multiple of 16, where the CPU has it) and its portable one alike: the add rounded to bf16; the sum
    of squares in eight lanes, lane l taking elements l, l + 8, ... in order (a bf16 value's square is
    exact in fp32, so fused or not is the same), the lanes summed pairwise; r = 1 / sqrt(sum / d + eps)
    in fp32; the row times r rounded to bf16, times the weight rounded to bf16."""
    gen = torch.Generator().manual_seed(200 + d)
    # values spread over 2^-8 .. 2^8 in 4,000 rows: partial sums of squares round in fp32, and summed in
    # another order (a lane's terms swapped in pairs) some outputs move by a bf16 step
    rows = 4000
    spread = torch.exp2(torch.randint(-8, 9, (rows, d), generator=gen).float())
    x = (torch.randn(rows, d, generator=gen) * spread).to(torch.bfloat16)
    delta = torch.randn(rows, d, generator=gen).to(torch.bfloat16)
    w = torch.randn(d, generator=gen).to(torch.bfloat16)
    added = (x.float() + delta.float()).to(torch.bfloat16)
    v = added.float()  # [rows, d]
    lanes = torch.zeros(rows, 8)
    for i in range(d):
        lanes[:, i % 8] += v[:, i] * v[:, i]
    total = ((lanes[:, 0] + lanes[:, 1]) + (lanes[:, 2] + lanes[:, 3])) + (
        (lanes[:, 4] + lanes[:, 5]) + (lanes[:, 6] + lanes[:, 7])
    )
    eps = torch.tensor(1e-5, dtype=torch.float32)
    # sqrt and the division correctly rounded to fp32 (as C's sqrtf and / are): computed in fp64, then
    # rounded once, which for these two operations is exact rounding. torch's own fp32 sqrt is not
    # correctly rounded on every CPU (an AMD EPYC's vectorized one was an ulp off for 1 row in 4,000).
    sqrt = torch.sqrt((total / torch.tensor(float(d)) + eps).double()).float()
    r = (1.0 / sqrt.double()).float()  # [rows]
    want = (w.float() * (v * r[:, None]).to(torch.bfloat16).float()).to(torch.bfloat16)
    got = kernel.add_rmsnorm_(x, delta, w, 1e-5)
    assert torch.equal(x, added)
    assert torch.equal(got, want)


def test_amx_scores_are_taken_where_the_cpu_has_amx(any_kernel: NativeAttention) -> None:
    """On a CPU with AMX-BF16 the bf16 rows of 32 keys or more take their scores from AMX tiles (the
    tests above then check that path against the fp32 reference); elsewhere the AVX-512 or portable
    loops do."""
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    assert any_kernel.amx_scores == ("amx_bf16" in flags and "avx512_bf16" in flags)


def test_clang_is_told_from_gcc_by_its_preprocessor() -> None:
    """clang builds take -ffp-contract=on (native.for_compiler); GCC keeps fast."""
    flags = ("-O3", "-ffp-contract=fast")
    gcc, clang = shutil.which("gcc"), shutil.which("clang")
    if gcc is None and clang is None:
        pytest.skip("neither gcc nor clang here")
    if gcc is not None:
        assert not native.is_clang(gcc) and native.for_compiler(flags, native.is_clang(gcc)) == flags
    if clang is not None:
        assert native.is_clang(clang) and native.for_compiler(flags, True) == ("-O3", "-ffp-contract=on")


@pytest.mark.usefixtures("openmp_compiler")
def test_the_kernel_is_built_with_openmp_where_the_compiler_has_it(tmp_path: Path) -> None:
    """Built as the server builds it, the kernel splits calls over threads; without OpenMP it still
    loads, for one thread per call."""
    assert load_native_attention(tmp_path / "omp").threaded
    assert not load_native_attention(tmp_path / "plain", openmp=False).threaded


def test_large_scores_do_not_overflow_the_softmax(kernel: NativeAttention) -> None:
    q, k, v, rows = random_case(4, 2, 64, torch.bfloat16, [50, 7], seed=2)
    q = q * 40  # scores in the thousands: exp overflows unless the maximum is taken out first
    out = torch.zeros_like(q)
    kernel(q, k, v, out, rows, 0.125)
    want = reference(q, k, v, rows, 0.125)
    for tok, expected in want.items():
        assert torch.isfinite(out[tok]).all()
        torch.testing.assert_close(out[tok].float(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    ("tok", "kv_row", "length"),
    [([0], [0], [0]), ([0], [0], [99]), ([0], [5], [3]), ([0], [-1], [3]), ([9], [0], [3]), ([-1], [0], [3])],
    ids=["empty", "past-slab-length", "kv-row-past-slab", "negative-kv-row", "token-past-q", "negative-token"],
)
def test_out_of_range_rows_are_refused_and_nothing_is_written(
    kernel: NativeAttention, tok: list[int], kv_row: list[int], length: list[int]
) -> None:
    q = torch.randn(2, 4, 32)
    k = torch.randn(3, 2, 10, 32)
    out = torch.full_like(q, 3.0)
    with pytest.raises(NativeKernelError, match="refused its arguments"):
        kernel(q, k, k.clone(), out, AttentionRows.of(tok, kv_row, length), 1.0)
    assert (out == 3.0).all()


def test_mismatched_tensors_are_refused(kernel: NativeAttention) -> None:
    q = torch.randn(2, 4, 32)
    k = torch.randn(3, 2, 10, 32)
    rows = AttentionRows.of([0], [0], [3])
    with pytest.raises(NativeKernelError, match="dtype or shape"):
        kernel(q, k, k.to(torch.bfloat16), torch.empty_like(q), rows, 1.0)
    with pytest.raises(NativeKernelError, match="contiguous"):
        kernel(q, k.transpose(2, 3), k, torch.empty_like(q), rows, 1.0)
    # Found by an outside review (each was taken, and wrote past the rows or read the wrong keys):
    half = q.half()
    with pytest.raises(NativeKernelError, match="not fp32 or bf16"):  # read and written as fp32
        kernel(half, k.half(), k.half(), torch.empty_like(half), rows, 1.0)
    with pytest.raises(NativeKernelError, match="dtype or shape"):  # the slabs' head_dim is not q's
        kernel(q, k[..., :16].contiguous(), k[..., :16].contiguous(), torch.empty_like(q), rows, 1.0)
    strided = AttentionRows(torch.tensor([0, 5, 1])[::2], torch.tensor([0, 0]), torch.tensor([3, 3]))
    with pytest.raises(NativeKernelError, match="contiguous int64 vectors of one length"):
        kernel(q, k, k.clone(), torch.empty_like(q), strided, 1.0)
    uneven = AttentionRows(torch.tensor([0, 1]), torch.tensor([0]), torch.tensor([3, 3]))
    with pytest.raises(NativeKernelError, match="contiguous int64 vectors of one length"):
        kernel(q, k, k.clone(), torch.empty_like(q), uneven, 1.0)
    # Tensors off the CPU (a meta tensor's address is 0), for the attention and the layer glue alike.
    with pytest.raises(NativeKernelError, match="CPU tensors only"):
        kernel(q, k, k.clone(), torch.empty_like(q, device="meta"), rows, 1.0)
    x = torch.randn(2, 32)
    with pytest.raises(NativeKernelError, match="CPU tensors only"):
        kernel.add_rmsnorm_(x, None, torch.ones(32, device="meta"), 1e-5)
    with pytest.raises(NativeKernelError, match="CPU tensors only"):
        kernel.silu_mul(x, x.to("meta"))


def test_shapes_and_devices_the_kernel_does_not_take_are_refused_at_startup() -> None:
    NativeAttention.check_shape(9, 3, 64, torch.bfloat16, CPU)
    for args in [
        (9, 3, 64, torch.float16, CPU),
        (9, 3, 64, torch.bfloat16, torch.device("cuda")),
        (9, 2, 64, torch.bfloat16, CPU),
        (34, 2, 64, torch.bfloat16, CPU),
        (4, 2, 512, torch.bfloat16, CPU),
    ]:
        with pytest.raises(NativeKernelError):
            NativeAttention.check_shape(*args)


def test_the_build_is_cached_per_source_compiler_and_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = build_library(native.ATTENTION_SOURCE, tmp_path)
    built_at = first.stat().st_mtime_ns
    assert build_library(native.ATTENTION_SOURCE, tmp_path) == first
    assert first.stat().st_mtime_ns == built_at, "the cached library was rebuilt"
    # another CPU (its flags are part of the key) gets its own build beside the first
    monkeypatch.setattr(native, "cpu_flags_line", lambda: "fpu sse2")
    other = build_library(native.ATTENTION_SOURCE, tmp_path)
    assert other != first and other.is_file() and first.is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".build-")], "a temporary build dir was left"


def test_a_failing_or_missing_compiler_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = tmp_path / "broken-cc"
    broken.write_text(
        "#!/bin/sh\nif [ \"$1\" = --version ]; then echo broken 1.0; exit 0; fi\necho 'no such flag' >&2\nexit 1\n"
    )
    broken.chmod(0o755)
    with pytest.raises(NativeKernelError, match="no such flag"):
        build_library(native.ATTENTION_SOURCE, tmp_path / "cache", compiler=str(broken))
    assert not any((tmp_path / "cache").glob("*.so"))
    missing = str(tmp_path / "not-there")
    assert find_compiler(missing) is None
    with pytest.raises(NativeKernelError, match=r"the C compiler '.*not-there' is not found"):
        load_native_attention(tmp_path / "cache", compiler=missing)
    monkeypatch.setenv("CC", "gcc")  # the server's config reads $CC; the kernels take only what it passes
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    assert find_compiler() is None
    with pytest.raises(NativeKernelError, match="no C compiler"):
        load_native_attention(tmp_path / "cache")


def test_auto_falls_back_to_torch_and_native_refuses_to_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shape = {"heads": 9, "kv_heads": 3, "head_dim": 64, "dtype": torch.bfloat16}
    chosen = choose_attention("auto", cache_dir=tmp_path, device=CPU, **shape)  # type: ignore[arg-type]
    assert chosen.name == "native" and chosen.kernel is not None
    assert choose_attention("torch", cache_dir=tmp_path, device=CPU, **shape).kernel is None  # type: ignore[arg-type]
    gpu = choose_attention("auto", cache_dir=tmp_path, device=torch.device("cuda"), **shape)  # type: ignore[arg-type]
    assert gpu.name == "torch" and "cuda" in gpu.reason
    missing = str(tmp_path / "not-there")
    fallback = choose_attention(
        "auto",
        cache_dir=tmp_path / "fresh",
        device=CPU,
        compiler=missing,
        **shape,  # type: ignore[arg-type]
    )
    assert fallback.kernel is None and "not-there' is not found" in fallback.reason
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    fallback = choose_attention("auto", cache_dir=tmp_path / "fresh", device=CPU, **shape)  # type: ignore[arg-type]
    assert fallback.kernel is None and "no C compiler" in fallback.reason
    with pytest.raises(NativeKernelError, match="no C compiler"):
        choose_attention("native", cache_dir=tmp_path / "fresh", device=CPU, **shape)  # type: ignore[arg-type]


def _model(head_dim: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=300,
        hidden_size=4 * head_dim,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("head_dim", [16, 32], ids=["portable", "avx512-where-present"])
def test_runner_decodes_the_same_with_native_and_torch_attention(kernel: NativeAttention, head_dim: int) -> None:
    """Prefill chunks, then decode steps of rows at different lengths in sparse KV rows: the native
    runner's logits equal the HF forward in fp32, and stay beside torch's path in bf16."""
    model = _model(head_dim)
    prompts = {0: [5, 17, 33, 9, 100, 2, 7], 3: [11, 12, 13], 5: list(range(40, 80))}
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        for name, attention in (("native", kernel), ("torch", None)):
            m = _model(head_dim).to(dtype)
            runner = ModelRunner(
                m, LoraContext(), rows=6, max_seq_len=96, dtype=dtype, device=CPU, native_attention=attention
            )
            for t in (*runner.kv.k, *runner.kv.v):
                t.fill_(float("nan"))  # never-written positions must not be read
            runner.step([RowStep(row, 0, tuple(ids), 0, False, False) for row, ids in prompts.items()])
            logits = []
            for i in range(6):
                steps = [RowStep(row, len(ids) + i, (60 + i + row,), 0, True, False) for row, ids in prompts.items()]
                logits.append(runner.step(steps).logits.float())  # [3, vocab]
            runs[name, dtype] = torch.stack(logits)  # [6, 3, vocab]
    with torch.no_grad():
        for j, (row, ids) in enumerate(prompts.items()):
            full = torch.tensor([[*ids, *(60 + i + row for i in range(6))]])
            want = model(full).logits[0, len(ids) :]  # [6, vocab]
            torch.testing.assert_close(runs["native", torch.float32][:, j], want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(runs["native", torch.float32], runs["torch", torch.float32], rtol=1e-5, atol=1e-5)
    # bf16: both paths round the same inputs; the native sums are fp32 throughout
    bf16_gap = (runs["native", torch.bfloat16] - runs["torch", torch.bfloat16]).abs().max().item()
    assert bf16_gap < 0.1, bf16_gap
    assert torch.isfinite(runs["native", torch.bfloat16]).all()
