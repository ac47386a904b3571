"""End to end over a real gRPC channel on 127.0.0.1 against the real default model (SmolLM2-135M)."""

from __future__ import annotations

import math
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import grpc
import pytest
from e2elib import LiveServer, metric, start_queued, wait_for_metric
from enginelib import engine_held
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from lorafleet import AdapterLoad, AdapterUnload, LoraFleetClient, LoraFleetError, Message, Sampling
from lorafleet_server.model.cpu import cpu_features
from lorafleet_server.model.native import find_compiler

CAPITAL = [Message("user", "What is the capital of France?")]


def _idle(live: LiveServer, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if live.service.engine.load_stats() == (0, 0):
            return True
        time.sleep(0.02)
    return False


def test_generate_unary_answers_with_the_real_model(live: LiveServer) -> None:
    out = live.client.generate(messages=CAPITAL, sampling=Sampling(max_new_tokens=24), request_id="req-123")
    assert "Paris" in out.text
    assert out.finish_reason in ("end_of_sequence", "length")
    assert out.prompt_tokens > 5 and 0 < out.generated_tokens <= 24
    assert out.adapter == ""
    assert out.request_id == "req-123"


def test_stream_chunks_add_up_to_the_unary_text(live: LiveServer) -> None:
    sampling = Sampling(max_new_tokens=40, repetition_penalty=1.1)
    unary = live.client.generate(messages=CAPITAL, sampling=sampling)
    stream = live.client.stream(messages=CAPITAL, sampling=sampling)
    chunks = list(stream)
    assert len(chunks) > 3
    assert "".join(chunks) == unary.text
    assert stream.result.generated_tokens == unary.generated_tokens
    assert stream.result.finish_reason == unary.finish_reason


def test_stream_handles_multibyte_characters(live: LiveServer) -> None:
    prompt = [Message("user", "Repeat exactly: 日本語のテキスト, émoji 🙂, naïve café")]
    stream = live.client.stream(messages=prompt, sampling=Sampling(max_new_tokens=40))
    chunks = list(stream)
    tokenizer = live.service.engine.tokenizer
    assert all("\ufffd" not in c for c in chunks)
    ids = tokenizer.encode(stream.result.text, add_special_tokens=False)
    assert tokenizer.decode(ids) == "".join(chunks)


def test_tokenize_matches_the_tokenizer(live: LiveServer) -> None:
    toks = live.client.tokenize("Hello world, lorafleet!")
    assert toks.ids == live.service.engine.tokenizer.encode("Hello world, lorafleet!", add_special_tokens=False)
    assert len(toks.tokens) == len(toks.ids)
    chat = live.client.tokenize(messages=CAPITAL)
    assert len(chat.ids) > len(live.client.tokenize("What is the capital of France?").ids)


def test_embed_base_and_adapter(live: LiveServer) -> None:
    base = live.client.embed("LoRA adapters are small.")
    assert len(base.values) == 576 and all(math.isfinite(v) for v in base.values)
    tuned = live.client.embed("LoRA adapters are small.", adapter="acme/legal")
    assert tuned.adapter == "acme/legal@1"
    assert tuned.values != base.values
    assert live.client.embed("LoRA adapters are small.").values == pytest.approx(base.values, abs=1e-5)


def test_model_info(live: LiveServer) -> None:
    info = live.client.model_info()
    assert info.model_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert info.fingerprint.startswith("sha256:")
    # --dtype auto (the default): bf16 where the CPU has native bf16 and the model's bf16 check passes.
    native = cpu_features().native_bf16
    assert (info.quantization, info.device) == ("none", "cpu")
    assert info.dtype == ("bfloat16" if native and "passed" in info.dtype_reason else "float32")
    assert info.dtype_reason.startswith("no native bf16") != native
    # --linear-kernel auto: in bf16 the native AMX Linear where the CPU has AMX (and a C compiler), else
    # the native AVX-512 BF16 one unless oneDNN's timed clearly faster at startup, else oneDNN's; in fp32
    # the native AVX2 Linear, oneDNN's or F.linear, whichever was timed fastest at startup
    compiler = find_compiler() is not None
    if info.dtype == "bfloat16":
        if compiler and "amx_bf16" in info.cpu_features:
            assert info.linear_kernel == "native-amx"
        elif compiler and "avx512_bf16" in info.cpu_features:
            assert info.linear_kernel in ("native-avx512", "onednn-packed")
        else:
            assert info.linear_kernel == "onednn-packed"
    else:
        assert info.linear_kernel in ("native-fp32", "onednn-packed", "torch")
    assert info.cpu_features == cpu_features().summary() and not info.compiled and info.torch_threads >= 1
    assert info.prefill_threads == len(os.sched_getaffinity(0))  # every core for prompt prefill, when faster
    # --attention-kernel auto: the C kernel built at startup, where the machine has a C compiler
    assert info.attention_kernel == ("native" if shutil.which("cc") or shutil.which("gcc") else "torch")
    assert info.lora_kernel == info.attention_kernel  # both built the same way, --lora-impl auto
    # the native bf16 Linears' helper pool (--linear-threads 0: every CPU), which the other native kernels share
    cpus = len(os.sched_getaffinity(0))
    bf16_native = info.linear_kernel in ("native-amx", "native-avx512")
    assert info.native_threads == (cpus if bf16_native and cpus > 1 else 0)
    # --layers-kernel auto: a decode step's layers in one C call where all their kernels are native
    native = info.linear_kernel.startswith("native") and info.attention_kernel == info.lora_kernel == "native"
    assert info.layers_kernel == ("native" if native else "python")
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} == set(info.target_modules)
    assert info.max_context_tokens == 512 and info.max_lora_rank == 32 and info.max_new_tokens == 128


