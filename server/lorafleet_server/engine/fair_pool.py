"""Worker threads that take tenants' work in turn.

``Engine.submit`` (tokenizing, perhaps reading the adapter store) and the Tokenize RPC run on worker
threads. On one first-come queue, a tenant that sent many expensive requests and abandoned them
(a prompt that takes 0.3 s to tokenize, a hundred times over) held every other tenant's request behind
them: an outside review measured 154 s for another tenant's 4-token request, with the engine idle.

Here the items wait in a ``FairQueue`` (the engine's per-tenant queues, served in turn: every
tenant's item counts alike), and a free worker takes the oldest item of the tenant whose turn it is:
another tenant's item waits for at most one item of each tenant ahead of it, whatever their queues hold.
An item cancelled before it starts (its caller left) is dropped from its queue at once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from lorafleet_server.engine.fairness import FairQueue
from lorafleet_server.errors import ShuttingDown

T = TypeVar("T")


@dataclass(eq=False)
class _Item:
    tenant: str
    future: Future[Any]
    fn: Callable[[], Any]
    weight: float = 1.0  # every tenant's turn takes one item


class FairPool:
    """Up to ``workers`` threads (started as work arrives), serving tenants round-robin."""

    def __init__(self, workers: int, name: str) -> None:
        if workers < 1:
            raise ValueError(f"a pool needs at least one worker, got {workers}")
        self._workers = workers
        self._name = name
        self._cond = threading.Condition()
        self._queue: FairQueue[_Item] = FairQueue()  # the condition's lock guards it and what follows
        self._threads: list[threading.Thread] = []
        self._idle = 0  # threads waiting for work and not yet woken for an item
        self._closed = False

    def submit(self, tenant: str, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Run ``fn(*args)`` on a worker in ``tenant``'s turn; ``ShuttingDown`` once the pool is shut down
        (a worker thread that cannot start raises its RuntimeError: a bug's, not a drain's status)."""
        future: Future[T] = Future()
        item = _Item(tenant, future, lambda: fn(*args))
        with self._cond:
            if self._closed:
                raise ShuttingDown(f"the server is shutting down (pool {self._name} is shut down)")
            if not self._idle and len(self._threads) < self._workers:
                # Started before the item is queued: a thread that cannot start (RuntimeError) leaves
                # neither an item nobody runs nor a dead thread counted among the workers.
                thread = threading.Thread(target=self._work, name=f"{self._name}-{len(self._threads)}", daemon=True)
                thread.start()  # it waits for the lock held here before it looks for work
                self._threads.append(thread)
            elif self._idle:
                self._idle -= 1  # that thread is taken for this item
                self._cond.notify()
            self._queue.push(item)
        future.add_done_callback(lambda f: self._drop(item) if f.cancelled() else None)
        return future

    def shutdown(self) -> None:
        """Take no more work; the workers finish what is queued, then exit (nobody waits for them)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _drop(self, item: _Item) -> None:
        """Forget a cancelled item that has not started (it would be skipped, but holds its request)."""
        with self._cond:
            self._queue.remove(item)

    def _next(self) -> _Item | None:
        """The oldest item of the tenant whose turn it is, waiting for one; None once shut down with
        nothing queued."""
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._idle += 1  # whoever queues an item takes it back as it wakes this thread
                self._cond.wait()
            item = self._queue.waiting(self._queue.tenants()[0])[0]
            self._queue.started(item)  # its tenant's next item waits for every other tenant's turn
            return item

    def _work(self) -> None:
        while (item := self._next()) is not None:
            self._run(item)
            # An idle worker held its last item (its future's result: the engine request, the caller's
            # call record) until its next one (an outside review's soak): it holds none.
            del item

    @staticmethod
    def _run(item: _Item) -> None:
        if not item.future.set_running_or_notify_cancel():
            return  # cancelled between being taken and started
        try:
            result = item.fn()
        except BaseException as exc:  # delivered to the caller, who raises it
            item.future.set_exception(exc)
        else:
            item.future.set_result(result)
