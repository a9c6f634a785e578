"""Batch size: the configured number, or ``auto``, the largest batch that fits, found once.

``auto`` scores the longest windows of this rank's share at a trial batch size, starting at
``eval.max_batch_size`` (default 64 on an accelerator and 8 on CPU, where running out of memory
is not an exception but the operating system's kill) and backing off on out-of-memory as
accelerate's ``find_executable_batch_size`` does. The ranks take the smallest size any of them
found, and the record says which size was used. Batch size never changes a number.
"""

from __future__ import annotations

from typing import Callable

from .config import EvalConfig
from .distributed import Distributor, find_batch_size

AUTO_START_ACCELERATOR = 64
AUTO_START_CPU = 8


def choose_batch_size(ev: EvalConfig, score: Callable[[list], object], windows: list, dist: Distributor, on_cpu: bool) -> int:
    """``score(windows)`` scores a list of windows as one batch (the trial)."""
    if isinstance(ev.batch_size, int):
        return ev.batch_size
    start = ev.max_batch_size or (AUTO_START_CPU if on_cpu else AUTO_START_ACCELERATOR)
    start = max(1, min(start, len(windows)))  # no larger than the work
    longest = sorted(windows, key=lambda w: -w.input_length)[:start]
    found = find_batch_size(lambda b: score(longest[:b]), start) if windows else start
    return min(dist.gather([found]))