def test_health_and_reflection(live: LiveServer) -> None:
    stub = health_pb2_grpc.HealthStub(live.client.channel)
    for service in ("", "lorafleet.v1.InferenceService", "lorafleet.v1.AdaptersService"):
        resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    db = ProtoReflectionDescriptorDatabase(live.client.channel)
    services = set(db.get_services())
    assert {"lorafleet.v1.InferenceService", "lorafleet.v1.AdaptersService", "grpc.health.v1.Health"} <= services
    method = db.FindFileContainingSymbol("lorafleet.v1.InferenceService")
    assert method.package == "lorafleet.v1"


def test_admin_list_get_load_pin_unpin_unload(live: LiveServer) -> None:
    names = {a.ref for a in live.client.list_adapters("acme")}
    assert {"acme/support", "acme/legal"} <= names
    assert live.client.load_adapter("acme/support") == AdapterLoad("acme/support@1", "device")
    info = live.client.get_adapter("acme/support")
    assert info.latest_version == 1
    v1 = info.versions[0]
    assert v1.tier == "device" and v1.manifest is not None and v1.manifest.rank == 8
    assert set(v1.manifest.target_modules) == {"q_proj", "v_proj"}
    assert live.client.pin_adapter("acme/support@1") == "acme/support@1"
    assert live.client.get_adapter("acme/support").versions[0].pinned
    live.client.unpin_adapter("acme/support")
    assert not live.client.get_adapter("acme/support").versions[0].pinned
    assert live.client.unload_adapter("acme/support") == AdapterUnload("acme/support@1", unloaded=True)
    assert live.client.get_adapter("acme/support").versions[0].tier == "host"


@pytest.mark.parametrize("server", ["live", "live_fp32"])
def test_concurrent_requests_with_different_adapters_match_their_solo_outputs(
    server: str, request: pytest.FixtureRequest
) -> None:
    """Nine requests over three adapters (base included) batched together: each is served by its own
    adapter version and streams exactly what it streams alone: in fp32, and for base rows in bf16 (the
    default where the CPU has it). bf16 adapter rows may differ: the LoRA kernel and rank padding follow
    the batch's adapters, and bf16 rounding makes that visible (docs/architecture.md, "Measured facts" 10)."""
    live: LiveServer = request.getfixturevalue(server)
    exact = {"", "acme/support", "acme/legal"} if live.service.info.dtype == "float32" else {""}
    refs = ["", "acme/support", "acme/legal"]
    prompt = [Message("user", "Name three colors.")]
    sampling = Sampling(max_new_tokens=20)
    solo = {ref: live.client.generate(messages=prompt, adapter=ref, sampling=sampling).text for ref in refs}
    assert len(set(solo.values())) == 3  # the adapters really change the output

    def call(ref: str) -> tuple[str, str, str]:
        with LoraFleetClient(live.target, timeout=120) as c:
            out = c.generate(messages=prompt, adapter=ref, sampling=sampling)
            return ref, out.text, out.adapter

    engine = live.service.engine
    with engine_held(engine):  # all of them queued first, then batched together (8 rows, one waits)
        futures = start_queued(live.service, [partial(call, ref) for ref in refs * 3])
        assert engine.load_stats() == (0, 9)
    for ref, text, served in (f.result(timeout=300) for f in futures):
        assert text == solo[ref] or ref not in exact, ref
        assert served == (f"{ref}@1" if ref else "")


