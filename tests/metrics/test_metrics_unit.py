"""Metric values follow what the engine and the adapter tiers did (tiny model, injected registry)."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
from disconnectlib import post_then_leave
from enginelib import engine_held, generate, request, submit, tiny_service
from prometheus_client import generate_latest

from lorafleet_adapters.errors import AdapterFormatError
from lorafleet_adapters.ref import AdapterKey
from lorafleet_server.app import Service

PROMPT = "The capital of France is"
# Far more tokens than the tests let a request produce: a cancelled request cannot have finished by itself.
LONG = 200


@pytest.fixture
def service(tiny_model_dir: Path, tmp_path: Path) -> Iterator[Service]:
    svc = tiny_service(tiny_model_dir, tmp_path / "store", max_new_tokens=LONG)
    yield svc
    svc.engine.shutdown(10)


def value(svc: Service, name: str, **labels: str) -> float:
    v = svc.metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if v is None else v


def global_lorafleet_names() -> set[str]:
    return {m.name for m in prometheus_client.REGISTRY.collect() if m.name.startswith("lorafleet")}


def test_each_service_has_its_own_registry(tiny_model_dir: Path, tmp_path: Path) -> None:
    assert not global_lorafleet_names()
    first = tiny_service(tiny_model_dir, tmp_path / "a")
    try:
        second = tiny_service(tiny_model_dir, tmp_path / "b")  # would clash if both used one registry
        try:
            # Nothing landed on prometheus_client's global registry, which every library shares.
            assert not global_lorafleet_names()
            assert first.metrics.registry is not prometheus_client.REGISTRY
            generate(first.engine, request(PROMPT, max_new_tokens=3))
            assert value(first, "lorafleet_generated_tokens_total") == 3
            assert value(first, "lorafleet_generations_total", reason="length") == 1
            # What one service counted is not seen on the other's registry.
            assert value(second, "lorafleet_generated_tokens_total") == 0
            assert value(second, "lorafleet_generations_total", reason="length") == 0
            generate(second.engine, request(PROMPT, max_new_tokens=2))
            assert value(second, "lorafleet_generated_tokens_total") == 2
            assert value(first, "lorafleet_generated_tokens_total") == 3
        finally:
            second.engine.shutdown(10)
    finally:
        first.engine.shutdown(10)


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


def test_tokens_are_counted_as_they_are_read_and_made_not_when_the_request_ends(service: Service) -> None:
    """Found by an outside review: both token counters moved only when a request ended, so a replica
    whose requests all ran longer than LorafleetNoProgress's window (rate of both counters 0 while
    requests run) was paged as stalled while it streamed ~25 tokens/s, and the throughput panel read 0
    and then a spike."""
    prompt_len = len(service.engine.encode_prompt(PROMPT, ()))
    sink, handle = submit(service.engine, request(PROMPT, max_new_tokens=LONG), hold_at=5)
    sink.wait_held(30)  # the engine thread is held inside the step that made the 5th token
    assert value(service, "lorafleet_prompt_tokens_total") == prompt_len
    assert value(service, "lorafleet_generated_tokens_total") == 5
    handle.cancel()
    sink.release()
    assert sink.wait(30).summary.generated_tokens == 5
    assert value(service, "lorafleet_generated_tokens_total") == 5  # not again at the end
    assert value(service, "lorafleet_prompt_tokens_total") == prompt_len


def test_a_request_that_leaves_the_queue_before_a_row_counts_its_wait(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Found by an outside review: only requests that got a row were in the queue-wait histogram, so
    callers that gave up in a full queue (deadlines, cancels) left its panel at zero under overload."""
    svc = tiny_service(tiny_model_dir, tmp_path / "store", max_new_tokens=LONG, max_batch_size=1)
    try:
        running, run_handle = submit(svc.engine, request(PROMPT, max_new_tokens=LONG, rid="runs"), hold_at=1)
        running.wait_held(30)  # its row is the only one
        waiting, wait_handle = submit(svc.engine, request(PROMPT, max_new_tokens=2, rid="waits"))
        waited = value(svc, "lorafleet_queue_wait_seconds_count")
        time.sleep(0.3)
        wait_handle.cancel()
        run_handle.cancel()
        running.release()
        assert waiting.wait(30).summary.finish_reason.value == "cancelled"
        running.wait(30)
        assert value(svc, "lorafleet_queue_wait_seconds_count") == waited + 1
        assert value(svc, "lorafleet_queue_wait_seconds_sum") >= 0.3
        # One failed from the queue (here the drain's refusal) leaves its wait too (the second diff review).
        running, run_handle = submit(svc.engine, request(PROMPT, max_new_tokens=LONG, rid="runs2"), hold_at=1)
        running.wait_held(30)
        refused, _ = submit(svc.engine, request(PROMPT, max_new_tokens=2, rid="refused"))
        waited = value(svc, "lorafleet_queue_wait_seconds_count")
        run_handle.cancel()
        threading.Thread(target=svc.engine.shutdown, args=(10,), daemon=True).start()  # its drain is queued
        time.sleep(0.2)
        running.release()
        refused.wait(30)
        assert refused.events[-1].error is not None  # refused by the drain
        assert value(svc, "lorafleet_queue_wait_seconds_count") == waited + 1
    finally:
        svc.engine.shutdown(10)


