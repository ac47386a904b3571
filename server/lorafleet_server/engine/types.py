"""The engine's vocabulary: plain dataclasses, no protobuf."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Literal, Protocol

from lorafleet_adapters.ref import AdapterRef

# The order in which prefilling rows get a step's prompt budget (Engine._prefill_queue).
PrefillOrder = Literal["shortest", "arrival"]
PrefixCacheScope = Literal["tenant", "shared"]
# Turns a chat may have: each edge refuses more before it builds a ChatTurn of any (a 4 MiB request of
# 125,000 empty turns cost ~0.7 s of the event loop both edges' streams share, before the length check).
MAX_CHAT_TURNS = 1024


class FinishReason(enum.Enum):
    LENGTH = "length"
    STOP = "stop"
    END_OF_SEQUENCE = "end_of_sequence"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class EngineConfig:
    """The engine's limits. ``ServerConfig`` extends this class, so each limit is declared once; the
    ``help`` metadata becomes the flag's help text (config.py)."""

    max_batch_size: int = field(default=32, metadata={"help": "running requests (and KV-cache rows) at most"})
    max_seq_len: int = field(default=2048, metadata={"help": "prompt plus generated tokens per request"})
    max_new_tokens: int = field(default=1024, metadata={"help": "limit on a request's max_new_tokens"})
    max_waiting: int = field(default=1024, metadata={"help": "queued requests before RESOURCE_EXHAUSTED"})
    max_waiting_per_tenant: int = field(
        default=0,
        metadata={"help": "requests of one tenant waiting for a row before RESOURCE_EXHAUSTED (0: no limit)"},
    )
    max_running_per_tenant: int = field(
        default=0, metadata={"help": "running requests of one tenant at most; more wait their turn (0: no limit)"}
    )
    max_step_tokens: int = field(
        default=256,
        metadata={
            "help": "tokens per forward (decode rows plus prefill chunks): smaller gives first tokens and running "
            "streams sooner under a burst, larger costs fewer steps' fixed overhead"
        },
    )
    prefill_order: PrefillOrder = field(
        default="shortest",
        metadata={
            "help": "which prompts a step's prefill budget goes to first: shortest (fewest tokens left, aged so "
            "none starves) or arrival (admission order)"
        },
    )
    burst_wait_ms: int = field(
        default=50,
        metadata={
            "help": "an idle engine waits this long at most for the rest of a burst before its first step "
            "(it stops after 5 ms without a new request; 0: start at once)"
        },
    )
    prefix_cache_bytes: int = field(
        default=512 << 20,
        metadata={
            "help": "memory for K/V of prompt prefixes reused per adapter version (LRU, bytes; 0: no prefix cache)"
        },
    )
    prefix_cache_scope: PrefixCacheScope = field(
        default="tenant",
        metadata={
            "help": "who shares the base model's (and prompt adapters') cached prefixes: tenant (each tenant its "
            "own: no tenant can time whether another sent a prompt) or shared (every tenant, more hits)"
        },
    )


@dataclass(frozen=True)
class ModelInfo:
    """What GetModelInfo reports: the served model, how it runs, and the limits a client must respect.

    Fixed when the service is built. GetModelInfo adds the one value that moves, the adapter slot
    memory, read at call time (``Service.slot_memory_bytes``).
    """

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
    dtype_reason: str = ""  # why this compute dtype (model/loader.py choose_compute_dtype)
    compiled: bool = False  # decoder layers torch.compile'd
    torch_threads: int = 0  # intra-op threads of the compute
    cpu_features: str = ""  # reported CPU flags, e.g. "avx2,avx512f,avx512_bf16"
    linear_kernel: str = "torch"  # base Linears: "native-amx", "native-avx512", "native-fp32", "onednn-packed", "torch"
    prefill_threads: int = 0  # the other count, for steps where it is faster (model/threads.py); = torch_threads: off
    attention_kernel: str = "torch"  # every token's attention: "native" (model/native.py) or "torch"
    lora_kernel: str = "torch"  # multi-LoRA: "native" (the C kernel where it applies) or "torch" (model/lora.py)
    native_threads: int = 0  # the native kernels' shared helper pool (model/native.py NativePool); 0: none
    layers_kernel: str = "python"  # a step's layers: "native" (one C call, model/native_layers.py) or "python"


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # max_new_tokens is the server's default, not the caller's: a prompt that leaves less of the
    # context is not refused for it; generation stops at the context's end (finish reason length).
    fit_context: bool = False


