"""The lorafleet demo: three fictional companies, one base model, two LoRA adapters (and two prompt
adapters) and one classifier head.

1. writes the synthetic datasets (``demo/companies.py``) under ``--work``;
2. trains a LoRA adapter per company on the base the server serves; the trainer evaluates base vs
   prompt adapter vs LoRA adapter on held-out questions worded differently from anything in training
   (``eval_data``); publishes each into ``--store`` only if it beats the base (``require_improvement``),
   together with a prompt adapter of the same company (its system prompt holds every policy);
3. prints those metrics and the same questions answered by the base and by each adapter;
4. trains a classifier head for the third company (``demo/intents.py``, Larkspur Mobile: route each
   message to one of six queues) on pooled features of the frozen base, evaluates it against the
   prompt-only base (the base asked to answer with the label) on held-out wordings, and publishes it
   if its macro-F1 is higher;
5. with ``--target HOST:PORT``, asks a running lorafleet server the same questions (base, each
   adapter, each prompt adapter) and classifies held-out messages with the head, through
   ``lorafleet.LoraFleetClient``; the server must serve the same ``--store`` (it picks new versions
   up by itself).

Run: ``python -m demo.run_demo`` (or ``python demo/run_demo.py``), ``--help`` for the knobs.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from demo import intents
from demo.companies import COMPANIES, Company, write_datasets
from lorafleet_adapters.ref import AdapterKey
from lorafleet_adapters.store import AdapterStore
from lorafleet_training.data import Example, Turn, load_prompt_template, template_to_dict
from lorafleet_training.evaluate import EvalResult
from lorafleet_training.publish import TooMuchForgetting, publish, publish_prompt
from lorafleet_training.trainer import TrainConfig, format_metrics, train

SHOWN_QUESTIONS = 2  # per company, asked of every model


@dataclass
class Outcome:
    company: Company
    out_dir: Path
    key: AdapterKey | None
    prompt_key: AdapterKey | None
    held_out: EvalResult
    train_seconds: float
    record: dict[str, Any]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run_demo", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("data/demo"), help="datasets and trained adapters")
    p.add_argument(
        "--store",
        type=Path,
        default=Path("data/adapters"),
        help="adapter store to publish into (the server's default store)",
    )
    p.add_argument("--model-dir", type=Path, default=None, help="base model dir (default: prepared SmolLM2-135M)")
    p.add_argument("--target", default=None, help="HOST:PORT of a running lorafleet server to ask as well")
    p.add_argument("--api-key", default=None, help="API key for --target")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--targets", nargs="+", default=["all-linear"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--limit", type=int, default=None, help="use the first N training and held-out examples only (smoke runs)"
    )
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument(
        "--no-prompt-eval",
        dest="prompt_eval",
        action="store_false",
        help="skip scoring the prompt adapters (their long system prompt is half the evaluation time)",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--no-lora", dest="lora", action="store_false", help="only the classifier head (third company)")
    p.add_argument("--no-classifier", dest="classifier", action="store_false", help="skip the third company")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.monotonic()
    model_dir, spec = _base(args.model_dir)
    print(f"== lorafleet demo: one base ({spec.model_id}, {spec.fingerprint[:19]}…), three fictional companies ==")
    datasets = write_datasets(args.work, seed=args.seed)
    store = AdapterStore(args.store)
    outcomes = []
    for company in COMPANIES if args.lora else ():
        paths = datasets[company.tenant]
        if args.limit is not None:
            for part in ("train", "heldout"):
                rows = paths[part].read_text(encoding="utf-8").splitlines()[: args.limit]
                paths[part].write_text("\n".join(rows) + "\n", encoding="utf-8")
        outcomes.append(_train_company(args, company, paths, model_dir, spec, store))

    if outcomes:
        print("\n== held-out questions: wordings never seen in training ==")
        for o in outcomes:
            print(f"{o.company.name} ({len(o.held_out.samples)} questions)")
            print("\n".join(format_metrics(o.held_out.metrics).splitlines()[1:]))
        _show_answers(outcomes, model_dir, args.max_new_tokens)
    head_key = _train_classifier(args, model_dir, spec, store) if args.classifier else None
    if args.target and outcomes:
        _ask_server(args, outcomes)
    if args.target and head_key is not None:
        _classify_on_server(args)
    total = sum(o.train_seconds for o in outcomes)
    lora = ", ".join(f"{o.company.tenant} {o.train_seconds:.0f} s" for o in outcomes) or "none trained"
    print(
        f"\ntraining took {total:.0f} s for the LoRA adapters ({lora}); "
        f"the whole demo {time.monotonic() - started:.0f} s"
    )
    return 0


def _base(model_dir: Path | None) -> tuple[Path, Any]:
    from lorafleet_server.model.loader import base_spec_from_files, resolve_device, resolve_quantization
    from lorafleet_server.model.prepare import prepare_default_model

    model_dir = model_dir or prepare_default_model(Path("data/models"))
    quantization = resolve_quantization("auto", resolve_device("auto"))
    return model_dir, base_spec_from_files(model_dir, quantization, max_lora_rank=64)


def _train_company(
    args: argparse.Namespace, company: Company, paths: dict[str, Path], model_dir: Path, spec: Any, store: AdapterStore
) -> Outcome:
    print(f"\n-- {company.name}: training {company.reference} on {paths['train']} --")
    config = TrainConfig(
        data=paths["train"],
        adapter=company.reference,
        out_dir=args.work / company.tenant / "adapter",
        base_model_dir=model_dir,
        rank=args.rank,
        alpha=args.alpha,
        targets=tuple(args.targets),
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        max_length=256,
        seed=args.seed,
        eval_data=paths["heldout"],  # evaluate on new wordings of the facts, never seen in training
        eval_max_new_tokens=args.max_new_tokens,
        eval_batch_size=16,
        compare_prompt=paths["prompt"] if args.prompt_eval else None,
        overwrite=True,
    )
    result = train(config, spec, progress=args.progress)
    train_seconds = float(result.record["training_seconds"])
    key = prompt_key = None
    try:
        try:
            key = publish(config.out_dir, store, spec, require_improvement=True)
        except TooMuchForgetting as exc:
            # These adapters are deliberately narrow (one-line policy answers), so they lose a lot of
            # general text: the gate says so, and the demo publishes them anyway to show serving.
            print(f"{exc}\n(the demo publishes it anyway, with the forgetting gate off: --max-forgetting inf)")
            key = publish(config.out_dir, store, spec, require_improvement=True, max_forgetting=None)
        print(f"published {key} into {store.root}")
    except Exception as exc:  # the demo goes on and says why
        print(f"not published: {exc}")
    template = load_prompt_template(paths["prompt"])
    prompt_key = publish_prompt(
        store,
        company.tenant,
        f"{company.adapter}-prompt",
        template.system,
        template_to_dict(template)["examples"],
        spec,
    )
    print(f"published prompt adapter {prompt_key} (system prompt with every policy + one example)")
    return Outcome(company, config.out_dir, key, prompt_key, result.evaluation, train_seconds, result.record)


def _train_classifier(args: argparse.Namespace, model_dir: Path, spec: Any, store: AdapterStore) -> AdapterKey | None:
    """Larkspur Mobile: a classifier head on pooled features of the frozen base vs the prompt-only base."""
    from lorafleet_training.classifier import ClassifierConfig, train_classifier

    paths = intents.write_datasets(args.work, seed=args.seed)
    if args.limit is not None:
        for part in ("train", "heldout"):
            rows = paths[part].read_text(encoding="utf-8").splitlines()
            paths[part].write_text("\n".join(rows[: args.limit * 3]) + "\n", encoding="utf-8")
    print(f"\n-- Larkspur Mobile: training the classifier head {intents.REFERENCE} on {paths['train']} --")
    config = ClassifierConfig(
        data=paths["train"],
        adapter=intents.REFERENCE,
        out_dir=args.work / intents.TENANT / "head",
        base_model_dir=model_dir,
        seed=args.seed,
        eval_data=paths["heldout"],  # wordings never seen in training
        keep_data_ref=True,  # so `lorafleet retrain --stale` can train it again on a new base
        overwrite=True,
    )
    started = time.monotonic()
    result = train_classifier(config, spec, store)
    print(f"trained and evaluated in {time.monotonic() - started:.0f} s")
    try:
        key = publish(config.out_dir, store, spec, require_improvement=True)
    except Exception as exc:  # the demo goes on and says why
        print(f"not published: {exc}")
        return None
    metrics = result.record["eval_metrics"]
    print(
        f"published {key}: held-out macro-F1 {metrics['macro_f1']:.3f} vs {metrics['base_prompt_macro_f1']:.3f} "
        "for the prompt-only base"
    )
    return key


def _classify_on_server(args: argparse.Namespace) -> None:
    from lorafleet import LoraFleetClient, NotFoundError

    rows = intents.held_out_rows(args.seed)[:: max(1, len(intents.held_out_rows(args.seed)) // 6)][:6]
    print(f"\n== Classify through the server at {args.target} ({intents.REFERENCE}) ==")
    with LoraFleetClient(args.target, api_key=args.api_key, timeout=120) as client:
        deadline = time.monotonic() + 30  # the server picks the new version up within its poll interval
        for row in rows:
            while True:
                try:
                    result = client.classify(row["text"], adapter=intents.REFERENCE, top_k=2)
                    break
                except NotFoundError:
                    if time.monotonic() > deadline:
                        print("(the server does not know the head: does it serve --store?)")
                        return
                    time.sleep(1.0)
            top = ", ".join(f"{s.label} {s.probability:.2f}" for s in result.labels)
            print(f"  {row['text'][:60]:<60} -> {top}  (expected {row['label']})")


def _show_answers(outcomes: Sequence[Outcome], model_dir: Path, max_new_tokens: int) -> None:
    """The same held-out questions answered by the base and by each LoRA adapter (in this process)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorafleet_training.encoding import prompt_ids
    from lorafleet_training.evaluate import generate_answers

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model: Any = None
    names = []
    for o in outcomes:
        if model is None:
            model = PeftModel.from_pretrained(base, str(o.out_dir), adapter_name=o.company.tenant)
        else:
            model.load_adapter(str(o.out_dir), adapter_name=o.company.tenant)
        names.append(o.company.tenant)
    model.eval()
    questions = [s for o in outcomes for s in o.held_out.samples[:SHOWN_QUESTIONS]]
    examples = [Example(line=0, turns=(Turn("user", s.prompt),), completion=s.reference) for s in questions]
    prompts = [prompt_ids(tokenizer, e) for e in examples]
    limits = [max_new_tokens] * len(prompts)
    answers: dict[str, list[str]] = {}
    with model.disable_adapter():
        answers["base"] = generate_answers(model, tokenizer, prompts, limits, 16)
    for name in names:
        model.set_adapter(name)
        answers[name] = generate_answers(model, tokenizer, prompts, limits, 16)
    print("\n== the same questions, base vs each adapter (greedy, in this process) ==")
    for i, sample in enumerate(questions):
        print(f"\nQ: {sample.prompt}")
        for name in ["base", *names]:
            print(f"  {name:<10} {_one_line(answers[name][i])}")


