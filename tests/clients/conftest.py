"""Fixtures of the client tests: the client package on sys.path and a fake lorafleet gRPC server.

The fake server is a real grpc.server on 127.0.0.1 with canned servicers; it tests the client alone.
The adapter field of a request picks the servicer's behaviour:

  "error:CODE"        abort with grpc.StatusCode.CODE (x-request-id in the trailing metadata; a
                      stream sends it in its initial metadata, as the real server does)
  "bare-error:CODE"   abort with CODE and no details (a proxy's status)
  "late-error:CODE"   GenerateStream: send one chunk, then abort with CODE
  "slow"              send one chunk (streams), then wait until the client cancels or times out
  "no-summary"        GenerateStream: end without the summary message
  anything else       a canned answer echoing the request
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

REPO = Path(__file__).resolve().parents[2]
CLIENT_ROOT = REPO / "clients" / "python"
sys.path.insert(0, str(CLIENT_ROOT))

from lorafleet_proto.v1 import adapters_pb2 as apb  # noqa: E402
from lorafleet_proto.v1 import adapters_pb2_grpc, inference_pb2_grpc, usage_pb2_grpc  # noqa: E402
from lorafleet_proto.v1 import inference_pb2 as ipb  # noqa: E402
from lorafleet_proto.v1 import usage_pb2 as upb  # noqa: E402

STREAM_CHUNKS = ("Hel", "lo, ", "wörld")
MODEL_INFO = ipb.GetModelInfoResponse(
    model_id="tiny/model",
    fingerprint="sha256:abc",
    quantization="none",
    device="cpu",
    dtype="float32",
    max_context_tokens=2048,
    max_lora_rank=64,
    max_new_tokens=512,
    max_batch_size=8,
    max_loaded_adapters=4,
    max_message_bytes=8 * 1024 * 1024,
    target_modules=["q_proj", "v_proj"],
    server_version="0.1.0",
    adapter_slot_memory_bytes=1_327_104,
)
ADAPTER = apb.Adapter(
    tenant="acme",
    name="support",
    latest_version=2,
    versions=[
        apb.AdapterVersion(version=1, tier=apb.ADAPTER_TIER_STORE),
        apb.AdapterVersion(
            version=2,
            tier=apb.ADAPTER_TIER_DEVICE,
            pinned=True,
            active_requests=3,
            manifest=apb.AdapterManifest(
                kind="lora",
                method="lora",
                base_fingerprint="sha256:abc",
                base_model="tiny/model",
                base_quantization="none",
                rank=8,
                lora_alpha=16.0,
                target_modules=["q_proj"],
                files={"adapter.safetensors": "ff00"},
                eval_metrics={"loss": 0.5},
            ),
        ),
    ],
)


@dataclass
class Recorder:
    """What the fake server saw: the last call's metadata and request, and cancellations."""

    metadata: dict[str, str] = field(default_factory=dict)
    request: object = None
    cancelled: threading.Event = field(default_factory=threading.Event)

    def record(self, context: grpc.ServicerContext, request: object) -> str:
        """Records the call; returns its request id (the client's, or "generated-id")."""
        self.metadata = {key: str(value) for key, value in context.invocation_metadata()}
        self.request = request
        return self.metadata.get("x-request-id", "generated-id")


def _abort_if_asked(adapter: str, context: grpc.ServicerContext, request_id: str) -> None:
    if adapter.startswith("bare-error:"):
        context.abort(grpc.StatusCode[adapter.removeprefix("bare-error:")], "")
    if adapter.startswith("error:"):
        context.set_trailing_metadata((("x-request-id", request_id),))
        context.abort(grpc.StatusCode[adapter.removeprefix("error:")], f"fake {adapter}")


def _watch_slow_call(adapter: str, context: grpc.ServicerContext, recorder: Recorder) -> None:
    """Marks recorder.cancelled when a "slow" call ends (they end only by cancellation or deadline)."""
    if adapter == "slow":
        context.add_callback(recorder.cancelled.set)


def _wait_for_cancel(context: grpc.ServicerContext) -> None:
    deadline = time.monotonic() + 10
    while context.is_active() and time.monotonic() < deadline:
        time.sleep(0.01)


def _summary(adapter: str, request_id: str, generated: int) -> ipb.GenerationSummary:
    return ipb.GenerationSummary(
        finish_reason=ipb.FINISH_REASON_STOP,
        prompt_tokens=7,
        generated_tokens=generated,
        adapter=f"{adapter}@2" if adapter else "",
        request_id=request_id,
    )


