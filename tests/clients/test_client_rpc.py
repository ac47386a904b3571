"""LoraFleetClient and AsyncLoraFleetClient against the fake server: responses, metadata, errors."""

from __future__ import annotations

import asyncio
import copy
import math
import pickle
from typing import TYPE_CHECKING
from unittest import mock

import grpc
import pytest

from lorafleet import (
    AdapterLoad,
    AdapterUnload,
    AsyncGenerationStream,
    AsyncLoraFleetClient,
    Completion,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    LoraFleetClient,
    LoraFleetError,
    Message,
    NotFoundError,
    PermissionDeniedError,
    RequestCancelledError,
    ResourceExhaustedError,
    Sampling,
    UnauthenticatedError,
    UnavailableError,
    UsageReport,
    UsageRow,
)
from lorafleet._channel import channel_options
from lorafleet_proto.v1 import inference_pb2 as ipb

if TYPE_CHECKING:
    from conftest import FakeServer

ERRORS: list[tuple[grpc.StatusCode, type[LoraFleetError]]] = [
    (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgumentError),
    (grpc.StatusCode.NOT_FOUND, NotFoundError),
    (grpc.StatusCode.UNAUTHENTICATED, UnauthenticatedError),
    (grpc.StatusCode.PERMISSION_DENIED, PermissionDeniedError),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, ResourceExhaustedError),
    (grpc.StatusCode.FAILED_PRECONDITION, FailedPreconditionError),
    (grpc.StatusCode.UNAVAILABLE, UnavailableError),
    (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceededError),
    (grpc.StatusCode.CANCELLED, RequestCancelledError),
    (grpc.StatusCode.INTERNAL, LoraFleetError),
]
STREAM_COMPLETION = Completion(
    text="Hello, wörld",
    finish_reason="stop",
    prompt_tokens=7,
    generated_tokens=3,
    adapter="acme/support@2",
    request_id="rid-7",
)


# Sync client


def test_generate_maps_response_and_sends_request(fake_server: FakeServer) -> None:
    sampling = Sampling(max_new_tokens=16, temperature=0.5, seed=2**40, stop=("\n",))
    with LoraFleetClient(fake_server.target, api_key="k1", timeout=10) as client:
        done = client.generate("hi", adapter="acme/support", sampling=sampling, request_id="rid-1")
    assert done == Completion("echo hi", "stop", 7, 5, "acme/support@2", "rid-1")
    assert fake_server.recorder.metadata["authorization"] == "Bearer k1"
    assert fake_server.recorder.metadata["x-request-id"] == "rid-1"
    request = fake_server.recorder.request
    assert isinstance(request, ipb.GenerateRequest)
    assert request.params.max_new_tokens == 16 and request.params.seed == 2**40
    assert not request.params.HasField("top_p")
    assert list(request.params.stop) == ["\n"]


def test_generate_with_messages_and_no_optional_metadata(fake_server: FakeServer) -> None:
    with LoraFleetClient(fake_server.target) as client:
        done = client.generate(messages=[Message("system", "be brief"), Message("user", "hi")])
    assert done.text == "echo system:be brief|user:hi"
    assert done.adapter == "" and done.request_id == "generated-id"
    assert "authorization" not in fake_server.recorder.metadata
    request = fake_server.recorder.request
    assert isinstance(request, ipb.GenerateRequest) and not request.HasField("params")


@pytest.mark.parametrize(("prompt", "messages"), [(None, None), ("hi", [Message("user", "hi")])])
def test_generate_needs_exactly_one_input(prompt: str | None, messages: list[Message] | None) -> None:
    with LoraFleetClient("127.0.0.1:1") as client, pytest.raises(ValueError, match="exactly one"):
        client.generate(prompt, messages=messages)


def test_stream_yields_chunks_then_result(fake_server: FakeServer) -> None:
    with LoraFleetClient(fake_server.target) as client:
        stream = client.stream("hi", adapter="acme/support", request_id="rid-7")
        with pytest.raises(RuntimeError, match="not finished"):
            _ = stream.result
        assert list(stream) == ["Hel", "lo, ", "wörld"]
        assert stream.done and stream.result == STREAM_COMPLETION
        assert client.stream("hi", adapter="acme/support", request_id="rid-7").wait() == STREAM_COMPLETION


