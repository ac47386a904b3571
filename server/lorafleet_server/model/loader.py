"""Load the base model with a quantization backend and wrap its Linears for multi-LoRA."""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorafleet_adapters.peft_format import BaseModelSpec
from lorafleet_server.errors import ModelLoadError
from lorafleet_server.model.cpu import CpuFeatures, cpu_features
from lorafleet_server.model.lora import LoraContext, MultiLoRALinear
from lorafleet_server.model.native import NativePool
from lorafleet_server.model.options import QUANTIZATIONS, LinearKernel
from lorafleet_server.model.packed import pack_base
from lorafleet_server.model.prepare import prompt_format_fingerprint, weights_fingerprint

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2"})
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DTYPE_CHOICES = ("auto", *DTYPES)


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
    sliding_window: int | None  # attention_window(): --max-seq-len may not exceed it
    dtype_reason: str = ""  # why this compute dtype (choose_compute_dtype)
    compiled: bool = False  # compile_base ran
    cpu_features: str = ""  # CpuFeatures.summary() of this machine
    linear_kernel: str = "torch"  # "native-amx", "native-avx512", "native-fp32" or "onednn-packed" (model/packed.py)
    # the native bf16 Linears' helper threads, for the step's other native kernels to share; None: none
    pool: NativePool | None = None


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
    """The safe default: bf16 on CUDA, fp32 on CPU (bf16 is slow batched on CPUs without native bf16,
    docs/architecture.md, "Measured facts"). `choose_compute_dtype` may pick bf16 on a CPU that has it."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# The bf16-vs-fp32 quality check (docs/architecture.md, "Compute dtype"): teacher-forced next-token
# logits of fixed prompts through the HF forward in both dtypes. bf16 passes when the fp32 argmax
# stays the argmax at >= this share of the positions and no logit moves by more than this much.
QUALITY_PROMPTS = (
    "The capital of France is",
    "Water boils at a temperature of",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Translate to German: Good morning, how are you?",
    "List three primary colors: red,",
    "The quick brown fox jumps over the lazy dog. The quick brown",
)
QUALITY_MIN_TOP1 = 0.90
QUALITY_MAX_LOGIT_DIFF = 2.0
QUALITY_CACHE_FILE = "lorafleet-dtype-check.json"


@dataclass(frozen=True)
class QualityCheck:
    top1_agreement: float  # share of positions where bf16's argmax is fp32's
    max_logit_diff: float  # max |bf16 - fp32| over every logit of every position
    positions: int

    @property
    def passed(self) -> bool:
        return self.top1_agreement >= QUALITY_MIN_TOP1 and self.max_logit_diff <= QUALITY_MAX_LOGIT_DIFF

    def describe(self) -> str:
        verdict = "pass" if self.passed else "fail"
        return (
            f"{verdict}: top-1 agreement {self.top1_agreement:.3f} (>= {QUALITY_MIN_TOP1}), max logit diff "
            f"{self.max_logit_diff:.3f} (<= {QUALITY_MAX_LOGIT_DIFF}) over {self.positions} positions"
        )


@torch.inference_mode()
def bf16_quality(model_dir: Path) -> QualityCheck:
    """Compare bf16 against fp32 on QUALITY_PROMPTS (CPU, no LoRA); a few seconds on SmolLM2-135M."""
    from transformers import AutoTokenizer

    tokenizer: Any = AutoTokenizer.from_pretrained(model_dir)
    cpu = torch.device("cpu")
    logits: dict[torch.dtype, list[torch.Tensor]] = {}
    for dtype in (torch.float32, torch.bfloat16):
        model: Any = load_hf_model(model_dir, "none", cpu, dtype)
        logits[dtype] = [
            model(input_ids=torch.tensor([tokenizer.encode(p)], dtype=torch.long)).logits[0].float()  # [T, vocab]
            for p in QUALITY_PROMPTS
        ]
        del model
    ref = torch.cat(logits[torch.float32])  # [P, vocab]
    low = torch.cat(logits[torch.bfloat16])  # [P, vocab]
    agree = (ref.argmax(-1) == low.argmax(-1)).float().mean().item()
    return QualityCheck(
        top1_agreement=round(agree, 4),
        max_logit_diff=round((ref - low).abs().max().item(), 4),
        positions=int(ref.shape[0]),
    )


def cached_bf16_quality(model_dir: Path, fingerprint: str) -> QualityCheck:
    """`bf16_quality`, cached next to the model per weights fingerprint and torch version.

    A model directory that cannot be written to just runs the check at every start (logged).
    """
    path = model_dir / QUALITY_CACHE_FILE
    key = {"fingerprint": fingerprint, "torch": torch.__version__, "prompts": len(QUALITY_PROMPTS)}
    try:
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return QualityCheck(**cached["result"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    check = bf16_quality(model_dir)
    try:
        payload = {"key": key, "result": {f: getattr(check, f) for f in check.__dataclass_fields__}}
        path.write_text(json.dumps(payload, indent=2) + "\n")
    except OSError as exc:
        log.info("cannot cache the bf16 quality check in %s (%s); it runs again next start", path, exc)
    return check


@dataclass(frozen=True)
class DtypeChoice:
    dtype: torch.dtype
    reason: str  # why, for the log and GetModelInfo's reader


def choose_compute_dtype(
    requested: str,
    device: torch.device,
    features: CpuFeatures,
    quality: Callable[[], QualityCheck],
) -> DtypeChoice:
    """The compute dtype for `requested` ("auto", "float32" or "bfloat16").

    CUDA: "auto" is bf16. CPU: "auto" is bf16 only where the CPU has native bf16 (avx512_bf16/AMX)
    and `quality()` passes; otherwise fp32, with the reason. An explicit dtype is taken as asked.
    """
    if requested not in DTYPE_CHOICES:
        raise ModelLoadError(f"unknown dtype {requested!r}; choose one of {', '.join(DTYPE_CHOICES)}")
    if requested != "auto":
        return DtypeChoice(DTYPES[requested], f"asked for {requested}")
    if device.type == "cuda":
        return DtypeChoice(torch.bfloat16, "CUDA computes in bf16")
    if not features.native_bf16:
        return DtypeChoice(torch.float32, "no native bf16 on this CPU (no avx512_bf16/amx_bf16)")
    check = quality()
    if not check.passed:
        return DtypeChoice(torch.float32, f"native bf16, but the bf16 quality check failed ({check.describe()})")
    return DtypeChoice(torch.bfloat16, f"native bf16 and the quality check passed ({check.describe()})")


def base_compute_dtype(
    model_dir: Path,
    fingerprint: str,
    quantization: str,
    device: torch.device,
    dtype: str | None,
    features: CpuFeatures | None = None,
) -> DtypeChoice:
    """The compute dtype the server runs a base of resolved ``quantization`` in for ``--dtype``
    ``dtype``: the device's default for "device" (or None) and for a quantized base under "auto"
    (bitsandbytes keeps its rule), else ``choose_compute_dtype``. Training features for heads take
    the same choice, so a head is fitted on the features it is served."""
    if dtype is None or dtype == "device":
        return DtypeChoice(compute_dtype_for(device), "the device's default (--dtype device)")
    if quantization != "none" and dtype == "auto":
        return DtypeChoice(compute_dtype_for(device), f"{quantization} computes in the device's default")
    return choose_compute_dtype(
        dtype,
        device,
        features if features is not None else cpu_features(),
        lambda: cached_bf16_quality(model_dir, fingerprint),
    )


def compile_base(model: nn.Module) -> None:
    """torch.compile (inductor) the elementwise-heavy pieces of each decoder layer: its RMSNorms and
    its MLP. The MultiLoRALinear LoRA math runs outside the graphs (``torch.compiler.disable`` in
    ``model/lora.py``), eager and unchanged, so adapters stay exact against PEFT."""
    decoder: Any = model.model
    for layer in decoder.layers:
        layer.input_layernorm = torch.compile(layer.input_layernorm, dynamic=True)
        layer.post_attention_layernorm = torch.compile(layer.post_attention_layernorm, dynamic=True)
        layer.mlp = torch.compile(layer.mlp, dynamic=True)


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
    for rope_type in _rope_types(cfg):
        if rope_type in POSITION_DEPENDENT_ROPE:
            raise ModelLoadError(
                f"RoPE scaling {rope_type!r} is not supported: it rescales the rotary frequencies from the longest "
                "position of each forward, so in a shared batch one row's numbers would depend on the others'"
            )
    return cfg


# RoPE types whose frequencies transformers recomputes from the sequence length of each forward.
POSITION_DEPENDENT_ROPE = frozenset({"dynamic", "longrope"})


def _rope_types(cfg: dict[str, Any]) -> set[str]:
    """The RoPE types of a config: ``rope_scaling`` (transformers 4) or ``rope_parameters`` (5), which
    may also hold one dict per layer type."""
    found: set[str] = set()
    for params in (cfg.get("rope_scaling"), cfg.get("rope_parameters")):
        if not isinstance(params, dict):
            continue
        nested = [v for v in params.values() if isinstance(v, dict)]
        for p in [params, *nested]:
            rope_type = p.get("rope_type", p.get("type"))
            if isinstance(rope_type, str):
                found.add(rope_type)
    return found


def attention_window(cfg: dict[str, Any]) -> int | None:
    """The sliding attention window (positions) of the model's windowed layers, or None when every
    layer attends to all earlier positions. The runner implements full attention only, which equals a
    windowed layer's while no sequence is longer than the window."""
    window = cfg.get("sliding_window")
    if window is None:
        return None
    layer_types = cfg.get("layer_types")
    if isinstance(layer_types, list):
        return int(window) if "sliding_attention" in layer_types else None
    if cfg.get("model_type") == "qwen2":  # windowed: the layers from max_window_layers on, with use_sliding_window
        layers = int(cfg.get("num_hidden_layers", 0))
        windowed = cfg.get("use_sliding_window") and int(cfg.get("max_window_layers", 28)) < layers  # HF's default
        return int(window) if windowed else None
    return int(window)  # Mistral: every layer


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    with path.open("rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        header: dict[str, Any] = json.loads(fh.read(size))
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


class _DropInt8CastWarning(logging.Filter):
    """bitsandbytes's int8 matmul casts every input that is not fp16 to fp16 and says so at WARNING on
    every call: ~210 lines per decode step of a 30-layer model (the cast is its kernel's, whatever the
    compute dtype). The loader says it once instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


def quiet_int8_cast_warning() -> None:
    """Drop bitsandbytes's per-call int8 cast warning (idempotent) and log what it says once."""
    bnb_log = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropInt8CastWarning) for f in bnb_log.filters):
        bnb_log.addFilter(_DropInt8CastWarning())
    log.info("int8: bitsandbytes casts each quantized Linear's input to float16, its int8 kernel's input type")


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
        prompt_format=prompt_format_fingerprint(model_dir),
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
    dtype: str | None = None,
    compile: bool = False,
    linear_kernel: LinearKernel = "auto",
    kernels_dir: Path | None = None,
    compiler: str | None = None,
    linear_threads: int = 1,
    measure_threads: tuple[int, ...] = (),
) -> LoadedBase:
    """Load, wrap and check the base. `dtype` is "auto", "float32" or "bfloat16" (`choose_compute_dtype`);
    "device" or None keeps `compute_dtype_for(device)` (bf16 on CUDA, fp32 on CPU: the default).
    `compile` runs `compile_base` (CPU or CUDA, unquantized bases only). `linear_kernel` picks the
    CPU base Linears' kernel (`model/packed.py` pack_base); the native one is built into
    `kernels_dir` (None: not tried) by `compiler` (None: cc or gcc) and runs on `linear_threads`
    threads; an fp32 base's choice is timed at `measure_threads` (the thread counts its steps run on;
    empty: torch's current one)."""
    cfg = read_model_config(model_dir)
    quantization = resolve_quantization(quantization, device)
    features = cpu_features()
    spec = base_spec_from_files(model_dir, quantization, max_lora_rank, max_adapter_bytes)
    choice = base_compute_dtype(model_dir, spec.fingerprint, quantization, device, dtype, features)
    compute = choice.dtype
    if quantization == "int8":
        quiet_int8_cast_warning()
    model = load_hf_model(model_dir, quantization, device, compute)
    context = LoraContext()
    layers = wrap_targets(model, num_slots, max_lora_rank, context, compute, device)
    loaded_shapes = {name: (w.out_features, w.in_features) for name, w in layers.items()}
    if loaded_shapes != dict(spec.target_shapes):
        raise ModelLoadError("the Linear layers found in the loaded model differ from the weight files")
    if compile:
        if quantization != "none":
            raise ModelLoadError(f"--compile needs an unquantized base, not {quantization}")
        compile_base(model)
    # bf16 or fp32 on CPU: the base weights packed once for a native kernel or oneDNN
    # (model/packed.py; fp32 where that measures faster here). Not under --compile, whose graphs
    # would have to trace them.
    eligible = None
    if device.type != "cpu" or compute not in (torch.bfloat16, torch.float32):
        eligible = f"{str(compute).removeprefix('torch.')} on {device.type} keeps torch's Linears"
    elif quantization != "none" or compile:
        eligible = "a quantized or compiled base keeps torch's Linears"
    linears = pack_base(
        model,
        list(layers.values()),
        linear_kernel,
        eligible=eligible,
        cache_dir=kernels_dir,
        compiler=compiler,
        threads=linear_threads,
        dtype=compute,
        measure_threads=measure_threads,
    )
    log.info("base Linears: %s (%s)", linears.name, linears.reason)
    log.info(
        "loaded %s (%s, %s, %s%s) with %d LoRA-capable Linears (%s); dtype: %s; cpu: %s",
        model_dir,
        quantization,
        device,
        str(compute).removeprefix("torch."),
        ", compiled" if compile else "",
        len(layers),
        linears.name,
        choice.reason,
        features.summary() or "no reported flags",
    )
    return LoadedBase(
        model=model,
        lora_layers=layers,
        context=context,
        spec=spec,
        device=device,
        dtype=compute,
        quantization=quantization,
        model_id=model_id_of(model_dir, cfg),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        sliding_window=attention_window(cfg),
        dtype_reason=choice.reason,
        compiled=compile,
        cpu_features=features.summary(),
        linear_kernel=linears.name,
        pool=linears.pool,
    )
