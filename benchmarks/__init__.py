"""Benchmarks: the harness against the loops and tools users run today (``make bench``)."""
