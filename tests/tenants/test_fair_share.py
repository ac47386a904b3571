"""Fair share across tenants: one tenant's flood cannot starve another's single request.

Engine-level, tiny model, counted in engine steps (speed targets live in bench/, not in tests).
"""

from __future__ import annotations

import itertools
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from enginelib import Collected, request, submit, tiny_service

from lorafleet_server.app import Service
from lorafleet_server.engine import adapter_manager as adapter_manager_module
from lorafleet_server.engine import engine as engine_module
from lorafleet_server.engine.engine import PREEMPT_AFTER_TOKENS, Engine
from lorafleet_server.engine.fairness import FairQueue, preemption_victim
from lorafleet_server.engine.types import GenerationRequest, Principal
from lorafleet_server.errors import QueueFull

PROMPT = "The capital of France is"


def as_tenant(req: GenerationRequest, tenant: str, **limits: object) -> GenerationRequest:
    from dataclasses import replace

    return replace(req, principal=Principal(key_id=f"k{tenant}", tenant=tenant, role="tenant", **limits))  # type: ignore[arg-type]


@pytest.fixture
def service(tiny_model_dir: Path, tmp_path: Path) -> Iterator[Service]:
    svc = tiny_service(tiny_model_dir, tmp_path / "store", max_batch_size=4, max_seq_len=256, max_new_tokens=64)
    svc.engine.eos_token_ids = frozenset()  # every request runs its full length
    yield svc
    svc.engine.shutdown(10)


class StepSink(Collected):
    """Records the engine step at which each event arrived."""

    def __init__(self, service: Service) -> None:
        super().__init__()
        self.service = service
        self.steps: list[int] = []

    def __call__(self, event: object) -> None:
        self.steps.append(self.service.engine.steps)
        super().__call__(event)  # type: ignore[arg-type]


def submit_between_steps(engine: Engine, req: GenerationRequest, sink: StepSink) -> int:
    """Submit ``req`` from the engine thread between two steps; the step count then (its arrival, exact)."""

    def submit_now() -> int:
        engine.submit(req, sink)
        return engine.steps

    return engine.run(submit_now)


def test_single_request_starts_within_two_steps_of_a_flood(service: Service) -> None:
    engine = service.engine
    flood = []
    for i in range(16):  # 4x the batch, long generations
        sink = StepSink(service)
        engine.submit(as_tenant(request(PROMPT, rid=f"a{i}", max_new_tokens=60), "a"), sink)
        flood.append(sink)
    assert flood[3].first.wait(30)  # the batch is full of tenant a
    # Submit b from the engine thread between steps, so its arrival step is exact.
    b = StepSink(service)
    arrived = submit_between_steps(engine, as_tenant(request(PROMPT, rid="b", max_new_tokens=4), "b"), b)
    b.wait()
    first_token_step = b.steps[0]
    assert first_token_step - arrived <= 2  # under FIFO it would wait for a whole generation of a
    for sink in flood:
        sink.wait()
    a_durations = [s.steps[-1] - s.steps[0] for s in flood]
    assert first_token_step - arrived < 0.2 * statistics.median(a_durations)
    assert (service.metrics.registry.get_sample_value("lorafleet_preemptions_total") or 0) >= 1


def test_preempted_requests_generate_exactly_what_they_would_have(tiny_model_dir: Path, tmp_path: Path) -> None:
    def run(with_b: bool) -> list[list[int]]:
        svc = tiny_service(tiny_model_dir, tmp_path / f"store-{with_b}", max_batch_size=2, max_new_tokens=64)
        svc.engine.eos_token_ids = frozenset()
        try:
            sinks = [
                submit(
                    svc.engine,
                    as_tenant(request(PROMPT + " " * i, rid=f"a{i}", max_new_tokens=40, repetition_penalty=1.2), "a"),
                )[0]
                for i in range(4)
            ]
            if with_b:
                assert sinks[0].first.wait(30)
                b, _ = submit(svc.engine, as_tenant(request("Hello", rid="b", max_new_tokens=30), "b"))
                b.wait()
            return [s.wait().token_ids for s in sinks]
        finally:
            svc.engine.shutdown(10)

    assert run(with_b=True) == run(with_b=False)


