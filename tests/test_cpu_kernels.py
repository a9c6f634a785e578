"""Building and loading the harness's C++ kernels (``cpu_kernels``), on every CPU.

A kernel's library is loaded once per process. Loading a second copy (the same source built into
another cache folder after ``PPL_CACHE_DIR`` changed) registers its ops again, and torch aborts
the whole process for that: CI's suite died that way when one test loaded the RMSNorm kernel from
its own cache folder and a later one from the session's. The check runs in a child process, so a
regression fails this test instead of killing the suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

from harness import cpu_kernels, precision
from harness.errors import HarnessWarning

NATIVE = "avx512_bf16" in precision.cpu_bf16_flags()

CHILD = r"""
import json, os, sys
import torch
from harness import activation, causal_kernel, cpu_kernels, norm

mods = [causal_kernel, activation, norm]
first = [m.available() for m in mods]
os.environ["PPL_CACHE_DIR"] = sys.argv[1]  # another cache folder: the kernels are not built there
for m in mods:
    m.available.cache_clear()
second = [m.available() for m in mods]
ran = False
if all(second):  # the ops still run after the second ask
    x = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(0)).bfloat16()
    torch.ops.ppl_harness.rms_norm(x, torch.ones(64).bfloat16(), 1e-5)
    torch.ops.ppl_harness.silu_mul(x, x)
    q = x.view(1, 2, 8, 64)
    torch.ops.ppl_harness.causal_attention(q, q, q, 0.125)
    ran = True
print(json.dumps({"first": first, "second": second, "ran": ran, "loaded": sorted(cpu_kernels._LOADED)}))
"""


def test_each_kernel_is_loaded_once_per_process(tmp_path):
    """Asking for every kernel again under another cache folder loads nothing again (no abort),
    builds nothing there, and leaves the ops running."""
    other = tmp_path / "other-cache"
    done = subprocess.run([sys.executable, "-c", CHILD, str(other)], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONFAULTHANDLER": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["first"] == got["second"] == [NATIVE] * 3
    assert got["ran"] == NATIVE
    assert got["loaded"] == (sorted(["causal", "silu_mul", "rms_norm"]) if NATIVE else [])
    assert not (other / "kernels").exists()


def _try_build_warnings(source, stem: str, what: str) -> list[str]:
    """``try_build`` of ``source`` (which must not succeed): the warnings that name ``what``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not cpu_kernels.try_build(source, stem, what, "the fallback")
    return [str(w.message) for w in caught if what in str(w.message) and w.category is HarnessWarning]  # the CLI's one-line kind


def test_a_source_that_does_not_build_warns_in_one_line(tmp_path, monkeypatch):
    """A failed build (here: a source that is not C++) is one warning line naming what did not
    build, what runs instead and where the build log is; nothing is loaded."""
    monkeypatch.setenv("PPL_CACHE_DIR", str(tmp_path / "cache"))
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    said = _try_build_warnings(broken, "broken_test", "test: the broken kernel")
    assert len(said) == 1 and "\n" not in said[0], said
    assert "did not build" in said[0] and "using the fallback" in said[0] and str(tmp_path / "cache" / "kernels") in said[0]
    assert "broken_test" not in cpu_kernels._LOADED


def test_another_build_of_a_loaded_kernel_is_refused(tmp_path, monkeypatch):
    """Where a kernel of that name is loaded already, a build of another source under the name is
    refused (an error, which ``try_build`` turns into its warning) before anything is built."""
    monkeypatch.setitem(cpu_kernels._LOADED, "refused_test", "0" * 16)
    monkeypatch.setenv("PPL_CACHE_DIR", str(tmp_path / "cache"))
    source = tmp_path / "other.cpp"
    source.write_text("// another source\n")
    said = _try_build_warnings(source, "refused_test", "test: the refused kernel")
    assert len(said) == 1 and "another build of the refused_test kernel is loaded" in said[0], said
    assert not (tmp_path / "cache" / "kernels").exists()
