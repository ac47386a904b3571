"""Metric values follow what the engine and the adapter tiers did (tiny model, injected registry)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from enginelib import generate, request, submit, tiny_service
from prometheus_client import CollectorRegistry, generate_latest

from lorafleet_adapters.errors import AdapterFormatError
from lorafleet_server.app import Service

PROMPT = "The capital of France is"


@pytest.fixture
def service(tiny_model_dir: Path, tmp_path: Path) -> Iterator[Service]:
    svc = tiny_service(tiny_model_dir, tmp_path / "store")
    yield svc
    svc.engine.shutdown(10)


def value(svc: Service, name: str, **labels: str) -> float:
    v = svc.metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if v is None else v


def test_each_service_has_its_own_registry(tiny_model_dir: Path, tmp_path: Path) -> None:
    registry = CollectorRegistry()
    svc = tiny_service(tiny_model_dir, tmp_path / "store")
    try:
        assert svc.metrics.registry is not registry
        assert b"lorafleet_requests_total" not in generate_latest(registry)
    finally:
        svc.engine.shutdown(10)


def test_tokens_latencies_and_finish_reasons(service: Service) -> None:
    generate(service.engine, request(PROMPT, max_new_tokens=5))
    generate(service.engine, request(PROMPT, max_new_tokens=3))
    prompt_len = len(service.engine.encode_prompt(PROMPT, ()))
    assert value(service, "lorafleet_generated_tokens_total") == 8
    assert value(service, "lorafleet_prompt_tokens_total") == 2 * prompt_len
    assert value(service, "lorafleet_time_to_first_token_seconds_count") == 2
    assert value(service, "lorafleet_time_per_output_token_seconds_count") == 2
    assert value(service, "lorafleet_queue_wait_seconds_count") == 2
    assert value(service, "lorafleet_request_generated_tokens_sum") == 8
    assert value(service, "lorafleet_generations_total", reason="length") == 2
    # The batch gauges describe the last forward; once the engine idles there is none: they read 0.
    # Two calls through the inbox: the second runs only after the loop pass that followed the first
    # (and saw no running row) has ended.
    service.engine.run(lambda: None)
    service.engine.run(lambda: None)
    assert value(service, "lorafleet_batch_rows") == 0 and value(service, "lorafleet_batch_tokens") == 0


def test_gauges_return_to_zero_after_requests_end_or_are_cancelled(service: Service) -> None:
    sinks = [submit(service.engine, request(PROMPT, max_new_tokens=40, rid=str(i))) for i in range(3)]
    assert sinks[0][0].first.wait(30)
    assert value(service, "lorafleet_running_requests") >= 1
    for _, handle in sinks:
        handle.cancel()
    for sink, _ in sinks:
        sink.wait(10)
    deadline = time.monotonic() + 5
    while value(service, "lorafleet_running_requests") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert value(service, "lorafleet_running_requests") == 0
    assert value(service, "lorafleet_waiting_requests") == 0
    assert value(service, "lorafleet_generations_total", reason="cancelled") == 3


def test_adapter_cache_counters_by_tier(service: Service, peft_adapter: Any) -> None:
    service.store.import_peft(peft_adapter(seed=5), "acme", "bot", service.base.spec)
    generate(service.engine, request(PROMPT, adapter="acme/bot", max_new_tokens=2))
    assert value(service, "lorafleet_adapter_cache_misses_total", tier="host") == 1
    assert value(service, "lorafleet_adapter_cache_misses_total", tier="device") == 1
    assert value(service, "lorafleet_adapter_loads_total", tier="device") == 1
    assert value(service, "lorafleet_adapter_load_duration_seconds_count", source="store") == 1
    assert value(service, "lorafleet_adapter_load_duration_seconds_count", source="host") == 1
    generate(service.engine, request(PROMPT, adapter="acme/bot", max_new_tokens=2))
    assert value(service, "lorafleet_adapter_cache_hits_total", tier="device") == 1
    assert value(service, "lorafleet_adapters_resident", tier="device") == 1
    assert value(service, "lorafleet_adapters_resident", tier="host") == 1
    service.engine.call(lambda: service.engine.adapters.unload(next(iter(service.engine.adapters.slots.snapshot()))))
    time.sleep(0.2)
    assert value(service, "lorafleet_adapter_evictions_total", tier="device") == 1
    assert value(service, "lorafleet_adapters_resident", tier="device") == 0


def test_failed_adapter_load_is_counted(service: Service, tmp_path: Path) -> None:
    vdir = service.store.root / "acme" / "broken" / "versions" / "1"
    vdir.mkdir(parents=True)
    (vdir / "manifest.json").write_text("{}")
    with pytest.raises(AdapterFormatError, match="manifest"):
        service.engine.submit(request(PROMPT, adapter="acme/broken@1", max_new_tokens=2), lambda _e: None)
    assert value(service, "lorafleet_adapter_load_failures_total") == 1


def test_names_follow_prometheus_conventions(service: Service) -> None:
    text = generate_latest(service.metrics.registry).decode()
    names = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    assert names and all(n.startswith("lorafleet_") for n in names)
    assert not [n for n in names if n.endswith("_ms") or ":" in n]
    for forbidden in ("tenant", "adapter="):
        assert forbidden not in text
