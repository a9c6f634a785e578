"""KL divergence between two models: against full-logit reference loops, on tiny and real models."""

from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch

from harness.config import validate
from harness.errors import ConfigError, HarnessError
from harness.kl import KL_COLUMNS, PairScorer, kl_statistics, pair_token_stats
from harness.protocols import plan, resolve
from harness.runner import run
from harness.scoring import build_batch

from .conftest import SMOLLM2, WIKITEXT, build_tiny_model, tiny_config
from .reference import full_logprobs

KL_KEYS = ["mean", "median", "p90", "p99", "max", "top1_agreement", "rms_delta_p", "ppl_ratio"]


def reference_kl(base, model, ids: list[int], first: int):
    """Per token from position ``first`` on, from the full float64 log-probs of both models."""
    lp_b, lp_m = full_logprobs(base, ids), full_logprobs(model, ids)
    rows = []
    for k in range(first - 1, len(ids) - 1):
        t = ids[k + 1]
        p = lp_b[k].exp()
        kl = float((p * (lp_b[k] - lp_m[k])).sum())
        rows.append((kl, int(lp_b[k].argmax()) == int(lp_m[k].argmax()), float(lp_m[k, t].exp() - lp_b[k, t].exp()),
                     -float(lp_m[k, t]), -float(lp_b[k, t])))
    return np.array(rows)


def test_kl_statistics_against_plain_formulas():
    rng = np.random.default_rng(0)
    n = 101
    kl = rng.exponential(0.02, n)
    dp = rng.normal(0, 0.05, n)
    nll_m, nll_b = rng.uniform(1, 5, n), rng.uniform(1, 5, n)
    agree = rng.random(n) < 0.8
    s = kl_statistics(kl, dp, nll_m, nll_b, agree)
    srt = sorted(kl)
    assert s["tokens"] == n
    assert s["mean"] == pytest.approx(sum(kl) / n)
    assert s["median"] == pytest.approx(srt[50])  # n odd: the middle value
    assert s["p90"] == pytest.approx(srt[90])  # linear interpolation lands on index 0.9 * (n - 1) = 90
    assert s["p99"] == pytest.approx(srt[99])
    assert s["max"] == pytest.approx(srt[-1])
    assert s["top1_agreement"] == pytest.approx(sum(agree) / n)
    assert s["rms_delta_p"] == pytest.approx(math.sqrt(sum(d * d for d in dp) / n))
    assert s["ppl_ratio"] == pytest.approx(math.exp(sum(nll_m) / n) / math.exp(sum(nll_b) / n))
    assert s["stderr_mean"] == pytest.approx(np.std(kl, ddof=1) / math.sqrt(n))
    # float32 per-token inputs (as the scorer keeps them) are summed in float64
    big = rng.uniform(2, 4, 200_000).astype(np.float32)
    s32 = kl_statistics(np.zeros(len(big)), np.zeros(len(big)), big, big[::-1], np.ones(len(big), bool))
    assert s32["ppl_model"] == pytest.approx(math.exp(math.fsum(big.tolist()) / len(big)), rel=1e-12)


@pytest.fixture(scope="module")
def perturbed(tiny, tmp_path_factory):
    """A copy of the tiny model with noise on every weight, saved beside the same tokenizer."""
    folder, model, tok = tiny
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05 * p.std())
    out = tmp_path_factory.mktemp("tiny-perturbed")
    tok.save_pretrained(out)
    other.save_pretrained(out, safe_serialization=True)
    return out, other.eval()


def _windows(tok, tiny_corpus, L=32, S=16):
    import json

    docs = [json.loads(line)["text"] for line in tiny_corpus.read_text().splitlines() if line.strip()]
    ids = tok("\n\n".join(docs))["input_ids"]
    cfg = validate({"model": {"name_or_path": "x"}, "corpus": {"path": "x"}, "eval": {"max_length": L, "stride": S}})
    from harness.tokens import TokenStream

    stream = TokenStream(np.array(ids), np.zeros(len(ids) + 1, np.int64), np.zeros(len(ids) + 1, np.int64))
    return ids, [stream], plan(resolve(cfg, True, None), [len(ids)])


