"""The trainer's output directory, and publishing it (or a prompt adapter) into an adapter store.

Output directory layout (written atomically: staged beside, then renamed into place)::

    <out>/adapter_config.json          standard PEFT files: ``PeftModel.from_pretrained(base, out)`` loads
    <out>/adapter_model.safetensors    them unchanged
    <out>/README.md                    PEFT's model card
    <out>/lorafleet-training.json      the training record: adapter reference, method, base fingerprint
                                       and quantization, data fingerprint, PII result, hyperparameters,
                                       per-epoch losses, eval metrics, sha256 of every file above
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lorafleet_adapters.backend import Store
from lorafleet_adapters.errors import AdapterError, AdapterFormatError, AdapterIncompatible
from lorafleet_adapters.fsio import fsync_dir
from lorafleet_adapters.manifest import Manifest, prompt_formats_differ, sha256_file
from lorafleet_adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE, BaseModelSpec, load_adapter_weights
from lorafleet_adapters.prompt import PromptTemplate, PromptTurn
from lorafleet_adapters.ref import AdapterKey, AdapterRef
from lorafleet_adapters.store import README_FILE, RETRAIN_RECORD_FILE, import_peft_via
from lorafleet_training.data import parse_prompt_template
from lorafleet_training.errors import OutputNotPlaced, PiiFound, TrainingError
from lorafleet_training.pii import MODES, Finding, PiiReport, detect, mask_value, redact_text

log = logging.getLogger(__name__)

RECORD_FILE = "lorafleet-training.json"
RECORD_FORMAT = "lorafleet-training/1"
PUBLISHED_FILES = (CONFIG_FILE, WEIGHTS_FILE, README_FILE)
_RECORD_REQUIRED = ("format", "adapter", "method", "base", "files", "eval_metrics")


DEFAULT_MAX_FORGETTING = 0.10  # the adapter's loss on the general held-out set may rise 10% over the base's


class NoImprovement(TrainingError):
    """--require-improvement: the adapter's held-out loss is not below the base's."""


class TooMuchForgetting(TrainingError):
    """The adapter lost more than the allowed margin on the general held-out set (the forgetting check)."""


# ------------------------------------------------------------------------------------ output dir


def check_out_dir(
    out_dir: Path, overwrite: bool, inputs: Sequence[Path | None] = (), guarded: Sequence[Path] = ()
) -> None:
    """Refuse a non-empty output directory unless `overwrite` (checked before training starts), and an
    output directory that is or holds one of the run's ``inputs`` (the data, the model): ``--overwrite``
    replaced the whole directory, the customer's data with it.

    The output is staged beside `out_dir` and renamed into place (``place_output``), so `out_dir` must be
    a path a rename can replace: a symbolic link (rmtree refused it after training, and the staged
    adapter was deleted) or a mount point is refused here, before any training; so is the current
    directory or one holding it (``--out .`` staged the output inside it, and ``--overwrite`` deleted
    the directory and the staged output). ``guarded`` (the adapter store) may neither be held by the
    output nor hold it: ``--overwrite`` replaced a whole store, or a published version's files.
    """
    out_dir = Path(out_dir)
    if out_dir.is_symlink():
        raise TrainingError(
            f"output path {out_dir} is a symbolic link (to {os.readlink(out_dir)}): the output is written beside "
            f"it and renamed into place, which would replace the link; pass the directory itself "
            f"(--out {out_dir.resolve()}) or another path"
        )
    if os.path.ismount(out_dir):
        raise TrainingError(
            f"output directory {out_dir} is a mount point: the output is written beside it and renamed into place, "
            f"which cannot replace a mount point; choose a directory inside it (e.g. --out {out_dir / 'adapter'})"
        )
    resolved = out_dir.resolve()
    if Path.cwd().resolve().is_relative_to(resolved):
        raise TrainingError(
            f"output directory {out_dir} is the current directory or holds it: the output replaces the whole "
            f"directory; choose a new one, e.g. --out {Path(out_dir, 'adapter')}"
        )
    for given in inputs:
        if given is not None and Path(given).resolve().is_relative_to(resolved):
            raise TrainingError(f"output directory {out_dir} holds {given}, an input of this run: choose another --out")
    for root in guarded:
        where = Path(root).resolve()
        if where.is_relative_to(resolved) or resolved.is_relative_to(where):
            held = "holds" if where.is_relative_to(resolved) else "is inside"
            raise TrainingError(
                f"output directory {out_dir} {held} the adapter store {root}: the store changes only through "
                "publish; choose an --out outside it"
            )
    if out_dir.exists() and not out_dir.is_dir():
        raise TrainingError(f"output path {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise TrainingError(f"output directory {out_dir} is not empty; choose another --out or pass --overwrite")
    os.rmdir(staging_dir(out_dir))  # where the output is staged can be written: found now, not after training


def staging_dir(out_dir: Path) -> Path:
    """A fresh directory beside `out_dir` to stage its output in (same filesystem: ``place_output`` renames).
    A parent that cannot hold it (a file in the path, no permission, a full disk) is a TrainingError:
    it surfaced after all the training as a traceback, the model lost (an outside review)."""
    # Where the system puts `x/..` (through any symlink on the way, as check_out_dir's checks see it):
    # staged beside that, never inside the output; a lexical normalisation went elsewhere after a link.
    out_dir = Path(out_dir).resolve()
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    except OSError as exc:
        raise TrainingError(f"cannot write the output beside {out_dir}: {exc.strerror or exc}") from None


def place_output(stage: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename the complete, verified output in `stage` into `out_dir` (replacing it with `overwrite`).

    `out_dir` is checked again (``check_out_dir``: it may have changed while training ran). On any failure
    here the staged output is kept and ``OutputNotPlaced`` names it: it was deleted with the error, and
    the whole training run with it.
    """
    given = Path(out_dir)
    try:
        check_out_dir(given, overwrite)  # the path as given: one that became a symlink is refused, not followed
        out_dir = given.resolve()  # then the same path staging_dir put the stage beside
        if Path(stage).resolve().is_relative_to(out_dir):  # never delete the output with it
            raise TrainingError(f"the output was staged inside {out_dir}, which it would replace")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.rename(stage, out_dir)
    except (OSError, TrainingError) as exc:
        raise OutputNotPlaced(given, stage, exc) from exc
    fsync_dir(out_dir.parent)


