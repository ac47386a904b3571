"""API keys enforced over a real gRPC channel on 127.0.0.1 (tiny model): authentication, the RPC → roles
table, tenant isolation, reloads of the keys file while serving, and what reaches the logs."""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from enginelib import server_config
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from lorafleet import (
    InvalidArgumentError,
    LoraFleetClient,
    NotFoundError,
    PermissionDeniedError,
    Sampling,
    UnauthenticatedError,
)
from lorafleet_adapters.prompt import PromptTemplate
from lorafleet_proto.v1 import adapters_pb2, adapters_pb2_grpc, inference_pb2, inference_pb2_grpc
from lorafleet_server.app import Service, build_service
from lorafleet_server.grpc.auth import ADMIN_RPCS, RPC_ROLES
from lorafleet_server.grpc.server import BackgroundServer
from lorafleet_server.logs import TextFormatter
from lorafleet_server.tenants.keys import KEY_ALPHABET, PepperSource, create_key, format_key, revoke_key

SHORT = Sampling(max_new_tokens=2)
PB_SHORT = inference_pb2.SamplingParams(max_new_tokens=2)


@dataclass
class Live:
    service: Service
    server: BackgroundServer
    target: str
    keys_file: Path
    keys: dict[str, str]  # name -> full key text

    def client(self, key: str | None) -> LoraFleetClient:
        return LoraFleetClient(self.target, api_key=key or "", timeout=60)

    def counted(self, rpc: str, code: str) -> float:
        value = self.service.metrics.registry.get_sample_value("lorafleet_requests_total", {"rpc": rpc, "code": code})
        return value or 0.0

    def reloads(self, result: str) -> float:
        value = self.service.metrics.registry.get_sample_value("lorafleet_keys_reloads_total", {"result": result})
        return value or 0.0


def new_key(path: Path, tenant: str, role: str, **kwargs: Any) -> str:
    now = kwargs.pop("now", datetime.now(UTC))
    return create_key(path, PepperSource(path), tenant=tenant, role=role, now=now, **kwargs).key  # type: ignore[arg-type]


def key_id(key: str) -> str:
    return key.split("_")[1]


def secret_of(key: str) -> str:
    return key.split("_")[2]


def start(service: Service) -> tuple[BackgroundServer, str]:
    server = BackgroundServer(service)
    port = server.start()
    return server, f"127.0.0.1:{port}"


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def log_lines(caplog: pytest.LogCaptureFixture, logger: str, request_id: str) -> list[dict[str, Any]]:
    """The structured lines of ``logger`` for ``request_id`` (they are written just after the status)."""
    deadline = time.monotonic() + 5
    while True:
        found = [
            r.fields  # type: ignore[attr-defined]
            for r in caplog.records
            if r.name == logger and getattr(r, "fields", {}).get("request_id") == request_id
        ]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


@pytest.fixture(scope="module")
def live(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, peft_adapter: Any) -> Iterator[Live]:
    data = tmp_path_factory.mktemp("auth-e2e")
    keys_file = data / "keys.json"
    past = datetime.now(UTC) - timedelta(days=2)
    keys = {
        "acme": new_key(keys_file, "acme", "tenant"),
        "beta": new_key(keys_file, "beta", "tenant"),
        "ops": new_key(keys_file, "ops", "admin"),
        "revoked": new_key(keys_file, "acme", "tenant"),
        "expired": new_key(keys_file, "acme", "tenant", now=past, expires=past + timedelta(hours=1)),
    }
    revoke_key(keys_file, key_id(keys["revoked"]), datetime.now(UTC))
    config = server_config(
        model=tiny_model_dir, data_dir=data, port=0, metrics_port=0, max_seq_len=256, keys_poll_seconds=0.2
    )
    service = build_service(config)
    spec = service.base.spec
    service.store.import_peft(peft_adapter(seed=3), "acme", "support", spec)
    service.store.publish_prompt("acme", "faq", PromptTemplate(system="You answer for Acme."), spec)
    service.store.publish_prompt("beta", "secret", PromptTemplate(system="You answer for Beta."), spec)
    server, target = start(service)
    try:
        yield Live(service, server, target, keys_file, keys)
    finally:
        server.stop()


# -- open to all: health and reflection -------------------------------------------------------------


