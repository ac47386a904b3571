"""Native CPU kernels: C sources shipped in the package (``model/csrc``), compiled for this CPU.

The attention (``csrc/attention.c``) takes every token of a step as a row of one query: a decoding
row's token, or a prompt chunk's token i, attends over its KV row's first ``start + i + 1``
positions, read where they lie in the KV slab (torch's batched matmul copies a strided window of the
slab first), with fp32 sums in an order fixed per token. So a token's numbers depend on nothing but
its own query, keys and values: not on the other rows, the chunk around it, the thread that computes
it (a call splits its rows over the step's torch threads, or over the helper pool below), or how oneDNN
blocks a matmul of that many rows (docs/architecture.md, "Measured facts" 11). The multi-LoRA
(``csrc/lora.c``) adds each token's own adapter into a base Linear's output in place (fact 12). The
Linear (``csrc/linear.c``) computes bf16 base Linears on Intel AMX tiles (or with AVX-512 BF16 dot
products on CPUs without AMX, fact 21) from weights packed once, on the engine's thread and pinned
helper threads (fact 13), a pool (``csrc/pool.c``) the step's other
native kernels share when given it (fact 17); its fp32 sibling (``csrc/linear_f32.c``)
does fp32 ones with AVX2 and FMA (AVX-512 where the CPU has it) on the step's torch threads (fact 15). The transpose
(``csrc/transpose.c``) lays adapter weights out for the host cache while they load
(docs/architecture.md, "Cold loads").

It is plain C, built with the system's C compiler for the CPU it runs on (``-march=native``: machines
of one kind differ, AVX2 only or AVX-512), once per source, compiler and CPU: the library is cached
under ``cache_dir`` by a hash of the three, so a restart loads it in milliseconds and a new CPU or
source builds its own. It is loaded with ctypes (no Python or torch headers: a build takes 2-3 s,
once per CPU and source). Where no compiler is found the server keeps torch's path (``--attention-kernel
auto``) or refuses to start (``native``).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Generic, Literal, Protocol, TypeVar

import torch

from lorafleet_adapters.peft_format import Transposer, transpose_scaled
from lorafleet_server.model.cpu import cpu_flags_line
from lorafleet_server.model.options import AttentionKernel, LoraImpl

log = logging.getLogger(__name__)

ATTENTION_SOURCE = "attention.c"
CFLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-fopenmp-simd", "-fPIC", "-shared", "-std=c11")
# csrc/lora.c, csrc/attention.c and csrc/linear_f32.c with OpenMP: their calls split work over the calling
# thread's OpenMP team (the libgomp torch has loaded, bound by soname); where that does not build or load,
# CFLAGS (one thread).
OPENMP_CFLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", "-fPIC", "-shared", "-std=c11")
BUILD_TIMEOUT_S = 120.0
MAX_HEAD_DIM = 256  # csrc/attention.c's limits
MAX_GROUP = 16


class NativeKernelError(RuntimeError):
    """A native kernel cannot be built, loaded or run here (no compiler, a failed build, a shape it
    does not take). Raised at startup, never for a request."""


class NativeCpuUnsupported(NativeKernelError):
    """The kernel built, but this CPU lacks the instructions it needs (a build without OpenMP would not
    change that)."""


def find_compiler(preferred: str | None = None) -> str | None:
    """The C compiler's path: ``preferred`` (the server's ``--c-compiler``, a name on the PATH or a
    path) if given, else ``cc`` or ``gcc`` on the PATH; None where it is not found."""
    for name in [preferred] if preferred else ["cc", "gcc"]:
        path = shutil.which(name)
        if path is not None:
            return path
    return None


# csrc headers the sources include: next to every build, and in its cache key
HEADERS = ("amx.h", "bf16.h", "linear.h", "pool.h")


def _source(name: str) -> bytes:
    return (resources.files("lorafleet_server.model") / "csrc" / name).read_bytes()


def _compiler_version(compiler: str) -> str:
    try:
        done = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        raise NativeKernelError(f"{compiler} --version failed: {exc}") from exc
    return done.stdout.splitlines()[0] if done.stdout else ""


def is_clang(compiler: str) -> bool:
    """Whether ``compiler`` is clang or built on it (Intel's icx, Arm's and AMD's compilers), as the
    sources themselves tell: its preprocessor defines ``__clang__``. False where it cannot say (the
    build then reports the compiler's own error)."""
    try:
        done = subprocess.run(
            [compiler, "-dM", "-E", "-x", "c", os.devnull], capture_output=True, text=True, timeout=30, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return any(line.startswith("#define __clang__ ") for line in done.stdout.splitlines())


def for_compiler(flags: tuple[str, ...], clang: bool) -> tuple[str, ...]:
    """``flags`` (written for GCC) as the compiler takes them (``clang``: :func:`is_clang`). clang's
    ``-ffp-contract=fast`` fuses across statements *and* ignores ``#pragma clang fp contract(off)``,
    which the RoPE relies on to round like torch; its ``on`` fuses within a statement, where every
    kernel's multiply-adds are. (GCC before 14 takes ``on`` as ``off``: no FMAs at all.)"""
    if not clang:
        return flags
    return tuple("-ffp-contract=on" if flag == "-ffp-contract=fast" else flag for flag in flags)


def build_library(name: str, cache_dir: Path, compiler: str | None = None, flags: tuple[str, ...] = CFLAGS) -> Path:
    """The shared library of ``csrc/<name>`` for this CPU: built with ``flags`` (for_compiler) into
    ``cache_dir`` unless a build of the same source, compiler, flags and CPU is there already."""
    found = find_compiler(compiler)
    if found is None:
        raise NativeKernelError(
            f"the C compiler {compiler!r} is not found" if compiler else "no C compiler found (install gcc)"
        )
    compiler = found
    source = _source(name)
    headers = {header: _source(header) for header in HEADERS}
    version = _compiler_version(compiler)
    flags = for_compiler(flags, is_clang(compiler))
    key = hashlib.sha256()
    parts = (source, *headers.values(), version.encode(), " ".join(flags).encode())
    for part in (*parts, cpu_flags_line().encode()):
        key.update(part)
        key.update(b"\0")
    target = cache_dir / f"{Path(name).stem}-{key.hexdigest()[:16]}.so"
    if target.is_file():
        return target
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".build-") as tmp:
            src = Path(tmp) / name
            src.write_bytes(source)
            for header, text in headers.items():
                (Path(tmp) / header).write_bytes(text)
            out = Path(tmp) / target.name
            done = subprocess.run(
                [compiler, *flags, "-o", str(out), str(src), "-lm"],
                capture_output=True,
                text=True,
                timeout=BUILD_TIMEOUT_S,
                check=False,
            )
            if done.returncode != 0:
                raise NativeKernelError(f"building {name} failed: {done.stderr.strip()[-2000:]}")
            os.replace(out, target)  # atomic: a concurrent start sees the whole library or none
    except (OSError, subprocess.SubprocessError) as exc:
        raise NativeKernelError(f"building {name} in {cache_dir} failed: {exc}") from exc
    return target


def _functions(library: Path, signatures: dict[str, list[Any]]) -> tuple[ctypes.CDLL, dict[str, Any]]:
    """Load ``library`` and its functions by name, each returning a C int and taking ``signatures[name]``;
    NativeKernelError when the library or a function is missing."""
    try:
        lib = ctypes.CDLL(str(library))
        fns = {name: getattr(lib, name) for name in signatures}
    except (OSError, AttributeError) as exc:
        raise NativeKernelError(f"cannot load {library}: {exc}") from exc
    for name, fn in fns.items():
        fn.restype = ctypes.c_int
        fn.argtypes = signatures[name]
    return lib, fns


def c_address(fn: Any) -> int:
    """The C address of a function loaded through ctypes (the kernels take the pool's, csrc/layers.c
    every kernel's)."""
    return int(ctypes.cast(fn, ctypes.c_void_p).value or 0)


POOL_SOURCE = "pool.c"


class NativePool:
    """``csrc/pool.c`` through ctypes: helper threads pinned to cores of their own, shared by every native
    kernel call given this pool (``threads``: the calling thread and ``threads - 1`` helpers). The
    native bf16 Linear runs on it; with it the attention and the multi-LoRA of the same step do too, instead of a
    second thread of torch's OpenMP team that would share a core with a spinning helper
    (docs/architecture.md, "Measured facts" 17). One pool per process: every NativePool of the same
    library drives the same helpers."""

    def __init__(self, library: Path, threads: int) -> None:
        if threads < 1:
            raise NativeKernelError(f"the native thread pool needs at least one thread, not {threads}")
        lib, fns = _functions(
            library,
            {
                "lf_pool_helpers": [],
                "lf_pool_run": [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int],
                "lf_pool_set_pinning": [ctypes.c_int],
            },
        )
        self.pinned = pin_helpers(len(os.sched_getaffinity(0)), cgroup_cpu_limit())
        fns["lf_pool_set_pinning"](int(self.pinned))
        self.library = library
        self._lib = lib  # keeps the library loaded while kernels hold the address of its lf_pool_run
        self.threads = threads
        self._helpers = fns["lf_pool_helpers"]
        # what kernel calls take as their pool argument
        self.address = ctypes.c_void_p(c_address(fns["lf_pool_run"]))

    @property
    def helpers(self) -> int:
        """How many helper threads run in this process."""
        return int(self._helpers())


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPUs this process's cgroup may use (its CFS quota / period), None when unlimited or unknown."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]  # cgroup v2: "max 100000" or "200000 100000"
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def pin_helpers(cpus: int, limit: float | None) -> bool:
    """Whether the pool pins its helpers to cores of their own (``cpus`` in this process's CPU set, its
    cgroup's CPU ``limit``): only where it may use every CPU it may run on. Under a smaller quota (a
    Kubernetes pod without exclusive cores on a shared node) every replica pinned its helpers to the
    same last cores of the node while the others idled."""
    pinned = limit is None or limit >= cpus
    if not pinned:
        log.info("native pool: helpers not pinned (CPU quota %.2f of the %d CPUs in its set)", limit, cpus)
    return pinned


def load_native_pool(cache_dir: Path, threads: int, compiler: str | None = None) -> NativePool:
    """Build (or find in ``cache_dir``) and load the helper pool; its helpers start with the first call
    that needs them."""
    return NativePool(build_library(POOL_SOURCE, cache_dir, compiler), threads)


def threads_and_pool(pool: NativePool | None) -> tuple[int, ctypes.c_void_p | None]:
    """A kernel call's threads and pool argument: the pool's, or the step's torch threads (an OpenMP
    team torch keeps warm; model/threads.py) and no pool."""
    if pool is not None:
        return pool.threads, pool.address
    return torch.get_num_threads(), None


@dataclass(frozen=True)
class AttentionRows:
    """The tokens of one step, as the kernel takes them (built once per step): B rows of one query each."""

    tok: torch.Tensor  # [B] int64: each row's token in the step (its query and output index)
    kv_row: torch.Tensor  # [B] int64: its KV slab row
    length: torch.Tensor  # [B] int64: its key count (positions [0, length) of its KV row)

    @staticmethod
    def of(tok: list[int], kv_row: list[int], length: list[int]) -> AttentionRows:
        return AttentionRows(
            tok=torch.tensor(tok, dtype=torch.long),
            kv_row=torch.tensor(kv_row, dtype=torch.long),
            length=torch.tensor(length, dtype=torch.long),
        )

    @property
    def count(self) -> int:
        return int(self.tok.numel())


# q, k_slab, v_slab, out, tok, kv_row, len; count, tokens, kv_rows, heads, kv_heads, max_seq_len, head_dim;
# scale, bf16, threads, pool
_ARGTYPES: list[Any] = [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 7 + [ctypes.c_float, ctypes.c_int, ctypes.c_int]
_ARGTYPES += [ctypes.c_void_p]


# q, k, v, cos, sin, k_slab, v_slab, kv_row, pos; n, heads, kv_heads, head_dim, kv_rows, max_seq_len; bf16,
# threads; pool
_ROPE_KV_ARGTYPES: list[Any] = [ctypes.c_void_p] * 9 + [ctypes.c_int64] * 6 + [ctypes.c_int] * 2 + [ctypes.c_void_p]
# x, delta, w, out; n, d; eps; bf16, threads; pool
_RMSNORM_ARGTYPES: list[Any] = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2 + [ctypes.c_float]
_RMSNORM_ARGTYPES += [ctypes.c_int] * 2 + [ctypes.c_void_p]
# gate, up, out; n, d; bf16, threads; pool
_SILU_MUL_ARGTYPES: list[Any] = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_int] * 2 + [ctypes.c_void_p]
_ARGMAX_ARGTYPES: list[Any] = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2 + [ctypes.c_int] * 2 + [ctypes.c_void_p]
GLUE_DTYPES = (torch.float32, torch.bfloat16)  # what rope_kv_, add_rmsnorm_, silu_mul and argmax_rows take


class NativeAttention:
    """``csrc/attention.c`` through ctypes: one call per layer does every token of the step, split over
    ``pool``'s threads where given, else the step's torch threads where the library was built with
    OpenMP (``threaded``)."""

    def __init__(self, library: Path, pool: NativePool | None = None) -> None:
        lib, fns = _functions(
            library,
            {
                "lf_attention": _ARGTYPES,
                "lf_attention_threaded": [],
                "lf_attention_amx": [],
                "lf_rope_kv": _ROPE_KV_ARGTYPES,
                "lf_add_rmsnorm": _RMSNORM_ARGTYPES,
                "lf_silu_mul": _SILU_MUL_ARGTYPES,
                "lf_argmax_rows": _ARGMAX_ARGTYPES,
            },
        )
        self.library = library
        self._lib = lib  # keeps the library loaded while its functions live
        self._fn = fns["lf_attention"]
        self._rope_kv = fns["lf_rope_kv"]
        self._rmsnorm = fns["lf_add_rmsnorm"]
        self._silu_mul = fns["lf_silu_mul"]
        self._argmax = fns["lf_argmax_rows"]
        self.threaded = fns["lf_attention_threaded"]() == 1
        # rows of 32 keys or more take their scores from AMX tiles (bf16, head_dim % 32 == 0, <= 128)
        self.amx_scores = fns["lf_attention_amx"]() == 1
        self.pool = pool
        # the C addresses of its entry points, for csrc/layers.c
        entries = ("lf_attention", "lf_rope_kv", "lf_add_rmsnorm", "lf_silu_mul")
        self.addresses = {name: c_address(fns[name]) for name in entries}

    @staticmethod
    def check_shape(heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        """Refuse (NativeKernelError) a model or device the kernel does not take, at startup."""
        if device.type != "cpu":
            raise NativeKernelError(f"the native attention runs on the CPU, not {device}")
        if dtype not in (torch.bfloat16, torch.float32):
            raise NativeKernelError(f"the native attention takes bfloat16 or float32, not {dtype}")
        if heads % kv_heads or heads // kv_heads > MAX_GROUP or not 0 < head_dim <= MAX_HEAD_DIM:
            raise NativeKernelError(
                f"the native attention takes head_dim <= {MAX_HEAD_DIM} and <= {MAX_GROUP} query heads per "
                f"KV head, not {heads} heads, {kv_heads} KV heads, head_dim {head_dim}"
            )

    def __call__(
        self,
        q: torch.Tensor,  # [N, H, D] the step's rotated queries, contiguous
        k_slab: torch.Tensor,  # [R, KVH, L, D] contiguous, this step's keys already written
        v_slab: torch.Tensor,  # [R, KVH, L, D]
        out: torch.Tensor,  # [N, H, D]: the rows' tokens are written, any others left as they are
        rows: AttentionRows,
        scale: float,
    ) -> None:
        n, heads, head_dim = q.shape
        kv_rows, kv_heads, max_seq_len, _ = k_slab.shape
        if not (q.is_contiguous() and k_slab.is_contiguous() and v_slab.is_contiguous() and out.is_contiguous()):
            raise NativeKernelError("the native attention needs contiguous tensors")
        if (
            not q.dtype == k_slab.dtype == v_slab.dtype == out.dtype
            or q.dtype not in GLUE_DTYPES  # any other dtype was read as fp32, written past its rows
            or out.shape != q.shape
            or v_slab.shape != k_slab.shape
            or k_slab.shape[3] != head_dim
        ):
            raise NativeKernelError("q, the KV slabs and out differ in dtype or shape, or are not fp32 or bf16")
        index = (rows.tok, rows.kv_row, rows.length)  # the kernel checks their values against the shapes
        _check_cpu("the native attention", q, k_slab, v_slab, out, *index)
        if any(t.dtype != torch.long or not t.is_contiguous() or t.shape != (rows.count,) for t in index):
            raise NativeKernelError("the attention rows must be contiguous int64 vectors of one length")
        threads, pool = threads_and_pool(self.pool)
        rc = self._fn(
            q.data_ptr(),
            k_slab.data_ptr(),
            v_slab.data_ptr(),
            out.data_ptr(),
            rows.tok.data_ptr(),
            rows.kv_row.data_ptr(),
            rows.length.data_ptr(),
            rows.count,
            n,
            kv_rows,
            heads,
            kv_heads,
            max_seq_len,
            head_dim,
            scale,
            1 if q.dtype == torch.bfloat16 else 0,
            threads,
            pool,
        )
        if rc != 0:
            raise NativeKernelError(f"the native attention refused its arguments (rc {rc})")

    def rope_kv_(
        self,
        q: torch.Tensor,  # [N, H, D] fp32 or bf16, contiguous: rotated in place
        k: torch.Tensor,  # [N, KVH, D] q's dtype, contiguous
        v: torch.Tensor,  # [N, KVH, D] q's dtype, contiguous
        cos: torch.Tensor,  # [N, D] q's dtype, contiguous
        sin: torch.Tensor,  # [N, D] q's dtype, contiguous
        k_slab: torch.Tensor,  # [R, KVH, L, D] q's dtype, contiguous
        v_slab: torch.Tensor,  # [R, KVH, L, D] q's dtype, contiguous
        kv_row: torch.Tensor,  # [N] int64: each token's KV row
        pos: torch.Tensor,  # [N] int64: its position
    ) -> None:
        """Transformers' Llama RoPE on q (in place) and k, bit for bit (torch's roundings in the tensors'
        dtype, fp32 or bf16), with k and v written to the slabs at each token's row and position: the
        step's ``q * cos + rotate_half(q) * sin`` and K/V writes."""
        n, heads, head_dim = q.shape
        kv_rows, kv_heads, max_seq_len, _ = k_slab.shape
        tensors = (q, k, v, cos, sin, k_slab, v_slab)
        if q.dtype not in GLUE_DTYPES or any(t.dtype != q.dtype or not t.is_contiguous() for t in tensors):
            raise NativeKernelError("the native RoPE needs contiguous tensors, all fp32 or all bf16")
        if (
            k.shape != (n, kv_heads, head_dim)
            or v.shape != k.shape
            or cos.shape != (n, head_dim)
            or sin.shape != cos.shape
            or v_slab.shape != k_slab.shape
            or k_slab.shape[3] != head_dim
            or kv_row.shape != (n,)
            or pos.shape != (n,)
            or kv_row.dtype != torch.long
            or pos.dtype != torch.long
            or not (kv_row.is_contiguous() and pos.is_contiguous())  # a strided view wrote K/V elsewhere
        ):
            raise NativeKernelError("q, k, v, cos, sin, the slabs, rows and positions differ in shape")
        _check_cpu("the native RoPE", *tensors, kv_row, pos)
        threads, pool = threads_and_pool(self.pool)
        rc = self._rope_kv(
            *(t.data_ptr() for t in tensors),
            kv_row.data_ptr(),
            pos.data_ptr(),
            n,
            heads,
            kv_heads,
            head_dim,
            kv_rows,
            max_seq_len,
            1 if q.dtype == torch.bfloat16 else 0,
            threads,
            pool,
        )
        if rc != 0:
            raise NativeKernelError(f"the native RoPE refused its arguments (rc {rc})")

    def add_rmsnorm_(
        self,
        x: torch.Tensor,  # [N, d] fp32 or bf16, contiguous: the residual stream, x += delta in place
        delta: torch.Tensor | None,  # [N, d] x's dtype, contiguous, or None: no add
        weight: torch.Tensor,  # [d] x's dtype, contiguous
        eps: float,
    ) -> torch.Tensor:  # [N, d] x's dtype: weight * x / sqrt(mean(x^2) + eps)
        """Transformers' Llama RMSNorm after the residual add ``x += delta``: the statistics in fp32 (to
        fp32 rounding of transformers'), the add and the output rounded as torch's ops round them in x's
        dtype (bf16: the add, the normalized row, its product with the weight)."""
        n, d = x.shape
        tensors = (x, weight) if delta is None else (x, delta, weight)
        if x.dtype not in GLUE_DTYPES or any(t.dtype != x.dtype or not t.is_contiguous() for t in tensors):
            raise NativeKernelError("the native RMSNorm needs contiguous tensors, all fp32 or all bf16")
        if weight.shape != (d,) or (delta is not None and delta.shape != x.shape):
            raise NativeKernelError("x, delta and the norm's weight differ in shape")
        _check_cpu("the native RMSNorm", *tensors)
        out = torch.empty_like(x)
        threads, pool = threads_and_pool(self.pool)
        rc = self._rmsnorm(
            x.data_ptr(),
            None if delta is None else delta.data_ptr(),
            weight.data_ptr(),
            out.data_ptr(),
            n,
            d,
            eps,
            1 if x.dtype == torch.bfloat16 else 0,
            threads,
            pool,
        )
        if rc != 0:
            raise NativeKernelError(f"the native RMSNorm refused its arguments (rc {rc})")
        return out

    def silu_mul(
        self,
        gate: torch.Tensor,  # [N, d] fp32 or bf16, contiguous
        up: torch.Tensor,  # [N, d] gate's dtype, contiguous
    ) -> torch.Tensor:  # [N, d] gate's dtype: silu(gate) * up
        """Transformers' Llama MLP activation ``act_fn(gate) * up`` with SiLU: in bf16 the SiLU and the
        product each rounded to bf16 as torch's two ops round them; the SiLU's fp32 value may differ
        from torch's in its last bit (so a bf16 rounding of it may land one bf16 step away)."""
        if gate.dtype not in GLUE_DTYPES or up.dtype != gate.dtype or not (gate.is_contiguous() and up.is_contiguous()):
            raise NativeKernelError("the native SiLU needs contiguous tensors, both fp32 or both bf16")
        if gate.dim() != 2 or up.shape != gate.shape:
            raise NativeKernelError("the native SiLU's gate and up differ in shape")
        _check_cpu("the native SiLU", gate, up)
        n, d = gate.shape
        out = torch.empty_like(gate)
        threads, pool = threads_and_pool(self.pool)
        rc = self._silu_mul(
            gate.data_ptr(),
            up.data_ptr(),
            out.data_ptr(),
            n,
            d,
            1 if gate.dtype == torch.bfloat16 else 0,
            threads,
            pool,
        )
        if rc != 0:
            raise NativeKernelError(f"the native SiLU refused its arguments (rc {rc})")
        return out

    def argmax_rows(self, x: torch.Tensor) -> torch.Tensor:  # x [B, V] fp32 or bf16 -> [B] int64
        """``x.max(-1).indices`` read in place: the first of tied maxima, a row's first NaN where it has
        one. Greedy decoding's choice from the LM head's output in the compute dtype (a bf16 value
        widens to fp32 exactly, so the index is that of ``x.float()``)."""
        if x.dtype not in GLUE_DTYPES or x.dim() != 2 or not x.is_contiguous() or x.shape[1] == 0:
            raise NativeKernelError("the native argmax needs a contiguous [rows, columns > 0] fp32 or bf16 tensor")
        if x.device.type != "cpu":
            raise NativeKernelError(f"the native argmax reads CPU memory, not {x.device}")
        out = torch.empty(x.shape[0], dtype=torch.long)
        threads, pool = threads_and_pool(self.pool)
        rc = self._argmax(
            x.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], 1 if x.dtype == torch.bfloat16 else 0, threads, pool
        )
        if rc != 0:
            raise NativeKernelError(f"the native argmax refused its arguments (rc {rc})")
        return out


LORA_SOURCE = "lora.c"
MAX_LORA_RANK = 256  # csrc/lora.c's limit
# The native LoRA takes a run of one slot's tokens (a prompt chunk) a block at a time where
# ``lf_lora_blocks`` says so (its AVX-512 BF16 path: d_out % 16 == 0, r_cap 8/16/32/48/64; fp32: r_cap a
# multiple of 8): 0.3-0.7x the torch kernels' choice on a burst's 256-token step at r_cap 16-64 in bf16,
# 0.2-0.6x in fp32. Elsewhere it goes token by token (up to 3.3x the torch kernels on 4 x 128 tokens,
# 7-25x the base Linear at r_cap 12 in bf16), which is why CPU modules align r_cap (lora.BLOCK_RANKS).
# y, x, at, bt, slots, ranks; n_tokens, n_slots, d_in, d_out, r_cap; bf16, threads; pool
_LORA_ARGTYPES: list[Any] = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 5 + [ctypes.c_int] * 2 + [ctypes.c_void_p]


class NativeLora:
    """``csrc/lora.c`` through ctypes: adds each token's own adapter to a base Linear's output, in place,
    on ``pool``'s threads where given, else on the step's torch threads where the library was built
    with OpenMP (``threaded``)."""

    def __init__(self, library: Path, pool: NativePool | None = None) -> None:
        lib, fns = _functions(
            library,
            {
                "lf_lora_add": _LORA_ARGTYPES,
                "lf_lora_blocks": [ctypes.c_int, ctypes.c_int64, ctypes.c_int64],
                "lf_lora_threaded": [],
            },
        )
        self.library = library
        self._lib = lib  # keeps the library loaded while its functions live
        self._fn = fns["lf_lora_add"]
        self._blocks_fn = fns["lf_lora_blocks"]
        self._blocks: dict[tuple[torch.dtype, int, int], bool] = {}
        self.threaded = fns["lf_lora_threaded"]() == 1
        self.pool = pool
        self.address = c_address(self._fn)  # of lf_lora_add, for csrc/layers.c

    def blocks(self, dtype: torch.dtype, d_out: int, r_cap: int) -> bool:
        """Whether the kernel takes a run of one slot's tokens a block at a time for this module's shape
        (AVX-512 BF16 with d_out % 16 == 0 and r_cap 8, 16, 32, 48 or 64; fp32 with r_cap a multiple of
        8), rather than token by token; the numbers are the same either way."""
        key = (dtype, d_out, r_cap)
        blocks = self._blocks.get(key)
        if blocks is None:
            blocks = self._blocks[key] = bool(self._blocks_fn(1 if dtype == torch.bfloat16 else 0, d_out, r_cap))
        return blocks

    @staticmethod
    def takes(y: torch.Tensor, x: torch.Tensor, at: torch.Tensor) -> bool:
        """Whether this call's tensors are ones the kernel takes (else the torch kernels run)."""
        return (
            y.device.type == "cpu"
            and y.dtype == x.dtype == at.dtype
            and y.dtype in (torch.bfloat16, torch.float32)
            and at.shape[2] <= MAX_LORA_RANK
            and y.is_contiguous()
            and x.is_contiguous()
        )

    def add_(
        self,
        y: torch.Tensor,  # [N, out] the base output, updated in place
        x: torch.Tensor,  # [N, in]
        at: torch.Tensor,  # [S, in, r_cap] A transposed, contiguous
        bt: torch.Tensor,  # [S, r_cap, out] B transposed and scaled, contiguous
        slots: torch.Tensor,  # [N] int64
        ranks: torch.Tensor,  # [S] int64: each slot's rank on this module (0: not targeted)
    ) -> None:
        n_tokens, d_out = y.shape
        n_slots, d_in, r_cap = at.shape
        if not self.takes(y, x, at):  # the caller's own check, here too: the kernel reads them as dense
            raise NativeKernelError("the native LoRA takes contiguous CPU fp32 or bf16 tensors of one dtype")
        _check_cpu("the native LoRA", x, at, bt, slots, ranks)
        if not (at.is_contiguous() and bt.is_contiguous() and slots.is_contiguous() and ranks.is_contiguous()):
            raise NativeKernelError("the native LoRA needs contiguous tensors")
        if x.shape != (n_tokens, d_in) or bt.shape != (n_slots, r_cap, d_out) or bt.dtype != y.dtype:
            raise NativeKernelError("y, x, A and B differ in shape or dtype")
        if (
            slots.shape != (n_tokens,)
            or ranks.shape != (n_slots,)
            or slots.dtype != torch.long
            or ranks.dtype != torch.long
        ):
            raise NativeKernelError("slots and ranks must be int64, one per token and per slot")
        threads, pool = threads_and_pool(self.pool)
        rc = self._fn(
            y.data_ptr(),
            x.data_ptr(),
            at.data_ptr(),
            bt.data_ptr(),
            slots.data_ptr(),
            ranks.data_ptr(),
            n_tokens,
            n_slots,
            d_in,
            d_out,
            r_cap,
            1 if y.dtype == torch.bfloat16 else 0,
            threads,
            pool,
        )
        if rc != 0:
            raise NativeKernelError(f"the native LoRA refused its arguments (rc {rc})")


def load_native_lora(
    cache_dir: Path, compiler: str | None = None, openmp: bool = True, pool: NativePool | None = None
) -> NativeLora:
    """Build (or find in ``cache_dir``) and load the native multi-LoRA for this CPU, on ``pool``'s threads
    where given; else with OpenMP where it builds and loads (``openmp``), or for one thread."""
    return _load_with_openmp(
        LORA_SOURCE, lambda library: NativeLora(library, pool), "the native LoRA", cache_dir, compiler, openmp
    )


def load_native_attention(
    cache_dir: Path, compiler: str | None = None, openmp: bool = True, pool: NativePool | None = None
) -> NativeAttention:
    """Build (or find in ``cache_dir``) and load the native attention for this CPU, on ``pool``'s threads
    where given; else with OpenMP where it builds and loads (``openmp``), or for one thread."""
    return _load_with_openmp(
        ATTENTION_SOURCE,
        lambda library: NativeAttention(library, pool),
        "the native attention",
        cache_dir,
        compiler,
        openmp,
    )


LINEAR_SOURCE = "linear.c"
LINEAR_BLOCK = 32  # csrc/linear.c takes in_features and out_features that are multiples of this
# x, packed, bias, out; m, n, k; threads (the bf16 kernel's: and its pool)
_LINEAR_ARGTYPES: list[Any] = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
_LINEAR_POOL_ARGTYPES: list[Any] = [*_LINEAR_ARGTYPES, ctypes.c_void_p]


def _check_bias(bias: torch.Tensor | None, out_features: int, what: str) -> None:
    """A native Linear's bias: None, or ``out_features`` contiguous fp32 values."""
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous() or bias.numel() != out_features):
        raise NativeKernelError(f"{what} needs an fp32 bias of {out_features} values")


def _check_cpu(what: str, *tensors: torch.Tensor | None) -> None:
    """The kernels read and write host memory through ``data_ptr()``: a tensor elsewhere (CUDA, meta)
    would hand them an address they cannot use."""
    if any(t is not None and t.device.type != "cpu" for t in tensors):
        raise NativeKernelError(f"{what} takes CPU tensors only")


def _run_linear(
    fn: Any,
    what: str,
    x: torch.Tensor,  # [M, in], checked by the caller
    packed: torch.Tensor,  # checked by the caller
    bias: torch.Tensor | None,  # [out] fp32, contiguous
    out_features: int,
    threads: int,
    *tail: Any,  # arguments after the thread count (the bf16 kernel's pool)
    out: torch.Tensor | None = None,  # [M, out] x's dtype, contiguous: written; None: a new tensor
) -> torch.Tensor:  # [M, out] in x's dtype
    """A native Linear's call (``x, packed, bias, out; m, n, k; threads, *tail``) after the bias, the
    rows' rank and every tensor's device are checked."""
    _check_cpu(what, x, packed, bias, out)
    if x.dim() != 2:
        raise NativeKernelError(f"{what} needs rows of [M, in], not a tensor of shape {tuple(x.shape)}")
    _check_bias(bias, out_features, what)
    rows, in_features = x.shape
    if out is None:
        out = torch.empty(rows, out_features, dtype=x.dtype)
    elif out.shape != (rows, out_features) or out.dtype != x.dtype or not out.is_contiguous():
        raise NativeKernelError(f"{what} writes a contiguous [{rows}, {out_features}] {x.dtype} tensor")
    rc = fn(
        x.data_ptr(),
        packed.data_ptr(),
        None if bias is None else bias.data_ptr(),
        out.data_ptr(),
        rows,
        out_features,
        in_features,
        threads,
        *tail,
    )
    if rc != 0:
        raise NativeKernelError(f"{what} refused its arguments (rc {rc})")
    return out


LINEAR_MAX_PARTS = 4  # csrc/linear.c's MAX_PARTS


class LinearPart(ctypes.Structure):
    """``csrc/linear.c``'s ``lf_linear_part``: one output of an ``lf_linear_parts`` call."""

    _fields_ = [("packed", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("out", ctypes.c_void_p), ("n", ctypes.c_int64)]


LinearIsa = Literal["amx", "avx512"]
LINEAR_ISAS: tuple[LinearIsa, ...] = ("amx", "avx512")  # the order load_native_linear(isa=None) tries them in


class NativeLinear:
    """``csrc/linear.c`` through ctypes: bf16 Linears from a weight packed once, on AMX tiles
    (``isa="amx"``) or with AVX-512 BF16 dot products (``"avx512"``: CPUs with ``avx512_bf16`` and no
    AMX), on the calling thread and ``pool``'s helpers (pinned to cores of their own), or on the
    calling thread alone. The two sum in different orders, so a process uses one."""

    dtype = torch.bfloat16  # what it computes in

    def __init__(self, library: Path, pool: NativePool | None = None, isa: LinearIsa = "amx") -> None:
        if isa not in LINEAR_ISAS:
            raise NativeKernelError(f"the native Linear has no {isa!r} path (one of {', '.join(LINEAR_ISAS)})")
        self.pool = pool
        self.threads = pool.threads if pool is not None else 1
        suffix = "" if isa == "amx" else "_avx512"
        lib, fns = _functions(
            library,
            {
                "lf_linear_available": [],
                "lf_linear_avx512_available": [],
                "lf_linear_pack": [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64],
                "lf_linear" + suffix: _LINEAR_POOL_ARGTYPES,
                "lf_linear_parts" + suffix: [ctypes.c_void_p, ctypes.POINTER(LinearPart), ctypes.c_int]
                + [ctypes.c_int64] * 2
                + [ctypes.c_int, ctypes.c_void_p],
            },
        )
        part_bytes = lib.lf_linear_part_bytes
        part_bytes.restype, part_bytes.argtypes = ctypes.c_int64, []
        if part_bytes() != ctypes.sizeof(LinearPart):
            raise NativeKernelError(f"{library} lays out lf_linear_part differently from LinearPart")
        if isa == "amx" and fns["lf_linear_available"]() != 1:
            raise NativeKernelError(
                "the native AMX Linear needs AMX-BF16: this CPU (or the OS kernel's permission for AMX) lacks it"
            )
        if isa == "avx512" and fns["lf_linear_avx512_available"]() != 1:
            raise NativeKernelError(
                "the native AVX-512 Linear needs AVX512-BF16: this CPU (or the C compiler's target) lacks it"
            )
        self.isa = isa
        self.passed_over: tuple[str, ...] = ()  # why load_native_linear did not take the paths before it
        self.label = "native AMX" if isa == "amx" else "native AVX-512 BF16"
        self.name = "native-amx" if isa == "amx" else "native-avx512"  # GetModelInfo.linear_kernel
        self.library = library
        self._lib = lib  # keeps the library loaded while its functions live
        self._pack = fns["lf_linear_pack"]
        self._fn = fns["lf_linear" + suffix]
        self._parts = fns["lf_linear_parts" + suffix]
        self.address = c_address(self._fn)  # of lf_linear(_avx512), for csrc/layers.c
        self.parts_address = c_address(self._parts)  # of lf_linear_parts(_avx512), for csrc/layers.c

    @staticmethod
    def takes(weight: torch.Tensor) -> bool:
        """Whether a Linear of this weight ([out, in]) is one the kernel takes."""
        out_features, in_features = weight.shape
        return (
            weight.device.type == "cpu"
            and weight.dtype == torch.bfloat16
            and out_features % LINEAR_BLOCK == 0
            and in_features % LINEAR_BLOCK == 0
        )

    def pack(self, weight: torch.Tensor) -> torch.Tensor:
        """The kernel's layout of ``weight`` [out, in] bf16: a new [out * in] bf16 tensor."""
        if not self.takes(weight):
            raise NativeKernelError(f"the native Linear does not take a {weight.dtype} weight of shape {weight.shape}")
        w = weight.detach().contiguous()
        packed = torch.empty(w.numel(), dtype=torch.bfloat16)  # [out * in], panels of 32 columns
        if self._pack(w.data_ptr(), packed.data_ptr(), w.shape[0], w.shape[1]) != 0:
            raise NativeKernelError(f"the native Linear refused to pack a weight of shape {tuple(w.shape)}")
        return packed

    def __call__(
        self,
        x: torch.Tensor,  # [M, in] bf16, contiguous
        packed: torch.Tensor,  # from pack()
        bias: torch.Tensor | None,  # [out] fp32, contiguous
        out_features: int,
        out: torch.Tensor | None = None,  # [M, out] bf16, contiguous: written; None: a new tensor
    ) -> torch.Tensor:  # [M, out] bf16
        in_features = x.shape[-1]  # _run_linear refuses x other than [M, in]
        if x.dtype != torch.bfloat16 or not x.is_contiguous() or packed.numel() != in_features * out_features:
            raise NativeKernelError("the native Linear needs contiguous bf16 rows of its weight's width")
        if packed.dtype != torch.bfloat16 or not packed.is_contiguous():
            raise NativeKernelError("the native Linear needs the packed weight pack() made")
        pool = self.pool.address if self.pool is not None else None
        return _run_linear(self._fn, "the native Linear", x, packed, bias, out_features, self.threads, pool, out=out)

    def parts(
        self,
        x: torch.Tensor,  # [M, in] bf16, contiguous
        weights: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]],  # (packed, bias [out_i], out [M, out_i])
    ) -> None:
        """Each ``out_i = x . W_i^T (+ bias_i)`` in one call (``lf_linear_parts``): the Linears of one
        input split over the pool as one Linear's columns would be. The same numbers as a call each."""
        if x.dim() != 2:
            raise NativeKernelError("the native Linear needs rows of [M, in]")
        _check_cpu("the native Linear", x, *(t for weight in weights for t in weight))
        rows, in_features = x.shape
        if x.dtype != torch.bfloat16 or not x.is_contiguous():
            raise NativeKernelError("the native Linear needs contiguous bf16 rows")
        if not 1 <= len(weights) <= LINEAR_MAX_PARTS:
            raise NativeKernelError(f"the native Linear takes 1 to {LINEAR_MAX_PARTS} weights a call")
        parts = (LinearPart * len(weights))()
        for part, (packed, bias, out) in zip(parts, weights, strict=True):
            n = out.shape[1] if out.dim() == 2 else -1
            if out.shape != (rows, n) or out.dtype != torch.bfloat16 or not out.is_contiguous():
                raise NativeKernelError(f"the native Linear writes contiguous [{rows}, n] bf16 tensors")
            if packed.dtype != torch.bfloat16 or not packed.is_contiguous() or packed.numel() != in_features * n:
                raise NativeKernelError("the native Linear needs the packed weights pack() made")
            _check_bias(bias, n, "the native Linear")
            part.packed, part.out, part.n = packed.data_ptr(), out.data_ptr(), n
            part.bias = None if bias is None else bias.data_ptr()
        pool = self.pool.address if self.pool is not None else None
        rc = self._parts(x.data_ptr(), parts, len(weights), rows, in_features, self.threads, pool)
        if rc != 0:
            raise NativeKernelError(f"the native Linear refused its arguments (rc {rc})")


