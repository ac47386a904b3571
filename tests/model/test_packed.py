"""Prepacked oneDNN Linears (model/packed.py): F.linear's result for every row count and shape, in bf16
and fp32, and how pack_base chooses among them, the native fp32 Linear and F.linear for an fp32 base
(timed at load)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorafleet_server.model import native as native_module
from lorafleet_server.model import packed as packed_module
from lorafleet_server.model.native import NativeCpuUnsupported, NativeKernelError, find_compiler
from lorafleet_server.model.packed import (
    PACK_BATCH_HINT,
    PACKED_MAX_ROWS,
    PACKED_MIN_GAIN,
    LinearTiming,
    NativeLinearModule,
    PackedLinear,
    pack_base,
    pack_linears,
    packed_linear_supported,
    time_linears,
)

BF16 = pytest.mark.skipif(
    not packed_linear_supported(torch.bfloat16), reason="this torch build has no prepacked oneDNN bf16 linear"
)
FP32 = pytest.mark.skipif(
    not packed_linear_supported(torch.float32), reason="this torch build has no prepacked oneDNN fp32 linear"
)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, marks=BF16), pytest.param(torch.float32, marks=FP32)])
def test_packed_linear_matches_f_linear_below_and_above_the_row_limit(bias: bool, dtype: torch.dtype) -> None:
    """bf16: the same bits as F.linear (oneDNN either way). fp32: F.linear is MKL's GEMM, which sums in
    another order, so the packed rows agree to fp32 rounding; above the limit the layer is F.linear."""
    torch.manual_seed(0)
    linear = nn.Linear(96, 160, bias=bias).to(dtype)
    packed = PackedLinear(linear)
    assert packed.weight is linear.weight  # the plain weight is shared, not copied
    tol = 0.0 if dtype == torch.bfloat16 else 1e-5
    for rows in (1, 7, 32, PACKED_MAX_ROWS, PACKED_MAX_ROWS + 1, 300):
        x = torch.randn(rows, 96).to(dtype)  # [rows, in]
        exact = rows > PACKED_MAX_ROWS
        torch.testing.assert_close(
            packed(x), F.linear(x, linear.weight, linear.bias), rtol=0, atol=0.0 if exact else tol
        )
    x3 = torch.randn(2, 5, 96).to(dtype)  # [batch, seq, in]: HF-style leading dims
    assert packed(x3).shape == (2, 5, 160)
    torch.testing.assert_close(packed(x3), F.linear(x3, linear.weight, linear.bias), rtol=0, atol=tol)


def _wrapped(base: nn.Module) -> nn.Module:
    """What the LoRA wrappers are to pack_base: a module whose ``base`` is the Linear."""
    wrapper = nn.Module()
    wrapper.base = base
    return wrapper


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = _wrapped(nn.Linear(16, 16))
        self.twin = _wrapped(nn.Linear(16, 16))  # the same shape: timed once, counted twice
        self.other = _wrapped(nn.Identity())  # not a plain Linear (e.g. a quantized one): kept
        self.lm_head = nn.Linear(16, 40, bias=False)

    def bases(self) -> list[nn.Module]:
        return [self.layer, self.twin, self.other]


@BF16
def test_pack_linears_replaces_wrapped_bases_and_the_head_only() -> None:
    model = _Model().to(torch.bfloat16)
    head_weight = model.lm_head.weight
    assert pack_linears(model, model.bases()) == 3
    assert isinstance(model.layer.base, PackedLinear) and isinstance(model.other.base, nn.Identity)
    assert isinstance(model.lm_head, PackedLinear) and model.lm_head.weight is head_weight


@FP32
def test_time_linears_times_each_shape_once_at_each_thread_count(
    monkeypatch: pytest.MonkeyPatch, torch_threads_kept: None
) -> None:
    model = _Model()
    calls: list[tuple[int, int, int]] = []  # (rows, in, threads) of each F.linear call
    real = F.linear

    def counted(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        calls.append((x.shape[0], x.shape[1], torch.get_num_threads()))
        return real(x, weight, bias)

    monkeypatch.setattr(packed_module.F, "linear", counted)
    torch.set_num_threads(1)
    timing = time_linears(model, model.bases(), (1, 2), {"onednn-packed": PackedLinear}, repeats=2)
    assert torch.get_num_threads() == 1  # torch's setting is restored
    assert (timing.rows, timing.threads) == (PACK_BATCH_HINT, (1, 2))
    assert timing.plain_ms > 0 and dict(timing.candidates)["onednn-packed"] > 0
    # two shapes (16->16 twice, the 16->40 head), two thread counts, a warm-up and 2 timed calls each;
    # the packed calls (32 rows, below the limit) never reach F.linear
    assert len(calls) == 2 * 2 * 3 and {rows for rows, _, _ in calls} == {PACK_BATCH_HINT}
    assert {t for _, _, t in calls} == {1, 2}
    assert "32 rows on 1+2 thread(s)" in timing.describe()


class _Slow(nn.Module):
    """A candidate that advances the fake clock of the test below by its cost per out-width (a call
    after the first of each four, which warms up and costs 100 ms)."""

    def __init__(self, linear: nn.Linear, clock: list[float], cost: dict[int, float], calls: list[int]) -> None:
        super().__init__()
        self.linear, self.clock, self.cost, self.calls = linear, clock, cost, calls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.clock[0] += 0.1 if self.calls[0] % 4 == 1 else self.cost[self.linear.out_features]
        return x @ self.linear.weight.t()  # not F.linear: the test counts those calls


def test_time_linears_sums_medians_weighted_by_how_many_linears_share_a_shape(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A clock that advances, per call of the 16->16 shape, 1 ms for F.linear, 3 ms for candidate a and
    0.5 ms for b; 2, 1 and 0.5 ms for the 16->40 head; the first (warm-up) call of each takes 100 ms and
    is left out."""
    model = _Model()
    now = [0.0]
    calls = [0]
    real_linear = F.linear
    plain_cost = {16: 0.001, 40: 0.002}

    def plain(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        calls[0] += 1
        now[0] += 0.1 if calls[0] % 4 == 1 else plain_cost[weight.shape[0]]
        return real_linear(x, weight, bias)

    def make(cost: dict[int, float]) -> object:
        return lambda linear: _Slow(linear, now, cost, calls)

    monkeypatch.setattr(packed_module.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(packed_module.F, "linear", plain)
    candidates = {"a": make({16: 0.003, 40: 0.001}), "b": make({16: 0.0005, 40: 0.0005})}
    timing = time_linears(model, model.bases(), (1,), candidates, repeats=3)  # type: ignore[arg-type]
    # 16->16: two Linears (layer, twin); the head: one
    assert timing.plain_ms == pytest.approx(2 * 1 + 2)
    assert dict(timing.candidates) == pytest.approx({"a": 2 * 3 + 1, "b": 2 * 0.5 + 0.5})
    assert timing.best == "b"  # 1.5 ms against F.linear's 4: the fastest, and by more than the margin
    assert "F.linear 4.0 ms, a 7.0 ms (0.57x), b 1.5 ms (2.67x)" in timing.describe()


def test_the_best_candidate_must_beat_f_linear_by_the_margin() -> None:
    def timing(plain_ms: float, *candidates: tuple[str, float]) -> LinearTiming:
        return LinearTiming(PACK_BATCH_HINT, (1,), plain_ms, candidates)

    assert timing(10.0, ("a", 6.0), ("b", 8.0)).best == "a"
    assert timing(10.0, ("a", 9.5)).best is None  # faster, but by less than PACKED_MIN_GAIN
    assert timing(10.0 * PACKED_MIN_GAIN, ("a", 10.0)).best == "a"
    assert timing(10.0).best is None and timing(0.0, ("a", 0.0)).best is None  # nothing timed
    assert timing(0.0, ("a", 0.0)).describe() == "32 rows on 1 thread(s): F.linear 0.0 ms, a 0.0 ms"


def _timed(plain_ms: float, ms: dict[str, float], seen: list[tuple[tuple[int, ...], tuple[str, ...]]]) -> object:
    def fake(
        model: nn.Module, bases: list[nn.Module], threads: tuple[int, ...], candidates: dict[str, object]
    ) -> LinearTiming:
        seen.append((tuple(threads), tuple(candidates)))
        return LinearTiming(PACK_BATCH_HINT, tuple(threads), plain_ms, tuple((n, ms[n]) for n in candidates))

    return fake


NATIVE = pytest.mark.skipif(find_compiler() is None, reason="no C compiler on this machine")


@FP32
@NATIVE
def test_an_fp32_base_takes_the_fastest_kernel_timed_at_load(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: list[tuple[tuple[int, ...], tuple[str, ...]]] = []
    monkeypatch.setattr(packed_module, "time_linears", _timed(10.0, {"native-fp32": 5.0, "onednn-packed": 6.0}, seen))
    model = _Model()
    head_weight = model.lm_head.weight
    fastest = pack_base(
        model, model.bases(), "auto", eligible=None, cache_dir=tmp_path, dtype=torch.float32, measure_threads=(1, 2)
    )
    assert fastest.name == "native-fp32" and "native-fp32 5.0 ms (2.00x)" in fastest.reason
    assert "onednn-packed 6.0 ms (1.67x)" in fastest.reason and "3 Linears" in fastest.reason
    assert seen == [((1, 2), ("native-fp32", "onednn-packed"))]
    assert isinstance(model.layer.base, NativeLinearModule) and isinstance(model.twin.base, NativeLinearModule)
    assert isinstance(model.lm_head, NativeLinearModule) and model.lm_head.weight is head_weight

    monkeypatch.setattr(packed_module, "time_linears", _timed(10.0, {"native-fp32": 7.0, "onednn-packed": 6.0}, seen))
    model = _Model()
    onednn = pack_base(model, model.bases(), "auto", eligible=None, cache_dir=tmp_path, dtype=torch.float32)
    assert onednn.name == "onednn-packed" and "timed fastest" in onednn.reason
    assert isinstance(model.lm_head, PackedLinear)
    assert seen[-1][0] == (torch.get_num_threads(),)  # no thread counts given: torch's current one


@FP32
def test_an_fp32_base_keeps_f_linear_where_nothing_is_clearly_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[tuple[int, ...], tuple[str, ...]]] = []
    # slower, or faster by less than PACKED_MIN_GAIN: F.linear stays
    for plain_ms in (6.0, 10.0 * PACKED_MIN_GAIN - 0.1):
        monkeypatch.setattr(packed_module, "time_linears", _timed(plain_ms, {"onednn-packed": 10.0}, seen))
        model = _Model()
        # no kernels directory: the native Linear is not built, oneDNN's is the only candidate
        kept = pack_base(model, model.bases(), "auto", eligible=None, cache_dir=None, dtype=torch.float32)
        assert kept.name == "torch" and f"no replacement {PACKED_MIN_GAIN}x faster" in kept.reason
        assert "native fp32 Linear unavailable: no directory to build it in" in kept.reason
        assert seen[-1][1] == ("onednn-packed",)
        assert type(model.layer.base) is nn.Linear and type(model.lm_head) is nn.Linear
    # no plain Linear to time: nothing to replace, and the reason does not divide by zero
    monkeypatch.setattr(packed_module, "time_linears", time_linears)
    none = pack_base(nn.Module(), [], "auto", eligible=None, cache_dir=None, dtype=torch.float32)
    assert none.name == "torch" and "F.linear 0.0 ms, onednn-packed 0.0 ms" in none.reason


def test_without_a_working_prepacked_fp32_linear_auto_keeps_torch_and_onednn_refuses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(packed_module, "packed_linear_supported", lambda dtype: False)
    model = _Model()
    kept = pack_base(model, model.bases(), "auto", eligible=None, cache_dir=None, dtype=torch.float32)
    assert kept.name == "torch" and "no prepacked oneDNN fp32 linear" in kept.reason
    assert type(model.lm_head) is nn.Linear
    with pytest.raises(NativeKernelError, match="no working prepacked fp32 linear"):
        pack_base(model, model.bases(), "onednn", eligible=None, cache_dir=None, dtype=torch.float32)


@FP32
@NATIVE
def test_an_fp32_base_takes_the_kernel_asked_for_by_name_untimed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def never(*args: object, **kwargs: object) -> LinearTiming:
        raise AssertionError("a kernel asked for by name is not timed")

    monkeypatch.setattr(packed_module, "time_linears", never)
    model = _Model()
    asked = pack_base(model, model.bases(), "onednn", eligible=None, cache_dir=tmp_path, dtype=torch.float32)
    assert asked.name == "onednn-packed" and isinstance(model.lm_head, PackedLinear)
    model = _Model()
    plain = pack_base(model, model.bases(), "torch", eligible=None, cache_dir=tmp_path, dtype=torch.float32)
    assert plain.name == "torch" and type(model.lm_head) is nn.Linear
    model = _Model()
    native = pack_base(model, model.bases(), "native", eligible=None, cache_dir=tmp_path, dtype=torch.float32)
    assert native.name == "native-fp32" and "--linear-kernel native" in native.reason
    assert isinstance(model.lm_head, NativeLinearModule)
    x = torch.randn(5, 16)
    torch.testing.assert_close(model.lm_head(x), F.linear(x, model.lm_head.weight), rtol=1e-5, atol=1e-5)
    with pytest.raises(NativeKernelError, match="no directory"):
        pack_base(_Model(), [], "native", eligible=None, cache_dir=None, dtype=torch.float32)


@NATIVE
@pytest.mark.usefixtures("openmp_compiler")  # else the OpenMP build fails first, for want of OpenMP
def test_on_a_cpu_without_avx2_native_refuses_and_auto_times_the_rest(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A library built for a CPU without AVX2 and FMA (here: this CPU's flags minus those two) says so:
    `native` refuses to start, `auto` goes on without it, and no build without OpenMP is tried."""
    monkeypatch.setattr(native_module, "OPENMP_CFLAGS", (*native_module.OPENMP_CFLAGS, "-mno-avx2", "-mno-fma"))
    builds: list[tuple[str, ...]] = []
    real_build = native_module.build_library

    def counted(name: str, cache_dir: Path, compiler: str | None = None, flags: tuple[str, ...] = ()) -> Path:
        builds.append(flags)
        return real_build(name, cache_dir, compiler, flags or native_module.CFLAGS)

    monkeypatch.setattr(native_module, "build_library", counted)
    with pytest.raises(NativeCpuUnsupported, match="AVX2 and FMA"):
        pack_base(_Model(), [], "native", eligible=None, cache_dir=tmp_path, dtype=torch.float32)
    assert builds == [native_module.OPENMP_CFLAGS]  # the CPU, not OpenMP: no retry without it
    seen: list[tuple[tuple[int, ...], tuple[str, ...]]] = []
    monkeypatch.setattr(packed_module, "time_linears", _timed(10.0, {"onednn-packed": 6.0}, seen))
    model = _Model()
    auto = pack_base(model, model.bases(), "auto", eligible=None, cache_dir=tmp_path, dtype=torch.float32)
    assert "native fp32 Linear unavailable: the native fp32 Linear needs a CPU with AVX2 and FMA" in auto.reason
    if packed_linear_supported(torch.float32):
        assert auto.name == "onednn-packed" and seen[-1][1] == ("onednn-packed",)
    else:
        assert auto.name == "torch" and not seen
