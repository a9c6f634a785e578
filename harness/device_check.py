"""After set-up: does torch see this machine's GPU? If not, install torch's CUDA build.

``python -m harness.device_check [--torch-version V] [--index-url URL]`` (``make setup`` runs it):
when ``nvidia-smi -L`` lists a GPU and the installed torch cannot use CUDA (the package index
served the CPU build), it reinstalls ``torch==V`` from the CUDA wheel index ``URL`` and checks
again. It ends with one line naming the build in use, e.g. ``torch 2.13.0+cpu, CPU build`` or
``torch 2.13.0+cu128, CUDA 12.8, 1 GPU: NVIDIA H200``; exit 1 when a GPU is listed and torch still
cannot use it. torch is examined in a child process, so the check sees the reinstalled build.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from collections import Counter

DEFAULT_INDEX = "https://download.pytorch.org/whl/cu128"

_PROBE = (
    "import json, torch; ok = torch.cuda.is_available(); "
    "print(json.dumps({'version': torch.__version__, 'cuda': torch.version.cuda, 'available': ok, "
    "'names': [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if ok else []}))"
)


def listed_gpus(smi_output: str | None) -> list[str]:
    """GPU names from ``nvidia-smi -L`` output (``GPU 0: NVIDIA H200 (UUID: ...)``); none if absent."""
    names = []
    for line in (smi_output or "").splitlines():
        m = re.match(r"\s*GPU \d+:\s*(.*?)\s*(\(UUID:.*)?$", line)
        if m:
            names.append(m.group(1))
    return names


def needs_cuda_build(smi_output: str | None, torch_build: dict) -> bool:
    """A GPU is listed and the installed torch cannot use it."""
    return bool(listed_gpus(smi_output)) and not torch_build.get("available")


def describe(torch_build: dict, smi_output: str | None = None) -> str:
    """One line naming the torch build and the GPUs it uses (``torch_build`` as the probe prints it)."""
    head = f"torch {torch_build['version']}"
    if not torch_build.get("cuda"):
        listed = listed_gpus(smi_output)
        return f"{head}, CPU build" + (f" ({len(listed)} GPU listed by nvidia-smi, not used)" if listed else "")
    cuda = f"{head}, CUDA {torch_build['cuda']}"
    names = torch_build.get("names") or []
    if not torch_build.get("available") or not names:
        return f"{cuda}, no GPU visible to torch"
    counts = Counter(names)
    gpus = names[0] if len(counts) == 1 else ", ".join(f"{n}x {name}" for name, n in counts.items())
    return f"{cuda}, {len(names)} GPU{'s' if len(names) > 1 else ''}: {gpus}"


def reinstall_commands(python: str, version: str, index_url: str) -> list[list[str]]:
    """pip commands that replace the installed torch with ``torch==version`` from ``index_url``."""
    return [
        [python, "-m", "pip", "uninstall", "-q", "-y", "torch"],
        [python, "-m", "pip", "install", "-q", f"torch=={version}", "--index-url", index_url],
    ]


def nvidia_smi() -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def probe_torch(python: str = sys.executable) -> dict:
    out = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise SystemExit(f"error: torch does not import in {python}: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m harness.device_check", description=__doc__.splitlines()[0])
    ap.add_argument("--torch-version", default=None, help="torch version to install from the CUDA index (default: the installed one, local tag dropped)")
    ap.add_argument("--index-url", default=DEFAULT_INDEX, help=f"CUDA wheel index (default {DEFAULT_INDEX})")
    ap.add_argument("--check-only", action="store_true", help="report, never reinstall (a machine without a package index)")
    args = ap.parse_args(argv)
    smi = nvidia_smi()
    build = probe_torch()
    if needs_cuda_build(smi, build) and not args.check_only:
        version = args.torch_version or build["version"].split("+")[0]
        print(f"{describe(build, smi)}; nvidia-smi lists {', '.join(listed_gpus(smi))}: "
              f"installing torch=={version} from {args.index_url}", flush=True)
        for cmd in reinstall_commands(sys.executable, version, args.index_url):
            if subprocess.run(cmd).returncode != 0:
                print(f"error: '{' '.join(cmd)}' failed; set TORCH_INDEX_URL / TORCH_VERSION to a CUDA build for this machine",
                      file=sys.stderr)
                return 1
        build = probe_torch()
    print(describe(build, smi))
    if needs_cuda_build(smi, build):
        print("error: nvidia-smi lists a GPU but torch cannot use it; check the driver and TORCH_INDEX_URL "
              "(a CUDA version the driver supports)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
