"""Engine behaviour on the tiny model: batching, cancellation, stops, limits, versions, slots."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from enginelib import Collected, engine_held, generate, request, submit, tiny_service
from transformers import AutoModelForCausalLM

from lorafleet_adapters.errors import AdapterFormatError, AdapterNotFound, InvalidAdapterRef
from lorafleet_adapters.prompt import PromptTemplate
from lorafleet_adapters.ref import AdapterRef
from lorafleet_server.app import Service
from lorafleet_server.engine import engine as engine_module
from lorafleet_server.engine.admin import AdapterAdmin, Tier
from lorafleet_server.engine.types import MAX_CHAT_TURNS, ChatTurn, FinishReason, TokenEvent
from lorafleet_server.errors import AdapterBusy, InvalidRequest, QueueFull
from lorafleet_server.model.runner import RowStep

PROMPT = "The capital of France is"
# More tokens than any test lets a request make before it acts on it: only a cancel or a shutdown ends it early.
LONG = 200


@pytest.fixture
def service(tiny_model_dir: Path, tmp_path: Path) -> Iterator[Service]:
    svc = tiny_service(tiny_model_dir, tmp_path / "store", max_new_tokens=LONG)
    yield svc
    svc.engine.shutdown(10)


@pytest.fixture(scope="module")
def adapters(peft_adapter: Any) -> list[Path]:
    return [
        peft_adapter(seed=100 + i, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])
        for i in range(4)
    ]


def test_requests_join_a_running_batch_and_keep_their_outputs(service: Service) -> None:
    alone_long = generate(service.engine, request(PROMPT, max_new_tokens=40)).token_ids
    alone_short = generate(service.engine, request("Once upon a time", max_new_tokens=5)).token_ids
    steps_before = service.engine.steps
    # The long request holds the engine at its first token until the short one is queued: it
    # cannot have finished (nor got far) when the short one joins.
    long_sink, _ = submit(service.engine, request(PROMPT, max_new_tokens=40, rid="long"), hold_at=1)
    long_sink.wait_held()
    long_at_short_end: list[int] = []

    def on_short(event: TokenEvent) -> None:  # engine thread: the long request's state right then
        if event.final:
            long_at_short_end.append(len(long_sink.token_ids))

    short_sink, _ = submit(
        service.engine, request("Once upon a time", max_new_tokens=5, rid="short"), on_event=on_short
    )
    long_sink.release()
    assert short_sink.wait().token_ids == alone_short
    assert long_sink.wait().token_ids == alone_long
    # The short request ran beside the long one (which was mid-way when it ended), in its steps.
    assert long_at_short_end and 1 < long_at_short_end[0] < 40
    assert service.engine.steps - steps_before == 40


def test_cancel_stops_within_a_step_and_frees_the_row(service: Service) -> None:
    sink, handle = submit(service.engine, request(PROMPT, max_new_tokens=LONG), hold_at=1)
    sink.wait_held()
    handle.cancel()  # in the inbox before the engine may take another step
    sink.release()
    sink.wait(30)
    assert sink.summary.finish_reason is FinishReason.CANCELLED
    assert sink.summary.generated_tokens == len(sink.token_ids) == 1  # not one step more
    # The row left the batch before its sink heard the end.
    assert service.engine.load_stats() == (0, 0)
    assert generate(service.engine, request(PROMPT, max_new_tokens=3)).summary.generated_tokens == 3


def test_cancel_while_waiting_in_the_queue(tiny_model_dir: Path, tmp_path: Path) -> None:
    svc = tiny_service(tiny_model_dir, tmp_path / "store", max_batch_size=1)
    try:
        first, _ = submit(svc.engine, request(PROMPT, max_new_tokens=30, rid="a"), hold_at=1)
        first.wait_held()  # the only row is taken: "b" can only wait
        queued, handle = submit(svc.engine, request(PROMPT, max_new_tokens=30, rid="b"))
        handle.cancel()
        first.release()
        assert queued.wait(10).summary.finish_reason is FinishReason.CANCELLED
        assert queued.summary.generated_tokens == 0 and queued.summary.ttft_seconds is None
        assert first.wait().summary.finish_reason is FinishReason.LENGTH
        assert first.summary.generated_tokens == 30
        # Only "a" is billed: "b" computed nothing (a mutation test found this unchecked)
        assert [(row.requests, row.generated_tokens) for row in svc.engine.usage.report(0, 4e9)] == [(1, 30)]
    finally:
        svc.engine.shutdown(10)


def test_cancel_during_a_chunked_prefill_frees_the_row_and_its_kv_row(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One KV row, 16 tokens a step: a 40-word prompt takes several steps to prefill (every time: no
    # prefix cache, which test_prefix_cache covers).
    svc = tiny_service(tiny_model_dir, tmp_path / "store", max_batch_size=1, max_step_tokens=16, prefix_cache_bytes=0)
    try:
        prompt = " ".join(f"word{i}" for i in range(40))
        assert len(svc.engine.encode_prompt(prompt, ())) > 4 * 16
        want = generate(svc.engine, request(prompt, max_new_tokens=8, rid="before")).token_ids
        steps: list[list[RowStep]] = []
        paused, resume = threading.Event(), threading.Event()
        original = svc.engine.runner.step

        def step(rows: list[RowStep], **options: Any) -> Any:  # engine thread: stop after the second prefill chunk
            out = original(rows, **options)
            steps.append(list(rows))
            if len(steps) == 2:
                paused.set()
                assert resume.wait(60)
            return out

        monkeypatch.setattr(svc.engine.runner, "step", step)
        sink, handle = submit(svc.engine, request(prompt, max_new_tokens=8, rid="cut"))
        assert paused.wait(30)
        handle.cancel()
        resume.set()
        sink.wait(30)
        assert sink.summary.finish_reason is FinishReason.CANCELLED
        assert sink.summary.generated_tokens == 0 and not sink.token_ids
        # It was cut mid-prompt: two 16-token chunks, none asking for logits, then nothing more.
        assert [[len(r.token_ids) for r in rows] for rows in steps] == [[16], [16]]
        assert not any(r.want_logits for rows in steps for r in rows)
        assert svc.engine.load_stats() == (0, 0)
        # Its row and KV row are free: the only row serves the next request, whose tokens are those
        # of the same prompt before (the cut prefill left nothing behind that it reads).
        after = submit(svc.engine, request(prompt, max_new_tokens=8, rid="after"))[0].wait(30)
        assert after.token_ids == want and after.summary.finish_reason is FinishReason.LENGTH
        assert len(steps) > 2 + 4  # the next request ran its own chunks
    finally:
        svc.engine.shutdown(10)


def test_a_log_line_about_one_request_carries_its_id_as_a_field(
    service: Service, caplog: pytest.LogCaptureFixture
) -> None:
    """Found by an outside review: the engine's lines about a request (a failed adapter load, a
    preemption, a sink that raised...) had its id only inside the message, so a JSON log queried by
    ``request_id`` missed them."""
    import logging

    def broken(event: TokenEvent) -> None:
        raise RuntimeError("this consumer cannot take events")

    with caplog.at_level(logging.ERROR, logger="lorafleet_server.engine.engine"):
        sink, _ = submit(service.engine, request(PROMPT, rid="rid-7", max_new_tokens=4), on_event=broken)
        sink.wait(30)
    lines = [r for r in caplog.records if "event sink failed" in r.getMessage()]  # its cancel's too, at times
    assert lines and all(line.fields == {"request_id": "rid-7"} for line in lines)  # type: ignore[attr-defined]


def test_stop_string_ends_generation_before_it(service: Service) -> None:
    full = generate(service.engine, request(PROMPT, max_new_tokens=20))
    text = full.text
    assert len(text) > 6
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = text.index(stop)
    stopped = generate(service.engine, request(PROMPT, max_new_tokens=20, stop=(stop,)))
    assert stopped.text == text[:cut]
    assert stopped.summary.finish_reason is FinishReason.STOP


def test_a_stop_string_naming_a_special_token_stops_on_that_token(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Text is decoded without special tokens, so stop=["<|im_start|>"] never matched: the model ran on
    into a new turn, its marker silently dropped. Such a stop ends on the token itself."""
    engine = service.engine
    assert engine.special_token_ids["<|im_start|>"] == engine.tokenizer.convert_tokens_to_ids("<|im_start|>")
    full = generate(engine, request(PROMPT, max_new_tokens=20))
    ids = full.token_ids
    k = next(i for i in range(2, len(ids)) if ids[i] not in ids[:i])  # a token not generated before
    # The tiny model emits no special token on its own: the k-th token plays one.
    monkeypatch.setitem(engine.special_token_ids, "<|fake|>", ids[k])
    stopped = generate(engine, request(PROMPT, max_new_tokens=20, stop=("<|fake|>", "never appears")))
    assert stopped.token_ids == ids[: k + 1]
    assert stopped.summary.finish_reason is FinishReason.STOP
    assert stopped.text == engine.tokenizer.decode(ids[:k], skip_special_tokens=True)
    # A stop on the end-of-sequence token itself (stop=["<|im_end|>"]) ends "stop", as asked: it ended
    # "end_of_sequence", the end-of-sequence check coming first (an outside review).
    monkeypatch.setattr(engine, "eos_token_ids", frozenset({ids[k]}))
    ended = generate(engine, request(PROMPT, max_new_tokens=20))
    assert ended.summary.generated_tokens == k + 1 and ended.summary.finish_reason is FinishReason.END_OF_SEQUENCE
    stopped = generate(engine, request(PROMPT, max_new_tokens=20, stop=("<|fake|>",)))
    assert stopped.token_ids == ids[: k + 1] and stopped.summary.finish_reason is FinishReason.STOP


