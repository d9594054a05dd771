"""Benchmarks: each module has `run() -> dict` (our implementation next to its alternative) and a __main__."""
