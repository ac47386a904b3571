"""Helpers of the trainer's tests: small JSONL rows that even a random tiny model learns a little."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

WriteJsonl = Callable[[Path, Sequence[Any]], Path]

COLORS = ("red", "blue", "green", "amber", "violet", "teal", "silver", "coral")


def qa_rows(n: int = 16) -> list[dict[str, Any]]:
    """Alternating chat and prompt/completion rows with one-word answers."""
    rows: list[dict[str, Any]] = []
    for i in range(n):
        color = COLORS[i % len(COLORS)]
        if i % 2 == 0:
            rows.append(
                {
                    "messages": [
                        {"role": "system", "content": "You answer with one color."},
                        {"role": "user", "content": f"Which color is item {i}?"},
                        {"role": "assistant", "content": color},
                    ]
                }
            )
        else:
            rows.append({"prompt": f"Item {i} color:", "completion": f" {color}"})
    return rows


def write_jsonl(path: Path, rows: Sequence[Any]) -> Path:
    """Rows (objects, or raw strings written as they are) as a JSONL file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