class FakeInference(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    def Generate(self, request: ipb.GenerateRequest, context: grpc.ServicerContext) -> ipb.GenerateResponse:
        request_id = self.recorder.record(context, request)
        _watch_slow_call(request.adapter, context, self.recorder)
        _abort_if_asked(request.adapter, context, request_id)
        if request.adapter == "slow":
            _wait_for_cancel(context)
        source = request.prompt or "|".join(f"{m.role}:{m.content}" for m in request.messages)
        return ipb.GenerateResponse(text=f"echo {source}", summary=_summary(request.adapter, request_id, 5))

    def GenerateStream(
        self, request: ipb.GenerateStreamRequest, context: grpc.ServicerContext
    ) -> Iterator[ipb.GenerateStreamResponse]:
        request_id = self.recorder.record(context, request)
        _watch_slow_call(request.adapter, context, self.recorder)
        _abort_if_asked(request.adapter, context, request_id)
        context.send_initial_metadata((("x-request-id", request_id),))  # with the first chunk, as the server does
        yield ipb.GenerateStreamResponse(text=STREAM_CHUNKS[0])
        if request.adapter.startswith("late-error:"):
            context.abort(grpc.StatusCode[request.adapter.removeprefix("late-error:")], "late failure")
        if request.adapter == "slow":
            _wait_for_cancel(context)
            return
        for chunk in STREAM_CHUNKS[1:]:
            yield ipb.GenerateStreamResponse(text=chunk)
        if request.adapter != "no-summary":
            summary = _summary(request.adapter, request_id, len(STREAM_CHUNKS))
            yield ipb.GenerateStreamResponse(summary=summary)

    def Tokenize(self, request: ipb.TokenizeRequest, context: grpc.ServicerContext) -> ipb.TokenizeResponse:
        self.recorder.record(context, request)
        text = request.text or "".join(m.content for m in request.messages)
        return ipb.TokenizeResponse(token_ids=[ord(c) for c in text], tokens=list(text))

    def Embed(self, request: ipb.EmbedRequest, context: grpc.ServicerContext) -> ipb.EmbedResponse:
        request_id = self.recorder.record(context, request)
        _abort_if_asked(request.adapter, context, request_id)
        return ipb.EmbedResponse(embedding=[0.5, -1.0, 2.0], prompt_tokens=len(request.text), adapter=request.adapter)

    def GetModelInfo(self, request: ipb.GetModelInfoRequest, context: grpc.ServicerContext) -> ipb.GetModelInfoResponse:
        self.recorder.record(context, request)
        return MODEL_INFO


class FakeAdapters(adapters_pb2_grpc.AdaptersServiceServicer):
    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    def _check(self, ref: str, context: grpc.ServicerContext, request: object) -> None:
        request_id = self.recorder.record(context, request)
        _abort_if_asked(ref, context, request_id)
        if ref.split("@")[0] != "acme/support":
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown adapter {ref!r}")

    def ListAdapters(self, request: apb.ListAdaptersRequest, context: grpc.ServicerContext) -> apb.ListAdaptersResponse:
        self.recorder.record(context, request)
        adapters = [ADAPTER] if request.tenant in ("", "acme") else []
        return apb.ListAdaptersResponse(adapters=adapters)

    def GetAdapter(self, request: apb.GetAdapterRequest, context: grpc.ServicerContext) -> apb.GetAdapterResponse:
        self._check(request.adapter, context, request)
        return apb.GetAdapterResponse(adapter=ADAPTER)

    def LoadAdapter(self, request: apb.LoadAdapterRequest, context: grpc.ServicerContext) -> apb.LoadAdapterResponse:
        self._check(request.adapter, context, request)
        return apb.LoadAdapterResponse(adapter="acme/support@2", tier=apb.ADAPTER_TIER_DEVICE)

    def UnloadAdapter(
        self, request: apb.UnloadAdapterRequest, context: grpc.ServicerContext
    ) -> apb.UnloadAdapterResponse:
        self._check(request.adapter, context, request)
        return apb.UnloadAdapterResponse(adapter="acme/support@2", unloaded=False)

    def PinAdapter(self, request: apb.PinAdapterRequest, context: grpc.ServicerContext) -> apb.PinAdapterResponse:
        self._check(request.adapter, context, request)
        return apb.PinAdapterResponse(adapter="acme/support@2")

    def UnpinAdapter(self, request: apb.UnpinAdapterRequest, context: grpc.ServicerContext) -> apb.UnpinAdapterResponse:
        self._check(request.adapter, context, request)
        return apb.UnpinAdapterResponse(adapter="acme/support@2")


class FakeUsage(usage_pb2_grpc.UsageServiceServicer):
    """One row; the window widened to whole minutes as the real server does (an open end: 1,000,020)."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    def GetUsage(self, request: upb.GetUsageRequest, context: grpc.ServicerContext) -> upb.GetUsageResponse:
        self.recorder.record(context, request)
        end = request.end_unix_seconds or 1_000_020
        return upb.GetUsageResponse(
            rows=[
                upb.UsageRow(tenant="acme", adapter="acme/support@2", requests=3, prompt_tokens=30, generated_tokens=9)
            ],
            start_unix_seconds=request.start_unix_seconds // 60 * 60,
            end_unix_seconds=-(-end // 60) * 60,
        )


@dataclass
class FakeServer:
    target: str
    recorder: Recorder


@pytest.fixture(autouse=True)
def _no_api_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The clients read $LORAFLEET_API_KEY by default; a value in the test's environment must not leak in."""
    monkeypatch.delenv("LORAFLEET_API_KEY", raising=False)


@pytest.fixture(scope="module")
def _server() -> Iterator[tuple[str, Recorder]]:
    recorder = Recorder()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(FakeInference(recorder), server)
    adapters_pb2_grpc.add_AdaptersServiceServicer_to_server(FakeAdapters(recorder), server)
    usage_pb2_grpc.add_UsageServiceServicer_to_server(FakeUsage(recorder), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", recorder
    server.stop(grace=None)


@pytest.fixture
def fake_server(_server: tuple[str, Recorder]) -> FakeServer:
    """The module's fake server, with a fresh recorder state for this test."""
    target, recorder = _server
    recorder.metadata, recorder.request = {}, None
    recorder.cancelled.clear()
    return FakeServer(target=target, recorder=recorder)


@pytest.fixture
def dead_target() -> str:
    """An address nothing listens on."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"127.0.0.1:{port}"
