"""Reading a published version's files against the sha256 its manifest records, hashed once per process.

A version directory is immutable once published. The first read of a file in this process hashes
exactly the bytes it returns, so the bytes checked are the bytes used and the file is read once
instead of twice: ``read`` hashes each chunk right after reading it; ``start`` (the weights file's
way) hashes the whole buffer on another thread while the caller parses it, and the caller's result
counts only once the digest matched (``PendingCheck``). Either records the file's identity from
``fstat``: device, inode, size, mtime and ctime in nanoseconds. A later read of the same
file (its adapter left host memory and is needed again) skips the hash when the identity is unchanged
and the manifest still expects the same digest. Any write, truncation, replacement or rename over the
file through the filesystem changes one of those fields (ctime cannot be set from user space), so such
a change is still caught; what is not caught is a change below the filesystem (bit rot, a raw write to
the device) after the first check. A restart checks every file again.

File timestamps come from a coarse clock (a few milliseconds), so a write right after a file was
created could leave its ctime unchanged: a file is only remembered once its ctime is at least
``min_age_seconds`` (2 s) old when the check starts; a younger one is hashed on every read.

Why: hashing is the largest single cost of a cold load (sha256 of an r=16 all-linear adapter for the
default model, 19.5 MB, takes 25-40 ms here), and under Zipf traffic most cold loads are reloads of
versions already checked. Bounded: at most ``max_entries`` records (about 300 bytes each), least
recently used dropped first.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple, TypeVar

from lorafleet_adapters import hostmem
from lorafleet_adapters.errors import AdapterFormatError

CHUNK_BYTES = 1 << 20
DEFAULT_MAX_ENTRIES = 16384
DEFAULT_MIN_AGE_SECONDS = 2.0
SCRATCH_MIN_BYTES = 1 << 20
SCRATCH_MAX_BYTES = 64 << 20  # per kept buffer, at most: a larger file gets a buffer of its own
SCRATCH_KEPT = 2  # reused read buffers kept between loads, whichever threads load (the load pool has 2)
PARALLEL_HASH_MIN_BYTES = 1 << 20  # start hashes a smaller file itself, before it returns
HASH_THREADS = 2  # start's hashing threads, shared by a store's load threads

T = TypeVar("T")


@dataclass(frozen=True)
class FileIdentity:
    """What ``fstat`` says about one file; unchanged unless something wrote or replaced it."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileIdentity:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(frozen=True)
class VerifiedBytes:
    # ``read``'s bytes, in a buffer of their own (only ``start``'s reads reuse buffers).
    data: memoryview
    hashed: bool  # False: the identity matched an earlier check in this process, so no hash was needed


class _Read(NamedTuple):
    data: memoryview
    identity: FileIdentity
    settled: bool  # its ctime was min_age_seconds old when the check started: it may be remembered
    must_hash: bool
    digest: str | None  # hashed as read (read's way), else None
    scratch: bytearray | None  # the kept buffer ``data`` views, to give back after use (None: its own)


def _sha256_hex(data: memoryview) -> str:
    return hashlib.sha256(data).hexdigest()  # releases the GIL over the whole buffer


class PendingCheck:
    """A file's bytes, read, whose sha256 may still be computing on another thread.

    The caller parses ``data`` meanwhile (nothing writes to the buffer, so the bytes checked are the
    bytes used), and a first load costs about the longer of the two instead of their sum. ``use`` or
    ``finish`` waits for the digest and raises AdapterFormatError when it differs: whatever was made
    from the bytes is then dropped. After either, the buffer may be handed to another read (see
    ``VerifiedFiles._buffer``): nothing made from ``data`` may keep views of it.
    """

    def __init__(
        self,
        data: memoryview,
        settle: Callable[[str], None],
        hashing: Future[str] | None,
        release: Callable[[], None] = lambda: None,
    ) -> None:
        self.data = data
        self._settle = settle  # raises on a digest that differs, else remembers the file
        self._hashing = hashing  # None: nothing left to check
        self._release = release  # gives the buffer back for reuse (once the hash no longer reads it)

    def finish(self) -> None:
        try:
            if self._hashing is not None:
                hashing, self._hashing = self._hashing, None
                self._settle(hashing.result())
        finally:
            release, self._release = self._release, lambda: None
            release()

    def use(self, fn: Callable[[memoryview], T]) -> T:
        """``fn(data)``, returned once the bytes are checked; when both fail, the checksum is the error
        raised (a corrupt file often breaks its parser too, and the checksum says why)."""
        try:
            result = fn(self.data)
        except BaseException:
            self.finish()
            raise
        self.finish()
        return result


