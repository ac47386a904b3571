"""LoraFleetError and its subclasses: the client's only exceptions for failed RPCs."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import cast

import grpc

REQUEST_ID_HEADER = "x-request-id"
REPLICA_HEADER = "x-lorafleet-replica"


class LoraFleetError(Exception):
    """An RPC failed; ``code`` is the gRPC status, ``message`` the server's explanation."""

    def __init__(
        self, code: grpc.StatusCode, message: str, request_id: str | None = None, replica: str | None = None
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        # The x-request-id the server returned (trailing metadata; a stream's is in its initial metadata).
        self.request_id = request_id
        # The replica that failed the call (x-lorafleet-replica), None when no replica answered (a proxy's
        # or the channel's own status): in a fleet, which one to look at.
        self.replica = replica

    def __reduce__(self) -> tuple[type[LoraFleetError], tuple[grpc.StatusCode, str, str | None, str | None]]:
        # Pickle (process pools, multiprocessing) and copy rebuild from the constructor's arguments;
        # Exception's default passes the formatted text as the only argument, which __init__ refuses.
        return type(self), (self.code, self.message, self.request_id, self.replica)


class InvalidArgumentError(LoraFleetError):
    """Bad request or bad adapter reference."""


class NotFoundError(LoraFleetError):
    """Unknown adapter."""


class UnauthenticatedError(LoraFleetError):
    """Missing or bad API key."""


class PermissionDeniedError(LoraFleetError):
    """A call the key's role may not make (an admin call with a tenant key). Another tenant's adapter
    is NotFoundError: the server does not reveal that it exists."""


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


def make_error(
    code: grpc.StatusCode, message: str, request_id: str | None = None, replica: str | None = None
) -> LoraFleetError:
    """The LoraFleetError subclass for ``code`` (LoraFleetError itself for codes without one)."""
    return _ERROR_CLASSES.get(code, LoraFleetError)(code, message, request_id, replica)


def task_cancelled() -> bool:
    """Whether the running asyncio task is being cancelled (``task.cancel()``, ``asyncio.timeout``, a
    TaskGroup): a CancelledError of a grpc.aio call is then that cancellation and must propagate."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def channel_closed() -> RequestCancelledError:
    """What a grpc.aio call raises as CancelledError when its client was closed under it (no one
    cancelled the task waiting on it)."""
    return RequestCancelledError(grpc.StatusCode.CANCELLED, "the client was closed while the call was in flight")


def client_closed() -> RequestCancelledError:
    """What a call on a client after its close() raises (grpc's own is a ValueError, or an aio
    UsageError, neither a LoraFleetError)."""
    return RequestCancelledError(grpc.StatusCode.CANCELLED, "the client is closed; make a new one to call again")


def from_rpc_error(error: grpc.RpcError) -> LoraFleetError:
    """Converts a failed call (sync or grpc.aio) into a LoraFleetError. The request id is looked for in
    the trailing metadata (unary calls), then in the initial metadata (a stream sends it first)."""
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    message = error.details() if callable(getattr(error, "details", None)) else None
    # Without details (a proxy's status, a dropped connection) the code alone, not the error's repr.
    return make_error(
        code, message or code.name, _error_header(error, REQUEST_ID_HEADER), _error_header(error, REPLICA_HEADER)
    )


def _error_header(error: grpc.RpcError, name: str) -> str | None:
    """``name`` from the error's trailing metadata (unary calls), else its initial metadata (a stream
    sends it first); None when neither has it."""
    for which in ("trailing_metadata", "initial_metadata"):
        read = getattr(error, which, None)
        # Sync calls return (key, value) named tuples, grpc.aio calls a Metadata of pairs.
        if callable(read) and (value := header_of(cast("Iterable[tuple[str, str | bytes]]", read() or ()), name)):
            return value
    return None


def header_of(metadata: Iterable[tuple[str, str | bytes]] | None, name: str) -> str:
    """The value of ``name`` in a call's metadata ("" when the server sent none)."""
    for key, value in metadata or ():
        if key == name:
            return value if isinstance(value, str) else value.decode("utf-8", "replace")
    return ""
