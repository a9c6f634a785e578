"""Comparing runs: the paired bootstrap against a plain loop, the table, and the refusals."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from harness.compare import compare, find_runs, write_comparison
from harness.paired import paired_bootstrap, resample_indices
from harness.config import validate
from harness.errors import HarnessError
from harness.runner import run

from .conftest import REPO, _train_tokenizer, build_tiny_model, tiny_config


def reference_paired(a, b, da, db, rows, metric="perplexity"):
    """Each resample in a plain loop: sum the drawn units, compute both metrics, subtract."""
    deltas, ratios = [], []
    for row in rows:
        sa = sum(a[i] for i in row)
        sb = sum(b[i] for i in row)
        na = sum(da[i] for i in row)
        nb = sum(db[i] for i in row)
        if metric == "perplexity":
            ma, mb = math.exp(sa / na), math.exp(sb / nb)
        else:
            ma, mb = sa / na / math.log(2), sb / nb / math.log(2)
        deltas.append(mb - ma)
        ratios.append(mb / ma)
    return np.array(deltas), np.array(ratios)


@pytest.mark.parametrize("metric", ["perplexity", "bits_per_byte"])
def test_paired_bootstrap_matches_plain_loop(metric):
    rng = np.random.default_rng(7)
    n, samples = 13, 300
    da = rng.integers(20, 60, n).astype(float)
    db = da if metric == "perplexity" else da + rng.integers(0, 5, n)
    a = da * rng.uniform(2.0, 3.5, n)
    b = a + rng.normal(0.05, 0.3, n) * np.sqrt(da)
    res = paired_bootstrap(a, b, da, db, metric=metric, samples=samples, seed=3)
    rows = np.concatenate(list(resample_indices(n, samples, 3)))
    assert rows.shape == (samples, n) and rows.min() >= 0 and rows.max() < n
    deltas, ratios = reference_paired(a, b, da, db, rows, metric)
    np.testing.assert_allclose(res.stats, deltas, rtol=1e-12)
    assert res.ci95 == pytest.approx(list(np.percentile(deltas, [2.5, 97.5])), rel=1e-12)
    assert res.ratio_ci95 == pytest.approx(list(np.percentile(ratios, [2.5, 97.5])), rel=1e-12)
    full = reference_paired(a, b, da, db, [list(range(n))], metric)
    assert res.delta == pytest.approx(full[0][0], rel=1e-12)
    assert res.ratio == pytest.approx(full[1][0], rel=1e-12)
    share_neg, share_pos = np.mean(deltas <= 0), np.mean(deltas >= 0)
    assert res.p_value == pytest.approx(min(1.0, 2 * min(share_neg, share_pos)))
    assert res.significant == (not (res.ci95[0] <= 0 <= res.ci95[1]))


def test_paired_bootstrap_identical_and_shifted():
    rng = np.random.default_rng(1)
    t = rng.integers(10, 50, 20).astype(float)
    a = t * rng.uniform(1, 3, 20)
    same = paired_bootstrap(a, a.copy(), t, samples=200)
    assert same.delta == 0 and same.ci95 == [0.0, 0.0] and not same.significant and same.p_value == 1.0
    # B pays exactly c nats more on every token: the ratio is exp(c) in every resample
    c = 0.01
    shifted = paired_bootstrap(a, a + c * t, t, samples=200)
    assert shifted.ratio_ci95 == pytest.approx([math.exp(c)] * 2, rel=1e-12)
    assert shifted.significant and shifted.ci95[0] > 0


def test_pairing_sees_what_separate_intervals_miss():
    """A small, consistent improvement over very unequal documents: the paired interval excludes
    zero although each run's own interval is wide (documents vary far more than the models)."""
    rng = np.random.default_rng(0)
    t = rng.integers(50, 500, 40).astype(float)
    a = t * rng.uniform(1.5, 4.0, 40)
    b = a - 0.02 * t + rng.normal(0, 0.2, 40)
    res = paired_bootstrap(a, b, t, samples=500)
    assert res.significant and res.ci95[1] < 0
    from harness.accumulate import bootstrap_ci

    ci_a, ci_b = bootstrap_ci(a, t, 500, 0), bootstrap_ci(b, t, 500, 0)
    assert ci_b[1] > ci_a[0]  # the separate intervals overlap


def test_paired_bootstrap_rejects_bad_input():
    with pytest.raises(ValueError):
        paired_bootstrap([1.0, 2.0], [1.0], [1, 1])
    with pytest.raises(ValueError):
        paired_bootstrap([1.0], [1.0], [1])


# ---------------------------------------------------------------------------------------------
# Runs on the tiny model and a second tiny model with the same tokenizer


@pytest.fixture(scope="module")
def other_model(tiny, tmp_path_factory):
    folder, _, tok = tiny
    other = tmp_path_factory.mktemp("tiny-other")
    tok.save_pretrained(other)
    return other, build_tiny_model(other, len(tok), seed=1)