def test_a_stop_string_holding_a_special_token_and_more_stops_on_that_token(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by an outside review: stop=["<|im_start|>user"] (the usual ChatML stop) never matched, as
    special tokens are not decoded into the text stops are matched in; the request silently ran to its
    length. Such a stop ends on the special token it holds (refusing it, the first fix, broke callers
    sending "<|im_end|>\n", whose requests had ended at the end of sequence: the second diff review)."""
    engine = service.engine
    ids = generate(engine, request(PROMPT, max_new_tokens=20)).token_ids
    k = next(i for i in range(2, len(ids)) if ids[i] not in ids[:i])
    monkeypatch.setitem(engine.special_token_ids, "<|fake|>", ids[k])  # the k-th token plays a special one
    for stop in ("<|fake|>user", "x<|fake|>\n", "\n<|fake|>"):
        stopped = generate(engine, request(PROMPT, max_new_tokens=20, stop=(stop, "never appears")))
        assert stopped.token_ids == ids[: k + 1] and stopped.summary.finish_reason is FinishReason.STOP, stop
        assert stopped.text == engine.tokenizer.decode(ids[:k], skip_special_tokens=True)


def test_streamed_text_equals_decoding_all_tokens(service: Service) -> None:
    sink = generate(service.engine, request("Écris une phrase: 你好, ça va? 🙂", max_new_tokens=30))
    tokenizer = service.engine.tokenizer
    assert len(sink.token_ids) == 30
    assert sink.text == tokenizer.decode(sink.token_ids, skip_special_tokens=True)


def test_split_multibyte_characters_are_streamed_only_when_complete(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model "generates" a fixed text whose CJK characters span several byte-level tokens."""
    tokenizer = service.engine.tokenizer
    text = " Écris: 你好, ça va? 🙂 naïve 日本語"
    script = tokenizer.encode(text, add_special_tokens=False)
    halves = [t for t in script if "\ufffd" in tokenizer.decode([t])]
    assert len(halves) >= 6, "the text must contain characters split across tokens"
    position = iter(range(len(script)))
    monkeypatch.setattr(engine_module, "sample_rows", lambda logits, rows, **_: [script[next(position)] for _ in rows])
    sink = generate(service.engine, request(PROMPT, max_new_tokens=len(script)))
    assert sink.token_ids == script
    assert sink.text == text
    pieces = [e.text for e in sink.events if e.text]
    assert len(pieces) > 5 and not [p for p in pieces if "\ufffd" in p], pieces


def test_length_and_counts(service: Service) -> None:
    sink = generate(service.engine, request(PROMPT, max_new_tokens=7))
    ids = service.engine.encode_prompt(PROMPT, ())
    assert sink.summary.prompt_tokens == len(ids)
    assert sink.summary.generated_tokens == len(sink.token_ids) == 7
    assert sink.summary.finish_reason is FinishReason.LENGTH
    assert sink.summary.ttft_seconds is not None and sink.summary.ttft_seconds <= sink.summary.total_seconds


def test_seeded_sampling_is_reproducible_and_differs_from_greedy(service: Service) -> None:
    def run(seed: int) -> list[int]:
        return generate(
            service.engine, request(PROMPT, max_new_tokens=12, temperature=1.0, top_p=0.95, top_k=50, seed=seed)
        ).token_ids

    greedy = generate(service.engine, request(PROMPT, max_new_tokens=12)).token_ids
    assert len(greedy) == 12 and len(run(7)) == 12
    assert run(7) == run(7)
    assert run(7) != run(8)
    assert run(7) != greedy and run(8) != greedy
    # seed 0 is a seed (OpenAI clients send it): a `seed or random` survived an outside mutation run
    assert run(0) == run(0) != run(7)


def test_repetition_penalty_matches_transformers(service: Service, tiny_model_dir: Path) -> None:
    prompt = "1, 2, 3, 4,"  # without a penalty the tiny model repeats a token 16 tokens in
    penalized = generate(service.engine, request(prompt, max_new_tokens=24, repetition_penalty=1.3))
    plain = generate(service.engine, request(prompt, max_new_tokens=24)).token_ids
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([service.engine.encode_prompt(prompt, ())])
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=24, do_sample=False, repetition_penalty=1.3, eos_token_id=2, pad_token_id=2
        )
    want = out[0, ids.shape[1] :].tolist()
    if 2 in want:  # transformers stops at EOS and emits it; the engine stops there and does not
        want = want[: want.index(2)]
        assert penalized.summary.finish_reason is FinishReason.END_OF_SEQUENCE
    assert len(want) >= 20
    assert penalized.token_ids == want
    assert plain[: len(want)] != want  # the penalty changed this run: it was applied, not ignored


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": -3}, "max_new_tokens"),
        ({"max_new_tokens": LONG + 1}, "max_new_tokens"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"stop": ("",)}, "stop"),
    ],
)
def test_bad_parameters_are_refused_at_submit(service: Service, params: dict[str, Any], message: str) -> None:
    req = request(PROMPT, **{"max_new_tokens": 8, **params})
    with pytest.raises(InvalidRequest, match=message):
        service.engine.submit(req, lambda _e: None)