def write_training_dir(
    out_dir: Path,
    save_adapter: Callable[[Path], None],
    record: Mapping[str, Any],
    spec: BaseModelSpec,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Stage the PEFT files (`save_adapter(dir)`) and the record, verify them, rename into `out_dir`.

    Returns the record as written (with ``files`` checksums). The staged adapter is validated against
    `spec` exactly as the store will validate it, so a publish cannot fail on format. A failure to move
    it into `out_dir` keeps the staged directory (``place_output``).
    """
    out_dir = Path(out_dir)
    stage = staging_dir(out_dir)
    try:
        save_adapter(stage)
        unexpected = sorted(p.name for p in stage.iterdir() if p.name not in PUBLISHED_FILES)
        if unexpected:
            raise TrainingError(f"the saved adapter holds files the store would not publish: {unexpected}")
        load_adapter_weights(stage, spec)
        written = dict(record)
        written["files"] = {name: sha256_file(stage / name) for name in PUBLISHED_FILES if (stage / name).is_file()}
        (stage / RECORD_FILE).write_text(json.dumps(written, indent=2, sort_keys=True, allow_nan=False) + "\n")
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    place_output(stage, out_dir, overwrite)
    return written


def read_training_record(out_dir: Path) -> dict[str, Any]:
    path = Path(out_dir) / RECORD_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterFormatError(
            f"{out_dir} has no {RECORD_FILE}: not a `lorafleet train` output (use `lorafleet adapters import` "
            "for a plain PEFT directory)"
        ) from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise AdapterFormatError(f"cannot read {path}: {exc}") from None
    if not isinstance(record, dict):
        raise AdapterFormatError(f"{path} must hold a JSON object")
    missing = [k for k in _RECORD_REQUIRED if k not in record]
    if missing:
        raise AdapterFormatError(f"{path} lacks fields {missing}")
    if record["format"] != RECORD_FORMAT:
        raise AdapterFormatError(f"{path}: format is {record['format']!r}; expected {RECORD_FORMAT!r}")
    base = record["base"]
    if not isinstance(base, dict) or not isinstance(base.get("fingerprint"), str):
        raise AdapterFormatError(f"{path}: 'base' must be an object with a 'fingerprint' string")
    if not isinstance(record["files"], dict) or not isinstance(record["eval_metrics"], dict):
        raise AdapterFormatError(f"{path}: 'files' and 'eval_metrics' must be objects")
    return record


def verify_files(out_dir: Path, record: Mapping[str, Any]) -> None:
    """Check every file the record lists against its sha256, and that the PEFT files are among them."""
    files: Mapping[str, Any] = record["files"]
    for required in (CONFIG_FILE, WEIGHTS_FILE):
        if required not in files:
            raise AdapterFormatError(f"{RECORD_FILE} lists no checksum for {required}")
    for name, digest in files.items():
        if name not in PUBLISHED_FILES:
            raise AdapterFormatError(f"{RECORD_FILE} lists an unexpected file {name!r}")
        path = Path(out_dir) / name
        if not path.is_file():
            raise AdapterFormatError(f"{path} is missing (listed in {RECORD_FILE})")
        actual = sha256_file(path)
        if actual != digest:
            raise AdapterFormatError(
                f"{path}: sha256 {actual} differs from {digest} recorded at training; the file changed"
            )
    extra = [n for n in PUBLISHED_FILES if (Path(out_dir) / n).is_file() and n not in files]
    if extra:
        raise AdapterFormatError(f"{extra} in {out_dir} are not covered by {RECORD_FILE}'s checksums")


# ---------------------------------------------------------------------------------------- publish


def publish(
    out_dir: Path,
    store: Store,
    spec: BaseModelSpec,
    require_improvement: bool = False,
    adapter: str | None = None,
    max_forgetting: float | None = DEFAULT_MAX_FORGETTING,
) -> AdapterKey:
    """Verify a training output against `spec` and its own checksums, then publish it atomically.

    `adapter` ("tenant/name") overrides the reference recorded at training. `max_forgetting`: refuse an
    adapter whose loss on the general held-out set rose more than this fraction over the base's (None:
    no gate; a record without the check passes and says so). A LoRA/QLoRA version keeps
    `retrain_record(record)` as its file ``lorafleet-retrain.json`` (checksummed like the weights), which
    ``lorafleet retrain --stale`` reads.
    """
    out_dir = Path(out_dir)
    record = read_training_record(out_dir)
    trained_on = record["base"]["fingerprint"]
    if trained_on != spec.fingerprint:
        raise AdapterIncompatible(
            f"{out_dir} was trained on base {trained_on} ({record['base'].get('model_id', '?')}); "
            f"the store's base is {spec.fingerprint} ({spec.model_id}): retrain it on this base"
        )
    trained_format = record["base"].get("prompt_format")  # None in records older than the field
    if prompt_formats_differ(trained_format, spec.prompt_format):
        raise AdapterIncompatible(
            f"{out_dir} was trained with another tokenizer or chat template (prompt format {trained_format}) "
            f"than the base's now ({spec.prompt_format}): retrain it on this base"
        )
    if record.get("kind") == "head":
        fitted = fitted_quantization(record)
        if fitted != spec.quantization:
            raise AdapterIncompatible(
                f"{out_dir} is a head fitted on the features of a {fitted} base, and this command's base is "
                f"{spec.quantization} (its --quantization; auto resolves on the machine that runs it): publish "
                f"with the --quantization the servers run, or train the head again with --quantization "
                f"{spec.quantization}; served on another quantization its features differ"
            )
        return _publish_head(out_dir, record, store, spec, require_improvement, adapter)
    verify_files(out_dir, record)
    metrics = _metrics(record)
    if require_improvement:
        check_improvement(metrics)
    if max_forgetting is not None:
        check_forgetting(metrics, max_forgetting)
    ref = AdapterRef.parse(adapter if adapter is not None else str(record["adapter"]))
    if ref.version is not None:
        raise TrainingError(f"versions are assigned at publish; give {ref.tenant}/{ref.name} without @version")
    extra: dict[str, Any] = {
        "training_data_fingerprint": record.get("data", {}).get("fingerprint"),
        "eval_metrics": metrics,
        "pii_scan": record.get("pii_scan"),
    }
    with tempfile.TemporaryDirectory(prefix="lorafleet-publish.") as source:
        for name in PUBLISHED_FILES:
            if (out_dir / name).is_file():
                os.symlink((out_dir / name).resolve(), Path(source) / name)
        text = json.dumps(retrain_record(record), indent=2, sort_keys=True, allow_nan=False) + "\n"
        (Path(source) / RETRAIN_RECORD_FILE).write_text(text, encoding="utf-8")
        # The store copies the files after verify_files hashed them: its staged copies are checked
        # against the record too, just before they are published (_CheckedPublisher).
        checked = _CheckedPublisher(store, record["files"], out_dir)
        return import_peft_via(checked, Path(source), ref.tenant, ref.name, spec, str(record["method"]), extra)


class _CheckedPublisher:
    """`store`'s staged publish, with the staged copies of a training output's files checked against
    the record's checksums before they are published (``check_staged``)."""

    def __init__(self, store: Store, files: Mapping[str, str], out_dir: Path) -> None:
        self._store = store
        self._files = dict(files)
        self._out_dir = out_dir

    def new_staging(self, tenant: str, name: str) -> Path:
        return self._store.new_staging(tenant, name)

    def publish_staged(
        self, staging: Path, tenant: str, name: str, manifest_for: Callable[[int], Manifest]
    ) -> AdapterKey:
        check_staged(staging, self._files, self._out_dir)
        return self._store.publish_staged(staging, tenant, name, manifest_for)