def _ask_server(args: argparse.Namespace, outcomes: Sequence[Outcome]) -> None:
    from lorafleet import LoraFleetClient, LoraFleetError, Message, NotFoundError, Sampling

    refs = [""]
    for o in outcomes:
        refs += [str(k.ref) for k in (o.key, o.prompt_key) if k is not None]
    questions = [s.prompt for o in outcomes for s in o.held_out.samples[:SHOWN_QUESTIONS]]
    sampling = Sampling(max_new_tokens=64, temperature=0.0)
    print(f"\n== the same questions through the server at {args.target} ==")
    with LoraFleetClient(args.target, api_key=args.api_key, timeout=120) as client:
        client.wait_for_ready(30)
        for question in questions:
            print(f"\nQ: {question}")
            for ref in refs:
                answer = None
                deadline = time.monotonic() + 30  # a new version shows up within the server's poll interval
                while answer is None:
                    try:
                        answer = client.generate(
                            messages=[Message("user", question)], adapter=ref, sampling=sampling
                        ).text
                    except NotFoundError:
                        if time.monotonic() > deadline:
                            answer = "(the server does not know this adapter: does it serve --store?)"
                        else:
                            time.sleep(1.0)
                    except LoraFleetError as exc:
                        answer = f"(error: {exc})"
                print(f"  {ref or 'base':<26} {_one_line(answer)}")


def _one_line(text: str) -> str:
    return text.strip().replace("\n", " / ")


if __name__ == "__main__":
    sys.exit(main())