def test_stream_cancel_ends_iteration(fake_server: FakeServer) -> None:
    with LoraFleetClient(fake_server.target, timeout=10) as client:
        stream = client.stream("hi", adapter="slow")
        assert next(stream) == "Hel"
        stream.cancel()
        assert list(stream) == []
        assert stream.cancelled and stream.text == "Hel"
        with pytest.raises(RequestCancelledError):
            _ = stream.result
    assert fake_server.recorder.cancelled.wait(5)


def test_stream_context_manager_cancels_on_exit(fake_server: FakeServer) -> None:
    with LoraFleetClient(fake_server.target, timeout=10) as client:
        with client.stream("hi", adapter="slow") as stream:
            assert next(stream) == "Hel"
        assert stream.cancelled
    assert fake_server.recorder.cancelled.wait(5)


def test_stream_errors(fake_server: FakeServer) -> None:
    with LoraFleetClient(fake_server.target) as client:
        with pytest.raises(NotFoundError, match="fake error:NOT_FOUND") as caught:
            list(client.stream("hi", adapter="error:NOT_FOUND", request_id="rid-9"))
        assert caught.value.request_id == "rid-9"

        stream = client.stream("hi", adapter="late-error:RESOURCE_EXHAUSTED", request_id="rid-10")
        assert next(stream) == "Hel"
        with pytest.raises(ResourceExhaustedError, match="late failure") as late:
            next(stream)
        assert late.value.request_id == "rid-10"  # from the stream's initial metadata
        with pytest.raises(LoraFleetError, match="without a summary") as missing:
            list(client.stream("hi", adapter="no-summary"))
        assert missing.value.code == grpc.StatusCode.INTERNAL
        # After a failure, wait() and .result raise the stream's error again (not "has not finished")
        with pytest.raises(ResourceExhaustedError, match="late failure"):
            stream.wait()
        with pytest.raises(ResourceExhaustedError, match="late failure"):
            _ = stream.result


def test_errors_survive_pickle_and_copy() -> None:
    error = NotFoundError(grpc.StatusCode.NOT_FOUND, "no adapter acme/x", "rid-1", "replica-2")
    for clone in (pickle.loads(pickle.dumps(error)), copy.copy(error), copy.deepcopy(error)):
        assert type(clone) is NotFoundError and str(clone) == str(error)
        assert (clone.code, clone.message, clone.request_id) == (error.code, error.message, error.request_id)
        assert clone.replica == "replica-2"


def test_channel_options_pass_through_and_a_bad_key_opens_no_channel(fake_server: FakeServer) -> None:
    options = [("grpc.keepalive_time_ms", 30000), ("grpc.max_receive_message_length", 1024)]
    assert channel_options(4096, options) == [("grpc.max_send_message_length", 4096), *options]
    with pytest.raises(ValueError, match="pairs"):
        channel_options(4096, ["grpc.keepalive_time_ms"])  # type: ignore[list-item]
    with LoraFleetClient(fake_server.target, options=options) as client:  # the receive limit now 1 KiB
        with pytest.raises(ResourceExhaustedError):
            client.generate("x" * 2000, adapter="echo-long")
    with mock.patch("grpc.insecure_channel") as opened, pytest.raises(ValueError, match="api_key"):
        LoraFleetClient(fake_server.target, api_key="k\u00e9y")
    opened.assert_not_called()


def test_wait_for_ready_without_a_deadline(fake_server: FakeServer) -> None:
    with LoraFleetClient(fake_server.target) as client:
        client.wait_for_ready(math.inf)  # it raised OverflowError


@pytest.mark.parametrize(("code", "error_class"), ERRORS)
def test_errors_map_to_classes(fake_server: FakeServer, code: grpc.StatusCode, error_class: type) -> None:
    with LoraFleetClient(fake_server.target) as client, pytest.raises(LoraFleetError) as caught:
        client.generate("hi", adapter=f"error:{code.name}", request_id="rid-e")
    assert type(caught.value) is error_class
    assert caught.value.code == code
    assert caught.value.message == f"fake error:{code.name}"
    assert caught.value.request_id == "rid-e"
    assert str(caught.value) == f"{code.name}: fake error:{code.name}"
    assert isinstance(caught.value.__cause__, grpc.RpcError)


