"""The vLLM peer of bench/serving.py without vLLM: argument handling and what the runner passes to vLLM.

The peer itself needs its 3.4 GB venv (`make vllm-peer`) and minutes per server start, so it is run by
hand (`python -m bench.serving --peer vllm`), not here.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any, ClassVar

import pytest

from bench import serving
from bench.vllm_peer import PeerUnavailable, VllmConfig, log_facts, peer_python, vllm_dtype
from lorafleet_server.onednn import ONEDNN_CACHES
from lorafleet_server.openmp import OPENMP_WAIT


def test_a_missing_vllm_venv_fails_first_with_the_make_target(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.perf_counter()
    with pytest.raises(SystemExit) as exc:
        serving.main(["--peer", "vllm", "--vllm-venv", str(tmp_path / "nowhere"), "--configs", "base"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "make vllm-peer" in err and str(tmp_path / "nowhere") in err
    assert time.perf_counter() - started < 5  # before any model is loaded or adapter made


def test_a_venv_without_vllm_is_refused(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").touch()
    with pytest.raises(PeerUnavailable, match=r"no vllm package.*make vllm-peer"):
        peer_python(tmp_path)
    package = tmp_path / "lib" / "python3.11" / "site-packages" / "vllm"
    package.mkdir(parents=True)
    (package / "__init__.py").touch()
    assert peer_python(tmp_path) == tmp_path / "bin" / "python"


def test_the_peer_only_runs_with_the_load_scenario(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="load scenario only"):
        serving.main(["--peer", "vllm", "--vllm-venv", str(tmp_path), "--scenario", "prefix"])


def test_vllm_gets_the_adapters_the_dtype_and_stays_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    modules = {"default-00": tmp_path / "a00", "default-01": tmp_path / "a01"}
    cfg = VllmConfig(
        venv=tmp_path,
        model_dir=tmp_path / "model",
        served_name="SmolLM2",
        dtype=vllm_dtype("bfloat16"),
        log_path=tmp_path / "log",
        lora_modules=modules,
        max_loras=2,
        threads_bind="1",
    )
    cmd = cfg.command(Path("python"), 1234)
    assert cmd[cmd.index("--dtype") + 1] == "bfloat16"
    assert cmd[cmd.index("--served-model-name") + 1] == "SmolLM2"
    assert "--enable-lora" in cmd and cmd[cmd.index("--max-loras") + 1] == "2"
    at = cmd.index("--lora-modules")
    assert cmd[at + 1 : at + 3] == [f"default-00={tmp_path / 'a00'}", f"default-01={tmp_path / 'a01'}"]
    base_only = VllmConfig(venv=tmp_path, model_dir=tmp_path, served_name="m", dtype="float32", log_path=tmp_path)
    assert "--enable-lora" not in base_only.command(Path("python"), 1)
    env = cfg.environment()
    assert env["HF_HUB_OFFLINE"] == "1" and env["VLLM_CPU_OMP_THREADS_BIND"] == "1"
    # importing lorafleet_server puts its OpenMP policy and oneDNN caps into the environment; the peer gets
    # its own defaults, while a value someone chose that differs from the package's passes through
    for name, value in (OPENMP_WAIT | ONEDNN_CACHES).items():
        monkeypatch.setenv(name, value)
    assert not (OPENMP_WAIT | ONEDNN_CACHES).keys() & cfg.environment().keys()
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "512")
    assert cfg.environment()["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "512"
    chosen = dataclasses.replace(cfg, extra_env={"OMP_WAIT_POLICY": "ACTIVE"})  # --vllm-env, applied last
    assert chosen.environment()["OMP_WAIT_POLICY"] == "ACTIVE"
    with pytest.raises(ValueError, match="no vLLM dtype"):
        vllm_dtype("int8")


def test_the_log_facts_come_from_a_vllm_log() -> None:
    log = "\n".join(
        [
            "(APIServer pid=1) INFO 12-02 10:16:24 [api_utils.py:347]  ▄▄ ▄█ █     █     █ ▀▄▀ █  version 0.32.0",
            "(EngineCore pid=2) INFO 12-02 10:17:02 [core.py:133] Initializing a V1 LLM engine (v0.32.0) with "
            "config: model='m', dtype=torch.bfloat16, max_seq_len=512,",
            "(EngineCore pid=2) INFO 12-02 10:17:03 [ompmultiprocessing.py:185] \tlocal_rank=0, core ids=[0]",
            "(EngineCore pid=2) INFO 12-02 10:17:03 [ompmultiprocessing.py:185] \treserved_cpus=[1]",
        ]
    )
    facts = log_facts(log)
    assert facts["dtype"] == "bfloat16" and facts["version"] == "0.32.0"
    assert facts["threads_bind"] == ["local_rank=0, core ids=[0]", "reserved_cpus=[1]"]
    assert log_facts("nothing here")["dtype"] is None


def _run(name: str, kind: str, tokens_per_second: float, prompt_tokens: int, cores: float = 1.0) -> serving.RunResult:
    record = {"prompt_tokens": prompt_tokens}
    return serving.RunResult(
        name, kind, None, 0, 1, 1, 1.0, 64, 0, tokens_per_second, None, None, None, None, (0, 0, 0), cores, 0,
        records=[record],
    )  # fmt: skip


def test_the_issue_ratios_compare_lorafleet_with_the_peer_per_transport() -> None:
    """lorafleet's tok/s (the mean of its runs before and after the peer's) over the peer's, per transport."""
    runs = [
        _run("base", "base", 120.0, 40),
        _run("32xdefault", "adapters", 100.0, 40),
        _run("32xdefault+http", "http", 90.0, 40),
        _run("vllm:base", "vllm", 200.0, 40, cores=2.0),  # 64 tokens in 1 s on 2 cores: 32 per CPU-second
        _run("vllm:32xdefault", "vllm", 40.0, 40),
        _run("32xdefault (after)", "adapters", 60.0, 40, cores=0.5),  # lorafleet after the peer: the mean counts
    ]
    facts = {"version": "0.32.0", "dtype": "bfloat16", "startup_seconds": 60.0, "log": "x"}
    meta: dict[str, Any] = {"vllm": {"dtype_requested": "bfloat16", "threads_bind": "auto", "servers": {"base": facts}}}
    lines = serving.peer_checks(runs, meta, 32)
    ratios: dict[str, float] = meta["vllm"]["ratios"]
    assert {k: v for k, v in ratios.items() if not k.endswith("per cpu-s")} == {
        "32xdefault / vllm:base": 0.4,
        "32xdefault+http / vllm:base": 0.45,
        "32xdefault / vllm:32xdefault": 2.0,
        "32xdefault+http / vllm:32xdefault": 2.25,
        "base / vllm:base": 0.6,
    }
    assert ratios["32xdefault / vllm:base per cpu-s"] == 3.0  # mean(64, 128) / 32
    assert ratios["base / vllm:base per cpu-s"] == 2.0
    assert "same workload: 40 prompt tokens" in "\n".join(lines)
    runs[3] = _run("vllm:base", "vllm", 200.0, 55)  # a different chat template: said, not hidden
    assert "prompt tokens differ" in "\n".join(serving.peer_checks(runs, meta, 32))


