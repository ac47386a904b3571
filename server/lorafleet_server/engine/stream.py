"""An engine request as seen from asyncio: submit it, then iterate its events; closing early cancels it.

The engine calls a request's sink on its own thread; ``EngineStream.submit`` gives the sink a
``loop.call_soon_threadsafe`` into an ``asyncio.Queue`` and returns a ``SubmittedRequest`` whose
``events()`` the edge iterates. Submission is separate from iteration so an edge can refuse a request
with a proper status before it starts answering (HTTP sends its status line before the body). An
iteration that stops before the final event (the client went away, the consumer broke off) cancels the
request, and the engine frees its row within one step.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from lorafleet_server.engine.engine import Engine, RequestHandle
from lorafleet_server.engine.types import GenerationRequest, TokenEvent


class SubmittedRequest:
    """One queued engine request and its events, for exactly one consumer."""

    def __init__(self, handle: RequestHandle, queue: asyncio.Queue[TokenEvent]) -> None:
        self._handle = handle
        self._queue = queue
        self._finished = False

    @property
    def adapter(self) -> str:
        """The concrete adapter version (``tenant/name@version``; "" for the base model)."""
        return self._handle.adapter

    async def events(self) -> AsyncIterator[TokenEvent]:
        """The request's events up to and including the final one; an error event is raised. Stopping
        early (cancellation, ``aclose``) cancels the request in the engine."""
        try:
            while True:
                event = await self._queue.get()
                if event.error is not None:
                    self._finished = True
                    raise event.error
                self._finished = event.final
                yield event
                if self._finished:
                    return
        finally:
            self.close()

    def close(self) -> None:
        """Cancel the request unless it has finished (idempotent: the engine ignores a second cancel)."""
        if not self._finished:
            self._finished = True
            self._handle.cancel()


def _cancel_submitted(done: asyncio.Future[RequestHandle]) -> None:
    if not done.cancelled() and done.exception() is None:
        done.result().cancel()


class EngineStream:
    """Bridges engine requests (events on the engine thread) to asyncio consumers."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def submit(self, req: GenerationRequest) -> SubmittedRequest:
        """Queue ``req`` (``Engine.submit`` in a worker thread: it tokenizes); its domain errors raise here."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[TokenEvent] = asyncio.Queue()

        def sink(event: TokenEvent) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        submitting = asyncio.ensure_future(asyncio.to_thread(self._engine.submit, req, sink))
        try:
            handle = await asyncio.shield(submitting)
        except asyncio.CancelledError:  # the caller left while the worker thread submits: cancel it there
            submitting.add_done_callback(_cancel_submitted)
            raise
        return SubmittedRequest(handle, queue)

    async def events(self, req: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Submit ``req`` and yield its events (``submit`` then ``SubmittedRequest.events``)."""
        submitted = await self.submit(req)
        async for event in submitted.events():
            yield event
