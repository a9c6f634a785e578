"""The real Gemma-3-270M against the plain reference loop (tests/reference.py).

Gemma-3 is the model where the harness's scoring differs most from the obvious loop: a
262,144-token vocabulary (the output head is projected in chunks, never as ``[B, T, V]`` logits)
and a tokenizer that puts BOS in front of a text by itself. On the first few hundred tokens of
WikiText-2 test, with windows of 128 tokens, the harness's record must equal the reference's
full float64 logits under the ``stream`` and ``replace`` BOS policies, with the head forced into
several chunks per batch. The model is loaded once per session (``gemma3`` in conftest.py).
"""

from __future__ import annotations

import math

import pandas as pd
import pytest
from harness.config import validate
from harness.models import adds_bos
from harness.runner import run

from .conftest import GEMMA3, MIRROR, WIKITEXT
from .reference import sliding_reference
from .threads import one_thread  # noqa: F401 (a fixture)

N_TOKENS = 300  # 4 windows of L = 128, S = 64: a few seconds per policy
L, S = 128, 64
CHUNK = 48  # scored positions per head chunk: a full window's 127 or 64 positions take 2 to 3 chunks


def wikitext_ids(tok) -> list[int]:
    rows = pd.read_parquet(MIRROR / "Salesforce/wikitext/wikitext-2-raw-v1/test.parquet")["text"].tolist()
    return tok("\n\n".join(rows)[:20000])["input_ids"][:N_TOKENS]


@pytest.mark.slow
def test_gemma3_vocabulary_and_bos(gemma3):
    """The two properties this file exists for, read from the model and tokenizer themselves."""
    model, tok = gemma3
    assert model.get_output_embeddings().weight.shape[0] == 262144
    assert adds_bos(tok)
    ids = tok("The tower is 324 metres tall.")["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.bos_token_id not in tok("The tower", add_special_tokens=False)["input_ids"]


@pytest.mark.slow
def test_gemma3_sliding_equals_reference_under_stream_and_replace(gemma3, one_thread):
    model, tok = gemma3
    ids = wikitext_ids(tok)
    assert ids[0] == tok.bos_token_id  # the stream starts with the tokenizer's own BOS
    sums = {}
    for bos in ("stream", "replace"):
        config = {
            "model": dict(GEMMA3),
            "corpus": {**WIKITEXT, "max_tokens": N_TOKENS, "cache": False},
            "eval": {"protocol": "sliding", "max_length": L, "stride": S, "bos": bos, "batch_size": 2,
                     "logits_chunk": CHUNK, "bootstrap": 0},
        }
        result = run(validate(config), model=model, tokenizer=tok, write=False, progress=False)
        ref_sum, ref_count, ref_windows = sliding_reference(model, ids, L, S, bos, tok.bos_token_id)
        assert result["protocol"]["bos"] == bos
        assert result["scored_tokens"] == ref_count == N_TOKENS - 1, bos
        assert result["windows"] == ref_windows == 4, bos
        # float32 log-softmax over 262,144 logits, in chunks of 48 positions, against float64 over full logits
        assert math.isclose(result["sum_nll"], ref_sum, rel_tol=1e-6), (bos, result["sum_nll"], ref_sum)
        assert math.isclose(result.perplexity, math.exp(ref_sum / ref_count), rel_tol=1e-6), bos
        sums[bos] = result["sum_nll"]
    # replace overwrites the first token of the windows after the first with BOS: the same tokens
    # are scored, from different inputs, so the sums must differ (the test above tells them apart)
    assert sums["stream"] != sums["replace"]