@dataclass(frozen=True)
class ChatTurn:
    role: str
    content: str


@dataclass(frozen=True)
class Principal:
    """Who is calling, from an authenticated API key (the gRPC edge builds it; never from the request).

    ``weight`` is the tenant's share in fair admission; ``max_waiting`` / ``max_running`` override the
    per-tenant limits for this key's tenant when set.
    """

    key_id: str
    tenant: str
    role: Literal["tenant", "admin"]
    weight: float = 1.0
    max_waiting: int | None = None
    max_running: int | None = None


@dataclass(frozen=True)
class ClassifyParams:
    """A Classify request: run the head adapter on the pooled features; ``top_k`` labels (0: all)."""

    top_k: int = 0


@dataclass(frozen=True)
class LabelScore:
    label: str
    probability: float


@dataclass(frozen=True)
class GenerationRequest:
    """A generation (or, with ``embed``, a pooled-hidden-state; with ``classify`` also, a head) request."""

    request_id: str
    prompt: str | None = None
    messages: tuple[ChatTurn, ...] = ()
    adapter: AdapterRef | None = None
    params: SamplingParams = field(default_factory=lambda: SamplingParams(max_new_tokens=1))
    embed: bool = False
    principal: Principal | None = None  # None when the server runs without keys
    classify: ClassifyParams | None = None  # set (with embed) for Classify: the adapter is a head
    # The caller reads tokens as they come (GenerateStream, stream: true). Cut by a server's stop after
    # some came, it is not retried (a proxy retries only what sent nothing), so it is metered.
    stream: bool = False

    def __post_init__(self) -> None:
        if self.classify is not None and not self.embed:
            raise ValueError("a classify request is an embed request (a forward without decoding)")

    @property
    def tenant(self) -> str:
        """Whose request this is, for fair share and limits: the key's tenant; without keys, the
        adapter's tenant ("" for the base model)."""
        if self.principal is not None:
            return self.principal.tenant
        return self.adapter.tenant if self.adapter is not None else ""


@dataclass(frozen=True)
class Summary:
    finish_reason: FinishReason
    prompt_tokens: int
    generated_tokens: int
    adapter: str  # concrete "tenant/name@version", "" for the base
    request_id: str
    queue_seconds: float = 0.0
    ttft_seconds: float | None = None
    total_seconds: float = 0.0


@dataclass(frozen=True)
class TokenEvent:
    """What the engine tells a request's consumer. Exactly one of the three kinds per event."""

    text: str = ""  # newly decoded text
    token_ids: tuple[int, ...] = ()
    summary: Summary | None = None  # set on the last event of a finished request
    embedding: tuple[float, ...] | None = None  # set (with summary) for an embed request
    labels: tuple[LabelScore, ...] | None = None  # set (with summary) for a classify request, most likely first
    error: Exception | None = None  # set on the last event of a failed request

    @property
    def final(self) -> bool:
        return self.summary is not None or self.error is not None


class EngineObserver(Protocol):
    """What the engine reports as it runs (metrics implement it; the default ignores it)."""

    def observe_step(self, rows: int, tokens: int) -> None: ...
    def observe_admitted(self, queue_seconds: float, prompt_tokens: int) -> None: ...
    def observe_first_token(self, ttft_seconds: float) -> None: ...
    def observe_generated(self, tokens: int) -> None: ...
    def observe_left_queue(self, queue_seconds: float) -> None: ...
    def observe_finished(self, summary: Summary, pooled: bool = False, admitted: bool = True) -> None: ...
    def observe_preempted(self) -> None: ...


class NullObserver:
    def observe_step(self, rows: int, tokens: int) -> None:
        return None

    def observe_admitted(self, queue_seconds: float, prompt_tokens: int) -> None:
        return None

    def observe_first_token(self, ttft_seconds: float) -> None:
        return None

    def observe_generated(self, tokens: int) -> None:
        return None

    def observe_left_queue(self, queue_seconds: float) -> None:
        return None

    def observe_finished(self, summary: Summary, pooled: bool = False, admitted: bool = True) -> None:
        return None

    def observe_preempted(self) -> None:
        return None
