"""Usage metering: per tenant and adapter, requests and tokens, read back by time window."""

from __future__ import annotations

import logging
import random
import sys
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from enginelib import generate, request, submit, tiny_service

from lorafleet_server.app import Service
from lorafleet_server.engine.types import FinishReason, Principal, Summary
from lorafleet_server.engine.usage import UsageMeter, UsageRow


def summary(adapter: str = "", prompt: int = 5, generated: int = 3) -> Summary:
    return Summary(FinishReason.LENGTH, prompt, generated, adapter, "r")


def test_meter_sums_by_tenant_and_adapter_within_the_window() -> None:
    now = [1_000_020.0]  # 20 s into minute 16667
    meter = UsageMeter(retention_seconds=3600, clock=lambda: now[0], steady=lambda: now[0])
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


def test_every_record_is_a_usage_log_line_with_the_meters_numbers(caplog: pytest.LogCaptureFixture) -> None:
    """The meter is memory only; the usage log is the durable per-request record, with its numbers (the
    request log has the edge's, fewer for a caller that left before the end)."""
    meter = UsageMeter(clock=lambda: 1_000_030.0)
    with caplog.at_level(logging.INFO, logger="lorafleet.usage"):
        meter.record("acme", Summary(FinishReason.CANCELLED, 40, 17, "acme/bot@3", "rid-1"))
        meter.record("acme", Summary(FinishReason.LENGTH, 40, 5, "acme/bot@3", "rid-1"))  # the same id again
    line, again = [r.fields for r in caplog.records if r.name == "lorafleet.usage"]  # type: ignore[attr-defined]
    # The request id is the caller's, the same for both; each record has a usage id of its own.
    assert len({line.pop("usage_id"), again.pop("usage_id")}) == 2
    assert line == {
        "request_id": "rid-1",
        "tenant": "acme",
        "adapter": "acme/bot@3",
        "minute": 1_000_020,
        "prompt_tokens": 40,
        "generated_tokens": 17,
        "finish_reason": "cancelled",
    }


