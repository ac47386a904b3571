from __future__ import annotations

import threading

import pytest
import torch

from lorafleet_adapters.host_cache import HostCache
from lorafleet_adapters.lora_config import LoraConfigInfo
from lorafleet_adapters.peft_format import AdapterWeights
from lorafleet_adapters.ref import AdapterKey

CONFIG = LoraConfigInfo(
    r=1,
    lora_alpha=1.0,
    use_rslora=False,
    target_modules=("q_proj",),
    rank_pattern={},
    alpha_pattern={},
    layers_to_transform=None,
    fan_in_fan_out=False,
    base_model_name_or_path=None,
)


def key(n: int) -> AdapterKey:
    return AdapterKey("acme", f"a{n}", 1)


def weights(k: AdapterKey, nbytes: int) -> AdapterWeights:
    module = (torch.zeros(1, 1), torch.zeros(1, 1))
    return AdapterWeights(key=k, rank=1, modules={"m": module}, nbytes=nbytes, config=CONFIG)


def test_lru_bounded_by_bytes() -> None:
    events: list[str] = []
    cache = HostCache(max_bytes=100, on_event=events.append)
    for n in range(3):
        cache.get_or_load(key(n), lambda n=n: weights(key(n), 40))  # type: ignore[misc]
    assert cache.keys() == [key(1), key(2)]
    assert cache.nbytes == 80
    assert events == ["miss", "load", "miss", "load", "miss", "load", "evict"]
    assert key(1) in cache and key(0) not in cache
    assert cache.keys() == [key(1), key(2)]  # membership does not touch recency
    assert cache.get(key(1)) is not None  # key(1) becomes most recent; a lookup that finds it is a hit
    assert events[-1] == "hit"
    assert cache.get(key(0)) is None and events[-1] == "hit"  # a miss is counted by the load that follows
    cache.get_or_load(key(3), lambda: weights(key(3), 40))
    assert cache.keys() == [key(1), key(3)]
    assert events[-3:] == ["miss", "load", "evict"]
    hit = cache.get_or_load(key(1), lambda: pytest.fail("loader must not run on a hit"))
    assert hit.key == key(1) and events[-1] == "hit"


def test_oversized_item_returned_not_kept() -> None:
    cache = HostCache(max_bytes=100)
    cache.get_or_load(key(0), lambda: weights(key(0), 60))
    big = cache.get_or_load(key(1), lambda: weights(key(1), 101))
    assert big.nbytes == 101
    assert cache.keys() == [key(0)] and cache.nbytes == 60


def test_explicit_evict() -> None:
    events: list[str] = []
    cache = HostCache(max_bytes=100, on_event=events.append)
    cache.get_or_load(key(0), lambda: weights(key(0), 10))
    assert cache.evict(key(0)) is True
    assert cache.evict(key(0)) is False
    assert cache.get(key(0)) is None and cache.nbytes == 0
    assert events == ["miss", "load", "evict"]


class EventLog:
    """Collects cache events and lets a test wait until N callers have entered get_or_load."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self._cond = threading.Condition()

    def __call__(self, event: str) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def wait_for(self, count: int) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.events) >= count, timeout=5)


def test_single_flight() -> None:
    calls = 0
    release = threading.Event()
    log = EventLog()
    cache = HostCache(max_bytes=1000, on_event=log)

    def loader() -> AdapterWeights:
        nonlocal calls
        calls += 1
        release.wait(5)
        return weights(key(0), 10)

    results: list[AdapterWeights] = []
    threads = [threading.Thread(target=lambda: results.append(cache.get_or_load(key(0), loader))) for _ in range(8)]
    for thread in threads:
        thread.start()
    log.wait_for(len(threads))  # one leader ("miss") and the rest waiting ("hit")
    release.set()
    for thread in threads:
        thread.join(5)
    assert calls == 1 and sorted(log.events) == ["hit"] * 7 + ["load", "miss"]
    assert len(results) == 8 and all(r is results[0] for r in results)


def test_failed_load_shared_and_not_cached() -> None:
    calls = 0
    release = threading.Event()
    log = EventLog()
    cache = HostCache(max_bytes=1000, on_event=log)

    def failing() -> AdapterWeights:
        nonlocal calls
        calls += 1
        release.wait(5)
        raise RuntimeError("disk on fire")

    errors: list[BaseException] = []

    def worker() -> None:
        try:
            cache.get_or_load(key(0), failing)
        except RuntimeError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    log.wait_for(len(threads))  # one leader ("miss") and the rest waiting ("hit")
    release.set()
    for thread in threads:
        thread.join(5)
    assert calls == 1 and len(errors) == 4 and all(e is errors[0] for e in errors)
    assert cache.keys() == []
    assert cache.get_or_load(key(0), lambda: weights(key(0), 10)).nbytes == 10
