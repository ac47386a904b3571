"""The OpenAI-compatible FastAPI app: models, completions, chat completions and health on one engine.

A request goes the way a gRPC one does (``grpc/inference.py``): request id, the caller's ``Principal``
(from ``HttpAuth``), the body turned into the engine's ``GenerationRequest``, tenant isolation
(``check_adapter_access``), ``EngineStream``, and one ``CallObserver`` record (counter, latency, one log
line) per request. Errors are OpenAI-shaped with the status of the one table (``errors.describe``).

Streaming (``stream: true``) is SSE: ``data: {chunk}`` lines and ``data: [DONE]``. The request is
submitted and its first event awaited before the status line is sent, so a refusal or an adapter that
fails to load is a real HTTP error, not an error inside a 200 stream. When the client goes away, the
stream's task is cancelled, and ``SubmittedRequest`` cancels the engine request (freed within a step).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, TypeVar

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorafleet_adapters.errors import AdapterNotFound, InvalidAdapterRef
from lorafleet_adapters.ref import AdapterRef
from lorafleet_server import __version__
from lorafleet_server.edge.headers import ADAPTER_HEADER, REPLICA_HEADER
from lorafleet_server.edge.observe import CallObserver, CallRecord
from lorafleet_server.engine.admin import AdapterAdmin, AdapterView, VersionView
from lorafleet_server.engine.engine import Engine
from lorafleet_server.engine.stream import EngineStream, Outcome, Outcomes, SubmittedRequest
from lorafleet_server.engine.types import (
    ChatTurn,
    FinishReason,
    GenerationRequest,
    ModelInfo,
    Principal,
    SamplingParams,
    Summary,
    TokenEvent,
)
from lorafleet_server.errors import STOPPED_BY_SERVER, ShuttingDown
from lorafleet_server.http.auth import HttpAuth, principal_of
from lorafleet_server.http.errors import InvalidParameter, body_error, describe, error_body
from lorafleet_server.http.limits import BodyLimit, BodyTimedOut, BodyTooLarge
from lorafleet_server.http.routes import (
    CHAT_COMPLETIONS,
    COMPLETIONS,
    EMBEDDINGS,
    GET_MODEL,
    LIST_MODELS,
    NoDeadline,
    request_id_of,
    rpc_of,
)
from lorafleet_server.http.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    unsigned_seed,
    unsupported,
)
from lorafleet_server.tenants.access import KeyChecker, check_adapter_access, check_admin_view, listed_tenant

REQUEST_ID_HEADER = "x-request-id"
DEFAULT_TEMPERATURE = 1.0  # OpenAI's default when a request leaves it unset (0 would be greedy)
FINISH_REASONS = {FinishReason.LENGTH: "length", FinishReason.STOP: "stop", FinishReason.END_OF_SEQUENCE: "stop"}
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}

Kind = Literal["chat", "completion"]
T = TypeVar("T")


class ReplicaHeader:
    """Every HTTP response names the replica that served it (``x-lorafleet-replica``), as every gRPC
    response does (grpc/affinity.py): refusals and errors included."""

    def __init__(self, app: Any, replica: str) -> None:
        self.app = app
        self.header = (REPLICA_HEADER.encode(), replica.encode("latin-1", "replace"))

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_named(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), self.header]}
            await send(message)

        await self.app(scope, receive, send_named)


def check_routing_header(request: Request, model: str) -> None:
    """A proxy balancing the replicas' HTTP ports routes on ``x-lorafleet-adapter`` (it cannot read the
    JSON body cheaply); as at the gRPC edge, a header naming another model than the body is refused, so a
    routing header can never send one adapter's traffic to the replicas that hold another."""
    header = request.headers.get(ADAPTER_HEADER)
    if header is not None and header != model:
        raise InvalidParameter(
            "model",
            f"header {ADAPTER_HEADER}={header[:200]!r} disagrees with the request's model {model[:200]!r}: "
            "send the same reference in both (or no header)",
            "routing_header_mismatch",
        )


class ClientDisconnected(Exception):
    """The client of a non-streaming request went away before its answer."""


@dataclass
class Health:
    """Whether the server takes new work: ``serving`` turns False when a drain starts (SIGTERM), as the
    gRPC health service turns NOT_SERVING; /health then answers 503."""

    serving: bool = True