def test_every_rpcs_watched_codes_are_exported_at_zero_from_the_start(service: Service) -> None:
    """Found by an outside review: a (rpc, code) series appeared only with its first call, at 1, so
    ``increase`` and ``rate`` (the error-ratio page, the errors panel) never saw the first INTERNAL or
    UNAVAILABLE after a start. Each RPC of both edges now has its watched codes' series at 0."""
    import asyncio

    from lorafleet_server.grpc.server import GrpcServer
    from lorafleet_server.http.routes import CHAT_COMPLETIONS, GET_MODEL
    from lorafleet_server.http.server import HttpServer
    from lorafleet_server.metrics import WATCHED_CODES

    async def build() -> None:
        grpc_server = GrpcServer(service)
        HttpServer(service, grpc_server.keys, "127.0.0.1", 0)

    asyncio.run(build())
    for rpc in ("Generate", "GenerateStream", "ListAdapters", "GetUsage", CHAT_COMPLETIONS, GET_MODEL):
        for code in WATCHED_CODES:
            assert (
                service.metrics.registry.get_sample_value("lorafleet_requests_total", {"rpc": rpc, "code": code}) == 0
            )
        assert service.metrics.registry.get_sample_value("lorafleet_request_duration_seconds_count", {"rpc": rpc}) == 0


