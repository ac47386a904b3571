"""UsageService: per-tenant usage for billing, read from the engine's meter (admin role)."""

from __future__ import annotations

import asyncio
import time

import grpc

from lorafleet_adapters.ref import check_ident
from lorafleet_proto.v1 import usage_pb2, usage_pb2_grpc
from lorafleet_server.edge.observe import CallObserver, CallRecord
from lorafleet_server.engine.usage import UsageMeter
from lorafleet_server.errors import InvalidRequest
from lorafleet_server.grpc.rpc import unary_rpc

MAX_UNIX_SECONDS = 253_402_300_799  # 9999-12-31T23:59:59Z


class UsageServicer(usage_pb2_grpc.UsageServiceServicer):
    def __init__(self, meter: UsageMeter, calls: CallObserver) -> None:
        self._meter = meter
        self.calls = calls

    @unary_rpc("GetUsage")
    async def GetUsage(
        self, request: usage_pb2.GetUsageRequest, context: grpc.aio.ServicerContext, record: CallRecord
    ) -> usage_pb2.GetUsageResponse:
        start = request.start_unix_seconds
        # "Now" rounded up to the next second: truncated, a request that finished in the first second of
        # a minute fell outside [start, end) (that minute starts at `end`) when read in the same second.
        end = request.end_unix_seconds or int(time.time()) + 1
        if start < 0 or start >= end:
            raise InvalidRequest(f"the window must have 0 <= start < end, got start {start} and end {end}")
        if end > MAX_UNIX_SECONDS:  # the window is rounded out to whole minutes, past int64 near its top
            raise InvalidRequest(f"end must be at most {MAX_UNIX_SECONDS} (the year 9999), got {end}")
        if request.tenant:
            check_ident(request.tenant, "tenant")
        # Off the event loop: a week-long window sums millions of buckets (tens of ms), and the loop
        # streams every client's tokens meanwhile.
        rows = await asyncio.to_thread(self._meter.report, start, end, request.tenant or None)
        first, last = UsageMeter.window(start, end)
        return usage_pb2.GetUsageResponse(
            rows=[
                usage_pb2.UsageRow(
                    tenant=r.tenant,
                    adapter=r.adapter,
                    requests=r.requests,
                    prompt_tokens=r.prompt_tokens,
                    generated_tokens=r.generated_tokens,
                )
                for r in rows
            ],
            start_unix_seconds=first,
            end_unix_seconds=last,
        )
