"""Usage metering for billing: requests, prompt and generated tokens per tenant and adapter, by minute.

Prometheus must not carry tenant labels (they are unbounded), so the engine keeps its own meter: every
finished request (any finish reason, cancelled ones included, since their tokens were computed and
streamed) adds to the bucket of (the minute it finished, its tenant, its adapter version). An admin
reads a time window through ``GetUsage``; buckets older than the retention are dropped, so memory is
bounded by retention x the (tenant, adapter) pairs active each minute. The request log carries the
same numbers per request for exact accounting downstream.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from lorafleet_server.engine.types import Summary

MINUTE = 60


@dataclass(frozen=True)
class UsageRow:
    tenant: str  # "" for requests without a key and without an adapter
    adapter: str  # the concrete "tenant/name@version", "" for the base model
    requests: int
    prompt_tokens: int
    generated_tokens: int


class UsageMeter:
    """Thread-safe: the engine thread records, admin calls read."""

    def __init__(self, retention_seconds: float = 7 * 24 * 3600, clock: Callable[[], float] = time.time) -> None:
        self._retention = retention_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[tuple[int, str, str], list[int]] = {}  # (minute, tenant, adapter) -> counts
        self._oldest = 0  # the oldest minute that may still hold a bucket

    def record(self, tenant: str, summary: Summary) -> None:
        minute = int(self._clock()) // MINUTE
        with self._lock:
            counts = self._buckets.setdefault((minute, tenant, summary.adapter), [0, 0, 0])
            counts[0] += 1
            counts[1] += summary.prompt_tokens
            counts[2] += summary.generated_tokens
            self._expire(minute)

    @staticmethod
    def window(start: float, end: float) -> tuple[int, int]:
        """The whole minutes a window [start, end) sums, as UNIX seconds: those that start inside it."""
        return -(-int(start) // MINUTE) * MINUTE, -(-int(end) // MINUTE) * MINUTE

    def report(self, start: float, end: float, tenant: str | None = None) -> list[UsageRow]:
        """Totals per (tenant, adapter) of the requests that finished in [start, end) (UNIX seconds),
        at minute resolution: a minute counts when it starts inside the window."""
        first, last = (bound // MINUTE for bound in self.window(start, end))
        totals: dict[tuple[str, str], list[int]] = {}
        with self._lock:
            for (minute, who, adapter), counts in self._buckets.items():
                if first <= minute < last and (tenant is None or who == tenant):
                    row = totals.setdefault((who, adapter), [0, 0, 0])
                    for i, n in enumerate(counts):
                        row[i] += n
        return [UsageRow(t, a, *counts) for (t, a), counts in sorted(totals.items())]

    def _expire(self, now_minute: int) -> None:
        horizon = now_minute - int(self._retention // MINUTE)
        if horizon <= self._oldest:
            return
        for key in [k for k in self._buckets if k[0] < horizon]:
            del self._buckets[key]
        self._oldest = horizon
