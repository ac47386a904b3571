"""Server configuration: one frozen dataclass, read from flags, environment and a TOML file here only.

Precedence: command-line flag > environment variable (``LORAFLEET_<FIELD>``) > ``--config`` file
(table ``[server]``) > default. Each field declares its flag's help in its metadata and its choices
as a ``Literal`` type, so the CLI, the environment and the file are all checked from one place.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import socket
import tomllib
import types
import typing
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from lorafleet_adapters.errors import AdapterError
from lorafleet_server.engine.types import EngineConfig
from lorafleet_server.model.options import AttentionKernel, LayersKernel, LinearKernel, LoraImpl, Quantization

if TYPE_CHECKING:
    from lorafleet_adapters.backend import StoreSettings

MiB = 1 << 20
GiB = 1 << 30

# The API keys' pepper: a secret, so on purpose not a ServerConfig field (a flag would show it in `ps`,
# a TOML file would keep it beside the rest of the configuration). Read here like every other setting.
KEYS_PEPPER_ENV = "LORAFLEET_KEYS_PEPPER"
CONFIG_ENV = "LORAFLEET_CONFIG"  # the --config file
# LORAFLEET_* variables that are not ServerConfig fields: read here, or by the Python client
# (clients/python), which may share the server's environment.
OTHER_ENV = frozenset({KEYS_PEPPER_ENV, CONFIG_ENV, "LORAFLEET_API_KEY", "LORAFLEET_TARGET"})

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
LogFormat = Literal["text", "json"]
ComputeDtype = Literal["device", "auto", "float32", "bfloat16"]


@dataclass(frozen=True)
class ServerConfig(EngineConfig):
    """Everything ``lorafleet serve`` reads. The engine's limits are inherited from ``EngineConfig``."""

    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=50051, metadata={"help": "gRPC port (0: any free port)"})
    metrics_port: int = field(
        default=9464,
        metadata={
            "help": "Prometheus metrics port (HTTP, on --metrics-host; 0: any free port); open while the model loads"
        },
    )
    metrics_host: str = field(
        default="",
        metadata={
            "help": "address the metrics port listens on (default: --host); e.g. 127.0.0.1 for a local scraper "
            "while the API listens on 0.0.0.0, or the reverse"
        },
    )
    metrics_adapter_residency: bool = field(
        default=False,
        metadata={
            "help": "export lorafleet_adapter_resident{adapter,tier} for routers: it names every tenant's "
            "adapters on the unauthenticated metrics port, so only where Prometheus and routers alone reach it"
        },
    )
    http_port: int = field(
        default=8000,
        metadata={"help": "OpenAI-compatible HTTP API port (same host, same engine and keys as gRPC; 0: off)"},
    )
    data_dir: Path = field(
        default=Path("data"), metadata={"help": "where the model cache and the default adapter store live"}
    )
    model: Path | None = field(
        default=None, metadata={"help": "Hugging Face causal-LM directory to serve (default: SmolLM2-135M-Instruct)"}
    )
    adapter_store: str | Path | None = field(
        default=None,
        metadata={"help": "adapter store: a local directory or s3://BUCKET/PREFIX (default: DATA_DIR/adapters)"},
    )
    s3_endpoint_url: str = field(
        default="",
        metadata={
            "help": "S3 endpoint of an s3:// adapter store, e.g. http://127.0.0.1:8333 "
            "(default: AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL, else AWS)"
        },
    )
    adapter_cache_dir: Path | None = field(
        default=None,
        metadata={
            "help": "local disk cache of verified versions read from an s3:// store (default: DATA_DIR/adapter-cache)"
        },
    )
    adapter_cache_bytes: int = field(
        default=2 * GiB, metadata={"help": "size bound of that disk cache (least recently used versions go first)"}
    )
    kernel_cache_dir: Path | None = field(
        default=None,
        metadata={
            "help": "where native kernels built for this CPU are kept (default: DATA_DIR/kernels); a build is named "
            "by its source, compiler, flags and CPU, so servers of different data dirs may share one directory"
        },
    )
    c_compiler: str | None = field(
        default=None,
        metadata={
            "help": "the C compiler that builds the native kernels, a name on the PATH or a path "
            "(default: $CC if set, else cc or gcc on the PATH)"
        },
    )
    keys_file: Path | None = field(
        default=None,
        metadata={
            "help": "API keys file, managed by `lorafleet keys` (default: DATA_DIR/keys.json; its pepper is "
            f"KEYS_FILE.pepper unless {KEYS_PEPPER_ENV} is set)"
        },
    )
    keys_poll_seconds: float = field(
        default=2.0,
        metadata={"help": "seconds between looks for changes of the keys file (new and revoked keys), > 0"},
    )
    insecure_no_auth: bool = field(
        default=False,
        metadata={
            "help": "serve without API keys on a non-loopback address (refused otherwise); ignored once the "
            "keys file has a key"
        },
    )
    tls_cert: Path | None = field(
        default=None, metadata={"help": "PEM certificate chain of the server: serve TLS (needs --tls-key)"}
    )
    tls_key: Path | None = field(default=None, metadata={"help": "PEM private key of --tls-cert"})
    tls_client_ca: Path | None = field(
        default=None,
        metadata={"help": "PEM CA certificates: require a client certificate signed by one of them (mTLS)"},
    )
    quantization: Quantization = field(
        default="auto", metadata={"help": "auto is NF4 on CUDA and none (unquantized, in --dtype) on CPU"}
    )
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    dtype: ComputeDtype = field(
        default="auto",
        metadata={
            "help": "compute dtype: auto is bf16 on CUDA, and on CPU bf16 where it has avx512_bf16/AMX and a "
            "bf16-vs-fp32 check of the model passes, else fp32; device is bf16 on CUDA and fp32 on CPU"
        },
    )
    compile: bool = field(
        default=False,
        metadata={"help": "torch.compile each decoder layer's norms and MLP (measured slower on CPU, so off)"},
    )
    max_loaded_adapters: int = field(default=32, metadata={"help": "device slots for adapters"})
    max_lora_rank: int = field(default=64, metadata={"help": "largest adapter rank accepted"})
    adapter_poll_seconds: float = field(
        default=5.0, metadata={"help": "seconds between looks for newly published adapter versions (0: off)"}
    )
    adapter_rescan_seconds: float = field(
        default=60.0,
        metadata={
            "help": "seconds between polls that read every watched adapter's latest pointer even though the "
            "store's publish marker did not change (pointers moved by hand or by a publisher that died)"
        },
    )
    host_cache_bytes: int = field(default=4 * GiB, metadata={"help": "host-memory adapter cache size"})
    max_adapter_bytes: int = field(default=1 * GiB, metadata={"help": "largest adapter file accepted"})
    default_max_new_tokens: int = field(
        default=256,
        metadata={"help": "max_new_tokens when a request leaves it unset (cut to the context its prompt leaves)"},
    )
    max_message_bytes: int = field(default=4 * MiB, metadata={"help": "largest gRPC message and HTTP request body"})
    lora_impl: LoraImpl = field(
        default="auto",
        metadata={
            "help": "multi-LoRA kernel: auto is the native C kernel (built at startup for this CPU, like "
            "--attention-kernel) for every step where it builds, else picked per module and step; gather is "
            "the readable reference"
        },
    )
    attention_kernel: AttentionKernel = field(
        default="auto",
        metadata={
            "help": "attention of decode and prompt tokens: native is a C kernel built at startup for this CPU "
            "with the system's C compiler (cached under data-dir/kernels), torch is torch's matmuls; auto is "
            "native on CPU where it builds, else torch"
        },
    )
    linear_kernel: LinearKernel = field(
        default="auto",
        metadata={
            "help": "base Linears of an unquantized model on CPU: native is a C kernel built at startup "
            "(like --attention-kernel) in bf16 on Intel AMX, else on AVX-512 BF16, in fp32 on AVX2 + FMA (or "
            "AVX-512); avx512 is the bf16 kernel's AVX-512 BF16 path even where AMX runs (to compare them); "
            "onednn is oneDNN's prepacked matmul, torch is F.linear; auto is the first that runs here in bf16 "
            "(without AMX: native unless onednn is timed 1.1x faster at startup), and in fp32 "
            "the fastest of native and onednn where timed faster than F.linear at startup"
        },
    )
    layers_kernel: LayersKernel = field(
        default="auto",
        metadata={
            "help": "decoder layers of a step: native runs them all in one C call (built at startup, like "
            "--attention-kernel) where the Linears, attention, multi-LoRA and layer glue are all native "
            "kernels and every adapted module of the step takes the native LoRA, python calls those kernels "
            "layer by layer; auto is native where it applies"
        },
    )
    linear_threads: int = field(
        default=0,
        metadata={
            "help": "threads of the native bf16 Linear: the engine's thread plus a pool of helpers, each pinned "
            "to a CPU of its own, which the step's native attention, multi-LoRA and layer glue share (0: every "
            "CPU the process may use; 1: no helpers)"
        },
    )
    torch_threads: int = field(default=0, metadata={"help": "torch intra-op threads (0: CPU cores - 1, at least 1)"})
    prefill_threads: int = field(
        default=0,
        metadata={
            "help": "the other torch thread count a step may run with, used only while it measures faster "
            "than --torch-threads for steps like it: steps of more than 64 tokens (prompt prefill) by "
            "seconds per token, decode steps per batch size (0: every CPU core; set it to --torch-threads "
            "to turn this off)"
        },
    )
    fixed_decode_threads: bool = field(
        default=False,
        metadata={
            "help": "decode steps (up to 64 tokens) always run on --torch-threads instead of measuring "
            "--prefill-threads too"
        },
    )
    drain_seconds: float = field(
        default=5.0,
        metadata={
            "help": "on SIGTERM, seconds to keep serving while health says NOT_SERVING, so load balancers "
            "move away before new requests are refused"
        },
    )
    shutdown_grace_seconds: float = field(
        default=10.0, metadata={"help": "how long in-flight requests may finish on shutdown"}
    )
    replica_id: str = field(
        default="",
        metadata={
            "help": "this replica's name, sent in every response as x-lorafleet-replica metadata "
            "(default: the hostname)"
        },
    )
    log_level: LogLevel = field(default="INFO", metadata={"help": "log level"})
    log_format: LogFormat = field(default="text", metadata={"help": "text, or json for one object per line"})

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def kernels_dir(self) -> Path:
        """Where native kernels built for this CPU are cached (model/native.py)."""
        return self.kernel_cache_dir if self.kernel_cache_dir is not None else self.data_dir / "kernels"

    @property
    def store_location(self) -> str:
        """``adapter_store`` as given (a directory or an s3:// URL), or the default directory."""
        return str(self.adapter_store) if self.adapter_store is not None else str(self.data_dir / "adapters")

    @property
    def store_root(self) -> Path:
        """The local store's root (meaningful only when the store is a local directory)."""
        return Path(self.store_location)

    @property
    def store_settings(self) -> StoreSettings:
        """Everything ``lorafleet_adapters.backend.open_store`` needs; checks the location's syntax."""
        from lorafleet_adapters.backend import StoreSettings

        return StoreSettings(
            location=self.store_location,
            s3_endpoint_url=self.s3_endpoint_url or None,
            cache_dir=self.adapter_cache_dir if self.adapter_cache_dir is not None else self.data_dir / "adapter-cache",
            cache_bytes=self.adapter_cache_bytes,
        )

    @property
    def keys_path(self) -> Path:
        return self.keys_file if self.keys_file is not None else self.data_dir / "keys.json"

    @property
    def replica_name(self) -> str:
        """``replica_id``, or the hostname when it is unset (a pod's name on Kubernetes)."""
        return self.replica_id or socket.gethostname()

    @property
    def metrics_address_host(self) -> str:
        """Where the metrics port listens: ``metrics_host``, or ``host`` when it is unset."""
        return self.metrics_host or self.host

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def engine(self) -> EngineConfig:
        """The engine's part, as its own value (the engine never sees the rest)."""
        return EngineConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(EngineConfig)})


