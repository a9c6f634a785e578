"""Data parallel: ``torchrun --nproc_per_node 2 -m harness run`` on CPU (gloo) equals one process.

Each test launches real worker processes through torchrun (``--standalone`` picks a free port)
and compares the record rank 0 wrote with an in-process single-process run of the same config.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from harness.config import validate
from harness.runner import run

from .conftest import REPO, SMOLLM2, WIKITEXT, tiny_config
from .threads import one_thread  # noqa: F401 (a fixture)


def torchrun(config: dict, out, tmp_path, *overrides: str, nproc: int = 2, timeout: int = 600) -> dict:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "harness", "run", str(path), "-o", str(out), "--no-progress", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


def assert_same_record(multi: dict, single: dict, same_config: bool = True) -> None:
    for key in ("scored_tokens", "windows", "bytes", "words"):
        assert multi[key] == single[key], key
    assert math.isclose(multi["sum_nll"], single["sum_nll"], rel_tol=1e-6)
    assert math.isclose(multi["perplexity"], single["perplexity"], rel_tol=1e-6)
    assert (multi["config_hash"] == single["config_hash"]) == same_config


@pytest.mark.parametrize(
    "batch_size,mode,max_tokens,overrides",
    [(1, "concat", 1020, []), (3, "concat", 1020, []), (4, "documents", None, ["corpus.streaming=true"])],
    ids=["batch1", "batch3", "batch4-documents-streamed"],
)
def test_two_processes_equal_one(tiny, tiny_corpus, tmp_path, batch_size, mode, max_tokens, overrides, one_thread):
    """The streamed case also shards the tokenizing of documents by rank."""
    folder, model, tok = tiny
    config = tiny_config(folder, tiny_corpus, max_length=32, stride=16, batch_size=batch_size)
    config["corpus"].update(max_tokens=max_tokens, mode=mode, cache=False)
    single = run(validate(config), model=model, tokenizer=tok, write=False, progress=False)
    assert single["windows"] % 2 == 1, "the test wants work that does not split evenly over 2 ranks"

    out = tmp_path / "results" / "dp"
    multi = torchrun(config, out, tmp_path, *overrides)
    assert multi["corpus"]["documents"] == single["corpus"]["documents"]
    assert multi["corpus"]["text_sha256"] == single["corpus"]["text_sha256"]
    assert multi["world_size"] == 2 and multi["batch_size"] == batch_size
    assert_same_record(multi, single.record)
    # every window once (the padding was dropped), with the same sums as one process
    windows = pd.read_parquet(out / "windows.parquet")
    assert list(windows["index"]) == list(range(single["windows"]))
    assert (windows.tokens.values == single.windows.tokens.values).all()
    assert windows.sum_nll.values == pytest.approx(single.windows.sum_nll.values, rel=1e-5)
    # only rank 0 wrote: one record, one table row, no resume log left behind
    assert sorted(p.name for p in out.iterdir()) == ["positions.parquet", "result.json", "windows.parquet"]
    assert len(pd.read_csv(out.parent / "table.csv")) == 1


@pytest.mark.slow
def test_two_processes_equal_one_smollm2(smollm2, tmp_path, one_thread):
    """SmolLM2 on a short WikiText slice; the launched run also takes batch_size auto,
    device_map auto and a streamed corpus, against one process at batch 1 without them."""
    model, tok = smollm2
    config = {
        "model": dict(SMOLLM2),
        "corpus": {**WIKITEXT, "max_tokens": 600, "cache": False},
        "eval": {"protocol": "sliding", "max_length": 128, "stride": 64, "bootstrap": 0, "batch_size": 1},
    }
    single = run(validate(config), model=model, tokenizer=tok, write=False, progress=False)
    assert single["windows"] % 2 == 1
    multi = torchrun(config, tmp_path / "out", tmp_path, "eval.batch_size=auto", "eval.max_batch_size=3", "model.device_map=auto", "corpus.streaming=true")
    assert multi["world_size"] == 2 and multi["batch_size"] == 3  # auto: the CPU cap, no out-of-memory
    assert_same_record(multi, single.record, same_config=False)  # model.device_map is in the config hash
