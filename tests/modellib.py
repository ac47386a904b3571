"""Model directories for tests: a random model saved next to the real default model's tokenizer."""

from __future__ import annotations

import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def copy_tokenizer(src: Path, dst: Path) -> None:
    """Copy the tokenizer files ``src`` has into ``dst`` (so prompts and chat templates work there)."""
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
