"""Who may call what: API-key authentication, the RPC → roles table and tenant isolation at the edge.

**Authentication.** ``AuthInterceptor`` is the one server interceptor that checks every call of our
services (health and reflection are left open, so probes and ``grpcurl list`` need no key). A caller
sends ``authorization: Bearer <key>`` metadata; the key is checked by ``KeyRing.authenticate``
(constant-time HMAC comparison) against the keys file that ``ServerKeys`` keeps current. Any failure is
UNAUTHENTICATED with a message that says what was wrong (no key, not ``Bearer <key>``, wrong prefix,
malformed, unknown, revoked, expired) and never repeats the key. The interceptor sits outside
``DecodeGuard`` (rpc.py), so a refused caller's bytes are never parsed, and a refusal is accounted like
any call (``CallObserver``: counted under its RPC, one request-log line with the status and the key id
when one could be read).

**Authorization, deny by default.** ``RPC_ROLES`` maps every full method name of InferenceService and
AdaptersService to the roles that may call it; a method missing from it is refused to every role. A
role outside the set gets PERMISSION_DENIED. The caller's identity goes on as a ``Principal`` (the
servicer method's ``principal`` keyword, then ``CallRecord.principal``): the tenant comes from the key,
never from the request.

**Tenant isolation.** A ``tenant`` key reaches the base model and its own tenant's adapters only.
Another tenant's adapter answers exactly like one that does not exist (``foreign_adapter_not_found``),
and listings show only the caller's tenant, so a tenant cannot learn what others have. ``admin`` keys
reach every tenant.

**Secure by default** (``ServerKeys``). With at least one key in the file (revoked and expired ones
count) authentication is on. With none, the server runs open only on a loopback address (or with
``--insecure-no-auth``) and says so; otherwise it refuses to start. Keys added to a running open server
turn authentication on within ``--keys-poll-seconds``. A keys file that does not load keeps the last
good keys, and keeps authentication on even when those were none (fail closed); at start it stops the
server.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import NoReturn

import grpc

from lorafleet_proto.v1 import adapters_pb2, inference_pb2, usage_pb2
from lorafleet_server.edge.observe import CallObserver
from lorafleet_server.edge.principal import principal_from
from lorafleet_server.edge.status import status_for
from lorafleet_server.engine.types import Principal
from lorafleet_server.errors import PermissionDenied, StartupError
from lorafleet_server.grpc.rpc import request_id_of
from lorafleet_server.tenants.access import (  # shared with the HTTP edge; re-exported here
    AUTHORIZATION,
    BEARER,
    KNOWN_SCHEMES,
    KeyChecker,
    bearer_key,
    check_adapter_access,
    check_admin_view,
    is_foreign,
    listed_tenant,
)
from lorafleet_server.tenants.errors import AuthenticationError
from lorafleet_server.tenants.keys import KeyFileWatcher, KeyRecord, PepperSource, Role

__all__ = [
    "ADMIN_ONLY",
    "ADMIN_RPCS",
    "ANY_ROLE",
    "AUTHORIZATION",
    "BEARER",
    "KNOWN_SCHEMES",
    "LOOPBACK_NAMES",
    "RPC_ROLES",
    "AuthInterceptor",
    "KeyChecker",
    "Refusal",
    "ServerKeys",
    "bearer_key",
    "check_adapter_access",
    "check_admin_view",
    "full_method",
    "is_foreign",
    "is_loopback",
    "listed_tenant",
]

log = logging.getLogger(__name__)

LOOPBACK_NAMES = frozenset({"localhost"})

ANY_ROLE: frozenset[Role] = frozenset({"tenant", "admin"})
ADMIN_ONLY: frozenset[Role] = frozenset({"admin"})

_INFERENCE = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"]
_ADAPTERS = adapters_pb2.DESCRIPTOR.services_by_name["AdaptersService"]
_USAGE = usage_pb2.DESCRIPTOR.services_by_name["UsageService"]


def full_method(service: object, name: str) -> str:
    """``/package.Service/Method`` as gRPC names it; a KeyError when the service has no such method, so a
    renamed RPC breaks the table at import instead of silently leaving it unlisted."""
    return f"/{service.full_name}/{service.methods_by_name[name].name}"  # type: ignore[attr-defined]


RPC_ROLES: Mapping[str, frozenset[Role]] = MappingProxyType(
    {
        full_method(_INFERENCE, "Generate"): ANY_ROLE,
        full_method(_INFERENCE, "GenerateStream"): ANY_ROLE,
        full_method(_INFERENCE, "Tokenize"): ANY_ROLE,
        full_method(_INFERENCE, "Embed"): ANY_ROLE,
        full_method(_INFERENCE, "Classify"): ANY_ROLE,  # a tenant may use only its own heads
        full_method(_INFERENCE, "GetModelInfo"): ANY_ROLE,
        full_method(_ADAPTERS, "ListAdapters"): ANY_ROLE,  # a tenant sees only its own
        full_method(_ADAPTERS, "GetAdapter"): ANY_ROLE,  # a tenant sees only its own
        full_method(_ADAPTERS, "LoadAdapter"): ADMIN_ONLY,
        full_method(_ADAPTERS, "UnloadAdapter"): ADMIN_ONLY,
        full_method(_ADAPTERS, "PinAdapter"): ADMIN_ONLY,
        full_method(_ADAPTERS, "UnpinAdapter"): ADMIN_ONLY,
        full_method(_ADAPTERS, "RefreshAdapters"): ADMIN_ONLY,
        full_method(_USAGE, "GetUsage"): ADMIN_ONLY,  # billing data of every tenant
    }
)
"""Who may call each RPC. Deny by default: an RPC of our services that is not here is refused to all."""

ADMIN_RPCS: frozenset[str] = frozenset(m.rsplit("/", 1)[-1] for m, roles in RPC_ROLES.items() if roles == ADMIN_ONLY)
"""Short names of the RPCs only admins may call: these also write an audit line (observe.py)."""


# --- keys and principals --------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """Whether ``host`` is only reachable from this machine: 127.0.0.0/8, ::1 or ``localhost``.
    ``0.0.0.0``, ``::`` and any other name or address are not."""
    name = host.strip().removeprefix("[").removesuffix("]").lower()
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class ServerKeys:
    """The server's API keys: a ``KeyFileWatcher`` kept current, and whether they are enforced.

    ``allow_open``: whether the server may run without keys (bound to loopback, or
    ``--insecure-no-auth``). Enforcing means: the file has a key (any, revoked and expired included: the
    last key revoked must not open the server), or it had one since the start (a file moved away or
    deleted and written anew must not open it either: no call is accepted until keys return, or the
    server restarts), or the latest load of the file failed (it may hold keys: fail closed), or running
    open is not allowed. ``on_reload`` hears of every load (a metric).
    """

    def __init__(
        self,
        path: Path,
        pepper: PepperSource,
        *,
        host: str,
        allow_open: bool,
        on_reload: Callable[[bool], None] | None = None,
    ) -> None:
        self._path = path
        self._host = host
        self._allow_open = allow_open
        self._on_reload = on_reload
        self._last_ok = True
        self._had_keys = False  # a load since the start found a key
        self._watcher = KeyFileWatcher(path, pepper, self._reloaded)
        self._was_enforcing: bool | None = None  # set once started: only later changes are announced

    @property
    def key_count(self) -> int:
        return len(self._watcher.ring)

    @property
    def enforcing(self) -> bool:
        if self.key_count > 0 or self._had_keys or not self._allow_open:
            return True
        return not self._last_ok  # a file that does not load may hold keys: fail closed

    def authenticate(self, text: str, now: datetime) -> KeyRecord:
        return self._watcher.authenticate(text, now)

    def poll(self) -> bool:
        """Look at the file now, as the watcher thread does every poll interval; True if it reloaded."""
        return self._watcher.poll()

    def load(self) -> None:
        """Read the file once (no thread) and apply the start rules; StartupError when it must not start."""
        self._watcher.poll()
        self._check_start()

    def start(self, poll_seconds: float) -> None:
        """Load now, apply the start rules, then follow the file every ``poll_seconds``."""
        self._watcher.start(poll_seconds)
        try:
            self._check_start()
        except StartupError:
            self._watcher.stop()
            raise
        self._was_enforcing = self.enforcing
        self._announce(poll_seconds)

    def stop(self) -> None:
        self._watcher.stop()

    def _check_start(self) -> None:
        if not self._last_ok:
            raise StartupError(
                f"keys file {self._path} did not load (the error is logged above); fix it, or move it away "
                "to serve without keys"
            )
        if self.key_count == 0 and not self._allow_open:
            raise StartupError(
                f"refusing to start: no API keys in {self._path} and host {self._host!r} is not a loopback "
                "address, so anyone who can reach it could call every RPC. Create a key (`lorafleet keys "
                "create --tenant NAME --role admin`), listen on 127.0.0.1, or pass --insecure-no-auth "
                "(LORAFLEET_INSECURE_NO_AUTH=true) to serve without keys on purpose"
            )

    def _announce(self, poll_seconds: float) -> None:
        now = datetime.now(UTC)
        if self.key_count:
            log.info(
                "authentication on: %d API keys (%d active) in %s, reloaded within %gs of a change",
                self.key_count,
                self._watcher.ring.active_count(now),
                self._path,
                poll_seconds,
            )
        elif is_loopback(self._host):
            log.warning(
                "authentication OFF: no API keys in %s; serving without keys because %s is a loopback "
                "address (a key created with `lorafleet keys create` turns it on within %gs)",
                self._path,
                self._host,
                poll_seconds,
            )
        else:
            log.warning(
                "authentication OFF on %s (--insecure-no-auth): no API keys in %s, anyone who can reach "
                "this address may call every RPC",
                self._host,
                self._path,
            )

    def _reloaded(self, ok: bool) -> None:
        self._last_ok = ok
        if self.key_count > 0:
            self._had_keys = True
        elif ok and self._had_keys:
            log.warning(
                "keys file %s has no keys now: authentication stays on and no call is accepted until keys "
                "return (or the server restarts)",
                self._path,
            )
        if self._on_reload is not None:
            self._on_reload(ok)
        enforcing = self.enforcing
        if self._was_enforcing is not None and enforcing != self._was_enforcing:
            self._was_enforcing = enforcing
            if enforcing and self.key_count == 0:
                log.warning("authentication is now on: %s did not load, no call is accepted until it does", self._path)
            elif enforcing:
                log.warning("authentication is now on: %d API keys in %s", self.key_count, self._path)
            else:
                log.warning("authentication is now OFF: no API keys in %s (loopback only)", self._path)


# Tenant isolation (``is_foreign``, ``check_adapter_access``, ``check_admin_view``, ``listed_tenant``) and
# ``bearer_key`` live in ``lorafleet_server.tenants.access``, shared with the HTTP edge, and are imported
# above under their old names.


# --- the interceptor ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    """Why a call is refused before its handler runs, and what the request log may say about it."""

    code: grpc.StatusCode
    message: str
    key_id: str = ""
    principal: Principal | None = None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates and authorizes every call of ``services``; see the module's docstring.

    Install it before ``DecodeGuard`` (``interceptors=[auth, decode_guard]``): gRPC runs the first one
    outermost, so a refused call never reaches the parsing of its bytes. Each wrapped method is called
    with ``principal=`` (None while no keys are enforced).
    """

    def __init__(
        self,
        keys: KeyChecker,
        calls: CallObserver,
        services: Sequence[str],
        roles: Mapping[str, frozenset[Role]] = RPC_ROLES,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._keys = keys
        self._calls = calls
        self._prefixes = tuple(f"/{name}/" for name in services)
        self._roles = roles
        self._clock = clock

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = str(handler_call_details.method)
        if handler is None or not method.startswith(self._prefixes):
            return handler  # health, reflection, or no such method (UNIMPLEMENTED)
        rpc = method.rsplit("/", 1)[-1]
        if handler.unary_unary is not None:
            unary = handler.unary_unary

            async def unary_unary(request: object, context: grpc.aio.ServicerContext) -> object:
                principal = await self._admit(method, rpc, context)
                return await unary(request, context, principal=principal)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            stream = handler.unary_stream

            async def unary_stream(request: object, context: grpc.aio.ServicerContext) -> AsyncIterator[object]:
                principal = await self._admit(method, rpc, context)
                async for response in stream(request, context, principal=principal):
                    yield response

            return grpc.unary_stream_rpc_method_handler(
                unary_stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        raise TypeError(f"{method}: only unary requests are served; there is no way to check this one")

    def check(self, method: str, metadata: Sequence[tuple[str, str | bytes]] | None) -> Principal | Refusal | None:
        """The caller of ``method`` with ``metadata``: its Principal, None while no keys are enforced,
        or why it is refused. Pure apart from the keys and the clock, so tests call it directly."""
        if not self._keys.enforcing:
            return None
        try:
            record = self._keys.authenticate(bearer_key(metadata), self._clock())
        except AuthenticationError as exc:
            return Refusal(status_for(exc), str(exc), exc.key_id or "")
        principal = principal_from(record)
        allowed = self._roles.get(method, frozenset())
        if principal.role not in allowed:
            rpc = method.rsplit("/", 1)[-1]
            needs = " or ".join(sorted(allowed)) if allowed else "a role no key has"
            denied = PermissionDenied(f"API key {principal.key_id} has the role {principal.role}; {rpc} needs {needs}")
            return Refusal(status_for(denied), str(denied), principal.key_id, principal)
        return principal

    async def _admit(self, method: str, rpc: str, context: grpc.aio.ServicerContext) -> Principal | None:
        verdict = self.check(method, context.invocation_metadata())
        if isinstance(verdict, Refusal):
            await self._refuse(rpc, context, verdict)
        return verdict

    async def _refuse(self, rpc: str, context: grpc.aio.ServicerContext, refusal: Refusal) -> NoReturn:
        rid = request_id_of(context)
        async with self._calls.call(rpc, context, rid, principal=refusal.principal, key_id=refusal.key_id) as record:
            record.code = refusal.code
            record.error = refusal.message
            await context.abort(refusal.code, refusal.message)
        raise AssertionError("unreachable")  # abort raises
