"""The server fixes glibc's mmap threshold at startup (malloc.py), unless the environment set it."""

from __future__ import annotations

import ctypes

import pytest

from lorafleet_server.malloc import MMAP_THRESHOLD_BYTES, fix_mmap_threshold


def _glibc() -> bool:
    try:
        return hasattr(ctypes.CDLL(None), "gnu_get_libc_version")
    except OSError:
        return False


def test_an_operators_setting_wins() -> None:
    assert fix_mmap_threshold(environ={"MALLOC_MMAP_THRESHOLD_": "1048576"}) == (
        "MALLOC_MMAP_THRESHOLD_=1048576 from the environment"
    )


@pytest.mark.skipif(not _glibc(), reason="glibc only")
def test_glibc_takes_the_threshold() -> None:
    assert fix_mmap_threshold(environ={}) == f"mmap threshold fixed at {MMAP_THRESHOLD_BYTES} bytes"
