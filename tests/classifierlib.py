"""Small labelled datasets for the classifier tests: three intents with distinct vocabulary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lorafleet_adapters.peft_format import BaseModelSpec

INTENTS: dict[str, tuple[str, ...]] = {
    "billing": ("invoice", "refund", "charge", "payment", "bill", "price", "receipt", "fee"),
    "shipping": ("parcel", "delivery", "courier", "tracking", "shipment", "package", "arrive", "box"),
    "account": ("password", "login", "username", "profile", "settings", "signin", "email-change", "locked"),
}


def labelled_rows(per_label: int = 8, chat: bool = True) -> list[dict[str, Any]]:
    """``per_label`` rows per intent cycling over 4 keywords; keyword 3 is a chat row. Repeated texts stay
    on one side of a split (``stratified_split``), so held-out rows are texts training never saw."""
    rows: list[dict[str, Any]] = []
    for label, words in INTENTS.items():
        for i in range(per_label):
            text = f"my {words[i % 4]}"
            if chat and i % 4 == 3:
                rows.append({"messages": [{"role": "user", "content": text}], "label": label})
            else:
                rows.append({"text": text, "label": label})
    return rows


def write_labelled(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def train_head(
    model_dir: Path, spec: BaseModelSpec, out: Path, data: Path, *, adapter: str = "acme/intents", **overrides: Any
) -> Any:
    """A real classifier training run (no prompt-only generation, so it takes seconds on the tiny model).
    Features in fp32, as tiny_service serves (the server's "auto" is bf16 on a CPU with avx512_bf16)."""
    from lorafleet_training.classifier import ClassifierConfig, train_classifier

    values: dict[str, Any] = {"eval_generate": False, "keep_data_ref": True, "seed": 1, "dtype": "float32"}
    values.update(overrides)
    store = values.pop("store", None)
    config = ClassifierConfig(data=data, adapter=adapter, out_dir=out, base_model_dir=model_dir, **values)
    return train_classifier(config, spec, store, echo=lambda _: None)
