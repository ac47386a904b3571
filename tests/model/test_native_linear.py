"""The native bf16 Linear (model/native.py NativeLinear, csrc/linear.c: AMX tiles, or AVX-512 BF16 dot
products) and the base Linears' choice (model/packed.py pack_base).

The kernel is built here as the server builds it. Its numbers are checked for each of its two paths
the CPU runs (AMX-BF16: Sapphire Rapids and later; AVX512-BF16: also Cooper Lake, AMD Zen 4) and
skipped elsewhere; the choice and the fallback to oneDNN are checked on every CPU with a C compiler (a
library built without AMX or AVX512-BF16 says so).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorafleet_server.model import native as native_module
from lorafleet_server.model import packed as packed_module
from lorafleet_server.model.native import (
    NativeKernelError,
    NativeLinear,
    find_compiler,
    load_native_linear,
    load_native_pool,
)
from lorafleet_server.model.packed import (
    LinearTiming,
    NativeLinearModule,
    PackedLinear,
    pack_base,
    packed_linear_supported,
)

pytestmark = pytest.mark.skipif(find_compiler() is None, reason="no C compiler on this machine")


@pytest.fixture(scope="module")
def kernels_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kernels")


@pytest.fixture(scope="module", params=["amx", "avx512"])
def kernel(kernels_dir: Path, request: pytest.FixtureRequest) -> NativeLinear:
    """Each path of the kernel this CPU runs (the other is skipped)."""
    try:
        return load_native_linear(kernels_dir, isa=request.param)
    except NativeKernelError as exc:
        pytest.skip(f"no native {request.param} Linear on this CPU: {exc}")


def _weights(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(torch.bfloat16)  # [out, in]
    bias = torch.randn(n, generator=gen).to(torch.bfloat16)  # [out]
    return w, bias


@pytest.mark.parametrize(("n", "k"), [(32, 32), (64, 96), (192, 576), (576, 576), (96, 1536)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_fp32_for_every_row_count(kernel: NativeLinear, n: int, k: int, with_bias: bool) -> None:
    """Row counts across the kernel's 16-row tiles and 32-row blocks (tails included); out widths of
    one panel up to several ~256 KB chunks; each output within one bf16 rounding of fp32."""
    w, bias = _weights(n, k, seed=n + k)
    packed = kernel.pack(w)
    gen = torch.Generator().manual_seed(1)
    for m in (1, 3, 15, 16, 17, 31, 32, 33, 64, 65, 100):
        x = torch.randn(m, k, generator=gen).to(torch.bfloat16)  # [m, in]
        b32 = bias.float() if with_bias else None
        got = kernel(x, packed, b32, n)  # [m, out] bf16
        want = F.linear(x.float(), w.float(), b32)  # [m, out] fp32
        assert got.dtype == torch.bfloat16 and got.shape == (m, n)
        torch.testing.assert_close(got.float(), want, rtol=2**-7, atol=1e-4, msg=f"m={m}")


def test_a_row_is_the_same_alone_and_among_others(kernel: NativeLinear) -> None:
    """Bit for bit: a row's sums run in one order whatever the row count (oneDNN's bf16 kernels change
    with it on an AMX CPU, which broke prefix-cache invariance)."""
    w, _ = _weights(576, 576, seed=3)
    packed = kernel.pack(w)
    x = torch.randn(100, 576, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    together = kernel(x, packed, None, 576)
    for m in (1, 2, 17, 33, 64):
        part = kernel(x[:m].contiguous(), packed, None, 576)
        assert torch.equal(part, together[:m]), m
    for i in (0, 31, 32, 99):
        assert torch.equal(kernel(x[i : i + 1].contiguous(), packed, None, 576)[0], together[i]), i


def test_helper_threads_give_the_same_numbers(kernel: NativeLinear, kernels_dir: Path) -> None:
    """With the helper pool a call's columns are shared out; each column's sums are the same either way."""
    helped = NativeLinear(kernel.library, load_native_pool(kernels_dir, threads=2), kernel.isa)
    assert helped.threads == 2
    for n, k in ((1536, 576), (576, 1536), (64, 64)):
        w, bias = _weights(n, k, seed=n)
        packed = kernel.pack(w)
        gen = torch.Generator().manual_seed(7)
        for m in (1, 17, 32, 33, 300):
            x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
            b32 = bias.float()
            assert torch.equal(helped(x, packed, b32, n), kernel(x, packed, b32, n)), (n, k, m)


@pytest.mark.parametrize("threads", [1, 2])
def test_several_weights_of_one_input_in_one_call_give_each_its_own_call_s_numbers(
    kernel: NativeLinear, kernels_dir: Path, threads: int
) -> None:
    """``parts``: a layer's q, k and v (or gate and up) in one call, their columns cut into units that
    cross from one weight into the next; bit for bit what a call each gives, with and without biases,
    for row counts across tiles, blocks and prompt chunks."""
    runner = (
        NativeLinear(kernel.library, load_native_pool(kernels_dir, threads=2), kernel.isa) if threads == 2 else kernel
    )
    cases = ((576, (576, 192, 192)), (576, (1536, 1536)), (64, (32, 96, 32, 64)), (96, (96, 160, 32)), (1536, (32,)))
    for k, widths in cases:  # (96, 160, 32): on two threads units of 2 panels, two of them crossing parts
        weights = [_weights(n, k, seed=n + i) for i, n in enumerate(widths)]
        packed = [kernel.pack(w) for w, _ in weights]
        biases = [b.float() if i % 2 else None for i, (_, b) in enumerate(weights)]
        gen = torch.Generator().manual_seed(k)
        for m in (1, 5, 17, 32, 33, 300):
            x = torch.randn(m, k, generator=gen).to(torch.bfloat16)  # [m, in]
            outs = [torch.full((m, n), float("nan"), dtype=torch.bfloat16) for n in widths]
            runner.parts(x, [(p, b, o) for p, b, o in zip(packed, biases, outs, strict=True)])
            for p, b, o, n in zip(packed, biases, outs, widths, strict=True):
                assert torch.equal(o, kernel(x, p, b, n)), (k, widths, m, n)


def test_parts_it_does_not_take_are_refused(kernel: NativeLinear) -> None:
    w, _ = _weights(64, 64, seed=6)
    packed = kernel.pack(w)
    x = torch.zeros(2, 64, dtype=torch.bfloat16)
    out = torch.empty(2, 64, dtype=torch.bfloat16)
    with pytest.raises(NativeKernelError, match=r"rows of \[M, in\]"):
        kernel.parts(x[0], [(packed, None, out)])
    with pytest.raises(NativeKernelError, match="1 to 4 weights"):
        kernel.parts(x, [])
    with pytest.raises(NativeKernelError, match="1 to 4 weights"):
        kernel.parts(x, [(packed, None, out)] * 5)
    with pytest.raises(NativeKernelError, match="packed weights"):
        kernel.parts(x, [(packed, None, torch.empty(2, 32, dtype=torch.bfloat16))])  # out narrower than W
    with pytest.raises(NativeKernelError, match="writes contiguous"):
        kernel.parts(x, [(packed, None, torch.empty(3, 64, dtype=torch.bfloat16))])
    with pytest.raises(NativeKernelError, match="fp32 bias"):
        kernel.parts(x, [(packed, torch.zeros(64, dtype=torch.bfloat16), out)])
    with pytest.raises(NativeKernelError, match="CPU tensors only"):
        kernel.parts(x, [(packed.to("meta"), None, out)])
    with pytest.raises(NativeKernelError, match="rc 1"):  # a width that is not whole panels, past the checks
        kernel.parts(
            torch.zeros(2, 32, dtype=torch.bfloat16),
            [(torch.zeros(48 * 32, dtype=torch.bfloat16), None, torch.empty(2, 48, dtype=torch.bfloat16))],
        )


def test_callers_on_several_threads_each_get_their_own_result(kernel: NativeLinear, kernels_dir: Path) -> None:
    """One call at a time uses the helpers; a call that finds them busy runs on its own thread."""
    helped = NativeLinear(kernel.library, load_native_pool(kernels_dir, threads=2), kernel.isa)
    w, _ = _weights(1536, 576, seed=11)
    packed = kernel.pack(w)
    inputs = [torch.randn(32, 576, generator=torch.Generator().manual_seed(i)).to(torch.bfloat16) for i in range(6)]
    want = [kernel(x, packed, None, 1536) for x in inputs]

    def run(i: int) -> bool:
        return all(torch.equal(helped(inputs[i], packed, None, 1536), want[i]) for _ in range(20))

    with ThreadPoolExecutor(max_workers=6) as pool:
        assert all(pool.map(run, range(6)))


def test_a_thread_count_below_one_is_refused(kernel: NativeLinear, kernels_dir: Path) -> None:
    with pytest.raises(NativeKernelError, match="at least one thread"):
        load_native_linear(kernels_dir, threads=0)
    with pytest.raises(NativeKernelError, match="at least one thread"):
        load_native_pool(kernels_dir, threads=0)


def test_more_than_one_thread_runs_on_a_pool(kernels_dir: Path) -> None:
    """load_native_linear with threads > 1 brings the helper pool the step's other kernels share."""
    try:
        helped = load_native_linear(kernels_dir, threads=2)
    except NativeKernelError as exc:
        pytest.skip(f"no native Linear on this CPU: {exc}")
    assert helped.pool is not None and helped.pool.threads == 2 and helped.threads == 2
    assert load_native_linear(kernels_dir).pool is None


