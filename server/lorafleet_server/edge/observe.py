"""Per-call accounting at both edges (a gRPC RPC, an HTTP route): status-code counters, latency, one
log line per request.

Every line names who called (``key_id`` and ``tenant`` of the API key; on a server without keys the
tenant is the adapter's). Admin RPCs (those only the ``admin`` role may call, ``grpc.auth.ADMIN_RPCS``)
also write one line to the audit logger, whatever their outcome, refused calls included.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Protocol

import grpc

from lorafleet_adapters.ref import MAX_REF_CHARS
from lorafleet_server.engine.stream import Outcome, Outcomes
from lorafleet_server.engine.types import Principal, Summary
from lorafleet_server.logs import REQUEST_LOGGER
from lorafleet_server.metrics import Metrics

AUDIT_LOGGER = "lorafleet.audit"
request_log = logging.getLogger(REQUEST_LOGGER)
audit_log = logging.getLogger(AUDIT_LOGGER)
DEADLINE_SLACK_SECONDS = 0.05


def loggable(text: str, limit: int = MAX_REF_CHARS) -> str:
    """A caller's string as the request log may carry it: at most ``limit`` characters (the log's
    formatters escape what is in it: logs.field_text, JSON)."""
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} chars)"


class HasDeadline(Protocol):
    """What ``CallObserver.call`` reads of a call's context: the seconds left before the caller's deadline
    (None: no deadline). A ``grpc.aio.ServicerContext``; the HTTP edge passes its own (no deadlines)."""

    def time_remaining(self) -> float | None: ...


@dataclass
class CallRecord:
    rpc: str
    request_id: str
    adapter: str  # as requested ("" = base)
    started: float
    code: grpc.StatusCode = grpc.StatusCode.OK
    summary: Summary | None = None
    error: str = ""
    tokens: int = 0  # generated so far: what a cut call logs, since it never gets a summary
    deadline: float | None = None  # time.monotonic() of the caller's deadline, if it set one
    principal: Principal | None = None  # who called: None on a server without keys, or before authentication
    key_id: str = ""  # the presented key's id when it was refused (an id is no secret)
    outcome: Outcome = field(default_factory=Outcome)  # its engine request's end, for a call that left first
    outcomes: Outcomes | None = None  # instead, for a call of several engine requests (embeddings' inputs)

    @property
    def caller_key_id(self) -> str:
        return self.principal.key_id if self.principal is not None else self.key_id

    @property
    def tenant(self) -> str:
        """The caller's tenant from its key; without keys, the tenant of the adapter it asked for."""
        if self.principal is not None:
            return self.principal.tenant
        return self.adapter.split("/", 1)[0] if self.adapter else ""

    def expired(self) -> bool:
        """Whether the caller's deadline has passed. gRPC cancels the handler a moment after it passes,
        and ``time_remaining()`` at that moment is not reliably <= 0, so the deadline is kept from the
        start; a cancellation within ``DEADLINE_SLACK_SECONDS`` of it counts as the deadline's."""
        return self.deadline is not None and time.monotonic() >= self.deadline - DEADLINE_SLACK_SECONDS


