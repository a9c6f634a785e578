"""Large corpora and models: streaming, the token cache, batch_size auto and device_map auto.

Each alternative path is held to the plain one: a streamed corpus gives the tokens and the
record of the materialised one, a cache hit the record of tokenizing afresh, ``batch_size:
auto`` the numbers of batch 1, ``device_map: auto`` those of a model placed on one device.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from harness import streaming
from harness.tokenization import tokenized_corpus
from harness.config import validate
from harness.distributed import find_batch_size
from harness.models import adds_bos, load_model
from harness.protocols import resolve_corpus
from harness.runner import run

from .conftest import WIKITEXT, tiny_config
from .threads import one_thread  # noqa: F401 (a fixture)

TIMING = {"wall_seconds", "scoring_seconds", "corpus_seconds", "tokens_per_second", "created", "peak_memory_bytes",
          "peak_device_memory_bytes", "run_id", "versions"}


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PPL_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of a few hundred characters, so a short corpus is cut many times."""
    monkeypatch.setattr(streaming, "CHUNK_CHARS", 400)
    monkeypatch.setattr(streaming, "MARGIN", 64)


def same_record(a: dict, b: dict) -> None:
    """Equal records, apart from timings and how the corpus was read (streamed, from the cache)."""

    def strip(record: dict) -> dict:
        out = {k: v for k, v in record.items() if k not in TIMING}
        out["corpus"] = {k: v for k, v in record["corpus"].items() if k not in ("streaming", "token_cache")}
        out["config"] = {**record["config"], "corpus": {k: v for k, v in record["config"]["corpus"].items() if k not in ("streaming", "cache")}}
        return out

    assert strip(a) == strip(b)


def _tokens(cfg, tok):
    return tokenized_corpus(cfg.corpus, tok, resolve_corpus(cfg, adds_bos(tok)))


def _assert_same_tokens(a, b) -> None:
    assert (a.documents, a.text_sha256, len(a.streams)) == (b.documents, b.text_sha256, len(b.streams))
    for x, y in zip(a.streams, b.streams):
        assert np.array_equal(x.ids, y.ids)
        assert np.array_equal(x.byte_bounds, y.byte_bounds) and np.array_equal(x.word_bounds, y.word_bounds)
        assert (x.doc, x.domain, x.count_bytes, x.count_words) == (y.doc, y.domain, y.count_bytes, y.count_words)


@pytest.mark.parametrize(
    "corpus",
    [
        {**WIKITEXT, "max_documents": 150},
        {**WIKITEXT, "max_documents": 150, "detokenizer": "wikitext", "max_tokens": 6000},
        {**WIKITEXT, "max_documents": 150, "mode": "documents", "max_tokens": 6000},
    ],
    ids=["concat", "detokenized-truncated", "documents"],
)
def test_streaming_gives_the_record_of_the_materialised_corpus(tiny, small_chunks, one_thread, corpus):
    folder, model, tok = tiny
    records = []
    for streamed in (False, True):
        config = tiny_config(folder, "unused", max_length=64, stride=64, bootstrap=20)
        config["corpus"] = {**corpus, "streaming": streamed, "cache": False}
        records.append(run(validate(config), model=model, tokenizer=tok, write=False, progress=False).record)
    plain, streamed = records
    same_record(streamed, plain)
    assert streamed["corpus"]["streaming"] and not plain["corpus"]["streaming"]


def test_streamed_local_files_equal_materialised(tiny, tiny_corpus, small_chunks, tmp_path):
    import pandas as pd

    folder, model, tok = tiny
    parquet = tmp_path / "docs.parquet"
    pd.read_json(tiny_corpus, lines=True).to_parquet(parquet)
    for path in (tiny_corpus, parquet):
        for mode in ("concat", "documents"):
            base = {"path": str(path), "mode": mode, "domain_field": "domain", "cache": False}
            plain = _tokens(validate({**tiny_config(folder, path), "corpus": base}), tok)
            lazy = _tokens(validate({**tiny_config(folder, path), "corpus": {**base, "streaming": True}}), tok)
            _assert_same_tokens(lazy, plain)


