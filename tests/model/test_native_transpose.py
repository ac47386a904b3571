"""The native adapter-layout kernel (model/native.py, csrc/transpose.c) against the portable path.

Both must give the same bits: an adapter loaded by a server with a C compiler and one without fill
their slots alike. Built here with the machine's C compiler, as the server builds it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lorafleet_adapters.peft_format import transpose_scaled
from lorafleet_server.model.native import NativeKernelError, NativeTranspose, choose_transpose, find_compiler

pytestmark = pytest.mark.skipif(find_compiler() is None, reason="no C compiler on this machine")

BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> NativeTranspose:
    choice = choose_transpose(cache_dir=tmp_path_factory.mktemp("kernels"))
    assert choice.kernel is not None, choice.reason
    return choice.kernel


def _group(n: int, rows: int, cols: int, dtype: torch.dtype, gap: int, seed: int) -> torch.Tensor:
    """[n, rows, cols] as one strided view of a flat buffer with ``gap`` elements between the blocks,
    as an adapter group is of the file's bytes; values of every magnitude, signed zeros included."""
    g = torch.Generator().manual_seed(seed)
    per = rows * cols + gap
    flat = torch.randn(n * per + 5, generator=g) * torch.exp(torch.randn(n * per + 5, generator=g) * 8)
    flat[::7] = -0.0
    flat[3::11] = 1e-40  # subnormal in fp32
    return flat.to(dtype).as_strided((n, rows, cols), (per, cols, 1), 5)


def _same_bits(x: torch.Tensor, y: torch.Tensor) -> bool:
    return x.dtype == y.dtype and torch.equal(x.view(BITS[x.dtype]), y.view(BITS[y.dtype]))


@pytest.mark.parametrize("src_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dst_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("n", "rows", "cols", "gap"),
    [(30, 16, 576, 17), (30, 1536, 16, 0), (3, 8, 37, 1), (2, 45, 19, 3), (1, 1, 1, 0), (4, 0, 5, 2)],
)
@pytest.mark.parametrize("scale", [1.0, 0.37, 2.0, 3e38])
def test_same_bits_as_the_portable_path(
    kernel: NativeTranspose,
    src_dtype: torch.dtype,
    dst_dtype: torch.dtype,
    n: int,
    rows: int,
    cols: int,
    gap: int,
    scale: float,
) -> None:
    src = _group(n, rows, cols, src_dtype, gap, seed=n + rows + cols)
    ours, portable = torch.full((n, cols, rows), 7.0, dtype=dst_dtype), torch.empty((n, cols, rows), dtype=dst_dtype)
    kernel(ours, src, scale)
    transpose_scaled(portable, src, scale)
    assert _same_bits(ours, portable)
    scale32 = torch.tensor(scale, dtype=torch.float32).double()  # the kernel multiplies by the fp32 scale
    reference = (src.double() * scale32).to(torch.float32).to(dst_dtype).transpose(1, 2)  # exact, rounded once
    assert _same_bits(ours, reference.contiguous())


def test_transposed_and_non_unit_strides(kernel: NativeTranspose) -> None:
    """Any non-negative strides: a transposed source reads columns."""
    base = torch.randn(3, 40, 24)
    src = base.transpose(1, 2)  # [3, 24, 40], strides (960, 1, 24)
    ours, portable = torch.empty(3, 40, 24, dtype=torch.bfloat16), torch.empty(3, 40, 24, dtype=torch.bfloat16)
    kernel(ours, src, 0.5)
    transpose_scaled(portable, src, 0.5)
    assert _same_bits(ours, portable)


def test_other_dtypes_and_layouts_take_the_portable_path(kernel: NativeTranspose) -> None:
    src = _group(2, 8, 12, torch.float32, 3, seed=1)
    for dst in (
        torch.empty(2, 12, 8, dtype=torch.float16),
        torch.empty(2, 8, 12, dtype=torch.bfloat16).transpose(1, 2),
    ):
        expected = torch.empty(dst.shape, dtype=dst.dtype)
        transpose_scaled(expected, src, 0.25)
        kernel(dst, src, 0.25)
        assert _same_bits(dst.contiguous(), expected)
    fp16_src = _group(2, 8, 12, torch.float16, 0, seed=2)
    out, expected = torch.empty(2, 12, 8), torch.empty(2, 12, 8)
    kernel(out, fp16_src, 1.0)
    transpose_scaled(expected, fp16_src, 1.0)
    assert _same_bits(out, expected)


def test_a_dst_of_another_shape_is_refused(kernel: NativeTranspose) -> None:
    dst = torch.zeros(2, 8, 12)
    with pytest.raises(NativeKernelError, match="is not src"):
        kernel(dst, torch.randn(2, 8, 12), 1.0)
    assert not dst.any()  # nothing written


def test_without_a_compiler_the_portable_path_is_chosen(tmp_path: Path) -> None:
    choice = choose_transpose(cache_dir=tmp_path, compiler=str(tmp_path / "no-such-cc"))
    assert choice.kernel is None and "unavailable" in choice.reason
