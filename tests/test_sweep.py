"""Sweeps and the per-position plot: each point against the plain reference loop, plots' data."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import yaml

from harness.errors import ConfigError, HarnessError
from harness.sweep import plan, run_sweep, split_overrides

from .conftest import tiny_config
from .reference import sliding_reference


def test_split_overrides():
    fixed, swept = split_overrides(["eval.max_length=256,512,1024", "eval.stride=128", "corpus.join=[a,b]", "name='x,y'", "eval.bos=none,every"])
    assert fixed == ["eval.stride=128", "corpus.join=[a,b]", "name='x,y'"]
    assert swept == {"eval.max_length": ["256", "512", "1024"], "eval.bos": ["none", "every"]}
    with pytest.raises(HarnessError, match="empty value"):
        split_overrides(["eval.max_length=256,,512"])


def _config_file(tmp_path, folder, corpus) -> str:
    path = tmp_path / "tiny.yaml"
    data = tiny_config(folder, corpus)
    data["eval"].pop("max_length")
    data["eval"]["stride"] = 8
    data["name"] = "tiny"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_sweep_validates_every_point_first(tiny, tiny_corpus, tmp_path):
    folder, _, _ = tiny
    cfg = _config_file(tmp_path, folder, tiny_corpus)
    with pytest.raises(ConfigError, match="eval.max_length"):
        plan(cfg, ["eval.max_length=16,0"], tmp_path / "sweep")
    with pytest.raises(HarnessError, match="no swept field"):
        plan(cfg, ["eval.max_length=16"], tmp_path / "sweep")
    assert not (tmp_path / "sweep").exists()


def test_sweep_grid_against_reference(tiny, tiny_corpus, tmp_path):
    folder, model, tok = tiny
    cfg = _config_file(tmp_path, folder, tiny_corpus)
    sweep = plan(cfg, ["eval.max_length=16,32", "eval.bos=none,stream", "eval.bootstrap=20"], tmp_path / "sweep")
    assert [p.values for p in sweep.points] == [
        {"eval.max_length": 16, "eval.bos": "none"}, {"eval.max_length": 16, "eval.bos": "stream"},
        {"eval.max_length": 32, "eval.bos": "none"}, {"eval.max_length": 32, "eval.bos": "stream"},
    ]
    run_sweep(sweep, progress=False, model=model, tokenizer=tok)
    docs = [json.loads(line)["text"] for line in tiny_corpus.read_text().splitlines() if line.strip()]
    text = "\n\n".join(docs)
    for p in sweep.points:
        L, bos = p.values["eval.max_length"], p.values["eval.bos"]
        ids = tok(text, add_special_tokens=bos == "stream")["input_ids"]
        s, n, _ = sliding_reference(model, ids, L, 8, bos, tok.bos_token_id)
        assert p.record["scored_tokens"] == n
        assert p.record["perplexity"] == pytest.approx(math.exp(s / n), rel=1e-6)
        assert (p.run_dir / "result.json").is_file()
    # sweep.csv and the plotted numbers are the records' numbers
    csv = pd.read_csv(sweep.dir / "sweep.csv")
    assert len(csv) == 4 and (sweep.dir / "table.csv").is_file()
    plotted = sweep.plotted.sort_values(["eval.bos", "eval.max_length"])
    expect = sorted(((p.values["eval.bos"], p.values["eval.max_length"]), p.record["perplexity"]) for p in sweep.points)
    assert plotted.perplexity.tolist() == pytest.approx([v for _, v in expect])
    assert plotted["eval.max_length"].tolist() == [16, 32, 16, 32]
    png = sweep.dir / "sweep.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 2000
    # per-position plot: one line per point, its numbers are positions.parquet's, summing to the record
    pos = sweep.positions
    assert sorted(pos.run.unique()) == sorted(f"max_length={p.values['eval.max_length']}__bos={p.values['eval.bos']}" for p in sweep.points)
    for p in sweep.points:
        L = p.values["eval.max_length"]
        label = f"max_length={L}__bos={p.values['eval.bos']}"
        mine = pos[pos.run == label]
        parquet = pd.read_parquet(p.run_dir / "positions.parquet")
        # 32 bins over positions 0 .. L-1: ranges of ceil(L / 32) positions, token-weighted means
        width = -(-L // 32)
        ref = {}
        for k, s_, c in zip(parquet.position, parquet.sum_nll, parquet["count"]):
            b0 = k // width * width
            ref[b0] = (ref.get(b0, (0.0, 0))[0] + s_, ref.get(b0, (0.0, 0))[1] + c)
        assert mine.start.tolist() == sorted(ref)
        assert mine.mean_nll.tolist() == pytest.approx([ref[b][0] / ref[b][1] for b in sorted(ref)])
        assert mine["count"].sum() == p.record["scored_tokens"]
        assert (mine.mean_nll * mine["count"]).sum() == pytest.approx(p.record["sum_nll"], rel=1e-9)
        assert mine.end.max() <= L
    assert (sweep.dir / "positions.png").stat().st_size > 2000
    with pytest.raises(HarnessError, match="not empty"):
        run_sweep(plan(cfg, ["eval.max_length=16,32"], tmp_path / "sweep"), progress=False, model=model, tokenizer=tok)


def test_positions_reference_on_one_window(tiny, tiny_corpus, tmp_path):
    """The plotted mean NLL at each position, against the full-logit reference (stride = L)."""
    from harness.plots import plot_positions
    from harness.config import validate
    from harness.runner import run

    from .reference import full_logprobs

    folder, model, tok = tiny
    L = 16
    res = run(validate(tiny_config(folder, tiny_corpus, max_length=L, stride=L, bos="none")), tmp_path / "r",
              model=model, tokenizer=tok, progress=False)
    data = plot_positions({"r": pd.read_parquet(tmp_path / "r" / "positions.parquet")}, tmp_path / "p.png")
    docs = [json.loads(line)["text"] for line in tiny_corpus.read_text().splitlines() if line.strip()]
    ids = tok("\n\n".join(docs), add_special_tokens=False)["input_ids"]
    sums, counts = [0.0] * L, [0] * L
    for b in range(0, len(ids), L):
        chunk = ids[b : b + L]
        if len(chunk) < 2:
            continue
        lp = full_logprobs(model, chunk)
        for k in range(len(chunk) - 1):
            sums[k] -= float(lp[k, chunk[k + 1]])
            counts[k] += 1
    ref = [s / c for s, c in zip(sums, counts) if c]
    assert data.mean_nll.tolist() == pytest.approx(ref, rel=1e-5)
    assert data["count"].tolist() == [c for c in counts if c]
    assert sum(counts) == res.scored_tokens
    # four bins of four positions: token-weighted means of the reference sums
    binned = plot_positions({"r": pd.read_parquet(tmp_path / "r" / "positions.parquet")}, tmp_path / "p4.png", bins=4)
    assert binned.start.tolist() == [0, 4, 8, 12] and binned.position.tolist() == [1.5, 5.5, 9.5, 13.5]
    assert binned.mean_nll.tolist() == pytest.approx([sum(sums[b : b + 4]) / sum(counts[b : b + 4]) for b in (0, 4, 8, 12)], rel=1e-5)


def test_cli_sweep_compare_and_positions(tiny, tiny_corpus, tmp_path):
    from typer.testing import CliRunner

    from harness.cli import app

    folder, _, _ = tiny
    cfg = _config_file(tmp_path, folder, tiny_corpus)
    cli = CliRunner()
    out = cli.invoke(app, ["sweep", cfg, "eval.max_length=16,32", "eval.bootstrap=20", "-o", str(tmp_path / "sw"), "--no-progress"])
    assert out.exit_code == 0, out.output
    table = pd.read_csv(tmp_path / "sw" / "sweep.csv")
    assert table["eval.max_length"].tolist() == [16, 32]
    for ppl in table.perplexity:
        assert f"{ppl:.4f}" in out.output
    out = cli.invoke(app, ["compare", str(tmp_path / "sw" / "*"), "--plot"])
    assert out.exit_code != 0 and "protocol.max_length differs" in str(out.exception)
    out = cli.invoke(app, ["positions", str(tmp_path / "sw"), "-o", str(tmp_path / "pos.png")])
    assert out.exit_code == 0 and (tmp_path / "pos.png").stat().st_size > 2000
    from harness.compare import find_runs

    # the points share the config's name: they are told apart by their folders
    assert [r.label for r in find_runs([str(tmp_path / "sw")])] == ["max_length=16", "max_length=32"]


# ---------------------------------------------------------------------------------------------
# Bad sweeps: one line, refused before anything runs, and a failed point leaves no folder


def test_sweep_refuses_ambiguous_grids(tiny, tiny_corpus, tmp_path):
    """Duplicate values (two points, one folder), a key swept twice or swept and fixed (one list
    silently dropped), and keys named like pydantic's type tags: one line each, nothing written."""
    folder, _, _ = tiny
    cfg = _config_file(tmp_path, folder, tiny_corpus)
    out = tmp_path / "sweep"
    cases = [
        (["eval.max_length=16,16"], "sweep 'eval.max_length=16,16': value 16 is given twice; give each value once"),
        (["eval.max_length=16, 32 ,16"], "value 16 is given twice"),
        (["eval.stride=4,8", "eval.stride=2,6"], "sweep: eval.stride is swept twice; give all its values in one list, e.g. eval.stride=4,8,2,6"),
        (["eval.stride=4", "eval.stride=2,6"], "sweep: eval.stride is both swept and fixed"),
        (["eval.stride=2,6", "eval.stride=4"], "sweep: eval.stride is both swept and fixed"),
        (["none=1,2"], "none: unknown key (valid keys: name, model,"),
        (["eval.int=1,2"], "eval.int: unknown key (valid keys: protocol,"),
        ([f"corpus.path={tmp_path / 'a' / 'b.jsonl'},{tmp_path / 'a-b.jsonl'}"], "; give values that differ"),
    ]
    (tmp_path / "a").mkdir()
    for name in ("a/b.jsonl", "a-b.jsonl"):  # one folder name for both: '/' becomes '-' in it
        (tmp_path / name).write_text(tiny_corpus.read_text())
    for overrides, expected in cases:
        with pytest.raises(HarnessError) as err:
            plan(cfg, overrides, out)
        assert expected in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert split_overrides(["eval.compile=true,1"])[1] == {"eval.compile": ["true", "1"]}  # true is not 1
    assert not out.exists()