@pytest.mark.slow
def test_streaming_smollm2_tokens_equal(smollm2, small_chunks):
    _, tok = smollm2
    from .conftest import SMOLLM2

    for extra in ({}, {"detokenizer": "wikitext"}):
        config = {"model": SMOLLM2, "corpus": {**WIKITEXT, "max_documents": 600, "cache": False, **extra}}
        plain = _tokens(validate(config), tok)
        config["corpus"]["streaming"] = True
        lazy = _tokens(validate(config), tok)
        _assert_same_tokens(lazy, plain)
        assert len(plain.streams[0]) > 10_000  # many chunks


def test_token_cache_hit_gives_the_same_record(tiny, tiny_corpus, cache_dir, capsys, one_thread):
    folder, model, tok = tiny
    cfg = validate(tiny_config(folder, tiny_corpus, max_length=32, stride=16))
    first = run(cfg, model=model, tokenizer=tok, write=False, progress=False)
    assert "token cache: stored" in capsys.readouterr().err
    second = run(cfg, model=model, tokenizer=tok, write=False, progress=False)
    said = capsys.readouterr().err
    assert "token cache: hit" in said and "tokenization skipped" in said
    assert first["corpus"]["token_cache"]["hit"] is False and second["corpus"]["token_cache"]["hit"] is True
    same_record(second.record, first.record)
    assert second["corpus"]["token_cache"]["key"] == first["corpus"]["token_cache"]["key"]
    # the tokens came from the cache: the same arrays, read back from disk
    assert second["corpus"]["token_cache"]["path"].startswith(str(cache_dir))

    # anything the tokens depend on changes the key: a preprocessing setting, the corpus bytes
    other = validate({**tiny_config(folder, tiny_corpus, max_length=32, stride=16), "corpus": {"path": str(tiny_corpus), "max_tokens": 500}})
    assert run(other, model=model, tokenizer=tok, write=False, progress=False)["corpus"]["token_cache"]["hit"] is False


def test_token_cache_key_follows_the_corpus_bytes(tiny, tmp_path, cache_dir):
    folder, _, tok = tiny
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "one two three four five six seven"}\n')
    cfg = validate(tiny_config(folder, path))
    a = _tokens(cfg, tok)
    path.write_text('{"text": "one two three four five six eight"}\n')
    b = _tokens(cfg, tok)
    assert a.cache["key"] != b.cache["key"] and not b.cache["hit"]
    assert not np.array_equal(a.streams[0].ids, b.streams[0].ids)
    assert _tokens(cfg, tok).cache["hit"]


def test_batch_size_auto_picks_a_size_and_equals_batch_1(tiny, tiny_corpus, one_thread):
    folder, model, tok = tiny
    one = run(validate(tiny_config(folder, tiny_corpus, batch_size=1)), model=model, tokenizer=tok, write=False, progress=False)
    auto = run(validate(tiny_config(folder, tiny_corpus, batch_size="auto", max_batch_size=6)), model=model, tokenizer=tok, write=False, progress=False)
    assert auto["batch_size"] == 6  # nothing runs out of memory on the CPU: the configured start
    assert auto.scored_tokens == one.scored_tokens and auto["windows"] == one["windows"]
    assert math.isclose(auto["sum_nll"], one["sum_nll"], rel_tol=1e-6)
    assert auto["config_hash"] == one["config_hash"]


def test_batch_size_backs_off_on_out_of_memory():
    """The back-off itself (accelerate's): a trial that runs out of memory above 5 windows.
    A CPU cannot run out of memory politely, so the error is raised as a GPU would raise it."""
    tried = []

    def trial(b: int) -> None:
        tried.append(b)
        if b > 5:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    assert find_batch_size(trial, 16) == 5
    assert tried[0] == 16 and tried[-1] == 5 and tried == sorted(tried, reverse=True)


def test_device_map_auto_equals_plain_placement(tiny, tiny_corpus, one_thread):
    folder, model, tok = tiny
    config = tiny_config(folder, tiny_corpus)
    config["model"].update(device_map="auto", dtype="float32")
    cfg = validate(config)
    spread = load_model(cfg.model)  # placed by accelerate's big-model loading (all on the CPU here)
    assert {p.device.type for p in spread.parameters()} == {"cpu"}
    a = run(cfg, model=spread, tokenizer=tok, write=False, progress=False)
    b = run(validate(tiny_config(folder, tiny_corpus)), model=model, tokenizer=tok, write=False, progress=False)
    assert a.scored_tokens == b.scored_tokens
    assert math.isclose(a["sum_nll"], b["sum_nll"], rel_tol=1e-6)
