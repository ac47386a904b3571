"""LruMap: the bounded map behind the manifest, prompt and head caches."""

from __future__ import annotations

import threading

import pytest

from lorafleet_adapters.lru import LruMap


def test_entries_bound_drops_the_least_recently_used() -> None:
    lru: LruMap[str, int] = LruMap(3)
    for i, key in enumerate("abc"):
        lru.put(key, i)
    assert lru.get("a") == 0  # a is now the most recent: b goes first
    lru.put("d", 3)
    assert "b" not in lru and [k for k in "acd" if k in lru] == ["a", "c", "d"]
    lru.put("c", 30)  # replacing makes it recent and keeps one entry
    lru.put("e", 4)
    assert len(lru) == 3 and "a" not in lru and lru.get("c") == 30
    assert "d" in lru  # `in` does not touch recency
    lru.put("f", 5)
    assert "d" not in lru


def test_bytes_bound_counts_each_value_once_and_refuses_one_too_big() -> None:
    lru: LruMap[str, bytes] = LruMap(100, max_bytes=10, size=len)
    lru.put("a", b"1234")
    lru.put("b", b"1234")
    assert lru.nbytes == 8
    lru.put("a", b"12")  # replaced: its old size leaves the count
    assert lru.nbytes == 6
    lru.put("c", b"123456")  # 12 > 10: the least recent (b) goes
    assert "b" not in lru and lru.nbytes == 8
    lru.put("big", b"x" * 11)  # larger than the bound by itself: not kept, nothing evicted for it
    assert "big" not in lru and len(lru) == 2 and lru.nbytes == 8
    assert lru.pop("a") == b"12" and lru.pop("a") is None and lru.nbytes == 6


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="max_entries"):
        LruMap(0)
    with pytest.raises(ValueError, match="go together"):
        LruMap(1, max_bytes=10)
    with pytest.raises(ValueError, match="max_bytes"):
        LruMap(1, max_bytes=0, size=len)


def test_threads_keep_the_counts_exact() -> None:
    lru: LruMap[int, bytes] = LruMap(50, max_bytes=400, size=len)

    def work(offset: int) -> None:
        for i in range(2000):
            key = (offset * 7 + i) % 120
            if lru.get(key) is None:
                lru.put(key, b"x" * (key % 13))
            if i % 17 == 0:
                lru.pop(key)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    held = [k for k in range(120) if k in lru]
    assert len(held) <= 50 and lru.nbytes == sum(k % 13 for k in held) <= 400
