"""The forgetting check: base and adapter scored on the general held-out set that ships with lorafleet."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from lorafleet_adapters.peft_format import BaseModelSpec
from lorafleet_adapters.store import AdapterStore
from lorafleet_training.data import load_jsonl
from lorafleet_training.evaluate import GENERAL_HELDOUT
from lorafleet_training.publish import TooMuchForgetting, publish


def test_the_general_set_ships_and_parses() -> None:
    examples = load_jsonl(GENERAL_HELDOUT)
    assert 20 <= len(examples) <= 100 and all(e.is_chat for e in examples)


def test_record_holds_the_check_and_publish_gates_on_it(trained: Any, tmp_path: Path, tiny_spec: BaseModelSpec) -> None:
    forgetting = trained.record["forgetting"]
    metrics = trained.record["eval_metrics"]
    assert forgetting["examples"] == len(load_jsonl(GENERAL_HELDOUT)) and forgetting["tokens"] > 0
    assert math.isfinite(forgetting["base_loss"]) and math.isfinite(forgetting["adapter_loss"])
    assert forgetting["adapter_loss"] != forgetting["base_loss"]  # the adapter changed the model
    assert metrics["forgetting"] == pytest.approx(
        (forgetting["adapter_loss"] - forgetting["base_loss"]) / forgetting["base_loss"]
    )
    store = AdapterStore(tmp_path / "store")
    measured = metrics["forgetting"]
    with pytest.raises(TooMuchForgetting, match="general held-out set"):
        publish(trained.out_dir, store, tiny_spec, max_forgetting=measured - 1e-6)
    assert not (tmp_path / "store").exists() or store.list() == []  # refused before anything was written
    key = publish(trained.out_dir, store, tiny_spec, max_forgetting=measured + 1e-6)
    assert store.manifest(key).eval_metrics["forgetting"] == pytest.approx(measured)