TRUE_WORDS = ("true", "1")
FALSE_WORDS = ("false", "0")
EXPECTED: dict[type, str] = {bool: "true, false, 1 or 0", float: "a finite number"}  # what a bad value was not


def parse_bool(raw: object) -> bool:
    """A bool setting from a TOML bool, or from text (the environment): true/false/1/0, any case.
    Anything else is refused rather than guessed: ``bool("false")`` is True."""
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str):
        word = raw.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
    raise ValueError(f"expected true/false/1/0, got {raw!r}")


@dataclass(frozen=True)
class _FieldSpec:
    """How one ServerConfig field is parsed: its Python type, its choices, whether None is allowed."""

    name: str
    kind: type
    choices: tuple[str, ...] | None
    default: Any
    help: str

    def parse(self, raw: object) -> Any:
        """The field's value from a flag, an environment string or a TOML value. A TOML value must
        have the field's type (an int may be written for a float): ``port = 50051.5`` was truncated
        by ``int()`` and ``replica_id = true`` became the text "True"."""
        if self.kind is bool:
            return parse_bool(raw)
        text = isinstance(raw, str) or (self.kind is Path and isinstance(raw, Path))  # flags give a Path
        number = isinstance(raw, int) or (self.kind is float and isinstance(raw, float))
        if isinstance(raw, bool) or not (text or (number and self.kind in (int, float))):
            raise ValueError(f"a {type(raw).__name__} for a {self.kind.__name__}")
        value = self.kind(raw)
        if self.kind is float and not math.isfinite(value):  # inf seconds of drain: a stop that never ends
            raise ValueError("not a finite number")
        return value


