"""Burst scenario: 32 chat requests sent at the same instant; TTFT of each, throughput and time to finish.

The workload of the load scenario (bench/serving.py): chat requests (the model's chat template, prompts
from ``prompt_text``), greedy, 64 new tokens (EOS ignored), but all 32 streams start together on 32
ready channels instead of one after another; the clients run in a process of their own
(``LoadGenerator``). Run against the base model and against 32 distinct r=8
q/v adapters (one per request), for each engine scheduling policy, in one process, interleaved
(policy A, policy B, policy A, ...) so that ratios come from one run on a noisy machine.

A policy is a set of ``EngineConfig`` overrides applied on the engine thread between bursts
(``Engine.run``), so every policy serves the same loaded model, adapters and warm kernels. Each burst
starts with an empty prefix cache (a cold burst: no earlier request shared its prompt's blocks), after a
warm-up that made every adapter resident.

    .venv/bin/python -m bench.serving --scenario burst               # the defaults below, ~6-10 min on 2 cores
    .venv/bin/python -m bench.burst --repeats 3 --step-tokens 256 --trace  # plus a 256-token budget, step logs

Prints a table (policy, target: failed requests, TTFT p50/p90/max, tok/s over the burst, time to finish,
forward steps, ratios to the first policy) and writes JSON to bench/results/burst-<timestamp>.json. A
percentile or ratio involving a burst with failed requests is n/a (null in the JSON), not one over the
requests that succeeded.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bench.serving import (
    REPO,
    RESULTS_DIR,
    SHAPES,
    TENANT,
    LoadGenerator,
    StepLog,
    add_kernel_arguments,
    install_step_timer,
    make_adapters,
    percentile,
    prompt_text,
    quiet_logging,
    say,
)

# name -> EngineConfig overrides. "fifo-512" is the scheduling before issue 13 (prefill chunks in
# admission order under a 512-token budget); "burst" is the default configuration.
POLICIES: dict[str, dict[str, Any]] = {
    "fifo-512": {"max_step_tokens": 512, "prefill_order": "arrival", "burst_wait_ms": 0},
    "default": {},
    "default-nowait": {"burst_wait_ms": 0},
}
DEFAULT_POLICIES = "fifo-512,default"


@dataclasses.dataclass
class Burst:
    policy: str
    target: str
    repeat: int
    ttft: list[float]  # seconds, per request, from the common send instant to its first chunk
    end: list[float]  # seconds, per request, to its last chunk
    tokens: int
    errors: list[str]
    wall: float  # send instant to the last request's end
    arrivals: list[float]  # seconds since the send instant at which the engine got each request (submit)
    engine_ttft: list[float]  # seconds since the send instant at which the engine emitted each first token
    steps: list[dict[str, float]]  # per forward: start (s since send), seconds, rows, tokens, torch threads

    @property
    def tok_per_s(self) -> float:
        return self.tokens / self.wall if self.wall > 0 else 0.0


async def _one(client: Any, adapter: str, index: int, max_new_tokens: int, t0: float) -> tuple[float, float, int]:
    from lorafleet import Message, Sampling

    first: float | None = None
    stream = client.stream(
        messages=[Message("user", prompt_text(index))],
        adapter=adapter,
        sampling=Sampling(max_new_tokens=max_new_tokens, temperature=0.0),
    )
    async for chunk in stream:
        if first is None and chunk:
            first = time.perf_counter()
    end = time.perf_counter()
    return (first or end) - t0, end - t0, stream.result.generated_tokens


async def burst(target: str, adapters: Sequence[str], max_new_tokens: int) -> tuple[list[Any], float, float]:
    """Send ``len(adapters)`` streams at once (one ready channel each; request i uses ``adapters[i]``,
    "" = base). Returns the per-request outcomes (or exceptions), the send instant and the wall time."""
    from lorafleet import AsyncLoraFleetClient

    conns = [AsyncLoraFleetClient(target, timeout=900) for _ in adapters]
    try:
        await asyncio.gather(*(c.wait_for_ready(60) for c in conns))
        t0 = time.perf_counter()
        outs = await asyncio.gather(
            *(_one(c, a, i, max_new_tokens, t0) for i, (c, a) in enumerate(zip(conns, adapters, strict=True))),
            return_exceptions=True,
        )
        wall = time.perf_counter() - t0
    finally:
        await asyncio.gather(*(c.close() for c in conns))
    return list(outs), t0, wall


@dataclasses.dataclass
class EngineTimes:
    """When requests reached ``engine.submit`` and when the engine emitted their first token (perf_counter)."""

    arrivals: list[float] = dataclasses.field(default_factory=list)
    first_tokens: list[float] = dataclasses.field(default_factory=list)

    def clear(self) -> None:
        self.arrivals.clear()
        self.first_tokens.clear()


def install_submit_timer(engine: Any) -> EngineTimes:
    """Wrap ``engine.submit`` (and each request's sink) to tell arrival, queueing and delivery apart."""
    times = EngineTimes()
    original = engine.submit

    def timed(req: Any, sink: Any, **kwargs: Any) -> Any:  # kwargs: reserved_at from EngineStream
        times.arrivals.append(time.perf_counter())
        seen = False

        def first_token_sink(event: Any) -> None:
            nonlocal seen
            if not seen and event.token_ids:
                seen = True
                times.first_tokens.append(time.perf_counter())
            sink(event)

        return original(req, first_token_sink, **kwargs)

    engine.submit = timed
    return times


# bench.serving's options this scenario passes on (any other given to ``--scenario burst`` is refused)
FROM_SERVING = frozenset(
    {"clients", "lora_impl", "threads", "attention_kernel", "layers_kernel", "linear_kernel", "linear_threads"}
    | {"prefill_threads", "fixed_decode_threads", "dtype", "out", "seed", "max_new_tokens", "model"}
)


def argv_from_serving(args: argparse.Namespace) -> list[str]:
    """This scenario's arguments from ``python -m bench.serving --scenario burst``'s (``FROM_SERVING``)."""
    argv = ["--requests", str(args.clients), "--lora-impl", args.lora_impl, "--threads", str(args.threads)]
    argv += ["--attention-kernel", args.attention_kernel, "--layers-kernel", args.layers_kernel]
    argv += ["--linear-kernel", args.linear_kernel, "--linear-threads", str(args.linear_threads)]
    argv += ["--prefill-threads", str(args.prefill_threads)]
    if args.dtype is not None:  # bench.serving's default: the server's own, as burst's "auto"
        argv += ["--dtype", args.dtype]
    if args.fixed_decode_threads:
        argv.append("--fixed-decode-threads")
    argv += ["--out", str(args.out), "--seed", str(args.seed)]
    if args.max_new_tokens:
        argv += ["--max-new-tokens", str(args.max_new_tokens)]
    if args.model:
        argv += ["--model", str(args.model)]
    return argv


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.burst", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=32, help="requests in the burst (default 32)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="bursts per policy and target (medians are reported)")
    p.add_argument("--policies", default=DEFAULT_POLICIES, help=f"comma-separated among {','.join(POLICIES)}")
    p.add_argument("--targets", default="base,32xdefault", help="base and/or 32xdefault (32 distinct r=8 q/v adapters)")
    p.add_argument(
        "--step-tokens",
        default="",
        help="extra policies: comma-separated max_step_tokens values run with the default order (e.g. 128,256)",
    )
    add_kernel_arguments(p)
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="torch intra-op threads")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=("device", "auto", "float32", "bfloat16"),
        help="compute dtype (default auto: the server's choice, bf16 only where the CPU has native bf16 and "
        "the model passes the bf16 check)",
    )
    p.add_argument("--model", type=Path, help="model directory (default: the prepared SmolLM2-135M-Instruct)")
    p.add_argument("--trace", action="store_true", help="print every burst's step log")
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def work_before_median_first_token(b: Burst) -> tuple[int, float]:
    """(forward steps, tokens) the engine ran before the median request's first token was emitted: what
    the policy made it compute first, free of the machine's speed (which is noisy when shared)."""
    if not b.engine_ttft:
        return 0, 0.0
    t = percentile(b.engine_ttft, 50) or 0.0
    done = [s for s in b.steps if s["start"] + s["seconds"] <= t]
    return len(done), sum(s["tokens"] for s in done)


