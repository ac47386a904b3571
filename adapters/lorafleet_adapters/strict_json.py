"""JSON objects that name a key twice, refused: ``json.loads`` keeps the last value in silence, so a
file could say one thing to a reader and another to us. One hook for every JSON document lorafleet
reads from outside (adapter configs, safetensors headers, manifests, prompt templates, head
descriptions, training records, keys files, training data)."""

from __future__ import annotations

from typing import Any


class DuplicateKey(ValueError):
    """An object names the same key twice."""


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` for ``json.loads``: the object, or DuplicateKey."""
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise DuplicateKey(f"key {key[:100]!r} is given twice in one object")
        obj[key] = value
    return obj