@pytest.mark.parametrize("edge", ["grpc", "http"])
def test_the_log_line_of_a_call_its_client_left_has_the_engines_summary(
    tiny_model_dir: Path,
    tmp_path: Path,
    peft_adapter: Any,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    edge: str,
) -> None:
    """Found by an outside review: a call cancelled by its client (or its deadline) ends before the
    engine's summary of it comes, and its request log line had no adapter version, no prompt tokens,
    no finish reason nor queue time, which the usage log of the same request had. It waits for them."""
    import logging

    from enginelib import server_config

    from lorafleet import LoraFleetClient, Sampling
    from lorafleet_server.app import build_service
    from lorafleet_server.grpc.server import BackgroundServer, server_keys
    from lorafleet_server.http.server import BackgroundHttpServer

    config = server_config(
        model=tiny_model_dir, data_dir=tmp_path, max_seq_len=256, max_new_tokens=LONG, port=0, metrics_port=0
    )
    service = build_service(config)  # its engine starts with the gRPC server, or below
    service.store.import_peft(peft_adapter(seed=5), "acme", "bot", service.base.spec)
    step = service.engine.runner.step

    def slow_step(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.05)
        return step(*args, **kwargs)

    monkeypatch.setattr(service.engine.runner, "step", slow_step)
    service.engine.eos_token_ids = frozenset()

    def logged() -> list[Any]:
        return [r.fields for r in caplog.records if r.name == "lorafleet.requests"]  # type: ignore[attr-defined]

    def generating() -> bool:  # the client leaves once its request has a token (not by a timeout, which
        # on busy cores could fire before the server had the request)
        return (service.metrics.registry.get_sample_value("lorafleet_generated_tokens_total") or 0) > 0

    with caplog.at_level(logging.INFO, logger="lorafleet.requests"):
        if edge == "grpc":
            server = BackgroundServer(service)
            client = LoraFleetClient(f"127.0.0.1:{server.start()}", timeout=60)
            try:
                stream = client.stream(PROMPT, adapter="acme/bot", sampling=Sampling(max_new_tokens=LONG))
                next(iter(stream))
                stream.cancel()
                _wait(lambda: bool(logged()))
            finally:
                client.close()
                server.stop()
        else:
            service.engine.start()
            http = BackgroundHttpServer(service, server_keys(service.config))
            http.start()
            try:
                body = {"model": "acme/bot", "prompt": PROMPT, "max_tokens": LONG}
                post_then_leave(http.url, "/v1/completions", body, {}, generating)
                _wait(lambda: bool(logged()))
            finally:
                http.stop()
                service.engine.shutdown(10)
    [line] = logged()
    assert line["status"] == "CANCELLED", line
    assert line["adapter"] == "acme/bot@1" and line["finish_reason"] == "cancelled", line
    assert line["prompt_tokens"] == len(service.engine.encode_prompt(PROMPT, ())) and line["generated_tokens"] > 0
    assert line["queue_s"] is not None and line["ttft_s"] is not None


def test_the_log_line_of_an_embeddings_call_its_client_left_waits_for_every_input(
    tiny_model_dir: Path,
    tmp_path: Path,
    peft_adapter: Any,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An embeddings call is one engine request per input; one its client left logged at once, with
    neither the adapter version nor any input's prompt tokens (an earlier stop's leftover). Its line
    waits until every input has ended, and counts each input's prompt tokens, as a finished call's does."""
    import logging

    from enginelib import server_config

    from lorafleet_server.app import build_service
    from lorafleet_server.grpc.server import server_keys
    from lorafleet_server.http.server import BackgroundHttpServer

    config = server_config(model=tiny_model_dir, data_dir=tmp_path, max_seq_len=256, port=0, metrics_port=0)
    service = build_service(config)
    service.store.import_peft(peft_adapter(seed=5), "acme", "bot", service.base.spec)
    step = service.engine.runner.step

    def slow_step(*args: Any, **kwargs: Any) -> Any:
        time.sleep(1.5)  # the client gives up while its inputs are in the engine
        return step(*args, **kwargs)

    monkeypatch.setattr(service.engine.runner, "step", slow_step)
    texts = [PROMPT, PROMPT + " and the capital of Spain is", "Hello"]

    def logged() -> list[Any]:
        return [r.fields for r in caplog.records if r.name == "lorafleet.requests"]  # type: ignore[attr-defined]

    with caplog.at_level(logging.INFO, logger="lorafleet.requests"):
        service.engine.start()
        http = BackgroundHttpServer(service, server_keys(service.config))
        http.start()
        try:  # the client leaves once every input is in the engine
            body = {"model": "acme/bot", "input": texts}
            post_then_leave(
                http.url, "/v1/embeddings", body, {}, lambda: sum(service.engine.load_stats()) == len(texts)
            )
            _wait(lambda: bool(logged()))
        finally:
            http.stop()
            service.engine.shutdown(10)
    [line] = logged()
    assert line["status"] == "CANCELLED" and line["adapter"] == "acme/bot@1", line
    assert line["prompt_tokens"] == sum(len(service.engine.encode_prompt(t, ())) for t in texts), line


def _wait(done: Any, seconds: float = 10.0) -> None:
    give_up = time.monotonic() + seconds
    while not done() and time.monotonic() < give_up:
        time.sleep(0.05)


def test_queue_wait_and_time_to_first_token_count_from_arrival(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Suspected by an outside review, then reproduced: both were timed from the engine's record of the
    request, made after the wait for a worker thread, the adapter store's reads and the tokenizing, so a
    request that spent seconds there showed none of them in its TTFT or queue wait."""
    encode = service.engine.encode_prompt

    def slow_encode(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.3)  # a store read or a long tokenization before the request is queued
        return encode(*args, **kwargs)

    monkeypatch.setattr(service.engine, "encode_prompt", slow_encode)
    summary = generate(service.engine, request(PROMPT, max_new_tokens=2)).summary
    assert summary.queue_seconds >= 0.3 and summary.ttft_seconds is not None and summary.ttft_seconds >= 0.3
    assert value(service, "lorafleet_time_to_first_token_seconds_sum") >= 0.3
    assert value(service, "lorafleet_queue_wait_seconds_sum") >= 0.3


