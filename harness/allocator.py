"""The CPU process's memory allocator: freed blocks are kept for the next batch, not given back.

glibc's ``malloc`` serves a block above its mmap threshold (128 KiB at first, raised as it sees
such blocks freed, up to 32 MiB) with fresh pages from the kernel, and gives freed memory at the
top of its heap back to the kernel once more than twice that lies free. A CPU batch allocates and
frees its activations, megabytes each, dozens of times per layer; every fresh page costs a page
fault the first time it is written (the kernel zeroes it). ``keep_freed_memory`` raises both
thresholds once per process, so the blocks a batch frees serve the next one. On two cores with
AMX (``python benchmarks/allocator_gain.py``, 16,383 tokens of SmolLM2 in bf16, fresh processes
in turn): 1.51 million page faults and 2.8 s of system time in 10.6 s of scoring with glibc's
default, 0.17 million, 0.3 s and 9.0 s kept (1.17x; float32 1.06x). Peak memory is what the
largest batch needs either way.

Only glibc's malloc is configured; elsewhere, where the user chose the allocator's settings (glibc's
``MALLOC_*_`` variables or ``GLIBC_TUNABLES``, or another allocator preloaded), and with
``PPL_ALLOCATOR=default``, it does nothing and says why.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest: blocks up to 32 MiB come from the heap
TRIM_THRESHOLD = 1 << 30  # free memory at the heap's top is given back beyond 1 GiB only

_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")

_state: str | None = None  # what the first call did; later calls return it


def keep_freed_memory() -> str:
    """Raise glibc's mmap and trim thresholds for this process (once); returns what was done,
    for the run record."""
    global _state
    if _state is None:
        _state = _apply()
    return _state


def _apply() -> str:
    if os.environ.get("PPL_ALLOCATOR") == "default":
        return "the platform's default (PPL_ALLOCATOR=default)"
    preload = os.environ.get("LD_PRELOAD", "")
    other = next((name for name in _OTHER_ALLOCATORS if name in preload), None)
    if other:
        return f"as preloaded ({other})"
    if any(name in os.environ for name in _USER_SETTINGS) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return "glibc malloc as the environment sets it"
    if platform.libc_ver()[0] != "glibc":  # macOS, Windows, musl: their own allocators, left as they are
        return "the platform's default (not glibc)"
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "the platform's default (no mallopt)"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        return "glibc malloc's default (mallopt refused)"
    return f"glibc malloc keeping freed memory (mmap threshold {MMAP_THRESHOLD >> 20} MiB, trim threshold {TRIM_THRESHOLD >> 30} GiB)"
