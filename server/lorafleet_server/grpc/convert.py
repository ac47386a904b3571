"""Protobuf ⇄ domain conversion. Generated types stop here."""

from __future__ import annotations

import base64
from typing import Any

from lorafleet_adapters.errors import InvalidAdapterRef
from lorafleet_adapters.manifest import Manifest
from lorafleet_adapters.ref import AdapterRef, check_ident
from lorafleet_proto.v1 import adapters_pb2, inference_pb2
from lorafleet_server.engine.admin import AdapterView, Tier
from lorafleet_server.engine.prompts import check_turn_count
from lorafleet_server.engine.types import (
    ChatTurn,
    ClassifyParams,
    FinishReason,
    GenerationRequest,
    LabelScore,
    ModelInfo,
    Principal,
    SamplingParams,
    Summary,
)
from lorafleet_server.errors import InvalidRequest

FINISH_REASONS = {
    FinishReason.LENGTH: inference_pb2.FINISH_REASON_LENGTH,
    FinishReason.STOP: inference_pb2.FINISH_REASON_STOP,
    FinishReason.END_OF_SEQUENCE: inference_pb2.FINISH_REASON_END_OF_SEQUENCE,
    FinishReason.CANCELLED: inference_pb2.FINISH_REASON_CANCELLED,
}

TIERS = {
    Tier.STORE: adapters_pb2.ADAPTER_TIER_STORE,
    Tier.HOST: adapters_pb2.ADAPTER_TIER_HOST,
    Tier.DEVICE: adapters_pb2.ADAPTER_TIER_DEVICE,
}


def adapter_ref(text: str) -> AdapterRef | None:
    return AdapterRef.parse(text) if text else None


def chat_turns(messages: Any) -> tuple[ChatTurn, ...]:
    """The request's turns, refused above MAX_CHAT_TURNS before any is built (on the event loop)."""
    check_turn_count(len(messages))
    return tuple(ChatTurn(role=m.role, content=m.content) for m in messages)


def sampling(params: inference_pb2.SamplingParams, default_max_new_tokens: int) -> SamplingParams:
    def opt(name: str, default: Any) -> Any:
        return getattr(params, name) if params.HasField(name) else default

    return SamplingParams(
        max_new_tokens=opt("max_new_tokens", default_max_new_tokens),
        temperature=float(opt("temperature", 0.0)),
        top_p=float(opt("top_p", 1.0)),
        top_k=int(opt("top_k", 0)),
        repetition_penalty=float(opt("repetition_penalty", 1.0)),
        seed=opt("seed", None),
        stop=tuple(params.stop),
        fit_context=not params.HasField("max_new_tokens"),
    )


def generation_request(
    request: inference_pb2.GenerateRequest | inference_pb2.GenerateStreamRequest,
    request_id: str,
    default_max_new_tokens: int,
    principal: Principal | None = None,
    *,
    stream: bool = False,
) -> GenerationRequest:
    """The engine's request; ``principal`` is the caller from its API key (never from the request);
    ``stream``: GenerateStream's."""
    if request.prompt and len(request.messages):
        raise InvalidRequest("set exactly one of prompt and messages")
    return GenerationRequest(
        request_id=request_id,
        prompt=request.prompt or None,
        messages=chat_turns(request.messages),
        adapter=adapter_ref(request.adapter),
        params=sampling(request.params, default_max_new_tokens),
        principal=principal,
        stream=stream,
    )


def check_text_or_messages(
    request: inference_pb2.TokenizeRequest | inference_pb2.EmbedRequest | inference_pb2.ClassifyRequest,
) -> None:
    """Tokenize, Embed and Classify take ``text`` or ``messages``: refused by those names (the engine's
    own check names a generation's ``prompt``)."""
    if bool(request.text) == bool(len(request.messages)):
        raise InvalidRequest("set exactly one of text and messages")


def embed_request(
    request: inference_pb2.EmbedRequest, request_id: str, principal: Principal | None = None
) -> GenerationRequest:
    check_text_or_messages(request)
    return GenerationRequest(
        request_id=request_id,
        prompt=request.text or None,
        messages=chat_turns(request.messages),
        adapter=adapter_ref(request.adapter),
        embed=True,
        principal=principal,
    )