def test_concurrent_tokenize_calls_agree_with_a_lone_call(live: LiveServer) -> None:
    lone = live.client.tokenize(messages=CAPITAL).ids
    with ThreadPoolExecutor(max_workers=8) as pool:  # each call encodes on its own server worker thread
        got = list(pool.map(lambda _: live.client.tokenize(messages=CAPITAL).ids, range(400)))
    wrong = [ids for ids in got if ids != lone]
    assert not wrong, f"{len(wrong)} of {len(got)} concurrent Tokenize calls differ from a lone one"


# E2E_CONFIG's max_new_tokens: seconds of real-model work, far more than a cut request gets to do.
LONG = 128
COUNTING = "Count from one to a thousand:"


def test_cancel_mid_stream_stops_generation(live: LiveServer) -> None:
    service = live.service
    cancelled = metric(service, "lorafleet_generations_total", reason="cancelled")
    tokens = metric(service, "lorafleet_generated_tokens_total")
    cut = metric(service, "lorafleet_requests_total", rpc="GenerateStream", code="CANCELLED")
    stream = live.client.stream(COUNTING, sampling=Sampling(max_new_tokens=LONG))
    chunks = iter(stream)
    got = [next(chunks), next(chunks)]
    assert all(got)
    # The cancel reaches the server while the engine is held between two steps: it is handled before
    # the next one, so nothing more is generated, however long this thread took to get here (a busy
    # machine decoded past half of LONG between the second chunk and the cancel: an outside review).
    with engine_held(service.engine):
        at_cancel = metric(service, "lorafleet_generated_tokens_total") - tokens
        stream.cancel()
        wait_for_metric(service, "lorafleet_requests_total", cut + 1, rpc="GenerateStream", code="CANCELLED")
    # The engine finished the request as cancelled (a natural end counts as "length" or
    # "end_of_sequence", never here), before its LONG tokens and with no step after the cancel.
    wait_for_metric(service, "lorafleet_generations_total", cancelled + 1, reason="cancelled")
    generated = metric(service, "lorafleet_generated_tokens_total") - tokens
    assert 2 <= generated == at_cancel < LONG, (generated, at_cancel)
    assert _idle(live), "the engine kept generating after the client cancelled"


def test_deadline_exceeded_stops_generation(live: LiveServer) -> None:
    service = live.service
    expired = metric(service, "lorafleet_requests_total", rpc="Generate", code="DEADLINE_EXCEEDED")
    cut = metric(service, "lorafleet_requests_total", rpc="Generate", code="CANCELLED")
    cancelled = metric(service, "lorafleet_generations_total", reason="cancelled")
    # The deadline passes while the engine is held between two steps, once the request runs: no guess
    # of this machine's speed (a deadline scaled by one timed request let a burst of load, or the first
    # request of a fresh server, set it long enough for 66-78 of the 128 tokens; a fixed one let an AMX
    # Xeon decode 67, and a faster machine would finish).
    tokens = metric(service, "lorafleet_generated_tokens_total")
    with ThreadPoolExecutor(max_workers=1) as pool:
        call = pool.submit(live.client.generate, COUNTING, sampling=Sampling(max_new_tokens=LONG), timeout=3.0)
        deadline = time.monotonic() + 30
        while service.engine.load_stats()[0] == 0 and not call.done():
            assert time.monotonic() < deadline, "the call never started running"
            time.sleep(0.001)
        with engine_held(service.engine), pytest.raises(LoraFleetError) as err:
            call.result(timeout=30)  # its deadline passes meanwhile; the cancel is handled before the next step
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    # Cut (a natural end counts as "length"), well before its LONG tokens.
    wait_for_metric(service, "lorafleet_generations_total", cancelled + 1, reason="cancelled")
    assert metric(service, "lorafleet_generated_tokens_total") - tokens < LONG // 2
    # Counted once, as the deadline (kept from the call's start), not as a client cancel.
    wait_for_metric(service, "lorafleet_requests_total", expired + 1, rpc="Generate", code="DEADLINE_EXCEEDED")
    assert metric(service, "lorafleet_requests_total", rpc="Generate", code="CANCELLED") == cut
    assert _idle(live)


