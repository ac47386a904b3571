"""Draining: a replica leaves a load balancer without failing what it had started.

The engine thread is held at a known point (an engine call that waits on an event), so the test
decides what is running, what is queued and when the drain happens; no timing guesses.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from enginelib import server_config
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lorafleet import LoraFleetClient, Sampling, UnavailableError
from lorafleet_proto.v1 import inference_pb2, inference_pb2_grpc
from lorafleet_server.app import Service, build_service
from lorafleet_server.engine.types import FinishReason
from lorafleet_server.grpc.server import BackgroundServer


def health(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def ready(server: BackgroundServer) -> float:
    """``lorafleet_ready`` as Prometheus scrapes it from the server's metrics port."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as reply:
        match = re.search(r"^lorafleet_ready (\S+)$", reply.read().decode(), re.MULTILINE)
    assert match is not None
    return float(match.group(1))


def test_drain_keeps_serving_then_fails_queued_and_finishes_running(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = server_config(
        model=tiny_model_dir, data_dir=tmp_path, max_batch_size=1, max_seq_len=256, port=0, metrics_port=0
    )
    service = build_service(config)  # BackgroundServer starts its engine
    server = BackgroundServer(service)
    port = server.start()
    target = f"127.0.0.1:{port}"
    client = LoraFleetClient(target, timeout=60)
    release = threading.Event()
    # gRPC's own stop begins as the engine stops accepting; a call at that moment may meet either, and
    # gRPC cancels it (its REFUSED_STREAM, which Envoy retries). The late calls below are the engine's
    # refusals: gRPC's stop waits for them (an outside review saw CANCELLED under load).
    late_done = threading.Event()
    grpc_server = server._server._server  # type: ignore[union-attr]
    grpc_stop = grpc_server.stop

    async def stop_after_the_late_calls(grace: float | None) -> None:
        await asyncio.to_thread(late_done.wait, 60)
        await grpc_stop(grace)

    grpc_server.stop = stop_after_the_late_calls
    try:
        assert ready(server) == 1.0
        running = client.stream("The capital of France is", sampling=Sampling(max_new_tokens=40))
        next(iter(running))  # it has its row and has produced text
        held = service.engine.call(lambda: release.wait(60))  # the engine stops between two steps
        outcomes: dict[str, object] = {}

        def call(name: str) -> None:
            try:
                outcomes[name] = client.generate("Hello", sampling=Sampling(max_new_tokens=2)).generated_tokens
            except Exception as exc:
                outcomes[name] = exc

        def raw_stream(name: str) -> None:  # the status and the initial metadata a proxy sees
            with grpc.insecure_channel(target) as channel:
                stub = inference_pb2_grpc.InferenceServiceStub(channel)
                request = inference_pb2.GenerateStreamRequest(
                    prompt="Hi", params=inference_pb2.SamplingParams(max_new_tokens=2)
                )
                stream = stub.GenerateStream(request, timeout=60)
                try:
                    list(stream)
                except grpc.RpcError:
                    pass
                outcomes[name] = (stream.code(), tuple(stream.initial_metadata() or ()))

        queued = threading.Thread(target=call, args=("queued",))
        queued.start()
        queued_stream = threading.Thread(target=raw_stream, args=("queued_stream",))
        queued_stream.start()
        _wait_until(lambda: service.engine.load_stats() == (1, 2))
        stopping = threading.Thread(target=server.stop, kwargs={"drain_seconds": 4.0})  # room on busy cores
        stopping.start()
        _wait_until(lambda: health(target) == health_pb2.HealthCheckResponse.NOT_SERVING)
        assert ready(server) == 0.0  # draining: leaving the fleet
        assert service.metrics.registry.get_sample_value("lorafleet_draining") == 1.0  # on purpose
        during = threading.Thread(target=call, args=("during_drain",))  # still accepted while draining
        during.start()
        _wait_until(lambda: service.engine.load_stats() == (1, 3))
        _wait_until(lambda: not service.engine.accepting, timeout=10)  # the drain delay is over
        with pytest.raises(UnavailableError, match="shutting down"):  # the engine's refusal, not gRPC's
            client.generate("Too late", sampling=Sampling(max_new_tokens=2))
        raw_stream("late_stream")
        late_done.set()
        release.set()  # the engine goes on: queued requests fail at once, the running one finishes
        held.result(10)
        queued.join(10)
        queued_stream.join(10)
        during.join(10)
        # Refused streams, queued or late, are trailers-only (no initial metadata before the status), so
        # Envoy retries them on another replica: a header sent at once made the UNAVAILABLE final.
        assert outcomes["queued_stream"] == (grpc.StatusCode.UNAVAILABLE, ())
        assert outcomes["late_stream"] == (grpc.StatusCode.UNAVAILABLE, ())
        assert isinstance(outcomes["queued"], UnavailableError) and "draining" in str(outcomes["queued"])
        assert isinstance(outcomes["during_drain"], UnavailableError)
        rest = list(running)
        assert running.result.finish_reason in ("length", "end_of_sequence") and rest
        stopping.join(30)
        assert not stopping.is_alive()
    finally:
        late_done.set()
        release.set()
        client.close()


@pytest.mark.parametrize("call", ["embed", "generate", "stream"])
def test_a_call_the_server_cuts_is_unavailable(tiny_model_dir: Path, tmp_path: Path, call: str) -> None:
    """A request the server cut (a forced stop) is UNAVAILABLE, so the client retries elsewhere, as
    HTTP's 503: not an OK answer that is cut off (Generate's finish reason said "cancelled")."""
    config = server_config(model=tiny_model_dir, data_dir=tmp_path, max_seq_len=256, port=0, metrics_port=0)
    service = build_service(config)
    server = BackgroundServer(service)
    client = LoraFleetClient(f"127.0.0.1:{server.start()}", timeout=60)
    engine = service.engine
    release = threading.Event()
    try:
        held = engine.call(lambda: release.wait(60))
        outcome: list[object] = []

        def run() -> None:
            prompt, sampling = "The capital of France is", Sampling(max_new_tokens=2)
            try:
                if call == "embed":
                    outcome.append(client.embed(prompt))
                elif call == "generate":
                    outcome.append(client.generate(prompt, sampling=sampling))
                else:
                    outcome.append(list(client.stream(prompt, sampling=sampling)))
            except Exception as exc:
                outcome.append(exc)

        caller = threading.Thread(target=run)
        caller.start()
        _wait_until(lambda: engine.load_stats() == (0, 1))  # submitted, not yet in the engine's queue

        def cut() -> None:  # what a stop does to a request that has not run: a CANCELLED summary
            for r in list(engine._waiting):
                engine._finish(r, FinishReason.CANCELLED)

        after = engine.call(cut)
        release.set()
        held.result(10)
        after.result(10)
        caller.join(30)
        assert isinstance(outcome[0], UnavailableError) and "stopped by the server" in str(outcome[0]), outcome
        assert client.embed("Hello")  # the server serves on
    finally:
        release.set()
        client.close()
        server.stop(drain_seconds=0)


def test_health_turns_not_serving_when_the_engine_loop_crashes(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A crashed engine refuses every request; health said SERVING all the same, so probes passed and
    Envoy kept routing to the replica. It follows the engine now."""
    config = server_config(model=tiny_model_dir, data_dir=tmp_path, max_seq_len=256, port=0, metrics_port=0)
    service = build_service(config)
    server = BackgroundServer(service)
    target = f"127.0.0.1:{server.start()}"
    try:
        assert health(target) == health_pb2.HealthCheckResponse.SERVING
        assert ready(server) == 1.0

        def crash() -> None:  # a bug in the loop itself, between steps
            raise RuntimeError("a bug")

        service.engine._admit = crash  # type: ignore[method-assign]
        with LoraFleetClient(target, timeout=30) as client, pytest.raises(Exception, match=r"bug|shutting|internal"):
            client.generate("Hi", sampling=Sampling(max_new_tokens=2))
        _wait_until(lambda: not service.engine.accepting)
        _wait_until(lambda: health(target) == health_pb2.HealthCheckResponse.NOT_SERVING, timeout=5)
        assert ready(server) == 0.0  # the metrics port still answers: an alert sees it, not just probes
    finally:
        server.stop(drain_seconds=0)


def _wait_until(condition: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


@pytest.mark.slow
def test_second_sigterm_stops_now(tiny_model_dir: Path, tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "lorafleet_server",
        "serve",
        "--model",
        str(tiny_model_dir),
        "--data-dir",
        str(tmp_path),
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--http-port",
        "0",
        "--max-seq-len",
        "256",
        "--drain-seconds",
        "60",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if (match := re.search(r"lorafleet ready: gRPC on 127\.0\.0\.1:(\d+)", line)) is not None:
                break
        assert match is not None, "".join(lines)
        target = f"127.0.0.1:{match.group(1)}"
        os.kill(proc.pid, signal.SIGTERM)
        _wait_until(lambda: health(target) == health_pb2.HealthCheckResponse.NOT_SERVING)
        with LoraFleetClient(target, timeout=30) as client:  # draining, yet still serving
            assert client.generate("Hi", sampling=Sampling(max_new_tokens=2)).generated_tokens == 2
        started = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert time.monotonic() - started < 15  # not the 60 s drain
        out = "".join(lines) + proc.stdout.read()
        assert "SIGTERM: shutting down (drain 60.0s" in out and "SIGTERM again: stopping now" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_unary_call_still_running_at_the_end_of_the_grace_is_cut_by_the_engine(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by an outside review: gRPC's stop grace and the engine's ran out together, and gRPC often
    cancelled the call first ("Cancelling all calls"): the cut looked like the client's cancel, was
    metered, and Envoy ran it again on another replica (billed twice). The engine's cut comes first
    now: the call ends with the server's UNAVAILABLE and nothing of it is metered."""
    service = _slow_service(tiny_model_dir, tmp_path, monkeypatch)
    engine = service.engine
    server = BackgroundServer(service)
    client = LoraFleetClient(f"127.0.0.1:{server.start()}", timeout=60)
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(client.generate("The capital of France is", sampling=Sampling(max_new_tokens=200)))
        except Exception as exc:
            outcome.append(exc)

    caller = threading.Thread(target=run)
    try:
        caller.start()
        _wait_until(lambda: engine.load_stats()[0] == 1)  # running
        time.sleep(0.3)
        server.stop(drain_seconds=0)
        caller.join(30)
        assert isinstance(outcome[0], UnavailableError) and "stopped by the server" in str(outcome[0]), outcome
        assert engine.usage.report(0, 4e9) == []  # the cut call is not billed: it is retried elsewhere
    finally:
        client.close()


@pytest.mark.parametrize("held", [False, True], ids=["text-sent", "text-held-back"])
def test_a_stream_cut_after_it_sent_text_is_metered_and_one_whose_text_was_held_is_not(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, held: bool
) -> None:
    """Found by an outside review of the fleet: every request a forced stop cut went unmetered, right
    for a unary call or a stream that sent nothing (a proxy retries them elsewhere, billed there), but a
    stream that had sent text is never retried: its caller kept 117 tokens nobody was billed for. One
    whose text was all held back (it could still be a stop string) sent no message: it ends
    trailers-only, is retried, and is billed there, so not here (the second diff review)."""
    # 12 held-back tokens at 200 ms a step outlast the stop's 1 s grace
    service = _slow_service(tiny_model_dir, tmp_path, monkeypatch, 0.2 if held else 0.05)
    engine = service.engine
    server = BackgroundServer(service)
    client = LoraFleetClient(f"127.0.0.1:{server.start()}", timeout=60)
    prompt = "The capital of France is"
    stop: tuple[str, ...] = ()
    if held:  # the greedy text followed by a character it never reaches: every token is held back
        stop = (client.generate(prompt, sampling=Sampling(max_new_tokens=12, temperature=0.0)).text + "\u2603",)
    before = sum(row.requests for row in engine.usage.report(0, 4e9))
    chunks: list[str] = []
    ended: list[object] = []

    def read() -> None:
        stream = client.stream(
            prompt, sampling=Sampling(max_new_tokens=200, temperature=0.0, stop=stop), request_id="s1"
        )
        try:
            for chunk in stream:
                chunks.append(chunk)
        except Exception as exc:
            ended.append(exc)

    reader = threading.Thread(target=read)
    try:
        reader.start()
        if held:
            _wait_until(lambda: engine.load_stats()[0] == 1)
            time.sleep(0.3)  # a token or two of its 12 held back (a step takes 200 ms or more)
        else:
            _wait_until(lambda: len(chunks) >= 3)  # it has sent text
        server.stop(drain_seconds=0)
        reader.join(30)
        assert isinstance(ended[0], UnavailableError), ended
        rows = [row for row in engine.usage.report(0, 4e9)]
        if held:
            assert chunks == [] and sum(row.requests for row in rows) == before  # retried elsewhere, billed there
        else:
            [row] = rows
            assert row.requests == 1 and row.generated_tokens >= len(chunks) and row.prompt_tokens > 0
    finally:
        client.close()


def _slow_service(
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    step_seconds: float = 0.05,
    **overrides: object,
) -> Service:
    """A service whose steps take ``step_seconds`` (50 ms) and whose generations never end early: 200
    tokens take ~10 s, far past its 1 s shutdown grace."""
    values: dict[str, object] = {"max_seq_len": 256, "port": 0, "metrics_port": 0, "shutdown_grace_seconds": 1.0}
    config = server_config(model=tiny_model_dir, data_dir=tmp_path, **(values | overrides))
    service = build_service(config)
    step = service.engine.runner.step

    def slow_step(*args: object, **kwargs: object) -> object:
        time.sleep(step_seconds)
        return step(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(service.engine.runner, "step", slow_step)
    service.engine.eos_token_ids = frozenset()
    return service


def test_ready_turns_1_only_once_every_edge_serves(tiny_model_dir: Path, tmp_path: Path) -> None:
    """lorafleet_ready was set with gRPC health, before the HTTP edge had started (the fleet review):
    for that moment a replica said it served what it did not yet."""
    import asyncio

    from lorafleet_server.grpc.server import serve_forever

    config = server_config(model=tiny_model_dir, data_dir=tmp_path, max_seq_len=256, port=0, metrics_port=0)
    service = build_service(config)
    seen: dict[str, float | None] = {}

    def ready() -> float | None:
        return service.metrics.registry.get_sample_value("lorafleet_ready")

    class Edge(_TestEdge):
        async def start(self) -> str:
            seen["edge starting"] = ready()
            return "a test edge"

    async def main() -> None:
        async def stop_once_ready() -> None:
            while ready() != 1.0:
                await asyncio.sleep(0.01)
            seen["after"] = ready()
            os.kill(os.getpid(), signal.SIGINT)  # serve_forever's own handler: stop without a drain

        watcher = asyncio.ensure_future(stop_once_ready())
        await serve_forever(service, lambda _keys: [Edge()])
        await watcher

    asyncio.run(main())
    assert seen == {"edge starting": 0.0, "after": 1.0}


@pytest.mark.parametrize("held", [False, True], ids=["prefilling", "text-held-back"])
def test_an_http_stream_cut_before_its_first_text_is_a_503_a_proxy_retries(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, held: bool
) -> None:
    """A stream: true request cut by a forced stop while its prompt was still being prefilled answered
    200 and then an error chunk: a proxy never retries that, and nothing of it was metered, so its
    caller got neither an answer nor a retry (the second diff review). It is a 503 now, as a
    non-streaming request's cut is. So is one cut while every token it made was held back (it could
    still be a stop string): its status line went out with the first token, text or not."""
    import httpx

    from lorafleet_server.grpc.server import server_keys
    from lorafleet_server.http.server import BackgroundHttpServer

    # prefilling: ~120 tokens 16 a step at 0.4 s a step, so the 1 s grace ends mid-prefill; held back:
    # 12 tokens at 0.2 s a step outlast the grace
    step_seconds, prompt = (0.2, "The capital of France is") if held else (0.4, "word " * 120)
    service = _slow_service(tiny_model_dir, tmp_path, monkeypatch, step_seconds, max_step_tokens=16, http_port=0)
    keys = server_keys(service.config)
    service.engine.start()
    server = BackgroundHttpServer(service, keys)
    server.start()
    body: dict[str, object] = {"model": service.info.model_id, "prompt": prompt, "max_tokens": 100, "temperature": 0}
    if held:  # the greedy text followed by a character it never reaches: every token is held back
        greedy = httpx.post(f"{server.url}/v1/completions", json={**body, "max_tokens": 12}, timeout=60)
        body["stop"] = [greedy.json()["choices"][0]["text"] + "\u2603"]
    before = sum(row.requests for row in service.engine.usage.report(0, 4e9))
    answer: list[httpx.Response] = []

    def call() -> None:
        url = f"{server.url}/v1/completions"
        with httpx.stream("POST", url, json={**body, "stream": True}, timeout=60) as response:
            response.read()
            answer.append(response)

    caller = threading.Thread(target=call)
    try:
        caller.start()
        _wait_until(lambda: service.engine.load_stats()[0] == 1)  # prefilling, or decoding held back
        if held:
            time.sleep(0.3)  # a token or two of its 12 held back
        service.engine.shutdown(1.0)
        caller.join(30)
        [response] = answer
        assert response.status_code == 503, response.text
        assert response.json()["error"]["type"] == "service_unavailable_error"
        assert sum(row.requests for row in service.engine.usage.report(0, 4e9)) == before
    finally:
        server.stop()


def test_ready_stays_0_when_the_engine_stopped_while_the_edges_started(tiny_model_dir: Path, tmp_path: Path) -> None:
    """serve_forever set lorafleet_ready after its edges started even if the engine had stopped taking
    requests meanwhile; the engine watch had already turned it 0 and returned, so it stayed 1 for good
    (the second diff review)."""
    import asyncio

    from lorafleet_server.grpc.server import ENGINE_WATCH_SECONDS, serve_forever

    config = server_config(model=tiny_model_dir, data_dir=tmp_path, max_seq_len=256, port=0, metrics_port=0)
    service = build_service(config)
    seen: dict[str, float | None] = {}
    started = asyncio.Event()  # the edge's start has returned: serve_forever sets ready (wrongly) after

    class Edge(_TestEdge):
        async def start(self) -> str:
            service.engine.shutdown(0.0)  # the engine stops taking requests while this edge starts
            await asyncio.sleep(ENGINE_WATCH_SECONDS * 2)  # the watch has seen it and turned ready 0
            started.set()
            return "a slow test edge"

    async def main() -> None:
        async def look_then_stop() -> None:
            # after the edge started, however late on busy cores (a fixed wait could look before it, and
            # pass however serve_forever set ready)
            await started.wait()
            await asyncio.sleep(ENGINE_WATCH_SECONDS)
            seen["ready"] = service.metrics.registry.get_sample_value("lorafleet_ready")
            os.kill(os.getpid(), signal.SIGINT)

        watcher = asyncio.ensure_future(look_then_stop())
        await serve_forever(service, lambda _keys: [Edge()])
        await watcher

    asyncio.run(main())
    assert seen == {"ready": 0.0}


class _TestEdge:
    """An edge (grpc.server.Edge) that serves nothing; a test overrides ``start``."""

    async def start(self) -> str:
        return "a test edge"

    def drain(self) -> None:
        pass

    async def stop(self) -> None:
        pass
