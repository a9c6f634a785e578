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


@pytest.fixture(scope="module")
def wide_head_model(tiny, tmp_path_factory):
    """A tiny Llama with a 4,096-token vocabulary and hidden size 64: embedding and head are 1 MiB
    each, a layer 0.15 MiB, so a memory cap can put the head and some layers off the CPU."""
    from .conftest import build_tiny_model

    _, _, tok = tiny
    folder = tmp_path_factory.mktemp("wide-head")
    tok.save_pretrained(folder)
    return folder, build_tiny_model(folder, 4096, seed=1, hidden=64), tok


def test_device_map_offload_to_disk_equals_plain_run(wide_head_model, tiny_corpus, tmp_path, one_thread):
    """device_map: auto with max_memory and offload_folder: the head and a layer on disk (their
    weights on the meta device, loaded by accelerate's hooks), the numbers those of the plain run."""
    folder, plain, tok = wide_head_model
    nbytes = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
    # accelerate keeps room for the largest layer (the head) on the CPU besides what it places
    # there: the embedding and the first layer fit, the rest goes to disk
    cap = nbytes(plain.model.embed_tokens) + nbytes(plain.lm_head) + nbytes(plain.model.layers[0]) + 4096
    config = tiny_config(folder, tiny_corpus, batch_size=3)
    config["model"].update(device_map="auto", max_memory={"cpu": cap}, offload_folder=str(tmp_path / "offload"))
    cfg = validate(config)
    spread = load_model(cfg.model)
    where = spread.hf_device_map
    assert where["lm_head"] == "disk" and where["model.layers.1"] == "disk", where
    assert where["model.embed_tokens"] == "cpu" and where["model.layers.0"] == "cpu", where
    assert spread.lm_head.weight.device.type == "meta" and spread.model.layers[1].mlp.up_proj.weight.device.type == "meta"
    a = run(cfg, model=spread, tokenizer=tok, write=False, progress=False)
    b = run(validate(tiny_config(folder, tiny_corpus, batch_size=3)), model=plain, tokenizer=tok, write=False, progress=False)
    assert a.scored_tokens == b.scored_tokens > 100
    assert math.isclose(a["sum_nll"], b["sum_nll"], rel_tol=1e-6)
    np.testing.assert_allclose(a.windows["sum_nll"], b.windows["sum_nll"], rtol=1e-6)
    assert spread.lm_head.weight.device.type == "meta"  # offloaded again after use


def test_offload_keys_need_device_map(tiny, tiny_corpus):
    from harness.errors import ConfigError

    folder, _, _ = tiny
    config = tiny_config(folder, tiny_corpus)
    config["model"]["max_memory"] = {"cpu": "300MB"}
    with pytest.raises(ConfigError, match="max_memory and offload_folder place a model by device_map"):
        validate(config)
    config["model"].update(device_map="auto", max_memory={"cpu": "lots", 0: "10GiB"})
    with pytest.raises(ConfigError, match="size of 'cpu' must be bytes or a size"):
        validate(config)
    config["model"]["max_memory"] = {"0": "10GiB", "cpu": "30GiB"}
    assert validate(config).model.max_memory == {0: "10GiB", "cpu": "30GiB"}