def test_gauges_return_to_zero_after_requests_end_or_are_cancelled(service: Service) -> None:
    # The first request holds the engine thread at its first token: the others cannot finish (nor
    # the first go on) until the three cancels are in the engine's inbox.
    first = submit(service.engine, request(PROMPT, max_new_tokens=LONG, rid="0"), hold_at=1)
    sinks = [first] + [submit(service.engine, request(PROMPT, max_new_tokens=LONG, rid=str(i))) for i in (1, 2)]
    first[0].wait_held(30)
    assert value(service, "lorafleet_running_requests") >= 1
    # Observed at the first token, not at the end (the TTFT alert lagged by the whole generation)
    assert value(service, "lorafleet_time_to_first_token_seconds_count") >= 1
    assert value(service, "lorafleet_running_requests") + value(service, "lorafleet_waiting_requests") == 3
    for _, handle in sinks:
        handle.cancel()
    first[0].release()
    generated = [sink.wait(30).summary.generated_tokens for sink, _ in sinks]
    assert generated[0] == 1 and max(generated) <= 1  # none got further than the step it was held in
    # A request leaves the running batch before its sink hears the end, so the gauges read 0 now.
    assert value(service, "lorafleet_running_requests") == 0
    assert value(service, "lorafleet_waiting_requests") == 0
    assert value(service, "lorafleet_generations_total", reason="cancelled") == 3
    assert value(service, "lorafleet_generations_total", reason="length") == 0


def test_embeddings_are_no_generations_and_unrun_prompts_no_prompt_tokens(service: Service) -> None:
    """An embed's summary says "length": it was counted a cut generation. A request cancelled before it
    took a row processed none of its prompt: its tokens were counted as processed (not metered)."""
    generate(service.engine, request(PROMPT, embed=True))
    assert value(service, "lorafleet_generations_total", reason="length") == 0
    embedded = value(service, "lorafleet_prompt_tokens_total")
    assert embedded > 0  # its prompt was read
    with engine_held(service.engine):
        sink, handle = submit(service.engine, request(PROMPT, max_new_tokens=2, rid="never"))
        handle.cancel()
    assert sink.wait(30).summary.finish_reason.value == "cancelled"
    assert value(service, "lorafleet_prompt_tokens_total") == embedded
    assert value(service, "lorafleet_generations_total", reason="cancelled") == 1


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
    key = AdapterKey("acme", "bot", 1)
    assert service.engine.run(lambda: service.engine.adapters.slot_snapshot()[key].leases) == 0
    assert service.engine.run(lambda: service.engine.adapters.unload(key)) is True  # idle: freed now
    assert value(service, "lorafleet_adapter_evictions_total", tier="device") == 1
    assert value(service, "lorafleet_adapters_resident", tier="device") == 0


