"""The engine's book of places: how many requests each tenant has reserved (waiting for a worker thread,
or tokenizing), queued (submitted, not running; preempted ones waiting to resume counted apart too) and
running (KV rows held), and the refusals those counts decide: a full queue, a tenant over its
``max_waiting``.

Plain bookkeeping, no threads of its own: the engine's lock guards every call (the edges' submit
threads reserve and queue, the engine thread starts, preempts and releases).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lorafleet_server.engine.types import EngineConfig, GenerationRequest
from lorafleet_server.errors import QueueFull


def tenant_limit(config: EngineConfig, req: GenerationRequest, kind: Literal["max_waiting", "max_running"]) -> int:
    """A tenant's waiting or running limit: its key's override, else the engine's (0: none)."""
    override = getattr(req.principal, kind, None) if req.principal is not None else None
    return int(override) if override is not None else int(getattr(config, f"{kind}_per_tenant"))


def _add(counts: dict[str, int], tenant: str, delta: int) -> None:
    """``counts[tenant] += delta``, the entry dropped at 0 (so the dict holds only tenants with some)."""
    left = counts.get(tenant, 0) + delta
    if left:
        counts[tenant] = left
    else:
        counts.pop(tenant, None)


@dataclass
class Places:
    """Counts of one engine's requests by state, in total and per tenant. A request goes
    ``reserve`` -> ``enqueue`` -> ``start`` -> ``release_row``, with ``unreserve`` (its submit never
    ran or failed), ``preempt`` (back to the queue, resuming) and ``drop_queued`` (it left the queue)."""

    config: EngineConfig
    free_rows: int = field(init=False)  # KV rows no request holds: every row of the config at first
    queued: int = 0  # submitted, not running (preempted ones waiting to resume included)
    submitting: int = 0  # reserved, not queued yet
    tenant_queued: dict[str, int] = field(default_factory=dict)
    # Of those queued, the preempted requests waiting to resume: they wait, but their tenant did not ask
    # for them again, so its max_waiting does not count them.
    tenant_resuming: dict[str, int] = field(default_factory=dict)
    tenant_submitting: dict[str, int] = field(default_factory=dict)
    tenant_rows: dict[str, int] = field(default_factory=dict)  # KV rows each tenant holds

    def __post_init__(self) -> None:
        self.free_rows = self.config.max_batch_size

    # -- a request's way through ----------------------------------------------------------------------
    def reserve(self, req: GenerationRequest) -> None:
        """Hold a place for ``req`` in the queue (``check`` first: raises QueueFull)."""
        self.check(req)
        self._submitting(req.tenant, +1)

    def unreserve(self, tenant: str) -> None:
        self._submitting(tenant, -1)

    def enqueue(self, tenant: str) -> None:
        """A reserved request's place becomes its place in the queue."""
        self._submitting(tenant, -1)
        self.count_queued(tenant, +1)

    def unqueue(self, tenant: str) -> None:
        """``enqueue`` undone (the engine's loop had exited): the request holds its reserved place again."""
        self.count_queued(tenant, -1)
        self._submitting(tenant, +1)

    def start(self, tenant: str, resuming: bool) -> None:
        """A queued request takes a row (``resuming``: one that was preempted)."""
        self.count_queued(tenant, -1, resuming=resuming)
        self.free_rows -= 1
        _add(self.tenant_rows, tenant, +1)

    def preempt(self, tenant: str) -> None:
        """A running request gives its row back and waits to resume."""
        self.release_row(tenant)
        self.count_queued(tenant, +1, resuming=True)

    def release_row(self, tenant: str) -> None:
        """A running request ended."""
        self.free_rows += 1
        _add(self.tenant_rows, tenant, -1)

    def drop_queued(self, tenant: str, resuming: bool) -> None:
        """A queued request ended before it started (or before it resumed)."""
        self.count_queued(tenant, -1, resuming=resuming)

    def count_queued(self, tenant: str, delta: int, resuming: bool = False) -> None:
        self.queued += delta
        _add(self.tenant_queued, tenant, delta)
        if resuming:
            _add(self.tenant_resuming, tenant, delta)

    def _submitting(self, tenant: str, delta: int) -> None:
        self.submitting += delta
        _add(self.tenant_submitting, tenant, delta)

    # -- what the counts decide -----------------------------------------------------------------------
    def sent(self, tenant: str) -> int:
        """``tenant``'s requests waiting to run that it sent: reserved or queued, not resuming ones."""
        resumes = self.tenant_resuming.get(tenant, 0)
        return self.tenant_queued.get(tenant, 0) - resumes + self.tenant_submitting.get(tenant, 0)

    def check(self, req: GenerationRequest) -> None:
        """Refuse (QueueFull) when ``max_waiting`` requests would wait beyond the free rows, unless the
        request's tenant has less than its share of the queue; or when the tenant's own waiting
        requests reach its ``max_waiting_per_tenant``.

        Submitted requests first fill the free KV rows (the engine admits them between steps), so the
        queue holds ``free rows + max_waiting`` before it is full: a burst that arrives during a long
        step is not refused while rows stand empty. A full queue still takes a request of a tenant with
        fewer queued than ``max_waiting`` / the tenants queued (it counting itself; preempted requests
        waiting to resume count for neither: their tenants did not send them again), up to twice
        ``max_waiting`` in all: one tenant that filled the queue locked every other out (an outside
        review), and now it only loses its place above its share.
        """
        max_waiting = self.config.max_waiting
        waiting = self.queued + self.submitting - self.free_rows
        own = self.sent(req.tenant)
        if waiting >= max_waiting:
            senders = {*self.tenant_queued, *self.tenant_submitting}
            tenants = sum(1 for t in senders if self.sent(t) > 0) + (0 if own else 1)
            if own >= max_waiting / tenants or waiting >= 2 * max_waiting:
                raise QueueFull("the queue is full (every row taken, max_waiting requests waiting); try again later")
        limit = tenant_limit(self.config, req, "max_waiting")
        waits = own - self.row_room(req, own) if limit else 0  # of its own, those no free row takes
        if limit and waits >= limit:
            who = f"tenant {req.tenant!r}" if req.tenant else "the base model without a key"
            raise QueueFull(
                f"{who} has {waits} requests waiting for a row: its limit max_waiting_per_tenant is {limit}"
            )

    def row_room(self, req: GenerationRequest, own: int) -> int:
        """How many of ``req``'s tenant's ``own`` queued requests free rows will take, at the least:
        every other queued request (other tenants', and resumes) is assumed to take one first, and the
        tenant's ``max_running`` caps its rows. Its ``max_waiting`` counts only the rest, the requests
        that wait for a row: counting all, a tenant with a limit of 2 had its third request refused by
        an idle server (an outside review). Its preempted requests count against its ``max_running``
        (they take its rows back first). A free row counts as room even when the request's adapter has
        no device slot yet: a wait for a slot is not counted."""
        room = max(0, self.free_rows - (self.queued + self.submitting - own))
        running_limit = tenant_limit(self.config, req, "max_running")
        if running_limit:  # its preempted requests take its rows back first
            held = self.tenant_rows.get(req.tenant, 0) + self.tenant_resuming.get(req.tenant, 0)
            room = min(room, max(0, running_limit - held))
        return room