def test_deadline_and_unreachable_server(fake_server: FakeServer, dead_target: str) -> None:
    with LoraFleetClient(fake_server.target) as client, pytest.raises(DeadlineExceededError):
        client.generate("hi", adapter="slow", timeout=0.2)
    with LoraFleetClient(dead_target, timeout=5) as client:
        with pytest.raises(UnavailableError):
            client.model_info()
        with pytest.raises(UnavailableError, match="no connection"):
            client.wait_for_ready(0.2)


def test_tokenize_embed_model_info(fake_server: FakeServer) -> None:
    with LoraFleetClient(fake_server.target) as client:
        client.wait_for_ready(5)
        tokens = client.tokenize("hé")
        assert tokens.ids == [ord("h"), ord("é")] and tokens.tokens == ["h", "é"]
        assert client.tokenize(messages=[Message("user", "ab")]).tokens == ["a", "b"]
        embedding = client.embed("abc", adapter="acme/support", request_id="rid-2")
        assert embedding.values == [0.5, -1.0, 2.0]
        assert (embedding.prompt_tokens, embedding.adapter) == (3, "acme/support")
        assert fake_server.recorder.metadata["x-request-id"] == "rid-2"
        info = client.model_info()
    assert info.model_id == "tiny/model" and info.max_message_bytes == 8 * 1024 * 1024
    assert info.target_modules == ("q_proj", "v_proj")
    assert info.adapter_slot_memory_bytes == 1_327_104


def test_admin_calls(fake_server: FakeServer) -> None:
    with LoraFleetClient(fake_server.target, api_key="admin") as client:
        adapters = client.list_adapters()
        assert [a.ref for a in adapters] == ["acme/support"]
        assert client.list_adapters(tenant="other") == []
        adapter = client.get_adapter("acme/support")
        assert adapter.latest_version == 2
        latest = adapter.versions[-1]
        assert (latest.tier, latest.pinned, latest.active_requests) == ("device", True, 3)
        assert latest.manifest is not None and latest.manifest.files == {"adapter.safetensors": "ff00"}
        assert adapter.versions[0].manifest is None and adapter.versions[0].tier == "store"
        assert client.load_adapter("acme/support") == AdapterLoad("acme/support@2", "device")
        assert client.unload_adapter("acme/support@2") == AdapterUnload("acme/support@2", unloaded=False)
        assert client.pin_adapter("acme/support@2") == "acme/support@2"
        assert client.unpin_adapter("acme/support@2") == "acme/support@2"
        assert fake_server.recorder.metadata["authorization"] == "Bearer admin"
        with pytest.raises(NotFoundError, match="unknown adapter"):
            client.load_adapter("acme/nope")
        with pytest.raises(PermissionDeniedError):
            client.pin_adapter("error:PERMISSION_DENIED")


# Async client


def test_async_client_calls(fake_server: FakeServer) -> None:
    async def run() -> None:
        async with AsyncLoraFleetClient(fake_server.target, api_key="k2", timeout=10) as client:
            await client.wait_for_ready(5)
            done = await client.generate("hi", adapter="acme/support", request_id="rid-a")
            assert done == Completion("echo hi", "stop", 7, 5, "acme/support@2", "rid-a")
            assert fake_server.recorder.metadata["authorization"] == "Bearer k2"

            stream = client.stream("hi", adapter="acme/support", request_id="rid-7")
            assert [chunk async for chunk in stream] == ["Hel", "lo, ", "wörld"]
            assert stream.result == STREAM_COMPLETION
            again = client.stream("hi", adapter="acme/support", request_id="rid-7")
            assert await again.wait() == STREAM_COMPLETION

            assert (await client.tokenize("ab")).ids == [97, 98]
            assert (await client.embed("abc")).values == [0.5, -1.0, 2.0]
            assert (await client.model_info()).device == "cpu"
            assert [a.ref for a in await client.list_adapters()] == ["acme/support"]
            assert (await client.get_adapter("acme/support")).name == "support"
            assert await client.load_adapter("acme/support") == AdapterLoad("acme/support@2", "device")
            assert await client.unload_adapter("acme/support") == AdapterUnload("acme/support@2", unloaded=False)
            assert await client.pin_adapter("acme/support") == "acme/support@2"
            assert await client.unpin_adapter("acme/support") == "acme/support@2"

    asyncio.run(run())


