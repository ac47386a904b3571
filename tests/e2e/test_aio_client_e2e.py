"""AsyncLoraFleetClient against the real server over gRPC (the shared live server, real model and adapters)."""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
import pytest
from e2elib import LiveServer, metric, wait_for_metric
from enginelib import engine_held

from lorafleet import (
    AsyncLoraFleetClient,
    Completion,
    DeadlineExceededError,
    Embedding,
    InvalidArgumentError,
    LoraFleetError,
    Message,
    ModelInfo,
    NotFoundError,
    Sampling,
    Tokens,
)

T = TypeVar("T")
CAPITAL = [Message("user", "What is the capital of France?")]


def run(live: LiveServer, body: Callable[[AsyncLoraFleetClient], Awaitable[T]]) -> T:
    """Run ``body`` with a client made inside its own event loop, as the client requires."""

    async def main() -> T:
        async with AsyncLoraFleetClient(live.target, timeout=120) as client:
            await client.wait_for_ready(30)
            return await body(client)

    return asyncio.run(main())


def test_generate_and_stream_match_the_sync_client(live: LiveServer) -> None:
    sampling = Sampling(max_new_tokens=24)
    sync_base = live.client.generate(messages=CAPITAL, sampling=sampling)
    sync_tuned = live.client.generate(messages=CAPITAL, adapter="acme/support", sampling=sampling)

    async def body(client: AsyncLoraFleetClient) -> tuple[Completion, Completion, list[str], Completion]:
        base = await client.generate(messages=CAPITAL, sampling=sampling, request_id="aio-generate-1")
        tuned = await client.generate(messages=CAPITAL, adapter="acme/support", sampling=sampling)
        stream = client.stream(messages=CAPITAL, adapter="acme/support", sampling=sampling)
        chunks = [chunk async for chunk in stream]
        return base, tuned, chunks, stream.result

    base, tuned, chunks, streamed = run(live, body)
    assert base == dataclasses.replace(sync_base, request_id="aio-generate-1")
    assert "Paris" in base.text
    assert tuned.text == sync_tuned.text and tuned.adapter == "acme/support@1"
    assert tuned.text != base.text
    assert len(chunks) > 3 and "".join(chunks) == sync_tuned.text
    assert streamed.text == sync_tuned.text and streamed.adapter == "acme/support@1"
    assert streamed.generated_tokens == sync_tuned.generated_tokens
    assert streamed.finish_reason == sync_tuned.finish_reason


def test_embed_tokenize_and_model_info(live: LiveServer) -> None:
    text = "LoRA adapters are small."

    async def body(client: AsyncLoraFleetClient) -> tuple[Embedding, Embedding, Tokens, Tokens, ModelInfo, list[str]]:
        return (
            await client.embed(text),
            await client.embed(text, adapter="acme/legal"),
            await client.tokenize("Hello world, lorafleet!"),
            await client.tokenize(messages=CAPITAL),
            await client.model_info(),
            [a.ref for a in await client.list_adapters("acme")],
        )

    base, tuned, plain, chat, info, refs = run(live, body)
    want_base = live.client.embed(text)
    assert len(base.values) == 576 and all(math.isfinite(v) for v in base.values)
    assert base.values == pytest.approx(want_base.values, abs=1e-5)
    assert tuned.adapter == "acme/legal@1" and tuned.values != base.values
    tokenizer = live.service.engine.tokenizer
    assert plain.ids == tokenizer.encode("Hello world, lorafleet!", add_special_tokens=False)
    assert plain.tokens == tokenizer.convert_ids_to_tokens(plain.ids)
    assert chat.ids == live.client.tokenize(messages=CAPITAL).ids
    assert info == live.client.model_info()
    assert info.model_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert {"acme/support", "acme/legal"} <= set(refs)


def test_errors_are_the_clients_exception_classes(live: LiveServer) -> None:
    cancelled = metric(live.service, "lorafleet_generations_total", reason="cancelled")

    async def expect(call: Awaitable[object]) -> LoraFleetError:
        with pytest.raises(LoraFleetError) as err:
            await call
        return err.value

    async def stream_all(client: AsyncLoraFleetClient) -> None:
        async for _ in client.stream("hi", adapter="acme/nothing"):
            pass

    async def body(client: AsyncLoraFleetClient) -> list[LoraFleetError]:
        return [
            await expect(client.generate("hi", adapter="acme/nothing", request_id="aio-err-1")),
            await expect(client.generate("hi", adapter="../x")),
            await expect(stream_all(client)),
            await expect(client.get_adapter("acme/nothing")),
            await too_late(client),
        ]

    async def too_late(client: AsyncLoraFleetClient) -> LoraFleetError:
        # The engine is held while the deadline passes, so no machine is fast enough to finish first and
        # the deadline can be long enough for any to get the call to the server (a deadline scaled to
        # this machine's speed could end, on busy cores, before the call reached it: an outside review).
        with engine_held(live.service.engine):
            return await expect(
                client.generate("Count to a thousand:", sampling=Sampling(max_new_tokens=128), timeout=1.0)
            )

    not_found, invalid, stream_not_found, admin_not_found, late = run(live, body)
    assert type(not_found) is NotFoundError and not_found.code == grpc.StatusCode.NOT_FOUND
    assert "acme/nothing" in not_found.message and not_found.request_id == "aio-err-1"
    assert type(invalid) is InvalidArgumentError and invalid.code == grpc.StatusCode.INVALID_ARGUMENT
    assert type(stream_not_found) is NotFoundError
    assert type(admin_not_found) is NotFoundError
    assert type(late) is DeadlineExceededError and late.code == grpc.StatusCode.DEADLINE_EXCEEDED
    # the server stops the late generation too (a moment after the client gave up: waited for here, so
    # the next test's count of cancellations starts after it)
    wait_for_metric(live.service, "lorafleet_generations_total", cancelled + 1, reason="cancelled")


def test_cancelling_an_async_stream_stops_the_generation(live: LiveServer) -> None:
    service = live.service
    cancelled = metric(service, "lorafleet_generations_total", reason="cancelled")

    async def body(client: AsyncLoraFleetClient) -> tuple[list[str], bool]:
        stream = client.stream("Count from one to a thousand:", sampling=Sampling(max_new_tokens=128))
        got = [await stream.__anext__(), await stream.__anext__()]
        stream.cancel()
        rest = [chunk async for chunk in stream]  # iteration simply ends
        assert rest == []
        return got, stream.cancelled

    got, was_cancelled = run(live, body)
    assert all(got) and was_cancelled
    wait_for_metric(service, "lorafleet_generations_total", cancelled + 1, reason="cancelled")
