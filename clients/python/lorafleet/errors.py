"""LoraFleetError and its subclasses: the client's only exceptions for failed RPCs."""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

import grpc

REQUEST_ID_HEADER = "x-request-id"


class LoraFleetError(Exception):
    """An RPC failed; ``code`` is the gRPC status, ``message`` the server's explanation."""

    def __init__(self, code: grpc.StatusCode, message: str, request_id: str | None = None) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        # The x-request-id the server returned in its trailing metadata, when it did.
        self.request_id = request_id


class InvalidArgumentError(LoraFleetError):
    """Bad request or bad adapter reference."""


class NotFoundError(LoraFleetError):
    """Unknown adapter."""


class UnauthenticatedError(LoraFleetError):
    """Missing or bad API key."""


class PermissionDeniedError(LoraFleetError):
    """Another tenant's adapter, or an admin call without the admin role."""


class ResourceExhaustedError(LoraFleetError):
    """Queue full, message too big, or quota."""


class FailedPreconditionError(LoraFleetError):
    """The adapter is incompatible with the base model."""


class UnavailableError(LoraFleetError):
    """The server is draining, shutting down or unreachable, or its store is unreachable."""


class DeadlineExceededError(LoraFleetError):
    """The deadline passed before the server answered."""


class RequestCancelledError(LoraFleetError):
    """The request was cancelled."""


_ERROR_CLASSES: dict[grpc.StatusCode, type[LoraFleetError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.CANCELLED: RequestCancelledError,
}


def make_error(code: grpc.StatusCode, message: str, request_id: str | None = None) -> LoraFleetError:
    """The LoraFleetError subclass for ``code`` (LoraFleetError itself for codes without one)."""
    return _ERROR_CLASSES.get(code, LoraFleetError)(code, message, request_id)


def from_rpc_error(error: grpc.RpcError) -> LoraFleetError:
    """Converts a failed call (sync or grpc.aio) into a LoraFleetError."""
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    message = error.details() if callable(getattr(error, "details", None)) else None
    request_id = None
    if callable(getattr(error, "trailing_metadata", None)):
        # Sync calls return (key, value) named tuples, grpc.aio calls a Metadata of pairs.
        pairs = cast("Iterable[tuple[str, str | bytes]]", error.trailing_metadata() or ())
        for key, value in pairs:
            if key == REQUEST_ID_HEADER:
                request_id = value if isinstance(value, str) else value.decode()
    return make_error(code, message or str(error) or code.name, request_id)
