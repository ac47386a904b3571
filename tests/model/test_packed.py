"""Prepacked oneDNN Linears (model/packed.py): F.linear's result for every row count and shape, in bf16
and fp32, and how pack_base chooses them for an fp32 base (timed at load)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorafleet_server.model import packed as packed_module
from lorafleet_server.model.native import NativeKernelError
from lorafleet_server.model.packed import (
    PACK_BATCH_HINT,
    PACKED_MAX_ROWS,
    PACKED_MIN_GAIN,
    PackedLinear,
    PackedTiming,
    pack_base,
    pack_linears,
    packed_linear_supported,
    time_packed,
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
def test_time_packed_times_each_shape_once_at_each_thread_count(
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
    timing = time_packed(model, model.bases(), (1, 2), repeats=2)
    assert torch.get_num_threads() == 1  # torch's setting is restored
    assert (timing.rows, timing.threads) == (PACK_BATCH_HINT, (1, 2))
    assert timing.plain_ms > 0 and timing.packed_ms > 0
    # two shapes (16->16 twice, the 16->40 head), two thread counts, a warm-up and 2 timed calls each;
    # the packed calls (32 rows, below the limit) never reach F.linear
    assert len(calls) == 2 * 2 * 3 and {rows for rows, _, _ in calls} == {PACK_BATCH_HINT}
    assert {t for _, _, t in calls} == {1, 2}
    assert "32 rows on 1+2 thread(s)" in timing.describe()


@FP32
def test_time_packed_sums_medians_weighted_by_how_many_linears_share_a_shape(
    monkeypatch: pytest.MonkeyPatch, torch_threads_kept: None
) -> None:
    """A clock that advances 1 ms per F.linear call and 3 ms per packed call of the 16->16 shape, 2 and
    1 ms for the 16->40 head; the first (warm-up) call of each takes 100 ms and is left out."""
    model = _Model()
    now = [0.0]
    cost = {16: (0.001, 0.003), 40: (0.002, 0.001)}  # out features -> (F.linear, packed) seconds
    calls = [0]
    real_linear = F.linear
    real_packed = PackedLinear.forward

    def clock() -> float:
        return now[0]

    def plain(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        calls[0] += 1
        now[0] += 0.1 if calls[0] % 4 == 1 else cost[weight.shape[0]][0]
        return real_linear(x, weight, bias)

    def packed(self: PackedLinear, x: torch.Tensor) -> torch.Tensor:
        now[0] += 0.1 if calls[0] % 4 == 1 else cost[self.out_features][1]
        return real_packed(self, x)

    monkeypatch.setattr(packed_module.time, "perf_counter", clock)
    monkeypatch.setattr(packed_module.F, "linear", plain)
    monkeypatch.setattr(PackedLinear, "forward", packed)
    timing = time_packed(model, model.bases(), (1,), repeats=3)
    # 16->16: two Linears (layer, twin) at 1 / 3 ms; the head: one at 2 / 1 ms
    assert timing.plain_ms == pytest.approx(2 * 1 + 2)
    assert timing.packed_ms == pytest.approx(2 * 3 + 1)
    assert not timing.packed_wins


def _timed(plain_ms: float, packed_ms: float, seen: list[tuple[int, ...]]) -> object:
    def fake(model: nn.Module, bases: list[nn.Module], threads: tuple[int, ...]) -> PackedTiming:
        seen.append(tuple(threads))
        return PackedTiming(PACK_BATCH_HINT, tuple(threads), plain_ms, packed_ms)

    return fake


@FP32
def test_an_fp32_base_is_packed_by_auto_only_where_timed_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[int, ...]] = []
    monkeypatch.setattr(packed_module, "time_packed", _timed(10.0, 6.0, seen))
    model = _Model()
    head_weight = model.lm_head.weight
    faster = pack_base(
        model, model.bases(), "auto", eligible=None, cache_dir=None, dtype=torch.float32, measure_threads=(1, 2)
    )
    assert faster.name == "onednn-packed" and "prepacked 6.0 ms, F.linear 10.0 ms (1.67x)" in faster.reason
    assert seen == [(1, 2)]
    assert isinstance(model.layer.base, PackedLinear) and isinstance(model.twin.base, PackedLinear)
    assert isinstance(model.lm_head, PackedLinear) and model.lm_head.weight is head_weight

    # slower, or faster by less than PACKED_MIN_GAIN: F.linear stays
    for plain_ms in (6.0, 10.0 * PACKED_MIN_GAIN - 0.1):
        monkeypatch.setattr(packed_module, "time_packed", _timed(plain_ms, 10.0, seen))
        model = _Model()
        kept = pack_base(model, model.bases(), "auto", eligible=None, cache_dir=None, dtype=torch.float32)
        assert kept.name == "torch" and f"not {PACKED_MIN_GAIN}x faster" in kept.reason
        assert seen[-1] == (torch.get_num_threads(),)  # no thread counts given: torch's current one
        assert type(model.layer.base) is nn.Linear and type(model.lm_head) is nn.Linear
    # no plain Linear to time: nothing to pack, and the reason does not divide by zero
    monkeypatch.setattr(packed_module, "time_packed", time_packed)
    empty = nn.Module()
    none = pack_base(empty, [], "auto", eligible=None, cache_dir=None, dtype=torch.float32)
    assert none.name == "torch" and "prepacked 0.0 ms, F.linear 0.0 ms" in none.reason


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
def test_an_fp32_base_takes_onednn_or_torch_when_asked_and_refuses_the_native_linear(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def never(*args: object, **kwargs: object) -> PackedTiming:
        raise AssertionError("a kernel asked for by name is not timed")

    monkeypatch.setattr(packed_module, "time_packed", never)
    model = _Model()
    asked = pack_base(model, model.bases(), "onednn", eligible=None, cache_dir=tmp_path, dtype=torch.float32)
    assert asked.name == "onednn-packed" and isinstance(model.lm_head, PackedLinear)
    model = _Model()
    plain = pack_base(model, model.bases(), "torch", eligible=None, cache_dir=tmp_path, dtype=torch.float32)
    assert plain.name == "torch" and type(model.lm_head) is nn.Linear
    with pytest.raises(NativeKernelError, match="computes in bf16"):
        pack_base(_Model(), [], "native", eligible=None, cache_dir=tmp_path, dtype=torch.float32)
    assert not list(tmp_path.iterdir())  # nothing was built for it
