"""bf16 Linear micro-benchmark: the native Linear's AMX and AVX-512 BF16 paths (each where this CPU runs
it, on the helper pool the server gives it) against oneDNN's prepacked Linear on torch's threads, per
SmolLM2-135M Linear shape and row count, in one run.

Each candidate cycles through ``--layers`` copies of a shape's weight (30, a SmolLM2 step's worth: so the
weights come from DRAM or L3 as in serving, not from L2; 2 for the LM head and for steps of more than 64
rows, which read each weight once per many rows), one call per copy; rounds are interleaved (so
load from other processes hits all alike) and each cell is the median of ``--rounds`` rounds, in
microseconds per call, with the weight's GB/s and GFLOP/s. Every candidate's output is checked against
fp32 sums first (one bf16 rounding).

To see what a CPU without AMX gets, run it with oneDNN held to AVX-512 (the native AMX path is then
still timed: skip it with ``--paths avx512,onednn``):

    .venv/bin/python -m bench.linear_bf16                                  # ~1 min
    ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 .venv/bin/python -m bench.linear_bf16 --paths avx512,onednn
    .venv/bin/python -m bench.linear_bf16 --rows 32,512 --torch-threads 2 --json bench/results/linear_bf16.json
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from bench.linear_f32 import SHAPES, _time
from lorafleet_server.model.cpu import cpu_features
from lorafleet_server.model.native import NativeKernelError, NativeLinear, load_native_linear
from lorafleet_server.model.packed import _pack, _packed_linear, packed_linear_supported

REPO = Path(__file__).resolve().parents[1]
PATHS = ("amx", "avx512", "onednn")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="32,512", help="comma list of row counts")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma list of: " + ", ".join(SHAPES))
    parser.add_argument("--paths", default=",".join(PATHS), help="comma list of: " + ", ".join(PATHS))
    parser.add_argument("--threads", type=int, default=0, help="native Linear threads (0: every CPU, as the server)")
    parser.add_argument(
        "--torch-threads", type=int, default=0, help="oneDNN's torch threads (0: cores - 1, the server's decode count)"
    )
    parser.add_argument(
        "--layers", type=int, default=30, help="weight copies cycled per round (the LM head and > 64 rows: 2)"
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", type=Path, help="write every median here")
    args = parser.parse_args(argv)

    cores = len(os.sched_getaffinity(0))
    threads = args.threads or cores
    torch_threads = args.torch_threads or max(1, cores - 1)
    torch.set_num_threads(torch_threads)
    paths = args.paths.split(",")
    if unknown := sorted(set(paths) - set(PATHS)):
        parser.error(f"--paths: {', '.join(unknown)} not among {', '.join(PATHS)}")
    kernels: dict[str, NativeLinear] = {}
    for path in paths:
        if path in ("amx", "avx512"):
            try:
                kernels[path] = load_native_linear(REPO / "data" / "kernels", threads=threads, isa=path)  # type: ignore[arg-type]
            except NativeKernelError as exc:
                print(f"{path}: not here ({exc})")
    onednn = "onednn" in paths and packed_linear_supported(torch.bfloat16)
    onednn_isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "its best")
    print(
        f"cpu: {cpu_features().summary()}  native threads={threads}  oneDNN: {torch_threads} torch thread(s), "
        f"ISA {onednn_isa}  torch={torch.__version__}"
    )
    names = [*kernels, *(["onednn"] if onednn else [])]
    print(
        f"{'shape':<18} {'in->out':>11} {'rows':>5}" + "".join(f"{n:>23}" for n in names) + "  (us/call, GB/s, GFLOP/s)"
    )
    results = []
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for shape in args.shapes.split(","):
            d_in, d_out = SHAPES[shape]
            for m in (int(r) for r in args.rows.split(",")):
                copies = args.layers if d_out < 10_000 and m <= 64 else 2
                weights = [
                    (torch.randn(d_out, d_in, generator=gen) * d_in**-0.5).to(torch.bfloat16) for _ in range(copies)
                ]
                x = torch.randn(m, d_in, generator=gen).to(torch.bfloat16)  # [m, in]
                want = x.float() @ weights[0].float().T  # [m, out] fp32
                fns: dict[str, Callable[[], object]] = {}
                for name, kernel in kernels.items():
                    packed = [kernel.pack(w) for w in weights]
                    out = torch.empty(m, d_out, dtype=torch.bfloat16)
                    torch.testing.assert_close(
                        kernel(x, packed[0], None, d_out, out).float(), want, rtol=2**-7, atol=1e-3
                    )

                    def run(
                        kernel: NativeLinear = kernel,
                        packed: list[torch.Tensor] = packed,
                        out: torch.Tensor = out,
                        x: torch.Tensor = x,
                        d_out: int = d_out,
                    ) -> None:
                        for p in packed:
                            kernel(x, p, None, d_out, out)

                    fns[name] = run
                if onednn:
                    prepacked = [_pack(w) for w in weights]
                    got = _packed_linear(x, prepacked[0], None).float()
                    torch.testing.assert_close(got, want, rtol=2**-7, atol=1e-3)

                    def run_onednn(prepacked: list[torch.Tensor] = prepacked, x: torch.Tensor = x) -> None:
                        for p in prepacked:
                            _packed_linear(x, p, None)

                    fns["onednn"] = run_onednn
                us = {name: t / copies for name, t in _time(fns, args.rounds, inner=1).items()}  # per call
                gb = d_in * d_out * 2 / 1e3  # weight bytes / 1e9 * 1e6 us
                flops = 2 * m * d_in * d_out / 1e3
                cells = "".join(f"{us[n]:>10.1f} {gb / us[n]:>5.1f} {flops / us[n]:>6.0f}" for n in names)
                print(f"{shape:<18} {d_in:>5}->{d_out:<5} {m:>5}{cells}")
                results.append({"shape": shape, "in": d_in, "out": d_out, "rows": m, "us": us})
                del fns, weights
    for path in kernels:
        ratios = [r["us"]["onednn"] / r["us"][path] for r in results if "onednn" in r["us"]]
        if ratios:
            print(f"native {path} over oneDNN's, per cell: " + ", ".join(f"{v:.2f}x" for v in ratios))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"threads": threads, "torch_threads": torch_threads, "onednn_isa": onednn_isa}
        args.json.write_text(json.dumps({**meta, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
