"""The core flow on the tiny model: the harness equals a plain reference loop written here."""

from __future__ import annotations

import json
import math

import pytest

from harness.config import validate
from harness.runner import run

from .conftest import tiny_config
from .reference import sliding_reference


def _stream_ids(tok, corpus, add_special: bool) -> list[int]:
    docs = [json.loads(line)["text"] for line in corpus.read_text().splitlines() if line.strip()]
    return tok("\n\n".join(docs), add_special_tokens=add_special)["input_ids"]


@pytest.mark.parametrize("bos", ["none", "stream", "every", "replace"])
@pytest.mark.parametrize("stride", [8, 16, 32])
def test_sliding_matches_reference_loop(tiny, tiny_corpus, bos, stride):
    folder, model, tok = tiny
    L = 32
    S = min(stride, L - 1) if bos == "every" else stride
    ids = _stream_ids(tok, tiny_corpus, add_special=bos in ("stream", "replace"))
    ref_sum, ref_count, ref_windows = sliding_reference(model, ids, L, S, bos, tok.bos_token_id)
    for batch_size in (1, 3, 8):
        cfg = validate(tiny_config(folder, tiny_corpus, max_length=L, stride=S, bos=bos, batch_size=batch_size))
        res = run(cfg, model=model, tokenizer=tok, write=False, progress=False)
        assert res.scored_tokens == ref_count
        assert res["windows"] == ref_windows
        assert math.isclose(res["sum_nll"], ref_sum, rel_tol=1e-6)
        assert math.isclose(res.perplexity, math.exp(ref_sum / ref_count), rel_tol=1e-6)


def test_each_token_scored_once_and_counts(tiny, tiny_corpus):
    folder, model, tok = tiny
    cfg = validate(tiny_config(folder, tiny_corpus, max_length=32, stride=8, bos="stream"))
    res = run(cfg, model=model, tokenizer=tok, write=False, progress=False)
    ids = _stream_ids(tok, tiny_corpus, add_special=True)
    w = res.windows.sort_values("score_begin")
    assert w.score_begin.iloc[0] == 1 and w.score_end.iloc[-1] == len(ids)
    assert (w.score_begin.values[1:] == w.score_end.values[:-1]).all()  # contiguous, no overlap
    # bytes and words are counted on the scored text: everything but token 0 (the BOS, 0 bytes)
    docs = [json.loads(line)["text"] for line in tiny_corpus.read_text().splitlines() if line.strip()]
    text = "\n\n".join(docs)
    assert res["bytes"] == len(text.encode("utf-8"))
    assert res["words"] == len(text.split())


def test_record_and_table_written(tiny, tiny_corpus, tmp_path):
    import pandas as pd

    folder, model, tok = tiny
    cfg = validate(tiny_config(folder, tiny_corpus, max_length=32, stride=16))
    res = run(cfg, tmp_path / "results" / "a", model=model, tokenizer=tok, progress=False)
    record = json.loads((tmp_path / "results" / "a" / "result.json").read_text())
    for key in ["perplexity", "sum_nll", "scored_tokens", "windows", "nll_mean", "bits_per_byte", "byte_perplexity",
                "word_perplexity", "stderr_nll", "ci95", "tokens_per_second", "wall_seconds", "peak_memory_bytes",
                "protocol", "config", "config_hash", "model", "tokenizer", "versions"]:
        assert key in record, key
    assert record["perplexity"] == pytest.approx(math.exp(record["sum_nll"] / record["scored_tokens"]))
    lo, hi = record["ci95"]
    assert lo < record["perplexity"] < hi
    windows = pd.read_parquet(tmp_path / "results" / "a" / "windows.parquet")
    assert windows.tokens.sum() == record["scored_tokens"]
    assert windows.sum_nll.sum() == pytest.approx(record["sum_nll"], rel=1e-12)
    table = pd.read_csv(tmp_path / "results" / "table.csv")
    assert list(table.run_id) == ["a"]
    assert table.protocol[0] == "sliding" and table.stride[0] == 16 and table.max_length[0] == 32
    assert (tmp_path / "results" / "table.md").read_text().startswith("|")
    assert res.run_dir == tmp_path / "results" / "a"


def test_documents_mode_never_crosses_documents(tiny, tiny_corpus):
    folder, model, tok = tiny
    cfg = validate({**tiny_config(folder, tiny_corpus, max_length=32, stride=16), "corpus": {"path": str(tiny_corpus), "mode": "documents"}})
    res = run(cfg, model=model, tokenizer=tok, write=False, progress=False)
    docs = [json.loads(line)["text"] for line in tiny_corpus.read_text().splitlines() if line.strip()]
    total, count = 0.0, 0
    for d in docs:
        ids = tok(d)["input_ids"]
        s, c, _ = sliding_reference(model, ids, 32, 16, "stream", tok.bos_token_id)
        total, count = total + s, count + c
    assert res.scored_tokens == count
    assert math.isclose(res["sum_nll"], total, rel_tol=1e-6)
    assert res.windows.doc.nunique() == len(docs)


def test_max_tokens_truncates_after_tokenizing(tiny, tiny_corpus):
    folder, model, tok = tiny
    cfg = validate({**tiny_config(folder, tiny_corpus, max_length=32, stride=16), "corpus": {"path": str(tiny_corpus), "max_tokens": 100}})
    res = run(cfg, model=model, tokenizer=tok, write=False, progress=False)
    assert res["corpus"]["tokens"] == 100
    assert res.scored_tokens == 99
