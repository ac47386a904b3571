"""Benchmarks of lorafleet (run from the repository root: ``python -m bench.serving``)."""