# the statistics of _summary that are percentiles over the burst's requests (n/a where a request failed)
PERCENTILES = ("ttft_p50", "ttft_p90", "ttft_max", "engine_ttft_p50", "steps_before_p50", "tokens_before_p50")


def _summary(bursts: list[Burst]) -> dict[str, float | None]:
    """Medians over the repeats of each burst's statistics. Where any burst had failed requests, the
    percentiles over its requests (``PERCENTILES``) are None (n/a): those of the requests that succeeded
    leave out the failed ones, whatever their TTFT would have been; ``errors`` counts them."""
    errors = sum(len(b.errors) for b in bursts)

    def med(f: Any) -> float:
        return statistics.median(f(b) for b in bursts)

    out: dict[str, float | None] = (
        {
            "ttft_p50": med(lambda b: percentile(b.ttft, 50)),
            "ttft_p90": med(lambda b: percentile(b.ttft, 90)),
            "ttft_max": med(lambda b: max(b.ttft)),
            "engine_ttft_p50": med(lambda b: percentile(b.engine_ttft, 50)),
            "steps_before_p50": med(lambda b: work_before_median_first_token(b)[0]),
            "tokens_before_p50": med(lambda b: work_before_median_first_token(b)[1]),
        }
        if not errors
        else dict.fromkeys(PERCENTILES)
    )
    return out | {
        "tok_per_s": med(lambda b: b.tok_per_s),
        "wall": med(lambda b: b.wall),
        "steps": med(lambda b: len(b.steps)),
        "forward_s": med(lambda b: sum(s["seconds"] for s in b.steps)),
        "prefill_forward_s": med(lambda b: sum(s["seconds"] for s in b.steps if s["tokens"] > s["rows"])),
        "errors": errors,
    }


