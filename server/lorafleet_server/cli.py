"""The ``lorafleet`` command: serve, prepare the model, manage the adapter store and API keys, call a server."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.util
import json
import logging
import math
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from lorafleet_adapters.backend import Store, open_store
from lorafleet_adapters.errors import AdapterError, InvalidAdapterRef
from lorafleet_adapters.ref import AdapterRef, check_ident
from lorafleet_server.config import (
    ServerConfig,
    add_server_arguments,
    config_from_args,
    keys_pepper,
    unknown_environment,
)
from lorafleet_server.errors import ModelLoadError, StartupError
from lorafleet_server.logs import setup_logging
from lorafleet_server.tenants.errors import TenantsError
from lorafleet_server.tenants.keys import (
    ROLES,
    PepperSource,
    create_key,
    format_timestamp,
    parse_duration,
    read_key_file,
    revoke_key,
)

if TYPE_CHECKING:
    from lorafleet_adapters.peft_format import BaseModelSpec

log = logging.getLogger(__name__)


def _serve(config: ServerConfig) -> int:
    from prometheus_client import CollectorRegistry

    from lorafleet_server.app import build_service
    from lorafleet_server.gc_freeze import freeze_startup_heap
    from lorafleet_server.grpc.server import Edge, ServerKeys, check_startup, open_metrics, serve_forever
    from lorafleet_server.http.server import HttpServer
    from lorafleet_server.metrics import Metrics
    from lorafleet_server.model.native import NativeKernelError

    check_startup(config)  # StartupError before minutes of model loading, not after
    metrics = Metrics(CollectorRegistry())
    # Open while the model loads: scrapes answer (lorafleet_ready 0), so a long load is not "down".
    metrics_server = open_metrics(config, metrics)
    log.info(
        "metrics on http://%s:%d/metrics; loading the model",
        config.metrics_address_host,
        metrics_server.port,
    )
    try:
        service = build_service(config, metrics)
    except NativeKernelError as exc:  # a kernel asked for by name (``native``) cannot run here
        metrics_server.stop()
        raise StartupError(f"native kernel: {exc}") from exc
    except BaseException:
        metrics_server.stop()
        raise
    log.info("garbage collector: %s", freeze_startup_heap())  # the process's startup heap: it stays

    def edges(keys: ServerKeys) -> list[Edge]:  # the OpenAI-compatible API, unless --http-port 0
        return [HttpServer(service, keys, config.host, config.http_port)] if config.http_port else []

    try:
        asyncio.run(serve_forever(service, edges, metrics_server))
    except BaseException:  # a start that failed after the load (a port taken meanwhile): close it too
        metrics_server.stop()
        raise
    return 0


def _model_dir(config: ServerConfig) -> Path:
    from lorafleet_server.app import model_dir_for

    return model_dir_for(config)


def _prepare(config: ServerConfig) -> int:
    from lorafleet_server.model.prepare import weights_fingerprint

    model_dir = _model_dir(config)
    print(json.dumps({"model_dir": str(model_dir), "fingerprint": weights_fingerprint(model_dir)}))
    return 0


def _base_spec(config: ServerConfig) -> BaseModelSpec:
    from lorafleet_server.model.loader import base_spec_from_files, resolve_device, resolve_quantization

    quant = resolve_quantization(config.quantization, resolve_device(config.device))
    return base_spec_from_files(_model_dir(config), quant, config.max_lora_rank, config.max_adapter_bytes)


def _open_store(config: ServerConfig, override: str | Path | None = None, *, create: bool = True) -> Store:
    """The configured store (or ``override``: a directory or s3:// URL), reachable, or StoreUnavailable.
    A command that only reads passes ``create=False``: a mistyped directory is an error, not a new store."""
    # A one-off command caches in a temporary directory: the configured one belongs to the server,
    # which keeps its sizes in memory and clears its downloads in progress when it opens it.
    settings = dataclasses.replace(config.store_settings, cache_dir=None)
    if override is not None:
        settings = dataclasses.replace(settings, location=str(override))
    store = open_store(settings)
    store.check(create=create)
    return store


def _adapters_import(config: ServerConfig, src: Path, reference: str) -> int:
    ref = AdapterRef.parse(reference)
    if ref.version is not None:
        raise AdapterError("versions are assigned at import; give tenant/name without @version")
    from lorafleet_adapters.head import HEAD_RECORD_FILE as TRAINING_RECORD  # `train` writes the same name

    if (Path(src) / TRAINING_RECORD).is_file():  # import would skip publish's gates and drop the record
        raise AdapterError(
            f"{src} is the output of `lorafleet train` ({TRAINING_RECORD}): publish it with `lorafleet publish "
            f"{src}`, which checks its held-out loss and forgetting and keeps its record for `retrain` "
            "(`--max-forgetting inf` publishes it past the forgetting gate)"
        )
    key = _open_store(config).import_peft(src, ref.tenant, ref.name, _base_spec(config))
    print(f"published {key}")
    return 0


def _adapters_list(config: ServerConfig, tenant: str | None) -> int:
    for s in _open_store(config, create=False).list(tenant):
        versions = ",".join(str(v) for v in s.versions)
        print(f"{s.tenant}/{s.name}\tlatest={s.latest}\tversions={versions}")
    return 0


def _keys_create(config: ServerConfig, args: argparse.Namespace) -> int:
    """The new key goes alone on stdout's last line (scripts take ``tail -n 1``); everything about it
    goes to stderr. It is shown this once: only its HMAC is stored."""
    now = datetime.now(UTC)
    expires = None if args.expires_in is None else now.replace(microsecond=0) + args.expires_in
    new = create_key(
        config.keys_path,
        PepperSource(config.keys_path, keys_pepper()),
        tenant=args.tenant,
        role=args.role,
        now=now,
        expires=expires,
        weight=args.weight,
        max_waiting=args.key_max_waiting,
        max_running=args.key_max_running,
    )
    record = new.record
    until = "never" if record.expires is None else format_timestamp(record.expires)
    print(
        f"created API key {record.key_id} for tenant {record.tenant} (role {record.role}, expires {until}) "
        f"in {config.keys_path}\nit is shown once, on stdout; store it now (only its HMAC is kept)",
        file=sys.stderr,
    )
    try:
        print(new.key, flush=True)
    except OSError as exc:  # nobody received it (a full disk, a closed pipe): it must not stay active
        revoke_key(config.keys_path, record.key_id, datetime.now(UTC))
        print(f"error: the key could not be written to stdout ({exc}); key {record.key_id} is revoked", file=sys.stderr)
        return 1
    return 0


def _keys_list(config: ServerConfig, as_json: bool) -> int:
    """Ids, tenants, roles, times, status and limits; never a secret or an HMAC (and no pepper needed)."""
    now = datetime.now(UTC)
    rows = [record.describe(now) for record in read_key_file(config.keys_path).records]
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    if rows:
        columns = list(rows[0])
        print("\t".join(columns))
        for row in rows:
            print("\t".join("-" if row[c] is None else str(row[c]) for c in columns))
    return 0


def _keys_revoke(config: ServerConfig, key_id: str) -> int:
    record, revoked_now = revoke_key(config.keys_path, key_id, datetime.now(UTC))
    assert record.revoked is not None
    when = format_timestamp(record.revoked)
    if revoked_now:
        print(f"revoked API key {record.key_id} (tenant {record.tenant}) at {when}")
    else:
        print(f"API key {record.key_id} (tenant {record.tenant}) was already revoked at {when}; nothing changed")
    return 0


def _keys(config: ServerConfig, args: argparse.Namespace) -> int:
    try:
        if args.keys_command == "create":
            return _keys_create(config, args)
        if args.keys_command == "list":
            return _keys_list(config, args.json)
        return _keys_revoke(config, args.key_id)
    except OSError as exc:  # e.g. an unwritable data directory: a clear line, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _duration_arg(text: str) -> timedelta:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _weight_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid weight {text!r}: expected a number > 0") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"invalid weight {text!r}: expected a finite number > 0")
    return value


def _limit_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid limit {text!r}: expected an integer > 0") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"invalid limit {text!r}: expected an integer > 0")
    return value


def _tenant_arg(text: str) -> str:
    try:
        return check_ident(text, "tenant")
    except InvalidAdapterRef as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_keys_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = sub.add_parser("keys", help="API keys: create, list, revoke (the keys file, default DATA_DIR/keys.json)")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser(
        "create", help="create a key; prints it alone on the last line of stdout, once (only its HMAC is stored)"
    )
    create.add_argument("--tenant", required=True, type=_tenant_arg, help="tenant name (the adapter tenant rule)")
    create.add_argument("--role", required=True, choices=ROLES, help="what the key may do once keys are enforced")
    create.add_argument(
        "--expires-in",
        type=_duration_arg,
        default=None,
        metavar="DURATION",
        help="lifetime, e.g. 30d, 12h, 90m, 3600s (default: never)",
    )
    create.add_argument(
        "--weight", type=_weight_arg, default=None, metavar="W", help="fair-share weight, > 0 (default: 1)"
    )
    create.add_argument(
        "--max-waiting",
        dest="key_max_waiting",
        metavar="N",
        type=_limit_arg,
        default=None,
        help="its tenant's requests waiting for a row at most (the smallest any active key of the tenant sets applies; "
        "default: none)",
    )
    create.add_argument(
        "--max-running",
        dest="key_max_running",
        metavar="N",
        type=_limit_arg,
        default=None,
        help="its tenant's running requests at most (the smallest any active key of the tenant sets applies; "
        "default: none)",
    )
    add_server_arguments(create, exclude=("max_waiting",), shown=KEYS_SETTINGS)
    lst = keys_sub.add_parser("list", help="list keys (never their secrets or hashes)")
    lst.add_argument("--json", action="store_true", help="one JSON array instead of tab-separated lines")
    add_server_arguments(lst, shown=KEYS_SETTINGS)
    revoke = keys_sub.add_parser("revoke", help="revoke a key by its id (revoking twice is fine)")
    revoke.add_argument("key_id", help="the key's id, as `lorafleet keys list` shows it")
    add_server_arguments(revoke, shown=KEYS_SETTINGS)


TRAINING_COMMANDS = ("train", "publish", "publish-prompt", "retrain")
CLIENT_COMMANDS = ("generate", "classify")  # handed to the Python client's CLI
TRAIN_EXTRA_HINT = "pip install './proto/python' '.[train]' from the repository (or lorafleet[train] from an index)"


def _training_cli() -> ModuleType:
    """The training package's CLI, imported only for training commands (serving never imports it)."""
    try:
        from lorafleet_training import cli as training
    except ImportError as exc:
        raise SystemExit(f"error: this lorafleet install has no training support ({exc}); {TRAIN_EXTRA_HINT}") from None
    return training


def _require_train_extra(command: str) -> None:
    missing = [name for name in ("peft",) if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(
            f"error: `lorafleet {command}` needs the training extra ({', '.join(missing)} not installed): "
            + TRAIN_EXTRA_HINT
        )


def _training(args: argparse.Namespace, config: ServerConfig) -> int:
    training = _training_cli()
    spec = _base_spec(config)
    publishes = args.command in ("train", "publish", "publish-prompt")  # retrain and stale read first
    store = _open_store(config, getattr(args, "store", None), create=publishes)
    if args.command == "train":
        return int(training.run_train(args, spec, _model_dir(config), store, device=config.device, dtype=config.dtype))
    if args.command == "retrain":
        return int(
            training.run_retrain(args, store, spec, _model_dir(config), device=config.device, dtype=config.dtype)
        )
    if args.command == "publish":
        return int(training.run_publish(args, store, spec))
    if args.command == "publish-prompt":
        return int(training.run_publish_prompt(args, store, spec))
    return int(training.run_stale(args, store, spec))


def _forward_generate(argv: list[str]) -> int:
    """Calling a server is the client's job: ``lorafleet generate ...`` runs ``lorafleet-client generate
    ...`` (the lorafleet-client distribution) in this process's place; the server imports none of it."""
    if importlib.util.find_spec("lorafleet") is None:
        print(
            f"error: `lorafleet {argv[0]}` runs the Python client's CLI, which is not installed: "
            f"pip install ./proto/python ./clients/python, then `lorafleet-client {argv[0]} ...`",
            file=sys.stderr,
        )
        return 2
    os.execv(sys.executable, [sys.executable, "-m", "lorafleet", *argv])
    return 0  # not reached: execv replaces this process


# The server settings each kind of subcommand reads, the ones its --help lists (it accepts all).
LOG_SETTINGS = ("log_level", "log_format")
KEYS_SETTINGS = ("data_dir", "keys_file", *LOG_SETTINGS)
STORE_SETTINGS = ("data_dir", "adapter_store", "s3_endpoint_url", *LOG_SETTINGS)
MODEL_SETTINGS = ("model", "quantization", "device", "max_lora_rank", "max_adapter_bytes")
BASE_SETTINGS = (*STORE_SETTINGS, *MODEL_SETTINGS)  # the store, and the base its adapters are checked against
TRAIN_SETTINGS = (*BASE_SETTINGS, "dtype")  # and the compute dtype a head's features are computed in


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole CLI. A training command's options are added only when that command runs (building
    them imports the training package, which serving never does)."""
    parser = argparse.ArgumentParser(prog="lorafleet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a LoRA adapter on a customer's JSONL data (extra: train)")
    publish = sub.add_parser("publish", help="verify a trained adapter and publish it into the store")
    publish_prompt = sub.add_parser("publish-prompt", help="publish a prompt adapter (system prompt + examples)")
    retrain = sub.add_parser(
        "retrain", help="retrain stale adapters on this base; publish those at least as good (extra: train)"
    )
    if command in TRAINING_COMMANDS:
        training = _training_cli()
        if command == "train":
            _require_train_extra(command)
            training.add_train_arguments(train)
            add_server_arguments(train, shown=TRAIN_SETTINGS)
        elif command == "publish":
            training.add_publish_arguments(publish)
            add_server_arguments(publish, shown=BASE_SETTINGS)
        elif command == "retrain":
            _require_train_extra(command)
            training.add_retrain_arguments(retrain)
            add_server_arguments(retrain, shown=TRAIN_SETTINGS)
        else:
            training.add_publish_prompt_arguments(publish_prompt)
            add_server_arguments(publish_prompt, shown=BASE_SETTINGS)
    serve = sub.add_parser("serve", help="start the gRPC server")
    add_server_arguments(serve)
    prepare = sub.add_parser("prepare-model", help="convert the default model to its safetensors cache")
    add_server_arguments(prepare, shown=("data_dir", "model", *LOG_SETTINGS))
    adapters = sub.add_parser("adapters", help="the adapter store")
    adapters_sub = adapters.add_subparsers(dest="adapters_command", required=True)
    imp = adapters_sub.add_parser("import", help="verify a PEFT adapter directory and publish it")
    imp.add_argument("src", type=Path, help="PEFT adapter directory (adapter_config.json + safetensors)")
    imp.add_argument("reference", help="tenant/name")
    add_server_arguments(imp, shown=BASE_SETTINGS)
    lst = adapters_sub.add_parser("list", help="list adapters and versions in the store")
    lst.add_argument("--tenant", default=None)
    add_server_arguments(lst, shown=STORE_SETTINGS)
    stale = adapters_sub.add_parser("stale", help="list adapters built for another base than the server's")
    stale.add_argument(
        "--store", default=None, help="adapter store: a directory or s3://BUCKET/PREFIX (default: the server's)"
    )
    add_server_arguments(stale, shown=BASE_SETTINGS)
    _add_keys_parser(sub)
    sub.add_parser("generate", help="call a running server (runs `lorafleet-client generate`)", add_help=False)
    sub.add_parser("classify", help="classify with a head adapter (runs `lorafleet-client classify`)", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in CLIENT_COMMANDS:
        return _forward_generate(argv)
    parser = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    setup_logging(config.log_level, config.log_format)
    for name in unknown_environment():
        log.warning("ignoring %s: no setting reads it", name)
    try:
        if args.command == "serve":
            return _serve(config)
        if args.command == "prepare-model":
            return _prepare(config)
        if args.command == "keys":
            return _keys(config, args)
        if args.command in TRAINING_COMMANDS or args.adapters_command == "stale":
            return _training(args, config)
        if args.adapters_command == "import":
            return _adapters_import(config, args.src, args.reference)
        return _adapters_list(config, args.tenant)
    except StartupError as exc:  # the server must not start as configured (TLS files, keys, address)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (AdapterError, TenantsError, ModelLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a path that cannot be read or written (a --model or --data-dir that is wrong)
        print(f"error: {exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
