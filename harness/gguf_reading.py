"""Loading a GGUF file in seconds: one quick parse per model load, and three slow steps of
transformers' GGUF path made quick.

transformers reads a GGUF file's header afresh each time it is asked for something in it: the
tokenizer, the config (asked for again inside the model's load) and the weights, three parses per
run. The header holds the vocabulary (49,152 strings for SmolLM2, 262,144 for Gemma-3 with their
scores and types), which the ``gguf`` package's reader walks one element at a time, each step a
slice of a ``numpy.memmap``: 6 s a parse for SmolLM2 and 26 s for Gemma-3 on a 2-core AMD EPYC.

``parsed_once()`` wraps each transformers call on a GGUF file (``models.py``). Inside it:

- ``gguf.GGUFReader`` is ``Reader``: a read-only open of a file it has already parsed (the same
  path, size and modification time) returns that reader (transformers only reads from it), and a
  new parse slices a plain ``ndarray`` view of the same memory map, which skips ``memmap``'s
  per-slice bookkeeping, and walks an array of strings or numbers in one loop instead of one
  recursive call per element (Gemma-3's header 26 s -> 1 s, SmolLM2's 6 s -> 0.3 s);
- ``gguf.get_tensor_name_map`` is built once per architecture and depth: transformers asks for it
  once per module of the model (397 times for SmolLM2, 6.7 s of its 13 s weights load);
- transformers' ``_gguf_parse_value`` decodes a string's bytes in one call instead of through a
  Python list of numpy bytes (2.5 s of each of Gemma-3's three value parses -> 0.8 s);
- newer transformers' own header reader (5.x; for the tokenizer and the config) slices a plain
  ``ndarray`` view of its map, not the ``memmap`` (Gemma-3's vocabulary 1.4 s -> 0.6 s), and the
  merges it rebuilds for a file that lists none (Gemma-3) skip a sort per token.

The fields, tensors, values, names and merges are the libraries', element for element
(``tests/test_gguf_reading.py`` compares them on the real SmolLM2 and Gemma-3 files and on a
file holding every kind of value, in both byte orders). An array that cannot fit in the rest of the file (cut
short, or its count damaged) fails at once, naming the array; the library's reader walks such a
count element by element past the end of the file, for ever where the count is large.
Where a transformers or gguf version lacks a function replaced here, it is left alone.

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
    """``gguf.GGUFReader`` with the changes above (built on first use: gguf imports numpy)."""
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

        def _get_field_parts(self, orig_offs, raw_type):
            """The library's, with an array of strings or numbers walked in one loop."""
            if raw_type == gguf.GGUFValueType.ARRAY:
                walked = _array_parts(self, orig_offs)
                if walked is not None:
                    return walked
            return super()._get_field_parts(orig_offs, raw_type)

    return Reader


def _array_parts(reader, orig_offs: int):
    """An array field's ``(size, parts, data indices, types)`` as ``GGUFReader._get_field_parts``
    gives them (one part per number, a length and a bytes part per string), or None where the
    library's own walk should answer (an empty array, an array of an unknown type).

    The library recurses once per element, a ``_get`` slice each time (Gemma-3's 262,144-token
    vocabulary: 9 s); here a string's length is read by ``struct`` and a number's part is a
    one-element slice of the array's view. An array that cannot fit in the rest of the file (cut
    short, or a damaged count) is a ``ValueError`` saying so: the library walks such a count to
    its end, element by element past the end of the file (an array of numbers that ends where the
    file does: 17 s and no error for a count of a million, for ever for a larger one)."""
    import struct
    import sys

    import numpy as np
    from gguf import GGUFValueType

    end = len(reader.data)
    if orig_offs + 12 > end:
        return None
    raw_itype = reader._get(orig_offs, np.uint32)
    alen = reader._get(orig_offs + 4, np.uint64)
    count, offs = int(alen[0]), orig_offs + 12
    if count == 0 or int(raw_itype[0]) not in GGUFValueType._value2member_map_:
        return None
    itype = GGUFValueType(raw_itype[0])
    nptype = reader.gguf_scalar_to_np.get(itype)
    least = np.dtype(nptype).itemsize if nptype is not None else 8 if itype == GGUFValueType.STRING else 12
    if offs + least * count > end:
        raise _past_end(count, itype, orig_offs, end)
    parts, types = [raw_itype, alen], [GGUFValueType.ARRAY, itype]
    if itype == GGUFValueType.STRING:
        little = (sys.byteorder == "little") == (reader.byte_order == "I")
        length, plain = struct.Struct("<Q" if little else ">Q"), reader._plain
        u64 = np.dtype(np.uint64).newbyteorder(reader.byte_order)  # what ``_get`` makes
        for _ in range(count):
            if offs + 8 > end or offs + 8 + (n := length.unpack_from(plain, offs)[0]) > end:
                raise _past_end(count, itype, orig_offs, end)
            parts += plain[offs : offs + 8].view(u64), plain[offs + 8 : offs + 8 + n]
            offs += 8 + n
        return offs - orig_offs, parts, list(range(3, 2 + 2 * count, 2)), types
    if nptype is None:
        return None  # an array of arrays: the library's walk (each element checked as it goes)
    values = reader._get(offs, nptype, count)
    parts += (values[i : i + 1] for i in range(count))
    return offs + values.nbytes - orig_offs, parts, list(range(2, 2 + count)), types


