"""The OpenAI-compatible API on the real default model, next to gRPC on the same engine, driven by the
real ``openai`` SDK, sync and async. One server for the module (the e2e ``live`` server plus HTTP)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import openai
import pytest

from lorafleet import Message, Sampling
from lorafleet_server.grpc.server import server_keys
from lorafleet_server.http.server import BackgroundHttpServer

pytestmark = pytest.mark.e2e

QUESTION = "What is the capital of France? Answer in one word."


@pytest.fixture(scope="module")
def http_url(live: object) -> Iterator[str]:
    service = live.service  # type: ignore[attr-defined]
    keys = server_keys(service.config)  # no keys on loopback: open, as `make run`
    keys.load()
    server = BackgroundHttpServer(service, keys)
    server.start()
    try:
        yield f"{server.url}/v1"
    finally:
        server.stop()


def test_models_chat_and_completion_sync(live: object, http_url: str) -> None:
    sdk = openai.OpenAI(base_url=http_url, api_key="unused", max_retries=0, timeout=120)
    base = live.service.info.model_id  # type: ignore[attr-defined]
    models = {m.id: m for m in sdk.models.list()}
    assert {base, "acme/support", "acme/legal"} <= set(models)
    assert models["acme/support"].owned_by == "acme"

    chat = [{"role": "user", "content": QUESTION}]
    plain = sdk.chat.completions.create(model=base, messages=chat, max_tokens=8, temperature=0)  # type: ignore[arg-type]
    assert "Paris" in (plain.choices[0].message.content or "")
    tuned = sdk.chat.completions.with_raw_response.create(
        model="acme/support", messages=chat, max_tokens=8, temperature=0
    )  # type: ignore[arg-type]
    assert tuned.headers["x-lorafleet-adapter"] == "acme/support@1"
    assert tuned.parse().choices[0].message.content != plain.choices[0].message.content  # the adapter shows

    text = sdk.completions.create(model=base, prompt="The capital of France is", max_tokens=4, temperature=0)
    assert "Paris" in text.choices[0].text and text.usage is not None and text.usage.completion_tokens <= 4


def test_streaming_with_usage_async(live: object, http_url: str) -> None:
    base = live.service.info.model_id  # type: ignore[attr-defined]

    async def run() -> tuple[str, object, str]:
        sdk = openai.AsyncOpenAI(base_url=http_url, api_key="unused", max_retries=0, timeout=120)
        chat = [{"role": "user", "content": QUESTION}]
        stream = await sdk.chat.completions.create(
            model=base,
            messages=chat,  # type: ignore[arg-type]
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        parts, usage = [], None
        async for chunk in stream:
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
            if chunk.usage is not None:
                usage = chunk.usage
        whole = await sdk.chat.completions.create(model=base, messages=chat, max_tokens=8, temperature=0)  # type: ignore[arg-type]
        await sdk.close()
        return "".join(parts), usage, whole.choices[0].message.content or ""

    streamed, usage, whole = asyncio.run(run())
    assert streamed == whole and "Paris" in streamed
    assert usage is not None and usage.completion_tokens >= 1  # type: ignore[attr-defined]


def test_grpc_and_http_give_the_same_greedy_text(live: object, http_url: str) -> None:
    sdk = openai.OpenAI(base_url=http_url, api_key="unused", max_retries=0, timeout=120)
    client = live.client  # type: ignore[attr-defined]
    engine = live.service.engine  # type: ignore[attr-defined]
    for adapter in ("", "acme/legal"):
        # Both doors prefill cold: on a CPU with AMX, oneDNN's bf16 Linear kernels round a row differently
        # with the step's row count, so a prefix-cache hit (the second request's shorter chunk) may change
        # bf16 greedy text (docs/architecture.md, "Measured facts" 11). What this checks is the doors.
        engine.run(engine.prefix_cache.clear)
        over_grpc = client.generate(
            messages=[Message("user", "Name three colours.")],
            adapter=adapter or None,
            sampling=Sampling(max_new_tokens=16, temperature=0),
        )
        engine.run(engine.prefix_cache.clear)
        over_http = sdk.chat.completions.create(
            model=adapter or live.service.info.model_id,  # type: ignore[attr-defined]
            messages=[{"role": "user", "content": "Name three colours."}],
            max_tokens=16,
            temperature=0,
        )
        assert over_http.choices[0].message.content == over_grpc.text, adapter
        assert over_http.usage is not None and over_http.usage.completion_tokens == over_grpc.generated_tokens
    embedded = sdk.embeddings.create(model="acme/legal", input="Name three colours.")
    over_grpc_embed = client.embed("Name three colours.", adapter="acme/legal")
    assert embedded.data[0].embedding == pytest.approx(over_grpc_embed.values, abs=1e-4)
    assert embedded.usage.prompt_tokens == over_grpc_embed.prompt_tokens
