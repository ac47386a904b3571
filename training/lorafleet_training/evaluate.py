"""Held-out evaluation: base (same prompt, adapter off) vs adapter, optionally vs a prompt adapter.

Two measures per model:

* mean cross-entropy (and perplexity) over the completion tokens, EOS included, token-weighted;
* greedy answers (at most ``max_new_tokens``, and never more than the longest reference of the batch
  plus 16 tokens) scored against the reference by exact match and token F1 after SQuAD normalization
  (lowercase, no punctuation, no articles, collapsed whitespace).

Metrics come back flat, as the manifest stores them: ``base_loss``, ``adapter_ppl``, ``prompt_f1`` ...
(EM and F1 are fractions in [0, 1]).

The forgetting check scores base and adapter on a small general held-out set that ships with lorafleet
(``heldout/general.jsonl``, our own text): an adapter that got much worse at ordinary text is flagged.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lorafleet_adapters.prompt import PromptTemplate
from lorafleet_training.data import Example
from lorafleet_training.encoding import (
    Encoded,
    collate,
    completion_ids,
    completion_loss_sum,
    encode,
    keep_last,
    pad_id_of,
    prompt_ids,
)

GENERATION_SLACK = 16
GENERAL_HELDOUT = Path(__file__).resolve().parent / "heldout" / "general.jsonl"
GENERAL_HELDOUT_NAME = "lorafleet general held-out v1"
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalization: lowercase, drop punctuation and articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


@dataclass(frozen=True)
class Sample:
    """One held-out example's answers (for reports and the demo)."""

    line: int
    prompt: str
    reference: str
    answers: dict[str, str] = field(default_factory=dict)  # variant ("base", "adapter", "prompt") -> answer


@dataclass(frozen=True)
class EvalResult:
    metrics: dict[str, float]
    samples: tuple[Sample, ...]


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def completion_loss(model: Any, encoded: Sequence[Encoded], pad_id: int, batch_size: int) -> tuple[float, int]:
    """(mean cross-entropy per completion token, number of completion tokens) of `model` on `encoded`."""
    device = model_device(model)
    total, count = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        rows = encoded[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate(rows, pad_id).items()}
        loss, tokens = completion_loss_sum(model, batch, keep_last(rows))
        total += float(loss)
        count += tokens
    return (total / count if count else float("nan")), count


@torch.no_grad()
def generate_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    limits: Sequence[int],
    batch_size: int,
) -> list[str]:
    """Greedy answers to `prompts` (left-padded batches), each batch bounded by the largest of its `limits`."""
    device = model_device(model)
    pad_id, eos_id = pad_id_of(tokenizer), tokenizer.eos_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: dict[int, str] = {}
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            n = len(prompts[i])
            ids[r, width - n :] = torch.tensor(list(prompts[i]))
            mask[r, width - n :] = 1
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max(limits[i] for i in rows),
            do_sample=False,
            num_beams=1,
            repetition_penalty=1.0,
            pad_token_id=pad_id,
            eos_token_id=eos_id,
        )
        for r, i in enumerate(rows):
            new = out[r, width:].tolist()
            if eos_id in new:
                new = new[: new.index(eos_id)]
            answers[i] = tokenizer.decode(new, skip_special_tokens=True).strip()
    return [answers[i] for i in range(len(prompts))]


def evaluate(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    template: PromptTemplate | None = None,
    generate: bool = True,
    progress: bool = False,
) -> EvalResult:
    """Compare base and adapter (and the prompt adapter `template` on the base) on `examples`.

    `model` is a ``peft.PeftModel``; the base is the same model inside ``disable_adapter()``.
    """
    if not examples:
        return EvalResult({}, ())
    pad_id = pad_id_of(tokenizer)
    variants: list[tuple[str, PromptTemplate | None, bool]] = [("base", None, False), ("adapter", None, True)]
    if template is not None:
        variants.append(("prompt", template, False))
    metrics: dict[str, float] = {"eval_examples": float(len(examples))}
    answers: dict[str, list[str]] = {}
    was_training = model.training
    model.eval()
    try:
        steps = tqdm(variants, desc="evaluate", unit="model", disable=not progress, leave=False)
        for name, tmpl, adapter_on in steps:
            encoded = encode(tokenizer, examples, None, tmpl)
            with _adapter(model, adapter_on):
                loss, tokens = completion_loss(model, encoded, pad_id, batch_size)
                metrics[f"{name}_loss"] = loss
                metrics[f"{name}_ppl"] = math.exp(min(loss, 50.0))
                metrics["eval_completion_tokens"] = float(tokens)
                if generate:
                    prompts = [prompt_ids(tokenizer, e, tmpl) for e in examples]
                    limits = [
                        min(max_new_tokens, len(completion_ids(tokenizer, e)) + GENERATION_SLACK) for e in examples
                    ]
                    got = generate_answers(model, tokenizer, prompts, limits, batch_size)
                    answers[name] = got
                    metrics[f"{name}_exact_match"] = _mean(
                        exact_match(a, e.completion) for a, e in zip(got, examples, strict=True)
                    )
                    metrics[f"{name}_f1"] = _mean(token_f1(a, e.completion) for a, e in zip(got, examples, strict=True))
    finally:
        model.train(was_training)
    samples = tuple(
        Sample(
            line=e.line,
            prompt=e.chat_messages()[-1]["content"],
            reference=e.completion,
            answers={name: got[i] for name, got in answers.items()},
        )
        for i, e in enumerate(examples)
    )
    return EvalResult(metrics, samples)


@torch.no_grad()
def forgetting_check(model: Any, tokenizer: Any, batch_size: int = 8, path: Path = GENERAL_HELDOUT) -> dict[str, Any]:
    """Loss of the base and of the adapter on the general held-out set shipped with lorafleet.

    ``relative_increase`` = (adapter - base) / base: how much worse the adapter got at ordinary text,
    what ``lorafleet publish --max-forgetting`` gates on. `model` is a ``peft.PeftModel``.
    """
    from lorafleet_training.data import fingerprint, load_jsonl

    examples = load_jsonl(path)
    encoded = encode(tokenizer, examples, None, source=str(path))
    pad_id = pad_id_of(tokenizer)
    was_training = model.training
    model.eval()
    try:
        with _adapter(model, False):
            base_loss, tokens = completion_loss(model, encoded, pad_id, batch_size)
        adapter_loss, _ = completion_loss(model, encoded, pad_id, batch_size)
    finally:
        model.train(was_training)
    return {
        "set": GENERAL_HELDOUT_NAME,
        "fingerprint": fingerprint(examples),
        "examples": len(examples),
        "tokens": tokens,
        "base_loss": base_loss,
        "adapter_loss": adapter_loss,
        "relative_increase": (adapter_loss - base_loss) / base_loss,
    }


def _adapter(model: Any, on: bool) -> AbstractContextManager[Any]:
    return nullcontext() if on else model.disable_adapter()


def _mean(values: Iterator[float] | Any) -> float:
    items = list(values)
    return sum(items) / len(items) if items else 0.0
