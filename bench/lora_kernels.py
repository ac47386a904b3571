"""Multi-LoRA kernel micro-benchmark: every kernel of ``model/lora.py`` per shape, step and dtype, in one run.

For each SmolLM2-135M Linear shape of the two adapter kinds of issue 13 — PEFT's default r=8 q/v
(576->576, 576->192) and r=16 all-linear (also 576->1536 and 1536->576) — and each step shape:

* ``dec32x32``: a decode step of 32 tokens, each its own adapter (32 distinct);
* ``dec32x8`` / ``dec32x1``: 32 decode tokens over 8 adapters / one adapter;
* ``pre4x128``: a prefill step of 4 rows x 128 tokens, each row its own adapter;
* ``mix16+6x40``: a step of the server's default 256-token budget under a burst of short chat prompts:
  16 decode tokens (16 adapters) then 6 prompt chunks of 40 tokens (6 more adapters);

it times, interleaved round by round so that load from other processes hits all alike (the median
of ``--rounds`` rounds of ``inner`` calls each, in microseconds per call):

* ``base``: the base Linear of that shape alone (``F.linear``, the same dtype): the LoRA share;
* ``gather``, ``dense``, ``token``, ``grouped``: ``lora_delta`` with that kernel, on a
  ``MultiLoRALinear``'s own storage (``lora_a`` is a view of the contiguous ``[S, in, r]`` buffer);
* ``auto``: what ``choose_impl`` picks among the torch kernels now;
* ``native``: the C kernel of ``model/native.py`` (built for this CPU into ``data/kernels``), which
  adds into the base output in place (timed on one preallocated output); the server's ``auto`` runs
  it for every call, on CPU modules whose rank capacity is aligned to its token blocks
  (``lora.BLOCK_RANKS``; the ``choice`` column's ``+blocks`` where it takes this shape's chunks that way);
* ``before``: the kernel the previous ``choose_impl`` picked, as it was then (``token`` copied each
  token's adapter with ``index_select`` and ran two ``bmm``; ``A`` was stored ``[S, r, in]``).

Modules are built as the server builds them on CPU: r=4 and r=12 adapters sit in rank capacities 8
and 16 (``lora.aligned_rank``), so every kernel reads the zero padding the server's does.

Every kernel's output is checked against the ``gather`` reference first (fp32: 1e-5; bf16: one
bf16 rounding of the output). One torch thread by default, as the server on a 2-core machine.

    .venv/bin/python -m bench.lora_kernels                       # bf16 and fp32, every shape
    .venv/bin/python -m bench.lora_kernels --dtypes bfloat16 --shapes r16all --json bench/results/lora_kernels.json
    .venv/bin/python -m bench.lora_kernels --dtypes float32 --march haswell   # the C kernel as built for AVX2 only

``--march`` builds the C kernel for another CPU than this one (``-march=<it>`` instead of ``native``,
into a temporary folder): the code an AVX2-only machine runs, timed on this one's cores and caches.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from lorafleet_server.model.native import NativeLora

REPO = Path(__file__).resolve().parents[1]

SLOTS = 33  # 32 adapters + slot 0 (no adapter), as --max-loaded-adapters 32
SHAPES: dict[str, list[tuple[str, int, int, int]]] = {  # kind -> (module, d_in, d_out, rank)
    "default": [("q_proj/o_proj", 576, 576, 8), ("k_proj/v_proj", 576, 192, 8)],
    "r16all": [
        ("q_proj/o_proj", 576, 576, 16),
        ("k_proj/v_proj", 576, 192, 16),
        ("gate_proj/up_proj", 576, 1536, 16),
        ("down_proj", 1536, 576, 16),
    ],
    "r4": [("q_proj/o_proj", 576, 576, 4), ("k_proj/v_proj", 576, 192, 4), ("down_proj", 1536, 576, 4)],
    "r12": [("q_proj/o_proj", 576, 576, 12), ("k_proj/v_proj", 576, 192, 12), ("down_proj", 1536, 576, 12)],
}
STEPS: dict[str, Callable[[], torch.Tensor]] = {  # name -> slots [N]
    "dec32x32": lambda: torch.arange(32) + 1,
    "dec32x8": lambda: torch.arange(32) % 8 + 1,
    "dec32x1": lambda: torch.ones(32, dtype=torch.long),
    "pre4x128": lambda: torch.arange(4).repeat_interleave(128) + 1,
    "mix16+6x40": lambda: torch.cat([torch.arange(16) + 1, torch.arange(6).repeat_interleave(40) + 17]),
}


def token_before(x: torch.Tensor, slots: torch.Tensor, rank: int, a: torch.Tensor, bt: torch.Tensor) -> torch.Tensor:
    """The previous ``token`` kernel: x [N, in] -> [N, out], copying each token's adapter."""
    a_n = a[:, :rank].index_select(0, slots)  # [N, r, in]
    bt_n = bt[:, :rank].index_select(0, slots)  # [N, r, out]
    h = torch.bmm(x.unsqueeze(1), a_n.transpose(1, 2))  # [N, 1, r]
    return torch.bmm(h, bt_n).squeeze(1)  # [N, out]


