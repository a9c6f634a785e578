"""The set-up check: does torch see the GPU that nvidia-smi lists? (harness/device_check.py)"""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from harness.device_check import describe, listed_gpus, needs_cuda_build, reinstall_commands

from .conftest import REPO

SMI_ONE = "GPU 0: NVIDIA H200 (UUID: GPU-2b7f4c1e-0a9d-4e55-9d1c-3f0e6c7a8b91)\n"
SMI_TWO = SMI_ONE + "GPU 1: NVIDIA H200 (UUID: GPU-5d1a0c2b-77e3-4f1a-a0b2-6c9d8e7f1a23)\n"
CPU_BUILD = {"version": "2.13.0+cpu", "cuda": None, "available": False, "names": []}
CUDA_BUILD = {"version": "2.13.0+cu128", "cuda": "12.8", "available": True, "names": ["NVIDIA H200"]}


def test_listed_gpus():
    assert listed_gpus(SMI_TWO) == ["NVIDIA H200", "NVIDIA H200"]
    assert listed_gpus(None) == [] and listed_gpus("") == []
    assert listed_gpus("No devices were found\n") == []
    assert listed_gpus("GPU 0: Tesla T4\n") == ["Tesla T4"]


def test_decision():
    assert needs_cuda_build(SMI_ONE, CPU_BUILD)  # the index served the CPU build on a GPU machine
    assert not needs_cuda_build(SMI_ONE, CUDA_BUILD)
    assert not needs_cuda_build(None, CPU_BUILD)  # no nvidia-smi: a CPU machine
    assert not needs_cuda_build("No devices were found\n", CPU_BUILD)
    # a CUDA build that still sees no GPU (driver too old for its CUDA): reinstall from the index
    assert needs_cuda_build(SMI_ONE, {**CUDA_BUILD, "available": False, "names": []})


def test_describe():
    assert describe(CPU_BUILD) == "torch 2.13.0+cpu, CPU build"
    assert describe(CPU_BUILD, SMI_ONE) == "torch 2.13.0+cpu, CPU build (1 GPU listed by nvidia-smi, not used)"
    assert describe(CUDA_BUILD) == "torch 2.13.0+cu128, CUDA 12.8, 1 GPU: NVIDIA H200"
    assert describe({**CUDA_BUILD, "names": ["NVIDIA H200"] * 2}) == "torch 2.13.0+cu128, CUDA 12.8, 2 GPUs: NVIDIA H200"
    assert describe({**CUDA_BUILD, "available": False, "names": []}) == "torch 2.13.0+cu128, CUDA 12.8, no GPU visible to torch"


def test_reinstall_commands():
    assert reinstall_commands("/v/bin/python", "2.13.0", "https://download.pytorch.org/whl/cu128") == [
        ["/v/bin/python", "-m", "pip", "uninstall", "-q", "-y", "torch"],
        ["/v/bin/python", "-m", "pip", "install", "-q", "torch==2.13.0", "--index-url", "https://download.pytorch.org/whl/cu128"],
    ]


def test_this_machine_says_cpu_build():
    """The real check on this machine (no nvidia-smi, the CPU build): one line, nothing installed."""
    assert not torch.cuda.is_available()
    for extra in ([], ["--check-only"]):
        proc = subprocess.run([sys.executable, "-m", "harness.device_check", *extra], capture_output=True, text=True, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines() == [f"torch {torch.__version__}, CPU build"]