def one_token_requests_back_to_back(engine: Any, tenant: str, count: int) -> list[int]:
    """``count`` one-token requests of ``tenant``, each sent (on the engine thread) as soon as the one
    before it ends; returns the engine step at which each was sent."""
    sent: list[int] = []
    done = threading.Event()

    def send_next(event: Any = None) -> None:
        if event is not None and not event.final:
            return
        if len(sent) == count:
            done.set()
            return
        sent.append(engine.steps)
        engine.submit(
            as_tenant(request("Hi", rid=f"{tenant}{len(sent)}", max_new_tokens=1), tenant),
            Collected(on_event=send_next),
        )

    engine.run(send_next)
    assert done.wait(300), f"{tenant}'s requests did not all end"
    return sent


def test_a_resumed_row_is_not_preempted_again_before_it_has_run_a_while(service: Service) -> None:
    """Found by an outside review: tenant b sending one-token requests one after another preempted the
    same row of tenant a's each time, as soon as it had resumed (here 12 of 12 on one row). Now a
    resumed row is protected until it has generated PREEMPT_AFTER_TOKENS more tokens (a step each at
    most): the preemptions spread over a's rows, and each row runs that long between two of them."""
    engine = service.engine
    flood = [
        submit(engine, as_tenant(request(PROMPT, rid=f"a{i}", max_new_tokens=60), "a"))
        for i in range(4)  # the whole batch
    ]
    assert all(sink.first.wait(30) for sink, _ in flood)
    started = one_token_requests_back_to_back(engine, "b", 12)
    for sink, _ in flood:
        assert sink.wait().summary.generated_tokens == 60
    preemptions = [handle._state.preemptions for _, handle in flood]
    assert sum(preemptions) >= 4 and max(preemptions) <= 1 + (started[-1] - started[0]) // PREEMPT_AFTER_TOKENS


