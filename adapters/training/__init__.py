"""Training side of lorafleet: JSONL data, PII scan, LoRA/QLoRA training with PEFT, evaluation, publishing.

Serving code never imports this package (DESIGN.md §6). Heavy modules (torch, transformers, peft) are
imported by ``trainer`` and ``evaluate`` only, so ``data``, ``pii`` and ``publish`` stay light.
"""

from __future__ import annotations

from adapters.training.errors import PiiFound, TrainingDataError, TrainingError

__all__ = ["PiiFound", "TrainingDataError", "TrainingError"]
