"""Validation and loading of a standard PEFT LoRA adapter directory.

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors``. The config is
vetted first, then the safetensors header against the base model, and only then are tensors read.
Pickle-based files (``.bin``, ``.pt``) are never opened.
"""

from __future__ import annotations

import math
import mmap
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import torch

from lorafleet_adapters import hostmem
from lorafleet_adapters.errors import AdapterFormatError, AdapterIncompatible
from lorafleet_adapters.hostmem import Buffer
from lorafleet_adapters.lora_config import CONFIG_FILE, LoraConfigInfo, read_lora_config
from lorafleet_adapters.ref import AdapterKey
from lorafleet_adapters.safetensors_header import (
    MAX_HEADER_BYTES,
    TensorInfo,
    parse_header_bytes,
    read_header,
)

__all__ = [
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "AdapterWeights",
    "BaseModelSpec",
    "LoraConfigInfo",
    "check_safetensors_header",
    "find_weights_file",
    "load_adapter_weights",
    "max_weights_bytes",
    "read_file_bytes",
    "read_lora_config",
]

WEIGHTS_FILE = "adapter_model.safetensors"
_PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin")
_TENSOR_NAME = re.compile(r"base_model\.model\.(?P<module>[A-Za-z0-9_.]+)\.lora_(?P<part>[AB])\.weight")


@dataclass(frozen=True)
class BaseModelSpec:
    """What an adapter must fit: the base model's identity and its LoRA-targetable Linears."""

    fingerprint: str
    model_id: str
    quantization: str
    target_shapes: Mapping[str, tuple[int, int]]  # full module name -> (out_features, in_features)
    max_lora_rank: int
    max_adapter_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        shapes = {name: (int(out_f), int(in_f)) for name, (out_f, in_f) in self.target_shapes.items()}
        object.__setattr__(self, "target_shapes", MappingProxyType(shapes))


@dataclass(frozen=True)
class AdapterWeights:
    """Host (CPU) tensors ready to copy into device slots; B is pre-multiplied by the module's scaling.

    Every tensor is a view into one flat host buffer of ``dtype`` (the slots' compute dtype when the
    loader was given it, so a slot write is a plain copy). Both are transposed views of contiguous
    blocks, ``A^T [in, r]`` and ``B^T [r, out]``: the layouts ``MultiLoRALinear`` stores them in
    (``lora_at``, ``lora_bt``), so the slot write reads them in order.
    """

    key: AdapterKey | None
    rank: int
    modules: Mapping[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A [r, in], B_scaled [out, r])
    nbytes: int
    config: LoraConfigInfo
    dtype: torch.dtype = torch.float32


def find_weights_file(adapter_dir: Path) -> Path:
    """The safetensors weights file of `adapter_dir`; pickle formats are refused, never opened."""
    path = adapter_dir / WEIGHTS_FILE
    if path.is_file():
        return path
    pickles = [name for name in _PICKLE_FILES if (adapter_dir / name).exists()]
    if pickles:
        raise AdapterFormatError(
            f"{adapter_dir.name}: found {pickles[0]} but only safetensors are accepted "
            f"(save with safe_serialization=True to get {WEIGHTS_FILE})"
        )
    raise AdapterFormatError(f"{WEIGHTS_FILE} is missing from {adapter_dir}")


def check_safetensors_header(path: Path, spec: BaseModelSpec, cfg: LoraConfigInfo) -> dict[str, tuple[int, ...]]:
    """Check names, dtypes, shapes and size of every tensor from the header alone; return name -> shape."""
    modules = _checked_modules(path.name, read_header(path), spec, cfg)
    return {info.name: info.shape for pair in modules.values() for info in pair}


