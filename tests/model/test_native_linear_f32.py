"""The native fp32 Linear (model/native.py NativeLinearF32, csrc/linear_f32.c) and its module.

The kernel is built here as the server builds it (with OpenMP, for this CPU). Its numbers are checked
where the CPU has AVX2 and FMA (every x86-64 server of the last decade) and skipped elsewhere.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from processlib import run_python
from torch import nn

from lorafleet_server.model.cpu import cpu_features
from lorafleet_server.model.native import (
    CFLAGS,
    LINEAR_F32_SOURCE,
    NativeCpuUnsupported,
    NativeKernelError,
    NativeLinearF32,
    build_library,
    find_compiler,
    load_native_linear_f32,
)
from lorafleet_server.model.packed import NativeLinearModule

pytestmark = pytest.mark.skipif(find_compiler() is None, reason="no C compiler on this machine")


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> NativeLinearF32:
    try:
        return load_native_linear_f32(tmp_path_factory.mktemp("kernels"))
    except NativeKernelError as exc:
        pytest.skip(f"no native fp32 Linear on this CPU: {exc}")


def _weights(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) / k**0.5  # [out, in]
    bias = torch.randn(n, generator=gen)  # [out]
    return w, bias


def _reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x . W^T (+ bias) in fp64, rounded once: the exact result the kernel's fp32 sums approximate."""
    return F.linear(x.double(), w.double(), None if bias is None else bias.double()).float()


