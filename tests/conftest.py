"""Shared fixtures: the real default model (prepared once) and a tiny random Llama built here."""

from __future__ import annotations

import gc
import logging
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from enginelib import KERNEL_CACHE_ENV
from modellib import copy_tokenizer

from lorafleet_adapters.peft_format import BaseModelSpec
from lorafleet_server.model.loader import base_spec_from_files
from lorafleet_server.model.native import NativeLora, find_compiler, load_native_lora
from lorafleet_server.model.prepare import prepare_default_model


def data_dir() -> Path:
    return Path(os.environ.get("LORAFLEET_DATA_DIR", Path(__file__).resolve().parents[1] / "data"))


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Iterator[None]:
    """``lorafleet`` commands run in-process (``cli.main``) install a handler on the root logger that
    writes to the sys.stderr of that moment: under pytest, a capture stream closed after the test, so
    every later log line (a server thread of another test) would fail with "I/O operation on closed
    file". Each test gets the root logger back as it found it."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(autouse=True)
def _gc_unfrozen() -> Iterator[None]:
    """Code that freezes the process's heap (``lorafleet serve``'s ``freeze_startup_heap``, a bench run
    in-process) leaves it unfrozen: the suite builds and drops many services, and frozen, their
    reference cycles would never be collected."""
    yield
    if gc.get_freeze_count():
        gc.unfreeze()


@pytest.fixture(scope="session", autouse=True)
def _kernel_cache_shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One cache of native kernels for the session: services built by ``enginelib.server_config`` and
    servers started as processes (which read ``LORAFLEET_KERNEL_CACHE_DIR``) load the kernels the first
    one built instead of compiling ~3 s of C each. Tests of the build itself pass their own directory."""
    path = tmp_path_factory.mktemp("kernel-cache")
    saved = os.environ.get(KERNEL_CACHE_ENV)
    os.environ[KERNEL_CACHE_ENV] = str(path)
    yield path
    if saved is None:
        os.environ.pop(KERNEL_CACHE_ENV, None)
    else:
        os.environ[KERNEL_CACHE_ENV] = saved


@pytest.fixture(scope="module")
def seaweed_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real S3 server (SeaweedFS on free loopback ports, tests/seaweedlib.py) for one test module, with
    the bucket the module names in ``BUCKET``; stopped when the module ends."""
    from seaweedlib import SeaweedFS

    server = SeaweedFS.start(tmp_path_factory.mktemp("seaweed"), die_with_parent=True)
    try:
        server.create_bucket(request.module.BUCKET)
        yield server
    finally:
        server.stop(grace=0)


@pytest.fixture
def torch_threads_kept() -> Iterator[None]:
    """Tests that set torch's thread count leave it as they found it."""
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="session")
def native_lora(tmp_path_factory: pytest.TempPathFactory) -> NativeLora | None:
    """The native multi-LoRA kernel built for this CPU, as the server builds it; None where the
    machine has no C compiler (tests of the kernel then skip)."""
    if find_compiler() is None:
        return None
    return load_native_lora(tmp_path_factory.mktemp("kernels"))


@pytest.fixture(scope="session")
def openmp_compiler(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The C compiler, where it builds OpenMP (what the kernels' thread split needs); elsewhere (clang
    without libomp) the tests of that split skip: such a build runs one thread per call, which
    ``test_an_openmp_build_that_fails_falls_back_to_one_thread`` covers. Under CI (``CI`` set; gcc,
    which has it) a compiler without OpenMP fails instead of hiding the split's tests."""
    compiler = find_compiler()
    if compiler is None:
        pytest.skip("no C compiler")
    tmp = tmp_path_factory.mktemp("openmp-probe")
    (tmp / "probe.c").write_text("#include <omp.h>\nint probe(void) { return omp_get_max_threads(); }\n")
    done = subprocess.run(
        [compiler, "-fopenmp", "-fPIC", "-shared", "-o", str(tmp / "probe.so"), str(tmp / "probe.c")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        why = f"{compiler} builds no OpenMP: {done.stderr.strip()[-300:]}"
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(why)
        pytest.skip(why)
    return compiler


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    return prepare_default_model(data_dir() / "models")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Path:
    """A 2-layer random Llama with the real tokenizer (so prompts and chat templates work)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    copy_tokenizer(default_model_dir, out)
    return out


@pytest.fixture(scope="session")
def tiny_spec(tiny_model_dir: Path) -> BaseModelSpec:
    return base_spec_from_files(tiny_model_dir, "none", max_lora_rank=64)


AdapterFactory = Callable[..., Path]


def save_peft_adapter(base_dir: Path, out: Path, seed: int, **lora: Any) -> Path:
    """A real PEFT LoRA adapter on ``base_dir`` with random non-zero A and B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    lora.setdefault("r", 8)
    lora.setdefault("lora_alpha", 16)
    lora.setdefault("target_modules", ["q_proj", "v_proj"])
    peft_model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **lora))
    with torch.no_grad():  # make the adapter's effect large enough to change greedy tokens
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def peft_adapter(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> AdapterFactory:
    def make(seed: int = 0, **lora: Any) -> Path:
        return save_peft_adapter(tiny_model_dir, tmp_path_factory.mktemp(f"adapter-{seed}"), seed, **lora)

    return make


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    if os.environ.get("LORAFLEET_REQUIRE_GPU") == "1" and any("gpu" in item.keywords for item in items):
        # scripts/gpu_check.sh on a lent GPU machine: skipped tests would read as passed
        pytest.exit("LORAFLEET_REQUIRE_GPU=1, but torch sees no CUDA device: the gpu tests cannot run", returncode=3)
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
