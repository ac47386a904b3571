"""bench/zipf.py without a model: its arguments (also from bench/serving.py), the traffic it draws and
how it reads the server's log and counters. The run itself publishes hundreds of adapters and serves
for minutes, so it is run by hand (bench/README.md)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from bench import serving, zipf


def test_the_serving_scenario_passes_its_shared_arguments_on() -> None:
    args = serving.parse_args(["--scenario", "zipf", "--quick", "--seed", "3", "--max-batch-size", "16"])
    parsed = zipf.parse_args(zipf.argv_from_serving(args, serving.parse_args([])))
    assert (parsed.adapters, parsed.requests, parsed.host_cache_mib) == (200, 1000, 256)
    assert (parsed.seed, parsed.max_batch_size, parsed.out) == (3, 16, args.out)
    assert (parsed.dtype, parsed.threads) == ("auto", 0)  # not given: zipf's own defaults
    given = serving.parse_args(["--scenario", "zipf", "--dtype", "float32", "--threads", "2"])
    parsed = zipf.parse_args(zipf.argv_from_serving(given, serving.parse_args([])))
    assert (parsed.dtype, parsed.threads) == ("float32", 2)  # both were dropped before
    full = zipf.parse_args([])
    assert (full.adapters, full.requests, full.zipf, full.new_tokens) == (1000, 10000, 1.1, 8)


def test_options_a_scenario_does_not_take_are_refused() -> None:
    """``--scenario burst --dtype float32`` ran bf16 while the JSON's argv said float32; now burst takes
    --dtype, and what a scenario cannot take is refused by name."""
    with pytest.raises(SystemExit, match="--scenario zipf does not take --lora-impl, --max-lora-rank"):
        serving.main(["--scenario", "zipf", "--lora-impl", "gather", "--max-lora-rank", "8"])
    with pytest.raises(SystemExit, match="--scenario burst does not take --max-batch-size"):
        serving.main(["--scenario", "burst", "--max-batch-size", "8"])


def test_zipf_traffic_is_fixed_by_its_seed_and_skewed_to_the_first_ranks() -> None:
    ranks = zipf.zipf_ranks(1000, 10000, 1.1, seed=0)
    assert ranks == zipf.zipf_ranks(1000, 10000, 1.1, seed=0) != zipf.zipf_ranks(1000, 10000, 1.1, seed=1)
    counts = Counter(ranks)
    assert all(0 <= r < 1000 for r in counts)
    # P(rank 0) = 1 / H(1000, 1.1) ~ 0.17, P(rank 1) ~ half as much, the tail thin
    assert 1400 < counts[0] < 2000 and 0.35 < counts[1] / counts[0] < 0.6
    assert sum(c for r, c in counts.items() if r >= 500) < 0.1 * len(ranks)
    assert [zipf.shape_of_rank(r, 2).key for r in range(4)] == ["default", "r16all", "default", "r16all"]


def test_load_lines_are_split_by_shape_and_first_load() -> None:
    refs = {"zipf/default-0000": serving.SHAPES["default"], "zipf/r16all-0001": serving.SHAPES["r16all"]}
    log = "\n".join(
        [
            "INFO x: adapter zipf/r16all-0001@1 read from the store in 0.1200s (9781248 bytes on the host)",
            "INFO x: adapter zipf/r16all-0001@1 written to device slot 3 in 0.0150s",
            "INFO x: adapter zipf/default-0000@1 read from the store in 0.0100s (921600 bytes on the host)",
            "INFO x: adapter other/x@1 read from the store in 9.0000s (1 bytes on the host)",
            "INFO x: adapter zipf/r16all-0001@1 read from the store in 0.0500s (9781248 bytes on the host)",
        ]
    )
    loads = zipf.parse_loads(log, refs)
    assert loads["r16all"].store_first == [0.12] and loads["r16all"].store_again == [0.05]
    assert loads["r16all"].device == [0.015] and loads["default"].store_first == [0.01]
    later = zipf.parse_loads(log, refs, since_line=3)  # a reload stays a reload after the warm-up cut
    assert later["r16all"].store_first == [] and later["r16all"].store_again == [0.05]


def test_hit_ratios_are_taken_between_two_scrapes() -> None:
    def scrape(hits: float, misses: float) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {
            ("lorafleet_adapter_cache_hits_total", (("tier", "host"),)): hits,
            ("lorafleet_adapter_cache_misses_total", (("tier", "host"),)): misses,
        }

    ratios = zipf.tier_ratios(scrape(10, 10), scrape(40, 20))
    assert ratios["host"]["hits"] == 30 and ratios["host"]["misses"] == 10 and ratios["host"]["hit_ratio"] == 0.75
    assert ratios["device"]["hit_ratio"] == 0


def test_a_replica_on_s3_polls_as_asked_and_has_no_isolated_cold_loads(capsys: pytest.CaptureFixture[str]) -> None:
    args = zipf.parse_args(["--store", "s3", "--poll-seconds", "5", "--rescan-seconds", "0"])
    assert (args.store, args.poll_seconds, args.rescan_seconds, args.adapter_cache_mib) == ("s3", 5.0, 0.0, 2048)
    assert (zipf.parse_args([]).store, zipf.parse_args([]).poll_seconds) == ("local", 0.0)  # as before: no polls
    with pytest.raises(SystemExit):
        zipf.parse_args(["--store", "s3", "--cold-only"])
    assert "--cold-only times loads from a local directory" in capsys.readouterr().err


def test_a_kept_store_made_with_other_parameters_is_refused(tmp_path: Path) -> None:
    """A 200-adapter quick store reused by a full run was reported as "over 1000 adapters"."""
    made = {"adapters": 2, "r16_every": 2, "seed": 0}
    refs_file = tmp_path / "zipf-refs.json"
    refs_file.write_text(json.dumps({"made": made, "refs": {"bench/a": "default", "bench/b": "r16all"}}))
    assert list(zipf.kept_refs(refs_file, made)) == ["bench/a", "bench/b"]
    with pytest.raises(SystemExit, match=r"was made with .*'adapters': 2.*not .*'adapters': 1000"):
        zipf.kept_refs(refs_file, {**made, "adapters": 1000})
    refs_file.write_text(json.dumps({"bench/a": "default"}))  # written before the parameters were
    with pytest.raises(SystemExit, match="before they were recorded"):
        zipf.kept_refs(refs_file, made)
