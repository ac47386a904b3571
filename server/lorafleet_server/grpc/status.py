"""The one table from domain exceptions to gRPC status codes (docs/architecture.md, "The flow of a request")."""

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
