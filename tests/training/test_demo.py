from __future__ import annotations

import json
from pathlib import Path

import pytest

from demo.companies import COMPANIES, write_datasets
from lorafleet_adapters.ref import AdapterRef
from lorafleet_adapters.store import AdapterStore
from lorafleet_training.data import load_jsonl, load_prompt_template
from lorafleet_training.pii import scan


def test_demo_datasets_are_synthetic_clean_and_held_out(tmp_path: Path) -> None:
    paths = write_datasets(tmp_path, seed=0)
    assert (
        write_datasets(tmp_path / "again", seed=0)["zephyr"]["train"].read_text()
        == paths["zephyr"]["train"].read_text()
    )  # deterministic for a seed
    for company in COMPANIES:
        train = load_jsonl(paths[company.tenant]["train"])
        held_out = load_jsonl(paths[company.tenant]["heldout"])
        assert 100 <= len(train) <= 200 and len(held_out) == 2 * len(company.facts)
        assert scan(train).clean and scan(held_out).clean
        seen = {e.turns[-1].content.lower() for e in train if e.turns}
        for example in held_out:
            question = example.turns[-1].content.lower() if example.turns else ""
            assert not any(question in s for s in seen), question  # new wordings only
        answers = {e.completion for e in train}
        assert answers == {e.completion for e in held_out}  # the same facts, asked differently
        template = load_prompt_template(paths[company.tenant]["prompt"])
        assert all(f.answer in template.system for f in company.facts)
    quill = load_jsonl(paths["quillmark"]["train"])
    assert all(e.completion.startswith("Re: ") and e.completion.endswith("\nQuillmark Legal LLP") for e in quill)
    zephyr = load_jsonl(paths["zephyr"]["train"])
    assert all(e.completion.endswith("]") and "[ZB-" in e.completion for e in zephyr)


def test_run_demo_smoke_on_the_tiny_model(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from demo.run_demo import main

    argv = [
        "--model-dir",
        str(tiny_model_dir),
        "--work",
        str(tmp_path / "work"),
        "--store",
        str(tmp_path / "store"),
        "--limit",
        "8",
        "--epochs",
        "1",
        "--max-new-tokens",
        "2",
        "--rank",
        "2",
        "--no-progress",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "== held-out questions: wordings never seen in training ==" in out
    assert "training took" in out
    assert "Larkspur Mobile: training the classifier head larkspur/intents" in out
    assert "published larkspur/intents@1" in out or "not published: --require-improvement: held-out macro-F1" in out
    store = AdapterStore(tmp_path / "store")
    for ref in ("zephyr/support-prompt", "quillmark/counsel-prompt"):
        assert store.manifest(store.resolve(AdapterRef.parse(ref))).kind == "prompt"
    for ref in ("zephyr/support", "quillmark/counsel"):
        published = f"published {ref}@1" in out
        refused = "not published" in out and "not below the base's" in out
        assert published or refused  # a random tiny model may not improve in one step
    record = json.loads((tmp_path / "work" / "zephyr" / "adapter" / "lorafleet-training.json").read_text())
    assert record["adapter"] == "zephyr/support" and "prompt_loss" in record["eval_metrics"]


def test_third_company_intents_are_synthetic_clean_and_held_out(tmp_path: Path) -> None:
    from demo import intents
    from lorafleet_training.classifier import load_labelled

    paths = intents.write_datasets(tmp_path, seed=0)
    assert intents.write_datasets(tmp_path / "again", seed=0)["train"].read_text() == paths["train"].read_text()
    train, held = load_labelled(paths["train"]), load_labelled(paths["heldout"])
    labels = set(intents.INTENTS)
    assert {e.completion for e in train} == {e.completion for e in held} == labels
    assert 60 <= len(train) <= 300 and len(held) >= 3 * len(labels)
    assert scan(train).clean and scan(held).clean
    seen = {(e.prompt or e.chat_messages()[-1]["content"]) for e in train}
    assert not seen & {(e.prompt or "") for e in held}  # held-out wordings never occur in training
