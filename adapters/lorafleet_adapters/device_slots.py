"""The device tier: a fixed number of LoRA slots with leases (refcounts), pins and LRU eviction.

Not thread-safe by design: one owner (the engine thread) calls it, so a slot is never written while
a forward reads it. Slot 0 is the reserved all-zero "no adapter" slot and is never handed out.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from lorafleet_adapters.peft_format import AdapterWeights
from lorafleet_adapters.ref import AdapterKey

log = logging.getLogger(__name__)


@dataclass
class _Slot:
    key: AdapterKey | None = None
    leases: int = 0
    pinned: bool = False
    retiring: bool = False  # unload asked while leased: free when the last lease ends
    retire_cause: str = "unloaded"  # logged when a retiring slot is freed
    drain_for: AdapterKey | None = None  # reserved for this adapter: no new lease; it installs here once idle
    last_used: int = 0


@dataclass(frozen=True)
class SlotInfo:
    slot: int
    leases: int
    pinned: bool


class DeviceSlots:
    def __init__(
        self,
        num_slots: int,
        write: Callable[[int, AdapterWeights], None],
        clear: Callable[[int], None],
        on_event: Callable[[str], None] | None = None,
    ) -> None:
        if num_slots < 1:
            raise ValueError("at least one adapter slot is needed")
        self._write = write
        self._clear = clear
        self._on_event = on_event or (lambda _event: None)
        self._slots = [_Slot() for _ in range(num_slots + 1)]  # index 0 reserved
        self._index: dict[AdapterKey, int] = {}
        self._tick = 0

    @property
    def capacity(self) -> int:
        return len(self._slots) - 1

    def resident_count(self) -> int:
        """Adapters in slots (safe to read from another thread: one len())."""
        return len(self._index)

    def resident_keys(self) -> tuple[AdapterKey, ...]:
        """Adapters in slots (safe to read from another thread: one copy of the index)."""
        return tuple(self._index)

    def pinned_count(self) -> int:
        return sum(1 for s in list(self._slots) if s.pinned)

    def can_acquire(self, key: AdapterKey) -> bool:
        """Whether ``acquire(key)`` would lease a slot now (resident, its slot not reserved for another)."""
        slot = self._index.get(key)
        return slot is not None and self._slots[slot].drain_for is None

    def reservation(self) -> AdapterKey | None:
        """The adapter a slot is reserved for (at most one at a time), or None."""
        return next((s.drain_for for s in self._slots if s.drain_for is not None), None)

    def reserved_slot(self) -> tuple[int, AdapterKey] | None:
        """(the reserved slot, the adapter it drains for), or None."""
        return next(((i, s.drain_for) for i, s in enumerate(self._slots) if s.drain_for is not None), None)

    def drop_reservation(self) -> None:
        """Give a reserved slot back to its adapter (the request it was reserved for is gone)."""
        for s in self._slots:
            s.drain_for = None

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is resident in a slot (no lease taken, recency untouched)."""
        return key in self._index

    def acquire(self, key: AdapterKey) -> int | None:
        """Lease a resident adapter's slot; None when it is not resident, or when its slot is reserved
        for another adapter (``reserve_for``)."""
        slot = self._index.get(key)
        if slot is None:
            return None
        entry = self._slots[slot]
        if entry.drain_for is not None:
            return None
        entry.leases += 1
        entry.retiring = False
        self._touch(entry)
        return slot

    def release(self, slot: int) -> None:
        entry = self._slots[slot]
        if entry.leases <= 0:
            raise RuntimeError(f"slot {slot} released more often than leased")
        entry.leases -= 1
        if entry.leases == 0 and entry.retiring:
            self._free(slot, "unload", entry.retire_cause)

    def can_ever_install(self) -> bool:
        """False when every slot is pinned: nothing will free up without an unpin."""
        return any(not s.pinned for s in self._slots[1:])

    def install(self, key: AdapterKey, weights: AdapterWeights) -> int | None:
        """Write ``weights`` into a free (or the least recently used idle) slot and return it.

        None when every slot is leased or pinned; the caller retries after a release.
        """
        existing = self._index.get(key)
        if existing is not None:
            return existing
        reserved = self._reserved_slot(key)
        if reserved is not None and self._slots[reserved].leases == 0:
            slot: int | None = reserved  # drained for this adapter
        else:
            slot = self._victim()
        if slot is None:
            return None
        if self._slots[slot].key is not None:
            # No clear first: the write replaces every module of the slot (untargeted ones are cleared),
            # and clearing would shrink storage sized for the evicted adapter only to grow it again.
            self._free(slot, "evict", clear=False)
        try:
            self._write(slot, weights)
        except BaseException:
            self._clear(slot)  # a half-written slot holds nothing usable; it stays free
            raise
        self._slots[slot] = _Slot(key=key)
        if reserved is not None:  # installed (there, or in a slot that came free): the reservation is done
            self._slots[reserved].drain_for = None
        self._touch(self._slots[slot])
        self._index[key] = slot
        log.info("adapter %s loaded into device slot %d", key, slot)
        self._on_event("load")
        return slot

    def reserve_for(self, key: AdapterKey) -> int | None:
        """Make room for ``key`` when every slot is leased: one unpinned slot (retiring first, then least
        recently used) is reserved for it, takes no new lease, and once its leases end ``install`` puts
        ``key`` there (no other adapter may take it). One reservation at a time: the slot, or None when
        another adapter holds the reservation or every slot is pinned.

        Without it a leased slot was freed only when it was idle, and an adapter whose requests
        overlap (one tenant's steady traffic) never left it idle: another adapter's request waited
        for as long as that traffic lasted, however fair its tenant's turn. The manager asks for this
        only for an adapter that has waited a while with its weights at hand (``SLOT_WAIT_STEPS``), so
        ordinary churn does not drain busy adapters.
        """
        if self.reservation() is not None:
            return self._reserved_slot(key)
        candidates = [i for i in range(1, len(self._slots)) if not self._slots[i].pinned]
        if not candidates:
            return None
        slot = min(candidates, key=lambda i: (not self._slots[i].retiring, self._slots[i].last_used))
        self._slots[slot].drain_for = key
        log.info("device slot %d (%s) drains for %s: no new leases", slot, self._slots[slot].key, key)
        return slot

    def pin(self, key: AdapterKey) -> bool:
        slot = self._index.get(key)
        if slot is None:
            return False
        self._slots[slot].pinned = True
        self._slots[slot].retiring = False
        self._slots[slot].drain_for = None
        return True

    def unpin(self, key: AdapterKey) -> bool:
        slot = self._index.get(key)
        if slot is None:
            return False
        self._slots[slot].pinned = False
        return True

    def unload(self, key: AdapterKey) -> bool:
        """Free the key's slot now if idle (True); else free it when its last lease ends (False)."""
        slot = self._index.get(key)
        if slot is None:
            return True
        entry = self._slots[slot]
        entry.pinned = False
        if entry.leases == 0:
            self._free(slot, "unload")
            return True
        entry.retiring = True
        return False

    def retire(self, key: AdapterKey, cause: str) -> bool:
        """Let go of a version nothing resolves to by name any more (a newer one replaced it): free its
        slot now if idle, else when its last lease ends. A pinned version stays, since an admin asked
        for it: False then, else True."""
        slot = self._index.get(key)
        if slot is None:
            return True
        entry = self._slots[slot]
        if entry.pinned:
            return False
        if entry.leases == 0:
            self._free(slot, "unload", cause)
        else:
            entry.retiring, entry.retire_cause = True, cause
        return True

    def snapshot(self) -> dict[AdapterKey, SlotInfo]:
        return {
            key: SlotInfo(slot=i, leases=self._slots[i].leases, pinned=self._slots[i].pinned)
            for key, i in self._index.items()
        }

    def _reserved_slot(self, key: AdapterKey) -> int | None:
        """The slot reserved for ``key``, if any."""
        return next((i for i, s in enumerate(self._slots) if s.drain_for == key), None)

    def _victim(self) -> int | None:
        free = [i for i in range(1, len(self._slots)) if self._slots[i].key is None]
        if free:
            return free[0]
        idle = [
            i
            for i in range(1, len(self._slots))
            if self._slots[i].leases == 0 and not self._slots[i].pinned and self._slots[i].drain_for is None
        ]  # a reserved slot goes to its adapter only (``install``)
        if not idle:
            return None
        # Retiring (superseded/unloaded) slots go first, then least recently used.
        return min(idle, key=lambda i: (not self._slots[i].retiring, self._slots[i].last_used))

    def _free(self, slot: int, event: str, cause: str = "unloaded", *, clear: bool = True) -> None:
        key = self._slots[slot].key
        if key is not None:
            del self._index[key]
            if event == "evict":
                cause = "least recently used, slot needed"
            log.info("adapter %s left device slot %d (%s)", key, slot, cause)
        if clear:
            self._clear(slot)
        self._slots[slot] = _Slot()
        self._on_event(event)

    def _touch(self, entry: _Slot) -> None:
        self._tick += 1
        entry.last_used = self._tick
