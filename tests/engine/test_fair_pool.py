"""FairPool (engine/fair_pool.py): tenants' work in turn, cancelled work dropped before it runs."""

from __future__ import annotations

import threading
import time

import pytest

from lorafleet_server.engine.fair_pool import FairPool


def test_a_tenant_behind_a_long_queue_waits_for_one_item_not_all() -> None:
    pool = FairPool(1, "t")
    gate = threading.Event()
    order: list[str] = []
    try:
        first = pool.submit("a", gate.wait, 30)  # the one worker is busy until the gate opens
        time.sleep(0.05)
        flood = [pool.submit("a", order.append, f"a{i}") for i in range(20)]
        other = pool.submit("b", order.append, "b")
        gate.set()
        other.result(10)
        for f in [first, *flood]:
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
        busy = pool.submit("a", gate.wait, 30)
        time.sleep(0.05)
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
        gate = threading.Event()
        waiting = [pool.submit(t, gate.wait, 30) for t in ("a", "b", "c", "d")]
        time.sleep(0.2)
        assert len(pool._threads) == 3  # at most its workers
        assert sum(f.running() for f in waiting) == 3
        gate.set()
        assert all(f.result(10) for f in waiting)
    finally:
        pool.shutdown()


def test_shutdown_finishes_queued_work_and_refuses_more() -> None:
    pool = FairPool(1, "t")
    gate = threading.Event()
    busy = pool.submit("a", gate.wait, 30)
    time.sleep(0.05)
    queued = pool.submit("b", lambda: "done")
    pool.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
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
    time.sleep(0.1)  # the worker is back waiting for its next item
    gc.collect()
    assert made[0]() is None
    pool.shutdown()