class CallObserver:
    """Counts, times and logs every call of our services; ``audited``: the RPC names that also get an
    audit line (the admin-only ones); ``replica_id``: this replica's name, which every response carries
    (grpc/affinity.py, the HTTP edge's app.py; "" sends none)."""

    def __init__(self, metrics: Metrics, audited: Collection[str] = (), replica_id: str = "") -> None:
        self._metrics = metrics
        self._audited = frozenset(audited)
        self.replica_id = replica_id

    @asynccontextmanager
    async def call(
        self,
        rpc: str,
        context: HasDeadline,
        request_id: str,
        adapter: str = "",
        principal: Principal | None = None,
        key_id: str = "",
    ) -> AsyncIterator[CallRecord]:
        started = time.monotonic()
        remaining = context.time_remaining()
        deadline = None if remaining is None else started + remaining
        record = CallRecord(
            rpc=rpc,
            request_id=request_id,
            adapter=loggable(adapter),
            started=started,
            deadline=deadline,
            principal=principal,
            key_id=key_id,
        )
        try:
            yield record
            if record.code == grpc.StatusCode.OK and record.deadline is not None and time.monotonic() > record.deadline:
                record.code = grpc.StatusCode.DEADLINE_EXCEEDED  # finished too late: the caller has given up
        except (asyncio.CancelledError, GeneratorExit):
            # GeneratorExit: a streaming handler is an async generator, and gRPC closes it at its `yield`
            # when the call ends (deadline, cancel) while a response is being sent, not at an await.
            record.code = grpc.StatusCode.DEADLINE_EXCEEDED if record.expired() else grpc.StatusCode.CANCELLED
            raise
        except BaseException as exc:
            if record.code == grpc.StatusCode.OK:  # aborts set their code first; anything else is a bug
                record.code = grpc.StatusCode.INTERNAL
                record.error = record.error or repr(exc)  # the log line says what broke
            raise
        finally:
            self._finish(record)

    def _finish(self, r: CallRecord) -> None:
        seconds = time.monotonic() - r.started
        self._metrics.observe_rpc(r.rpc, r.code.name, seconds)
        if r.rpc in self._audited:
            self._audit(r)
        if r.summary is None and r.code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED):
            # The engine's summary of a call its client left comes a step later: its line waits for it
            # (it had no adapter version, no prompt tokens, no finish reason: an outside review).
            ending = r.outcomes if r.outcomes is not None else r.outcome
            ended, summary = ending.then(self._log_on(asyncio.get_running_loop(), r, seconds))
            if not ended:
                return
            r.summary = summary
        self._log(r, r.summary, seconds)

    def _log_on(
        self, loop: asyncio.AbstractEventLoop, r: CallRecord, seconds: float
    ) -> Callable[[Summary | None], None]:
        """What writes ``r``'s line once the engine's summary comes: on ``loop``, not on the engine
        thread that delivers it, where formatting and a slow stderr would stall every request's step
        (the second diff review); here when the loop no longer runs (the server stopped: a callback
        handed to a stopped loop never ran, and the line was lost)."""

        def log(summary: Summary | None) -> None:
            if loop.is_running():
                try:
                    loop.call_soon_threadsafe(self._log, r, summary, seconds)
                    return
                except RuntimeError:  # closed meanwhile
                    pass
            self._log(r, summary, seconds)

        return log

    def _log(self, r: CallRecord, s: Summary | None, seconds: float) -> None:
        fields = {
            "request_id": r.request_id,
            "rpc": r.rpc,
            "key_id": r.caller_key_id,
            "tenant": r.tenant,
            "adapter": s.adapter if s is not None else r.adapter,
            "status": r.code.name,
            "prompt_tokens": s.prompt_tokens if s is not None else 0,
            "generated_tokens": s.generated_tokens if s is not None else r.tokens,
            "finish_reason": s.finish_reason.value if s is not None else "",
            "queue_s": round(s.queue_seconds, 4) if s is not None else None,
            "ttft_s": round(s.ttft_seconds, 4) if s is not None and s.ttft_seconds is not None else None,
            "duration_s": round(seconds, 4),
        }
        if r.error:
            fields["error"] = r.error
        request_log.info("request finished", extra={"fields": fields})

    def _audit(self, r: CallRecord) -> None:
        fields = {
            "request_id": r.request_id,
            "key_id": r.caller_key_id,
            "tenant": r.principal.tenant if r.principal is not None else "",  # the caller's, never the target's
            "role": r.principal.role if r.principal is not None else "",
            "rpc": r.rpc,
            "adapter": r.adapter,
            "status": r.code.name,
        }
        if r.error:
            fields["error"] = r.error
        audit_log.info("admin call", extra={"fields": fields})