@pytest.mark.parametrize(("code", "error_class"), ERRORS)
def test_async_errors_map_to_classes(fake_server: FakeServer, code: grpc.StatusCode, error_class: type) -> None:
    async def run() -> LoraFleetError:
        async with AsyncLoraFleetClient(fake_server.target) as client:
            try:
                await client.generate("hi", adapter=f"error:{code.name}", request_id="rid-e")
            except LoraFleetError as error:
                return error
        raise AssertionError("no error raised")

    error = asyncio.run(run())
    assert type(error) is error_class
    assert (error.code, error.message, error.request_id) == (code, f"fake error:{code.name}", "rid-e")


def test_async_stream_errors_and_cancel(fake_server: FakeServer, dead_target: str) -> None:
    async def run() -> None:
        async with AsyncLoraFleetClient(fake_server.target, timeout=10) as client:
            with pytest.raises(NotFoundError) as caught:
                async for _ in client.stream("hi", adapter="error:NOT_FOUND", request_id="rid-s"):
                    pass
            assert caught.value.request_id == "rid-s"  # a stream's id comes in its initial metadata
            late = client.stream("hi", adapter="late-error:UNAVAILABLE")
            assert await late.__anext__() == "Hel"
            with pytest.raises(UnavailableError, match="late failure"):
                await late.__anext__()

            async with client.stream("hi", adapter="slow") as stream:
                assert await stream.__anext__() == "Hel"
                stream.cancel()
                assert [chunk async for chunk in stream] == []
            assert stream.cancelled and stream.text == "Hel"
            with pytest.raises(RequestCancelledError):
                _ = stream.result
            with pytest.raises(DeadlineExceededError):
                await client.generate("hi", adapter="slow", timeout=0.2)
        async with AsyncLoraFleetClient(dead_target, timeout=5) as dead:
            with pytest.raises(UnavailableError):
                await dead.tokenize("x")
            with pytest.raises(UnavailableError, match="no connection"):
                await dead.wait_for_ready(0.2)

    asyncio.run(run())
    assert fake_server.recorder.cancelled.wait(5)


# Found by an outside review of the client.


def test_an_error_without_details_reads_as_its_code(fake_server: FakeServer) -> None:
    """The message was the RpcError's repr: a multi-line debug dump, printed as is by the CLI."""
    with LoraFleetClient(fake_server.target) as client, pytest.raises(UnavailableError) as caught:
        client.generate("hi", adapter="bare-error:UNAVAILABLE")
    assert caught.value.message == "UNAVAILABLE"


def test_an_infinite_timeout_is_no_deadline(fake_server: FakeServer) -> None:
    """timeout=math.inf failed DEADLINE_EXCEEDED at once (gRPC overflows far deadlines into the past),
    and there was no other way to lift a client's default deadline for one call."""
    with LoraFleetClient(fake_server.target, timeout=10) as client:
        assert client.generate("hi", timeout=math.inf).text == "echo hi"
        with pytest.raises(ValueError, match="timeout must be a number of seconds"):
            client.generate("hi", timeout=math.nan)

    async def run() -> str:
        async with AsyncLoraFleetClient(fake_server.target, timeout=math.inf) as client:
            return (await client.generate("hi")).text

    assert asyncio.run(run()) == "echo hi"


def test_metadata_gRPC_cannot_carry_is_refused_by_name(fake_server: FakeServer) -> None:
    """A key read from a file keeps its newline: every call failed INTERNAL "Invalid metadata"."""
    with LoraFleetClient(fake_server.target, api_key="k1\n") as client:
        client.generate("hi")
        assert fake_server.recorder.metadata["authorization"] == "Bearer k1"
        with pytest.raises(ValueError, match="request_id must be 1-128 characters"):
            client.generate("hi", request_id="a\tb")
    with pytest.raises(ValueError, match="api_key must be printable ASCII"):
        LoraFleetClient(fake_server.target, api_key="кл\u044e\u0447")


def test_a_call_after_close_is_a_lorafleet_error(fake_server: FakeServer) -> None:
    """grpc raised ValueError("Cannot invoke RPC on closed channel!"), outside the client's errors."""
    client = LoraFleetClient(fake_server.target)
    assert client.generate("hi").text == "echo hi"
    client.close()
    for call in (lambda: client.generate("hi"), lambda: client.stream("hi"), lambda: client.model_info()):
        with pytest.raises(RequestCancelledError, match="client is closed"):
            call()
    with pytest.raises(RequestCancelledError, match="client is closed"):
        client.wait_for_ready(1)


