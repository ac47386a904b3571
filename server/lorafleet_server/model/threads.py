"""Torch intra-op threads per forward step, chosen by the step's size and by measurement.

A decode step (a token per running request) is ~1,300 small ops; with every core in torch's thread
pool, any other busy thread on the machine (the gRPC loop, the clients, a neighbour) stalls each op's
thread barrier, so decode keeps a core free (``--torch-threads``, cores - 1 by default). A step that
prefills prompts is the same number of ops, each several times larger: there a second thread can pay
off (2 cores, idle: a 256-token step took ~0.6x the time). In serving the other core also runs the gRPC
loop and often the clients, so the choice is measured, not assumed: ``StepThreads`` times the large
steps at both thread counts and keeps the one with fewer seconds per token, trying the other again now
and then (a neighbour may have come or gone). Steps on the engine's thread gain from a second thread
only with the OpenMP wait policy of ``lorafleet_server/openmp.py``: without it they lost (~470 ms
against ~440 ms on one thread; ~350-400 ms with it, docs/architecture.md, "Measured facts").
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

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
CALIBRATION_TOKENS = 128  # the prompt chunk ModelRunner.calibrate_threads times at startup
CALIBRATION_REPEATS = 2  # timed runs per thread count (after an untimed one)


class StepThreads:
    """Threads for each forward step: ``small`` for steps of up to ``min_tokens`` tokens; for larger
    ones ``small`` or ``large``, whichever has cost fewer seconds per token (the median of the last
    ``COST_WINDOW`` steps timed at each), with a probe of the other every ``probe_every`` large steps.

    One engine thread calls ``run``; the object is not shared between threads.
    """

    def __init__(
        self, small: int, large: int, *, min_tokens: int = PREFILL_MIN_TOKENS, probe_every: int = PROBE_EVERY
    ) -> None:
        if small < 1 or large < 1:
            raise ValueError(f"thread counts must be >= 1, not {small} and {large}")
        self.small = small
        self.large = large
        self.min_tokens = min_tokens
        self.record_min_tokens = RECORD_MIN_FACTOR * min_tokens  # the fewest tokens of a step that is timed
        self.probe_every = probe_every
        self.samples: dict[int, deque[float]] = {}  # threads -> seconds per token of the last timed steps
        self._large_steps = 0

    @property
    def adaptive(self) -> bool:
        return self.large != self.small

    def choose(self, tokens: int) -> int:
        """The thread count for a step of ``tokens`` tokens."""
        if tokens <= self.min_tokens or not self.adaptive:
            return self.small
        self._large_steps += 1
        for threads in (self.large, self.small):  # each measured once first
            if threads not in self.samples:
                return threads
        cost = self.cost
        best = min(cost, key=lambda t: cost[t])
        other = self.small if best == self.large else self.large
        return other if self._large_steps % self.probe_every == 0 else best

    def record(self, threads: int, tokens: int, seconds: float) -> None:
        """A step of ``tokens`` tokens took ``seconds`` with ``threads`` threads (kept from
        ``record_min_tokens`` tokens up: seconds per token of like-sized steps)."""
        if tokens < self.record_min_tokens or not self.adaptive:
            return
        self.samples.setdefault(threads, deque(maxlen=COST_WINDOW)).append(seconds / tokens)

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
        return (
            f"{self.small} torch threads for steps of up to {self.min_tokens} tokens; {self.small} or "
            f"{self.large} for larger ones, whichever measures faster ({measured or 'not measured yet'})"
        )