def test_a_request_waiting_for_a_slot_counts_one_host_lookup(
    tiny_model_dir: Path, tmp_path: Path, peft_adapter: Any
) -> None:
    """One device slot, held by a's long request; b's request (b on the host tier) waits for it, polled
    every step: that counted a host hit per step (~100x for two requests)."""
    svc = tiny_service(tiny_model_dir, tmp_path / "store", max_loaded_adapters=1, max_new_tokens=LONG)
    try:
        for name, seed in (("a", 1), ("b", 2)):
            svc.store.import_peft(peft_adapter(seed=seed), "acme", name, svc.base.spec)
            svc.engine.adapters.host_weights(AdapterKey("acme", name, 1))  # on the host tier
        hits = value(svc, "lorafleet_adapter_cache_hits_total", tier="host")
        long = submit(svc.engine, request(PROMPT, adapter="acme/a", max_new_tokens=LONG, rid="a"))[0]
        waiting = submit(svc.engine, request(PROMPT, adapter="acme/b", max_new_tokens=2, rid="b"))[0]
        long.wait(60)
        waiting.wait(60)
        assert long.summary.generated_tokens > 10, long.summary  # b waited several steps
        assert value(svc, "lorafleet_adapter_cache_hits_total", tier="host") == hits + 2
    finally:
        svc.engine.shutdown(10)


def test_failed_adapter_load_is_counted(service: Service, tmp_path: Path) -> None:
    vdir = service.store.root / "acme" / "broken" / "versions" / "1"
    vdir.mkdir(parents=True)
    (vdir / "manifest.json").write_text("{}")
    with pytest.raises(AdapterFormatError, match="manifest"):
        service.engine.submit(request(PROMPT, adapter="acme/broken@1", max_new_tokens=2), lambda _e: None)
    assert value(service, "lorafleet_adapter_load_failures_total") == 1


def test_adapter_residency_is_exported_only_when_asked(
    service: Service, tiny_model_dir: Path, tmp_path: Path, peft_adapter: Any
) -> None:
    """The residency gauge names tenants' adapters on the unauthenticated metrics port: off unless
    --metrics-adapter-residency (it was always on, and this test's scrape held no adapter)."""
    opted = tiny_service(tiny_model_dir, tmp_path / "opted", metrics_adapter_residency=True)
    try:
        for svc in (service, opted):
            svc.store.import_peft(peft_adapter(seed=5), "acme", "secret-bot", svc.base.spec)
            generate(svc.engine, request(PROMPT, adapter="acme/secret-bot", max_new_tokens=2))
        assert "secret-bot" not in generate_latest(service.metrics.registry).decode()
        for tier in ("device", "host"):
            held = {"adapter": "acme/secret-bot@1", "tier": tier}
            assert opted.metrics.registry.get_sample_value("lorafleet_adapter_resident", held) == 1
    finally:
        opted.engine.shutdown(10)


def test_names_follow_prometheus_conventions(service: Service, peft_adapter: Any) -> None:
    service.store.import_peft(peft_adapter(seed=5), "acme", "bot", service.base.spec)
    generate(service.engine, request(PROMPT, adapter="acme/bot", max_new_tokens=2))  # an adapter is resident
    text = generate_latest(service.metrics.registry).decode()
    names = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    assert names and all(n.startswith("lorafleet_") for n in names)
    assert not [n for n in names if n.endswith("_ms") or ":" in n]
    for forbidden in ("tenant", "adapter="):
        assert forbidden not in text


class _Deadline:
    """A call context whose caller's deadline is ``remaining`` seconds away (None: no deadline)."""

    def __init__(self, remaining: float | None) -> None:
        self.remaining = remaining

    def time_remaining(self) -> float | None:
        return self.remaining