def summary_rows(bursts: Sequence[Burst], targets: Sequence[str], policies: Sequence[str]) -> list[dict[str, Any]]:
    """One row per target and policy: ``_summary`` of its bursts, and its TTFT p50 and tok/s over the first
    policy's (None, n/a, where either row's bursts had failed requests: a ratio or percentile involving a
    burst with failed requests is not given)."""
    rows: list[dict[str, Any]] = []
    for t in targets:
        ref: dict[str, float | None] | None = None
        for name in policies:
            s = _summary([b for b in bursts if b.policy == name and b.target == t])
            ref = ref or s
            whole = not s["errors"] and not ref["errors"]
            rows.append(
                {
                    "policy": name,
                    "target": t,
                    **s,
                    "ttft_p50_ratio": _ratio(s["ttft_p50"], ref["ttft_p50"]) if whole else None,
                    "tok_per_s_ratio": _ratio(s["tok_per_s"], ref["tok_per_s"]) if whole else None,
                }
            )
    return rows


def _ratio(x: float | None, y: float | None) -> float | None:
    return x / y if x is not None and y else None


def _f(x: float | None, fmt: str, unit: str = "") -> str:
    """A table cell: n/a for None (a statistic not given: failed requests)."""
    return "n/a" if x is None else f"{x:{fmt}}{unit}"


def render_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| policy | target | errors | TTFT p50 | TTFT p90 | TTFT max | engine TTFT p50 | steps / tokens before it "
        "| tok/s | time to finish | steps | p50 / first | tok/s / first |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        before = (
            "n/a" if r["steps_before_p50"] is None else f"{r['steps_before_p50']:.0f} / {r['tokens_before_p50']:.0f}"
        )
        lines.append(
            f"| {r['policy']} | {r['target']} | {r['errors']} | {_f(r['ttft_p50'], '.2f', ' s')} | "
            f"{_f(r['ttft_p90'], '.2f', ' s')} | {_f(r['ttft_max'], '.2f', ' s')} | "
            f"{_f(r['engine_ttft_p50'], '.2f', ' s')} | {before} | "
            f"{r['tok_per_s']:.0f} | {r['wall']:.2f} s | {r['steps']:.0f} | {_f(r['ttft_p50_ratio'], '.2f')} | "
            f"{_f(r['tok_per_s_ratio'], '.2f')} |"
        )
    return "\n".join(lines)


