"""The engine: one thread that admits requests, steps a continuous batch and streams tokens back.

Other threads talk to it only through :meth:`Engine.submit`, :meth:`RequestHandle.cancel` and
:meth:`Engine.call` / :meth:`Engine.run` (admin operations run on the engine thread between steps).
Each of them posts one typed message (``_Message``) to the engine's inbox. Each step prefills
chunks of newly admitted prompts and decodes one token for every running row, in one forward; rows
may use different adapters. A finished or cancelled row leaves at once and frees its KV row and its
adapter lease; the next waiting request takes them in the following step.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar, assert_never

import torch

from lorafleet_adapters.errors import AdapterError, AdapterIncompatible
from lorafleet_adapters.head import ClassifierHead
from lorafleet_adapters.prompt import PromptTemplate
from lorafleet_adapters.ref import AdapterKey
from lorafleet_server.engine.adapter_manager import AdapterManager
from lorafleet_server.engine.classify import classify_rows
from lorafleet_server.engine.detokenize import IncrementalDetokenizer, StopMatcher
from lorafleet_server.engine.fair_pool import FairPool
from lorafleet_server.engine.fairness import FairQueue, preemption_victim
from lorafleet_server.engine.places import Places, tenant_limit
from lorafleet_server.engine.prefix_cache import PrefixCache
from lorafleet_server.engine.prompts import PromptEncoder, Tokenizer
from lorafleet_server.engine.types import (
    EngineConfig,
    EngineObserver,
    FinishReason,
    GenerationRequest,
    LabelScore,
    NullObserver,
    Summary,
    TokenEvent,
)
from lorafleet_server.engine.usage import UsageMeter
from lorafleet_server.errors import (
    ContextLengthExceeded,
    EngineTimeout,
    InvalidRequest,
    ServingError,
    ShuttingDown,
    WrongAdapterKind,
)
from lorafleet_server.model.runner import ModelRunner, RowStep
from lorafleet_server.model.sampler import NonFiniteLogits, RowSampling, sample_rows

log = logging.getLogger(__name__)

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)
Sink = Callable[[TokenEvent], None]

# Worker threads that admit requests (``submit`` tokenizes): those whose adapter is at hand, and those
# that read the adapter store first. A store that stopped answering held each of the latter ~47 s; on
# one shared pool (the event loop's: 6 threads on 2 CPUs) six such requests stalled every other one,
# base model included, while health said SERVING.
SUBMIT_THREADS = 8
STORE_SUBMIT_THREADS = 4
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
# Tokens a resumed request generates before fair-share preemption may take its row again (_preemptible).
PREEMPT_AFTER_TOKENS = 16
# Engine steps an adapter waits for a slot (SLOT_WAIT_STEPS of them before one drains for it) before the
# drain preempts the requests that still hold that slot, where their tenant holds more slots (_drain_slot).
SLOT_PREEMPT_STEPS = 32
# How long a caller waits for the engine thread to run an admin call. A call waits for the current
# step to end, so this bounds a stuck or overloaded engine, not ordinary work.
CALL_TIMEOUT_SECONDS = 30.0
# How long shutdown waits for the engine thread after aborting it; the thread is a daemon, so a
# forward that never returns cannot keep the process alive past this.
ABORT_JOIN_SECONDS = 30.0
# While an idle engine gathers a burst (``burst_wait_ms``), a gap this long without a new message ends it.
BURST_QUIET_SECONDS = 0.005
DRAINING = "the server is draining: the request was not started; retry it (on another replica)"


def special_token_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """The text of each special token of ``tokenizer`` (``<|im_start|>``, ...) -> its id."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return {str(t.content): int(i) for i, t in added.items() if getattr(t, "special", False)}


@dataclass(eq=False)  # identity: two requests may carry the same client-chosen request id
class _Request:
    req: GenerationRequest
    sink: Sink
    prompt_ids: list[int]
    key: AdapterKey | None  # the version that serves the request (reported back)
    lora: AdapterKey | None  # the version whose LoRA weights it needs (None for base and prompt adapters)
    submitted: float
    head: ClassifierHead | None = None  # a Classify request's head (its features come from `lora` or the base)
    cancelled: bool = False
    slot: int = 0
    polled: bool = False  # its adapter's slot was asked for at least once (its host lookup is counted)
    kv_row: int = -1
    cached: int = 0  # tokens in this row's KV cache
    generated: list[int] = field(default_factory=list)
    admitted: float = 0.0
    first_token: float | None = None
    pooled: torch.Tensor | None = None
    detok: IncrementalDetokenizer | None = None
    stops: StopMatcher | None = None
    stop_ids: frozenset[int] = frozenset()  # special tokens its stop strings name (see special_token_ids)
    generator: torch.Generator | None = None
    seen: torch.Tensor | None = None
    # What the KV row must hold before the next decode: the prompt, and after a preemption also the
    # tokens generated so far but the last (which is the next decode's input).
    resume_ids: list[int] = field(default_factory=list)
    preemptions: int = 0
    start_step: int = 0  # the engine step at which it took its KV row (prefill order ages from here)
    resumed_at: int = 0  # tokens it had generated when it last took a row back after a preemption
    prefix_recorded: bool = False  # its prompt's lookup is in the prefix-cache metrics
    # Its prompt's latest lookup (tokens asked, reused), counted once its prefill completes or it ends.
    prefix_lookup: tuple[int, int] | None = None
    prefix_checked: bool = False  # its KV row holds the cached prefix found for it (or none was found)
    prefix_hit: int = 0  # tokens of that prefix
    emitted: bool = False  # text went to its caller (a gRPC stream's first message is sent with it)

    def __post_init__(self) -> None:
        self.resume_ids = self.prompt_ids

    @property
    def metered_if_cut(self) -> bool:
        """Whether a server's stop that cuts it meters it: a stream that has sent text, which no proxy
        retries (the caller keeps the partial answer). Anything else ends without a response byte (a
        gRPC trailers-only status, an HTTP 503), is retried elsewhere and billed there, so it is not
        (it was billed twice)."""
        return self.req.stream and self.emitted

    @property
    def prefilling(self) -> bool:
        return self.cached < len(self.resume_ids)

    @property
    def tenant(self) -> str:
        return self.req.tenant

    @property
    def weight(self) -> float:
        return self.req.principal.weight if self.req.principal is not None else 1.0


