"""Building the harness's C++ kernels (``kernels/*.cpp``): bf16 ops for x86 CPUs with AVX-512 BF16.

Each source is its own torch extension, built on first use into the harness's cache with torch's
extension builder (a few seconds; a C++ compiler and ninja needed), keyed by a digest of its
source, the flags and torch's version, and loaded as ops of the ``ppl_harness`` namespace:
``causal_attention`` (``causal_kernel.py``), ``silu_mul`` (``activation.py``), ``rms_norm`` and
``add_rms_norm`` (``norm.py``), each library once per process. Those modules
decide where their op is taken; this one only builds and loads.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import torch

KERNELS = Path(__file__).resolve().parent / "kernels"
# what the kernels are compiled for: the AVX-512 subsets they use (a CPU with AVX-512 BF16 has them all)
CFLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma", "-fopenmp"]


def cpu_ok() -> bool:
    """Linux on a CPU with AVX-512 BF16: where the kernels were measured and run."""
    from .precision import cpu_bf16_flags

    return sys.platform.startswith("linux") and "avx512_bf16" in cpu_bf16_flags()


def fingerprint(source: Path) -> str:
    """A kernel's source and build, as a short digest (keys its build and the compiled packages)."""
    text = Path(source).read_bytes() + " ".join([*CFLAGS, torch.__version__]).encode()
    return hashlib.sha256(text).hexdigest()[:16]


# stem -> digest of the build loaded into this process. A library is loaded once: a second copy
# (the same kernel built into another cache folder, after PPL_CACHE_DIR changed) would register
# its ops again as it loads, and torch aborts the process for that.
_LOADED: dict[str, str] = {}


def build(source: Path, stem: str) -> None:
    """Build (or find built) and load the extension of ``source``, once per process; raises where
    it does not build, or where another build of ``stem`` is already loaded."""
    from torch.utils.cpp_extension import load

    from .files import cache_root

    digest = fingerprint(source)
    if _LOADED.get(stem) == digest:
        return
    if stem in _LOADED:
        raise RuntimeError(f"another build of the {stem} kernel is loaded in this process; start a new one to load {source}")
    bindir = os.path.dirname(sys.executable)  # the venv's bin, where pip's ninja lives
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    directory = cache_root() / "kernels" / f"{stem}-{digest}"
    directory.mkdir(parents=True, exist_ok=True)
    load(name=f"ppl_{stem}_{digest}", sources=[str(source)], build_directory=str(directory),
         extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
    _LOADED[stem] = digest


def switched_off(variable: str) -> bool:
    """The user switched a kernel off (``PPL_..._KERNEL=off``, ``0``, ``false`` or ``no``)."""
    return os.environ.get(variable, "").lower() in ("0", "off", "false", "no")


def try_build(source: Path, stem: str, what: str, instead: str) -> bool:
    """``build``, True where it worked; where it did not (no compiler, no ninja, a failed build),
    one warning line that names ``what`` did not build and that ``instead`` runs, and False."""
    try:
        build(source, stem)
    except Exception as err:  # noqa: BLE001 - the kernel is an optimisation: the caller falls back
        import warnings

        from .errors import HarnessWarning
        from .files import cache_root, first_line

        warnings.warn(f"{what} did not build ({first_line(err)}); using {instead} (build log: {cache_root() / 'kernels'})",
                      HarnessWarning, stacklevel=3)
        return False
    return True
