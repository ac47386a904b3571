"""Benchmarks of lorafleet (run from the repository root: ``python -m bench.serving``)."""

import lorafleet_server  # noqa: F401  # first: sets torch's OpenMP wait policy before torch loads (openmp.py)
