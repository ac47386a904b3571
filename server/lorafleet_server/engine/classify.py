"""Classify: a classifier head on a request's pooled features, run on the engine thread after a forward.

The forward is the one ``Embed`` uses (prefill only, no decoding, the final hidden states mean-pooled
over the prompt tokens, through the LoRA slot of the head's ``features_from`` version when it has one).
Rows that finish in the same step and share a head are scored in one matmul.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lorafleet_adapters.head import ClassifierHead
from lorafleet_server.engine.types import LabelScore


def classify_rows(
    rows: Sequence[tuple[ClassifierHead, torch.Tensor, int]],
) -> list[tuple[LabelScore, ...]]:
    """Score each ``(head, mean features [hidden], top_k)``; labels most likely first, ``top_k`` of them (0: all).

    Rows with the same head object are stacked and scored together.
    """
    out: list[tuple[LabelScore, ...] | None] = [None] * len(rows)
    groups: dict[int, list[int]] = {}
    for i, (head, _, _) in enumerate(rows):
        groups.setdefault(id(head), []).append(i)
    for indices in groups.values():
        head = rows[indices[0]][0]
        features = torch.stack([rows[i][1] for i in indices])  # [n, hidden]
        probs = head.probabilities(features)  # [n, labels]
        for i, p in zip(indices, probs, strict=True):
            out[i] = top_labels(head.labels, p, rows[i][2])
    return [labels for labels in out if labels is not None]


def top_labels(labels: Sequence[str], probs: torch.Tensor, top_k: int) -> tuple[LabelScore, ...]:
    """``probs`` [labels] -> the ``top_k`` (0: all) most likely labels, ties broken by label order."""
    k = len(labels) if top_k <= 0 else min(top_k, len(labels))
    order = sorted(range(len(labels)), key=lambda j: (-float(probs[j]), j))[:k]
    return tuple(LabelScore(labels[j], float(probs[j])) for j in order)
