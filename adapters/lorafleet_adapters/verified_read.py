"""Reading a published version's files against the sha256 its manifest records, hashed once per process.

A version directory is immutable once published. The first read of a file in this process hashes
exactly the bytes it returns, in one pass (each chunk is hashed right after it is read, so the bytes
checked are the bytes used, and the file is read once instead of twice), and records the file's
identity from ``fstat``: device, inode, size, mtime and ctime in nanoseconds. A later read of the same
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
from dataclasses import dataclass
from pathlib import Path

from lorafleet_adapters import hostmem
from lorafleet_adapters.errors import AdapterFormatError

CHUNK_BYTES = 1 << 20
DEFAULT_MAX_ENTRIES = 16384
DEFAULT_MIN_AGE_SECONDS = 2.0
SCRATCH_MIN_BYTES = 1 << 20
SCRATCH_MAX_BYTES = 64 << 20  # per load thread, at most: a larger file gets a buffer of its own


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
    # Valid until the same thread's next read through the same VerifiedFiles: large files are read into
    # that thread's scratch buffer, reused so that a load touches no fresh pages (see _buffer).
    data: memoryview
    hashed: bool  # False: the identity matched an earlier check in this process, so no hash was needed


class VerifiedFiles:
    """Thread-safe memo of the files this process has hashed, with the reads that use it."""

    def __init__(
        self, max_entries: int = DEFAULT_MAX_ENTRIES, min_age_seconds: float = DEFAULT_MIN_AGE_SECONDS
    ) -> None:
        if max_entries < 0:
            raise ValueError(f"max_entries must be >= 0, got {max_entries}")
        if min_age_seconds < 0:
            raise ValueError(f"min_age_seconds must be >= 0, got {min_age_seconds}")
        self._max_entries = max_entries
        self._min_age_ns = int(min_age_seconds * 1e9)
        self._lock = threading.Lock()
        self._scratch = threading.local()  # .buffer: one reusable read buffer per thread (see _buffer)
        self._checked: OrderedDict[str, tuple[str, FileIdentity]] = OrderedDict()  # path -> (sha256, identity)

    def __len__(self) -> int:
        with self._lock:
            return len(self._checked)

    def read(self, path: Path, expected_sha256: str, what: str, *, max_bytes: int) -> VerifiedBytes:
        """``path``'s bytes, checked against ``expected_sha256``.

        ``what`` starts error messages (e.g. the adapter version). AdapterFormatError when the file is
        not a regular file, larger than ``max_bytes`` (checked before reading), changed while being read,
        or its digest differs; OSError (FileNotFoundError included) passes through to the caller.
        """
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
            settled = time.time_ns() - identity.ctime_ns >= self._min_age_ns
            with self._lock:
                known = self._checked.get(key)
                if known is not None:
                    self._checked.move_to_end(key)
            trusted = known == (expected_sha256, identity)
            digest = None if trusted else hashlib.sha256()
            data = self._buffer(identity.size)
            position = 0
            while position < identity.size:
                count = handle.readinto(data[position : position + CHUNK_BYTES])
                if not count:
                    break
                if digest is not None:
                    digest.update(data[position : position + count])
                position += count
            grew = handle.read(1) != b""
            after = FileIdentity.of(os.fstat(handle.fileno()))
        if position != identity.size or grew or after != identity:
            raise AdapterFormatError(f"{what}: {name} changed while it was being read")
        if digest is None:
            return VerifiedBytes(data, hashed=False)
        actual = digest.hexdigest()
        if actual != expected_sha256:
            self.forget(path)
            raise AdapterFormatError(
                f"{what}: checksum mismatch for {name}: manifest has sha256 {expected_sha256}, file has {actual}"
            )
        if settled:
            self._remember(key, expected_sha256, identity)
        return VerifiedBytes(data, hashed=True)

    def _buffer(self, size: int) -> memoryview:
        """``size`` writable bytes: this thread's scratch buffer when the file is large (grown as needed up
        to SCRATCH_MAX_BYTES and kept), else a fresh one. Fresh pages are expensive here (first touch of
        an r=16 all-linear adapter's 19.5 MB took 20-80 ms on the 2-core VM), and freeing large buffers
        back and forth fragments the allocator; one kept buffer per load thread does neither."""
        if size < SCRATCH_MIN_BYTES or size > SCRATCH_MAX_BYTES:
            return memoryview(hostmem.byte_buffer(size))
        scratch: bytearray | None = getattr(self._scratch, "buffer", None)
        if scratch is None or len(scratch) < size:
            scratch = self._scratch.buffer = bytearray(size)  # a smaller one is freed with its last view
        return memoryview(scratch)[:size]

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
