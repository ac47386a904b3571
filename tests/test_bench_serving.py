"""bench/serving.py's load generator: the clients run in a process of their own, not the server's."""

from __future__ import annotations

import asyncio
import os

from bench.serving import LoadGenerator


def test_the_load_generator_runs_coroutines_in_its_own_process() -> None:
    loadgen = LoadGenerator()
    try:
        assert loadgen.pid != os.getpid()
        assert loadgen.run(asyncio.sleep, 0, result=42) == 42  # asyncio.run in the child, result sent back
        assert loadgen.run(asyncio.sleep, 0, result=[1, 2]) == [1, 2]  # the same child, again
    finally:
        loadgen.close()