def _status(live: LiveServer, **kwargs: object) -> grpc.StatusCode:
    try:
        live.client.generate(**kwargs)  # type: ignore[arg-type]
    except LoraFleetError as exc:
        return exc.code
    return grpc.StatusCode.OK


@pytest.mark.parametrize(
    "adapter",
    [
        "../x",
        "/etc/passwd",
        "acme/../../etc",
        "Acme/support",
        "acme/sup port",
        "acme/a\x00b",
        "acme",
        "acme/support@",
        "acme/support@v1",
        "acme/support@0",
        "a" * 64 + "/x",
        "acme/" + "n" * 200,
        "acme\\support",
    ],
)
def test_malformed_adapter_references_are_invalid_argument(live: LiveServer, adapter: str) -> None:
    assert _status(live, prompt="hi", adapter=adapter) == grpc.StatusCode.INVALID_ARGUMENT


def test_path_escaping_references_open_no_file(live: LiveServer) -> None:
    import sys

    opened: list[str] = []
    active = threading.Event()

    def hook(event: str, args: tuple[object, ...]) -> None:
        if active.is_set() and event == "open" and isinstance(args[0], str | bytes | Path):
            opened.append(str(args[0]))

    sys.addaudithook(hook)
    active.set()
    try:
        for ref in ("../../etc/passwd", "/etc/passwd", "acme/../../../etc/passwd", "..%2f/x"):
            assert _status(live, prompt="hi", adapter=ref) == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        active.clear()
    root = str(live.store_root.resolve())
    assert not [p for p in opened if "passwd" in p or (p.startswith("/") and ".." in p)], opened
    assert not [p for p in opened if p.startswith(root)], "an invalid reference touched the store"


def test_unknown_adapter_and_version_are_not_found(live: LiveServer) -> None:
    assert _status(live, prompt="hi", adapter="acme/nothing") == grpc.StatusCode.NOT_FOUND
    assert _status(live, prompt="hi", adapter="acme/support@9") == grpc.StatusCode.NOT_FOUND
    assert _status(live, prompt="hi", adapter="other/support") == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("sampling", "prompt"),
    [
        (Sampling(max_new_tokens=0), "hi"),
        (Sampling(max_new_tokens=-1), "hi"),
        (Sampling(max_new_tokens=129), "hi"),
        (Sampling(temperature=float("nan")), "hi"),
        (Sampling(temperature=-1.0), "hi"),
        (Sampling(top_p=0.0), "hi"),
        (Sampling(top_p=1.5), "hi"),
        (Sampling(max_new_tokens=8), "word " * 600),
        (Sampling(max_new_tokens=8), ""),
    ],
)
def test_bad_requests_are_invalid_argument(live: LiveServer, sampling: Sampling, prompt: str) -> None:
    assert _status(live, prompt=prompt, sampling=sampling) == grpc.StatusCode.INVALID_ARGUMENT


def test_message_over_the_size_limit_is_resource_exhausted(live: LiveServer) -> None:
    assert _status(live, prompt="x" * (2 << 20)) == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_server_keeps_serving_after_errors(live: LiveServer) -> None:
    for _ in range(3):
        _status(live, prompt="hi", adapter="../x")
        _status(live, prompt="hi", sampling=Sampling(top_p=7.0))
    assert "Paris" in live.client.generate(messages=CAPITAL, sampling=Sampling(max_new_tokens=16)).text
