"""The prefix cache: K/V of prompt blocks reused per adapter version, on the tiny model.

Every engine test compares greedy tokens against a second engine with the cache off (same model,
same store), and checks from the metrics that the cache was (or was not) used.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from enginelib import Collected, engine_held, generate, request, submit, tiny_service

from lorafleet_adapters.prompt import PromptTemplate
from lorafleet_adapters.ref import AdapterKey
from lorafleet_server.app import Service
from lorafleet_server.config import parse_config
from lorafleet_server.engine.prefix_cache import PrefixCache
from lorafleet_server.engine.types import ChatTurn, FinishReason, Principal, TokenEvent

SYSTEM = (
    "You are the support assistant of Zephyr Bikes. Frames carry a two year warranty, wheels one year. "
    "Shipping takes three to five days inside the EU. Answer politely, briefly and in plain English. "
)
BLOCK = 16
FILLER = itertools.count()  # makes every filler prompt new: fillers never hit the cache


def sample(svc: Service, name: str) -> float:
    value = svc.metrics.registry.get_sample_value(name)
    return 0.0 if value is None else value


def hit_tokens(svc: Service) -> float:
    return sample(svc, "lorafleet_prefix_cache_hit_tokens_total")


def counters(svc: Service) -> dict[str, float]:
    """The lookup counters: prompts that hit and missed, tokens looked up and reused."""
    names = ("hits", "misses", "hit_tokens", "lookup_tokens")
    return {name: sample(svc, f"lorafleet_prefix_cache_{name}_total") for name in names}


@pytest.fixture(scope="module")
def services(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, Service]]:
    """(cache on, cache off) over one store."""
    store = tmp_path_factory.mktemp("prefix") / "store"
    on = tiny_service(tiny_model_dir, store, max_step_tokens=64)
    off = tiny_service(tiny_model_dir, store, max_step_tokens=64, prefix_cache_bytes=0)
    for svc in (on, off):
        svc.engine.eos_token_ids = frozenset()  # every request runs its full length
    yield on, off
    on.engine.shutdown(10)
    off.engine.shutdown(10)


@pytest.fixture(scope="module")
def adapter_dirs(peft_adapter: Any) -> list[Path]:
    return [
        peft_adapter(seed=300 + i, r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj"]) for i in range(2)
    ]


# -- the cache itself ------------------------------------------------------------------------------


def fake_kv(start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    k = torch.full((2, 1, end - start, 4), float(start))  # [layers, kv_heads, n, head_dim]
    return k, k.clone()


BLOCK_BYTES = 2 * 2 * 1 * BLOCK * 4 * 4  # k and v, fp32


class Events:
    """A ``PrefixCacheObserver`` that keeps what it was told: ("lookup", asked, hit), ("evicted", n, 0)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int, int]] = []

    def prefix_lookup(self, lookup_tokens: int, hit_tokens: int) -> None:
        self.events.append(("lookup", lookup_tokens, hit_tokens))

    def prefix_evicted(self, blocks: int) -> None:
        self.events.append(("evicted", blocks, 0))

    def evicted(self) -> list[int]:
        return [n for kind, n, _ in self.events if kind == "evicted"]


def test_block_ids_chain_the_owner_and_every_earlier_token() -> None:
    cache = PrefixCache(1 << 20, BLOCK)
    v1, v2 = AdapterKey("acme", "bot", 1), AdapterKey("acme", "bot", 2)
    ids = list(range(100, 150))
    base = cache.block_ids("", ids, len(ids))
    assert len(base) == 3  # full blocks only
    assert cache.block_ids("", ids, 40) == base[:2]
    first = cache.block_ids(str(v1), ids, 50)
    assert first != base and first[0] != cache.block_ids(str(v2), ids, 50)[0]
    assert cache.block_ids("base:acme", ids, 50)[0] not in (base[0], cache.block_ids("base:beta", ids, 50)[0])
    changed = [*ids[:5], 7, *ids[6:]]  # one token of the first block differs: every later block differs
    assert not set(cache.block_ids("", changed, 50)) & set(base)
    later = [*ids[:20], 7, *ids[21:]]
    assert cache.block_ids("", later, 50)[0] == base[0] and cache.block_ids("", later, 50)[1:] != base[1:]


