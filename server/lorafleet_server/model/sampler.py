"""Next-token choice per row: repetition penalty, temperature, top-k, top-p, seeded sampling.

Follows the semantics of transformers' logits processors (RepetitionPenalty, Temperature, TopK,
TopP) so a greedy row matches ``generate(do_sample=False, repetition_penalty=...)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch


class NonFiniteLogits(RuntimeError):
    """A row's logits hold NaN or infinity: the forward overflowed (its adapter's weights, where it has
    one); a sampler failure on finite logits stays a plain RuntimeError (a bug)."""


@dataclass(frozen=True)
class RowSampling:
    temperature: float  # 0: greedy
    top_p: float  # (0, 1]
    top_k: int  # 0: off
    repetition_penalty: float  # 1: off
    seen: torch.Tensor | None  # [T] long, prompt + generated ids (for the repetition penalty)
    generator: torch.Generator | None  # per-request RNG (sampling rows)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits [V]; divides positive and multiplies negative logits of seen tokens by ``penalty``
    (taken within the dtype's positive range: one that rounds to 0 or inf there would make 0/0 or
    0 * inf of a logit that is exactly 0)."""
    info = torch.finfo(logits.dtype)
    penalty = min(max(penalty, info.tiny), info.max)
    score = logits.gather(0, seen)  # [T]
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits.scatter(0, seen, score)


def divide_by_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits [V] fp32 / ``temperature`` (> 0; below the dtype's smallest normal number it is that,
    not 0). Where the largest result is not finite (a temperature near zero overflows it to +inf, or
    every logit to -inf when all are negative; a repetition penalty near zero made a logit +inf), the
    largest logit is subtracted first: the same distribution, with the largest at 0 and the rest
    finite or -inf, so softmax has no NaN and a tiny temperature samples like greedy. Rows whose
    largest result is finite are divided as transformers does."""
    info = torch.finfo(logits.dtype)
    temperature = max(temperature, info.tiny)
    scaled = logits / temperature  # [V]
    if bool(torch.isfinite(scaled.max())):
        return scaled
    finite = logits.clamp(max=info.max)  # +inf to the largest finite value
    return (finite - finite.max()) / temperature


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits [V] -> logits with filtered tokens at -inf (keeps at least one token)."""
    if top_k > 0 and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=False)  # [V]
        cumulative = sorted_logits.softmax(-1).cumsum(-1)  # [V]
        remove_sorted = cumulative <= (1 - top_p)
        remove_sorted[-1] = False
        remove = remove_sorted.scatter(0, sorted_idx, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def torch_argmax(logits: torch.Tensor) -> list[int]:  # [B, V] -> each row's index of its largest value
    # max(-1).indices, not argmax(-1): the same index (the first of tied maxima, NaN as the largest) at
    # ~0.35x the time on CPU (32 x 49,152 fp32, one thread: 0.7 against 2.0 ms of a ~35 ms decode step).
    return cast(list[int], logits.max(-1).indices.tolist())


def sample_rows(
    logits: torch.Tensor, rows: list[RowSampling], argmax: Callable[[torch.Tensor], list[int]] = torch_argmax
) -> list[int | Exception]:
    """logits [B, V] fp32 or bf16 -> one token id per row. ``argmax``: each row's index of its largest
    value as ``logits.float().max(-1).indices`` gives it, for the greedy rows without a penalty (the
    runner's ``greedy_tokens`` reads a bf16 LM head's output in place); every other row is widened to
    fp32 before its penalty, temperature and filters, as the logits were before (bf16 to fp32 is exact).
    A row whose sampling raises (NaN logits: no distribution to draw from), or a greedy row whose logits
    hold a NaN, gets the exception in place of its token, so only its request fails; the other rows'
    draws are the ones they would have had."""
    out: list[int | Exception] = []
    greedy_plain = [
        i for i, r in enumerate(rows) if r.temperature == 0 and (r.repetition_penalty == 1.0 or r.seen is None)
    ]
    best = argmax(logits) if greedy_plain else []
    # A NaN logit is the largest to max(): the row's pick is NaN exactly when its row holds one. Such a row
    # has no answer, as a sampled one has no distribution: it fails too (it used to stream the NaN's token).
    broken = set()
    if greedy_plain:
        picked = logits[greedy_plain, [best[i] for i in greedy_plain]]  # [len(greedy_plain)]
        broken = {i for i, nan in zip(greedy_plain, picked.isnan().tolist(), strict=True) if nan}
    for i, r in enumerate(rows):
        if r.temperature == 0 and (r.repetition_penalty == 1.0 or r.seen is None):
            if i in broken:
                out.append(NonFiniteLogits("cannot pick the next token: the logits are NaN"))
            else:
                out.append(int(best[i]))
            continue
        try:
            out.append(sample_row(logits[i], r))
        except Exception as exc:  # RuntimeError from multinomial on NaN probabilities, or the like
            finite = bool(torch.isfinite(logits[i]).all())
            out.append((RuntimeError if finite else NonFiniteLogits)(f"cannot sample the next token: {exc}"))
    return out


def sample_row(logits: torch.Tensor, r: RowSampling) -> int:
    """logits [V] fp32 or bf16 -> the row's token: penalty, then greedy or temperature, filters, a draw."""
    row = logits.float()  # [V]
    if r.repetition_penalty != 1.0 and r.seen is not None and r.seen.numel():
        row = apply_repetition_penalty(row, r.seen.to(row.device), r.repetition_penalty)
    if r.temperature == 0:
        return int(row.argmax())
    row = filter_top_k_top_p(divide_by_temperature(row, r.temperature), r.top_k, r.top_p)
    probs = row.softmax(-1)
    gen = r.generator
    if gen is not None and gen.device != probs.device:
        probs = probs.to(gen.device)
    return int(torch.multinomial(probs, 1, generator=gen))
