"""Bounds on oneDNN's per-shape caches; set before torch runs its first oneDNN primitive.

On the CPU, torch runs a bf16 matmul through oneDNN, which JIT-compiles a kernel for each distinct
shape and keeps it in two LRU caches: oneDNN's primitive cache (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``)
and ideep's primitive descriptors (``LRU_CACHE_CAPACITY``), 1,024 entries each by default. The LoRA
kernels that run in torch (model/lora.py: prompt chunks whose row count and adapter mix change from
step to step) meet a new shape every few seconds under many adapters, and each new entry held ~1.3 MB
(memray on a bf16 server on the AMX Xeon: JIT code, descriptors, B-copy kernels). At 1,024 entries that
is over a gigabyte RSS keeps climbing towards while new shapes come: a bf16 server grew +5.2% over
20,000 Zipf requests to 1,000 adapters and was still climbing; with both caches at 64 it grew +1.5%,
flat after warm-up, at the same throughput (docs/architecture.md, "oneDNN's per-shape caches").

64 is what the same traffic needs: a step runs at most ~10 distinct LoRA matmul shapes, and replaying
a recorded trace of the shapes through an LRU misses 76 times at 64 entries against 74 at 1,024 (the
first sight of each shape; 86 at 32). A miss costs ~0.8 ms of JIT. Where the base Linears are
oneDNN's prepacked fp32 call, each decode batch size is a shape as well; served fp32 runs with oneDNN
held to AVX2 kept their throughput at 64 (and 140-150 MiB less RSS).

Both variables are read when the first primitive is made, so :func:`bound_onednn_caches` runs at the
top of the ``lorafleet_server`` package. Values already in the environment are kept (an operator's
choice wins).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import MutableMapping

ONEDNN_CACHES = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64", "LRU_CACHE_CAPACITY": "64"}


def bound_onednn_caches(environ: MutableMapping[str, str] = os.environ) -> None:
    """Put ``ONEDNN_CACHES``' values into ``environ`` where absent. An ``LRU_CACHE_CAPACITY`` torch
    cannot take is replaced, with a warning: with 0 or a word, torch 2.13 crashes (SIGSEGV) on its first
    bf16 matmul; below 1 becomes 1 (the smallest cache), anything else not an integer this default."""
    for name, value in ONEDNN_CACHES.items():
        environ.setdefault(name, value)
    raw = environ["LRU_CACHE_CAPACITY"]
    try:
        fixed = None if int(raw) >= 1 else "1"
    except ValueError:
        fixed = ONEDNN_CACHES["LRU_CACHE_CAPACITY"]
    if fixed is not None:
        warnings.warn(f"LRU_CACHE_CAPACITY={raw!r} crashes torch's oneDNN matmuls; using {fixed}", stacklevel=2)
        environ["LRU_CACHE_CAPACITY"] = fixed


def onednn_cache_summary(environ: MutableMapping[str, str] = os.environ) -> str:
    """What this process's oneDNN caches were told, for the startup log."""
    return ", ".join(f"{name}={environ.get(name, '(unset)')}" for name in ONEDNN_CACHES)
