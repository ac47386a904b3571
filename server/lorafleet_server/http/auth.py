"""API keys at the HTTP edge: ``Authorization: Bearer <key>``, the same keys, roles and isolation as gRPC.

``HttpAuth`` is a pure ASGI middleware in front of the FastAPI app, so a caller without a usable key is
refused before its body is read or parsed (as gRPC refuses before ``DecodeGuard`` parses). It reads the
one ``authorization`` header with ``tenants.access.bearer_key``, checks it with the server's keys (the
``ServerKeys`` the gRPC edge keeps current, one watcher for both), applies ``ROUTE_ROLES`` (deny by
default) and puts the caller's ``Principal`` on ``scope["state"]["principal"]`` (None while no keys are
enforced). A refusal is counted and logged like any call, under its route's ``rpc`` label.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from lorafleet_server.edge.observe import CallObserver
from lorafleet_server.edge.principal import principal_from
from lorafleet_server.engine.types import Principal
from lorafleet_server.errors import PermissionDenied
from lorafleet_server.http.errors import describe
from lorafleet_server.http.routes import GET_MODEL, ROUTES, NoDeadline, request_id_of, rpc_of
from lorafleet_server.tenants.access import KeyChecker, bearer_key
from lorafleet_server.tenants.errors import AuthenticationError
from lorafleet_server.tenants.keys import Role

ANY_ROLE: frozenset[Role] = frozenset({"tenant", "admin"})

ROUTE_ROLES: Mapping[str, frozenset[Role]] = MappingProxyType({rpc: ANY_ROLE for rpc in (*ROUTES.values(), GET_MODEL)})
"""Who may call each route (by its ``rpc`` label). Deny by default: a /v1 route not here is refused."""

OPEN_PATHS = frozenset({"/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})


class HttpAuth:
    """ASGI middleware: authenticate and authorize every request outside ``OPEN_PATHS``."""

    def __init__(
        self,
        app: ASGIApp,
        keys: KeyChecker,
        calls: CallObserver,
        roles: Mapping[str, frozenset[Role]] = ROUTE_ROLES,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._app = app
        self._keys = keys
        self._calls = calls
        self._roles = roles
        self._clock = clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self._app(scope, receive, send)
            return
        headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope.get("headers", ())]
        principal: Principal | None = None
        if self._keys.enforcing:
            try:
                principal = self._principal(scope, headers)
            except (AuthenticationError, PermissionDenied) as exc:
                await self._refuse(scope, send, headers, exc)
                return
        scope.setdefault("state", {})["principal"] = principal
        await self._app(scope, receive, send)

    def _principal(self, scope: Scope, headers: list[tuple[str, str]]) -> Principal:
        principal = principal_from(self._keys.authenticate(bearer_key(headers, "header"), self._clock()))
        rpc = rpc_of(scope["method"], scope["path"])
        allowed = self._roles.get(rpc, frozenset()) if rpc is not None else ANY_ROLE  # unknown paths: 404 later
        if principal.role not in allowed:
            needs = " or ".join(sorted(allowed)) if allowed else "a role no key has"
            raise PermissionDenied(f"API key {principal.key_id} has the role {principal.role}; {rpc} needs {needs}")
        return principal

    async def _refuse(self, scope: Scope, send: Send, headers: list[tuple[str, str]], exc: Exception) -> None:
        rid = request_id_of(dict(headers).get("x-request-id"))
        rpc = rpc_of(scope["method"], scope["path"]) or "other"
        key_id = (exc.key_id or "") if isinstance(exc, AuthenticationError) else ""
        code, status, body = describe(exc, rid)
        async with self._calls.call(rpc, NoDeadline(), rid, key_id=key_id) as record:
            record.code = code
            record.error = str(exc)
        payload = json.dumps(body).encode()
        extra: list[tuple[bytes, bytes]] = [(b"www-authenticate", b"Bearer")] if status == 401 else []
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                    (b"x-request-id", rid.encode()),
                    *extra,
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})


def principal_of(state: Mapping[str, Any]) -> Principal | None:
    """The caller ``HttpAuth`` put on the request's state (None: no keys enforced)."""
    value = state.get("principal")
    return value if isinstance(value, Principal) else None
