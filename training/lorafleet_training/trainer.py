"""LoRA / QLoRA training with PEFT on the base model directory the server serves.

Order of work, so that every cheap check fails before the model is loaded: config and base spec,
JSONL parsing (every bad line reported), PII policy, split, tokenization (prompts too long reported),
then model load, training, evaluation, and the output directory (``publish.write_training_dir``).

Backends: ``lora`` trains on the fp32 base on CPU (bf16 on CUDA). ``qlora`` loads the base as
bitsandbytes NF4 and calls ``prepare_model_for_kbit_training``; on CUDA that is the design's QLoRA, on
a CPU bitsandbytes 0.50 runs NF4 too (~4.3 s/step vs ~3.3 for fp32 LoRA; docs/architecture.md,
"Measured facts"), and the run says so; if NF4 cannot load here it falls back to LoRA on fp32 with a
warning, and records ``lora``. The device, the compute dtype, the bitsandbytes settings and the loading
itself come from the server's loader (``lorafleet_server.model.loader``), so training and serving load
the base the same way.

Deterministic on CPU for a seed: seeded LoRA init and dropout, a seeded data order, deterministic
algorithms on during training; two runs give byte-identical ``adapter_model.safetensors``.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from tqdm.auto import tqdm

from lorafleet_adapters.manifest import utc_now_iso
from lorafleet_adapters.peft_format import BaseModelSpec
from lorafleet_adapters.prompt import PromptTemplate
from lorafleet_adapters.ref import AdapterRef
from lorafleet_server.model import loader as model_loader
from lorafleet_training import data as data_mod
from lorafleet_training.data import MAX_SEED, Example, template_to_dict
from lorafleet_training.encoding import Encoded, collate, completion_loss_sum, encode_checked, keep_last, pad_id_of
from lorafleet_training.errors import TrainingDataError, TrainingError
from lorafleet_training.evaluate import EvalResult, completion_loss, evaluate, forgetting_check
from lorafleet_training.pii import MODES, PiiReport, apply_policy
from lorafleet_training.publish import RECORD_FORMAT, check_out_dir, write_training_dir

METHODS = ("lora", "qlora")
ALL_LINEAR = "all-linear"
DEFAULT_TARGETS = ("q_proj", "v_proj")  # PEFT's default for Llama-family models
RECORDED_SAMPLES = 5

Echo = Callable[[str], None]


@dataclass(frozen=True)
class TrainConfig:
    data: Path
    adapter: str  # tenant/name (no version: versions are assigned at publish)
    out_dir: Path
    base_model_dir: Path
    method: str = "lora"
    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = DEFAULT_TARGETS  # module names (q_proj, ...) or ("all-linear",)
    dropout: float = 0.05
    epochs: int = 3
    lr: float = 2e-4
    batch_size: int = 4
    max_length: int = 512
    seed: int = 0
    val_fraction: float = 0.1
    pii: str = "refuse"
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_max_new_tokens: int = 64
    eval_batch_size: int = 8
    eval_generate: bool = True
    compare_prompt: Path | None = None  # a prompt template JSON ({"system", "examples"}) to compare against
    eval_data: Path | None = None  # a held-out JSONL to evaluate on; then all of `data` trains (no split)
    overwrite: bool = False
    forgetting_check: bool = True  # score base and adapter on the general held-out set that ships with lorafleet
    keep_data_ref: bool = False  # publish where the data lives with the version, so `lorafleet retrain` can train again

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", Path(self.data))
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        object.__setattr__(self, "base_model_dir", Path(self.base_model_dir))
        object.__setattr__(self, "targets", tuple(self.targets))
        for name in ("compare_prompt", "eval_data"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        for name in ("alpha", "lr", "dropout", "val_fraction", "warmup_ratio", "weight_decay", "max_grad_norm"):
            if isinstance(getattr(self, name), int) and not isinstance(getattr(self, name), bool):
                object.__setattr__(self, name, float(getattr(self, name)))
        problems = []
        if self.method not in METHODS:
            problems.append(f"method must be one of {METHODS}, got {self.method!r}")
        if self.pii not in MODES:
            problems.append(f"pii must be one of {MODES}, got {self.pii!r}")
        for name in ("rank", "epochs", "batch_size", "max_length", "eval_max_new_tokens", "eval_batch_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("alpha", "lr"):
            if not getattr(self, name) > 0 or not math.isfinite(getattr(self, name)):
                problems.append(f"{name} must be a positive number, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.seed <= MAX_SEED:  # torch failed on a larger one, after the model had loaded
            problems.append(f"seed must be in [0, {MAX_SEED}], got {self.seed}")
        if not 0.0 <= self.val_fraction < 1.0:
            problems.append(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            problems.append(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not self.targets:
            problems.append("targets must name at least one module (or 'all-linear')")
        if ALL_LINEAR in self.targets and len(self.targets) > 1:
            problems.append("'all-linear' cannot be combined with other targets")
        if problems:
            raise TrainingError("invalid training configuration: " + "; ".join(problems))
        ref = AdapterRef.parse(self.adapter)
        if ref.version is not None:
            raise TrainingError(f"--adapter {self.adapter}: versions are assigned at publish; drop '@{ref.version}'")

    @property
    def ref(self) -> AdapterRef:
        return AdapterRef.parse(self.adapter)

    def hyperparameters(self) -> dict[str, Any]:
        keys = (
            "rank",
            "alpha",
            "targets",
            "dropout",
            "epochs",
            "lr",
            "batch_size",
            "max_length",
            "seed",
            "val_fraction",
            "warmup_ratio",
            "weight_decay",
            "max_grad_norm",
            "eval_max_new_tokens",
        )
        values = asdict(self)
        return {k: list(values[k]) if k == "targets" else values[k] for k in keys}


@dataclass(frozen=True)
class Backend:
    method: str  # what actually runs: "lora" or "qlora"
    device: torch.device
    quantization: str  # of the base during training: "none" or "nf4"
    dtype: torch.dtype  # of the base's non-quantized weights and compute
    note: str


@dataclass(frozen=True)
class TrainResult:
    out_dir: Path
    record: dict[str, Any]
    model: Any  # the trained peft.PeftModel (eval mode)
    tokenizer: Any
    evaluation: EvalResult
    history: tuple[dict[str, float], ...] = field(default=())


def check_against_spec(config: TrainConfig, spec: BaseModelSpec) -> None:
    if config.rank > spec.max_lora_rank:
        raise TrainingError(f"--rank {config.rank} exceeds the base's max_lora_rank {spec.max_lora_rank}")
    if config.targets == (ALL_LINEAR,):
        return
    available = sorted({name.rsplit(".", 1)[-1] for name in spec.target_shapes})
    unknown = [t for t in config.targets if t not in available]
    if unknown:
        raise TrainingError(
            f"--targets {unknown} are not Linear modules of the base; choose from {available} or '{ALL_LINEAR}'"
        )


def train(
    config: TrainConfig,
    spec: BaseModelSpec,
    *,
    progress: bool = True,
    echo: Echo = print,
) -> TrainResult:
    """Train per `config` on the base `spec` describes; write the output directory; return the model too."""
    check_against_spec(config, spec)
    inputs = (config.data, config.eval_data, config.compare_prompt, config.base_model_dir)
    check_out_dir(config.out_dir, config.overwrite, inputs)
    template = data_mod.load_prompt_template(config.compare_prompt) if config.compare_prompt else None

    examples, pii_report = _load_checked(config.data, config.pii, echo)
    checked_eval = _load_checked(config.eval_data, config.pii, echo) if config.eval_data else None
    eval_examples = checked_eval[0] if checked_eval is not None else None
    fingerprint = data_mod.fingerprint(examples)
    if eval_examples is None:
        train_set, val_set = data_mod.split(examples, config.val_fraction, config.seed)
        held_out = f"{len(val_set)} held out"
        if (note := data_mod.held_out_warning(len(examples), len(val_set), config.val_fraction)) is not None:
            echo(note)
    else:
        train_set, val_set = list(examples), eval_examples
        held_out = f"evaluated on {len(val_set)} from {config.eval_data}"
    shared = data_mod.overlap(train_set, val_set)  # 0 for a split: a prompt stays on one side
    if shared:  # a warning, not an error: retraining on the file it was scored on is a choice (recorded)
        echo(f"warning: {shared} of {len(val_set)} evaluation prompts also occur in the training data")
    echo(
        f"data: {len(examples)} examples from {config.data} ({len(train_set)} train, {held_out}), "
        f"fingerprint {fingerprint[:19]}…"
    )
    if not val_set:
        echo("warning: no held-out examples (fewer than 2 distinct prompts, or --val-fraction 0): no evaluation")

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.base_model_dir)
    encoded_train, too_long = encode_checked(tokenizer, train_set, config.max_length, source=str(config.data))
    # held-out completions are scored whole (no --max-length cut), per epoch as in the final evaluation; their
    # prompts are held to --max-length as training's are, before the model loads
    val_source = str(config.eval_data or config.data)
    encoded_val, val_too_long = encode_checked(
        tokenizer, val_set, None, source=val_source, prompt_limit=config.max_length
    )
    if config.eval_data is None:  # one file: every line at once, whichever side of the split it fell on
        too_long, val_too_long = sorted(too_long + val_too_long, key=lambda issue: issue.line), []
    if too_long:
        raise TrainingDataError(str(config.data), too_long)
    if val_too_long:
        raise TrainingDataError(val_source, val_too_long)
    truncated = sum(e.truncated for e in encoded_train)
    if truncated:
        echo(f"warning: {truncated} example(s) longer than --max-length {config.max_length}: completions cut")

    backend = choose_backend(config.method, echo)
    model, backend = load_peft_model(config, spec, backend, echo)
    if backend.quantization != spec.quantization:
        echo(
            f"note: trained on the {backend.quantization} base; the server serves this base (same weights, "
            f"{spec.fingerprint[:19]}…) with quantization {spec.quantization!r}, so its outputs may differ slightly"
        )
    pad_id = pad_id_of(tokenizer)

    started = time.monotonic()
    with _deterministic():
        history = _train_loop(model, config, encoded_train, encoded_val, pad_id, progress, echo)
    training_seconds = time.monotonic() - started

    started = time.monotonic()
    evaluation = evaluate(
        model,
        tokenizer,
        val_set,
        max_new_tokens=config.eval_max_new_tokens,
        batch_size=config.eval_batch_size,
        template=template,
        generate=config.eval_generate,
        progress=progress,
    )
    forgetting = forgetting_check(model, tokenizer, config.eval_batch_size) if config.forgetting_check else None
    if forgetting is not None:
        evaluation.metrics.update(
            {
                "general_base_loss": forgetting["base_loss"],
                "general_adapter_loss": forgetting["adapter_loss"],
                "forgetting": forgetting["relative_increase"],
            }
        )
    evaluation_seconds = time.monotonic() - started
    if evaluation.metrics:
        echo(format_metrics(evaluation.metrics))

    record = _record(
        config=config,
        spec=spec,
        backend=backend,
        examples=examples,
        train_set=train_set,
        val_set=val_set,
        truncated=truncated,
        overlap=shared,
        fingerprint=fingerprint,
        pii=pii_report.to_record(),
        history=history,
        evaluation=evaluation,
        training_seconds=training_seconds,
        evaluation_seconds=evaluation_seconds,
        template=template,
    )
    record["forgetting"] = forgetting
    # --eval-data's own scan (what --pii redact or allow did to it); the manifest's pii_scan is --data's
    record["eval_pii_scan"] = checked_eval[1].to_record() if checked_eval is not None else None
    written = write_training_dir(
        config.out_dir, lambda d: model.save_pretrained(str(d)), record, spec, config.overwrite
    )
    echo(
        f"wrote {config.out_dir} ({backend.method}, trained {training_seconds:.1f} s, "
        f"evaluated {evaluation_seconds:.1f} s); publish it with `lorafleet publish {config.out_dir}`"
    )
    model.eval()
    return TrainResult(config.out_dir, written, model, tokenizer, evaluation, tuple(history))


def _load_checked(path: Path, pii: str, echo: Echo) -> tuple[list[Example], PiiReport]:
    """Parse a JSONL file and apply the PII policy to it (PiiFound names the file)."""
    examples, report = apply_policy(data_mod.load_jsonl(path), pii, source=str(path))
    if not report.clean:
        echo(report.describe(limit=10))
        action = "spans replaced by typed placeholders" if pii == "redact" else "using the data as is (recorded)"
        echo(f"PII mode {pii!r} for {path}: {action}")
    return examples, report


def format_metrics(metrics: dict[str, float]) -> str:
    """One line per compared model: loss, perplexity, exact match, F1."""
    lines = [f"held-out evaluation ({int(metrics.get('eval_examples', 0))} examples):"]
    for name in ("base", "prompt", "adapter"):
        if f"{name}_loss" not in metrics:
            continue
        line = f"  {name:<8} loss {metrics[f'{name}_loss']:.4f}  ppl {metrics[f'{name}_ppl']:.2f}"
        if f"{name}_exact_match" in metrics:
            line += f"  exact match {metrics[f'{name}_exact_match']:.3f}  F1 {metrics[f'{name}_f1']:.3f}"
        lines.append(line)
    if "forgetting" in metrics:
        lines.append(
            f"  forgetting check (general held-out set): loss {metrics['general_base_loss']:.4f} (base) -> "
            f"{metrics['general_adapter_loss']:.4f} (adapter), {metrics['forgetting']:+.1%}"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ backend


def choose_backend(method: str, echo: Echo) -> Backend:
    """Device and dtype as the server picks them (``model_loader``): CUDA in bf16, else the CPU in fp32."""
    device = model_loader.resolve_device("auto")
    dtype = model_loader.compute_dtype_for(device)
    if method == "lora":
        return Backend("lora", device, "none", dtype, f"LoRA on the {str(dtype).removeprefix('torch.')} base, {device}")
    if device.type == "cuda":
        return Backend("qlora", device, "nf4", dtype, "QLoRA on the bitsandbytes NF4 base (CUDA, bf16 compute)")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        echo(
            f"warning: --method qlora without CUDA and without bitsandbytes ({exc}): training LoRA on the fp32 "
            "base instead; the manifest records method 'lora'"
        )
        return Backend("lora", device, "none", dtype, "LoRA on the fp32 base, CPU (QLoRA fallback)")
    echo(
        "QLoRA without CUDA: the base is loaded as bitsandbytes NF4 on the CPU (float32 compute) and LoRA trains "
        "on it — the same math as QLoRA on a GPU, roughly 1.3x slower per step than LoRA on fp32 here"
    )
    return Backend("qlora", device, "nf4", dtype, "QLoRA on the bitsandbytes NF4 base, CPU (float32 compute)")


def load_peft_model(config: TrainConfig, spec: BaseModelSpec, backend: Backend, echo: Echo) -> tuple[Any, Backend]:
    """The base (per `backend`) wrapped by a freshly, deterministically initialized LoRA."""
    from peft import LoraConfig, get_peft_model

    base, backend = _load_base(config.base_model_dir, backend, echo)
    _check_base_matches_spec(base, spec)
    _seed_everything(config.seed)
    targets: str | list[str] = ALL_LINEAR if config.targets == (ALL_LINEAR,) else list(config.targets)
    lora = LoraConfig(
        task_type="CAUSAL_LM",
        r=config.rank,
        lora_alpha=int(config.alpha) if config.alpha.is_integer() else cast(Any, config.alpha),
        lora_dropout=config.dropout,
        target_modules=targets,
        bias="none",
    )
    model = get_peft_model(base, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    echo(
        f"model: {spec.model_id} — {backend.note}; LoRA r={config.rank} alpha={config.alpha} "
        f"targets={targets}: {trainable:,} trainable parameters"
    )
    return model, backend


def _load_base(model_dir: Path, backend: Backend, echo: Echo) -> tuple[Any, Backend]:
    """The base per `backend`, loaded by the server's `load_hf_model` (frozen; peft adds what trains)."""
    if backend.quantization == "nf4":
        from peft import prepare_model_for_kbit_training

        try:
            model = model_loader.load_hf_model(model_dir, "nf4", backend.device, backend.dtype)
        except (model_loader.ModelLoadError, RuntimeError, ImportError, ValueError) as exc:
            if backend.device.type == "cuda":
                raise TrainingError(f"cannot load the NF4 base for QLoRA: {exc}") from exc
            echo(
                f"warning: the NF4 base does not load on this CPU ({exc}); training LoRA on the fp32 base instead; "
                "the manifest records method 'lora'"
            )
            dtype = model_loader.compute_dtype_for(backend.device)
            backend = Backend("lora", backend.device, "none", dtype, "LoRA on the fp32 base, CPU (QLoRA fallback)")
            return _load_base(model_dir, backend, echo)
        # gradient checkpointing saves GPU memory; on a CPU with a small model it only costs time
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=backend.device.type == "cuda")
        return model, backend
    return model_loader.load_hf_model(model_dir, "none", backend.device, backend.dtype), backend


