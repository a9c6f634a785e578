"""One quick parse of a GGUF file per model load.

transformers reads a GGUF file's header afresh each time it is asked for something in it: the
tokenizer, the config (asked for again inside the model's load) and the weights, three parses per
run. The header holds the vocabulary (49,152 strings for SmolLM2, 262,144 for Gemma-3 with their
scores and types), which the ``gguf`` package's reader walks one element at a time, each step a
slice of a ``numpy.memmap``: 6 s a parse for SmolLM2 and 26 s for Gemma-3 on a 2-core AMD EPYC.

``parsed_once()`` wraps each transformers call on a GGUF file (``models.py``). Inside it
``gguf.GGUFReader`` is ``Reader``: a read-only open of a file it has already parsed (the same
path, size and modification time) returns that reader (transformers only reads from it), and a
new parse slices a plain ``ndarray`` view of the same memory map, which skips ``memmap``'s
per-slice bookkeeping (Gemma-3's header 26 s -> 9 s). The fields and tensors are the library's,
element for element (``tests/test_gguf_reading.py`` compares them on the real SmolLM2 file).

The reader maps the file; ``release()`` drops it once the weights are loaded, so a run does not
keep the file mapped (its pages in the RSS) while it scores. One file is kept at a time.
"""

from __future__ import annotations

import contextlib
import functools
import os

_KEPT: dict[tuple, object] = {}  # (real path, size, mtime_ns) -> Reader; at most one


def _identity(path) -> tuple:
    st = os.stat(path)
    return os.path.realpath(path), st.st_size, st.st_mtime_ns


@functools.cache
def reader_class() -> type:
    """``gguf.GGUFReader`` with the two changes above (built on first use: gguf imports numpy)."""
    import gguf
    import numpy as np

    class Reader(gguf.GGUFReader):
        def __new__(cls, path, mode="r"):
            kept = _KEPT.get(_identity(path)) if mode == "r" else None
            return kept if kept is not None else super().__new__(cls)

        def __init__(self, path, mode="r"):
            if getattr(self, "_parsed", False):
                return  # a kept reader: parsed already
            self._plain = None
            super().__init__(path, mode)
            self._parsed = True
            if mode == "r":
                _KEPT.clear()
                _KEPT[_identity(path)] = self

        def _get(self, offset, dtype, count=1, override_order=None):
            """The library's ``_get`` on a plain ``ndarray`` view of ``self.data``."""
            if self._plain is None or self._plain.base is not self.data:
                self._plain = self.data.view(np.ndarray)
            count, dtype = int(count), np.dtype(dtype)
            arr = self._plain[offset : offset + dtype.itemsize * count].view(dtype)[:count]
            return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    return Reader


@contextlib.contextmanager
def parsed_once():
    """Within: ``gguf.GGUFReader`` is ``reader_class()``."""
    import gguf

    original, gguf.GGUFReader = gguf.GGUFReader, reader_class()
    try:
        yield
    finally:
        gguf.GGUFReader = original


def release() -> None:
    """Drop the kept reader (its memory map of the file)."""
    _KEPT.clear()


def kept() -> int:
    """How many parsed files are kept (0 or 1)."""
    return len(_KEPT)
