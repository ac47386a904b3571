"""Errors in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with the HTTP status of
the one table: exception -> gRPC code (``edge/status.py``, ``status_for``) -> HTTP status (``http_status_for``)."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from lorafleet_adapters.errors import AdapterNotFound, InvalidAdapterRef
from lorafleet_server.edge.status import http_status_for, public_message, status_for
from lorafleet_server.errors import InvalidRequest
from lorafleet_server.http.routes import EMBEDDINGS

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


# The engine's names for the fields it refuses (``InvalidRequest.param``), as this API spells them; an
# embeddings request's text is its ``input``.
ENGINE_PARAMS = {"max_new_tokens": "max_tokens"}
EMBEDDINGS_PARAMS = {"prompt": "input", "messages": "input"}


def http_param(engine_param: str, rpc: str | None) -> str:
    """The HTTP name of the field the engine names ``engine_param``, for a request of route ``rpc``."""
    if rpc == EMBEDDINGS:
        return EMBEDDINGS_PARAMS.get(engine_param, engine_param)
    return ENGINE_PARAMS.get(engine_param, engine_param)


def describe(
    exc: BaseException, request_id: str, rpc: str | None = None
) -> tuple[grpc.StatusCode, int, dict[str, Any]]:
    """The gRPC code, HTTP status and OpenAI-shaped body of ``exc`` (``rpc``: the route, which names the
    refused field). A bug (no row of the table) is INTERNAL/500, logged with its traceback; its text is
    not sent (the request id is)."""
    code = status_for(exc)
    status = http_status_for(code)
    if code == grpc.StatusCode.INTERNAL:
        log.error("internal error in HTTP request %s", request_id, exc_info=exc)
        return code, status, error_body(f"internal error (request id {request_id})", "server_error", None, None)
    param: str | None = None
    err_code: str | None = None
    if isinstance(exc, InvalidParameter):
        param, err_code = exc.param or None, exc.code
    elif isinstance(exc, InvalidRequest) and exc.param:  # the engine's refusal of one field
        param = http_param(exc.param, rpc)
    elif isinstance(exc, AdapterNotFound | InvalidAdapterRef):
        param, err_code = "model", "model_not_found" if isinstance(exc, AdapterNotFound) else "invalid_model"
    message = public_message(exc, request_id)
    if isinstance(exc, InvalidRequest) and rpc != EMBEDDINGS:  # "plus max_new_tokens 1024 exceeds": this API's names
        # the engine's own wording only (a field name, then its value or "must"), not a caller's text
        # quoted in the message, such as a stop string or an adapter name (the second diff review)
        for engine_name, http_name in ENGINE_PARAMS.items():
            message = re.sub(rf"\b{engine_name}(?= [0-9]| must )", http_name, message)
    body = error_body(message, ERROR_TYPES.get(code, "server_error"), param, err_code or snake(type(exc).__name__))
    return code, status, body


# -- validation errors --------------------------------------------------------------------------------

# The names pydantic gives a union's members in an error's ``loc``: ``str``, ``int``, ``list[str]``,
# ``dict[str,any]``, ``function-after[...]``, ``constrained-str``, a model's class name.
_UNION_TAG = re.compile(r"str|int|float|bool|bytes|none|constrained-[a-z]+|[a-z]+(?:-[a-z]+)*\[.*\]|[A-Z]\w*")


def _is_tag(part: object) -> bool:
    return isinstance(part, str) and _UNION_TAG.fullmatch(part) is not None


def _wrong_type(error: Mapping[str, Any], loc: tuple[Any, ...], member_at: int) -> bool:
    """An error at the root of a union member (named at ``loc[member_at]``): the input is not of the
    member's type at all."""
    kind = str(error.get("type", ""))
    wrong = kind.endswith(("_type", "_parsing")) or kind in ("is_instance_of", "none_required")
    return wrong and len(loc) == member_at + 1


@dataclass(frozen=True)
class BodyError:
    """The one error a 400 reports of a body that does not fit the schema."""

    kind: str  # pydantic's error type
    message: str
    loc: tuple[Any, ...]  # within the body, union members' names taken out

    @property
    def param(self) -> str | None:
        return ".".join(str(p) for p in self.loc) or None


def body_error(errors: Sequence[Mapping[str, Any]]) -> BodyError:
    """The error to report among pydantic's ``errors`` (FastAPI's: ``loc`` starts with "body").

    The first bad parameter's. Where that is a union (``prompt: str | list[str]``) pydantic reports
    every member, and the first is rarely the point: a list that is too long read "prompt.str: Input
    should be a valid string". Here the member the input is of is followed (the first whose errors are
    not all "not of this type" at its root), and members' names are taken out of ``loc``; an input of
    none of the members' types gets their messages together ("a valid string or a valid list")."""
    if not errors:
        return BodyError("", "invalid request", ())
    locs = [tuple(e.get("loc", ())) for e in errors]
    locs = [loc[1:] if loc[:1] == ("body",) else loc for loc in locs]
    group = list(range(len(errors)))  # the errors on the path followed so far
    members_at: list[int] = []
    pos = 0
    while pos < len(locs[group[0]]):
        branches: dict[Any, list[int]] = {}
        for i in group:
            if len(locs[i]) > pos:
                branches.setdefault(locs[i][pos], []).append(i)
        if len(branches) < 2 or not all(_is_tag(name) for name in branches):  # a field, an index
            group = branches[locs[group[0]][pos]]
            pos += 1
            continue
        members_at.append(pos)  # a union: follow the member the input is of
        fitting = [b for b in branches.values() if not all(_wrong_type(errors[i], locs[i], pos) for i in b)]
        if not fitting:  # of none of the members' types
            said = list(dict.fromkeys(str(errors[b[0]].get("msg", "")) for b in branches.values()))
            message = said[0] + "".join(f" or {m.removeprefix('Input should be ')}" for m in said[1:])
            return BodyError(str(errors[group[0]].get("type", "")), message, _unioned(locs[group[0]][:pos], members_at))
        group = fitting[0]
        pos += 1
    chosen = group[0]
    message = str(errors[chosen].get("msg", "invalid request"))
    return BodyError(str(errors[chosen].get("type", "")), message, _unioned(locs[chosen], members_at))


def _unioned(loc: tuple[Any, ...], members_at: list[int]) -> tuple[Any, ...]:
    """``loc`` without the union members' names (at ``members_at``)."""
    return tuple(part for n, part in enumerate(loc) if n not in members_at)
