"""Reading a safetensors header without materialising any tensor.

Layout: 8-byte little-endian header length N, N bytes of JSON, then the data buffer. Every tensor's
``data_offsets`` are relative to the buffer; together they must tile it exactly, as the safetensors
library itself requires, so a truncated or padded file is caught here with a clear message.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafleet_adapters.errors import AdapterFormatError
from lorafleet_adapters.hostmem import Buffer
from lorafleet_adapters.strict_json import unique_keys

# A LoRA's header names two tensors per wrapped module in ~120 bytes each: all seven Linears of an 80-layer
# model take ~140 KB. safetensors' own cap is 100 MB, but a parsed header takes ~20x its size in Python
# objects (30 MB of "[{},{}...]" metadata took 658 MB): 16 MB keeps a load of a hostile file near 350 MB.
MAX_HEADER_BYTES = 16 * 1000 * 1000
DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check the header of `path`; tensors are returned by name, in file order."""
    try:
        with open(path, "rb") as handle:
            file_size = handle.seek(0, 2)
            handle.seek(0)
            header_len = _header_length(path.name, handle.read(8), file_size)
            header_bytes = handle.read(header_len)
    except FileNotFoundError:
        raise AdapterFormatError(f"{path.name} is missing from {path.parent}") from None
    except OSError as exc:
        raise AdapterFormatError(f"cannot read {path.name}: {exc.strerror or exc}") from None
    tensors = _parse_entries(path.name, header_bytes)
    _check_tiling(path.name, tensors, file_size - 8 - header_len)
    return tensors


def header_bytes(file_name: str, data: Buffer) -> bytes:
    """The JSON header of a whole safetensors file held in ``data`` (its length checked, not parsed)."""
    header_len = _header_length(file_name, data, len(data))
    return bytes(data[8 : 8 + header_len])


def parse_header_bytes(file_name: str, data: Buffer) -> tuple[dict[str, TensorInfo], int]:
    """Parse and check the header of a whole safetensors file held in ``data``.

    Returns the tensors by name (file order) and where the data buffer starts in ``data``; every
    tensor's ``data_offsets`` are relative to that start, and together they tile the rest exactly.
    """
    header = header_bytes(file_name, data)
    tensors = _parse_entries(file_name, header)
    _check_tiling(file_name, tensors, len(data) - 8 - len(header))
    return tensors, 8 + len(header)


def _header_length(file_name: str, prefix: Buffer, file_size: int) -> int:
    """The header length in a safetensors file's first 8 bytes (``prefix`` may hold more), checked
    against the cap and against ``file_size``."""
    if len(prefix) < 8:
        raise AdapterFormatError(f"{file_name}: file is {file_size} bytes, too short for a safetensors header")
    (header_len,) = struct.unpack_from("<Q", prefix, 0)
    if header_len > MAX_HEADER_BYTES:
        raise AdapterFormatError(f"{file_name}: header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte cap")
    if 8 + header_len > file_size:
        raise AdapterFormatError(
            f"{file_name}: header declares {header_len} bytes but the file is only {file_size} bytes (truncated?)"
        )
    return int(header_len)


def _parse_entries(file_name: str, header_bytes: bytes) -> dict[str, TensorInfo]:
    try:
        header = json.loads(header_bytes.decode("utf-8"), object_pairs_hook=unique_keys)
    except (ValueError, RecursionError) as exc:
        raise AdapterFormatError(f"{file_name}: header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise AdapterFormatError(f"{file_name}: header must be a JSON object")
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        tensors[name] = _parse_entry(file_name, name, entry)
    return tensors


def _parse_entry(file_name: str, name: str, entry: Any) -> TensorInfo:
    if not isinstance(entry, dict):
        raise AdapterFormatError(f"{file_name}: header entry for tensor {name!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_BYTES:
        raise AdapterFormatError(
            f"{file_name}: tensor {name!r} has dtype {dtype!r}; only {sorted(DTYPE_BYTES)} are accepted"
        )
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise AdapterFormatError(f"{file_name}: tensor {name!r} has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise AdapterFormatError(f"{file_name}: tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    expected = math.prod(shape) * DTYPE_BYTES[dtype]
    if end < begin or end - begin != expected:
        raise AdapterFormatError(
            f"{file_name}: tensor {name!r} data_offsets {offsets} hold {end - begin} bytes; "
            f"shape {shape} of {dtype} needs {expected}"
        )
    return TensorInfo(name, dtype, tuple(shape), begin, end)


def _check_tiling(file_name: str, tensors: dict[str, TensorInfo], buffer_len: int) -> None:
    position = 0
    for info in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if info.begin != position:
            raise AdapterFormatError(
                f"{file_name}: tensor {info.name!r} starts at byte {info.begin} of the data buffer, "
                f"expected {position} "
                "(overlapping or gapped data_offsets)"
            )
        position = info.end
    if position > buffer_len:
        raise AdapterFormatError(
            f"{file_name}: header declares {position} bytes of tensor data "
            f"but the file holds only {buffer_len} "
            "(truncated?)"
        )
    if position < buffer_len:
        raise AdapterFormatError(
            f"{file_name}: {buffer_len - position} bytes after the last tensor's data (corrupted file?)"
        )


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
