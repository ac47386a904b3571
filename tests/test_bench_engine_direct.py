"""bench/engine_direct.py is the CUDA bench of scripts/gpu_check.sh (issue 13's GPU check). A GPU machine
is lent only now and then, so the bench runs here on CPU with the real default model: the script's
Python half keeps working between loans, and the script itself parses."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

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


class _FakeEngine:
    """Engine.submit and Engine.run without a model: each request's first token comes ``ttft[i]`` seconds
    after it was submitted; ``calls`` records, in order, what ran on the "engine thread" and what was
    submitted."""

    def __init__(self, ttft: list[float]) -> None:
        self.ttft = ttft
        self.calls: list[str] = []
        self.prefix_cache = self  # .clear below

    def clear(self) -> None:
        assert self.calls and self.calls[-1] == "run", "the prefix cache is cleared through Engine.run"
        self.calls.append("clear")

    def run(self, fn: Callable[[], Any]) -> Any:
        self.calls.append("run")
        return fn()

    def submit(self, req: Any, sink: Any) -> None:
        from lorafleet_server.engine.types import FinishReason, Summary, TokenEvent

        i = len([c for c in self.calls if c.startswith("submit")])
        self.calls.append(f"submit {req.request_id}")
        sink.started, sink.first = 0.0, self.ttft[i % len(self.ttft)]
        sink(TokenEvent(text="x", token_ids=(1,)))
        sink(TokenEvent(summary=Summary(FinishReason.LENGTH, 1, 1, "", req.request_id)))


def test_every_run_starts_with_an_empty_prefix_cache_and_interpolated_percentiles() -> None:
    """The warm-up sends the measured (adapter, prompt) pairs: with the cache kept, the adapter run's
    prefill came from it and the base run's did not. p95 was by nearest rank, unlike every other bench."""
    engine = _FakeEngine([i / 10 for i in range(1, 11)])  # TTFTs 0.1 .. 1.0 s
    service: Any = SimpleNamespace(engine=engine)
    stats = engine_direct.run_load(service, "base", [None], 10, 4)
    assert engine.calls[:3] == ["run", "clear", "submit base-0"]
    assert stats.ttft_p50_ms == 550.0
    assert stats.ttft_p95_ms == 955.0  # interpolated between 900 and 1000 ms; nearest rank gave 1000
    engine.calls.clear()
    engine_direct.run_load(service, "2-adapters", ["bench/a00", "bench/a01"], 2, 4)  # every run
    assert engine.calls == ["run", "clear", "submit 2-adapters-0", "submit 2-adapters-1"]
