"""Adapter affinity at the edge: the routing header must agree with the body; every response names the
replica (``x-lorafleet-replica``), in the initial metadata when it succeeds and the trailing always."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from e2elib import LiveServer

from lorafleet import AsyncLoraFleetClient, NotFoundError, Sampling
from lorafleet.errors import InvalidArgumentError
from lorafleet_proto.v1 import adapters_pb2 as apb
from lorafleet_proto.v1 import adapters_pb2_grpc, inference_pb2_grpc
from lorafleet_proto.v1 import inference_pb2 as ipb
from lorafleet_server.edge.headers import ADAPTER_HEADER, REPLICA_HEADER
from lorafleet_server.grpc.healthcheck import check
from lorafleet_server.grpc.healthcheck import main as healthcheck_main

HOST = socket.gethostname()  # the live server sets no --replica-id
FEW = ipb.SamplingParams(max_new_tokens=2)


def _md(metadata: object) -> dict[str, str]:
    return {k: v for k, v in metadata or ()}  # type: ignore[attr-defined]


@pytest.fixture()
def stub(live: LiveServer) -> Iterator[inference_pb2_grpc.InferenceServiceStub]:
    channel = grpc.insecure_channel(live.target)
    yield inference_pb2_grpc.InferenceServiceStub(channel)
    channel.close()


def test_client_sends_header_and_reads_replica(live: LiveServer) -> None:
    done = live.client.generate("Hello", adapter="acme/support", sampling=Sampling(max_new_tokens=2), timeout=60)
    assert done.replica == HOST
    emb = live.client.embed("Hello", adapter="acme/support")
    assert emb.replica == HOST
    # a failed call names the replica too (in a fleet: which one to look at; an outside review)
    with pytest.raises(NotFoundError) as failed:
        live.client.generate("Hello", adapter="acme/no-such-adapter", sampling=Sampling(max_new_tokens=2))
    assert failed.value.replica == HOST
    # the call's request id, the caller's or the server's own (the client dropped it: an outside review)
    assert live.client.embed("Hello", request_id="emb-1").request_id == "emb-1"
    assert len(emb.request_id) == 32
    assert live.client.load_adapter("acme/support").adapter.startswith("acme/support@")


def test_header_body_mismatch_is_invalid_argument(stub: inference_pb2_grpc.InferenceServiceStub) -> None:
    request = ipb.GenerateRequest(prompt="Hi", adapter="acme/support")
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(request, metadata=((ADAPTER_HEADER, "acme/legal"),), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ADAPTER_HEADER in (info.value.details() or "")
    assert _md(info.value.trailing_metadata())[REPLICA_HEADER] == HOST
    assert not _md(info.value.initial_metadata())  # no response byte before the status: retryable by a proxy
    with pytest.raises(grpc.RpcError) as info:  # the base model in the body, an adapter in the header
        stub.Embed(ipb.EmbedRequest(text="Hi"), metadata=((ADAPTER_HEADER, "acme/legal"),), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    stream = stub.GenerateStream(
        ipb.GenerateStreamRequest(prompt="Hi", adapter="acme/legal"), metadata=((ADAPTER_HEADER, "acme/x"),)
    )
    with pytest.raises(grpc.RpcError) as info:
        list(stream)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not _md(stream.initial_metadata())  # a stream's refusal is trailers-only too
    assert _md(stream.trailing_metadata())[REPLICA_HEADER] == HOST


def test_admin_rpc_mismatch_and_client_error(live: LiveServer) -> None:
    with grpc.insecure_channel(live.target) as channel:
        admin = adapters_pb2_grpc.AdaptersServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            admin.LoadAdapter(
                apb.LoadAdapterRequest(adapter="acme/legal"), metadata=((ADAPTER_HEADER, "acme/support"),)
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(InvalidArgumentError):  # through the client: the header always matches, the body is bad
        live.client.generate("Hi", adapter="acme/no such")


def test_matching_header_serves_and_names_replica(stub: inference_pb2_grpc.InferenceServiceStub) -> None:
    request = ipb.GenerateRequest(prompt="Hi", adapter="acme/support", params=FEW)
    response, call = stub.Generate.with_call(request, metadata=((ADAPTER_HEADER, "acme/support"),), timeout=60)
    assert response.summary.generated_tokens > 0
    assert _md(call.initial_metadata())[REPLICA_HEADER] == HOST
    trailing = _md(call.trailing_metadata())
    assert trailing[REPLICA_HEADER] == HOST and trailing["x-request-id"]
    stream = stub.GenerateStream(ipb.GenerateStreamRequest(prompt="Hi", params=FEW), timeout=60)
    initial = _md(stream.initial_metadata())
    assert initial[REPLICA_HEADER] == HOST and initial["x-request-id"]
    assert list(stream)


def test_residency_is_not_on_the_metrics_port_by_default(live: LiveServer) -> None:
    """Adapter names are tenants' data; the metrics port has no keys (--metrics-adapter-residency
    exports them for routers: tests/metrics)."""
    held = live.client.generate("Hi", adapter="acme/legal", sampling=Sampling(max_new_tokens=1)).adapter
    with urllib.request.urlopen(f"http://127.0.0.1:{live.metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    assert "lorafleet_adapter_resident" not in text and held not in text


def test_container_healthcheck_probe(live: LiveServer) -> None:
    """The Dockerfile's HEALTHCHECK (python -m lorafleet_server.grpc.healthcheck): SERVING is 0."""
    config = dataclasses.replace(live.service.config, host="0.0.0.0", port=live.port)
    assert check(config) == (True, f"127.0.0.1:{live.port}: SERVING")
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    serving, seen = check(dataclasses.replace(config, port=port), timeout=1)
    assert not serving and "UNAVAILABLE" in seen
    assert healthcheck_main([f"--port={live.port}", "--http-port=0"]) == 0
    assert healthcheck_main([f"--port={port}"]) == 1


def test_client_routing_header_only_for_printable_references() -> None:
    from lorafleet._channel import call_metadata

    assert (ADAPTER_HEADER, "acme/support@2") in call_metadata("k", None, "acme/support@2")
    assert all(k != ADAPTER_HEADER for k, _ in call_metadata("k", None, "acme/a\x00b"))  # gRPC cannot carry it
    assert all(k != ADAPTER_HEADER for k, _ in call_metadata("k", None, ""))  # the base model: no header


def test_streams_and_the_async_client_name_the_replica(live: LiveServer) -> None:
    few = Sampling(max_new_tokens=2)
    assert live.client.stream("Hi", adapter="acme/support", sampling=few).wait().replica == HOST

    async def run() -> tuple[str, str, str]:
        async with AsyncLoraFleetClient(live.target, timeout=60) as client:
            done = await client.generate("Hi", adapter="acme/support", sampling=few)
            streamed = await client.stream("Hi", adapter="acme/support", sampling=few).wait()
            emb = await client.embed("Hi", adapter="acme/support", request_id="emb-2")
            assert emb.request_id == "emb-2"
            return done.replica, streamed.replica, emb.replica

    assert asyncio.run(run()) == (HOST, HOST, HOST)
