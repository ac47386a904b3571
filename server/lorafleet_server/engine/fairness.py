"""Fair admission across tenants: who gets the next free row, and whose row to give back.

The waiting requests are kept per tenant, in arrival order. Each tenant has a virtual time that grows
by ``1 / weight`` with every request it starts; the next row goes to the waiting tenant with the
smallest virtual time (weighted round robin that remembers). A tenant that was idle restarts at the
smallest virtual time of the waiting tenants, or, when none waits, at the queue's clock (the virtual
time of the last request started), so idling earns no credit to burst with later.

Rows are also *shared*: a tenant's fair share is ``rows * weight / sum(weights of the tenants that
run or wait)``. When no row is free and a tenant waits below its share while another runs above its
own, the engine preempts one of the latter's rows (``preemption_victim``) and the preempted request
re-joins the front of its tenant's queue; it resumes later by recomputing its KV cache (prompt plus
the tokens it had generated), so its output is unchanged. That is what lets one tenant's single
request start within a step or two while another keeps the whole batch busy with long generations.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import Generic, Protocol, TypeVar


class Queued(Protocol):
    @property
    def tenant(self) -> str: ...
    @property
    def weight(self) -> float: ...


R = TypeVar("R", bound=Queued)

# Tenants that wait for nothing whose virtual times are kept. Beyond twice this, the lowest are
# forgotten: a forgotten tenant restarts where a new one would, which gives it back at most the
# little it was ahead of the waiting tenants (those lowest were behind the rest; one that ran far
# ahead is kept). Without keys a tenant is whatever an adapter name says, and a client naming a new
# one per request (refused or not) grew the map by ~110 bytes each, for good (a soak).
MAX_IDLE_TENANTS = 4096


class FairQueue(Generic[R]):
    """Per-tenant FIFO queues plus the tenants' virtual times. Not thread-safe: the engine thread
    uses it, and FairPool (its admission threads' queue) under its own lock."""

    def __init__(self) -> None:
        self._queues: dict[str, deque[R]] = {}
        self._vtime: dict[str, float] = {}
        # The virtual time of the latest start. Without it a tenant arriving while nobody waited (the
        # usual case below overload) restarted at its own old time, 0 when new: the credit of all the
        # rows others had run meanwhile, spent against them (the longest-serving tenant starved).
        self._clock = 0.0

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def __bool__(self) -> bool:
        return bool(self._queues)

    def __iter__(self) -> Iterator[R]:
        for q in list(self._queues.values()):
            yield from list(q)

    def __contains__(self, item: object) -> bool:
        return any(item in q for q in self._queues.values())

    def push(self, r: R, *, front: bool = False) -> None:
        """Queue ``r`` behind its tenant's others (``front``: ahead of them, for a preempted request)."""
        q = self._queues.get(r.tenant)
        if q is None:  # the tenant becomes active: no credit for having been idle
            active = [self._vtime[t] for t in self._queues]
            self._vtime[r.tenant] = max(self._vtime.get(r.tenant, 0.0), min(active, default=self._clock))
            q = self._queues[r.tenant] = deque()
            if len(self._vtime) > len(self._queues) + 2 * MAX_IDLE_TENANTS:
                self._forget_idle()
        if front:
            q.appendleft(r)
        else:
            q.append(r)

    def _forget_idle(self) -> None:
        """Keep the virtual times of the ``MAX_IDLE_TENANTS`` idle tenants furthest ahead (whose restart
        differs most from a new tenant's), and of every waiting one."""
        idle = sorted((v, t) for t, v in self._vtime.items() if t not in self._queues)
        for _, tenant in idle[: len(idle) - MAX_IDLE_TENANTS]:
            del self._vtime[tenant]

    def remove(self, r: R) -> None:
        q = self._queues.get(r.tenant)
        if q is not None and r in q:
            q.remove(r)
            if not q:
                del self._queues[r.tenant]

    def tenants(self) -> list[str]:
        """Waiting tenants, the one owed the next row first."""
        return sorted(self._queues, key=lambda t: (self._vtime[t], t))

    def waiting(self, tenant: str) -> list[R]:
        return list(self._queues.get(tenant, ()))

    def started(self, r: R) -> None:
        """``r`` (still queued) takes a row: it leaves the queue and its tenant's clock advances.

        A preempted request resuming is charged again, deliberately: it is a new start (and a new
        prefill), and the charge is what hands the freed row to the tenant it was freed for. Without
        it the preempted tenant, level with the starved one, won the tie and took its row straight
        back, preempted again every step (a single request waited 59 steps behind a flood, not 2).
        """
        self.remove(r)
        start = self._vtime.get(r.tenant, 0.0)
        self._clock = max(self._clock, start)
        self._vtime[r.tenant] = start + 1.0 / r.weight

    def clear(self) -> list[R]:
        """Empty the queue (draining), returning what was in it."""
        items = list(self)
        self._queues.clear()
        return items


def fair_shares(rows: int, weights: dict[str, float]) -> dict[str, float]:
    """Each active tenant's share of ``rows``, proportional to its weight."""
    total = sum(weights.values())
    return {t: rows * w / total for t, w in weights.items()} if total > 0 else {}


def preemption_victim(
    rows: int,
    running: list[R],
    queue: FairQueue[R],
    can_start: Callable[[R], bool],
    can_preempt: Callable[[R], bool],
) -> R | None:
    """The running request to give its row back, or None.

    Only when a tenant waits below its fair share with a request that could start now, and another
    tenant runs above its share: the victim is that tenant's preemptible request that has done the
    least work (the last in ``running`` order among the most-over-share tenant's).
    """
    weights: dict[str, float] = {}
    for r in [*running, *queue]:
        weights[r.tenant] = max(weights.get(r.tenant, 0.0), r.weight)
    shares = fair_shares(rows, weights)
    counts: dict[str, int] = {}
    for r in running:
        counts[r.tenant] = counts.get(r.tenant, 0) + 1
    starved = [
        t for t in queue.tenants() if counts.get(t, 0) + 1 <= shares[t] and any(map(can_start, queue.waiting(t)))
    ]
    if not starved:
        return None
    over = sorted((counts[t] - shares[t], t) for t in counts if counts[t] - 1 >= shares[t])
    for _, tenant in reversed(over):
        victims = [r for r in running if r.tenant == tenant and can_preempt(r)]
        if victims:
            return victims[-1]
    return None
