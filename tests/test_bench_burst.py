"""bench/burst.py without a model: its arguments (also from bench/serving.py) and its step accounting.
The burst itself loads the default model and runs for minutes, so it is run by hand."""

from __future__ import annotations

import pytest

from bench import burst, serving


def test_the_serving_scenario_passes_its_shared_arguments_on() -> None:
    args = serving.parse_args(["--scenario", "burst", "--clients", "8", "--max-new-tokens", "16", "--threads", "1"])
    parsed = burst.parse_args(burst.argv_from_serving(args))
    assert (parsed.requests, parsed.max_new_tokens, parsed.threads) == (8, 16, 1)
    assert parsed.policies == burst.DEFAULT_POLICIES and parsed.out == args.out
    given = ["--scenario", "burst", "--dtype", "float32", "--linear-kernel", "native", "--linear-threads", "1"]
    parsed = burst.parse_args(burst.argv_from_serving(serving.parse_args(given)))
    assert (parsed.dtype, parsed.linear_kernel, parsed.linear_threads) == ("float32", "native", 1)  # were dropped


@pytest.mark.parametrize(("flag", "value"), [("--policies", "fifo-512,nope"), ("--targets", "base,8xdefault")])
def test_unknown_policies_and_targets_are_refused_before_any_work(flag: str, value: str) -> None:
    with pytest.raises(SystemExit, match="unknown"):
        burst.main([flag, value])


def test_work_before_the_median_first_token_counts_the_steps_that_ended_before_it() -> None:
    steps = [
        {"start": 0.0, "seconds": 0.2, "rows": 1, "tokens": 40},
        {"start": 0.2, "seconds": 1.0, "rows": 13, "tokens": 256},
        {"start": 1.2, "seconds": 1.0, "rows": 25, "tokens": 256},
        {"start": 2.2, "seconds": 0.3, "rows": 25, "tokens": 25},
    ]
    b = burst.Burst(
        policy="p",
        target="base",
        repeat=0,
        ttft=[],
        end=[],
        tokens=0,
        errors=[],
        wall=3.0,
        arrivals=[],
        engine_ttft=[0.21, 1.21, 1.21, 2.21, 2.21],
        steps=steps,
    )
    assert burst.work_before_median_first_token(b) == (2, 296)  # the median first token came after step 2


def _burst(policy: str, ttft: list[float], errors: int = 0, wall: float = 2.0) -> burst.Burst:
    """A burst of len(ttft) requests that succeeded and ``errors`` that failed, 64 tokens each."""
    steps = [
        {"start": 0.0, "seconds": 0.5, "rows": 4, "tokens": 160},
        {"start": 0.5, "seconds": 0.1, "rows": 4, "tokens": 4},
    ]
    return burst.Burst(
        policy=policy,
        target="base",
        repeat=0,
        ttft=ttft,
        end=[wall] * len(ttft),
        tokens=64 * len(ttft),
        errors=["UNAVAILABLE"] * errors,
        wall=wall,
        arrivals=[0.01] * (len(ttft) + errors),
        engine_ttft=sorted(t - 0.01 for t in ttft),
        steps=steps,
    )


def test_percentiles_and_ratios_of_bursts_with_failed_requests_are_not_given() -> None:
    """The TTFT percentiles were over the requests that succeeded, and the table had no errors column: a
    burst whose slowest requests failed read faster."""
    bursts = [
        _burst("fifo-512", [0.5, 1.0, 1.5, 2.0]),
        _burst("default", [0.4, 0.6]),
        _burst("default-nowait", [0.2], errors=3),  # its slowest three failed
    ]
    rows = burst.summary_rows(bursts, ["base"], ["fifo-512", "default", "default-nowait"])
    first, whole, failed = rows
    assert first["errors"] == whole["errors"] == 0 and failed["errors"] == 3
    assert whole["ttft_p50"] == pytest.approx(0.5) and whole["ttft_p50_ratio"] == pytest.approx(0.5 / 1.25)
    assert whole["tok_per_s_ratio"] == pytest.approx(0.5)
    assert all(failed[k] is None for k in burst.PERCENTILES)
    assert failed["ttft_p50_ratio"] is None and failed["tok_per_s_ratio"] is None
    table = burst.render_table(rows).splitlines()
    assert "| errors |" in table[0] and table[0].count("|") == table[1].count("|") == table[2].count("|")
    assert table[-1].startswith(
        "| default-nowait | base | 3 | n/a | n/a | n/a | n/a | n/a | 32 | 2.00 s | 2 | n/a | n/a |"
    )
    assert "n/a" not in table[-2]

    # the first policy's bursts had failed requests: no row's ratio to it is given
    rows = burst.summary_rows([_burst("fifo-512", [0.5], errors=1), bursts[1]], ["base"], ["fifo-512", "default"])
    assert rows[1]["ttft_p50"] == pytest.approx(0.5) and rows[1]["ttft_p50_ratio"] is None
    assert rows[1]["tok_per_s_ratio"] is None
