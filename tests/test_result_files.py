"""The views (``table``, ``compare``, ``positions``, ``show``, ``report``) read records and frames
back from disk: a damaged, foreign or hand-edited file ends in one line naming the file and what
is wrong (exit 2, no traceback, nothing half-written), and an output that cannot be written is
refused before the first file is written. Records come from real runs of the tiny fixture model;
each case damages a copy.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from harness.config import validate
from harness.runner import run

from .conftest import tiny_config
from .test_files import check_error, files_under, run_main, run_subprocess


@pytest.fixture(scope="module")
def records(tiny, tiny_corpus, tmp_path_factory) -> Path:
    """A results folder with two comparable runs of the tiny model (batches of 4 and 1)."""
    folder, model, tok = tiny
    root = tmp_path_factory.mktemp("records")
    for name, batch in (("a", 4), ("b", 1)):
        cfg = validate({**tiny_config(folder, tiny_corpus, batch_size=batch, bootstrap=20), "name": name})
        run(cfg, root / name, model=model, tokenizer=tok, progress=False)
    return root


@pytest.fixture
def copy(records, tmp_path) -> Path:
    out = tmp_path / "res"
    shutil.copytree(records, out)
    return out


def _edit_record(path: Path, edit) -> None:
    record = json.loads(path.read_text())
    edit(record)
    path.write_text(json.dumps(record))


RECORD_DAMAGE = {
    "a JSON list": (lambda p: p.write_text("[1, 2]"), "is not a valid result record (a JSON list, not an object)"),
    "not UTF-8": (lambda p: p.write_bytes(b'{"name": "\xff\xfe"}'), "is not UTF-8 text"),
    "cut short": (lambda p: p.write_text(p.read_text()[:200]), "is not a valid result record (JSONDecodeError"),
    "no fields": (lambda p: p.write_text("{}"), "is not a result record of this harness (run_id: field required)"),
    "config a string": (lambda p: _edit_record(p, lambda r: r.update(config="abc")), "(config: input should be"),
    "perplexity a string": (lambda p: _edit_record(p, lambda r: r.update(perplexity="29.5")), "(perplexity: input should be"),
    "ci95 of one": (lambda p: _edit_record(p, lambda r: r.update(ci95=[1.0])), "(ci95: list should have at least 2 items"),
    "ci95 infinite": (lambda p: _edit_record(p, lambda r: r["ci95"].__setitem__(1, float("inf"))), "(ci95.1: input should be a finite number"),
    "protocol a string": (lambda p: _edit_record(p, lambda r: r.update(protocol="sliding")), "(protocol: input should be"),
}


@pytest.mark.parametrize("damage", list(RECORD_DAMAGE))
def test_a_damaged_record_is_one_line(copy, damage, capsys, monkeypatch):
    hurt, needle = RECORD_DAMAGE[damage]
    hurt(copy / "b" / "result.json")
    for args in (["compare", str(copy / "a"), str(copy / "b"), "-o", str(copy / "out")],
                 ["report", str(copy / "b"), "-o", str(copy / "out" / "r.html")],
                 ["positions", str(copy / "b"), "-o", str(copy / "out" / "p.png")]):
        code, err = run_main(args, capsys, monkeypatch)
        check_error(code, err, str(copy / "b" / "result.json"), needle)
    assert not (copy / "out").exists()


def _dangling(path: Path) -> None:
    path.unlink()
    path.symlink_to("/nonexistent/result.json")


def _folder(path: Path) -> None:
    path.unlink()
    path.mkdir()


@pytest.mark.parametrize("hurt, needle", [
    (lambda p: p.write_text("[1, 2]"), "is not a valid result record (a JSON list, not an object)"),
    (_dangling, "is a link that leads to no file (its target is missing, or links loop)"),
    (_folder, "is a folder, not a result record"),
])
def test_table_skips_a_damaged_record_with_a_warning(copy, hurt, needle):
    """The table over many runs is still written (it is rebuilt after every run); the damaged
    record is left out with one warning line naming it."""
    hurt(copy / "b" / "result.json")
    code, err = run_subprocess(["table", str(copy)])  # a process of its own: pytest would catch the warning
    assert code == 0, err
    warned = [line for line in err.splitlines() if line.startswith("warning: skipped")]
    assert len(warned) == 1 and "Traceback" not in err, err
    assert f"{copy / 'b' / 'result.json'} " in warned[0] and needle in warned[0], warned
    assert list(pd.read_csv(copy / "table.csv").name) == ["a"]


FRAME_DAMAGE = {
    "cut short": ("windows.parquet", lambda p: p.write_bytes(p.read_bytes()[:300]), "is not a valid Parquet file"),
    "empty file": ("windows.parquet", lambda p: p.write_bytes(b""), "is not a valid Parquet file"),
    "a column missing": ("windows.parquet", lambda p: pd.read_parquet(p).drop(columns=["sum_nll"]).to_parquet(p), "has no column 'sum_nll'"),
    "text for numbers": ("windows.parquet", lambda p: pd.read_parquet(p).astype({"doc": str}).to_parquet(p), "column 'doc' holds"),
    "NaN sums": ("windows.parquet", lambda p: pd.read_parquet(p).assign(sum_nll=float("nan")).to_parquet(p), "not a finite number"),
    "no rows": ("positions.parquet", lambda p: pd.read_parquet(p).iloc[:0].to_parquet(p), "has no rows"),
    "counts as text": ("positions.parquet", lambda p: pd.read_parquet(p).astype({"count": str}).to_parquet(p), "column 'count' holds"),
}


@pytest.mark.parametrize("damage", list(FRAME_DAMAGE))
def test_a_damaged_frame_is_one_line(copy, damage, capsys, monkeypatch):
    name, hurt, needle = FRAME_DAMAGE[damage]
    hurt(copy / "b" / name)
    command = ["compare", str(copy / "a"), str(copy / "b"), "-o", str(copy / "out")] if name == "windows.parquet" else \
        ["positions", str(copy / "a"), str(copy / "b"), "-o", str(copy / "out" / "p.png")]
    for args in (command, ["report", str(copy), "-o", str(copy / "out" / "r.html")]):
        code, err = run_main(args, capsys, monkeypatch)
        check_error(code, err, str(copy / "b" / name), needle)
    assert not (copy / "out").exists()


def test_outputs_that_cannot_be_written_are_refused_first(copy, capsys, monkeypatch):
    a, b = str(copy / "a"), str(copy / "b")
    (copy / "file").write_text("x")
    (copy / "out" / "compare.md").mkdir(parents=True)
    cases = [
        (["compare", a, b, "-o", str(copy / "file")], "is a file, not a folder"),
        (["compare", a, b, "-o", str(copy / "file" / "sub")], "is a file, not a folder"),
        (["compare", a, b, "--plot", "-o", str(copy / "out")], "compare.md: a folder is in its place"),
        (["positions", a, "-o", str(copy / "out" / "p.xyz")], "give a name ending in .png"),
        (["positions", a, "-o", str(copy / "out")], "is a folder; give a file name such as"),
        (["report", a, "-o", str(copy / "out" / "r.html"), "--screenshot", str(copy / "out")], "--screenshot"),
    ]
    for args, needle in cases:
        code, err = run_main(args, capsys, monkeypatch)
        check_error(code, err, needle)
    assert [p.name for p in (copy / "out").iterdir()] == ["compare.md"]  # nothing else written
    (copy / "table.csv").unlink()  # the runs wrote the table; a folder takes table.md's place
    (copy / "table.md").unlink()
    (copy / "table.md").mkdir()
    code, err = run_main(["table", str(copy)], capsys, monkeypatch)
    check_error(code, err, "table.md: a folder is in its place")
    assert not (copy / "table.csv").exists()


@pytest.mark.parametrize("args, needle", [
    (["table", "--bogus"], "No such option: --bogus (see `"),
    (["show", "x", "--worst", "0"], "Invalid value for '--worst'"),
    (["compare", "x", "--samples", "0"], "Invalid value for '--samples'"),
    (["compare", "x", "--samples", "abc"], "Invalid value for '--samples'"),
    (["positions", "x", "--bins", "-1"], "Invalid value for '--bins'"),
    (["run"], "Missing argument"),
    (["nosuch"], "No such command 'nosuch'"),
])
def test_a_command_line_that_does_not_parse_is_one_line(args, needle, capsys, monkeypatch):
    code, err = run_main(args, capsys, monkeypatch)
    check_error(code, err, needle, "--help`)")


def test_show_of_a_file_that_is_not_a_record(copy, capsys, monkeypatch):
    code, err = run_main(["show", str(copy / "a" / "windows.parquet")], capsys, monkeypatch)
    check_error(code, err, "is not a run folder or its result.json")
    _edit_record(copy / "a" / "result.json", lambda r: r.pop("corpus"))
    code, err = run_main(["show", str(copy / "a")], capsys, monkeypatch)
    check_error(code, err, "has no corpus.text_sha256 to check the text against")
    assert files_under(copy / "out") == []


@pytest.mark.parametrize("args", [["run", "configs/smollm2-wikitext2.yaml", "--output-dir", ""],
                                  ["run", "configs/smollm2-wikitext2.yaml", "--output-dir="], ["compare", "x", "-o", ""]])
def test_an_empty_option_value_is_refused_not_taken_as_here(args, capsys, monkeypatch, tmp_path):
    """``-o ""`` (an unset shell variable) would otherwise mean the current folder."""
    monkeypatch.chdir(tmp_path)
    code, err = run_main(args, capsys, monkeypatch)
    check_error(code, err, "is given an empty value")
    assert files_under(tmp_path) == []


def test_kl_details_of_records_without_kl_and_a_damaged_sweep_table(copy, capsys, monkeypatch):
    code, err = run_main(["compare", str(copy / "a"), str(copy / "b"), "--kl", "-o", str(copy / "out")], capsys, monkeypatch)
    check_error(code, err, "--kl: none of these records has KL statistics")
    sweep = copy / "sweep-x"
    sweep.mkdir()
    (sweep / "sweep.csv").write_text("eval.stride,run_id,perplexity\n64,a,abc\n128,b,def\n")
    code, err = run_main(["report", str(copy), "-o", str(copy / "out" / "r.html")], capsys, monkeypatch)
    check_error(code, err, str(sweep / "sweep.csv"), "column 'perplexity' holds text where numbers belong")
    assert not (copy / "out").exists()
