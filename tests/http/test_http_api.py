"""The OpenAI-compatible HTTP API on a tiny random model with API keys, driven by the real ``openai``
SDK (and raw httpx where the wire format itself is the point)."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest
from disconnectlib import post_then_leave
from enginelib import engine_held, tiny_service
from httplib import TinyHttp

from lorafleet_adapters.errors import AdapterNotFound
from lorafleet_server.app import Service
from lorafleet_server.edge.status import STATUS_TABLE, http_status_for, status_for
from lorafleet_server.engine.types import GenerationRequest
from lorafleet_server.errors import EngineTimeout, InvalidRequest, PermissionDenied, QueueFull, ShuttingDown
from lorafleet_server.grpc.server import server_keys
from lorafleet_server.http.app import HttpTimeouts
from lorafleet_server.http.errors import describe
from lorafleet_server.http.server import BackgroundHttpServer
from lorafleet_server.tenants.errors import MissingKey

CHAT = [{"role": "user", "content": "Say hello"}]


def client(live: TinyHttp, key: str = "acme") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key=live.keys[key], max_retries=0, timeout=60)


def wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        time.sleep(0.01)


# -- the table ---------------------------------------------------------------------------------------


def test_http_statuses_come_from_the_one_status_table() -> None:
    expected = {
        grpc.StatusCode.UNAUTHENTICATED: 401,
        grpc.StatusCode.PERMISSION_DENIED: 403,
        grpc.StatusCode.INVALID_ARGUMENT: 400,
        grpc.StatusCode.NOT_FOUND: 404,
        grpc.StatusCode.FAILED_PRECONDITION: 400,
        grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
        grpc.StatusCode.UNAVAILABLE: 503,
        grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    }
    for _, code in STATUS_TABLE:  # every row of the table has its HTTP status
        assert http_status_for(code) == expected[code], code
    cases = [
        (MissingKey("no key"), 401, "authentication_error"),
        (PermissionDenied("admin only"), 403, "permission_error"),
        (InvalidRequest("bad"), 400, "invalid_request_error"),
        (AdapterNotFound("adapter a/b not found"), 404, "not_found_error"),
        (QueueFull("full"), 429, "rate_limit_error"),
        (ShuttingDown("bye"), 503, "service_unavailable_error"),
        (EngineTimeout("slow"), 504, "timeout_error"),
    ]
    for exc, status, kind in cases:
        code, http, body = describe(exc, "rid")
        assert (code, http) == (status_for(exc), status)
        assert body["error"]["type"] == kind and body["error"]["message"] == str(exc)
    _, http, body = describe(RuntimeError("secret detail"), "rid-1")  # a bug: 500, its text not sent
    assert http == 500 and "secret" not in body["error"]["message"] and "rid-1" in body["error"]["message"]


# -- answers -----------------------------------------------------------------------------------------


def test_chat_and_completion_on_base_and_adapter(tiny_http: TinyHttp) -> None:
    sdk = client(tiny_http)
    base = sdk.chat.completions.with_raw_response.create(
        model=tiny_http.model_id, messages=CHAT, max_tokens=6, temperature=0, extra_headers={"x-request-id": "req-42"}
    )
    assert base.headers["x-request-id"] == "req-42" and "x-lorafleet-adapter" not in base.headers
    answer = base.parse()
    assert answer.object == "chat.completion" and answer.id == "chatcmpl-req-42"
    assert answer.model == tiny_http.model_id
    assert answer.choices[0].message.role == "assistant" and answer.choices[0].finish_reason == "length"
    assert answer.usage is not None and answer.usage.completion_tokens == 6
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + 6

    tuned = sdk.chat.completions.with_raw_response.create(
        model="acme/support", messages=CHAT, max_tokens=6, temperature=0
    )
    assert tuned.headers["x-lorafleet-adapter"] == "acme/support@1"
    assert tuned.parse().model == "acme/support@1"
    assert tuned.parse().choices[0].message.content != answer.choices[0].message.content  # the adapter acts

    again = sdk.chat.completions.create(model="acme/support@1", messages=CHAT, max_tokens=6, temperature=0)
    assert again.choices[0].message.content == tuned.parse().choices[0].message.content  # greedy: same text

    text = sdk.completions.create(model=tiny_http.model_id, prompt="Once upon a time", max_tokens=5, temperature=0)
    assert text.object == "text_completion" and text.choices[0].finish_reason == "length"
    assert text.usage is not None and text.usage.completion_tokens == 5 and text.choices[0].text
    listed = sdk.completions.create(model=tiny_http.model_id, prompt=["Once upon a time"], max_tokens=5, temperature=0)
    assert listed.choices[0].text == text.choices[0].text


def test_sampling_parameters_reach_the_engine(tiny_http: TinyHttp) -> None:
    sdk = client(tiny_http)
    args = {"model": tiny_http.model_id, "messages": CHAT, "max_completion_tokens": 12, "temperature": 1.0}
    first = sdk.chat.completions.create(seed=7, **args)  # type: ignore[arg-type]
    same = sdk.chat.completions.create(seed=7, **args)  # type: ignore[arg-type]
    assert first.choices[0].message.content == same.choices[0].message.content
    assert first.usage is not None and first.usage.completion_tokens == 12  # max_completion_tokens counts
    greedy = sdk.chat.completions.create(model=tiny_http.model_id, messages=CHAT, max_tokens=12, temperature=0)
    top1 = sdk.chat.completions.create(
        model=tiny_http.model_id, messages=CHAT, max_tokens=12, temperature=1.5, seed=3, extra_body={"top_k": 1}
    )
    assert top1.choices[0].message.content == greedy.choices[0].message.content  # top_k=1 is greedy
    words = greedy.choices[0].message.content or ""
    stop = words.split()[1] if len(words.split()) > 1 else words[:3]
    stopped = sdk.chat.completions.create(
        model=tiny_http.model_id, messages=CHAT, max_tokens=12, temperature=0, stop=[stop]
    )
    assert stopped.choices[0].finish_reason == "stop" and stop not in (stopped.choices[0].message.content or "")


def test_each_parameter_reaches_the_engines_request_as_sent(
    tiny_http: TinyHttp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the edge hands the engine, field by field (a mutation review: top_p dropped, a ``stop`` string
    taken as its characters, and a "developer" message passed on as a role the engine refuses, all
    passed every test)."""

    engine = tiny_http.service.engine
    seen: list[GenerationRequest] = []
    reserve = engine.reserve

    def recorded(req: GenerationRequest) -> float:
        seen.append(req)
        return reserve(req)

    monkeypatch.setattr(engine, "reserve", recorded)
    sdk = client(tiny_http)
    messages = [{"role": "developer", "content": "Be brief."}, *CHAT]
    chat = sdk.chat.completions.create(
        model=tiny_http.model_id,
        messages=messages,  # type: ignore[arg-type]
        max_completion_tokens=3,
        temperature=0.7,
        top_p=0.25,
        seed=-2,
        stop="Zq",
        extra_body={"top_k": 5, "repetition_penalty": 1.25},
    )
    assert chat.choices[0].finish_reason in ("length", "stop")
    [req] = seen
    assert [(t.role, t.content) for t in req.messages] == [("system", "Be brief."), ("user", "Say hello")]
    p = req.params
    assert (p.max_new_tokens, p.temperature, p.top_p, p.top_k, p.repetition_penalty) == (3, 0.7, 0.25, 5, 1.25)
    assert (p.seed, p.stop, p.fit_context) == (2**64 - 2, ("Zq",), False)
    sdk.completions.create(model=tiny_http.model_id, prompt="x", max_tokens=2, stop=["ab", "c"])
    assert seen[-1].prompt == "x" and seen[-1].params.stop == ("ab", "c") and seen[-1].params.top_p == 1.0


