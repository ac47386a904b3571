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
import logging
import math
import sys
from pathlib import Path
from typing import Any

from lorafleet_adapters.backend import Store
from lorafleet_adapters.errors import AdapterError
from lorafleet_adapters.peft_format import BaseModelSpec
from lorafleet_adapters.ref import AdapterRef
from lorafleet_adapters.store import AdapterStore
from lorafleet_training.data import DataIssue, load_jsonl
from lorafleet_training.errors import TrainingDataError, TrainingError
from lorafleet_training.pii import MODES

STORE_HELP = "adapter store: a directory or s3://BUCKET/PREFIX (default: the server's)"


def margin_arg(text: str) -> float:
    """--max-forgetting: a fraction >= 0, or inf (no gate). NaN passed every check (x > nan is False)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction such as 0.10 (or inf), got {text!r}") from None
    if math.isnan(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a fraction >= 0 (or inf), got {text!r}")
    return value


def _train_defaults() -> dict[str, Any]:
    from lorafleet_training.trainer import TrainConfig

    return {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}


# ------------------------------------------------------------------------------------------- train


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    d = _train_defaults()
    parser.add_argument(
        "--data",
        type=Path,
        required=True,
        help="JSONL: {'messages': [...]} or {'prompt', 'completion'}; with --method classifier "
        "{'text', 'label'} or {'messages', 'label'}",
    )
    parser.add_argument("--adapter", required=True, help="tenant/name the adapter will be published as")
    parser.add_argument("--out", type=Path, required=True, help="output directory (PEFT adapter + training record)")
    parser.add_argument(
        "--method",
        choices=("lora", "qlora", "classifier"),
        default="lora",
        help="lora (fp32 base on CPU), qlora (NF4 bitsandbytes base; on CPU too, said so at start) or "
        "classifier (a logistic-regression head on pooled features of the frozen base)",
    )
    parser.add_argument(
        "--features-from",
        default=None,
        metavar="TENANT/NAME[@V]",
        help="classifier: read features of the base plus this published LoRA of the same tenant",
    )
    parser.add_argument(
        "--keep-data-ref",
        action="store_true",
        help="record where --data lives in the training record, so `lorafleet retrain` can train again",
    )
    # Each method's own flags default to None, so one given to the other method is refused, not ignored.
    parser.add_argument("--C", dest="c", type=float, default=None, help="classifier: inverse L2 strength (default 1)")
    parser.add_argument("--rank", type=int, default=None, help=f"LoRA rank r (default {d['rank']})")
    parser.add_argument("--alpha", type=float, default=None, help=f"lora_alpha (default {d['alpha']})")
    parser.add_argument(
        "--targets",
        nargs="+",
        default=None,
        metavar="MODULE",
        help="modules to adapt, e.g. q_proj v_proj (default), or all-linear",
    )
    parser.add_argument("--dropout", type=float, default=None, help=f"lora_dropout (default {d['dropout']})")
    parser.add_argument("--epochs", type=int, default=None, help=f"default {d['epochs']}")
    parser.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default {d['lr']})")
    parser.add_argument("--batch-size", type=int, default=None, help=f"default {d['batch_size']}")
    parser.add_argument(
        "--max-length",
        type=int,
        default=d["max_length"],
        help="tokens per example, prompt included (default %(default)s); with --method classifier, prompt "
        "tokens, and a longer prompt is refused (Classify pools whole prompts)",
    )
    parser.add_argument("--seed", type=int, default=d["seed"], help="default %(default)s")
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        help=f"held-out share for evaluation (default {d['val_fraction']}; 0.2 per label with --method classifier)",
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
        default=None,
        help=f"greedy tokens per held-out answer (default {d['eval_max_new_tokens']})",
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

    d = _train_defaults()

    def given(dest: str) -> Any:
        value = getattr(args, dest)
        return d[dest] if value is None else value

    return TrainConfig(
        data=args.data,
        adapter=args.adapter,
        out_dir=args.out,
        base_model_dir=Path(model_dir),
        method=args.method,
        rank=given("rank"),
        alpha=given("alpha"),
        targets=tuple(args.targets) if args.targets else DEFAULT_TARGETS,
        dropout=given("dropout"),
        epochs=given("epochs"),
        lr=given("lr"),
        batch_size=given("batch_size"),
        max_length=args.max_length,
        seed=args.seed,
        val_fraction=args.val_fraction if args.val_fraction is not None else _train_defaults()["val_fraction"],
        pii=args.pii,
        eval_max_new_tokens=given("eval_max_new_tokens"),
        eval_generate=args.eval_generate,
        compare_prompt=args.compare_prompt,
        eval_data=args.eval_data,
        overwrite=args.overwrite,
        keep_data_ref=args.keep_data_ref,
    )


def classifier_config_from_args(
    args: argparse.Namespace, model_dir: Path, device: str = "auto", dtype: str = "auto"
) -> Any:
    from lorafleet_training.classifier import ClassifierConfig

    return ClassifierConfig(
        data=args.data,
        adapter=args.adapter,
        out_dir=args.out,
        base_model_dir=Path(model_dir),
        features_from=args.features_from,
        seed=args.seed,
        val_fraction=args.val_fraction if args.val_fraction is not None else 0.2,
        c=1.0 if args.c is None else args.c,
        max_length=args.max_length,
        pii=args.pii,
        keep_data_ref=args.keep_data_ref,
        eval_generate=args.eval_generate,
        eval_data=args.eval_data,
        overwrite=args.overwrite,
        device=device,
        dtype=dtype,
    )


# The flags of one method; given with the other they would be ignored in silence, so they are refused.
LORA_ONLY_FLAGS = {
    "rank": "--rank",
    "alpha": "--alpha",
    "targets": "--targets",
    "dropout": "--dropout",
    "epochs": "--epochs",
    "lr": "--lr",
    "batch_size": "--batch-size",
    "compare_prompt": "--compare-prompt",
    "eval_max_new_tokens": "--eval-max-new-tokens",
}
CLASSIFIER_ONLY_FLAGS = {"c": "--C", "features_from": "--features-from"}


def _quiet_bitsandbytes_kernel_notice() -> None:
    """bitsandbytes warns when it is imported (peft imports it) that an optional CPU 4-bit kernel
    package is missing, asking to install it: noise for LoRA and heads, and QLoRA on CPU runs without
    it (the trainer says at start which backend it uses). Real errors still show."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def run_train(
    args: argparse.Namespace,
    spec: BaseModelSpec,
    model_dir: Path,
    store: Store | None = None,
    *,
    device: str = "auto",
    dtype: str = "auto",
) -> int:
    """``device``, ``dtype``: the server's (--device, --dtype), which a head's features are computed in."""
    _quiet_bitsandbytes_kernel_notice()
    classifier = args.method == "classifier"
    others = LORA_ONLY_FLAGS if classifier else CLASSIFIER_ONLY_FLAGS
    misplaced = [flag for dest, flag in others.items() if getattr(args, dest) is not None]
    if misplaced:
        applies = "--method lora|qlora" if classifier else "--method classifier"
        return _fail(TrainingError(f"{', '.join(misplaced)}: for {applies} only, not --method {args.method}"))
    if args.eval_data is not None and args.val_fraction is not None:  # it was ignored, yet recorded
        return _fail(TrainingError("--eval-data and --val-fraction: give one (held-out data, or a share of --data)"))
    from lorafleet_training.publish import check_out_dir

    try:  # a local store may neither hold the output nor be held by it (--overwrite replaced a whole store)
        check_out_dir(args.out, args.overwrite, guarded=[store.root] if isinstance(store, AdapterStore) else [])
    except AdapterError as exc:
        return _fail(exc)
    if classifier:
        try:
            from lorafleet_training.classifier import train_classifier

            train_classifier(classifier_config_from_args(args, model_dir, device, dtype), spec, store)
        except AdapterError as exc:
            return _fail(exc)
        return 0
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
    parser.add_argument("--store", default=None, help=STORE_HELP)
    parser.add_argument(
        "--require-improvement",
        action="store_true",
        help="refuse unless the adapter's held-out loss is below the base's",
    )
    parser.add_argument(
        "--max-forgetting",
        type=margin_arg,
        default=None,
        metavar="FRACTION",
        help="refuse when the adapter's loss on the general held-out set rose more than this over the base's "
        "(default 0.10; 'inf' disables the gate)",
    )
    parser.add_argument(
        "--as",
        dest="publish_as",
        default=None,
        metavar="TENANT/NAME",
        help="publish under another reference than the one given at training",
    )


