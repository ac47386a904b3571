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
    assert ratios["device"]["hit_ratio"] is None  # no lookup: no ratio (it read 0, a total miss)


def test_host_cache_bytes_come_from_the_residency_series_and_its_absence_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The series went behind --metrics-adapter-residency and the benchmark, not passing it, read an
    empty host cache (0 MiB) in every run for a day; the server is started with it, and a scrape
    without any residency series is an error, not 0 bytes."""
    refs = {"zipf/a": zipf.SHAPES["default"], "zipf/b": zipf.SHAPES["r16all"]}
    per_shape = {"default": 100, "r16all": 1000}
    resident = "lorafleet_adapter_resident"
    scrape = {
        (resident, (("adapter", "zipf/a@1"), ("tier", "host"))): 1.0,
        (resident, (("adapter", "zipf/b@1"), ("tier", "host"))): 1.0,
        (resident, (("adapter", "zipf/b@1"), ("tier", "device"))): 1.0,
    }
    assert zipf.host_bytes(scrape, refs, per_shape) == 1100
    with pytest.raises(RuntimeError, match="--metrics-adapter-residency"):
        zipf.host_bytes({("lorafleet_adapter_cache_hits_total", (("tier", "host"),)): 3.0}, refs, per_shape)
    args = zipf.parse_args(["--quick"])
    started: list[list[str]] = []

    class Popen:
        def __init__(self, command: list[str], **_: object) -> None:
            started.append(command)

    monkeypatch.setattr(zipf.subprocess, "Popen", Popen)
    zipf.start_server(args, Path("model"), "store", tmp_path)
    assert "--metrics-adapter-residency" in started[0]


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


def _reply(index: int, adapter: str, prompt: int, text: str, started: float, seconds: float) -> zipf.Reply:
    return zipf.Reply(index, adapter, prompt, f"{adapter}@1", text, seconds, started=started)


def test_a_replay_mismatch_equal_to_another_adapters_text_counts_as_mis_routed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The served version comes from the reference resolved at submit: a wrong slot keeps its name. The
    replay catches it: the mixed text is what another adapter, one in flight beside it, gives alone."""
    replies = [
        _reply(0, "zipf/a", 1, "text of b", started=0.0, seconds=1.0),  # computed with b's slot
        _reply(1, "zipf/b", 7, "b's own", started=0.5, seconds=1.0),  # overlapped requests 0 and 2
        _reply(2, "zipf/c", 2, "c rounded", started=0.2, seconds=0.5),  # overlapped request 0
        _reply(3, "zipf/d", 2, "d's own", started=5.0, seconds=1.0),  # after both: no neighbour of theirs
        zipf.Reply(4, "zipf/e", 1, "", "", 0.1, "UNAVAILABLE", started=0.1),  # failed: not a neighbour
    ]
    assert zipf.neighbours(replies, replies[0]) == ["zipf/c", "zipf/b", ""]  # nearest start first, then base
    assert zipf.neighbours(replies, replies[0], limit=1) == ["zipf/c", ""]
    assert zipf.neighbours(replies, replies[3]) == [""]

    alone_texts = {
        ("zipf/a", 1): "a's own",
        ("zipf/b", 1): "text of b",
        ("zipf/c", 1): "c on 1",
        ("", 1): "base on 1",
        ("zipf/c", 2): "c's own",
        ("zipf/a", 2): "a on 2",
        ("zipf/b", 2): "b on 2",
        ("", 2): "base on 2",
        ("zipf/d", 2): "d's own",
    }
    sent: list[list[tuple[str, int]]] = []

    async def replay_alone(target: str, pairs: list[tuple[str, int]], new_tokens: int) -> list[str]:
        sent.append(pairs)
        return [alone_texts[pair] for pair in pairs]

    monkeypatch.setattr(zipf, "replay_alone", replay_alone)
    sample = {(r.adapter, r.prompt): r for r in (replies[0], replies[2], replies[3])}
    mismatches, telling = zipf.check_replay("127.0.0.1:1", replies, sample, 8)
    assert sent[0] == list(sample)  # the sample first, its prompts on the base, each mismatch's on its neighbours
    assert sent[1] == [("", 1), ("", 2)]
    assert sorted(sent[2]) == sorted([("zipf/c", 1), ("zipf/b", 1), ("zipf/a", 2), ("zipf/b", 2)])
    assert telling == 3  # each sampled adapter's own text differs from the base model's
    alone_texts[("zipf/d", 2)] = "base on 2"  # an adapter that gives the base's text cannot show a mis-route
    assert zipf.check_replay("127.0.0.1:1", replies, sample, 8)[1] == 2
    by_adapter = {m["adapter"]: m for m in mismatches}
    assert list(by_adapter) == ["zipf/a", "zipf/c"]  # d's text is its own: no mismatch
    assert by_adapter["zipf/a"]["equals_alone_text_of"] == ["zipf/b"] and by_adapter["zipf/a"]["wrong_adapter"]
    assert by_adapter["zipf/c"]["equals_alone_text_of"] == [] and not by_adapter["zipf/c"]["wrong_adapter"]
    assert by_adapter["zipf/c"]["others_tried"] == 3  # a and b, in flight beside it, and the base model


def test_the_report_gives_replay_mismatches_beside_mis_routed(capsys: pytest.CaptureFixture[str]) -> None:
    tier = {"hits": 1, "misses": 1, "evictions": 0, "hit_ratio": 0.5}
    mismatch = {"adapter": "zipf/a", "prompt": 1, "common_prefix_chars": 3, "others_tried": 3}
    result = {
        "argv": [],
        "requests": 10,
        "distinct_adapters": 4,
        "wall_seconds": 1.0,
        "requests_per_second": 10.0,
        "latency_p50_s": 0.1,
        "latency_p99_s": 0.2,
        "errors": 0,
        "misrouted": 1,
        "misrouted_served_version": 0,
        "misrouted_replay": 1,
        "replayed": 3,
        "replay_mismatches": 2,
        "replay_text_mismatches": [
            {**mismatch, "equals_alone_text_of": ["zipf/b"], "wrong_adapter": True},
            {**mismatch, "adapter": "zipf/c", "equals_alone_text_of": [], "wrong_adapter": False},
        ],
        "ratios_after_warmup": {"device": tier, "host": tier},
        "ratios_whole_run": {"device": tier, "host": tier},
        "rss_after_warmup": 1,
        "rss_end": 1,
        "rss_max_after_warmup": 1,
        "rss_growth_after_warmup": 0.0,
        "host_cache_bytes_warmup": 0,
        "host_cache_bytes_end": 0,
        "prefix_cache_bytes_warmup": 0,
        "prefix_cache_bytes_end": 0,
        "slot_memory_bytes_warmup": 0,
        "slot_memory_bytes_end": 0,
        "loads_after_warmup": {},
    }
    zipf.report_traffic(zipf.parse_args(["--quick"]), result)
    out = capsys.readouterr().out
    assert "mis-routed 1 (0 served version != requested, 1 replayed text = another adapter's)" in out
    assert "replay mismatches 2 of 3 replayed alone" in out
    assert "zipf/a prompt 1: same text for 3 chars; equals the alone text of zipf/b: MIS-ROUTED" in out
    assert "zipf/c prompt 1" in out and "equals no other's alone text (3 tried" in out
