from __future__ import annotations

import json
from pathlib import Path

import pytest
from training_testlib import qa_rows, write_jsonl

from lorafleet_training.data import (
    Example,
    Turn,
    apply_template,
    fingerprint,
    load_jsonl,
    parse_jsonl,
    parse_prompt_template,
    prompt_key,
    split,
)
from lorafleet_training.errors import TrainingDataError


def test_both_formats_parse(tmp_path: Path) -> None:
    examples = load_jsonl(write_jsonl(tmp_path / "d.jsonl", qa_rows(4)))
    assert [e.is_chat for e in examples] == [True, False, True, False]
    chat, text = examples[0], examples[1]
    assert chat.turns == (Turn("system", "You answer with one color."), Turn("user", "Which color is item 0?"))
    assert chat.completion == "red"
    assert (text.prompt, text.completion, text.line) == ("Item 1 color:", " blue", 2)
    assert chat.to_json() == qa_rows(4)[0]


def test_every_bad_line_is_reported_with_its_number(tmp_path: Path) -> None:
    good = json.dumps(qa_rows(1)[0])
    lines = [
        good,
        "{not json",
        json.dumps([1, 2]),
        json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
        "",
        json.dumps({"prompt": "p"}),
        json.dumps({"prompt": "p", "completion": "c", "completions": "x"}),
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]}),
        json.dumps({"messages": [{"role": "assistant", "content": "a"}]}),
        json.dumps({"prompt": "p", "completion": "   "}),
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "system", "content": "s"},
                    {"role": "assistant", "content": "a"},
                ]
            }
        ),
        json.dumps({"id": 7, "prompt": "ok", "completion": "fine"}),
    ]
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(TrainingDataError) as info:
        load_jsonl(path)
    by_line = {issue.line: issue.message for issue in info.value.issues}
    assert sorted(by_line) == [2, 3, 4, 6, 7, 8, 9, 10, 11]
    assert "invalid JSON" in by_line[2]
    assert "expected a JSON object" in by_line[3]
    assert "must be the assistant's answer" in by_line[4]
    assert "missing ['completion']" in by_line[6]
    assert "completions" in by_line[7]
    assert "robot" in by_line[8]
    assert "no user turn" in by_line[9]
    assert "'completion' is empty" in by_line[10]
    assert "only the first turn" in by_line[11]
    assert "line 2:" in str(info.value) and "9 problem(s)" in str(info.value)


def test_lines_that_parse_badly_are_reported_not_raised(tmp_path: Path) -> None:
    """JSON that json.loads refuses with other errors than a JSONDecodeError, or accepts with strings
    that are not Unicode text: reported with their line, like any bad line (they were tracebacks)."""
    good = qa_rows(1)[0]
    lines = [
        json.dumps(good),
        '{"id": ' + "9" * 5000 + ', "prompt": "p", "completion": "c"}',  # past int conversion's digits
        '{"prompt": "p", "completion": "c", "metadata": ' + "[" * 100_000 + "]" * 100_000 + "}",
        json.dumps({"prompt": "p\ud800", "completion": "c"}),  # a lone surrogate: JSON's escape
    ]
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(TrainingDataError) as info:
        load_jsonl(path)
    by_line = {issue.line: issue.message for issue in info.value.issues}
    assert sorted(by_line) == [2, 3, 4]
    assert "invalid JSON" in by_line[2] and "nested too deeply" in by_line[3]
    assert "lone surrogate ('\\ud800')" in by_line[4]


def test_a_key_given_twice_is_refused_not_resolved_in_silence(tmp_path: Path) -> None:
    """json.loads keeps the last of two equal keys: the line trained on prompt "b" (an outside review)."""
    lines = [json.dumps(qa_rows(1)[0]), '{"prompt": "a", "prompt": "b", "completion": "c"}']
    with pytest.raises(TrainingDataError) as info:
        load_jsonl(write_jsonl(tmp_path / "twice.jsonl", lines))
    [issue] = info.value.issues
    assert issue.line == 2 and "key 'prompt' is given twice in one object" in issue.message


def test_empty_and_non_utf8_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(TrainingDataError, match="empty"):
        load_jsonl(empty)
    with pytest.raises(TrainingDataError) as info:
        parse_jsonl([json.dumps(qa_rows(1)[0]).encode(), b"\xff\xfe{}"])
    assert [i.line for i in info.value.issues] == [2]
    with pytest.raises(TrainingDataError, match="cannot read"):
        load_jsonl(tmp_path / "missing.jsonl")
    bom = tmp_path / "bom.jsonl"  # Excel and Notepad write one; the file was refused for it
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(qa_rows(1)[0]).encode() + b"\n")
    assert len(load_jsonl(bom)) == 1
    rows = [json.dumps(r).encode() for r in qa_rows(3)]
    for ending in (b"\r\n", b"\r"):  # Windows; classic Mac (was one line: "Extra data")
        path = tmp_path / "endings.jsonl"
        path.write_bytes(ending.join(rows) + ending)
        assert load_jsonl(path) == load_jsonl(write_jsonl(tmp_path / "lf.jsonl", qa_rows(3)))


def test_fingerprint_is_stable_and_content_sensitive() -> None:
    examples = parse_jsonl([json.dumps(r) for r in qa_rows(6)])
    again = parse_jsonl(["", *(json.dumps(r, indent=None, separators=(",", ":")) for r in qa_rows(6))])
    assert fingerprint(examples) == fingerprint(again)  # formatting and blank lines do not matter
    assert fingerprint(examples).startswith("sha256:")
    changed = [*examples[:-1], Example(line=6, prompt="Item 5 color:", completion=" BLUE")]
    assert fingerprint(changed) != fingerprint(examples)
    assert fingerprint(examples[::-1]) != fingerprint(examples)  # order is part of the data
    decomposed = [Example(line=1, prompt="Cafe\u0301", completion="x")]
    composed = [Example(line=1, prompt="Caf\u00e9", completion="x")]
    assert fingerprint(decomposed) == fingerprint(composed)  # NFC-normalized