def _check_base_matches_spec(model: Any, spec: BaseModelSpec) -> None:
    linears = {name: (m.out_features, m.in_features) for name, m in model_loader.discover_targets(model).items()}
    if linears != dict(spec.target_shapes):
        raise TrainingError(
            f"the base model loaded for training does not match the base spec {spec.fingerprint} ({spec.model_id}): "
            "pass the spec of the same model directory"
        )


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


@contextmanager
def _deterministic() -> Iterator[None]:
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)


# ------------------------------------------------------------------------------------------ training


def _train_loop(
    model: Any,
    config: TrainConfig,
    train_set: Sequence[Encoded],
    val_set: Sequence[Encoded],
    pad_id: int,
    progress: bool,
    echo: Echo,
) -> list[dict[str, float]]:
    device = next(p for p in model.parameters() if p.requires_grad).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(train_set) / config.batch_size)
    total = steps_per_epoch * config.epochs
    warmup = int(total * config.warmup_ratio)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    order = torch.Generator().manual_seed(config.seed)
    history: list[dict[str, float]] = []
    model.train()
    for epoch in range(1, config.epochs + 1):
        started = time.monotonic()
        permutation = torch.randperm(len(train_set), generator=order).tolist()
        losses: list[float] = []
        bar = tqdm(
            total=steps_per_epoch, desc=f"epoch {epoch}/{config.epochs}", unit="step", disable=not progress, leave=False
        )
        for start in range(0, len(permutation), config.batch_size):
            rows = [train_set[i] for i in permutation[start : start + config.batch_size]]
            batch = {k: v.to(device) for k, v in collate(rows, pad_id).items()}
            loss_sum, tokens = completion_loss_sum(model, batch, keep_last(rows))
            loss = loss_sum / max(tokens, 1)  # mean over the batch's completion tokens
            if not torch.isfinite(loss):
                raise TrainingError(f"the training loss became {float(loss)} at epoch {epoch}; lower --lr")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach().item())
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        bar.close()
        entry = {"epoch": float(epoch), "train_loss": sum(losses) / len(losses), "seconds": time.monotonic() - started}
        line = f"epoch {epoch}/{config.epochs}: train loss {entry['train_loss']:.4f}"
        if val_set:
            model.eval()
            entry["val_loss"], _ = completion_loss(model, val_set, pad_id, config.eval_batch_size)
            model.train()
            line += f", val loss {entry['val_loss']:.4f}"
        echo(f"{line} ({len(losses)} steps, {entry['seconds']:.1f} s)")
        history.append(entry)
    model.eval()
    return history


