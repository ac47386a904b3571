"""Training data: JSONL of chat turns or prompt/completion pairs, its fingerprint and its split.

Each non-blank line is one JSON object, either::

    {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}   # last turn: assistant
    {"prompt": str, "completion": str}

The last assistant turn (or ``completion``) is what the model learns to produce; everything before it
is the prompt. Every bad line is collected (with its line number) and reported at once, before any
model is loaded. ``id`` and ``metadata`` keys are allowed and ignored; any other key is refused, so a
typo ("completions") is not silently dropped.
"""

from __future__ import annotations

import hashlib
import json
import random
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lorafleet_adapters.errors import AdapterFormatError
from lorafleet_adapters.prompt import PromptTemplate, PromptTurn
from lorafleet_adapters.strict_json import unique_keys
from lorafleet_training.errors import DataIssue, TrainingDataError

ROLES = ("system", "user", "assistant")
_IGNORED_KEYS = frozenset({"id", "metadata"})
MAX_LINE_BYTES = 1 << 20


@dataclass(frozen=True)
class Turn:
    role: str
    content: str


@dataclass(frozen=True)
class Example:
    """One training example: a chat context (``turns``) or a plain-text ``prompt``, and its completion."""

    line: int  # 1-based line in the source file
    completion: str
    turns: tuple[Turn, ...] | None = None  # chat: every turn before the completion
    prompt: str | None = None  # plain text: the prompt, used verbatim (no chat template)

    def __post_init__(self) -> None:
        if (self.turns is None) == (self.prompt is None):
            raise ValueError("an Example has exactly one of turns and prompt")

    @property
    def is_chat(self) -> bool:
        return self.turns is not None

    def texts(self) -> list[tuple[str, str]]:
        """(field, text) of every piece of text, named as in the source line (for reports and redaction)."""
        if self.turns is not None:
            fields = [(f"messages[{i}].content", t.content) for i, t in enumerate(self.turns)]
            return [*fields, (f"messages[{len(self.turns)}].content", self.completion)]
        assert self.prompt is not None
        return [("prompt", self.prompt), ("completion", self.completion)]

    def with_texts(self, texts: Mapping[str, str]) -> Example:
        """A copy with the fields named in `texts` (as from ``texts()``) replaced."""
        if self.turns is not None:
            n = len(self.turns)
            turns = tuple(
                Turn(t.role, texts.get(f"messages[{i}].content", t.content)) for i, t in enumerate(self.turns)
            )
            return replace(self, turns=turns, completion=texts.get(f"messages[{n}].content", self.completion))
        return replace(
            self,
            prompt=texts.get("prompt", self.prompt),
            completion=texts.get("completion", self.completion),
        )

    def to_json(self) -> dict[str, Any]:
        """The example as a JSONL object (chat examples get their completion back as the last turn)."""
        if self.turns is not None:
            turns = [{"role": t.role, "content": t.content} for t in self.turns]
            return {"messages": [*turns, {"role": "assistant", "content": self.completion}]}
        return {"prompt": self.prompt, "completion": self.completion}

    def chat_messages(self) -> list[dict[str, str]]:
        """The prompt side as chat messages (plain-text prompts become one user turn)."""
        if self.turns is not None:
            return [{"role": t.role, "content": t.content} for t in self.turns]
        assert self.prompt is not None
        return [{"role": "user", "content": self.prompt}]