@pytest.mark.parametrize("scope", ["tenant", "shared"])
def test_the_base_models_prefixes_are_each_tenants_own_unless_shared(
    tiny_model_dir: Path, tmp_path: Path, scope: str
) -> None:
    """A hit shows in the time to first token: by default one tenant cannot learn that another sent a prompt."""
    svc = tiny_service(tiny_model_dir, tmp_path / "store", prefix_cache_scope=scope)
    try:

        def run(tenant: str) -> float:
            before = hit_tokens(svc)
            principal = Principal(key_id=f"k{tenant}", tenant=tenant, role="tenant")
            generate(svc.engine, replace(request(SYSTEM * 2, max_new_tokens=2, rid=tenant), principal=principal))
            return hit_tokens(svc) - before

        assert run("a") == 0
        assert run("a") > 0  # its own prefix
        assert (run("b") > 0) is (scope == "shared")
    finally:
        svc.engine.shutdown(10)


def test_a_prompt_waits_only_for_a_prefill_whose_blocks_it_may_use(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Two prompts admitted together with a shared head: the second lets the step that completes the
    first go only when it may read that prompt's blocks (same tenant); another tenant's would be of
    no use to it, and waiting for them would show in its time to first token."""
    svc = tiny_service(tiny_model_dir, tmp_path / "store")
    engine = svc.engine
    looked_up: dict[str, tuple[int, int]] = {}  # request id -> (step of its lookup, tokens it found)
    reuse = engine._reuse_prefix

    def spy(r: Any) -> None:  # engine thread
        step = engine.steps
        reuse(r)
        looked_up[r.req.request_id] = (step, r.cached)

    engine._reuse_prefix = spy  # type: ignore[method-assign]
    try:
        for tenants in (("a", "a"), ("a", "b")):
            looked_up.clear()
            engine.run(engine.prefix_cache.clear)
            with engine_held(engine):
                sinks = [
                    submit(
                        engine,
                        replace(
                            request(SYSTEM * 2 + f" Question {i}?", max_new_tokens=2, rid=f"{tenant}{i}"),
                            principal=Principal(key_id=f"k{tenant}", tenant=tenant, role="tenant"),
                        ),
                    )[0]
                    for i, tenant in enumerate(tenants)
                ]
            for sink in sinks:
                sink.wait()
            (first_step, _), (second_step, found) = looked_up[f"{tenants[0]}0"], looked_up[f"{tenants[1]}1"]
            if tenants[1] == tenants[0]:
                assert second_step == first_step + 1 and found > 0  # waited a step, then reused the head
            else:
                assert second_step == first_step and found == 0  # nothing to wait for
    finally:
        engine.shutdown(10)


def test_lru_eviction_keeps_the_byte_bound_and_evicts_tails_first() -> None:
    observer = Events()
    events = observer.events
    cache = PrefixCache(3 * BLOCK_BYTES, BLOCK, observer=observer)
    a, b = list(range(2 * BLOCK)), list(range(1000, 1000 + 2 * BLOCK))
    assert cache.insert("", a, len(a), fake_kv) == 2
    assert cache.insert("", b, len(b), fake_kv) == 2
    assert cache.bytes_used == 3 * BLOCK_BYTES and len(cache) == 3  # a's tail (least recent) left
    assert ("evicted", 1, 0) in events
    n, blocks = cache.lookup("", a, len(a))
    assert n == BLOCK and float(blocks[0].k[0, 0, 0, 0]) == 0.0  # a's head is still there
    n, blocks = cache.lookup("", b, len(b))
    assert n == 2 * BLOCK and [float(x.k[0, 0, 0, 0]) for x in blocks] == [0.0, float(BLOCK)]
    assert not [e for e in events if e[0] == "lookup"]  # a lookup reports nothing: the caller records
    cache.record(2 * BLOCK, n)  # what the caller reused
    assert events[-1] == ("lookup", 2 * BLOCK, 2 * BLOCK)
    # b was used last, a's head before it: a third prefix pushes out a's head, then b's tail first.
    c = list(range(2000, 2000 + BLOCK))
    cache.insert("", c, len(c), fake_kv)
    assert cache.lookup("", a, len(a))[0] == 0
    cache.insert("", list(range(3000, 3000 + BLOCK)), BLOCK, fake_kv)
    assert cache.lookup("", b, len(b))[0] == BLOCK  # b's tail went before its head
    assert cache.bytes_used <= cache.max_bytes
    assert cache.lookup(str(AdapterKey("acme", "bot", 1)), b, len(b))[0] == 0  # another owner never hits


def test_a_prompt_longer_than_the_cache_keeps_its_head_and_does_not_churn() -> None:
    """Found by an outside review: a prompt of five blocks in a cache of three evicted the head its
    lookup had just found, then its own new tail, and read five blocks out of its KV row, at every
    repeat (the evictions counter climbing with no change to the cache)."""
    observer = Events()
    reads: list[int] = []

    def read(start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        reads.append(start)
        return fake_kv(start, end)

    cache = PrefixCache(3 * BLOCK_BYTES, BLOCK, observer=observer)
    other = list(range(5000, 5000 + BLOCK))
    cache.insert("", other, len(other), read)
    prompt = list(range(5 * BLOCK + 1))
    assert cache.insert("", prompt, len(prompt), read) == 3  # evicts the other prompt's block, not its own
    assert observer.evicted() == [1] and cache.lookup("", other, len(other))[0] == 0
    copied = [0, 0, BLOCK, 2 * BLOCK]  # the other prompt's block, then its head; its tail never copied out
    assert reads == copied
    for _ in range(3):  # each repeat: its head found, nothing read, nothing evicted
        n, _blocks = cache.lookup("", prompt, len(prompt) - 1)
        assert n == 3 * BLOCK
        assert cache.insert("", prompt, len(prompt), read) == 0
    assert observer.evicted() == [1] and reads == copied and cache.bytes_used == 3 * BLOCK_BYTES
    # A block larger than the whole cache is not stored, and evicts nothing.
    tiny = PrefixCache(BLOCK_BYTES - 1, BLOCK, observer=Events())
    assert tiny.insert("", prompt, len(prompt), fake_kv) == 0 and tiny.bytes_used == 0


def test_the_caches_edges() -> None:
    """What a mutation review found no test held: a lookup stops at the first missing block (a gap in
    the middle of a prefix never lets a later block in), a block exactly the cache's size is stored,
    an insert refreshes a prefix it finds cached, ``clear`` gives back every byte, and a copy that
    fails evicts nothing."""
    cache = PrefixCache(3 * BLOCK_BYTES, BLOCK)
    prompt = list(range(3 * BLOCK))
    cache.insert("", prompt, len(prompt), fake_kv)
    ids = cache.block_ids("", prompt, len(prompt))
    middle = cache._blocks.pop(ids[1])  # a gap, as a failed copy or an eviction could leave
    n, blocks = cache.lookup("", prompt, len(prompt))
    assert n == BLOCK and len(blocks) == 1
    cache._blocks[ids[1]] = middle
    assert PrefixCache(BLOCK_BYTES, BLOCK).insert("", prompt, BLOCK, fake_kv) == 1  # exactly fits
    # LRU: a prefix inserted again is refreshed, so a newcomer evicts the other prefix first.
    lru = PrefixCache(3 * BLOCK_BYTES, BLOCK)
    a, c, d = list(range(2 * BLOCK)), list(range(900, 900 + BLOCK)), list(range(950, 950 + BLOCK))
    lru.insert("", a, len(a), fake_kv)
    lru.insert("", c, len(c), fake_kv)
    lru.insert("", a, len(a), fake_kv)  # nothing new: a's blocks become the most recent
    lru.insert("", d, len(d), fake_kv)
    assert lru.lookup("", a, len(a))[0] == 2 * BLOCK and lru.lookup("", c, len(c))[0] == 0
    lru.clear()
    assert lru.bytes_used == 0 and len(lru) == 0
    # A copy that fails (no memory) after the cache is full leaves every block where it was.
    observer = Events()
    full = PrefixCache(2 * BLOCK_BYTES, BLOCK, observer=observer)
    full.insert("", a, len(a), fake_kv)

    def no_memory(start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise RuntimeError("no memory for the copy")

    with pytest.raises(RuntimeError):
        full.insert("", c, len(c), no_memory)
    assert observer.evicted() == [] and full.lookup("", a, len(a))[0] == 2 * BLOCK


def test_zero_bytes_disables_it() -> None:
    cache = PrefixCache(0, BLOCK)
    ids = list(range(64))
    assert cache.insert("", ids, 64, fake_kv) == 0
    assert cache.lookup("", ids, 64) == (0, []) and cache.bytes_used == 0
    with pytest.raises(ValueError, match=">= 0"):
        PrefixCache(-1)
    assert parse_config(["--prefix-cache-bytes", "0"], {}).prefix_cache_bytes == 0
    assert parse_config([], {"LORAFLEET_PREFIX_CACHE_BYTES": "1048576"}).engine.prefix_cache_bytes == 1 << 20
    with pytest.raises(ValueError, match="prefix_cache_bytes must be >= 0"):
        parse_config(["--prefix-cache-bytes", "-1"], {})


# -- the engine ----------------------------------------------------------------------------------


def scribble(svc: Service) -> None:
    """Fill the KV rows with another prompt's K/V, so a hit can only be right if the cache copied its
    blocks in (a new request reuses the row the last one left)."""
    text = "Unrelated filler about tides, moons and harbours. " * 6
    sinks = [submit(svc.engine, request(f"{next(FILLER)} {text}", max_new_tokens=1, rid="fill"))[0] for _ in range(4)]
    for sink in sinks:
        sink.wait()


def run_both(services: tuple[Service, Service], prompt: str, **kw: Any) -> tuple[Collected, Collected]:
    on, off = services
    scribble(on)
    return generate(on.engine, request(prompt, max_new_tokens=8, **kw)), generate(
        off.engine, request(prompt, max_new_tokens=8, **kw)
    )


@pytest.mark.parametrize("adapter", ["", "acme/lora@1", "zephyr/prompt@1"])
def test_greedy_tokens_are_identical_with_the_cache_on_and_off(
    services: tuple[Service, Service], adapter_dirs: list[Path], adapter: str
) -> None:
    on, off = services
    if adapter == "acme/lora@1" and not on.store.versions("acme", "lora"):
        on.store.import_peft(adapter_dirs[0], "acme", "lora", on.base.spec)
    if adapter == "zephyr/prompt@1" and not on.store.versions("zephyr", "prompt"):
        on.store.publish_prompt("zephyr", "prompt", PromptTemplate(system="Zephyr. " + SYSTEM), on.base.spec)
    kw: dict[str, Any] = {"adapter": adapter or None}
    system = "" if adapter.startswith("zephyr") else SYSTEM  # the prompt adapter brings the system prompt
    first = system + f"[{adapter}] Question one: how long is the warranty on a frame?"
    before = hit_tokens(on)
    miss_on, miss_off = run_both(services, first, **kw)  # a miss: nothing of this adapter is cached
    assert miss_on.token_ids == miss_off.token_ids and hit_tokens(on) == before
    prompt_len = miss_on.summary.prompt_tokens
    full_on, full_off = run_both(services, first, **kw)  # a full hit: all blocks but the last token's
    assert full_on.token_ids == full_off.token_ids == miss_on.token_ids
    assert hit_tokens(on) - before == (prompt_len - 1) // BLOCK * BLOCK > 0
    before = hit_tokens(on)
    second = system + f"[{adapter}] Do you ship to Norway, and how fast?"
    partial_on, partial_off = run_both(services, second, **kw)
    assert partial_on.token_ids == partial_off.token_ids
    template = on.engine.adapters.prompt(AdapterKey("zephyr", "prompt", 1)) if system == "" else None
    a, b = (on.engine.encode_prompt(p, (), template) for p in (first, second))
    shared = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    assert hit_tokens(on) - before == shared // BLOCK * BLOCK > 0  # the shared head's full blocks only
    chat = (ChatTurn("system", SYSTEM), ChatTurn("user", "Hi!"))
    for _ in range(2):  # chat templates: what counts is the token ids they render to
        chat_on = generate(on.engine, request("", messages=chat, max_new_tokens=8, **kw))
        chat_off = generate(off.engine, request("", messages=chat, max_new_tokens=8, **kw))
        assert chat_on.token_ids == chat_off.token_ids


def test_embed_requests_compute_every_token_and_match(services: tuple[Service, Service]) -> None:
    on, off = services
    text = SYSTEM + "Embed me."
    generate(on.engine, request(text, max_new_tokens=2))  # its blocks are cached now
    before = (hit_tokens(on), sample(on, "lorafleet_prefix_cache_misses_total"))
    e_on = generate(on.engine, request(text, embed=True)).events[-1].embedding
    e_off = generate(off.engine, request(text, embed=True)).events[-1].embedding
    assert e_on is not None and e_off is not None
    assert torch.allclose(torch.tensor(e_on), torch.tensor(e_off), atol=1e-5)
    assert (hit_tokens(on), sample(on, "lorafleet_prefix_cache_misses_total")) == before  # no lookup at all


def test_a_new_version_never_hits_the_old_versions_blocks(
    services: tuple[Service, Service], adapter_dirs: list[Path]
) -> None:
    on, off = services
    on.store.import_peft(adapter_dirs[0], "acme", "swap", on.base.spec)
    prompt = SYSTEM + "Which version answers this?"
    v1 = generate(on.engine, request(prompt, adapter="acme/swap", max_new_tokens=8))
    assert v1.summary.adapter == "acme/swap@1"
    on.store.import_peft(adapter_dirs[1], "acme", "swap", on.base.spec)
    assert [s.to_version for s in on.engine.adapters.versions.refresh().swaps] == [2]
    before = hit_tokens(on)
    v2 = generate(on.engine, request(prompt, adapter="acme/swap", max_new_tokens=8))
    assert v2.summary.adapter == "acme/swap@2"
    assert hit_tokens(on) == before  # same name, same tokens, another version: a miss
    v2_off = generate(off.engine, request(prompt, adapter="acme/swap@2", max_new_tokens=8))
    assert v2.token_ids == v2_off.token_ids != v1.token_ids
    v1_again = generate(on.engine, request(prompt, adapter="acme/swap@1", max_new_tokens=8))
    assert v1_again.token_ids == v1.token_ids and hit_tokens(on) > before  # v1 still hits its own


def test_metrics_count_hits_misses_and_bytes(services: tuple[Service, Service]) -> None:
    on, _ = services
    hits, misses = sample(on, "lorafleet_prefix_cache_hits_total"), sample(on, "lorafleet_prefix_cache_misses_total")
    looked = sample(on, "lorafleet_prefix_cache_lookup_tokens_total")
    prompt = "Metrics test. " + SYSTEM
    first = generate(on.engine, request(prompt, max_new_tokens=2))
    assert sample(on, "lorafleet_prefix_cache_misses_total") == misses + 1
    generate(on.engine, request(prompt, max_new_tokens=2))
    assert sample(on, "lorafleet_prefix_cache_hits_total") == hits + 1
    n = first.summary.prompt_tokens
    assert sample(on, "lorafleet_prefix_cache_lookup_tokens_total") == looked + 2 * (n - 1)
    used = sample(on, "lorafleet_prefix_cache_bytes")
    assert used == on.engine.prefix_cache.bytes_used > 0
    assert sample(on, "lorafleet_prefix_cache_evictions_total") == 0  # 512 MiB is far from full


def test_the_engine_stays_within_a_small_byte_bound(
    services: tuple[Service, Service], tiny_model_dir: Path, tmp_path: Path
) -> None:
    # layers x (k, v) x kv_heads x block x head_dim x bytes of the KV cache's dtype (as the other services')
    kv = 2 * 2 * 2 * BLOCK * 16 * services[0].engine.runner.kv.k[0].element_size()
    svc = tiny_service(tiny_model_dir, tmp_path / "store", prefix_cache_bytes=5 * kv)
    try:
        prompts = [f"{i} " + SYSTEM for i in range(3)]  # distinct from the first token: nothing shared
        outs = [generate(svc.engine, request(p, max_new_tokens=4)).token_ids for p in prompts]
        assert 0 < svc.engine.prefix_cache.bytes_used <= 5 * kv
        assert sample(svc, "lorafleet_prefix_cache_evictions_total") > 0
        assert sample(svc, "lorafleet_prefix_cache_bytes") <= 5 * kv
        again = generate(svc.engine, request(prompts[2], max_new_tokens=4))  # the most recent survived
        assert again.token_ids == outs[2] and hit_tokens(svc) > 0
    finally:
        svc.engine.shutdown(10)


def test_a_request_cancelled_mid_prefill_caches_nothing(services: tuple[Service, Service]) -> None:
    on, _ = services
    prompt = "Cancel test. " + SYSTEM * 3
    ids = on.engine.encode_prompt(prompt, ())
    assert len(ids) > 2 * 64  # max_step_tokens 64: several prefill steps
    blocks_before = len(on.engine.prefix_cache)
    seen: dict[str, int] = {}
    victim: list[Any] = []

    def on_driver(event: TokenEvent) -> None:  # engine thread, right after the victim's first chunk
        if event.token_ids and not seen and victim:
            state = victim[0]._state
            seen["cached"] = state.cached
            victim[0].cancel()

    # The driver decodes; the victim joins it and is cancelled after its first prefill chunk.
    driver, _ = submit(on.engine, request("Tick tock", max_new_tokens=6, rid="driver"), hold_at=1)
    driver.wait_held()
    driver.on_event = on_driver
    sink, handle = submit(on.engine, request(prompt, max_new_tokens=4, rid="victim"))
    victim.append(handle)
    driver.release()
    assert sink.wait().summary.finish_reason is FinishReason.CANCELLED and not sink.token_ids
    driver.wait()
    assert 0 < seen["cached"] < len(ids)  # it was cut mid-prefill
    assert len(on.engine.prefix_cache) == blocks_before  # none of its blocks went in
    owner = "base:"  # the base model's blocks of tenant "" (no keys, no adapter)
    assert on.engine.prefix_cache.lookup(owner, ids, len(ids) - 1)[0] == 0  # nothing of it
    fresh, ref = run_both(services, prompt)
    assert fresh.token_ids == ref.token_ids
    assert on.engine.prefix_cache.lookup(owner, ids, len(ids) - 1)[0] > 0  # a finished prefill did


def test_a_preempted_request_resumes_from_the_cache_with_the_same_tokens(services: tuple[Service, Service]) -> None:
    on, off = services
    engine = on.engine
    prompt = "Preemption test. " + SYSTEM
    ref = generate(off.engine, request(prompt, max_new_tokens=12)).token_ids
    state: list[Any] = []

    def preempt_once(event: TokenEvent) -> None:  # engine thread: preempt between this step and the next
        if len(sink.token_ids) == 5 and not event.final:
            r = state[0]._state
            engine.call(lambda: engine._preempt(r))

    sink = Collected(on_event=preempt_once)
    before = counters(on)
    state.append(engine.submit(request(prompt, max_new_tokens=12, rid="pre"), sink))
    assert sink.wait().token_ids == ref
    assert state[0]._state.preemptions == 1
    prompt_len = sink.summary.prompt_tokens
    # On resume it found its own prompt's blocks (inserted when its prefill finished) ...
    assert state[0]._state.prefix_hit == prompt_len // BLOCK * BLOCK > 0
    # ... but the metrics count one prompt, a miss: the resumed lookup is not another prompt's.
    assert counters(on) == {
        "hits": before["hits"],
        "misses": before["misses"] + 1,
        "hit_tokens": before["hit_tokens"],
        "lookup_tokens": before["lookup_tokens"] + prompt_len - 1,
    }


def test_a_prompt_preempted_mid_prefill_counts_what_it_reused_when_it_resumed(
    services: tuple[Service, Service],
) -> None:
    """Found by an outside review: a prompt that missed, was preempted before its prefill completed and
    on resuming reused blocks another prompt had cached meanwhile was counted as a miss (its first
    lookup only), though it computed only the rest. Its prompt counts once, with the lookup its
    completed prefill started from."""
    on, off = services
    engine = on.engine
    prompt = "Preempted mid-prefill. " + SYSTEM * 3
    ids = engine.encode_prompt(prompt, ())
    assert len(ids) > 2 * 64  # max_step_tokens 64: several prefill steps
    ref = generate(off.engine, request(prompt, max_new_tokens=6)).token_ids
    generate(engine, request(prompt, max_new_tokens=2))  # its blocks, as another prompt would cache them
    owner = "base:"  # the base model's blocks of tenant "" (no keys, no adapter)
    cached, blocks = engine.run(lambda: engine.prefix_cache.lookup(owner, ids, len(ids) - 1))
    assert cached >= 2 * 64
    engine.run(engine.prefix_cache.clear)  # the victim's first lookup finds nothing
    victim: list[Any] = []
    done: list[int] = []

    def put_back(start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        return blocks[start // BLOCK].k, blocks[start // BLOCK].v

    def preempt_and_cache() -> None:  # between two steps: the victim loses its row, the blocks come
        state = victim[0]._state
        done.append(state.cached)
        engine._preempt(state)
        engine.prefix_cache.insert(owner, ids, cached, put_back)

    def on_driver(event: TokenEvent) -> None:  # engine thread, right after the victim's first chunk
        if event.token_ids and victim and not done and victim[0]._state.cached:
            done.append(-1)
            engine.call(preempt_and_cache)

    driver, _ = submit(engine, request("Tick tock", max_new_tokens=8, rid="driver"), hold_at=1)
    driver.wait_held()
    driver.on_event = on_driver
    before = counters(on)
    sink, handle = submit(engine, request(prompt, max_new_tokens=6, rid="victim"))
    victim.append(handle)
    driver.release()
    assert sink.wait().token_ids == ref
    driver.wait()
    state = handle._state
    assert state.preemptions == 1 and 0 < done[1] < len(ids)  # cut mid-prefill
    assert state.prefix_hit == cached  # on resuming it reused the blocks that came meanwhile
    after = counters(on)
    assert after["hits"] - before["hits"] == 1 and after["hit_tokens"] - before["hit_tokens"] == cached
    assert after["lookup_tokens"] - before["lookup_tokens"] == len(ids) - 1  # its prompt counted once


def test_a_prompt_preempted_before_its_first_lookup_is_counted_once(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Found by an outside review: with 16-token steps only the first of four long prompts looks up in
    the first step; the one preempted before its turn (for tenant b) skipped its only lookup's count."""
    svc = tiny_service(tiny_model_dir, tmp_path / "store", max_batch_size=4, max_seq_len=512, max_step_tokens=16)
    engine = svc.engine
    engine.eos_token_ids = frozenset()

    def as_tenant(req: Any, tenant: str) -> Any:
        return replace(req, principal=Principal(key_id=f"k{tenant}", tenant=tenant, role="tenant"))

    try:
        before = counters(svc)
        sent: list[tuple[Collected, Any]] = []
        long_prompt = "The capital of France is " * 20
        engine.run(
            lambda: sent.extend(
                submit(engine, as_tenant(request(long_prompt + str(i), rid=f"a{i}", max_new_tokens=8), "a"))
                for i in range(4)
            )
        )
        engine.run(lambda: None)  # a's rows started; one step in, only the first has looked up
        engine.run(lambda: sent.append(submit(engine, as_tenant(request("Hi", rid="b", max_new_tokens=2), "b"))))
        for sink, _ in sent:
            sink.wait()
        assert sum(handle._state.preemptions for _, handle in sent) >= 1
        after = counters(svc)
        assert after["hits"] + after["misses"] - before["hits"] - before["misses"] == len(sent)  # each once
    finally:
        engine.shutdown(10)


def test_a_prefix_that_cannot_be_copied_in_counts_as_a_miss(services: tuple[Service, Service]) -> None:
    on, off = services
    prompt = "Copy-in failure test. " + SYSTEM
    generate(on.engine, request(prompt, max_new_tokens=2))  # its blocks are cached now
    kv = on.engine.runner.kv

    def no_memory(*args: Any) -> None:
        raise RuntimeError("no memory for the copy")

    before = counters(on)
    on.engine.run(lambda: setattr(kv, "write", no_memory))  # an instance attribute, on the engine thread
    try:
        out = generate(on.engine, request(prompt, max_new_tokens=8))
    finally:
        on.engine.run(lambda: delattr(kv, "write"))
    assert out.token_ids == generate(off.engine, request(prompt, max_new_tokens=8)).token_ids  # all computed
    assert counters(on) == {
        "hits": before["hits"],
        "misses": before["misses"] + 1,  # blocks were found, none was reused
        "hit_tokens": before["hit_tokens"],
        "lookup_tokens": before["lookup_tokens"] + out.summary.prompt_tokens - 1,
    }