def test_zero_rows_give_an_empty_output(kernel: NativeLinear) -> None:
    w, _ = _weights(64, 64, seed=5)
    assert kernel(torch.empty(0, 64, dtype=torch.bfloat16), kernel.pack(w), None, 64).shape == (0, 64)


def test_shapes_and_tensors_it_does_not_take_are_refused(kernel: NativeLinear) -> None:
    assert not NativeLinear.takes(torch.zeros(48, 64, dtype=torch.bfloat16))  # out not a multiple of 32
    assert not NativeLinear.takes(torch.zeros(64, 40, dtype=torch.bfloat16))  # in not a multiple of 32
    assert not NativeLinear.takes(torch.zeros(64, 64))  # fp32
    with pytest.raises(NativeKernelError, match="does not take"):
        kernel.pack(torch.zeros(48, 64, dtype=torch.bfloat16))
    packed = kernel.pack(torch.zeros(64, 64, dtype=torch.bfloat16))
    with pytest.raises(NativeKernelError, match="contiguous bf16 rows"):
        kernel(torch.zeros(2, 32, dtype=torch.bfloat16), packed, None, 64)  # wrong width
    with pytest.raises(NativeKernelError, match="contiguous bf16 rows"):
        kernel(torch.zeros(2, 64), packed, None, 64)  # fp32 rows
    with pytest.raises(NativeKernelError, match="contiguous bf16 rows"):
        kernel(torch.zeros(64, 2, dtype=torch.bfloat16).t(), packed, None, 64)  # not contiguous
    rows = torch.zeros(2, 64, dtype=torch.bfloat16)
    with pytest.raises(NativeKernelError, match="fp32 bias of 64"):
        kernel(rows, packed, torch.zeros(32), 64)  # too short: the kernel would read past it
    with pytest.raises(NativeKernelError, match="fp32 bias of 64"):
        kernel(rows, packed, torch.zeros(64, dtype=torch.bfloat16), 64)
    with pytest.raises(NativeKernelError, match="packed weight"):
        kernel(rows, packed.float(), None, 64)
    # Found by an outside review: the kernel was handed a meta tensor's null address (a segfault), and
    # rows without a second dimension failed with an IndexError.
    meta = torch.empty(2, 64, dtype=torch.bfloat16, device="meta")
    with pytest.raises(NativeKernelError, match="CPU tensors only"):
        kernel(meta, packed, None, 64)
    with pytest.raises(NativeKernelError, match="CPU tensors only"):
        kernel(rows, packed, None, 64, out=meta)
    with pytest.raises(NativeKernelError, match=r"rows of \[M, in\]"):
        kernel(rows[0], packed, None, 64)


