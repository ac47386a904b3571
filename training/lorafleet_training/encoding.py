"""Token ids of examples, exactly as the server builds prompts, with loss only on completion tokens.

A chat is rendered by the server's own ``chat_ids`` (the chat template, ``add_generation_prompt=True``,
every message content tokenized as text: "<|im_end|>" typed by a user is text there, never the
control token); a plain prompt is encoded as is, as the server does. The completion is encoded as
text too (a literal "<|im_end|>" in an answer is learned as its characters) and followed by the EOS
token, the one stop the model must learn (``<|im_end|>`` for ChatML).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jinja2
import torch

from lorafleet_adapters.prompt import PromptTemplate
from lorafleet_server.engine.prompts import chat_ids, special_tokens_pattern
from lorafleet_server.errors import InvalidRequest
from lorafleet_training.data import Example, apply_template
from lorafleet_training.errors import DataIssue, TrainingDataError, TrainingError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Encoded:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]  # IGNORE_INDEX on prompt tokens
    prompt_len: int
    truncated: bool


def prompt_ids(tokenizer: Any, example: Example, template: PromptTemplate | None = None) -> list[int]:
    """The prompt's token ids as the server builds them (with a prompt adapter's turns when given)."""
    if template is not None or example.is_chat:
        messages = example.chat_messages()
        if template is not None:
            messages = apply_template(template, messages)
        turns = [(str(m["role"]), str(m["content"])) for m in messages]
        return chat_ids(tokenizer, turns, lambda text: as_text_ids(tokenizer, text), special_tokens_pattern(tokenizer))
    assert example.prompt is not None
    return list(tokenizer.encode(example.prompt, add_special_tokens=False))


def all_prompt_ids(
    tokenizer: Any, examples: Sequence[Example], template: PromptTemplate | None = None, source: str = "<data>"
) -> list[list[int]]:
    """``prompt_ids`` of every example. A chat template that refuses an example (roles that must
    alternate, a system turn it does not take: Gemma's and Mistral's raise) is reported by line, every
    such example at once; it was a traceback without one."""
    out: list[list[int]] = []
    issues: list[DataIssue] = []
    for example in examples:
        try:
            out.append(prompt_ids(tokenizer, example, template))
        except (jinja2.TemplateError, ValueError, TypeError, InvalidRequest) as exc:
            # the serving encoder says the template refused (InvalidRequest); the template's own text is its cause
            cause = exc.__cause__ if isinstance(exc, InvalidRequest) and exc.__cause__ is not None else exc
            issues.append(DataIssue(example.line, f"the model's chat template refuses this example: {cause}"))
    if issues:
        raise TrainingDataError(source, issues)
    return out


def completion_ids(tokenizer: Any, example: Example) -> list[int]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise TrainingError("the tokenizer has no EOS token; the model could not learn where an answer ends")
    return [*as_text_ids(tokenizer, example.completion), int(eos)]


def as_text_ids(tokenizer: Any, text: str) -> list[int]:
    """``text``'s ids with special-token text in it kept as text (training runs on one thread: the
    per-call flag the server avoids on its shared tokenizer is safe here)."""
    return list(tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True))


def encode(
    tokenizer: Any,
    examples: Sequence[Example],
    max_length: int | None,
    template: PromptTemplate | None = None,
    source: str = "<data>",
) -> list[Encoded]:
    """Encode every example; one whose prompt leaves no room for a completion token is reported by line.

    `max_length` None: no limit (evaluation scores whole completions, whatever the training limit was).
    """
    encoded, issues = encode_checked(tokenizer, examples, max_length, template, source)
    if issues:
        raise TrainingDataError(source, issues)
    return encoded


def encode_checked(
    tokenizer: Any,
    examples: Sequence[Example],
    max_length: int | None,
    template: PromptTemplate | None = None,
    source: str = "<data>",
    *,
    prompt_limit: int | None = None,
) -> tuple[list[Encoded], list[DataIssue]]:
    """``encode``, with the examples whose prompt is too long returned as issues rather than raised (so a
    caller can report those of two sets of one file at once).

    A prompt of `prompt_limit` tokens or more (default `max_length`) is refused: with `max_length` None
    and `prompt_limit` the training ``--max-length``, held-out examples are scored whole but refused
    for the same prompts training refuses (only the training split's were, so whether a file was
    accepted depended on --seed). A chat template that refuses an example still raises at once.
    """
    limit_prompt = prompt_limit if prompt_limit is not None else max_length
    out: list[Encoded] = []
    issues: list[DataIssue] = []
    for example, prompt in zip(examples, all_prompt_ids(tokenizer, examples, template, source), strict=True):
        completion = completion_ids(tokenizer, example)
        if limit_prompt is not None and len(prompt) >= limit_prompt:
            issues.append(
                DataIssue(
                    example.line,
                    f"the prompt is {len(prompt)} tokens; --max-length {limit_prompt} leaves no room for the "
                    "completion",
                )
            )
            continue
        limit = max_length if max_length is not None else len(prompt) + len(completion)
        ids = (prompt + completion)[:limit]
        labels = [IGNORE_INDEX] * len(prompt) + ids[len(prompt) :]
        out.append(Encoded(tuple(ids), tuple(labels), len(prompt), len(prompt) + len(completion) > limit))
    return out, issues


def collate(batch: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded input_ids, attention_mask, position_ids and labels (IGNORE_INDEX on padding).

    Left padding puts every row's completion at the end, so the logits of the last ``keep_last(batch)``
    positions are all the loss needs (the vocabulary projection of prompt positions is skipped).
    Position ids count real tokens only, so a padded row computes what it would alone.
    """
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        start = width - len(e.input_ids)
        ids[row, start:] = torch.tensor(e.input_ids)
        labels[row, start:] = torch.tensor(e.labels)
        mask[row, start:] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "labels": labels}


def keep_last(batch: Sequence[Encoded]) -> int:
    """How many final positions' logits a left-padded batch needs: the longest completion, plus the last
    prompt position (it predicts the first completion token)."""
    return max(len(e.input_ids) - e.prompt_len for e in batch) + 1


def completion_loss_sum(model: Any, batch: dict[str, torch.Tensor], keep: int) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy over the completion tokens of a collated batch, their count)."""
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        logits_to_keep=keep,
    ).logits
    targets = batch["labels"][:, -keep + 1 :] if keep > 1 else batch["labels"][:, :0]
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, int((targets != IGNORE_INDEX).sum())


def pad_id_of(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise TrainingError("the tokenizer has neither a pad nor an EOS token")
    return int(pad)