def test_an_unset_max_tokens_fits_the_context_the_prompt_leaves(tiny_http: TinyHttp) -> None:
    """The server's default (8 here) is not the caller's choice: a prompt leaving 4 tokens of the 256
    runs; the caller's own max_tokens of 8 is still refused."""
    sdk = client(tiny_http)
    prompt = "word " * 252
    with pytest.raises(openai.BadRequestError, match="exceeds the context") as refused:
        sdk.completions.create(model=tiny_http.model_id, prompt=prompt, max_tokens=8, temperature=0)
    assert refused.value.code == "context_length_exceeded"  # as OpenAI names it (was invalid_request)
    # in this API's words: the field the caller sent is max_tokens (an outside review)
    assert "plus max_tokens 8 exceeds" in refused.value.message and "max_new_tokens" not in refused.value.message
    done = sdk.completions.create(model=tiny_http.model_id, prompt=prompt, temperature=0)
    assert done.usage is not None and 252 <= done.usage.prompt_tokens < 256
    assert done.usage.prompt_tokens + done.usage.completion_tokens <= 256


def test_streaming_is_sse_with_usage_last_and_done(tiny_http: TinyHttp) -> None:
    body = {"model": tiny_http.model_id, "messages": CHAT, "max_tokens": 8, "temperature": 0, "stream": True}
    headers = {"authorization": f"Bearer {tiny_http.keys['acme']}"}
    with httpx.stream(
        "POST",
        f"{tiny_http.url}/v1/chat/completions",
        json={**body, "stream_options": {"include_usage": True}},
        headers=headers,
        timeout=60,
    ) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 8
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1])
    whole = client(tiny_http).chat.completions.create(
        model=tiny_http.model_id, messages=CHAT, max_tokens=8, temperature=0
    )
    assert streamed == whole.choices[0].message.content

    sdk_chunks = list(
        client(tiny_http).completions.create(
            model="acme/support", prompt="Once upon a time", max_tokens=4, temperature=0, stream=True
        )
    )
    assert sdk_chunks[-1].choices[0].finish_reason == "length" and sdk_chunks[-1].usage is None  # no usage asked
    assert all(c.model == "acme/support@1" for c in sdk_chunks)


def test_embeddings(tiny_http: TinyHttp, caplog: pytest.LogCaptureFixture) -> None:
    sdk = client(tiny_http)
    with caplog.at_level(logging.INFO, logger="lorafleet.requests"):
        both = sdk.embeddings.with_raw_response.create(model=tiny_http.model_id, input=["a cat", "a dog"])
    [logged] = [r.fields for r in caplog.records if r.name == "lorafleet.requests"]  # type: ignore[attr-defined]
    # the request log line counts every input's tokens, as the usage meter does (it had the first's)
    assert logged["prompt_tokens"] == both.parse().usage.prompt_tokens
    assert "x-lorafleet-adapter" not in both.headers
    vectors = both.parse()
    assert [d.index for d in vectors.data] == [0, 1] and len(vectors.data[0].embedding) == 64  # hidden size
    assert vectors.data[0].embedding != vectors.data[1].embedding
    one = sdk.embeddings.create(model=tiny_http.model_id, input="a cat")  # the SDK asks for base64
    floats = sdk.embeddings.create(model=tiny_http.model_id, input="a cat", encoding_format="float")
    assert floats.data[0].embedding == pytest.approx(one.data[0].embedding, rel=1e-6)
    assert one.data[0].embedding == pytest.approx(vectors.data[0].embedding, abs=1e-5)  # batched or not
    assert (
        vectors.usage.prompt_tokens
        == one.usage.prompt_tokens + sdk.embeddings.create(model=tiny_http.model_id, input="a dog").usage.prompt_tokens
    )
    tuned = sdk.embeddings.with_raw_response.create(model="acme/support", input="a cat")
    assert tuned.headers["x-lorafleet-adapter"] == "acme/support@1" and tuned.parse().model == "acme/support@1"
    assert tuned.parse().data[0].embedding != pytest.approx(one.data[0].embedding, abs=1e-5)  # the adapter acts
    with pytest.raises(openai.NotFoundError):
        sdk.embeddings.create(model="beta/secret", input="a cat")
    with pytest.raises(openai.BadRequestError) as dims:
        sdk.embeddings.create(model=tiny_http.model_id, input="a cat", dimensions=8)
    assert dims.value.param == "dimensions"
    with pytest.raises(openai.BadRequestError) as ids:
        sdk.embeddings.create(model=tiny_http.model_id, input=[[1, 2, 3]])
    assert str(ids.value.param).startswith("input")


def test_models_show_the_callers_adapters_only(tiny_http: TinyHttp) -> None:
    def ids(key: str) -> dict[str, dict[str, object]]:
        return {m.id: m.model_dump() for m in client(tiny_http, key).models.list()}

    base = tiny_http.model_id
    acme, beta, ops = ids("acme"), ids("beta"), ids("ops")
    assert set(acme) == {base, "acme/support"} and set(beta) == {base, "beta/secret"}
    assert set(ops) == {base, "acme/support", "beta/secret"}
    assert acme["acme/support"]["owned_by"] == "acme" and acme["acme/support"]["parent"] == base
    assert client(tiny_http, "acme").models.retrieve("acme/support@1").id == "acme/support@1"
    with pytest.raises(openai.NotFoundError) as foreign:
        client(tiny_http, "acme").models.retrieve("beta/secret")
    with pytest.raises(openai.NotFoundError) as unknown:
        client(tiny_http, "acme").models.retrieve("beta/nothing")
    # Another tenant's adapter reads exactly as one that does not exist.
    assert str(foreign.value.body).replace("secret", "X") == str(unknown.value.body).replace("nothing", "X")


# -- errors as the SDK's exceptions ------------------------------------------------------------------


