"""bench/serving.py without a model: its load generator (the clients run in a process of their own, not the
server's), its run order, and its report of synthetic results (ratios, failed requests)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from bench import serving
from bench.serving import LoadGenerator


def test_the_load_generator_runs_coroutines_in_its_own_process() -> None:
    loadgen = LoadGenerator()
    try:
        assert loadgen.pid != os.getpid()
        assert loadgen.run(asyncio.sleep, 0, result=42) == 42  # asyncio.run in the child, result sent back
        assert loadgen.run(asyncio.sleep, 0, result=[1, 2]) == [1, 2]  # the same child, again
    finally:
        loadgen.close()


# ------------------------------------------------------------------ reporting, on synthetic results


def _run(
    name: str,
    kind: str,
    tokens_per_second: float,
    *,
    shape: str | None = None,
    distinct: int = 0,
    forward: float | None = None,
    errors: int = 0,
) -> serving.RunResult:
    """A finished run: 32 requests of 64 tokens in 1 s wall, ``errors`` of them failed."""
    records = [{"prompt_tokens": 40, "error": "boom" if i < errors else None} for i in range(32)]
    return serving.RunResult(
        name=name,
        kind=kind,
        shape=shape,
        distinct=distinct,
        clients=32,
        requests=1,
        wall_seconds=1.0,
        tokens=64 * (32 - errors),
        errors=errors,
        tokens_per_second=tokens_per_second,
        ttft_p50=0.5,
        ttft_p95=0.9,
        tpot_p50=0.02,
        tpot_p95=0.03,
        loadavg=(0.0, 0.0, 0.0),
        own_cores=2.0,
        other_cores=0.0,
        steps={"full_decode_forward_p50": forward} if forward else {},
        records=records,
    )


def _finish(
    results: list[serving.RunResult], argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> tuple[dict[str, Any], str]:
    """bench.serving's report of ``results`` (a run with ``argv``): (meta, stdout)."""
    args = serving.parse_args([*argv, "--out", str(tmp_path)])
    meta: dict[str, Any] = {
        "model": "SmolLM2-135M-Instruct",
        "dtype": "bfloat16",
        "base_weight_bytes": 269030016,
        "adapter_bytes": {"default": 921600, "r16all": 9768960},
        "read_bandwidth": 52528635185.94,
    }
    if args.peer:
        facts = {"version": "0.11.0", "dtype": "bfloat16", "startup_seconds": 60.0, "log": "x"}
        meta["vllm"] = {"dtype_requested": "bfloat16", "threads_bind": "0-1", "servers": {"base": facts}}
    serving.finish(results, meta, serving.make_plan(args), args, 1.0)
    return meta, capsys.readouterr().out


# bench/results/serving-20261206-075751.json (--configs base,32xdefault --counts 32 --shapes default
# --skip-naive --peer vllm): its runs' tok/s and p50 full-decode forwards, in the order they ran
PEER_ARGV = ["--configs", "base,32xdefault", "--counts", "32", "--shapes", "default", "--skip-naive", "--peer", "vllm"]


def _peer_runs() -> list[serving.RunResult]:
    return [
        _run("base", "base", 1875.5212, forward=0.013021),
        _run("32xdefault", "adapters", 1733.7115, shape="default", distinct=32, forward=0.013548),
        _run("base (again)", "base", 2053.6182, forward=0.011941),
        _run("vllm:base", "vllm", 921.6369),
        _run("vllm:32xdefault", "vllm", 201.9721, shape="default", distinct=32),
        _run("base (after)", "base", 1831.0053, forward=0.014056),
        _run("32xdefault (after)", "adapters", 1448.7621, shape="default", distinct=32, forward=0.016006),
    ]


