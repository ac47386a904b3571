"""The engine-thread to asyncio bridge (engine/stream.py): events reach their queues in order, in
batches of one loop wake-up."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from lorafleet_server.engine.stream import Outcome, Outcomes, _LoopMailbox, result_of
from lorafleet_server.engine.types import FinishReason, Summary, TokenEvent


def count_wake_ups(loop: asyncio.AbstractEventLoop) -> list[int]:
    """Counts ``loop.call_soon_threadsafe`` calls (each writes to the loop's self-pipe, waking it) in
    the returned list's one item."""
    wake_ups = [0]
    schedule = loop.call_soon_threadsafe

    def counted(*args: object) -> object:
        wake_ups[0] += 1
        return schedule(*args)  # type: ignore[arg-type]

    loop.call_soon_threadsafe = counted  # type: ignore[method-assign,assignment]
    return wake_ups


def test_events_from_another_thread_arrive_in_order_with_few_wake_ups() -> None:
    async def main() -> tuple[list[list[str]], int]:
        loop = asyncio.get_running_loop()
        wake_ups = count_wake_ups(loop)
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
        return got, wake_ups[0]

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


def test_a_loop_that_closed_during_a_step_refuses_the_next_event() -> None:
    """Events deferred to the end of a step reach a loop that has closed meanwhile: the flush finds it
    closed, and the next event raises, so the engine treats the consumer as gone (a mutation that left
    the mailbox open deferred every later event silently: the row ran to max_new_tokens)."""
    loop = asyncio.new_event_loop()
    loop.close()
    mailbox = _LoopMailbox(loop)
    queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
    flushes: list[Callable[[], None]] = []

    def in_step(flush: Callable[[], None]) -> bool:
        flushes.append(flush)
        return True

    mailbox.put(queue, TokenEvent(text="a"), in_step)  # deferred: nothing scheduled yet
    assert len(flushes) == 1
    flushes[0]()  # the step's end: the loop refuses the drain
    with pytest.raises(RuntimeError):
        mailbox.put(queue, TokenEvent(text="b"), in_step)
    assert len(flushes) == 1


def _summary(prompt_tokens: int) -> Summary:
    return Summary(FinishReason.CANCELLED, prompt_tokens, 0, "acme/bot@1", "r")


def test_outcomes_end_when_every_queued_part_has_ended_with_their_prompt_tokens_summed() -> None:
    """An embeddings call's inputs: its log line waits for all of them, however they end."""
    first, second, never = Outcome(), Outcome(), Outcome()
    first.queued()
    second.queued()
    joined = Outcomes([first, second, never])  # ``never`` did not reach the engine (waiting its turn)
    seen: list[Summary | None] = []
    assert joined.then(seen.append) == (False, None)
    second.ended(_summary(5))
    assert seen == []
    first.ended(_summary(3))
    assert seen == [_summary(8)]
    first.ended(_summary(99))  # a part ends once
    assert seen == [_summary(8)]
    assert Outcomes([first, second, never]).then(seen.append) == (True, _summary(8))
    assert Outcomes([Outcome()]).then(seen.append) == (True, None) and len(seen) == 1


def test_outcomes_asked_with_one_part_still_running_wait_for_it() -> None:
    """A mutation that answered once all but one part had ended survived: the call's log line and
    usage left out its last input."""
    parts = [Outcome() for _ in range(3)]
    for part in parts:
        part.queued()
    parts[0].ended(_summary(1))
    parts[1].ended(_summary(2))
    joined = Outcomes(parts)
    seen: list[Summary | None] = []
    assert joined.then(seen.append) == (False, None)
    parts[2].ended(_summary(4))
    assert seen == [_summary(7)]


def test_outcomes_a_part_ending_while_they_are_asked_is_not_lost() -> None:
    for _ in range(200):
        parts = [Outcome() for _ in range(4)]
        for part in parts:
            part.queued()
        joined = Outcomes(parts)
        seen: list[Summary | None] = []
        enders = [threading.Thread(target=part.ended, args=(_summary(1),)) for part in parts]
        for ender in enders:
            ender.start()
        ended, summary = joined.then(seen.append)
        for ender in enders:
            ender.join()
        assert (ended and summary == _summary(4) and seen == []) or (not ended and seen == [_summary(4)])


def test_a_cancelled_callers_work_that_fails_later_is_not_logged_as_never_retrieved() -> None:
    """Found by an outside review: a caller cancelled while a worker ran its submit left the failure
    (a drain's ShuttingDown, a store's StoreUnavailable) to asyncio, which logged it at ERROR with a
    traceback as "Future exception was never retrieved"."""
    import gc
    from concurrent.futures import Future

    async def main() -> list[dict[str, object]]:
        loop = asyncio.get_running_loop()
        reported: list[dict[str, object]] = []
        loop.set_exception_handler(lambda _loop, context: reported.append(context))
        work: Future[int] = Future()
        work.set_running_or_notify_cancel()  # a worker has taken it: it cannot be cancelled
        waiting = asyncio.ensure_future(result_of(work))
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        threading.Thread(target=work.set_exception, args=(RuntimeError("refused after the caller left"),)).start()
        for _ in range(20):
            await asyncio.sleep(0.01)
        del waiting
        gc.collect()
        await asyncio.sleep(0)
        return reported

    assert asyncio.run(main()) == []


def test_the_events_of_one_engine_step_wake_the_loop_once() -> None:
    """Found by an outside profile: the first event of a step scheduled a drain, the loop woke at once
    (the self-pipe write lets it take the GIL) and drained it, and the next event scheduled another:
    ~1,100-1,600 wake-ups for 2,080 events. Inside a step (``Engine.after_step``) the drain waits for
    the step's end: one wake-up per step, each queue's events still in order."""

    async def main() -> tuple[list[list[str]], int]:
        loop = asyncio.get_running_loop()
        wake_ups = count_wake_ups(loop)
        mailbox = _LoopMailbox(loop)
        queues: list[asyncio.Queue[TokenEvent]] = [asyncio.Queue() for _ in range(32)]
        step_end: list[Callable[[], None]] = []

        def after_step(fn: Callable[[], None]) -> bool:  # as Engine.after_step inside a step
            step_end.append(fn)
            return True

        def engine() -> None:  # 32 rows x 10 steps
            for step in range(10):
                for i, q in enumerate(queues):
                    mailbox.put(q, TokenEvent(text=f"{i}:{step}"), after_step)
                    time.sleep(0)  # let the loop thread run, as the engine's Python between rows does
                deferred, step_end[:] = list(step_end), []
                assert len(deferred) == 1  # one flush per mailbox and step
                for fn in deferred:
                    fn()

        thread = threading.Thread(target=engine)
        thread.start()
        got: list[list[str]] = [[] for _ in queues]
        for _ in range(10 * len(queues)):
            for i, q in enumerate(queues):
                while not q.empty():
                    got[i].append(q.get_nowait().text)
            if sum(map(len, got)) == 10 * len(queues):
                break
            await asyncio.sleep(0.01)
        thread.join()
        return got, wake_ups[0]

    got, wake_ups = asyncio.run(main())
    assert got == [[f"{i}:{step}" for step in range(10)] for i in range(32)]
    assert wake_ups == 10


def test_the_engine_defers_a_sinks_hand_off_only_inside_its_steps(tiny_model_dir: Path, tmp_path: Path) -> None:
    """``Engine.after_step``: False off the engine thread or between steps; inside a step the hand-off
    runs once the step has delivered every row's events."""
    from enginelib import request, tiny_service

    service = tiny_service(tiny_model_dir, tmp_path / "store")
    engine = service.engine
    assert not engine.after_step(lambda: None)  # not the engine thread
    seen: list[str] = []
    done = threading.Event()

    def sink(event: TokenEvent) -> None:
        seen.append("event")
        if engine.after_step(lambda: seen.append("step end")):
            seen.append("deferred")
        if event.final:
            done.set()

    try:
        engine.submit(request("The capital of France is", max_new_tokens=3), sink)
        assert done.wait(60)
    finally:
        engine.shutdown(10)
    # each step's token event defers its hand-off to the step's end; the final event is one of a step
    # (the third token's) or comes after it (a finish between steps: delivered at once)
    assert seen[:3] == ["event", "deferred", "step end"], seen
    assert seen.count("step end") == seen.count("deferred") >= 2, seen


def test_another_thread_is_never_deferred_even_during_a_step(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``Engine.after_step`` off the engine thread while a step runs: False (a mutation that checked only
    "in a step" survived: such a hand-off joined the step's list as the engine swapped it, and a lost
    flush left that loop's mailbox deferred for good: every stream on it hung)."""
    from enginelib import request, tiny_service

    service = tiny_service(tiny_model_dir, tmp_path / "store")
    engine = service.engine
    inside, leave = threading.Event(), threading.Event()
    step = engine.runner.step

    def held_step(*args: object, **kwargs: object) -> object:
        inside.set()
        assert leave.wait(30)
        return step(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(engine.runner, "step", held_step)
    done = threading.Event()

    def sink(event: TokenEvent) -> None:
        if event.final:
            done.set()

    try:
        engine.submit(request("Hello", max_new_tokens=1), sink)
        assert inside.wait(60)
        assert engine._stepping  # the engine thread is inside its step
        assert not engine.after_step(lambda: None)
        leave.set()
        assert done.wait(60)
    finally:
        leave.set()
        engine.shutdown(10)


def test_a_request_queued_as_its_caller_leaves_still_reports_how_it_ended(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The diff review: ``Outcome.queued`` ran once the caller resumed after the worker's submit; a
    caller that left in between (the engine had the request) left it "never queued", so its request
    log line, and an embeddings call's, had no summary. The worker notes it as it queues it."""
    from enginelib import engine_held, request, tiny_service

    from lorafleet_server.engine.stream import EngineStream

    service = tiny_service(tiny_model_dir, tmp_path / "store")  # its engine started
    engine = service.engine
    queued, leave = threading.Event(), threading.Event()
    submit = engine.submit

    def held_submit(*args: object, **kwargs: object) -> object:
        handle = submit(*args, **kwargs)  # type: ignore[arg-type]
        queued.set()
        assert leave.wait(30)
        return handle

    monkeypatch.setattr(engine, "submit", held_submit)
    outcome = Outcome()
    ended: list[Summary | None] = []

    async def main() -> tuple[bool, Summary | None]:
        stream = EngineStream(engine)
        hold = engine_held(engine)  # no step, no final event until the question is asked
        await asyncio.to_thread(hold.__enter__)
        try:
            task = asyncio.ensure_future(stream.submit(request("The capital of France is", max_new_tokens=64), outcome))
            await asyncio.to_thread(queued.wait, 30)
            task.cancel()  # the caller leaves after the engine has its request, before it hears so
            await asyncio.sleep(0)
            leave.set()
            with pytest.raises(asyncio.CancelledError):
                await task
            give_up = time.monotonic() + 5  # the worker's submit returns after the caller left
            while not outcome._queued and time.monotonic() < give_up:
                await asyncio.sleep(0.01)
            asked = outcome.then(ended.append)  # its call's log line asks now: the request has not ended
        finally:
            hold.__exit__(None, None, None)
        # the loop stays open until the request ends: a closed one refuses its next event, which would
        # cancel it too (and hide whether the worker's submit was cancelled)
        deadline = time.monotonic() + 30
        while not ended:
            assert time.monotonic() < deadline, "the request never ended"
            await asyncio.sleep(0.01)
        return asked

    try:
        asked = asyncio.run(main())
    finally:
        engine.shutdown(10)
    assert asked == (False, None)
    assert ended[0] is not None and ended[0].prompt_tokens > 0, ended
    # cancelled where the worker queued it (a mutation that left it running survived: it generated to
    # max_new_tokens for nobody)
    assert ended[0].finish_reason == FinishReason.CANCELLED, ended
    assert ended[0].generated_tokens < 64


def test_a_consumer_that_stops_reading_cancels_its_request(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``SubmittedRequest.events`` closed after one event (a client that broke off) cancels the request
    in the engine (a mutation that did not survived the suite: the row generated to max_new_tokens for
    nobody). The engine's second step waits until the consumer has left, so the row cannot finish first
    however loaded the machine is."""
    from enginelib import request, tiny_service

    from lorafleet_server.engine.stream import EngineStream

    service = tiny_service(tiny_model_dir, tmp_path / "store")
    engine = service.engine
    outcome = Outcome()
    ended: list[Summary | None] = []
    left = threading.Event()
    steps = [0]
    step = engine.runner.step

    def gated_step(*args: object, **kwargs: object) -> object:
        steps[0] += 1
        if steps[0] > 1:  # the first step (the prompt's) gave the first token
            assert left.wait(30)
        return step(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(engine.runner, "step", gated_step)

    async def main() -> Summary | None:
        submitted = await EngineStream(engine).submit(request("Once upon a time", max_new_tokens=64), outcome)
        events = submitted.events()
        first = await asyncio.wait_for(anext(events), 60)
        try:
            assert not first.final
            await events.aclose()  # type: ignore[attr-defined]  # an async generator
        finally:
            left.set()
        # the loop stays open meanwhile: a closed one refuses the next event, which cancels the row too
        asked, summary = outcome.then(ended.append)
        deadline = time.monotonic() + 30
        while not asked and not ended:
            assert time.monotonic() < deadline, "the request never ended"
            await asyncio.sleep(0.01)
        if not asked:
            summary = ended[0]
        return summary

    try:
        summary = asyncio.run(main())
    finally:
        left.set()
        engine.shutdown(10)
    assert summary is not None and summary.finish_reason == FinishReason.CANCELLED, summary
    assert summary.generated_tokens < 64


def test_a_worker_that_cannot_start_is_not_reported_as_a_shutdown(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by an architecture review: any RuntimeError of a pool's submit read as "shutting down"
    (UNAVAILABLE, which clients retry), also a thread that could not start. Only a shut-down pool's
    ``ShuttingDown`` is the drain's; the thread's error stays what it is (a bug's INTERNAL)."""
    from enginelib import request, tiny_service

    from lorafleet_server.engine.stream import EngineStream
    from lorafleet_server.errors import ShuttingDown

    service = tiny_service(tiny_model_dir, tmp_path / "store")
    engine = service.engine
    try:
        pool = engine.submit_pool(request("Hello", max_new_tokens=2))

        def cannot_start(*_args: object) -> object:
            raise RuntimeError("can't start new thread")

        monkeypatch.setattr(pool, "submit", cannot_start)
        stream = EngineStream(engine)
        with pytest.raises(RuntimeError, match="can't start") as raised:
            asyncio.run(stream.submit(request("Hello", max_new_tokens=2)))
        assert not isinstance(raised.value, ShuttingDown)
        # its place goes back: one kept per failure left the tenant over max_waiting, refused for good
        assert engine.places.submitting == 0 and engine.places.tenant_submitting == {}
        monkeypatch.undo()
    finally:
        engine.shutdown(10)
    with pytest.raises(ShuttingDown):
        asyncio.run(EngineStream(engine).submit(request("Hello", max_new_tokens=2)))


def test_a_caller_that_leaves_before_a_worker_takes_its_run_drops_it() -> None:
    """``EngineStream.run`` (the Tokenize RPC's encoding) and ``resolve`` (a store read): a caller that
    leaves while its work waits for a worker drops it, as ``submit`` does (a mutation that left it
    queued survived: the work ran for nobody, holding a worker, after its caller had gone)."""
    from types import SimpleNamespace

    from lorafleet_server.engine.fair_pool import FairPool
    from lorafleet_server.engine.stream import EngineStream

    pool = FairPool(1, "test-run")
    busy, release = threading.Event(), threading.Event()
    pool.submit("other", lambda: (busy.set(), release.wait(30)))  # the one worker is taken
    assert busy.wait(30)
    ran: list[str] = []
    stream = EngineStream(SimpleNamespace(tokenize_pool=lambda: pool))  # type: ignore[arg-type]

    async def main() -> None:
        task = asyncio.ensure_future(stream.run("acme", ran.append, "left"))
        await asyncio.sleep(0.05)
        task.cancel()  # the caller leaves while its work is queued
        with pytest.raises(asyncio.CancelledError):
            await task

    try:
        asyncio.run(main())
    finally:
        release.set()
    pool.submit("acme", ran.append, "after").result(30)  # acme's items run in order: the first is gone
    pool.shutdown()
    assert ran == ["after"]