def test_meter_agrees_with_a_plain_sum_of_every_request_within_the_retention() -> None:
    """Random traffic over ~14 hours with a 1-hour retention (pairs expire and their ids are reused), read
    back by random windows, many ending in the open minute as GetUsage's default does: each read equals
    the sum of the requests recorded in its minutes that the retention still holds."""
    rng = random.Random(7)
    now = [6_000_000.0]
    meter = UsageMeter(retention_seconds=3600, clock=lambda: now[0], steady=lambda: now[0])
    log: list[tuple[int, str, str, int, int]] = []  # (minute, tenant, adapter, prompt, generated)
    pairs = [(f"t{i % 5}", f"t{i % 5}/a{i}@{1 + i % 2}" if i % 4 else "") for i in range(200)]
    for _ in range(6000):
        now[0] += rng.choice([0.0, 0.5, 2.0, 31.0])
        tenant, adapter = rng.choice(pairs)
        prompt, generated = rng.randint(1, 900), rng.randint(0, 64)
        meter.record(tenant, summary(adapter, prompt, generated))
        log.append((int(now[0]) // 60, tenant, adapter, prompt, generated))
        if rng.random() < 0.01:
            start = rng.uniform(now[0] - 4000, now[0])
            end = now[0] + 1 if rng.random() < 0.5 else rng.uniform(start + 1, now[0] + 120)
            who = rng.choice([None, "t0", "t3"])
            first, last = (b // 60 for b in UsageMeter.window(start, end))
            horizon = int(now[0]) // 60 - 60
            expected: dict[tuple[str, str], list[int]] = {}
            for minute, t, a, p, g in log:
                if first <= minute < last and minute >= horizon and who in (None, t):
                    row = expected.setdefault((t, a), [0, 0, 0])
                    row[0] += 1
                    row[1] += p
                    row[2] += g
            assert meter.report(start, end, who) == [UsageRow(t, a, *c) for (t, a), c in sorted(expected.items())]
    assert meter.buckets() <= 61 * len(pairs)  # bounded by the retention, not by the 6,000 requests
    assert len(meter._names) < len(pairs)  # expired pairs' ids were reused


def test_meter_reuses_the_ids_of_expired_pairs_and_follows_a_clock_stepped_back() -> None:
    now, passed = [1_000_000.0], [0.0]  # the wall clock (stepped back below) and the time that passed
    meter = UsageMeter(retention_seconds=120, clock=lambda: now[0], steady=lambda: passed[0])

    def wait(seconds: float) -> None:
        now[0] += seconds
        passed[0] += seconds

    for i in range(50):  # 50 pairs, one a minute: only the last 3 minutes' stay
        meter.record("acme", summary(f"acme/a{i}@1"))
        wait(60)
    assert meter.buckets() <= 4
    assert len(meter._ids) <= 4 and len(meter._names) <= 5  # names freed and their ids reused
    meter.record("acme", summary("acme/late@1"))
    now[0] -= 60  # NTP steps the clock back a minute: the open minute takes it
    meter.record("acme", summary("acme/late@1"))
    assert meter.report(now[0], now[0] + 120) == [UsageRow("acme", "acme/late@1", 2, 10, 6)]
    now[0] -= 86_400  # a clock a day ahead is corrected: usage goes to the minutes the clock now reads
    meter.record("acme", summary("acme/fixed@1"))
    wait(60)
    meter.record("acme", summary("acme/fixed@1"))
    assert meter.report(now[0] - 120, now[0] + 1) == [UsageRow("acme", "acme/fixed@1", 2, 10, 6)]
    wait(600)  # ten minutes on at the corrected clock: the minutes before them expire, in order
    meter.record("acme", summary("acme/fixed@1"))
    assert meter.report(now[0] - 3600, now[0] + 1) == [UsageRow("acme", "acme/fixed@1", 1, 5, 3)]
    assert meter.buckets() == 4  # and the three minutes a day ahead wait for the clock to pass them


def test_one_minutes_records_share_its_buckets_and_a_clock_two_minutes_back_counts_in_it() -> None:
    """A minute holds one bucket per pair however many requests it counts (a minute closed per record
    would hold one per request: a week of them is the memory the packing saves); a clock stepped back
    by up to two minutes still counts in the open minute, by more in its own."""
    now = [3_000_000.0]  # minute 50000, at its start
    meter = UsageMeter(clock=lambda: now[0], steady=lambda: now[0])
    for _ in range(100):
        meter.record("acme", summary("acme/a@1"))
        now[0] += 0.5
    assert meter.buckets() == 1
    now[0] -= 120  # two minutes back
    meter.record("acme", summary("acme/a@1"))
    assert meter.report(3_000_000, 3_000_060) == [UsageRow("acme", "acme/a@1", 101, 505, 303)]
    now[0] -= 60  # three minutes back
    meter.record("acme", summary("acme/a@1"))
    assert meter.report(3_000_000, 3_000_060) == [UsageRow("acme", "acme/a@1", 101, 505, 303)]
    assert meter.buckets() == 2


def test_a_clock_stepped_days_ahead_expires_nothing_that_is_within_the_retention() -> None:
    """One record while the clock was 8 days ahead dropped every minute older than 8 - 7 days before
    it, as if they had passed: 6 days of usage read as 1 request once the clock was corrected."""
    now, passed = [5_000_040.0], [0.0]  # a whole minute: the window counts the first one
    meter = UsageMeter(retention_seconds=7 * 86_400, clock=lambda: now[0], steady=lambda: passed[0])
    start = now[0]
    for _ in range(6 * 24):  # six days, a request an hour
        meter.record("acme", summary("acme/a@1"))
        now[0] += 3600
        passed[0] += 3600
    now[0] += 8 * 86_400  # the clock jumps 8 days ahead for one request, then NTP corrects it
    meter.record("acme", summary("acme/a@1"))
    now[0] -= 8 * 86_400
    passed[0] += 60
    meter.record("acme", summary("acme/a@1"))
    [row] = meter.report(start, now[0] + 60)
    assert row.requests == 6 * 24 + 1  # the six days, and the request after the correction
    now[0] += 8 * 86_400  # when that much time has really passed, they expire as before
    passed[0] += 8 * 86_400
    meter.record("acme", summary("acme/a@1"))
    assert meter.report(start, now[0] - 86_400) == []


def test_meter_reads_while_the_engine_records() -> None:
    """A reader sums outside the lock from what it took under it, while minutes expire and pair ids are
    reused: every row read must carry its own pair's counts (each pair's token counts name it)."""
    now = [2_000_000.0]
    meter = UsageMeter(retention_seconds=60, clock=lambda: now[0], steady=lambda: now[0])
    done = threading.Event()
    errors: list[str] = []
    reads = [0]

    def read() -> None:
        while not done.is_set():
            for r in meter.report(0, 4e9):
                i = int(r.adapter.split("/a")[1].split("@")[0])
                if (r.prompt_tokens, r.generated_tokens) != (i * r.requests, (i + 1) * r.requests):
                    errors.append(f"{r} does not carry pair {i}'s counts")
            reads[0] += 1

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    readers = [threading.Thread(target=read) for _ in range(2)]
    try:
        for t in readers:
            t.start()
        for step in range(20_000):
            if step % 400 == 0:
                now[0] += 60  # a new minute; the one before last expires with its pairs
            i = (step // 400) * 7 + step % 7  # the pairs rotate, so expired ids are reused
            meter.record(f"t{i % 3}", summary(f"t{i % 3}/a{i}@1", i, i + 1))
    finally:
        done.set()
        for t in readers:
            t.join()
        sys.setswitchinterval(switch)
    assert errors == [] and reads[0] > 1


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


def test_requests_a_forced_stop_cuts_are_not_metered(service: Service) -> None:
    """Their calls end UNAVAILABLE and are retried elsewhere (Envoy retries a trailers-only one): the
    retry is the one that is metered."""
    engine = service.engine
    engine.eos_token_ids = frozenset()
    keyed = Principal(key_id="k1", tenant="acme", role="tenant")
    running, _ = submit(engine, replace(request("Hello", max_new_tokens=60, rid="cut"), principal=keyed), hold_at=2)
    running.wait_held()  # the engine thread waits in this request's sink, between two steps
    engine.abort()  # a forced stop (the grace is over): handled before the next step
    running.release()
    assert running.wait().summary.finish_reason is FinishReason.CANCELLED and 2 <= len(running.token_ids) < 60
    assert not [row for row in engine.usage.report(0, 4e9) if row.tenant == "acme"]
