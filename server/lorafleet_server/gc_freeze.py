"""Python's cyclic garbage collector, told that the startup heap stays.

A loaded server holds ~500,000 objects the collector tracks (torch modules and parameters,
transformers' and the tokenizer's objects, gRPC's and protobuf's): a full (generation 2) collection
walks them all, ~200-280 ms on these machines, with the GIL held, so every Python thread stops (the
engine between steps, the gRPC edge). One came ~5 s into serving in ``bench.serving`` here. None of
those objects is garbage while the server runs. After startup they move to the collector's permanent
generation (``gc.freeze``): later collections walk only what serving allocated since, and a full
collection takes milliseconds. Reference counting still frees frozen objects whose count drops to
zero; only cycles among them would be kept (there are none to free: the model lives as long as the
process).
"""

from __future__ import annotations

import gc
import time


def freeze_startup_heap() -> str:
    """Collect once, then freeze every object alive now; returns what was done, for the startup log."""
    t0 = time.perf_counter()
    collected = gc.collect()
    gc.freeze()
    return (
        f"{gc.get_freeze_count()} startup objects frozen after a collection that freed {collected} "
        f"({(time.perf_counter() - t0) * 1e3:.0f} ms)"
    )