def _field_specs() -> list[_FieldSpec]:
    hints = typing.get_type_hints(ServerConfig)
    specs = []
    for f in dataclasses.fields(ServerConfig):
        hint = hints[f.name]
        if isinstance(hint, types.UnionType):  # X | None
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        choices: tuple[str, ...] | None = None
        if typing.get_origin(hint) is Literal:
            choices = tuple(str(a) for a in typing.get_args(hint))
            hint = str
        if hint not in (str, int, float, Path, bool):
            raise TypeError(f"ServerConfig.{f.name}: unsupported type {hint!r}")
        specs.append(_FieldSpec(f.name, hint, choices, f.default, f.metadata.get("help", "")))
    return specs


def add_server_arguments(
    parser: argparse.ArgumentParser, exclude: Collection[str] = (), shown: Collection[str] | None = None
) -> None:
    """One flag per ServerConfig field, except the fields named in ``exclude`` (a subcommand whose own
    option has the same name, like ``keys create --max-waiting``; those fields then come from the
    environment, the file or the default). ``shown``: the fields a subcommand reads, the only ones its
    ``--help`` lists (every subcommand listed all ~55 of them); the others are still accepted, as the
    same settings from the environment or the file are."""
    if shown is None:
        group: argparse._ActionsContainer = parser
    else:
        group = parser.add_argument_group(
            "server settings",
            "the ones this command reads; it accepts every other `lorafleet serve` setting too (see "
            "`lorafleet serve --help`), as flags, LORAFLEET_<NAME> variables or --config",
        )
    group.add_argument("--config", type=Path, help="TOML file with a [server] table")
    for spec in _field_specs():
        if spec.name in exclude:
            continue
        env = "LORAFLEET_" + spec.name.upper()
        flag = "--" + spec.name.replace("_", "-")
        listed = shown is None or spec.name in shown
        if spec.kind is bool:  # a switch: given means true; unset (None) leaves env, file and default
            help_text = f"{spec.help} (env {env}=true|false|1|0; default {str(spec.default).lower()})"
            group.add_argument(
                flag,
                dest=spec.name,
                action="store_true",
                default=None,
                help=help_text if listed else argparse.SUPPRESS,
            )
            continue
        group.add_argument(
            flag,
            dest=spec.name,
            default=None,
            type=spec.kind,
            choices=spec.choices,
            help=f"{spec.help} (env {env}; default {spec.default})" if listed else argparse.SUPPRESS,
        )