def _record(
    *,
    config: TrainConfig,
    spec: BaseModelSpec,
    backend: Backend,
    examples: Sequence[Example],
    train_set: Sequence[Example],
    val_set: Sequence[Example],
    truncated: int,
    overlap: int,
    fingerprint: str,
    pii: dict[str, Any],
    history: Sequence[dict[str, float]],
    evaluation: EvalResult,
    training_seconds: float,
    evaluation_seconds: float,
    template: PromptTemplate | None,
) -> dict[str, Any]:
    import peft
    import transformers

    kinds = {"chat" if e.is_chat else "prompt-completion" for e in examples}
    return {
        "format": RECORD_FORMAT,
        "adapter": config.adapter,
        "method": backend.method,
        "requested_method": config.method,
        "base": {
            "fingerprint": spec.fingerprint,
            "prompt_format": spec.prompt_format,
            "model_id": spec.model_id,
            "model_dir": str(config.base_model_dir),
            "served_quantization": spec.quantization,
            "training_quantization": backend.quantization,
            "device": str(backend.device),
            "backend": backend.note,
        },
        "data": {
            "path": str(config.data.resolve() if config.keep_data_ref else config.data),
            "keep_ref": config.keep_data_ref,
            "fingerprint": fingerprint,
            "kind": "mixed" if len(kinds) > 1 else kinds.pop(),
            "examples": len(examples),
            "train_examples": len(train_set),
            "val_examples": len(val_set),
            "truncated_examples": truncated,
            "eval_path": str(config.eval_data.resolve() if config.keep_data_ref else config.eval_data)
            if config.eval_data
            else None,
            "eval_fingerprint": data_mod.fingerprint(val_set) if val_set else None,
            "val_overlap": overlap,  # held-out examples whose prompt also occurs in training (0 for a split)
        },
        "pii_scan": pii,
        "hyperparameters": config.hyperparameters(),
        "history": list(history),
        "eval_metrics": dict(evaluation.metrics),
        "compared_prompt": template_to_dict(template) if template is not None else None,
        "samples": [
            {"line": s.line, "prompt": s.prompt, "reference": s.reference, "answers": s.answers}
            for s in evaluation.samples[:RECORDED_SAMPLES]
        ],
        "training_seconds": round(training_seconds, 3),
        "evaluation_seconds": round(evaluation_seconds, 3),
        "created_at": utc_now_iso(),
        "software": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
    }