def test_split_is_deterministic_and_keeps_both_sides() -> None:
    examples = parse_jsonl([json.dumps(r) for r in qa_rows(20)])
    train, val = split(examples, 0.1, seed=1)
    assert (len(train), len(val)) == (18, 2)
    assert split(examples, 0.1, seed=1) == (train, val)
    assert split(examples, 0.1, seed=2)[1] != val
    assert {e.line for e in train} | {e.line for e in val} == set(range(1, 21))
    two = examples[:2]
    assert [len(s) for s in split(two, 0.01, 0)] == [1, 1]
    assert [len(s) for s in split(two, 0.9, 0)] == [1, 1]
    assert [len(s) for s in split(examples[:1], 0.5, 0)] == [1, 0]
    assert [len(s) for s in split(examples, 0.0, 0)] == [20, 0]


def test_split_keeps_examples_of_one_prompt_on_one_side() -> None:
    """Split one by one, a repeated example (or the same question with another answer) was scored on
    held-out data it had trained on: 100 rows each 5 times held out 10, all 10 also in training."""
    rows = [r for r in qa_rows(20) for _ in range(5)]
    rows += [{**qa_rows(2)[1], "completion": "another answer"}]  # the second prompt once more
    examples = parse_jsonl([json.dumps(r) for r in rows])
    for seed in range(5):
        train, val = split(examples, 0.2, seed)
        assert {prompt_key(e) for e in train}.isdisjoint({prompt_key(e) for e in val}), seed
        assert len(val) in (20, 25) and len(train) + len(val) == len(examples)  # whole groups of 5 (or 6)
    same = parse_jsonl([json.dumps(qa_rows(1)[0])] * 4)
    assert [len(s) for s in split(same, 0.5, 0)] == [4, 0]  # one prompt: nothing can be held out
    two = parse_jsonl([json.dumps(r) for r in [qa_rows(2)[0]] * 3 + [qa_rows(2)[1]]])
    assert sorted(len(s) for s in split(two, 0.9, 0)) == [1, 3]  # never all of it held out


def test_split_skips_a_group_that_would_overshoot_the_held_out_target() -> None:
    """60 rows sharing one prompt and 40 distinct ones at --val-fraction 0.1 held out 60 (seed 0): the
    groups were taken in shuffled order until the target was reached, whatever they overshot it by."""
    from lorafleet_training.data import held_out_warning

    rows = [{"prompt": "What is our refund policy?", "completion": f"answer {i}"} for i in range(60)]
    rows += [{"prompt": f"Question {i}?", "completion": "yes"} for i in range(40)]
    examples = parse_jsonl([json.dumps(r) for r in rows])
    for seed in range(10):
        train, val = split(examples, 0.1, seed)
        assert (len(train), len(val)) == (90, 10), seed  # the big group would overshoot: ten distinct rows
        assert {prompt_key(e) for e in train}.isdisjoint({prompt_key(e) for e in val})
        assert held_out_warning(len(examples), len(val), 0.1) is None
    # groups of 7 and 7 leave 3 short of 10; the next (7, or the 60) would overshoot by more: stop short
    rows = [{"prompt": f"p{g}", "completion": f"c{i}"} for g, n in enumerate((60, 7, 7)) for i in range(n)]
    examples = parse_jsonl([json.dumps(r) for r in rows])
    assert all(len(split(examples, 0.135, seed)[1]) == 7 for seed in range(5))  # target 10: 7 beats 14 or 60
    # when only large groups exist one is still held out (the smallest), and the share is reported
    rows = [{"prompt": "a", "completion": f"x{i}"} for i in range(60)]
    rows += [{"prompt": "b", "completion": f"y{i}"} for i in range(40)]
    examples = parse_jsonl([json.dumps(r) for r in rows])
    train, val = split(examples, 0.1, 0)
    assert (len(train), len(val)) == (60, 40)
    warning = held_out_warning(len(examples), len(val), 0.1)
    assert warning is not None and "40 of 100 examples (40%)" in warning and "--eval-data" in warning


def test_overlap_counts_held_out_prompts_seen_in_training() -> None:
    from lorafleet_training.data import overlap

    train = parse_jsonl([json.dumps(r) for r in qa_rows(6)])
    held = parse_jsonl([json.dumps(r) for r in [qa_rows(6)[1], qa_rows(6)[4], *qa_rows(9)[6:]]])
    assert overlap(train, held) == 2
    assert overlap(train, []) == 0


def test_prompt_template_validation_and_application() -> None:
    template = parse_prompt_template(
        {"system": "Be terse.", "examples": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    )
    applied = apply_template(template, [{"role": "system", "content": "Own."}, {"role": "user", "content": "Q?"}])
    assert applied == [
        {"role": "system", "content": "Be terse.\n\nOwn."},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "Q?"},
    ]
    with pytest.raises(TrainingDataError) as info:
        parse_prompt_template({"system": "", "examples": [{"role": "assistant", "content": "a"}], "x": 1})
    text = str(info.value)
    assert "unexpected keys ['x']" in text and "expected 'user'" in text and "end with an assistant" in text
    assert "'system' must be a non-empty string" in text
    only_system = parse_prompt_template({"system": "Be terse."})
    assert apply_template(only_system, [{"role": "user", "content": "Q?"}]) == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Q?"},
    ]
