"""Classify throughput: requests per second at batch 32, against Generate of one token on the same texts.

The real server (``build_service`` + ``BackgroundServer``, in-process, 127.0.0.1, ephemeral port) with
``max_batch_size=32`` serves a classifier head trained here on the demo's third company
(``demo/intents.py``, pooled features of the frozen base, no prompt-only evaluation). Each round sends
32 concurrent requests (one ``AsyncLoraFleetClient``) with 32 different customer messages: ``Classify``
(a prefill-only forward, mean pooling, the head on the engine thread), ``Generate`` with
``max_new_tokens=1`` (a prefill that also computes logits and samples one token), and ``Embed`` (the
same forward as Classify without the head) for reference. Rounds alternate between the three so drift
on a noisy machine hits them alike; the first round of each is a warm-up.

    .venv/bin/python -m bench.classify              # 10 measured rounds each (~1-2 min on 2 cores)
    .venv/bin/python -m bench.classify --rounds 3   # quicker

Prints a table and writes bench/results/classify-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
RESULTS_DIR = REPO / "bench" / "results"
BATCH = 32


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.classify", description=__doc__)
    parser.add_argument("--rounds", type=int, default=10, help="measured rounds per RPC (default 10)")
    parser.add_argument("--batch", type=int, default=BATCH, help="concurrent requests per round (default 32)")
    args = parser.parse_args(argv)

    from demo import intents
    from lorafleet import AsyncLoraFleetClient, Message, Sampling
    from lorafleet_server.app import build_service, model_dir_for
    from lorafleet_server.config import ServerConfig
    from lorafleet_server.grpc.server import BackgroundServer
    from lorafleet_server.model.prepare import prepare_default_model
    from lorafleet_training.classifier import ClassifierConfig, train_classifier
    from lorafleet_training.publish import publish

    work = Path(tempfile.mkdtemp(prefix="bench-classify."))
    config = ServerConfig(
        model=prepare_default_model(REPO / "data" / "models"),
        data_dir=work,
        port=0,
        metrics_port=0,
        max_batch_size=args.batch,
        max_seq_len=256,
        max_new_tokens=8,
        default_max_new_tokens=1,
        max_lora_rank=16,
        # Every round sends the same texts: with the prefix cache Generate recomputed only each prompt's
        # last partial block from round 1 on, while Embed and Classify never use the cache.
        prefix_cache_bytes=0,
    )
    service = build_service(config)
    paths = intents.write_datasets(work / "data")
    head_out = work / "head"
    train_classifier(
        ClassifierConfig(
            data=paths["train"],
            adapter=intents.REFERENCE,
            out_dir=head_out,
            base_model_dir=model_dir_for(config),
            eval_generate=False,
        ),
        service.base.spec,
        echo=lambda _: None,
    )
    publish(head_out, service.store, service.base.spec)
    texts = [r["text"] for r in (intents.held_out_rows() * 4)[: args.batch]]
    server = BackgroundServer(service)
    port = server.start()

    async def run() -> dict[str, list[float]]:
        seconds: dict[str, list[float]] = {"classify": [], "generate_1_token": [], "embed": []}
        async with AsyncLoraFleetClient(f"127.0.0.1:{port}", timeout=300) as client:
            calls: dict[str, Callable[[str], Awaitable[Any]]] = {
                "classify": lambda t: client.classify(messages=[Message("user", t)], adapter=intents.REFERENCE),
                "generate_1_token": lambda t: client.generate(
                    messages=[Message("user", t)], sampling=Sampling(max_new_tokens=1)
                ),
                "embed": lambda t: client.embed(messages=[Message("user", t)]),
            }
            for round_ in range(args.rounds + 1):
                for name, call in calls.items():
                    started = time.perf_counter()
                    await asyncio.gather(*(call(t) for t in texts))
                    if round_:  # round 0 warms up
                        seconds[name].append(time.perf_counter() - started)
        return seconds

    try:
        seconds = asyncio.run(run())
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    rows = {}
    for name, values in seconds.items():
        rps = [args.batch / s for s in values]
        rows[name] = {"requests_per_second_median": statistics.median(rps), "round_seconds": values}
    ratio = rows["classify"]["requests_per_second_median"] / rows["generate_1_token"]["requests_per_second_median"]
    print(f"{'rpc':<18} {'req/s (median)':>14}  rounds of {args.batch} concurrent requests, {args.rounds} measured")
    for name, row in rows.items():
        print(f"{name:<18} {row['requests_per_second_median']:>14.1f}")
    print(f"classify / generate_1_token = {ratio:.2f}x")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"classify-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(
        json.dumps(
            {
                "batch": args.batch,
                "rounds": args.rounds,
                "results": rows,
                "classify_over_generate_1_token": ratio,
                "machine": {"platform": platform.platform(), "python": sys.version.split()[0]},
                "model": service.base.spec.model_id,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