def _past_end(count: int, itype, offset: int, end: int) -> ValueError:
    return ValueError(f"the metadata array of {count:,} {itype.name.lower()} values at byte {offset:,} runs past "
                      f"the end of the file ({end:,} bytes): the file is cut short or damaged")


@functools.cache
def _tensor_name_map(arch, n_blocks: int):
    """``gguf.get_tensor_name_map``, built once per architecture and depth.

    transformers asks for it once per module of the model (397 times for SmolLM2), and each
    call formats every name of every block anew: 17 ms each, 6.7 s of a 13 s load. The map is
    only read (``get_name``)."""
    import gguf.tensor_mapping

    return gguf.tensor_mapping.get_tensor_name_map(arch, n_blocks)


_INTS, _FLOATS = frozenset((0, 1, 2, 3, 4, 5, 10, 11)), frozenset((6, 12))


def _fast_parse(original):
    """transformers' ``_gguf_parse_value`` (``original``) for one value of a field: the same value,
    with a string's bytes decoded in one call and a number converted directly (the original first
    makes a Python list of the string's numpy bytes: 0.7 s of SmolLM2's header, 2.5 s of
    Gemma-3's, per parse, and a load parses the values three times). What it does not know (an
    array type without its element type, nested arrays) is the original's, errors included."""

    def parse(value, data_type):
        types = data_type if isinstance(data_type, list) else [data_type]
        kind = types[-1] if len(types) == 1 or (len(types) == 2 and types[0] == 9) else None
        if kind == 8:
            return value.tobytes().decode()
        if kind in _INTS:
            return int(value[0])
        if kind in _FLOATS:
            return float(value[0])
        if kind == 7:
            return bool(value[0])
        return original(value, data_type)

    return parse


def _plain_mapped(original):
    """transformers' own header reader's ``_mapped`` (``original``, a ``numpy.memmap`` of the file)
    as a plain ``ndarray`` view of the same map: the reader slices it once per string it keeps
    (Gemma-3's vocabulary: 262,144 slices), and ``memmap``'s per-slice bookkeeping made that walk
    1.4 s instead of 0.6. The bytes, and the map's lifetime (the view holds it), are the same."""

    def mapped(path):
        import numpy as np

        return original(path).view(np.ndarray)

    return mapped


def _quick_merges(vocab, vocab_scores=None, skip_tokens=None):
    """transformers' ``generate_merges`` (a vocabulary's BPE merges, for a GGUF file that lists
    none, as Gemma-3's does), giving the same list in the same order without a sort per token.

    The original sorts each token's splits by the pieces' ids, then all splits by (score, length
    of the left piece, length of the right piece), stably. A token's splits differ in the left
    piece's length, so the second sort alone orders them; splits of different tokens that tie
    keep the tokens' order either way. 2.6 -> 2.1 s on Gemma-3's vocabulary (515,000 merges)."""
    import operator

    skip = set(skip_tokens) if skip_tokens is not None else set()
    reverse = vocab_scores is not None
    rows = []
    for merge, score in (dict(vocab_scores) if reverse else vocab).items():
        n = len(merge)
        if n > 1 and merge not in skip:
            rows += [(score, i, n - i, merge[:i], merge[i:]) for i in range(1, n)
                     if merge[:i] in vocab and merge[i:] in vocab]
    if skip:
        rows = [row for row in rows if row[3] not in skip and row[4] not in skip]
    rows.sort(key=operator.itemgetter(0, 1, 2), reverse=reverse)
    return [(row[3], row[4]) for row in rows]


@contextlib.contextmanager
def _patched(module, name: str, replacement):
    """``module.name`` is ``replacement`` within (nothing changed where the module lacks it)."""
    if not hasattr(module, name):
        yield
        return
    original = getattr(module, name)
    setattr(module, name, replacement)
    try:
        yield
    finally:
        setattr(module, name, original)


@contextlib.contextmanager
def parsed_once():
    """Within: ``gguf.GGUFReader`` is ``reader_class()``, the tensor-name map is built once per
    architecture, transformers decodes the header's strings in one call each, and its own header
    reader and merges (5.x) are the quick ones above."""
    import gguf
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    parse = getattr(gguf_utils, "_gguf_parse_value", None)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched(gguf, "GGUFReader", reader_class()))
        stack.enter_context(_patched(gguf, "get_tensor_name_map", _tensor_name_map))
        if parse is not None:
            stack.enter_context(_patched(gguf_utils, "_gguf_parse_value", _fast_parse(parse)))
        for module, name, replacement in _newer_parts():
            stack.enter_context(_patched(module, name, replacement))
        yield


def _newer_parts() -> list[tuple]:
    """``(module, name, replacement)`` for the parts of newer transformers' GGUF path (its own
    header reader, 5.x) that ``parsed_once`` makes quick; none where this version lacks them."""
    try:
        from transformers.integrations.gguf import gguf_tokenizer_mapping, reader
    except ImportError:
        return []
    parts = []
    if callable(getattr(reader, "_mapped", None)):
        parts.append((reader, "_mapped", _plain_mapped(reader._mapped)))
    if callable(getattr(gguf_tokenizer_mapping, "generate_merges", None)):
        parts.append((gguf_tokenizer_mapping, "generate_merges", _quick_merges))
    return parts


def release() -> None:
    """Drop the kept reader (its memory map of the file)."""
    _KEPT.clear()


def kept() -> int:
    """How many parsed files are kept (0 or 1)."""
    return len(_KEPT)