def run_publish(args: argparse.Namespace, store: Store, spec: BaseModelSpec) -> int:
    from lorafleet_training.publish import DEFAULT_MAX_FORGETTING, publish, read_training_record

    margin = DEFAULT_MAX_FORGETTING if args.max_forgetting is None else args.max_forgetting
    try:
        key = publish(
            args.dir,
            store,
            spec,
            require_improvement=args.require_improvement,
            adapter=args.publish_as,
            max_forgetting=margin,
        )
        record = read_training_record(args.dir)
    except AdapterError as exc:
        return _fail(exc)
    metrics = record["eval_metrics"]
    change = ""
    if "base_loss" in metrics and "adapter_loss" in metrics:
        change = f", held-out loss {metrics['base_loss']:.4f} (base) -> {metrics['adapter_loss']:.4f} (adapter)"
    if "macro_f1" in metrics:
        change = f", held-out macro-F1 {metrics['macro_f1']:.3f}"
        if "base_prompt_macro_f1" in metrics:
            change += f" (prompt-only base {metrics['base_prompt_macro_f1']:.3f})"
    print(f"published {key} ({record['method']}{change}) into {store.location}")
    print(_forgetting_line(record, metrics, margin))
    return 0


def _forgetting_line(record: dict[str, Any], metrics: dict[str, Any], margin: float) -> str:
    if "forgetting" in metrics:
        return (
            f"forgetting check: general held-out loss {metrics['general_base_loss']:.4f} (base) -> "
            f"{metrics['general_adapter_loss']:.4f} (adapter), {metrics['forgetting']:+.1%} (margin {margin:.0%})"
        )
    why = (record.get("forgetting") or {}).get("why") if isinstance(record.get("forgetting"), dict) else None
    return f"forgetting check: {why or 'not in the training record (trained without it)'}"


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
    parser.add_argument("--store", default=None, help=STORE_HELP)
    parser.add_argument("--pii", choices=MODES, default="refuse", help="PII policy for the texts (default refuse)")


