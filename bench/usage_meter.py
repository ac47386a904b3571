"""The usage meter at a week's retention: its memory, a week-long read, and what that read costs ``record``.

The engine meters every finished request into a (minute, tenant, adapter) bucket kept for 7 days
(server/lorafleet_server/engine/usage.py). This fills a meter as a server under Zipf traffic would:
each simulated minute draws ``--rate`` x 60 requests' adapters from Zipf(``--zipf``) over
``--adapters`` adapters (tenant = adapter index mod ``--tenants``, a tenth of requests on the base
model), and records each distinct (tenant, adapter) of that minute once (a bucket is made by its
first request; more requests only add to its counts). Then it reports:

- buckets held and Python heap bytes a bucket (tracemalloc, after the fill, names included);
- the longest ``record`` while filling: the first record of a minute closes the last one and drops
  what the retention no longer holds, on the engine thread;
- ``report`` over the whole retention and for one tenant, wall time (best of ``--repeats``);
- the engine side: the longest single ``record`` call while a week-long ``report`` runs in another
  thread, against the longest with no reader (the reader must not hold the lock for its sum).

    .venv/bin/python -m bench.usage_meter               # 7 days at 50 req/s over 850 adapters (~1-2 minutes)
    .venv/bin/python -m bench.usage_meter --days 1      # quicker
"""

from __future__ import annotations

import argparse
import threading
import time
import tracemalloc
from collections.abc import Sequence

import numpy as np

from lorafleet_server.engine.types import FinishReason, Summary
from lorafleet_server.engine.usage import MINUTE, UsageMeter


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--days", type=float, default=7.0, help="simulated days, the meter's retention (%(default)s)")
    parser.add_argument("--rate", type=float, default=50.0, help="requests a second (%(default)s)")
    parser.add_argument("--adapters", type=int, default=850, help="adapters drawn from (%(default)s)")
    parser.add_argument("--tenants", type=int, default=100, help="tenants they belong to (%(default)s)")
    parser.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of adapter popularity (%(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="reports timed, best taken (%(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rng = np.random.default_rng(args.seed)
    weights = 1.0 / np.arange(1, args.adapters + 1) ** args.zipf
    weights /= weights.sum()
    minutes = int(args.days * 24 * 60)
    per_minute = int(args.rate * MINUTE)
    start = 1_800_000_000 // MINUTE * MINUTE
    now = [float(start)]
    meter = UsageMeter(retention_seconds=args.days * 24 * 3600 + MINUTE, clock=lambda: now[0], steady=lambda: now[0])
    adapter_names = [f"t{i % args.tenants}/a{i}@1" for i in range(args.adapters)]
    summaries = [Summary(FinishReason.LENGTH, 40, 8, name, "r") for name in adapter_names]
    base = Summary(FinishReason.LENGTH, 40, 8, "", "r")

    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    worst_fill = 0.0
    t0 = time.perf_counter()
    for m in range(minutes):
        now[0] = start + m * MINUTE + 1
        drawn = np.unique(rng.choice(args.adapters, size=int(per_minute * 0.9), p=weights))
        for i in drawn:
            t1 = time.perf_counter()
            meter.record(f"t{i % args.tenants}", summaries[i])  # the first of a minute closes the last
            worst_fill = max(worst_fill, time.perf_counter() - t1)
        for t in range(0, args.tenants, 7):  # the base model's requests, a few tenants' keys a minute
            meter.record(f"t{t}", base)
    fill_s = time.perf_counter() - t0
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    buckets = meter.buckets()
    print(f"filled {minutes:,} minutes in {fill_s:.1f} s: {buckets:,} buckets, {buckets / minutes:.0f} a minute")
    print(f"heap held: {held / 2**20:,.1f} MiB, {held / buckets:.1f} B a bucket")
    print(f"longest record() while filling (minute changes and expiry included): {worst_fill * 1e3:.2f} ms")

    end = now[0] + 1
    full = tenant = float("inf")
    rows = 0
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        rows = len(meter.report(0, end))
        full = min(full, time.perf_counter() - t0)
        t0 = time.perf_counter()
        meter.report(0, end, tenant="t3")
        tenant = min(tenant, time.perf_counter() - t0)
    print(f"report, whole retention: {full * 1e3:,.1f} ms ({rows} rows); one tenant: {tenant * 1e3:,.1f} ms")

    def longest_record(seconds: float) -> float:
        worst, until = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < until:
            t0 = time.perf_counter()
            meter.record("t1", summaries[1])
            worst = max(worst, time.perf_counter() - t0)
        return worst

    quiet = longest_record(full)
    reader = threading.Thread(target=meter.report, args=(0, end))
    reader.start()
    busy = longest_record(full)
    reader.join()
    print(f"longest record(): {quiet * 1e3:.2f} ms alone, {busy * 1e3:.2f} ms during a whole-retention report")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
