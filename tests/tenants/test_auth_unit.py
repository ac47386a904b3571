"""The pieces of enforcement without a server: the bearer header, the RPC → roles table (deny by
default), tenant isolation rules, the start rules (secure by default) and the status table."""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry

from lorafleet_adapters.errors import AdapterNotFound
from lorafleet_adapters.ref import AdapterRef
from lorafleet_proto.v1 import adapters_pb2, inference_pb2, usage_pb2
from lorafleet_server.config import ServerConfig
from lorafleet_server.edge.observe import CallObserver
from lorafleet_server.edge.status import status_for
from lorafleet_server.engine.types import GenerationRequest, Principal
from lorafleet_server.errors import PermissionDenied, StartupError
from lorafleet_server.grpc.auth import (
    ADMIN_RPCS,
    RPC_ROLES,
    AuthInterceptor,
    Refusal,
    ServerKeys,
    bearer_key,
    check_adapter_access,
    check_admin_view,
    is_loopback,
    listed_tenant,
)
from lorafleet_server.grpc.server import SERVICE_NAMES, server_keys
from lorafleet_server.metrics import Metrics
from lorafleet_server.tenants.errors import (
    ExpiredKey,
    MalformedKey,
    MissingKey,
    RevokedKey,
    UnknownKey,
    WrongKeyPrefix,
)
from lorafleet_server.tenants.keys import KeyRecord, PepperSource, create_key, revoke_key

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
ACME = Principal(key_id="a" * 12, tenant="acme", role="tenant")
OPS = Principal(key_id="b" * 12, tenant="ops", role="admin")


# -- the header --------------------------------------------------------------------------------------


def test_bearer_key_takes_the_key_of_one_bearer_header() -> None:
    assert bearer_key((("authorization", "Bearer lf_x"),)) == "lf_x"
    assert bearer_key((("x-request-id", "r"), ("authorization", "bearer   lf_x  "))) == "lf_x"
    assert bearer_key((("authorization", "BEARER lf_x"),)) == "lf_x"


@pytest.mark.parametrize(
    ("metadata", "error", "says"),
    [
        (None, MissingKey, "no API key"),
        ((), MissingKey, "no API key"),
        ((("authorization", "Bearer"),), MissingKey, "carries no key"),
        ((("authorization", "Bearer   "),), MissingKey, "carries no key"),
        ((("authorization", "Basic dXNlcjpwYXNz"),), MalformedKey, "uses the Basic scheme"),
        ((("authorization", "Token lf_x"),), MalformedKey, "uses the Token scheme"),
        ((("authorization", "lf_x"),), MalformedKey, "is not 'Bearer <key>'"),
        ((("authorization", "mysecret rest"),), MalformedKey, "is not 'Bearer <key>'"),
        ((("authorization", b"Bearer lf_x"),), MalformedKey, "is not text"),
        ((("authorization", "Bearer a"), ("authorization", "Bearer b")), MalformedKey, "more than one"),
    ],
)
def test_bearer_key_says_what_is_wrong_without_repeating_it(
    metadata: tuple[tuple[str, str | bytes], ...] | None, error: type[Exception], says: str
) -> None:
    with pytest.raises(error, match=says) as caught:
        bearer_key(metadata)
    assert "mysecret" not in str(caught.value) and "dXNlcjpwYXNz" not in str(caught.value)
    assert "lf_x" not in str(caught.value)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.5.6.7", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        ("10.0.0.5", False),
        ("example.com", False),
        ("128.0.0.1", False),
        ("127.0.0.1.nip.io", False),  # a name that resolves anywhere, however it starts
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


# -- the table ---------------------------------------------------------------------------------------


def _methods() -> set[str]:
    methods = set()
    services = ((inference_pb2, "InferenceService"), (adapters_pb2, "AdaptersService"), (usage_pb2, "UsageService"))
    for module, name in services:
        service = module.DESCRIPTOR.services_by_name[name]
        methods |= {f"/{service.full_name}/{m.name}" for m in service.methods}
    return methods


def test_the_roles_table_names_every_rpc_of_our_services_and_nothing_else() -> None:
    assert set(RPC_ROLES) == _methods()
    assert {m.split("/")[1] for m in RPC_ROLES} == set(SERVICE_NAMES)
    assert ADMIN_RPCS == {"LoadAdapter", "UnloadAdapter", "PinAdapter", "UnpinAdapter", "RefreshAdapters", "GetUsage"}
    for method, roles in RPC_ROLES.items():
        assert "admin" in roles, method  # an admin may do everything
        assert roles <= {"tenant", "admin"}