@pytest.mark.parametrize(("n", "k"), [(16, 8), (7, 3), (40, 33), (192, 576), (576, 1536), (1000, 64)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_the_exact_product_for_every_row_count(
    kernel: NativeLinearF32, n: int, k: int, with_bias: bool
) -> None:
    """Row counts across the kernel's 6-row blocks (tails included), out widths of a partial panel up to
    many panels; each output within fp32 rounding of the exact product, and as close as F.linear is."""
    w, bias = _weights(n, k, seed=n + k)
    b = bias if with_bias else None
    packed = kernel.pack(w)
    assert packed.shape == (-(-n // 16), 16 * k)  # whole panels of 16 output columns
    gen = torch.Generator().manual_seed(1)
    for m in (1, 2, 5, 6, 7, 12, 13, 32, 65, 300):
        x = torch.randn(m, k, generator=gen)  # [m, in]
        got = kernel(x, packed, b, n)
        want = _reference(x, w, b)
        err = (got - want).abs().max().item()
        torch_err = (F.linear(x, w, b) - want).abs().max().item()
        assert got.shape == (m, n)
        assert err <= max(4 * torch_err, 1e-5 * k**0.5), f"m={m}: error {err} against F.linear's {torch_err}"


def test_a_row_is_the_same_alone_and_among_others(kernel: NativeLinearF32) -> None:
    """Batch invariance: a row's output, bit for bit, does not depend on the row count or its place."""
    w, bias = _weights(200, 96, seed=3)
    packed = kernel.pack(w)
    x = torch.randn(37, 96, generator=torch.Generator().manual_seed(4))  # [37, in]
    together = kernel(x, packed, bias, 200)
    for i in (0, 5, 6, 36):
        alone = kernel(x[i : i + 1].contiguous(), packed, bias, 200)
        assert torch.equal(alone[0], together[i])
    assert torch.equal(kernel(x[7:20].contiguous(), packed, bias, 200), together[7:20])


@pytest.mark.skipif("avx512f" not in cpu_features().flags, reason="no AVX-512 here: the server's build is the AVX2 one")
@pytest.mark.usefixtures("torch_threads_kept")
def test_the_avx512_blocks_give_the_avx2_builds_bits(kernel: NativeLinearF32, tmp_path: Path) -> None:
    """Built for this AVX-512 CPU the blocks take two panels and 12 rows at a time; every output is the
    same bit for bit as the AVX2 build's (6 rows, one panel): an odd panel count's lone last panel, a
    partial panel, row counts across both block sizes, with and without bias, on 1 and 2 threads."""
    assert kernel.isa == "AVX-512"  # the server's build for this CPU
    avx2 = NativeLinearF32(build_library(LINEAR_F32_SOURCE, tmp_path, flags=(*CFLAGS, "-march=haswell")))
    assert avx2.isa == "AVX2"
    gen = torch.Generator().manual_seed(9)
    for n, k in ((16, 8), (40, 33), (200, 96), (576, 1536), (1000, 64)):  # 1, 3, 13, 36, 63 panels
        w, bias = _weights(n, k, seed=n)
        packed = kernel.pack(w)
        assert torch.equal(avx2.pack(w), packed)  # one layout
        for m in (1, 5, 6, 11, 12, 13, 24, 32, 37):
            x = torch.randn(m, k, generator=gen)  # [m, in]
            for b in (None, bias):
                for threads in (1, 2):
                    torch.set_num_threads(threads)
                    assert torch.equal(kernel(x, packed, b, n), avx2(x, packed, b, n)), (n, k, m, threads)


@pytest.mark.usefixtures("torch_threads_kept", "openmp_compiler")
def test_any_thread_count_gives_the_one_thread_numbers(kernel: NativeLinearF32) -> None:
    """A call splits its panels over the step's torch threads (built with OpenMP here); every output,
    bit for bit, is the one a single thread computes."""
    assert kernel.threaded  # a compiler with OpenMP builds it so
    w, bias = _weights(1000, 160, seed=5)
    packed = kernel.pack(w)
    x = torch.randn(33, 160, generator=torch.Generator().manual_seed(6))  # [33, in]
    torch.set_num_threads(1)
    one = kernel(x, packed, bias, 1000)
    for threads in (2, 3, 7, 100):  # more threads than panels: at most one panel range each
        torch.set_num_threads(threads)
        assert torch.equal(kernel(x, packed, bias, 1000), one), f"{threads} threads changed the output"


def test_zero_rows_give_an_empty_output(kernel: NativeLinearF32) -> None:
    w, _ = _weights(32, 16, seed=7)
    assert kernel(torch.empty(0, 16), kernel.pack(w), None, 32).shape == (0, 32)


def test_tensors_it_does_not_take_are_refused(kernel: NativeLinearF32) -> None:
    w, bias = _weights(32, 16, seed=8)
    packed = kernel.pack(w)
    x = torch.randn(4, 16)
    with pytest.raises(NativeKernelError, match="does not take"):
        kernel.pack(w.to(torch.bfloat16))
    with pytest.raises(NativeKernelError, match="does not take"):
        kernel.pack(torch.empty(0, 16))
    with pytest.raises(NativeKernelError, match="contiguous fp32 rows"):
        kernel(x.to(torch.bfloat16), packed, None, 32)
    with pytest.raises(NativeKernelError, match="contiguous fp32 rows"):
        kernel(torch.randn(16, 4).t(), packed, None, 32)
    with pytest.raises(NativeKernelError, match="packed weight"):
        kernel(x, packed, None, 48)  # another width than the packed weight's
    with pytest.raises(NativeKernelError, match="packed weight"):
        kernel(torch.randn(4, 8), packed, None, 32)  # another depth
    with pytest.raises(NativeKernelError, match="packed weight"):
        kernel(torch.randn(4, 32), packed, None, 16)  # 32 x 16 packed, as many floats as a 16 x 32 one
    with pytest.raises(NativeKernelError, match="packed weight"):
        kernel(x, packed.reshape(-1), None, 32)  # not the layout pack() made
    with pytest.raises(NativeKernelError, match="bias of 32"):
        kernel(x, packed, bias[:16].contiguous(), 32)
    with pytest.raises(NativeKernelError, match="CPU tensors only"):
        kernel(x.to("meta"), packed, None, 32)
    with pytest.raises(NativeKernelError, match=r"rows of \[M, in\]"):
        kernel(x[0], packed, None, 32)
    with pytest.raises(NativeKernelError, match="bias of 32"):
        kernel(x, packed, bias.double(), 32)


def test_without_openmp_it_still_runs_on_one_thread(tmp_path: Path) -> None:
    plain = load_native_linear_f32(tmp_path / "plain", openmp=False)
    assert not plain.threaded
    w, bias = _weights(40, 24, seed=9)
    x = torch.randn(9, 24)
    got = plain(x, plain.pack(w), bias, 40)
    torch.testing.assert_close(got, F.linear(x, w, bias), rtol=1e-5, atol=1e-5)


_FEWER_THREADS_SCRIPT = """
import sys, torch
from pathlib import Path
from lorafleet_server.model.native import load_native_linear_f32
kernel = load_native_linear_f32(Path(sys.argv[1]))
gen = torch.Generator().manual_seed(0)
w, x = torch.randn(200, 64, generator=gen), torch.randn(9, 64, generator=gen)
packed = kernel.pack(w)
outs = []
for threads in (1, 4):
    torch.set_num_threads(threads)
    outs.append(kernel(x, packed, None, 200))
print("same" if torch.equal(outs[0], outs[1]) else "differ")
"""


def test_a_team_smaller_than_asked_still_computes_every_panel(tmp_path: Path) -> None:
    """OpenMP may start fewer threads than a call asks for (OMP_THREAD_LIMIT=2 against 4): the panels are
    split over the team it got, every output written with the one-thread numbers."""
    load_native_linear_f32(tmp_path / "kernels")  # built here, so the child only loads it
    out = run_python(_FEWER_THREADS_SCRIPT, str(tmp_path / "kernels"), env={"OMP_THREAD_LIMIT": "2"})
    assert out.split() == ["same"]


def test_a_build_for_a_cpu_without_avx2_says_so(tmp_path: Path) -> None:
    """Built with this CPU's flags minus AVX2 and FMA, the library has no kernel and the loader refuses it."""
    library = build_library(LINEAR_F32_SOURCE, tmp_path, flags=(*CFLAGS, "-mno-avx2", "-mno-fma"))
    with pytest.raises(NativeCpuUnsupported, match="AVX2 and FMA"):
        NativeLinearF32(library)


def test_the_module_keeps_the_weight_runs_any_step_and_leaves_gradients_to_torch(kernel: NativeLinearF32) -> None:
    torch.manual_seed(10)
    linear = nn.Linear(48, 80)
    module = NativeLinearModule(linear, kernel)
    assert module.weight is linear.weight and module.bias is linear.bias  # tied weights stay tied
    with torch.inference_mode():
        for shape in ((3, 48), (2, 5, 48), (1, 300, 48)):
            x = torch.randn(*shape)
            got = module(x)
            assert got.shape == (*shape[:-1], 80)
            torch.testing.assert_close(got, F.linear(x, linear.weight, linear.bias), rtol=1e-5, atol=1e-5)
    x = torch.randn(4, 48, requires_grad=True)
    module(x).sum().backward()  # F.linear, so gradients flow to the input and the shared weight
    assert x.grad is not None and linear.weight.grad is not None


def test_the_module_writes_into_a_given_tensor(kernel: NativeLinearF32) -> None:
    """``into``: the kernel writes its rows into the caller's tensor (the runner's logits buffer), the
    same bits as ``forward``; rows that need gradients take F.linear and are copied in; a tensor of the
    wrong shape or dtype is refused with nothing written."""
    torch.manual_seed(11)
    linear = nn.Linear(48, 80)
    module = NativeLinearModule(linear, kernel)
    with torch.inference_mode():
        x = torch.randn(5, 48)
        buf = torch.full((8, 80), float("nan"))
        got = module.into(x, buf[:5])
        assert got.data_ptr() == buf.data_ptr() and torch.equal(buf[:5], module(x)) and buf[5:].isnan().all()
        for wrong in (torch.zeros(5, 81), torch.zeros(5, 80, dtype=torch.float64), torch.zeros(80, 5).t()):
            before = wrong.clone()
            with pytest.raises(NativeKernelError, match="writes a contiguous"):
                module.into(x, wrong)
            assert torch.equal(wrong, before)
    grad = torch.randn(3, 48, requires_grad=True)
    out = torch.empty(3, 80)
    assert module.into(grad, out) is out
    assert torch.equal(out, F.linear(grad, linear.weight, linear.bias))
