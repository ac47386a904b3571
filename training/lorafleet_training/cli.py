"""Argument parsers and runners for ``lorafleet train``, ``publish``, ``publish-prompt`` and ``adapters stale``.

The server's CLI mounts these: it builds the base spec (and model directory, and store) from its own
configuration and passes them in, so nothing here imports ``server``. Option names avoid the server's
(``--data`` / ``--data-dir``, ``--adapter`` / ``--adapter-store`` are distinct; destinations too).
Every runner returns an exit code: 0 done, 1 refused or failed (the reason on stderr).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from lorafleet_adapters.errors import AdapterError
from lorafleet_adapters.peft_format import BaseModelSpec
from lorafleet_adapters.ref import AdapterRef
from lorafleet_adapters.store import AdapterStore
from lorafleet_training.data import DataIssue, load_jsonl
from lorafleet_training.errors import TrainingDataError, TrainingError
from lorafleet_training.pii import MODES


def _train_defaults() -> dict[str, Any]:
    from lorafleet_training.trainer import TrainConfig

    return {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}


# ------------------------------------------------------------------------------------------- train


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    d = _train_defaults()
    parser.add_argument(
        "--data", type=Path, required=True, help="JSONL: {'messages': [...]} or {'prompt', 'completion'}"
    )
    parser.add_argument("--adapter", required=True, help="tenant/name the adapter will be published as")
    parser.add_argument("--out", type=Path, required=True, help="output directory (PEFT adapter + training record)")
    parser.add_argument(
        "--method",
        choices=("lora", "qlora"),
        default="lora",
        help="lora (fp32 base on CPU) or qlora (NF4 bitsandbytes base; on CPU too, said so at start)",
    )
    parser.add_argument("--rank", type=int, default=d["rank"], help="LoRA rank r (default %(default)s)")
    parser.add_argument("--alpha", type=float, default=d["alpha"], help="lora_alpha (default %(default)s)")
    parser.add_argument(
        "--targets",
        nargs="+",
        default=None,
        metavar="MODULE",
        help="modules to adapt, e.g. q_proj v_proj (default), or all-linear",
    )
    parser.add_argument("--dropout", type=float, default=d["dropout"], help="lora_dropout (default %(default)s)")
    parser.add_argument("--epochs", type=int, default=d["epochs"], help="default %(default)s")
    parser.add_argument("--lr", type=float, default=d["lr"], help="peak learning rate (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=d["batch_size"], help="default %(default)s")
    parser.add_argument(
        "--max-length",
        type=int,
        default=d["max_length"],
        help="tokens per example, prompt included (default %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=d["seed"], help="default %(default)s")
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=d["val_fraction"],
        help="held-out share for evaluation (default %(default)s)",
    )
    parser.add_argument(
        "--pii",
        choices=MODES,
        default="refuse",
        help="refuse (default): stop with a report; redact: replace spans with [EMAIL]-like "
        "placeholders; allow: train on it, recorded in the manifest",
    )
    parser.add_argument(
        "--eval-data",
        type=Path,
        default=None,
        metavar="FILE",
        help="held-out JSONL to evaluate on (then all of --data trains; no split)",
    )
    parser.add_argument(
        "--compare-prompt",
        type=Path,
        default=None,
        metavar="FILE",
        help="also evaluate this prompt adapter (JSON {'system', 'examples'}) on the base",
    )
    parser.add_argument(
        "--eval-max-new-tokens",
        type=int,
        default=d["eval_max_new_tokens"],
        help="greedy tokens per held-out answer (default %(default)s)",
    )
    parser.add_argument(
        "--no-eval-generate",
        dest="eval_generate",
        action="store_false",
        help="evaluate by loss only (no generated answers)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def train_config_from_args(args: argparse.Namespace, model_dir: Path) -> Any:
    from lorafleet_training.trainer import DEFAULT_TARGETS, TrainConfig

    return TrainConfig(
        data=args.data,
        adapter=args.adapter,
        out_dir=args.out,
        base_model_dir=Path(model_dir),
        method=args.method,
        rank=args.rank,
        alpha=args.alpha,
        targets=tuple(args.targets) if args.targets else DEFAULT_TARGETS,
        dropout=args.dropout,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        max_length=args.max_length,
        seed=args.seed,
        val_fraction=args.val_fraction,
        pii=args.pii,
        eval_max_new_tokens=args.eval_max_new_tokens,
        eval_generate=args.eval_generate,
        compare_prompt=args.compare_prompt,
        eval_data=args.eval_data,
        overwrite=args.overwrite,
    )


def run_train(args: argparse.Namespace, spec: BaseModelSpec, model_dir: Path) -> int:
    try:
        from lorafleet_training.trainer import train

        config = train_config_from_args(args, model_dir)
        train(config, spec, progress=args.progress)
    except AdapterError as exc:
        return _fail(exc)
    return 0


# ----------------------------------------------------------------------------------------- publish


def add_publish_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", type=Path, help="a `lorafleet train` output directory")
    parser.add_argument("--store", type=Path, default=None, help="adapter store root (default: the server's)")
    parser.add_argument(
        "--require-improvement",
        action="store_true",
        help="refuse unless the adapter's held-out loss is below the base's",
    )
    parser.add_argument(
        "--as",
        dest="publish_as",
        default=None,
        metavar="TENANT/NAME",
        help="publish under another reference than the one given at training",
    )


def run_publish(args: argparse.Namespace, store: AdapterStore, spec: BaseModelSpec) -> int:
    from lorafleet_training.publish import publish, read_training_record

    store = AdapterStore(args.store) if args.store is not None else store
    try:
        key = publish(args.dir, store, spec, require_improvement=args.require_improvement, adapter=args.publish_as)
        record = read_training_record(args.dir)
    except AdapterError as exc:
        return _fail(exc)
    metrics = record["eval_metrics"]
    change = ""
    if "base_loss" in metrics and "adapter_loss" in metrics:
        change = f", held-out loss {metrics['base_loss']:.4f} (base) -> {metrics['adapter_loss']:.4f} (adapter)"
    print(f"published {key} ({record['method']}{change}) into {store.root}")
    return 0


# ---------------------------------------------------------------------------------- publish-prompt


def add_publish_prompt_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("reference", help="tenant/name")
    parser.add_argument("--system", default=None, help="the system prompt")
    parser.add_argument(
        "--examples",
        type=Path,
        default=None,
        metavar="FILE",
        help="few-shot turns: a JSON list of {role, content} (user/assistant alternating), a JSON "
        "{'system', 'examples'} object, or training JSONL (each line's turns are used)",
    )
    parser.add_argument("--store", type=Path, default=None, help="adapter store root (default: the server's)")
    parser.add_argument("--pii", choices=MODES, default="refuse", help="PII policy for the texts (default refuse)")


def read_examples_file(path: Path) -> tuple[str | None, list[dict[str, str]]]:
    """(system or None, few-shot turns) from a JSON list, a JSON template object or training JSONL."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        obj = json.loads(text)
    except ValueError:
        obj = None
    if isinstance(obj, list):
        return None, obj
    if isinstance(obj, dict) and ("examples" in obj or "system" in obj):
        given = obj.get("system")
        return (given if isinstance(given, str) and given else None), obj.get("examples", [])
    turns: list[dict[str, str]] = []
    system: str | None = None
    for example in load_jsonl(path):
        messages = example.chat_messages()
        if messages and messages[0]["role"] == "system":
            system = system or messages[0]["content"]
            messages = messages[1:]
        turns += [*messages, {"role": "assistant", "content": example.completion}]
    return system, turns


