"""model.device: the device asked for is the device used, or the run stops with one clear line.

The decision is one pure function (``distributed.resolve_device``) over what torch sees; it is
checked here over GPU machines described by their numbers, and the runner's real path (which
asks torch) is checked on this CPU-only machine: two runs in one process on their own devices,
and a CUDA device that is not there stopping the run through the CLI with exit code 2.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import yaml

from harness.config import validate
from harness.distributed import Distributor, resolve_device
from harness.errors import HarnessError
from harness.runner import run

from .conftest import REPO, tiny_config

# (requested, cuda_available, device_count, local_rank, world) -> device, or the error's start
CASES = [
    ("cpu", False, 0, 0, 1, "cpu"),
    ("cpu", True, 2, 0, 1, "cpu"),
    ("cpu", True, 2, 1, 2, "cpu"),
    ("auto", False, 0, 0, 1, "cpu"),
    ("auto", True, 1, 0, 1, "cuda:0"),
    ("auto", True, 2, 1, 2, "cuda:1"),
    ("cuda", True, 1, 0, 1, "cuda:0"),
    ("cuda", True, 8, 3, 8, "cuda:3"),  # under torchrun the local rank picks the GPU
    ("cuda:1", True, 2, 0, 1, "cuda:1"),  # not GPU 0
    ("cuda:0", True, 2, 0, 1, "cuda:0"),
    ("cuda", False, 0, 0, 1, "error: model.device: 'cuda' asked for but torch sees no CUDA device"),
    ("cuda:0", False, 0, 0, 1, "error: model.device: 'cuda:0' asked for but torch sees no CUDA device"),
    ("cuda", True, 0, 0, 1, "error: model.device: 'cuda' asked for but torch sees no CUDA device"),
    ("cuda:2", True, 2, 0, 1, "error: model.device: 'cuda:2' asked for but torch sees 2 CUDA device(s) (cuda:0 to cuda:1)"),
    ("cuda:1", True, 2, 0, 2, "error: model.device: 'cuda:1' would put every one of the 2 processes on one GPU"),
    ("cuda", True, 2, 2, 4, "error: model.device: local rank 2 has no GPU of its own (2 visible)"),
    ("mps", False, 0, 0, 1, "error: model.device: 'mps' asked for but torch sees no MPS device"),
]


@pytest.mark.parametrize("requested,cuda,count,local_rank,world,expected", CASES)
def test_resolve_device(requested, cuda, count, local_rank, world, expected):
    if expected.startswith("error: "):
        with pytest.raises(HarnessError) as err:
            resolve_device(requested, cuda, count, local_rank, world)
        assert str(err.value).startswith(expected.removeprefix("error: ")) and "\n" not in str(err.value)
    else:
        assert resolve_device(requested, cuda, count, local_rank, world) == expected


def test_mixed_sequence_each_on_its_own_device():
    """A sweep's entries on a 2-GPU machine, in one process: each decision reads only its config."""
    asked = ["cuda", "cpu", "cuda:1", "auto", "cpu", "cuda:0"]
    assert [resolve_device(a, True, 2) for a in asked] == ["cuda:0", "cpu", "cuda:1", "cuda:0", "cpu", "cuda:0"]


def test_runs_in_one_process_follow_their_config(tiny, tiny_corpus):
    """Through the runner (the model loaded by it): a run asking for a missing GPU stops with one
    line and leaves the process's later runs on their own devices; device peaks are null on CPU."""
    folder, _, tok = tiny
    assert not torch.cuda.is_available(), "this test is for a machine without CUDA"
    Distributor("auto")  # accelerate's singleton is set up first, as by an earlier entry of a sweep
    for device in ("auto", "cuda", "cpu", "cuda:1", "cpu"):
        data = tiny_config(folder, tiny_corpus, batch_size=2)
        data["model"]["device"] = device
        if device.startswith("cuda"):
            with pytest.raises(HarnessError, match=rf"^model.device: '{device}' asked for but torch sees no CUDA device"):
                run(validate(data), tokenizer=tok, write=False, progress=False)
            continue
        res = run(validate(data), tokenizer=tok, write=False, progress=False)
        assert res["device"] == "cpu" and res["peak_device_memory_bytes"] is None
        assert Distributor(device).device == "cpu"


def test_cli_cuda_without_cuda_is_one_line_exit_2(tiny, tiny_corpus, tmp_path):
    folder, _, _ = tiny
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(folder, tiny_corpus)))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for device in ("cuda", "cuda:1"):
        proc = subprocess.run([sys.executable, "-m", "harness", "run", str(cfg), f"model.device={device}", "-o", str(tmp_path / "r"),
                               "--no-progress"], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("error:")]
        assert lines == [f"error: model.device: '{device}' asked for but torch sees no CUDA device (a CPU build of torch, "
                         "or no GPU); use model.device=cpu, or install a CUDA build of torch (make setup)"], proc.stderr
    assert not (tmp_path / "r").exists()


def test_baseline_model_device_is_honoured(tiny, tiny_corpus):
    folder, model, tok = tiny
    data = tiny_config(folder, tiny_corpus, batch_size=2)
    data["baseline_model"] = {"name_or_path": str(folder), "device": "cuda:0"}
    with pytest.raises(HarnessError, match=r"^baseline_model.device: 'cuda:0' asked for but torch sees no CUDA device"):
        run(validate(data), model=model, tokenizer=tok, write=False, progress=False)