def test_vllm_is_bound_to_every_cpu_by_default() -> None:
    """With "auto" vLLM computed on one of two cores while lorafleet's steps used both: in fp32 goal 1's
    ratios read 1.67x/7.17x against 1.22x/4.55x with vLLM on both."""
    from bench.serving import parse_args
    from bench.vllm_peer import threads_bind_of

    assert parse_args([]).vllm_threads_bind == "all"
    assert threads_bind_of("all", {0, 1}) == "0-1"
    assert threads_bind_of("all", {0, 1, 2, 5, 7, 8}) == "0-2,5,7-8"
    assert threads_bind_of("all", {3}) == "3"
    assert threads_bind_of("auto") == "auto" and threads_bind_of("1") == "1"
    assert threads_bind_of("all") == threads_bind_of("all", os.sched_getaffinity(0))


def test_the_peer_takes_extra_environment() -> None:
    """--vllm-env: the peer with settings of one's choice (lorafleet's OpenMP wait policy, say)."""
    from bench.serving import parse_args

    args = parse_args(["--vllm-env", "OMP_WAIT_POLICY=ACTIVE", "--vllm-env", "GOMP_SPINCOUNT=20000"])
    assert dict(args.vllm_env) == {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "20000"}
    with pytest.raises(SystemExit):
        parse_args(["--vllm-env", "no-equals-sign"])


