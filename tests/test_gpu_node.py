"""The GPU node of benchmarks/gpu.sh has no datasets and no gguf: the harness runs without them.

The missing packages are simulated for a child process by a ``sitecustomize`` whose path finder
does not find ``datasets`` or ``gguf`` (as on a machine where they are not installed); the child
runs the CLI on a random-weight model (``model.random_init``) and the WikiText-2 mirror, and its
record must equal an in-process run that has both packages.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml

from harness.config import validate
from harness.runner import run

from .conftest import REPO, WIKITEXT

BLOCK = '''
import importlib.machinery

_find = importlib.machinery.PathFinder.find_spec.__func__
BLOCKED = ("datasets", "gguf")

def _find_spec(cls, name, path=None, target=None):
    if name.split(".")[0] in BLOCKED:
        return None
    return _find(cls, name, path, target)

importlib.machinery.PathFinder.find_spec = classmethod(_find_spec)
'''


def test_runs_without_datasets_and_gguf(tiny, tmp_path):
    folder, _, tok = tiny
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCK)
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{REPO}"}
    for blocked in ("datasets", "gguf"):
        probe = subprocess.run([sys.executable, "-c", f"import {blocked}"], capture_output=True, text=True, env=env, timeout=120)
        assert probe.returncode == 1 and "ModuleNotFoundError" in probe.stderr, probe.stderr

    shape = tmp_path / "tiny-llama.json"
    shape.write_text(json.dumps({
        "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 128, "vocab_size": len(tok),
    }))
    data = {
        "model": {"name_or_path": str(shape), "random_init": True, "seed": 5, "tokenizer": str(folder), "device": "cpu"},
        "corpus": {**WIKITEXT, "max_tokens": 1500, "cache": False},
        "eval": {"protocol": "gptq", "batch_size": 3, "bootstrap": 0},
    }
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(data))
    proc = subprocess.run([sys.executable, "-m", "harness", "run", str(cfg), "-o", str(tmp_path / "out"), "--no-progress"],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    child = json.loads((tmp_path / "out" / "result.json").read_text())
    assert child["versions"]["datasets"] is not None  # installed (the metadata is there), only not importable

    here = run(validate(data), write=False, progress=False).record
    assert child["corpus"]["text_sha256"] == here["corpus"]["text_sha256"]
    assert (child["scored_tokens"], child["windows"]) == (here["scored_tokens"], here["windows"]) == (11 * 127, 11)
    assert child["sum_nll"] == here["sum_nll"]