def load_adapter_weights(
    adapter_dir: Path,
    spec: BaseModelSpec,
    key: AdapterKey | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    data: Buffer | None = None,
) -> AdapterWeights:
    """Validate `adapter_dir` fully, then read its tensors as ``dtype`` with B scaled per module.

    ``data``: the weights file's bytes when the caller already read them (the store reads and hashes
    them in one pass), so the bytes checked are the bytes used; else the file is read here. The scaling
    is applied in fp32 and rounded to ``dtype`` once, exactly as a copy of the fp32 product would be.
    """
    cfg = read_lora_config(adapter_dir, spec.max_lora_rank)
    path = find_weights_file(adapter_dir)
    if data is None:
        data = read_file_bytes(path, max_weights_bytes(spec))
    tensors, data_start = parse_header_bytes(path.name, data)
    modules = _checked_modules(path.name, tensors, spec, cfg)
    buffer = _data_buffer(data, data_start)  # [bytes of tensor data] uint8
    _check_finite(path.name, buffer, tensors)
    views = _flat_views(buffer, tensors)  # name -> [numel] in the file's dtype
    # Modules of one shape and scaling are converted together: a few tensor operations per group
    # instead of several per module (an r=16 all-linear adapter has 210 modules and 7 groups), since
    # every torch call also hands the GIL over, and the engine thread holds it between its own calls.
    groups: dict[tuple[int, int, int, float], list[str]] = {}
    for module, (a_info, b_info) in sorted(modules.items()):
        (r, in_features), (out_features, _) = a_info.shape, b_info.shape
        groups.setdefault((r, in_features, out_features, cfg.scaling_for(module)), []).append(module)
    flat = hostmem.empty(sum(len(m) * r * (i + o) for (r, i, o, _), m in groups.items()), dtype)  # all A and B^T
    loaded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    offset = 0
    for (r, in_features, out_features, scaling), names in groups.items():
        n = len(names)
        at_block = flat[offset : offset + n * r * in_features].view(n, in_features, r)  # [n, in, r]
        offset += n * r * in_features
        bt_block = flat[offset : offset + n * r * out_features].view(n, r, out_features)  # [n, r, out]
        offset += n * r * out_features
        a = torch.stack([views[modules[m][0].name] for m in names]).view(n, r, in_features)
        at_block.copy_(a.transpose(1, 2))
        b = torch.stack([views[modules[m][1].name] for m in names]).view(n, out_features, r).to(torch.float32)
        torch.mul(b.transpose(1, 2), scaling, out=bt_block)  # fp32 product, rounded to dtype once
        a_views, b_views = at_block.transpose(1, 2).unbind(0), bt_block.transpose(1, 2).unbind(0)
        for module, a_r_in, b_out_r in zip(names, a_views, b_views, strict=True):
            loaded[module] = (a_r_in, b_out_r)  # views of A^T [in, r] and B^T [r, out]
    return AdapterWeights(
        key=key,
        rank=max(a.shape[0] for a, _ in loaded.values()),
        modules=MappingProxyType(dict(sorted(loaded.items()))),
        nbytes=flat.nbytes,
        config=cfg,
        dtype=dtype,
    )


def max_weights_bytes(spec: BaseModelSpec) -> int:
    """The largest weights file accepted: the adapter cap plus the largest header safetensors allows."""
    return spec.max_adapter_bytes + MAX_HEADER_BYTES + 8


def read_file_bytes(path: Path, max_bytes: int) -> bytearray | mmap.mmap:
    """The whole file, read into one buffer; AdapterFormatError when it cannot be read or is over ``max_bytes``."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > max_bytes:
                raise AdapterFormatError(f"{path.name} is {size} bytes, over the {max_bytes}-byte cap")
            buffer = hostmem.byte_buffer(size)
            if handle.readinto(buffer) != size:
                raise AdapterFormatError(f"{path.name}: shorter than its size while being read (changed?)")
    except FileNotFoundError:
        raise AdapterFormatError(f"{path.name} is missing from {path.parent}") from None
    except OSError as exc:
        raise AdapterFormatError(f"{path.name}: cannot read tensors: {exc.strerror or exc}") from None
    return buffer


_TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _data_buffer(data: Buffer, data_start: int) -> torch.Tensor:
    """The file's tensor data as one uint8 tensor over ``data`` (no copy unless misaligned)."""
    buffer = hostmem.as_tensor(data, torch.uint8)[data_start:]
    # safetensors pads its header to 8 bytes, so the data is aligned for every dtype; a file that is not
    # gets one aligned copy of its data, since a tensor view needs its offset to be a multiple of its size
    return buffer if data_start % 8 == 0 else buffer.clone()


def _flat_views(buffer: torch.Tensor, tensors: Mapping[str, TensorInfo]) -> dict[str, torch.Tensor]:
    """Every tensor as a flat view of the uint8 data ``buffer``, by name (one split when they share a dtype)."""
    dtypes = {info.dtype for info in tensors.values()}
    if len(dtypes) != 1:
        return {name: _typed(buffer[info.begin : info.end], info.dtype) for name, info in tensors.items()}
    ordered = sorted(tensors.values(), key=lambda info: info.begin)  # they tile the buffer (checked)
    pieces = torch.split_with_sizes(_typed(buffer, dtypes.pop()), [math.prod(info.shape) for info in ordered])
    return {info.name: piece for info, piece in zip(ordered, pieces, strict=True)}


