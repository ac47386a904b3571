"""Conversions between the domain dataclasses (lorafleet.models) and the lorafleet.v1 protos."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from lorafleet.models import (
    AdapterInfo,
    AdapterLoad,
    AdapterManifest,
    AdapterSwap,
    AdapterSwapFailure,
    AdapterTier,
    AdapterUnload,
    AdapterVersionInfo,
    Classification,
    Completion,
    Embedding,
    FinishReason,
    LabelScore,
    Message,
    ModelInfo,
    RefreshResult,
    Sampling,
    Tokens,
    UsageReport,
    UsageRow,
)
from lorafleet_proto.v1 import adapters_pb2 as apb
from lorafleet_proto.v1 import inference_pb2 as ipb
from lorafleet_proto.v1 import usage_pb2 as upb

_FINISH_REASONS: dict[ipb.FinishReason, FinishReason] = {
    ipb.FINISH_REASON_UNSPECIFIED: "unspecified",
    ipb.FINISH_REASON_LENGTH: "length",
    ipb.FINISH_REASON_STOP: "stop",
    ipb.FINISH_REASON_END_OF_SEQUENCE: "end_of_sequence",
    ipb.FINISH_REASON_CANCELLED: "cancelled",
}
_FINISH_REASON_VALUES: dict[FinishReason, ipb.FinishReason] = {name: value for value, name in _FINISH_REASONS.items()}


def tokenize_request(text: str | None, messages: Sequence[Message] | None) -> ipb.TokenizeRequest:
    check_one_input(text, messages, "text")
    return ipb.TokenizeRequest(text=text or "", messages=messages_to_proto(messages or ()))


def embed_request(text: str | None, messages: Sequence[Message] | None, adapter: str | None) -> ipb.EmbedRequest:
    check_one_input(text, messages, "text")
    return ipb.EmbedRequest(text=text or "", messages=messages_to_proto(messages or ()), adapter=adapter_field(adapter))


def classify_request(
    text: str | None, messages: Sequence[Message] | None, adapter: str, top_k: int
) -> ipb.ClassifyRequest:
    check_one_input(text, messages, "text")
    return ipb.ClassifyRequest(
        text=text or "",
        messages=messages_to_proto(messages or ()),
        adapter=adapter_field(adapter),
        top_k=check_wire_int("top_k", top_k, 0, UINT32_MAX),
    )


def usage_request(start: float, end: float | None, tenant: str) -> upb.GetUsageRequest:
    """``end`` None: now (0 on the wire)."""
    return upb.GetUsageRequest(start_unix_seconds=int(start), end_unix_seconds=int(end or 0), tenant=tenant)


_TIERS: dict[apb.AdapterTier, AdapterTier] = {
    apb.ADAPTER_TIER_UNSPECIFIED: "unspecified",
    apb.ADAPTER_TIER_STORE: "store",
    apb.ADAPTER_TIER_HOST: "host",
    apb.ADAPTER_TIER_DEVICE: "device",
}
_TIER_VALUES: dict[AdapterTier, apb.AdapterTier] = {name: value for value, name in _TIERS.items()}

_Request = TypeVar("_Request", ipb.GenerateRequest, ipb.GenerateStreamRequest)


def check_one_input(text: str | None, messages: Sequence[Message] | None, text_name: str) -> None:
    """Raises ValueError unless exactly one of text and messages is given."""
    if (text is None) == (messages is None):
        raise ValueError(f"give exactly one of {text_name} and messages")


def finish_reason_from_proto(value: ipb.FinishReason) -> FinishReason:
    return _FINISH_REASONS.get(value, "unspecified")


def finish_reason_to_proto(reason: FinishReason) -> ipb.FinishReason:
    return _FINISH_REASON_VALUES[reason]


def tier_from_proto(value: apb.AdapterTier) -> AdapterTier:
    return _TIERS.get(value, "unspecified")


def tier_to_proto(tier: AdapterTier) -> apb.AdapterTier:
    return _TIER_VALUES[tier]


INT32_MAX, UINT32_MAX, UINT64_MAX = 2**31 - 1, 2**32 - 1, 2**64 - 1


def check_wire_int(name: str, value: int, low: int, high: int) -> int:
    """``value`` if the protobuf field can carry it; else a ValueError naming the field (protobuf's own
    says only "Value out of range"). The server checks what it accepts within that range."""
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def sampling_to_proto(sampling: Sampling) -> ipb.SamplingParams:
    params = ipb.SamplingParams(stop=list(sampling.stop))
    if sampling.max_new_tokens is not None:
        params.max_new_tokens = check_wire_int("max_new_tokens", sampling.max_new_tokens, -INT32_MAX - 1, INT32_MAX)
    if sampling.temperature is not None:
        params.temperature = sampling.temperature
    if sampling.top_p is not None:
        params.top_p = sampling.top_p
    if sampling.top_k is not None:
        params.top_k = check_wire_int("top_k", sampling.top_k, -INT32_MAX - 1, INT32_MAX)
    if sampling.repetition_penalty is not None:
        params.repetition_penalty = sampling.repetition_penalty
    if sampling.seed is not None:
        params.seed = check_wire_int("seed", sampling.seed, 0, UINT64_MAX)
    return params


def sampling_from_proto(params: ipb.SamplingParams) -> Sampling:
    return Sampling(
        max_new_tokens=params.max_new_tokens if params.HasField("max_new_tokens") else None,
        temperature=params.temperature if params.HasField("temperature") else None,
        top_p=params.top_p if params.HasField("top_p") else None,
        top_k=params.top_k if params.HasField("top_k") else None,
        repetition_penalty=params.repetition_penalty if params.HasField("repetition_penalty") else None,
        seed=params.seed if params.HasField("seed") else None,
        stop=tuple(params.stop),
    )


def messages_to_proto(messages: Sequence[Message]) -> list[ipb.ChatMessage]:
    return [ipb.ChatMessage(role=m.role, content=m.content) for m in messages]


def messages_from_proto(messages: Sequence[ipb.ChatMessage]) -> list[Message]:
    return [Message(role=m.role, content=m.content) for m in messages]


def adapter_field(adapter: str | None) -> str:
    """The request's ``adapter`` field: a ``tenant/name[@version]`` reference, or "" (None) for the base."""
    if adapter is None:
        return ""
    if not isinstance(adapter, str):
        raise TypeError(
            f"adapter must be a 'tenant/name[@version]' string, or None for the base model; got {adapter!r}"
        )
    return adapter


