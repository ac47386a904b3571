"""Prompt adapters: a version that is a system prompt plus few-shot turns instead of LoRA weights.

For customers with no training data (prompt-based transfer). The server applies it with the chat
template: system, then the examples, then the request's own turns.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafleet_adapters.errors import AdapterFormatError
from lorafleet_adapters.strict_json import unique_keys

PROMPT_FILE = "prompt.json"
MAX_PROMPT_BYTES = 256 * 1024
EXAMPLE_ROLES = ("user", "assistant")


@dataclass(frozen=True)
class PromptTurn:
    role: str
    content: str


@dataclass(frozen=True)
class PromptTemplate:
    system: str
    examples: tuple[PromptTurn, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.system, str) or not self.system.strip():
            raise AdapterFormatError("prompt adapter: 'system' must be a non-empty string")
        for i, turn in enumerate(self.examples):
            if turn.role not in EXAMPLE_ROLES or not isinstance(turn.content, str):
                raise AdapterFormatError(
                    f"prompt adapter: examples[{i}] needs role in {EXAMPLE_ROLES} and string content"
                )
        try:
            size = len(self.to_json().encode())
        except UnicodeEncodeError as exc:  # a lone surrogate (JSON's "\\ud800", or a shell's undecodable byte)
            raise AdapterFormatError(f"prompt adapter: its text is not Unicode text ({exc.reason})") from None
        if size > MAX_PROMPT_BYTES:
            raise AdapterFormatError(f"prompt adapter is larger than {MAX_PROMPT_BYTES} bytes")

    def to_json(self) -> str:
        return json.dumps(
            {"system": self.system, "examples": [{"role": t.role, "content": t.content} for t in self.examples]},
            indent=2,
            ensure_ascii=False,
        )

    @classmethod
    def from_json(cls, text: str) -> PromptTemplate:
        try:
            data: Any = json.loads(text, object_pairs_hook=unique_keys)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested past the parser's stack
            raise AdapterFormatError(f"{PROMPT_FILE} is not valid JSON: {exc}") from None
        if not isinstance(data, dict) or set(data) - {"system", "examples"}:
            raise AdapterFormatError(f"{PROMPT_FILE} must be an object with 'system' and optional 'examples'")
        examples = data.get("examples", [])
        if not isinstance(examples, list) or not all(
            isinstance(e, dict) and set(e) == {"role", "content"} for e in examples
        ):
            raise AdapterFormatError(f"{PROMPT_FILE}: 'examples' must be a list of {{role, content}} objects")
        system = data.get("system")
        if not isinstance(system, str):
            raise AdapterFormatError(f"{PROMPT_FILE}: 'system' must be a string")
        return cls(system=system, examples=tuple(PromptTurn(e["role"], e["content"]) for e in examples))

    @classmethod
    def read(cls, directory: Path) -> PromptTemplate:
        path = directory / PROMPT_FILE
        if not path.is_file():
            raise AdapterFormatError(f"{directory} has no {PROMPT_FILE}")
        if path.stat().st_size > MAX_PROMPT_BYTES:
            raise AdapterFormatError(f"{path} is larger than {MAX_PROMPT_BYTES} bytes")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise AdapterFormatError(f"{PROMPT_FILE} is not UTF-8: {exc}") from None
        return cls.from_json(text)
