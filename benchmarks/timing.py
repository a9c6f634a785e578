"""Wall times of calls for the one-process micro benchmarks: best of N, or N each in turn."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path


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


def peak_dtype():
    """The dtype whose GEMM peak the bench measures: the one ``model.dtype: auto`` runs in on this
    CPU. bf16 where the CPU computes it natively; float32 elsewhere, where bf16 is emulated (on a
    two-core AVX2 EPYC a bf16 1,024^3 matmul ran at 0.7 GFLOP/s against 66 in float32, so one
    4,096^3 bf16 peak would take minutes and measure nothing a run uses)."""
    from harness.precision import resolve_dtype

    return resolve_dtype("auto", "cpu").dtype


def gemm_peak_elsewhere() -> float:
    """``gemm_peak(peak_dtype())`` measured in a process of its own, at this moment.

    Before a tool scores, the peak is not measured in the tool's process: freeing a GEMM's
    buffers there raises glibc's mmap threshold, after which that process's batches reuse
    freed memory instead of faulting in fresh pages, a speed-up (1.2x for a bf16 SmolLM2 run,
    ``benchmarks/allocator_gain.py``) that the tool does not have out of the box.
    """
    code = "from benchmarks.timing import gemm_peak, peak_dtype; print(gemm_peak(peak_dtype()))"
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent,
                         capture_output=True, text=True, check=True, timeout=600)
    return float(out.stdout.split()[-1])
