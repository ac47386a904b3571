"""Files hashed once per process, then trusted by their fstat identity (verified_read.py), and the
store's load built on it: one read, the bytes checked are the bytes used, tampering still caught."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import pytest
from adapters_testlib import flip_last_byte_keeping_mtime

from lorafleet_adapters.errors import AdapterFormatError
from lorafleet_adapters.peft_format import WEIGHTS_FILE, BaseModelSpec
from lorafleet_adapters.store import AdapterStore
from lorafleet_adapters.verified_read import VerifiedFiles


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_old(path: Path, data: bytes) -> None:
    """Write ``data`` and wait past the coarse timestamp clock, so a later write gets a new ctime."""
    path.write_bytes(data)
    time.sleep(0.05)


def test_hashed_once_then_trusted_by_identity(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    data = os.urandom(3 * (1 << 20) + 17)  # several read chunks and a partial one
    write_old(path, data)
    files = VerifiedFiles(min_age_seconds=0)
    first = files.read(path, digest(data), "acme/a@1", max_bytes=len(data))
    assert first.hashed and bytes(first.data) == data
    again = files.read(path, digest(data), "acme/a@1", max_bytes=len(data))
    assert not again.hashed and bytes(again.data) == data
    assert len(files) == 1
    # Another expected digest (a different manifest) is never served from the memo.
    with pytest.raises(AdapterFormatError, match=r"checksum mismatch for f\.bin"):
        files.read(path, digest(b"other"), "acme/a@1", max_bytes=len(data))


@pytest.mark.parametrize("size", [3 * (1 << 20) + 17, 4096])  # hashed on another thread / inline
def test_start_then_use_returns_only_what_checked_bytes_gave(tmp_path: Path, size: int) -> None:
    path = tmp_path / "f.bin"
    data = os.urandom(size)
    write_old(path, data)
    files = VerifiedFiles(min_age_seconds=0)
    seen: list[bytes] = []

    def use(view: memoryview) -> int:
        seen.append(bytes(view))
        return len(seen)

    assert files.start(path, digest(data), "k", max_bytes=size).use(use) == 1
    assert seen == [data] and len(files) == 1
    assert files.start(path, digest(data), "k", max_bytes=size).use(use) == 2  # trusted by identity now
    assert not files.read(path, digest(data), "k", max_bytes=size).hashed
    # A digest that differs raises (a large file's after use ran, a small one's in start): no result reaches
    # the caller, and nothing is remembered.
    files.forget(path)
    with pytest.raises(AdapterFormatError, match=r"checksum mismatch for f\.bin"):
        files.start(path, digest(b"other"), "k", max_bytes=size).use(use)
    assert len(files) == 0
    # use's own error passes through (the hash is still waited for, so the buffer is free for the next read).
    with pytest.raises(ZeroDivisionError):
        files.start(path, digest(data), "k", max_bytes=size).use(lambda view: 1 // 0)
    assert files.start(path, digest(data), "k", max_bytes=size).use(bytes) == data
    # When both fail, the checksum is the error reported (a corrupt file often breaks its parser too).
    files.forget(path)
    with pytest.raises(AdapterFormatError, match="checksum mismatch"):
        files.start(path, digest(b"other"), "k", max_bytes=size).use(lambda view: 1 // 0)


def test_a_same_size_rewrite_during_a_trusted_read_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A trusted file is not hashed again: only the identity after the read can show that it was
    rewritten meanwhile at the same size (an outside mutation run dropped that comparison unnoticed)."""
    import types

    from lorafleet_adapters import verified_read

    path = tmp_path / "f.bin"
    data = os.urandom(4096)
    write_old(path, data)
    files = VerifiedFiles(min_age_seconds=0)
    files.read(path, digest(data), "k", max_bytes=len(data))  # hashed, then trusted by identity
    real_fstat = os.fstat
    calls: list[int] = []

    def rewritten_meanwhile(fd: int) -> object:
        st = real_fstat(fd)
        calls.append(fd)
        if len(calls) % 2:  # before the read: the trusted identity
            return st
        fields = {name: getattr(st, name) for name in dir(st) if name.startswith("st_")}
        return types.SimpleNamespace(**{**fields, "st_mtime_ns": st.st_mtime_ns + 1, "st_ctime_ns": st.st_ctime_ns + 1})

    monkeypatch.setattr(verified_read.os, "fstat", rewritten_meanwhile)
    with pytest.raises(AdapterFormatError, match="changed while it was being read"):
        files.read(path, digest(data), "k", max_bytes=len(data))


