"""Greedy rows pick what transformers' greedy search picks: ``argmax``, first of tied maxima."""

from __future__ import annotations

from dataclasses import replace

import torch

from lorafleet_server.model.sampler import (
    NonFiniteLogits,
    RowSampling,
    apply_repetition_penalty,
    divide_by_temperature,
    sample_rows,
)

GREEDY = RowSampling(temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0, seen=None, generator=None)


def test_greedy_rows_are_argmax_with_ties_nan_and_minus_infinity() -> None:
    gen = torch.Generator().manual_seed(0)
    for trial in range(300):
        logits = torch.randint(-3, 3, (6, 40), generator=gen).float()  # many ties
        if trial % 3 == 0:
            logits[torch.rand(6, 40, generator=gen) < 0.05] = float("nan")
        if trial % 7 == 0:
            logits[2] = float("-inf")
        got = sample_rows(logits, [GREEDY] * 6)
        for row, pick, want in zip(logits, got, logits.argmax(-1).tolist(), strict=True):
            if row.isnan().any():  # no answer: the request fails (it used to stream the NaN's token)
                assert isinstance(pick, NonFiniteLogits) and "NaN" in str(pick)
            else:
                assert pick == want


def test_greedy_takes_the_first_of_tied_maxima_over_a_real_vocabulary() -> None:
    logits = torch.zeros(32, 49152)  # [rows, vocab]
    logits[:, 40000] = 1.0
    logits[:, 7] = 1.0
    logits[5, 3] = 2.0
    want = [7] * 32
    want[5] = 3
    assert sample_rows(logits, [GREEDY] * 32) == want


def test_bf16_logits_are_sampled_as_their_fp32_widening() -> None:
    """The engine hands the LM head's bf16 output over as it is: every row picks what it picks from the
    same logits widened to fp32 (greedy, penalized, seeded sampling with top-k and top-p)."""
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(4, 300, generator=gen) * 3).bfloat16()  # [rows, vocab]
    seen = torch.tensor([3, 17, 17, 250])

    def rows() -> list[RowSampling]:
        return [
            GREEDY,
            RowSampling(temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.3, seen=seen, generator=None),
            RowSampling(0.8, 0.9, 0, 1.0, None, torch.Generator().manual_seed(5)),
            RowSampling(1.2, 1.0, 20, 1.1, seen, torch.Generator().manual_seed(6)),
        ]

    for _ in range(5):
        assert sample_rows(logits, rows()) == sample_rows(logits.float(), rows())


def test_the_given_argmax_chooses_the_plain_greedy_rows_only() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(2)).bfloat16()
    penalized = RowSampling(0.0, 1.0, 0, 1.5, torch.tensor([4]), None)
    handed: list[torch.Tensor] = []

    def argmax(x: torch.Tensor) -> list[int]:
        handed.append(x)
        return [7] * x.shape[0]

    got = sample_rows(logits, [GREEDY, penalized, GREEDY], argmax=argmax)
    assert got[0] == got[2] == 7 and got[1] == sample_rows(logits[1:2], [penalized])[0]
    assert len(handed) == 1 and handed[0] is logits
    assert sample_rows(logits, [penalized], argmax=argmax) and len(handed) == 1  # no plain greedy row: not called


def test_a_temperature_near_zero_divides_without_overflow_and_as_before_where_it_did_not() -> None:
    row = torch.randn(1000) * 10
    assert torch.equal(divide_by_temperature(row, 0.7), row / 0.7)  # transformers' arithmetic, unchanged
    tiny = divide_by_temperature(row, 1e-40)  # row / 1e-40 has +inf: softmax would be all NaN
    assert tiny.max() == 0 and int(tiny.argmax()) == int(row.argmax()) and not tiny.isnan().any()
    penalized = torch.tensor([1.0, float("inf"), 3.0, float("inf")])  # a penalty near zero on seen tokens
    assert divide_by_temperature(penalized, 0.7).softmax(-1).tolist() == [0.0, 0.5, 0.0, 0.5]
    rows = [
        RowSampling(1e-40, 1.0, 0, 1.0, None, torch.Generator().manual_seed(1)),
        RowSampling(0.7, 0.9, 5, 1e-40, torch.tensor([3, 7]), torch.Generator().manual_seed(2)),
        RowSampling(1.0, 1.0, 0, 1.0, None, torch.Generator().manual_seed(3)),
    ]
    logits = torch.randn(3, 50)
    logits[1, 3], logits[1, 7] = 2.0, -1.0  # the penalty pushes 3 to +inf, 7 towards 0
    got = sample_rows(logits, rows)
    assert got[:2] == [int(logits[0].argmax()), 3]
    logits[2] = float("nan")  # a row with no distribution fails alone
    rows = [replace(r, generator=torch.Generator().manual_seed(i + 1)) for i, r in enumerate(rows)]
    failed = sample_rows(logits, rows)
    assert failed[:2] == got[:2] and isinstance(failed[2], RuntimeError)


