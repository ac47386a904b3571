"""Where the HTTP API answers as OpenAI's does: unknown models, the error a union field reports, limits
named by the field the client used, nulls as defaults, request ids on every refusal; and a handler
cancelled before its work started still cancels its engine request. A tiny-model server of its own
(this module plants adapter versions the listing tests of test_http_api.py would see)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime
from typing import Any

import httpx
import openai
import pytest
from enginelib import engine_held
from httplib import TinyHttp
from starlette.requests import Request

from lorafleet_adapters.head import HEAD_METHOD
from lorafleet_server.edge.observe import CallObserver
from lorafleet_server.http.app import ClientDisconnected, Health, OpenAIApi
from lorafleet_server.http.errors import BodyError, body_error
from lorafleet_server.http.schemas import CompletionRequest
from lorafleet_server.logs import REQUEST_LOGGER

CHAT = [{"role": "user", "content": "Say hello"}]


def client(live: TinyHttp, key: str = "acme") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key=live.keys[key], max_retries=0, timeout=60)


def post(live: TinyHttp, route: str, body: object, **headers: str) -> httpx.Response:
    auth = {"authorization": f"Bearer {live.keys['acme']}", "content-type": "application/json", **headers}
    return httpx.post(f"{live.url}/v1/{route}", content=json.dumps(body), headers=auth, timeout=60)


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
        time.sleep(0.01)


# -- 1. a name that is no model ----------------------------------------------------------------------


def _calls_naming(sdk: openai.OpenAI, name: str) -> list[Callable[[], object]]:
    return [
        lambda: sdk.chat.completions.create(model=name, messages=CHAT, max_tokens=2),  # type: ignore[arg-type]
        lambda: sdk.completions.create(model=name, prompt="x", max_tokens=2),
        lambda: sdk.embeddings.create(model=name, input="x"),
        lambda: sdk.models.retrieve(name),
    ]


def test_a_name_that_is_no_model_is_404_model_not_found_everywhere(tiny_http: TinyHttp) -> None:
    sdk = client(tiny_http)
    for name in ("nope", "gpt-4o", "a/b/c"):
        for call in _calls_naming(sdk, name):
            with pytest.raises(openai.NotFoundError) as missing:
                call()
            error = missing.value.body
            assert isinstance(error, dict), error
            assert error["code"] == "model_not_found" and error["param"] == "model", error
            assert "neither the base model" in error["message"] and "tenant/name" in error["message"], error


# -- 2. the error a union field reports -----------------------------------------------------------------


def test_a_union_fields_error_is_the_one_of_the_form_sent(tiny_http: TinyHttp) -> None:
    model = tiny_http.model_id
    image = [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]
    cases: list[tuple[str, dict[str, object], str, str]] = [
        ("completions", {"model": model, "prompt": ["a", "b"]}, "prompt", "at most 1 item"),
        ("completions", {"model": model, "prompt": 5}, "prompt", "a valid string or a valid list"),
        (
            "chat/completions",
            {"model": model, "messages": [{"role": "user", "content": image}]},
            "messages.0.content.0.type",
            "'text'",
        ),
        ("chat/completions", {"model": model, "messages": CHAT, "stop": ["s"] * 17}, "stop", "at most 16 items"),
        ("embeddings", {"model": model, "input": ["t"] * 65}, "input", "at most 64 items"),
        ("embeddings", {"model": model, "input": [[1, 2, 3]]}, "input.0", "a valid string"),
    ]
    for route, body, param, says in cases:
        answer = post(tiny_http, route, body)
        assert answer.status_code == 400, (body, answer.text)
        error = answer.json()["error"]
        assert error["param"] == param and error["message"].startswith(f"{param}: "), (body, error)
        assert says in error["message"], (body, error)


def test_body_error_follows_nested_unions_and_takes_member_names_out() -> None:
    def error(kind: str, loc: tuple[object, ...], msg: str) -> dict[str, object]:
        return {"type": kind, "loc": ("body", *loc), "msg": msg}

    string, number = "Input should be a valid string", "Input should be a valid integer"
    nested = [  # x: str | list[str | int], sent [None]
        error("string_type", ("x", "str"), string),
        error("string_type", ("x", "list[union[str,int]]", 0, "str"), string),
        error("int_type", ("x", "list[union[str,int]]", 0, "int"), number),
    ]
    assert body_error(nested) == BodyError("string_type", f"{string} or a valid integer", ("x", 0))
    deep = [  # the list member fits; its item is a model missing a field
        error("string_type", ("m", 0, "content", "str"), string),
        error("missing", ("m", 0, "content", "list[TextPart]", 1, "text"), "Field required"),
        error("less_than_equal", ("t",), "Input should be less than or equal to 2"),
    ]
    assert body_error(deep) == BodyError("missing", "Field required", ("m", 0, "content", 1, "text"))
    assert body_error(deep).param == "m.0.content.1.text"
    plain = [error("extra_forbidden", ("bogus",), "Extra inputs are not permitted")]
    assert body_error(plain).param == "bogus" and body_error([]).param is None


# -- 3. max_tokens over the server's limit --------------------------------------------------------------


def test_max_tokens_over_the_servers_limit_names_the_field_sent(tiny_http: TinyHttp) -> None:
    sdk = client(tiny_http)
    limit = tiny_http.service.info.max_new_tokens
    with pytest.raises(openai.BadRequestError) as completion:
        sdk.completions.create(model=tiny_http.model_id, prompt="x", max_tokens=limit + 1)
    with pytest.raises(openai.BadRequestError) as chat:
        sdk.chat.completions.create(model=tiny_http.model_id, messages=CHAT, max_completion_tokens=1000)  # type: ignore[arg-type]
    assert completion.value.param == "max_tokens" and chat.value.param == "max_completion_tokens"
    assert f"at most {limit} tokens" in completion.value.message and "1000" in chat.value.message
    done = sdk.completions.create(model=tiny_http.model_id, prompt="x", max_tokens=limit, temperature=0)
    assert done.usage is not None and 1 <= done.usage.completion_tokens <= limit  # the limit itself is fine


# -- 4. nulls as defaults, negative seeds ---------------------------------------------------------------


def test_null_is_the_default_and_a_negative_seed_is_its_unsigned_value(tiny_http: TinyHttp) -> None:
    model = tiny_http.model_id
    plain = post(tiny_http, "completions", {"model": model, "prompt": "x", "max_tokens": 2, "stream": None})
    assert plain.status_code == 200 and plain.json()["object"] == "text_completion", plain.text
    streamed = post(
        tiny_http,
        "chat/completions",
        {"model": model, "messages": CHAT, "max_tokens": 2, "stream": True, "stream_options": {"include_usage": None}},
    )
    assert streamed.status_code == 200, streamed.text
    lines = [line for line in streamed.text.splitlines() if line]
    assert lines[-1] == "data: [DONE]" and "usage" not in json.loads(lines[-2].removeprefix("data: "))
    vectors = post(tiny_http, "embeddings", {"model": model, "input": "a cat", "encoding_format": None})
    assert vectors.status_code == 200 and isinstance(vectors.json()["data"][0]["embedding"], list), vectors.text

    sdk = client(tiny_http)
    args: dict[str, Any] = {"model": model, "prompt": "Once upon a time", "max_tokens": 12, "temperature": 1.5}
    negative = sdk.completions.create(seed=-1, **args).choices[0].text
    assert negative == sdk.completions.create(seed=2**64 - 1, **args).choices[0].text  # -1 & (2**64 - 1)
    assert negative == sdk.completions.create(seed=-1, **args).choices[0].text
    with pytest.raises(openai.BadRequestError) as low:
        sdk.completions.create(seed=-(2**63) - 1, **args)
    assert low.value.param == "seed"


# -- 5. stream_options without stream ------------------------------------------------------------------


def test_stream_options_without_stream_is_refused(tiny_http: TinyHttp) -> None:
    model = tiny_http.model_id
    for route, body in (
        ("chat/completions", {"model": model, "messages": CHAT, "max_tokens": 2}),
        ("completions", {"model": model, "prompt": "x", "max_tokens": 2}),
    ):
        for stream in ({}, {"stream": False}, {"stream": None}):
            answer = post(tiny_http, route, {**body, **stream, "stream_options": {"include_usage": True}})
            assert answer.status_code == 400, (route, stream, answer.text)
            error = answer.json()["error"]
            assert error["param"] == "stream_options" and "stream" in error["message"], error
        assert post(tiny_http, route, {**body, "stream_options": None}).status_code == 200  # null: not set


# -- 6. a version's own kind ---------------------------------------------------------------------------


def _plant(live: TinyHttp, name: str, version: int, kind: str, created_at: str) -> None:
    from e2elib import lora_config_json, plant_version

    root = live.service.store.root  # type: ignore[attr-defined]  # the local store of the fixture
    files = {"adapter_config.json": lora_config_json(8, ["q_proj"]), "adapter_model.safetensors": b"x"}
    plant_version(root, "acme", name, version, files, base_fingerprint=live.service.info.fingerprint)
    manifest_file = root / "acme" / name / "versions" / str(version) / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest.update(kind=kind, created_at=created_at)
    if kind == "head":  # what a head's manifest says (lorafleet_adapters.head.head_manifest)
        manifest.update(method=HEAD_METHOD, rank=0, lora_alpha=0.0, target_modules=[])
    manifest_file.write_text(json.dumps(manifest))


def test_a_model_with_a_version_is_judged_and_described_by_that_version(tiny_http: TinyHttp) -> None:
    first, second = "2021-01-01T00:00:00+00:00", "2022-06-01T00:00:00+00:00"
    _plant(tiny_http, "tohead", 1, "lora", first)  # a LoRA, then a classifier head as the latest
    _plant(tiny_http, "tolora", 1, "head", first)  # a head, then a LoRA as the latest
    _plant(tiny_http, "tohead", 2, "head", second)
    _plant(tiny_http, "tolora", 2, "lora", second)
    sdk = client(tiny_http)
    older = sdk.models.retrieve("acme/tohead@1").model_dump()
    assert older["id"] == "acme/tohead@1" and older["created"] == int(datetime.fromisoformat(first).timestamp())
    assert sdk.models.retrieve("acme/tolora").created == int(datetime.fromisoformat(second).timestamp())
    for head in ("acme/tohead", "acme/tohead@2", "acme/tolora@1"):
        with pytest.raises(openai.NotFoundError):
            sdk.models.retrieve(head)
    assert {"acme/tolora"} <= {m.id for m in sdk.models.list()} and "acme/tohead" not in {
        m.id for m in sdk.models.list()
    }


# -- 7. the request id on every refusal ---------------------------------------------------------------


def test_every_refusal_carries_the_request_id(tiny_http: TinyHttp, caplog: pytest.LogCaptureFixture) -> None:
    auth = {"authorization": f"Bearer {tiny_http.keys['acme']}", "x-request-id": "rid-77"}

    def chunks() -> Iterator[bytes]:  # no Content-Length: cut off while it is read
        yield b'{"model": "x", "prompt": "'
        for _ in range(40):
            yield b"y" * 65536
        yield b'"}'

    big = httpx.post(
        f"{tiny_http.url}/v1/completions",
        content=chunks(),
        headers={**auth, "content-type": "application/json"},
        timeout=60,
    )
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    assert big.headers["x-request-id"] == "rid-77" and big.headers["connection"] == "close"
    with caplog.at_level(logging.INFO, logger=REQUEST_LOGGER):  # none sent: logged under the id answered
        unnamed = httpx.post(
            f"{tiny_http.url}/v1/completions",
            content=chunks(),
            headers={"authorization": auth["authorization"], "content-type": "application/json"},
            timeout=60,
        )
    assert unnamed.status_code == 413
    logged = [getattr(r, "fields", {}) for r in caplog.records if r.name == REQUEST_LOGGER]
    refused = [f for f in logged if f.get("status") == "RESOURCE_EXHAUSTED"]
    assert [f["request_id"] for f in refused] == [unnamed.headers["x-request-id"]], logged
    nowhere = httpx.get(f"{tiny_http.url}/v1/nowhere", headers=auth, timeout=30)
    wrong_method = httpx.delete(f"{tiny_http.url}/v1/completions", headers=auth, timeout=30)
    assert (nowhere.status_code, wrong_method.status_code) == (404, 405)
    assert nowhere.headers["x-request-id"] == wrong_method.headers["x-request-id"] == "rid-77"
    assert wrong_method.json()["error"]["type"] == "invalid_request_error"
    fresh = httpx.get(f"{tiny_http.url}/v1/nowhere", headers={"authorization": auth["authorization"]}, timeout=30)
    assert len(fresh.headers["x-request-id"]) == 32  # none sent: a fresh one


def test_a_request_id_that_is_not_a_sane_token_is_replaced(tiny_http: TinyHttp) -> None:
    """The caller's x-request-id is echoed and logged only as a token of at most 128 of [A-Za-z0-9._:-]
    (as at the gRPC edge); anything else gets a fresh id (a mutation review: any text, or any length,
    was taken into the response headers and the request log with no test noticing)."""
    auth = {"authorization": f"Bearer {tiny_http.keys['acme']}"}
    sane = "a.B_c:9-" + "x" * 120  # 128 characters
    kept = httpx.get(f"{tiny_http.url}/v1/models", headers={**auth, "x-request-id": sane}, timeout=30)
    assert kept.status_code == 200 and kept.headers["x-request-id"] == sane
    for bad in ("x" * 129, "two words", 'quo"te', "a,b", "k=v;"):
        answer = httpx.get(f"{tiny_http.url}/v1/models", headers={**auth, "x-request-id": bad}, timeout=30)
        assert answer.status_code == 200, (bad, answer.text)
        assert len(answer.headers["x-request-id"]) == 32 and answer.headers["x-request-id"] != bad, bad


# -- 8. a handler cancelled before its work started ---------------------------------------------------


def test_a_handler_cancelled_before_its_work_started_cancels_the_engine_request(tiny_http: TinyHttp) -> None:
    """The events of a submitted request are closed by the task that reads them; a task cancelled
    before its first step never started them, so the request ran on unread to its max_tokens."""
    service = tiny_http.service
    engine = service.engine
    api = OpenAIApi(engine, service.info, CallObserver(service.metrics), 8, Health())

    def gone_first(exc: BaseException, after: int = 1) -> Any:
        """The client is gone when the handler next watches its connection, after ``after`` watched
        calls went through (the first is the submit: the request reaches the engine)."""
        calls = [0]

        async def until_disconnect(request: Request, work: Awaitable[Any]) -> Any:
            calls[0] += 1
            if calls[0] <= after:
                return await work
            close = getattr(work, "close", None)
            if close is not None:  # the work never runs
                close()
            raise exc

        return until_disconnect

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    def cancelled() -> float:
        return tiny_http.metric("lorafleet_generations_total", reason="cancelled")

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": [], "state": {}}
    body: dict[str, Any] = {"model": tiny_http.model_id, "prompt": "Once", "max_tokens": 150, "temperature": 0}
    wait_for(lambda: engine.load_stats() == (0, 0), 30, "no request of an earlier test left")
    # The loop stays open (not running) until the request is gone: a closed one would make the
    # engine's next event delivery fail, and that cancels the request too.
    loop = asyncio.new_event_loop()
    try:
        cases = ((True, asyncio.CancelledError()), (False, ClientDisconnected()), (False, RuntimeError("a bug")))
        for stream, exc in cases:
            api._until_disconnect = gone_first(exc)  # type: ignore[method-assign]
            before = cancelled()
            with engine_held(engine):
                request = CompletionRequest(**body, stream=stream)
                call = api._generate(Request(scope, receive), request, "completion")
                if isinstance(exc, asyncio.CancelledError):
                    with pytest.raises(asyncio.CancelledError):
                        loop.run_until_complete(call)
                else:
                    status = loop.run_until_complete(call).status_code
                    assert status == (499 if isinstance(exc, ClientDisconnected) else 500)
            wait_for(lambda: engine.load_stats() == (0, 0), 30, "the request gone")
            assert cancelled() == before + 1, exc  # cancelled, not run to its max_tokens
        # Gone while its submit waited: no engine request at all (none cancelled, none run)
        api._until_disconnect = gone_first(ClientDisconnected(), after=0)  # type: ignore[method-assign]
        before, reserved = cancelled(), engine.places.submitting
        call = api._generate(Request(scope, receive), CompletionRequest(**body), "completion")
        assert loop.run_until_complete(call).status_code == 499
        assert cancelled() == before and engine.places.submitting == reserved and engine.load_stats() == (0, 0)
    finally:
        loop.close()


# -- 9. the body's content type, strict integers ----------------------------------------------------------


def test_a_body_not_sent_as_json_says_so_and_integers_are_strict(tiny_http: TinyHttp) -> None:
    url = f"{tiny_http.url}/v1/completions"
    auth = {"authorization": f"Bearer {tiny_http.keys['acme']}"}
    body = json.dumps({"model": tiny_http.model_id, "prompt": "x", "max_tokens": 2})
    for headers in ({}, {"content-type": "text/plain"}, {"content-type": "application/x-www-form-urlencoded"}):
        answer = httpx.post(url, content=body, headers={**auth, **headers}, timeout=30)
        assert answer.status_code == 400, (headers, answer.text)
        error = answer.json()["error"]
        assert "Content-Type: application/json" in error["message"] and error["code"] == "invalid_content_type"
    for content_type in ("application/json; charset=utf-8", "application/vnd.api+json"):
        assert httpx.post(url, content=body, headers={**auth, "content-type": content_type}).status_code == 200
    not_an_object = httpx.post(url, content=b"[1]", headers={**auth, "content-type": "application/json"})
    assert not_an_object.status_code == 400 and "Content-Type" not in not_an_object.json()["error"]["message"]

    model = tiny_http.model_id
    for field, value in (("max_tokens", True), ("max_tokens", "2"), ("max_tokens", 2.0), ("seed", True), ("n", True)):
        answer = post(tiny_http, "completions", {"model": model, "prompt": "x", field: value})
        assert answer.status_code == 400 and answer.json()["error"]["param"] == field, (field, value, answer.text)


def test_a_body_that_is_not_json_is_invalid_json_naming_no_parameter(tiny_http: TinyHttp) -> None:
    """A body that does not parse is 400 ``invalid_json`` with ``param: null``, as OpenAI answers a
    refusal of no one field (a mutation review: no test sent malformed JSON, and a refusal naming no
    field answered ``param: ""``)."""
    auth = {"authorization": f"Bearer {tiny_http.keys['acme']}"}
    for route in ("completions", "chat/completions", "embeddings"):
        answer = httpx.post(
            f"{tiny_http.url}/v1/{route}",
            content=b'{"model": "x", "prompt": ',
            headers={**auth, "content-type": "application/json"},
            timeout=30,
        )
        assert answer.status_code == 400, (route, answer.text)
        error = answer.json()["error"]
        assert error["code"] == "invalid_json" and error["param"] is None, (route, error)
        assert error["message"].startswith("the body is not valid JSON"), (route, error)
        assert error["type"] == "invalid_request_error"
    plain = httpx.post(f"{tiny_http.url}/v1/completions", content=b"{}", headers=auth, timeout=30)
    assert plain.json()["error"]["code"] == "invalid_content_type" and plain.json()["error"]["param"] is None
