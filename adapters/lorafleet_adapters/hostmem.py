"""Large host buffers that go back to the operating system when they are freed.

Adapter weights enter and leave the host cache in pieces of one to tens of megabytes, and every load
reads a file of that size first. Taken from malloc, such pieces stay in the allocator's heaps once
freed (glibc raises its mmap threshold after the first large free, so later ones come from arenas that
fragment as sizes mix): under Zipf traffic over 200 adapters with a 512 MiB host cache, the server's
RSS grew about 800 MiB past what the caches held (bench/zipf.py). An anonymous mapping is unmapped when
the last tensor or buffer viewing it is freed, so RSS follows what the host cache holds.
"""

from __future__ import annotations

import mmap
import warnings

import torch

MAPPED_MIN_BYTES = 1 << 20  # smaller buffers come from malloc, which serves them well

Buffer = bytes | bytearray | memoryview | mmap.mmap


def byte_buffer(size: int) -> bytearray | mmap.mmap:
    """A writable, zero-filled buffer of ``size`` bytes (mapped when large)."""
    if size < MAPPED_MIN_BYTES:
        return bytearray(size)
    return mmap.mmap(-1, size)


def empty(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised 1-D tensor of ``numel`` elements (mapped when large); the mapping lives as long
    as any view of the tensor."""
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if nbytes < MAPPED_MIN_BYTES:
        return torch.empty(numel, dtype=dtype)
    return as_tensor(_mapping(nbytes), dtype)


def _mapping(nbytes: int) -> mmap.mmap:
    """Anonymous private memory, populated in one call where the system can (MAP_POPULATE): it is
    written right away, and faulting 2,400 pages one by one cost 40-80 ms on the 2-core VM under load
    where populating them took 20-35 ms."""
    populate = getattr(mmap, "MAP_POPULATE", 0)
    if not populate:
        return mmap.mmap(-1, nbytes)
    return mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate)


def as_tensor(buffer: Buffer, dtype: torch.dtype) -> torch.Tensor:
    """``buffer`` viewed as a 1-D tensor of ``dtype`` without a copy (the tensor keeps it alive)."""
    if len(buffer) == 0:
        return torch.empty(0, dtype=dtype)
    with warnings.catch_warnings():  # a read-only buffer (bytes) warns; such views are only read
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(buffer, dtype=dtype)