def test_the_target_vs_base_averages_the_adapter_runs_before_and_after_the_peer_as_the_base_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The base was the mean of its three runs, the adapters' the run before the peer alone: 0.90x printed
    for serving-20261206-075751.json; both sides averaged over their runs: 1591.2 / 1920.0 = 0.83x."""
    meta, out = _finish(_peer_runs(), PEER_ARGV, tmp_path, capsys)
    target = meta["targets"]["32xdefault / base"]
    assert target["ratio"] == pytest.approx(0.8287, abs=1e-4)
    assert target["runs"] == ["32xdefault", "32xdefault (after)"]
    assert target["over"] == ["base", "base (again)", "base (after)"]
    assert target["errors"] == {}
    line = next(x for x in out.splitlines() if "distinct default adapters vs (a)" in x)
    assert "0.83x" in line and "0.90x" not in line
    assert "mean of 32xdefault, 32xdefault (after): 1591.2 tok/s" in line
    assert "mean of base, base (again), base (after): 1920.0" in line
    assert "over the mean of the base runs (base, base (again), base (after))" in out
    # the peer's ratios keep their own rule (lorafleet's runs before and after the peer's), unchanged
    assert meta["vllm"]["ratios"]["32xdefault / vllm:32xdefault"] == pytest.approx(7.8785, abs=1e-4)


def test_goal_2b_averages_the_r16_runs_the_same_way(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = [
        _run("base", "base", 1800.0, forward=0.013),
        _run("32xr16all", "adapters", 900.0, shape="r16all", distinct=32, forward=0.030),
        _run("base (again)", "base", 1800.0, forward=0.013),
        _run("vllm:base", "vllm", 900.0),
        _run("base (after)", "base", 1800.0, forward=0.013),
        _run("32xr16all (after)", "adapters", 540.0, shape="r16all", distinct=32, forward=0.039),
    ]
    argv = ["--configs", "base,32xr16all", "--counts", "32", "--shapes", "r16all", "--skip-naive", "--peer", "vllm"]
    meta, out = _finish(runs, argv, tmp_path, capsys)
    bound = 269030016 / (269030016 + 32 * 9768960)
    target = meta["targets"]["32xr16all / base"]
    assert target["ratio"] == pytest.approx(0.4) and target["bytes_bound"] == pytest.approx(bound)
    assert target["runs"] == ["32xr16all", "32xr16all (after)"]
    text = "\n".join(x for x in out.splitlines() if "r16 all-linear" in x)
    assert "0.40x (mean of 32xr16all, 32xr16all (after): 720.0 tok/s" in text
    assert f"measured/bound {0.4 / bound:.2f}" in text
    assert "forward only: 0.38x of (a)'s (34 vs 13 ms" in text  # 0.013 / mean(0.030, 0.039)


def test_a_run_with_failed_requests_has_no_percentiles() -> None:
    def record(i: int, error: str | None = None) -> serving.RequestRecord:
        return serving.RequestRecord(i, i, "", 0.0, 0.1 * (i + 1), 1.0, 0 if error else 8, 0.01, error)

    whole = serving.summarize("base", "base", None, 0, 4, 1, [record(i) for i in range(4)], 2.0, (1.0, 0.0))
    assert whole.errors == 0 and whole.ttft_p50 == pytest.approx(0.25) and whole.tpot_p95 is not None
    failed = [record(0), record(1), record(2), record(3, "UNAVAILABLE")]
    res = serving.summarize("base", "base", None, 0, 4, 1, failed, 2.0, (1.0, 0.0))
    assert res.errors == 1 and res.tokens == 24
    assert (res.ttft_p50, res.ttft_p95, res.tpot_p50, res.tpot_p95) == (None, None, None, None)
    table = serving.render_load_table([whole, res])
    assert "errors" in table.splitlines()[0]
    assert "n/a" in table.splitlines()[-1] and "n/a" not in table.splitlines()[-2]


def test_every_ratio_involving_a_run_with_failed_requests_is_not_given(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = [
        _run("base", "base", 1000.0, forward=0.013),
        _run("base+http", "http", 950.0, forward=0.013),
        _run("32xdefault", "adapters", 900.0, shape="default", distinct=32, forward=0.014, errors=3),
        _run("32xdefault+http", "http", 850.0, shape="default", distinct=32, forward=0.014),
        _run("base#2", "pair", 1000.0, forward=0.013),
        _run("base#2+http", "http", 900.0, forward=0.013),
        _run("base (again)", "base", 1000.0, forward=0.013),
        _run("naive-default", "naive", 100.0, shape="default", distinct=8),
        _run("base+auth", "auth", 990.0, forward=0.013),
        _run("32xdefault+auth", "auth", 890.0, shape="default", distinct=32, forward=0.014),
    ]
    argv = ["--configs", "base,32xdefault,naive-default", "--counts", "32", "--shapes", "default", "--http"]
    meta, out = _finish(runs, [*argv, "--http-pairs", "2", "--auth"], tmp_path, capsys)
    by_name = {r.name: r for r in runs}
    adapters = by_name["32xdefault"]
    assert adapters.ratio_to_base is None and adapters.step_ratio_to_base is None
    assert adapters.measured_over_bound is None and adapters.not_comparable == {"32xdefault": 3}
    assert adapters.bytes_bound is not None  # sizes, not a measurement
    assert by_name["base (again)"].ratio_to_base == pytest.approx(1.0)  # the runs without errors: given
    assert meta["targets"]["32xdefault / base"] == {
        "ratio": None,
        "runs": ["32xdefault"],
        "over": ["base", "base (again)"],
        "errors": {"32xdefault": 3},
    }
    assert meta["targets"]["32xdefault / naive-default"]["ratio"] is None
    assert "32 distinct default adapters vs (a): n/a (3 errors: 3 in 32xdefault) (target >= 0.85x)" in out
    assert "32 distinct default adapters vs naive: n/a (3 errors: 3 in 32xdefault)" in out
    assert "HTTP vs gRPC, 32xdefault: n/a (3 errors: 3 in 32xdefault)" in out
    assert "HTTP vs gRPC, base: 950.0 vs 1000.0 tok/s" in out  # pairs without errors: given
    assert meta["http_vs_grpc_base_median"] == pytest.approx(0.925)
    assert "auth on vs off, 32xdefault: n/a (3 errors: 3 in 32xdefault)" in out
    assert "auth on vs off, base: 0.990x tok/s" in out
    assert "failed requests: 3 errors: 3 in 32xdefault" in out
    load_row, ratio_row = (x for x in out.splitlines() if x.startswith("32xdefault "))
    assert load_row.split()[1:3] == ["29!", "3"] and load_row.count("n/a") == 2  # TTFT, TPOT percentiles
    assert ratio_row.count("n/a") == 5  # vs (a), meas/bd, fwd vs (a), bw bd, fwd/bw bd

    # a failed request in a base run: (a) compares with nothing, nor does the median of the base pairs
    capsys.readouterr()
    runs[2].errors, runs[4].errors = 0, 1
    for r in runs:
        r.ratio_to_base = r.step_ratio_to_base = r.measured_over_bound = None
    runs[6].errors = 2
    meta, out = _finish(runs, [*argv, "--http-pairs", "2", "--auth"], tmp_path, capsys)
    assert all(r.ratio_to_base is None for r in runs)
    assert meta["targets"]["32xdefault / base"]["ratio"] is None
    assert meta["targets"]["32xdefault / naive-default"]["ratio"] == pytest.approx(9.0)
    assert meta["http_vs_grpc_base_median"] is None and meta["http_vs_grpc_not_comparable"] == {"base#2": 1}
    assert "HTTP vs gRPC, base, median of 2 adjacent pairs: n/a (1 errors: 1 in base#2)" in out
    assert "base drift between first and last base run: n/a (2 errors: 2 in base (again))" in out


def test_each_http_run_comes_right_after_its_grpc_twin() -> None:
    """The HTTP vs gRPC ratios are of adjacent runs: base+http ran after every adapter run before."""
    d, r16 = serving.SHAPES["default"], serving.SHAPES["r16all"]
    runs = serving.first_engine_runs([(d, 8), (d, 32), (r16, 32)], http=True, http_pairs=3)
    names = [r.name for r in runs]
    assert names == [
        "base",
        "base+http",
        "8xdefault",
        "8xdefault+http",
        "32xdefault",
        "32xdefault+http",
        "32xr16all",
        "32xr16all+http",
        "base#2",
        "base#2+http",
        "base#3",
        "base#3+http",
        "base (again)",
    ]
    for i, run in enumerate(runs):
        if run.http:
            twin = runs[i - 1]
            assert (twin.name + "+http", twin.shape, twin.k, twin.http) == (run.name, run.shape, run.k, False)
    assert [(r.kind, r.k) for r in runs[4:6]] == [("adapters", 32), ("http", 32)]
    assert [r.name for r in serving.first_engine_runs([(d, 32)], http=False, http_pairs=3)] == [
        "base",
        "32xdefault",
        "base (again)",
    ]
    assert [r.name for r in serving.first_engine_runs([], http=False, http_pairs=3)] == ["base"]


def test_the_prefix_scenario_runs_the_dtype_asked_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """It ran the server's default dtype whatever --dtype said (and its JSON did not say which ran)."""
    import lorafleet_server.app

    configs: list[Any] = []

    class Built(Exception):
        pass

    def build_service(config: Any) -> Any:
        configs.append(config)
        raise Built

    monkeypatch.setattr(lorafleet_server.app, "build_service", build_service)
    monkeypatch.setattr(serving, "make_adapters", lambda *a, **k: {"default": [tmp_path / "a00"]})
    monkeypatch.setattr(serving.torch, "set_num_threads", lambda n: None)  # this process's threads stay
    with pytest.raises(Built):
        serving.main(["--scenario", "prefix", "--dtype", "float32", "--model", str(tmp_path), "--out", str(tmp_path)])
    assert configs[0].dtype == "float32"
    payload = serving.prefix_payload([], 0, "float32", "float32")
    assert (payload["dtype"], payload["dtype_requested"]) == ("float32", "float32")


def test_the_prefix_scenario_refuses_options_it_would_ignore() -> None:
    with pytest.raises(SystemExit, match=r"--scenario prefix does not take --clients, --http"):
        serving.main(["--scenario", "prefix", "--clients", "8", "--http"])