def _run(folder, model, tok, corpus_path, out, name, **kw):
    data = tiny_config(folder, corpus_path, max_length=32, stride=16)
    data["name"] = name
    data["eval"].update(kw.pop("eval", {}))
    data["corpus"].update(kw.pop("corpus", {}))
    return run(validate(data), out, model=model, tokenizer=tok, progress=False)


@pytest.fixture(scope="module")
def two_runs(tiny, other_model, tiny_corpus, tmp_path_factory):
    folder, model, tok = tiny
    root = tmp_path_factory.mktemp("results")
    a = _run(folder, model, tok, tiny_corpus, root / "a", "A")
    b = _run(other_model[0], other_model[1], tok, tiny_corpus, root / "b", "B")
    return root, a, b


def test_compare_table_and_paired_test(two_runs, tmp_path):
    root, a, b = two_runs
    comp = compare([str(root)], baseline="A", samples=400, seed=5)
    t = comp.table.set_index("run")
    assert list(t.index) == ["A", "B"]
    assert t.loc["B", "perplexity"] == pytest.approx(b.perplexity)
    assert t.loc["B", "ci95_low"] == pytest.approx(b["ci95"][0])
    assert t.loc["B", "delta_ppl"] == pytest.approx(b.perplexity - a.perplexity)
    assert t.loc["B", "ppl_ratio"] == pytest.approx(b.perplexity / a.perplexity)
    assert t.loc["B", "delta_bpb"] == pytest.approx(b["bits_per_byte"] - a["bits_per_byte"])
    assert t.loc["A", "delta_ppl"] == 0 and t.loc["A", "test"] == "baseline"
    # second path: pair the windows by hand from the parquet files and run the bootstrap
    wa = pd.read_parquet(root / "a" / "windows.parquet").sort_values("score_begin")
    wb = pd.read_parquet(root / "b" / "windows.parquet").sort_values("score_begin")
    assert (wa.score_begin.values == wb.score_begin.values).all()
    ref = paired_bootstrap(wa.sum_nll.values, wb.sum_nll.values, wa.tokens.values, samples=400, seed=5)
    assert [t.loc["B", "delta_ci95_low"], t.loc["B", "delta_ci95_high"]] == pytest.approx(ref.ci95)
    assert t.loc["B", "significant"] == ref.significant
    assert t.loc["B", "test"] == f"paired bootstrap over {len(wa)} windows"
    # the runs' own windows reproduce the delta
    n = wa.tokens.sum()
    assert t.loc["B", "delta_ppl"] == pytest.approx(math.exp(wb.sum_nll.sum() / n) - math.exp(wa.sum_nll.sum() / n))

    paths = write_comparison(comp, tmp_path, plot=True)
    csv = pd.read_csv(tmp_path / "compare.csv")
    assert list(csv.run) == ["A", "B"] and csv.perplexity.tolist() == pytest.approx(t.perplexity.tolist())
    md = (tmp_path / "compare.md").read_text()
    assert md.startswith("|") and "bits per byte also compares across tokenizers" in md
    png = tmp_path / "compare.png"
    assert png in paths and png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 2000


def test_compare_precision_is_a_column_not_a_refusal(tiny, tiny_corpus, two_runs, tmp_path):
    """A bf16 run compares with a float32 run of the same config; the table shows each one's precision."""
    import copy

    import torch

    root, a, _ = two_runs
    folder, model, tok = tiny
    data = tiny_config(folder, tiny_corpus, max_length=32, stride=16)
    data.update(name="A-bf16")
    data["model"]["dtype"] = "auto"
    run(validate(data), tmp_path / "bf16", model=copy.deepcopy(model).to(torch.bfloat16), tokenizer=tok, progress=False)
    t = compare([str(root / "a"), str(tmp_path / "bf16")], baseline="A", samples=100).table.set_index("run")
    assert t.loc["A", "precision"] == "float32" and t.loc["A-bf16", "precision"] == "bfloat16 (auto)"
    assert t.loc["A-bf16", "test"].startswith("paired bootstrap")


def test_compare_plot_data(two_runs, tmp_path):
    from harness.plots import plot_compare

    root, a, b = two_runs
    comp = compare([str(root / "a"), str(root / "b" / "result.json")])
    data = plot_compare(comp.table, tmp_path / "bars.png")
    assert data.perplexity.tolist() == pytest.approx([a.perplexity, b.perplexity])
    assert data.err_low.tolist() == pytest.approx([a.perplexity - a["ci95"][0], b.perplexity - b["ci95"][0]])
    assert data.err_high.tolist() == pytest.approx([a["ci95"][1] - a.perplexity, b["ci95"][1] - b.perplexity])
    assert (tmp_path / "bars.png").stat().st_size > 2000


