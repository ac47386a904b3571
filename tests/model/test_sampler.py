"""Greedy rows pick what transformers' greedy search picks: ``argmax``, first of tied maxima."""

from __future__ import annotations

import torch

from lorafleet_server.model.sampler import RowSampling, sample_rows

GREEDY = RowSampling(temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0, seen=None, generator=None)


def test_greedy_rows_are_argmax_with_ties_nan_and_minus_infinity() -> None:
    gen = torch.Generator().manual_seed(0)
    for trial in range(300):
        logits = torch.randint(-3, 3, (6, 40), generator=gen).float()  # many ties
        if trial % 3 == 0:
            logits[torch.rand(6, 40, generator=gen) < 0.05] = float("nan")
        if trial % 7 == 0:
            logits[2] = float("-inf")
        assert sample_rows(logits, [GREEDY] * 6) == logits.argmax(-1).tolist()


def test_greedy_takes_the_first_of_tied_maxima_over_a_real_vocabulary() -> None:
    logits = torch.zeros(32, 49152)  # [rows, vocab]
    logits[:, 40000] = 1.0
    logits[:, 7] = 1.0
    logits[5, 3] = 2.0
    want = [7] * 32
    want[5] = 3
    assert sample_rows(logits, [GREEDY] * 32) == want
