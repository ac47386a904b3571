"""Prefill scheduling for bursts, on the tiny model: which prompts a step's budget goes to first
(``prefill_order``), the prefix lookup made when a prompt's first chunk is planned (so a burst's later
prompts reuse the blocks of earlier ones), and an idle engine gathering a burst before its first step
(``burst_wait_ms``). Outcomes are read from step numbers and metrics, never from timings."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from enginelib import Collected, engine_held, request, submit, tiny_service

from lorafleet_server.app import Service
from lorafleet_server.engine.engine import Engine, _Request
from lorafleet_server.engine.types import ChatTurn, GenerationRequest, TokenEvent

STEP_TOKENS = 32
SYSTEM = (
    "You are the support assistant of Zephyr Bikes. Frames carry a two year warranty, wheels one year. "
    "Shipping takes three to five days inside the EU. Answer politely, briefly and in plain English. "
)


@pytest.fixture(scope="module")
def svc(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    service = tiny_service(
        tiny_model_dir, tmp_path_factory.mktemp("scheduling") / "store", max_step_tokens=STEP_TOKENS, burst_wait_ms=0
    )
    service.engine.eos_token_ids = frozenset()  # every request runs its full length
    yield service
    service.engine.shutdown(10)


def configure(engine: Engine, **overrides: Any) -> None:
    """Change the engine's config on its thread between steps and empty the prefix cache; returns once
    the engine has idled (no request left from an earlier test)."""

    def apply() -> None:
        engine.config = dataclasses.replace(engine.config, **overrides)
        engine.prefix_cache.clear()

    engine.run(apply)
    engine.run(lambda: None)  # handled one loop later: the loop in between found nothing to run


def run_together(engine: Engine, reqs: list[GenerationRequest]) -> tuple[dict[str, int], dict[str, list[int]]]:
    """Submit ``reqs`` while the engine is held (they are admitted together, in this order); return the
    step (1 = the first step after they were submitted) after which each one got its first token, and
    each one's tokens."""
    first_step: dict[str, int] = {}
    base = 0

    def recorder(rid: str) -> Any:
        def on_event(event: TokenEvent) -> None:  # engine thread, right after the step that made the token
            if event.token_ids and rid not in first_step:
                first_step[rid] = engine.steps - base

        return on_event

    sinks: list[Collected] = []
    with engine_held(engine):
        base = engine.steps  # the engine thread is held: no step runs meanwhile
        for req in reqs:
            sinks.append(submit(engine, req, on_event=recorder(req.request_id))[0])
    for sink in sinks:
        sink.wait()
    return first_step, {req.request_id: sink.token_ids for req, sink in zip(reqs, sinks, strict=True)}


def test_shortest_prompts_get_the_budget_first_and_produce_the_same_tokens(svc: Service) -> None:
    engine = svc.engine
    long_prompt = "Describe the warranty terms for frames, wheels and paint. " * 6
    reqs = [request(long_prompt, rid="long", max_new_tokens=4)] + [
        request(f"Hi {i}", rid=f"short{i}", max_new_tokens=4) for i in range(4)
    ]
    lengths = [len(engine.encode_prompt(r.prompt, ())) for r in reqs]
    assert lengths[0] > 2 * STEP_TOKENS and sum(lengths[1:]) <= STEP_TOKENS  # the shorts fit one step

    configure(engine, prefill_order="arrival")
    arrival_steps, arrival_tokens = run_together(engine, reqs)
    configure(engine, prefill_order="shortest")
    shortest_steps, shortest_tokens = run_together(engine, reqs)

    shorts = [f"short{i}" for i in range(4)]
    # In admission order the long prompt takes whole steps' budgets before any short one starts.
    assert arrival_steps["long"] <= min(arrival_steps[s] for s in shorts)
    # Shortest first: every short prompt's first token comes out of the first step, before the long one's.
    assert {shortest_steps[s] for s in shorts} == {shortest_steps["short0"]}
    assert shortest_steps["short0"] < shortest_steps["long"]
    assert shortest_steps["short0"] < min(arrival_steps[s] for s in shorts)
    assert shortest_tokens == arrival_tokens  # the order changes when, never what


def make_request(engine: Engine, rid: str, tokens: int, start_step: int) -> _Request:
    r = _Request(
        req=request("x", rid=rid),
        sink=lambda _e: None,
        prompt_ids=list(range(1000, 1000 + tokens)),
        key=None,
        lora=None,
        submitted=0.0,
    )
    r.start_step = start_step
    return r


def prefill_queue_at(engine: Engine, rows: list[_Request], step: int) -> list[str]:
    """The order ``_prefill_queue`` gives ``rows`` at engine step ``step`` (run on the engine thread,
    with the engine's own rows put back afterwards)."""

    def probe() -> list[str]:
        saved = engine._running, engine.steps
        try:
            engine._running, engine.steps = rows, step
            return [r.req.request_id for r in engine._prefill_queue()]
        finally:
            engine._running, engine.steps = saved

    return engine.run(probe)


