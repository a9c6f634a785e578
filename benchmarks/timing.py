"""Best-of-N wall time of a call, after one warm-up call (for the one-process micro benchmarks)."""

from __future__ import annotations

import time


def best(fn, repeat: int) -> float:
    fn()  # warm-up: first-call allocations and kernel selection are not what is measured
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)