def test_health_and_reflection_need_no_key(live: Live) -> None:
    with grpc.insecure_channel(live.target) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        answers = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        names = {s.name for answer in answers for s in answer.list_services_response.service}
    assert {"lorafleet.v1.InferenceService", "lorafleet.v1.AdaptersService", "grpc.health.v1.Health"} <= names


# -- authentication ---------------------------------------------------------------------------------


def _unknown_key() -> str:
    return format_key(
        "".join(secrets.choice(KEY_ALPHABET) for _ in range(12)),
        "".join(secrets.choice(KEY_ALPHABET) for _ in range(32)),
    )


REFUSALS: dict[str, tuple[Callable[[dict[str, str]], tuple[tuple[str, str], ...]], str, str | None]] = {
    # case: (metadata from the keys, what the message says, whose key id the log line names)
    "no header": (lambda k: (), "no API key", None),
    "empty bearer": (lambda k: (("authorization", "Bearer "),), "carries no key", None),
    "garbage": (lambda k: (("authorization", "Bearer hunter2-garbage"),), "does not start with 'lf_'", None),
    "wrong prefix": (lambda k: (("authorization", "Bearer sk_" + secret_of(k["acme"])),), "does not start", None),
    "basic scheme": (lambda k: (("authorization", "Basic " + k["acme"]),), "uses the Basic scheme", None),
    "no scheme": (lambda k: (("authorization", k["acme"]),), "is not 'Bearer <key>'", None),
    "two headers": (
        lambda k: (("authorization", "Bearer " + k["acme"]), ("authorization", "Bearer " + k["beta"])),
        "more than one",
        None,
    ),
    "malformed": (lambda k: (("authorization", "Bearer " + k["acme"][:-3]),), "is malformed", None),
    "unknown": (lambda k: (("authorization", "Bearer " + _unknown_key()),), "not known to this server", None),
    "wrong secret": (
        lambda k: (("authorization", "Bearer " + format_key(key_id(k["acme"]), "a" * 32)),),
        "not known to this server",
        "acme",
    ),
    "revoked": (lambda k: (("authorization", "Bearer " + k["revoked"]),), "was revoked at", "revoked"),
    "expired": (lambda k: (("authorization", "Bearer " + k["expired"]),), "expired at", "expired"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_calls_without_a_usable_key_are_unauthenticated_counted_and_logged(
    live: Live, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    metadata_of, says, logged_key = REFUSALS[case]
    metadata = metadata_of(live.keys)
    rid = f"auth-refused-{case.replace(' ', '-')}"
    before = live.counted("Generate", "UNAUTHENTICATED")
    with grpc.insecure_channel(live.target) as channel, caplog.at_level(logging.INFO):
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Generate(
                inference_pb2.GenerateRequest(prompt="Hello", params=PB_SHORT),
                metadata=(*metadata, ("x-request-id", rid)),
                timeout=30,
            )
        lines = log_lines(caplog, "lorafleet.requests", rid)
    error: grpc.Call = caught.value  # type: ignore[assignment]
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    message = error.details() or ""
    assert says in message
    for key in live.keys.values():  # no message repeats a secret, whatever was sent
        assert secret_of(key) not in message
    wait_until(lambda: live.counted("Generate", "UNAUTHENTICATED") == before + 1)
    assert len(lines) == 1
    line = lines[0]
    assert (line["rpc"], line["status"], line["error"]) == ("Generate", "UNAUTHENTICATED", message)
    assert line["key_id"] == (key_id(live.keys[logged_key]) if logged_key else line["key_id"])
    if logged_key is None and case != "unknown":
        assert line["key_id"] == ""


def test_refusal_comes_before_parsing_and_covers_streams(live: Live) -> None:
    with grpc.insecure_channel(live.target) as channel:
        raw = channel.unary_unary(
            "/lorafleet.v1.InferenceService/Generate",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        with pytest.raises(grpc.RpcError) as caught:
            raw(b"\xff\xff\xff not a message", timeout=30)  # garbage bytes, no key: the key is checked first
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
        stream = inference_pb2_grpc.InferenceServiceStub(channel).GenerateStream(
            inference_pb2.GenerateStreamRequest(prompt="Hello", params=PB_SHORT), timeout=30
        )
        with pytest.raises(grpc.RpcError):
            list(stream)
        assert stream.code() == grpc.StatusCode.UNAUTHENTICATED
    with live.client(None) as anonymous, pytest.raises(UnauthenticatedError):
        anonymous.list_adapters()


def test_a_tenant_key_calls_the_base_model_and_its_own_adapters(live: Live, caplog: pytest.LogCaptureFixture) -> None:
    with live.client(live.keys["acme"]) as client, caplog.at_level(logging.INFO, logger="lorafleet.requests"):
        assert client.generate("Hello", sampling=SHORT, request_id="acme-base").generated_tokens > 0
        assert client.generate("Hello", adapter="acme/faq", sampling=SHORT).adapter == "acme/faq@1"
        assert client.generate("Hello", adapter="acme/support", sampling=SHORT).adapter == "acme/support@1"
        chunks = client.stream("Hello", adapter="acme/faq@1", sampling=SHORT)
        assert "".join(chunks) is not None and chunks.result.adapter == "acme/faq@1"
        assert client.embed("Hello", adapter="acme/faq").adapter == "acme/faq@1"
        assert client.tokenize("Hello").ids
        assert client.model_info().max_new_tokens > 0
        (line,) = log_lines(caplog, "lorafleet.requests", "acme-base")
    assert (line["key_id"], line["tenant"], line["status"]) == (key_id(live.keys["acme"]), "acme", "OK")


def _shape(message: str, ref: str) -> str:
    """A NOT_FOUND message with the adapter reference taken out, to compare two answers' shapes."""
    tenant, _, name = ref.partition("/")
    return message.replace(f"{tenant}/{name.split('@')[0]}", "<ref>")


@pytest.mark.parametrize("suffix", ["", "@1", "@7"])
def test_another_tenants_adapter_answers_exactly_like_an_unknown_one(live: Live, suffix: str) -> None:
    def refusal(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(NotFoundError) as caught:
            call()
        return caught.value.code, caught.value.message

    with live.client(live.keys["acme"]) as acme:
        for method in ("generate", "stream", "embed"):

            def call(ref: str, method: str = method) -> Callable[[], object]:
                if method == "stream":
                    return lambda: list(acme.stream("Hello", adapter=ref, sampling=SHORT))
                if method == "embed":
                    return lambda: acme.embed("Hello", adapter=ref)
                return lambda: acme.generate("Hello", adapter=ref, sampling=SHORT)

            theirs = refusal(call("beta/secret" + suffix))  # exists, but beta's
            nobodys = refusal(call("beta/nothing" + suffix))  # exists nowhere
            own_unknown = refusal(call("acme/nothing" + suffix))  # the caller's own tenant, unknown
            assert theirs[0] == nobodys[0] == own_unknown[0] == grpc.StatusCode.NOT_FOUND
            assert _shape(theirs[1], "beta/secret") == _shape(nobodys[1], "beta/nothing"), method
            assert _shape(nobodys[1], "beta/nothing") == _shape(own_unknown[1], "acme/nothing"), method
    with live.client(live.keys["ops"]) as admin:  # an admin reaches beta's adapter
        assert admin.generate("Hello", adapter="beta/secret", sampling=SHORT).adapter == "beta/secret@1"


def test_listings_and_views_show_a_tenant_only_its_own(live: Live) -> None:
    with live.client(live.keys["acme"]) as acme:
        assert {(a.tenant, a.name) for a in acme.list_adapters()} == {("acme", "faq"), ("acme", "support")}
        assert {a.name for a in acme.list_adapters("acme")} == {"faq", "support"}
        assert acme.list_adapters("beta") == []  # as for a tenant with no adapters
        assert acme.list_adapters("nobody") == []
        assert acme.get_adapter("acme/faq").name == "faq"
        with pytest.raises(NotFoundError) as theirs:
            acme.get_adapter("beta/secret")
        with pytest.raises(NotFoundError) as nobodys:
            acme.get_adapter("beta/nothing")
        assert _shape(theirs.value.message, "beta/secret") == _shape(nobodys.value.message, "beta/nothing")
    with live.client(live.keys["beta"]) as beta:
        assert [(a.tenant, a.name) for a in beta.list_adapters()] == [("beta", "secret")]
    with live.client(live.keys["ops"]) as admin:
        assert {a.tenant for a in admin.list_adapters()} == {"acme", "beta"}
        assert admin.get_adapter("beta/secret").tenant == "beta"


def test_slot_memory_is_shown_to_admins_only(live: Live) -> None:
    """Found by an outside review: GetModelInfo's adapter_slot_memory_bytes follows every tenant's loaded
    adapters (it told another tenant's r=32 all-linear adapter apart); a tenant key now gets 0."""
    with live.client(live.keys["acme"]) as acme:
        # a LoRA adapter in a slot now (beta/secret is a prompt adapter: no slot; this test passed alone
        # only after another had loaded acme/support)
        acme.generate("Hi", adapter="acme/support", sampling=SHORT)
        assert acme.model_info().adapter_slot_memory_bytes == 0
    with live.client(live.keys["beta"]) as beta:
        assert beta.model_info().adapter_slot_memory_bytes == 0
    with live.client(live.keys["ops"]) as admin:
        assert admin.model_info().adapter_slot_memory_bytes > 0


ADMIN_CALLS: dict[str, Callable[[LoraFleetClient], object]] = {
    "LoadAdapter": lambda c: c.load_adapter("acme/support"),
    "PinAdapter": lambda c: c.pin_adapter("acme/support"),
    "UnpinAdapter": lambda c: c.unpin_adapter("acme/support"),
    "UnloadAdapter": lambda c: c.unload_adapter("acme/support"),
    "RefreshAdapters": lambda c: c.refresh_adapters(),
    "GetUsage": lambda c: c.get_usage(0),
}


def test_the_admin_calls_are_the_admin_only_rpcs() -> None:
    assert set(ADMIN_CALLS) == ADMIN_RPCS
    assert len(RPC_ROLES) == 14  # 8 for every role (Classify the newest), 6 admin-only


def test_tenant_keys_get_permission_denied_on_every_admin_rpc_and_each_is_audited(
    live: Live, caplog: pytest.LogCaptureFixture
) -> None:
    with live.client(live.keys["acme"]) as acme, caplog.at_level(logging.INFO, logger="lorafleet.audit"):
        for rpc, call in ADMIN_CALLS.items():
            before = live.counted(rpc, "PERMISSION_DENIED")
            with pytest.raises(PermissionDeniedError, match=f"has the role tenant; {rpc} needs admin"):
                call(acme)
            wait_until(lambda rpc=rpc, before=before: live.counted(rpc, "PERMISSION_DENIED") == before + 1)  # type: ignore[misc]
        wait_until(lambda: len([r for r in caplog.records if r.name == "lorafleet.audit"]) >= len(ADMIN_CALLS))
    audits = [r.fields for r in caplog.records if r.name == "lorafleet.audit"]  # type: ignore[attr-defined]
    assert {a["rpc"] for a in audits} == ADMIN_RPCS
    for audit in audits:
        assert audit["status"] == "PERMISSION_DENIED"
        assert (audit["key_id"], audit["tenant"], audit["role"]) == (key_id(live.keys["acme"]), "acme", "tenant")


def test_an_admin_key_may_call_every_rpc_on_any_tenant(live: Live, caplog: pytest.LogCaptureFixture) -> None:
    with live.client(live.keys["ops"]) as admin, caplog.at_level(logging.INFO, logger="lorafleet.audit"):
        for call in ADMIN_CALLS.values():
            call(admin)
        assert admin.generate("Hello", adapter="acme/support", sampling=SHORT).adapter == "acme/support@1"
        assert "".join(admin.stream("Hello", sampling=SHORT)) is not None
        assert admin.embed("Hello", adapter="beta/secret").adapter == "beta/secret@1"
        assert admin.tokenize("Hello").ids and admin.model_info().model_id
        assert admin.get_adapter("beta/secret").name == "secret" and admin.list_adapters("beta")
        wait_until(lambda: len([r for r in caplog.records if r.name == "lorafleet.audit"]) >= len(ADMIN_CALLS))
    audits = {r.fields["rpc"]: r.fields for r in caplog.records if r.name == "lorafleet.audit"}  # type: ignore[attr-defined]
    assert set(audits) == ADMIN_RPCS  # List/Get and inference are not audited
    assert audits["PinAdapter"]["adapter"] == "acme/support" and audits["PinAdapter"]["status"] == "OK"
    assert (audits["LoadAdapter"]["key_id"], audits["LoadAdapter"]["tenant"]) == (key_id(live.keys["ops"]), "ops")


# -- the keys file changes while serving ------------------------------------------------------------


def test_keys_file_edits_apply_while_serving_and_a_broken_file_keeps_the_last_good_keys(live: Live) -> None:
    fresh = new_key(live.keys_file, "gamma", "tenant")
    with live.client(fresh) as client:
        wait_until(lambda: _works(client), timeout=5)  # picked up within the poll interval (0.2 s here)
        revoke_key(live.keys_file, key_id(fresh), datetime.now(UTC))
        wait_until(lambda: _refused(client, "was revoked"), timeout=5)
    good = live.keys_file.read_bytes()
    errors = live.reloads("error")
    try:
        live.keys_file.write_text('{"version": 1, "keys": [')  # a hand edit gone wrong
        wait_until(lambda: live.reloads("error") == errors + 1, timeout=5)
        with live.client(live.keys["acme"]) as client:
            assert _works(client)  # the last good keys stay
    finally:
        live.keys_file.write_bytes(good)
    oks = live.reloads("ok")
    wait_until(lambda: live.reloads("ok") > oks, timeout=5)


def _works(client: LoraFleetClient) -> bool:
    try:
        client.tokenize("hi")
    except UnauthenticatedError:
        return False
    return True


def _refused(client: LoraFleetClient, says: str) -> bool:
    try:
        client.tokenize("hi")
    except UnauthenticatedError as error:
        return says in error.message
    return False


def test_an_open_loopback_server_turns_authentication_on_when_a_key_appears(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = server_config(
        model=tiny_model_dir, data_dir=tmp_path, port=0, metrics_port=0, max_seq_len=256, keys_poll_seconds=0.2
    )
    with caplog.at_level(logging.INFO):
        server, target = start(build_service(config))
    try:
        assert "authentication OFF: no API keys" in caplog.text
        with LoraFleetClient(target, api_key="", timeout=60) as anonymous:
            assert anonymous.generate("Hello", sampling=SHORT).generated_tokens > 0
            assert anonymous.refresh_adapters() is not None  # no keys, no roles: an admin RPC too
            key = new_key(tmp_path / "keys.json", "acme", "admin")
            wait_until(lambda: _refused(anonymous, "no API key"), timeout=5)
        with LoraFleetClient(target, api_key=key, timeout=60) as client:
            assert client.generate("Hello", sampling=SHORT).generated_tokens > 0
        assert "authentication is now on: 1 API keys" in caplog.text
    finally:
        server.stop()


# -- no secret in the logs --------------------------------------------------------------------------


def test_no_secret_reaches_the_logs(live: Live, caplog: pytest.LogCaptureFixture) -> None:
    sent = [*live.keys.values(), format_key(key_id(live.keys["acme"]), "b" * 32)]
    with caplog.at_level(logging.DEBUG), grpc.insecure_channel(live.target) as channel:
        stub = adapters_pb2_grpc.AdaptersServiceStub(channel)
        for key in sent:
            for header in (f"Bearer {key}", key, f"Basic {key}", f"bearer  {key} "):
                metadata = (("authorization", header),)
                with contextlib.suppress(grpc.RpcError):
                    stub.ListAdapters(adapters_pb2.ListAdaptersRequest(), timeout=30, metadata=metadata)
                with contextlib.suppress(grpc.RpcError):
                    stub.LoadAdapter(adapters_pb2.LoadAdapterRequest(adapter="acme/faq"), timeout=30, metadata=metadata)
        # every call's request-log line, written just after its status: waited for, so a late one (a
        # secret in it) cannot escape the check
        calls = len(sent) * 4 * 2
        deadline = time.monotonic() + 30
        while sum(r.name == "lorafleet.requests" for r in caplog.records) < calls:
            assert time.monotonic() < deadline, "request-log lines missing"
            time.sleep(0.02)
    text = caplog.text + "".join(str(getattr(r, "fields", "")) for r in caplog.records)
    assert key_id(live.keys["acme"]) in text  # ids are logged: they name keys, they are no secret
    for key in sent:
        assert secret_of(key) not in text
        assert key not in text
    assert not re.search(r"lf_[a-z2-7]{12}_[a-z2-7]{32}", text)


def test_a_callers_strings_reach_the_log_escaped_and_errors_short(live: Live, caplog: pytest.LogCaptureFixture) -> None:
    """A newline in an adapter name would start a forged request-log line, "key=value" text in it pass
    for other fields; a 1 MB name came back as a 1 MB error (RESOURCE_EXHAUSTED: gRPC would not send
    it) and a 1 MB log line."""
    forged = "acme/x\nlorafleet.requests rpc=Generate code=OK tenant=beta"
    spoof = "acme/x status=OK tenant=beta"
    with caplog.at_level(logging.INFO), grpc.insecure_channel(live.target) as channel:
        metadata = (("authorization", f"Bearer {live.keys['acme']}"),)
        inference = inference_pb2_grpc.InferenceServiceStub(channel)
        for adapter in (forged, spoof):
            with pytest.raises(grpc.RpcError) as refused:
                request = inference_pb2.GenerateRequest(prompt="Hi", adapter=adapter)
                inference.Generate(request, timeout=30, metadata=metadata)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        adapters = adapters_pb2_grpc.AdaptersServiceStub(channel)
        with pytest.raises(grpc.RpcError) as huge:
            listing = adapters_pb2.ListAdaptersRequest(tenant="a" * (1 << 20))
            adapters.ListAdapters(listing, timeout=30, metadata=metadata)
        assert huge.value.code() == grpc.StatusCode.INVALID_ARGUMENT and len(huge.value.details() or "") < 500
        # the request-log lines are written just after the status: waited for, not slept on
        wait_until(lambda: sum(r.name == "lorafleet.requests" for r in caplog.records) >= 3)
    text = "\n".join(TextFormatter().format(r) for r in caplog.records)  # the server's default log format
    assert not [line for line in text.splitlines() if line.startswith("lorafleet.requests")]
    assert 'adapter="acme/x status=OK tenant=beta"' in text and 'adapter="acme/x\\nlorafleet.requests' in text
    assert all(len(line) < 20_000 for line in text.splitlines())


def test_usage_is_metered_per_key_tenant_and_read_by_admins(live: Live) -> None:
    with live.client(live.keys["beta"]) as beta, live.client(live.keys["ops"]) as admin:
        before = {(r.tenant, r.adapter): r for r in admin.get_usage(0, tenant="beta")}
        out = [beta.generate("Hello", sampling=SHORT) for _ in range(2)]
        out.append(beta.generate("Hi", adapter="beta/secret", sampling=SHORT))
        rows = {(r.tenant, r.adapter): r for r in admin.get_usage(0, tenant="beta")}
        base = rows[("beta", "")]
        prior = before.get(("beta", ""))
        assert base.requests - (prior.requests if prior else 0) == 2
        assert base.generated_tokens - (prior.generated_tokens if prior else 0) == sum(
            o.generated_tokens for o in out[:2]
        )
        assert rows[("beta", "beta/secret@1")].requests >= 1
        assert all(r.tenant == "beta" for r in rows.values())
        with pytest.raises(PermissionDeniedError, match="GetUsage needs admin"):
            beta.get_usage(0)
        with pytest.raises(InvalidArgumentError, match="end must be at most"):  # was INTERNAL
            admin.get_usage(0, 2**63 - 1)


def test_classify_heads_are_isolated_like_every_adapter(live: Live, tiny_model_dir: Path, tmp_path: Path) -> None:
    from classifierlib import labelled_rows, train_head, write_labelled

    from lorafleet_training.publish import publish

    spec = live.service.base.spec
    data = write_labelled(tmp_path / "rows.jsonl", labelled_rows(per_label=4))
    train_head(tiny_model_dir, spec, tmp_path / "head", data, adapter="beta/intents")
    publish(tmp_path / "head", live.service.store, spec)
    with live.client(live.keys["beta"]) as beta:
        own = beta.classify("Where is my parcel?", adapter="beta/intents")
        assert own.adapter == "beta/intents@1" and own.labels
    with live.client(live.keys["acme"]) as acme:
        with pytest.raises(NotFoundError) as foreign:
            acme.classify("Where is my parcel?", adapter="beta/intents")
        with pytest.raises(NotFoundError) as unknown:
            acme.classify("Where is my parcel?", adapter="acme/intents")
    assert str(foreign.value).replace("beta", "acme") == str(unknown.value)  # the same answer as an unknown one