def test_a_long_prompt_is_passed_by_newer_short_ones_only_for_a_bounded_number_of_steps(svc: Service) -> None:
    engine = svc.engine
    configure(engine, prefill_order="shortest")
    age = STEP_TOKENS // 2  # tokens of priority a row gains per step since its admission
    long_tokens, short_tokens = 100, 10
    bound = (long_tokens - short_tokens) // age  # steps after which a newly admitted short one no longer passes
    long_row = make_request(engine, "long", long_tokens, start_step=0)
    for step in range(bound + 3):
        short_row = make_request(engine, "short", short_tokens, start_step=step)  # admitted just now
        order = prefill_queue_at(engine, [long_row, short_row], step)
        assert order == (["short", "long"] if step <= bound else ["long", "short"]), step
    configure(engine, prefill_order="arrival")
    assert prefill_queue_at(engine, [long_row, make_request(engine, "short", 1, 5)], 5) == ["long", "short"]


def hit_tokens(svc: Service) -> float:
    return svc.metrics.registry.get_sample_value("lorafleet_prefix_cache_hit_tokens_total") or 0.0


def test_a_burst_reuses_the_prefix_its_earlier_prompts_computed(svc: Service) -> None:
    """Requests admitted together that share a system prompt: the prefix is looked up when a prompt's
    first chunk is planned, and a prompt that would start in the step completing another that shares
    its head waits one step, so the burst computes the system prompt once (before, every one of them
    was looked up at admission, when nothing was cached yet)."""
    engine = svc.engine
    reqs = [
        request("", rid=f"q{i}", max_new_tokens=4, messages=(ChatTurn("system", SYSTEM), ChatTurn("user", f"Q{i}?")))
        for i in range(4)
    ]
    prompts = [engine.encode_prompt(None, r.messages) for r in reqs]
    assert len(prompts[0]) > STEP_TOKENS  # two steps or more each: the first finishes before the last starts
    common = next(i for i, (a, b) in enumerate(zip(prompts[0], prompts[1], strict=False)) if a != b)
    shared_blocks = common // 16
    assert shared_blocks >= 2

    configure(engine, prefill_order="arrival")
    before = hit_tokens(svc)
    _, cold = run_together(engine, reqs)
    assert hit_tokens(svc) == before  # all looked up at admission, on an empty cache

    configure(engine, prefill_order="shortest")
    before = hit_tokens(svc)
    _, warm = run_together(engine, reqs)
    # The others let the step that completes the first prompt go (its blocks are stored after it), then
    # all three reuse the system turn.
    assert hit_tokens(svc) - before == 3 * shared_blocks * 16
    assert warm == cold  # reused K/V gives the tokens computed ones give


class _AdmitHook:
    """The engine's observer, plus: the first admission runs ``hook`` (on the engine thread), and the
    rows of every step are recorded."""

    def __init__(self, inner: Any, hook: Any) -> None:
        self.inner = inner
        self.hook = hook
        self.step_rows: list[int] = []

    def observe_admitted(self, queue_seconds: float, prompt_tokens: int) -> None:
        hook, self.hook = self.hook, None
        if hook is not None:
            hook()
        self.inner.observe_admitted(queue_seconds, prompt_tokens)

    def observe_step(self, rows: int, tokens: int) -> None:
        if rows:
            self.step_rows.append(rows)
        self.inner.observe_step(rows, tokens)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.mark.parametrize("wait_ms", [0, 60_000])
def test_an_idle_engine_gathers_a_burst_before_its_first_step(svc: Service, wait_ms: int) -> None:
    """Request B reaches the engine just after A was admitted by an idle engine (posted from A's
    admission, so no timing decides it). With a burst wait, A's first forward carries B too; without,
    B waits for the next one. The wait ends at the first quiet gap, long before ``wait_ms``."""
    engine = svc.engine
    configure(engine, burst_wait_ms=wait_ms)
    b_sink = Collected()
    hook = _AdmitHook(engine.observer, lambda: engine.submit(request("Second", rid="b", max_new_tokens=2), b_sink))
    original = engine.observer
    engine.run(lambda: setattr(engine, "observer", hook))
    engine.run(lambda: None)
    try:
        a_sink, _ = submit(engine, request("First", rid="a", max_new_tokens=2))
        a_sink.wait(), b_sink.wait()
    finally:
        engine.run(lambda: setattr(engine, "observer", original))
    assert hook.step_rows[0] == (2 if wait_ms else 1)
    assert a_sink.summary.generated_tokens == b_sink.summary.generated_tokens == 2