def check_staged(staging: Path, files: Mapping[str, str], out_dir: Path) -> None:
    """The training output's files as the store staged them (in `staging`) are exactly those of the
    record's ``files`` checksums: none missing, none added, none changed."""
    for name in PUBLISHED_FILES:
        path = Path(staging) / name
        if name not in files:
            if path.exists():
                raise AdapterFormatError(f"{out_dir / name} was staged for publishing but is not in {RECORD_FILE}")
            continue
        if not path.is_file():
            raise AdapterFormatError(f"{out_dir / name} is listed in {RECORD_FILE} but was not staged for publishing")
        actual = sha256_file(path)
        if actual != files[name]:
            raise AdapterFormatError(
                f"{out_dir / name}: the copy staged for publishing has sha256 {actual}, not {files[name]} recorded at "
                "training (the file changed while being published); nothing was published"
            )


_RETRAIN_KEYS = ("format", "adapter", "method", "requested_method", "pii_scan", "hyperparameters", "eval_metrics")


def retrain_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """What a LoRA version keeps of its training record (``lorafleet-retrain.json``): what training it again
    needs, and the held-out metrics to compare with. No held-out samples, no compared prompt; the data's
    location only when the user allowed it (``train --keep-data-ref``)."""
    kept: dict[str, Any] = {k: record[k] for k in _RETRAIN_KEYS if k in record}
    base = record.get("base") or {}
    kept["base"] = {
        k: base.get(k)
        for k in ("fingerprint", "prompt_format", "model_id", "served_quantization", "training_quantization")
    }
    data = dict(record.get("data") or {})
    if not data.get("keep_ref"):
        data["path"] = data["eval_path"] = None
    kept["data"] = data
    kept["forgetting"] = record.get("forgetting")
    kept["created_at"] = record.get("created_at")
    return kept