def config_from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> ServerConfig:
    environ = os.environ if environ is None else environ
    config_path = getattr(args, "config", None) or environ.get(CONFIG_ENV)
    file_values = _read_config_file(Path(config_path)) if config_path else {}
    specs = _field_specs()
    unknown = set(file_values) - {s.name for s in specs}
    if unknown:
        names = ", ".join(_with_hint(name, [s.name for s in specs]) for name in sorted(unknown))
        raise ValueError(f"unknown keys in [server] of {config_path}: {names}")
    values: dict[str, Any] = {}
    for spec in specs:
        raw: Any = getattr(args, spec.name, None)
        if raw is None:
            raw = environ.get("LORAFLEET_" + spec.name.upper())
        if raw is None:
            raw = file_values.get(spec.name)
        if raw is None:
            continue
        try:
            value = spec.parse(raw)
        except (TypeError, ValueError):
            expected = EXPECTED.get(spec.kind, f"of type {spec.kind.__name__}")
            raise ValueError(f"{spec.name} must be {expected}, got {raw!r}") from None
        if spec.choices is not None and value not in spec.choices:
            raise ValueError(f"{spec.name} must be one of {', '.join(spec.choices)}, got {value!r}")
        values[spec.name] = value
    if "c_compiler" not in values and environ.get("CC"):  # the build tools' own variable, below ours
        values["c_compiler"] = environ["CC"]
    config = ServerConfig(**values)
    _check(config)
    return config


