"""One wrapper for every RPC at the gRPC edge: request id, accounting (``CallObserver``), the status table.

A servicer method decorated with ``unary_rpc`` or ``stream_rpc`` takes one more argument than gRPC passes,
the ``CallRecord`` of the call, and contains only its own work::

    @unary_rpc("GetAdapter", adapter=True)
    async def GetAdapter(self, request, context, record) -> GetAdapterResponse: ...

The wrapper derives the request id (``request_id_of``), optionally sends it back as ``x-request-id`` in
the trailing or initial metadata, opens ``CallObserver.call`` (status-code counter, latency, one
request-log line), and ends the RPC with the status of any domain error (``abort_with``, the one table
in status.py). The servicer provides its ``CallObserver`` as ``calls``.

**Affinity** (affinity.py) is applied here, the one place that knows both the metadata and the parsed
request: an ``adapter=True`` RPC whose ``x-lorafleet-adapter`` header disagrees with ``request.adapter``
is refused (INVALID_ARGUMENT), and every response names the replica (``x-lorafleet-replica``, the
``CallObserver``'s ``replica_id``) in its trailing metadata and, with its first response, its initial
metadata.

**Who is calling.** The authentication interceptor (auth.py) calls each wrapped method with one more
keyword than gRPC passes, ``principal`` (the ``Principal`` of the caller's API key, None on a server
without keys); ``DecodeGuard`` passes it through. The wrapper puts it on the ``CallRecord``, so the
handler reads ``record.principal`` and the request log names the key and its tenant. A keyword from the
interceptor, rather than a context variable, so the caller is an explicit argument all the way.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Literal, Protocol, TypeAlias, TypeVar, cast, overload

import grpc

from lorafleet_server.edge.observe import CallObserver, CallRecord
from lorafleet_server.edge.status import public_message, status_for
from lorafleet_server.engine.types import Principal
from lorafleet_server.grpc.affinity import check_adapter_header, replica_metadata

log = logging.getLogger(__name__)
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

SendRequestId: TypeAlias = Literal["trailing", "stream"] | None
"""Where the wrapper returns ``x-request-id``: in the trailing metadata ("trailing"); there and in the
initial metadata sent with the first response, for a stream's reader to learn it early ("stream"); or
not at all."""


class Observed(Protocol):
    """A servicer whose RPCs are wrapped: it exposes the shared ``CallObserver``."""

    @property
    def calls(self) -> CallObserver: ...


class HasAdapter(Protocol):
    """A request naming an adapter reference (as requested; "" is the base model)."""

    @property
    def adapter(self) -> str: ...


S = TypeVar("S", bound=Observed)
Req = TypeVar("Req")
AdapterReq = TypeVar("AdapterReq", bound=HasAdapter)
Resp = TypeVar("Resp")

UnaryHandler: TypeAlias = Callable[[S, Req, grpc.aio.ServicerContext, CallRecord], Awaitable[Resp]]
StreamHandler: TypeAlias = Callable[[S, Req, grpc.aio.ServicerContext, CallRecord], AsyncGenerator[Resp, None]]
# What gRPC calls: (servicer, request, context), plus ``principal=`` from the authentication interceptor.
# A Callable type cannot say "one optional keyword", so the arguments are left open; the handlers above
# are what the decorators check.
UnaryMethod: TypeAlias = Callable[..., Awaitable[Resp]]
StreamMethod: TypeAlias = Callable[..., AsyncIterator[Resp]]


def request_id_of(context: grpc.aio.ServicerContext) -> str:
    """The caller's ``x-request-id`` when it is a sane token, else a fresh one."""
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and isinstance(value, str) and _REQUEST_ID.fullmatch(value):
            return value
    return uuid.uuid4().hex