@dataclass(frozen=True)
class Prepared:
    """A submitted request and what its response needs."""

    submitted: SubmittedRequest
    model: str  # as the response names it: the concrete adapter version, or the base model's id
    created: int = field(default_factory=lambda: int(time.time()))


class EngineEventStream(StreamingResponse):
    """A StreamingResponse that ends its call however the response ends: if the client leaves before
    the body starts, Starlette never starts the body generator (so its ``finally`` never runs); then
    ``on_close`` cancels the engine request and records the call here."""

    def __init__(self, body: AsyncIterator[bytes], headers: dict[str, str], on_close: Callable[[], Any]) -> None:
        super().__init__(body, media_type="text/event-stream", headers=headers)
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()


async def _first_text(events: AsyncIterator[TokenEvent]) -> TokenEvent:
    """The first event with text, or the last one, with the token ids of the text-less events before it
    (tokens held back: a stop string could still begin there). The status line waits for it: a stream
    cut while all its text was held back answered 200 and then an error, which no proxy retries, and
    the engine meters only a cut stream that has sent text, so nobody was billed for it either."""
    held: tuple[int, ...] = ()
    while True:
        event = await anext(events)
        if event.text or event.final:
            return dataclasses.replace(event, token_ids=held + event.token_ids) if held else event
        held += event.token_ids


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def _usage(s: Summary) -> dict[str, int]:
    return {
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.generated_tokens,
        "total_tokens": s.prompt_tokens + s.generated_tokens,
    }


def _finish_reason(s: Summary) -> str:
    reason = FINISH_REASONS.get(s.finish_reason)
    if reason is None:  # CANCELLED while the client is still here: the server cut it (forced stop)
        raise ShuttingDown(STOPPED_BY_SERVER)
    return reason


def _base64_floats(values: tuple[float, ...]) -> str:
    """``encoding_format: base64``: the vector as little-endian float32 bytes, base64-encoded."""
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode("ascii")


def _is_json(content_type: str | None) -> bool:
    """Whether FastAPI parses a body of ``content_type`` as JSON: ``application/json`` or ``+json``."""
    if not content_type:
        return False
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


def _version(view: AdapterView, number: int | None) -> VersionView | None:
    return next((v for v in view.versions if v.version == number), None)


def _epoch(iso: str) -> int:
    try:
        return int(datetime.fromisoformat(iso).timestamp())
    except ValueError:
        return 0


