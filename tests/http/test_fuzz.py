"""A schema-driven fuzz run: schemathesis generates requests from the app's own OpenAPI document and
sends them to the running tiny-model server; nothing may answer with a 5xx, and every refusal is
OpenAI-shaped. Valid bodies (positive) and invalid ones (negative), bounded by ``EXAMPLES`` per operation
and mode (about half a minute on 2 cores)."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import httpx
import pytest
import schemathesis
from httplib import TinyHttp
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable

pytestmark = pytest.mark.slow

EXAMPLES = 20


def fuzzer(
    operation: schemathesis.APIOperation,
    mode: schemathesis.GenerationMode,
    live: TinyHttp,
    seen: dict[tuple[str, str], int],
) -> Callable[[], None]:
    headers = {"authorization": f"Bearer {live.keys['ops']}"}

    @given(case=operation.as_strategy(mode))
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    def fuzz(case: schemathesis.Case) -> None:
        response = case.call(base_url=live.url, headers=headers, timeout=60)
        seen[case.path, mode.value] = seen.get((case.path, mode.value), 0) + 1
        assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
        if response.status_code >= 400:
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"], error

    return fuzz


def test_no_request_makes_a_server_error(tiny_http: TinyHttp) -> None:
    document = httpx.get(f"{tiny_http.url}/openapi.json", timeout=30).json()
    schema = schemathesis.openapi.from_dict(document)
    seen: dict[tuple[str, str], int] = {}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/models", "/v1/completions", "/v1/chat/completions", "/health"}

    for operation, mode in itertools.product(operations, list(schemathesis.GenerationMode)):
        try:
            fuzzer(operation, mode, tiny_http, seen)()
        except Unsatisfiable:  # no invalid input exists without a body (no params, or one free string)
            assert mode is schemathesis.GenerationMode.NEGATIVE and operation.method.upper() == "GET", operation.path
    for path in ("/v1/completions", "/v1/chat/completions"):  # the routes with bodies were really fuzzed
        assert seen[path, "positive"] > 5 and seen[path, "negative"] > 5, seen