def load_native_linear(
    cache_dir: Path, compiler: str | None = None, threads: int = 1, isa: LinearIsa | None = None
) -> NativeLinear:
    """Build (or find in ``cache_dir``) and load the native Linear for ``isa`` (None: AMX where this
    process may use it, else AVX-512 BF16), on ``threads`` threads: with more than one, a helper pool
    (``load_native_pool``) is built and loaded with it; NativeKernelError where the CPU has neither."""
    if threads < 1:
        raise NativeKernelError(f"the native Linear needs at least one thread, not {threads}")
    library = build_library(LINEAR_SOURCE, cache_dir, compiler)
    reasons: list[str] = []
    for candidate in (isa,) if isa is not None else LINEAR_ISAS:
        try:
            NativeLinear(library, None, candidate)  # checks the ISA before a pool is started for it
        except NativeKernelError as exc:
            reasons.append(str(exc))
            continue
        kernel = NativeLinear(
            library, load_native_pool(cache_dir, threads, compiler) if threads > 1 else None, candidate
        )
        kernel.passed_over = tuple(reasons)
        return kernel
    raise NativeKernelError("; ".join(reasons))


LINEAR_F32_SOURCE = "linear_f32.c"
LINEAR_F32_PANEL = 16  # csrc/linear_f32.c's NR: output columns per packed panel


