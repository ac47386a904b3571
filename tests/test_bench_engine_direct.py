"""bench/engine_direct.py is the CUDA bench of scripts/gpu_check.sh (issue 13's GPU check). A GPU machine
is lent only now and then, so the bench runs here on CPU with the real default model: the script's
Python half keeps working between loans, and the script itself parses."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from bench import engine_direct

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_checks_bench_runs_on_cpu(tmp_path: Path, default_model_dir: Path) -> None:
    argv = ["--device", "cpu", "--quantization", "none", "--clients", "4", "--max-new-tokens", "4", "--counts", "2"]
    assert engine_direct.main([*argv, "--model", str(default_model_dir), "--out", str(tmp_path)]) == 0
    (out,) = tmp_path.glob("engine-direct-*.json")
    data = json.loads(out.read_text())
    runs = {r["name"]: r for r in data["runs"]}
    assert list(runs) == ["base", "2-adapters"]
    assert [r["tokens"] for r in runs.values()] == [4 * 4, 4 * 4]  # EOS ignored: every token generated
    assert runs["2-adapters"]["distinct_adapters"] == 2 and runs["base"]["distinct_adapters"] == 0
    assert data["meta"]["device"] == "cpu" and data["meta"]["gpu"] is None


def test_the_gpu_check_script_parses_and_its_bench_takes_its_flags() -> None:
    script = REPO / "scripts" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "bench.engine_direct --device cuda --quantization nf4 --counts 32" in text
    args = engine_direct.parse_args(["--device", "cuda", "--quantization", "nf4", "--counts", "32", "--out", "o"])
    assert (args.device, args.quantization, args.counts) == ("cuda", "nf4", "32")
    assert "tests/gpu -m gpu" in text and (REPO / "tests" / "gpu").is_dir()
