"""Verified adapter versions on local disk: a byte-bounded LRU cache in front of a remote store.

Layout::

    <root>/<tenant>/<name>/<version>/   the version's files + manifest.json, complete or absent
    <root>/.incoming/                   downloads in progress (removed on failure and at start)

An entry appears by renaming a fully downloaded and verified directory into place, so a reader
never sees half a version. Recency is the entry directory's mtime (touched on every use), so it
survives restarts. After each insert the least recently used entries are removed until the total
is within the bound; entries in use (``using``) and the newest one are never removed, so one
version larger than the bound still serves.

The directory is this replica's alone, so sizes and recency are also kept in memory (read from disk
once, at start): an insert no longer walks and stats the whole cache (34 ms at 1,000 entries, on
every download). A name's and a tenant's directories go when their last entry does.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lorafleet_adapters.errors import InvalidAdapterRef, StoreUnavailable
from lorafleet_adapters.ref import AdapterKey, check_ident, parse_version

log = logging.getLogger(__name__)

INCOMING_DIR = ".incoming"


@dataclass(frozen=True)
class CacheEntry:
    key: AdapterKey
    path: Path
    nbytes: int
    used: float  # mtime of the entry directory


class VersionCache:
    def __init__(self, root: Path, max_bytes: int, on_evict: Callable[[str], None] | None = None) -> None:
        """``on_evict("evict")`` is called once per entry the bound removes (outside the lock)."""
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be > 0, got {max_bytes}")
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._on_evict = on_evict
        self._lock = threading.Lock()
        self._in_use: Counter[AdapterKey] = Counter()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.root / INCOMING_DIR, ignore_errors=True)  # what a crash left mid-download
            (self.root / INCOMING_DIR).mkdir(exist_ok=True)
        except OSError as exc:
            raise StoreUnavailable(f"adapter cache {self.root}: {exc.strerror or exc}") from None
        # key -> bytes, least recently used first (the lock guards it and every rename or removal)
        self._index: OrderedDict[AdapterKey, int] = OrderedDict((e.key, e.nbytes) for e in self.entries())
        self._bytes = sum(self._index.values())

    def path(self, key: AdapterKey) -> Path:
        return self.root / key.tenant / key.name / str(key.version)

    def lookup(self, key: AdapterKey) -> Path | None:
        """The entry's directory (its use recorded for LRU), or None when it is not cached."""
        path = self.path(key)
        if not path.is_dir():
            return None
        try:
            os.utime(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreUnavailable(f"adapter cache {self.root}: {exc.strerror or exc}") from None
        with self._lock:
            if key in self._index:
                self._index.move_to_end(key)
            else:  # on disk but not known (put there by hand): counted from now on
                try:
                    self._add(key, path)
                except OSError:  # removed meanwhile
                    return None
        return path

    def incoming(self) -> Path:
        """A fresh directory to download one version into (pass it to ``install`` or ``discard``)."""
        try:
            return Path(tempfile.mkdtemp(dir=self.root / INCOMING_DIR))
        except OSError as exc:
            raise StoreUnavailable(f"adapter cache {self.root}: {exc.strerror or exc}") from None

    def discard(self, incoming: Path) -> None:
        shutil.rmtree(incoming, ignore_errors=True)

    def install(self, key: AdapterKey, incoming: Path) -> Path:
        """Move a complete, verified download into place, then evict down to the bound."""
        final = self.path(key)
        try:
            with self._lock:  # eviction removes empty parents under it: not between mkdir and rename
                final.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.rename(incoming, final)
                except OSError:
                    if not final.is_dir():
                        raise
                    # somebody installed it first: theirs is as good (ours is removed below, unlocked)
                os.utime(final)
                self._add(key, final)
            if incoming.exists():
                self.discard(incoming)
        except OSError as exc:
            self.discard(incoming)
            raise StoreUnavailable(f"adapter cache {self.root}: cannot install {key}: {exc.strerror or exc}") from None
        self.evict(keep=key)
        return final

    def drop(self, key: AdapterKey) -> None:
        """Remove one entry (a damaged one)."""
        with self._lock:
            gone = self._remove(key)
        self._delete(gone)

    @contextmanager
    def using(self, key: AdapterKey) -> Iterator[None]:
        """While inside, eviction leaves ``key`` alone."""
        with self._lock:
            self._in_use[key] += 1
        try:
            yield
        finally:
            with self._lock:
                self._in_use[key] -= 1
                if self._in_use[key] <= 0:
                    del self._in_use[key]

    def entries(self) -> list[CacheEntry]:
        """Every complete entry on disk, least recently used first (a walk of the directory)."""
        found: list[CacheEntry] = []
        for tenant_dir in _subdirs(self.root):
            for name_dir in _subdirs(tenant_dir):
                for version_dir in _subdirs(name_dir):
                    key = _entry_key(tenant_dir.name, name_dir.name, version_dir.name)
                    if key is None:
                        continue
                    try:
                        used = version_dir.stat().st_mtime
                        nbytes = _dir_bytes(version_dir)
                    except FileNotFoundError:
                        continue  # evicted meanwhile
                    found.append(CacheEntry(key, version_dir, nbytes, used))
        found.sort(key=lambda e: e.used)
        return found

    def total_bytes(self) -> int:
        """The bytes of the entries on disk, as the bound counts them."""
        with self._lock:
            return self._bytes

    def evict(self, keep: AdapterKey | None = None) -> list[AdapterKey]:
        """Remove least recently used entries until the total fits ``max_bytes``; the removed keys."""
        removed: list[AdapterKey] = []
        gone: list[Path | None] = []
        with self._lock:
            for key in list(self._index):
                if self._bytes <= self.max_bytes:
                    break
                if key == keep or key in self._in_use:
                    continue
                gone.append(self._remove(key))
                removed.append(key)
            total = self._bytes
        for path in gone:
            self._delete(path)
        if self._on_evict is not None:
            for _ in removed:
                self._on_evict("evict")
        if removed:
            log.info(
                "adapter disk cache: evicted %s (now %d of %d bytes)", [str(k) for k in removed], total, self.max_bytes
            )
        return removed

    def _add(self, key: AdapterKey, path: Path) -> None:
        """Count ``key`` (lock held) as the most recently used entry."""
        nbytes = _dir_bytes(path)
        self._bytes += nbytes - self._index.pop(key, 0)
        self._index[key] = nbytes

    def _remove(self, key: AdapterKey) -> Path | None:
        """Take ``key``'s directory out of place (lock held), and its name's and tenant's once empty.
        Returns where it went, for ``_delete`` to remove without the lock (None: nothing to remove)."""
        path = self.path(key)
        gone: Path | None = None
        try:
            gone = Path(tempfile.mkdtemp(dir=self.root / INCOMING_DIR))
            os.rename(path, gone / "entry")
        except FileNotFoundError:  # not there any more (or no .incoming to move it into)
            shutil.rmtree(path, ignore_errors=True)
        except OSError as exc:
            shutil.rmtree(path, ignore_errors=True)  # in place, then
            if path.exists():  # still there: still counted
                log.warning("adapter disk cache: cannot remove %s: %s", key, exc.strerror or exc)
                self._delete(gone)
                return None
        self._bytes -= self._index.pop(key, 0)
        for parent in (path.parent, path.parent.parent):
            try:
                parent.rmdir()
            except OSError:  # not empty (or gone): the ones above are not empty either
                break
        return gone

    @staticmethod
    def _delete(path: Path | None) -> None:
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def _subdirs(path: Path) -> list[Path]:
    try:
        return [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _entry_key(tenant: str, name: str, version: str) -> AdapterKey | None:
    try:
        return AdapterKey(check_ident(tenant, "tenant"), check_ident(name, "adapter name"), parse_version(version))
    except InvalidAdapterRef:  # a stray directory is not an entry
        return None
