"""Worker threads that take tenants' work in turn.

``Engine.submit`` (tokenizing, perhaps reading the adapter store) and the Tokenize RPC run on worker
threads. On one first-come queue, a tenant that sent many expensive requests and abandoned them
(a prompt that takes 0.3 s to tokenize, a hundred times over) held every other tenant's request behind
them: an outside review measured 154 s for another tenant's 4-token request, with the engine idle.

Here each tenant has its own queue, and a free worker takes the next item of the next tenant in turn:
another tenant's item waits for at most one item of each tenant ahead of it, whatever their queues hold.
An item cancelled before it starts (its caller left) is dropped from its queue at once.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(eq=False)
class _Item:
    future: Future[Any]
    fn: Callable[[], Any]


@dataclass
class _State:
    queues: dict[str, deque[_Item]] = field(default_factory=dict)  # tenant -> its items, oldest first
    turns: deque[str] = field(default_factory=deque)  # tenants with items, in the order they are served
    threads: list[threading.Thread] = field(default_factory=list)
    idle: int = 0  # threads waiting for work and not yet woken for an item
    closed: bool = False


class FairPool:
    """Up to ``workers`` threads (started as work arrives), serving tenants round-robin."""

    def __init__(self, workers: int, name: str) -> None:
        if workers < 1:
            raise ValueError(f"a pool needs at least one worker, got {workers}")
        self._workers = workers
        self._name = name
        self._state = _State()
        self._cond = threading.Condition()

    def submit(self, tenant: str, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Run ``fn(*args)`` on a worker in ``tenant``'s turn; RuntimeError once the pool is shut down."""
        future: Future[T] = Future()
        item = _Item(future, lambda: fn(*args))
        with self._cond:
            state = self._state
            if state.closed:
                raise RuntimeError(f"pool {self._name} is shut down")
            if not state.idle and len(state.threads) < self._workers:
                # Started before the item is queued: a thread that cannot start (RuntimeError) leaves
                # neither an item nobody runs nor a dead thread counted among the workers.
                thread = threading.Thread(target=self._work, name=f"{self._name}-{len(state.threads)}", daemon=True)
                thread.start()  # it waits for the lock held here before it looks for work
                state.threads.append(thread)
            elif state.idle:
                state.idle -= 1  # that thread is taken for this item
                self._cond.notify()
            queue = state.queues.get(tenant)
            if queue is None:
                queue = state.queues[tenant] = deque()
                state.turns.append(tenant)
            queue.append(item)
        future.add_done_callback(lambda f: self._drop(tenant, item) if f.cancelled() else None)
        return future

    def shutdown(self) -> None:
        """Take no more work; the workers finish what is queued, then exit (nobody waits for them)."""
        with self._cond:
            self._state.closed = True
            self._cond.notify_all()

    def _drop(self, tenant: str, item: _Item) -> None:
        """Forget a cancelled item that has not started (it would be skipped, but holds its request)."""
        with self._cond:
            queue = self._state.queues.get(tenant)
            if queue is not None and item in queue:
                queue.remove(item)
                if not queue:
                    del self._state.queues[tenant]
                    self._state.turns.remove(tenant)

    def _next(self) -> _Item | None:
        """The next tenant's oldest item, waiting for one; None once shut down with nothing queued."""
        with self._cond:
            state = self._state
            while not state.turns:
                if state.closed:
                    return None
                state.idle += 1  # whoever queues an item takes it back as it wakes this thread
                self._cond.wait()
            tenant = state.turns.popleft()
            queue = state.queues[tenant]
            item = queue.popleft()
            if queue:
                state.turns.append(tenant)  # its next item waits for every other tenant's turn
            else:
                del state.queues[tenant]
            return item

    def _work(self) -> None:
        while (item := self._next()) is not None:
            if not item.future.set_running_or_notify_cancel():
                continue  # cancelled between being taken and started
            try:
                result = item.fn()
            except BaseException as exc:  # delivered to the caller, who raises it
                item.future.set_exception(exc)
            else:
                item.future.set_result(result)
