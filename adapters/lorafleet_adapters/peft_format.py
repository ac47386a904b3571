"""Validation and loading of a standard PEFT LoRA adapter directory.

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors``. The config is
vetted first, then the safetensors header against the base model, and only then are tensors read.
Pickle-based files (``.bin``, ``.pt``) are never opened.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import mmap
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Protocol

import numpy as np
import torch

from lorafleet_adapters import hostmem
from lorafleet_adapters.errors import AdapterFormatError, AdapterIncompatible
from lorafleet_adapters.hostmem import Buffer
from lorafleet_adapters.lora_config import CONFIG_FILE, LoraConfigInfo, read_lora_config
from lorafleet_adapters.ref import AdapterKey
from lorafleet_adapters.safetensors_header import (
    DTYPE_BYTES,
    MAX_HEADER_BYTES,
    TensorInfo,
    header_bytes,
    parse_header_bytes,
    read_header,
)

__all__ = [
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "AdapterWeights",
    "BaseModelSpec",
    "LoadPlan",
    "LoadPlans",
    "LoraConfigInfo",
    "Transposer",
    "check_safetensors_header",
    "find_weights_file",
    "load_adapter_weights",
    "max_weights_bytes",
    "plan_load",
    "read_file_bytes",
    "read_lora_config",
    "transpose_scaled",
]

WEIGHTS_FILE = "adapter_model.safetensors"
_PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin")
_LAYER_NUMBER = re.compile(r"\.\d+\.")
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
    # sha256 of the tokenizer and chat template ("" unknown): an adapter trained under another prompt
    # format sees other token ids for the same request, though the weights are the same
    prompt_format: str = ""

    def __post_init__(self) -> None:
        shapes = {name: (int(out_f), int(in_f)) for name, (out_f, in_f) in self.target_shapes.items()}
        object.__setattr__(self, "target_shapes", MappingProxyType(shapes))

    @property
    def hidden_size(self) -> int | None:
        """The base's hidden size (what a pooled feature vector holds): the input width of its attention
        query projection; None where the spec names none."""
        return next((in_f for name, (_, in_f) in self.target_shapes.items() if name.endswith("q_proj")), None)


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
    plans: LoadPlans | None = None,
    transpose: Transposer | None = None,
) -> AdapterWeights:
    """Validate `adapter_dir` fully, then read its tensors as ``dtype`` with B scaled per module.

    ``data``: the weights file's bytes when the caller already read them (the store reads and hashes
    them in one pass), so the bytes checked are the bytes used; else the file is read here. ``plans``:
    the caller's memo of checked headers (LoadPlans); without one the header is parsed and checked
    here. ``transpose``: how blocks are scaled into the host layout (``transpose_scaled`` when None; the
    server passes its native kernel). The scaling is applied in fp32 and rounded to ``dtype`` once,
    exactly as a copy of the fp32 product would be.
    """
    transpose = transpose or transpose_scaled
    cfg = read_lora_config(adapter_dir, spec.max_lora_rank)
    path = find_weights_file(adapter_dir)
    if data is None:
        data = read_file_bytes(path, max_weights_bytes(spec))
    plan = plans.plan(path.name, data, spec, cfg) if plans is not None else plan_load(path.name, data, spec, cfg)
    buffer = _data_buffer(data, plan.data_start)  # [bytes of tensor data] uint8
    _check_finite(path.name, buffer, plan.tensors)
    flat = hostmem.empty(plan.numel, dtype)  # every A^T and B^T, group after group
    loaded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    offset = 0
    for group in plan.groups:
        n, r, d_in, d_out = len(group.modules), group.rank, group.in_features, group.out_features
        at_block = flat[offset : offset + n * r * d_in].view(n, d_in, r)  # [n, in, r]
        offset += n * r * d_in
        bt_block = flat[offset : offset + n * r * d_out].view(n, r, d_out)  # [n, r, out]
        offset += n * r * d_out
        transpose(at_block, _group_tensors(buffer, plan, group, "A"), 1.0)  # from [n, r, in], file dtype
        transpose(bt_block, _group_tensors(buffer, plan, group, "B"), group.scaling)  # from [n, out, r]
        a_views, b_views = at_block.transpose(1, 2).unbind(0), bt_block.transpose(1, 2).unbind(0)
        for module, a_r_in, b_out_r in zip(group.modules, a_views, b_views, strict=True):
            loaded[module] = (a_r_in, b_out_r)  # views of A^T [in, r] and B^T [r, out]
    # The file's values are finite (above); scaled by lora_alpha / r (a config's alpha can be 1e300) and
    # rounded to ``dtype`` they can still overflow. A sum is finite only if every element is.
    if not math.isfinite(float(flat.sum(dtype=torch.float32))) and not bool(torch.isfinite(flat).all()):
        raise AdapterFormatError(
            f"{path.name}: weights overflow to infinity once lora_B is scaled by lora_alpha / r "
            f"(scalings {sorted({g.scaling for g in plan.groups})}) and rounded to {dtype}"
        )
    return AdapterWeights(
        key=key,
        rank=max(a.shape[0] for a, _ in loaded.values()),
        modules=MappingProxyType(dict(sorted(loaded.items()))),
        nbytes=flat.nbytes,
        config=cfg,
        dtype=dtype,
    )


@dataclass(frozen=True)
class LoadGroup:
    """Modules of one shape and scaling, in the file order of their tensors."""

    rank: int
    in_features: int
    out_features: int
    scaling: float
    modules: tuple[str, ...]
    a: tuple[TensorInfo, ...]  # each module's lora_A [r, in]
    b: tuple[TensorInfo, ...]  # ... and lora_B [out, r]
    # (A, B) strides in elements when the file has one dtype and both sets of offsets are evenly spaced
    # (PEFT files are: every layer repeats the same tensors), so that each set is one strided view of
    # the data; None otherwise.
    strides: tuple[int, int] | None


@dataclass(frozen=True)
class LoadPlan:
    """What a checked header says about loading its file: nothing in it depends on the tensor data."""

    tensors: Mapping[str, TensorInfo]
    data_start: int  # where the data buffer starts in the file
    dtype_name: str | None  # the safetensors dtype every tensor has; None when they mix dtypes
    groups: tuple[LoadGroup, ...]
    numel: int  # elements of every A^T and B^T together


def plan_load(file_name: str, data: Buffer, spec: BaseModelSpec, cfg: LoraConfigInfo) -> LoadPlan:
    """Parse and check the header of the file held in ``data`` against the base and the config (every
    tensor's name, dtype, shape and place), and group its modules by shape and scaling, so that a few
    tensor operations per group convert them (an r=16 all-linear adapter has 210 modules in 7 groups)."""
    tensors, data_start = parse_header_bytes(file_name, data)
    modules = _checked_modules(file_name, tensors, spec, cfg)
    dtypes = {info.dtype for info in tensors.values()}
    # Grouped by role too (the name without its layer number: gate_proj and up_proj have one shape), so
    # that each group's tensors repeat once per layer, evenly spaced in a PEFT file.
    by_shape: dict[tuple[int, int, int, float, str], list[tuple[int, str]]] = {}
    for module, (a_info, b_info) in modules.items():
        (r, d_in), (d_out, _) = a_info.shape, b_info.shape
        role = _LAYER_NUMBER.sub(".#.", module)
        by_shape.setdefault((r, d_in, d_out, cfg.scaling_for(module), role), []).append((a_info.begin, module))
    size = DTYPE_BYTES[next(iter(dtypes))] if len(dtypes) == 1 else 0
    groups = []
    for (r, d_in, d_out, scaling, _), entries in by_shape.items():
        names = tuple(module for _, module in sorted(entries))
        a, b = tuple(modules[m][0] for m in names), tuple(modules[m][1] for m in names)
        a_stride, b_stride = _even_stride(a, size), _even_stride(b, size)
        strides = None if a_stride is None or b_stride is None else (a_stride, b_stride)
        groups.append(LoadGroup(r, d_in, d_out, scaling, names, a, b, strides))
    return LoadPlan(
        tensors=MappingProxyType(tensors),
        data_start=data_start,
        dtype_name=next(iter(dtypes)) if len(dtypes) == 1 else None,
        groups=tuple(groups),
        numel=sum(len(g.modules) * g.rank * (g.in_features + g.out_features) for g in groups),
    )


class LoadPlans:
    """A memo of checked load plans, by header bytes, file size and adapter config.

    The header is a function of the tensors' names, dtypes and shapes only, so the versions one trainer
    publishes with one config have byte-for-byte equal headers; parsing and checking one (420 entries
    for r=16 all-linear) took ~7 ms of a ~40 ms load. A plan is stored only once every check passed,
    and it is a pure function of its key and the base (``spec``; a new spec starts the memo afresh), so
    a hit gives the same plan, or the same refusal, as parsing again. Keys are digests (a header may
    carry megabytes of metadata; a plan holds only the checked LoRA entries), so the memo stays small.
    Thread-safe; least recently used plans go first past ``max_entries``.
    """

    def __init__(self, max_entries: int = 64) -> None:
        if max_entries < 0:
            raise ValueError(f"max_entries must be >= 0, got {max_entries}")
        self._max_entries = max_entries
        self._lock = threading.Lock()
        self._spec: BaseModelSpec | None = None
        self._plans: OrderedDict[tuple[bytes, int], LoadPlan] = OrderedDict()

    def __len__(self) -> int:
        with self._lock:
            return len(self._plans)

    def plan(self, file_name: str, data: Buffer, spec: BaseModelSpec, cfg: LoraConfigInfo) -> LoadPlan:
        digest = hashlib.sha256(header_bytes(file_name, data))
        # repr of the frozen config: every field, mappings included, in a fixed order (it holds
        # mapping proxies, so it cannot be hashed itself)
        digest.update(b"\0" + repr(cfg).encode())
        key = (digest.digest(), len(data))
        with self._lock:
            if spec is not self._spec:
                self._plans.clear()
                self._spec = spec
            found = self._plans.get(key)
            if found is not None:
                self._plans.move_to_end(key)
                return found
        plan = plan_load(file_name, data, spec, cfg)  # raises on a bad header: nothing is stored
        with self._lock:
            if spec is self._spec and self._max_entries > 0:
                self._plans[key] = plan
                while len(self._plans) > self._max_entries:
                    self._plans.popitem(last=False)
        return plan


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


def _group_tensors(buffer: torch.Tensor, plan: LoadPlan, group: LoadGroup, part: str) -> torch.Tensor:
    """The group's lora_A [n, r, in] (``part`` "A") or lora_B [n, out, r] tensors, in the file's dtype:
    one strided view of the uint8 data ``buffer`` when their offsets are evenly spaced, else a stack."""
    infos = group.a if part == "A" else group.b
    n, shape = len(infos), infos[0].shape
    if group.strides is not None and plan.dtype_name is not None:
        typed = _typed(buffer, plan.dtype_name)
        stride = group.strides[0] if part == "A" else group.strides[1]
        # In bounds by construction: view k is exactly tensor k's bytes [begin_0 + k * stride, + its
        # size), and the header checks put every tensor inside the buffer. (as_strided's offset counts
        # from the storage's start, not the view's.)
        offset = typed.storage_offset() + infos[0].begin // typed.element_size()
        return typed.as_strided((n, *shape), (stride, shape[1], 1), offset)
    return torch.stack([_view(buffer, info) for info in infos])


def _even_stride(infos: tuple[TensorInfo, ...], size: int) -> int | None:
    """The common difference, in elements of ``size`` bytes, of the tensors' offsets (ascending); None
    when they are not evenly spaced or the file mixes dtypes (``size`` 0)."""
    begins = [info.begin for info in infos]
    if size == 0 or any(begin % size for begin in begins):
        return None
    if len(begins) < 2:
        return 0
    stride = begins[1] - begins[0]
    if stride <= 0 or any(b - a != stride for a, b in itertools.pairwise(begins)):
        return None
    return stride // size


class Transposer(Protocol):
    """``dst`` [n, x, y] (contiguous) = ``src`` [n, y, x] (any strides) transposed and multiplied by
    ``scale``: one fp32 product per element, rounded once to ``dst``'s dtype (scale 1: a conversion)."""

    def __call__(self, dst: torch.Tensor, src: torch.Tensor, scale: float) -> None: ...


def transpose_scaled(dst: torch.Tensor, src: torch.Tensor, scale: float) -> None:
    """The portable Transposer: torch converts and scales, numpy transposes the raw bits.

    numpy's strided copy moved these r = 8 or 16 wide blocks 2-3x faster than torch's copy_ on the
    2-core VM (0.56 against 1.6 ms for 30 x [1536, 16] bf16)."""
    if scale == 1.0:
        converted = src.to(dst.dtype)  # [n, y, x]
    else:
        converted = torch.empty(src.shape, dtype=dst.dtype)
        torch.mul(src.to(torch.float32), scale, out=converted)  # the fp32 product, rounded once
    bits = _BITS_OF_SIZE[dst.element_size()]
    np.copyto(dst.view(bits).numpy(), converted.view(bits).numpy().transpose(0, 2, 1))


_BITS_OF_SIZE = {2: torch.int16, 4: torch.int32, 8: torch.int64}


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
