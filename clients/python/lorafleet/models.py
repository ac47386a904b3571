"""Typed domain values of the lorafleet API; callers never need the protobuf types."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["length", "stop", "end_of_sequence", "cancelled", "unspecified"]
AdapterTier = Literal["store", "host", "device", "unspecified"]


@dataclass(frozen=True)
class Sampling:
    """How tokens are chosen; None takes the server's default."""

    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    # a lone string is one stop string, as in OpenAI's API (not its characters); None is none, as there
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        stop: object = self.stop
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        elif isinstance(stop, bytes) or not isinstance(stop, Iterable):
            raise TypeError(f"stop must be a string or a sequence of strings, got {type(stop).__name__}")
        stop = tuple(stop)
        bad = [s for s in stop if not isinstance(s, str)]
        if bad:
            raise TypeError(f"stop must hold strings, got {type(bad[0]).__name__}")
        object.__setattr__(self, "stop", stop)


@dataclass(frozen=True)
class Message:
    """One chat turn; role is "system", "user" or "assistant"."""

    role: str
    content: str


@dataclass(frozen=True)
class Completion:
    """A finished generation and what it consumed."""

    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    generated_tokens: int
    # The concrete adapter that served the request, "tenant/name@version"; "" for the base model.
    adapter: str
    request_id: str
    # The replica that answered (its ``x-lorafleet-replica`` metadata); "" when the server sent none.
    replica: str = ""


@dataclass(frozen=True)
class Tokens:
    """Token ids the model sees for a text or chat, with their token strings."""

    ids: list[int]
    tokens: list[str]


@dataclass(frozen=True)
class Embedding:
    """Mean-pooled last hidden state of the input."""

    values: list[float]
    prompt_tokens: int
    adapter: str
    replica: str = ""  # the replica that answered, as in Completion
    request_id: str = ""  # the server's id of the call (x-request-id: the one given, else its own)


@dataclass(frozen=True)
class LabelScore:
    """One label of a classifier head with its probability."""

    label: str
    probability: float


@dataclass(frozen=True)
class Classification:
    """A head adapter's answer: labels with probabilities, most likely first."""

    labels: list[LabelScore]
    prompt_tokens: int
    adapter: str  # the concrete head version, "tenant/name@version"
    replica: str = ""  # the replica that answered, as in Completion
    request_id: str = ""  # the server's id of the call (x-request-id: the one given, else its own)

    @property
    def label(self) -> str:
        """The most likely label."""
        return self.labels[0].label


@dataclass(frozen=True)
class ModelInfo:
    """The base model and the server's limits."""

    model_id: str
    fingerprint: str
    quantization: str
    device: str
    dtype: str
    max_context_tokens: int
    max_lora_rank: int
    max_new_tokens: int
    max_batch_size: int
    max_loaded_adapters: int
    max_message_bytes: int
    target_modules: tuple[str, ...]
    server_version: str
    # Bytes the server's device slots hold for LoRA weights when it answered; follows the ranks of the
    # loaded adapters. 0 from servers that predate the field.
    adapter_slot_memory_bytes: int = 0
    # How the server computes: why `dtype`, torch.compile on or off, torch threads, the CPU's flags,
    # the base Linears' kernel, threads for prompt prefill, the attention and LoRA kernels, the native
    # kernels' shared helper threads ("", False, 0, "", "", 0, "", "", 0 from servers that predate the
    # fields).
    dtype_reason: str = ""
    compiled: bool = False
    torch_threads: int = 0
    cpu_features: str = ""
    linear_kernel: str = ""
    prefill_threads: int = 0
    attention_kernel: str = ""
    lora_kernel: str = ""
    native_threads: int = 0
    layers_kernel: str = ""


@dataclass(frozen=True)
class AdapterManifest:
    """The manifest an adapter version was published with."""

    kind: str
    method: str
    base_fingerprint: str
    base_model: str
    base_quantization: str
    rank: int
    lora_alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]
    files: Mapping[str, str]  # file name -> sha256
    created_at: str
    producer: str
    training_data_fingerprint: str
    eval_metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class AdapterVersionInfo:
    """One published version of an adapter and where it is held now."""

    version: int
    manifest: AdapterManifest | None
    tier: AdapterTier
    pinned: bool
    active_requests: int


@dataclass(frozen=True)
class AdapterLoad:
    """What LoadAdapter did: the concrete version it loaded and the tier that version is held in now."""

    adapter: str  # "tenant/name@version"
    tier: AdapterTier


@dataclass(frozen=True)
class AdapterUnload:
    """What UnloadAdapter did to the concrete version it resolved."""

    adapter: str  # "tenant/name@version"
    unloaded: bool  # False: requests still run on it; its slot is freed when the last one ends


@dataclass(frozen=True)
class AdapterInfo:
    """An adapter in the store with its versions."""

    tenant: str
    name: str
    latest_version: int
    versions: tuple[AdapterVersionInfo, ...]

    @property
    def ref(self) -> str:
        """The reference "tenant/name" (the latest version)."""
        return f"{self.tenant}/{self.name}"


@dataclass(frozen=True)
class UsageRow:
    """Requests and tokens of one tenant through one adapter version ("" for the base) in a window."""

    tenant: str
    adapter: str
    requests: int
    prompt_tokens: int
    generated_tokens: int


@dataclass(frozen=True)
class UsageReport:
    """The rows of a usage window and the window the server actually summed: [start, end) in UNIX
    seconds, widened to whole minutes (an open end is the end of the current minute, still counting).
    A billing poller asks for closed windows (``end`` a whole minute not after now) and starts the next
    at the returned ``end``: no minute is counted twice or missed."""

    start: int
    end: int
    rows: tuple[UsageRow, ...]


@dataclass(frozen=True)
class AdapterSwap:
    """An adapter that moved to a newly published version."""

    adapter: str
    from_version: int
    to_version: int


@dataclass(frozen=True)
class AdapterSwapFailure:
    """A newly published version that was refused; the previous one keeps serving."""

    adapter: str
    version: int
    error: str


@dataclass(frozen=True)
class RefreshResult:
    swaps: tuple[AdapterSwap, ...]
    failures: tuple[AdapterSwapFailure, ...]
