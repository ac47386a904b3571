"""Training side of lorafleet: JSONL data, PII scan, LoRA/QLoRA training with PEFT, evaluation, publishing.

Installed with the ``train`` extra (peft, tqdm). Serving code never imports this package: an
import-linter contract in pyproject.toml holds that. Heavy modules (torch, transformers, peft) are
imported by ``trainer`` and ``evaluate`` only, so ``data``, ``pii`` and ``publish`` stay light.
"""

from __future__ import annotations

from lorafleet_training.errors import PiiFound, TrainingDataError, TrainingError

__all__ = ["PiiFound", "TrainingDataError", "TrainingError"]