def choose_before(n_tokens: int, n_adapters: int, *_shape: int) -> str:
    """The previous ``choose_impl`` (fp32 thresholds from a 2-core AVX2 CPU; the module's shape unused)."""
    if n_adapters == 1:
        return "dense"
    if n_tokens <= 128:
        return "token" if n_adapters >= 8 else "dense"
    return "dense" if n_adapters <= 4 else "grouped"


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int, budget_s: float = 2e-3) -> dict[str, list[float]]:
    """Per-call microseconds of each function: ``rounds`` samples, the variants interleaved in each round."""
    inner: dict[str, int] = {}
    for name, fn in fns.items():
        fn()
        t0 = time.perf_counter()
        fn()
        inner[name] = max(1, int(budget_s / max(time.perf_counter() - t0, 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            samples[name].append((time.perf_counter() - t0) / inner[name] * 1e6)
    return samples


def march_flags(march: str) -> tuple[str, ...]:
    """The server's build flags (with OpenMP) for ``-march=<march>`` instead of this CPU: the code another
    CPU runs (bench/linear_f32.py builds its other Linear with them too)."""
    from lorafleet_server.model.native import OPENMP_CFLAGS

    return tuple(f"-march={march}" if flag == "-march=native" else flag for flag in OPENMP_CFLAGS)


def native_kernel(march: str | None) -> NativeLora:
    """The C kernel as the server builds it (cached in data/kernels), or built for ``-march=<march>`` in a
    temporary folder (removed once loaded)."""
    from lorafleet_server.model.native import LORA_SOURCE, NativeLora, build_library, load_native_lora

    if march is None:
        return load_native_lora(REPO / "data" / "kernels")
    with tempfile.TemporaryDirectory(prefix="lora-kernels-") as tmp:
        return NativeLora(build_library(LORA_SOURCE, Path(tmp), None, march_flags(march)))


def bench_shape(
    d_in: int, d_out: int, rank: int, step: str, dtype: torch.dtype, rounds: int, native: NativeLora
) -> dict[str, Any]:
    from lorafleet_server.model.lora import (
        LoraBatch,
        LoraContext,
        MultiLoRALinear,
        choose_impl,
        lora_delta,
        lora_delta_dense,
        lora_delta_grouped,
    )

    gen = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(d_in, d_out, bias=False).to(dtype)
    module = MultiLoRALinear(base, d_in, d_out, SLOTS, 64, LoraContext(), dtype, torch.device("cpu"))
    for slot in range(1, SLOTS):
        a = torch.randn(rank, d_in, generator=gen) * 0.02  # [r, in]
        b = torch.randn(d_out, rank, generator=gen) * 0.02  # [out, r]
        module.write_slot(slot, a, b)
    slots = STEPS[step]()  # [N]
    x = torch.randn(slots.numel(), d_in, generator=gen).to(dtype)  # [N, in]
    a_old = module.lora_a.contiguous()  # [S, r, in]: the previous storage layout
    bt = module.lora_bt
    ranks = module.slot_ranks
    batches = {impl: LoraBatch.build(slots, dtype, impl) for impl in ("gather", "dense", "token", "grouped", "auto")}
    n_adapters = len(batches["auto"].active_list)  # type: ignore[union-attr]
    before = choose_before(int(slots.numel()), n_adapters)

    def run(impl: str) -> Callable[[], Any]:
        batch = batches[impl]
        assert batch is not None
        return lambda: lora_delta(x, batch, ranks, module.lora_a, bt)

    def run_before() -> Any:
        batch = batches["auto"]
        assert batch is not None
        route = batch.routing(ranks)
        assert route is not None
        if before == "token":
            return token_before(x, slots, route.rank, a_old, bt)
        if before == "grouped":
            return lora_delta_grouped(x, route, a_old, bt)
        return lora_delta_dense(x, route, a_old, bt)

    fns: dict[str, Callable[[], Any]] = {"base": lambda: F.linear(x, base.weight)}
    fns.update({impl: run(impl) for impl in ("gather", "dense", "token", "grouped", "auto")})
    fns["before"] = run_before
    y_native = torch.zeros(slots.numel(), d_out, dtype=dtype)  # [N, out]
    fns["native"] = lambda: native.add_(y_native, x, module.lora_at, bt, slots, module.slot_rank_t)
    with torch.inference_mode():
        want = fns["gather"]().float()
        tol = 1e-5 if dtype == torch.float32 else 2**-7 * float(want.abs().max())
        for name in ("dense", "token", "grouped", "auto", "before"):
            torch.testing.assert_close(fns[name]().float(), want, rtol=0, atol=tol, msg=f"{name} differs")
        fns["native"]()  # into zeros: the delta alone
        torch.testing.assert_close(y_native.float(), want, rtol=0, atol=tol, msg="native differs")
        samples = interleaved(fns, rounds)
    med = {name: statistics.median(v) for name, v in samples.items()}
    return {
        "adapters": n_adapters,
        "tokens": int(slots.numel()),
        "auto_choice": choose_impl(int(slots.numel()), n_adapters, d_in, d_out, rank),
        "native_blocks": native.blocks(dtype, d_out, module.rank_capacity),
        "before_choice": before,
        "median_us": {k: round(v, 1) for k, v in med.items()},
        "min_us": {k: round(min(v), 1) for k, v in samples.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument(
        "--shapes",
        default="default,r16all",
        help="comma list of: default (r=8 q/v), r16all, r4, r12 (ranks the C kernel has no token blocks for)",
    )
    parser.add_argument("--steps", default=",".join(STEPS))
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--march", default=None, help="build the C kernel for this -march (default: native)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from lorafleet_server.model.cpu import cpu_features

    native = native_kernel(args.march)
    print(f"cpu: {cpu_features().summary()}  threads={args.threads} torch={torch.__version__}")
    print(f"native kernel: {native.library.name}, -march={args.march or 'native'}")
    print("us per call, median of interleaved rounds; share = auto / base")
    cols = ("base", "gather", "dense", "token", "grouped", "before", "auto", "native")
    print(f"{'dtype':<9} {'shape':<17} {'in->out r':<13} {'step':<9}" + "".join(f"{c:>9}" for c in cols) + "  choice")
    results: list[dict[str, Any]] = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        seen: set[tuple[int, int, int]] = set()
        for kind in args.shapes.split(","):
            for module, d_in, d_out, rank in SHAPES[kind]:
                if (d_in, d_out, rank) in seen:  # one row per distinct shape
                    continue
                seen.add((d_in, d_out, rank))
                for step in args.steps.split(","):
                    res = bench_shape(d_in, d_out, rank, step, dtype, args.rounds, native)
                    med = res["median_us"]
                    print(
                        f"{dtype_name:<9} {module:<17} {f'{d_in}->{d_out} r{rank}':<13} {step:<9}"
                        + "".join(f"{med[c]:>9.0f}" for c in cols)
                        + f"  {res['before_choice']}->{res['auto_choice']}"
                        + ("+blocks" if res["native_blocks"] else "")
                        + f" x{med['before'] / med['auto']:.2f} share {med['auto'] / med['base']:.2f}"
                        + f" native share {med['native'] / med['base']:.2f}",
                        flush=True,
                    )
                    results.append(
                        {"dtype": dtype_name, "module": module, "d_in": d_in, "d_out": d_out, "rank": rank}
                        | {"step": step}
                        | res
                    )
    if args.json:
        payload = {"threads": args.threads, "march": args.march or "native", "results": results}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
