"""Incremental detokenization: emit only complete text as tokens arrive.

Decoding each token alone breaks multi-byte characters (split across byte-level tokens) and the
tokenizer's merged spaces. We decode a small window of recent tokens twice (with and without the
new ones) and emit the difference, holding back text that ends in an incomplete character.
"""

from __future__ import annotations

from typing import Protocol


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Decoder, prompt_tail: list[int] | None = None) -> None:
        self._tok = tokenizer
        # A few prompt tokens give the decoder the left context for leading-space handling.
        self._ids: list[int] = list(prompt_tail or [])[-4:]
        self._prefix = 0  # start of the decode window: the first token is decoded after the prompt tail
        self._read = len(self._ids)  # tokens already turned into emitted text

    def push(self, token_id: int) -> str:
        """Add one token; return the newly complete text (may be empty)."""
        self._ids.append(token_id)
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read], skip_special_tokens=True)
        full_text = self._tok.decode(self._ids[self._prefix :], skip_special_tokens=True)
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            new = full_text[len(prefix_text) :]
            self._prefix = self._read
            self._read = len(self._ids)
            return new
        return ""

    def flush(self) -> str:
        """Text still held back at the end (an incomplete character is emitted as decoded)."""
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read], skip_special_tokens=True)
        full_text = self._tok.decode(self._ids[self._prefix :], skip_special_tokens=True)
        self._prefix = self._read = len(self._ids)
        return full_text[len(prefix_text) :]


class StopMatcher:
    """Finds stop strings across chunk boundaries and holds back a possible stop prefix."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was found)."""
        if not self._stops:
            return text, False
        buf = self._pending + text
        hits = [i for i in (buf.find(s) for s in self._stops) if i >= 0]
        if hits:
            self._pending = ""
            return buf[: min(hits)], True
        hold = 0
        for s in self._stops:
            for k in range(min(len(s) - 1, len(buf)), 0, -1):
                if buf.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        self._pending = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        text, self._pending = self._pending, ""
        return text