def test_a_close_from_another_thread_between_the_check_and_the_call_is_a_lorafleet_error(
    fake_server: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by an outside review: a thread's call passed the open check, another thread closed the
    client, and gRPC's ValueError("Channel closed!") escaped (14 of 160 calls in its run). The race is
    made certain here: the check passes although the client is closed."""
    client = LoraFleetClient(fake_server.target)
    client.close()
    monkeypatch.setattr(client, "_check_open", lambda: None)
    for call in (lambda: client.generate("hi"), lambda: client.stream("hi"), lambda: client.tokenize("hi")):
        with pytest.raises(RequestCancelledError, match="client is closed"):
            call()


def test_a_request_id_the_server_would_replace_is_refused(fake_server: FakeServer) -> None:
    """The server keeps ids of letters, digits and ``._:-`` (1-128) and replaced any other with a random
    one in silence: the caller's logs no longer matched the server's."""
    with LoraFleetClient(fake_server.target) as client:
        for bad in ("order/123", "my id", "x" * 129, ""):
            with pytest.raises(ValueError, match="request_id must be 1-128 characters"):
                client.generate("hi", request_id=bad)
        assert client.generate("hi", request_id="order-123:v1.2_a").text == "echo hi"


def test_async_cancellation_and_close(fake_server: FakeServer) -> None:
    async def run() -> None:
        client = AsyncLoraFleetClient(fake_server.target, timeout=30)
        # The task's own cancellation propagates even after cancel() (a watchdog, a TaskGroup).
        stream = client.stream("hi", adapter="slow")
        assert await stream.__anext__() == "Hel"

        async def read_all() -> list[str]:
            return [chunk async for chunk in stream]

        reader = asyncio.ensure_future(read_all())
        await asyncio.sleep(0.1)
        stream.cancel()
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
        # A task cancelled mid-stream leaves the stream cancelled: reading again ends, .result says so.
        again = client.stream("hi", adapter="slow")
        assert await again.__anext__() == "Hel"
        reader = asyncio.ensure_future(again.wait())
        await asyncio.sleep(0.1)
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
        assert [chunk async for chunk in again] == [] and again.cancelled
        with pytest.raises(RequestCancelledError):
            _ = again.result
        # close() under calls no one cancelled: a LoraFleetError, not a bare CancelledError that a
        # TaskGroup would silently drop.
        last = client.stream("hi", adapter="slow")
        assert await last.__anext__() == "Hel"
        streaming = asyncio.ensure_future(read_all_of(last))
        unary = asyncio.ensure_future(client.generate("hi", adapter="slow"))
        await asyncio.sleep(0.2)
        await client.close()
        for task in (streaming, unary):
            with pytest.raises(RequestCancelledError, match="client was closed"):
                await task
        # A call after close(): grpc.aio raised its UsageError, not a LoraFleetError.
        with pytest.raises(RequestCancelledError, match="client is closed"):
            await client.generate("hi")
        with pytest.raises(RequestCancelledError, match="client is closed"):
            client.stream("hi")
        with pytest.raises(RequestCancelledError, match="client is closed"):
            await client.wait_for_ready(1)

    async def read_all_of(stream: AsyncGenerationStream) -> list[str]:
        return [chunk async for chunk in stream]

    asyncio.run(run())


def test_a_usage_report_carries_the_window_the_server_summed(fake_server: FakeServer) -> None:
    """get_usage returned the rows only: a billing poller could not learn where the next window starts
    (the server widens it to whole minutes; an open end is the minute after its now)."""
    row = UsageRow("acme", "acme/support@2", 3, 30, 9)
    with LoraFleetClient(fake_server.target) as client:
        assert client.usage_report(1_000_000 - 30) == UsageReport(999_960, 1_000_020, (row,))
        assert client.usage_report(60, 125).end == 180
        assert client.get_usage(60, 125, tenant="acme") == [row]
        assert fake_server.recorder.request.tenant == "acme"

    async def run() -> UsageReport:
        async with AsyncLoraFleetClient(fake_server.target) as client:
            assert await client.get_usage(0) == [row]
            return await client.usage_report(120)

    assert asyncio.run(run()) == UsageReport(120, 1_000_020, (row,))
