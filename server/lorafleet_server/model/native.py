"""Native CPU kernels: C sources shipped in the package (``model/csrc``), compiled for this CPU.

The attention (``csrc/attention.c``) takes every token of a step as a row of one query: a decoding
row's token, or a prompt chunk's token i, attends over its KV row's first ``start + i + 1``
positions, read where they lie in the KV slab (torch's batched matmul copies a strided window of the
slab first), with fp32 sums in an order fixed per token. So a token's numbers depend on nothing but
its own query, keys and values: not on the other rows, the chunk around it, or how oneDNN blocks a
matmul of that many rows (docs/architecture.md, "Native attention").

It is plain C, built with the system's C compiler for the CPU it runs on (``-march=native``: machines
of one kind differ, AVX2 only or AVX-512), once per source, compiler and CPU: the library is cached
under ``cache_dir`` by a hash of the three, so a restart loads it in milliseconds and a new CPU or
source builds its own. It is loaded with ctypes (no Python or torch headers, so the build takes well
under a second). Where no compiler is found the server keeps torch's path (``--attention-kernel
auto``) or refuses to start (``native``).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from lorafleet_server.model.cpu import cpu_flags_line
from lorafleet_server.model.options import AttentionKernel

ATTENTION_SOURCE = "attention.c"
CFLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-fPIC", "-shared", "-std=c11")
BUILD_TIMEOUT_S = 120.0
MAX_HEAD_DIM = 256  # csrc/attention.c's limits
MAX_GROUP = 16


class NativeKernelError(RuntimeError):
    """A native kernel cannot be built, loaded or run here (no compiler, a failed build, a shape it
    does not take). Raised at startup, never for a request."""


def find_compiler() -> str | None:
    """The C compiler: ``$CC`` if set, else ``cc`` or ``gcc`` on the PATH."""
    candidates = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc"]
    for name in candidates:
        path = shutil.which(name)
        if path is not None:
            return path
    return None


def _source(name: str) -> bytes:
    return (resources.files("lorafleet_server.model") / "csrc" / name).read_bytes()


def _compiler_version(compiler: str) -> str:
    try:
        done = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        raise NativeKernelError(f"{compiler} --version failed: {exc}") from exc
    return done.stdout.splitlines()[0] if done.stdout else ""


def build_library(name: str, cache_dir: Path, compiler: str | None = None) -> Path:
    """The shared library of ``csrc/<name>`` for this CPU: built into ``cache_dir`` unless a build of
    the same source, compiler, flags and CPU is there already."""
    compiler = compiler or find_compiler()
    if compiler is None:
        raise NativeKernelError("no C compiler found (set CC, or install gcc)")
    source = _source(name)
    key = hashlib.sha256()
    for part in (source, _compiler_version(compiler).encode(), " ".join(CFLAGS).encode(), cpu_flags_line().encode()):
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
            out = Path(tmp) / target.name
            done = subprocess.run(
                [compiler, *CFLAGS, "-o", str(out), str(src), "-lm"],
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


# q, k_slab, v_slab, out, tok, kv_row, len; count, tokens, kv_rows, heads, kv_heads, max_seq_len, head_dim; scale, bf16
_ARGTYPES: list[Any] = [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 7 + [ctypes.c_float, ctypes.c_int]


class NativeAttention:
    """``csrc/attention.c`` through ctypes: one call per layer does every token of the step."""

    name = "native"

    def __init__(self, library: Path) -> None:
        try:
            lib = ctypes.CDLL(str(library))
            fn = lib.lf_attention
        except (OSError, AttributeError) as exc:
            raise NativeKernelError(f"cannot load {library}: {exc}") from exc
        fn.restype = ctypes.c_int
        fn.argtypes = _ARGTYPES
        self.library = library
        self._lib = lib  # keeps the library loaded while fn lives
        self._fn = fn

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
            or out.shape != q.shape
            or v_slab.shape != k_slab.shape
        ):
            raise NativeKernelError("q, the KV slabs and out differ in dtype or shape")
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
        )
        if rc != 0:
            raise NativeKernelError(f"the native attention refused its arguments (rc {rc})")


def load_native_attention(cache_dir: Path, compiler: str | None = None) -> NativeAttention:
    """Build (or find in ``cache_dir``) and load the native attention for this CPU."""
    return NativeAttention(build_library(ATTENTION_SOURCE, cache_dir, compiler))


@dataclass(frozen=True)
class AttentionChoice:
    """The attention the server runs, and why (logged, and in GetModelInfo)."""

    kernel: NativeAttention | None  # None: torch's matmuls (model/runner.py)
    reason: str

    @property
    def name(self) -> str:
        return "native" if self.kernel is not None else "torch"


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
) -> AttentionChoice:
    """``--attention-kernel``: "torch" is torch's matmuls; "native" the C kernel, or NativeKernelError
    when it cannot run here; "auto" the C kernel on a CPU where it builds and takes the model, else
    torch's matmuls with the reason."""
    if choice == "torch":
        return AttentionChoice(None, "--attention-kernel torch")
    if choice == "auto" and device.type != "cpu":
        return AttentionChoice(None, f"the native kernel is for CPUs; {device.type} runs torch's")
    try:
        NativeAttention.check_shape(heads, kv_heads, head_dim, dtype, device)
        kernel = load_native_attention(cache_dir, compiler)
    except NativeKernelError as exc:
        if choice == "native":
            raise
        return AttentionChoice(None, f"native kernel unavailable: {exc}")
    return AttentionChoice(kernel, f"built for this CPU ({kernel.library.name})")
