"""The engine-thread to asyncio bridge (engine/stream.py): events reach their queues in order, in
batches of one loop wake-up."""

from __future__ import annotations

import asyncio
import threading

import pytest

from lorafleet_server.engine.stream import _LoopMailbox
from lorafleet_server.engine.types import TokenEvent


def test_events_from_another_thread_arrive_in_order_with_few_wake_ups() -> None:
    async def main() -> tuple[list[list[str]], int]:
        loop = asyncio.get_running_loop()
        wake_ups = 0
        schedule = loop.call_soon_threadsafe

        def counted(*args: object) -> object:
            nonlocal wake_ups
            wake_ups += 1
            return schedule(*args)  # type: ignore[arg-type]

        loop.call_soon_threadsafe = counted  # type: ignore[method-assign,assignment]
        mailbox = _LoopMailbox(loop)
        queues: list[asyncio.Queue[TokenEvent]] = [asyncio.Queue() for _ in range(3)]

        def engine() -> None:  # 3 requests x 200 steps, as the engine thread delivers them
            for step in range(200):
                for i, q in enumerate(queues):
                    mailbox.put(q, TokenEvent(text=f"{i}:{step}"))

        thread = threading.Thread(target=engine)
        thread.start()
        got: list[list[str]] = [[] for _ in queues]
        for i, q in enumerate(queues):
            for _ in range(200):
                got[i].append((await asyncio.wait_for(q.get(), 10)).text)
        thread.join()
        return got, wake_ups

    got, wake_ups = asyncio.run(main())
    assert got == [[f"{i}:{step}" for step in range(200)] for i in range(3)]
    assert 1 <= wake_ups < 600  # one per batch, not one per event


def test_a_closed_loop_refuses_and_a_later_event_tries_again() -> None:
    loop = asyncio.new_event_loop()
    loop.close()
    mailbox = _LoopMailbox(loop)
    queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
    for _ in range(2):  # not left "scheduled" by the first refusal
        with pytest.raises(RuntimeError):
            mailbox.put(queue, TokenEvent(text="x"))
