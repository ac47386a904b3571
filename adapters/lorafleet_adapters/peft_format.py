"""Validation and loading of a standard PEFT LoRA adapter directory.

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors``. The config is
vetted first, then the safetensors header against the base model, and only then are tensors read.
Pickle-based files (``.bin``, ``.pt``) are never opened.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from lorafleet_adapters.errors import AdapterFormatError, AdapterIncompatible
from lorafleet_adapters.lora_config import CONFIG_FILE, LoraConfigInfo, read_lora_config
from lorafleet_adapters.ref import AdapterKey
from lorafleet_adapters.safetensors_header import TensorInfo, read_header

__all__ = [
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "AdapterWeights",
    "BaseModelSpec",
    "LoraConfigInfo",
    "check_safetensors_header",
    "find_weights_file",
    "load_adapter_weights",
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
    """Host (CPU) tensors ready to copy into device slots; B is pre-multiplied by the module's scaling."""

    key: AdapterKey | None
    rank: int
    modules: Mapping[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A [r, in], B_scaled [out, r]), fp32
    nbytes: int
    config: LoraConfigInfo


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
    modules = _checked_modules(path, spec, cfg)
    return {info.name: info.shape for pair in modules.values() for info in pair}


def load_adapter_weights(adapter_dir: Path, spec: BaseModelSpec, key: AdapterKey | None = None) -> AdapterWeights:
    """Validate `adapter_dir` fully, then read its tensors as fp32 with B scaled per module."""
    cfg = read_lora_config(adapter_dir, spec.max_lora_rank)
    path = find_weights_file(adapter_dir)
    modules = _checked_modules(path, spec, cfg)
    loaded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for module, (a_info, b_info) in modules.items():
                a = _read_fp32(handle, a_info.name, path.name)
                b = _read_fp32(handle, b_info.name, path.name)
                loaded[module] = (a, (b * cfg.scaling_for(module)).contiguous())
    except (SafetensorError, OSError) as exc:
        raise AdapterFormatError(f"{path.name}: cannot read tensors: {exc}") from None
    return AdapterWeights(
        key=key,
        rank=max(a.shape[0] for a, _ in loaded.values()),
        modules=MappingProxyType(dict(sorted(loaded.items()))),
        nbytes=sum(a.nbytes + b.nbytes for a, b in loaded.values()),
        config=cfg,
    )


def _read_fp32(handle: Any, name: str, file_name: str) -> torch.Tensor:
    tensor = handle.get_tensor(name).to(torch.float32).contiguous()
    if not torch.isfinite(tensor).all():
        raise AdapterFormatError(f"{file_name}: tensor {name!r} holds NaN or infinite values")
    return tensor


def _checked_modules(path: Path, spec: BaseModelSpec, cfg: LoraConfigInfo) -> dict[str, tuple[TensorInfo, TensorInfo]]:
    """Module -> (lora_A, lora_B) header entries, every one checked against the base and the config."""
    tensors = read_header(path)
    total = sum(info.nbytes for info in tensors.values())
    if total > spec.max_adapter_bytes:
        raise AdapterFormatError(
            f"{path.name}: {total} bytes of tensors exceed the {spec.max_adapter_bytes}-byte adapter cap"
        )
    modules = _pair_tensors(path.name, tensors)
    if not modules:
        raise AdapterFormatError(f"{path.name}: holds no LoRA tensors")
    for module, (a_info, b_info) in modules.items():
        _check_module(path.name, module, a_info, b_info, spec, cfg)
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
