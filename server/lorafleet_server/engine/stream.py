"""An engine request as seen from asyncio: submit it, then iterate its events; closing early cancels it.

The engine calls a request's sink on its own thread; ``EngineStream.submit`` gives the sink a put
into an ``asyncio.Queue`` through the loop's ``_LoopMailbox`` and returns a ``SubmittedRequest`` whose
``events()`` the edge iterates. Submission is separate from iteration so an edge can refuse a request
with a proper status before it starts answering (HTTP sends its status line before the body). An
iteration that stops before the final event (the client went away, the consumer broke off) cancels the
request, and the engine frees its row within one step.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

from lorafleet_adapters.ref import AdapterKey
from lorafleet_server.engine.engine import Engine, RequestHandle
from lorafleet_server.engine.fair_pool import FairPool
from lorafleet_server.engine.types import GenerationRequest, Summary, TokenEvent

T = TypeVar("T")


class Outcome:
    """How an engine request ended, for whoever asks after its consumer has gone: a call cancelled by
    its client ends before the engine's summary of it (the tokens it made, its adapter version) comes,
    a step later, and its request log line wants that summary."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queued = False
        self._ended = False
        self._summary: Summary | None = None
        self._then: Callable[[Summary | None], None] | None = None

    def queued(self) -> None:
        """The engine has the request: it will end with a final event."""
        with self._lock:
            self._queued = True

    def ended(self, summary: Summary | None) -> None:
        """From the engine thread: the request's final event (an error's carries no summary)."""
        with self._lock:
            if self._ended:
                return
            self._ended, self._summary, then = True, summary, self._then
        if then is not None:
            then(summary)

    def then(self, callback: Callable[[Summary | None], None]) -> tuple[bool, Summary | None]:
        """(True, its summary) when the request has ended, or never reached the engine (None); else
        (False, None), and ``callback`` runs with the summary when the request ends."""
        with self._lock:
            if self._ended or not self._queued:
                return True, self._summary
            self._then = callback
            return False, None


class Outcomes:
    """The outcomes of one call's several engine requests (an embeddings call's inputs) as one: it has
    ended when each of them has, and its summary is the first one's with every input's prompt tokens
    (an input that never reached the engine adds none)."""

    def __init__(self, parts: Sequence[Outcome]) -> None:
        self._parts = tuple(parts)
        self._lock = threading.Lock()
        self._summaries: dict[int, Summary | None] = {}
        self._then: Callable[[Summary | None], None] | None = None

    def then(self, callback: Callable[[Summary | None], None]) -> tuple[bool, Summary | None]:
        """As ``Outcome.then``: (True, the summary) when every part has ended, else (False, None), and
        ``callback`` runs with the summary when the last one ends."""
        with self._lock:  # a part ending meanwhile waits here, then sees the callback
            for i, part in enumerate(self._parts):
                ended, summary = part.then(functools.partial(self._ended, i))
                if ended:
                    self._summaries[i] = summary
            if len(self._summaries) == len(self._parts):
                return True, self._summary()
            self._then = callback
            return False, None

    def _ended(self, i: int, summary: Summary | None) -> None:
        with self._lock:
            self._summaries[i] = summary
            if len(self._summaries) < len(self._parts) or self._then is None:
                return
            then, self._then = self._then, None
            joined = self._summary()
        then(joined)

    def _summary(self) -> Summary | None:
        found = [self._summaries[i] for i in sorted(self._summaries)]
        summaries = [s for s in found if s is not None]
        if not summaries:
            return None
        return dataclasses.replace(summaries[0], prompt_tokens=sum(s.prompt_tokens for s in summaries))


async def result_of(work: Future[T]) -> T:
    """The result of ``work`` (running on a worker thread). A caller cancelled meanwhile leaves it to
    finish; its outcome, then read by nobody, is retrieved here: asyncio logged each such failure (a
    drain's refusal, a store that did not answer) at ERROR as "Future exception was never retrieved",
    with a traceback, during exactly the drains and outages an operator watches the log in."""
    waiting = asyncio.wrap_future(work)
    try:
        return await asyncio.shield(waiting)
    except asyncio.CancelledError:
        waiting.add_done_callback(_retrieve)
        raise


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


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


def _cancel_submitted(done: Future[RequestHandle]) -> None:
    if not done.cancelled() and done.exception() is None:
        done.result().cancel()