class OpenAIApi:
    """The route handlers over one engine. ``started``: the base model object's ``created``."""

    def __init__(
        self, engine: Engine, info: ModelInfo, calls: CallObserver, default_max_new_tokens: int, health: Health
    ) -> None:
        self._engine = engine
        self._info = info
        self._calls = calls
        self._stream = EngineStream(engine)
        self._admin = AdapterAdmin(engine)
        self._default_max_new_tokens = default_max_new_tokens
        self._health = health
        self._started = int(time.time())

    # -- models ---------------------------------------------------------------------------------

    def _base_object(self) -> dict[str, Any]:
        return {"id": self._info.model_id, "object": "model", "created": self._started, "owned_by": "lorafleet"}

    def _adapter_object(self, view: AdapterView, version: VersionView | None = None) -> dict[str, Any]:
        """The model object of ``view``: of its latest version, or of ``version`` when given."""
        described = version if version is not None else _version(view, view.latest)
        return {
            "id": f"{view.tenant}/{view.name}",
            "object": "model",
            "created": _epoch(described.manifest.created_at) if described is not None else 0,
            "owned_by": view.tenant,
            "parent": self._info.model_id,
            "root": self._info.model_id,
            "latest_version": view.latest,
        }

    @staticmethod
    def _servable(version: VersionView | None) -> bool:
        """LoRA and prompt adapters generate text; classifier heads (Classify over gRPC) do not."""
        return version is not None and version.manifest.kind != "head"

    async def list_models(self, request: Request) -> Response:
        async def work(record: CallRecord, principal: Principal | None) -> Response:
            tenant = listed_tenant(principal, "")
            views = [] if tenant is None else await asyncio.to_thread(self._admin.list, tenant)
            servable = (v for v in views if self._servable(_version(v, v.latest)))
            data = [self._base_object(), *(self._adapter_object(v) for v in servable)]
            return JSONResponse({"object": "list", "data": data})

        return await self._unary(request, LIST_MODELS, "", work)

    async def get_model(self, request: Request, model: str) -> Response:
        if model == "":  # GET /v1/models/ (a client's base URL with a trailing slash): the list
            return await self.list_models(request)

        async def work(record: CallRecord, principal: Principal | None) -> Response:
            if model == self._info.model_id:
                return JSONResponse(self._base_object())
            ref = self._adapter_ref(model)
            assert ref is not None
            check_admin_view(principal, ref)
            view = await asyncio.to_thread(self._admin.get, f"{ref.tenant}/{ref.name}")
            # the version asked for (tenant/name@3), else the latest: its kind decides, and it is described
            version = _version(view, view.latest if ref.version is None else ref.version)
            if version is None and ref.version is not None:
                raise AdapterNotFound(f"adapter {ref} not found")
            if not self._servable(version):
                raise AdapterNotFound(f"adapter {ref.tenant}/{ref.name} is not in the store")
            return JSONResponse({**self._adapter_object(view, version), "id": model})

        return await self._unary(request, GET_MODEL, self._adapter_named(model), work)

    # -- completions ----------------------------------------------------------------------------

    async def chat_completions(self, request: Request, body: ChatCompletionRequest) -> Response:
        return await self._generate(request, body, "chat")

    async def completions(self, request: Request, body: CompletionRequest) -> Response:
        return await self._generate(request, body, "completion")

    async def embeddings(self, request: Request, body: EmbeddingRequest) -> Response:
        """One engine embed request per input, submitted together (they share steps); usage sums them."""

        async def work(record: CallRecord, principal: Principal | None) -> Response:
            if body.dimensions is not None:
                raise InvalidParameter(
                    "dimensions", "unsupported parameter dimensions: the model's hidden size is fixed"
                )
            check_routing_header(request, body.model)
            adapter = self._adapter_ref(body.model)
            check_adapter_access(principal, adapter)
            reqs = [
                GenerationRequest(
                    f"{record.request_id}-{i}", prompt=text, adapter=adapter, embed=True, principal=principal
                )
                for i, text in enumerate(body.texts())
            ]
            if adapter is not None and adapter.version is None and len(reqs) > 1:
                # One version for the whole call: each input resolved "latest" when it was submitted, so
                # a swap mid-call gave vectors of two versions under one `model` (an outside review).
                key = await self._until_disconnect(request, self._stream.resolve(reqs[0]))
                pinned = AdapterRef(key.tenant, key.name, key.version)
                reqs = [dataclasses.replace(r, adapter=pinned) for r in reqs]
            outcomes = [Outcome() for _ in reqs]
            record.outcomes = Outcomes(outcomes)  # a call its client left logs once every input has ended
            results = await self._until_disconnect(request, self._embed_all(list(zip(reqs, outcomes, strict=True))))
            summaries = [s for s, _ in results]
            prompt_tokens = sum(s.prompt_tokens for s in summaries)
            # the request log line carries every input's tokens, as the usage meter counts them
            record.summary = dataclasses.replace(summaries[0], prompt_tokens=prompt_tokens)
            served = summaries[0].adapter or self._info.model_id
            encode = _base64_floats if body.encoding_format == "base64" else list
            data = [{"object": "embedding", "index": i, "embedding": encode(v)} for i, (_, v) in enumerate(results)]
            response = JSONResponse(
                {
                    "object": "list",
                    "data": data,
                    "model": served,
                    "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
                }
            )
            if summaries[0].adapter:
                response.headers[ADAPTER_HEADER] = summaries[0].adapter
            return response

        return await self._unary(request, EMBEDDINGS, self._adapter_named(body.model), work)

    async def _embed_all(
        self, reqs: list[tuple[GenerationRequest, Outcome]]
    ) -> list[tuple[Summary, tuple[float, ...]]]:
        """Every input's embedding; the first failure cancels the inputs still running (their engine
        requests with them) before it is raised: a refused call leaves no work behind.

        At most a batch's rows of the call's inputs are in the engine at once, and no more than its
        tenant may queue: each input is one engine request, and a call of more inputs than the tenant's
        ``max_waiting`` was refused 429 every time (a retry could never help)."""
        at_once = max(1, min(len(reqs), self._engine.config.max_batch_size))
        limit = self._engine.tenant_limit(reqs[0][0], "max_waiting")
        gate = asyncio.Semaphore(min(at_once, limit) if limit else at_once)

        async def embed(req: GenerationRequest, outcome: Outcome) -> tuple[Summary, tuple[float, ...]]:
            async with gate:
                return await self._embed(req, outcome)

        tasks = [asyncio.ensure_future(embed(r, o)) for r, o in reqs]
        try:
            return await asyncio.gather(*tasks)
        except BaseException:  # an input failed, or this call was cancelled (client gone)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def _embed(self, req: GenerationRequest, outcome: Outcome) -> tuple[Summary, tuple[float, ...]]:
        async for event in self._stream.events(req, outcome):
            if event.summary is not None and event.embedding is not None:
                return event.summary, event.embedding
            if event.summary is not None:  # cancelled before its prompt was read: the server cut it
                raise ShuttingDown(STOPPED_BY_SERVER)
        raise RuntimeError("engine stream ended without an embedding")

    def _adapter_named(self, model: str) -> str:
        """What the request log and the call record take for ``model``: "" for the base model, as at the
        gRPC edge (its id's organisation, "HuggingFaceTB", was logged as the caller's tenant)."""
        return "" if model == self._info.model_id else model

    def _adapter_ref(self, model: str) -> AdapterRef | None:
        """None for the base model; else the adapter reference ``model`` names. A name that is neither
        is a model that does not exist, as OpenAI answers it (404 ``model_not_found`` naming ``model``)."""
        if model == self._info.model_id:
            return None
        try:
            return AdapterRef.parse(model)
        except InvalidAdapterRef as exc:
            raise AdapterNotFound(
                f"model {model[:200]!r} does not exist: it is neither the base model {self._info.model_id!r} "
                f"nor an adapter reference tenant/name[@version] ({exc})"
            ) from None

    def _generation_request(
        self, body: ChatCompletionRequest | CompletionRequest, request_id: str, principal: Principal | None
    ) -> GenerationRequest:
        refused = unsupported(body)
        if refused is not None:
            name, why = refused
            raise InvalidParameter(name, f"unsupported parameter {name}: {why}", "unsupported_parameter")
        if body.stream_options is not None and not body.stream:
            raise InvalidParameter("stream_options", "stream_options is only allowed when stream is true")
        field, given = "max_tokens", body.max_tokens
        if isinstance(body, ChatCompletionRequest) and body.max_completion_tokens is not None:
            if given is not None and given != body.max_completion_tokens:  # which one did the caller mean?
                raise InvalidParameter(
                    "max_tokens",
                    f"max_tokens ({given}) and max_completion_tokens ({body.max_completion_tokens}) differ: "
                    "set one (max_completion_tokens is OpenAI's current name)",
                )
            field, given = "max_completion_tokens", body.max_completion_tokens
        if given is not None and given > self._info.max_new_tokens:
            raise InvalidParameter(
                field,
                f"{field} is too large: {given}; this server generates at most {self._info.max_new_tokens} "
                "tokens per request",
            )
        params = SamplingParams(
            max_new_tokens=self._default_max_new_tokens if given is None else given,
            temperature=DEFAULT_TEMPERATURE if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=body.top_k or 0,
            repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
            seed=unsigned_seed(body.seed),
            stop=(body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ()),
            fit_context=given is None,
        )
        adapter = self._adapter_ref(body.model)  # before the text: a bad model is refused first, as before
        prompt: str | None = None
        turns: tuple[ChatTurn, ...] = ()
        if isinstance(body, ChatCompletionRequest):
            turns = tuple(
                ChatTurn(role="system" if m.role == "developer" else m.role, content=m.text()) for m in body.messages
            )
        else:
            prompt = body.text()
        return GenerationRequest(
            request_id,
            prompt=prompt,
            messages=turns,
            adapter=adapter,
            params=params,
            principal=principal,
            stream=bool(body.stream),
        )

    async def _generate(
        self, request: Request, body: ChatCompletionRequest | CompletionRequest, kind: Kind
    ) -> Response:
        rpc = CHAT_COMPLETIONS if kind == "chat" else COMPLETIONS
        rid = request_id_of(request.headers.get(REQUEST_ID_HEADER))
        principal = principal_of(request.scope.get("state", {}))
        stack = AsyncExitStack()
        adapter = self._adapter_named(body.model)
        record = await stack.enter_async_context(self._calls.call(rpc, NoDeadline(), rid, adapter, principal))
        submitted: SubmittedRequest | None = None
        try:
            check_routing_header(request, body.model)
            req = self._generation_request(body, rid, principal)
            check_adapter_access(principal, req.adapter)
            # a caller that leaves while its request waits for a worker drops it (never tokenized)
            submitted = await self._until_disconnect(request, self._stream.submit(req, record.outcome))
            prepared = Prepared(submitted, submitted.adapter or self._info.model_id)
            if body.stream:
                events = submitted.events()
                # errors before the first text become real HTTP errors; a client that leaves while it
                # waits for it (queued, prefilling) cancels the request, as in a non-streaming call
                first = await self._until_disconnect(request, _first_text(events))
                if first.summary is not None and first.summary.finish_reason is FinishReason.CANCELLED:
                    # cut by a forced stop before any text: a 503 a proxy retries, not a 200 with an
                    # error in it that nobody retries (and that is not metered either)
                    record.summary = first.summary  # for its log line
                    raise ShuttingDown(STOPPED_BY_SERVER)
                include_usage = body.stream_options is not None and bool(body.stream_options.include_usage)
                stream = self._sse_stream(kind, prepared, first, events, include_usage, record)

                async def close() -> None:  # idempotent; the normal end has run it already
                    if record.code == grpc.StatusCode.OK and record.summary is None:
                        record.code, record.error = grpc.StatusCode.CANCELLED, "client disconnected"
                    await events.aclose()  # type: ignore[attr-defined]  # cancels the request if unfinished
                    await stack.aclose()

                return EngineEventStream(stream, {**SSE_HEADERS, **self._headers(rid, submitted)}, close)
            response = await self._until_disconnect(request, self._complete(kind, prepared, record))
            response.headers.update(self._headers(rid, submitted))
        except (asyncio.CancelledError, ClientDisconnected) as exc:
            # The events are closed when their task ran; a task cancelled before its first step never
            # started them, and nothing else would cancel the engine request (close is idempotent).
            if submitted is not None:
                submitted.close()
            record.code, record.error = grpc.StatusCode.CANCELLED, "client disconnected"
            await stack.aclose()
            if isinstance(exc, asyncio.CancelledError):
                raise
            return Response(status_code=499)  # nobody reads it
        except Exception as exc:
            if submitted is not None:
                submitted.close()
            response = self._error(record, exc)
        await stack.aclose()
        return response

    @staticmethod
    def _headers(rid: str, submitted: SubmittedRequest) -> dict[str, str]:
        headers = {REQUEST_ID_HEADER: rid}
        if submitted.adapter:
            headers[ADAPTER_HEADER] = submitted.adapter
        return headers

    @staticmethod
    async def _until_disconnect(request: Request, work: Awaitable[T]) -> T:
        """Run ``work``; if the client disconnects first, cancel it (its engine request with it), as a
        gRPC call is cancelled. The body is read by now, so the next ASGI message is the disconnect."""

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        task = asyncio.ensure_future(work)
        watcher = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when this handler itself is cancelled
            watcher.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if task.cancelled():
            raise ClientDisconnected()
        return task.result()

    async def _complete(self, kind: Kind, p: Prepared, record: CallRecord) -> Response:
        parts: list[str] = []
        async for event in p.submitted.events():
            record.tokens += len(event.token_ids)
            parts.append(event.text)
            if event.summary is not None:
                record.summary = event.summary
                return JSONResponse(self._completion_body(kind, p, "".join(parts), event.summary))
        raise RuntimeError("engine stream ended without a summary")

    def _completion_body(self, kind: Kind, p: Prepared, text: str, s: Summary) -> dict[str, Any]:
        finish = _finish_reason(s)
        if kind == "chat":
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish,
            }
            obj, prefix = "chat.completion", "chatcmpl-"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            obj, prefix = "text_completion", "cmpl-"
        return {
            "id": prefix + s.request_id,
            "object": obj,
            "created": p.created,
            "model": p.model,
            "system_fingerprint": self._info.fingerprint[:16],
            "choices": [choice],
            "usage": _usage(s),
        }

    def _chunk(self, kind: Kind, p: Prepared, rid: str, text: str | None, finish: str | None) -> dict[str, Any]:
        if kind == "chat":
            delta: dict[str, Any] = {} if text is None else {"content": text}
            if text == "" and finish is None:
                delta = {"role": "assistant", "content": ""}
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            obj, prefix = "chat.completion.chunk", "chatcmpl-"
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            obj, prefix = "text_completion", "cmpl-"
        return {
            "id": prefix + rid,
            "object": obj,
            "created": p.created,
            "model": p.model,
            "system_fingerprint": self._info.fingerprint[:16],
            "choices": [choice],
        }

    async def _sse_stream(
        self,
        kind: Kind,
        p: Prepared,
        first: TokenEvent,
        events: AsyncIterator[TokenEvent],
        include_usage: bool,
        record: CallRecord,
    ) -> AsyncIterator[bytes]:
        """The SSE body; ``EngineEventStream`` closes the call (and ``events``) however it ends."""
        rid = record.request_id
        try:
            if kind == "chat":
                yield _sse(self._chunk(kind, p, rid, "", None))  # the role, as OpenAI's first chunk
            event: TokenEvent | None = first
            while event is not None:
                record.tokens += len(event.token_ids)
                if event.text:
                    yield _sse(self._chunk(kind, p, rid, event.text, None))
                if event.summary is not None:
                    record.summary = event.summary
                    yield _sse(self._chunk(kind, p, rid, None, _finish_reason(event.summary)))
                    if include_usage:
                        yield _sse(
                            {**self._chunk(kind, p, rid, None, None), "choices": [], "usage": _usage(event.summary)}
                        )
                    yield b"data: [DONE]\n\n"
                    return
                event = await anext(events, None)
            raise RuntimeError("engine stream ended without a summary")
        except (asyncio.CancelledError, GeneratorExit):  # the client went away
            record.code = grpc.StatusCode.CANCELLED
            record.error = "client disconnected"
            raise
        except Exception as exc:  # after the status line: the error goes in the stream, as OpenAI's does
            code, _, body = describe(exc, rid, record.rpc)
            record.code = code
            record.error = str(exc) or type(exc).__name__
            yield _sse(body)

    # -- plumbing -------------------------------------------------------------------------------

    async def _unary(
        self,
        request: Request,
        rpc: str,
        adapter: str,
        work: Callable[[CallRecord, Principal | None], Any],
    ) -> Response:
        rid = request_id_of(request.headers.get(REQUEST_ID_HEADER))
        principal = principal_of(request.scope.get("state", {}))
        async with self._calls.call(rpc, NoDeadline(), rid, adapter, principal) as record:
            try:
                response: Response = await work(record, principal)
            except ClientDisconnected:
                record.code, record.error = grpc.StatusCode.CANCELLED, "client disconnected"
                response = Response(status_code=499)  # nobody reads it
            except Exception as exc:
                response = self._error(record, exc)
            response.headers[REQUEST_ID_HEADER] = rid
            return response

    def _error(self, record: CallRecord, exc: Exception) -> Response:
        code, status, body = describe(exc, record.request_id, record.rpc)
        record.code = code
        record.error = str(exc) or type(exc).__name__
        headers = {REQUEST_ID_HEADER: record.request_id}
        if status in (429, 503):
            headers["retry-after"] = "1"
        return JSONResponse(body, status_code=status, headers=headers)

    async def health(self) -> Response:
        serving = self._health.serving and self._engine.accepting  # not after a drain, nor a crashed engine
        status = "SERVING" if serving else "NOT_SERVING"
        return JSONResponse({"status": status}, status_code=200 if serving else 503)

    async def validation_error(self, request: Request, exc: Exception) -> Response:
        """A body that does not parse or fit the schema: 400 naming the first bad parameter, counted and
        logged under its route like every other outcome."""
        errors = exc.errors() if isinstance(exc, RequestValidationError) else []
        error = body_error(errors)
        param = error.param
        content_type = request.headers.get("content-type")
        if not _is_json(content_type) and any(tuple(e.get("loc", ())) == ("body",) for e in errors):
            # FastAPI reads the body as JSON only when it says so; else it reached the schema as bytes
            said = "no Content-Type" if content_type is None else f"Content-Type {content_type[:100]!r}"
            message = f"the body must be a JSON object sent with Content-Type: application/json (got {said})"
            param, code = None, "invalid_content_type"
        elif error.kind == "extra_forbidden":
            message, code = f"unsupported parameter {param}: lorafleet does not serve it", "unsupported_parameter"
        elif error.kind == "json_invalid":
            message, code = f"the body is not valid JSON: {error.message}", "invalid_json"
            param = None
        else:
            message, code = f"{param or 'body'}: {error.message}", "invalid_parameter"
        rpc = rpc_of(request.method, request.url.path) or "other"
        rid = request_id_of(request.headers.get(REQUEST_ID_HEADER))
        principal = principal_of(request.scope.get("state", {}))
        async with self._calls.call(rpc, NoDeadline(), rid, principal=principal) as record:
            return self._error(record, InvalidParameter(param or "", message, code))

    async def http_error(self, request: Request, exc: Exception) -> Response:
        """Starlette's own refusals (no such route, method not allowed) in OpenAI's shape, not counted; and
        a chunked body over the limit (counted by ``BodyLimit``)."""
        status = exc.status_code if isinstance(exc, StarletteHTTPException) else 500
        kind = "not_found_error" if status == 404 else "invalid_request_error"
        rid = request_id_of(request.headers.get(REQUEST_ID_HEADER))
        if isinstance(exc, BodyTooLarge | BodyTimedOut):  # counted by BodyLimit, under this request id
            # the rest of the body is unread: the connection cannot carry another request
            headers = {REQUEST_ID_HEADER: rid, "connection": "close"}
            code = "request_too_large" if isinstance(exc, BodyTooLarge) else "request_timeout"
            return JSONResponse(error_body(exc.detail, kind, None, code), status_code=exc.status_code, headers=headers)
        detail = exc.detail if isinstance(exc, StarletteHTTPException) else "error"
        message = f"{request.method} {request.url.path[:200]}: {detail}"
        headers = dict(exc.headers or {}) if isinstance(exc, StarletteHTTPException) else {}
        headers[REQUEST_ID_HEADER] = rid
        return JSONResponse(error_body(message, kind, None, None), status_code=status, headers=headers)