def test_keys_are_required_and_checked_before_the_body(tiny_http: TinyHttp) -> None:
    url = f"{tiny_http.url}/v1/chat/completions"
    bad = openai.OpenAI(base_url=f"{tiny_http.url}/v1", api_key="lf_aaaaaaaaaaaa_" + "b" * 32, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        bad.chat.completions.create(model=tiny_http.model_id, messages=CHAT)  # type: ignore[arg-type]
    assert refused.value.body["type"] == "authentication_error"  # type: ignore[index]
    missing = httpx.post(url, content=b"{not json", timeout=30)
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_key"
    assert missing.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{tiny_http.url}/health", timeout=30).json() == {"status": "SERVING"}  # open to all
    before = tiny_http.metric("lorafleet_requests_total", rpc="POST /v1/chat/completions", code="UNAUTHENTICATED")
    assert before >= 2


def test_refusals_name_the_parameter(tiny_http: TinyHttp) -> None:
    sdk = client(tiny_http)
    cases: list[tuple[dict[str, object], str]] = [
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"extra_body": {"mirostat": 2}}, "mirostat"),
        ({"temperature": 3}, "temperature"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ]
    for override, param in cases:
        args: dict[str, object] = {"model": tiny_http.model_id, "messages": CHAT, "max_tokens": 2, **override}
        with pytest.raises(openai.BadRequestError) as refused:
            sdk.chat.completions.create(**args)  # type: ignore[call-overload]
        error = refused.value.body
        assert isinstance(error, dict) and error["type"] == "invalid_request_error", override
        assert str(error["param"]).startswith(param), (override, error)
    for override, param in (  # the completions-only parameters, and ones OpenAI's SDK checks no further
        ({"suffix": "end"}, "suffix"),
        ({"best_of": 2}, "best_of"),
        ({"logit_bias": {"1": 1}}, "logit_bias"),
        ({"logprobs": 1}, "logprobs"),
    ):
        with pytest.raises(openai.BadRequestError) as refused:
            sdk.completions.create(model=tiny_http.model_id, prompt="x", max_tokens=2, **override)  # type: ignore[call-overload]
        assert str(refused.value.param).startswith(param), (override, refused.value.body)
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.chat.completions.create(model=tiny_http.model_id, messages=CHAT, top_logprobs=1)  # type: ignore[arg-type]
    assert refused.value.param == "top_logprobs"
    with pytest.raises(openai.BadRequestError, match="max_tokens is too large") as too_many:  # the server's limit
        sdk.completions.create(model=tiny_http.model_id, prompt="x", max_tokens=100_000)
    assert too_many.value.param == "max_tokens"
    with pytest.raises(openai.NotFoundError) as no_model:  # a name that is no model (OpenAI: model_not_found)
        sdk.chat.completions.create(model="not a model", messages=CHAT)  # type: ignore[arg-type]
    assert no_model.value.code == "model_not_found" and no_model.value.param == "model"
    with pytest.raises(openai.BadRequestError, match="the prompt is empty"):
        sdk.completions.create(model=tiny_http.model_id, prompt="")
    with pytest.raises(openai.BadRequestError) as echo:
        sdk.completions.create(model=tiny_http.model_id, prompt="x", echo=True)
    assert echo.value.param == "echo"


def test_every_unserved_openai_parameter_is_refused_unless_neutral(tiny_http: TinyHttp) -> None:
    """A request is served as asked or refused, never served differently in silence: each OpenAI
    parameter lorafleet does not serve, on each endpoint that takes it, is 400 ``unsupported_parameter``
    naming it, and its neutral value is served (a mutation review: dropping the refusal of suffix,
    best_of, top_logprobs, logit_bias, frequency_penalty, functions, function_call, tool_choice or a
    completion's logprobs passed every test)."""
    headers = {"authorization": f"Bearer {tiny_http.keys['acme']}"}
    chat: dict[str, object] = {"model": tiny_http.model_id, "messages": CHAT, "max_tokens": 1}
    completion: dict[str, object] = {"model": tiny_http.model_id, "prompt": "x", "max_tokens": 1}
    function = {"name": "f", "parameters": {}}
    refused: list[tuple[str, dict[str, object], str, object]] = [
        ("chat/completions", chat, "n", 2),
        ("chat/completions", chat, "presence_penalty", 0.5),
        ("chat/completions", chat, "frequency_penalty", -0.5),
        ("chat/completions", chat, "logit_bias", {"50256": -100}),
        ("chat/completions", chat, "logprobs", True),
        ("chat/completions", chat, "top_logprobs", 0),
        ("chat/completions", chat, "tools", [{"type": "function", "function": function}]),
        ("chat/completions", chat, "tool_choice", {"type": "function", "function": {"name": "f"}}),
        ("chat/completions", chat, "functions", [function]),
        ("chat/completions", chat, "function_call", {"name": "f"}),
        ("chat/completions", chat, "response_format", {"type": "json_object"}),
        ("completions", completion, "n", 3),
        ("completions", completion, "presence_penalty", 1),
        ("completions", completion, "frequency_penalty", 0.1),
        ("completions", completion, "logit_bias", {"1": 1}),
        ("completions", completion, "logprobs", 0),
        ("completions", completion, "echo", True),
        ("completions", completion, "suffix", ""),
        ("completions", completion, "best_of", 2),
        ("completions", completion, "mirostat", 2),  # not even declared
    ]
    for route, body, name, value in refused:
        answer = httpx.post(f"{tiny_http.url}/v1/{route}", json={**body, name: value}, headers=headers, timeout=30)
        assert answer.status_code == 400, (route, name, value, answer.text)
        error = answer.json()["error"]
        assert (error["param"], error["code"]) == (name, "unsupported_parameter"), (route, name, error)
    neutral: list[tuple[str, dict[str, object], dict[str, object]]] = [
        (
            "chat/completions",
            chat,
            {
                "n": 1,
                "presence_penalty": 0,
                "frequency_penalty": 0.0,
                "logit_bias": {},
                "logprobs": False,
                "tools": [],
                "tool_choice": "none",
                "functions": [],
                "function_call": "none",
                "response_format": {"type": "text"},
            },
        ),
        (
            "completions",
            completion,
            {"n": 1, "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}, "echo": False, "best_of": 1},
        ),
    ]
    for route, body, values in neutral:
        answer = httpx.post(f"{tiny_http.url}/v1/{route}", json={**body, **values}, headers=headers, timeout=30)
        assert answer.status_code == 200, (route, answer.text)


def test_the_engines_refusals_name_the_parameter_too(tiny_http: TinyHttp) -> None:
    """What the engine refuses (not the request schema) names its field in the API's words: they all had
    ``param: null``, so a client could not tell which field to fix."""
    sdk = client(tiny_http)
    with pytest.raises(openai.BadRequestError, match="the prompt is empty") as empty:
        sdk.completions.create(model=tiny_http.model_id, prompt="")
    assert empty.value.param == "prompt"
    with pytest.raises(openai.BadRequestError, match="stop takes") as stop:
        sdk.chat.completions.create(model=tiny_http.model_id, messages=CHAT, max_tokens=2, stop=[""])  # type: ignore[arg-type]
    assert stop.value.param == "stop"
    long = [{"role": "user", "content": "word " * 300}]
    with pytest.raises(openai.BadRequestError, match="exceeds the context") as chat:
        sdk.chat.completions.create(model=tiny_http.model_id, messages=long, max_tokens=2)  # type: ignore[arg-type]
    assert chat.value.param == "messages" and chat.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="exceeds the context") as plain:
        sdk.completions.create(model=tiny_http.model_id, prompt="word " * 300, max_tokens=2)
    assert plain.value.param == "prompt"
    with pytest.raises(openai.BadRequestError, match="exceeds the context") as embed:
        sdk.embeddings.create(model=tiny_http.model_id, input=["x", "word " * 300])
    assert embed.value.param == "input"