def print_trace(b: Burst) -> None:
    ttft = f"n/a ({len(b.errors)} errors)" if b.errors else f"{percentile(b.ttft, 50):.2f}s"
    reached = f"from {b.arrivals[0]:.3f}s to {b.arrivals[-1]:.3f}s" if b.arrivals else "never"
    print(
        f"-- {b.policy} / {b.target} #{b.repeat}: wall {b.wall:.2f}s, TTFT p50 {ttft}; "
        f"requests reached the engine {reached}"
    )
    for s in b.steps:
        later = [n["start"] for n in b.steps if n["start"] > s["start"]]
        done = sum(1 for t in b.engine_ttft if t <= (later[0] if later else b.wall))
        arrived = sum(1 for a in b.arrivals if a <= s["start"])
        if s["tokens"] > s["rows"] or s is b.steps[-1]:
            print(
                f"   step at {s['start']:6.3f}s {s['seconds'] * 1e3:6.0f} ms  rows {s['rows']:2.0f}  "
                f"tokens {s['tokens']:4.0f}  arrived before it {arrived:2d}  first tokens by the next step {done}"
            )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_logging()  # (httpx is quietened too, though no client here uses it)

    from lorafleet_server.app import build_service
    from lorafleet_server.config import ServerConfig
    from lorafleet_server.grpc.server import BackgroundServer
    from lorafleet_server.model.prepare import prepare_default_model

    names = [name for name in args.policies.split(",") if name]
    if set(names) - set(POLICIES):
        raise SystemExit(f"unknown --policies {sorted(set(names) - set(POLICIES))}; known: {', '.join(POLICIES)}")
    policies = {name: POLICIES[name] for name in names}
    for t in (int(x) for x in args.step_tokens.split(",") if x):
        policies[f"default-{t}"] = {"max_step_tokens": t}
    targets = [t for t in args.targets.split(",") if t]
    unknown = set(targets) - {"base", "32xdefault"}
    if unknown:
        raise SystemExit(f"unknown --targets {sorted(unknown)}")

    torch.set_num_threads(args.threads)
    model_dir = args.model or prepare_default_model(REPO / "data" / "models")
    work = Path(tempfile.mkdtemp(prefix="lorafleet-bench-burst-"))
    bursts: list[Burst] = []
    loadgen = LoadGenerator()  # the 32 clients in a process of their own, as in bench/serving.py
    try:
        n_adapters = args.requests if "32xdefault" in targets else 0
        dirs = (
            make_adapters(model_dir, [SHAPES["default"]], n_adapters, work / "adapters", args.seed)
            if n_adapters
            else {}
        )
        config = ServerConfig(
            model=model_dir,
            data_dir=work / "data",
            adapter_store=work / "store",
            port=0,
            max_batch_size=args.requests,
            max_seq_len=512,
            max_new_tokens=max(args.max_new_tokens, 64),
            max_loaded_adapters=max(32, n_adapters),
            lora_impl=args.lora_impl,
            attention_kernel=args.attention_kernel,
            linear_kernel=args.linear_kernel,
            layers_kernel=args.layers_kernel,
            linear_threads=args.linear_threads,
            dtype=args.dtype,
            torch_threads=args.threads,
            prefill_threads=args.prefill_threads,
            fixed_decode_threads=args.fixed_decode_threads,
            metrics_port=0,
            log_level="WARNING",
        )
        service = build_service(config)
        engine = service.engine
        engine.eos_token_ids = frozenset()  # every request generates exactly max_new_tokens
        refs = []
        for i, path in enumerate(dirs.get("default", [])):
            service.store.import_peft(path, TENANT, f"default-{i:02d}", service.base.spec)
            refs.append(f"{TENANT}/default-{i:02d}")
        adapters_of = {"base": [""] * args.requests, "32xdefault": refs}
        prompt_tokens = [len(engine.prompts.encode_chat([("user", prompt_text(i))])) for i in range(args.requests)]
        steps = StepLog()
        install_step_timer(engine.runner, steps)
        engine_times = install_submit_timer(engine)
        server = BackgroundServer(service)
        target = f"127.0.0.1:{server.start()}"
        info = service.info
        say(
            f"{info.model_id} ({info.dtype}, {info.device}), torch threads {torch.get_num_threads()}, "
            f"{args.requests} requests per burst, {args.max_new_tokens} new tokens, greedy, EOS ignored; "
            f"prompt tokens {min(prompt_tokens)}-{max(prompt_tokens)} (sum {sum(prompt_tokens)}); policies {policies}"
        )
        base_config = engine.config
        try:
            for t in targets:  # warm-up: adapters resident, kernels and batch shapes seen
                loadgen.run(burst, target, adapters_of[t], 4)
            for rep in range(args.repeats):
                for t in targets:
                    for name, overrides in policies.items():
                        cfg = dataclasses.replace(base_config, **overrides)

                        def apply(cfg: Any = cfg) -> None:
                            engine.config = cfg
                            engine.prefix_cache.clear()

                        engine.run(apply)
                        steps.clear()
                        engine_times.clear()
                        outs, t0, wall = loadgen.run(burst, target, adapters_of[t], args.max_new_tokens)
                        ok = [o for o in outs if not isinstance(o, BaseException)]
                        b = Burst(
                            policy=name,
                            target=t,
                            repeat=rep,
                            ttft=[o[0] for o in ok],
                            end=[o[1] for o in ok],
                            tokens=sum(o[2] for o in ok),
                            errors=[repr(o) for o in outs if isinstance(o, BaseException)],
                            wall=wall,
                            arrivals=sorted(a - t0 for a in engine_times.arrivals),
                            engine_ttft=sorted(a - t0 for a in engine_times.first_tokens),
                            steps=[
                                {"start": s - t0, "seconds": d, "rows": r, "tokens": n, "threads": th}
                                for s, d, r, n, th in zip(
                                    steps.starts, steps.seconds, steps.rows, steps.tokens, steps.threads, strict=True
                                )
                            ],
                        )
                        bursts.append(b)
                        ttft = (
                            f"n/a ({len(b.errors)} errors)"
                            if b.errors
                            else f"p50 {percentile(b.ttft, 50):.2f}s p90 {percentile(b.ttft, 90):.2f}s"
                        )
                        say(
                            f"{name} / {t} #{rep}: TTFT {ttft}, {b.tok_per_s:.0f} tok/s, {wall:.2f}s, "
                            f"{len(b.steps)} steps"
                        )
                        if args.trace:
                            print_trace(b)
            engine.run(lambda: setattr(engine, "config", base_config))
        finally:
            server.stop()
    finally:
        loadgen.close()
        shutil.rmtree(work, ignore_errors=True)

    rows = summary_rows(bursts, targets, list(policies))
    print()
    print(
        f"burst: {info.model_id} ({info.dtype}), torch threads {torch.get_num_threads()}, {args.requests} chat "
        f"requests at once, {args.max_new_tokens} new tokens, greedy; medians of {args.repeats} bursts, prefix "
        "cache emptied before each burst"
    )
    print()
    print(render_table(rows))
    if any(r["errors"] for r in rows):
        print()
        print(
            "n/a: a percentile or ratio involving a burst with failed requests (errors: failed requests over "
            "the repeats; the bursts' errors in the JSON)"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"burst-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(
        json.dumps(
            {
                "argv": list(argv) if argv is not None else sys.argv[1:],  # what ran (bench.serving passes its own)
                "model": info.model_id,
                "dtype": info.dtype,
                "attention_kernel": info.attention_kernel,
                "torch_threads": torch.get_num_threads(),
                "policies": policies,
                "rows": rows,
                "bursts": [dataclasses.asdict(b) for b in bursts],
            },
            indent=1,
        )
    )
    say(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
