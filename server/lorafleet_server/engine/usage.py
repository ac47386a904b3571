"""Usage metering for billing: requests, prompt and generated tokens per tenant and adapter, by minute.

Prometheus must not carry tenant labels (they are unbounded), so the engine keeps its own meter: every
finished request (any finish reason, cancelled ones included, since their tokens were computed and
streamed; not one cancelled while still queued, which computed nothing, nor one a forced stop cut,
which its caller retries, unless it is a stream that had sent tokens, which nobody retries) adds to
the bucket of (the
minute it finished, its tenant, its adapter version). An admin
reads a time window through ``GetUsage``; minutes older than the retention are dropped, by the time that
has passed (a monotonic clock), so a wall clock stepped ahead for a moment expires nothing early. Every
record is also a line of the ``lorafleet.usage`` log with the same numbers, the request id and the
minute, for exact and durable accounting downstream: the meter lives in memory, and the request log's
line is the edge's view (a caller that left before the end sees fewer tokens than were computed).

Memory. A week of minutes is long: at ~50 requests/s spread over ~850 adapters a server fills ~480
buckets a minute, ~4.8 million at the 7-day retention. So only the current minute is a dict; when a later
minute starts, the closed one is packed into two flat arrays (a pair id per bucket, and its three
counts), ~30 bytes a bucket against ~270 for a dict entry with a tuple key and a list of ints. A
(tenant, adapter) pair is stored once and named by a small int id, counted by the minutes that hold it
and freed when the last of them expires, so the names are bounded by the pairs seen within the
retention. ``report`` takes references to the minutes of its window under the lock (closed minutes are
never written again) and sums them outside it with numpy, so a week-long read does not hold up the
engine thread's ``record``.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
import uuid
from array import array
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from lorafleet_server.engine.types import Summary
from lorafleet_server.logs import USAGE_LOGGER

usage_log = logging.getLogger(USAGE_LOGGER)

MINUTE = 60
_COUNTS = 3  # requests, prompt tokens, generated tokens
_CLOCK_SLACK_MINUTES = 2  # a clock stepped back by at most this counts in the open minute
_SUM_MINUTES = 360  # report sums this many minutes at a time: its peak memory stays ~1/28 of a week's


@dataclass(frozen=True)
class UsageRow:
    tenant: str  # "" for requests without a key and without an adapter
    adapter: str  # the concrete "tenant/name@version", "" for the base model
    requests: int
    prompt_tokens: int
    generated_tokens: int


@dataclass(frozen=True)
class _ClosedMinute:
    minute: int
    ids: array  # [n] int32: the pair id of each bucket
    counts: array  # [n * 3] int64: each bucket's requests, prompt tokens, generated tokens


class UsageMeter:
    """Thread-safe: the engine thread records, admin calls read."""

    def __init__(
        self,
        retention_seconds: float = 7 * 24 * 3600,
        clock: Callable[[], float] = time.time,
        steady: Callable[[], float] = time.monotonic,
    ) -> None:
        self._retention_minutes = int(retention_seconds // MINUTE)
        self._clock = clock  # wall time: the minute a request is counted in
        # Expiry follows the time that has passed (``steady``, never stepped) from the first record, not
        # the wall clock: one record while the clock was days ahead (then corrected) expired everything.
        self._steady = steady
        self._anchor: tuple[float, float] | None = None  # (wall, steady) at the first record
        self._lock = threading.Lock()
        self._open_minute: int | None = None  # the minute the dict below counts; None before any record
        self._open: dict[int, list[int]] = {}  # pair id -> [requests, prompt tokens, generated tokens]
        self._closed: deque[_ClosedMinute] = deque()  # oldest first (a minute may appear twice)
        self._ids: dict[tuple[str, str], int] = {}  # (tenant, adapter) -> pair id
        self._names: list[tuple[str, str] | None] = []  # pair id -> (tenant, adapter); None when free
        self._refs: list[int] = []  # pair id -> how many minutes (open or closed) hold a bucket of it
        self._free: list[int] = []  # ids whose pairs expired, to reuse

    def record(self, tenant: str, summary: Summary) -> None:
        wall = self._clock()
        minute = int(wall) // MINUTE
        with self._lock:
            if self._anchor is None:
                self._anchor = (wall, self._steady())
            if self._open_minute is None:
                self._open_minute = minute
            elif minute > self._open_minute or minute < self._open_minute - _CLOCK_SLACK_MINUTES:
                self._close_open_minute(minute)
            # A clock stepped back by a little (NTP) counts in the open minute; by more (a wrong clock
            # corrected), it starts its own minute, so the usage stays readable at the clock's time.
            pid = self._pair_id(tenant, summary.adapter)
            counts = self._open.get(pid)
            if counts is None:
                counts = self._open[pid] = [0, 0, 0]
                self._refs[pid] += 1
            counts[0] += 1
            counts[1] += summary.prompt_tokens
            counts[2] += summary.generated_tokens
        usage_log.info(
            "usage",
            extra={
                "fields": {
                    # Unique per record: a caller may send any x-request-id, the same one many times, so
                    # a pipeline that de-duplicates shipped lines must key on this (an outside review).
                    "usage_id": uuid.uuid4().hex,
                    "request_id": summary.request_id,
                    "tenant": tenant,
                    "adapter": summary.adapter,
                    "minute": minute * MINUTE,  # the minute (UNIX seconds) GetUsage counts it in
                    "prompt_tokens": summary.prompt_tokens,
                    "generated_tokens": summary.generated_tokens,
                    "finish_reason": summary.finish_reason.value,
                }
            },
        )

    @staticmethod
    def window(start: float, end: float) -> tuple[int, int]:
        """The whole minutes a window [start, end) sums, as UNIX seconds: those that start inside it."""
        return -(-int(start) // MINUTE) * MINUTE, -(-int(end) // MINUTE) * MINUTE

    def report(self, start: float, end: float, tenant: str | None = None) -> list[UsageRow]:
        """Totals per (tenant, adapter) of the requests that finished in [start, end) (UNIX seconds),
        at minute resolution: a minute counts when it starts inside the window."""
        first, last = (bound // MINUTE for bound in self.window(start, end))
        with self._lock:
            minutes = [m for m in self._closed if first <= m.minute < last]
            current = (
                {pid: list(c) for pid, c in self._open.items()}
                if self._open_minute is not None and first <= self._open_minute < last
                else {}
            )
            names = list(self._names)  # every id the minutes above hold is live, so named here
        # Outside the lock: closed minutes are immutable, the rest are copies.
        totals = np.zeros((len(names), _COUNTS), dtype=np.int64)  # [pairs, 3]
        for i in range(0, len(minutes), _SUM_MINUTES):
            group = minutes[i : i + _SUM_MINUTES]
            ids = np.concatenate([np.frombuffer(m.ids, dtype=np.int32) for m in group])  # [buckets]
            counts = np.concatenate([np.frombuffer(m.counts, dtype=np.int64) for m in group])  # [buckets * 3]
            np.add.at(totals, ids, counts.reshape(-1, _COUNTS))  # exact int64 sums per pair
        for pid, c in current.items():
            totals[pid] += c
        rows = []
        for held in np.flatnonzero(totals[:, 0]).tolist():  # a bucket exists only with a request in it
            name = names[held]
            assert name is not None, "a minute in the window holds a freed pair id"
            if tenant is None or name[0] == tenant:
                rows.append(UsageRow(name[0], name[1], *totals[held].tolist()))
        return sorted(rows, key=lambda r: (r.tenant, r.adapter))

    def buckets(self) -> int:
        """How many (minute, tenant, adapter) buckets are held: for tests and the memory bench."""
        with self._lock:
            return len(self._open) + sum(len(m.ids) for m in self._closed)

    def _pair_id(self, tenant: str, adapter: str) -> int:
        key = (tenant, adapter)
        pid = self._ids.get(key)
        if pid is None:
            if self._free:
                pid = self._free.pop()
                self._names[pid] = key
            else:
                pid = len(self._names)
                self._names.append(key)
                self._refs.append(0)
            self._ids[key] = pid
        return pid

    def _close_open_minute(self, minute: int) -> None:
        """Pack the open minute's buckets into arrays, start ``minute``, drop minutes past the retention."""
        assert self._open_minute is not None
        if self._open:
            ids = array("i", self._open.keys())
            counts = array("q", (n for c in self._open.values() for n in c))
            closed = _ClosedMinute(self._open_minute, ids, counts)
            if not self._closed or self._closed[-1].minute <= closed.minute:
                self._closed.append(closed)
            else:  # after a clock stepped far back: kept in order, so expiry from the front stays right
                bisect.insort(self._closed, closed, key=lambda m: m.minute)
        self._open = {}
        self._open_minute = minute
        assert self._anchor is not None
        wall, steady = self._anchor
        elapsed_minute = int(wall + (self._steady() - steady)) // MINUTE  # the wall minute had it not been stepped
        horizon = min(minute, elapsed_minute) - self._retention_minutes
        while self._closed and self._closed[0].minute < horizon:
            for pid in self._closed.popleft().ids:
                self._refs[pid] -= 1
                if self._refs[pid] == 0:
                    name = self._names[pid]
                    assert name is not None
                    del self._ids[name]
                    self._names[pid] = None
                    self._free.append(pid)
