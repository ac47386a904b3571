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
