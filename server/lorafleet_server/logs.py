"""Logging set-up: human text or one JSON object per line (``--log-format json``)."""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import Any

REQUEST_LOGGER = "lorafleet.requests"
USAGE_LOGGER = "lorafleet.usage"  # one line per metered request, the usage meter's own numbers


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            doc.update(fields)
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            text += " " + " ".join(f"{k}={field_text(v)}" for k, v in fields.items())
        return text


def field_text(value: object) -> str:
    """A field's value for the text format: as is when it is one plain token (or empty), else quoted,
    with backslashes, quotes, unprintable and non-ASCII characters escaped, so a caller's string
    holding spaces, "key=value" or a newline cannot pass for other fields or another line."""
    text = str(value)
    if text.isprintable() and not any(c.isspace() or c in '="\\' for c in text):
        return text
    return '"' + text.encode("unicode_escape").decode("ascii").replace('"', '\\"') + '"'


def setup_logging(level: str, fmt: str = "text") -> None:
    if fmt == "json":  # every line one JSON object: no progress bar (transformers draws one as it loads)
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read when huggingface_hub is imported
        if (hf_logging := sys.modules.get("transformers.utils.logging")) is not None:  # imported already
            hf_logging.disable_progress_bar()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
