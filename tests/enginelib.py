"""Helpers to drive an Engine synchronously in tests."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from lorafleet_adapters.ref import AdapterRef
from lorafleet_server.app import Service, build_service
from lorafleet_server.config import ServerConfig
from lorafleet_server.engine.engine import Engine, RequestHandle
from lorafleet_server.engine.types import ChatTurn, GenerationRequest, SamplingParams, Summary, TokenEvent


@dataclass
class Collected:
    """Events of one request, filled from the engine thread."""

    events: list[TokenEvent] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    first: threading.Event = field(default_factory=threading.Event)

    def __call__(self, event: TokenEvent) -> None:
        self.events.append(event)
        if event.token_ids:
            self.first.set()
        if event.final:
            self.done.set()

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


def submit(engine: Engine, req: GenerationRequest) -> tuple[Collected, RequestHandle]:
    sink = Collected()
    handle = engine.submit(req, sink)
    return sink, handle


def generate(engine: Engine, req: GenerationRequest) -> Collected:
    return submit(engine, req)[0].wait()


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
    }
    values.update(overrides)
    service = build_service(ServerConfig(**values))  # type: ignore[arg-type]
    service.engine.start()
    return service