def test_sweep_checks_every_corpus_first(tiny, tiny_corpus, tmp_path):
    """A corpus that is missing at the second point (a file, a mirror, a split) fails before the
    first point runs: nothing is written."""
    folder, model, tok = tiny
    cfg = _config_file(tmp_path, folder, tiny_corpus)
    out = tmp_path / "sweep"
    with pytest.raises(HarnessError, match="corpus.path: file not found: .*nope.jsonl"):
        plan(cfg, [f"corpus.path={tiny_corpus},{tmp_path / 'nope.jsonl'}"], out)
    data = yaml.safe_load(open(cfg))
    data["corpus"] = {"dataset": "Salesforce/wikitext", "config": "wikitext-2-raw-v1", "max_documents": 20}
    (tmp_path / "wiki.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(HarnessError, match="corpus.split: split 'bogus' not found"):
        plan(tmp_path / "wiki.yaml", ["corpus.split=test,bogus"], out)
    with pytest.raises(HarnessError, match="corpus.mirror: '.*nomirror' names no folder"):
        plan(tmp_path / "wiki.yaml", [f"corpus.mirror={tmp_path / 'nomirror'}", "eval.max_length=16,32"], out)
    assert not out.exists()


def test_sweep_output_dir_that_is_a_file(tiny, tiny_corpus, tmp_path):
    from tests.test_errors import assert_one_line_error, cli

    folder, model, tok = tiny
    cfg = _config_file(tmp_path, folder, tiny_corpus)
    target = tmp_path / "out.txt"
    target.write_text("keep me")
    with pytest.raises(HarnessError, match=r"^--output-dir .*out.txt is a file, not a folder; choose another --output-dir$"):
        run_sweep(plan(cfg, ["eval.max_length=16,32"], target), progress=False, model=model, tokenizer=tok)
    proc = cli("sweep", cfg, "eval.max_length=16,32", "--output-dir", str(target), "--no-progress")
    assert proc.returncode == 2
    assert_one_line_error(proc, f"--output-dir {target} is a file, not a folder")
    assert target.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt", "tiny.yaml"]


def test_sweep_checks_every_length_first(tiny, tiny_corpus, tmp_path):
    """A swept eval.max_length beyond the model's positions (512) refuses the sweep before the
    first point runs, read from the model's config (no weights loaded) or from the model passed
    in; through the CLI one line, exit 2, nothing written."""
    from tests.test_errors import assert_one_line_error, cli

    folder, model, tok = tiny
    cfg = _config_file(tmp_path, folder, tiny_corpus)
    out = tmp_path / "sweep"
    said = ("sweep point eval.max_length=1024, eval.bos=stream: eval.max_length: 1024 is larger than the model's 512 "
            "positions; sweep values <= 512 (no point has run)")
    for given in ({"model": model, "tokenizer": tok}, {}):
        with pytest.raises(HarnessError) as err:
            run_sweep(plan(cfg, ["eval.max_length=16,1024", "eval.bos=stream,none"], out), progress=False, **given)
        assert str(err.value) == said and not out.exists()
    proc = cli("sweep", cfg, "eval.max_length=16,1024", "eval.bos=stream,none", "--output-dir", str(out), "--no-progress")
    assert proc.returncode == 2 and not out.exists()
    assert_one_line_error(proc, said)


def test_stated_positions_read_without_the_weights(smollm2, tiny):
    """The config-only read the sweep's check uses gives what the loaded model states: the real
    SmolLM2 GGUF (its header) and a transformers folder; None where no config loads."""
    from harness.config import ModelConfig
    from harness.models import max_positions, stated_positions

    from .conftest import SMOLLM2

    model, _ = smollm2
    assert stated_positions(ModelConfig(**SMOLLM2)) == max_positions(model) == 8192
    folder, tiny_model, _ = tiny
    assert stated_positions(ModelConfig(name_or_path=str(folder))) == max_positions(tiny_model) == 512
    assert stated_positions(ModelConfig(name_or_path=str(folder / "nowhere"))) is None


def test_failed_point_leaves_no_folder(tiny, tiny_corpus, tmp_path):
    """A point that fails at run time (llama.cpp's protocol needs two chunks of eval.max_length
    tokens, more than the 600 tokens read at 512) leaves the finished points and no folder of its own;
    a rerun into the folder says what to do."""
    folder, model, tok = tiny
    cfg = _config_file(tmp_path, folder, tiny_corpus)
    out = tmp_path / "sweep"
    short = ["eval.protocol=llamacpp", "eval.bos=none", "corpus.max_tokens=600"]
    sweep = plan(cfg, ["eval.max_length=16,512", "eval.bootstrap=0", *short], out)
    with pytest.raises(HarnessError, match=r"^corpus: .*\(eval.max_length is ctx\); use more text or a smaller eval.max_length$"):
        run_sweep(sweep, progress=False, model=model, tokenizer=tok)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["max_length=16"]
    assert (out / "max_length=16" / "result.json").is_file() and not (out / "sweep.csv").exists()
    with pytest.raises(HarnessError) as err:
        run_sweep(plan(cfg, ["eval.max_length=16,512"], out), progress=False, model=model, tokenizer=tok)
    assert str(err.value) == f"sweep folder {out} is not empty (it holds an earlier sweep's runs); remove it or choose another --output-dir"
    # the first point fails: every folder the sweep made is removed again
    first = tmp_path / "new" / "sweep"
    with pytest.raises(HarnessError, match="eval.max_length is ctx"):
        run_sweep(plan(cfg, ["eval.max_length=512,16", *short], first),
                  progress=False, model=model, tokenizer=tok)
    assert not (tmp_path / "new").exists()