def test_the_module_keeps_the_weight_and_takes_any_leading_dims(kernel: NativeLinear) -> None:
    linear = nn.Linear(96, 160, bias=True).to(torch.bfloat16)
    module = NativeLinearModule(linear, kernel)
    assert module.weight is linear.weight and module.bias is linear.bias  # shared, not copied
    x3 = torch.randn(2, 5, 96).to(torch.bfloat16)  # [batch, seq, in]
    got = module(x3)
    assert got.shape == (2, 5, 160)
    torch.testing.assert_close(
        got.float(), F.linear(x3.float(), linear.weight.float(), linear.bias.float()), rtol=2**-7, atol=1e-4
    )
    # a strided view of rows is made contiguous, not refused
    wide = torch.randn(4, 192).to(torch.bfloat16)
    torch.testing.assert_close(module(wide[:, :96]), module(wide[:, :96].contiguous()), rtol=0, atol=0)


def test_the_module_runs_every_step_size_and_leaves_gradients_to_torch(
    kernel: NativeLinear, monkeypatch: pytest.MonkeyPatch, torch_threads_kept: None
) -> None:
    linear = nn.Linear(64, 64, bias=False).to(torch.bfloat16)
    module = NativeLinearModule(linear, kernel)
    calls: list[int] = []
    original = NativeLinear.__call__

    def counted(self: NativeLinear, x: torch.Tensor, *args: object) -> torch.Tensor:
        calls.append(x.shape[0])
        return original(self, x, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(NativeLinear, "__call__", counted)
    x = torch.randn(3, 64).to(torch.bfloat16)
    module(x.requires_grad_())
    assert calls == []
    for n in (1, 2):  # long prompt steps too, whatever torch's thread count
        torch.set_num_threads(n)
        module(torch.randn(200, 64).to(torch.bfloat16))
    assert calls == [200, 200]


class _Wrapper(nn.Module):
    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = _Wrapper(nn.Linear(64, 96))
        self.odd = _Wrapper(nn.Linear(64, 40))  # a shape the kernel does not take
        self.lm_head = nn.Linear(64, 128, bias=False)


def test_auto_packs_every_linear_it_takes_and_leaves_the_rest_to_onednn(kernels_dir: Path) -> None:
    try:
        best = load_native_linear(kernels_dir)
    except NativeKernelError as exc:
        pytest.skip(f"no native Linear on this CPU: {exc}")
    if best.isa == "avx512" and packed_linear_supported(torch.bfloat16):
        pytest.skip("without AMX auto times the kernel against oneDNN's (the next tests)")
    model = _Model().to(torch.bfloat16)
    head_weight = model.lm_head.weight
    choice = pack_base(model, [model.layer, model.odd], "auto", eligible=None, cache_dir=kernels_dir)
    assert choice.name == best.name and "2 Linears" in choice.reason
    assert isinstance(model.layer.base, NativeLinearModule)
    assert isinstance(model.lm_head, NativeLinearModule) and model.lm_head.weight is head_weight
    assert isinstance(model.odd.base, PackedLinear if packed_linear_supported(torch.bfloat16) else nn.Linear)


def test_torch_onednn_and_ineligible_bases(kernels_dir: Path) -> None:
    model = _Model().to(torch.bfloat16)
    assert pack_base(model, [model.layer], "torch", eligible=None, cache_dir=kernels_dir).name == "torch"
    assert type(model.layer.base) is nn.Linear
    why = "a quantized or compiled base keeps torch's Linears"
    kept = pack_base(model, [model.layer], "auto", eligible=why, cache_dir=kernels_dir)
    assert (kept.name, kept.reason) == ("torch", why) and type(model.layer.base) is nn.Linear
    for choice in ("native", "onednn"):
        with pytest.raises(NativeKernelError, match="needs a bf16 or fp32 base"):
            pack_base(model, [model.layer], choice, eligible=why, cache_dir=kernels_dir)  # type: ignore[arg-type]
    if packed_linear_supported(torch.bfloat16):
        assert pack_base(model, [model.layer], "onednn", eligible=None, cache_dir=kernels_dir).name == "onednn-packed"
        assert isinstance(model.layer.base, PackedLinear) and isinstance(model.lm_head, PackedLinear)


def _compiler_without(tmp_path: Path, name: str, flags: str) -> str:
    """The system's C compiler told not to target ``flags`` (a CPU without those extensions)."""
    wrapper = tmp_path / name
    wrapper.write_text(f'#!/bin/sh\nexec {find_compiler()} "$@" {flags}\n')
    wrapper.chmod(0o755)
    return str(wrapper)


def test_without_amx_or_avx512_bf16_auto_keeps_onednn_and_native_refuses_to_start(tmp_path: Path) -> None:
    """A library built for a CPU with neither AMX nor AVX512-BF16 says so."""
    neither = _compiler_without(tmp_path, "cc-plain", "-mno-amx-tile -mno-amx-bf16 -mno-amx-int8 -mno-avx512bf16")
    with pytest.raises(NativeKernelError, match=r"needs AMX-BF16.*needs AVX512-BF16"):
        load_native_linear(tmp_path / "cache", compiler=neither)
    model = _Model().to(torch.bfloat16)
    choice = pack_base(model, [model.layer], "auto", eligible=None, cache_dir=tmp_path / "cache", compiler=neither)
    assert "needs AMX-BF16" in choice.reason and not isinstance(model.lm_head, NativeLinearModule)
    for kind in ("native", "avx512"):
        with pytest.raises(NativeKernelError, match="needs AVX512-BF16"):
            pack_base(_Model(), [], kind, eligible=None, cache_dir=tmp_path / "c2", compiler=neither)  # type: ignore[arg-type]
    nowhere = pack_base(_Model().to(torch.bfloat16), [], "auto", eligible=None, cache_dir=None)
    assert "no directory" in nowhere.reason
    with pytest.raises(NativeKernelError, match="no directory"):
        pack_base(_Model().to(torch.bfloat16), [], "native", eligible=None, cache_dir=None)
    assert os.listdir(tmp_path / "cache")  # the library was built (and cached) all the same


@pytest.fixture
def avx512_runs(kernels_dir: Path) -> None:
    """Skips where the AVX-512 BF16 path does not run (the CPU, or the compiler's target, lacks it)."""
    try:
        load_native_linear(kernels_dir, isa="avx512")
    except NativeKernelError as exc:
        pytest.skip(f"no AVX-512 BF16 path here: {exc}")


@pytest.mark.usefixtures("avx512_runs")
def test_without_amx_native_is_the_avx512_kernel(tmp_path: Path) -> None:
    """A library built without AMX on an avx512_bf16 CPU runs the AVX-512 BF16 path; so does "avx512"
    on any such CPU, AMX or not; and neither is taken for an fp32 base."""
    no_amx = _compiler_without(tmp_path, "cc-no-amx", "-mno-amx-tile -mno-amx-bf16 -mno-amx-int8")
    assert load_native_linear(tmp_path / "cache", compiler=no_amx).isa == "avx512"
    model = _Model().to(torch.bfloat16)
    choice = pack_base(model, [model.layer], "native", eligible=None, cache_dir=tmp_path / "cache", compiler=no_amx)
    assert choice.name == "native-avx512" and "AVX-512 BF16" in choice.reason
    assert "needs AMX-BF16" in choice.reason  # why the AMX path was passed over
    assert isinstance(model.layer.base, NativeLinearModule) and model.layer.base.kernel.isa == "avx512"
    forced = pack_base(_Model().to(torch.bfloat16), [], "avx512", eligible=None, cache_dir=tmp_path / "c2")
    assert forced.name == "native-avx512"
    with pytest.raises(NativeKernelError, match="bf16 kernel"):
        pack_base(_Model(), [], "avx512", eligible=None, cache_dir=tmp_path / "c2", dtype=torch.float32)


@pytest.mark.usefixtures("avx512_runs")
@pytest.mark.parametrize(
    ("native_ms", "chosen"), [(10.0, "native-avx512"), (10.9, "native-avx512"), (11.0, "onednn-packed")]
)
def test_without_amx_auto_keeps_the_native_kernel_unless_onednn_times_clearly_faster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, native_ms: float, chosen: str
) -> None:
    """Without AMX both are compute-bound: auto times them at load and keeps the native kernel unless
    oneDNN's is PACKED_MIN_GAIN (1.1) times faster, at the decode steps' thread count."""
    if not packed_linear_supported(torch.bfloat16):
        pytest.skip("no prepacked oneDNN bf16 linear in this torch build")
    monkeypatch.setattr(native_module, "LINEAR_ISAS", ("avx512",))  # as on a CPU without AMX
    timed: list[tuple[tuple[int, ...], tuple[str, ...]]] = []

    def fake_timing(
        model: nn.Module, bases: list[nn.Module], threads: tuple[int, ...], candidates: dict[str, object]
    ) -> LinearTiming:
        timed.append((tuple(threads), tuple(candidates)))
        return LinearTiming(32, tuple(threads), 20.0, (("native-avx512", native_ms), ("onednn-packed", 10.0)))

    monkeypatch.setattr(packed_module, "time_linears", fake_timing)
    model = _Model().to(torch.bfloat16)
    choice = pack_base(
        model, [model.layer], "auto", eligible=None, cache_dir=tmp_path / "cache", measure_threads=(1, 2)
    )
    assert timed == [((1,), ("native-avx512", "onednn-packed"))]
    assert choice.name == chosen and "32 rows on 1 thread(s)" in choice.reason
    want = NativeLinearModule if chosen == "native-avx512" else PackedLinear
    assert isinstance(model.layer.base, want) and isinstance(model.lm_head, want)
