"""Calls into the engine thread: typed inbox messages, bounded waits, admin prefetch through the manager."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from enginelib import generate, request, tiny_service

from lorafleet_adapters.prompt import PromptTemplate
from lorafleet_server.app import Service
from lorafleet_server.edge.status import status_for
from lorafleet_server.engine import engine as engine_module
from lorafleet_server.engine.admin import AdapterAdmin, Tier
from lorafleet_server.engine.engine import Engine
from lorafleet_server.errors import EngineTimeout, ShuttingDown

PROMPT = "The capital of France is"


@pytest.fixture
def service(tiny_model_dir: Path, tmp_path: Path) -> Iterator[Service]:
    svc = tiny_service(tiny_model_dir, tmp_path / "store")
    yield svc
    svc.engine.shutdown(10)


@contextmanager
def engine_thread_held(engine: Engine) -> Iterator[None]:
    """Keep the engine thread busy inside a call until the block ends (a step that will not finish)."""
    entered, leave = threading.Event(), threading.Event()

    def hold() -> None:
        entered.set()
        leave.wait(30)

    holder = engine.call(hold)
    assert entered.wait(10), "the engine thread never ran the holding call"
    try:
        yield
    finally:
        leave.set()
        holder.result(10)


def test_a_call_returns_its_result_and_a_raising_call_propagates(service: Service) -> None:
    assert service.engine.run(lambda: threading.current_thread().name) == "engine"

    def broken() -> None:
        raise ValueError("bad admin call")

    with pytest.raises(ValueError, match="bad admin call"):
        service.engine.run(broken)
    assert generate(service.engine, request(PROMPT, max_new_tokens=2)).summary.generated_tokens == 2


def test_a_call_that_raises_timeout_error_itself_is_not_an_engine_timeout(service: Service) -> None:
    def slow_disk() -> None:
        raise TimeoutError("the disk did not answer")

    with pytest.raises(TimeoutError, match="disk") as caught:
        service.engine.run(slow_disk)
    assert not isinstance(caught.value, EngineTimeout)


def test_calls_after_shutdown_fail_with_shutting_down(tiny_model_dir: Path, tmp_path: Path) -> None:
    svc = tiny_service(tiny_model_dir, tmp_path / "store")
    svc.engine.shutdown(10)
    ran: list[int] = []
    future = svc.engine.call(lambda: ran.append(1))
    assert isinstance(future.exception(timeout=1), ShuttingDown)
    with pytest.raises(ShuttingDown):
        svc.engine.run(lambda: ran.append(2), timeout=1)
    with pytest.raises(ShuttingDown):
        svc.engine.submit(request(PROMPT), lambda _e: None)
    assert ran == []


def test_a_call_the_engine_cannot_reach_in_time_raises_engine_timeout(service: Service) -> None:
    ran: list[str] = []
    with engine_thread_held(service.engine):
        started = time.monotonic()
        with pytest.raises(EngineTimeout) as caught:
            service.engine.run(lambda: ran.append("late"), timeout=0.05)
        assert time.monotonic() - started < 5
    assert status_for(caught.value) is grpc.StatusCode.DEADLINE_EXCEEDED
    # The timed-out call was withdrawn, not run later behind the caller's back.
    assert service.engine.run(lambda: len(ran)) == 0
    assert generate(service.engine, request(PROMPT, max_new_tokens=2)).summary.generated_tokens == 2


def test_admin_calls_time_out_instead_of_hanging(service: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    service.store.publish_prompt("acme", "bot", PromptTemplate(system="Be brief."), service.base.spec)
    engine = service.engine
    original = engine.run

    def impatient(fn: Callable[[], Any], timeout: float = 0.0) -> Any:
        return original(fn, timeout=0.05)  # the admin's own default is 30 s

    monkeypatch.setattr(engine, "run", impatient)
    admin = AdapterAdmin(engine)
    with engine_thread_held(engine):
        with pytest.raises(EngineTimeout):
            admin.unload("acme/bot")
        with pytest.raises(EngineTimeout):
            admin.get("acme/bot")
    assert admin.unload("acme/bot")[1] is True


def test_shutdown_of_a_stuck_engine_is_bounded(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc = tiny_service(tiny_model_dir, tmp_path / "store")
    monkeypatch.setattr(engine_module, "ABORT_JOIN_SECONDS", 0.2)
    with engine_thread_held(svc.engine):
        started = time.monotonic()
        svc.engine.shutdown(0.1)
        assert time.monotonic() - started < 5
    svc.engine._thread.join(10)  # once released, the thread sees the abort and stops
    assert not svc.engine._thread.is_alive()
    with pytest.raises(ShuttingDown):
        svc.engine.run(lambda: None, timeout=10)


def test_prefetch_counts_the_device_load_like_a_request_driven_load(service: Service, peft_adapter: Any) -> None:
    for name, seed in (("pre", 11), ("req", 12)):
        service.store.import_peft(peft_adapter(seed=seed), "acme", name, service.base.spec)

    def counts() -> tuple[float, float]:
        registry = service.metrics.registry
        loads = registry.get_sample_value("lorafleet_adapter_loads_total", {"tier": "device"}) or 0.0
        timed = registry.get_sample_value("lorafleet_adapter_load_duration_seconds_count", {"source": "host"}) or 0.0
        return loads, timed

    admin = AdapterAdmin(service.engine)
    assert counts() == (0, 0)
    key, tier = admin.load("acme/pre")
    assert (str(key), tier) == ("acme/pre@1", Tier.DEVICE)
    assert counts() == (1, 1)  # one device load, timed as host → device
    generate(service.engine, request(PROMPT, adapter="acme/req", max_new_tokens=2))
    assert counts() == (2, 2)  # a request-driven load counts the same
    assert admin.load("acme/pre") == (key, Tier.DEVICE)
    assert counts() == (2, 2)  # already resident: nothing loaded, nothing counted
    snapshot = service.engine.run(service.engine.adapters.slot_snapshot)
    assert key in snapshot and snapshot[key].leases == 0  # a prefetch holds no lease
