"""FairPool (engine/fair_pool.py): tenants' work in turn, cancelled work dropped before it runs."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import pytest

from lorafleet_server.engine.fair_pool import FairPool, _Item
from lorafleet_server.errors import ShuttingDown


def occupy(pool: FairPool, tenant: str, gate: threading.Event) -> Future[bool]:
    """Submit work that holds a worker until ``gate`` opens, and return once a worker runs it (a fixed
    sleep here let the test go on before the worker had taken it, on busy cores: a review saw it)."""
    started = threading.Event()

    def hold() -> bool:
        started.set()
        return gate.wait(30)

    future = pool.submit(tenant, hold)
    assert started.wait(30), "no worker took the work"
    return future


def wait_until(condition: Callable[[], bool], seconds: float = 30.0) -> None:
    give_up = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < give_up, "timed out"
        time.sleep(0.01)


def test_a_tenant_behind_a_long_queue_waits_for_one_item_not_all() -> None:
    pool = FairPool(1, "t")
    gate = threading.Event()
    order: list[str] = []
    try:
        first = occupy(pool, "a", gate)  # the one worker is busy until the gate opens
        flood = [pool.submit("a", order.append, f"a{i}") for i in range(20)]
        other = pool.submit("b", order.append, "b")
        gate.set()
        other.result(10)
        first.result(10)
        for f in flood:
            f.result(10)
        assert order.index("b") == 1  # after the one of a's that was next in turn, not after all 20
        assert [x for x in order if x != "b"] == [f"a{i}" for i in range(20)]  # each tenant's in order
    finally:
        gate.set()
        pool.shutdown()


def test_a_cancelled_item_never_runs_and_leaves_the_queue() -> None:
    pool = FairPool(1, "t")
    gate = threading.Event()
    ran: list[int] = []
    try:
        busy = occupy(pool, "a", gate)
        abandoned = [pool.submit("a", ran.append, i) for i in range(5)]
        assert all(f.cancel() for f in abandoned)
        assert not pool._queue  # dropped at once: nothing of theirs is held until their turn
        kept = pool.submit("a", ran.append, 99)
        gate.set()
        busy.result(10)
        kept.result(10)
        assert ran == [99]
    finally:
        gate.set()
        pool.shutdown()


def test_errors_reach_the_caller_and_workers_start_as_needed() -> None:
    pool = FairPool(3, "t")
    try:

        def boom() -> None:
            raise ValueError("bad input")

        with pytest.raises(ValueError, match="bad input"):
            pool.submit("a", boom).result(10)
        assert len(pool._threads) == 1  # one item: one thread, reused
        wait_until(lambda: pool._idle == 1)  # back waiting: the next item wakes it, starts no other
        assert pool.submit("b", lambda: "again").result(10) == "again"
        assert len(pool._threads) == 1
        gate = threading.Event()
        waiting = [pool.submit(t, gate.wait, 30) for t in ("a", "b", "c", "d")]
        wait_until(lambda: sum(f.running() for f in waiting) == 3)
        time.sleep(0.05)  # a fourth worker, if one were started wrongly, would be running by now
        assert len(pool._threads) == 3  # at most its workers
        assert sum(f.running() for f in waiting) == 3
        gate.set()
        assert all(f.result(10) for f in waiting)
    finally:
        pool.shutdown()


def test_shutdown_finishes_queued_work_and_refuses_more() -> None:
    pool = FairPool(1, "t")
    gate = threading.Event()
    busy = occupy(pool, "a", gate)
    queued = pool.submit("b", lambda: "done")
    pool.shutdown()
    with pytest.raises(ShuttingDown, match="shut down"):  # the drain's status (UNAVAILABLE), not a bug's
        pool.submit("a", lambda: None)
    gate.set()
    assert busy.result(10) and queued.result(10) == "done"


def test_a_thread_that_cannot_start_leaves_no_item_and_no_dead_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by a review: the item was queued and the thread counted before ``start``; a failed start
    left an item nobody ran (its caller had been told it failed) and a dead thread among the workers."""
    pool = FairPool(1, "t")
    start = threading.Thread.start

    def cannot_start(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", cannot_start)
    with pytest.raises(RuntimeError, match="can't start"):
        pool.submit("a", lambda: "lost")
    assert not pool._queue and not pool._threads
    monkeypatch.setattr(threading.Thread, "start", start)
    try:
        assert pool.submit("b", lambda: "ran").result(10) == "ran"
    finally:
        pool.shutdown()


def test_an_idle_worker_holds_nothing_of_its_last_item() -> None:
    """Found by a soak: an idle worker kept its last item (its future, and the future's result: an
    engine request and its caller's call record) until its next item came."""
    import gc
    import weakref

    class Result:
        pass

    pool = FairPool(1, "t")
    made: list[weakref.ref[Result]] = []

    def work() -> Result:
        result = Result()
        made.append(weakref.ref(result))
        return result

    future = pool.submit("a", work)
    future.result(10)
    del future

    def released() -> bool:  # once the worker is back waiting for its next item
        gc.collect()
        return made[0]() is None

    wait_until(released, 10)
    pool.shutdown()


def test_shutdown_lets_idle_workers_exit() -> None:
    """Workers finish what is queued, then exit: an idle one too, woken by the shutdown."""
    pool = FairPool(2, "t")
    gate = threading.Event()
    held = [pool.submit(t, gate.wait, 30) for t in ("a", "b")]
    wait_until(lambda: sum(f.running() for f in held) == 2)
    gate.set()
    assert all(f.result(10) for f in held)
    wait_until(lambda: pool._idle == 2, 10)
    pool.shutdown()
    wait_until(lambda: not any(t.is_alive() for t in pool._threads), 10)


def test_an_item_cancelled_after_it_was_taken_never_runs() -> None:
    """Its caller left between a worker taking the item and running it: it is skipped (a cancelled
    future cannot take a result; the worker would die on it, a worker fewer for good)."""
    ran: list[str] = []
    item = _Item("a", Future(), lambda: ran.append("ran"))
    assert item.future.cancel()
    FairPool._run(item)
    assert ran == [] and item.future.cancelled()


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit, GeneratorExit])
def test_a_base_exception_reaches_the_caller_and_keeps_the_worker(exc: type[BaseException]) -> None:
    """Not only Exceptions: anything the work raises is the caller's, or the caller waited for ever and
    the worker thread was gone."""
    pool = FairPool(1, "t")
    try:

        def boom() -> None:
            raise exc("stop")

        with pytest.raises(exc):
            pool.submit("a", boom).result(10)
        assert pool.submit("a", lambda: "still here").result(10) == "still here"
        assert len(pool._threads) == 1
    finally:
        pool.shutdown()
