"""Before the engine's queue: a tenant's requests waiting for a worker thread (to be tokenized) count
toward its limits, wait their tenant's turn, and are dropped when their caller leaves.

Found by an outside review: on one first-come pool, a tenant that sent requests costing 0.3 s of
tokenizing each and abandoned them held another tenant's 4-token request for 154 s (engine idle), past
its own max_waiting, since a request counted only once tokenized."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from enginelib import Collected, request, tiny_service

from lorafleet_adapters.errors import AdapterNotFound
from lorafleet_server.app import Service
from lorafleet_server.engine.engine import SUBMIT_THREADS
from lorafleet_server.engine.stream import EngineStream
from lorafleet_server.engine.types import GenerationRequest, Principal
from lorafleet_server.errors import QueueFull

SLOW_SECONDS = 0.5


def as_tenant(req: GenerationRequest, tenant: str, **limits: Any) -> GenerationRequest:
    return replace(req, principal=Principal(key_id=f"k{tenant}", tenant=tenant, role="tenant", **limits))


@pytest.fixture
def service(tiny_model_dir: Path, tmp_path: Path) -> Iterator[Service]:
    svc = tiny_service(tiny_model_dir, tmp_path / "store", max_batch_size=4, max_seq_len=256)
    yield svc
    svc.engine.shutdown(10)


@pytest.fixture
def slow_prompts(service: Service, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A prompt starting "slow" takes SLOW_SECONDS to encode; returns the prompts encoded, in the order
    their encoding started."""
    encoded: list[str] = []
    encode = service.engine.prompts.encode

    def slowly(prompt: str | None, *args: Any, **kwargs: Any) -> list[int]:
        encoded.append(str(prompt))
        if prompt is not None and prompt.startswith("slow"):
            time.sleep(SLOW_SECONDS)
        return encode(prompt, *args, **kwargs)

    monkeypatch.setattr(service.engine.prompts, "encode", slowly)
    return encoded


def test_another_tenants_request_does_not_wait_behind_a_flood(service: Service, slow_prompts: list[str]) -> None:
    stream = EngineStream(service.engine)
    flood = 5 * SUBMIT_THREADS  # five rounds of the pool: 2.5 s of tokenizing on one queue

    async def scenario() -> None:
        sent = [
            asyncio.ensure_future(stream.submit(as_tenant(request(f"slow {i}", max_new_tokens=1), "a")))
            for i in range(flood)
        ]
        await asyncio.sleep(0.1)
        submitted = await stream.submit(as_tenant(request("Hi", max_new_tokens=1), "b"))
        async for _ in submitted.events():
            pass
        for handle in await asyncio.gather(*sent):
            async for _ in handle.events():
                pass

    asyncio.run(scenario())
    assert len(slow_prompts) == flood + 1
    # b's request is taken up after the items in progress and at most one more of a's (its turn came
    # first), not after a's whole queue (five rounds of the pool)
    assert slow_prompts.index("Hi") <= SUBMIT_THREADS + 1, slow_prompts.index("Hi")


def test_abandoned_requests_are_dropped_before_they_are_tokenized(service: Service, slow_prompts: list[str]) -> None:
    stream = EngineStream(service.engine)
    flood = 5 * SUBMIT_THREADS

    async def scenario() -> None:
        sent = [
            asyncio.ensure_future(stream.submit(as_tenant(request(f"slow {i}", max_new_tokens=1), "a")))
            for i in range(flood)
        ]
        await asyncio.sleep(0.1)
        for task in sent:
            task.cancel()  # the callers leave
        await asyncio.gather(*sent, return_exceptions=True)

    asyncio.run(scenario())
    time.sleep(2 * SLOW_SECONDS)
    assert len(slow_prompts) <= SUBMIT_THREADS, len(slow_prompts)  # those a worker had started; no more
    deadline = time.monotonic() + 10
    while service.engine.load_stats() != (0, 0) or service.engine.places.submitting:
        assert time.monotonic() < deadline, "an abandoned request's place was never given back"
        time.sleep(0.05)


