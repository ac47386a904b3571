"""Torch intra-op threads per forward step, chosen by the step's size and by measurement.

A decode step (a token per running request) is ~1,300 small ops; with every core in torch's thread
pool, any other busy thread on the machine (the gRPC loop, the clients, a neighbour) can stall each
op's thread barrier, so decode starts on ``--torch-threads`` (cores - 1 by default). Whether a second
thread pays off depends on the machine: on a 2-core AVX-512 EPYC in bf16 (small, fast ops) decode
lost with 2 threads, on a 2-core AVX2 EPYC in fp32 (each op reads 4-byte weights) a 32-row decode
forward took ~148 ms with 2 threads against ~195 ms with 1 (docs/architecture.md, "Measured facts").
So it is measured where it runs: ``StepThreads`` times decode steps at both counts per batch size
(a power-of-two bucket of the step's tokens) and keeps the faster, probing the other now and then,
less often each time a probe confirms the choice. A step that prefills prompts is the same number of
ops, each several times larger: there a second thread usually pays off (2 cores, idle: a 256-token
step took ~0.6x the time); those steps are timed by seconds per token at both counts the same way.
Steps on the engine's thread gain from a second thread only with the OpenMP wait policy of
``lorafleet_server/openmp.py``: without it they lost (~470 ms against ~440 ms on one thread; ~350-400
ms with it, docs/architecture.md, "Measured facts").
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

PREFILL_MIN_TOKENS = 64  # steps of more tokens than this are "large" (decode rows plus prompt chunks)
PROBE_EVERY = 16  # every PROBE_EVERY-th large step runs at the thread count not in use, to re-measure it
# A thread count's cost is the median seconds per token of its last COST_WINDOW timed steps: one slow
# step (the first at a new shape builds oneDNN kernels: 256-token steps took 712-796 ms at 2 threads
# against ~400 ms after) moved an average with weight 0.3 past the other count's and kept the engine
# there until the next probe; a median needs most of the window to move.
COST_WINDOW = 5
# Steps of fewer tokens than twice min_tokens run large but are not timed: a step's fixed cost (~1,300-4,000
# Python-dispatched ops) weighs more per token the fewer tokens it has, so an 81-token step at 2 threads
# (5.3 ms per token) made 2 threads look slower than 256-token steps at 1 thread (1.9 ms per token) and
# kept every step on one thread until the next probe.
RECORD_MIN_FACTOR = 2
# Decode steps (up to min_tokens tokens) are compared per bucket of their size: the next power of two of
# their tokens. Each count runs DECODE_WARM_STEPS timed steps of a bucket, alternating, before the bucket
# picks one; then the other is probed after DECODE_PROBE_EVERY steps, and the gap doubles (up to
# DECODE_PROBE_MAX) each time a probe is slower than the choice's median. A probe that is faster is
# repeated at the next step, until the window's median decides: where the other count is much slower
# (a busy second core stalls each op's barrier) its probes cost little, and a warm-up disturbed by a
# neighbour, or a change of load, is corrected within a few steps of the next probe.
DECODE_WARM_STEPS = 3
DECODE_PROBE_EVERY = 32
DECODE_PROBE_MAX = 1024
CALIBRATION_TOKENS = 128  # the prompt chunk ModelRunner.calibrate_threads times at startup
CALIBRATION_REPEATS = 2  # timed runs per thread count (after an untimed one)


def decode_bucket(tokens: int) -> int:
    """The size class a decode step of ``tokens`` tokens is compared in: the next power of two."""
    return 1 << max(0, tokens - 1).bit_length()


@dataclass
class _DecodeBucket:
    """The timed decode steps of one size class, and when to probe next."""

    samples: dict[int, deque[float]] = field(default_factory=dict)  # threads -> seconds of the last steps
    steps: int = 0  # steps since the last probe
    gap: int = DECODE_PROBE_EVERY  # steps between probes
    probing: int | None = None  # the choice a probe running now is measured against


class StepThreads:
    """Threads for each forward step: ``small`` or ``large``, whichever has measured faster for steps
    like it. Steps of more than ``min_tokens`` tokens compare seconds per token (the median of the last
    ``COST_WINDOW`` steps timed at each), with a probe of the other every ``probe_every`` such steps.
    Steps of up to ``min_tokens`` (decode) run ``small`` unless ``measure_decode``; then they compare
    seconds per step within their ``decode_bucket`` (see ``DECODE_WARM_STEPS``).

    One engine thread calls ``run``; the object is not shared between threads.
    """

    def __init__(
        self,
        small: int,
        large: int,
        *,
        min_tokens: int = PREFILL_MIN_TOKENS,
        probe_every: int = PROBE_EVERY,
        measure_decode: bool = False,
    ) -> None:
        if small < 1 or large < 1:
            raise ValueError(f"thread counts must be >= 1, not {small} and {large}")
        self.small = small
        self.large = large
        self.min_tokens = min_tokens
        self.record_min_tokens = RECORD_MIN_FACTOR * min_tokens  # the fewest tokens of a step that is timed
        self.probe_every = probe_every
        self.measure_decode = measure_decode
        self.samples: dict[int, deque[float]] = {}  # threads -> seconds per token of the last timed steps
        self.decode: dict[int, _DecodeBucket] = {}  # decode_bucket -> its timed steps
        self._large_steps = 0

    @property
    def adaptive(self) -> bool:
        return self.large != self.small

    @property
    def small_step_counts(self) -> tuple[int, ...]:
        """The thread counts a step of up to ``min_tokens`` tokens (decode) may run on."""
        return tuple(sorted({self.small, self.large})) if self.measure_decode else (self.small,)

    def choose(self, tokens: int) -> int:
        """The thread count for a step of ``tokens`` tokens."""
        if not self.adaptive:
            return self.small
        if tokens <= self.min_tokens:
            return self._choose_decode(tokens) if self.measure_decode else self.small
        self._large_steps += 1
        for threads in (self.large, self.small):  # each measured once first
            if threads not in self.samples:
                return threads
        cost = self.cost
        best = min(cost, key=lambda t: cost[t])
        return self._other(best) if self._large_steps % self.probe_every == 0 else best

    def _other(self, threads: int) -> int:
        return self.small if threads == self.large else self.large

    def _bucket(self, tokens: int) -> _DecodeBucket:
        key = decode_bucket(tokens)
        bucket = self.decode.get(key)
        if bucket is None:
            bucket = self.decode[key] = _DecodeBucket()
        return bucket

    def _choose_decode(self, tokens: int) -> int:
        bucket = self._bucket(tokens)
        bucket.probing = None  # a probe whose step failed was never recorded
        counts = (self.small, self.large)
        fewest = min(counts, key=lambda t: len(bucket.samples.get(t, ())))  # small first on a tie
        if len(bucket.samples.get(fewest, ())) < DECODE_WARM_STEPS:
            return fewest
        best = self._best(bucket)
        bucket.steps += 1
        if bucket.steps >= bucket.gap:
            bucket.steps = 0
            bucket.probing = best
            return self._other(best)
        return best

    @staticmethod
    def _best(bucket: _DecodeBucket) -> int:
        return min(bucket.samples, key=lambda t: statistics.median(bucket.samples[t]))

    def record(self, threads: int, tokens: int, seconds: float) -> None:
        """A step of ``tokens`` tokens took ``seconds`` with ``threads`` threads. Larger steps are kept
        from ``record_min_tokens`` tokens up (seconds per token of like-sized steps); decode steps only
        with ``measure_decode`` (seconds per step, in their bucket)."""
        if not self.adaptive:
            return
        if tokens <= self.min_tokens:
            if self.measure_decode:
                self._record_decode(threads, tokens, seconds)
            return
        if tokens < self.record_min_tokens:
            return
        self.samples.setdefault(threads, deque(maxlen=COST_WINDOW)).append(seconds / tokens)

    def _record_decode(self, threads: int, tokens: int, seconds: float) -> None:
        bucket = self._bucket(tokens)
        bucket.samples.setdefault(threads, deque(maxlen=COST_WINDOW)).append(seconds)
        if bucket.probing is not None and threads != bucket.probing:  # the probe's step
            # slower than the choice's median: probe half as often; faster: at the next step again,
            # until the window's median says whether the other count has really become the faster one
            slower = seconds >= statistics.median(bucket.samples[bucket.probing])
            bucket.gap = min(2 * bucket.gap, DECODE_PROBE_MAX) if slower else 1
            bucket.probing = None

    @property
    def cost(self) -> dict[int, float]:
        """threads -> median seconds per token of the last steps timed with them."""
        return {t: statistics.median(v) for t, v in self.samples.items()}

    def calibrate(self, run_step: Callable[[], object], tokens: int, repeats: int = CALIBRATION_REPEATS) -> None:
        """Seed the cost windows before serving: ``run_step`` (a step of ``tokens`` tokens, at least
        ``record_min_tokens``; shorter ones are skipped) once untimed at each thread count (it also
        creates the kernels' primitives), then ``repeats`` times each, interleaved. Without it the first
        large steps after a start, which also pay that warm-up, would mislead the choice."""
        if not self.adaptive or tokens < self.record_min_tokens:
            return
        counts = (self.small, self.large)
        for threads in counts:
            torch.set_num_threads(threads)
            run_step()
        self.samples = {}
        for _ in range(repeats):
            for threads in counts:
                torch.set_num_threads(threads)
                start = time.perf_counter()
                run_step()
                self.record(threads, tokens, time.perf_counter() - start)
        torch.set_num_threads(self.small)

    @contextmanager
    def run(self, tokens: int) -> Iterator[int]:
        """Set torch's threads for a step of ``tokens`` tokens around it and time it."""
        threads = self.choose(tokens)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        start = time.perf_counter()
        yield threads
        self.record(threads, tokens, time.perf_counter() - start)

    def describe(self) -> str:
        if not self.adaptive:
            return f"{self.small} torch threads"
        measured = ", ".join(f"{t}: {c * 1e3:.2f} ms/token" for t, c in sorted(self.cost.items()))
        large = (
            f"{self.small} or {self.large} for larger ones, whichever measures faster "
            f"({measured or 'not measured yet'})"
        )
        if not self.measure_decode:
            return f"{self.small} torch threads for steps of up to {self.min_tokens} tokens; {large}"
        decode = "; ".join(
            f"{size} tokens: "
            + ", ".join(f"{t}: {statistics.median(v) * 1e3:.1f} ms" for t, v in sorted(b.samples.items()))
            for size, b in sorted(self.decode.items())
            if b.samples
        )
        return (
            f"{self.small} or {self.large} torch threads for steps of up to {self.min_tokens} tokens, "
            f"whichever measures faster per batch size ({decode or 'not measured yet'}); {large}"
        )
