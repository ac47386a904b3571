"""Base Linears with their weight also prepacked for a faster kernel, for bf16 or fp32 on CPU.

``F.linear`` in bf16 on a CPU reorders the weight into oneDNN's blocked layout on every call; for the
few rows of a decode step that reorder is a large share of the call. Prepacking it once
(``torch.ops.mkldnn._reorder_linear_weight``, what inductor's freezing does for ``torch.compile``)
and calling ``torch.ops.mkldnn._linear_pointwise`` skips it: measured here (docs/architecture.md,
"Compute dtype") ~1.3-1.9x on SmolLM2's layer shapes at 32 rows and ~1.3-2.4x on its 49,152-wide LM
head, the same outputs bit for bit, but slower than ``F.linear`` for long prefills (512 rows: 0.6-0.7x).
So the layer keeps both: the packed weight for steps of up to ``PACKED_MAX_ROWS`` rows, the plain
one (shared with the model, no copy) above.

In fp32 ``F.linear`` is MKL's GEMM, which on some CPUs splits a few rows poorly over threads (a 2-core
AMD EPYC: the LM head at 32 rows 32.7 ms on two threads against 15.7 ms prepacked) and on others is as
fast as the packed call. The native fp32 kernel (``csrc/linear_f32.c`` in a :class:`NativeLinearModule`:
AVX2 + FMA, its own packed panels, the step's torch threads) was faster than both there at 1-512 rows
(32 rows: ~180 GFLOP/s against ~100 and ~120), with each row's numbers independent of the step; built
for an AVX-512 CPU its blocks take twice the columns and rows at a time (32 rows: 1.4-1.65x the AVX2
build on an AMX Xeon, 1.3-1.9x F.linear). Which
is fastest is the machine's, so ``--linear-kernel auto`` times the candidates on the model's own
weights at load (:func:`time_linears`) and replaces fp32 Linears only where one is clearly faster than
F.linear (``PACKED_MIN_GAIN``).

The ops are private torch API; :func:`packed_linear_supported` checks once at load that they exist
and give ``F.linear``'s result, and the loader keeps plain Linears otherwise.

On a CPU with AMX the native Linear (``csrc/linear.c``, :class:`NativeLinearModule`) replaces them in
bf16: it streams each weight from DRAM at about twice the rate of oneDNN's call on decode steps and
gives every row the same numbers whatever the step's row count. On one with AVX512-BF16 and no AMX
its AVX-512 path does, unless oneDNN's times clearly faster at load: there both are compute-bound,
and the native one runs decode steps on every core (docs/architecture.md, "Measured facts" 21).
:func:`pack_base` makes the choice (``--linear-kernel``).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lorafleet_server.model.native import (
    NativeKernelError,
    NativeLinear,
    NativeLinearF32,
    NativePool,
    load_native_linear,
    load_native_linear_f32,
)
from lorafleet_server.model.options import LinearKernel

log = logging.getLogger(__name__)

PACKED_MAX_ROWS = 64  # rows (tokens) up to which the packed weight is used: decode and short chunks
PACK_BATCH_HINT = 32  # the row count oneDNN tunes the packed layout for: a full decode batch
# fp32 packs only where F.linear took at least this many times the prepacked call's time at load: where
# the two are about as fast, a coin flip at every start would change the kernel (and its rounding) and
# cost the packed copy's memory for nothing.
PACKED_MIN_GAIN = 1.1


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH_HINT)  # opaque blocked layout


def _packed_linear(x2: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x2, packed, bias, "none", [], "")


def packed_linear_supported(dtype: torch.dtype) -> bool:
    """Whether this torch build has the prepacked oneDNN linear for ``dtype`` and it matches F.linear."""
    if not torch.backends.mkldnn.is_available() or dtype not in (torch.bfloat16, torch.float32):
        return False
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 40, generator=gen).to(dtype)  # [out, in]
    bias = torch.randn(48, generator=gen).to(dtype)
    try:
        packed = _pack(weight)
        for rows in (1, 5, 32, 70):
            x = torch.randn(rows, 40, generator=gen).to(dtype)  # [rows, in]
            got = _packed_linear(x, packed, bias)
            tol = 1e-2 if dtype == torch.bfloat16 else 1e-4
            if not torch.allclose(got.float(), F.linear(x, weight, bias).float(), rtol=tol, atol=tol):
                log.warning("prepacked oneDNN linear differs from F.linear in %s: plain Linears kept", dtype)
                return False
    except (RuntimeError, AttributeError, NotImplementedError) as exc:
        log.info("no prepacked oneDNN linear in this torch build (%s): plain Linears kept", exc)
        return False
    return True


class PackedLinear(nn.Module):
    """``linear`` computed from a prepacked copy of its weight for small steps, from the weight itself
    for long ones. The plain weight stays the model's parameter (tied weights stay tied)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight  # [out, in], shared
        self.bias = linear.bias
        with torch.no_grad():
            self.packed: torch.Tensor = _pack(linear.weight.detach())  # opaque oneDNN layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., in] -> [..., out]
        x2 = x.reshape(-1, self.in_features)  # [rows, in]
        if x2.shape[0] > PACKED_MAX_ROWS or x.requires_grad:
            return F.linear(x, self.weight, self.bias)
        return _packed_linear(x2, self.packed, self.bias).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed (oneDNN)"


