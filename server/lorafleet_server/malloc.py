"""glibc malloc's mmap threshold, fixed when the server starts.

glibc serves an allocation of at least the mmap threshold (128 KiB at first) with a mapping of its own,
returned to the system when freed; smaller ones come from its heaps. By default the threshold follows
the largest mapped block freed so far (up to 32 MiB): once a large temporary is freed (a step's logits
are megabytes), every allocation below its size comes from the heaps, where short-lived step tensors
and long-lived ones interleave and the heaps fragment. Under Zipf traffic over 1,000
adapters (``bench/zipf.py``) a bf16 server's RSS grew 7% after warm-up by default; with the threshold
fixed, 4,000-request runs grew 0.8% against 2.7% (docs/architecture.md, "Cold loads"). A fixed
threshold (``mallopt``) also turns the adjustment off. An operator's ``MALLOC_MMAP_THRESHOLD_`` wins;
elsewhere than glibc nothing is changed.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping

MMAP_THRESHOLD_BYTES = 512 * 1024
_M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>
_ENV = "MALLOC_MMAP_THRESHOLD_"


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD_BYTES, environ: Mapping[str, str] = os.environ) -> str:
    """Fix glibc's mmap threshold at ``threshold`` bytes; returns what was done, for the startup log."""
    if _ENV in environ:
        return f"{_ENV}={environ[_ENV]} from the environment"
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (only glibc has it; its mallopt is the one meant here)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "not glibc: malloc left as it is"
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    if mallopt(_M_MMAP_THRESHOLD, threshold) != 1:
        return f"glibc refused an mmap threshold of {threshold} bytes: left as it is"
    return f"mmap threshold fixed at {threshold} bytes"
