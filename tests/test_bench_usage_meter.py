"""bench/usage_meter.py on an hour of traffic: it runs and reports what its README section quotes."""

from __future__ import annotations

import re

import pytest

from bench import usage_meter


def test_an_hour_fills_the_buckets_it_reports(capsys: pytest.CaptureFixture[str]) -> None:
    assert usage_meter.main(["--days", str(1 / 24), "--adapters", "50", "--tenants", "5", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    filled = re.search(r"filled 60 minutes in [\d.]+ s: ([\d,]+) buckets", out)
    assert filled is not None, out
    assert 60 * 5 < int(filled.group(1).replace(",", "")) <= 60 * (50 + 5)  # distinct pairs a minute, at most
    for line in ("B a bucket", "longest record() while filling", "report, whole retention", "during a whole"):
        assert line in out
