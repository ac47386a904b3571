"""Threads per step (model/threads.py): larger steps get whichever thread count measures fewer seconds
per token, and the other is probed again now and then; decode steps keep their thread count, or, with
``measure_decode``, get whichever measures faster for their batch size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lorafleet_server.model.lora import LoraContext
from lorafleet_server.model.runner import ModelRunner, RowStep
from lorafleet_server.model.threads import (
    DECODE_PROBE_EVERY,
    DECODE_PROBE_MAX,
    DECODE_WARM_STEPS,
    StepThreads,
    decode_bucket,
)

pytestmark = pytest.mark.usefixtures("torch_threads_kept")


def test_small_steps_keep_the_small_count_and_large_ones_measure_both() -> None:
    threads = StepThreads(1, 2, min_tokens=64, probe_every=4)
    assert threads.choose(32) == 1 and threads.choose(64) == 1  # decode: never measured
    assert threads.cost == {}
    assert threads.choose(200) == 2  # first the large count, then the small one, once each
    threads.record(2, 200, 0.2)  # 1 ms per token
    assert threads.choose(200) == 1
    threads.record(1, 200, 0.3)  # 1.5 ms per token: the large count is faster
    picks = [threads.choose(100) for _ in range(8)]
    assert picks.count(2) == 6 and picks.count(1) == 2  # every 4th large step probes the other
    threads.record(32, 32, 10.0)  # small steps never enter the windows
    assert set(threads.cost) == {1, 2}


def test_short_large_steps_run_large_but_are_not_timed() -> None:
    """A step just over min_tokens pays the step's fixed cost over few tokens: timing it would make the
    thread count it ran at look slow next to long steps at the other."""
    threads = StepThreads(1, 2, min_tokens=64, probe_every=1000)
    threads.record(2, 256, 0.35)
    threads.record(1, 256, 0.45)
    assert threads.record_min_tokens == 128
    assert threads.choose(81) == 2
    threads.record(2, 81, 0.43)  # 5.3 ms per token: the fixed cost, not the thread count
    assert threads.cost[2] == pytest.approx(0.35 / 256)
    threads.record(2, 128, 0.2)  # from record_min_tokens up, steps count
    assert threads.cost[2] > 0.35 / 256


def test_one_slow_step_does_not_move_the_engine_off_the_faster_count() -> None:
    """The first step at a new shape builds kernels (~2x its usual time); the median of the window
    ignores it, and only a lasting slowdown (most of the window) moves the choice."""
    threads = StepThreads(1, 2, min_tokens=64, probe_every=1000)
    for _ in range(3):
        threads.record(2, 256, 0.40)
        threads.record(1, 256, 0.50)
    threads.record(2, 256, 0.80)  # kernels built for a new shape
    assert threads.choose(256) == 2
    threads.record(2, 256, 0.80)
    assert threads.choose(256) == 2  # 2 of 5 slow: still the faster count
    threads.record(2, 256, 0.80)
    assert threads.choose(256) == 1  # 3 of 5: it has really slowed


def test_a_slowed_thread_count_loses_its_place() -> None:
    """A neighbour takes the other core: steps at 2 threads stall, and the average moves to 1 thread."""
    threads = StepThreads(1, 2, min_tokens=8, probe_every=1000)
    threads.record(2, 100, 0.1)
    threads.record(1, 100, 0.15)
    assert threads.choose(100) == 2
    for _ in range(3):
        threads.record(2, 100, 2.0)  # stalled thread barriers: 20 ms per token
    assert threads.choose(100) == 1


def test_equal_counts_are_not_adaptive_and_bad_counts_are_refused() -> None:
    threads = StepThreads(2, 2)
    assert not threads.adaptive and threads.choose(1000) == 2
    threads.record(2, 1000, 1.0)
    assert threads.cost == {}
    with pytest.raises(ValueError, match=">= 1"):
        StepThreads(0, 2)


def test_decode_buckets_are_powers_of_two() -> None:
    assert [decode_bucket(t) for t in (1, 2, 3, 4, 5, 17, 32, 33, 64)] == [1, 2, 4, 4, 8, 32, 32, 64, 64]


def _run_decode(threads: StepThreads, tokens: int, seconds: dict[int, float], steps: int) -> list[int]:
    """``steps`` decode steps of ``tokens`` tokens, each costing ``seconds[count]``: the counts chosen."""
    picks = []
    for _ in range(steps):
        count = threads.choose(tokens)
        threads.record(count, tokens, seconds[count])
        picks.append(count)
    return picks


def test_measured_decode_alternates_first_then_keeps_the_faster_count() -> None:
    threads = StepThreads(1, 2, min_tokens=64, measure_decode=True)
    picks = _run_decode(threads, 32, {1: 0.195, 2: 0.148}, 2 * DECODE_WARM_STEPS + 10)
    assert picks[: 2 * DECODE_WARM_STEPS] == [1, 2] * DECODE_WARM_STEPS  # the small count first
    assert picks[2 * DECODE_WARM_STEPS :] == [2] * 10
    assert threads.cost == {}  # decode steps never enter the prefill windows
    assert "32 tokens: 1: 195.0 ms, 2: 148.0 ms" in threads.describe()


def test_measured_decode_keeps_one_choice_per_batch_size() -> None:
    """A full batch may gain from a second thread while a batch of 2 loses (its ops are tiny)."""
    threads = StepThreads(1, 2, min_tokens=64, measure_decode=True)
    _run_decode(threads, 32, {1: 0.195, 2: 0.148}, 2 * DECODE_WARM_STEPS)
    _run_decode(threads, 2, {1: 0.060, 2: 0.090}, 2 * DECODE_WARM_STEPS)
    assert threads.choose(30) == 2 and threads.choose(2) == 1
    assert sorted(threads.decode) == [2, 32]


def test_decode_probes_back_off_while_they_confirm_the_choice_and_catch_a_change() -> None:
    threads = StepThreads(1, 2, min_tokens=64, measure_decode=True)
    slow_other = {1: 0.1, 2: 4.0}  # 2 threads stall on a busy core: probes must be rare
    picks = _run_decode(threads, 32, slow_other, 2 * DECODE_WARM_STEPS)
    gaps = []
    for _ in range(6):
        picks = _run_decode(threads, 32, slow_other, DECODE_PROBE_MAX + 1)
        gaps.append(picks.index(2) + 1 if 2 in picks else None)
        threads.decode[32].steps = 0  # count the next gap from this probe
    assert gaps[0] is not None and gaps[0] <= DECODE_PROBE_EVERY
    assert threads.decode[32].gap == DECODE_PROBE_MAX  # doubled after each probe that kept 1 thread
    # the other core is free again: 2 threads get faster; the first probe that shows it is repeated at
    # the next steps, and the window's median moves within a few of them
    faster = {1: 0.1, 2: 0.05}
    picks = _run_decode(threads, 32, faster, 2 * DECODE_PROBE_MAX)
    first_probe = picks.index(2)
    assert first_probe <= DECODE_PROBE_MAX
    assert picks[first_probe : first_probe + 3] == [2, 2, 2]  # three faster probes move the median of 5
    assert picks[first_probe + 3 :].count(1) <= 12  # from then on 1 thread is only probed, less and less often
    assert threads.decode[32].gap >= DECODE_PROBE_MAX // 2


def test_fixed_decode_threads_never_measure_decode() -> None:
    threads = StepThreads(1, 2, min_tokens=64)
    assert _run_decode(threads, 32, {1: 0.2, 2: 0.1}, 20) == [1] * 20
    assert threads.decode == {}


def test_small_step_counts_are_the_counts_decode_may_run_on() -> None:
    assert StepThreads(1, 2, measure_decode=True).small_step_counts == (1, 2)
    assert StepThreads(2, 1, measure_decode=True).small_step_counts == (1, 2)
    assert StepThreads(1, 2).small_step_counts == (1,)  # fixed decode threads
    assert StepThreads(2, 2, measure_decode=True).small_step_counts == (2,)


def test_calibration_seeds_both_counts_from_timed_runs_after_a_warm_up() -> None:
    threads = StepThreads(1, 2, min_tokens=8)
    seen: list[int] = []
    threads.calibrate(lambda: seen.append(torch.get_num_threads()), tokens=100, repeats=3)
    assert seen == [1, 2, 1, 2, 1, 2, 1, 2]  # one untimed run each, then interleaved timed runs
    assert set(threads.cost) == {1, 2} and all(c >= 0 for c in threads.cost.values())
    assert torch.get_num_threads() == 1  # left at the decode count
    skipped = StepThreads(1, 2, min_tokens=128)
    skipped.calibrate(lambda: seen.append(0), tokens=100)  # not a large step: nothing to learn
    assert skipped.cost == {} and seen[-1] != 0


def test_the_runner_sets_threads_per_step_and_its_results_do_not_change(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    cpu = torch.device("cpu")
    plain = ModelRunner(model, LoraContext(), rows=2, max_seq_len=64, dtype=torch.float32, device=cpu)
    threads = StepThreads(1, 2, min_tokens=4)
    stepped = ModelRunner(
        model, LoraContext(), rows=2, max_seq_len=64, dtype=torch.float32, device=cpu, threads=threads
    )
    prompt = RowStep(0, 0, tuple(range(3, 13)), 0, True, False)  # 10 tokens: a large step here
    decode = RowStep(0, 10, (20,), 0, True, False)
    expected = [plain.step([prompt]).logits, plain.step([decode]).logits]
    got = [stepped.step([prompt]).logits]
    assert set(threads.cost) == {2}  # the large step ran, and was timed, with 2 threads
    got.append(stepped.step([decode]).logits)
    assert torch.get_num_threads() == 1 and set(threads.cost) == {2}  # decode: 1 thread, not timed
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_runner_calibration_times_a_prompt_chunk_in_a_free_row(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    threads = StepThreads(1, 2, min_tokens=16)
    runner = ModelRunner(
        model, LoraContext(), rows=2, max_seq_len=48, dtype=torch.float32, device=torch.device("cpu"), threads=threads
    )
    runner.calibrate_threads()
    assert set(threads.cost) == {1, 2} and runner.threads is threads
    # row 0 serves a request afterwards exactly as a fresh runner's would
    fresh = ModelRunner(model, LoraContext(), rows=2, max_seq_len=48, dtype=torch.float32, device=torch.device("cpu"))
    step = [RowStep(0, 0, (5, 6, 7), 0, True, False)]
    torch.testing.assert_close(runner.step(step).logits, fresh.step(step).logits, rtol=1e-5, atol=1e-5)


def test_measured_decode_steps_run_at_both_counts_with_the_same_results(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    cpu = torch.device("cpu")
    plain = ModelRunner(model, LoraContext(), rows=2, max_seq_len=64, dtype=torch.float32, device=cpu)
    threads = StepThreads(1, 2, min_tokens=4, measure_decode=True)
    stepped = ModelRunner(
        model, LoraContext(), rows=2, max_seq_len=64, dtype=torch.float32, device=cpu, threads=threads
    )
    prompt = RowStep(0, 0, tuple(range(3, 13)), 0, True, False)
    plain.step([prompt])
    stepped.step([prompt])
    seen = []
    for i in range(2 * DECODE_WARM_STEPS):
        decode = [RowStep(0, 10 + i, (20 + i,), 0, True, False)]
        expected = plain.step(decode).logits
        got = stepped.step(decode).logits
        seen.append(torch.get_num_threads())
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert seen == [1, 2] * DECODE_WARM_STEPS  # decode steps timed at both counts, alternating
    assert [set(b.samples) for b in threads.decode.values()] == [{1, 2}]  # one bucket (a lone row runs twice)
