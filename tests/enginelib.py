"""Helpers to drive an Engine synchronously in tests."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafleet_adapters.ref import AdapterRef
from lorafleet_server.app import Service, build_service
from lorafleet_server.config import ServerConfig
from lorafleet_server.engine.engine import Engine, RequestHandle
from lorafleet_server.engine.types import ChatTurn, GenerationRequest, SamplingParams, Summary, TokenEvent

# The session's shared cache of native kernels (tests/conftest.py); servers started as processes read it
# from the environment as they read every setting.
KERNEL_CACHE_ENV = "LORAFLEET_KERNEL_CACHE_DIR"

# How long a held engine thread waits for the test to let it go before it gives up (a test bug).
HOLD_SECONDS = 120.0


@dataclass
class Collected:
    """Events of one request, filled from the engine thread.

    ``hold_at=n`` makes the sink stop the engine thread when the request has ``n`` tokens (and is not
    finished) until the test calls :meth:`release`: whatever the test posts meanwhile (a cancel, an
    ``Engine.call``) is handled before the engine's next step, so no timing decides the outcome.
    ``on_event`` runs on the engine thread for every event, after it is recorded.
    """

    events: list[TokenEvent] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    first: threading.Event = field(default_factory=threading.Event)
    hold_at: int = 0
    on_event: Callable[[TokenEvent], None] | None = None
    held: threading.Event = field(default_factory=threading.Event)
    _resume: threading.Event = field(default_factory=threading.Event)

    def __call__(self, event: TokenEvent) -> None:
        self.events.append(event)
        if event.token_ids:
            self.first.set()
        if event.final:
            self.done.set()
        if self.on_event is not None:
            self.on_event(event)
        if self.hold_at and not event.final and not self.held.is_set() and len(self.token_ids) >= self.hold_at:
            self.held.set()
            if not self._resume.wait(HOLD_SECONDS):
                raise AssertionError("the test never released the engine thread it held")

    def wait_held(self, timeout: float = 60.0) -> Collected:
        assert self.held.wait(timeout), f"the request did not reach {self.hold_at} token(s) in time"
        return self

    def release(self) -> None:
        self._resume.set()

    def wait(self, timeout: float = 120.0) -> Collected:
        assert self.done.wait(timeout), "request did not finish in time"
        return self

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events)

    @property
    def token_ids(self) -> list[int]:
        return [t for e in self.events for t in e.token_ids]

    @property
    def summary(self) -> Summary:
        last = self.events[-1]
        if last.error is not None:
            raise last.error
        assert last.summary is not None
        return last.summary


def request(
    prompt: str,
    *,
    adapter: str | None = None,
    max_new_tokens: int = 8,
    rid: str = "r",
    messages: tuple[ChatTurn, ...] = (),
    embed: bool = False,
    **params: object,
) -> GenerationRequest:
    return GenerationRequest(
        request_id=rid,
        prompt=prompt or None,
        messages=messages,
        adapter=AdapterRef.parse(adapter) if adapter else None,
        params=SamplingParams(max_new_tokens=max_new_tokens, **params),  # type: ignore[arg-type]
        embed=embed,
    )


def submit(
    engine: Engine, req: GenerationRequest, *, hold_at: int = 0, on_event: Callable[[TokenEvent], None] | None = None
) -> tuple[Collected, RequestHandle]:
    sink = Collected(hold_at=hold_at, on_event=on_event)
    handle = engine.submit(req, sink)
    return sink, handle


@contextmanager
def engine_held(engine: Engine, timeout: float = 60.0) -> Iterator[None]:
    """Stop the engine thread between two steps for the duration of the block.

    Inside it no step runs and no inbox message is handled: submitted requests, cancels and calls
    queue up and are handled, in order, before the next step once the block ends. Do not wait on the
    engine inside (``Engine.run`` would time out).
    """
    reached = threading.Event()
    leave = threading.Event()

    def hold() -> None:
        reached.set()
        if not leave.wait(HOLD_SECONDS):
            raise AssertionError("engine_held: never released")

    future: Future[None] = engine.call(hold)
    assert reached.wait(timeout), "the engine thread did not reach the hold in time"
    try:
        yield
    finally:
        leave.set()
        future.result(timeout)


def generate(engine: Engine, req: GenerationRequest) -> Collected:
    return submit(engine, req)[0].wait()


def server_config(**values: Any) -> ServerConfig:
    """``ServerConfig(**values)`` with the session's kernel cache: a test's service loads the kernels an
    earlier one built (a build is named by its source, compiler, flags and CPU) instead of compiling
    them again (~3 s a service)."""
    shared = os.environ.get(KERNEL_CACHE_ENV)
    if shared and "kernel_cache_dir" not in values:
        values["kernel_cache_dir"] = Path(shared)
    return ServerConfig(**values)


def tiny_service(model_dir: Path, store: Path, **overrides: object) -> Service:
    values: dict[str, object] = {
        "model": model_dir,
        "data_dir": store.parent,
        "adapter_store": store,
        "max_batch_size": 8,
        "max_seq_len": 256,
        "max_new_tokens": 64,
        "default_max_new_tokens": 16,
        "max_loaded_adapters": 4,
        "max_lora_rank": 32,
        # fp32 (also the CPU's --dtype device default): these services are compared exactly with fp32 transformers/PEFT
        # references; "auto" computes in bf16 on a CPU with avx512_bf16 (tests/model/test_dtype.py).
        "dtype": "float32",
    }
    values.update(overrides)
    service = build_service(server_config(**values))
    service.engine.start()
    return service
