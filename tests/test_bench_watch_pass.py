"""bench/watch_pass.py on a few adapters in a directory: it runs and reports the rows its README section quotes."""

from __future__ import annotations

import re

import pytest

from bench import watch_pass


def test_it_times_the_three_passes(capsys: pytest.CaptureFixture[str]) -> None:
    assert watch_pass.main(["--adapters", "30", "--tenants", "3", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert "published 30 prompt adapters" in out and "30 adapter names watched, best of 2" in out
    for row in ("full pass", "poll, nothing published", "poll after one publish", "listing every adapter"):
        assert re.search(rf"\| {re.escape(row)}[^|]* \| [\d,.]+ ms \| [\d,.]+ ms \|", out), out
