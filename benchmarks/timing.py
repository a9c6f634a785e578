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


def gemm_peak(dtype, n: int = 4096, repeat: int = 3) -> float:
    """Best FLOP/s of an n x n x n matmul in ``dtype`` on this machine (one warm-up call)."""
    import torch

    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    return 2.0 * n**3 / best(lambda: torch.mm(a, b, out=out), repeat)