def _about(r: _Request) -> dict[str, Any]:
    """A log line's ``extra`` about one request: its id as a field of its own, as the request log has
    it (JSON logs are queried by field; the id only inside the message was missed)."""
    return {"fields": {"request_id": r.req.request_id}}


# -- the engine thread's inbox: one frozen message type per thing other threads can ask for -------


@dataclass(frozen=True, eq=False)
class _Submit:
    """A validated, tokenized request joins the waiting queue."""

    request: _Request


@dataclass(frozen=True, eq=False)
class _Cancel:
    """Finish ``request`` as cancelled (ignored when it already finished)."""

    request: _Request


@dataclass(frozen=True, eq=False)
class _Call(Generic[T_co]):
    """Run ``fn`` on the engine thread between steps and settle ``future`` with its outcome.

    Covariant in the result so every call fits one ``_Message`` type; only :meth:`run` writes the
    future, with ``fn``'s own result.
    """

    fn: Callable[[], T_co]
    future: Future[T_co]

    def run(self) -> None:
        """Skipped when the caller already gave up (cancelled the future after a timeout)."""
        if not self.future.set_running_or_notify_cancel():
            return
        try:
            self.future.set_result(self.fn())
        except BaseException as exc:  # handed to the caller, who re-raises it on its own thread
            self.future.set_exception(exc)

    def refuse(self, exc: BaseException) -> None:
        """Fail the call without running it (the engine stopped before it got there)."""
        if self.future.set_running_or_notify_cancel():
            self.future.set_exception(exc)


@dataclass(frozen=True)
class _Drain:
    """Stop once running and waiting requests have finished."""


@dataclass(frozen=True)
class _Abort:
    """Stop now; running and waiting requests finish as cancelled."""


_Message = _Submit | _Cancel | _Call[object] | _Drain | _Abort


class RequestHandle:
    def __init__(self, engine: Engine, state: _Request) -> None:
        self._engine = engine
        self._state = state
        self.request_id = state.req.request_id

    @property
    def adapter(self) -> str:
        """The concrete adapter version the request was pinned to at submit, ``tenant/name@version``
        ("" for the base model): what its summary will name, known before the first token."""
        return str(self._state.key) if self._state.key is not None else ""

    def cancel(self) -> None:
        """Stop the request within one step; its sink gets a CANCELLED summary."""
        self._engine._post(_Cancel(self._state))