def test_requests_waiting_for_a_worker_count_toward_the_tenants_limit(service: Service) -> None:
    """Reserved places count at once: 4 take the free rows, 2 wait (the limit), the next is refused,
    before any worker has tokenized one; a place given back is free again."""
    engine = service.engine
    limits = {"max_waiting": 2}
    reqs = [as_tenant(request(f"p{i}"), "a", **limits) for i in range(7)]
    for req in reqs[:6]:
        engine.reserve(req)
    with pytest.raises(QueueFull, match="tenant 'a' has 2 requests waiting for a row"):
        engine.reserve(reqs[6])
    engine.unreserve(reqs[0])
    engine.reserve(reqs[6])
    for req in reqs[1:]:
        engine.unreserve(req)
    assert engine.places.submitting == 0 and not engine.places.tenant_submitting


def test_a_failed_submit_gives_its_place_back(service: Service) -> None:
    engine = service.engine
    with pytest.raises(AdapterNotFound):
        engine.submit(as_tenant(request("Hi", adapter="a/missing"), "a"), Collected())
    assert engine.places.submitting == 0 and not engine.places.tenant_submitting
    sink = Collected()
    engine.submit(as_tenant(request("Hi", max_new_tokens=1), "a"), sink)
    assert sink.wait().summary.generated_tokens == 1
    assert engine.places.submitting == 0 and engine.load_stats() == (0, 0)


def test_a_request_reserved_before_the_drain_is_refused_without_tokenizing(
    service: Service, slow_prompts: list[str]
) -> None:
    """Found by a review: a request that waited for a worker while the drain began was resolved and
    tokenized (perhaps read from the store) before it was refused."""
    from lorafleet_server.errors import ShuttingDown

    engine = service.engine
    req = as_tenant(request("slow one", adapter="a/missing"), "a")
    arrived = engine.reserve(req)
    with engine._lock:
        engine._accepting = False  # what the drain's end does
    with pytest.raises(ShuttingDown):
        engine.submit(req, Collected(), reserved_at=arrived)
    assert slow_prompts == [] and engine.places.submitting == 0


def test_a_tenants_requests_waiting_to_resume_use_its_running_limit(service: Service) -> None:
    """Found by a review: with max_running 2 and two of its requests preempted (waiting to resume, rows
    free), a tenant with max_waiting 1 had three more accepted as if free rows would take them; the
    resumes take its two rows back first, so all three would wait."""
    engine = service.engine
    limits = {"max_waiting": 1, "max_running": 2}
    with engine._lock:
        engine.places.count_queued("a", +2, resuming=True)  # as two preemptions leave it
    try:
        first = as_tenant(request("p0"), "a", **limits)
        engine.reserve(first)
        with pytest.raises(QueueFull, match="tenant 'a' has 1 requests waiting for a row"):
            engine.reserve(as_tenant(request("p1"), "a", **limits))
        engine.unreserve(first)
    finally:
        with engine._lock:
            engine.places.count_queued("a", -2, resuming=True)


def test_a_cancel_that_comes_once_the_engine_is_stopping_is_not_metered(service: Service) -> None:
    """Found by a review: gRPC cancels its calls when its own grace runs out or at a second signal; a
    cancel handled after the stop began was metered as the client's, and the call was retried (and
    billed) elsewhere. The cut is the server's: not metered."""
    from enginelib import submit

    engine = service.engine
    sink, handle = submit(engine, request("Hi", max_new_tokens=50), hold_at=1)
    sink.wait_held(30)
    engine.abort()  # a second signal: the stop begins ...
    handle.cancel()  # ... and gRPC closes the call
    sink.release()
    assert sink.wait(30).summary.finish_reason.value == "cancelled"
    assert engine.usage.report(0, 4e9) == []