def run_publish_prompt(args: argparse.Namespace, store: AdapterStore, spec: BaseModelSpec) -> int:
    from lorafleet_training.publish import publish_prompt

    store = AdapterStore(args.store) if args.store is not None else store
    try:
        ref = AdapterRef.parse(args.reference)
        if ref.version is not None:
            raise TrainingError("versions are assigned at publish; give tenant/name without @version")
        system: str | None = None
        examples: list[dict[str, str]] = []
        if args.examples is not None:
            try:
                system, examples = read_examples_file(args.examples)
            except OSError as exc:
                raise TrainingDataError(str(args.examples), [DataIssue(0, f"cannot read: {exc.strerror}")]) from None
        if args.system is not None:
            system = args.system
        key = publish_prompt(store, ref.tenant, ref.name, system or "", examples, spec, pii=args.pii)
    except AdapterError as exc:
        return _fail(exc)
    print(f"published prompt adapter {key} ({len(examples)} few-shot turns) into {store.root}")
    return 0


# ------------------------------------------------------------------------------------------- stale


def run_stale(args: argparse.Namespace, store: AdapterStore, spec: BaseModelSpec) -> int:
    """List every version built for another base; exit 0 either way (the list is the answer)."""
    from lorafleet_training.publish import stale

    store = AdapterStore(getattr(args, "store", None) or store.root)
    try:
        found = stale(store, spec)
    except AdapterError as exc:
        return _fail(exc)
    for key, fingerprint in found:
        print(f"{key}\tbase {fingerprint}")
    print(f"{len(found)} stale version(s); this base is {spec.fingerprint} ({spec.model_id})", file=sys.stderr)
    return 0


def _fail(exc: Exception) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 1
