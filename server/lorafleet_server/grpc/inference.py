"""InferenceService: validate, convert, hand to the engine, stream its events back."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable

import grpc

from lorafleet_proto.v1 import inference_pb2, inference_pb2_grpc
from lorafleet_server.edge.observe import CallObserver, CallRecord
from lorafleet_server.engine.engine import Engine
from lorafleet_server.engine.stream import EngineStream
from lorafleet_server.engine.types import FinishReason, ModelInfo, Summary
from lorafleet_server.errors import STOPPED_BY_SERVER, ShuttingDown
from lorafleet_server.grpc import convert
from lorafleet_server.grpc.auth import check_adapter_access
from lorafleet_server.grpc.rpc import stream_rpc, unary_rpc
from lorafleet_server.tenants.access import sees_every_tenant


def cut_by_server(summary: Summary) -> None:
    """A CANCELLED summary that reaches a handler means the server cut the request (a forced stop: a
    client's own cancel ends the handler first): UNAVAILABLE, so the client retries elsewhere rather
    than take a cut-off answer for a whole one (the HTTP edge answers 503)."""
    if summary.finish_reason is FinishReason.CANCELLED:
        raise ShuttingDown(STOPPED_BY_SERVER)


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(
        self,
        engine: Engine,
        info: ModelInfo,
        default_max_new_tokens: int,
        calls: CallObserver,
        slot_memory_bytes: Callable[[], int],
    ) -> None:
        """``info`` is fixed at start; ``slot_memory_bytes`` is read per GetModelInfo, since the slot
        buffers follow the ranks of the adapters loaded at that moment."""
        self._engine = engine
        self.calls = calls
        self._stream = EngineStream(engine)
        self._info = info
        self._slot_memory_bytes = slot_memory_bytes
        self._default_max_new_tokens = default_max_new_tokens

    @unary_rpc("Generate", adapter=True, send_request_id="trailing")
    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext, record: CallRecord
    ) -> inference_pb2.GenerateResponse:
        req = convert.generation_request(request, record.request_id, self._default_max_new_tokens, record.principal)
        check_adapter_access(record.principal, req.adapter)
        parts: list[str] = []
        async for event in self._stream.events(req, record.outcome):
            record.tokens += len(event.token_ids)
            parts.append(event.text)
            if event.summary is not None:
                record.summary = event.summary
                cut_by_server(event.summary)
                return inference_pb2.GenerateResponse(text="".join(parts), summary=convert.summary_pb(event.summary))
        raise RuntimeError("engine stream ended without a summary")

    @stream_rpc("GenerateStream", adapter=True, send_request_id="stream")
    async def GenerateStream(
        self, request: inference_pb2.GenerateStreamRequest, context: grpc.aio.ServicerContext, record: CallRecord
    ) -> AsyncGenerator[inference_pb2.GenerateStreamResponse, None]:
        req = convert.generation_request(
            request, record.request_id, self._default_max_new_tokens, record.principal, stream=True
        )
        check_adapter_access(record.principal, req.adapter)
        async for event in self._stream.events(req, record.outcome):
            record.tokens += len(event.token_ids)
            if event.summary is not None:
                record.summary = event.summary
                if event.summary.finish_reason is FinishReason.CANCELLED and event.text:
                    yield inference_pb2.GenerateStreamResponse(text=event.text)  # then the status says it was cut
                cut_by_server(event.summary)
                yield inference_pb2.GenerateStreamResponse(text=event.text, summary=convert.summary_pb(event.summary))
            elif event.text:
                yield inference_pb2.GenerateStreamResponse(text=event.text)

    @unary_rpc("Tokenize")
    async def Tokenize(
        self, request: inference_pb2.TokenizeRequest, context: grpc.aio.ServicerContext, record: CallRecord
    ) -> inference_pb2.TokenizeResponse:
        convert.check_text_or_messages(request)
        ids = await self._stream.run(
            record.tenant, self._engine.encode_prompt, request.text or None, convert.chat_turns(request.messages)
        )
        tokens = self._engine.tokenizer.convert_ids_to_tokens(ids)
        return inference_pb2.TokenizeResponse(token_ids=ids, tokens=[str(t) for t in tokens])

    @unary_rpc("Embed", adapter=True, send_request_id="trailing")
    async def Embed(
        self, request: inference_pb2.EmbedRequest, context: grpc.aio.ServicerContext, record: CallRecord
    ) -> inference_pb2.EmbedResponse:
        req = convert.embed_request(request, record.request_id, record.principal)
        check_adapter_access(record.principal, req.adapter)
        async for event in self._stream.events(req, record.outcome):
            if event.summary is not None:
                record.summary = event.summary
            if event.summary is not None and event.embedding is not None:
                return inference_pb2.EmbedResponse(
                    embedding=list(event.embedding),
                    prompt_tokens=event.summary.prompt_tokens,
                    adapter=event.summary.adapter,
                )
            if event.summary is not None:  # cut before its prompt was read: the server is shutting down
                raise ShuttingDown(STOPPED_BY_SERVER)
        raise RuntimeError("engine stream ended without an embedding")

    @unary_rpc("Classify", adapter=True, send_request_id="trailing")
    async def Classify(
        self, request: inference_pb2.ClassifyRequest, context: grpc.aio.ServicerContext, record: CallRecord
    ) -> inference_pb2.ClassifyResponse:
        req = convert.classify_request(request, record.request_id, record.principal)
        check_adapter_access(record.principal, req.adapter)
        async for event in self._stream.events(req, record.outcome):
            if event.summary is not None:
                record.summary = event.summary
            if event.summary is not None and event.labels is not None:
                return convert.classify_pb(event.labels, event.summary)
            if event.summary is not None:  # cut before its prompt was read: the server is shutting down
                raise ShuttingDown(STOPPED_BY_SERVER)
        raise RuntimeError("engine stream ended without labels")

    @unary_rpc("GetModelInfo")
    async def GetModelInfo(
        self, request: inference_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext, record: CallRecord
    ) -> inference_pb2.GetModelInfoResponse:
        # A tenant key gets 0: the slot memory moves with every tenant's loaded adapters (an outside
        # review read another tenant's r=32 all-linear adapter off it); the gauge is the operators'.
        slot_bytes = self._slot_memory_bytes() if sees_every_tenant(record.principal) else 0
        return convert.model_info_pb(self._info, slot_bytes)