@pytest.mark.parametrize(("remaining", "code"), [(-1.0, "DEADLINE_EXCEEDED"), (60.0, "CANCELLED"), (None, "CANCELLED")])
def test_a_stream_closed_at_its_yield_counts_as_its_deadline_or_a_cancel_never_internal(
    remaining: float | None, code: str
) -> None:
    """gRPC closes a streaming handler (an async generator) at its ``yield`` when the call ends while a
    response is being sent: GeneratorExit, which is no bug of the handler."""
    import asyncio

    from prometheus_client import CollectorRegistry

    from lorafleet_server.edge.observe import CallObserver
    from lorafleet_server.metrics import Metrics

    registry = CollectorRegistry()
    calls = CallObserver(Metrics(registry))

    async def handler() -> Any:
        async with calls.call("GenerateStream", _Deadline(remaining), "r1"):
            yield "first"
            yield "second"

    async def consume_one_then_close() -> None:
        stream = handler()
        assert await anext(stream) == "first"
        await stream.aclose()

    asyncio.run(consume_one_then_close())
    count = registry.get_sample_value("lorafleet_requests_total", {"rpc": "GenerateStream", "code": code})
    assert count == 1.0
    assert registry.get_sample_value("lorafleet_requests_total", {"rpc": "GenerateStream", "code": "INTERNAL"}) is None


def test_metrics_host_binds_the_metrics_port_apart_from_the_api(tmp_path: Path) -> None:
    """``--metrics-host`` (default ``--host``): e.g. the API on 0.0.0.0 and metrics for a local scraper
    only, or the reverse. The start check looks at the same address."""
    import socket
    import urllib.request

    from lorafleet_server.config import ServerConfig
    from lorafleet_server.errors import StartupError
    from lorafleet_server.grpc.server import check_startup, open_metrics
    from lorafleet_server.metrics import Metrics

    config = ServerConfig(host="127.0.0.1", metrics_host="127.0.0.2", metrics_port=0)
    served = open_metrics(config, Metrics(prometheus_client.CollectorRegistry()))
    try:
        with urllib.request.urlopen(f"http://127.0.0.2:{served.port}/metrics", timeout=10) as reply:
            assert b"lorafleet_ready 0.0" in reply.read()
        with pytest.raises(ConnectionRefusedError):  # not on --host
            socket.create_connection(("127.0.0.1", served.port), timeout=5).close()
        taken = ServerConfig(
            data_dir=tmp_path, host="127.0.0.1", metrics_host="127.0.0.2", metrics_port=served.port, port=0, http_port=0
        )
        with pytest.raises(StartupError, match=rf"--metrics-port {served.port}: cannot listen on 127.0.0.2:"):
            check_startup(taken)
    finally:
        served.stop()
    assert ServerConfig(host="0.0.0.0").metrics_address_host == "0.0.0.0"  # unset: --host


@pytest.mark.parametrize("loop_after", ["stopped", "closed"])
def test_the_line_of_a_call_whose_summary_comes_after_the_loop_stopped_is_written(
    loop_after: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A cancelled call's request line waits for the engine's summary, written on the event loop; a
    summary that came once the loop had stopped (not closed: the server's last moments) was handed to
    it and never written."""
    import asyncio

    from prometheus_client import CollectorRegistry

    from lorafleet_server.edge.observe import CallObserver
    from lorafleet_server.engine.stream import Outcome
    from lorafleet_server.engine.types import FinishReason, Summary
    from lorafleet_server.metrics import Metrics

    calls = CallObserver(Metrics(CollectorRegistry()))
    outcome = Outcome()
    outcome.queued()

    async def cancelled_call() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            async with calls.call("Generate", _Deadline(None), "r-late") as record:
                record.outcome = outcome
                raise asyncio.CancelledError

    loop = asyncio.new_event_loop()
    loop.run_until_complete(cancelled_call())  # the loop has stopped, the line waits for the summary
    if loop_after == "closed":
        loop.close()
    summary = Summary(
        adapter="acme/bot@3",
        prompt_tokens=5,
        generated_tokens=2,
        finish_reason=FinishReason.CANCELLED,
        request_id="r-late",
    )
    with caplog.at_level(logging.INFO, logger="lorafleet.requests"):
        outcome.ended(summary)  # from the engine thread
    lines = [r for r in caplog.records if r.name == "lorafleet.requests"]
    assert len(lines) == 1 and lines[0].fields["adapter"] == "acme/bot@3", lines  # type: ignore[attr-defined]
    loop.close()