class FakeKeys:
    """A KeyChecker with fixed records (the real ring is tested in test_tenant_keys.py)."""

    def __init__(self, records: dict[str, KeyRecord | Exception], enforcing: bool = True) -> None:
        self.records = records
        self.enforcing = enforcing

    def authenticate(self, text: str, now: datetime) -> KeyRecord:
        found = self.records[text]
        if isinstance(found, Exception):
            raise found
        return found


def record(tenant: str, role: str, **extra: object) -> KeyRecord:
    key_id = (tenant * 12)[:12]
    return KeyRecord(key_id=key_id, tenant=tenant, role=role, secret_hmac="0" * 64, created=NOW, **extra)  # type: ignore[arg-type]


def interceptor(keys: FakeKeys, roles: dict[str, frozenset[str]] | None = None) -> AuthInterceptor:
    calls = CallObserver(Metrics(CollectorRegistry()))
    return AuthInterceptor(keys, calls, SERVICE_NAMES, roles if roles is not None else RPC_ROLES, clock=lambda: NOW)  # type: ignore[arg-type]


def bearer(text: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {text}"),)


GENERATE = "/lorafleet.v1.InferenceService/Generate"
LOAD = "/lorafleet.v1.AdaptersService/LoadAdapter"


def test_check_gives_the_principal_of_the_key_never_of_the_request() -> None:
    keys = FakeKeys(
        {
            "t": record("acme", "tenant", weight=2.5, max_waiting=3, max_running=2),
            "a": record("ops", "admin"),
        }
    )
    auth = interceptor(keys)
    principal = auth.check(GENERATE, bearer("t"))
    assert principal == Principal(
        key_id="acmeacmeacme", tenant="acme", role="tenant", weight=2.5, max_waiting=3, max_running=2
    )
    assert auth.check(LOAD, bearer("a")) == Principal(key_id="opsopsopsops", tenant="ops", role="admin")
    assert GenerationRequest(request_id="r").principal is None  # the engine's field, None without keys


def test_check_refuses_roles_outside_the_table_and_methods_missing_from_it() -> None:
    auth = interceptor(FakeKeys({"t": record("acme", "tenant"), "a": record("ops", "admin")}))
    denied = auth.check(LOAD, bearer("t"))
    assert isinstance(denied, Refusal) and denied.code == grpc.StatusCode.PERMISSION_DENIED
    assert denied.message == "API key acmeacmeacme has the role tenant; LoadAdapter needs admin"
    assert denied.principal is not None and denied.key_id == "acmeacmeacme"
    # Deny by default: a method nobody listed is refused to admins as well.
    unlisted = interceptor(FakeKeys({"a": record("ops", "admin")}), roles={GENERATE: frozenset({"admin"})})
    refused = unlisted.check(LOAD, bearer("a"))
    assert isinstance(refused, Refusal) and refused.code == grpc.StatusCode.PERMISSION_DENIED
    assert "needs a role no key has" in refused.message


@pytest.mark.parametrize(
    "error",
    [
        UnknownKey("the API key is not known to this server", "abcdefghijkl"),
        RevokedKey("API key abcdefghijkl was revoked at ...", "abcdefghijkl"),
        ExpiredKey("API key abcdefghijkl expired at ...", "abcdefghijkl"),
        MalformedKey("the API key is malformed"),
        WrongKeyPrefix("the API key does not start with 'lf_'"),
    ],
)
def test_check_refuses_failed_keys_as_unauthenticated_with_their_id(error: Exception) -> None:
    refused = interceptor(FakeKeys({"k": error})).check(GENERATE, bearer("k"))
    assert isinstance(refused, Refusal) and refused.code == grpc.StatusCode.UNAUTHENTICATED
    assert refused.message == str(error) and refused.principal is None
    assert refused.key_id == (getattr(error, "key_id", None) or "")


def test_check_lets_everything_through_while_no_keys_are_enforced() -> None:
    auth = interceptor(FakeKeys({}, enforcing=False))
    assert auth.check(LOAD, None) is None
    assert auth.check(GENERATE, (("authorization", "Basic whatever"),)) is None


def test_the_status_table_maps_authentication_and_permission() -> None:
    for error in (MissingKey("x"), MalformedKey("x"), WrongKeyPrefix("x"), UnknownKey("x"), RevokedKey("x")):
        assert status_for(error) == grpc.StatusCode.UNAUTHENTICATED
    assert status_for(ExpiredKey("x")) == grpc.StatusCode.UNAUTHENTICATED
    assert status_for(PermissionDenied("x")) == grpc.StatusCode.PERMISSION_DENIED


# -- tenant isolation --------------------------------------------------------------------------------


def test_another_tenants_adapter_is_not_found_in_the_stores_own_words() -> None:
    check_adapter_access(ACME, None)  # the base model
    check_adapter_access(ACME, AdapterRef.parse("acme/support@2"))
    check_adapter_access(OPS, AdapterRef.parse("beta/secret"))
    check_adapter_access(None, AdapterRef.parse("beta/secret"))  # no keys: no tenants
    for text in ("beta/secret", "beta/secret@3"):
        with pytest.raises(AdapterNotFound, match=r"^adapter beta/secret not found$"):
            check_adapter_access(ACME, AdapterRef.parse(text))
    with pytest.raises(AdapterNotFound, match=r"^adapter beta/secret is not in the store$"):
        check_admin_view(ACME, AdapterRef.parse("beta/secret"))
    check_admin_view(OPS, AdapterRef.parse("beta/secret"))


def test_listed_tenant() -> None:
    assert listed_tenant(None, "") == "" and listed_tenant(None, "beta") == "beta"
    assert listed_tenant(OPS, "") == "" and listed_tenant(OPS, "beta") == "beta"
    assert listed_tenant(ACME, "") == "acme" and listed_tenant(ACME, "acme") == "acme"
    assert listed_tenant(ACME, "beta") is None


# -- secure by default -------------------------------------------------------------------------------


def _keys(tmp_path: Path, host: str, insecure: bool = False) -> ServerKeys:
    return server_keys(ServerConfig(data_dir=tmp_path, host=host, insecure_no_auth=insecure))


def test_no_keys_starts_open_on_loopback_only(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for host in ("127.0.0.1", "::1", "localhost"):
        keys = _keys(tmp_path, host)
        keys.load()
        assert not keys.enforcing
    for host in ("0.0.0.0", "::", "10.1.2.3", "example.com"):
        with pytest.raises(StartupError, match=f"no API keys in .* host '{host}' is not a loopback .*insecure-no-auth"):
            _keys(tmp_path, host).load()
        insecure = _keys(tmp_path, host, insecure=True)
        insecure.load()
        assert not insecure.enforcing
    with caplog.at_level(logging.WARNING):
        started = _keys(tmp_path, "0.0.0.0", insecure=True)
        started.start(60)
        started.stop()
    assert "authentication OFF on 0.0.0.0 (--insecure-no-auth)" in caplog.text


def test_any_key_turns_authentication_on_and_a_revoked_last_key_keeps_it_on(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    new = create_key(path, PepperSource(path), tenant="acme", role="tenant", now=NOW, expires=NOW + timedelta(1))
    for host, insecure in (("127.0.0.1", False), ("0.0.0.0", False), ("0.0.0.0", True)):
        keys = _keys(tmp_path, host, insecure)
        keys.load()
        assert keys.enforcing
    revoke_key(path, new.record.key_id, NOW)
    keys = _keys(tmp_path, "127.0.0.1")
    keys.load()
    assert keys.enforcing and keys.key_count == 1


def test_a_keys_file_that_goes_away_leaves_authentication_on(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Found by an outside review: on loopback, a keys file moved aside (or deleted, then written anew by
    a deploy step) turned authentication off, admin RPCs included, until it came back."""
    path = tmp_path / "keys.json"
    new = create_key(path, PepperSource(path), tenant="acme", role="admin", now=NOW)
    keys = _keys(tmp_path, "127.0.0.1")
    keys.load()
    assert keys.enforcing
    path.rename(tmp_path / "aside.json")
    with caplog.at_level(logging.WARNING):
        keys.poll()
    assert keys.key_count == 0 and keys.enforcing  # closed: no key works, and none is needed to be refused
    assert "authentication stays on" in caplog.text
    with pytest.raises(UnknownKey):  # the moved key no longer authenticates
        keys.authenticate(new.key, NOW)
    (tmp_path / "aside.json").rename(path)
    keys.poll()
    assert keys.enforcing and keys.authenticate(new.key, NOW).key_id == new.record.key_id


def test_a_keys_file_that_does_not_load_stops_the_start_and_later_fails_closed(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text("{not json")
    with pytest.raises(StartupError, match="did not load"):
        _keys(tmp_path, "127.0.0.1").load()
    path.unlink()
    reloads: list[bool] = []
    keys = server_keys(ServerConfig(data_dir=tmp_path), reloads.append)
    keys.load()
    assert not keys.enforcing and reloads == [True]
    path.write_text('{"version": 1, "keys": [')  # keys being added by hand, badly: it may hold keys
    keys.poll()  # what the watcher thread does every poll interval
    assert reloads == [True, False] and keys.enforcing and keys.key_count == 0


def _recording_app(reached: list[str]) -> Any:
    """An ASGI app behind ``HttpAuth`` that notes each path it is reached with and answers 200 ``{}``."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        reached.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    return app


def _post_through(auth: Any, path: str, key: str) -> tuple[int, dict[str, Any]]:
    """POST ``{}`` to ``path`` with ``key`` through the ASGI middleware ``auth``: its status and JSON body."""
    sent: list[dict[str, Any]] = []
    scope = {"type": "http", "method": "POST", "path": path, "headers": [(b"authorization", f"Bearer {key}".encode())]}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(auth(scope, receive, send))
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body)


def test_the_http_edge_checks_a_keys_expiry_at_its_own_clock(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """What a mutation review found no test held: the HTTP edge ignoring the time (an expired key
    served) passed every test. ``HttpAuth`` asks the keys at its clock's now; past the key's expiry it
    answers 401 ``expired_key``, names the key in the request log and never reaches the app. Also:
    a key's id is logged on every refusal at this edge, as at the gRPC one."""
    from lorafleet_server.http.auth import HttpAuth

    path = tmp_path / "keys.json"
    new = create_key(path, PepperSource(path), tenant="acme", role="tenant", now=NOW, expires=NOW + timedelta(hours=1))
    keys = _keys(tmp_path, "127.0.0.1")
    keys.load()
    reached: list[str] = []
    app = _recording_app(reached)

    def call(at: datetime) -> tuple[int, dict[str, Any]]:
        auth = HttpAuth(app, keys, CallObserver(Metrics(CollectorRegistry())), clock=lambda: at)
        return _post_through(auth, "/v1/chat/completions", new.key)

    assert call(NOW + timedelta(minutes=59))[0] == 200 and reached == ["/v1/chat/completions"]
    with caplog.at_level(logging.INFO, logger="lorafleet.requests"):
        status, body = call(NOW + timedelta(hours=2))
    assert status == 401 and body["error"]["code"] == "expired_key", body
    assert reached == ["/v1/chat/completions"]  # the app saw only the first call
    logged = [r.fields for r in caplog.records if r.name == "lorafleet.requests"]  # type: ignore[attr-defined]
    assert logged and logged[-1]["key_id"] == new.record.key_id and logged[-1]["status"] == "UNAUTHENTICATED"


def test_the_http_edge_applies_its_route_roles_and_denies_a_route_without_any(tmp_path: Path) -> None:
    """What a mutation review found no test held: ``HttpAuth`` serving every route to every role (the
    role check dropped) or serving a /v1 route missing from its roles (deny by default lost) passed every
    test, as every route is open to both roles today. A route that needs another role is 403
    ``permission_error`` and never reaches the app; a served route with no roles at all is refused too."""
    from lorafleet_server.http.auth import HttpAuth
    from lorafleet_server.http.routes import CHAT_COMPLETIONS, COMPLETIONS

    path = tmp_path / "keys.json"
    new = create_key(path, PepperSource(path), tenant="acme", role="tenant", now=NOW)
    keys = _keys(tmp_path, "127.0.0.1")
    keys.load()
    reached: list[str] = []
    app = _recording_app(reached)

    auth = HttpAuth(
        app,
        keys,
        CallObserver(Metrics(CollectorRegistry())),
        roles={CHAT_COMPLETIONS: frozenset({"admin"})},  # COMPLETIONS: in no role's list
        clock=lambda: NOW,
    )

    for route, needs in ((CHAT_COMPLETIONS, "needs admin"), (COMPLETIONS, "needs a role no key has")):
        status, body = _post_through(auth, route.removeprefix("POST "), new.key)
        assert status == 403 and body["error"]["type"] == "permission_error", (route, body)
        assert needs in body["error"]["message"], (route, body)
    assert reached == []