class VerifiedFiles:
    """Thread-safe memo of the files this process has hashed, with the reads that use it."""

    def __init__(
        self,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        min_age_seconds: float = DEFAULT_MIN_AGE_SECONDS,
        parallel_hash_min_bytes: int = PARALLEL_HASH_MIN_BYTES,
    ) -> None:
        if max_entries < 0:
            raise ValueError(f"max_entries must be >= 0, got {max_entries}")
        if min_age_seconds < 0:
            raise ValueError(f"min_age_seconds must be >= 0, got {min_age_seconds}")
        self._max_entries = max_entries
        self._min_age_ns = int(min_age_seconds * 1e9)
        self._parallel_min = parallel_hash_min_bytes
        self._lock = threading.Lock()
        self._spare: list[bytearray] = []  # read buffers kept for reuse, at most SCRATCH_KEPT (see _buffer)
        self._checked: OrderedDict[str, tuple[str, FileIdentity]] = OrderedDict()  # path -> (sha256, identity)
        self._hash_pool: ThreadPoolExecutor | None = None  # start's (see _hasher)

    def __len__(self) -> int:
        with self._lock:
            return len(self._checked)

    def read(self, path: Path, expected_sha256: str, what: str, *, max_bytes: int) -> VerifiedBytes:
        """``path``'s bytes, checked against ``expected_sha256``.

        ``what`` starts error messages (e.g. the adapter version). AdapterFormatError when the file is
        not a regular file, larger than ``max_bytes`` (checked before reading), changed while being read,
        or its digest differs; OSError (FileNotFoundError included) passes through to the caller.
        """
        got = self._read(path, expected_sha256, what, max_bytes, hash_inline=True, reuse=False)
        if got.digest is None:
            return VerifiedBytes(got.data, hashed=False)
        self._settle(path, expected_sha256, got, got.digest, what=what)
        return VerifiedBytes(got.data, hashed=True)

    def start(self, path: Path, expected_sha256: str, what: str, *, max_bytes: int) -> PendingCheck:
        """Read ``path``; its check runs on another thread while the caller uses the bytes (``PendingCheck``).

        Raises what ``read`` raises for the read itself (OSError passes through); a digest that differs
        is raised by ``PendingCheck.use`` or ``finish``. A file below ``parallel_hash_min_bytes`` is hashed
        here (a thread's hand-off would cost more than it saves); a trusted one needs no hash."""
        got = self._read(path, expected_sha256, what, max_bytes, hash_inline=False, reuse=True)
        release = partial(self._give_back, got.scratch) if got.scratch is not None else (lambda: None)
        try:
            if got.must_hash and len(got.data) < self._parallel_min:
                self._settle(path, expected_sha256, got, _sha256_hex(got.data), what=what)
                got = got._replace(must_hash=False)
            hashing = self._hasher().submit(_sha256_hex, got.data) if got.must_hash else None
        except BaseException:
            release()
            raise
        return PendingCheck(got.data, partial(self._settle, path, expected_sha256, got, what=what), hashing, release)

    def _read(
        self, path: Path, expected_sha256: str, what: str, max_bytes: int, *, hash_inline: bool, reuse: bool
    ) -> _Read:
        """The file's bytes and identity, whether they must be hashed (not when the identity matched an
        earlier check), and with ``hash_inline`` their digest, each chunk hashed right after its read.
        ``reuse``: a large file is read into a kept buffer (``_Read.scratch``), which the caller gives back."""
        name = path.name
        key = str(path)
        # O_NONBLOCK: a FIFO planted in the version directory must not block the open (it is refused below)
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as handle:
            before = os.fstat(handle.fileno())
            if not stat.S_ISREG(before.st_mode):
                raise AdapterFormatError(f"{what}: {name} is not a regular file")
            if before.st_size > max_bytes:
                raise AdapterFormatError(f"{what}: {name} is {before.st_size} bytes, over the {max_bytes}-byte cap")
            identity = FileIdentity.of(before)
            settled = time.time_ns() - identity.ctime_ns >= self._min_age_ns  # as the check starts
            with self._lock:
                known = self._checked.get(key)
                if known is not None:
                    self._checked.move_to_end(key)
            must_hash = known != (expected_sha256, identity)
            inline = hashlib.sha256() if must_hash and hash_inline else None
            scratch = self._buffer(identity.size) if reuse else None
            data = memoryview(hostmem.byte_buffer(identity.size)) if scratch is None else memoryview(scratch)
            data = data[: identity.size]
            try:
                position = 0
                while position < identity.size:
                    count = handle.readinto(data[position : position + CHUNK_BYTES])
                    if not count:
                        break
                    if inline is not None:
                        inline.update(data[position : position + count])
                    position += count
                grew = handle.read(1) != b""
                after = FileIdentity.of(os.fstat(handle.fileno()))
                if position != identity.size or grew or after != identity:
                    raise AdapterFormatError(f"{what}: {name} changed while it was being read")
            except BaseException:
                if scratch is not None:
                    self._give_back(scratch)
                raise
        return _Read(data, identity, settled, must_hash, None if inline is None else inline.hexdigest(), scratch)

    def _settle(self, path: Path, expected_sha256: str, got: _Read, actual: str, *, what: str) -> None:
        """Raise on a digest that differs; else remember the file if its ctime had settled."""
        if actual != expected_sha256:
            self.forget(path)
            raise AdapterFormatError(
                f"{what}: checksum mismatch for {path.name}: manifest has sha256 {expected_sha256}, file has {actual}"
            )
        if got.settled:
            self._remember(str(path), expected_sha256, got.identity)

    def _hasher(self) -> ThreadPoolExecutor:
        """The threads ``start`` hashes on, started on first use (hashlib releases the GIL)."""
        with self._lock:
            if self._hash_pool is None:
                self._hash_pool = ThreadPoolExecutor(max_workers=HASH_THREADS, thread_name_prefix="sha256")
            return self._hash_pool

    def _buffer(self, size: int) -> bytearray | None:
        """A kept buffer of at least ``size`` bytes for a large file (None: the file is small or over
        SCRATCH_MAX_BYTES, and gets a fresh buffer). Fresh pages are expensive here (first touch of an
        r=16 all-linear adapter's 19.5 MB took 20-80 ms on the 2-core VM), and freeing large buffers back
        and forth fragments the allocator. At most SCRATCH_KEPT buffers are kept, whichever threads read:
        one per thread kept a buffer on every thread that ever loaded an adapter (the version watcher,
        admin calls' threads), outside --host-cache-bytes."""
        if size < SCRATCH_MIN_BYTES or size > SCRATCH_MAX_BYTES:
            return None
        with self._lock:
            spare = self._spare.pop() if self._spare else None
        if spare is None or len(spare) < size:
            spare = bytearray(size)  # a smaller one is freed with its last view
        return spare

    def _give_back(self, scratch: bytearray) -> None:
        """Keep ``scratch`` for another read (the largest SCRATCH_KEPT are kept; nothing may view it now)."""
        with self._lock:
            self._spare.append(scratch)
            self._spare.sort(key=len)
            if len(self._spare) > SCRATCH_KEPT:
                del self._spare[0]

    def forget(self, path: Path) -> None:
        with self._lock:
            self._checked.pop(str(path), None)

    def _remember(self, key: str, sha256: str, identity: FileIdentity) -> None:
        if self._max_entries == 0:
            return
        with self._lock:
            self._checked[key] = (sha256, identity)
            self._checked.move_to_end(key)
            while len(self._checked) > self._max_entries:
                self._checked.popitem(last=False)