def test_vllm_gets_the_largest_served_rank_rounded_up_to_one_it_accepts() -> None:
    """vLLM pads every adapter to --max-lora-rank: 16 always handed r=8 adapters twice lorafleet's rank."""
    from bench.vllm_peer import vllm_max_lora_rank

    assert vllm_max_lora_rank([8]) == 8 and vllm_max_lora_rank([8, 16]) == 16
    assert vllm_max_lora_rank([4]) == 8 and vllm_max_lora_rank([17]) == 32 and vllm_max_lora_rank([1]) == 1
    assert vllm_max_lora_rank(s.r for s in serving.SHAPES.values()) == 16
    with pytest.raises(ValueError, match="exceeds"):
        vllm_max_lora_rank([513])
    with pytest.raises(ValueError, match="no adapter rank"):
        vllm_max_lora_rank([])


class _FakeVllm:
    """bench.vllm_peer.VllmServer without vLLM: records its config, serves no request."""

    started: ClassVar[list[VllmConfig]] = []

    def __init__(self, config: VllmConfig) -> None:
        self.config = config
        self.url = "http://127.0.0.1:1/v1"
        self.startup_seconds = 1.0
        _FakeVllm.started.append(config)

    def __enter__(self) -> _FakeVllm:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def pids(self) -> list[int]:
        return [4242, 4243]

    def log_text(self) -> str:
        return ""


class _FakeLoadgen:
    pid = 99

    def run(self, fn: Any, *args: Any, **kwargs: Any) -> tuple[list[serving.RequestRecord], float]:
        record = serving.RequestRecord(0, 0, args[1][0], 0.0, 0.1, 1.0, kwargs["max_new_tokens"], 0.01)
        return [record], 1.0


def _peer_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shapes: str, configs: str
) -> tuple[list[serving.RunResult], dict[str, Any], list[tuple[list[int], bool]]]:
    from bench import vllm_peer

    meters: list[tuple[list[int], bool]] = []

    class Meter:
        def __init__(self, pids: Any = (), *, include_self: bool = True) -> None:
            meters.append((list(pids), include_self))

        def stop(self) -> tuple[float, float]:
            return 1.0, 0.0

    _FakeVllm.started = []
    monkeypatch.setattr(vllm_peer, "VllmServer", _FakeVllm)
    monkeypatch.setattr(serving, "CpuMeter", Meter)
    args = serving.parse_args(
        ["--peer", "vllm", "--shapes", shapes, "--configs", configs, "--skip-naive", "--out", str(tmp_path)]
    )
    plan = serving.make_plan(args)
    adapter_runs = [(s, k) for s in plan.shapes for k in plan.counts if plan.wants(f"{k}x{s.key}")]
    dirs = {s.key: [tmp_path / f"{s.key}-{i}" for i in range(32)] for s in plan.shapes}
    loadgen: Any = _FakeLoadgen()
    results, info = serving.run_vllm_peer(args, plan, tmp_path, "m", "bfloat16", dirs, adapter_runs, loadgen)
    return results, info, meters


