"""Errors in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with the HTTP status of
the one table: exception -> gRPC code (``grpc/status.py``, ``status_for``) -> HTTP status (``http_status_for``)."""

from __future__ import annotations

import logging
import re
from typing import Any

import grpc

from lorafleet_adapters.errors import AdapterNotFound, InvalidAdapterRef
from lorafleet_server.errors import InvalidRequest
from lorafleet_server.grpc.status import http_status_for, public_message, status_for

log = logging.getLogger(__name__)

ERROR_TYPES: dict[grpc.StatusCode, str] = {
    grpc.StatusCode.INVALID_ARGUMENT: "invalid_request_error",
    grpc.StatusCode.FAILED_PRECONDITION: "invalid_request_error",
    grpc.StatusCode.UNAUTHENTICATED: "authentication_error",
    grpc.StatusCode.PERMISSION_DENIED: "permission_error",
    grpc.StatusCode.NOT_FOUND: "not_found_error",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "rate_limit_error",
    grpc.StatusCode.UNAVAILABLE: "service_unavailable_error",
    grpc.StatusCode.DEADLINE_EXCEEDED: "timeout_error",
    grpc.StatusCode.CANCELLED: "cancelled_error",
}


class InvalidParameter(InvalidRequest):
    """A request parameter the HTTP edge refuses (unknown, unsupported, malformed); ``param`` names it.
    An ``InvalidRequest``, so the one table maps it (INVALID_ARGUMENT, 400)."""

    def __init__(self, param: str, message: str, code: str = "invalid_parameter") -> None:
        super().__init__(message)
        self.param = param
        self.code = code


def snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def error_body(message: str, kind: str, param: str | None, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def describe(exc: BaseException, request_id: str) -> tuple[grpc.StatusCode, int, dict[str, Any]]:
    """The gRPC code, HTTP status and OpenAI-shaped body of ``exc``. A bug (no row of the table) is
    INTERNAL/500, logged with its traceback; its text is not sent (the request id is)."""
    code = status_for(exc)
    status = http_status_for(code)
    if code == grpc.StatusCode.INTERNAL:
        log.error("internal error in HTTP request %s", request_id, exc_info=exc)
        return code, status, error_body(f"internal error (request id {request_id})", "server_error", None, None)
    param: str | None = None
    err_code: str | None = None
    if isinstance(exc, InvalidParameter):
        param, err_code = exc.param or None, exc.code
    elif isinstance(exc, AdapterNotFound | InvalidAdapterRef):
        param, err_code = "model", "model_not_found" if isinstance(exc, AdapterNotFound) else "invalid_model"
    message = public_message(exc, request_id)
    body = error_body(message, ERROR_TYPES.get(code, "server_error"), param, err_code or snake(type(exc).__name__))
    return code, status, body
