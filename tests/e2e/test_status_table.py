"""Every row of the status table (server/lorafleet_server/edge/status.py), as a client sees it over gRPC.

One case per row: a real RPC (inference or admin) that makes the server raise that exception, and the
exact status code the client gets. The expected codes are written here, not read from the table, so a
row that changes is caught; a row without a case fails ``test_every_row_of_the_status_table_has_a_case``.
A small server on the tiny model keeps this fast and lets the cases set tight limits.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import torch
from e2elib import wait_until
from enginelib import engine_held, server_config
from grpc import StatusCode as Code

from lorafleet import LoraFleetClient, LoraFleetError, Message, Sampling
from lorafleet_adapters.errors import (
    AdapterFormatError,
    AdapterIncompatible,
    AdapterNotFound,
    InvalidAdapterRef,
    StoreUnavailable,
)
from lorafleet_adapters.head import ClassifierHead, publish_head
from lorafleet_server.app import Service, build_service
from lorafleet_server.config import ServerConfig
from lorafleet_server.edge.status import STATUS_TABLE
from lorafleet_server.engine.engine import Engine
from lorafleet_server.errors import (
    AdapterBusy,
    EngineTimeout,
    InvalidRequest,
    PermissionDenied,
    QueueFull,
    ShuttingDown,
    WrongAdapterKind,
)
from lorafleet_server.grpc.server import BackgroundServer
from lorafleet_server.tenants.errors import AuthenticationError
from lorafleet_server.tenants.keys import PepperSource, create_key


@dataclass
class TableServer:
    service: Service
    client: LoraFleetClient  # with an admin key
    port: int
    tenant_key: str  # a tenant key of "acme"

    def client_with(self, key: str) -> LoraFleetClient:
        return LoraFleetClient(f"127.0.0.1:{self.port}", api_key=key, timeout=60)

    @property
    def engine(self) -> Engine:
        return self.service.engine


def _config(data: Path, model: Path) -> ServerConfig:
    return server_config(
        model=model,
        data_dir=data,
        port=0,
        metrics_port=0,
        max_batch_size=1,  # with max_waiting 1, a third queued request is refused
        max_waiting=1,
        max_seq_len=256,
        max_new_tokens=64,
        default_max_new_tokens=4,
        max_loaded_adapters=1,  # one pinned adapter leaves no slot for another
        max_lora_rank=32,
        adapter_poll_seconds=0,
    )


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, peft_adapter: Any) -> Iterator[TableServer]:
    data = tmp_path_factory.mktemp("status-table")
    config = _config(data, tiny_model_dir)
    now = datetime.now(UTC)
    admin_key = create_key(config.keys_path, PepperSource(config.keys_path), tenant="ops", role="admin", now=now).key
    tenant_key = create_key(config.keys_path, PepperSource(config.keys_path), tenant="acme", role="tenant", now=now).key
    service = build_service(config)  # keys in the file: authentication is on
    spec = service.base.spec
    for i in range(2):
        service.store.import_peft(peft_adapter(seed=60 + i), "acme", f"a{i}", spec)
    # A version whose weights were damaged after publishing (the manifest's sha256 no longer matches).
    tampered = service.store.import_peft(peft_adapter(seed=62), "acme", "tampered", spec)
    weights = service.store.version_dir(tampered) / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    # A version built for another base model.
    other = service.store.import_peft(peft_adapter(seed=63), "acme", "otherbase", spec)
    manifest = service.store.version_dir(other) / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "base_fingerprint": "sha256:" + "0" * 64}))
    # A classifier head (any weights do: the kind is refused before the head runs).
    hidden = service.engine.runner.hidden_size
    head = ClassifierHead(("no", "yes"), torch.zeros(2, hidden), torch.zeros(2))
    publish_head(service.store, "acme", "head", head, spec)
    server = BackgroundServer(service)
    port = server.start()
    client = LoraFleetClient(f"127.0.0.1:{port}", api_key=admin_key, timeout=60)
    client.wait_for_ready(30)
    yield TableServer(service, client, port, tenant_key)
    client.close()
    server.stop()


Outcome = tuple[Code, str]  # the status code and message the client got


def outcome_of(call: Callable[[], object]) -> Outcome:
    try:
        call()
    except LoraFleetError as exc:
        return exc.code, exc.message
    return Code.OK, ""


def code_of(call: Callable[[], object]) -> Code:
    return outcome_of(call)[0]


def _authentication_error(t: TableServer, monkeypatch: pytest.MonkeyPatch) -> Outcome:
    with t.client_with("") as anonymous:
        return outcome_of(lambda: anonymous.generate("hi"))


def _permission_denied(t: TableServer, monkeypatch: pytest.MonkeyPatch) -> Outcome:
    with t.client_with(t.tenant_key) as tenant:
        assert tenant.generate("hi", adapter="acme/a0", sampling=Sampling(max_new_tokens=1)).adapter == "acme/a0@1"
        return outcome_of(lambda: tenant.load_adapter("acme/a0"))  # an admin RPC


def _invalid_request(t: TableServer, monkeypatch: pytest.MonkeyPatch) -> Outcome:
    return outcome_of(lambda: t.client.generate("hi", sampling=Sampling(top_p=1.5)))


def _invalid_adapter_ref(t: TableServer, monkeypatch: pytest.MonkeyPatch) -> Outcome:
    return outcome_of(lambda: t.client.get_adapter("acme/a0@1"))  # GetAdapter takes no version


def _adapter_not_found(t: TableServer, monkeypatch: pytest.MonkeyPatch) -> Outcome:
    return outcome_of(lambda: t.client.load_adapter("acme/nothing"))


def _adapter_incompatible(t: TableServer, monkeypatch: pytest.MonkeyPatch) -> Outcome:
    return outcome_of(lambda: t.client.load_adapter("acme/otherbase"))


def _adapter_format_error(t: TableServer, monkeypatch: pytest.MonkeyPatch) -> Outcome:
    return outcome_of(lambda: list(t.client.stream("hi", adapter="acme/tampered", sampling=Sampling(max_new_tokens=2))))


def _wrong_adapter_kind(t: TableServer, monkeypatch: pytest.MonkeyPatch) -> Outcome:
    return outcome_of(lambda: t.client.generate("hi", adapter="acme/head", sampling=Sampling(max_new_tokens=2)))


def _queue_full(t: TableServer, monkeypatch: pytest.MonkeyPatch) -> Outcome:
    # The engine is held, so nothing leaves the queue: one request for the free row, one waiting,
    # then the queue is full.
    codes: list[Code] = []
    with engine_held(t.engine):
        threads = [
            threading.Thread(target=lambda: codes.append(code_of(lambda: t.client.generate("hi")))) for _ in range(2)
        ]
        for thread in threads:
            thread.start()
        wait_until(lambda: t.engine.load_stats() == (0, 2), 30, "two requests queued")
        refused = outcome_of(lambda: t.client.generate("hi"))
    for thread in threads:
        thread.join(60)
    assert codes == [Code.OK, Code.OK]
    return refused


def _adapter_busy(t: TableServer, monkeypatch: pytest.MonkeyPatch) -> Outcome:
    assert t.client.pin_adapter("acme/a0") == "acme/a0@1"  # the only slot
    try:
        return outcome_of(lambda: t.client.load_adapter("acme/a1"))
    finally:
        t.client.unpin_adapter("acme/a0")


def _shutting_down(t: TableServer, monkeypatch: pytest.MonkeyPatch) -> Outcome:
    # A second server on the same store whose engine has stopped while gRPC still takes calls.
    config = t.service.config
    assert config.model is not None
    stopped = build_service(
        dataclasses.replace(_config(config.data_dir / "stopped", config.model), adapter_store=config.store_root)
    )
    server = BackgroundServer(stopped)
    port = server.start()
    try:
        with LoraFleetClient(f"127.0.0.1:{port}", timeout=60) as client:
            assert client.generate("hi").generated_tokens > 0
            stopped.engine.shutdown(10)
            assert code_of(lambda: list(client.stream(messages=[Message("user", "hi")]))) == Code.UNAVAILABLE
            assert code_of(lambda: client.unload_adapter("acme/a0")) == Code.UNAVAILABLE  # admin: Engine.run
            return outcome_of(lambda: client.generate("hi"))
    finally:
        server.stop()


def _store_unavailable(t: TableServer, monkeypatch: pytest.MonkeyPatch) -> Outcome:
    root = t.service.store.root
    moved = root.with_name(root.name + ".away")
    root.rename(moved)  # the store's volume went away
    try:
        return outcome_of(lambda: t.client.list_adapters())
    finally:
        moved.rename(root)


def _engine_timeout(t: TableServer, monkeypatch: pytest.MonkeyPatch) -> Outcome:
    # Admin calls wait for the engine thread with a bound (30 s); here 0.3 s, and the engine is held.
    monkeypatch.setattr(t.engine, "run", functools.partial(Engine.run, t.engine, timeout=0.3))
    with engine_held(t.engine):
        return outcome_of(lambda: t.client.unload_adapter("acme/a0"))


def _timeout_error(t: TableServer, monkeypatch: pytest.MonkeyPatch) -> Outcome:
    def slow_store() -> Any:
        raise TimeoutError("the store did not answer in time")

    monkeypatch.setattr(t.engine.adapters, "refresh", slow_store)
    return outcome_of(lambda: t.client.refresh_adapters())


def _a_bug(t: TableServer, monkeypatch: pytest.MonkeyPatch) -> Outcome:
    def broken() -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(t.engine.adapters, "refresh", broken)
    return outcome_of(lambda: t.client.refresh_adapters())


Case = Callable[[TableServer, pytest.MonkeyPatch], Outcome]

# exception -> (the status a client must see, a piece of that exception's message, the RPC that raises it)
CASES: dict[type[BaseException], tuple[Code, str, Case]] = {
    AuthenticationError: (Code.UNAUTHENTICATED, "no API key", _authentication_error),  # Generate
    PermissionDenied: (Code.PERMISSION_DENIED, "needs", _permission_denied),  # LoadAdapter
    InvalidRequest: (Code.INVALID_ARGUMENT, "top_p must be in", _invalid_request),  # Generate
    InvalidAdapterRef: (Code.INVALID_ARGUMENT, "without a version", _invalid_adapter_ref),  # GetAdapter
    AdapterNotFound: (Code.NOT_FOUND, "acme/nothing not found", _adapter_not_found),  # LoadAdapter
    AdapterIncompatible: (Code.FAILED_PRECONDITION, "was built for base", _adapter_incompatible),  # LoadAdapter
    AdapterFormatError: (Code.FAILED_PRECONDITION, "checksum mismatch", _adapter_format_error),  # GenerateStream
    WrongAdapterKind: (Code.FAILED_PRECONDITION, "of kind 'head'", _wrong_adapter_kind),  # Generate
    QueueFull: (Code.RESOURCE_EXHAUSTED, "the queue is full", _queue_full),  # Generate
    AdapterBusy: (Code.RESOURCE_EXHAUSTED, "every device slot is in use", _adapter_busy),  # LoadAdapter
    ShuttingDown: (Code.UNAVAILABLE, "shutting down", _shutting_down),  # Generate, GenerateStream, UnloadAdapter
    StoreUnavailable: (Code.UNAVAILABLE, "is unavailable", _store_unavailable),  # ListAdapters
    EngineTimeout: (Code.DEADLINE_EXCEEDED, "did not run the call within", _engine_timeout),  # UnloadAdapter
    TimeoutError: (Code.DEADLINE_EXCEEDED, "the store did not answer", _timeout_error),  # RefreshAdapters
    # no row: a bug is INTERNAL, its text for the server's log only (it was sent; an architecture review)
    RuntimeError: (Code.INTERNAL, "internal error (request id ", _a_bug),
}


def test_an_unreachable_store_is_not_described_to_the_caller(
    table: TableServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The store's message names its location (an S3 endpoint, bucket and prefix, the credentials to
    check): the operator's log keeps it, a tenant gets the request id to quote."""
    root = str(table.service.store.root)
    # The wait stays inside at_level: the request's log line is written as its call ends, which may be
    # after the client has its status, and outside the block the logger is back at the level an
    # earlier test left it at (WARNING drops the line).
    with caplog.at_level(logging.INFO, logger="lorafleet.requests"):
        code, got = _store_unavailable(table, monkeypatch)
        assert code == Code.UNAVAILABLE and "request id" in got
        assert root not in got
        deadline = time.monotonic() + 5
        while not any(root in str(getattr(r, "fields", {}).get("error", "")) for r in caplog.records):
            assert time.monotonic() < deadline, "the request log kept no store message"
            time.sleep(0.02)


def test_every_row_of_the_status_table_has_a_case() -> None:
    rows = [kind for kind, _ in STATUS_TABLE]
    missing = [kind.__name__ for kind in rows if kind not in CASES]
    assert not missing, f"rows of STATUS_TABLE without a case here: {missing}"
    stale = [kind.__name__ for kind in CASES if kind not in rows and kind is not RuntimeError]
    assert not stale, f"cases for rows STATUS_TABLE no longer has: {stale}"
    assert RuntimeError not in rows  # the INTERNAL case stands for exceptions the table does not name


@pytest.mark.parametrize("kind", list(CASES), ids=lambda kind: kind.__name__)
def test_the_client_sees_the_status_of_the_row(
    table: TableServer, monkeypatch: pytest.MonkeyPatch, kind: type[BaseException]
) -> None:
    want, message, case = CASES[kind]
    code, got = case(table, monkeypatch)
    assert code == want, got
    assert message in got  # raised by the intended cause, not another one with the same code
    if want == Code.INTERNAL:
        assert "a bug" not in got
    monkeypatch.undo()
    # The server keeps serving after each error.
    assert table.client.generate("hi", sampling=Sampling(max_new_tokens=2)).generated_tokens == 2