class NativeLinearModule(nn.Module):
    """``linear`` computed by a native kernel from its own packed copy of the weight, for steps of any
    size; the plain weight stays the model's parameter (tied weights stay tied) and serves gradients.
    The bf16 kernel (``csrc/linear.c``: AMX, or AVX-512 BF16 without it) runs on its own pool of threads
    (``--linear-threads``), not torch's: even on one thread the AMX one took a 256-token prefill step
    as fast as oneDNN's Linears on two (345 vs 342 ms). The fp32 kernel (``csrc/linear_f32.c``) runs on
    the step's torch threads and was as fast as MKL's GEMM at 512 rows. So every step takes them, and
    each row's result stays independent of the step's row count."""

    def __init__(self, linear: nn.Linear, kernel: NativeLinear | NativeLinearF32) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight  # [out, in], shared
        self.bias = linear.bias
        self.kernel = kernel
        with torch.no_grad():
            self.packed: torch.Tensor = kernel.pack(linear.weight)  # the kernel's panels
            self.bias_f32 = None if linear.bias is None else linear.bias.detach().float().contiguous()  # [out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., in] -> [..., out]
        if x.requires_grad or x.dtype != self.kernel.dtype:
            return F.linear(x, self.weight, self.bias)
        x2 = x.reshape(-1, self.in_features).contiguous()  # [rows, in]
        y = self.kernel(x2, self.packed, self.bias_f32, self.out_features)  # [rows, out]
        return y.view(*x.shape[:-1], self.out_features)

    def into(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:  # x [rows, in] -> out [rows, out]
        """``forward`` written into ``out`` (contiguous, x's dtype): a step's LM head reuses one buffer
        where a new multi-MB tensor would be a fresh mapping, its pages faulted in again each step."""
        if x.requires_grad or x.dtype != self.kernel.dtype:
            return out.copy_(F.linear(x, self.weight, self.bias))
        return self.kernel(x.contiguous(), self.packed, self.bias_f32, self.out_features, out)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed ({self.kernel.label})"


def _native_or(
    kernel: NativeLinear | NativeLinearF32, fallback: Callable[[nn.Linear], nn.Module] = lambda linear: linear
) -> Callable[[nn.Linear], nn.Module]:
    """What replaces a Linear: a :class:`NativeLinearModule` where ``kernel`` takes its weight, else
    ``fallback(linear)`` (default: the Linear itself)."""

    def make(linear: nn.Linear) -> nn.Module:
        return NativeLinearModule(linear, kernel) if kernel.takes(linear.weight) else fallback(linear)

    return make


def _plain_linear_places(model: nn.Module, bases: list[nn.Module]) -> Iterator[tuple[nn.Module, str, nn.Linear]]:
    """(owner, attribute, Linear) of each plain ``nn.Linear`` among ``bases`` (the LoRA wrappers'
    ``base``) and the LM head: what pack_base may replace."""
    for wrapper in bases:
        base = getattr(wrapper, "base", None)
        if type(base) is nn.Linear:
            yield wrapper, "base", base
    head = getattr(model, "lm_head", None)
    if type(head) is nn.Linear:
        yield model, "lm_head", head


def _replace_linears(model: nn.Module, bases: list[nn.Module], make: Callable[[nn.Linear], nn.Module]) -> int:
    """Replace each plain ``nn.Linear`` in ``bases`` (the LoRA wrappers' ``base``) and the LM head by
    ``make(linear)``; returns how many were replaced."""
    count = 0
    for owner, name, linear in _plain_linear_places(model, bases):
        setattr(owner, name, make(linear))
        count += 1
    return count


@dataclass(frozen=True)
class LinearTiming:
    """What :func:`time_linears` measured: one step's worth of base Linears (every Linear that would be
    replaced, once each) at ``rows`` rows, summed over the thread counts; medians of ``repeats``."""

    rows: int
    threads: tuple[int, ...]
    plain_ms: float  # F.linear
    candidates: tuple[tuple[str, float], ...]  # (kernel name, ms) of each replacement timed

    @property
    def best(self) -> str | None:
        """The fastest candidate where it is clearly faster than F.linear (by ``PACKED_MIN_GAIN`` or
        more), else None."""
        timed = [(ms, name) for name, ms in self.candidates if ms > 0]
        if not timed:
            return None
        ms, name = min(timed)
        return name if self.plain_ms >= PACKED_MIN_GAIN * ms else None

    def describe(self) -> str:
        counts = "+".join(str(t) for t in self.threads)
        parts = [f"F.linear {self.plain_ms:.1f} ms"]
        for name, ms in self.candidates:
            ratio = f" ({self.plain_ms / ms:.2f}x)" if ms > 0 else ""
            parts.append(f"{name} {ms:.1f} ms{ratio}")
        return f"{self.rows} rows on {counts} thread(s): " + ", ".join(parts)


def time_linears(
    model: nn.Module,
    bases: list[nn.Module],
    threads: Sequence[int],
    candidates: dict[str, Callable[[nn.Linear], nn.Module]],
    *,
    rows: int = PACK_BATCH_HINT,
    repeats: int = 3,
) -> LinearTiming:
    """Time F.linear against each candidate replacement (name -> a factory of the module that would
    replace a Linear) on the model's own weights: per distinct Linear shape (the first weight of that
    shape), ``rows`` random rows, all calls interleaved, median of ``repeats`` after one warm-up each,
    weighted by how many Linears have the shape; at each thread count in ``threads`` (torch's setting
    is restored). SmolLM2-135M, two candidates: ~1 s on 2 cores."""
    shapes: dict[tuple[int, int], tuple[nn.Linear, int]] = {}
    for _, _, linear in _plain_linear_places(model, bases):
        key = (linear.out_features, linear.in_features)
        first, count = shapes.get(key, (linear, 0))
        shapes[key] = (first, count + 1)
    gen = torch.Generator().manual_seed(0)
    kept = torch.get_num_threads()
    plain_ms = 0.0
    total = dict.fromkeys(candidates, 0.0)
    try:
        with torch.inference_mode():
            for linear, count in shapes.values():
                weight = linear.weight.detach()  # [out, in]
                x = torch.randn(rows, linear.in_features, generator=gen).to(weight.dtype)  # [rows, in]
                made = {name: make(linear) for name, make in candidates.items()}
                for n in threads:
                    torch.set_num_threads(n)
                    plain: list[float] = []
                    timed: dict[str, list[float]] = {name: [] for name in made}
                    for i in range(repeats + 1):
                        t0 = time.perf_counter()
                        F.linear(x, weight, linear.bias)
                        took = time.perf_counter() - t0
                        if i:  # the first call of each warms up
                            plain.append(took)
                        for name in made:  # no loop variable keeps a module (and its packed copy) alive
                            t0 = time.perf_counter()
                            made[name](x)
                            took = time.perf_counter() - t0
                            if i:
                                timed[name].append(took)
                    plain_ms += count * statistics.median(plain) * 1e3
                    for name, times in timed.items():
                        total[name] += count * statistics.median(times) * 1e3
                del made  # each candidate's packed copy of this weight, before the next shape's
    finally:
        torch.set_num_threads(kept)
    return LinearTiming(rows, tuple(threads), plain_ms, tuple(total.items()))


def pack_linears(model: nn.Module, bases: list[nn.Module]) -> int:
    """Replace each plain ``nn.Linear`` in ``bases`` and the LM head by a :class:`PackedLinear`; returns
    how many. Callers check :func:`packed_linear_supported` first."""
    return _replace_linears(model, bases, PackedLinear)


@dataclass(frozen=True)
class LinearChoice:
    """The base Linears' kernel (``GetModelInfo.linear_kernel``) and why (logged)."""

    name: str  # "native-amx", "native-avx512", "native-fp32", "onednn-packed" or "torch"
    reason: str
    # the helper threads the native bf16 Linears run on (more than one thread), which the step's other
    # native kernels share (model/native.py NativePool); None: none
    pool: NativePool | None = None


def pack_base(
    model: nn.Module,
    bases: list[nn.Module],
    choice: LinearKernel,
    *,
    eligible: str | None,
    cache_dir: Path | None,
    compiler: str | None = None,
    threads: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    measure_threads: Sequence[int] = (),
) -> LinearChoice:
    """``--linear-kernel`` for the base Linears of a loaded model. ``eligible`` is None for a bf16 or
    fp32 base (``dtype``) on the CPU, unquantized and not compiled, else why it is not (then only
    "torch" runs; the others are refused with NativeKernelError). "native" is the C kernel built in
    ``cache_dir`` for the dtype (bf16: AMX where the process may use it, else AVX-512 BF16, for every
    Linear of a shape it takes; fp32: AVX2 + FMA), NativeKernelError where it cannot run; "avx512" the
    AVX-512 BF16 one even where AMX runs (bf16 only: to compare the two); "onednn" oneDNN's prepacked
    Linear; "auto" in bf16 the native AMX kernel, else the native AVX-512 BF16 one unless oneDNN's
    measures ``PACKED_MIN_GAIN`` times faster at load (``time_linears`` at the first, smallest, of
    ``measure_threads``: the decode steps' torch threads on a 2-core machine), else oneDNN's, else
    plain torch (native only with a ``cache_dir``); in fp32 the fastest of native and oneDNN where
    :func:`time_linears` measures it ``PACKED_MIN_GAIN`` times faster than F.linear at
    ``measure_threads`` (default: torch's current count), else torch."""
    if choice == "torch":
        return LinearChoice("torch", "--linear-kernel torch")
    if eligible is not None:
        if choice != "auto":
            raise NativeKernelError(f"--linear-kernel {choice} needs a bf16 or fp32 base on the CPU: {eligible}")
        return LinearChoice("torch", eligible)
    if dtype == torch.float32:
        if choice == "avx512":
            raise NativeKernelError("--linear-kernel avx512 is the bf16 kernel: this base computes in fp32")
        return _pack_fp32(
            model, bases, choice, tuple(measure_threads) or (torch.get_num_threads(),), cache_dir, compiler
        )
    onednn = packed_linear_supported(torch.bfloat16)
    fallback = PackedLinear if onednn else (lambda linear: linear)
    why = ""
    if choice in ("auto", "native", "avx512"):
        try:
            if cache_dir is None:
                raise NativeKernelError("no directory to build it in")
            kernel = load_native_linear(cache_dir, compiler, threads, isa="avx512" if choice == "avx512" else None)
        except NativeKernelError as exc:
            if choice != "auto":
                raise
            why = f"native Linear unavailable: {exc}; "
        else:
            timed = ""
            if kernel.isa == "avx512" and choice == "auto" and onednn:
                # Without AMX the kernel is compute-bound like oneDNN's: measured here, not assumed. At
                # parity it is kept (the layer driver and bit-for-bit rows need it). One torch thread
                # for oneDNN where the machine has 2 cores: a team of two would spin on the core the
                # pool's helper is pinned to, and disturb the native calls timed next to it.
                timing = time_linears(
                    model,
                    bases,
                    tuple(measure_threads[:1]) or (torch.get_num_threads(),),
                    {kernel.name: _native_or(kernel, fallback), "onednn-packed": PackedLinear},
                )
                ms = dict(timing.candidates)
                if ms[kernel.name] >= PACKED_MIN_GAIN * ms["onednn-packed"]:
                    pack_linears(model, bases)
                    return LinearChoice(
                        "onednn-packed", f"oneDNN's prepacked bf16 linear, timed faster at load: {timing.describe()}"
                    )
                timed = f"; at load {timing.describe()}"
            _replace_linears(model, bases, _native_or(kernel, fallback))
            count = sum(isinstance(m, NativeLinearModule) for m in model.modules())
            passed_over = "".join(f"; {reason}" for reason in kernel.passed_over)  # e.g. the OS refused AMX
            return LinearChoice(
                kernel.name,
                f"{kernel.label} kernel for this CPU ({kernel.library.name}), {count} Linears, "
                f"{kernel.threads} thread(s){timed}{passed_over}",
                kernel.pool,
            )
    if not onednn:
        if choice == "onednn":
            raise NativeKernelError("--linear-kernel onednn: this torch build has no working prepacked oneDNN linear")
        return LinearChoice("torch", why + "no prepacked oneDNN linear in this torch build")
    pack_linears(model, bases)
    return LinearChoice("onednn-packed", why + "oneDNN's prepacked bf16 linear")


def _pack_fp32(
    model: nn.Module,
    bases: list[nn.Module],
    choice: LinearKernel,
    measure_threads: tuple[int, ...],
    cache_dir: Path | None,
    compiler: str | None,
) -> LinearChoice:
    """pack_base for an fp32 base. "native" is the AVX2 + FMA (or AVX-512) kernel (``csrc/linear_f32.c``, built in
    ``cache_dir``), "onednn" oneDNN's prepacked call; "auto" times both (where each runs here) against
    F.linear and takes the fastest where it is at least ``PACKED_MIN_GAIN`` times faster, else torch."""
    why: list[str] = []
    kernel: NativeLinearF32 | None = None
    if choice in ("auto", "native"):
        try:
            if cache_dir is None:
                raise NativeKernelError("no directory to build it in")
            kernel = load_native_linear_f32(cache_dir, compiler)
        except NativeKernelError as exc:
            if choice == "native":
                raise
            why.append(f"native fp32 Linear unavailable: {exc}")
    if kernel is not None and choice == "native":
        return _use_native_f32(model, bases, kernel, "--linear-kernel native")
    onednn = choice in ("auto", "onednn") and packed_linear_supported(torch.float32)
    if choice == "onednn":
        if not onednn:
            raise NativeKernelError("--linear-kernel onednn: this torch build has no working prepacked fp32 linear")
        pack_linears(model, bases)
        return LinearChoice("onednn-packed", "oneDNN's prepacked fp32 linear (--linear-kernel onednn)")
    if not onednn:
        why.append("no prepacked oneDNN fp32 linear in this torch build")
    candidates: dict[str, Callable[[nn.Linear], nn.Module]] = {}
    if kernel is not None:
        candidates["native-fp32"] = _native_or(kernel)
    if onednn:
        candidates["onednn-packed"] = PackedLinear
    if not candidates:
        return LinearChoice("torch", "; ".join(why))
    timing = time_linears(model, bases, measure_threads, candidates)
    prefix = "; ".join([*why, ""])
    best = timing.best
    if best == "native-fp32" and kernel is not None:
        return _use_native_f32(model, bases, kernel, f"{prefix}timed fastest at load: {timing.describe()}")
    if best == "onednn-packed":
        pack_linears(model, bases)
        return LinearChoice(
            "onednn-packed", f"{prefix}oneDNN's prepacked fp32 linear, timed fastest at load: {timing.describe()}"
        )
    return LinearChoice(
        "torch", f"{prefix}no replacement {PACKED_MIN_GAIN}x faster than F.linear at load: {timing.describe()}"
    )


def _use_native_f32(model: nn.Module, bases: list[nn.Module], kernel: NativeLinearF32, why: str) -> LinearChoice:
    _replace_linears(model, bases, _native_or(kernel))
    count = sum(isinstance(m, NativeLinearModule) for m in model.modules())
    threads = "the step's torch threads" if kernel.threaded else "one thread per call (no OpenMP)"
    return LinearChoice(
        "native-fp32",
        f"{kernel.isa} kernel for this CPU ({kernel.library.name}), {count} Linears, on {threads}; {why}",
    )