def test_find_runs_by_glob_and_bad_baseline(two_runs):
    root, _, _ = two_runs
    assert [r.label for r in find_runs([str(root / "*")])] == ["A", "B"]
    with pytest.raises(HarnessError, match="no result records"):
        find_runs([str(root / "nothing-*")])
    flipped = compare([str(root)], baseline="B", samples=200).table
    forward = compare([str(root)], baseline="A", samples=200).table
    assert flipped.run.tolist() == ["B", "A"]  # the baseline first
    assert flipped.delta_ppl.iloc[1] == pytest.approx(-forward.delta_ppl.iloc[1])
    assert flipped.significant.iloc[1] == forward.significant.iloc[1]
    with pytest.raises(HarnessError, match="--baseline: no run named 'C'"):
        compare([str(root)], baseline="C")


def _edited_copy(src, dst, **changes):
    shutil.copytree(src, dst)
    rec = json.loads((dst / "result.json").read_text())
    for dotted, value in changes.items():
        node = rec
        *parts, last = dotted.split(".")
        for p in parts:
            node = node[p]
        node[last] = value
    rec["name"] = dst.name
    (dst / "result.json").write_text(json.dumps(rec))
    return dst


@pytest.mark.parametrize("field", ["tokenizer.fingerprint", "corpus.text_sha256", "corpus.tokens"])
def test_compare_refuses_other_tokens(two_runs, tmp_path, field):
    root, _, _ = two_runs
    _edited_copy(root / "b", tmp_path / "edited", **{field: "something else"})
    with pytest.raises(HarnessError) as err:
        compare([str(root / "a"), str(tmp_path / "edited")])
    msg = str(err.value)
    assert msg.startswith(f"{field} differs: A has") and "edited has 'something else'" in msg and "\n" not in msg


def test_compare_refuses_other_protocol_settings(tiny, tiny_corpus, two_runs, tmp_path):
    folder, model, tok = tiny
    root, _, _ = two_runs
    _run(folder, model, tok, tiny_corpus, tmp_path / "s8", "S8", eval={"stride": 8})
    with pytest.raises(HarnessError, match=r"^protocol.stride differs: A has 16, S8 has 8; compare runs of the same"):
        compare([str(root / "a"), str(tmp_path / "s8")])


def test_cli_compare_refusal_is_one_line(two_runs, tmp_path):
    root, _, _ = two_runs
    _edited_copy(root / "b", tmp_path / "other-tok", **{"tokenizer.fingerprint": "0123"})
    proc = subprocess.run([sys.executable, "-m", "harness", "compare", str(root / "a"), str(tmp_path / "other-tok")],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: tokenizer.fingerprint differs: A has '" + json.loads((root / "a" / "result.json").read_text())["tokenizer"]["fingerprint"]
        + "', other-tok has '0123'; perplexity needs the same tokens; pass --bits-per-byte to compare bits per byte across tokenizers"
    ]
    assert not (tmp_path / "compare.csv").exists()


def test_bits_per_byte_across_tokenizers(tiny, tiny_corpus, tmp_path):
    """A tokenizer that does not add BOS is another tokenizer: PPL refused, bits per byte paired by document."""
    folder, model, tok = tiny
    nobos = tmp_path / "nobos"
    tok2 = _train_tokenizer(nobos, add_bos=False)
    build_tiny_model(nobos, len(tok2), seed=2)
    a = _run(folder, model, tok, tiny_corpus, tmp_path / "r" / "a", "A", corpus={"mode": "documents"})
    b = _run(nobos, None, None, tiny_corpus, tmp_path / "r" / "b", "B", corpus={"mode": "documents"})
    assert a["tokenizer"]["fingerprint"] != b["tokenizer"]["fingerprint"]
    with pytest.raises(HarnessError, match="^tokenizer.fingerprint differs"):
        compare([str(tmp_path / "r")])
    comp = compare([str(tmp_path / "r")], across_tokenizers=True, samples=300)
    row = comp.table.set_index("run").loc["B"]
    assert row.compared_on == "bits per byte (tokenizers may differ)" and pd.isna(row.delta_ppl)
    assert row.delta_bpb == pytest.approx(b["bits_per_byte"] - a["bits_per_byte"])
    ga = pd.read_parquet(tmp_path / "r" / "a" / "windows.parquet").groupby("doc")[["sum_nll", "bytes"]].sum()
    gb = pd.read_parquet(tmp_path / "r" / "b" / "windows.parquet").groupby("doc")[["sum_nll", "bytes"]].sum()
    ref = paired_bootstrap(ga.sum_nll, gb.sum_nll, ga.bytes, gb.bytes, metric="bits_per_byte", samples=300)
    assert [row.delta_ci95_low, row.delta_ci95_high] == pytest.approx(ref.ci95)
    assert row.test == f"paired bootstrap over {len(ga)} documents"