@dataclass(frozen=True)
class HttpTimeouts:
    """How long a client may take to send a request: its head (``HeadDeadline``, http/server.py), then
    its whole body (``BodyLimit``: 408 after ``body_seconds``). Neither bounds a response."""

    head_seconds: float = 30.0
    body_seconds: float = 60.0


def create_app(
    engine: Engine,
    info: ModelInfo,
    keys: KeyChecker,
    calls: CallObserver,
    default_max_new_tokens: int,
    max_body_bytes: int,
    health: Health | None = None,
    replica_id: str = "",
    body_seconds: float = HttpTimeouts.body_seconds,
) -> FastAPI:
    """The ASGI app: ``ReplicaHeader`` (when ``replica_id`` is set), ``HttpAuth``, then ``BodyLimit``
    (``max_body_bytes``, ``body_seconds``), in front of the routes."""
    api = OpenAIApi(engine, info, calls, default_max_new_tokens, health if health is not None else Health())
    app = FastAPI(
        title="lorafleet OpenAI-compatible API",
        version=__version__,
        description="Completions and chat completions on the base model or a LoRA adapter "
        "(model = tenant/name[@version]).",
    )
    app.add_api_route("/health", api.health, methods=["GET"])
    app.add_api_route("/health", api.health, methods=["HEAD"], include_in_schema=False)  # load balancers' probe
    app.add_api_route("/v1/models", api.list_models, methods=["GET"])
    app.add_api_route("/v1/models/{model:path}", api.get_model, methods=["GET"])
    app.add_api_route("/v1/completions", api.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", api.chat_completions, methods=["POST"])
    app.add_api_route("/v1/embeddings", api.embeddings, methods=["POST"])
    app.add_exception_handler(RequestValidationError, api.validation_error)
    app.add_exception_handler(StarletteHTTPException, api.http_error)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes, calls=calls, seconds=body_seconds)
    app.add_middleware(HttpAuth, keys=keys, calls=calls)
    if replica_id:
        app.add_middleware(ReplicaHeader, replica=replica_id)  # added last: outermost
    return app
