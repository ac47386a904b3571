"""bench/read_bandwidth.py runs: every size and thread count asked for gets a positive rate, in the
table and the JSON, and bad arguments are refused before anything is allocated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench import read_bandwidth


def test_the_read_bandwidth_bench_reports_each_size_and_thread_count(tmp_path: Path) -> None:
    out = tmp_path / "bw.json"
    argv = ["--sizes", "1,4", "--threads", "1,2", "--rounds", "2", "--warm", "1", "--json", str(out)]
    assert read_bandwidth.main(argv) == 0
    data = json.loads(out.read_text())
    assert (data["rounds"], data["warm"]) == (2, 1)
    assert set(data["gb_per_s"]) == {"1", "2"}
    for per_size in data["gb_per_s"].values():
        assert set(per_size) == {"1", "4"} and min(per_size.values()) > 0


@pytest.mark.parametrize("bad", [["--sizes", "0"], ["--threads", "0"], ["--rounds", "0"], ["--warm", "-1"]])
def test_the_read_bandwidth_bench_refuses_bad_arguments(bad: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        read_bandwidth.main(bad)
    assert exc.value.code == 2


def test_the_read_bandwidth_bench_leaves_torch_threads_as_they_were() -> None:
    before = torch.get_num_threads()
    assert read_bandwidth.main(["--sizes", "1", "--threads", str(before + 1), "--rounds", "1", "--warm", "0"]) == 0
    assert torch.get_num_threads() == before
