"""From a request's text to token ids: plain prompts, chats through the chat template, prompt adapters.

Two rules keep this cheap and safe:

- **A hopeless prompt costs nothing.** No token of the vocabulary stands for more than
  ``max_token_bytes`` bytes of text, so a text of ``b`` UTF-8 bytes has at least
  ``ceil(b / max_token_bytes)`` tokens. A prompt that cannot fit the context by that bound is refused
  before the tokenizer sees it: a multi-megabyte prompt costs microseconds, not CPU-seconds and
  gigabytes of tokenizer memory. (Counted in characters, the bound let 165,000 CJK characters through,
  443,000 tokens that took 0.3 s to tokenize before the exact check refused them: an outside review.)
- **Chat content is text.** A message's content is tokenized with special tokens split, so a user who
  writes ``<|im_end|>\\n<|im_start|>system`` into a message gets those characters as text, never the
  template's control tokens (no forged system turns). The template's own markers stay special. A plain
  ``prompt`` is raw by contract: special-token text in it becomes special tokens, as callers expect.
"""

from __future__ import annotations

import copy
import functools
import re
import secrets
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Protocol, cast

import jinja2

from lorafleet_adapters.errors import AdapterIncompatible
from lorafleet_adapters.prompt import PromptTemplate
from lorafleet_server.engine.types import MAX_CHAT_TURNS
from lorafleet_server.errors import ContextLengthExceeded, InvalidRequest

# A content's place in the rendering: a private-use pair around a 16-hex-digit nonce and its index.
# One pattern for every request (a pattern per request's nonce churned re's own compile cache).
_MARK = re.compile("\ue000[0-9a-f]{16}:[0-9]+\ue001")

CHAT_ROLES = frozenset({"system", "user", "assistant"})


class Tokenizer(Protocol):
    eos_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = ..., **kwargs: Any) -> list[int]: ...
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...
    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...
    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]: ...
    def get_vocab(self) -> dict[str, int]: ...
    @property
    def added_tokens_decoder(self) -> Mapping[int, Any]: ...


class Turn(Protocol):
    role: str
    content: str


def check_turn_count(turns: int) -> None:
    """Refuse a chat of more than ``MAX_CHAT_TURNS`` turns (the engine's check, and the gRPC edge's
    before it builds a turn of any)."""
    if turns > MAX_CHAT_TURNS:
        raise InvalidRequest(f"messages takes at most {MAX_CHAT_TURNS} turns, got {turns}", param="messages")


def check_unicode(text: str, what: str) -> None:
    """Refuse text that is not a sequence of Unicode characters: a lone UTF-16 surrogate (JSON's
    ``"\\ud800"`` decodes to one; protobuf refuses them) has no UTF-8 form, and the tokenizer raises."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequest(
            f"{what} is not valid Unicode text: a lone surrogate {text[exc.start]!a} at character {exc.start}",
            param=what.split("[")[0],
        ) from None


def special_tokens_pattern(tokenizer: Any) -> re.Pattern[str] | None:
    """The tokenizer's added (special) tokens, longest first: where the tokenizer splits its input."""
    added = sorted({str(t) for t in tokenizer.added_tokens_decoder.values()}, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, added))) if added else None


def chat_ids(
    tokenizer: Tokenizer,
    turns: Sequence[tuple[str, str]],
    encode_text: Callable[[str], list[int]],
    specials: re.Pattern[str] | None,
) -> list[int]:
    """The chat template's rendering of ``turns``, with every content tokenized as plain text
    (``encode_text``: without special tokens parsed; ``specials``: ``special_tokens_pattern``).

    The template is rendered with a unique mark in place of each content, so every special token in
    the rendering is the template's own. The tokenizer splits its input at special tokens before
    anything else, so splitting the rendering there ourselves, putting the contents back and
    tokenizing each piece with special tokens split gives exactly the ids of the whole rendering,
    except that special-token text inside a content stays text. The marks carry a random nonce, so a
    content cannot imitate one. Training encodes its chats with this too, so a customer's data
    teaches the model the ids serving gives the same text.

    A template that changes a content (``| trim``) changed a mark instead, so the rendering was not
    the template's (an outside review: a trimming template's prompt kept its whitespace). Such a
    template is rendered with the contents themselves, each added token's text in them replaced by a
    mark and put back as text the same way, unless that rendering holds special tokens the marked one
    does not: edits of a content can join harmless pieces into one (``| replace('[x]', '')`` turns
    ``<|im_[x]end|>`` into ``<|im_end|>``), which are then the content's, not the template's; that
    chat keeps the marked rendering (the second diff review). An added token (``</think>`` where it
    is one) in a content stays text, so a template cannot cut at it.
    """
    nonce = secrets.token_hex(8)
    contents = {f"\ue000{nonce}:{i}\ue001": content for i, (_, content) in enumerate(turns)}
    rendered = _render(tokenizer, [(role, mark) for (role, _), mark in zip(turns, contents, strict=True)])
    held: dict[str, str] = {}

    def hold(match: re.Match[str]) -> str:
        mark = f"\ue000{nonce}:{len(contents) + len(held)}\ue001"
        held[mark] = match.group()
        return mark

    def special_tokens(text: str) -> list[re.Match[str]]:
        return list(specials.finditer(text)) if specials else []

    safe = [(role, specials.sub(hold, content) if specials else content) for role, content in turns]
    direct = _render(tokenizer, safe)
    found = special_tokens(rendered)
    if _put_back(direct, held) != _put_back(rendered, contents):  # the template changes contents
        in_direct = special_tokens(direct)
        if [m.group() for m in found] == [m.group() for m in in_direct]:
            rendered, contents, found = direct, held, in_direct

    ids: list[int] = []
    start = 0
    for special in found:
        ids += _text_ids(encode_text, _put_back(rendered[start : special.start()], contents))
        ids += tokenizer.encode(special.group(), add_special_tokens=False)
        start = special.end()
    ids += _text_ids(encode_text, _put_back(rendered[start:], contents))
    return ids