def _view(buffer: torch.Tensor, info: TensorInfo) -> torch.Tensor:
    """``info``'s tensor as a view of the uint8 data ``buffer`` (safetensors data is little-endian)."""
    return _typed(buffer[info.begin : info.end], info.dtype).view(info.shape)


def _typed(raw: torch.Tensor, dtype_name: str) -> torch.Tensor:
    """``raw`` uint8 [n * size] reinterpreted as n elements of ``dtype_name``."""
    return raw.view(_TORCH_DTYPES[dtype_name])


def _check_finite(file_name: str, buffer: torch.Tensor, tensors: Mapping[str, TensorInfo]) -> None:
    """Refuse NaN and infinities.

    The tensors tile the data buffer exactly (checked with the header), so when they share one dtype
    the whole buffer is summed once: a sum is finite only if every element is (NaN and infinities
    propagate through additions), and it costs a fraction of an element-wise check. A non-finite sum
    (a bad value, or finite values that overflow when added up) falls back to the exact per-tensor
    check, which names the culprit.
    """
    dtypes = {info.dtype for info in tensors.values()}
    if len(dtypes) == 1 and math.isfinite(float(_typed(buffer, dtypes.pop()).sum())):
        return
    for info in tensors.values():
        if not bool(torch.isfinite(_view(buffer, info)).all()):
            raise AdapterFormatError(f"{file_name}: tensor {info.name!r} holds NaN or infinite values")


def _checked_modules(
    file_name: str, tensors: Mapping[str, TensorInfo], spec: BaseModelSpec, cfg: LoraConfigInfo
) -> dict[str, tuple[TensorInfo, TensorInfo]]:
    """Module -> (lora_A, lora_B) header entries, every one checked against the base and the config."""
    total = sum(info.nbytes for info in tensors.values())
    if total > spec.max_adapter_bytes:
        raise AdapterFormatError(
            f"{file_name}: {total} bytes of tensors exceed the {spec.max_adapter_bytes}-byte adapter cap"
        )
    modules = _pair_tensors(file_name, tensors)
    if not modules:
        raise AdapterFormatError(f"{file_name}: holds no LoRA tensors")
    for module, (a_info, b_info) in modules.items():
        _check_module(file_name, module, a_info, b_info, spec, cfg)
    return modules


def _pair_tensors(file_name: str, tensors: Mapping[str, TensorInfo]) -> dict[str, tuple[TensorInfo, TensorInfo]]:
    parts: dict[str, dict[str, TensorInfo]] = {}
    for name, info in tensors.items():
        match = _TENSOR_NAME.fullmatch(name)
        if match is None:
            raise AdapterFormatError(
                f"{file_name}: unexpected tensor {name!r}; only base_model.model.<module>.lora_A.weight "
                "and .lora_B.weight are accepted"
            )
        parts.setdefault(match["module"], {})[match["part"]] = info
    pairs: dict[str, tuple[TensorInfo, TensorInfo]] = {}
    for module, found in parts.items():
        for part in ("A", "B"):
            if part not in found:
                raise AdapterFormatError(f"{file_name}: module {module!r} has no lora_{part}.weight tensor")
        pairs[module] = (found["A"], found["B"])
    return pairs


def _check_module(
    file_name: str, module: str, a: TensorInfo, b: TensorInfo, spec: BaseModelSpec, cfg: LoraConfigInfo
) -> None:
    if module not in spec.target_shapes:
        raise AdapterIncompatible(
            f"{file_name}: module {module!r} is not a LoRA-targetable Linear of base model {spec.model_id!r}"
        )
    if not cfg.targets(module):
        raise AdapterFormatError(
            f"{file_name}: holds weights for module {module!r}, which {CONFIG_FILE} does not target "
            f"(target_modules={list(cfg.target_modules)}, layers_to_transform={cfg.layers_to_transform})"
        )
    out_features, in_features = spec.target_shapes[module]
    rank = cfg.rank_for(module)
    want_a, want_b = (rank, in_features), (out_features, rank)
    if a.shape != want_a or b.shape != want_b:
        raise AdapterIncompatible(
            f"{file_name}: module {module!r} has lora_A {list(a.shape)} and lora_B {list(b.shape)}; "
            f"expected {list(want_a)} and {list(want_b)} for rank {rank} on a "
            f"[{out_features}, {in_features}] Linear"
        )