def test_loose_types_and_unbounded_lists_are_refused_before_any_work(tiny_http: TinyHttp) -> None:
    """Found by an outside review: a string or a number for a boolean, a string or a boolean for a number,
    both token limits disagreeing, and 4 MiB of empty turns (which held the event loop ~0.7 s) were all
    taken; each is now a 400 naming its parameter."""
    headers = {"authorization": f"Bearer {tiny_http.keys['acme']}"}
    cases: list[tuple[dict[str, object], str]] = [
        ({"stream": "yes"}, "stream"),
        ({"stream": 1}, "stream"),
        ({"temperature": "0.5"}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"top_p": True}, "top_p"),
        ({"logprobs": 0}, "logprobs"),
        ({"presence_penalty": False}, "presence_penalty"),
        ({"repetition_penalty": "1.1"}, "repetition_penalty"),
        ({"max_tokens": 3, "max_completion_tokens": 4}, "max_tokens"),
        ({"messages": CHAT * 1025}, "messages"),
        ({"logit_bias": {str(i): 0 for i in range(1025)}}, "logit_bias"),
        ({"tools": [{}] * 129}, "tools"),
    ]
    for override, param in cases:
        body = {"model": tiny_http.model_id, "messages": CHAT, "max_tokens": 2, **override}
        answer = httpx.post(f"{tiny_http.url}/v1/chat/completions", json=body, headers=headers, timeout=30)
        assert answer.status_code == 400, (override, answer.text)
        assert str(answer.json()["error"]["param"]).startswith(param), (override, answer.json())
    for fine in ({"temperature": 0}, {"max_tokens": 2, "max_completion_tokens": 2}):  # an int is a number
        body = {"model": tiny_http.model_id, "messages": CHAT, "max_tokens": 2, **fine}
        answer = httpx.post(f"{tiny_http.url}/v1/chat/completions", json=body, headers=headers, timeout=30)
        assert answer.status_code == 200, (fine, answer.text)
    listed = httpx.get(f"{tiny_http.url}/v1/models/", headers=headers, timeout=30)  # a trailing slash
    assert listed.status_code == 200 and listed.json()["object"] == "list"
    probe = httpx.head(f"{tiny_http.url}/health", timeout=30)  # load balancers probe with HEAD too
    assert probe.status_code == 200 and probe.content == b""


def test_responses_name_the_replica_and_a_disagreeing_routing_header_is_refused(tiny_http: TinyHttp) -> None:
    replica = tiny_http.service.config.replica_name
    assert replica
    sdk = client(tiny_http)
    routed = sdk.chat.completions.with_raw_response.create(
        model="acme/support",
        messages=CHAT,
        max_tokens=2,
        temperature=0,
        extra_headers={"x-lorafleet-adapter": "acme/support"},
    )
    assert routed.headers["x-lorafleet-replica"] == replica
    assert routed.parse().model == "acme/support@1"
    no_key = httpx.post(f"{tiny_http.url}/v1/chat/completions", json={"model": "acme/support"}, timeout=30)
    assert no_key.status_code == 401 and no_key.headers["x-lorafleet-replica"] == replica  # refusals too
    for call in (
        lambda h: sdk.chat.completions.create(model="acme/support", messages=CHAT, max_tokens=2, extra_headers=h),
        lambda h: sdk.completions.create(model=tiny_http.model_id, prompt="x", max_tokens=2, extra_headers=h),
        lambda h: sdk.embeddings.create(model="acme/support", input="x", extra_headers=h),
    ):
        with pytest.raises(openai.BadRequestError) as refused:
            call({"x-lorafleet-adapter": "acme/other"})
        assert refused.value.param == "model" and "x-lorafleet-adapter" in refused.value.message
    base = sdk.completions.create(
        model=tiny_http.model_id, prompt="x", max_tokens=2, extra_headers={"x-lorafleet-adapter": tiny_http.model_id}
    )
    assert base.usage is not None and base.usage.completion_tokens == 2


def test_bodies_over_the_message_limit_are_refused(tiny_http: TinyHttp) -> None:
    url = f"{tiny_http.url}/v1/completions"
    big = {"model": tiny_http.model_id, "prompt": "word " * 300_000, "max_tokens": 1}  # 1.5 MB > 1 MiB
    auth = {"authorization": f"Bearer {tiny_http.keys['acme']}"}
    declared = httpx.post(url, json=big, headers=auth, timeout=60)
    assert declared.status_code == 413 and declared.json()["error"]["code"] == "request_too_large"
    assert httpx.post(url, json=big, timeout=60).status_code == 401  # no key: refused before the size

    def chunks() -> Iterator[bytes]:  # no Content-Length: cut off while it is read
        yield b'{"model": "x", "prompt": "'
        for _ in range(40):
            yield b"y" * 65536
        yield b'"}'

    streamed = httpx.post(url, content=chunks(), headers={**auth, "content-type": "application/json"}, timeout=60)
    assert streamed.status_code == 413
    counted = tiny_http.metric("lorafleet_requests_total", rpc="POST /v1/completions", code="RESOURCE_EXHAUSTED")
    assert counted >= 2


def test_unknown_and_foreign_adapters_are_the_same_not_found(tiny_http: TinyHttp) -> None:
    sdk = client(tiny_http)
    with pytest.raises(openai.NotFoundError) as foreign:
        sdk.chat.completions.create(model="beta/secret", messages=CHAT)  # type: ignore[arg-type]
    with pytest.raises(openai.NotFoundError) as unknown:
        sdk.chat.completions.create(model="beta/nothing", messages=CHAT)  # type: ignore[arg-type]
    foreign_error, unknown_error = foreign.value.body, unknown.value.body
    assert isinstance(foreign_error, dict) and isinstance(unknown_error, dict)
    assert foreign_error["message"].replace("secret", "X") == unknown_error["message"].replace("nothing", "X")
    assert foreign_error["code"] == "model_not_found" and foreign_error["param"] == "model"
    beta = client(tiny_http, "beta").chat.completions.create(model="beta/secret", messages=CHAT, max_tokens=2)
    assert beta.model == "beta/secret@1"


def test_an_incompatible_adapter_is_a_bad_request_that_says_why(tiny_http: TinyHttp) -> None:
    from e2elib import lora_config_json, plant_version

    plant_version(
        tiny_http.service.store.root,
        "acme",
        "elsewhere",
        1,
        {"adapter_config.json": lora_config_json(8, ["q_proj"]), "adapter_model.safetensors": b"x"},
        base_fingerprint="sha256:another-base",
    )
    with pytest.raises(openai.BadRequestError) as refused:
        client(tiny_http).chat.completions.create(model="acme/elsewhere", messages=CHAT, max_tokens=2)  # type: ignore[arg-type]
    assert refused.value.code == "adapter_incompatible" and refused.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as streamed:  # refused before the stream starts, same status
        client(tiny_http).chat.completions.create(model="acme/elsewhere", messages=CHAT, max_tokens=2, stream=True)  # type: ignore[arg-type]
    assert streamed.value.code == "adapter_incompatible"


