"""bench/linear_f32.py runs: every candidate checked against F.linear and the two native builds (this
CPU's and AVX2-only) against each other bit for bit before it times them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import linear_f32
from lorafleet_server.model.cpu import cpu_features
from lorafleet_server.model.native import find_compiler


@pytest.mark.skipif(find_compiler() is None or "avx2" not in cpu_features().flags, reason="no C compiler or AVX2")
def test_the_fp32_linear_bench_checks_and_times_both_builds(tmp_path: Path) -> None:
    out = tmp_path / "linear.json"
    argv = ["--rows", "1,13", "--shapes", "k_proj/v_proj", "--rounds", "1", "--threads", "1", "--json", str(out)]
    assert linear_f32.main(argv) == 0
    data = json.loads(out.read_text())
    assert data["march"] == "haswell" and [r["rows"] for r in data["results"]] == [1, 13]
    for result in data["results"]:
        assert {"F.linear", "native", "haswell"} <= set(result["us"]) and min(result["us"].values()) > 0