def test_prompt_over_the_context_limit(service: Service) -> None:
    with pytest.raises(InvalidRequest, match="context limit"):
        service.engine.submit(request("hello " * 300, max_new_tokens=8), lambda _e: None)
    # Empty turns: no characters, yet each costs the template's role markers. Refused before the
    # chat is rendered and tokenized (500,000 of them took ~37 s of a worker thread).
    turns = (ChatTurn("user", ""),) * MAX_CHAT_TURNS
    started = time.perf_counter()
    with pytest.raises(InvalidRequest, match=rf"at least {2 * MAX_CHAT_TURNS} tokens\) plus max_new_tokens 8 exceeds"):
        service.engine.submit(request("", messages=turns, max_new_tokens=8), lambda _e: None)
    with pytest.raises(InvalidRequest, match=f"at most {MAX_CHAT_TURNS} turns, got 200000"):  # more: refused first
        service.engine.submit(
            request("", messages=(ChatTurn("user", ""),) * 200_000, max_new_tokens=8), lambda _e: None
        )
    assert time.perf_counter() - started < 5


def test_prompt_and_messages_are_exclusive_and_roles_checked(service: Service) -> None:
    with pytest.raises(InvalidRequest, match="exactly one"):
        service.engine.submit(request(PROMPT, messages=(ChatTurn("user", "hi"),)), lambda _e: None)
    with pytest.raises(InvalidRequest, match="role"):
        service.engine.submit(request("", messages=(ChatTurn("robot", "hi"),)), lambda _e: None)


def test_concurrent_submits_tokenize_a_chat_as_a_lone_submit_does(service: Service) -> None:
    """gRPC submits each request on its own worker thread. transformers implements split_special_tokens
    with a flag on the shared Rust tokenizer, so encodings that differ in it raced (fixed in prompts.py):
    <|im_start|> came out as text, and batched outputs differed from solo ones now and then."""
    turns = (ChatTurn("system", "Be brief."), ChatTurn("user", "Write a short story about a lighthouse keeper."))
    want = service.engine.encode_prompt(None, turns)
    with ThreadPoolExecutor(max_workers=8) as pool:  # what Engine.submit does on gRPC's worker threads
        got = list(pool.map(lambda _: service.engine.encode_prompt(None, turns), range(800)))
    wrong = [ids for ids in got if ids != want]
    assert not wrong, f"{len(wrong)} of {len(got)} concurrent encodings differ, e.g. {wrong[0][:12]} vs {want[:12]}"


