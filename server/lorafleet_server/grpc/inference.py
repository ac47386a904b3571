"""InferenceService: validate, convert, hand to the engine, stream its events back."""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc

from lorafleet_proto.v1 import inference_pb2, inference_pb2_grpc
from lorafleet_server.engine.engine import Engine
from lorafleet_server.engine.types import GenerationRequest, ModelInfo, TokenEvent
from lorafleet_server.grpc import convert
from lorafleet_server.grpc.observe import CallObserver, CallRecord
from lorafleet_server.grpc.status import status_for

log = logging.getLogger(__name__)
T = TypeVar("T")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id_of(context: grpc.aio.ServicerContext) -> str:
    """The caller's ``x-request-id`` when it is a sane token, else a fresh one."""
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and isinstance(value, str) and _REQUEST_ID.fullmatch(value):
            return value
    return uuid.uuid4().hex


async def abort_with(context: grpc.aio.ServicerContext, exc: Exception, record: CallRecord) -> None:
    """Map a domain error to its status (the one table in status.py) and end the RPC with it."""
    code = status_for(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.error("internal error in %s %s", record.rpc, record.request_id, exc_info=exc)
    record.code = code
    record.error = str(exc) or type(exc).__name__
    await context.abort(code, record.error)


async def guarded(context: grpc.aio.ServicerContext, fn: Callable[[], Awaitable[T]], record: CallRecord) -> T:
    """Run a handler body; domain errors become their status code."""
    try:
        return await fn()
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        await abort_with(context, exc, record)
        raise AssertionError("unreachable") from exc  # abort raises


class EngineStream:
    """Bridges one engine request (events on the engine thread) to an asyncio consumer."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def events(self, req: GenerationRequest) -> AsyncIterator[TokenEvent]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[TokenEvent] = asyncio.Queue()

        def sink(event: TokenEvent) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        handle = await asyncio.to_thread(self._engine.submit, req, sink)
        finished = False
        try:
            while True:
                event = await events.get()
                if event.error is not None:
                    finished = True
                    raise event.error
                finished = event.final
                yield event
                if finished:
                    return
        finally:
            if not finished:  # client cancelled, deadline passed, or the consumer stopped early
                handle.cancel()


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, engine: Engine, info: ModelInfo, default_max_new_tokens: int, calls: CallObserver) -> None:
        self._engine = engine
        self._calls = calls
        self._stream = EngineStream(engine)
        self._info = info
        self._default_max_new_tokens = default_max_new_tokens

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.GenerateResponse:
        rid = request_id_of(context)
        context.set_trailing_metadata((("x-request-id", rid),))
        async with self._calls.call("Generate", context, rid, request.adapter) as record:

            async def run() -> inference_pb2.GenerateResponse:
                req = convert.generation_request(request, rid, self._default_max_new_tokens)
                parts: list[str] = []
                async for event in self._stream.events(req):
                    parts.append(event.text)
                    if event.summary is not None:
                        record.summary = event.summary
                        return inference_pb2.GenerateResponse(
                            text="".join(parts), summary=convert.summary_pb(event.summary)
                        )
                raise RuntimeError("engine stream ended without a summary")

            return await guarded(context, run, record)

    async def GenerateStream(
        self, request: inference_pb2.GenerateStreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateStreamResponse]:
        rid = request_id_of(context)
        await context.send_initial_metadata((("x-request-id", rid),))
        async with self._calls.call("GenerateStream", context, rid, request.adapter) as record:
            try:
                req = convert.generation_request(request, rid, self._default_max_new_tokens)
                async for event in self._stream.events(req):
                    if event.summary is not None:
                        record.summary = event.summary
                        yield inference_pb2.GenerateStreamResponse(
                            text=event.text, summary=convert.summary_pb(event.summary)
                        )
                    elif event.text:
                        yield inference_pb2.GenerateStreamResponse(text=event.text)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                await abort_with(context, exc, record)

    async def Tokenize(
        self, request: inference_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.TokenizeResponse:
        async def run() -> inference_pb2.TokenizeResponse:
            ids = await asyncio.to_thread(
                self._engine.encode_prompt, request.text or None, convert.chat_turns(request.messages)
            )
            tokens = self._engine.tokenizer.convert_ids_to_tokens(ids)
            return inference_pb2.TokenizeResponse(token_ids=ids, tokens=[str(t) for t in tokens])

        async with self._calls.call("Tokenize", context, request_id_of(context)) as record:
            return await guarded(context, run, record)

    async def Embed(
        self, request: inference_pb2.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.EmbedResponse:
        rid = request_id_of(context)
        context.set_trailing_metadata((("x-request-id", rid),))
        async with self._calls.call("Embed", context, rid, request.adapter) as record:
            return await guarded(context, lambda: self._embed(request, rid, record), record)

    async def _embed(
        self, request: inference_pb2.EmbedRequest, rid: str, record: CallRecord
    ) -> inference_pb2.EmbedResponse:
        req = convert.embed_request(request, rid)
        async for event in self._stream.events(req):
            if event.summary is not None:
                record.summary = event.summary
            if event.summary is not None and event.embedding is not None:
                return inference_pb2.EmbedResponse(
                    embedding=list(event.embedding),
                    prompt_tokens=event.summary.prompt_tokens,
                    adapter=event.summary.adapter,
                )
            if event.summary is not None:  # cancelled before the prompt was read
                raise asyncio.CancelledError()
        raise RuntimeError("engine stream ended without an embedding")

    async def GetModelInfo(
        self, request: inference_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.GetModelInfoResponse:
        async with self._calls.call("GetModelInfo", context, request_id_of(context)):
            return convert.model_info_pb(self._info)
