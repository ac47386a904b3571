"""Load the base model with a quantization backend and wrap its Linears for multi-LoRA."""

from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorafleet_adapters.peft_format import BaseModelSpec
from lorafleet_server.model.lora import LoraContext, MultiLoRALinear
from lorafleet_server.model.options import QUANTIZATIONS
from lorafleet_server.model.prepare import weights_fingerprint

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2"})


class ModelLoadError(RuntimeError):
    """The base model cannot be served (missing files, unsupported architecture or backend)."""


@dataclass(frozen=True)
class LoadedBase:
    model: nn.Module  # the HF causal LM, eval mode, target Linears replaced by MultiLoRALinear
    lora_layers: dict[str, MultiLoRALinear]  # full module name -> wrapper
    context: LoraContext
    spec: BaseModelSpec
    device: torch.device
    dtype: torch.dtype  # compute dtype of activations, KV cache and LoRA weights
    quantization: str  # "none", "nf4" or "int8"
    model_id: str
    max_position_embeddings: int


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {name!r} asked for, but CUDA is not available")
    return device


def resolve_quantization(name: str, device: torch.device) -> str:
    if name not in QUANTIZATIONS:
        raise ModelLoadError(f"unknown quantization {name!r}; choose one of {', '.join(QUANTIZATIONS)}")
    if name != "auto":
        return name
    # CUDA: NF4 (the design card's choice). CPU: fp32 — the only faster CPU backend measured here
    # (torch dynamic int8) wrecks SmolLM2's outputs, and bnb NF4 on CPU is ~2x slower
    # (docs/architecture.md, "Measured facts").
    return "nf4" if device.type == "cuda" else "none"


def compute_dtype_for(device: torch.device) -> torch.dtype:
    # bf16 is slow batched on CPUs without native bf16 (docs/architecture.md, "Measured facts"); CUDA computes in bf16.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def read_model_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    cfg: dict[str, Any] = json.loads(path.read_text())
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))}"
        )
    return cfg


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    with path.open("rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        header: dict[str, Any] = json.loads(fh.read(size))
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def base_spec_from_files(
    model_dir: Path, quantization: str, max_lora_rank: int, max_adapter_bytes: int = 1 << 30
) -> BaseModelSpec:
    """The adapter-facing description of a base, read from file headers only (no weights loaded).

    Every 2-D weight inside ``model.layers`` of a Llama-family model is a Linear LoRA may target.
    """
    cfg = read_model_config(model_dir)
    shapes: dict[str, tuple[int, int]] = {}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{model_dir} holds no safetensors weights")
    for path in files:
        for name, shape in _safetensors_shapes(path).items():
            if name.startswith("model.layers.") and name.endswith(".weight") and len(shape) == 2:
                shapes[name.removesuffix(".weight")] = (int(shape[0]), int(shape[1]))
    return BaseModelSpec(
        fingerprint=weights_fingerprint(model_dir),
        model_id=model_id_of(model_dir, cfg),
        quantization=quantization,
        target_shapes=shapes,
        max_lora_rank=max_lora_rank,
        max_adapter_bytes=max_adapter_bytes,
    )


def model_id_of(model_dir: Path, cfg: dict[str, Any]) -> str:
    source = model_dir / "lorafleet-source.json"
    if source.is_file():
        return str(json.loads(source.read_text()).get("model_id", model_dir.name))
    return str(cfg.get("_name_or_path") or model_dir.name)


def quantization_config(quantization: str, dtype: torch.dtype) -> Any:
    """The bitsandbytes config of a quantized base: NF4 computing in `dtype` (no double quant), or int8.

    Serving (`load_hf_model`) and training (``lorafleet_training.trainer``) both load through this.
    """
    from transformers import BitsAndBytesConfig

    if quantization == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=False,
        )
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ModelLoadError(f"no bitsandbytes config for quantization {quantization!r}; choose 'nf4' or 'int8'")


def load_hf_model(
    model_dir: Path, quantization: str, device: torch.device, dtype: torch.dtype | None = None
) -> nn.Module:
    """The Hugging Face causal LM in `model_dir` on `device`, in eval mode with every parameter frozen.

    `quantization` is a resolved one ("none", "nf4" or "int8"; see `resolve_quantization`). `dtype`
    is the compute dtype, `compute_dtype_for(device)` unless given; the non-quantized weights are
    held in it. Serving and training share this loader.
    """
    from transformers import AutoModelForCausalLM

    if dtype is None:
        dtype = compute_dtype_for(device)
    if quantization == "none":
        model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        model.to(device)
    else:
        config = quantization_config(quantization, dtype)
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ModelLoadError(f"quantization {quantization!r} needs bitsandbytes: {exc}") from exc
        # dtype= keeps the non-quantized layers in the compute dtype (else they stay bf16 on CPU).
        model = AutoModelForCausalLM.from_pretrained(
            model_dir,
            dtype=dtype,
            quantization_config=config,
            device_map={"": str(device)},
        )
    model.eval()
    model.requires_grad_(False)
    return model


def discover_targets(model: nn.Module) -> dict[str, nn.Linear]:
    """Every Linear (bnb 4/8-bit included: they subclass nn.Linear) inside the decoder layers.

    What serving wraps for multi-LoRA and what training checks against the base spec.
    """
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.startswith("model.layers.")
    }


def wrap_targets(
    model: nn.Module,
    num_slots: int,
    r_max: int,
    context: LoraContext,
    dtype: torch.dtype,
    device: torch.device,
) -> dict[str, MultiLoRALinear]:
    wrapped: dict[str, MultiLoRALinear] = {}
    for name, linear in discover_targets(model).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        wrapper = MultiLoRALinear(
            linear, linear.in_features, linear.out_features, num_slots, r_max, context, dtype, device
        )
        setattr(parent, child, wrapper)
        wrapped[name] = wrapper
    return wrapped


def load_base(
    model_dir: Path,
    *,
    quantization: str,
    device: torch.device,
    num_slots: int,
    max_lora_rank: int,
    max_adapter_bytes: int = 1 << 30,
) -> LoadedBase:
    cfg = read_model_config(model_dir)
    quantization = resolve_quantization(quantization, device)
    dtype = compute_dtype_for(device)
    model = load_hf_model(model_dir, quantization, device, dtype)
    context = LoraContext()
    layers = wrap_targets(model, num_slots, max_lora_rank, context, dtype, device)
    spec = base_spec_from_files(model_dir, quantization, max_lora_rank, max_adapter_bytes)
    loaded_shapes = {name: (w.out_features, w.in_features) for name, w in layers.items()}
    if loaded_shapes != dict(spec.target_shapes):
        raise ModelLoadError("the Linear layers found in the loaded model differ from the weight files")
    log.info(
        "loaded %s (%s, %s, %s) with %d LoRA-capable Linears",
        model_dir,
        quantization,
        device,
        str(dtype).removeprefix("torch."),
        len(layers),
    )
    return LoadedBase(
        model=model,
        lora_layers=layers,
        context=context,
        spec=spec,
        device=device,
        dtype=dtype,
        quantization=quantization,
        model_id=model_id_of(model_dir, cfg),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
    )
