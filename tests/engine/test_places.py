"""The engine's book of places (engine/places.py) on its own: the counts a request's way moves, and the
refusals they decide. The engine-level behaviour (submit threads, preemption) is in
tests/tenants/test_submit_fairness.py and tests/hardening."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from enginelib import request

from lorafleet_server.engine.places import Places
from lorafleet_server.engine.types import EngineConfig, GenerationRequest, Principal
from lorafleet_server.errors import QueueFull


def of(tenant: str, **limits: Any) -> GenerationRequest:
    return replace(request("x"), principal=Principal(key_id=f"k{tenant}", tenant=tenant, role="tenant", **limits))


def test_a_request_way_through_leaves_every_count_at_zero() -> None:
    places = Places(EngineConfig(max_batch_size=2, max_waiting=4))
    places.reserve(of("a"))
    assert (places.submitting, places.queued, places.free_rows) == (1, 0, 2) and places.sent("a") == 1
    places.enqueue("a")
    assert (places.submitting, places.queued) == (0, 1) and places.sent("a") == 1
    places.start("a", resuming=False)
    assert (places.queued, places.free_rows, places.tenant_rows) == (0, 1, {"a": 1}) and places.sent("a") == 0
    places.preempt("a")  # waits to resume: queued, but not sent by its tenant again
    assert (places.queued, places.free_rows, places.tenant_resuming) == (1, 2, {"a": 1}) and places.sent("a") == 0
    places.start("a", resuming=True)
    places.release_row("a")
    places.reserve(of("b"))
    places.enqueue("b")
    places.unqueue("b")
    places.unreserve("b")
    assert places == Places(EngineConfig(max_batch_size=2, max_waiting=4))  # the dicts hold no zero entries


def test_the_queue_holds_free_rows_plus_max_waiting_and_a_share_for_each_other_tenant() -> None:
    places = Places(EngineConfig(max_batch_size=2, max_waiting=4))
    for _ in range(6):  # 2 free rows + max_waiting 4
        places.reserve(of("a"))
    with pytest.raises(QueueFull, match="the queue is full"):
        places.reserve(of("a"))
    places.reserve(of("b"))  # b has nothing queued: below its share (4 / 2 tenants)
    places.reserve(of("b"))
    with pytest.raises(QueueFull):  # b now holds its share of 2
        places.reserve(of("b"))
    for _ in range(2):
        places.reserve(of(f"c{_}"))  # new tenants still get in, up to twice max_waiting waiting
    with pytest.raises(QueueFull):
        places.reserve(of("d"))


def test_max_waiting_per_tenant_counts_only_what_free_rows_will_not_take() -> None:
    places = Places(EngineConfig(max_batch_size=4, max_waiting=100))
    for _ in range(4 + 2):  # 4 free rows take four; two wait
        places.reserve(of("a", max_waiting=3))
    places.reserve(of("a", max_waiting=3))
    with pytest.raises(QueueFull, match="tenant 'a' has 3 requests waiting for a row: its limit"):
        places.reserve(of("a", max_waiting=3))
    # Its max_running caps the rows it may take: with 1, only one of its requests leaves the queue.
    capped = Places(EngineConfig(max_batch_size=4, max_waiting=100))
    for _ in range(3):  # one to its one row, two waiting
        capped.reserve(of("a", max_waiting=2, max_running=1))
    with pytest.raises(QueueFull, match="has 2 requests waiting"):
        capped.reserve(of("a", max_waiting=2, max_running=1))
    # A key without overrides takes the engine's limits.
    engine_wide = Places(EngineConfig(max_batch_size=1, max_waiting=100, max_waiting_per_tenant=1))
    engine_wide.reserve(of("a"))
    engine_wide.reserve(of("a"))
    with pytest.raises(QueueFull, match="max_waiting_per_tenant is 1"):
        engine_wide.reserve(of("a"))


def test_a_queue_full_of_resumes_still_takes_a_tenants_request() -> None:
    """Preempted requests waiting to resume fill the queue, and no tenant sent them: the share of a
    tenant with none queued is the whole max_waiting, up to twice it in all."""
    places = Places(EngineConfig(max_batch_size=1, max_waiting=2))
    places.count_queued("a", +3, resuming=True)  # waiting: 3 - 1 free row = max_waiting
    places.reserve(of("b"))
    places.reserve(of("a"))
    with pytest.raises(QueueFull):  # 4 waiting: twice max_waiting
        places.reserve(of("c"))


def test_an_engines_new_config_reaches_its_refusals(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A review of the split: ``Places`` kept the config it was built with, so an engine given another
    (as benchmarks do between runs) refused by the old limits."""
    from enginelib import tiny_service

    svc = tiny_service(tiny_model_dir, tmp_path / "store", max_batch_size=1)
    try:
        engine = svc.engine
        engine.config = replace(engine.config, max_waiting_per_tenant=1)
        engine.reserve(of("a"))  # the free row takes it
        engine.reserve(of("a"))  # waits: one, the limit
        with pytest.raises(QueueFull, match="max_waiting_per_tenant is 1"):
            engine.reserve(of("a"))
        for _ in range(2):
            engine.unreserve(of("a"))
    finally:
        svc.engine.shutdown(10)
