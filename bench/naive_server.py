"""The naive baseline: a real gRPC server that serves one request at a time with PEFT.

It speaks the same ``lorafleet.v1.InferenceService`` proto (``GenerateStream`` only) so the benchmark's
clients are unchanged. It holds one ``PeftModel`` with every adapter loaded (``load_adapter``), and for
each request, strictly one at a time (a lock), it calls ``set_adapter(name)`` and then Hugging Face
``generate`` at batch 1 (greedy), streaming each token's text as it is decoded.

This is what "serve LoRA adapters with PEFT" looks like without a batching engine; the benchmark
compares lorafleet's throughput against it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import grpc
import torch
from transformers.generation.streamers import BaseStreamer

from lorafleet_proto.v1 import inference_pb2, inference_pb2_grpc

DEFAULT_MAX_NEW_TOKENS = 256


class _QueueStreamer(BaseStreamer):
    """Hands each generated token id to an asyncio queue (``None`` marks the end); skips the prompt."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[int | None]) -> None:
        self._loop = loop
        self._queue = queue
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() first pushes the whole prompt
            self._prompt_seen = True
            return
        for tok in value.reshape(-1).tolist():
            self._loop.call_soon_threadsafe(self._queue.put_nowait, int(tok))

    def end(self) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, None)


def peft_adapter_name(ref: str) -> str:
    """The PEFT adapter name used for a lorafleet reference "tenant/name" (PEFT names take no '/')."""
    return ref.replace("/", "__")


class NaiveServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, model: Any, tokenizer: Any, *, ignore_eos: bool) -> None:
        self._model = model
        self._tokenizer = tokenizer
        self._ignore_eos = ignore_eos
        self._lock = threading.Lock()  # one generation at a time, across every RPC
        self._queue_lock: asyncio.Lock | None = None
        self.generations = 0

    def _prompt_ids(self, request: inference_pb2.GenerateStreamRequest) -> list[int]:
        if request.messages:
            text = self._tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.content} for m in request.messages],
                tokenize=False,
                add_generation_prompt=True,
            )
        else:
            text = request.prompt
        return list(self._tokenizer.encode(str(text), add_special_tokens=False))

    def _generate(self, adapter: str, ids: list[int], max_new_tokens: int, streamer: BaseStreamer) -> None:
        with self._lock, torch.inference_mode():
            input_ids = torch.tensor([ids], dtype=torch.long)
            kwargs: dict[str, Any] = {
                "input_ids": input_ids,
                "attention_mask": torch.ones_like(input_ids),
                "max_new_tokens": max_new_tokens,
                "do_sample": False,
                "streamer": streamer,
                "pad_token_id": self._tokenizer.eos_token_id,
            }
            if self._ignore_eos:
                kwargs["min_new_tokens"] = max_new_tokens
            if adapter:
                self._model.set_adapter(peft_adapter_name(adapter))
                self._model.generate(**kwargs)
            else:
                with self._model.disable_adapter():
                    self._model.generate(**kwargs)
            self.generations += 1

    async def GenerateStream(
        self, request: inference_pb2.GenerateStreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateStreamResponse]:
        if request.adapter and peft_adapter_name(request.adapter) not in self._model.peft_config:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"adapter {request.adapter} not loaded")
        ids = self._prompt_ids(request)
        max_new = request.params.max_new_tokens if request.params.HasField("max_new_tokens") else DEFAULT_MAX_NEW_TOKENS
        if self._queue_lock is None:
            self._queue_lock = asyncio.Lock()
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue[int | None] = asyncio.Queue()
        generated: list[int] = []
        sent = ""
        async with self._queue_lock:  # FIFO: requests wait here, strictly one generation at a time
            job = loop.run_in_executor(
                None, self._generate, request.adapter, ids, max_new, _QueueStreamer(loop, tokens)
            )
            while (tok := await tokens.get()) is not None:
                generated.append(tok)
                text = self._tokenizer.decode(generated, skip_special_tokens=True)
                if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for more tokens
                    continue
                if len(text) > len(sent):
                    delta, sent = text[len(sent) :], text
                    yield inference_pb2.GenerateStreamResponse(text=delta)
            await job
        finish = inference_pb2.FINISH_REASON_LENGTH
        if len(generated) < max_new:
            finish = inference_pb2.FINISH_REASON_END_OF_SEQUENCE
        yield inference_pb2.GenerateStreamResponse(
            summary=inference_pb2.GenerationSummary(
                finish_reason=finish,
                prompt_tokens=len(ids),
                generated_tokens=len(generated),
                adapter=request.adapter,
            )
        )


def load_naive_model(
    model_dir: Path, adapters: Mapping[str, Path], dtype: torch.dtype = torch.float32
) -> tuple[Any, Any, float]:
    """(PeftModel with every adapter loaded, tokenizer, seconds spent loading the adapters). ``dtype``:
    the naive server's compute dtype. bench.serving passes its ``--naive-dtype``: float32 by default (HF's
    eager batch-1 decode measured faster in it on CPU than in bf16, so the baseline runs at its best), or
    with ``--naive-dtype match`` the compute dtype lorafleet ran in."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    base.eval()
    items = list(adapters.items())
    if not items:
        raise ValueError("the naive server needs at least one adapter")
    started = time.perf_counter()
    first_ref, first_dir = items[0]
    model = PeftModel.from_pretrained(base, first_dir, adapter_name=peft_adapter_name(first_ref))
    for ref, path in items[1:]:
        model.load_adapter(path, adapter_name=peft_adapter_name(ref), low_cpu_mem_usage=True)
    model.eval()
    return model, tokenizer, time.perf_counter() - started


class NaiveServer:
    """The naive gRPC server on its own event-loop thread, on 127.0.0.1 and an ephemeral port."""

    def __init__(self, model: Any, tokenizer: Any, *, ignore_eos: bool = True) -> None:
        self.servicer = NaiveServicer(model, tokenizer, ignore_eos=ignore_eos)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="naive-grpc", daemon=True)
        self._server: grpc.aio.Server | None = None
        self.port = 0

    async def _start(self) -> int:
        self._server = grpc.aio.server()
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(self.servicer, self._server)
        port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return port

    def start(self) -> int:
        self._thread.start()
        future: Future[int] = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        self.port = future.result(timeout=60)
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            asyncio.run_coroutine_threadsafe(self._server.stop(5), self._loop).result(timeout=60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