def _read_config_file(path: Path) -> dict[str, Any]:
    """The ``[server]`` table of a TOML file. A file that cannot be read, is not TOML, or holds anything
    besides that table (a misspelled ``[sever]`` whose settings would all be ignored) is refused."""
    try:
        with path.open("rb") as fh:
            document = tomllib.load(fh)
    except OSError as exc:
        raise ValueError(f"cannot read the config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"the config file {path} is not valid TOML: {exc}") from None
    others = sorted(set(document) - {"server"})
    if others:
        raise ValueError(f"the config file {path} may hold only a [server] table, it has: {', '.join(others)}")
    table = document.get("server", {})
    if not isinstance(table, dict):
        raise ValueError(f"server in the config file {path} must be a table ([server]), got {table!r}")
    return dict(table)


def _with_hint(name: str, known: Sequence[str], prefix: str = "") -> str:
    """``name``, with the known name it most likely misspells (compared without their common ``prefix``)."""
    close = difflib.get_close_matches(name.removeprefix(prefix), [k.removeprefix(prefix) for k in known], n=1)
    return f"{name} (did you mean {prefix}{close[0]}?)" if close else name


def unknown_environment(environ: Mapping[str, str] | None = None) -> list[str]:
    """``LORAFLEET_*`` variables that no setting reads, each with the name it most likely misspells:
    the server warns about them at start (a misspelled variable is otherwise silently ignored). Not
    refused: the environment is shared with other programs (the client reads ``LORAFLEET_TARGET``)."""
    environ = os.environ if environ is None else environ
    known = ["LORAFLEET_" + spec.name.upper() for spec in _field_specs()]
    read = {*known, *OTHER_ENV}
    unread = sorted(name for name in environ if name.startswith("LORAFLEET_") and name not in read)
    return [_with_hint(name, known, "LORAFLEET_") for name in unread]


def keys_pepper(environ: Mapping[str, str] | None = None) -> str | None:
    """The API keys' pepper from ``LORAFLEET_KEYS_PEPPER``, or None: then ``KEYS_FILE.pepper`` is used."""
    environ = os.environ if environ is None else environ
    return environ.get(KEYS_PEPPER_ENV) or None


def parse_config(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> ServerConfig:
    parser = argparse.ArgumentParser(prog="lorafleet serve")
    add_server_arguments(parser)
    return config_from_args(parser.parse_args(argv), environ)


def _check(c: ServerConfig) -> None:
    positive = (
        "max_loaded_adapters",
        "max_lora_rank",
        "max_batch_size",
        "max_seq_len",
        "max_new_tokens",
        "default_max_new_tokens",
        "max_waiting",
        "max_step_tokens",
        "max_message_bytes",
        "max_adapter_bytes",
    )
    for name in positive:
        if getattr(c, name) <= 0:
            raise ValueError(f"{name} must be > 0")
    for name in ("port", "metrics_port"):
        if not 0 <= getattr(c, name) <= 65535:
            raise ValueError(f"{name} must be in [0, 65535] (0: any free port)")
    if not 0 <= c.http_port <= 65535:
        raise ValueError("http_port must be in [0, 65535] (0: no HTTP API)")
    ports = [(name, getattr(c, name)) for name in ("port", "metrics_port", "http_port") if getattr(c, name)]
    for i, (name, port) in enumerate(ports):
        for other, other_port in ports[i + 1 :]:
            if port == other_port:  # the second listener failed after the model had loaded
                raise ValueError(f"{name} and {other} are both {port}: each needs a port of its own")
    for name in ("drain_seconds", "shutdown_grace_seconds", "adapter_poll_seconds", "adapter_rescan_seconds"):
        if not getattr(c, name) >= 0:
            raise ValueError(f"{name} must be >= 0")
    if not c.keys_poll_seconds > 0:
        raise ValueError("keys_poll_seconds must be > 0")
    if (c.tls_cert is None) != (c.tls_key is None):
        raise ValueError("tls_cert and tls_key go together: give both to serve TLS, or neither")
    if c.tls_client_ca is not None and c.tls_cert is None:
        raise ValueError("tls_client_ca (client certificates, mTLS) needs tls_cert and tls_key as well")
    for name in ("max_waiting_per_tenant", "max_running_per_tenant"):  # a negative one stalled every tenant
        if getattr(c, name) < 0:
            raise ValueError(f"{name} must be >= 0 (0: no limit)")
    if c.host_cache_bytes < 0:
        raise ValueError("host_cache_bytes must be >= 0")
    if not (c.replica_id.isascii() and c.replica_id.isprintable()) or " " in c.replica_id:
        # it goes out in every call's metadata: anything else made every call fail INTERNAL
        raise ValueError(f"replica_id must be printable ASCII without spaces, got {c.replica_id[:80]!r}")
    if c.torch_threads < 0:
        raise ValueError("torch_threads must be >= 0 (0: automatic)")
    if c.prefill_threads < 0:
        raise ValueError("prefill_threads must be >= 0 (0: every CPU core)")
    if c.linear_threads < 0:
        raise ValueError("linear_threads must be >= 0 (0: every CPU)")
    if c.default_max_new_tokens > c.max_new_tokens:
        raise ValueError("default_max_new_tokens must not exceed max_new_tokens")
    if c.adapter_cache_bytes <= 0:
        raise ValueError("adapter_cache_bytes must be > 0")
    if c.prefix_cache_bytes < 0:
        raise ValueError("prefix_cache_bytes must be >= 0 (0: no prefix cache)")
    if c.burst_wait_ms < 0:
        raise ValueError("burst_wait_ms must be >= 0 (0: no wait)")
    try:
        c.store_settings  # noqa: B018 - validates the store URL and the endpoint URL
    except AdapterError as exc:
        raise ValueError(str(exc)) from None
