"""Bad input ends with one clear line, a non-zero exit, no traceback, and nothing in results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from harness.config import validate
from harness.errors import HarnessError
from harness.runner import run

from .conftest import REPO, tiny_config


def cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def results(tmp_path) -> Path:
    return tmp_path / "results"


def assert_nothing_written(results: Path) -> None:
    assert not results.exists() or not any(results.glob("**/result.json")), "a record was written"
    assert not (results / "table.csv").exists()


def test_cli_config_errors_are_one_line(tmp_path, results):
    proc = cli("run", str(tmp_path / "missing.yaml"), "-o", str(results / "r"))
    assert_one_line_error(proc, "config file not found", "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name_or_path: x\n eval: [")
    assert_one_line_error(cli("run", str(bad)), "YAML does not parse at line")
    cfg = write_config(tmp_path / "c.yaml", {"model": {"name_or_path": "x"}, "corpus": {"path": "y.txt"}, "eval": {"protocl": "gptq"}})
    assert_one_line_error(cli("run", str(cfg)), "eval.protocl: unknown key (did you mean 'eval.protocol'?)")
    assert_one_line_error(cli("run", str(cfg), "eval.protocol=wiki", "eval.protocl=null"), "eval.protocol")
    assert_nothing_written(results)


def test_cli_run_errors_from_files(tmp_path, results, tiny):
    folder, _, _ = tiny
    text = tmp_path / "latin1.txt"
    text.write_bytes("caf\u00e9 au lait ".encode("utf-8") * 3 + "na\u00efve".encode("latin-1"))
    cfg = write_config(tmp_path / "c.yaml", {"model": {"name_or_path": str(folder), "device": "cpu"}, "corpus": {"path": str(text)},
                                             "eval": {"max_length": 16, "stride": 8}})
    assert_one_line_error(cli("run", str(cfg), "-o", str(results / "r")), "not UTF-8", "byte offset 44")
    assert_one_line_error(cli("run", str(cfg), "model.name_or_path=/no/such/model", "-o", str(results / "r")), "model.name_or_path", "not found")
    assert_nothing_written(results)


def _run(cfg: dict, tiny, results: Path | None = None):
    folder, model, tok = tiny
    return run(validate(cfg), results / "r" if results else None, model=model, tokenizer=tok, progress=False)


def test_runtime_errors_name_the_problem(tmp_path, results, tiny, tiny_corpus):
    folder, model, tok = tiny
    base = tiny_config(folder, tiny_corpus)
    cases = [
        ({"eval": {**base["eval"], "max_length": 4096, "stride": 16}}, "eval.max_length: 4096 is larger than the model's 512 positions"),
        ({"corpus": {"path": str(tmp_path / "none.txt")}}, "corpus.path: file not found"),
        ({"corpus": {"path": str(tiny_corpus), "text_field": "body"}}, "corpus.text_field: field 'body' not found in row 0; available fields: text, domain"),
        ({"corpus": {"dataset": "nobody/nothing", "config": "x"}}, "not in the mirror"),
        ({"corpus": {"dataset": "Salesforce/wikitext", "config": "wikitext-2-raw-v1", "split": "dev"}}, "split 'dev' not found"),
        ({"corpus": {"dataset": "Salesforce/wikitext", "config": "wikitext-2-raw-v1", "text_field": "body"}}, "column 'body' not found; available columns: text"),
        ({"corpus": {"path": str(tiny_corpus), "max_tokens": 100}, "eval": {"protocol": "llamacpp", "max_length": 64}},
         "needs at least 2×ctx = 128 tokens"),
    ]
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cases.append(({"corpus": {"path": str(empty)}}, "corpus is empty"))
    tiny_text = tmp_path / "one.txt"
    tiny_text.write_text("a")
    cases.append(({"corpus": {"path": str(tiny_text)}, "eval": {"protocol": "gptq", "max_length": 32}}, "too short for one scored window"))
    for change, message in cases:
        with pytest.raises(HarnessError) as err:
            _run({**base, **change}, tiny, results)
        assert message in str(err.value), (change, str(err.value))
        assert "\n" not in str(err.value)
    assert_nothing_written(results)


def test_unwritable_results_folder(tmp_path, tiny, tiny_corpus):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    folder, _, _ = tiny
    with pytest.raises(HarnessError, match="output.dir: cannot write to"):
        _run(tiny_config(folder, tiny_corpus), tiny, blocker / "results")


def test_nan_log_probabilities_stop_the_run(tmp_path, tiny, tiny_corpus):
    folder, model, tok = tiny
    broken = type(model)(model.config)
    broken.load_state_dict(model.state_dict())
    with torch.no_grad():
        broken.model.layers[1].mlp.down_proj.weight.fill_(float("nan"))
    with pytest.raises(HarnessError, match=r"non-finite log-probability in window \d+ \(doc 0, input \[\d+, \d+\), scored \[\d+, \d+\)\)"):
        run(validate(tiny_config(folder, tiny_corpus)), tmp_path / "results" / "r", model=broken.eval(), tokenizer=tok, progress=False)
    assert_nothing_written(tmp_path / "results")


def test_pickled_weights_refused_unless_allowed(tmp_path, tiny):
    folder, model, tok = tiny
    pickled = tmp_path / "pickled"
    model.config.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")  # a pickle, as old checkpoints ship
    tok.save_pretrained(pickled)
    from harness.config import ModelConfig
    from harness.models import load_model

    with pytest.raises(HarnessError, match="allow_pickle"):
        load_model(ModelConfig(name_or_path=str(pickled), device="cpu"))
    loaded = load_model(ModelConfig(name_or_path=str(pickled), device="cpu", allow_pickle=True))
    assert loaded.config.vocab_size == model.config.vocab_size


def test_concurrent_runs_both_land_in_the_table(tmp_path, tiny, tiny_corpus):
    """Two processes finishing together: both records intact, both rows in the table."""
    folder, _, _ = tiny
    results = tmp_path / "results"
    cfg = write_config(tmp_path / "c.yaml", tiny_config(folder, tiny_corpus))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "harness", "run", str(cfg), "-o", str(results / f"run{i}"), "--no-progress"],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
    import pandas as pd

    table = pd.read_csv(results / "table.csv")
    assert sorted(table.run_id) == ["run0", "run1"]
    records = [json.loads((results / f"run{i}" / "result.json").read_text()) for i in range(2)]
    assert records[0]["sum_nll"] == pytest.approx(records[1]["sum_nll"], rel=1e-9)
    assert not list(results.glob("**/*.tmp"))


def test_every_command_has_flowing_help():
    """``ppl --help`` lists each command with its summary, and each command's own help reflows its
    docstring: typer's rich mode keeps a docstring's single line breaks, which showed as a
    paragraph broken mid-sentence in ``ppl compile --help``."""
    from typer.main import get_command

    from harness.cli import app

    commands = get_command(app).commands
    listing = cli("--help").stdout
    for name, command in commands.items():
        assert command.help and name in listing, name
        for paragraph in command.help.strip().split("\n\n"):
            assert "\n" not in paragraph.strip(), f"ppl {name}: a line break inside {paragraph!r}"
        page = cli(name, "--help")
        assert page.returncode == 0 and command.help.split("\n")[0].split()[0] in page.stdout, name
