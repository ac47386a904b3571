"""fp32 Linear micro-benchmark: the native fp32 Linear as built for this CPU and as built for another
(``--march``, default haswell: the AVX2-only code), oneDNN's prepacked Linear and ``F.linear`` (MKL),
per SmolLM2-135M Linear shape and row count, in one run.

Each call is timed interleaved round by round (so load from other processes hits all alike): the
median of ``--rounds`` rounds of ``inner`` calls, in microseconds per call, with GFLOP/s. Every
candidate's output is checked against ``F.linear`` first (fp32 tolerance), and the two native builds
against each other bit for bit (one sum order whatever the build).

    .venv/bin/python -m bench.linear_f32                     # threads: cores - 1, as the server; ~1 min
    .venv/bin/python -m bench.linear_f32 --threads 1 --rows 32,256
    .venv/bin/python -m bench.linear_f32 --march x86-64-v3 --json bench/results/linear_f32.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bench.lora_kernels import march_flags
from lorafleet_server.model.cpu import cpu_features
from lorafleet_server.model.native import (
    LINEAR_F32_SOURCE,
    NativeLinearF32,
    build_library,
    load_native_linear_f32,
)
from lorafleet_server.model.packed import NativeLinearModule, PackedLinear, packed_linear_supported

REPO = Path(__file__).resolve().parents[1]
SHAPES = {  # name -> (in, out): SmolLM2-135M's Linears
    "q_proj/o_proj": (576, 576),
    "k_proj/v_proj": (576, 192),
    "gate_proj/up_proj": (576, 1536),
    "down_proj": (1536, 576),
    "lm_head": (576, 49152),
}


def _time(fns: dict[str, Callable[[], object]], rounds: int, inner: int) -> dict[str, float]:
    """Median microseconds per call of each, interleaved round by round after one warm-up call each."""
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[name].append((time.perf_counter() - t0) / inner * 1e6)
    return {name: statistics.median(s) for name, s in samples.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,32,256", help="comma list of row counts")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma list of: " + ", ".join(SHAPES))
    parser.add_argument("--march", default="haswell", help="the other native build's -march")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: cores - 1, as the server)")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--json", type=Path, help="write every median here")
    args = parser.parse_args(argv)

    cores = os.cpu_count() or 1
    threads = args.threads or max(1, cores - 1)
    torch.set_num_threads(threads)
    print(f"cpu: {cpu_features().summary()}  threads={threads} torch={torch.__version__}")
    kernels = REPO / "data" / "kernels"
    here = load_native_linear_f32(kernels)
    with tempfile.TemporaryDirectory(prefix="lorafleet-linear-f32-") as tmp:
        other = NativeLinearF32(build_library(LINEAR_F32_SOURCE, Path(tmp), flags=march_flags(args.march)))
        print(f"native: {here.library.name} (-march=native) against -march={args.march}")
        results = []
        header = f"{'shape':<18} {'in->out':>11} {'rows':>5}"
        names = ["F.linear", "onednn", "native", args.march]
        print(header + "".join(f"{n:>18}" for n in names) + "   native/other")
        gen = torch.Generator().manual_seed(0)
        with torch.inference_mode():
            for shape in args.shapes.split(","):
                d_in, d_out = SHAPES[shape]
                linear = nn.Linear(d_in, d_out, bias=False)
                nn.init.normal_(linear.weight, std=d_in**-0.5, generator=gen)
                mods: dict[str, nn.Module] = {
                    "native": NativeLinearModule(linear, here),
                    args.march: NativeLinearModule(linear, other),
                }
                if packed_linear_supported(torch.float32):
                    mods["onednn"] = PackedLinear(linear)
                for m in (int(r) for r in args.rows.split(",")):
                    x = torch.randn(m, d_in, generator=gen)  # [m, in]
                    want = F.linear(x, linear.weight)
                    for mod in mods.values():
                        torch.testing.assert_close(mod(x), want, rtol=1e-4, atol=1e-4)
                    assert torch.equal(mods["native"](x), mods[args.march](x)), "the two builds' bits differ"
                    fns: dict[str, Callable[[], object]] = {"F.linear": lambda x=x, w=linear.weight: F.linear(x, w)}
                    fns.update({name: (lambda mod=mod, x=x: mod(x)) for name, mod in mods.items()})
                    flops = 2 * m * d_in * d_out
                    inner = max(1, min(200, int(2e8 // flops)))
                    us = _time(fns, args.rounds, inner)
                    cells = "".join(
                        f"{us[n]:>9.1f} ({flops / us[n] / 1e3:>4.0f})" if n in us else f"{'-':>18}" for n in names
                    )
                    print(f"{shape:<18} {d_in:>5}->{d_out:<5} {m:>5}{cells}   {us[args.march] / us['native']:.2f}x")
                    results.append({"shape": shape, "in": d_in, "out": d_out, "rows": m, "us": us})
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"threads": threads, "march": args.march, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