def fitted_quantization(record: Mapping[str, Any]) -> str:
    """The base quantization a head's training record says its features came from. A record older
    than the field had them from the unquantized base, whatever the store's base was (training loaded
    it so until it computed features as the server does)."""
    features = (record.get("base") or {}).get("features")
    return str(features.get("quantization")) if isinstance(features, dict) else "none"


def head_fitted_on(store: Store, key: AdapterKey, manifest: Manifest) -> str:
    """The base quantization a published head's features came from: its training record's, else (a
    head published without one) what its manifest says."""
    from lorafleet_adapters.head import read_head_record

    record = read_head_record(store, key)
    return fitted_quantization(record) if record is not None else manifest.base_quantization


def check_features_source(store: Store, features_from: AdapterKey | None, trained_files: Any) -> None:
    """The LoRA version a head reads in ``store`` has the files (by checksum) it was trained with: a
    head trained against one store and published into another read whatever LoRA had that name and
    version there, in silence (an outside review). Records older than the field are not checked."""
    if features_from is None or not isinstance(trained_files, dict):
        return
    held = store.manifest(features_from).files
    differ = sorted(name for name, digest in trained_files.items() if held.get(name) != digest)
    if differ:
        raise AdapterIncompatible(
            f"features_from {features_from} in {store.location} is not the LoRA this head was trained on "
            f"({', '.join(differ)} differ): publish it into the store it was trained against, or train it "
            "again on this store's LoRA"
        )