def test_the_peer_serves_each_rank_at_its_own_and_the_largest_k_of_its_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    results, info, _ = _peer_runs(tmp_path, monkeypatch, "default", "base,32xdefault")
    assert [r.name for r in results] == ["vllm:base", "vllm:32xdefault"]
    base, lora = _FakeVllm.started
    assert not base.lora_modules and len(lora.lora_modules) == 32
    cmd = lora.command(Path("python"), 1)
    assert cmd[cmd.index("--max-lora-rank") + 1] == "8"  # r=8 adapters only: 16 padded them to twice that
    assert cmd[cmd.index("--max-loras") + 1] == "32"
    assert list(info["servers"]) == ["base", "lora"]
    assert (info["servers"]["lora"]["max_lora_rank"], info["servers"]["lora"]["max_loras"]) == (8, 32)
    # r=8 and r=16 in one invocation: one server each, so the r=8 runs are not padded to 16 (their 1b
    # ratio overstated by ~2x when one rank-16 server served both)
    results, info, _ = _peer_runs(tmp_path, monkeypatch, "default,r16all", "base,8xdefault,32xdefault,32xr16all")
    assert [r.name for r in results] == ["vllm:base", "vllm:8xdefault", "vllm:32xdefault", "vllm:32xr16all"]
    _, r8, r16 = _FakeVllm.started
    assert (r8.max_lora_rank, r8.max_loras, len(r8.lora_modules)) == (8, 32, 32)
    assert (r16.max_lora_rank, r16.max_loras, len(r16.lora_modules)) == (16, 32, 32)
    assert list(info["servers"]) == ["base", "lora-r8", "lora-r16"]
    lines = serving.peer_checks(results, {"vllm": info}, 32)
    assert any("vLLM lora-r8 server:" in line and "--max-lora-rank 8," in line for line in lines)


def test_the_peers_cpu_is_its_processes_and_the_load_generator_not_this_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The idle lorafleet server's process was counted as the peer's "own" CPU."""
    meter = serving.CpuMeter([12345], include_self=False)
    assert meter._stats == ["/proc/12345/stat"]
    assert serving.CpuMeter([12345])._stats == ["/proc/self/stat", "/proc/12345/stat"]  # lorafleet's runs
    _, _, meters = _peer_runs(tmp_path, monkeypatch, "default", "base,32xdefault")
    assert meters == [([4242, 4243, 99], False), ([4242, 4243, 99], False)]


def test_a_ratio_with_failed_requests_on_either_side_is_not_given() -> None:
    runs = [
        _run("base", "base", 120.0, 40),
        _run("32xdefault", "adapters", 100.0, 40),
        _run("32xdefault+http", "http", 90.0, 40),
        _run("vllm:base", "vllm", 200.0, 40),
        _run("vllm:32xdefault", "vllm", 40.0, 40),
    ]
    runs[1].errors = 2  # lorafleet's gRPC run
    runs[4].errors = 5  # the peer's adapter run
    meta: dict[str, Any] = {"vllm": {"dtype_requested": "bfloat16", "threads_bind": "auto", "servers": {}}}
    text = "\n".join(serving.peer_checks(runs, meta, 32))
    ratios = meta["vllm"]["ratios"]
    assert ratios["32xdefault / vllm:base"] is None and ratios["32xdefault / vllm:base per cpu-s"] is None
    assert ratios["32xdefault+http / vllm:base"] == 0.45  # both sides whole: given
    assert ratios["32xdefault+http / vllm:32xdefault"] is None and ratios["base / vllm:base"] == 0.6
    assert meta["vllm"]["not_comparable"] == {
        "32xdefault / vllm:base": {"32xdefault": 2},
        "32xdefault / vllm:32xdefault": {"32xdefault": 2, "vllm:32xdefault": 5},
        "32xdefault+http / vllm:32xdefault": {"vllm:32xdefault": 5},
    }
    assert "n/a over gRPC (2 errors: 2 in 32xdefault)" in text
    assert "n/a over HTTP (5 errors: 5 in vllm:32xdefault)" in text