def fill_generate_request(
    request: _Request,
    prompt: str | None,
    messages: Sequence[Message] | None,
    adapter: str | None,
    sampling: Sampling | None,
) -> _Request:
    """Fills a GenerateRequest or GenerateStreamRequest (they have the same fields) and returns it."""
    check_one_input(prompt, messages, "prompt")
    if prompt is not None:
        request.prompt = prompt
    if messages is not None:
        request.messages.extend(messages_to_proto(messages))
    request.adapter = adapter_field(adapter)
    if sampling is not None:
        request.params.CopyFrom(sampling_to_proto(sampling))
    return request


def completion_from_proto(text: str, summary: ipb.GenerationSummary, replica: str = "") -> Completion:
    return Completion(
        replica=replica,
        text=text,
        finish_reason=finish_reason_from_proto(summary.finish_reason),
        prompt_tokens=summary.prompt_tokens,
        generated_tokens=summary.generated_tokens,
        adapter=summary.adapter,
        request_id=summary.request_id,
    )


def summary_to_proto(completion: Completion) -> ipb.GenerationSummary:
    return ipb.GenerationSummary(
        finish_reason=finish_reason_to_proto(completion.finish_reason),
        prompt_tokens=completion.prompt_tokens,
        generated_tokens=completion.generated_tokens,
        adapter=completion.adapter,
        request_id=completion.request_id,
    )


def completion_to_proto(completion: Completion) -> ipb.GenerateResponse:
    return ipb.GenerateResponse(text=completion.text, summary=summary_to_proto(completion))


def tokens_from_proto(response: ipb.TokenizeResponse) -> Tokens:
    return Tokens(ids=list(response.token_ids), tokens=list(response.tokens))


def tokens_to_proto(tokens: Tokens) -> ipb.TokenizeResponse:
    return ipb.TokenizeResponse(token_ids=tokens.ids, tokens=tokens.tokens)


def embedding_from_proto(response: ipb.EmbedResponse, replica: str = "", request_id: str = "") -> Embedding:
    return Embedding(
        values=list(response.embedding),
        prompt_tokens=response.prompt_tokens,
        adapter=response.adapter,
        replica=replica,
        request_id=request_id,
    )


def embedding_to_proto(embedding: Embedding) -> ipb.EmbedResponse:
    return ipb.EmbedResponse(
        embedding=embedding.values, prompt_tokens=embedding.prompt_tokens, adapter=embedding.adapter
    )


def classification_from_proto(
    response: ipb.ClassifyResponse, replica: str = "", request_id: str = ""
) -> Classification:
    return Classification(
        labels=[LabelScore(label=s.label, probability=s.probability) for s in response.labels],
        prompt_tokens=response.prompt_tokens,
        adapter=response.adapter,
        replica=replica,
        request_id=request_id,
    )