def test_a_resumed_row_whose_recompute_is_long_still_makes_progress(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Found by an outside review of the protection above when it counted steps since the row was taken
    back: a recompute longer than that (200-token prompts, 16-token steps, no prefix cache) lost its row
    again before it produced a token, on every row of the tenant at once (+2 to +5 tokens each over 241
    steps). Counted in tokens, every resumed row makes PREEMPT_AFTER_TOKENS of progress first."""
    svc = tiny_service(
        tiny_model_dir,
        tmp_path / "store",
        max_batch_size=4,
        max_seq_len=512,
        max_new_tokens=64,
        max_step_tokens=16,
        prefix_cache_bytes=0,
    )
    engine = svc.engine
    engine.eos_token_ids = frozenset()
    try:
        long_prompt = "The capital of France is " * 40
        flood = [
            submit(engine, as_tenant(request(long_prompt + str(i), rid=f"a{i}", max_new_tokens=60), "a"))
            for i in range(4)
        ]
        assert all(sink.first.wait(120) for sink, _ in flood)
        before = engine.run(lambda: [len(handle._state.generated) for _, handle in flood])
        sent = one_token_requests_back_to_back(engine, "b", 40)
        after = engine.run(lambda: [len(handle._state.generated) for _, handle in flood])
        progress = [a - b for a, b in zip(after, before, strict=True)]
        assert sum(progress) >= 2 * PREEMPT_AFTER_TOKENS, (progress, sent[-1] - sent[0])
        assert all(sink.wait().summary.generated_tokens == 60 for sink, _ in flood)
    finally:
        engine.shutdown(10)


def test_a_preempted_request_does_not_count_against_its_tenants_waiting_limit(service: Service) -> None:
    """Found by an outside review: the rows another tenant's arrival preempted counted as the victim
    tenant's queued requests, so b's traffic pushed a over its own max_waiting."""
    engine = service.engine
    flood = [
        submit(engine, as_tenant(request(PROMPT, rid=f"a{i}", max_new_tokens=60), "a"))  # the whole batch
        for i in range(4)
    ]
    assert all(sink.first.wait(30) for sink, _ in flood)
    release = threading.Event()
    try:
        engine.run(
            lambda: [
                engine.submit(as_tenant(request("Hi", rid=f"b{i}", max_new_tokens=30), "b"), Collected())
                for i in range(2)
            ]
        )  # admitted between the steps that follow: each preempts a row of a's
        deadline = time.monotonic() + 60
        while sum(handle._state.preemptions for _, handle in flood) < 2:
            assert time.monotonic() < deadline, "b's requests preempted none of a's rows"
            time.sleep(0.01)
        reached = threading.Event()

        def hold() -> bool:  # a's resuming rows stay queued meanwhile
            reached.set()
            return release.wait(30)

        held = engine.call(hold)
        assert reached.wait(30)
        waiting = [handle for _, handle in flood if handle._state.kv_row < 0]  # preempted, not resumed yet
        assert len(waiting) >= 1, "the preempted rows resumed before the hold: nothing to test"
        accepted = [submit(engine, as_tenant(request(PROMPT, rid=f"a-new{i}"), "a", max_waiting=2)) for i in range(2)]
        with pytest.raises(QueueFull, match="tenant 'a' has 2 requests waiting"):  # its own, not the preempted
            engine.submit(as_tenant(request(PROMPT, rid="a-over"), "a", max_waiting=2), Collected())
        release.set()
        held.result(10)
        assert all(sink.wait().summary.generated_tokens >= 1 for sink, _ in accepted)
    finally:
        release.set()


def test_a_tenant_that_fills_the_queue_does_not_lock_the_others_out(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Found by an outside review: one tenant filling the global max_waiting got every other tenant's
    first request refused. A full queue still takes a tenant below its share of it (max_waiting / the
    tenants queued), up to twice max_waiting in all; the one that filled it stays refused."""
    svc = tiny_service(tiny_model_dir, tmp_path / "store", max_batch_size=1, max_waiting=4)
    release = threading.Event()
    try:
        held = svc.engine.call(lambda: release.wait(30))  # nothing is admitted meanwhile

        def send(tenant: str, i: int) -> Collected | None:
            try:
                return submit(svc.engine, as_tenant(request(PROMPT, rid=f"{tenant}{i}", max_new_tokens=2), tenant))[0]
            except QueueFull:
                return None

        a = [send("a", i) for i in range(8)]
        assert sum(s is not None for s in a) == 5  # the free row and max_waiting
        b = [send("b", i) for i in range(4)]
        assert [s is not None for s in b] == [True, True, False, False]  # its share: 4 / 2 tenants
        assert send("a", 9) is None  # a is above its share
        c = [send("c", i) for i in range(4)]
        assert [s is not None for s in c] == [True, True, False, False]  # 4 / 3 tenants: 1.33
        release.set()
        held.result(10)
        assert all(s.wait().summary.generated_tokens == 2 for s in [*a, *b, *c] if s is not None)
    finally:
        release.set()
        svc.engine.shutdown(10)


def test_per_tenant_waiting_limit_refuses_at_once_and_spares_others(service: Service) -> None:
    """The limit counts the requests that wait for a row: the 4 free rows take 4 of a's, 2 more wait,
    the next is refused at once, and another tenant is still taken. Found by an outside review: it
    counted every queued request, so an idle server refused a's third request with 4 rows free."""
    engine = service.engine
    release = threading.Event()
    try:
        held = engine.call(lambda: release.wait(30))  # nothing is admitted meanwhile
        limited = [submit(engine, as_tenant(request(PROMPT, rid=f"a{i}"), "a", max_waiting=2))[0] for i in range(6)]
        with pytest.raises(
            QueueFull, match="tenant 'a' has 2 requests waiting for a row: its limit max_waiting_per_tenant is 2"
        ):
            engine.submit(as_tenant(request(PROMPT, rid="a6"), "a", max_waiting=2), Collected())
        other, _ = submit(engine, as_tenant(request(PROMPT, rid="b"), "b"))
        # a's count is the worst case, other tenants' requests taking free rows first: b's leaves a 3 waiting
        with pytest.raises(QueueFull, match="tenant 'a' has 3 requests waiting for a row"):
            engine.submit(as_tenant(request(PROMPT, rid="a7"), "a", max_waiting=2), Collected())
        release.set()
        held.result(10)
        assert other.wait().summary.generated_tokens >= 1
        assert all(s.wait().summary.generated_tokens >= 1 for s in limited)
    finally:
        release.set()


def test_per_tenant_waiting_limit_counts_rows_its_running_limit_denies_as_waiting(service: Service) -> None:
    """With max_running 1, only one of a's requests can take a free row; the rest wait, and count."""
    engine = service.engine
    release = threading.Event()
    limits = {"max_waiting": 2, "max_running": 1}
    try:
        held = engine.call(lambda: release.wait(30))  # nothing is admitted meanwhile
        limited = [
            submit(engine, as_tenant(request(PROMPT, rid=f"a{i}", max_new_tokens=4), "a", **limits))[0]
            for i in range(3)
        ]
        with pytest.raises(QueueFull, match="tenant 'a' has 2 requests waiting for a row"):
            engine.submit(as_tenant(request(PROMPT, rid="a3"), "a", **limits), Collected())
        release.set()
        held.result(10)
        assert all(s.wait().summary.generated_tokens == 4 for s in limited)
    finally:
        release.set()


def test_per_tenant_running_limit_caps_concurrency(service: Service) -> None:
    engine = service.engine
    sinks = [StepSink(service) for _ in range(3)]
    for i, sink in enumerate(sinks):
        engine.submit(as_tenant(request(PROMPT, rid=f"a{i}", max_new_tokens=10), "a", max_running=1), sink)
    for sink in sinks:
        sink.wait()
    spans = sorted((s.steps[0], s.steps[-1]) for s in sinks)
    assert all(later[0] >= earlier[1] for earlier, later in itertools.pairwise(spans))  # one at a time


def test_a_tenant_at_its_running_limit_does_not_preempt_others(service: Service) -> None:
    """b runs its one allowed request with more waiting, below its share of the 4 rows: preempting
    one of a's would hand the row straight back to a (b may not start another), every step."""
    engine = service.engine
    flood = [StepSink(service) for _ in range(3)]
    for i, sink in enumerate(flood):
        engine.submit(as_tenant(request(PROMPT, rid=f"a{i}", max_new_tokens=40), "a"), sink)
    assert all(sink.first.wait(30) for sink in flood)
    limited = [StepSink(service) for _ in range(3)]
    for i, sink in enumerate(limited):
        engine.submit(as_tenant(request(PROMPT, rid=f"b{i}", max_new_tokens=10), "b", max_running=1), sink)
    for sink in flood + limited:
        sink.wait()
    assert not service.metrics.registry.get_sample_value("lorafleet_preemptions_total")
    for sink in flood:  # a's requests decoded every step, none stalled behind a re-prefill
        assert max(later - earlier for earlier, later in itertools.pairwise(sink.steps)) <= 2
    spans = sorted((s.steps[0], s.steps[-1]) for s in limited)
    assert all(later[0] >= earlier[1] for earlier, later in itertools.pairwise(spans))  # b one at a time


@dataclass(eq=False)
class Item:
    tenant: str
    weight: float = 1.0


def take(q: FairQueue[Item], n: int) -> list[str]:
    """Start the next ``n`` requests in fair order; their tenants."""
    taken = []
    for _ in range(n):
        tenant = q.tenants()[0]
        q.started(q.waiting(tenant)[0])
        taken.append(tenant)
    return taken


def served_alone(tenant: str, n: int) -> FairQueue[Item]:
    """A queue whose ``tenant`` has started ``n`` requests, one at a time, nobody else waiting."""
    q: FairQueue[Item] = FairQueue()
    for _ in range(n):
        q.push(Item(tenant))
        q.started(q.waiting(tenant)[0])
    return q


def test_fair_queue_forgets_idle_tenants_beyond_a_bound_but_not_one_far_ahead(monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by a soak: without keys a tenant is whatever an adapter name says, and a client naming a new
    one per request grew the virtual-time map by one entry each, for good. Idle tenants beyond a bound
    are forgotten, the lowest first; one that ran far ahead of the others is remembered, so it cannot
    come back level with them."""
    from lorafleet_server.engine import fairness

    monkeypatch.setattr(fairness, "MAX_IDLE_TENANTS", 8)
    q: FairQueue[Item] = FairQueue()
    for _ in range(50):  # weight 0.1: each start puts it 10 ahead, far ahead of any newcomer
        q.push(Item("hog", 0.1))
        q.started(q.waiting("hog")[0])
    for i in range(200):
        q.push(Item(f"x{i}"))
        q.started(q.waiting(f"x{i}")[0])
        assert len(q._vtime) <= 2 * 8 + 1
    assert "hog" in q._vtime
    q.push(Item("new"))
    q.push(Item("hog", 0.1))
    assert q.tenants() == ["new", "hog"]  # the hog is still ahead: forgotten, it would tie and go first


def test_fair_queue_never_forgets_a_waiting_tenant(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only idle tenants are forgotten: a waiting one, however far behind, keeps its virtual time (the
    engine's next tenants() would fail on it, and its place would be lost)."""
    from lorafleet_server.engine import fairness

    monkeypatch.setattr(fairness, "MAX_IDLE_TENANTS", 2)
    q: FairQueue[Item] = FairQueue()
    q.push(Item("w"))  # waits all along (its running limit, say), at the lowest virtual time
    for i in range(20):
        q.push(Item(f"x{i}"))
        q.started(q.waiting(f"x{i}")[0])
    assert q.tenants() == ["w"] and len(q.waiting("w")) == 1


def test_a_preempted_request_resumes_ahead_of_its_tenants_others_and_clear_empties_the_queue() -> None:
    q: FairQueue[Item] = FairQueue()
    first, second, preempted = Item("a"), Item("a"), Item("a")
    q.push(first)
    q.push(second)
    q.push(preempted, front=True)
    assert q.waiting("a") == [preempted, first, second]
    assert q.clear() == [preempted, first, second]
    assert not q and len(q) == 0 and preempted not in q and q.tenants() == []
    q.push(first)
    assert q.waiting("a") == [first]


def test_a_start_out_of_turn_does_not_move_the_clock_back() -> None:
    """The engine may start a tenant behind others (the one owed the row cannot start: its running
    limit, its adapter's slot). A newcomer restarts at the latest start, not at that one's: else it
    got the credit of every row the others ran meanwhile (~50 rows in a row here)."""
    q: FairQueue[Item] = FairQueue()
    q.push(Item("c"))  # owed every row below, but never able to start
    for _ in range(50):
        q.push(Item("a"))
        q.started(q.waiting("a")[0])
    q.started(q.waiting("c")[0])  # c at last, at its old virtual time
    for _ in range(4):
        q.push(Item("d"))
    q.push(Item("a"))
    assert "a" in take(q, 2)


def test_preemption_takes_from_the_tenant_most_over_its_share() -> None:
    """Nine rows, three tenants (3 each): a runs 5 (2 over), b runs 4 (1 over), c waits: a gives one back."""
    running = [Item("a") for _ in range(5)] + [Item("b") for _ in range(4)]
    q: FairQueue[Item] = FairQueue()
    q.push(Item("c"))
    victim = preemption_victim(9, running, q, lambda _r: True, lambda _r: True)
    assert victim is running[4]


def test_fair_queue_weights_and_no_credit_for_idling() -> None:
    q: FairQueue[Item] = FairQueue()
    for _ in range(6):
        q.push(Item("a", 2.0))
        q.push(Item("b", 1.0))
    order = take(q, 6)
    assert order.count("a") == 4 and order.count("b") == 2  # weight 2 gets twice the rows
    # A tenant that was idle while another was served starts level with it: it alternates with the
    # active tenant instead of taking the next rows in a row for the time it was away.
    late = served_alone("a", 5)
    for _ in range(3):
        late.push(Item("a"))
        late.push(Item("c"))
    assert sorted(take(late, 4)) == ["a", "a", "c", "c"]
    # The same when the newcomer arrives while nobody waits (below overload, the usual case): it
    # restarted at its own old time, 0, and took the next 1,000 rows while a waited.
    quiet = served_alone("a", 1000)
    for _ in range(4):
        quiet.push(Item("c"))
    quiet.push(Item("a"))
    assert "a" in take(quiet, 2)


def test_a_tenant_with_a_long_history_is_not_starved_by_a_newcomer(service: Service) -> None:
    """Tenant a served 40 requests alone; b then floods the batch: a's next request waited ~37 steps
    (its history counted against it while b, new, started at virtual time 0), each of them preempting
    and recomputing one of b's rows."""
    engine = service.engine
    for i in range(40):
        done = StepSink(service)
        engine.submit(as_tenant(request(PROMPT, rid=f"a{i}", max_new_tokens=1), "a"), done)
        done.wait()
    flood = []
    for i in range(8):
        sink = StepSink(service)
        engine.submit(as_tenant(request(PROMPT, rid=f"b{i}", max_new_tokens=60), "b"), sink)
        flood.append(sink)
    assert flood[3].first.wait(30)
    a = StepSink(service)
    arrived = submit_between_steps(engine, as_tenant(request(PROMPT, rid="a-late", max_new_tokens=4), "a"), a)
    a.wait()
    assert a.steps[0] - arrived <= 2
    for sink in flood:
        sink.wait()


def test_preemption_victim_only_when_someone_waits_below_its_share() -> None:
    q: FairQueue[Item] = FairQueue()
    running = [Item("a") for _ in range(4)]
    assert preemption_victim(4, running, q, lambda _r: True, lambda _r: True) is None  # nobody waits
    q.push(Item("b"))
    assert preemption_victim(4, running, q, lambda _r: True, lambda _r: True) is running[-1]
    assert preemption_victim(4, running, q, lambda _r: False, lambda _r: True) is None  # b cannot start yet
    balanced = [Item("a"), Item("a"), Item("b"), Item("b")]
    assert preemption_victim(4, balanced, q, lambda _r: True, lambda _r: True) is None  # b has its share
    # At the boundary (an outside mutation run: `<` for `<=` survived): two rows, a runs both, b waits
    # with none; b's share is one row, so one row of a's goes back.
    pair = [Item("a"), Item("a")]
    one: FairQueue[Item] = FairQueue()
    one.push(Item("b"))
    assert preemption_victim(2, pair, one, lambda _r: True, lambda _r: True) is pair[-1]


def test_preemption_with_fractional_shares_takes_a_row_only_from_a_whole_row_over() -> None:
    """Shares that are not whole rows (an outside mutation run: ``counts > share`` for ``counts - 1 >=
    share`` survived, an extra preemption). Four rows, three tenants (4/3 each): a and b run two each,
    c waits; neither runs a whole row above its share, so nobody is preempted (taking one would leave
    its tenant below its share in turn). Three rows, a runs all three: b's 1.5 rows' worth gets one."""

    weights = {"a": 1.0, "b": 1.25, "d": 0.75}

    def run(rows: int, tenants: str, waiting: str) -> Item | None:
        running = [Item(t, weights.get(t, 1.0)) for t in tenants]
        q: FairQueue[Item] = FairQueue()
        for t in waiting:
            q.push(Item(t, weights.get(t, 1.0)))
        return preemption_victim(rows, running, q, lambda _r: True, lambda _r: True)

    assert run(4, "aabb", "c") is None
    assert run(3, "aab", "b") is None  # b runs 1 of its 1.5: a second row would put it above
    # Weighted shares of six rows: a 2, b 2.5, d 1.5. a runs a whole row over its share, but b, at 2 of
    # its 2.5, would be over it with a third: b does not wait below its share, so a keeps its rows.
    assert run(6, "aaabbd", "b") is None
    victim = run(3, "aaa", "b")
    assert victim is not None and victim.tenant == "a"


def test_drain_lets_a_preempted_request_finish(service: Service) -> None:
    engine = service.engine
    flood = [submit(engine, as_tenant(request(PROMPT, rid=f"a{i}", max_new_tokens=60), "a"))[0] for i in range(4)]
    assert all(s.first.wait(30) for s in flood)
    b = Collected()
    # Between two steps: b arrives (a row of a's is preempted for it), then the engine is held.
    held = engine.call(lambda: (engine.submit(as_tenant(request(PROMPT, rid="b", max_new_tokens=2), "b"), b), None)[1])
    held.result(10)
    engine.run(lambda: None)
    engine.run(lambda: None)  # a whole loop pass after b's arrival: the preemption has happened
    assert service.metrics.registry.get_sample_value("lorafleet_preemptions_total") == 1
    stopping = threading.Thread(target=engine.shutdown, args=(60,))
    stopping.start()
    stopping.join(60)
    for sink in [*flood, b]:  # every request that had started finishes, the preempted one included
        assert sink.wait().summary.finish_reason.value == "length"


def test_embed_rows_are_never_preempted(tiny_model_dir: Path, tmp_path: Path) -> None:
    """An embed row pools its prompt as the prefill goes; preempted and resumed it would pool those
    tokens twice (an outside mutation run: dropping the embed check survived every test). Tenant a's
    long embeds fill every row, chunked over many steps; tenant b's request waits for a row instead."""
    svc = tiny_service(tiny_model_dir, tmp_path / "store", max_batch_size=2, max_step_tokens=16)
    try:
        engine = svc.engine
        text = " ".join(f"word{i}" for i in range(60))  # well over one 16-token step
        alone = submit(engine, request(text, rid="alone", embed=True))[0].wait().events[-1].embedding
        embeds = [submit(engine, as_tenant(request(text, rid=f"e{i}", embed=True), "a"))[0] for i in range(2)]
        waiting = submit(engine, as_tenant(request(PROMPT, rid="b", max_new_tokens=2), "b"))[0]
        for sink in [*embeds, waiting]:
            sink.wait()
        assert not svc.metrics.registry.get_sample_value("lorafleet_preemptions_total")
        for sink in embeds:
            got = sink.events[-1].embedding
            assert got is not None and alone is not None
            assert max(abs(x - y) for x, y in zip(got, alone, strict=True)) < 1e-4
    finally:
        svc.engine.shutdown(10)


def test_an_adapter_kept_busy_by_one_tenant_does_not_hold_the_only_slot_for_ever(
    tiny_model_dir: Path, tmp_path: Path, peft_adapter: Any
) -> None:
    """One device slot. Tenant a keeps its adapter busy with overlapping requests (each starts before
    the last ends), so its slot never had no lease: b's adapter waited for as long as a's traffic
    lasted, with rows free. After SLOT_WAIT_STEPS the slot drains for b (no new lease for a)."""
    svc = tiny_service(tiny_model_dir, tmp_path / "store", max_batch_size=4, max_loaded_adapters=1, max_new_tokens=64)
    svc.engine.eos_token_ids = frozenset()
    engine = svc.engine
    try:
        svc.store.import_peft(peft_adapter(seed=1), "a", "x", svc.base.spec)
        svc.store.import_peft(peft_adapter(seed=2), "b", "y", svc.base.spec)
        chain: list[StepSink] = []

        def submit_a() -> None:
            sink = StepSink(svc)
            chain.append(sink)
            engine.submit(as_tenant(request(PROMPT, adapter="a/x", rid=f"a{len(chain)}", max_new_tokens=20), "a"), sink)

        def halfway(sink: StepSink) -> None:  # a's next request starts before this one ends
            deadline = time.monotonic() + 60
            while len(sink.token_ids) < 10:
                assert time.monotonic() < deadline
                time.sleep(0.002)

        submit_a()
        halfway(chain[0])
        b = StepSink(svc)
        arrived = submit_between_steps(
            engine, as_tenant(request(PROMPT, adapter="b/y", rid="b", max_new_tokens=2), "b"), b
        )
        for _ in range(11):
            submit_a()
            halfway(chain[-1])
        b.wait(60)
        for sink in chain:
            sink.wait(60)
        assert len(chain) == 12  # a's traffic lasted ~12 x 10 steps
        waited = b.steps[0] - arrived
        slack = 4  # after its wait and the 20 steps of a's running request
        assert waited <= adapter_manager_module.SLOT_WAIT_STEPS + 20 + slack, waited
        assert b.steps[0] < chain[-1].steps[0]  # b ran before a's traffic ended
    finally:
        svc.engine.shutdown(10)


def test_a_tenant_spread_over_every_slot_gives_one_up_within_the_drain_not_its_generation(
    tiny_model_dir: Path, tmp_path: Path, peft_adapter: Any
) -> None:
    """Found by an outside review: tenant a holding every device slot with long generations made b's
    adapter wait for one of them to end (up to max_new_tokens steps), rows free or not: a drain only
    stops new leases, and preempting a row kept its lease. Now, once b's adapter has waited
    SLOT_PREEMPT_STEPS, the draining slot's requests are preempted and let go of it (a holds two slots
    more than b); they resume with their output unchanged. b then holds one, a one: nobody preempts back."""
    svc = tiny_service(tiny_model_dir, tmp_path / "store", max_batch_size=4, max_loaded_adapters=2, max_new_tokens=64)
    engine = svc.engine
    engine.eos_token_ids = frozenset()
    try:
        for tenant, name, seed in (("a", "x", 1), ("a", "y", 2), ("b", "z", 3)):
            svc.store.import_peft(peft_adapter(seed=seed), tenant, name, svc.base.spec)

        def run_a(rid: str, adapter: str) -> StepSink:
            sink = StepSink(svc)
            engine.submit(as_tenant(request(PROMPT, adapter=adapter, rid=rid, max_new_tokens=64), "a"), sink)
            return sink

        solo = [run_a(f"solo-{n}", f"a/{n}") for n in ("x", "y")]
        want = [sink.wait(60).token_ids for sink in solo]
        a = [run_a(f"a-{n}", f"a/{n}") for n in ("x", "y")]
        assert all(sink.first.wait(30) for sink in a)
        b = StepSink(svc)
        arrived = submit_between_steps(
            engine, as_tenant(request(PROMPT, adapter="b/z", rid="b", max_new_tokens=2), "b"), b
        )
        b.wait(60)
        assert [sink.wait(60).token_ids for sink in a] == want  # preempted, resumed, unchanged
        waited = b.steps[0] - arrived
        assert waited <= engine_module.SLOT_PREEMPT_STEPS + 6, waited  # not a's 64-token generations
        assert b.steps[-1] < max(sink.steps[-1] for sink in a)
    finally:
        svc.engine.shutdown(10)