@pytest.mark.parametrize("logits_chunk", [None, 5])
def test_pair_token_stats_match_full_logits(tiny, perturbed, tiny_corpus, logits_chunk):
    _, model, tok = tiny
    ids, streams, windows = _windows(tok, tiny_corpus)
    batch = build_batch(windows[:3], streams, tok.bos_token_id, tok.bos_token_id, tok.pad_token_id)
    got = np.stack(pair_token_stats(perturbed[1], model, batch, logits_chunk), axis=1).astype(np.float64)
    ref = np.concatenate([
        reference_kl(model, perturbed[1], ids[w.begin : w.end], w.score_begin - w.begin)[:, [3, 4, 0, 1, 2]] for w in windows[:3]
    ])
    assert got.shape == ref.shape == (sum(w.scored for w in windows[:3]), 5)
    np.testing.assert_allclose(got[:, [0, 1]], ref[:, [0, 1]], rtol=1e-5)  # NLLs
    np.testing.assert_allclose(got[:, 2], ref[:, 2], rtol=1e-3, atol=1e-6)  # KL
    assert (got[:, 3] == ref[:, 3]).all()  # top-1 agreement
    np.testing.assert_allclose(got[:, 4], ref[:, 4], atol=1e-6)  # delta p
    assert (ref[:, 2] > 0).all()


def test_model_against_itself(tiny, tiny_corpus):
    folder, model, tok = tiny
    cfg = validate({**tiny_config(folder, tiny_corpus, batch_size=3), "baseline_model": {"name_or_path": str(folder), "device": "cpu", "dtype": "float32"}})
    res = run(cfg, model=model, tokenizer=tok, baseline_model=model, write=False, progress=False)
    kl = res["kl"]
    assert kl["mean"] == 0 and kl["max"] == 0 and kl["median"] == 0
    assert kl["top1_agreement"] == 1 and kl["ppl_ratio"] == 1 and kl["rms_delta_p"] == 0
    assert kl["tokens"] == res.scored_tokens


def test_kl_mode_in_the_runner(tiny, perturbed, tiny_corpus, tmp_path):
    """model = perturbed copy, baseline_model = the tiny model; loaded from the config by the runner."""
    folder, model, tok = tiny
    data = tiny_config(perturbed[0], tiny_corpus, batch_size=4)
    data["baseline_model"] = {"name_or_path": str(folder), "device": "cpu", "dtype": "float32"}
    res = run(validate(data), tmp_path / "kl", progress=False)
    kl = res["kl"]
    for key in KL_KEYS:
        assert key in kl and math.isfinite(kl[key]), key
    assert 0 < kl["median"] <= kl["p90"] <= kl["p99"] <= kl["max"] and kl["mean"] > 0
    assert 0 < kl["top1_agreement"] < 1
    # second path: each model on its own through the plain scoring
    plain_m = run(validate(tiny_config(perturbed[0], tiny_corpus)), model=perturbed[1], tokenizer=tok, write=False, progress=False)
    plain_b = run(validate(tiny_config(folder, tiny_corpus)), tmp_path / "base", model=model, tokenizer=tok, progress=False)
    assert res["sum_nll"] == pytest.approx(plain_m["sum_nll"], rel=1e-9)
    assert kl["ppl_ratio"] == pytest.approx(plain_m.perplexity / plain_b.perplexity, rel=1e-7)
    assert kl["ppl_base"] == pytest.approx(plain_b.perplexity, rel=1e-7)
    # per-window columns, written to windows.parquet, add up to the totals
    w = pd.read_parquet(tmp_path / "kl" / "windows.parquet")
    assert set(KL_COLUMNS) <= set(w.columns) and len(w) == res["windows"]
    n = w.tokens.sum()
    assert w.kl_sum.sum() / n == pytest.approx(kl["mean"], rel=1e-5)
    assert w.kl_max.max() == pytest.approx(kl["max"], rel=1e-6)
    assert w.top1_agree.sum() / n == pytest.approx(kl["top1_agreement"])
    assert math.sqrt(w.delta_p_sq_sum.sum() / n) == pytest.approx(kl["rms_delta_p"], rel=1e-5)
    assert w.base_sum_nll.sum() == pytest.approx(plain_b["sum_nll"], rel=1e-9)
    # against the full-logit reference, window by window
    ids, _, windows = _windows(tok, tiny_corpus)
    ref = [reference_kl(model, perturbed[1], ids[x.begin : x.end], x.score_begin - x.begin) for x in windows]
    assert w.sort_values("index").kl_sum.to_numpy() == pytest.approx([r[:, 0].sum() for r in ref], rel=1e-3)
    # compare shows the KL beside the perplexity, and the same ratio as the KL mode
    from harness.compare import compare

    t = compare([str(tmp_path / "base"), str(tmp_path / "kl")], kl_details=True).table.set_index("run")
    assert t.kl_mean.iloc[1] == pytest.approx(kl["mean"]) and pd.isna(t.kl_mean.iloc[0])
    assert t.kl_p99.iloc[1] == pytest.approx(kl["p99"]) and t.kl_ppl_ratio.iloc[1] == pytest.approx(kl["ppl_ratio"])
    assert t.ppl_ratio.iloc[1] == pytest.approx(kl["ppl_ratio"], rel=1e-5)