def _publish_head(
    out_dir: Path,
    record: Mapping[str, Any],
    store: Store,
    spec: BaseModelSpec,
    require_improvement: bool,
    adapter: str | None,
) -> AdapterKey:
    """Publish a classifier head output (``train --method classifier``) with its training record."""
    from lorafleet_adapters.head import publish_head
    from lorafleet_training.classifier import verify_head_files

    head = verify_head_files(out_dir, dict(record))
    check_features_source(store, head.features_from, record.get("features_from_files"))
    metrics = _metrics(record)
    if require_improvement:
        check_head_improvement(metrics)
    ref = AdapterRef.parse(adapter if adapter is not None else str(record["adapter"]))
    if ref.version is not None:
        raise TrainingError(f"versions are assigned at publish; give {ref.tenant}/{ref.name} without @version")
    extra: dict[str, Any] = {
        "training_data_fingerprint": record.get("data", {}).get("fingerprint"),
        "eval_metrics": metrics,
        "pii_scan": record.get("pii_scan"),
    }
    # The record goes into the store without the generated samples of held-out prompts (the prompt-only
    # base's answers can repeat a customer's text), as a LoRA's retrain record does.
    text, _ = head_store_record(record)
    with tempfile.TemporaryDirectory(prefix="lorafleet-head-record-") as tmp:
        kept = Path(tmp) / RECORD_FILE
        kept.write_text(text, encoding="utf-8")
        return publish_head(store, ref.tenant, ref.name, head, spec, record_path=kept, extra=extra)


def head_store_record(record: Mapping[str, Any]) -> tuple[str, bool]:
    """The training record a head version keeps in the store, as text, and whether its confusion
    matrices were left out.

    Compact JSON, without ``samples`` (``without_samples``). The store keeps at most
    ``head.MAX_RECORD_BYTES`` (4 MiB); indented, the confusion matrices alone passed it at ~500-700
    labels, and the head trained but could not be published. A record still over the limit compact
    goes without its confusion matrices (the training output's record keeps them); TrainingError when
    even that is over (``train_classifier`` asks before writing its output).
    """
    from lorafleet_adapters import head as head_mod

    kept = without_samples(record)
    text = _compact_json(kept)
    if len(text.encode("utf-8")) <= head_mod.MAX_RECORD_BYTES:
        return text, False
    text = _compact_json(_without_confusion_matrices(kept))
    size = len(text.encode("utf-8"))
    if size > head_mod.MAX_RECORD_BYTES:
        labels = len((record.get("data") or {}).get("labels") or {})
        raise TrainingError(
            f"the training record is {size} bytes even without its confusion matrices, over the "
            f"{head_mod.MAX_RECORD_BYTES} bytes an adapter store keeps with a head ({labels} labels): the head could "
            "not be published; train it with fewer (or shorter) labels"
        )
    return text, True


def _compact_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False) + "\n"


