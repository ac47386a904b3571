"""The one RPC wrapper (grpc/rpc.py) over a real channel: request ids, status codes, counters, log lines."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import grpc
import pytest
from e2elib import LiveServer

from lorafleet_proto.v1 import adapters_pb2, adapters_pb2_grpc, inference_pb2, inference_pb2_grpc

SHORT = inference_pb2.SamplingParams(max_new_tokens=3)


@pytest.fixture
def channel(live: LiveServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(live.target) as ch:
        yield ch


def requests_total(live: LiveServer, rpc: str, code: str) -> float:
    value = live.service.metrics.registry.get_sample_value("lorafleet_requests_total", {"rpc": rpc, "code": code})
    return value or 0.0


def assert_counted_once(live: LiveServer, rpc: str, code: str, before: float) -> None:
    # The counter moves when the handler's observer closes, which can come after the client has its status.
    deadline = time.monotonic() + 5
    while requests_total(live, rpc, code) < before + 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert requests_total(live, rpc, code) == before + 1, (rpc, code)


def request_log_lines(caplog: pytest.LogCaptureFixture, request_id: str) -> list[dict[str, object]]:
    deadline = time.monotonic() + 5
    while True:
        found = [r.fields for r in caplog.records if getattr(r, "fields", {}).get("request_id") == request_id]  # type: ignore[attr-defined]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def metadata_value(metadata: tuple[tuple[str, str | bytes], ...] | None, key: str) -> list[str | bytes]:
    return [v for k, v in metadata or () if k == key]


def test_unary_rpc_counts_once_and_returns_the_request_id_in_trailing_metadata(
    live: LiveServer, channel: grpc.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    before = requests_total(live, "Generate", "OK")
    with caplog.at_level(logging.INFO, logger="lorafleet.requests"):
        resp, call = stub.Generate.with_call(
            inference_pb2.GenerateRequest(prompt="Hello", adapter="acme/support", params=SHORT),
            metadata=(("x-request-id", "observe-unary-1"),),
            timeout=120,
        )
        assert call.code() == grpc.StatusCode.OK
        assert metadata_value(call.trailing_metadata(), "x-request-id") == ["observe-unary-1"]
        assert metadata_value(call.initial_metadata(), "x-request-id") == []
        assert resp.summary.adapter == "acme/support@1" and resp.summary.generated_tokens > 0
        assert_counted_once(live, "Generate", "OK", before)
        lines = request_log_lines(caplog, "observe-unary-1")
    assert len(lines) == 1
    line = lines[0]
    assert (line["rpc"], line["status"], line["tenant"], line["adapter"]) == (
        "Generate",
        "OK",
        "acme",
        "acme/support@1",
    )
    assert line["generated_tokens"] == resp.summary.generated_tokens


def test_a_request_id_that_is_not_a_sane_token_is_replaced(live: LiveServer, channel: grpc.Channel) -> None:
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    _, call = stub.Embed.with_call(
        inference_pb2.EmbedRequest(text="hi"), metadata=(("x-request-id", "not a token"),), timeout=120
    )
    (rid,) = metadata_value(call.trailing_metadata(), "x-request-id")
    assert isinstance(rid, str) and rid != "not a token" and len(rid) == 32


def test_stream_rpc_counts_once_and_returns_the_request_id_in_initial_metadata(
    live: LiveServer, channel: grpc.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    before = requests_total(live, "GenerateStream", "OK")
    with caplog.at_level(logging.INFO, logger="lorafleet.requests"):
        call = stub.GenerateStream(
            inference_pb2.GenerateStreamRequest(prompt="Hello", params=SHORT),
            metadata=(("x-request-id", "observe-stream-1"),),
            timeout=120,
        )
        assert metadata_value(call.initial_metadata(), "x-request-id") == ["observe-stream-1"]
        chunks = list(call)
        assert call.code() == grpc.StatusCode.OK
        assert chunks and chunks[-1].HasField("summary")
        assert chunks[-1].summary.request_id == "observe-stream-1"
        assert metadata_value(call.trailing_metadata(), "x-request-id") == ["observe-stream-1"]
        assert_counted_once(live, "GenerateStream", "OK", before)
        lines = request_log_lines(caplog, "observe-stream-1")
    assert len(lines) == 1
    assert (lines[0]["rpc"], lines[0]["status"]) == ("GenerateStream", "OK")
    assert lines[0]["generated_tokens"] == chunks[-1].summary.generated_tokens


def test_stream_rpc_error_is_its_status_code_and_counted(live: LiveServer, channel: grpc.Channel) -> None:
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    before = requests_total(live, "GenerateStream", "INVALID_ARGUMENT")
    call = stub.GenerateStream(
        inference_pb2.GenerateStreamRequest(prompt="Hello", adapter="../x", params=SHORT),
        metadata=(("x-request-id", "observe-stream-2"),),
        timeout=120,
    )
    with pytest.raises(grpc.RpcError):
        list(call)
    assert call.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Refused before any response: a trailers-only answer (a proxy may retry an UNAVAILABLE one).
    assert metadata_value(call.initial_metadata(), "x-request-id") == []
    assert metadata_value(call.trailing_metadata(), "x-request-id") == ["observe-stream-2"]
    assert_counted_once(live, "GenerateStream", "INVALID_ARGUMENT", before)


def test_unary_error_keeps_the_request_id_in_trailing_metadata(live: LiveServer, channel: grpc.Channel) -> None:
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    before = requests_total(live, "Generate", "NOT_FOUND")
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(
            inference_pb2.GenerateRequest(prompt="Hello", adapter="acme/nothing", params=SHORT),
            metadata=(("x-request-id", "observe-unary-2"),),
            timeout=120,
        )
    call: grpc.Call = err.value  # type: ignore[assignment]
    assert call.code() == grpc.StatusCode.NOT_FOUND
    assert metadata_value(call.trailing_metadata(), "x-request-id") == ["observe-unary-2"]
    assert_counted_once(live, "Generate", "NOT_FOUND", before)


def test_admin_error_is_invalid_argument_and_counted(
    live: LiveServer, channel: grpc.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    stub = adapters_pb2_grpc.AdaptersServiceStub(channel)
    before_bad = requests_total(live, "GetAdapter", "INVALID_ARGUMENT")
    before_ok = requests_total(live, "GetAdapter", "OK")
    with caplog.at_level(logging.INFO, logger="lorafleet.requests"):
        with pytest.raises(grpc.RpcError) as err:
            stub.GetAdapter(
                adapters_pb2.GetAdapterRequest(adapter="acme/../x"),
                metadata=(("x-request-id", "observe-admin-1"),),
                timeout=30,
            )
        call: grpc.Call = err.value  # type: ignore[assignment]
        assert call.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert metadata_value(call.trailing_metadata(), "x-request-id") == []  # admin RPCs do not echo it
        assert_counted_once(live, "GetAdapter", "INVALID_ARGUMENT", before_bad)
        lines = request_log_lines(caplog, "observe-admin-1")
    assert requests_total(live, "GetAdapter", "OK") == before_ok
    assert len(lines) == 1
    line = lines[0]
    assert (line["rpc"], line["status"], line["adapter"]) == ("GetAdapter", "INVALID_ARGUMENT", "acme/../x")
    assert line["error"]
