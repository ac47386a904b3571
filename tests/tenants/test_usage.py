"""Usage metering: per tenant and adapter, requests and tokens, read back by time window."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from enginelib import generate, request, tiny_service

from lorafleet_server.app import Service
from lorafleet_server.engine.types import FinishReason, Principal, Summary
from lorafleet_server.engine.usage import UsageMeter, UsageRow


def summary(adapter: str = "", prompt: int = 5, generated: int = 3) -> Summary:
    return Summary(FinishReason.LENGTH, prompt, generated, adapter, "r")


def test_meter_sums_by_tenant_and_adapter_within_the_window() -> None:
    now = [1_000_020.0]  # 20 s into minute 16667
    meter = UsageMeter(retention_seconds=3600, clock=lambda: now[0])
    meter.record("acme", summary("acme/bot@1"))
    meter.record("acme", summary("acme/bot@1", 7, 1))
    meter.record("acme", summary(""))
    meter.record("beta", summary("beta/x@2"))
    now[0] += 120  # two minutes later
    meter.record("acme", summary("acme/bot@2"))
    everything = meter.report(0, 2_000_000)
    assert everything == [
        UsageRow("acme", "", 1, 5, 3),
        UsageRow("acme", "acme/bot@1", 2, 12, 4),
        UsageRow("acme", "acme/bot@2", 1, 5, 3),
        UsageRow("beta", "beta/x@2", 1, 5, 3),
    ]
    assert meter.report(0, 2_000_000, tenant="beta") == [UsageRow("beta", "beta/x@2", 1, 5, 3)]
    assert [r.adapter for r in meter.report(1_000_080, 2_000_000)] == ["acme/bot@2"]  # the later minute only
    now[0] += 7200  # past the retention: old buckets go at the next record
    meter.record("beta", summary("beta/x@2"))
    assert meter.report(0, 2_000_000) == [UsageRow("beta", "beta/x@2", 1, 5, 3)]


@pytest.fixture
def service(tiny_model_dir: Path, tmp_path: Path) -> Iterator[Service]:
    svc = tiny_service(tiny_model_dir, tmp_path / "store")
    yield svc
    svc.engine.shutdown(10)


def test_engine_meters_each_finished_request_by_its_tenant(service: Service, peft_adapter: Any) -> None:
    service.store.import_peft(peft_adapter(seed=1), "acme", "bot", service.base.spec)
    keyed = Principal(key_id="k1", tenant="acme", role="tenant")
    a = generate(service.engine, replace(request("Hello", adapter="acme/bot", max_new_tokens=3), principal=keyed))
    b = generate(service.engine, replace(request("Hello", max_new_tokens=2), principal=keyed))
    c = generate(service.engine, request("Hi", max_new_tokens=2))  # no key, base model: tenant ""
    e = generate(service.engine, request("Embed me", embed=True))
    rows = {(r.tenant, r.adapter): r for r in service.engine.usage.report(0, 4e9)}
    assert rows[("acme", "acme/bot@1")] == UsageRow(
        "acme", "acme/bot@1", 1, a.summary.prompt_tokens, a.summary.generated_tokens
    )
    assert rows[("acme", "")].generated_tokens == b.summary.generated_tokens
    assert rows[("", "")].requests == 2
    assert rows[("", "")].prompt_tokens == c.summary.prompt_tokens + e.summary.prompt_tokens