def _without_confusion_matrices(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {
            k: {"omitted": f"too large for the store; the training output's {RECORD_FILE} keeps it"}
            if k == "confusion_matrix"
            else _without_confusion_matrices(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_without_confusion_matrices(v) for v in value]
    return value


def without_samples(value: Any) -> Any:
    """``value`` (a training record) with every ``samples`` entry (generated answers to held-out
    prompts) left out, at any depth."""
    if isinstance(value, Mapping):
        return {k: without_samples(v) for k, v in value.items() if k != "samples"}
    if isinstance(value, list):
        return [without_samples(v) for v in value]
    return value


def check_head_improvement(metrics: Mapping[str, float]) -> None:
    """--require-improvement for a head: its held-out macro-F1 beats the prompt-only base's."""
    head, base = metrics.get("macro_f1"), metrics.get("base_prompt_macro_f1")
    if head is None or base is None:
        raise NoImprovement(
            "--require-improvement: the training record has no held-out macro-F1 of both the head and the "
            "prompt-only base (trained with --val-fraction 0 or --no-eval-generate?)"
        )
    if not head > base:
        raise NoImprovement(
            f"--require-improvement: held-out macro-F1 of the head {head:.4f} is not above the prompt-only base's "
            f"{base:.4f}"
        )


def check_forgetting(metrics: Mapping[str, float], max_forgetting: float) -> None:
    forgetting = metrics.get("forgetting")
    if forgetting is not None and forgetting > max_forgetting:
        raise TooMuchForgetting(
            f"forgetting check: the adapter's loss on the general held-out set is {forgetting:+.1%} over the base's "
            f"({metrics['general_base_loss']:.4f} -> {metrics['general_adapter_loss']:.4f}); the margin is "
            f"{max_forgetting:.0%} (--max-forgetting)"
        )


def check_improvement(metrics: Mapping[str, float]) -> None:
    base, adapter = metrics.get("base_loss"), metrics.get("adapter_loss")
    if base is None or adapter is None:
        raise NoImprovement(
            "--require-improvement: the training record has no held-out losses (trained with --val-fraction 0?)"
        )
    if not adapter < base:
        raise NoImprovement(
            f"--require-improvement: held-out loss of the adapter {adapter:.4f} is not below the base's {base:.4f}"
        )


def _metrics(record: Mapping[str, Any]) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for name, value in record["eval_metrics"].items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise AdapterFormatError(f"{RECORD_FILE}: eval metric {name!r} is not a finite number")
        metrics[str(name)] = float(value)
    return metrics


def stale(store: Store, spec: BaseModelSpec) -> tuple[list[tuple[AdapterKey, str]], list[tuple[AdapterKey, str]]]:
    """Every published version built for another base than `spec` (``built_for``: other weights, or
    another prompt format), with what it was built for: "base <fingerprint>", or "prompt format <...>"
    when only that differs; and the versions whose manifest cannot be read, with why (they may be
    stale too: the answer is incomplete, not empty)."""
    found: list[tuple[AdapterKey, str]] = []
    unreadable: list[tuple[AdapterKey, str]] = []
    for summary in store.list():
        for version in summary.versions:
            key = AdapterKey(summary.tenant, summary.name, version)
            try:
                manifest = store.manifest(key)
            except AdapterError as exc:
                unreadable.append((key, str(exc)))
                continue
            try:
                why = stale_reason(store, key, manifest, spec)
            except AdapterError as exc:  # one damaged version is reported, not fatal to the listing
                unreadable.append((key, f"cannot read its training record: {exc}"))
                continue
            if why is not None:
                found.append((key, why))
    return found, unreadable


def stale_reason(store: Store, key: AdapterKey, manifest: Manifest, spec: BaseModelSpec) -> str | None:
    """What a version was built for when it is not ``spec``'s base: "base <fingerprint>", "prompt
    format <...>" (the same weights, another tokenizer or chat template), or for a head "quantization
    <...>" (fitted on another quantization's features: its training record decides, since the manifest
    of a head published before training recorded them may say otherwise; AdapterError when that
    record cannot be read). None when it is built for it. Only a head's last check reads its files."""
    if manifest.base_fingerprint != spec.fingerprint:
        return f"base {manifest.base_fingerprint}"
    if prompt_formats_differ(manifest.base_prompt_format, spec.prompt_format):
        return f"prompt format {manifest.base_prompt_format} (this base: {spec.prompt_format})"
    if manifest.kind == "head" and (fitted := head_fitted_on(store, key, manifest)) != spec.quantization:
        return f"quantization {fitted} (this base: {spec.quantization})"
    return None


# --------------------------------------------------------------------------------- prompt adapters


def publish_prompt(
    store: Store,
    tenant: str,
    name: str,
    system: str,
    examples: Sequence[Mapping[str, str]],
    spec: BaseModelSpec,
    *,
    pii: str = "refuse",
) -> AdapterKey:
    """Publish a prompt-only version (system prompt + few-shot turns) through the store's atomic publish.

    The texts are scanned for PII like training data (`pii`: refuse, redact or allow).
    """
    template = parse_prompt_template({"system": system, "examples": [dict(e) for e in examples]})
    texts = [("system", template.system)] + [
        (f"examples[{i}].content", t.content) for i, t in enumerate(template.examples)
    ]
    report, texts = _prompt_pii(texts, pii)
    redacted = dict(texts)
    template = PromptTemplate(
        system=redacted["system"],
        examples=tuple(PromptTurn(t.role, redacted[f"examples[{i}].content"]) for i, t in enumerate(template.examples)),
    )
    return store.publish_prompt(tenant, name, template, spec, extra={"pii_scan": report.to_record()})


def _prompt_pii(texts: list[tuple[str, str]], mode: str) -> tuple[PiiReport, list[tuple[str, str]]]:
    if mode not in MODES:
        raise TrainingError(f"PII mode must be one of {MODES}, got {mode!r}")
    findings: list[Finding] = []
    out: list[tuple[str, str]] = []
    for field, text in texts:
        spans = detect(text)
        findings += [
            Finding(0, field, s.kind, s.start, s.end, mask_value(s.kind, text[s.start : s.end])) for s in spans
        ]
        if mode == "redact":
            text = redact_text(text, spans)
        out.append((field, text))
    report = PiiReport(examples_scanned=1, findings=tuple(findings), mode=mode)
    if findings and mode == "refuse":
        raise PiiFound(report)
    return report, out
