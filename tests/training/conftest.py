"""Fixtures of the trainer's tests: small JSONL files and one shared training run on the tiny Llama."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from training_testlib import qa_rows, write_jsonl

from lorafleet_adapters.peft_format import BaseModelSpec


@pytest.fixture(scope="session")
def prompt_template_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prompt") / "prompt.json"
    template = {
        "system": "You are the color desk. Answer with one color.",
        "examples": [{"role": "user", "content": "Which color is item 99?"}, {"role": "assistant", "content": "red"}],
    }
    path.write_text(json.dumps(template))
    return path


@pytest.fixture(scope="session")
def trained(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tiny_spec: BaseModelSpec, prompt_template_file: Path
) -> Any:
    """One real training run (2 epochs x 3 steps) with evaluation against a prompt adapter too."""
    from lorafleet_training.trainer import TrainConfig, train

    root = tmp_path_factory.mktemp("trained")
    config = TrainConfig(
        data=write_jsonl(root / "train.jsonl", qa_rows(16)),
        adapter="acme/colors",
        out_dir=root / "out",
        base_model_dir=tiny_model_dir,
        rank=4,
        alpha=8,
        epochs=2,
        lr=2e-2,
        batch_size=4,
        max_length=128,
        val_fraction=0.25,
        eval_max_new_tokens=4,
        compare_prompt=prompt_template_file,
        seed=3,
    )
    return train(config, tiny_spec, progress=False, echo=lambda _: None)
