"""The one table from domain exceptions to status codes, for both edges (docs/architecture.md, "The flow of
a request"). The codes are gRPC's (the canonical ones); the HTTP edge maps each to an HTTP status
(``HTTP_STATUS``), so an exception gets the same answer at either door."""

from __future__ import annotations

import grpc

from lorafleet_adapters.errors import (
    AdapterFormatError,
    AdapterIncompatible,
    AdapterNotFound,
    InvalidAdapterRef,
    StoreUnavailable,
)
from lorafleet_server.errors import (
    AdapterBusy,
    EngineTimeout,
    InvalidRequest,
    PermissionDenied,
    QueueFull,
    ShuttingDown,
    WrongAdapterKind,
)
from lorafleet_server.tenants.errors import AuthenticationError

STATUS_TABLE: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (AuthenticationError, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidAdapterRef, grpc.StatusCode.INVALID_ARGUMENT),
    (AdapterNotFound, grpc.StatusCode.NOT_FOUND),
    (AdapterIncompatible, grpc.StatusCode.FAILED_PRECONDITION),
    (AdapterFormatError, grpc.StatusCode.FAILED_PRECONDITION),
    (WrongAdapterKind, grpc.StatusCode.FAILED_PRECONDITION),
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (AdapterBusy, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ShuttingDown, grpc.StatusCode.UNAVAILABLE),
    (StoreUnavailable, grpc.StatusCode.UNAVAILABLE),
    (EngineTimeout, grpc.StatusCode.DEADLINE_EXCEEDED),
    (TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
)


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The status code of ``exc``; INTERNAL only for errors no row of the table names (bugs)."""
    for kind, code in STATUS_TABLE:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


def public_message(exc: BaseException, request_id: str) -> str:
    """What the caller is told of ``exc``: its own text, except where that describes this deployment
    rather than the request. An unreachable store's message names its endpoint, bucket, prefix and the
    credentials to check, for the operator's log; a tenant gets the request id to quote instead. So
    does a bug (INTERNAL: no row of the table names it), whose text (a torch message, an invariant) is
    the server's log's, as the HTTP edge answers it."""
    if status_for(exc) == grpc.StatusCode.INTERNAL:
        return f"internal error (request id {request_id})"
    if isinstance(exc, StoreUnavailable):
        return f"the adapter store is unavailable; retry later (request id {request_id})"
    return str(exc) or type(exc).__name__


# The HTTP edge (lorafleet_server.http) answers with the status of the same table: exception -> gRPC code
# (``status_for``) -> HTTP status here. 499 is the de-facto "client closed request".
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    # 400, not 412 (a conditional request's status): the adapter named cannot serve this call, which
    # OpenAI's clients take as a bad request (the openai SDK's BadRequestError); the code names why.
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def http_status_for(code: grpc.StatusCode) -> int:
    """The HTTP status of a gRPC code (500 for INTERNAL, UNKNOWN, DATA_LOSS and anything unlisted)."""
    return HTTP_STATUS.get(code, 500)