async def abort_with(context: grpc.aio.ServicerContext, exc: Exception, record: CallRecord) -> None:
    """Map a domain error to its status (the one table in status.py) and end the RPC with it."""
    code = status_for(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.error("internal error in %s %s", record.rpc, record.request_id, exc_info=exc)
    record.code = code
    record.error = str(exc) or type(exc).__name__  # the request log's line: the whole text
    await context.abort(code, public_message(exc, record.request_id))


def _begin(context: grpc.aio.ServicerContext, send_request_id: SendRequestId, replica_id: str) -> str:
    """The call's request id and the replica's id (affinity.py), set in the trailing metadata before the
    call is observed; ``_send_initial`` sends the initial metadata with the first response."""
    rid = request_id_of(context)
    replica = replica_metadata(replica_id)
    trailing = (("x-request-id", rid),) if send_request_id is not None else ()
    if trailing or replica:
        context.set_trailing_metadata((*trailing, *replica))
    return rid


async def _send_initial(
    context: grpc.aio.ServicerContext, send_request_id: SendRequestId, replica_id: str, rid: str
) -> None:
    """The initial metadata (the replica's id; a stream's request id), sent with the first response only.

    A call refused before it (a draining or stopping replica, a full queue, an unreachable store; a
    stream queued and then cut by the drain) is then a trailers-only answer, which a proxy such as
    Envoy retries on another replica for UNAVAILABLE; a header sent at once made a stream's refusal
    final (its client saw the UNAVAILABLE)."""
    initial = (("x-request-id", rid),) if send_request_id == "stream" else ()
    if initial or replica_id:
        await context.send_initial_metadata((*initial, *replica_metadata(replica_id)))


def _check_routing(context: grpc.aio.ServicerContext, request: object, adapter: bool) -> None:
    """An adapter RPC whose routing header disagrees with its body is refused (affinity.py)."""
    if adapter:
        check_adapter_header(context, _adapter_of(request, adapter))


def _adapter_of(request: object, adapter: bool) -> str:
    # The overloads of unary_rpc and stream_rpc let adapter=True through only for a HasAdapter request.
    return cast(HasAdapter, request).adapter if adapter else ""


@overload
def unary_rpc(
    name: str, *, adapter: Literal[False] = ..., send_request_id: SendRequestId = ...
) -> Callable[[UnaryHandler[S, Req, Resp]], UnaryMethod[Resp]]: ...
@overload
def unary_rpc(
    name: str, *, adapter: Literal[True], send_request_id: SendRequestId = ...
) -> Callable[[UnaryHandler[S, AdapterReq, Resp]], UnaryMethod[Resp]]: ...
def unary_rpc(
    name: str, *, adapter: bool = False, send_request_id: SendRequestId = None
) -> Callable[[UnaryHandler[S, Req, Resp]], UnaryMethod[Resp]]:
    """Wrap a unary-unary handler as the RPC ``name``; ``adapter``: record ``request.adapter``."""

    def wrap(handler: UnaryHandler[S, Req, Resp]) -> UnaryMethod[Resp]:
        @functools.wraps(handler)
        async def method(
            self: S, request: Req, context: grpc.aio.ServicerContext, principal: Principal | None = None
        ) -> Resp:
            replica_id = self.calls.replica_id
            rid = _begin(context, send_request_id, replica_id)
            async with self.calls.call(name, context, rid, _adapter_of(request, adapter), principal) as record:
                try:
                    _check_routing(context, request, adapter)
                    response = await handler(self, request, context, record)
                    await _send_initial(context, send_request_id, replica_id, rid)
                    return response
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    await abort_with(context, exc, record)
                    raise AssertionError("unreachable") from exc  # abort raises

        method.rpc_name = name  # type: ignore[attr-defined]  # rpc_names reads it
        return method

    return wrap


def rpc_names(servicer: object) -> list[str]:
    """The RPC names (``unary_rpc``'s and ``stream_rpc``'s) a servicer's methods are counted under."""
    return [str(m.rpc_name) for m in vars(type(servicer)).values() if hasattr(m, "rpc_name")]


@overload
def stream_rpc(
    name: str, *, adapter: Literal[False] = ..., send_request_id: SendRequestId = ...
) -> Callable[[StreamHandler[S, Req, Resp]], StreamMethod[Resp]]: ...
@overload
def stream_rpc(
    name: str, *, adapter: Literal[True], send_request_id: SendRequestId = ...
) -> Callable[[StreamHandler[S, AdapterReq, Resp]], StreamMethod[Resp]]: ...
def stream_rpc(
    name: str, *, adapter: bool = False, send_request_id: SendRequestId = None
) -> Callable[[StreamHandler[S, Req, Resp]], StreamMethod[Resp]]:
    """Wrap a unary-stream handler (an async generator) as the RPC ``name``; see ``unary_rpc``."""

    def wrap(handler: StreamHandler[S, Req, Resp]) -> StreamMethod[Resp]:
        @functools.wraps(handler)
        async def method(
            self: S, request: Req, context: grpc.aio.ServicerContext, principal: Principal | None = None
        ) -> AsyncIterator[Resp]:
            replica_id = self.calls.replica_id
            rid = _begin(context, send_request_id, replica_id)
            async with self.calls.call(name, context, rid, _adapter_of(request, adapter), principal) as record:
                try:
                    _check_routing(context, request, adapter)
                    first = True
                    async with aclosing(handler(self, request, context, record)) as responses:
                        async for response in responses:
                            if first:
                                await _send_initial(context, send_request_id, replica_id, rid)
                                first = False
                            yield response
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    await abort_with(context, exc, record)

        method.rpc_name = name  # type: ignore[attr-defined]
        return method

    return wrap


class DecodeGuard(grpc.aio.ServerInterceptor):
    """Malformed request bytes get INVALID_ARGUMENT, one log line and a count under their RPC.

    gRPC deserializes a request before any handler runs; invalid UTF-8 in a string field or garbage
    bytes then raise inside the generated parser, and the caller would see UNKNOWN with the exception's
    class while the server logged a traceback and counted nothing. For our services this interceptor
    hands the handler the raw bytes instead and parses them itself, inside the usual accounting.
    Health and reflection are left as they are.

    It runs inside the authentication interceptor (auth.py), so bytes from a caller that is refused are
    never parsed; the ``principal`` that interceptor passes goes on to the servicer method.
    """

    def __init__(self, calls: CallObserver, services: tuple[str, ...]) -> None:
        self._calls = calls
        self._prefixes = tuple(f"/{name}/" for name in services)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = str(handler_call_details.method)
        if handler is None or handler.request_deserializer is None or not method.startswith(self._prefixes):
            return handler
        rpc = method.rsplit("/", 1)[-1]
        parse = handler.request_deserializer
        if handler.unary_unary is not None:
            unary = handler.unary_unary

            async def unary_unary(
                raw: bytes, context: grpc.aio.ServicerContext, principal: Principal | None = None
            ) -> object:
                request = await self._parse(rpc, parse, raw, context, principal)
                return await unary(request, context, principal=principal)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, request_deserializer=None, response_serializer=handler.response_serializer
            )
        if handler.unary_stream is not None:
            stream = handler.unary_stream

            async def unary_stream(
                raw: bytes, context: grpc.aio.ServicerContext, principal: Principal | None = None
            ) -> AsyncIterator[object]:
                request = await self._parse(rpc, parse, raw, context, principal)
                async for response in stream(request, context, principal=principal):
                    yield response

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, request_deserializer=None, response_serializer=handler.response_serializer
            )
        return handler  # no client-streaming RPCs in our services

    async def _parse(
        self,
        rpc: str,
        parse: Callable[[bytes], object],
        raw: bytes,
        context: grpc.aio.ServicerContext,
        principal: Principal | None,
    ) -> object:
        try:
            return parse(raw)
        except Exception as exc:  # DecodeError, UnicodeDecodeError...: the bytes are not a valid message
            reason = f"malformed {rpc} request: {type(exc).__name__}: {exc}"[:300]
        async with self._calls.call(rpc, context, request_id_of(context), principal=principal) as record:
            record.code = grpc.StatusCode.INVALID_ARGUMENT
            record.error = reason
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, reason)
        raise AssertionError("unreachable")  # abort raises
