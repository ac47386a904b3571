"""Conversions between the domain dataclasses and the protos round-trip."""

from __future__ import annotations

import pytest

from lorafleet import convert
from lorafleet.models import (
    AdapterInfo,
    AdapterManifest,
    AdapterVersionInfo,
    Completion,
    Embedding,
    FinishReason,
    Message,
    ModelInfo,
    Sampling,
    Tokens,
)
from lorafleet_proto.v1 import inference_pb2 as ipb

MANIFEST = AdapterManifest(
    kind="lora",
    method="qlora",
    base_fingerprint="sha256:1",
    base_model="tiny/model",
    base_quantization="nf4",
    rank=16,
    lora_alpha=32.0,
    use_rslora=True,
    target_modules=("q_proj", "v_proj"),
    files={"adapter.safetensors": "ab12"},
    created_at="2026-01-01T00:00:00Z",
    producer="lorafleet-train 0.1.0",
    training_data_fingerprint="sha256:2",
    eval_metrics={"loss": 0.25, "accuracy": 0.875},
)


@pytest.mark.parametrize(
    "sampling",
    [
        Sampling(),
        Sampling(max_new_tokens=0, temperature=0.0, top_k=0, seed=0),  # zeros are set, not defaults
        Sampling(
            max_new_tokens=64,
            temperature=0.5,
            top_p=0.75,
            top_k=40,
            repetition_penalty=1.25,
            seed=2**63 + 5,
            stop=("\n\n", "</s>"),
        ),
    ],
)
def test_sampling_round_trip(sampling: Sampling) -> None:
    params = convert.sampling_to_proto(sampling)
    assert convert.sampling_from_proto(ipb.SamplingParams.FromString(params.SerializeToString())) == sampling


def test_a_lone_stop_string_is_one_stop_string() -> None:
    assert Sampling(stop="###").stop == ("###",)  # it went out as "#", "#", "#": stopped at any "#"
    assert list(convert.sampling_to_proto(Sampling(stop="END")).stop) == ["END"]
    assert Sampling(stop=["a", "b"]).stop == ("a", "b")  # type: ignore[arg-type]
    assert Sampling(stop=None).stop == ()  # type: ignore[arg-type]  # OpenAI-style callers pass None
    for bad in (b"##", ("ok", 3), 7):
        with pytest.raises(TypeError, match="stop must"):
            Sampling(stop=bad)  # type: ignore[arg-type]


def test_unset_sampling_fields_stay_unset() -> None:
    params = convert.sampling_to_proto(Sampling(top_p=0.5))
    assert params.HasField("top_p")
    assert not any(params.HasField(f) for f in ("max_new_tokens", "temperature", "top_k", "seed"))


@pytest.mark.parametrize("reason", ["length", "stop", "end_of_sequence", "cancelled", "unspecified"])
def test_completion_round_trip(reason: FinishReason) -> None:
    completion = Completion("text", reason, 3, 4, "acme/x@1", "rid")
    response = convert.completion_to_proto(completion)
    assert convert.completion_from_proto(response.text, response.summary) == completion


def test_generate_request_filling() -> None:
    messages = [Message("system", "s"), Message("user", "u")]
    request = convert.fill_generate_request(ipb.GenerateStreamRequest(), None, messages, "acme/x", Sampling(seed=1))
    assert convert.messages_from_proto(request.messages) == messages
    assert request.prompt == "" and request.adapter == "acme/x" and request.params.seed == 1
    plain = convert.fill_generate_request(ipb.GenerateRequest(), "p", None, "", None)
    assert plain.prompt == "p" and not plain.messages and not plain.HasField("params")
    with pytest.raises(ValueError, match="exactly one of prompt and messages"):
        convert.fill_generate_request(ipb.GenerateRequest(), "p", messages, "", None)


def test_values_round_trip() -> None:
    tokens = Tokens(ids=[1, 2, 3], tokens=["a", "b", "c"])
    assert convert.tokens_from_proto(convert.tokens_to_proto(tokens)) == tokens
    embedding = Embedding(values=[0.5, -0.25], prompt_tokens=2, adapter="acme/x@1")
    assert convert.embedding_from_proto(convert.embedding_to_proto(embedding)) == embedding
    info = ModelInfo("m", "fp", "int8", "cuda:0", "bfloat16", 4096, 64, 512, 16, 8, 2**33, ("q_proj",), "0.1.0", 2**35)
    assert convert.model_info_from_proto(convert.model_info_to_proto(info)) == info
    cpu = ModelInfo(
        "m", "fp", "none", "cpu", "bfloat16", 512, 32, 128, 32, 32, 2**22, ("q_proj",), "0.1.0", 0,
        linear_kernel="native-amx", attention_kernel="native", lora_kernel="native", native_threads=2,
        layers_kernel="native",
    )  # fmt: skip
    assert convert.model_info_from_proto(convert.model_info_to_proto(cpu)) == cpu


def test_adapter_round_trip() -> None:
    adapter = AdapterInfo(
        tenant="acme",
        name="support",
        latest_version=2,
        versions=(
            AdapterVersionInfo(1, None, "store", False, 0),
            AdapterVersionInfo(2, MANIFEST, "device", True, 5),
            AdapterVersionInfo(3, MANIFEST, "host", False, 0),
        ),
    )
    assert convert.adapter_from_proto(convert.adapter_to_proto(adapter)) == adapter
    assert adapter.ref == "acme/support"


def test_unknown_enum_values_read_as_unspecified() -> None:
    summary = ipb.GenerationSummary()
    summary.ParseFromString(b"\x08\x63")  # finish_reason = 99, unknown to this client
    assert convert.completion_from_proto("", summary).finish_reason == "unspecified"


@pytest.mark.parametrize(
    ("sampling", "message"),
    [
        (Sampling(seed=-1), r"seed must be in \[0, 18446744073709551615\], got -1"),
        (Sampling(seed=2**64), "seed must be in"),
        (Sampling(max_new_tokens=2**31), r"max_new_tokens must be in \[-2147483648, 2147483647\]"),
        (Sampling(top_k=-(2**31) - 1), "top_k must be in"),
    ],
)
def test_values_the_wire_cannot_carry_are_named(sampling: Sampling, message: str) -> None:
    """protobuf's own error said only "Value out of range"."""
    with pytest.raises(ValueError, match=message):
        convert.sampling_to_proto(sampling)
    convert.sampling_to_proto(Sampling(seed=2**64 - 1, max_new_tokens=2**31 - 1, top_k=0))  # the edges pass
