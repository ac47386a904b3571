"""``lorafleet retrain --stale``: train stale adapters again on the current base, publish the good ones.

An adapter is stale when its latest version names another base fingerprint than the one served, or
another prompt format (``lorafleet adapters stale``). For each one whose training record travels with
the version and whose data is still reachable (recorded with ``--keep-data-ref``; same fingerprint after the same PII
policy), retrain trains it again on this base with the recorded method, hyperparameters and seed, so the
held-out split is the same, and compares the new held-out metric with the one the old version recorded.
Only a version at least as good is published (``--require-improvement`` semantics, ties pass); the
others are reported with the reason, as are adapters that cannot be retrained.

What is retrained:

- LoRA / QLoRA adapters: their training record is the version's ``lorafleet-retrain.json`` (checksummed
  like every file of the version; written by ``lorafleet publish``). The compared metric is the held-out
  completion loss ``adapter_loss`` (lower is better); the retrained adapter must also pass the forgetting
  check on the general held-out set (``--max-forgetting``, default 10%), as at ``publish``.
- classifier heads: their record is the version's ``lorafleet-training.json``; the compared metric is the
  held-out ``macro_f1`` (higher is better).

Reported, not retrained: LoRA versions without a record (published before versions kept one, or
imported with ``adapters import``), versions whose data location was not kept, and prompt adapters
(nothing to train).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafleet_adapters.backend import Store
from lorafleet_adapters.errors import AdapterError, AdapterFormatError
from lorafleet_adapters.head import read_head_record
from lorafleet_adapters.manifest import Manifest, built_for, sha256_file
from lorafleet_adapters.peft_format import BaseModelSpec
from lorafleet_adapters.ref import AdapterKey, AdapterRef
from lorafleet_adapters.store import RETRAIN_RECORD_FILE
from lorafleet_training import data as data_mod
from lorafleet_training.errors import TrainingError
from lorafleet_training.publish import DEFAULT_MAX_FORGETTING, NoImprovement, TooMuchForgetting, stale_reason

log = logging.getLogger(__name__)

Echo = Callable[[str], None]
COMPARED_METRIC = "macro_f1"  # the held-out metric a retrained head must match or beat (higher is better)
LORA_METRIC = "adapter_loss"  # the held-out completion loss a retrained LoRA must match or beat (lower is better)


@dataclass(frozen=True)
class RetrainOutcome:
    """What happened to one stale adapter (its latest version ``old``)."""

    old: AdapterKey
    status: str  # "published", "refused", "skipped" (cannot retrain) or "planned" (dry run)
    reason: str
    new: AdapterKey | None = None
    old_metric: float | None = None
    new_metric: float | None = None
    metric: str = COMPARED_METRIC  # the compared held-out metric: macro_f1 (heads) or adapter_loss (LoRA)

    def line(self) -> str:
        change = ""
        if self.old_metric is not None and self.new_metric is not None:
            change = f" ({self.metric} {self.old_metric:.4f} -> {self.new_metric:.4f})"
        target = f" as {self.new}" if self.new is not None else ""
        return f"{self.old}\t{self.status}{target}{change}: {self.reason}"


@dataclass(frozen=True)
class _Plan:
    record: dict[str, Any]
    data: Path
    features_from: AdapterKey | None
    eval_data: Path | None = None


def stale_latest(
    store: Store, spec: BaseModelSpec, tenant: str | None
) -> tuple[list[tuple[AdapterKey, Manifest]], list[tuple[AdapterKey, str]]]:
    """The latest version of every adapter (of ``tenant``) built for another base, LoRAs before heads (so a
    head that reads a LoRA's features sees that LoRA's retrained version); and the latest versions whose
    manifest, or whose latest pointer, cannot be read, with why (one broken manifest stopped the whole
    fleet's retrain; a damaged pointer hid its adapter, and the retrain still exited 0)."""
    found: list[tuple[AdapterKey, Manifest]] = []
    unreadable: list[tuple[AdapterKey, str]] = []
    for summary in store.list(tenant):
        if summary.latest is None:  # versions, but a `latest` pointer that is missing or damaged
            # Skipped and counted (exit 1), not passed over: which version is current is unknown here.
            key = AdapterKey(summary.tenant, summary.name, max(summary.versions))
            unreadable.append((key, f"cannot read {summary.tenant}/{summary.name}'s latest version pointer"))
            continue
        key = AdapterKey(summary.tenant, summary.name, summary.latest)
        try:
            manifest = store.manifest(key)
        except AdapterError as exc:
            unreadable.append((key, f"cannot read its manifest: {exc}"))
            continue
        try:
            why = stale_reason(store, key, manifest, spec)
        except AdapterError as exc:
            unreadable.append((key, f"cannot read its training record: {exc}"))
            continue
        if why is not None:
            found.append((key, manifest))
    return sorted(found, key=lambda item: (item[1].kind == "head", str(item[0]))), unreadable


def retrain_stale(
    store: Store,
    spec: BaseModelSpec,
    model_dir: Path,
    *,
    tenant: str | None = None,
    dry_run: bool = False,
    work_dir: Path | None = None,
    max_forgetting: float | None = DEFAULT_MAX_FORGETTING,
    echo: Echo = print,
    device: str = "auto",
    dtype: str = "auto",
) -> list[RetrainOutcome]:
    """Retrain every stale adapter that can be; publish those at least as good as their old version.

    ``max_forgetting``: the forgetting margin a retrained LoRA must pass, as ``publish --max-forgetting``.
    ``device``, ``dtype``: the server's, which a head's features are computed in (``feature_precision``).
    """
    stale, unreadable = stale_latest(store, spec, tenant)
    outcomes = [RetrainOutcome(key, "skipped", why) for key, why in unreadable]
    for key, manifest in stale:
        metric = COMPARED_METRIC if manifest.kind == "head" else LORA_METRIC
        try:
            outcomes.append(
                _retrain_one(
                    store, spec, model_dir, key, manifest, dry_run, work_dir, max_forgetting, echo, (device, dtype)
                )
            )
        except Exception as exc:  # one adapter's unexpected failure must not stop the fleet's retrain
            outcomes.append(RetrainOutcome(key, "refused", _failed(key, exc), metric=metric))
    return outcomes


def _retrain_one(
    store: Store,
    spec: BaseModelSpec,
    model_dir: Path,
    key: AdapterKey,
    manifest: Manifest,
    dry_run: bool,
    work_dir: Path | None,
    max_forgetting: float | None,
    echo: Echo,
    compute: tuple[str, str] = ("auto", "auto"),
) -> RetrainOutcome:
    metric = COMPARED_METRIC if manifest.kind == "head" else LORA_METRIC
    try:
        plan = _plan(store, spec, key, manifest)
    except _Skip as exc:
        return RetrainOutcome(key, "skipped", str(exc), metric=metric)
    except AdapterError as exc:
        return RetrainOutcome(key, "skipped", f"cannot read it: {exc}", metric=metric)
    old_metric = manifest.eval_metrics.get(metric)
    if dry_run:
        what = manifest.kind if manifest.kind == "head" else _lora_method(plan.record)
        return RetrainOutcome(
            key,
            "planned",
            f"would retrain ({what}) on {plan.data} on base {spec.fingerprint[:19]}…",
            old_metric=old_metric,
            metric=metric,
        )
    if manifest.kind == "head":
        return _retrain_head(store, spec, model_dir, key, plan, old_metric, work_dir, echo, compute)
    return _retrain_lora(store, spec, model_dir, key, plan, old_metric, work_dir, max_forgetting, echo)


def _failed(key: AdapterKey, exc: Exception) -> str:
    """The reported reason of a retrain that raised: a domain error's message; anything else with its type
    (a bare KeyError('x') says only 'x'), its traceback logged."""
    if isinstance(exc, AdapterError | ValueError):
        return f"retraining failed: {exc}"
    log.warning("retraining %s failed", key, exc_info=True)
    return f"retraining failed: {type(exc).__name__}: {exc}"


class _Skip(Exception):
    pass


def _plan(store: Store, spec: BaseModelSpec, key: AdapterKey, manifest: Manifest) -> _Plan:
    if manifest.kind == "prompt":
        raise _Skip("a prompt adapter has nothing to train: publish its template again with `publish-prompt`")
    if manifest.kind != "head":
        return _plan_lora(store, key, manifest)
    record = read_head_record(store, key)
    if record is None:
        raise _Skip("the version keeps no training record")
    data = record.get("data") or {}
    path = data.get("path")
    if not path:
        raise _Skip("its training data's location was not kept (train with --keep-data-ref to allow retraining)")
    data_path = Path(path)
    if not data_path.is_file():
        raise _Skip(f"its training data {data_path} is not reachable")
    from lorafleet_training.classifier import load_labelled
    from lorafleet_training.pii import apply_policy

    mode = str((record.get("pii_scan") or {}).get("mode", "refuse"))
    try:
        examples, _ = apply_policy(load_labelled(data_path), mode, source=str(data_path))
    except TrainingError as exc:
        raise _Skip(f"its training data {data_path} no longer loads: {exc}") from None
    if data_mod.fingerprint(examples) != data.get("fingerprint"):
        raise _Skip(f"its training data {data_path} changed since training (fingerprint differs)")
    eval_data = None
    if data.get("eval_fingerprint"):
        if not data.get("eval_path"):
            raise _Skip("its held-out data's location was not kept (train with --keep-data-ref)")
        eval_data = Path(data["eval_path"])
        try:
            held, _ = apply_policy(load_labelled(eval_data), mode, source=str(eval_data))
        except TrainingError as exc:
            raise _Skip(f"its held-out data {eval_data} is not reachable: {exc}") from None
        if data_mod.fingerprint(held) != data["eval_fingerprint"]:
            raise _Skip(f"its held-out data {eval_data} changed since training (fingerprint differs)")
    features_from = None
    if record.get("features_from"):
        source = AdapterRef.parse(str(record["features_from"]))
        current = store.resolve(AdapterRef(source.tenant, source.name))
        if not built_for(store.manifest(current), spec):
            raise _Skip(
                f"it reads features of {source.tenant}/{source.name}, whose latest version {current} was built for "
                "another base or prompt format: retrain that LoRA first"
            )
        features_from = current
    return _Plan(record, data_path, features_from, eval_data)


def read_lora_record(store: Store, key: AdapterKey, manifest: Manifest) -> dict[str, Any] | None:
    """The training record kept with a LoRA version (its checksum verified), or None when it has none."""
    expected = manifest.files.get(RETRAIN_RECORD_FILE)
    if expected is None:
        return None
    path = Path(store.version_dir(key)) / RETRAIN_RECORD_FILE
    try:
        if sha256_file(path) != expected:
            raise AdapterFormatError(f"{key}: checksum mismatch for {RETRAIN_RECORD_FILE}")
        record = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise AdapterFormatError(f"{key}: cannot read {RETRAIN_RECORD_FILE}: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise AdapterFormatError(f"{key}: {RETRAIN_RECORD_FILE} is not valid JSON: {exc}") from None
    if not isinstance(record, dict):
        raise AdapterFormatError(f"{key}: {RETRAIN_RECORD_FILE} must hold an object")
    return record


def _plan_lora(store: Store, key: AdapterKey, manifest: Manifest) -> _Plan:
    record = read_lora_record(store, key, manifest)
    if record is None:
        raise _Skip(
            "the version keeps no training record (published before LoRA versions kept one, or imported with "
            "`adapters import`): train it again with `lorafleet train --keep-data-ref` and publish it"
        )
    if not isinstance(record.get("hyperparameters"), dict) or not isinstance(record.get("data"), dict):
        raise _Skip(f"its {RETRAIN_RECORD_FILE} lacks the hyperparameters or the data section")
    data = record["data"]
    if not data.get("path"):
        raise _Skip("its training data's location was not kept (train with --keep-data-ref to allow retraining)")
    mode = str((record.get("pii_scan") or {}).get("mode", "refuse"))
    data_path = _reachable(Path(data["path"]), data.get("fingerprint"), mode, "training data")
    eval_data = None
    if data.get("eval_path"):
        eval_data = _reachable(Path(data["eval_path"]), data.get("eval_fingerprint"), mode, "held-out data")
    return _Plan(record, data_path, None, eval_data)


def _reachable(path: Path, fingerprint: Any, mode: str, what: str) -> Path:
    """`path` when it loads (trainer's format, same PII policy) with the recorded fingerprint, else _Skip."""
    from lorafleet_training.pii import apply_policy

    if not path.is_file():
        raise _Skip(f"its {what} {path} is not reachable")
    try:
        examples, _ = apply_policy(data_mod.load_jsonl(path), mode, source=str(path))
    except TrainingError as exc:
        raise _Skip(f"its {what} {path} no longer loads: {exc}") from None
    if data_mod.fingerprint(examples) != fingerprint:
        raise _Skip(f"its {what} {path} changed since training (fingerprint differs)")
    return path


_NOT_RECORDED = frozenset(
    {"data", "adapter", "out_dir", "base_model_dir", "method", "pii", "eval_generate", "eval_data", "keep_data_ref"}
    | {"compare_prompt", "overwrite", "forgetting_check"}
)  # TrainConfig fields retrain sets itself, never from the record's hyperparameters


def _newer_version(store: Store, key: AdapterKey) -> str | None:
    """Why not to publish a retrained ``key``: another version became the latest while it trained (a
    publisher's newer adapter, perhaps already on this base, which the retrain must not bury under a
    copy of the old one); None while ``key`` is still the latest. Asked just before publishing: a
    publish racing this check itself still lands first or second, as any two publishes do."""
    latest = store.resolve(AdapterRef(key.tenant, key.name))
    if latest == key:
        return None
    return f"{latest} was published while {key} was retrained: not published over it (retrain {latest} if stale)"


def _lora_method(record: dict[str, Any]) -> str:
    return str(record.get("requested_method") or record.get("method") or "lora")


def _retrain_lora(
    store: Store,
    spec: BaseModelSpec,
    model_dir: Path,
    key: AdapterKey,
    plan: _Plan,
    old_metric: float | None,
    work_dir: Path | None,
    max_forgetting: float | None,
    echo: Echo,
) -> RetrainOutcome:
    """Train a LoRA/QLoRA again as `lorafleet train` does, with the recorded method, hyperparameters and
    seed; publish it when its held-out loss is not above the old one and it passes the forgetting gate."""
    from lorafleet_training.publish import publish
    from lorafleet_training.trainer import TrainConfig, train

    record = plan.record
    old_data = record["data"]
    settable = {f.name for f in dataclasses.fields(TrainConfig)} - _NOT_RECORDED
    hp = {k: v for k, v in record["hyperparameters"].items() if k in settable}
    if "targets" in hp:
        hp["targets"] = tuple(hp["targets"])
    scratch = Path(tempfile.mkdtemp(prefix="lorafleet-retrain.", dir=work_dir))
    out = scratch / f"{key.tenant}.{key.name}"
    partial = RetrainOutcome(key, "refused", "", old_metric=old_metric, metric=LORA_METRIC)
    try:
        config = TrainConfig(
            data=plan.data,
            adapter=f"{key.tenant}/{key.name}",
            out_dir=out,
            base_model_dir=model_dir,
            method=_lora_method(record),
            pii=str((record.get("pii_scan") or {}).get("mode", "refuse")),
            eval_generate=any(k.endswith("_exact_match") for k in record.get("eval_metrics") or {}),
            eval_data=plan.eval_data,
            keep_data_ref=True,
            **hp,
        )
        echo(f"retraining {key} ({config.method}) on base {spec.fingerprint[:19]}…")
        result = train(config, spec, progress=False, echo=echo)
        new_metric = result.record["eval_metrics"].get(LORA_METRIC)
        partial = dataclasses.replace(partial, new_metric=new_metric)
        if result.record["data"].get("eval_fingerprint") != old_data.get("eval_fingerprint"):
            return dataclasses.replace(partial, reason="the held-out split differs from the old version's")
        if old_metric is None or new_metric is None:
            return dataclasses.replace(
                partial, reason=f"no held-out {LORA_METRIC} to compare (old or new version has none)"
            )
        if new_metric > old_metric:
            return dataclasses.replace(
                partial,
                reason=f"held-out {LORA_METRIC} got worse on this base (lower is better); {key} stays the latest",
            )
        newer = _newer_version(store, key)
        if newer is not None:
            return dataclasses.replace(partial, reason=newer)
        # require_improvement: better than the new base alone too (the old version's loss was on another base)
        new = publish(out, store, spec, require_improvement=True, max_forgetting=max_forgetting)
        forgetting = result.record["eval_metrics"].get("forgetting")
        gate = (
            "no forgetting check in the record"
            if forgetting is None
            else f"forgetting {forgetting:+.1%}"
            + ("" if max_forgetting is None else f" within the {max_forgetting:.0%} margin")
        )
        return dataclasses.replace(
            partial,
            status="published",
            new=new,
            reason=f"held-out loss not above the old version's on the same split; {gate}",
        )
    except (TooMuchForgetting, NoImprovement) as exc:
        return dataclasses.replace(partial, reason=str(exc))
    except Exception as exc:  # anything else fails this adapter only (retrain_stale goes on with the others)
        return dataclasses.replace(partial, reason=_failed(key, exc))
    finally:
        if work_dir is None:
            shutil.rmtree(scratch, ignore_errors=True)


def _retrain_head(
    store: Store,
    spec: BaseModelSpec,
    model_dir: Path,
    key: AdapterKey,
    plan: _Plan,
    old_metric: float | None,
    work_dir: Path | None,
    echo: Echo,
    compute: tuple[str, str] = ("auto", "auto"),
) -> RetrainOutcome:
    """``compute``: the server's (device, dtype), which the features are computed in."""
    from lorafleet_training.classifier import ClassifierConfig, train_classifier
    from lorafleet_training.publish import publish

    hp = plan.record.get("hyperparameters") or {}
    old_metrics = plan.record.get("eval_metrics") or {}
    scratch = Path(tempfile.mkdtemp(prefix="lorafleet-retrain.", dir=work_dir))
    out = scratch / f"{key.tenant}.{key.name}"
    try:
        config = ClassifierConfig(
            data=plan.data,
            adapter=f"{key.tenant}/{key.name}",
            out_dir=out,
            base_model_dir=model_dir,
            features_from=None if plan.features_from is None else str(plan.features_from),
            seed=int(hp.get("seed", 0)),
            val_fraction=float(hp.get("val_fraction", 0.2)),
            c=float(hp.get("C", 1.0)),
            max_iter=int(hp.get("max_iter", 2000)),
            max_length=int(hp.get("max_length", 512)),
            pii=str((plan.record.get("pii_scan") or {}).get("mode", "refuse")),
            keep_data_ref=True,
            eval_generate="base_prompt_macro_f1" in old_metrics,
            eval_data=plan.eval_data,
            device=compute[0],
            dtype=compute[1],
        )
        echo(f"retraining {key} on base {spec.fingerprint[:19]}…")
        result = train_classifier(config, spec, store, echo=echo)
        new_metric = result.record["eval_metrics"].get(COMPARED_METRIC)
        old_split = (plan.record.get("data") or {}).get("split_fingerprint")  # None: recorded before the field
        if old_split is not None and result.record["data"].get("split_fingerprint") != old_split:
            return RetrainOutcome(
                key,
                "refused",
                "the held-out split differs from the old version's: the metrics do not compare",
                old_metric=old_metric,
                new_metric=new_metric,
            )
        if old_metric is None or new_metric is None:
            return RetrainOutcome(
                key,
                "refused",
                f"no held-out {COMPARED_METRIC} to compare (old or new version has none)",
                old_metric=old_metric,
                new_metric=new_metric,
            )
        if new_metric < old_metric:
            return RetrainOutcome(
                key,
                "refused",
                f"held-out {COMPARED_METRIC} got worse on this base; {key} stays the latest",
                old_metric=old_metric,
                new_metric=new_metric,
            )
        newer = _newer_version(store, key)
        if newer is not None:
            return RetrainOutcome(key, "refused", newer, old_metric=old_metric, new_metric=new_metric)
        new = publish(out, store, spec)
        return RetrainOutcome(
            key,
            "published",
            "at least as good as the old version on the same held-out split",
            new=new,
            old_metric=old_metric,
            new_metric=new_metric,
        )
    except Exception as exc:  # anything else fails this adapter only (retrain_stale goes on with the others)
        return RetrainOutcome(key, "refused", _failed(key, exc), old_metric=old_metric)
    finally:
        if work_dir is None:
            shutil.rmtree(scratch, ignore_errors=True)