def test_no_valid_temperature_or_penalty_gives_a_nan() -> None:
    """Positive finite temperatures and penalties of any size: below fp32's range (0 there), every logit
    negative (all -inf after dividing), a logit of exactly 0 under a penalty of 0 or inf in fp32."""
    rows = [torch.tensor([2.0, -1.0, 0.5]), torch.tensor([-2.0, -1.0, -1.5]), torch.tensor([0.0, 0.0, -3.0])]
    for temperature in (1e-300, 1e-46, 1e-40, 1e-30, 0.7, 1e30):
        for row in rows:
            probs = divide_by_temperature(row, temperature).softmax(-1)
            assert not probs.isnan().any(), (temperature, row)
            if temperature <= 1e-30:  # all on the largest logit(s): greedy
                assert probs[int(row.argmax())] > 0 and probs[row < row.max()].sum() == 0
    seen = torch.tensor([0, 1, 2])
    for penalty in (1e-300, 1e-46, 1e300):
        penalized = apply_repetition_penalty(torch.tensor([0.0, 2.0, -1.0]), seen, penalty)
        assert torch.isfinite(penalized).all() and penalized[0] == 0, (penalty, penalized)
        token = sample_rows(
            torch.tensor([[0.0, 2.0, -1.0]]),
            [RowSampling(1e-46, 1.0, 0, penalty, seen, torch.Generator().manual_seed(0))],
        )[0]
        assert isinstance(token, int)


def test_top_k_and_top_p_filter_as_transformers_warpers_do() -> None:
    """The filter follows transformers' TopK/TopPLogitsWarper, boundaries included (an outside mutation
    run: a top-p `<` for `<=` and a top-k off by one survived every sampler test)."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    from lorafleet_server.model.sampler import filter_top_k_top_p

    # cumulative ascending [.125, .25, .5, 1.0]: at top_p 0.75 the .125 and the .25 (= 1 - 0.75) go
    probs = torch.tensor([0.125, 0.125, 0.25, 0.5])
    kept = torch.isfinite(filter_top_k_top_p(probs.log(), 0, 0.75)).nonzero().flatten().tolist()
    assert kept == [2, 3]
    assert torch.isfinite(filter_top_k_top_p(probs.log(), 1, 1.0)).sum() == 1  # top_k 1 is one token, not off
    assert torch.isfinite(filter_top_k_top_p(probs.log(), 3, 1.0)).sum() == 4  # ties at the kth value stay
    distinct = torch.tensor([0.1, 0.15, 0.25, 0.5]).log()
    assert torch.isfinite(filter_top_k_top_p(distinct, 3, 1.0)).nonzero().flatten().tolist() == [1, 2, 3]
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randn(50, generator=gen), torch.randn(50, generator=gen).round(), torch.zeros(7)]  # ties too
    for logits in rows:
        for top_k in (0, 1, 3, 10):
            for top_p in (1.0, 0.9, 0.5, 0.1):
                want = logits[None].clone()
                if top_k:
                    want = TopKLogitsWarper(top_k)(None, want)  # type: ignore[arg-type]
                if top_p < 1.0:
                    want = TopPLogitsWarper(top_p)(None, want)  # type: ignore[arg-type]
                got = filter_top_k_top_p(logits, top_k, top_p)
                assert torch.equal(torch.isfinite(got), torch.isfinite(want[0])), (top_k, top_p)


def test_a_sampled_row_with_nan_logits_is_non_finite_and_other_failures_are_not() -> None:
    """The engine blames a row's adapter for ``NonFiniteLogits`` only: a sampler failure on finite
    logits is a bug (INTERNAL), not the adapter's."""
    logits = torch.zeros(2, 8)
    logits[0, 3] = float("nan")
    sampled = RowSampling(temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0, seen=None, generator=None)
    picks = sample_rows(logits, [sampled, sampled])
    assert isinstance(picks[0], NonFiniteLogits) and isinstance(picks[1], int)
    assert NonFiniteLogits.__mro__[1] is RuntimeError
