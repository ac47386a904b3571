"""AsyncLoraFleetClient: the grpc.aio client, with the same methods as LoraFleetClient."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc
import grpc.aio

from lorafleet import convert
from lorafleet._channel import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_TARGET,
    LIST_PAGE_SIZE,
    TlsOption,
    call_metadata,
    channel_credentials,
    channel_options,
    header_of,
    pick_timeout,
    replica_of,
    resolve_api_key,
)
from lorafleet.errors import (
    REQUEST_ID_HEADER,
    UnavailableError,
    channel_closed,
    client_closed,
    from_rpc_error,
    task_cancelled,
)
from lorafleet.models import (
    AdapterInfo,
    AdapterLoad,
    AdapterUnload,
    Classification,
    Completion,
    Embedding,
    Message,
    ModelInfo,
    RefreshResult,
    Sampling,
    Tokens,
    UsageReport,
    UsageRow,
)
from lorafleet.stream import AsyncGenerationStream
from lorafleet_proto.v1 import adapters_pb2 as apb
from lorafleet_proto.v1 import adapters_pb2_grpc, inference_pb2_grpc, usage_pb2_grpc
from lorafleet_proto.v1 import inference_pb2 as ipb
from lorafleet_proto.v1 import usage_pb2 as upb

_Response = TypeVar("_Response")


class AsyncLoraFleetClient:
    """A grpc.aio client; create it inside the event loop that uses it, close it with ``await close()``
    or ``async with``. Errors and arguments (API key, TLS, timeout, options) are those of LoraFleetClient.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        api_key: str | None = None,
        tls: TlsOption = None,
        root_certificates: bytes | None = None,
        client_certificate: bytes | None = None,
        client_key: bytes | None = None,
        timeout: float | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        # Everything that can refuse an argument runs before the channel exists (none left open).
        self._api_key = resolve_api_key(api_key)
        channel_args = channel_options(max_message_bytes, options)
        credentials = channel_credentials(tls, root_certificates, client_certificate, client_key)
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(target, options=channel_args)
        else:
            self._channel = grpc.aio.secure_channel(target, credentials, options=channel_args)
        self._timeout = timeout
        self._inference = inference_pb2_grpc.InferenceServiceStub(self._channel)
        self._adapters = adapters_pb2_grpc.AdaptersServiceStub(self._channel)
        self._usage = usage_pb2_grpc.UsageServiceStub(self._channel)
        self._closed = False

    @property
    def channel(self) -> grpc.aio.Channel:
        """The underlying channel (for health checks, reflection, ...)."""
        return self._channel

    async def wait_for_ready(self, timeout: float) -> None:
        """Waits until the channel connects; raises UnavailableError after ``timeout`` seconds."""
        self._check_open()
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout)
        except TimeoutError as error:
            raise UnavailableError(grpc.StatusCode.UNAVAILABLE, f"no connection within {timeout:g} s") from error

    async def _unary(
        self,
        method: Callable[..., Awaitable[_Response]],
        request: Any,
        timeout: float | None,
        request_id: str | None = None,
        adapter: str = "",
    ) -> _Response:
        return (await self._unary_call(method, request, timeout, request_id, adapter))[0]

    async def _unary_call(
        self,
        method: Callable[..., Awaitable[_Response]],
        request: Any,
        timeout: float | None,
        request_id: str | None = None,
        adapter: str = "",
    ) -> tuple[_Response, str, str]:
        """The response, the replica that sent it and the call's request id (the server's, sent back as
        ``x-request-id``); ``adapter`` goes along as routing metadata."""
        self._check_open()
        try:
            call = method(
                request,
                timeout=pick_timeout(timeout, self._timeout),
                metadata=call_metadata(self._api_key, request_id, adapter),
            )
            response = await call
            initial = await call.initial_metadata()  # type: ignore[attr-defined]
            trailing = await call.trailing_metadata()  # type: ignore[attr-defined]
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error
        except asyncio.CancelledError:
            if task_cancelled():
                raise
            raise channel_closed() from None  # close() under the call; no one cancelled this task
        answered = (*(initial or ()), *(trailing or ()))
        return response, replica_of(answered), header_of(answered, REQUEST_ID_HEADER)

    # Inference

    async def generate(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Message] | None = None,
        adapter: str | None = None,
        sampling: Sampling | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Completion:
        """Generates a completion of ``prompt`` (plain text) or ``messages`` (a chat); give one."""
        request = convert.fill_generate_request(ipb.GenerateRequest(), prompt, messages, adapter, sampling)
        response, replica, _ = await self._unary_call(
            self._inference.Generate, request, timeout, request_id, request.adapter
        )
        return convert.completion_from_proto(response.text, response.summary, replica)

    def stream(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Message] | None = None,
        adapter: str | None = None,
        sampling: Sampling | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> AsyncGenerationStream:
        """Starts a GenerateStream call: ``async for chunk in client.stream(...)``, then ``.result``."""
        self._check_open()
        request = convert.fill_generate_request(ipb.GenerateStreamRequest(), prompt, messages, adapter, sampling)
        call = self._inference.GenerateStream(
            request,
            timeout=pick_timeout(timeout, self._timeout),
            metadata=call_metadata(self._api_key, request_id, request.adapter),
        )
        return AsyncGenerationStream(call)

    async def tokenize(
        self,
        text: str | None = None,
        *,
        messages: Sequence[Message] | None = None,
        timeout: float | None = None,
    ) -> Tokens:
        """The token ids the model sees for ``text`` or ``messages``; give one."""
        request = convert.tokenize_request(text, messages)
        response: ipb.TokenizeResponse = await self._unary(self._inference.Tokenize, request, timeout)
        return convert.tokens_from_proto(response)

    async def embed(
        self,
        text: str | None = None,
        *,
        messages: Sequence[Message] | None = None,
        adapter: str | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Embedding:
        """The mean-pooled last hidden state of ``text`` or ``messages``, through ``adapter`` if given."""
        request = convert.embed_request(text, messages, adapter)
        response, replica, rid = await self._unary_call(
            self._inference.Embed, request, timeout, request_id, request.adapter
        )
        return convert.embedding_from_proto(response, replica, rid)

    async def classify(
        self,
        text: str | None = None,
        *,
        messages: Sequence[Message] | None = None,
        adapter: str,
        top_k: int = 0,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Classification:
        """Labels with probabilities (most likely first; ``top_k`` of them, 0: all) of the head ``adapter``
        for ``text`` or ``messages``; give one."""
        request = convert.classify_request(text, messages, adapter, top_k)
        response, replica, rid = await self._unary_call(
            self._inference.Classify, request, timeout, request_id, request.adapter
        )
        return convert.classification_from_proto(response, replica, rid)

    async def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        """The base model and the server's limits."""
        response: ipb.GetModelInfoResponse = await self._unary(
            self._inference.GetModelInfo, ipb.GetModelInfoRequest(), timeout
        )
        return convert.model_info_from_proto(response)

    # Adapter administration (admin role)

    async def list_adapters(
        self, tenant: str = "", *, page_size: int = LIST_PAGE_SIZE, timeout: float | None = None
    ) -> list[AdapterInfo]:
        """The adapters in the store, only ``tenant``'s when given: every page of ListAdapters
        (``page_size`` adapters a call; 0: all in one, which a large store may not fit), ``timeout``
        per call."""
        size = convert.check_wire_int("page_size", page_size, 0, convert.UINT32_MAX)
        found: list[AdapterInfo] = []
        token = ""
        while True:
            request = apb.ListAdaptersRequest(tenant=tenant, page_size=size, page_token=token)
            response: apb.ListAdaptersResponse = await self._unary(self._adapters.ListAdapters, request, timeout)
            found.extend(convert.adapter_from_proto(a) for a in response.adapters)
            token = response.next_page_token
            if not token:
                return found

    async def get_adapter(self, ref: str, *, timeout: float | None = None) -> AdapterInfo:
        """One adapter, ``ref`` = "tenant/name"."""
        request = apb.GetAdapterRequest(adapter=ref)
        response: apb.GetAdapterResponse = await self._unary(self._adapters.GetAdapter, request, timeout, adapter=ref)
        return convert.adapter_from_proto(response.adapter)

    async def load_adapter(self, ref: str, *, timeout: float | None = None) -> AdapterLoad:
        """Loads a version into a device slot; returns the concrete version and the tier it is held in."""
        request = apb.LoadAdapterRequest(adapter=ref)
        response: apb.LoadAdapterResponse = await self._unary(self._adapters.LoadAdapter, request, timeout, adapter=ref)
        return convert.load_from_proto(response)

    async def unload_adapter(self, ref: str, *, timeout: float | None = None) -> AdapterUnload:
        """Frees a version's slot; ``unloaded`` is False when requests still run on it (freed when they end)."""
        request = apb.UnloadAdapterRequest(adapter=ref)
        response: apb.UnloadAdapterResponse = await self._unary(
            self._adapters.UnloadAdapter, request, timeout, adapter=ref
        )
        return convert.unload_from_proto(response)

    async def pin_adapter(self, ref: str, *, timeout: float | None = None) -> str:
        """Loads a version and keeps it resident; returns the concrete "tenant/name@version"."""
        request = apb.PinAdapterRequest(adapter=ref)
        response: apb.PinAdapterResponse = await self._unary(self._adapters.PinAdapter, request, timeout, adapter=ref)
        return response.adapter

    async def unpin_adapter(self, ref: str, *, timeout: float | None = None) -> str:
        """Makes a pinned version evictable again; returns the concrete "tenant/name@version"."""
        request = apb.UnpinAdapterRequest(adapter=ref)
        response: apb.UnpinAdapterResponse = await self._unary(
            self._adapters.UnpinAdapter, request, timeout, adapter=ref
        )
        return response.adapter

    async def get_usage(
        self, start: float, end: float | None = None, *, tenant: str = "", timeout: float | None = None
    ) -> list[UsageRow]:
        """Requests and tokens per tenant and adapter version that finished in [start, end) (UNIX
        seconds, whole minutes; end None: now). Admin keys only. ``usage_report`` also gives the window."""
        return list((await self.usage_report(start, end, tenant=tenant, timeout=timeout)).rows)

    async def usage_report(
        self, start: float, end: float | None = None, *, tenant: str = "", timeout: float | None = None
    ) -> UsageReport:
        """``get_usage``'s rows with the window the server summed, widened to whole minutes (see
        UsageReport for polling without gaps or double counts)."""
        request = convert.usage_request(start, end, tenant)
        response: upb.GetUsageResponse = await self._unary(self._usage.GetUsage, request, timeout)
        return convert.usage_from_proto(response)

    async def refresh_adapters(self, *, timeout: float | None = None) -> RefreshResult:
        """Asks the server to look for newly published adapter versions now."""
        request = apb.RefreshAdaptersRequest()
        response: apb.RefreshAdaptersResponse = await self._unary(self._adapters.RefreshAdapters, request, timeout)
        return convert.refresh_from_proto(response)

    # Lifetime

    async def close(self) -> None:
        self._closed = True
        await self._channel.close(None)

    def _check_open(self) -> None:
        if self._closed:
            raise client_closed()

    async def __aenter__(self) -> AsyncLoraFleetClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