def read_examples_file(path: Path) -> tuple[str | None, list[dict[str, str]]]:
    """(system or None, few-shot turns) from a JSON list, a JSON template object or training JSONL."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        issue = DataIssue(0, f"not valid UTF-8 ({exc.reason} at byte {exc.start})")
        raise TrainingDataError(str(path), [issue]) from None
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        obj = None
    if isinstance(obj, list):
        return None, obj
    if isinstance(obj, dict) and ("examples" in obj or "system" in obj):
        # every field checked: a misspelt "exmaples" published a template of no turns (an outside review)
        unexpected = sorted(set(obj) - {"system", "examples"})
        given, examples = obj.get("system"), obj.get("examples", [])
        problems = [f"unexpected field {name!r} (a template object takes system and examples)" for name in unexpected]
        if given is not None and not isinstance(given, str):
            problems.append(f"system must be a string, got {type(given).__name__}")
        if not isinstance(examples, list):
            problems.append(f"examples must be a list of turns, got {type(examples).__name__}")
        if problems:
            raise TrainingDataError(str(path), [DataIssue(1, problem) for problem in problems])
        return (given or None), examples
    turns: list[dict[str, str]] = []
    system: str | None = None
    for example in load_jsonl(path):
        messages = example.chat_messages()
        if messages and messages[0]["role"] == "system":
            system = system or messages[0]["content"]
            messages = messages[1:]
        turns += [*messages, {"role": "assistant", "content": example.completion}]
    return system, turns


def run_publish_prompt(args: argparse.Namespace, store: Store, spec: BaseModelSpec) -> int:
    from lorafleet_training.publish import publish_prompt

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
    print(f"published prompt adapter {key} ({len(examples)} few-shot turns) into {store.location}")
    return 0


# ------------------------------------------------------------------------------------------- stale


def run_stale(args: argparse.Namespace, store: Store, spec: BaseModelSpec) -> int:
    """List every version built for another base. Exit 0 when every version's manifest was read (the
    list, empty or not, is the answer); 1 when some could not be, since they may be stale too."""
    from lorafleet_training.publish import stale

    try:
        found, unreadable = stale(store, spec)
    except AdapterError as exc:
        return _fail(exc)
    for key, built_for in found:
        print(f"{key}\t{built_for}")
    for key, why in unreadable:
        print(f"error: {key}: cannot read its manifest: {why}", file=sys.stderr)
    print(
        f"{len(found)} stale version(s)"
        + (f", {len(unreadable)} unreadable" if unreadable else "")
        + f"; this base is {spec.fingerprint} ({spec.model_id})",
        file=sys.stderr,
    )
    return 1 if unreadable else 0


def _fail(exc: Exception) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 1


# ----------------------------------------------------------------------------------------- retrain


def add_retrain_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--stale",
        action="store_true",
        required=True,
        help="retrain every adapter whose latest version was built for another base than this one",
    )
    parser.add_argument("--tenant", default=None, help="only this tenant's adapters")
    parser.add_argument("--dry-run", action="store_true", help="say what would be retrained; train nothing")
    parser.add_argument("--store", default=None, help=STORE_HELP)
    parser.add_argument(
        "--work-dir", type=Path, default=None, help="keep the retrained outputs here (default: a temporary dir)"
    )
    parser.add_argument(
        "--max-forgetting",
        type=margin_arg,
        default=None,
        metavar="FRACTION",
        help="a retrained LoRA is refused when its loss on the general held-out set rose more than this over "
        "the base's (default 0.10; 'inf' disables the gate)",
    )


def run_retrain(
    args: argparse.Namespace,
    store: Store,
    spec: BaseModelSpec,
    model_dir: Path,
    *,
    device: str = "auto",
    dtype: str = "auto",
) -> int:
    """One line per stale adapter (published / refused / skipped / planned, with the reason).

    Exit 0 when every stale adapter was published (or planned, or none was stale), else 1.
    """
    _quiet_bitsandbytes_kernel_notice()
    from lorafleet_training.publish import DEFAULT_MAX_FORGETTING
    from lorafleet_training.retrain import retrain_stale

    margin = DEFAULT_MAX_FORGETTING if args.max_forgetting is None else args.max_forgetting
    try:
        outcomes = retrain_stale(
            store,
            spec,
            model_dir,
            tenant=args.tenant,
            dry_run=args.dry_run,
            work_dir=args.work_dir,
            max_forgetting=margin,
            echo=lambda text: print(text, file=sys.stderr),
            device=device,
            dtype=dtype,
        )
    except AdapterError as exc:
        return _fail(exc)
    for outcome in outcomes:
        print(outcome.line())
    done = sum(o.status in ("published", "planned") for o in outcomes)
    print(
        f"{len(outcomes)} stale adapter(s) on base {spec.fingerprint[:19]}… ({spec.model_id}): "
        f"{done} {'planned' if args.dry_run else 'published'}, {len(outcomes) - done} not",
        file=sys.stderr,
    )
    return 0 if done == len(outcomes) else 1
