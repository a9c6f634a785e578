"""``eval.compile``: the torch.compile'd, bucket-padded body gives the eager numbers (float32, 1e-5).

The reference is the same run with ``eval.compile: false`` (plain eager forward); on the tiny
model the slice ends in a short tail window, so the padding up to the shape bucket is exercised.
Where compilation fails (here: a C++ compiler that does not exist), the run warns once and
scores uncompiled, with the same numbers.
"""

from __future__ import annotations

import math
import warnings

import pytest

from harness import compiled
from harness.config import validate
from harness.runner import run

from .conftest import GEMMA3, WIKITEXT, tiny_config


def _pair(cfg_dict: dict, model, tok):
    eager = run(validate(cfg_dict), model=model, tokenizer=tok, write=False, progress=False)
    cfg_dict = {**cfg_dict, "eval": {**cfg_dict["eval"], "compile": True}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        comp = run(validate(cfg_dict), model=model, tokenizer=tok, write=False, progress=False)
    assert not [w for w in caught if "eval.compile" in str(w.message)]  # no fallback: this must compile
    return eager, comp


def test_compiled_equals_eager_tiny(tiny, tiny_corpus):
    folder, model, tok = tiny
    cfg = tiny_config(folder, tiny_corpus, max_length=32, stride=12, batch_size=3, bootstrap=0)
    eager, comp = _pair(cfg, model, tok)
    try:
        body = compiled.body(model)
        assert body is not None and not body.failed  # it really ran compiled
        assert comp.scored_tokens == eager.scored_tokens
        assert math.isclose(comp["sum_nll"], eager["sum_nll"], rel_tol=1e-5)
        assert math.isclose(comp.perplexity, eager.perplexity, rel_tol=1e-5)
    finally:
        compiled.enable(model, False)


def test_compiled_equals_eager_smollm2_slice(smollm2):
    model, tok = smollm2
    cfg = {
        "model": {"name_or_path": "unused", "device": "cpu"},
        "corpus": {**WIKITEXT, "max_tokens": 1100},
        "eval": {"protocol": "sliding", "max_length": 512, "stride": 256, "batch_size": 2, "bootstrap": 0},
    }
    eager, comp = _pair(cfg, model, tok)
    try:
        assert comp.scored_tokens == eager.scored_tokens == 1099
        assert math.isclose(comp["sum_nll"], eager["sum_nll"], rel_tol=1e-5)
        assert math.isclose(comp.perplexity, eager.perplexity, rel_tol=1e-5)
    finally:
        compiled.enable(model, False)


def test_compiled_equals_eager_gemma3_sliding_layers(gemma3):
    """Gemma-3: windows longer than its 512-token sliding window, so the sliding layers run the
    block attention (kept out of the graph) between compiled pieces of each layer."""
    model, tok = gemma3
    cfg = {
        "model": dict(GEMMA3),
        "corpus": {**WIKITEXT, "max_tokens": 1000},
        "eval": {"protocol": "sliding", "max_length": 640, "stride": 320, "batch_size": 2, "bootstrap": 0},
    }
    eager, comp = _pair(cfg, model, tok)
    try:
        assert comp.scored_tokens == eager.scored_tokens == 999
        assert comp["precision"]["compile"]["on"] and not eager["precision"]["compile"]["on"]
        assert math.isclose(comp["sum_nll"], eager["sum_nll"], rel_tol=1e-5)
    finally:
        compiled.enable(model, False)


def test_auto_compiles_long_runs_only():
    n = compiled.AUTO_MIN_TOKENS
    assert compiled.decide("auto", n).on and not compiled.decide("auto", n - 1).on
    assert "too short" in compiled.decide("auto", 4096).reason
    assert compiled.decide(True, 10).on and not compiled.decide(False, 10**9).on


def test_decoder_layers_found(tiny, smollm2):
    for model in (tiny[1], smollm2[0]):
        layers = compiled.decoder_layers(model)
        assert layers is model.base_model.layers and len(layers) == model.config.num_hidden_layers


def test_record_says_what_auto_decided(tiny, tiny_corpus):
    """auto on a short run: eager, said so, hashed as an eager run; eval.compile true: compiled,
    and its config hash differs (fused kernels may round the last digits differently)."""
    folder, model, tok = tiny
    cfg = tiny_config(folder, tiny_corpus, max_length=32, stride=12, batch_size=3, bootstrap=0)
    runs = {}
    for setting in ("auto", False, True):
        cfg["eval"]["compile"] = setting
        runs[setting] = run(validate(cfg), model=model, tokenizer=tok, write=False, progress=False)
    compiled.enable(model, False)
    auto, off, on = runs["auto"], runs[False], runs[True]
    assert auto["precision"]["compile"] == {"on": False, "reason": auto["precision"]["compile"]["reason"]}
    assert "window tokens <" in auto["precision"]["compile"]["reason"]
    assert auto["config_hash"] == off["config_hash"] != on["config_hash"]
    assert on["precision"]["compile"] == {"on": True, "reason": "requested"}
    assert off["compile_seconds"] == 0


# Last in the file: it points inductor at a compiler that does not exist, and inductor caches what
# it found about the compiler for the rest of the process, so a compile after it would fall back too.
def test_compile_failure_falls_back_with_one_warning(tiny, tiny_corpus, monkeypatch):
    import torch._dynamo
    import torch._inductor.config as inductor_config

    folder, model, tok = tiny
    torch._dynamo.reset()  # nothing compiled earlier in this session may be reused
    monkeypatch.setattr(inductor_config.cpp, "cxx", ("/nonexistent/c++",))
    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)
    cfg = tiny_config(folder, tiny_corpus, max_length=32, stride=16, batch_size=2, bootstrap=0)
    eager = run(validate(cfg), model=model, tokenizer=tok, write=False, progress=False)
    cfg["eval"]["compile"] = True
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            comp = run(validate(cfg), model=model, tokenizer=tok, write=False, progress=False)
        ours = [w for w in caught if "eval.compile" in str(w.message)]
        assert len(ours) == 1 and "\n" not in str(ours[0].message)
        assert comp["sum_nll"] == eager["sum_nll"]
    finally:
        compiled.enable(model, False)
        torch._dynamo.reset()