def test_changes_through_the_filesystem_are_hashed_again(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    data = os.urandom(4096)
    write_old(path, data)
    files = VerifiedFiles(min_age_seconds=0)
    assert files.read(path, digest(data), "k", max_bytes=4096).hashed
    stat = path.stat()
    tampered = bytearray(data)
    tampered[100] ^= 0xFF
    with open(path, "r+b") as handle:  # same size, same inode, and the mtime put back: only ctime tells
        handle.write(bytes(tampered))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(AdapterFormatError, match="checksum mismatch"):
        files.read(path, digest(data), "k", max_bytes=4096)
    # A replaced file (a new inode), even with the right bytes, is hashed again before it is trusted.
    replacement = tmp_path / "new.bin"
    write_old(replacement, data)
    os.replace(replacement, path)
    assert files.read(path, digest(data), "k", max_bytes=4096).hashed


def test_young_files_are_not_remembered(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    files = VerifiedFiles()  # the default: remembered only when its ctime is 2 s old
    assert files.read(path, digest(b"abc"), "k", max_bytes=3).hashed
    assert files.read(path, digest(b"abc"), "k", max_bytes=3).hashed
    assert len(files) == 0


def test_bounded_memo(tmp_path: Path) -> None:
    files = VerifiedFiles(max_entries=2, min_age_seconds=0)
    paths = []
    for i in range(3):
        path = tmp_path / f"f{i}"
        write_old(path, bytes([i]))
        paths.append(path)
        files.read(path, digest(bytes([i])), "k", max_bytes=1)
    assert len(files) == 2
    assert files.read(paths[0], digest(bytes([0])), "k", max_bytes=1).hashed  # the oldest was dropped
    assert not files.read(paths[2], digest(bytes([2])), "k", max_bytes=1).hashed


def test_oversized_and_special_files_refused_without_reading(tmp_path: Path) -> None:
    files = VerifiedFiles(min_age_seconds=0)
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * 100)
    with pytest.raises(AdapterFormatError, match="100 bytes, over the 99-byte cap"):
        files.read(big, digest(b"x" * 100), "k", max_bytes=99)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    done: list[BaseException] = []

    def read_fifo() -> None:
        try:
            files.read(fifo, digest(b""), "k", max_bytes=10)
        except BaseException as exc:  # the refusal is what the test wants; anything else fails below
            done.append(exc)

    thread = threading.Thread(target=read_fifo, daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "opening a FIFO blocked"
    assert isinstance(done[0], AdapterFormatError) and "not a regular file" in str(done[0])


def test_store_reload_checks_identity_and_still_catches_tampering(
    tmp_path: Path, adapter_dir: Path, spec: BaseModelSpec
) -> None:
    store = AdapterStore(tmp_path / "store")
    store._verified = VerifiedFiles(min_age_seconds=0)  # the fixture's files are milliseconds old
    key = store.import_peft(adapter_dir, "acme", "support", spec)
    time.sleep(0.05)
    first = store.load(key, spec)
    assert len(store._verified) == len(store.manifest(key).files)  # config, weights and README, each once
    again = store.load(key, spec)
    for name, (a, b) in first.modules.items():
        assert (again.modules[name][0] == a).all() and (again.modules[name][1] == b).all()
    path = store.version_dir(key) / WEIGHTS_FILE
    flip_last_byte_keeping_mtime(path)
    with pytest.raises(AdapterFormatError, match=r"checksum mismatch for adapter_model\.safetensors"):
        store.load(key, spec)


@pytest.mark.parametrize("where", ["tensor data", "header"])
def test_store_load_hashing_beside_the_parse_reports_the_checksum(
    tmp_path: Path, adapter_dir: Path, spec: BaseModelSpec, where: str
) -> None:
    """The weights file hashed on another thread (every size here) while its tensors are made: a byte
    changed in the data (parses fine) or in the header (the parse fails too) is a checksum error."""
    store = AdapterStore(tmp_path / "store")
    store._verified = VerifiedFiles(min_age_seconds=0, parallel_hash_min_bytes=0)
    key = store.import_peft(adapter_dir, "acme", "support", spec)
    path = store.version_dir(key) / WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    header_end = 8 + int.from_bytes(data[:8], "little")
    data[header_end + 3 if where == "tensor data" else 20] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(AdapterFormatError, match=r"checksum mismatch for adapter_model\.safetensors"):
        store.load(key, spec)
    assert len(store._verified) == 2  # config and README checked; the weights file never remembered


def test_reads_from_many_threads_keep_at_most_scratch_kept_buffers(tmp_path: Path) -> None:
    """Found by an outside review: every thread that ever loaded a large file kept its own read buffer
    (the version watcher, each admin call's thread), outside --host-cache-bytes. Six live threads, each
    having read a 4 MiB file, now leave SCRATCH_KEPT buffers behind, and the bytes read stay right."""
    import tracemalloc

    from lorafleet_adapters.verified_read import SCRATCH_KEPT

    size = 4 << 20
    paths = []
    for i in range(6):
        paths.append(tmp_path / f"{i}.bin")
        write_old(paths[-1], bytes([i]) * size)
    files = VerifiedFiles(min_age_seconds=0)
    done = threading.Barrier(len(paths) + 1)
    measured = threading.Event()
    errors: list[BaseException] = []

    def load(path: Path, value: int) -> None:
        try:
            check = files.start(path, digest(bytes([value]) * size), "k", max_bytes=size)
            assert check.use(lambda data: bytes(data[:1]) + bytes(data[-1:])) == bytes([value, value])
        except BaseException as exc:  # reported below
            errors.append(exc)
        done.wait(30)  # alive while the kept memory is measured: a thread's own buffer would still count
        measured.wait(30)

    tracemalloc.start()
    try:
        threads = [threading.Thread(target=load, args=(p, i)) for i, p in enumerate(paths)]
        for thread in threads:
            thread.start()
            time.sleep(0.05)  # one after the other, as separate loads are
        done.wait(30)
        kept, _ = tracemalloc.get_traced_memory()
    finally:
        measured.set()
        tracemalloc.stop()
    for thread in threads:
        thread.join(30)
    assert not errors, errors
    assert kept < (SCRATCH_KEPT + 1) * size, f"{kept / size:.1f} buffers of {size} bytes kept"