def test_chat_messages_use_the_chat_template(service: Service) -> None:
    turns = (ChatTurn("system", "Be brief."), ChatTurn("user", "Hi"))
    ids = service.engine.encode_prompt(None, turns)
    text = service.engine.tokenizer.decode(ids)
    assert "Be brief." in text and "Hi" in text and "assistant" in text
    assert generate(service.engine, request("", messages=turns, max_new_tokens=3)).summary.generated_tokens == 3


def test_queue_limit(tiny_model_dir: Path, tmp_path: Path) -> None:
    svc = tiny_service(tiny_model_dir, tmp_path / "store", max_batch_size=1, max_waiting=2)
    try:
        # Exactly: the free row plus max_waiting, then refused (it took up to three more before, so an
        # off-by-one in the limit survived an outside mutation run).
        with engine_held(svc.engine):
            sinks = [submit(svc.engine, request(PROMPT, max_new_tokens=30, rid=str(i)))[0] for i in range(3)]
            with pytest.raises(QueueFull):
                svc.engine.submit(request(PROMPT, max_new_tokens=30), lambda _e: None)
        for s in sinks:
            s.wait()
    finally:
        svc.engine.shutdown(10)


def test_unknown_and_malformed_adapters(service: Service) -> None:
    with pytest.raises(AdapterNotFound):
        service.engine.submit(request(PROMPT, adapter="acme/nothing"), lambda _e: None)
    with pytest.raises(InvalidAdapterRef):
        request(PROMPT, adapter="../etc/passwd")


def test_new_version_does_not_change_running_requests(service: Service, adapters: list[Path]) -> None:
    spec = service.base.spec
    service.store.import_peft(adapters[0], "acme", "bot", spec)
    v1_alone = generate(service.engine, request(PROMPT, adapter="acme/bot", max_new_tokens=40)).token_ids
    # The v1 request holds the engine at its first token while v2 is published, swapped in and asked for.
    running, _ = submit(service.engine, request(PROMPT, adapter="acme/bot", max_new_tokens=40, rid="v1"), hold_at=1)
    running.wait_held()
    service.store.import_peft(adapters[1], "acme", "bot", spec)  # publish v2 mid-generation
    result = service.engine.adapters.versions.refresh()  # what the poller does every interval
    assert [(s.adapter, s.from_version, s.to_version) for s in result.swaps] == [("acme/bot", 1, 2)]
    newer_sink, _ = submit(service.engine, request(PROMPT, adapter="acme/bot", max_new_tokens=40, rid="v2"))
    assert not running.done.is_set()
    running.release()
    newer = newer_sink.wait()
    assert running.wait().token_ids == v1_alone
    assert running.summary.adapter == "acme/bot@1"
    assert newer.summary.adapter == "acme/bot@2"
    assert newer.token_ids != v1_alone
    pinned = generate(service.engine, request(PROMPT, adapter="acme/bot@1", max_new_tokens=40))
    assert pinned.token_ids == v1_alone


