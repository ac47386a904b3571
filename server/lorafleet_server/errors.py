"""Domain exceptions of the serving layers (the gRPC edge maps them to status codes in one table)."""

from __future__ import annotations


class ServingError(Exception):
    """Base of the engine's domain errors."""


class InvalidRequest(ServingError):
    """The request is malformed or outside the server's limits (INVALID_ARGUMENT).

    ``param``: the request field at fault, in the engine's names (``stop``, ``max_new_tokens``,
    ``prompt``, ``messages``...), when one is; the HTTP edge reports it in the error's ``param``."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ContextLengthExceeded(InvalidRequest):
    """The prompt plus the tokens asked for do not fit the context (INVALID_ARGUMENT; over HTTP the
    code ``context_length_exceeded``, as OpenAI's)."""


class WrongAdapterKind(ServingError):
    """The adapter's kind does not fit the RPC: a head for Generate/Embed, a LoRA or prompt adapter for
    Classify (FAILED_PRECONDITION; the message names the kind)."""


class QueueFull(ServingError):
    """Too many requests are waiting (RESOURCE_EXHAUSTED)."""


class ShuttingDown(ServingError):
    """The engine is draining or stopped (UNAVAILABLE)."""


# A request the engine cut (CANCELLED summary) where the caller waited for one answer (HTTP, Embed, Classify).
STOPPED_BY_SERVER = "the request was stopped by the server (shutting down); retry elsewhere"


class AdapterBusy(ServingError):
    """Every device slot is leased or pinned, so the adapter cannot be loaded now (RESOURCE_EXHAUSTED)."""


class EngineTimeout(ServingError):
    """The engine thread did not run an admin call in time (DEADLINE_EXCEEDED).

    A call already running when the wait ended still completes, so its effect may happen later.
    """


class PermissionDenied(ServingError):
    """The caller is authenticated but its role may not do this (PERMISSION_DENIED).

    Only for what a role may never do (a tenant key on an admin RPC). Another tenant's adapter is not
    a permission problem to the caller: it reads as not found, so its existence does not leak.
    """


class StartupError(ServingError):
    """The server must not start as configured (a TLS file that cannot be read, a keys file that does
    not load, no keys on a non-loopback address). ``lorafleet serve`` prints it and exits non-zero."""


class ModelLoadError(RuntimeError):
    """The base model cannot be served (missing files, unsupported architecture or backend). Defined
    here, beside the other domain errors, so the CLI can report it without importing the model code."""
