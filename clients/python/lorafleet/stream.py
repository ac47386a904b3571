"""Streams of generated text: iterate the chunks, then read ``.result`` (sync and grpc.aio)."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator, Iterator, Sequence
from types import TracebackType
from typing import Protocol

import grpc

from lorafleet._channel import replica_of
from lorafleet.convert import completion_from_proto
from lorafleet.errors import LoraFleetError, channel_closed, from_rpc_error, make_error, task_cancelled
from lorafleet.models import Completion
from lorafleet_proto.v1 import inference_pb2 as ipb


class _SyncCall(Protocol):
    def __next__(self) -> ipb.GenerateStreamResponse: ...

    def cancel(self) -> bool: ...

    def initial_metadata(self) -> Sequence[tuple[str, str | bytes]] | None: ...


class _AsyncCall(Protocol):
    async def read(self) -> object: ...

    def cancel(self) -> bool: ...

    async def initial_metadata(self) -> Sequence[tuple[str, str | bytes]] | None: ...


class _Accumulator:
    """The text received so far and, once the server sent it, the summary."""

    def __init__(self) -> None:
        self.chunks: list[str] = []
        self.summary: ipb.GenerationSummary | None = None
        self.done = False
        self.cancelled = False
        self.replica: str | None = None  # x-lorafleet-replica, read once the first response is in
        self.error: LoraFleetError | None = None  # why the stream failed: ``result`` raises it again

    def fail(self, error: LoraFleetError) -> LoraFleetError:
        self.done = True
        self.error = error
        return error

    def feed(self, response: ipb.GenerateStreamResponse) -> str:
        if response.text:
            self.chunks.append(response.text)
        if response.HasField("summary"):
            self.summary = response.summary
        return response.text

    def finish(self) -> None:
        """The server ended the stream with OK: it must have sent the summary."""
        self.done = True
        if self.summary is None:
            raise self.fail(make_error(grpc.StatusCode.INTERNAL, "the stream ended without a summary"))

    @property
    def text(self) -> str:
        return "".join(self.chunks)

    def result(self) -> Completion:
        if self.cancelled:
            raise make_error(grpc.StatusCode.CANCELLED, "the stream was cancelled by the client")
        if self.error is not None:
            raise copy.copy(self.error)  # a copy: raising the same object again grew its traceback each time
        if not self.done or self.summary is None:
            raise RuntimeError("the stream has not finished: iterate over it or call wait() first")
        return completion_from_proto(self.text, self.summary, self.replica or "")


class GenerationStream:
    """Text chunks of one GenerateStream call, in order; ``.result`` once iteration has ended.

    Iteration raises LoraFleetError when the call fails. After ``cancel()`` iteration ends quietly
    and ``.result`` raises RequestCancelledError. As a context manager it cancels the call on exit
    unless the stream has finished.
    """

    def __init__(self, call: _SyncCall) -> None:
        self._call = call
        self._state = _Accumulator()

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        while not self._state.done:
            try:
                response = next(self._call)
            except StopIteration:
                self._state.finish()
                break
            except grpc.RpcError as error:
                self._state.done = True
                if self._state.cancelled:
                    break
                raise self._state.fail(from_rpc_error(error)) from error
            if self._state.replica is None:  # the initial metadata came before this response
                self._state.replica = replica_of(self._call.initial_metadata())
            if chunk := self._state.feed(response):
                return chunk
        raise StopIteration

    def wait(self) -> Completion:
        """Reads the rest of the stream and returns the completion."""
        for _ in self:
            pass
        return self.result

    def cancel(self) -> None:
        """Cancels the call; iteration then ends."""
        if not self._state.done:
            self._state.cancelled = True
            self._call.cancel()

    @property
    def result(self) -> Completion:
        """The completion (all text and the summary); only once iteration has ended."""
        return self._state.result()

    @property
    def text(self) -> str:
        """The text received so far."""
        return self._state.text

    @property
    def done(self) -> bool:
        return self._state.done

    @property
    def cancelled(self) -> bool:
        return self._state.cancelled

    def __enter__(self) -> GenerationStream:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cancel()


class AsyncGenerationStream:
    """The grpc.aio counterpart of GenerationStream: ``async for chunk in stream``."""

    def __init__(self, call: _AsyncCall) -> None:
        self._call = call
        self._state = _Accumulator()

    def __aiter__(self) -> AsyncIterator[str]:
        return self

    async def __anext__(self) -> str:
        while not self._state.done:
            try:
                response = await self._call.read()
            except asyncio.CancelledError:
                self._state.done = True
                if task_cancelled():  # the task itself (task.cancel(), a timeout, a TaskGroup): so is the call
                    self._state.cancelled = True
                    raise
                if self._state.cancelled:  # by cancel(): iteration ends quietly
                    break
                raise self._state.fail(channel_closed()) from None
            except grpc.RpcError as error:
                self._state.done = True
                if self._state.cancelled:
                    break
                raise self._state.fail(from_rpc_error(error)) from error
            if not isinstance(response, ipb.GenerateStreamResponse):  # grpc.aio.EOF
                self._state.finish()
                break
            if self._state.replica is None:  # the initial metadata came before this response
                self._state.replica = replica_of(await self._call.initial_metadata())
            if chunk := self._state.feed(response):
                return chunk
        raise StopAsyncIteration

    async def wait(self) -> Completion:
        """Reads the rest of the stream and returns the completion."""
        async for _ in self:
            pass
        return self.result

    def cancel(self) -> None:
        """Cancels the call; iteration then ends."""
        if not self._state.done:
            self._state.cancelled = True
            self._call.cancel()

    @property
    def result(self) -> Completion:
        """The completion (all text and the summary); only once iteration has ended."""
        return self._state.result()

    @property
    def text(self) -> str:
        """The text received so far."""
        return self._state.text

    @property
    def done(self) -> bool:
        return self._state.done

    @property
    def cancelled(self) -> bool:
        return self._state.cancelled

    async def __aenter__(self) -> AsyncGenerationStream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cancel()