class Engine:
    def __init__(
        self,
        runner: ModelRunner,
        tokenizer: Tokenizer,
        adapters: AdapterManager,
        config: EngineConfig,
        eos_token_ids: frozenset[int],
        observer: EngineObserver | None = None,
        prefix_cache: PrefixCache | None = None,
    ) -> None:
        if config.max_seq_len > runner.kv.max_seq_len or config.max_batch_size > runner.kv.rows:
            raise ValueError("engine limits exceed the runner's KV cache")
        self.runner = runner
        self.tokenizer = tokenizer
        self.prompts = PromptEncoder(tokenizer, config.max_seq_len)
        self.usage = UsageMeter()
        self.adapters = adapters
        self._config = config
        self.eos_token_ids = eos_token_ids
        self.special_token_ids = special_token_ids(tokenizer)
        self.observer: EngineObserver = observer or NullObserver()
        # K/V of prompt blocks per adapter version (engine thread only); sized by the config unless given.
        self.prefix_cache = prefix_cache if prefix_cache is not None else PrefixCache(config.prefix_cache_bytes)
        self._inbox: queue.SimpleQueue[_Message] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._waiting: FairQueue[_Request] = FairQueue()
        self._running: list[_Request] = []
        self._free_rows = list(range(config.max_batch_size))  # engine thread only
        # Requests reserved (between ``reserve`` and the queue: waiting for a worker thread, or
        # tokenizing; they hold their place and count toward the limits), queued and running, per
        # tenant, for the submit threads' refusals (lock guards).
        self.places = Places(config)
        self._lock = threading.Lock()
        self._accepting = True
        self._closed = False  # the loop has exited: the inbox takes no more messages (lock guards)
        self._draining = False
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self.steps = 0
        self._busy = False  # the last loop iteration ran a forward (engine thread only)
        self._stepping = False  # inside a step (engine thread only): sinks may batch their hand-offs
        self._step_end: list[Callable[[], None]] = []  # what ``after_step`` deferred (engine thread only)
        self._submit_pool = FairPool(SUBMIT_THREADS, "submit")
        self._store_submit_pool = FairPool(STORE_SUBMIT_THREADS, "submit-store")

    @property
    def config(self) -> EngineConfig:
        return self._config

    @config.setter
    def config(self, config: EngineConfig) -> None:
        """A new config (benchmarks and tests change the scheduling between runs): the refusals' limits
        (``places``) follow it."""
        with self._lock:
            self._config = config
            self.places.config = config

    # -- public, any thread -------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()
        self.adapters.versions.start()

    def wake(self) -> None:
        self._wake.set()

    def shutdown(self, timeout: float | None = None) -> None:
        """Drain and stop: refuse new requests, fail queued ones at once (``ShuttingDown``, so clients
        retry elsewhere), let running ones finish within ``timeout``, then stop.

        After ``timeout`` the engine is aborted: it cancels what is left after the current step. That
        wait is bounded too (``ABORT_JOIN_SECONDS``), so a forward that never returns is logged
        instead of hanging the server's exit.
        """
        with self._lock:
            self._accepting = False
        self._post(_Drain())
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._post(_Abort())
            self._thread.join(ABORT_JOIN_SECONDS)
            if self._thread.is_alive():
                log.error("engine thread did not stop within %.0fs of the abort; leaving it", ABORT_JOIN_SECONDS)
        self.adapters.close()
        for pool in (self._submit_pool, self._store_submit_pool):  # submits left refuse at once (not accepting)
            pool.shutdown()

    def abort(self) -> None:
        """Stop after the current step, cutting running requests (a second signal, or the grace is over)."""
        with self._lock:
            self._accepting = False
        self._post(_Abort())

    @property
    def accepting(self) -> bool:
        return self._accepting

    def load_stats(self) -> tuple[int, int]:
        """(running rows, queued requests)."""
        return len(self._running), self.places.queued

    def encode_prompt(
        self,
        prompt: str | None,
        messages: tuple[Any, ...],
        template: PromptTemplate | None = None,
        budget: int = 0,
        budget_text: str | None = None,
    ) -> list[int]:
        """Token ids of a plain prompt or a chat (see ``prompts.PromptEncoder``); ``budget`` is the
        tokens the request adds, and prompt plus budget must fit ``max_seq_len``."""
        return self.prompts.encode(prompt, messages, template, budget, budget_text)

    def check_prompt_fits(self, template: PromptTemplate) -> None:
        """Refuse a prompt adapter's template that leaves no room for a one-word request and one token
        within ``max_seq_len`` (``AdapterIncompatible``): swapped to, every request of its name failed."""
        try:
            self.prompts.encode("hi", (), template, budget=1)
        except ContextLengthExceeded as exc:
            raise AdapterIncompatible(
                f"the prompt adapter's template leaves no room for a request in this server's context: {exc}"
            ) from None

    def submit_pool(self, req: GenerationRequest) -> FairPool:
        """Where an edge runs ``submit(req)`` (in ``req.tenant``'s turn): a request whose adapter this
        server does not know without reading the store gets threads of its own, so a store that does not
        answer holds only those."""
        if req.adapter is not None and not self.adapters.known_without_store(req.adapter):
            return self._store_submit_pool
        return self._submit_pool

    def tokenize_pool(self) -> FairPool:
        """Where the Tokenize RPC encodes (tenants in turn, as submits)."""
        return self._submit_pool

    def reserve(self, req: GenerationRequest) -> float:
        """Refuse ``req`` now if it will be (bad parameters, shutting down, a full queue, its tenant over
        its limit), else hold its place in the queue: it counts toward the limits from here, not only
        once tokenized, so a tenant's requests still waiting for a worker thread cannot pass its
        ``max_waiting``. ``submit(req, sink, reserved_at=...)`` with the ``time.monotonic()`` returned
        takes the place over; ``unreserve`` gives it back when that never runs."""
        arrived = time.monotonic()
        self._validate_params(req)
        with self._lock:
            if not self._accepting:
                raise ShuttingDown("the server is shutting down")
            self.places.reserve(req)
        return arrived

    def unreserve(self, req: GenerationRequest) -> None:
        """Give back the place ``reserve`` held for ``req`` (its submit never ran: the caller left)."""
        with self._lock:
            self.places.unreserve(req.tenant)

    def submit(self, req: GenerationRequest, sink: Sink, *, reserved_at: float | None = None) -> RequestHandle:
        """Validate, tokenize and resolve ``req``, then queue it. Raises domain errors at once.

        The cheap refusals come first (``reserve``: shutting down, bad parameters, a full queue; then a
        prompt that cannot fit by its length alone), so a request that will be refused costs no
        tokenization. ``reserved_at``: ``reserve(req)`` was called already, and returned this. Its
        queue wait and time to first token count from then: from ``_Request``'s making, they missed
        the wait for a worker thread, the adapter store's reads and the tokenizing (an outside review).
        """
        arrived = self.reserve(req) if reserved_at is None else reserved_at
        queued = False
        try:
            handle = self._submit_reserved(req, sink, arrived)
            queued = True
            return handle
        finally:
            if not queued:
                self.unreserve(req)

    def _submit_reserved(self, req: GenerationRequest, sink: Sink, arrived: float) -> RequestHandle:
        if not self._accepting:  # it waited for a worker while the drain began: no tokenizing, no store read
            raise ShuttingDown("the server is shutting down")
        key = self.adapters.resolve(req.adapter) if req.adapter is not None else None
        kind = self.adapters.kind(key) if key is not None else None
        head = self._head_for(req, key, kind)
        template = self.adapters.prompt(key) if key is not None and kind == "prompt" else None
        fit = req.params.fit_context and not req.embed  # the server's default, cut to the context left
        budget = 0 if req.embed else 1 if fit else req.params.max_new_tokens
        fitted = "one generated token (max_new_tokens unset)" if fit else None
        prompt_ids = self.encode_prompt(req.prompt, req.messages, template, budget, fitted)
        if fit:
            left = self.config.max_seq_len - len(prompt_ids)
            if req.params.max_new_tokens > left:
                req = dataclasses.replace(req, params=dataclasses.replace(req.params, max_new_tokens=left))
        lora = key if kind == "lora" else None
        if head is not None:
            lora = head.features_from
        state = _Request(
            req=req,
            sink=sink,
            prompt_ids=prompt_ids,
            key=key,
            lora=lora,
            submitted=arrived,
            head=head,
        )
        with self._lock:
            if not self._accepting:  # it began shutting down while this one tokenized
                raise ShuttingDown("the server is shutting down")
            self.places.enqueue(req.tenant)  # its reserved place, now in the queue
        if not self._post(_Submit(state)):  # the loop exited (crashed) after the check above
            with self._lock:
                self.places.unqueue(req.tenant)  # given back by submit
            raise ShuttingDown("the server is shutting down")
        return RequestHandle(self, state)

    def _head_for(self, req: GenerationRequest, key: AdapterKey | None, kind: str | None) -> ClassifierHead | None:
        """A Classify request's head; refuses an adapter whose kind does not fit the request (both ways)."""
        if req.classify is None:
            if kind == "head":
                rpc = "Embed" if req.embed else "Generate"
                raise WrongAdapterKind(
                    f"adapter {key} is of kind 'head' (a classifier head): call Classify with it; "
                    f"{rpc} takes a 'lora' or 'prompt' adapter"
                )
            return None
        if key is None:
            raise InvalidRequest("Classify needs the reference of a head adapter (kind 'head')")
        if kind != "head":
            raise WrongAdapterKind(
                f"adapter {key} is of kind {kind!r}: Classify takes a 'head' adapter (a classifier trained with "
                "`lorafleet train --method classifier`)"
            )
        head = self.adapters.head(key)
        if head.hidden_size != self.runner.hidden_size:
            raise AdapterIncompatible(
                f"head {key} reads {head.hidden_size} features; this base has hidden size {self.runner.hidden_size}"
            )
        if req.classify.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0, got {req.classify.top_k}", param="top_k")
        return head

    def tenant_limit(self, req: GenerationRequest, kind: Literal["max_waiting", "max_running"]) -> int:
        """A tenant's waiting or running limit: the key's override, else the engine's (0: none)."""
        return tenant_limit(self.config, req, kind)

    def after_step(self, fn: Callable[[], None]) -> bool:
        """From a request's sink: when called on the engine thread inside a step, run ``fn`` once the
        step has delivered every row's events, and return True; else return False (nothing deferred).
        A sink that hands events to another thread takes one hand-off per step this way, not one per
        event: each woke the event loop, whose drain then raced the engine for the GIL (~0.6 ms of a
        32-row step's ~15 ms, an outside profile)."""
        if not self._stepping or threading.current_thread() is not self._thread:
            return False
        self._step_end.append(fn)
        return True

    def call(self, fn: Callable[[], T]) -> Future[T]:
        """Run ``fn`` on the engine thread between steps (admin operations on device slots).

        The future fails with ``ShuttingDown`` once the engine has stopped. Prefer :meth:`run`, which
        bounds the wait; a caller that waits on this future itself must bring its own timeout.
        """
        future: Future[T] = Future()
        message: _Call[T] = _Call(fn, future)  # typed here, so it widens to _Call[object] as a whole
        if not self._post(message):
            future.set_exception(ShuttingDown("the server is shutting down"))
        return future

    def run(self, fn: Callable[[], T], timeout: float = CALL_TIMEOUT_SECONDS) -> T:
        """Run ``fn`` on the engine thread and return its result; raise what it raised.

        Raises ``EngineTimeout`` when the engine thread has not finished ``fn`` within ``timeout``
        seconds (it is stuck in a long step, or stopped without being started). A call that has not
        started yet is withdrawn; one already running completes, so its effect may still happen.
        """
        future = self.call(fn)
        try:
            return future.result(timeout=timeout)
        except TimeoutError:  # concurrent.futures.TimeoutError is the builtin since 3.11
            if future.cancel() or not future.done():  # withdrawn before it ran, or still running
                raise EngineTimeout(f"the engine did not run the call within {timeout:g}s") from None
            return future.result()  # it finished meanwhile, or fn itself raised TimeoutError

    # -- validation ---------------------------------------------------------------------------
    def _validate_params(self, req: GenerationRequest) -> None:
        p = req.params
        if req.embed:
            return
        if not 1 <= p.max_new_tokens <= self.config.max_new_tokens:
            raise InvalidRequest(
                f"max_new_tokens must be in [1, {self.config.max_new_tokens}], got {p.max_new_tokens}",
                param="max_new_tokens",
            )
        if not math.isfinite(p.temperature) or p.temperature < 0:
            raise InvalidRequest(f"temperature must be a finite number >= 0, got {p.temperature}", param="temperature")
        if not math.isfinite(p.top_p) or not 0 < p.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {p.top_p}", param="top_p")
        if p.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0, got {p.top_k}", param="top_k")
        if not math.isfinite(p.repetition_penalty) or p.repetition_penalty <= 0:
            raise InvalidRequest(
                f"repetition_penalty must be a finite number > 0, got {p.repetition_penalty}",
                param="repetition_penalty",
            )
        if len(p.stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS or not s for s in p.stop):
            raise InvalidRequest(
                f"stop takes at most {MAX_STOP_STRINGS} non-empty strings of at most {MAX_STOP_CHARS} characters",
                param="stop",
            )

    # -- engine thread ------------------------------------------------------------------------
    def _post(self, message: _Message) -> bool:
        """Queue ``message`` for the engine thread; False once its loop has exited (nobody would read it).

        The put happens under the lock that ``_close`` takes, so a message is either refused here or
        drained by ``_close``: none is left unanswered in the inbox.
        """
        with self._lock:
            if self._closed:
                return False
            self._inbox.put(message)
        self._wake.set()
        return True

    def _loop(self) -> None:
        try:
            self._run_loop()
        except Exception as exc:  # a bug: fail every request rather than leave clients hanging
            log.exception("engine loop crashed; refusing new requests")
            with self._lock:
                self._accepting = False
            for r in list(self._running) + list(self._waiting):
                self._fail(r, exc)
        finally:
            self._close()

    def _close(self) -> None:
        """Refuse further messages and answer those that raced with shutdown instead of leaving them waiting."""
        with self._lock:
            self._closed = True
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                break
            match message:
                case _Submit(request=r):
                    self._fail(r, ShuttingDown("the server is shutting down"))
                case _Call():
                    message.refuse(ShuttingDown("the server is shutting down"))
                case _Cancel() | _Drain() | _Abort():
                    pass  # nothing is running any more
                case _:
                    assert_never(message)

    def _run_loop(self) -> None:
        while True:
            self._wake.clear()
            self._handle_inbox()
            if self._stop or (self._draining and not self._running and not self._waiting):
                break
            self.adapters.retire_superseded()
            self.adapters.drop_abandoned_loads(time.monotonic())
            self._admit()
            if not self._running:
                if self._busy:  # the batch gauges say what the last forward held: nothing, now
                    self.observer.observe_step(0, 0)
                    self._busy = False
                self._wake.wait(timeout=1.0)
                continue
            if not self._busy and self.config.burst_wait_ms > 0:  # idle until now: a burst may be arriving
                self._gather_burst()
                if self._stop:
                    continue
                self._admit()
                if not self._running:  # all cancelled meanwhile
                    continue
            self._busy = True
            self._stepping = True
            try:
                self._step()
            finally:
                self._stepping = False
                self._end_step()
            for gone in [r for r in self._running if r.cancelled]:
                self._finish(gone, FinishReason.CANCELLED)
        for r in list(self._running) + list(self._waiting):  # the server cut them: retried elsewhere
            self._finish(r, FinishReason.CANCELLED, metered=r.metered_if_cut)

    def _end_step(self) -> None:
        """Run what sinks deferred to the end of the step (``after_step``)."""
        deferred, self._step_end = self._step_end, []
        for fn in deferred:
            try:
                fn()
            except Exception:  # a consumer's hand-off: its requests see a closed loop at their next event
                log.exception("a step-end hand-off failed")

    def _handle_inbox(self) -> None:
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return
            self._handle(message)

    def _gather_burst(self) -> None:
        """Before the first step after idling, let the rest of a burst arrive: wait while messages keep
        coming less than ``BURST_QUIET_SECONDS`` apart, for ``burst_wait_ms`` at most. Requests sent
        together then share the first forward instead of waiting behind one that came a few
        milliseconds ahead of them; a lone request pays one quiet interval."""
        deadline = time.monotonic() + self.config.burst_wait_ms / 1000
        while (left := deadline - time.monotonic()) > 0:
            if not self._wake.wait(min(BURST_QUIET_SECONDS, left)):
                return
            self._wake.clear()
            self._handle_inbox()

    def _handle(self, message: _Message) -> None:
        """Apply one inbox message; runs on the engine thread between steps."""
        match message:
            case _Submit(request=r):
                if self._draining:  # raced with the drain: it would only wait to be cut
                    self._fail(r, ShuttingDown(DRAINING))
                else:
                    self._waiting.push(r)
            case _Cancel(request=r):
                if r in self._running or r in self._waiting:  # else it already finished
                    r.cancelled = True
                    # Once stopping, a cancel is the server closing its calls (a second signal, or
                    # gRPC's grace run out behind a long last step): the cut is the server's, and
                    # its caller retries elsewhere, so it is not metered (it was billed twice);
                    # unless it is a stream that sent tokens, which nobody retries.
                    self._finish(r, FinishReason.CANCELLED, metered=not self._stop or r.metered_if_cut)
            case _Call():
                message.run()
            case _Drain():
                self._draining = True
                queued: list[_Request] = []
                for r in self._waiting.clear():
                    if r.preemptions:  # started, then gave its row away: it resumes and finishes
                        self._waiting.push(r)
                    else:
                        queued.append(r)
                for r in queued:  # not started: fail now so the client retries elsewhere at once
                    self._fail(r, ShuttingDown(DRAINING))
                log.info(
                    "draining: %d running request(s) may finish; %d queued failed with UNAVAILABLE",
                    len(self._running) + len(self._waiting),
                    len(queued),
                )
            case _Abort():
                self._stop = True
                if self._running:
                    log.warning("stopping now: %d running request(s) cut", len(self._running))
            case _:
                assert_never(message)

    def _admit(self) -> None:
        """Fill free rows fairly across tenants; when none is free and a tenant waits below its share
        while another runs above its own, preempt one row of the latter (see ``fairness``)."""
        if self.adapters.tracks_waits:
            self._drain_slot()
        self._fill_rows()
        if self._free_rows or not self._waiting:
            return
        running = Counter(r.tenant for r in self._running)

        def can_start(r: _Request) -> bool:
            """Below its tenant's running limit (a tenant at it gains nothing from a preemption: the row
            would go straight back) with its adapter at hand."""
            return not self._at_running_limit(r, running) and self._can_start_now(r)

        victim = preemption_victim(
            self.config.max_batch_size, self._running, self._waiting, can_start, self._preemptible
        )
        if victim is not None:
            self._preempt(victim)
            self._fill_rows()

    def _drain_slot(self) -> None:
        """Preempt the requests holding a slot that drains for another tenant's adapter, when that
        adapter has waited ``SLOT_PREEMPT_STEPS`` and their tenant holds more slots than its by two or
        more. A drain alone waited for their whole generations: one tenant spread over every slot made
        another's adapter request wait up to max_new_tokens steps, rows free or not (fair share could
        not help: preempting a row left the slot's lease). Their leases are let go; they resume, like
        any preempted request, with their output unchanged, and take a slot again then. The margin of
        two keeps the tenant that gave up a slot from taking it straight back."""
        draining = self.adapters.draining(self.steps)
        if draining is None or draining[2] < SLOT_PREEMPT_STEPS:
            return
        slot, key, _ = draining
        waiting = next((r for r in self._waiting if r.lora == key and not r.slot), None)
        holders = [r for r in self._running if r.slot == slot]
        if waiting is None or not holders or not all(self._preemptible(r) for r in holders):
            return
        slots: dict[str, set[int]] = {}
        for r in self._running:
            if r.slot:
                slots.setdefault(r.tenant, set()).add(r.slot)
        mine = len(slots.get(waiting.tenant, ()))
        if any(r.tenant == waiting.tenant or len(slots[r.tenant]) < mine + 2 for r in holders):
            return
        for r in holders:
            self._preempt(r)
            self.adapters.release(r.slot)  # its version may leave the device: it takes a slot again to resume
            r.slot = 0
        log.info("device slot %d: %d request(s) preempted for %s (tenant %r)", slot, len(holders), key, waiting.tenant)

    def _fill_rows(self) -> None:
        if self.adapters.tracks_waits:
            self.adapters.still_waiting({r.lora for r in self._waiting if r.lora is not None and not r.slot})
        running: dict[str, int] = {}
        for row in self._running:
            running[row.tenant] = running.get(row.tenant, 0) + 1
        while self._free_rows:
            r = self._next_ready(running)
            if r is None:
                return
            self._waiting.started(r)
            running[r.tenant] = running.get(r.tenant, 0) + 1
            self._start(r)

    def _next_ready(self, running: dict[str, int]) -> _Request | None:
        """The next request to start: from the tenant owed a row first, the first of its requests that
        can run now (a cold adapter's request waits for its load while others go first)."""
        for tenant in self._waiting.tenants():
            for r in self._waiting.waiting(tenant):
                if self._at_running_limit(r, running):
                    break  # this tenant runs its limit's worth; the next tenant goes
                if r.lora is not None and not r.slot:
                    try:
                        slot = self.adapters.poll(r.lora, first=not r.polled, step=self.steps)
                        r.polled = True
                    except Exception as exc:  # the adapter's error; anything else is a bug, this request's alone
                        if not isinstance(exc, AdapterError | ServingError):
                            log.exception(
                                "request %s: loading adapter %s failed", r.req.request_id, r.lora, extra=_about(r)
                            )
                        self._fail(r, exc)  # out of the queue; the scan goes on (the order is unchanged)
                        continue
                    if slot is None:
                        continue  # loading, or waiting for a free slot
                    r.slot = slot
                return r
        return None

    def _at_running_limit(self, r: _Request, running: Mapping[str, int]) -> bool:
        """Whether ``r``'s tenant already runs its limit's worth (``running``: rows per tenant)."""
        limit = self.tenant_limit(r.req, "max_running")
        return bool(limit) and running.get(r.tenant, 0) >= limit

    def _can_start_now(self, r: _Request) -> bool:
        return r.lora is None or bool(r.slot) or self.adapters.can_start(r.lora)

    def _preemptible(self, r: _Request) -> bool:
        """Not an embedding (it has no decode to resume), not cancelled, and not resumed from a
        preemption without ``PREEMPT_AFTER_TOKENS`` new tokens since: a tenant sending short requests
        one after another preempted the same row each time, as soon as it had resumed, so that row made
        no progress while its recompute was billed to nobody (an outside review measured 135-208
        preemptions of one request). The victim is then another of the tenant's rows; a row is taken
        again only after it has made that much progress. Counted in tokens, not steps: a recompute
        longer than the protection (long prompts, small step budgets, no cached prefix) lost its row
        again before it produced anything. A first start is not protected: a tenant arriving at a batch
        just filled by another still starts within a step or two."""
        recently_resumed = r.preemptions > 0 and len(r.generated) - r.resumed_at < PREEMPT_AFTER_TOKENS
        return not r.req.embed and not r.cancelled and not recently_resumed

    def _preempt(self, r: _Request) -> None:
        """Give ``r``'s row back; ``r`` waits at the front of its tenant's queue and later recomputes its
        KV cache (prompt + tokens generated so far), so what it streams is unchanged. Its adapter slot
        lease is kept, so the version cannot leave the device meanwhile."""
        self._running.remove(r)
        self._free_rows.append(r.kv_row)
        self._free_rows.sort()
        r.kv_row, r.cached, r.prefix_checked, r.prefix_hit = -1, 0, False, 0
        r.resume_ids = r.prompt_ids + r.generated[:-1] if r.generated else r.prompt_ids
        r.preemptions += 1
        with self._lock:
            self.places.preempt(r.tenant)
        self._waiting.push(r, front=True)
        self.observer.observe_preempted()
        log.info(
            "request %s (tenant %r) preempted after %d tokens to give its row to a tenant below its share",
            r.req.request_id,
            r.tenant,
            len(r.generated),
            extra=_about(r),
        )

    def _start(self, r: _Request) -> None:
        with self._lock:
            self.places.start(r.tenant, resuming=bool(r.preemptions))
        r.kv_row = self._free_rows.pop(0)
        self.runner.kv.begin(r.kv_row)  # a resumed request recomputes its K/V too
        r.start_step = self.steps
        self._running.append(r)
        if self.config.prefill_order == "arrival":  # the policy before issue 13: look up at admission
            self._reuse_prefix(r)
        if r.preemptions:  # resuming: its decoding state carries on
            r.resumed_at = len(r.generated)
            return
        r.admitted = time.monotonic()
        self.observer.observe_admitted(r.admitted - r.submitted, len(r.prompt_ids))
        p = r.req.params
        if not r.req.embed:
            r.detok = IncrementalDetokenizer(self.tokenizer, r.prompt_ids)
            # A stop string that is a special token's text also stops on that token: the text the matcher
            # sees is decoded without special tokens, so "<|im_start|>" as one token never matched (and
            # vanished). Spelled out in ordinary pieces, it still matches as text.
            # So does one that holds a special token and other text ("<|im_start|>user", "<|im_end|>\n"): the
            # whole string never matched (an outside review), and refusing it broke callers whose
            # requests ran to their end before (the second diff review).
            r.stop_ids = frozenset(i for s in p.stop for t, i in self.special_token_ids.items() if t in s)
            r.stops = StopMatcher(p.stop)
            if p.repetition_penalty != 1.0:
                r.seen = torch.tensor(r.prompt_ids, dtype=torch.long)
            if p.temperature > 0:
                seed = p.seed if p.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
                r.generator = torch.Generator(device=self.runner.device).manual_seed(seed)

    def _reuse_prefix(self, r: _Request) -> None:
        """Copy the K/V of the longest cached block-aligned prefix of what ``r`` must prefill into its new
        KV row and start its prefill after it. The last token is always computed (its logits are the
        first token's; a resumed request's last token is what its next decode sees). Embed and
        classify requests pool the hidden states of every token, so they compute all of them."""
        r.cached = 0
        r.prefix_checked = True
        if r.req.embed or not self.prefix_cache.enabled:
            return
        limit = len(r.resume_ids) - 1
        n, blocks = self.prefix_cache.lookup(self._cache_owner(r), r.resume_ids, limit)
        if n:
            try:
                k = torch.cat([b.k for b in blocks], dim=2)  # [layers, kv_heads, n, head_dim]
                v = torch.cat([b.v for b in blocks], dim=2)
                self.runner.kv.write(r.kv_row, 0, k, v)
            except Exception:  # no memory for the copy: prefill it all (rewrites whatever was written)
                log.exception(
                    "request %s: its cached prefix could not be copied in; computing it",
                    r.req.request_id,
                    extra=_about(r),
                )
                n = 0
        r.prefix_hit = r.cached = n
        if not r.prefix_recorded:
            r.prefix_lookup = (limit, n)

    def _record_prefix(self, r: _Request) -> None:
        """Count ``r``'s prompt in the prefix-cache metrics, once, with its last lookup before its prefill
        completed: a request preempted mid-prefill looks up again when it resumes and may reuse blocks
        another prompt cached meanwhile (counting its first lookup alone missed those: an outside
        review); one preempted after its prefill finds its own blocks, which are not counted."""
        if not r.prefix_recorded and r.prefix_lookup is not None:
            r.prefix_recorded = True
            self.prefix_cache.record(*r.prefix_lookup)

    def _waits_for_prefix(self, r: _Request, finishing: list[_Request]) -> bool:
        """Whether ``r``, not started yet, should let this step go: a prompt whose prefill this step
        completes (so whose blocks are stored right after it) shares with ``r`` a full block beyond what
        that prompt itself found cached. ``r`` then looks up next step and computes only the rest, one
        step later; prompts of a burst that share a system prompt compute it once instead of each."""
        if r.req.embed or not self.prefix_cache.enabled:
            return False
        block = self.prefix_cache.block_tokens
        limit = len(r.resume_ids) - 1  # the last token is always computed
        owner = self._cache_owner(r)
        for q in finishing:
            if q.req.embed or self._cache_owner(q) != owner:  # blocks r could not use
                continue
            shared = 0
            for a, b in zip(q.resume_ids[:limit], r.resume_ids[:limit], strict=False):
                if a != b:
                    break
                shared += 1
            if shared // block * block > q.prefix_hit:
                return True
        return False

    def _cache_owner(self, r: _Request) -> str:
        """Whose prefix-cache blocks ``r`` may use: its LoRA version's (a tenant's own), else the base
        model's, per tenant unless ``prefix_cache_scope`` is ``shared`` (an adapter key has a "/")."""
        if r.lora is not None:
            return str(r.lora)
        return f"base:{r.tenant}" if self.config.prefix_cache_scope == "tenant" else ""

    def _remember_prefix(self, r: _Request) -> None:
        """``r`` just finished its prefill: keep its full blocks (prompt, and after a preemption the
        tokens it had generated) for later requests of the same adapter version. A failure (no memory
        for the copy) only leaves them uncached: a block is added whole or not at all."""
        self._record_prefix(r)
        row = r.kv_row
        try:
            self.prefix_cache.insert(
                self._cache_owner(r),
                r.resume_ids,
                len(r.resume_ids),
                lambda start, end: self.runner.kv.read(row, start, end),
            )
        except Exception:
            log.exception("request %s: its prompt's blocks could not be cached", r.req.request_id, extra=_about(r))

    def _plan(self) -> list[tuple[_Request, RowStep]]:
        """This step's rows: one token for every row that has finished its prompt, then prompt chunks
        within the rest of ``max_step_tokens`` (at least 16), in ``_prefill_queue`` order. A prompt's
        chunk is as long as the budget left allows, so the budget finishes whole prompts in turn and
        their first tokens come out in waves while the rows started earlier keep decoding."""
        plan: list[tuple[_Request, RowStep]] = []
        decoding = [r for r in self._running if not r.prefilling]
        for r in decoding:
            plan.append((r, RowStep(r.kv_row, r.cached, (r.generated[-1],), r.slot, True, False)))
        budget = max(self.config.max_step_tokens - len(decoding), 16)
        finishing: list[_Request] = []  # rows whose prefill this step completes
        for r in self._prefill_queue():
            if budget <= 0:
                break
            if not r.prefix_checked:  # looked up now, so it finds the blocks of prompts prefilled before it
                if self._waits_for_prefix(r, finishing):
                    continue
                self._reuse_prefix(r)
            n = min(len(r.resume_ids) - r.cached, budget)
            budget -= n
            chunk = tuple(r.resume_ids[r.cached : r.cached + n])
            last = r.cached + n == len(r.resume_ids)
            if last:
                finishing.append(r)
            # A resumed request already knows its next input (its last generated token): no logits.
            logits = last and not r.req.embed and not r.generated
            plan.append((r, RowStep(r.kv_row, r.cached, chunk, r.slot, logits, r.req.embed, prompt=True)))
        return plan

    def _prefill_queue(self) -> list[_Request]:
        """The prefilling rows in the order they get the step's prompt budget.

        ``arrival``: in the order they took their rows. ``shortest`` (the default): fewest prompt tokens
        left first (a prefix-cache hit not yet looked up still counts), aged so none starves: each step
        since a row was admitted moves it ahead by half a step's budget. Among prompts admitted
        together the short ones finish first, and so give their first tokens sooner; a long prompt
        admitted with them waits at most about twice its own length in budget before it goes first.
        """
        rows = [r for r in self._running if r.prefilling]
        if self.config.prefill_order == "arrival":
            return rows
        age_tokens = max(self.config.max_step_tokens // 2, 1)
        return sorted(rows, key=lambda r: len(r.resume_ids) - r.cached - (self.steps - r.start_step) * age_tokens)

    def _step(self) -> None:
        plan = self._plan()
        try:
            # the logits in the runner's buffer: sampled below, before the next step overwrites them
            out = self.runner.step([row for _, row in plan], reuse_logits=True)
        except Exception as exc:  # a bug or device error: fail this step's requests, keep serving
            log.exception("forward failed for %d rows", len(plan))
            for r, _ in plan:
                self._fail(r, exc)
            return
        self.steps += 1
        self.observer.observe_step(len(plan), sum(len(row.token_ids) for _, row in plan))
        logit_rows: list[_Request] = []
        pooled_done: list[_Request] = []
        pooled_i = 0
        for r, row in plan:
            r.cached += len(row.token_ids)
            if row.start < len(r.resume_ids) and not r.prefilling and not r.req.embed:
                self._remember_prefix(r)
            if row.want_pooled:
                part = out.pooled[pooled_i]
                pooled_i += 1
                r.pooled = part if r.pooled is None else r.pooled + part
                if not r.prefilling:
                    pooled_done.append(r)
            if row.want_logits:
                logit_rows.append(r)
        self._finish_pooled(pooled_done)
        if not logit_rows:
            return
        tokens = sample_rows(
            out.logits,
            [
                RowSampling(
                    temperature=r.req.params.temperature,
                    top_p=r.req.params.top_p,
                    top_k=r.req.params.top_k,
                    repetition_penalty=r.req.params.repetition_penalty,
                    seen=r.seen,
                    generator=r.generator,
                )
                for r in logit_rows
            ],
            argmax=self.runner.greedy_tokens,
        )
        now = time.monotonic()
        for r, tok in zip(logit_rows, tokens, strict=True):
            if isinstance(tok, Exception):  # this row's logits could not be sampled: it alone fails
                log.error("request %s: %s", r.req.request_id, tok, extra=_about(r))
                if r.lora is not None and isinstance(tok, NonFiniteLogits):  # its adapter's overflow: not a bug
                    tok = AdapterIncompatible(
                        f"adapter {r.lora} drove the model's output to NaN or infinity ({tok}): its weights are "
                        f"too large for this base in {self.runner.dtype}"
                    )
                self._fail(r, tok)
                continue
            try:
                self._on_token(r, tok, now)
            except Exception as exc:  # a bug in one request's token handling: fail it, keep serving
                log.exception("request %s: handling token %d failed", r.req.request_id, tok, extra=_about(r))
                if r in self._running:
                    self._fail(r, exc)
                else:  # released by _finish, which raised before its final event: send one
                    self._deliver(r, TokenEvent(error=exc))

    def _on_token(self, r: _Request, tok: int, now: float) -> None:
        assert r.detok is not None and r.stops is not None
        if r.first_token is None:
            r.first_token = now
            self.observer.observe_first_token(now - r.submitted)  # now: an alert sees a stall as it happens
        r.generated.append(tok)
        self.observer.observe_generated(1)
        if r.seen is not None:
            r.seen = torch.cat([r.seen, torch.tensor([tok], dtype=torch.long)])
        if tok in r.stop_ids:  # a stop string naming a special token: its text is not sent, as any stop
            # (before the end of sequence: stop=["<|im_end|>"] asked to stop there, and ended "stop")
            self._emit(r, self._held_text(r)[0], (tok,))
            self._finish(r, FinishReason.STOP)
            return
        if tok in self.eos_token_ids:  # the text held back (an incomplete character) is sent as decoded
            held, stopped = self._held_text(r)
            self._emit(r, held, ())
            self._finish(r, FinishReason.STOP if stopped else FinishReason.END_OF_SEQUENCE)
            return
        text, stopped = r.stops.feed(r.detok.push(tok))
        if stopped:
            self._emit(r, text, (tok,))
            self._finish(r, FinishReason.STOP)
            return
        done = len(r.generated) >= r.req.params.max_new_tokens or r.cached >= self.config.max_seq_len
        if done:
            held, stopped = self._held_text(r)
            self._emit(r, text + held, (tok,))
            self._finish(r, FinishReason.STOP if stopped else FinishReason.LENGTH)
            return
        self._emit(r, text, (tok,))

    @staticmethod
    def _held_text(r: _Request) -> tuple[str, bool]:
        """At a request's end: the text its detokenizer and stop matcher still hold, up to a stop string
        in it, and whether there was one (after a hit the matcher holds nothing more)."""
        assert r.detok is not None and r.stops is not None
        tail, stopped = r.stops.feed(r.detok.flush())
        return tail + ("" if stopped else r.stops.flush()), stopped

    def _emit(self, r: _Request, text: str, token_ids: tuple[int, ...]) -> None:
        if not text and not token_ids:
            return
        # Text, not held-back token ids: gRPC's stream sends a message (and its headers) only for text, so
        # a stream cut with its text all held back ends trailers-only, is retried, and is billed there.
        r.emitted = r.emitted or bool(text)
        self._deliver(r, TokenEvent(text=text, token_ids=token_ids))

    def _deliver(self, r: _Request, event: TokenEvent) -> None:
        try:
            r.sink(event)
        except Exception:  # a consumer that cannot take events is treated as gone
            log.exception("request %s: event sink failed; cancelling", r.req.request_id, extra=_about(r))
            r.cancelled = True

    def _summary(self, r: _Request, reason: FinishReason) -> Summary:
        now = time.monotonic()
        return Summary(
            finish_reason=reason,
            prompt_tokens=len(r.prompt_ids),
            generated_tokens=len(r.generated),
            adapter=str(r.key) if r.key is not None else "",
            request_id=r.req.request_id,
            queue_seconds=(r.admitted or now) - r.submitted,
            ttft_seconds=None if r.first_token is None else r.first_token - r.submitted,
            total_seconds=now - r.submitted,
        )

    def _finish_pooled(self, rows: list[_Request]) -> None:
        """Answer the embed and classify rows whose prompt this step finished; the heads of the classify
        rows run here, on the engine thread, one matmul per distinct head."""
        inputs: list[tuple[ClassifierHead, torch.Tensor, int]] = []
        classify: list[_Request] = []
        for r in rows:
            if r.head is not None and r.pooled is not None and r.req.classify is not None:
                classify.append(r)
                inputs.append((r.head, r.pooled / len(r.prompt_ids), r.req.classify.top_k))  # mean [hidden]
        try:
            scored = classify_rows(inputs)
        except Exception as exc:  # a bug in a head: fail its rows, keep serving
            log.exception("classifier heads failed for %d rows", len(classify))
            for r in classify:
                self._fail(r, exc)
            rows = [r for r in rows if r.head is None]
            classify, scored = [], []
        labels = {id(r): s for r, s in zip(classify, scored, strict=True)}
        for r in rows:
            self._finish_embed(r, labels.get(id(r)))

    def _finish_embed(self, r: _Request, labels: tuple[LabelScore, ...] | None = None) -> None:
        assert r.pooled is not None
        summary = self._summary(r, FinishReason.LENGTH)
        self._release(r)
        self.observer.observe_finished(summary, pooled=True)
        self.usage.record(r.tenant, summary)
        if labels is not None:
            self._deliver(r, TokenEvent(summary=summary, labels=labels))
            return
        mean = (r.pooled / len(r.prompt_ids)).tolist()
        self._deliver(r, TokenEvent(summary=summary, embedding=tuple(mean)))

    def _finish(self, r: _Request, reason: FinishReason, *, metered: bool = True) -> None:
        """``metered``: False for a request the server cut (a forced stop): its caller gets UNAVAILABLE
        and retries, where it is metered once it completes."""
        summary = self._summary(r, reason)
        self._release(r)
        self.observer.observe_finished(summary, admitted=r.admitted > 0)
        if metered and r.admitted:  # one cancelled before it took a row computed nothing: not metered
            self.usage.record(r.tenant, summary)
        self._deliver(r, TokenEvent(summary=summary))

    def _fail(self, r: _Request, exc: Exception) -> None:
        if not r.admitted:  # failed from the queue (a drain's refusal, an adapter that would not load)
            self.observer.observe_left_queue(time.monotonic() - r.submitted)
        self._release(r)
        self._deliver(r, TokenEvent(error=exc))

    def _release(self, r: _Request) -> None:
        self._record_prefix(r)  # one that ended mid-prefill
        if r in self._running:
            self._running.remove(r)
            self._free_rows.append(r.kv_row)
            self._free_rows.sort()
            with self._lock:
                self.places.release_row(r.tenant)
        else:
            self._waiting.remove(r)
            with self._lock:
                self.places.drop_queued(r.tenant, resuming=bool(r.preemptions))
        if r.slot:  # a running request's lease, or a preempted one's that it kept
            self.adapters.release(r.slot)
            r.slot = 0