class NativeLinearF32:
    """``csrc/linear_f32.c`` through ctypes: fp32 Linears on AVX2 + FMA (AVX-512 where the CPU has it)
    from a weight packed once, every output element one fp32 sum in a fixed order (the same for a row
    alone or in any step, and on either instruction set), on the step's torch threads where the
    library was built with OpenMP (``threaded``)."""

    dtype = torch.float32  # what it computes in
    label = "native fp32"

    def __init__(self, library: Path) -> None:
        lib, fns = _functions(
            library,
            {
                "lf_linear_f32_available": [],
                "lf_linear_f32_avx512": [],
                "lf_linear_f32_threaded": [],
                "lf_linear_f32_pack": [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64],
                "lf_linear_f32": _LINEAR_ARGTYPES,
            },
        )
        size = lib.lf_linear_f32_packed_size
        size.restype = ctypes.c_int64
        size.argtypes = [ctypes.c_int64, ctypes.c_int64]
        if fns["lf_linear_f32_available"]() != 1:
            raise NativeCpuUnsupported("the native fp32 Linear needs a CPU with AVX2 and FMA")
        self.library = library
        self._lib = lib  # keeps the library loaded while its functions live
        self._size = size
        self._pack = fns["lf_linear_f32_pack"]
        self._fn = fns["lf_linear_f32"]
        self.address = c_address(self._fn)  # of lf_linear_f32, for csrc/layers.c
        self.threaded = fns["lf_linear_f32_threaded"]() == 1
        # the instruction set its blocks use: AVX-512 (two panels, 12 rows a block) where built for it
        self.isa = "AVX-512" if fns["lf_linear_f32_avx512"]() == 1 else "AVX2"

    @staticmethod
    def takes(weight: torch.Tensor) -> bool:
        """Whether a Linear of this weight ([out, in]) is one the kernel takes: fp32 on the CPU."""
        return weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.dim() == 2

    @staticmethod
    def packed_shape(out_features: int, in_features: int) -> tuple[int, int]:
        """[panels, in * 16]: the packed weight of an [out, in] one (csrc/linear_f32.c's NR = 16)."""
        return -(-out_features // LINEAR_F32_PANEL), in_features * LINEAR_F32_PANEL

    def pack(self, weight: torch.Tensor) -> torch.Tensor:
        """The kernel's layout of ``weight`` [out, in] fp32: a new [panels, in * 16] fp32 tensor (panels
        of 16 output columns, the last one padded with zeros)."""
        if not self.takes(weight) or min(weight.shape) < 1:
            raise NativeKernelError(
                f"the native fp32 Linear does not take a {weight.dtype} weight of shape {tuple(weight.shape)}"
            )
        w = weight.detach().contiguous()
        packed = torch.empty(self.packed_shape(w.shape[0], w.shape[1]), dtype=torch.float32)
        if packed.numel() != self._size(w.shape[0], w.shape[1]):
            raise NativeKernelError("the native fp32 Linear's library packs another layout than this module expects")
        if self._pack(w.data_ptr(), packed.data_ptr(), w.shape[0], w.shape[1]) != 0:
            raise NativeKernelError(f"the native fp32 Linear refused to pack a weight of shape {tuple(w.shape)}")
        return packed

    def __call__(
        self,
        x: torch.Tensor,  # [M, in] fp32, contiguous
        packed: torch.Tensor,  # from pack()
        bias: torch.Tensor | None,  # [out] fp32, contiguous
        out_features: int,
        out: torch.Tensor | None = None,  # [M, out] fp32, contiguous: written; None: a new tensor
    ) -> torch.Tensor:  # [M, out] fp32
        in_features = x.shape[-1]  # _run_linear refuses x other than [M, in]
        if x.dtype != torch.float32 or not x.is_contiguous():
            raise NativeKernelError("the native fp32 Linear needs contiguous fp32 rows")
        if (
            packed.dtype != torch.float32
            or not packed.is_contiguous()
            or packed.shape != self.packed_shape(out_features, in_features)
        ):
            raise NativeKernelError("the native fp32 Linear needs the packed weight pack() made for this shape")
        # on the step's threads (model/threads.py), an OpenMP team torch keeps warm
        return _run_linear(
            self._fn, "the native fp32 Linear", x, packed, bias, out_features, torch.get_num_threads(), out=out
        )


def load_native_linear_f32(cache_dir: Path, compiler: str | None = None, openmp: bool = True) -> NativeLinearF32:
    """Build (or find in ``cache_dir``) and load the native fp32 Linear: with OpenMP where it builds and
    loads (``openmp``), else for one thread; NativeKernelError on a CPU without AVX2 and FMA."""
    return _load_with_openmp(LINEAR_F32_SOURCE, NativeLinearF32, "the native fp32 Linear", cache_dir, compiler, openmp)


TRANSPOSE_SOURCE = "transpose.c"
# dst, dst type, src, src type; n, rows, cols, three src strides; scale
_TRANSPOSE_ARGTYPES: list[Any] = [ctypes.c_void_p, ctypes.c_int] * 2 + [ctypes.c_int64] * 6 + [ctypes.c_float]
_TRANSPOSE_TYPES = {torch.float32: 0, torch.bfloat16: 1}


class NativeTranspose:
    """``csrc/transpose.c`` through ctypes: an adapter group's blocks scaled into the host layout in one
    pass (a ``lorafleet_adapters.peft_format.Transposer``; other dtypes and devices go to ``fallback``)."""

    def __init__(self, library: Path, fallback: Transposer = transpose_scaled) -> None:
        lib, fns = _functions(library, {"lf_transpose_scaled": _TRANSPOSE_ARGTYPES})
        self.library = library
        self._lib = lib  # keeps the library loaded while its functions live
        self._fn = fns["lf_transpose_scaled"]
        self._fallback = fallback

    def __call__(self, dst: torch.Tensor, src: torch.Tensor, scale: float) -> None:
        """``dst`` [n, x, y] (contiguous) = ``src`` [n, y, x] (any non-negative strides) transposed and
        multiplied by ``scale`` in fp32, rounded once to ``dst``'s dtype."""
        n, rows, cols = src.shape
        if dst.shape != (n, cols, rows):
            raise NativeKernelError(f"transpose: dst {tuple(dst.shape)} is not src {tuple(src.shape)} transposed")
        dst_type, src_type = _TRANSPOSE_TYPES.get(dst.dtype), _TRANSPOSE_TYPES.get(src.dtype)
        if (
            dst_type is None
            or src_type is None
            or dst.device.type != "cpu"
            or src.device.type != "cpu"
            or not dst.is_contiguous()
            or min(src.stride(), default=0) < 0
        ):
            self._fallback(dst, src, scale)
            return
        if dst.numel() == 0:
            return
        s0, s1, s2 = src.stride()
        rc = self._fn(dst.data_ptr(), dst_type, src.data_ptr(), src_type, n, rows, cols, s0, s1, s2, scale)
        if rc != 0:
            raise NativeKernelError(f"the native transpose refused its arguments (rc {rc})")


def load_native_transpose(cache_dir: Path, compiler: str | None = None) -> NativeTranspose:
    """Build (or find in ``cache_dir``) and load the adapter-layout kernel for this CPU."""
    return NativeTranspose(build_library(TRANSPOSE_SOURCE, cache_dir, compiler))


class _Loaded(Protocol):
    library: Path


K = TypeVar("K", bound=_Loaded)


def _load_with_openmp(
    source: str, make: Callable[[Path], K], what: str, cache_dir: Path, compiler: str | None, openmp: bool
) -> K:
    """``make(library)`` of ``csrc/<source>`` built with OPENMP_CFLAGS where that builds and loads
    (``openmp``), else with CFLAGS: one thread per call. A CPU that lacks the kernel's instructions
    (NativeCpuUnsupported) is not retried: a build without OpenMP would lack them too."""
    if openmp:
        try:
            return make(build_library(source, cache_dir, compiler, OPENMP_CFLAGS))
        except NativeCpuUnsupported:
            raise
        except NativeKernelError as exc:
            log.warning("%s without OpenMP (one thread per call): %s", what, exc)
    return make(build_library(source, cache_dir, compiler))


@dataclass(frozen=True)
class KernelChoice(Generic[K]):
    """A native kernel the server runs, or None for torch's path, and why (logged, and in GetModelInfo)."""

    kernel: K | None
    reason: str

    @property
    def name(self) -> str:
        return "native" if self.kernel is not None else "torch"


def native_or_fallback(required: bool, load: Callable[[], K]) -> KernelChoice[K]:
    """``load()``'s kernel; where it cannot be had, NativeKernelError when ``required``, else torch's
    path with the reason."""
    try:
        kernel = load()
    except NativeKernelError as exc:
        if required:
            raise
        return KernelChoice(None, f"native kernel unavailable: {exc}")
    return KernelChoice(kernel, f"built for this CPU ({kernel.library.name})")


def choose_attention(
    choice: AttentionKernel,
    *,
    cache_dir: Path,
    heads: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    compiler: str | None = None,
    pool: NativePool | None = None,
) -> KernelChoice[NativeAttention]:
    """``--attention-kernel``: "torch" is torch's matmuls; "native" the C kernel, or NativeKernelError
    when it cannot run here; "auto" the C kernel on a CPU where it builds and takes the model, else
    torch's matmuls with the reason. The C kernel runs on ``pool``'s threads where given (the native
    bf16 Linear's), else on the step's torch threads."""
    if choice == "torch":
        return KernelChoice(None, "--attention-kernel torch")
    if choice == "auto" and device.type != "cpu":
        return KernelChoice(None, f"the native kernel is for CPUs; {device.type} runs torch's")

    def load() -> NativeAttention:
        NativeAttention.check_shape(heads, kv_heads, head_dim, dtype, device)
        return load_native_attention(cache_dir, compiler, pool=pool)

    chosen = native_or_fallback(choice == "native", load)
    if chosen.kernel is None:
        return chosen
    return KernelChoice(chosen.kernel, f"{chosen.reason}, on {_threads_of(chosen.kernel)}")


def _threads_of(kernel: NativeAttention | NativeLora) -> str:
    """What a kernel's calls run on, for its choice's reason."""
    if kernel.pool is not None:
        return f"{kernel.pool.threads} threads of the Linears' pool"
    return "the step's torch threads" if kernel.threaded else "one thread per call (no OpenMP)"


def choose_lora(
    impl: LoraImpl,
    *,
    cache_dir: Path,
    device: torch.device,
    compiler: str | None = None,
    pool: NativePool | None = None,
) -> KernelChoice[NativeLora]:
    """``--lora-impl``: "native" is the C kernel for every call it takes, or NativeKernelError when it
    cannot be built; "auto" the C kernel where it is built (on a CPU), else the torch kernels; any other
    value the named torch kernel. The C kernel runs on ``pool``'s threads where given (the native
    bf16 Linear's), else on the step's torch threads."""
    if impl not in ("auto", "native"):
        return KernelChoice(None, f"--lora-impl {impl}")
    if device.type != "cpu":
        if impl == "native":
            raise NativeKernelError(f"the native LoRA runs on the CPU, not {device}")
        return KernelChoice(None, f"the native kernel is for CPUs; {device.type} runs torch's")
    choice = native_or_fallback(impl == "native", lambda: load_native_lora(cache_dir, compiler, pool=pool))
    if choice.kernel is None:
        return choice
    return KernelChoice(choice.kernel, f"{choice.reason}, on {_threads_of(choice.kernel)}")


def choose_transpose(*, cache_dir: Path, compiler: str | None = None) -> KernelChoice[NativeTranspose]:
    """How adapter loads lay weights out on the host: the C kernel where it builds, else the portable
    torch and numpy path with the reason (both give the same bits)."""
    return native_or_fallback(False, lambda: load_native_transpose(cache_dir, compiler))
