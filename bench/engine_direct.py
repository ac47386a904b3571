"""Engine-level throughput: base only vs k distinct adapters, no gRPC in between.

Built for the GPU check (``scripts/gpu_check.sh``): a device machine has torch, CUDA and
bitsandbytes but not this project's gRPC stack, so this bench drives the engine directly through
``Engine.submit`` with the same workload as ``bench/serving.py`` (concurrent greedy requests, EOS
ignored, PEFT-default adapters, client i uses adapter i % k). It runs on CPU as well (``--quick`` is a
40 s smoke run here), so its numbers compare with the gRPC bench's minus the edge.

    .venv/bin/python -m bench.engine_direct --device cpu --quantization none --quick
    python3 -m bench.engine_direct --device cuda --quantization nf4      # on a GPU machine

Prints one table and writes JSON next to the serving bench's results.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bench.serving import RESULTS_DIR, SHAPES, TENANT, make_adapters, percentile, prompt_text
from lorafleet_adapters.ref import AdapterRef
from lorafleet_server.app import Service, build_service, model_dir_for
from lorafleet_server.config import ServerConfig
from lorafleet_server.engine.types import ChatTurn, GenerationRequest, SamplingParams, TokenEvent

log = logging.getLogger("bench.engine_direct")


@dataclass(frozen=True)
class RunStats:
    name: str
    distinct_adapters: int
    requests: int
    tokens: int
    seconds: float
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p95_ms: float


class _Sink:
    """Counts one request's tokens and stamps its first token, on the engine thread."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.first: float | None = None
        self.tokens = 0
        self.error: BaseException | None = None
        self.done = threading.Event()

    def __call__(self, event: TokenEvent) -> None:
        if event.token_ids:
            if self.first is None:
                self.first = time.perf_counter()
            self.tokens += len(event.token_ids)
        if event.final:
            self.error = event.error
            self.done.set()


def _ms(seconds: float | None) -> float:
    return float("nan") if seconds is None else round(seconds * 1000, 1)


def run_load(service: Service, name: str, adapters: Sequence[str | None], clients: int, new_tokens: int) -> RunStats:
    """``clients`` requests submitted together; client i uses ``adapters[i % len(adapters)]``.

    Every run starts with an empty prefix cache, emptied on the engine thread between steps (as
    bench.serving's runs do): the warm-up sends the measured (adapter, prompt) pairs, so a kept cache
    handed the adapter runs their prompts' prefill, and not the base run, which the warm-up covers less.
    """
    service.engine.run(service.engine.prefix_cache.clear)
    sinks: list[_Sink] = []
    t0 = time.perf_counter()
    for i in range(clients):
        ref = adapters[i % len(adapters)]
        req = GenerationRequest(
            request_id=f"{name}-{i}",
            messages=(ChatTurn("user", prompt_text(i)),),  # bench.serving's chat turn, not the raw text
            adapter=AdapterRef.parse(ref) if ref else None,
            params=SamplingParams(max_new_tokens=new_tokens),
        )
        sink = _Sink(time.perf_counter())
        service.engine.submit(req, sink)
        sinks.append(sink)
    for sink in sinks:
        if not sink.done.wait(600):
            raise TimeoutError(f"{name}: a request did not finish in 600 s")
        if sink.error is not None:
            raise sink.error
    seconds = time.perf_counter() - t0
    tokens = sum(s.tokens for s in sinks)
    ttft = [(s.first or t0) - s.started for s in sinks]
    return RunStats(
        name=name,
        distinct_adapters=len({a for a in adapters if a}),
        requests=clients,
        tokens=tokens,
        seconds=round(seconds, 3),
        tokens_per_s=round(tokens / seconds, 1),
        ttft_p50_ms=_ms(percentile(ttft, 50)),
        ttft_p95_ms=_ms(percentile(ttft, 95)),  # interpolated, as every other bench's percentiles
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--quantization", default="auto", choices=("auto", "none", "nf4", "int8"))
    p.add_argument("--model", type=Path, help="model directory (default: the prepared SmolLM2-135M-Instruct)")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--counts", default="32", help="distinct-adapter counts after the base run (default 32)")
    p.add_argument("--shape", default="default", choices=sorted(SHAPES))
    p.add_argument("--quick", action="store_true", help="8 clients, 8 new tokens, counts 1,8 (a smoke run)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    args = parse_args(argv)
    clients = 8 if args.quick else args.clients
    new_tokens = 8 if args.quick else args.max_new_tokens
    counts = [1, 8] if args.quick else [int(c) for c in args.counts.split(",") if c]
    shape = SHAPES[args.shape]
    with tempfile.TemporaryDirectory(prefix="lorafleet-bench-") as tmp:
        root = Path(tmp)
        config = ServerConfig(
            model=args.model,
            data_dir=root,
            adapter_store=root / "store",
            device=args.device,
            quantization=args.quantization,
            max_batch_size=max(clients, 1),
            max_loaded_adapters=max([*counts, 1]),
            max_lora_rank=max(16, shape.r),
            max_new_tokens=max(new_tokens, 16),
        )
        service = build_service(config)
        service.engine.eos_token_ids = frozenset()  # every request generates exactly max_new_tokens
        service.engine.start()
        try:
            model_dir = model_dir_for(config)
            dirs = make_adapters(model_dir, [shape], max([*counts, 1]), root / "peft")[shape.key]
            refs = []
            for i, d in enumerate(dirs):
                service.store.import_peft(d, TENANT, f"a{i:02d}", service.base.spec)
                refs.append(f"{TENANT}/a{i:02d}")
            # Warm-up: compile/allocator caches and every adapter's first load, outside the timing.
            run_load(service, "warmup", [None], min(clients, 4), 4)
            run_load(service, "warmup-adapters", refs[: max(counts)], max(counts), 2)
            results = [run_load(service, "base", [None], clients, new_tokens)]
            for k in counts:
                results.append(run_load(service, f"{k}-adapters", refs[:k], clients, new_tokens))
        finally:
            service.engine.shutdown()
    base = results[0].tokens_per_s
    info = service.info
    print(
        f"engine-direct bench: {info.model_id} on {info.device}, quantization {info.quantization}, "
        f"dtype {info.dtype}; {clients} concurrent greedy requests x {new_tokens} tokens; "
        f"adapters: {shape.label}"
    )
    print(f"{'run':<14}{'tok/s':>9}{'x base':>8}{'TTFT p50':>10}{'TTFT p95':>10}")
    for r in results:
        print(
            f"{r.name:<14}{r.tokens_per_s:>9.1f}{r.tokens_per_s / base:>8.2f}"
            f"{r.ttft_p50_ms:>9.0f}ms{r.ttft_p95_ms:>8.0f}ms"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"engine-direct-{time.strftime('%Y%m%d-%H%M%S')}.json"
    meta = {
        "device": info.device,
        "quantization": info.quantization,
        "dtype": info.dtype,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name(0) if info.device.startswith("cuda") else None,
    }
    out.write_text(json.dumps({"meta": meta, "runs": [asdict(r) for r in results]}, indent=2))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
