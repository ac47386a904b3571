"""How torch's OpenMP threads wait between parallel regions; set before torch is first imported.

The engine runs forward steps on a thread of its own, not the process's main thread. GNU OpenMP
(libgomp, torch's CPU thread pool) then counts more threads than cores (the main thread, the engine
and its team) and lets a waiting team thread spin only ~100 times before it sleeps in the kernel. A
prompt step of many tokens is ~4,000 ops, ~10-30 us of Python apart: every op had to wake the second
thread with a syscall, and the engine's 2-thread steps ran slower than 1-thread ones (a 256-token
prefill of 7 adapters: 470 ms against 440 ms on one thread; 300-375 ms with the settings below).
``OMP_WAIT_POLICY=ACTIVE`` raises that spin to 1,000 (~10-30 us, the gap between two ops);
``GOMP_SPINCOUNT`` bounds the spin where libgomp does not count too many threads (ACTIVE alone spins
for minutes there: a main-thread team left spinning after loading took the other core from the engine).
Measured in docs/architecture.md ("Measured facts").

libgomp reads both once, when torch loads it: :func:`set_openmp_wait_policy` runs at the top of the
``lorafleet_server`` package, before any of its modules imports torch. Values already in the
environment are kept (an operator's choice wins).
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

OPENMP_WAIT = {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "20000"}


def set_openmp_wait_policy(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Put ``OPENMP_WAIT``'s values into ``environ`` where absent. False (nothing set) when torch is
    already imported: its OpenMP runtime has read the environment, and a change would only mislead."""
    if "torch" in sys.modules:
        return False
    for name, value in OPENMP_WAIT.items():
        environ.setdefault(name, value)
    return True


def openmp_wait_summary(environ: MutableMapping[str, str] = os.environ) -> str:
    """What this process's OpenMP threads were told, for the startup log."""
    return ", ".join(f"{name}={environ.get(name, '(unset)')}" for name in OPENMP_WAIT)
