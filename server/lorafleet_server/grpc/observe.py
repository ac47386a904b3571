"""Per-RPC accounting at the gRPC edge: status-code counters, latency, one log line per request."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc

from lorafleet_server.engine.types import Summary
from lorafleet_server.logs import REQUEST_LOGGER
from lorafleet_server.metrics import Metrics

request_log = logging.getLogger(REQUEST_LOGGER)
DEADLINE_SLACK_SECONDS = 0.05


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

    def expired(self) -> bool:
        """Whether the caller's deadline has passed. gRPC cancels the handler a moment after it passes,
        and ``time_remaining()`` at that moment is not reliably <= 0, so the deadline is kept from the
        start; a cancellation within ``DEADLINE_SLACK_SECONDS`` of it counts as the deadline's."""
        return self.deadline is not None and time.monotonic() >= self.deadline - DEADLINE_SLACK_SECONDS


class CallObserver:
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    @asynccontextmanager
    async def call(
        self, rpc: str, context: grpc.aio.ServicerContext, request_id: str, adapter: str = ""
    ) -> AsyncIterator[CallRecord]:
        started = time.monotonic()
        remaining = context.time_remaining()
        deadline = None if remaining is None else started + remaining
        record = CallRecord(rpc=rpc, request_id=request_id, adapter=adapter, started=started, deadline=deadline)
        try:
            yield record
            if record.code == grpc.StatusCode.OK and record.deadline is not None and time.monotonic() > record.deadline:
                record.code = grpc.StatusCode.DEADLINE_EXCEEDED  # finished too late: the caller has given up
        except asyncio.CancelledError:
            record.code = grpc.StatusCode.DEADLINE_EXCEEDED if record.expired() else grpc.StatusCode.CANCELLED
            raise
        except BaseException:
            if record.code == grpc.StatusCode.OK:  # aborts set their code first; anything else is a bug
                record.code = grpc.StatusCode.INTERNAL
            raise
        finally:
            self._finish(record)

    def _finish(self, r: CallRecord) -> None:
        seconds = time.monotonic() - r.started
        self._metrics.observe_rpc(r.rpc, r.code.name, seconds)
        s = r.summary
        fields = {
            "request_id": r.request_id,
            "rpc": r.rpc,
            "tenant": r.adapter.split("/", 1)[0] if r.adapter else "",
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