def test_concurrent_requests_for_a_cold_adapter_load_it_once(
    service: Service, adapters: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    service.store.import_peft(adapters[0], "acme", "cold", service.base.spec)
    calls: list[str] = []
    original = service.store.load
    submitted = threading.Event()

    def counting_load(key: Any, spec: Any, **options: Any) -> Any:
        calls.append(str(key))
        assert submitted.wait(30)  # a slow disk: every request arrives while the load runs
        return original(key, spec, **options)

    monkeypatch.setattr(service.store, "load", counting_load)
    sinks = [
        submit(service.engine, request(PROMPT, adapter="acme/cold", max_new_tokens=4, rid=str(i)))[0] for i in range(6)
    ]
    submitted.set()
    outputs = {tuple(s.wait().token_ids) for s in sinks}
    assert calls == ["acme/cold@1"]
    assert len(outputs) == 1


def test_more_adapters_than_slots_all_complete(tiny_model_dir: Path, tmp_path: Path, adapters: list[Path]) -> None:
    svc = tiny_service(tiny_model_dir, tmp_path / "store", max_loaded_adapters=2)
    try:
        for i, d in enumerate(adapters):
            svc.store.import_peft(d, "acme", f"a{i}", svc.base.spec)
        alone = {
            i: generate(svc.engine, request(PROMPT, adapter=f"acme/a{i}", max_new_tokens=6)).token_ids
            for i in range(len(adapters))
        }
        sinks = {
            i: submit(svc.engine, request(PROMPT, adapter=f"acme/a{i}", max_new_tokens=6, rid=str(i)))[0]
            for i in range(len(adapters))
        }
        assert {i: s.wait().token_ids for i, s in sinks.items()} == alone
    finally:
        svc.engine.shutdown(10)


def test_pins_are_respected_and_all_pinned_is_refused(
    tiny_model_dir: Path, tmp_path: Path, adapters: list[Path]
) -> None:
    svc = tiny_service(tiny_model_dir, tmp_path / "store", max_loaded_adapters=2)
    try:
        for i, d in enumerate(adapters[:3]):
            svc.store.import_peft(d, "acme", f"a{i}", svc.base.spec)
        admin = AdapterAdmin(svc.engine)
        assert admin.load("acme/a0") == (admin.load("acme/a0")[0], Tier.DEVICE)
        admin.pin("acme/a0")
        admin.pin("acme/a1")
        sink, _ = submit(svc.engine, request(PROMPT, adapter="acme/a2", max_new_tokens=3))
        with pytest.raises(AdapterBusy):
            sink.wait().summary  # noqa: B018
        admin.unpin("acme/a1")
        assert generate(svc.engine, request(PROMPT, adapter="acme/a2", max_new_tokens=3)).summary.adapter == "acme/a2@1"
        view = admin.get("acme/a0")
        assert view.versions[0].pinned and view.versions[0].tier is Tier.DEVICE
        assert {v.tier for v in admin.get("acme/a1").versions} == {Tier.HOST}
        assert admin.unload("acme/a0")[1] is True
    finally:
        svc.engine.shutdown(10)


def test_embedding_is_the_mean_final_hidden_state(service: Service, tiny_model_dir: Path) -> None:
    sink = generate(service.engine, request(PROMPT, embed=True))
    assert sink.events[-1].embedding is not None
    emb = torch.tensor(sink.events[-1].embedding)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([service.engine.encode_prompt(PROMPT, ())])
    with torch.no_grad():
        want = model.model(ids).last_hidden_state[0].mean(0)
    torch.testing.assert_close(emb, want, rtol=1e-4, atol=1e-4)


def test_shutdown_finishes_running_requests_and_refuses_new(tiny_model_dir: Path, tmp_path: Path) -> None:
    svc = tiny_service(tiny_model_dir, tmp_path / "store", max_new_tokens=LONG)
    accepting_at_end: list[bool] = []

    def on_event(event: TokenEvent) -> None:  # engine thread: was the shutdown under way when it ended?
        if event.final:
            accepting_at_end.append(svc.engine.accepting)

    sink, _ = submit(svc.engine, request(PROMPT, max_new_tokens=LONG), hold_at=1, on_event=on_event)
    sink.wait_held()
    stopper = threading.Thread(target=svc.engine.shutdown, args=(60,))
    stopper.start()
    deadline = time.monotonic() + 30  # shutdown() stops accepting, then posts its drain
    while svc.engine.accepting and time.monotonic() < deadline:
        time.sleep(0.001)
    sink.release()
    stopper.join(90)
    assert not stopper.is_alive()
    assert sink.wait().summary.finish_reason is FinishReason.LENGTH
    assert sink.summary.generated_tokens == LONG and accepting_at_end == [False]
    with pytest.raises(Exception, match="shutting down"):
        svc.engine.submit(request(PROMPT), lambda _e: None)


def test_long_prompts_prefill_in_chunks_without_changing_outputs(tiny_model_dir: Path, tmp_path: Path) -> None:
    prompt = " ".join(f"word{i}" for i in range(40))
    wide = tiny_service(tiny_model_dir, tmp_path / "a")
    narrow = tiny_service(tiny_model_dir, tmp_path / "b", max_step_tokens=16)
    try:
        want = generate(wide.engine, request(prompt, max_new_tokens=8)).token_ids
        sinks = [submit(narrow.engine, request(prompt, max_new_tokens=8, rid=str(i)))[0] for i in range(3)]
        assert all(s.wait().token_ids == want for s in sinks)
        assert len(narrow.engine.encode_prompt(prompt, ())) > 3 * 16
    finally:
        wide.engine.shutdown(10)
        narrow.engine.shutdown(10)


def test_a_failed_forward_fails_its_requests_and_the_engine_keeps_serving(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = service.engine.runner.step
    calls = {"n": 0}

    def flaky(rows: Any, **options: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("device fell over")
        return original(rows, **options)

    monkeypatch.setattr(service.engine.runner, "step", flaky)
    sink, _ = submit(service.engine, request(PROMPT, max_new_tokens=4))
    with pytest.raises(RuntimeError, match="device fell over"):
        sink.wait().summary  # noqa: B018
    assert generate(service.engine, request(PROMPT, max_new_tokens=4)).summary.generated_tokens == 4
    assert service.engine.load_stats() == (0, 0)


def test_a_temperature_or_penalty_near_zero_is_served_and_a_row_that_cannot_be_sampled_fails_alone(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = service.engine
    greedy = generate(engine, request(PROMPT, max_new_tokens=6)).token_ids
    # logits / 1e-40 overflow to inf (softmax: NaN) unless the largest logit is taken out first
    assert generate(engine, request(PROMPT, max_new_tokens=6, temperature=1e-40)).token_ids == greedy
    penalized = generate(engine, request(PROMPT, max_new_tokens=6, temperature=0.7, repetition_penalty=1e-40, seed=1))
    assert penalized.summary.generated_tokens == 6

    seeded = {"max_new_tokens": 6, "temperature": 1.0, "seed": 7}
    alone = generate(engine, request(PROMPT, rid="alone", **seeded)).token_ids
    real = engine_module.sample_rows

    def nan_logits_for_the_marked_row(logits: torch.Tensor, rows: list[Any], **_: Any) -> list[int | Exception]:
        logits = logits.clone()
        for i, row in enumerate(rows):
            if row.temperature == 0.5:  # the marked request's row: its model output went bad
                logits[i] = float("nan")
        return real(logits, rows)

    monkeypatch.setattr(engine_module, "sample_rows", nan_logits_for_the_marked_row)
    with engine_held(engine):  # both in the same steps
        bad, _ = submit(engine, request(PROMPT, rid="bad", max_new_tokens=6, temperature=0.5))
        good, _ = submit(engine, request(PROMPT, rid="good", **seeded))
    with pytest.raises(RuntimeError, match="cannot sample the next token"):
        bad.wait().summary  # noqa: B018
    assert good.wait().token_ids == alone  # its draws are the ones it makes alone
    assert generate(engine, request(PROMPT, max_new_tokens=3)).summary.generated_tokens == 3
    assert engine.accepting


def test_many_queued_requests_whose_adapter_fails_at_admission_fail_one_by_one(
    tiny_model_dir: Path, tmp_path: Path, adapters: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """More failures in one admission pass than Python's recursion limit: each fails, the engine serves on."""
    svc = tiny_service(tiny_model_dir, tmp_path / "store", max_waiting=2000)
    try:
        svc.store.import_peft(adapters[0], "acme", "a", svc.base.spec)
        engine = svc.engine

        def busy(_key: Any, **_kwargs: Any) -> None:
            raise AdapterBusy("every device slot is pinned")

        monkeypatch.setattr(engine.adapters, "poll", busy)
        with engine_held(engine):
            sinks = [submit(engine, request(PROMPT, adapter="acme/a", rid=f"r{i}"))[0] for i in range(1500)]
        for sink in sinks:
            with pytest.raises(AdapterBusy):
                sink.wait().summary  # noqa: B018
        monkeypatch.undo()
        assert generate(engine, request(PROMPT, adapter="acme/a", max_new_tokens=3)).summary.generated_tokens == 3
    finally:
        svc.engine.shutdown(10)


def test_a_bug_while_loading_an_adapter_fails_its_requests_not_the_engine(
    service: Service, adapters: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    service.store.import_peft(adapters[0], "acme", "a", service.base.spec)
    engine = service.engine

    def broken(_key: Any, **_kwargs: Any) -> None:
        raise RecursionError("maximum recursion depth exceeded")  # not an AdapterError: a bug's kind

    monkeypatch.setattr(engine.adapters, "poll", broken)
    sinks = [submit(engine, request(PROMPT, adapter="acme/a", rid=f"r{i}"))[0] for i in range(3)]
    for sink in sinks:
        with pytest.raises(RecursionError):
            sink.wait().summary  # noqa: B018
    monkeypatch.undo()
    assert engine.accepting
    assert generate(engine, request(PROMPT, adapter="acme/a", max_new_tokens=3)).summary.generated_tokens == 3


def test_a_broken_new_version_is_refused_and_the_old_one_keeps_serving(service: Service, adapters: list[Path]) -> None:
    service.store.import_peft(adapters[0], "acme", "bot", service.base.spec)
    v1 = generate(service.engine, request(PROMPT, adapter="acme/bot", max_new_tokens=6)).token_ids
    key2 = service.store.import_peft(adapters[1], "acme", "bot", service.base.spec)
    weights = service.store.version_dir(key2) / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])  # corrupted after publishing
    result = service.engine.adapters.versions.refresh()
    assert not result.swaps and [(f.adapter, f.version) for f in result.failures] == [("acme/bot", 2)]
    served = generate(service.engine, request(PROMPT, adapter="acme/bot", max_new_tokens=6))
    assert served.summary.adapter == "acme/bot@1" and served.token_ids == v1
    assert service.metrics.registry.get_sample_value("lorafleet_adapter_swap_failures_total") == 1
    assert not service.engine.adapters.versions.refresh().failures  # refused once, not retried each poll
    service.store.import_peft(adapters[2], "acme", "bot", service.base.spec)
    assert [s.to_version for s in service.engine.adapters.versions.refresh().swaps] == [3]
    assert service.metrics.registry.get_sample_value("lorafleet_adapter_swaps_total") == 1


def test_a_prompt_version_too_long_for_the_context_is_refused_by_the_watcher(service: Service) -> None:
    """Found by an outside review: a template of 800+ tokens on a 256-token server was swapped to, and
    every request of the name failed with a context error for a prompt of "hi"."""
    service.store.publish_prompt("acme", "long", PromptTemplate("Be brief."), service.base.spec)
    assert generate(service.engine, request("hi", adapter="acme/long", max_new_tokens=2)).summary.adapter == (
        "acme/long@1"
    )
    service.store.publish_prompt("acme", "long", PromptTemplate("word " * 300), service.base.spec)
    result = service.engine.adapters.versions.refresh()
    assert not result.swaps and [f.version for f in result.failures] == [2]
    assert "leaves no room for a request" in result.failures[0].error
    assert generate(service.engine, request("hi", adapter="acme/long", max_new_tokens=2)).summary.adapter == (
        "acme/long@1"
    )


def test_a_broken_new_prompt_version_is_one_failed_swap_not_also_a_failed_load(service: Service) -> None:
    """The watcher's check of a broken prompt (or head) version counted a failed load as well as a
    failed swap, so two alerts fired for one event (a broken LoRA counted the swap alone)."""
    service.store.publish_prompt("acme", "p", PromptTemplate("Be brief."), service.base.spec)
    service.engine.adapters.versions.resolve(AdapterRef.parse("acme/p"))  # tracked: the watcher checks it
    key2 = service.store.publish_prompt("acme", "p", PromptTemplate("Be long."), service.base.spec)
    (service.store.version_dir(key2) / "prompt.json").write_text("{}")  # damaged after publishing
    result = service.engine.adapters.versions.refresh()
    assert [(f.adapter, f.version) for f in result.failures] == [("acme/p", 2)]
    registry = service.metrics.registry
    assert registry.get_sample_value("lorafleet_adapter_swap_failures_total") == 1
    assert registry.get_sample_value("lorafleet_adapter_load_failures_total") == 0


def test_the_watcher_polls_the_store(tiny_model_dir: Path, tmp_path: Path, adapters: list[Path]) -> None:
    svc = tiny_service(tiny_model_dir, tmp_path / "store", adapter_poll_seconds=0.2)
    try:
        svc.store.import_peft(adapters[0], "acme", "bot", svc.base.spec)
        served = generate(svc.engine, request(PROMPT, adapter="acme/bot", max_new_tokens=2))
        assert served.summary.adapter == "acme/bot@1"
        svc.store.import_peft(adapters[1], "acme", "bot", svc.base.spec)
        deadline = time.monotonic() + 10
        while svc.engine.adapters.versions.serving().get("acme/bot") != 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        served = generate(svc.engine, request(PROMPT, adapter="acme/bot", max_new_tokens=2))
        assert served.summary.adapter == "acme/bot@2"
    finally:
        svc.engine.shutdown(10)


def test_prompt_adapters_render_system_and_examples_without_lora(service: Service) -> None:
    from lorafleet_adapters.prompt import PromptTurn

    template = PromptTemplate(
        system="You are Zephyr Bikes support. Answer in one sentence.",
        examples=(PromptTurn("user", "Warranty?"), PromptTurn("assistant", "Two years on frames.")),
    )
    key = service.store.publish_prompt("zephyr", "support", template, service.base.spec)
    assert service.store.manifest(key).kind == "prompt"
    turns = (ChatTurn("system", "Be polite."), ChatTurn("user", "Hi"))
    sink = generate(service.engine, request("", messages=turns, adapter="zephyr/support", max_new_tokens=4))
    assert sink.summary.adapter == "zephyr/support@1"
    ids = service.engine.encode_prompt(None, turns, template)
    assert sink.summary.prompt_tokens == len(ids)
    text = service.engine.tokenizer.decode(ids)
    assert "Zephyr Bikes" in text and "Two years on frames." in text and "Be polite." in text and "Hi" in text
    plain = generate(service.engine, request("Hi", adapter="zephyr/support", max_new_tokens=2))
    assert plain.summary.prompt_tokens == len(service.engine.encode_prompt("Hi", (), template))
    assert service.engine.adapters.slots.resident_count() == 0  # no LoRA slot used
    # Tampering is caught like for weights.
    fresh = service.store.publish_prompt("zephyr", "other", template, service.base.spec)
    (service.store.version_dir(fresh) / "prompt.json").write_text('{"system": "evil"}')
    with pytest.raises(AdapterFormatError, match=r"checksum mismatch"):
        service.engine.submit(request("Hi", adapter="zephyr/other"), lambda _e: None)


def test_cancel_touches_only_its_own_request_even_with_a_shared_request_id(service: Service) -> None:
    a, handle_a = submit(service.engine, request(PROMPT, max_new_tokens=LONG, rid="same"), hold_at=1)
    b, _ = submit(service.engine, request(PROMPT, max_new_tokens=30, rid="same"))
    a.wait_held()
    handle_a.cancel()
    a.release()
    assert a.wait().summary.finish_reason is FinishReason.CANCELLED
    assert a.summary.generated_tokens == 1
    assert b.wait().summary.finish_reason is FinishReason.LENGTH
    assert b.summary.generated_tokens == 30


@pytest.mark.parametrize("linear_threads", [1, 2])
def test_the_step_s_native_kernels_share_the_linears_pool(
    tiny_model_dir: Path, tmp_path: Path, linear_threads: int
) -> None:
    """Where the base Linears run on the native bf16 kernel's helper pool (``--linear-threads`` > 1),
    the native attention and multi-LoRA get that same pool; otherwise neither takes one (they keep the
    step's torch threads). A request decodes either way."""
    svc = tiny_service(tiny_model_dir, tmp_path / "store", dtype="bfloat16", linear_threads=linear_threads)
    try:
        runner = svc.engine.runner
        pool = svc.base.pool
        if svc.base.linear_kernel in ("native-amx", "native-avx512") and linear_threads > 1:
            assert pool is not None and pool.threads == linear_threads
        else:
            assert pool is None
        for kernel in (runner.native_attention, runner.native_lora):
            assert kernel is None or kernel.pool is pool
        assert 1 <= generate(svc.engine, request("Hello", max_new_tokens=4)).summary.generated_tokens <= 4
    finally:
        svc.engine.shutdown(10)


@pytest.mark.parametrize("held", ["ï¿½", "Ã"], ids=["replacement-character", "lone-utf8-byte"])
@pytest.mark.parametrize("stop", [(), ("o\ufffd",)], ids=["no-stop", "stop-across-held-text"])
@pytest.mark.parametrize("ending", ["end-of-sequence", "max-new-tokens"])
def test_text_held_back_at_the_end_is_sent(
    service: Service, monkeypatch: pytest.MonkeyPatch, held: str, stop: tuple[str, ...], ending: str
) -> None:
    """Found by an outside review: the detokenizer holds back text that ends in U+FFFD (a real one, or
    an incomplete UTF-8 sequence) until the next token completes it; when that token was the end of
    sequence, the text was dropped (the length and stop-token endings sent it). A stop string reaching
    into that text still stops there, with finish reason "stop", whether the generation ends with the
    end of sequence or at max_new_tokens (a mutation that reported the latter as "length" survived).
    ``held``: the token in byte-level spelling (U+FFFD's three bytes, or the lone byte 0xC3)."""
    tok = service.engine.tokenizer
    last = tok.convert_tokens_to_ids(held)
    assert isinstance(last, int) and last != tok.unk_token_id
    script = [*tok.encode(" Hello", add_special_tokens=False), last]
    eos = ending == "end-of-sequence"
    plan = iter([*script, next(iter(service.engine.eos_token_ids))] if eos else script)
    monkeypatch.setattr(engine_module, "sample_rows", lambda _logits, rows, **_kw: [next(plan) for _ in rows])
    done = generate(service.engine, request("Say hi", max_new_tokens=16 if eos else len(script), stop=stop))
    whole = tok.decode(done.token_ids, skip_special_tokens=True)
    assert whole == " Hello\ufffd"
    if stop:
        assert (done.text, done.summary.finish_reason) == (" Hell", FinishReason.STOP)
    else:
        unstopped = FinishReason.END_OF_SEQUENCE if eos else FinishReason.LENGTH
        assert (done.text, done.summary.finish_reason) == (whole, unstopped)


@pytest.mark.parametrize("ending", ["end-of-sequence", "max-new-tokens"])
def test_a_possible_stop_held_at_the_end_is_sent(
    service: Service, monkeypatch: pytest.MonkeyPatch, ending: str
) -> None:
    """Text held back because it may begin a stop string ("lo" of "lo!") is sent when the generation
    ends without the stop (a mutation that made the stop matcher's flush drop it survived)."""
    tok = service.engine.tokenizer
    script = tok.encode(" Hello", add_special_tokens=False)
    eos = ending == "end-of-sequence"
    plan = iter([*script, next(iter(service.engine.eos_token_ids))] if eos else script)
    monkeypatch.setattr(engine_module, "sample_rows", lambda _logits, rows, **_kw: [next(plan) for _ in rows])
    done = generate(service.engine, request("Say hi", max_new_tokens=16 if eos else len(script), stop=("lo!",)))
    unstopped = FinishReason.END_OF_SEQUENCE if eos else FinishReason.LENGTH
    assert (done.text, done.summary.finish_reason) == (" Hello", unstopped)


@pytest.fixture(scope="module")
def rank12_adapters(peft_adapter: Any) -> list[Path]:
    return [
        peft_adapter(seed=400 + i, r=12, lora_alpha=24, target_modules=["q_proj", "v_proj", "down_proj"])
        for i in range(2)
    ]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_an_adapters_greedy_text_is_the_same_alone_beside_others_and_after_a_preemption(
    tiny_model_dir: Path, tmp_path: Path, rank12_adapters: list[Path], dtype: str
) -> None:
    """Found by an outside review: at a rank the native LoRA had no token blocks for (12), ``auto`` gave
    prompt chunks of more than 64 tokens to a torch kernel and decode steps to the native one, so an r=12
    adapter's greedy text changed beside a long prompt (bf16: from token 12) and after a preemption,
    whose resume recomputes prompt and tokens in one long step (from token 24)."""
    svc = tiny_service(tiny_model_dir, tmp_path / "store", dtype=dtype, prefix_cache_bytes=0, burst_wait_ms=0)
    engine = svc.engine
    engine.eos_token_ids = frozenset()  # every request runs its 40 tokens
    try:
        for i, path in enumerate(rank12_adapters):
            svc.store.import_peft(path, "acme", f"a{i}", svc.base.spec)
        prompt = " ".join(f"w{i}" for i in range(20))  # alone, its prefill is one short step
        alone = generate(engine, request(prompt, adapter="acme/a0", max_new_tokens=40)).token_ids
        with engine_held(engine):  # the same request beside a long prompt of another adapter: one long step
            mine, _ = submit(engine, request(prompt, adapter="acme/a0", max_new_tokens=40, rid="me"))
            other, _ = submit(engine, request(" ".join(f"z{i}" for i in range(60)), adapter="acme/a1", rid="o"))
        assert mine.wait().token_ids == alone
        other.wait()
        handles: list[Any] = []

        def preempt_at_8(_event: TokenEvent) -> None:  # engine thread: preempt it before the next step
            if len(resumed.token_ids) == 8:
                engine.call(lambda: engine._preempt(handles[0]._state))

        resumed = Collected(on_event=preempt_at_8)
        handles.append(engine.submit(request(prompt, adapter="acme/a0", max_new_tokens=40, rid="p"), resumed))
        assert resumed.wait().token_ids == alone and handles[0]._state.preemptions == 1
    finally:
        engine.shutdown(10)


def test_every_row_the_engine_hands_out_is_begun_first_starts_and_resumes(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The engine calls ``KVCache.begin`` on every row it hands out, a resumed request's too, so a row
    never shows the next sequence the previous one's positions (the prefix cache copies them out by
    what was written). Stop 45 tested ``begin`` alone; here, through the engine: one row, a long request,
    then a short one preempted and resumed on the same row."""
    svc = tiny_service(tiny_model_dir, tmp_path / "store", max_batch_size=1)
    engine, kv = svc.engine, svc.engine.runner.kv
    engine.eos_token_ids = frozenset()
    begun: list[tuple[int, int]] = []  # (row, positions written before begin)
    real_begin = kv.begin

    def begin(row: int) -> None:
        begun.append((row, kv._written[row]))
        real_begin(row)
        assert kv._written[row] == 0

    kv.begin = begin  # type: ignore[method-assign]
    try:
        generate(engine, request(" ".join(["long"] * 80), max_new_tokens=30))
        handles: list[Any] = []

        def preempt_at_3(_event: TokenEvent) -> None:
            if len(resumed.token_ids) == 3:
                engine.call(lambda: engine._preempt(handles[0]._state))

        resumed = Collected(on_event=preempt_at_3)
        handles.append(engine.submit(request("short", max_new_tokens=8, rid="p"), resumed))
        resumed.wait()
        assert handles[0]._state.preemptions == 1
        assert [row for row, _ in begun] == [0, 0, 0]  # the long one, the short one, its resume
        assert begun[1][1] > 80 and begun[2][1] > 0  # each began over the positions of the one before
    finally:
        engine.shutdown(10)