def test_text_that_is_not_unicode_is_a_bad_request_on_every_endpoint(tiny_http: TinyHttp) -> None:
    """JSON's "\\ud800" decodes to a lone surrogate, which has no UTF-8 form (the tokenizer raised: a 500)."""
    headers = {"authorization": f"Bearer {tiny_http.keys['acme']}", "content-type": "application/json"}
    model = tiny_http.model_id
    bodies = {
        "completions": ({"model": model, "prompt": "a\ud800b"}, "prompt"),
        "chat/completions": (
            {"model": model, "messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "\udfff"}]},
            "messages[1].content",
        ),
        "embeddings": ({"model": model, "input": ["fine", "x\ud83d"]}, "prompt"),
    }
    for route, (body, what) in bodies.items():
        raw = json.dumps(body)  # ASCII JSON: the surrogate goes as its escape, as a client's would send it
        assert "\\ud" in raw
        answer = httpx.post(f"{tiny_http.url}/v1/{route}", content=raw, headers=headers, timeout=60)
        assert answer.status_code == 400, (route, answer.text)
        error = answer.json()["error"]
        assert f"{what} is not valid Unicode text: a lone surrogate" in error["message"], error
        assert error["type"] == "invalid_request_error"
    # the embeddings call's valid input was cancelled with it: gone before the next test counts
    wait_for(lambda: tiny_http.service.engine.load_stats() == (0, 0), 30, "the cancelled input gone")


def test_an_embeddings_call_of_more_inputs_than_its_tenant_may_queue_is_served(tiny_http: TinyHttp) -> None:
    """The "tight" key may have one request waiting for a row. Each input is one engine request, and all were submitted
    at once: a call of three inputs was refused 429 every time, however often it was retried. Now at
    most that many are in the engine at once."""
    engine = tiny_http.service.engine
    wait_for(lambda: engine.load_stats() == (0, 0), 30, "no request of an earlier test left")
    texts = ["one", "two", "three"]
    got = client(tiny_http, "tight").embeddings.create(model=tiny_http.model_id, input=texts)
    alone = client(tiny_http, "acme").embeddings.create(model=tiny_http.model_id, input=texts)
    assert [d.index for d in got.data] == [0, 1, 2]
    assert [d.embedding for d in got.data] == [d.embedding for d in alone.data]


def test_an_embeddings_call_serves_every_input_from_one_adapter_version(tiny_http: TinyHttp, peft_adapter: Any) -> None:
    """Found by an outside review: each input resolved the adapter's latest version when it was
    submitted, and at most a batch's rows are submitted at once, so a version published mid-call
    served the later inputs while the answer named the first's version. The call resolves it once."""
    service, engine = tiny_http.service, tiny_http.service.engine
    spec = service.base.spec
    service.store.import_peft(peft_adapter(seed=5), "acme", "swapped", spec)
    service.engine.adapters.versions.refresh()
    wait_for(lambda: engine.load_stats() == (0, 0), 30, "no request of an earlier test left")
    texts = [f"input number {i}" for i in range(6)]  # 4 rows: 2 inputs wait for the first to finish
    sdk = client(tiny_http)
    answer: list[Any] = []
    with engine_held(engine):
        call = threading.Thread(target=lambda: answer.append(sdk.embeddings.create(model="acme/swapped", input=texts)))
        call.start()
        wait_for(lambda: engine.load_stats()[1] >= 4, 30, "the first inputs queued")
        service.store.import_peft(peft_adapter(seed=6), "acme", "swapped", spec)
        service.engine.adapters.versions.refresh()  # the watcher's pass: latest is @2 from now on
    call.join(60)
    [mixed] = answer
    one = sdk.embeddings.create(model="acme/swapped@1", input=texts)
    two = sdk.embeddings.create(model="acme/swapped@2", input=texts[:1])
    assert mixed.model == "acme/swapped@1"
    assert [d.embedding for d in mixed.data] == [d.embedding for d in one.data]
    assert two.data[0].embedding != one.data[0].embedding  # the versions do differ


def test_an_embeddings_call_refused_midway_leaves_no_work_behind(tiny_http: TinyHttp) -> None:
    """The tight key's row and its one waiting place are taken by chat calls: the embeddings call is
    refused (429) and none of its inputs is left in the engine, computed or metered."""
    engine = tiny_http.service.engine
    wait_for(lambda: engine.load_stats() == (0, 0), 30, "no request of an earlier test left")

    def metered() -> int:
        return sum(row.requests for row in engine.usage.report(0, 4e9) if row.tenant == "tight")

    before = metered()
    sdk = client(tiny_http, "tight")
    with _tight_queue_full(tiny_http, sdk) as served, pytest.raises(openai.RateLimitError):
        sdk.embeddings.create(model=tiny_http.model_id, input=["one", "two", "three"])
    assert len(served) == 2
    wait_for(lambda: engine.load_stats() == (0, 0), 30, "nothing of the refused call left")
    assert metered() == before + 2  # the chats; none of the refused call's inputs


def test_an_embeddings_call_with_a_refused_input_cancels_the_others(tiny_http: TinyHttp) -> None:
    """One input refused (a lone surrogate, 400) while another waits in the engine: the call's answer
    cancels the other, so nothing of the refused call is computed or metered after it (a mutation that
    left the other inputs running passed every test: the engine ran them for nobody)."""
    engine = tiny_http.service.engine
    wait_for(lambda: engine.load_stats() == (0, 0), 30, "no request of an earlier test left")

    def metered() -> int:
        return sum(row.requests for row in engine.usage.report(0, 4e9) if row.tenant == "acme")

    before = metered()
    headers = {"authorization": f"Bearer {tiny_http.keys['acme']}", "content-type": "application/json"}
    raw = json.dumps({"model": tiny_http.model_id, "input": ["a fine input", "x\ud83d"]})
    with engine_held(engine):  # the fine input waits in the queue: no step runs it, so no answer waits for it
        answer = httpx.post(f"{tiny_http.url}/v1/embeddings", content=raw, headers=headers, timeout=15)
        assert answer.status_code == 400, answer.text
    wait_for(lambda: engine.load_stats() == (0, 0), 30, "the fine input gone")
    assert metered() == before


@contextlib.contextmanager
def _tight_queue_full(tiny_http: TinyHttp, sdk: openai.OpenAI) -> Iterator[list[object]]:
    """The engine held and two chat calls of ``sdk`` (the tight key's) queued in it, for the block: one
    will take the key's one row (max_running 1), one waits (max_waiting 1). Then the engine runs them.
    Yields the list their answers are appended to (filled once the block has ended)."""
    engine = tiny_http.service.engine
    results: list[object] = []
    calls = [
        threading.Thread(
            target=lambda: results.append(
                sdk.chat.completions.create(model=tiny_http.model_id, messages=CHAT, max_tokens=2)  # type: ignore[arg-type]
            )
        )
        for _ in range(2)
    ]
    try:
        with engine_held(engine):
            for number, call in enumerate(calls, 1):
                call.start()
                wait_for(lambda n=number: engine.load_stats()[1] >= n, 30, f"request {number} queued")
            yield results
    finally:
        for call in calls:
            call.join(60)  # the engine runs them once released


def test_a_caller_that_leaves_before_a_worker_takes_its_request_drops_it(
    tiny_http: TinyHttp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by a review: the HTTP edge waited for the submit without watching the connection, so a
    request whose caller had left was still tokenized (the stall the per-tenant pool fixed for gRPC)."""
    import asyncio

    from lorafleet_server.engine.engine import SUBMIT_THREADS

    engine = tiny_http.service.engine
    encoded: list[str] = []
    encode = engine.prompts.encode

    def slowly(prompt: str | None, *args: object, **kwargs: object) -> list[int]:
        if prompt is not None and prompt.startswith("slow"):
            encoded.append(prompt)
            time.sleep(1.0)  # the callers leave at 0.3 s, while the first ones are still being encoded
        return encode(prompt, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(engine.prompts, "encode", slowly)
    headers = {"authorization": f"Bearer {tiny_http.keys['acme']}"}

    async def leave_early() -> None:
        async with httpx.AsyncClient(timeout=0.3) as http:

            async def call(i: int) -> None:
                body = {"model": tiny_http.model_id, "prompt": f"slow {i}", "max_tokens": 1}
                with contextlib.suppress(httpx.TimeoutException):
                    await http.post(f"{tiny_http.url}/v1/completions", json=body, headers=headers)

            await asyncio.gather(*(call(i) for i in range(5 * SUBMIT_THREADS)))

    asyncio.run(leave_early())
    wait_for(lambda: engine.places.submitting == 0 and engine.load_stats() == (0, 0), 30, "every place given back")
    assert len(encoded) <= SUBMIT_THREADS + 2, len(encoded)  # those a worker had started, not all 40


def test_an_end_of_sequence_is_finish_reason_stop(tiny_http: TinyHttp) -> None:
    """OpenAI says "stop" for a natural end; "length" would tell clients the answer was cut (a mutation
    test found no HTTP test where the model ends by itself: the tiny model never does)."""
    engine = tiny_http.service.engine
    eos = engine.eos_token_ids
    engine.eos_token_ids = frozenset(range(len(engine.tokenizer)))  # whatever it picks ends it
    try:
        got = client(tiny_http, "acme").chat.completions.create(
            model=tiny_http.model_id,
            messages=CHAT,  # type: ignore[arg-type]
            max_tokens=8,
        )
    finally:
        engine.eos_token_ids = eos
    assert got.choices[0].finish_reason == "stop" and got.usage is not None and got.usage.completion_tokens == 1


def test_a_full_queue_is_429(tiny_http: TinyHttp) -> None:
    sdk = client(tiny_http, "tight")
    with _tight_queue_full(tiny_http, sdk) as results, pytest.raises(openai.RateLimitError) as refused:
        sdk.chat.completions.create(model=tiny_http.model_id, messages=CHAT, max_tokens=2)  # type: ignore[arg-type]
    assert refused.value.body["type"] == "rate_limit_error"  # type: ignore[index]
    assert refused.value.response.headers["retry-after"] == "1"
    assert len(results) == 2  # the queued ones were served


def test_a_disconnect_mid_stream_cancels_the_engine_request(tiny_http: TinyHttp) -> None:
    engine = tiny_http.service.engine
    labels = {"rpc": "POST /v1/completions", "code": "CANCELLED"}
    cancelled = tiny_http.metric("lorafleet_requests_total", **labels)
    finished = tiny_http.metric("lorafleet_generations_total", reason="cancelled")
    body = {"model": tiny_http.model_id, "prompt": "Once", "max_tokens": 200, "temperature": 0, "stream": True}
    headers = {"authorization": f"Bearer {tiny_http.keys['acme']}"}
    with httpx.Client(timeout=60) as http:
        response = http.send(
            http.build_request("POST", f"{tiny_http.url}/v1/completions", json=body, headers=headers), stream=True
        )
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        with engine_held(engine):  # no step runs until the server has seen the client go
            response.close()
            wait_for(lambda: tiny_http.metric("lorafleet_requests_total", **labels) > cancelled, 30, "the disconnect")
            assert engine.load_stats()[0] == 1  # still holding its row while the engine is held
        # The cancel was queued before the engine's next step: the row is free after at most one.
        wait_for(lambda: engine.load_stats() == (0, 0), 10, "the row freed")
    assert tiny_http.metric("lorafleet_generations_total", reason="cancelled") == finished + 1

    def queued() -> bool:
        return engine.load_stats()[1] == 1

    def count() -> float:
        return tiny_http.metric("lorafleet_requests_total", **labels)

    # Not streaming: a client that leaves (its timeout, say) cancels the request the same way.
    with engine_held(engine):
        post_then_leave(tiny_http.url, "/v1/completions", {**body, "stream": False}, headers, queued)
        wait_for(lambda: count() >= cancelled + 2, 30, "the disconnect")
    assert count() == cancelled + 2
    wait_for(lambda: engine.load_stats() == (0, 0), 10, "the row freed")
    assert tiny_http.metric("lorafleet_generations_total", reason="cancelled") == finished + 2

    # Streaming, gone before the first token (queued here): seen while the engine is still held.
    with engine_held(engine):
        post_then_leave(tiny_http.url, "/v1/completions", body, headers, queued)
        wait_for(lambda: count() >= cancelled + 3, 30, "the disconnect")
        assert count() == cancelled + 3
    wait_for(lambda: engine.load_stats() == (0, 0), 10, "the request gone")


def test_every_http_call_is_counted_under_its_route(tiny_http: TinyHttp) -> None:
    before = tiny_http.metric("lorafleet_requests_total", rpc="GET /v1/models", code="OK")
    client(tiny_http).models.list()
    assert tiny_http.metric("lorafleet_requests_total", rpc="GET /v1/models", code="OK") == before + 1
    before = tiny_http.metric("lorafleet_requests_total", rpc="POST /v1/completions", code="INVALID_ARGUMENT")
    with pytest.raises(openai.BadRequestError):
        client(tiny_http).completions.create(model=tiny_http.model_id, prompt="x", extra_body={"bogus": 1})
    assert (
        tiny_http.metric("lorafleet_requests_total", rpc="POST /v1/completions", code="INVALID_ARGUMENT") == before + 1
    )
    names = {
        s.labels["rpc"]
        for family in tiny_http.service.metrics.registry.collect()
        if family.name == "lorafleet_requests"
        for s in family.samples
    }
    http_names = {n for n in names if "/" in n}
    assert http_names <= {
        "POST /v1/embeddings",
        "GET /v1/models",
        "GET /v1/models/{model}",
        "POST /v1/completions",
        "POST /v1/chat/completions",
        "other",
    }


# -- draining ----------------------------------------------------------------------------------------


@pytest.fixture
def open_http(tiny_model_dir: Path, tmp_path: Path) -> Iterator[tuple[BackgroundHttpServer, Service]]:
    """A tiny server without keys (loopback), for a test that stops its engine."""
    service = tiny_service(tiny_model_dir, tmp_path / "adapters", port=0, metrics_port=0)
    keys = server_keys(service.config)
    keys.load()
    server = BackgroundHttpServer(service, keys)
    server.start()
    try:
        yield server, service
    finally:
        server.stop()
        service.engine.shutdown(0.0)


def test_a_base_model_request_without_keys_logs_no_tenant_nor_adapter(
    open_http: tuple[BackgroundHttpServer, Service], caplog: pytest.LogCaptureFixture
) -> None:
    """Found by an outside review: without keys the request log takes the tenant from the adapter, and
    the HTTP edge gave it the model id, so a base-model call was logged as tenant "HuggingFaceTB" (the
    id's organisation), where the gRPC edge logs none."""
    server, service = open_http
    model = service.info.model_id
    sdk = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    with caplog.at_level(logging.INFO, logger="lorafleet.requests"):
        sdk.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], max_tokens=1)
        sdk.embeddings.create(model=model, input="x")
        sdk.models.retrieve(model)
    logged = [r.fields for r in caplog.records if r.name == "lorafleet.requests"]  # type: ignore[attr-defined]
    assert len(logged) == 3 and all((f["tenant"], f["adapter"]) == ("", "") for f in logged), logged


def test_draining_is_503(open_http: tuple[BackgroundHttpServer, Service]) -> None:
    server, service = open_http
    model = service.info.model_id
    sdk = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    assert sdk.completions.create(model=model, prompt="x", max_tokens=1).choices[0].finish_reason == "length"
    server.server.drain()
    assert httpx.get(f"{server.url}/health").status_code == 503  # load balancers move away...
    assert sdk.completions.create(model=model, prompt="x", max_tokens=1).usage is not None  # ...still served
    service.engine.shutdown(0.0)  # then the engine refuses new work
    with pytest.raises(openai.InternalServerError) as refused:
        sdk.completions.create(model=model, prompt="x", max_tokens=1)
    assert refused.value.status_code == 503 and refused.value.response.headers["retry-after"] == "1"
    assert refused.value.body["type"] == "service_unavailable_error"  # type: ignore[index]


@pytest.mark.parametrize("route", ["completions", "chat/completions", "embeddings"])
def test_a_request_the_server_cuts_is_a_503_not_a_cut_answer(
    open_http: tuple[BackgroundHttpServer, Service], route: str
) -> None:
    """A non-streaming request cut by a forced stop (its summary says CANCELLED while the client is still
    there) is 503 ``service_unavailable_error``, which clients retry elsewhere, as the gRPC edge's
    UNAVAILABLE (a mutation review: a 200 with finish_reason "stop" and whatever text it had, and an
    embeddings call's 500, passed every test)."""
    from lorafleet_server.engine.types import FinishReason

    server, service = open_http
    engine = service.engine
    text = "The capital of France is"
    body: dict[str, object] = {
        "completions": {"prompt": text, "max_tokens": 2},
        "chat/completions": {"messages": [{"role": "user", "content": text}], "max_tokens": 2},
        "embeddings": {"input": text},
    }[route]
    body["model"] = service.info.model_id
    answers: list[httpx.Response] = []

    def cut() -> None:  # what a forced stop does to a request that has not run: a CANCELLED summary
        for r in list(engine._waiting):
            engine._finish(r, FinishReason.CANCELLED)

    caller = threading.Thread(
        target=lambda: answers.append(httpx.post(f"{server.url}/v1/{route}", json=body, timeout=60))
    )
    with engine_held(engine):
        caller.start()
        wait_for(lambda: engine.load_stats() == (0, 1), 30, "the request submitted")
        after = engine.call(cut)  # handled once released, right after the request is queued
    after.result(10)
    caller.join(30)
    [answer] = answers
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"]["type"] == "service_unavailable_error" and answer.headers["retry-after"] == "1"


def test_a_stream_the_server_cuts_after_its_text_ends_with_an_error_event(
    open_http: tuple[BackgroundHttpServer, Service], monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the status line an error can only go in the stream: a stream cut by a forced stop once it
    sent text ends with an OpenAI-shaped error event, not [DONE] and not a bare cut of the connection
    (a mutation review: a stream that just stopped, with neither, passed every test)."""
    server, service = open_http
    step = service.engine.runner.step

    def slow_step(*args: object, **kwargs: object) -> object:  # 64 tokens take ~6 s: the stop comes first
        time.sleep(0.1)
        return step(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(service.engine.runner, "step", slow_step)
    monkeypatch.setattr(service.engine, "eos_token_ids", frozenset())
    body = {"model": service.info.model_id, "prompt": "Once", "max_tokens": 64, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        lines = (line for line in response.iter_lines() if line)
        assert json.loads(next(lines).removeprefix("data: "))["choices"][0]["text"]  # it has sent text
        service.engine.shutdown(0.0)  # a forced stop: the running request is cut
        rest = list(lines)
    assert rest and "data: [DONE]" not in rest, rest
    error = json.loads(rest[-1].removeprefix("data: "))["error"]
    assert error["type"] == "service_unavailable_error", error


def test_health_follows_an_engine_that_stopped_accepting(open_http: tuple[BackgroundHttpServer, Service]) -> None:
    """An engine that no longer accepts work (its loop crashed, or it was shut down) refuses every
    request, so /health must say so without a drain, as the gRPC health does (a mutation review: /health
    answering SERVING for a stopped engine passed every test; load balancers kept routing to it)."""
    server, service = open_http
    assert httpx.get(f"{server.url}/health", timeout=30).json() == {"status": "SERVING"}
    service.engine.shutdown(0.0)  # not drained: the server's own flag still says serving
    answer = httpx.get(f"{server.url}/health", timeout=30)
    assert answer.status_code == 503 and answer.json() == {"status": "NOT_SERVING"}


def test_a_client_too_slow_with_its_head_or_body_is_cut_off(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Found by an outside review: half a request head, or a body short of its Content-Length, held the
    connection (and a descriptor of the process that serves gRPC too) for as long as the client liked.
    Now the head has HttpTimeouts.head_seconds (the connection is closed) and the body body_seconds (408),
    while a response that takes longer than either (a stream) is not cut."""
    service = tiny_service(tiny_model_dir, tmp_path / "adapters", port=0, metrics_port=0)
    keys = server_keys(service.config)
    keys.load()
    deadline = 1.0  # both; each wait below is well clear of it (a loaded CI machine is slow)
    server = BackgroundHttpServer(service, keys, timeouts=HttpTimeouts(head_seconds=deadline, body_seconds=deadline))
    port = server.start()

    def closed_within(sock: socket.socket, seconds: float) -> bytes:
        sock.settimeout(seconds)
        got = b""
        while chunk := sock.recv(4096):  # b"": the server closed it (a timeout raises)
            got += chunk
        return got

    def one_response(sock: socket.socket) -> bytes:
        """One whole response (head and Content-Length body), however the server's writes arrive: a
        head and its body may come in two reads. b"" when the server closed the connection first."""
        got = b""
        while b"\r\n\r\n" not in got:
            if not (chunk := sock.recv(4096)):
                return got
            got += chunk
        head, _, body = got.partition(b"\r\n\r\n")
        length = int(
            next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
        )
        while len(body) < length and (chunk := sock.recv(4096)):
            body += chunk
        return head + b"\r\n\r\n" + body

    try:
        with socket.create_connection(("127.0.0.1", port)) as half_head:
            opened = time.monotonic()
            half_head.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
            # A byte every 0.25 s for up to 4 s does not extend it: a deadline reset by each byte (an
            # idle timeout) would never close it while they come.
            half_head.settimeout(0.25)
            closed_after = None
            while closed_after is None and time.monotonic() - opened < 4 * deadline:
                try:
                    assert half_head.recv(4096) == b"", "a head timeout closes without an answer"
                    closed_after = time.monotonic() - opened
                except TimeoutError:
                    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                        half_head.sendall(b"X")
                except ConnectionResetError:  # our byte crossed the server's close
                    closed_after = time.monotonic() - opened
            assert closed_after is not None, "a trickled head held the connection"
            assert closed_after >= deadline / 2, closed_after  # not at once (the server's clock starts first)
        with socket.create_connection(("127.0.0.1", port)) as short_body:
            short_body.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b'Content-Length: 1000\r\n\r\n{"model": '
            )
            answer = closed_within(short_body, 5)
            assert answer.startswith(b"HTTP/1.1 408 ") and b'"code":"request_timeout"' in answer, answer
        with socket.create_connection(("127.0.0.1", port)) as kept:  # kept alive: each head has its own time
            kept.settimeout(5)
            for _ in range(4):  # 0.4 s apart: 1.6 s in all on one connection, past the 1 s deadline
                kept.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                assert one_response(kept).startswith(b"HTTP/1.1 200 "), "the kept-alive connection was closed"
                time.sleep(0.4)
        model = service.info.model_id
        body = {"model": model, "prompt": "Once", "max_tokens": 24, "stream": True}
        with httpx.Client(base_url=server.url, timeout=30) as client:
            with client.stream("POST", "/v1/completions", json=body) as stream:
                lines = []
                for line in stream.iter_lines():
                    if not lines:  # the stream stalls 2 s on the server, past both deadlines: not cut
                        with engine_held(service.engine):
                            time.sleep(2 * deadline)
                    lines.append(line)
            assert "data: [DONE]" in lines
        labels = {"rpc": "POST /v1/completions", "code": "DEADLINE_EXCEEDED"}
        assert service.metrics.registry.get_sample_value("lorafleet_requests_total", labels) == 1
    finally:
        server.stop()
        service.engine.shutdown(0.0)


def test_a_declared_body_over_the_limit_is_read_before_the_413() -> None:
    """Found by an outside review of the fleet: the 413 was sent and the connection closed with the
    body unread, so the socket was reset and Envoy, still uploading, answered its own 503 instead
    (which clients retry). A body up to 4x the limit is read and dropped first; a larger one is not."""
    import asyncio as aio

    from prometheus_client import CollectorRegistry

    from lorafleet_server.edge.observe import CallObserver
    from lorafleet_server.http.limits import BodyLimit
    from lorafleet_server.metrics import Metrics

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("a refused body never reaches the app")

    def run(declared: int, expect: bool = False) -> tuple[int, list[int]]:
        parts = [b"x" * 65536] * (declared // 65536)
        read: list[int] = []
        sent: list[int] = []

        async def receive() -> dict[str, Any]:
            read.append(len(parts[len(read)]))
            return {"type": "http.request", "body": parts[len(read) - 1], "more_body": len(read) < len(parts)}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                sent.append(message["status"])

        limit = BodyLimit(app, 1 << 20, CallObserver(Metrics(CollectorRegistry())))
        headers = [(b"content-length", str(declared).encode())] + ([(b"expect", b"100-continue")] if expect else [])
        aio.run(limit({"type": "http", "method": "POST", "path": "/v1/completions", "headers": headers}, receive, send))
        return sum(read), sent

    assert run(3 << 20) == (3 << 20, [413])  # read to its end, then refused
    assert run(5 << 20) == (0, [413])  # past 4x the limit: refused at once, nothing read
    assert run(3 << 20, expect=True) == (0, [413])  # it waits for "100 Continue": nothing sent, none invited


def test_a_body_of_exactly_the_limit_is_served_and_a_refusal_closes_the_connection() -> None:
    """--max-message-bytes is the largest body served, as gRPC's message limit is the largest message:
    a body of exactly that many bytes, declared or chunked, reaches the app (a mutation that refused it
    survived). A declared body over it is refused with ``connection: close`` (the rest may be unread)."""
    import asyncio as aio

    from prometheus_client import CollectorRegistry

    from lorafleet_server.edge.observe import CallObserver
    from lorafleet_server.http.limits import BodyLimit
    from lorafleet_server.metrics import Metrics

    limit = 1 << 16

    def run(size: int, declared: bool) -> tuple[int, int, dict[bytes, bytes]]:
        """(bytes the app read, the status sent, its headers) for a body of ``size`` bytes in two parts."""
        parts = [b"x" * (size // 2), b"x" * (size - size // 2)]
        got: list[bytes] = []
        sent: list[dict[str, Any]] = []

        async def app(scope: Any, receive: Any, send: Any) -> None:
            while True:
                message = await receive()
                got.append(message.get("body", b""))
                if not message.get("more_body", False):
                    break
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b""})

        reads = iter(range(len(parts)))

        async def receive() -> dict[str, Any]:
            index = next(reads)  # a third read (the app's or the drain's) would be a bug: StopIteration
            return {"type": "http.request", "body": parts[index], "more_body": index + 1 < len(parts)}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        headers = [(b"content-length", str(size).encode())] if declared else []
        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": headers}
        aio.run(BodyLimit(app, limit, CallObserver(Metrics(CollectorRegistry())))(scope, receive, send))
        start = next(m for m in sent if m["type"] == "http.response.start")
        return sum(map(len, got)), start["status"], dict(start.get("headers", ()))

    for declared in (True, False):
        assert run(limit, declared)[:2] == (limit, 200), declared
    refused = run(limit + 1, declared=True)
    assert refused[1] == 413 and refused[2].get(b"connection") == b"close"


def test_an_embeddings_calls_one_version_is_read_on_the_store_threads(
    tiny_http: TinyHttp, peft_adapter: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by an outside review: the one version of a call of several inputs was read from the store
    on the threads every request is admitted on; eight such calls to a store that did not answer held
    them all, and a base-model completion waited 11 s. It is read where the inputs' submits read it."""
    service = tiny_http.service
    service.store.import_peft(peft_adapter(seed=7), "acme", "unread", service.base.spec)  # not known yet
    resolve = service.store.resolve
    threads: list[str] = []

    def recorded(ref: Any) -> Any:
        threads.append(threading.current_thread().name)
        return resolve(ref)

    monkeypatch.setattr(service.store, "resolve", recorded)
    answer = client(tiny_http).embeddings.create(model="acme/unread", input=["one", "two"])
    assert answer.model == "acme/unread@1" and len(answer.data) == 2
    assert threads and all(name.startswith("submit-store") for name in threads), threads
