"""``lorafleet train --method classifier``: a classifier head on pooled features of the frozen base.

Feature extraction: the base (optionally with one published LoRA version of the same tenant,
``--features-from``) stays frozen; each example's prompt is encoded exactly as the server encodes it
(plain text as is, chat ``messages`` with the chat template), run through the model, and its final
hidden states are mean-pooled over the prompt tokens: the features ``Embed`` returns and ``Classify``
feeds the head. A multinomial logistic regression (scikit-learn, L2, lbfgs) trains on them; its feature
standardization is folded into one linear layer, so serving is ``softmax(x @ W.T + b)``.

Why scikit-learn and not a torch loop: with features fixed the problem is convex, lbfgs solves it to a
deterministic optimum in well under a second for thousands of examples, and there is no learning rate,
epoch count or early stopping to tune (or to record for a retrain). An MLP buys little on mean-pooled
features of a 135M model and would need all of them.

Order of work, every cheap check first: config, JSONL (every bad line reported), PII policy, labels
and the seeded stratified split, prompt lengths (training and held-out), then the model, features,
head, held-out metrics and the output directory (staged beside it, renamed into place). Deterministic
for a seed.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorafleet_adapters.errors import AdapterError, AdapterFormatError
from lorafleet_adapters.head import HEAD_FILE, HEAD_WEIGHTS_FILE, ClassifierHead
from lorafleet_adapters.manifest import HEAD_METHOD, sha256_file, utc_now_iso
from lorafleet_adapters.peft_format import BaseModelSpec
from lorafleet_adapters.prompt import PromptTemplate
from lorafleet_adapters.ref import AdapterKey, AdapterRef
from lorafleet_training import data as data_mod
from lorafleet_training.data import MAX_SEED, Example, Turn
from lorafleet_training.encoding import all_prompt_ids, pad_id_of
from lorafleet_training.errors import DataIssue, TrainingDataError, TrainingError
from lorafleet_training.pii import MODES, PiiReport, apply_policy

HEAD_KIND = "head"
HEAD_PUBLISHED_FILES = (HEAD_FILE, HEAD_WEIGHTS_FILE)
MAX_LABELS = 1024
NO_LABEL = "<none>"  # what a prompt-only answer that names no label counts as
FEATURE_BATCH = 16
Echo = Callable[[str], None]


@dataclass(frozen=True)
class ClassifierConfig:
    data: Path
    adapter: str  # tenant/name (no version)
    out_dir: Path
    base_model_dir: Path
    features_from: str | None = None  # tenant/name[@version] of a LoRA of the same tenant
    seed: int = 0
    val_fraction: float = 0.2
    c: float = 1.0  # inverse L2 strength of the logistic regression
    max_iter: int = 2000
    max_length: int = 512  # prompt tokens per example at most (longer prompts are refused: see over_length)
    pii: str = "refuse"
    keep_data_ref: bool = False  # record where the data lives, so `lorafleet retrain` can train again
    eval_generate: bool = True  # also ask the base (prompt only) to answer with the label
    eval_max_new_tokens: int = 8
    eval_data: Path | None = None  # a held-out labelled JSONL; then all of `data` trains (no split)
    overwrite: bool = False
    # The server's --device and --dtype: features are computed as the server computes them (with the
    # base's quantization, from the spec), since a head only knows the features it was fitted on.
    device: str = "auto"
    dtype: str = "auto"

    def __post_init__(self) -> None:
        for name in ("data", "out_dir", "base_model_dir"):
            object.__setattr__(self, name, Path(getattr(self, name)))
        if self.eval_data is not None:
            object.__setattr__(self, "eval_data", Path(self.eval_data))
        problems = []
        if self.pii not in MODES:
            problems.append(f"pii must be one of {MODES}, got {self.pii!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            problems.append(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not (self.c > 0 and math.isfinite(self.c)):
            problems.append(f"C must be a positive number, got {self.c}")
        if not 0 <= self.seed <= MAX_SEED:  # scikit-learn's random_state takes 32 bits
            problems.append(f"seed must be in [0, {MAX_SEED}], got {self.seed}")
        for name in ("max_iter", "max_length", "eval_max_new_tokens"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if problems:
            raise TrainingError("invalid classifier configuration: " + "; ".join(problems))
        ref = AdapterRef.parse(self.adapter)
        if ref.version is not None:
            raise TrainingError(f"--adapter {self.adapter}: versions are assigned at publish; drop '@{ref.version}'")
        if self.features_from is not None:
            source = AdapterRef.parse(self.features_from)
            if source.tenant != ref.tenant:
                raise TrainingError(
                    f"--features-from {self.features_from}: a head reads features of its own tenant's LoRA "
                    f"({ref.tenant}/...), not another tenant's"
                )

    @property
    def ref(self) -> AdapterRef:
        return AdapterRef.parse(self.adapter)

    def hyperparameters(self) -> dict[str, Any]:
        return {
            "head": HEAD_METHOD,
            "C": self.c,
            "max_iter": self.max_iter,
            "max_length": self.max_length,
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "pooling": "mean",
            "features_from": self.features_from,
        }


@dataclass(frozen=True)
class ClassifierResult:
    out_dir: Path
    record: dict[str, Any]
    head: ClassifierHead


# ------------------------------------------------------------------------------------------- data


def load_labelled(path: Path) -> list[Example]:
    """Labelled JSONL: ``{"text": str, "label": str}`` or ``{"messages": [...], "label": str}`` per line.

    Every bad line is reported at once. The label is kept as the example's completion (so the PII scan
    covers it too); ``messages`` are all context (any roles, the last need not be the assistant's).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise TrainingDataError(str(path), [DataIssue(0, f"cannot read: {exc.strerror or exc}")]) from None
    examples: list[Example] = []
    issues: list[DataIssue] = []
    for number, line in enumerate(raw.removeprefix(data_mod.UTF8_BOM).splitlines(), start=1):
        if not line.strip():
            continue
        if len(line) > data_mod.MAX_LINE_BYTES:  # as the LoRA loader: one line is one example, not a file
            issues.append(DataIssue(number, f"line is longer than {data_mod.MAX_LINE_BYTES} bytes"))
            continue
        try:
            obj = data_mod.loads_unique(line)
            if (surrogate := data_mod.lone_surrogate(obj)) is not None:
                raise _Bad(f"a string holds a lone surrogate ({surrogate}): not Unicode text")
            examples.append(_labelled(obj, number))
        except (ValueError, RecursionError) as exc:  # RecursionError: nested past the parser's stack
            issues.append(DataIssue(number, str(exc) if isinstance(exc, _Bad) else f"not valid JSON: {exc!s:.200}"))
    if issues:
        raise TrainingDataError(str(path), issues)
    if not examples:
        raise TrainingDataError(str(path), [DataIssue(0, "no examples")])
    return examples


class _Bad(ValueError):
    pass


def _labelled(obj: Any, line: int) -> Example:
    if not isinstance(obj, dict):
        raise _Bad("each line must be a JSON object")
    keys = set(obj) - {"id", "metadata"}
    label = obj.get("label")
    if not isinstance(label, str) or not label.strip() or len(label) > 128:
        raise _Bad("'label' must be a non-empty string of at most 128 characters")
    if keys == {"text", "label"}:
        text = obj["text"]
        if not isinstance(text, str) or not text.strip():
            raise _Bad("'text' must be a non-empty string")
        return Example(line=line, completion=label.strip(), prompt=text)
    if keys == {"messages", "label"}:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise _Bad("'messages' must be a non-empty list of {role, content}")
        turns = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or set(m) != {"role", "content"}:
                raise _Bad(f"messages[{i}] must be an object with exactly 'role' and 'content'")
            if m["role"] not in data_mod.ROLES or not isinstance(m["content"], str):
                raise _Bad(f"messages[{i}]: role must be one of {data_mod.ROLES} and content a string")
            turns.append(Turn(m["role"], m["content"]))
        return Example(line=line, completion=label.strip(), turns=tuple(turns))
    raise _Bad(f"expected keys text+label or messages+label (id, metadata allowed), got {sorted(obj)}")


def stratified_split(
    examples: Sequence[Example], val_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """A seeded split that holds out about ``val_fraction`` of every label: at least one example of a label
    with two or more distinct texts, never all of a label's (it would train on none of them).

    Examples with the same text stay on one side whatever their labels (``data.split``'s reason: a
    repeated text was scored after training on it; grouped within each label only, a text with two
    labels landed on both sides). Labels are visited in sorted order, each one's groups chosen as
    ``data.choose_groups`` does (a group that would overshoot is skipped while smaller ones can still meet
    the target); a group held out for one label also counts for the other labels it holds.
    ``split_warning`` names the labels whose held-out share came out far above the fraction.
    """
    groups = data_mod.group_by_prompt(examples)  # across labels
    group_labels = [Counter(examples[i].completion for i in g) for g in groups]
    totals = Counter(e.completion for e in examples)
    training = Counter(totals)  # examples of each label left to train on
    held_count: Counter[str] = Counter()
    of_label: dict[str, list[int]] = {}
    for g, labels in enumerate(group_labels):
        for label in labels:
            of_label.setdefault(label, []).append(g)
    held_groups: set[int] = set()
    rng = random.Random(seed)
    for label in sorted(totals):
        if val_fraction == 0 or len(of_label[label]) < 2:
            continue
        candidates = [g for g in of_label[label] if g not in held_groups]

        def take(j: int, candidates: list[int] = candidates) -> bool:
            g = candidates[j]
            if any(training[other] <= n for other, n in group_labels[g].items()):  # would train on none of it
                return False
            training.subtract(group_labels[g])
            held_count.update(group_labels[g])
            held_groups.add(g)
            return True

        want = data_mod.held_out_target(totals[label], val_fraction) - held_count[label]
        data_mod.choose_groups([group_labels[g][label] for g in candidates], want, rng, take)
    held = {i for g in held_groups for i in groups[g]}
    train = [e for i, e in enumerate(examples) if i not in held]
    val = [e for i, e in enumerate(examples) if i in held]
    return sorted(train, key=lambda e: e.line), sorted(val, key=lambda e: e.line)


def split_warning(examples: Sequence[Example], held: Sequence[Example], val_fraction: float) -> str | None:
    """A warning naming the labels whose held-out share is far above ``val_fraction`` (over
    ``data.FAR_ABOVE_TARGET`` times their target), else None."""
    totals = Counter(e.completion for e in examples)
    held_counts = Counter(e.completion for e in held)
    far = [
        f"{label!r} {held_counts[label]} of {totals[label]}"
        for label in sorted(held_counts)
        if data_mod.held_out_warning(totals[label], held_counts[label], val_fraction) is not None
    ]
    if not far:
        return None
    shown = ", ".join(far[:5]) + (f" and {len(far) - 5} more" if len(far) > 5 else "")
    return (
        f"warning: the held-out share of {len(far)} label(s) is far above --val-fraction {val_fraction:g} ({shown}): "
        "examples with the same text stay on one side of the split and the groups are too large to get closer; "
        "pass --eval-data to choose the held-out examples yourself"
    )


# --------------------------------------------------------------------------------------- features


@dataclass(frozen=True)
class FeaturePrecision:
    """How the features are computed: the served base's quantization and compute dtype, on a device."""

    quantization: str  # resolved: "none", "nf4" or "int8"
    dtype: torch.dtype
    device: torch.device
    reason: str  # why this dtype (the server's rule)

    def to_record(self) -> dict[str, str]:
        return {"quantization": self.quantization, "dtype": str(self.dtype).removeprefix("torch.")}


def feature_precision(
    model_dir: Path, spec: BaseModelSpec, device: str = "auto", dtype: str = "auto"
) -> FeaturePrecision:
    """The precision the server computes features in for ``spec`` (its quantization) under ``--device``
    and ``--dtype``: a head fitted on fp32 features and served on an NF4 base flipped 24 of 136 answers
    (an outside review), and its recorded metrics described another model."""
    from lorafleet_server.model import loader as model_loader

    where = model_loader.resolve_device(device)
    choice = model_loader.base_compute_dtype(model_dir, spec.fingerprint, spec.quantization, where, dtype)
    return FeaturePrecision(spec.quantization, choice.dtype, where, choice.reason)


def load_feature_model(model_dir: Path, lora_dir: Path | None, precision: FeaturePrecision | None = None) -> Any:
    """The base as the server loads it (``precision``; default: unquantized in the device's default
    dtype, fp32 on CPU), with the LoRA in ``lora_dir`` applied when given."""
    from lorafleet_server.model import loader as model_loader

    if precision is None:
        device = model_loader.resolve_device("auto")
        model = model_loader.load_hf_model(model_dir, "none", device, model_loader.compute_dtype_for(device))
    else:
        model = model_loader.load_hf_model(model_dir, precision.quantization, precision.device, precision.dtype)
    if lora_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(lora_dir))
    model.eval()
    return model


def _decoder(model: Any) -> Any:
    """The transformer body (embeddings, layers, final norm) under a causal LM, PEFT-wrapped or not."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.model


def over_length(ids: Sequence[Sequence[int]], examples: Sequence[Example], max_length: int) -> list[DataIssue]:
    """One issue per prompt longer than ``max_length`` tokens.

    Classify pools the whole prompt it is sent, so a head fitted on a cut prompt (its last tokens, as
    training once did) would be scored on features it never saw: such a prompt is refused, and
    ``--max-length`` only bounds the features pass's memory.
    """
    return [
        DataIssue(
            example.line,
            f"the prompt is {len(x)} tokens, over --max-length {max_length} (Classify pools whole prompts)",
        )
        for x, example in zip(ids, examples, strict=True)
        if len(x) > max_length
    ]


@torch.no_grad()
def pooled_features(
    model: Any, ids: Sequence[Sequence[int]], pad_id: int, batch_size: int = FEATURE_BATCH
) -> torch.Tensor:
    """Mean over each prompt's tokens of the final (normed) hidden states -> [examples, hidden] float32.

    What the server's Embed returns: right padding keeps each row's real tokens unaffected (causal).
    """
    decoder = _decoder(model)
    device = next(model.parameters()).device
    rows: list[torch.Tensor] = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        width = max(len(x) for x in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, x in enumerate(chunk):
            input_ids[r, : len(x)] = torch.tensor(list(x))
            mask[r, : len(x)] = 1
        hidden = decoder(input_ids=input_ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        hidden = hidden.float() * mask.to(device).unsqueeze(-1)  # [b, width, hidden], pads zeroed
        rows.append((hidden.sum(1) / mask.to(device).sum(1, keepdim=True)).cpu())  # [b, hidden]
    return torch.cat(rows) if rows else torch.zeros(0, 0)


# ------------------------------------------------------------------------------------------- head


def fit_head(
    features: torch.Tensor, labels: Sequence[str], label_names: Sequence[str], c: float, max_iter: int, seed: int
) -> ClassifierHead:
    """Standardize, fit a multinomial logistic regression, fold the scaling into one linear layer."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x = features.double().numpy()  # [n, hidden]
    y = np.array([label_names.index(label) for label in labels])
    scaler = StandardScaler().fit(x)
    model = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
    model.fit(scaler.transform(x), y)
    coef = np.zeros((len(label_names), x.shape[1]))  # [labels, hidden]
    bias = np.zeros(len(label_names))
    if len(model.classes_) == 2 and model.coef_.shape[0] == 1:  # binary: softmax([0, z]) = sigmoid(z)
        coef[model.classes_[1]] = model.coef_[0]
        bias[model.classes_[1]] = model.intercept_[0]
    else:
        coef[model.classes_] = model.coef_
        bias[model.classes_] = model.intercept_
        missing = sorted(set(range(len(label_names))) - set(model.classes_))
        bias[missing] = -1e4  # a label with no training example is never predicted
    scale = scaler.scale_  # [hidden]
    weight = coef / scale  # [labels, hidden]
    folded_bias = bias - weight @ scaler.mean_  # [labels]
    return ClassifierHead(
        labels=tuple(label_names),
        weight=torch.tensor(weight, dtype=torch.float32),
        bias=torch.tensor(folded_bias, dtype=torch.float32),
    )


def classification_metrics(truth: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro-F1, per-label precision/recall/F1/support and the confusion matrix (rows: truth)."""
    index = {label: i for i, label in enumerate(labels)}
    columns = [*labels, NO_LABEL] if any(p not in index for p in predicted) else list(labels)
    col = {label: i for i, label in enumerate(columns)}
    matrix = [[0] * len(columns) for _ in labels]
    for t, p in zip(truth, predicted, strict=True):
        matrix[index[t]][col.get(p, len(columns) - 1)] += 1
    per_label: dict[str, dict[str, float]] = {}
    f1s = []
    for label in labels:
        i, j = index[label], col[label]
        tp = matrix[i][j]
        predicted_as = sum(row[j] for row in matrix)
        support = sum(matrix[i])
        precision = tp / predicted_as if predicted_as else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_label[label] = {"precision": precision, "recall": recall, "f1": f1, "support": float(support)}
        if support:
            f1s.append(f1)
    correct = sum(t == p for t, p in zip(truth, predicted, strict=True))
    return {
        "accuracy": correct / len(truth) if truth else 0.0,
        "macro_f1": sum(f1s) / len(f1s) if f1s else 0.0,
        "per_label": per_label,
        "confusion_matrix": {"labels": list(labels), "columns": columns, "matrix": matrix},
    }


def prompt_only_template(labels: Sequence[str]) -> PromptTemplate:
    """The baseline: ask the base itself to answer with one of the labels (no training)."""
    return PromptTemplate(
        system=(
            "You classify customer messages. Answer with exactly one of these labels and nothing else: "
            + ", ".join(labels)
            + "."
        )
    )


def label_from_answer(answer: str, labels: Sequence[str]) -> str:
    """The label a free-text answer names: an exact (case-insensitive) match, else the first label it
    contains, else ``NO_LABEL``."""
    norm = answer.strip().strip(".!\"'`").lower()
    for label in labels:
        if norm == label.lower():
            return label
    found = [(norm.find(label.lower()), -len(label), label) for label in labels if label.lower() in norm]
    return min(found)[2] if found else NO_LABEL


# ------------------------------------------------------------------------------------------ train


def train_classifier(
    config: ClassifierConfig,
    spec: BaseModelSpec,
    store: Any | None = None,
    *,
    echo: Echo = print,
) -> ClassifierResult:
    """Train a head per ``config`` on the base ``spec`` describes; write the output directory."""
    from lorafleet_training.publish import RECORD_FILE, RECORD_FORMAT, check_out_dir, head_store_record

    check_out_dir(config.out_dir, config.overwrite, (config.data, config.eval_data, config.base_model_dir))
    examples, pii_report = _load_checked(config.data, config.pii, echo)
    label_names = sorted({e.completion for e in examples})
    counts = Counter(e.completion for e in examples)
    if len(label_names) < 2:
        raise TrainingDataError(str(config.data), [DataIssue(0, f"a classifier needs 2+ labels, got {label_names}")])
    if len(label_names) > MAX_LABELS:
        raise TrainingDataError(str(config.data), [DataIssue(0, f"{len(label_names)} labels; at most {MAX_LABELS}")])
    fingerprint = data_mod.fingerprint(examples)
    eval_fingerprint = None
    eval_pii: PiiReport | None = None
    if config.eval_data is None:
        train_set, val_set = stratified_split(examples, config.val_fraction, config.seed)
        if (note := split_warning(examples, val_set, config.val_fraction)) is not None:
            echo(note)
    else:
        val_set, eval_pii = _load_checked(config.eval_data, config.pii, echo)
        train_set = list(examples)
        eval_fingerprint = data_mod.fingerprint(val_set)
        unknown = sorted({e.completion for e in val_set} - set(label_names))
        if unknown:
            raise TrainingDataError(
                str(config.eval_data), [DataIssue(0, f"labels {unknown} do not occur in the training data")]
            )
    shared = data_mod.overlap(train_set, val_set)  # 0 for a split: a text stays on one side
    if shared:
        echo(f"warning: {shared} of {len(val_set)} evaluation texts also occur in the training data")
    echo(
        f"data: {len(examples)} labelled examples from {config.data}, {len(label_names)} labels "
        f"({', '.join(f'{k} {counts[k]}' for k in label_names)}); {len(train_set)} train, {len(val_set)} held out; "
        f"fingerprint {fingerprint[:19]}…"
    )
    features_key, lora_dir = _features_source(config, spec, store)
    # The LoRA's files by checksum: publish checks the store it goes to holds this very LoRA under that
    # name (a head published into another store read whatever LoRA had the name there).
    features_files = dict(store.manifest(features_key).files) if features_key is not None and store else None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.base_model_dir)
    train_ids = all_prompt_ids(tokenizer, train_set, source=str(config.data))
    val_ids = all_prompt_ids(tokenizer, val_set, source=str(config.eval_data or config.data))
    too_long = over_length(train_ids, train_set, config.max_length)
    if config.eval_data is None:  # one file: every line at once
        too_long = sorted(too_long + over_length(val_ids, val_set, config.max_length), key=lambda i: i.line)
    if too_long:
        raise TrainingDataError(str(config.data), too_long)
    if config.eval_data is not None and (too_long := over_length(val_ids, val_set, config.max_length)):
        raise TrainingDataError(str(config.eval_data), too_long)
    precision = feature_precision(config.base_model_dir, spec, config.device, config.dtype)
    echo(f"features: {precision.quantization} base in {precision.to_record()['dtype']} ({precision.reason})")
    model = load_feature_model(config.base_model_dir, lora_dir, precision)  # after every check on the data
    pad_id = pad_id_of(tokenizer)
    started = time.monotonic()
    x_train = pooled_features(model, train_ids, pad_id)  # [train, hidden]
    x_val = pooled_features(model, val_ids, pad_id) if val_set else None  # [held out, hidden]
    head = fit_head(x_train, [e.completion for e in train_set], label_names, config.c, config.max_iter, config.seed)
    if features_key is not None:
        head = ClassifierHead(head.labels, head.weight, head.bias, features_key)
    training_seconds = time.monotonic() - started
    metrics: dict[str, float] = {}
    report: dict[str, Any] = {}
    if x_val is not None:
        probs = head.probabilities(x_val)  # [held out, labels]
        predicted = [label_names[int(i)] for i in probs.argmax(-1)]
        truth = [e.completion for e in val_set]
        report["head"] = classification_metrics(truth, predicted, label_names)
        metrics.update({"eval_examples": float(len(val_set)), "accuracy": report["head"]["accuracy"]})
        metrics["macro_f1"] = report["head"]["macro_f1"]
        train_pred = [label_names[int(i)] for i in head.probabilities(x_train).argmax(-1)]
        metrics["train_accuracy"] = classification_metrics([e.completion for e in train_set], train_pred, label_names)[
            "accuracy"
        ]
        if config.eval_generate:
            report["base_prompt"] = _prompt_only(model, tokenizer, val_set, label_names, config, lora_dir is not None)
            metrics["base_prompt_accuracy"] = report["base_prompt"]["accuracy"]
            metrics["base_prompt_macro_f1"] = report["base_prompt"]["macro_f1"]
        echo(format_classifier_metrics(metrics))
    else:
        echo("warning: no held-out examples (--val-fraction 0, or one distinct text per label): no evaluation")
    record = {
        "format": RECORD_FORMAT,
        "kind": HEAD_KIND,
        "adapter": config.adapter,
        "method": HEAD_METHOD,
        "base": {
            "fingerprint": spec.fingerprint,
            "prompt_format": spec.prompt_format,
            "model_id": spec.model_id,
            "served_quantization": spec.quantization,
            "features": precision.to_record(),  # publish and the server refuse it on another quantization
        },
        "features_from": None if features_key is None else str(features_key),
        "features_from_files": features_files,
        "data": {
            "path": str(Path(config.data).resolve()) if config.keep_data_ref else None,
            "fingerprint": fingerprint,
            "kind": "labelled",
            "examples": len(examples),
            "train_examples": len(train_set),
            "val_examples": len(val_set),
            "labels": {k: counts[k] for k in label_names},
            "eval_path": str(config.eval_data.resolve()) if config.eval_data and config.keep_data_ref else None,
            "eval_fingerprint": eval_fingerprint,
            # the held-out examples, split or --eval-data: retrain compares metrics only on the same ones
            "split_fingerprint": data_mod.fingerprint(val_set),
            "val_overlap": shared,  # held-out examples whose text also occurs in training (0 for a split)
        },
        "pii_scan": pii_report.to_record(),
        "eval_pii_scan": eval_pii.to_record() if eval_pii is not None else None,  # --eval-data's own scan
        "hyperparameters": config.hyperparameters(),
        "eval_metrics": metrics,
        "classification": report,
        "forgetting": {"applies": False, "why": "a head reads features of the frozen base: nothing is forgotten"},
        "training_seconds": round(training_seconds, 3),
        "created_at": utc_now_iso(),
    }
    # the record the store will keep with this head (publish.head_store_record), checked now: one over the
    # store's limit trained fine and failed only at publish, naming a temporary file
    placeholder = {name: "sha256:" + "0" * 64 for name in HEAD_PUBLISHED_FILES}
    if head_store_record({**record, "files": placeholder})[1]:
        echo(
            f"note: with {len(label_names)} labels the training record is too large for the adapter store with its "
            f"confusion matrices: a publish keeps it without them ({config.out_dir / RECORD_FILE} keeps them)"
        )
    written = _write_head_dir(config.out_dir, head, record, config.overwrite, RECORD_FILE)
    echo(f"wrote {config.out_dir} (classifier head, {len(label_names)} labels); publish it with `lorafleet publish`")
    return ClassifierResult(config.out_dir, written, head)


def format_classifier_metrics(metrics: dict[str, float]) -> str:
    lines = [f"held-out evaluation ({int(metrics.get('eval_examples', 0))} examples):"]
    lines.append(f"  head         accuracy {metrics['accuracy']:.3f}  macro-F1 {metrics['macro_f1']:.3f}")
    if "base_prompt_macro_f1" in metrics:
        lines.append(
            f"  base prompt  accuracy {metrics['base_prompt_accuracy']:.3f}  "
            f"macro-F1 {metrics['base_prompt_macro_f1']:.3f}  (the base asked to answer with the label)"
        )
    return "\n".join(lines)


def _load_checked(path: Path, pii: str, echo: Echo) -> tuple[list[Example], PiiReport]:
    examples, report = apply_policy(load_labelled(path), pii, source=str(path))
    if not report.clean:
        echo(report.describe(limit=10))
    return examples, report


def _features_source(
    config: ClassifierConfig, spec: BaseModelSpec, store: Any | None
) -> tuple[AdapterKey | None, Path | None]:
    """The LoRA version whose features the head reads (verified against the base), and its directory."""
    if config.features_from is None:
        return None, None
    if store is None:
        raise TrainingError("--features-from needs an adapter store (--adapter-store, or the server's)")
    ref = AdapterRef.parse(config.features_from)
    try:
        key = store.resolve(ref)
        manifest = store.manifest(key)
        if manifest.kind != "lora":
            raise TrainingError(f"--features-from {key} is of kind {manifest.kind!r}; it must be a LoRA adapter")
        store.load(key, spec)  # checksums, base fingerprint and shapes, as the server checks them
    except AdapterError as exc:
        raise TrainingError(f"--features-from {config.features_from}: {exc}") from None
    return key, Path(store.version_dir(key))


def answer_budget(tokenizer: Any, labels: Sequence[str], floor: int) -> int:
    """New tokens the prompt-only base may generate: ``floor``, or the longest label's tokens and two
    more (a leading space, an end token). At a fixed 8 a label of more tokens was always cut short and
    scored as no label, so the baseline that publish's gates compare against could never be right."""
    longest = max((len(tokenizer(label, add_special_tokens=False)["input_ids"]) for label in labels), default=0)
    return max(floor, longest + 2)


def _prompt_only(
    model: Any, tokenizer: Any, examples: Sequence[Example], labels: Sequence[str], config: ClassifierConfig, peft: bool
) -> dict[str, Any]:
    from contextlib import nullcontext

    from lorafleet_training.evaluate import generate_answers

    template = prompt_only_template(labels)
    prompts = all_prompt_ids(tokenizer, examples, template, source="the prompt-only base's evaluation")
    context = model.disable_adapter() if peft else nullcontext()
    with context:
        budget = answer_budget(tokenizer, labels, config.eval_max_new_tokens)
        answers = generate_answers(model, tokenizer, prompts, [budget] * len(prompts), 8)
    predicted = [label_from_answer(a, labels) for a in answers]
    result = classification_metrics([e.completion for e in examples], predicted, labels)
    result["samples"] = [{"line": e.line, "answer": a} for e, a in list(zip(examples, answers, strict=True))[:5]]
    return result


def _write_head_dir(
    out_dir: Path, head: ClassifierHead, record: dict[str, Any], overwrite: bool, record_file: str
) -> dict[str, Any]:
    """Stage the head and its record beside ``out_dir``, verify them, rename into place (a failure to
    move it keeps the staged directory: ``publish.place_output``)."""
    from lorafleet_training.publish import place_output, staging_dir

    out_dir = Path(out_dir)
    stage = staging_dir(out_dir)
    try:
        head.save(stage)
        ClassifierHead.read(stage)
        written = dict(record)
        written["files"] = {name: sha256_file(stage / name) for name in HEAD_PUBLISHED_FILES}
        (stage / record_file).write_text(json.dumps(written, indent=2, sort_keys=True, allow_nan=False) + "\n")
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    place_output(stage, out_dir, overwrite)
    return written


def verify_head_files(out_dir: Path, record: dict[str, Any]) -> ClassifierHead:
    """Check a head output directory against its record's checksums and read the head."""
    files = record["files"]
    for name in HEAD_PUBLISHED_FILES:
        if name not in files:
            raise AdapterFormatError(f"the training record lists no checksum for {name}")
    for name, digest in files.items():
        if name not in HEAD_PUBLISHED_FILES:
            raise AdapterFormatError(f"the training record lists an unexpected file {name!r}")
        path = Path(out_dir) / name
        if not path.is_file():
            raise AdapterFormatError(f"{path} is missing (listed in the training record)")
        if sha256_file(path) != digest:
            raise AdapterFormatError(f"{path}: sha256 differs from the one recorded at training; the file changed")
    head = ClassifierHead.read(Path(out_dir))
    # What is published is this head as ``ClassifierHead.save`` writes it (``publish_head``), read after the
    # hashes above: its bytes are checked too, so a file changed in between is not published unchecked.
    with tempfile.TemporaryDirectory(prefix="lorafleet-head-check.") as tmp:
        for name in head.save(Path(tmp)):
            if sha256_file(Path(tmp) / name) != files[name]:
                raise AdapterFormatError(
                    f"{Path(out_dir) / name}: the head read for publishing differs from the file checked against the "
                    "training record (it changed while being published); publish again"
                )
    return head