def test_kl_refuses_other_vocabulary(tiny, tmp_path):
    _, model, tok = tiny
    other = build_tiny_model(tmp_path, len(tok) + 8, seed=4)
    with pytest.raises(HarnessError, match="^baseline_model: its vocabulary"):
        PairScorer(model, other)


def test_dynamic_int8_config(tiny, tiny_corpus):
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    from harness.models import load_model

    folder, model, tok = tiny
    with pytest.raises(ConfigError, match="model: quantize: dynamic-int8 runs on the CPU in float32"):
        validate({**tiny_config(folder, tiny_corpus), "model": {"name_or_path": str(folder), "quantize": "dynamic-int8", "dtype": "bfloat16"}})
    data = tiny_config(folder, tiny_corpus)
    data["model"]["quantize"] = "dynamic-int8"
    data["baseline_model"] = {"name_or_path": str(folder), "device": "cpu", "dtype": "float32"}
    cfg = validate(data)
    q = load_model(cfg.model)
    body = list(q.model.modules())
    assert sum(isinstance(m, DynamicLinear) for m in body) == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert not any(type(m) is torch.nn.Linear for m in body)
    assert type(q.lm_head) is torch.nn.Linear and torch.equal(q.lm_head.weight, model.lm_head.weight)
    res = run(cfg, model=q, tokenizer=tok, baseline_model=model, write=False, progress=False)
    assert res["kl"]["mean"] > 0 and abs(math.log(res["kl"]["ppl_ratio"])) < 0.1


def test_int8_weight_only(tiny, tiny_corpus):
    from harness.models import load_model

    folder, model, tok = tiny
    data = tiny_config(folder, tiny_corpus)
    data["model"]["quantize"] = "int8-weight-only"
    q = load_model(validate(data).model)
    for (name, w), (_, w0) in zip(q.model.named_parameters(), model.model.named_parameters()):
        if name.endswith("proj.weight"):  # every Linear of the body: int8 steps of max|row| / 127
            step = w0.abs().amax(1, keepdim=True) / 127
            levels = w / step
            assert torch.allclose(levels, levels.round(), atol=1e-3) and levels.abs().max() <= 127 + 1e-3
            assert ((w - w0).abs() <= step / 2 + 1e-7).all() and not torch.equal(w, w0)
        else:  # embeddings, norms, head untouched
            assert torch.equal(w, w0), name
    pair = PairScorer(q, model)
    ids, streams, windows = _windows(tok, tiny_corpus)
    pair(build_batch(windows[:2], streams, tok.bos_token_id, tok.bos_token_id, tok.pad_token_id), windows[:2])
    assert 0 < pair.acc.summary()["mean"] < 0.01