def classify_request(
    request: inference_pb2.ClassifyRequest, request_id: str, principal: Principal | None = None
) -> GenerationRequest:
    check_text_or_messages(request)
    if not request.adapter:
        raise InvalidRequest("Classify needs 'adapter': the reference of a head adapter (tenant/name[@version])")
    return GenerationRequest(
        request_id=request_id,
        prompt=request.text or None,
        messages=chat_turns(request.messages),
        adapter=adapter_ref(request.adapter),
        embed=True,
        principal=principal,
        classify=ClassifyParams(top_k=int(request.top_k)),
    )


def classify_pb(labels: tuple[LabelScore, ...], summary: Summary) -> inference_pb2.ClassifyResponse:
    return inference_pb2.ClassifyResponse(
        labels=[inference_pb2.LabelScore(label=s.label, probability=s.probability) for s in labels],
        prompt_tokens=summary.prompt_tokens,
        adapter=summary.adapter,
    )


def summary_pb(s: Summary) -> inference_pb2.GenerationSummary:
    return inference_pb2.GenerationSummary(
        finish_reason=FINISH_REASONS[s.finish_reason],
        prompt_tokens=s.prompt_tokens,
        generated_tokens=s.generated_tokens,
        adapter=s.adapter,
        request_id=s.request_id,
    )


def model_info_pb(info: ModelInfo, adapter_slot_memory_bytes: int) -> inference_pb2.GetModelInfoResponse:
    """The static ``info`` plus the slot memory read at call time (it follows the loaded adapters)."""
    return inference_pb2.GetModelInfoResponse(
        model_id=info.model_id,
        fingerprint=info.fingerprint,
        quantization=info.quantization,
        device=info.device,
        dtype=info.dtype,
        max_context_tokens=info.max_context_tokens,
        max_lora_rank=info.max_lora_rank,
        max_new_tokens=info.max_new_tokens,
        max_batch_size=info.max_batch_size,
        max_loaded_adapters=info.max_loaded_adapters,
        max_message_bytes=info.max_message_bytes,
        target_modules=list(info.target_modules),
        server_version=info.server_version,
        adapter_slot_memory_bytes=adapter_slot_memory_bytes,
        dtype_reason=info.dtype_reason,
        compiled=info.compiled,
        torch_threads=info.torch_threads,
        cpu_features=info.cpu_features,
        linear_kernel=info.linear_kernel,
        prefill_threads=info.prefill_threads,
        attention_kernel=info.attention_kernel,
        lora_kernel=info.lora_kernel,
        native_threads=info.native_threads,
        layers_kernel=info.layers_kernel,
    )


def manifest_pb(m: Manifest) -> adapters_pb2.AdapterManifest:
    return adapters_pb2.AdapterManifest(
        kind=m.kind,
        method=m.method,
        base_fingerprint=m.base_fingerprint,
        base_model=m.base_model,
        base_quantization=m.base_quantization,
        rank=m.rank,
        lora_alpha=m.lora_alpha,
        use_rslora=m.use_rslora,
        target_modules=list(m.target_modules),
        files=dict(m.files),
        created_at=m.created_at,
        producer=m.producer,
        training_data_fingerprint=m.training_data_fingerprint or "",
        eval_metrics={k: float(v) for k, v in m.eval_metrics.items()},
    )


def page_token(last: tuple[str, str] | None) -> str:
    """ListAdapters' next_page_token after the adapter ``last`` (tenant, name); "" when none follows.
    Opaque to clients (base64), and a cursor, not an offset: adapters published between two pages
    neither repeat nor shift the rest."""
    if last is None:
        return ""
    return base64.urlsafe_b64encode(f"{last[0]}/{last[1]}".encode()).decode().rstrip("=")


def page_cursor(token: str) -> tuple[str, str] | None:
    """The (tenant, name) a page_token continues after; None for "" (the first page)."""
    if not token:
        return None
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode("ascii")
        tenant, name = text.split("/")
        return check_ident(tenant, "tenant"), check_ident(name, "adapter name")
    except (ValueError, InvalidAdapterRef):  # binascii.Error and UnicodeDecodeError are ValueErrors
        raise InvalidRequest("page_token is not a next_page_token this server returned") from None


def adapter_pb(view: AdapterView) -> adapters_pb2.Adapter:
    return adapters_pb2.Adapter(
        tenant=view.tenant,
        name=view.name,
        latest_version=view.latest or 0,
        versions=[
            adapters_pb2.AdapterVersion(
                version=v.version,
                manifest=manifest_pb(v.manifest),
                tier=TIERS[v.tier],
                pinned=v.pinned,
                active_requests=v.active_requests,
            )
            for v in view.versions
        ],
    )
