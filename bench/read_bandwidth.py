"""How fast this machine reads memory, per working-set size and thread count: the wall behind goal 2b.

A decode step reads every base weight once (SmolLM2-135M in bf16: 257 MiB) and, with 32 distinct r=16
all-linear adapters, 298 MiB of adapters more. Whether those bytes come from the last-level cache or
from DRAM sets what a step can cost, so this times one streaming read (``torch.sum`` of a float32
buffer, which reads at the memory's pace on these CPUs) over buffers of growing size, on one and on
all threads. A step reads the same weights step after step, so each timed read follows ``--warm``
untimed reads of the same buffer: a cache that keeps only lines it has seen reused (Intel's last level
keeps few of those read once) then holds what fits. Each cell is the median of ``--rounds`` such reads,
the sizes taken in turn round by round, so load from other processes hits all alike.

    .venv/bin/python -m bench.read_bandwidth                 # ~20 s (holds ~2.6 GiB of buffers)
    .venv/bin/python -m bench.read_bandwidth --sizes 128,256,555 --threads 2 --json bench/results/read_bandwidth.json

Where the reads of the base alone fit the cache and those of the base and the adapters together do
not, the adapters' share of a step is larger than their share of the bytes (bench/README.md, goal 2b).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

SIZES_MIB = (16, 64, 128, 192, 256, 384, 555, 1024)


def read_seconds(buf: torch.Tensor) -> float:
    """Seconds one full read of ``buf`` takes."""
    start = time.perf_counter()
    buf.sum()
    return time.perf_counter() - start


def measure(sizes_mib: list[int], threads: int, rounds: int, warm: int) -> dict[int, float]:
    """GB/s per size (MiB) on ``threads`` torch threads: the median of ``rounds`` reads, each after
    ``warm`` untimed reads of the same buffer."""
    torch.set_num_threads(threads)
    bufs = {mib: torch.ones(mib << 18, dtype=torch.float32) for mib in sizes_mib}  # [mib * 2^18] fp32
    times: dict[int, list[float]] = {mib: [] for mib in sizes_mib}
    for _ in range(rounds):
        for mib, buf in bufs.items():
            for _ in range(warm):  # untimed: the buffer as cached as it can be, as a step's weights
                read_seconds(buf)
            times[mib].append(read_seconds(buf))
    return {mib: (mib << 20) / statistics.median(ts) / 1e9 for mib, ts in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=",".join(map(str, SIZES_MIB)), help="comma list of buffer sizes in MiB")
    parser.add_argument("--threads", default="", help="comma list of thread counts (default: 1 and every CPU)")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--warm", type=int, default=4, help="untimed reads of a buffer before each timed one")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    cpus = len(os.sched_getaffinity(0))
    thread_counts = [int(t) for t in args.threads.split(",") if t] or sorted({1, cpus})
    if not sizes or min(sizes) < 1 or not thread_counts or min(thread_counts) < 1 or args.rounds < 1 or args.warm < 0:
        parser.error("sizes, thread counts and rounds must be positive, --warm not negative")
    before = torch.get_num_threads()
    try:
        results = {threads: measure(sizes, threads, args.rounds, args.warm) for threads in thread_counts}
    finally:
        torch.set_num_threads(before)  # as it was, for a caller in the same process (the tests)
    how = f"torch.sum of fp32; median of {args.rounds}, each after {args.warm} untimed"
    print(f"read bandwidth, GB/s ({how}), {cpus} CPUs")
    print(f"{'MiB':>6}" + "".join(f"{f'{t} thread' + ('s' if t > 1 else ''):>12}" for t in thread_counts))
    for mib in sizes:
        print(f"{mib:>6}" + "".join(f"{results[t][mib]:>12.1f}" for t in thread_counts))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        table = {str(t): {str(mib): round(gbs, 2) for mib, gbs in per.items()} for t, per in results.items()}
        meta = {"rounds": args.rounds, "warm": args.warm, "cpus": cpus}
        args.json.write_text(json.dumps({**meta, "gb_per_s": table}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
