"""Wall times of calls for the one-process micro benchmarks: best of N, or N each in turn."""

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


def alternate(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each function, taken in turn A B C A B C ..., after one warm-up each."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def gemm_peak(dtype, n: int = 4096, repeat: int = 3) -> float:
    """Best FLOP/s of an n x n x n matmul in ``dtype`` on this machine (one warm-up call)."""
    import torch

    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    return 2.0 * n**3 / best(lambda: torch.mm(a, b, out=out), repeat)