@pytest.mark.slow
def test_smollm2_float32_vs_bfloat16_and_int8(smollm2):
    """The real model against an int8-weight-only, a bfloat16 and a dynamic int8 copy of itself.

    The KL code is checked against the full-logit reference on the int8-weight-only copy: a fixed
    rounding of the weights, computed in float32, so its KL does not depend on the matmul kernel
    or on which windows share a batch. (A bfloat16 copy's KL is the rounding noise of its own
    matmuls: on a CPU with AMX, window 0 scored in a batch of two gave 0.1326 nats against 0.1155
    scored alone, so it cannot check the KL code to better than the hardware's whims.)
    """
    from harness.models import quantize

    model, tok = smollm2
    data = {"model": SMOLLM2, "baseline_model": SMOLLM2, "corpus": {**WIKITEXT, "max_tokens": 192},
            "eval": {"protocol": "sliding", "max_length": 128, "stride": 64, "bootstrap": 0, "batch_size": 2}}
    ids = tok(("\n\n".join(_wikitext_rows(100))), add_special_tokens=True)["input_ids"][:192]
    int8 = quantize(copy.deepcopy(model), "int8-weight-only")
    res = run(validate(data), model=int8, tokenizer=tok, baseline_model=model, write=False, progress=False)
    kl = res["kl"]
    assert res["windows"] == 2 and kl["tokens"] == 191
    # both windows (scored together, padded) against each scored alone in the float64 reference;
    # measured here: KL sums within 7e-5 relative of the reference, top-1 agreement equal
    refs = [reference_kl(model, int8, ids[:128], 1), reference_kl(model, int8, ids[64:192], 64)]
    w = res.windows.set_index("index")
    assert w.tokens.tolist() == [len(r) for r in refs] == [127, 64]
    assert w.kl_sum.tolist() == pytest.approx([r[:, 0].sum() for r in refs], rel=2e-4)
    assert w.top1_agree.tolist() == [r[:, 1].sum() for r in refs]
    assert w.sum_nll.tolist() == pytest.approx([r[:, 3].sum() for r in refs], rel=1e-5)
    assert w.base_sum_nll.tolist() == pytest.approx([r[:, 4].sum() for r in refs], rel=1e-5)
    # the baseline's side equals a plain run of the float32 model (no bias from the KL path)
    plain = run(validate({k: v for k, v in data.items() if k != "baseline_model"}), model=model, tokenizer=tok, write=False, progress=False)
    assert kl["ppl_base"] == pytest.approx(plain.perplexity, rel=1e-9)
    assert w.base_sum_nll.sum() == pytest.approx(plain["sum_nll"], rel=1e-9)
    del int8
    # bfloat16: a low-precision model runs through the KL mode; its KL is kernel noise, so only
    # bounds (measured 0.00093 to 0.00102 mean, top-1 0.984 to 0.990, ratio 1.0008 to 1.0021)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    resb = run(validate(data), model=bf16, tokenizer=tok, baseline_model=model, write=False, progress=False)
    klb = resb["kl"]
    assert 0 < klb["mean"] < 0.05 and klb["top1_agreement"] > 0.9 and abs(klb["ppl_ratio"] - 1) < 0.03
    assert klb["ppl_base"] == pytest.approx(plain.perplexity, rel=1e-9)
    del bf16
    # dynamic int8 quantizes activations per tensor: far further from float32 than bfloat16 is
    dyn = quantize(copy.deepcopy(model), "dynamic-int8")
    res8 = run(validate(data), model=dyn, tokenizer=tok, baseline_model=model, write=False, progress=False)
    assert res8["kl"]["mean"] > 10 * klb["mean"] and res8["kl"]["top1_agreement"] < klb["top1_agreement"]
    assert res8["kl"]["ppl_ratio"] > 1


def _wikitext_rows(n: int) -> list[str]:
    from .conftest import MIRROR

    return pd.read_parquet(MIRROR / "Salesforce/wikitext/wikitext-2-raw-v1/test.parquet").text.tolist()[:n]
