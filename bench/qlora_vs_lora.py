"""QLoRA vs LoRA on a demo company's dataset: same data, seed and budget (the demo's hyperparameters).

Two ``TrainConfig``s that differ only in ``method`` (``lora``: fp32 base; ``qlora``: bitsandbytes NF4
base), evaluated on the company's held-out questions (wordings never seen in training). Prints held-out
exact match, token F1, loss and the forgetting check for both, and the difference in points.

    .venv/bin/python -m bench.qlora_vs_lora zephyr       # or quillmark; ~10-30 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    from demo.companies import COMPANIES, write_datasets
    from demo.run_demo import _base
    from lorafleet_training.trainer import TrainConfig, train

    parser = argparse.ArgumentParser(prog="python -m bench.qlora_vs_lora", description=__doc__.splitlines()[0])
    parser.add_argument(
        "company",
        nargs="?",
        default="zephyr",
        choices=sorted(c.tenant for c in COMPANIES),
        help="the demo company (tenant)",
    )
    company = parser.parse_args(argv).company
    work = Path(tempfile.mkdtemp(prefix="qlora-vs-lora."))
    try:
        model_dir, spec = _base(None)
        paths = write_datasets(work, seed=0)[company]
        out: dict[str, dict[str, float | str]] = {}
        for method in ("lora", "qlora"):
            config = TrainConfig(
                data=paths["train"],
                adapter=f"{company}/cmp",
                out_dir=work / method,
                base_model_dir=model_dir,
                method=method,
                rank=16,
                alpha=32.0,
                targets=("all-linear",),
                epochs=2,
                lr=2e-3,
                batch_size=8,
                max_length=256,
                seed=0,
                eval_data=paths["heldout"],
                eval_max_new_tokens=48,
                eval_batch_size=16,
            )
            started = time.monotonic()
            record = train(config, spec, progress=False).record
            metrics = record["eval_metrics"]
            keys = ("adapter_exact_match", "adapter_f1", "adapter_loss", "base_exact_match", "base_f1", "forgetting")
            out[method] = {k: metrics[k] for k in keys if k in metrics}
            out[method]["method_recorded"] = record["method"]
            out[method]["seconds"] = round(time.monotonic() - started, 1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lora, qlora = out["lora"], out["qlora"]
    for name in ("adapter_exact_match", "adapter_f1"):
        diff = 100 * (float(qlora[name]) - float(lora[name]))
        print(f"{name}: lora {float(lora[name]):.3f}  qlora {float(qlora[name]):.3f}  difference {diff:+.1f} points")
    print(json.dumps({"company": company, **out}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