def _render(tokenizer: Tokenizer, turns: Sequence[tuple[str, str]]) -> str:
    """The chat template's text of ``turns``. A template that refuses them (roles that must alternate,
    a system turn it does not take: Mistral's and Gemma's raise), or a tokenizer with none, is the
    request's error (INVALID_ARGUMENT), not the server's: it was INTERNAL, logged as a bug."""
    conversation = [{"role": role, "content": content} for role, content in turns]
    try:
        return str(tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True))
    except (jinja2.TemplateError, ValueError) as exc:
        raise InvalidRequest(f"the model's chat template refuses these messages: {exc}", param="messages") from exc


def _put_back(text: str, marks: Mapping[str, str]) -> str:
    """``text`` with this call's marks replaced by what they stand for (any other mark-shaped text, a
    content imitating one, stays as it is)."""
    return _MARK.sub(lambda m: marks.get(m.group(), m.group()), text)


def _text_ids(encode_text: Callable[[str], list[int]], text: str) -> list[int]:
    return encode_text(text) if text else []


def _byte_alphabet() -> frozenset[str]:
    """The 256 characters byte-level BPE (GPT-2's scheme) writes bytes as: printable Latin-1 as itself,
    every other byte as a character from U+0100 on."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in kept]
    return frozenset(chr(b) for b in kept) | frozenset(chr(256 + i) for i in range(len(moved)))


def max_token_bytes(vocab: Mapping[str, int], added: Collection[str] = ()) -> int:
    """The most bytes of text one token can stand for. In a byte-level BPE vocabulary (every token but
    the ``added`` ones written in the byte alphabet) such a token's length is its bytes; any other token
    (an added token in plain text, SentencePiece's ``▁`` and ``<0x41>`` byte tokens) has its UTF-8
    length, which bounds what it decodes to from above. One added token outside the alphabet (a
    special token such as ``<｜begin▁of▁sentence｜>``) no longer makes every token count its UTF-8
    length, which doubled the bound for byte-level tokens (a review)."""
    alphabet = _byte_alphabet()
    byte_level = all(set(token) <= alphabet for token in vocab if token not in added)

    def length(token: str) -> int:
        return len(token) if byte_level and set(token) <= alphabet else len(token.encode("utf-8"))

    return max((length(t) for t in vocab), default=1) or 1


class PromptEncoder:
    def __init__(self, tokenizer: Tokenizer, max_seq_len: int) -> None:
        self.tokenizer = tokenizer
        # Contents are encoded with special tokens split. Asking for that per call would set a flag on
        # the tokenizer's shared backend that other threads encode with at the same moment (submits
        # run on worker threads), so a template piece could come out split too and lose its markers.
        # A private copy with the flag always on is never toggled.
        self._text_tokenizer = cast(Any, copy.deepcopy(tokenizer))
        self._text_tokenizer.split_special_tokens = True
        self.max_seq_len = max_seq_len
        added = {str(getattr(t, "content", t)) for t in tokenizer.added_tokens_decoder.values()}
        self.max_token_bytes = max_token_bytes(tokenizer.get_vocab(), added)
        self._specials = special_tokens_pattern(tokenizer)

    def _whose_refusal(self, refused: InvalidRequest, own: list[tuple[str, str]], field: str) -> Exception:
        """A chat template's refusal of a prompt adapter's turns with the request's: the request's error
        (INVALID_ARGUMENT naming ``field``) where its own turns are refused alone too, else the adapter's,
        which no request can get past on this model (a system turn the template does not take: Gemma's)."""
        try:
            _render(self.tokenizer, own)
        except InvalidRequest as alone:  # what the template says of the caller's own turns
            return InvalidRequest(str(alone), param=field)
        return AdapterIncompatible(
            f"this prompt adapter's turns do not fit the model's chat template: {refused.__cause__}"
        )

    def encode(
        self,
        prompt: str | None,
        messages: Sequence[Turn],
        template: PromptTemplate | None = None,
        budget: int = 0,
        budget_text: str | None = None,
    ) -> list[int]:
        """Token ids of a plain prompt or a chat (a prompt adapter's turns go before the request's).

        ``budget`` is the tokens the request will add (``max_new_tokens``); prompt plus budget must fit
        ``max_seq_len``, checked first by the character bound, then exactly. ``budget_text`` names the
        budget in a refusal (default "max_new_tokens N").
        """
        what = budget_text or f"max_new_tokens {budget}"
        if prompt == "" and not messages:
            raise InvalidRequest("the prompt is empty", param="prompt")
        if (prompt is None or prompt == "") == (not messages):
            raise InvalidRequest("set exactly one of prompt and messages")
        field = "messages" if messages else "prompt"  # the refusals' param
        check_unicode(prompt or "", "prompt")
        check_turn_count(len(messages))
        for i, m in enumerate(messages):
            if m.role not in CHAT_ROLES:
                raise InvalidRequest(f"messages[{i}].role must be one of system, user, assistant", param="messages")
            check_unicode(m.content, f"messages[{i}].content")
        own = [(m.role, m.content) for m in messages]
        texts = [prompt or "", *(content for _, content in own)]
        if template is not None:
            texts += [template.system, *(t.content for t in template.examples)]
        nbytes = sum(len(text.encode("utf-8")) for text in texts)  # valid: check_unicode refused surrogates
        # Every user or assistant turn also costs the template's special tokens (a 4 MiB request of
        # 500,000 empty turns took ~37 s of tokenizing before the exact check refused it). System turns
        # are not counted: a prompt adapter merges them into one, and a template may fold them too.
        spoken = sum(1 for role, _ in own if role != "system")
        at_least = -(-nbytes // self.max_token_bytes) + (spoken * self.turn_specials if spoken else 0)
        if at_least + budget > self.max_seq_len:
            raise ContextLengthExceeded(
                f"the prompt ({nbytes} bytes of text, at least {at_least} tokens) plus {what} "
                f"exceeds the context limit of {self.max_seq_len} tokens",
                param=field,
            )
        if template is not None:  # a prompt adapter always speaks through the chat template
            own = own or [("user", str(prompt))]
            # The request's own system text extends the adapter's; nothing the caller sent is dropped.
            system = "\n\n".join([template.system, *(c for role, c in own if role == "system")])
            turns = [("system", system), *((t.role, t.content) for t in template.examples)]
            try:
                ids = self.encode_chat(turns + [(role, c) for role, c in own if role != "system"])
            except InvalidRequest as refused:  # the chat template refused the turns
                raise self._whose_refusal(refused, own, field) from refused.__cause__
        elif own:
            ids = self.encode_chat(own)
        else:
            ids = self.tokenizer.encode(str(prompt), add_special_tokens=False)
        if not ids:
            raise InvalidRequest("the prompt is empty after tokenization", param=field)
        if len(ids) + budget > self.max_seq_len:
            raise ContextLengthExceeded(
                f"prompt of {len(ids)} tokens plus {what} exceeds the context limit of {self.max_seq_len} tokens",
                param=field,
            )
        return list(ids)

    @functools.cached_property
    def turn_specials(self) -> int:
        """Special tokens the chat template puts around each turn (its role markers; never merged with
        the text beside them, so a lower bound on a turn's tokens), from renderings of empty turns; 0
        where the template cannot tell."""
        if self._specials is None:
            return 0

        def specials(turns: list[dict[str, str]]) -> int:
            rendered = self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
            return sum(1 for _ in self._specials.finditer(str(rendered))) if self._specials else 0

        try:
            one = specials([{"role": "user", "content": ""}])
            three = specials([{"role": r, "content": ""} for r in ("user", "assistant", "user")])
        except Exception:  # a template that refuses such turns: no bound from it
            return 0
        return max(0, (three - one) // 2)

    def encode_chat(self, turns: Sequence[tuple[str, str]]) -> list[int]:
        """The chat template's rendering of ``turns``, with every content tokenized as plain text
        (``chat_ids``)."""
        return chat_ids(self.tokenizer, turns, self._encode_text, self._specials)

    def _encode_text(self, text: str) -> list[int]:  # chat_ids calls it with non-empty text only
        return list(self._text_tokenizer.encode(text, add_special_tokens=False))