def model_info_from_proto(response: ipb.GetModelInfoResponse) -> ModelInfo:
    return ModelInfo(
        model_id=response.model_id,
        fingerprint=response.fingerprint,
        quantization=response.quantization,
        device=response.device,
        dtype=response.dtype,
        max_context_tokens=response.max_context_tokens,
        max_lora_rank=response.max_lora_rank,
        max_new_tokens=response.max_new_tokens,
        max_batch_size=response.max_batch_size,
        max_loaded_adapters=response.max_loaded_adapters,
        max_message_bytes=response.max_message_bytes,
        target_modules=tuple(response.target_modules),
        server_version=response.server_version,
        adapter_slot_memory_bytes=response.adapter_slot_memory_bytes,
        dtype_reason=response.dtype_reason,
        compiled=response.compiled,
        torch_threads=response.torch_threads,
        cpu_features=response.cpu_features,
        linear_kernel=response.linear_kernel,
        prefill_threads=response.prefill_threads,
        attention_kernel=response.attention_kernel,
        lora_kernel=response.lora_kernel,
        native_threads=response.native_threads,
        layers_kernel=response.layers_kernel,
    )


def model_info_to_proto(info: ModelInfo) -> ipb.GetModelInfoResponse:
    return ipb.GetModelInfoResponse(
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
        adapter_slot_memory_bytes=info.adapter_slot_memory_bytes,
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


def manifest_from_proto(manifest: apb.AdapterManifest) -> AdapterManifest:
    return AdapterManifest(
        kind=manifest.kind,
        method=manifest.method,
        base_fingerprint=manifest.base_fingerprint,
        base_model=manifest.base_model,
        base_quantization=manifest.base_quantization,
        rank=manifest.rank,
        lora_alpha=manifest.lora_alpha,
        use_rslora=manifest.use_rslora,
        target_modules=tuple(manifest.target_modules),
        files=dict(manifest.files),
        created_at=manifest.created_at,
        producer=manifest.producer,
        training_data_fingerprint=manifest.training_data_fingerprint,
        eval_metrics=dict(manifest.eval_metrics),
    )


def manifest_to_proto(manifest: AdapterManifest) -> apb.AdapterManifest:
    return apb.AdapterManifest(
        kind=manifest.kind,
        method=manifest.method,
        base_fingerprint=manifest.base_fingerprint,
        base_model=manifest.base_model,
        base_quantization=manifest.base_quantization,
        rank=manifest.rank,
        lora_alpha=manifest.lora_alpha,
        use_rslora=manifest.use_rslora,
        target_modules=list(manifest.target_modules),
        files=dict(manifest.files),
        created_at=manifest.created_at,
        producer=manifest.producer,
        training_data_fingerprint=manifest.training_data_fingerprint,
        eval_metrics=dict(manifest.eval_metrics),
    )


def adapter_version_from_proto(version: apb.AdapterVersion) -> AdapterVersionInfo:
    return AdapterVersionInfo(
        version=version.version,
        manifest=manifest_from_proto(version.manifest) if version.HasField("manifest") else None,
        tier=tier_from_proto(version.tier),
        pinned=version.pinned,
        active_requests=version.active_requests,
    )


def adapter_version_to_proto(version: AdapterVersionInfo) -> apb.AdapterVersion:
    message = apb.AdapterVersion(
        version=version.version,
        tier=tier_to_proto(version.tier),
        pinned=version.pinned,
        active_requests=version.active_requests,
    )
    if version.manifest is not None:
        message.manifest.CopyFrom(manifest_to_proto(version.manifest))
    return message


def adapter_from_proto(adapter: apb.Adapter) -> AdapterInfo:
    return AdapterInfo(
        tenant=adapter.tenant,
        name=adapter.name,
        latest_version=adapter.latest_version,
        versions=tuple(adapter_version_from_proto(v) for v in adapter.versions),
    )


def adapter_to_proto(adapter: AdapterInfo) -> apb.Adapter:
    return apb.Adapter(
        tenant=adapter.tenant,
        name=adapter.name,
        latest_version=adapter.latest_version,
        versions=[adapter_version_to_proto(v) for v in adapter.versions],
    )


def load_from_proto(response: apb.LoadAdapterResponse) -> AdapterLoad:
    return AdapterLoad(adapter=response.adapter, tier=tier_from_proto(response.tier))


def unload_from_proto(response: apb.UnloadAdapterResponse) -> AdapterUnload:
    return AdapterUnload(adapter=response.adapter, unloaded=response.unloaded)


def refresh_from_proto(response: apb.RefreshAdaptersResponse) -> RefreshResult:
    return RefreshResult(
        swaps=tuple(AdapterSwap(s.adapter, s.from_version, s.to_version) for s in response.swaps),
        failures=tuple(AdapterSwapFailure(f.adapter, f.version, f.error) for f in response.failures),
    )


def usage_from_proto(response: upb.GetUsageResponse) -> UsageReport:
    rows = tuple(
        UsageRow(
            tenant=r.tenant,
            adapter=r.adapter,
            requests=r.requests,
            prompt_tokens=r.prompt_tokens,
            generated_tokens=r.generated_tokens,
        )
        for r in response.rows
    )
    return UsageReport(start=response.start_unix_seconds, end=response.end_unix_seconds, rows=rows)