def load_jsonl(path: Path) -> list[Example]:
    """Parse `path`; raise TrainingDataError listing every bad line (or an empty/unreadable file)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise TrainingDataError(str(path), [DataIssue(0, f"cannot read the file: {exc.strerror or exc}")]) from None
    raw = raw.removeprefix(UTF8_BOM)
    # Lines end in LF (CRLF leaves a CR that JSON reads as whitespace); a file of CR-only line ends (classic
    # Mac) was one line, refused as "Extra data". A raw CR cannot be inside a JSON string, so it is a break.
    return parse_jsonl(raw.split(b"\n" if b"\n" in raw or b"\r" not in raw else b"\r"), str(path))


def parse_jsonl(lines: Iterable[bytes | str], source: str = "<data>") -> list[Example]:
    """Parse JSONL lines (without newlines); every problem is collected before raising."""
    examples: list[Example] = []
    issues: list[DataIssue] = []
    for number, raw in enumerate(lines, start=1):
        try:
            text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        except UnicodeDecodeError as exc:
            issues.append(DataIssue(number, f"not valid UTF-8 ({exc.reason} at byte {exc.start})"))
            continue
        if not text.strip():
            continue
        if len(text.encode("utf-8")) > MAX_LINE_BYTES:
            issues.append(DataIssue(number, f"line is longer than {MAX_LINE_BYTES} bytes"))
            continue
        try:
            obj = loads_unique(text)
        except json.JSONDecodeError as exc:
            issues.append(DataIssue(number, f"invalid JSON: {exc.msg} (column {exc.colno})"))
            continue
        except RecursionError:
            issues.append(DataIssue(number, "invalid JSON: nested too deeply"))
            continue
        except ValueError as exc:  # an integer of more digits than Python converts (4,300)
            issues.append(DataIssue(number, f"invalid JSON: {exc}"))
            continue
        if (surrogate := lone_surrogate(obj)) is not None:  # "\ud800" parses, but has no UTF-8 form
            issues.append(DataIssue(number, f"a string holds a lone surrogate ({surrogate}): not Unicode text"))
            continue
        try:
            examples.append(_example(obj, number))
        except _BadLine as exc:
            issues.append(DataIssue(number, str(exc)))
    if not examples and not issues:
        issues.append(DataIssue(0, "no examples: the file is empty"))
    if issues:
        raise TrainingDataError(source, issues)
    return examples


class _BadLine(ValueError):
    pass


def _example(obj: Any, line: int) -> Example:
    if not isinstance(obj, dict):
        raise _BadLine(f"expected a JSON object, got {type(obj).__name__}")
    keys = set(obj) - _IGNORED_KEYS
    if "messages" in keys:
        extra = sorted(keys - {"messages"})
        if extra:
            raise _BadLine(f"unexpected keys {extra} next to 'messages'")
        return _chat_example(obj["messages"], line)
    if keys == {"prompt", "completion"}:
        prompt, completion = obj["prompt"], obj["completion"]
        for name, value in (("prompt", prompt), ("completion", completion)):
            if not isinstance(value, str):
                raise _BadLine(f"'{name}' must be a string, got {type(value).__name__}")
        if not prompt.strip():
            raise _BadLine("'prompt' is empty")
        if not completion.strip():
            raise _BadLine("'completion' is empty")
        return Example(line=line, prompt=prompt, completion=completion)
    if keys & {"prompt", "completion"}:
        missing = sorted({"prompt", "completion"} - keys)
        extra = sorted(keys - {"prompt", "completion"})
        parts = [f"missing {missing}" if missing else "", f"unexpected keys {extra}" if extra else ""]
        raise _BadLine("a prompt/completion line " + " and ".join(p for p in parts if p))
    raise _BadLine(f"expected 'messages' or 'prompt' and 'completion'; found keys {sorted(keys)}")


def _chat_example(messages: Any, line: int) -> Example:
    if not isinstance(messages, list) or not messages:
        raise _BadLine("'messages' must be a non-empty list of {role, content} objects")
    turns: list[Turn] = []
    for i, turn in enumerate(messages):
        if not isinstance(turn, dict):
            raise _BadLine(f"messages[{i}] must be an object, got {type(turn).__name__}")
        extra = sorted(set(turn) - {"role", "content"})
        if extra:
            raise _BadLine(f"messages[{i}] has unexpected keys {extra}")
        role, content = turn.get("role"), turn.get("content")
        if role not in ROLES:
            raise _BadLine(f"messages[{i}].role is {role!r}; expected one of {list(ROLES)}")
        if not isinstance(content, str):
            raise _BadLine(f"messages[{i}].content must be a string")
        if role == "system" and i != 0:
            raise _BadLine(f"messages[{i}] is a system turn; only the first turn may be one")
        turns.append(Turn(role, content))
    if turns[-1].role != "assistant":
        raise _BadLine(f"the last turn is {turns[-1].role!r}; it must be the assistant's answer (the completion)")
    if not turns[-1].content.strip():
        raise _BadLine("the last assistant turn is empty")
    if not any(t.role == "user" for t in turns[:-1]):
        raise _BadLine("no user turn before the assistant's answer")
    return Example(line=line, turns=tuple(turns[:-1]), completion=turns[-1].content)


def loads_unique(text: str | bytes) -> Any:
    """``json.loads``, refusing an object that names a key twice (ValueError): json.loads kept the last
    value in silence, so ``{"label": "x", "label": "y"}`` trained as "y" (an outside review)."""
    return json.loads(text, object_pairs_hook=unique_keys)


def lone_surrogate(value: Any) -> str | None:
    """The first lone UTF-16 surrogate in a parsed JSON value's strings (keys included), escaped."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                return ascii(item[exc.start])
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def fingerprint(examples: Sequence[Example]) -> str:
    """sha256 of the normalized examples in order: canonical JSON of each, NFC-normalized text."""
    digest = hashlib.sha256()
    for example in examples:
        normalized = _nfc(example.to_json())
        digest.update(json.dumps(normalized, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode())
        digest.update(b"\n")
    return "sha256:" + digest.hexdigest()


def _nfc(value: Any) -> Any:
    if isinstance(value, str):
        return unicodedata.normalize("NFC", value)
    if isinstance(value, list):
        return [_nfc(v) for v in value]
    if isinstance(value, dict):
        return {k: _nfc(v) for k, v in value.items()}
    return value


UTF8_BOM = b"\xef\xbb\xbf"  # what Excel and Notepad put before UTF-8 text; the file was refused for it
MAX_SEED = 2**32 - 1  # a training seed: what every consumer of it takes (scikit-learn's random_state)


def prompt_key(example: Example) -> str:
    """The example's prompt side, NFC-normalized, as one string: examples with equal keys ask the same."""
    return json.dumps(_nfc(example.chat_messages()), sort_keys=True, ensure_ascii=False)


def split(examples: Sequence[Example], val_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Deterministic (train, validation) split by `seed`; both keep file order.

    Examples with the same prompt (``prompt_key``: repeated lines, or the same question with another
    answer) stay on one side: split one by one, a repeated example was scored on held-out data it had
    been trained on, and the quality gates read a loss that leak made lower. Groups are chosen in a
    seeded order to come as close to ``val_fraction`` of the examples as whole groups allow
    (``choose_groups``: a large group is skipped while smaller ones can still meet the target); with two
    or more groups and a positive fraction each side gets at least one, and with one group nothing can be
    held out. ``held_out_warning`` says when the groups forced a share far above the fraction.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    groups = group_by_prompt(examples)
    n = len(examples)
    if len(groups) < 2 or val_fraction == 0.0:
        return list(examples), []
    held = held_out_groups(groups, held_out_target(n, val_fraction), random.Random(seed))
    train = [e for i, e in enumerate(examples) if i not in held]
    val = [e for i, e in enumerate(examples) if i in held]
    return train, val


def held_out_target(n: int, val_fraction: float) -> int:
    """How many of `n` examples a split at `val_fraction` aims to hold out (at least one)."""
    return max(1, round(n * val_fraction))


FAR_ABOVE_TARGET = 2  # a held-out count over this many times the target is reported (held_out_warning)


def held_out_warning(n: int, held: int, val_fraction: float, what: str = "examples") -> str | None:
    """A warning when whole same-prompt groups made the held-out share far above `val_fraction`
    (over ``FAR_ABOVE_TARGET`` times ``held_out_target``), else None."""
    if not held or held <= FAR_ABOVE_TARGET * held_out_target(n, val_fraction):
        return None
    return (
        f"warning: {held} of {n} {what} ({held / n:.0%}) are held out, far above --val-fraction {val_fraction:g}: "
        "examples with the same prompt stay on one side of the split and the groups are too large to get closer; "
        "pass --eval-data to choose the held-out examples yourself"
    )


def overlap(train_set: Sequence[Example], val_set: Sequence[Example]) -> int:
    """How many of `val_set` ask a prompt (``prompt_key``) that also occurs in `train_set`."""
    seen = {prompt_key(e) for e in train_set}
    return sum(prompt_key(e) in seen for e in val_set)


def group_by_prompt(examples: Sequence[Example]) -> list[list[int]]:
    """The examples' indices grouped by ``prompt_key``, groups in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for i, example in enumerate(examples):
        groups.setdefault(prompt_key(example), []).append(i)
    return list(groups.values())


def held_out_groups(groups: Sequence[Sequence[int]], want: int, rng: random.Random) -> set[int]:
    """Indices of whole groups to hold out, about ``want`` of them (``choose_groups``); at least one group
    is taken and some group always left to train on (callers pass two or more)."""
    total = sum(len(g) for g in groups)
    held: set[int] = set()

    def take(g: int) -> bool:
        if total - len(held) - len(groups[g]) <= 0:  # training would be empty
            return False
        held.update(groups[g])
        return True

    choose_groups([len(g) for g in groups], want, rng, take)
    return held


def choose_groups(sizes: Sequence[int], want: int, rng: random.Random, take: Callable[[int], bool]) -> int:
    """Hold out groups (by index into `sizes`) to come as close to `want` examples as whole groups allow;
    returns how many were held out.

    The groups are visited in an order shuffled by `rng`; each one that still fits (held + size <=
    `want`) is offered to `take`, which holds it out and returns True, or refuses it (it would leave a
    side without examples) and returns False. A group that would overshoot is skipped while others can
    still meet the target: taken in order until the target was reached, one group of 60 same-prompt rows
    among 40 others was the whole held-out set at --val-fraction 0.1. Still short after that, the
    smallest group left is offered when it lands at least as close to `want` as stopping short does, or
    when nothing is held out yet (every split with two or more groups holds one out).
    """
    order = list(range(len(sizes)))
    rng.shuffle(order)
    held = 0
    taken: set[int] = set()
    for g in order:
        if held >= want:
            break
        if held + sizes[g] <= want and take(g):
            held += sizes[g]
            taken.add(g)
    if held < want:
        position = {g: i for i, g in enumerate(order)}
        for g in sorted((g for g in order if g not in taken), key=lambda g: (sizes[g], position[g])):
            if held and held + sizes[g] - want > want - held:
                break  # this group, and every larger one, overshoots more than stopping here falls short
            if take(g):
                held += sizes[g]
                break
    return held


def apply_template(template: PromptTemplate, messages: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    """The turns the server renders for a prompt adapter (server/engine ``encode_prompt``, same order):
    one system turn (the template's, then the request's own system text, joined by a blank line), the
    few-shot turns, then the request's other turns.
    """
    own = [dict(m) for m in messages]
    system = "\n\n".join([template.system, *(m["content"] for m in own if m["role"] == "system")])
    shots = [{"role": t.role, "content": t.content} for t in template.examples]
    return [{"role": "system", "content": system}, *shots, *(m for m in own if m["role"] != "system")]


def template_to_dict(template: PromptTemplate) -> dict[str, Any]:
    return {"system": template.system, "examples": [{"role": t.role, "content": t.content} for t in template.examples]}


def parse_prompt_template(obj: Any, source: str = "<prompt>") -> PromptTemplate:
    """Validate ``{"system": str, "examples": [{"role": "user"|"assistant", "content": str}, ...]}``.

    Few-shot turns alternate user/assistant, starting with user and ending with assistant; the system
    prompt is required (the store's ``PromptTemplate`` needs one). Every problem is listed at once.
    """
    issues: list[DataIssue] = []
    if not isinstance(obj, dict):
        raise TrainingDataError(source, [DataIssue(0, "a prompt template must be a JSON object")])
    extra = sorted(set(obj) - {"system", "examples"})
    if extra:
        issues.append(DataIssue(0, f"unexpected keys {extra}; expected 'system' and 'examples'"))
    system = obj.get("system", "")
    if not isinstance(system, str):
        issues.append(DataIssue(0, "'system' must be a string"))
        system = ""
    raw_examples = obj.get("examples", [])
    turns: list[PromptTurn] = []
    if not isinstance(raw_examples, list):
        issues.append(DataIssue(0, "'examples' must be a list of {role, content} objects"))
        raw_examples = []
    for i, turn in enumerate(raw_examples):
        expected = "user" if i % 2 == 0 else "assistant"
        if not isinstance(turn, dict) or set(turn) != {"role", "content"}:
            issues.append(DataIssue(0, f"examples[{i}] must be an object with exactly 'role' and 'content'"))
            continue
        if turn["role"] != expected:
            issues.append(
                DataIssue(0, f"examples[{i}].role is {turn['role']!r}; expected {expected!r} (turns alternate)")
            )
        if not isinstance(turn["content"], str) or not turn["content"].strip():
            issues.append(DataIssue(0, f"examples[{i}].content must be a non-empty string"))
            continue
        turns.append(PromptTurn(str(turn["role"]), turn["content"]))
    if len(raw_examples) % 2:
        issues.append(DataIssue(0, "the few-shot examples must end with an assistant turn"))
    if not system.strip():
        issues.append(DataIssue(0, "'system' must be a non-empty string (the prompt adapter's system prompt)"))
    if issues:
        raise TrainingDataError(source, issues)
    try:
        return PromptTemplate(system=system, examples=tuple(turns))
    except AdapterFormatError as exc:  # e.g. over the size cap
        raise TrainingDataError(source, [DataIssue(0, str(exc))]) from None


def load_prompt_template(path: Path) -> PromptTemplate:
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise TrainingDataError(str(path), [DataIssue(0, f"cannot read the file: {exc.strerror or exc}")]) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise TrainingDataError(str(path), [DataIssue(0, f"invalid JSON: {exc}")]) from None
    return parse_prompt_template(obj, str(path))