class _LoopMailbox:
    """Events the engine thread hands to one event loop, delivered in batches.

    ``loop.call_soon_threadsafe`` writes to the loop's self-pipe on every call: a decode step of 32
    streaming requests made 32 writes (and wake-ups of the loop) from the engine thread, ~2% of its
    time (py-spy, ``bench.serving`` with 32 adapters). Here the first event of a batch schedules one
    drain, and later ones only append until it runs; each queue still gets its events in order.
    Inside an engine step (``Engine.after_step``) the drain is scheduled once the step has delivered
    every row's events: scheduled at the first, the loop woke at once (the self-pipe write lets it take
    the GIL) and drained it, so the next event scheduled another, ~1,100-1,600 wake-ups for 2,080
    events (an outside profile); one per step now."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue[TokenEvent], TokenEvent]] = []
        self._scheduled = False  # a drain is scheduled on the loop
        self._deferred = False  # a flush waits for the end of the engine's step
        self._closed = False  # the loop refused a drain: it is closed

    def put(
        self,
        queue: asyncio.Queue[TokenEvent],
        event: TokenEvent,
        after_step: Callable[[Callable[[], None]], bool] | None = None,
    ) -> None:
        """From any thread: ``queue.put_nowait(event)`` on the loop, soon; with ``after_step``
        (``Engine.after_step``), at the end of the engine's step when it is in one. RuntimeError when
        the loop is closed (the engine then treats the consumer as gone)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the event loop is closed")
            self._pending.append((queue, event))
            if self._scheduled or self._deferred:
                return
            if after_step is not None and after_step(self.flush):
                self._deferred = True
                return
            self._scheduled = True
        self._schedule()

    def flush(self) -> None:
        """Schedule the drain of what waited for the end of the step (the engine thread). A closed loop
        drops them; its requests' next events raise, and the engine treats their consumers as gone."""
        with self._lock:
            self._deferred = False
            if self._scheduled or not self._pending:
                return
            self._scheduled = True
        with contextlib.suppress(RuntimeError):
            self._schedule()

    def _schedule(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._drain)
        except RuntimeError:
            with self._lock:
                self._scheduled = False
                self._closed = True
                self._pending.clear()  # nobody will read them
            raise

    def _drain(self) -> None:  # on the loop
        with self._lock:
            pending, self._pending = self._pending, []
            self._scheduled = False
        for queue, event in pending:
            queue.put_nowait(event)


class EngineStream:
    """Bridges engine requests (events on the engine thread) to asyncio consumers."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopMailbox] = (
            weakref.WeakKeyDictionary()
        )

    def _mailbox(self, loop: asyncio.AbstractEventLoop) -> _LoopMailbox:
        mailbox = self._mailboxes.get(loop)
        if mailbox is None:
            mailbox = self._mailboxes[loop] = _LoopMailbox(loop)
        return mailbox

    async def submit(self, req: GenerationRequest, outcome: Outcome | None = None) -> SubmittedRequest:
        """Queue ``req``: ``Engine.reserve`` here (the cheap refusals, and its place in the queue), then
        ``Engine.submit`` on the engine's worker threads in its tenant's turn (``submit_pool``: it
        tokenizes, and may read the adapter store); its domain errors raise here. A caller that leaves
        before a worker took it up drops it (it held its place, and its prompt, until then).
        ``outcome`` learns how the request ended, whether or not anyone still reads its events."""
        engine = self._engine
        mailbox = self._mailbox(asyncio.get_running_loop())
        queue: asyncio.Queue[TokenEvent] = asyncio.Queue()

        def sink(event: TokenEvent) -> None:
            if event.final and outcome is not None:
                outcome.ended(event.summary)
            mailbox.put(queue, event, engine.after_step)

        arrived = engine.reserve(req)

        def submit() -> RequestHandle:  # on a worker thread
            handle = engine.submit(req, sink, reserved_at=arrived)
            if outcome is not None:  # here, not once the caller resumes: it may have left meanwhile
                outcome.queued()
            return handle

        try:
            submitting = engine.submit_pool(req).submit(req.tenant, submit)
        except BaseException:  # nothing was queued (its pools are shut down: ShuttingDown): the place goes back
            engine.unreserve(req)
            raise
        try:
            handle = await result_of(submitting)
        except asyncio.CancelledError:  # the caller left
            if submitting.cancel():  # before a worker took it: it never runs
                engine.unreserve(req)
            else:  # a worker submits it: cancel it there
                submitting.add_done_callback(_cancel_submitted)
            raise
        return SubmittedRequest(handle, queue)

    async def run(self, tenant: str, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the engine's worker threads in ``tenant``'s turn (the Tokenize RPC's encoding);
        dropped if the caller leaves before a worker took it up."""
        return await self._run_on(self._engine.tokenize_pool(), tenant, fn, *args)

    async def resolve(self, req: GenerationRequest) -> AdapterKey:
        """The version ``req``'s adapter names now, read on the threads its submit would use: the store's
        own for a name this server does not know without reading the store, so a store that does not
        answer holds only those (an embeddings call's one version for all its inputs read it on the
        threads every request is admitted on: eight such calls stalled the whole server)."""
        assert req.adapter is not None
        adapters = self._engine.adapters
        return await self._run_on(self._engine.submit_pool(req), req.tenant, adapters.resolve, req.adapter)

    async def _run_on(self, pool: FairPool, tenant: str, fn: Callable[..., T], *args: Any) -> T:
        running = pool.submit(tenant, fn, *args)  # ShuttingDown once its pool is shut down
        try:
            return await result_of(running)
        except asyncio.CancelledError:
            running.cancel()
            raise

    async def events(self, req: GenerationRequest, outcome: Outcome | None = None) -> AsyncIterator[TokenEvent]:
        """Submit ``req`` and yield its events (``submit`` then ``SubmittedRequest.events``)."""
        submitted = await self.submit(req, outcome)
        async for event in submitted.events():
            yield event
