"""A PNG of a rendered page (``ppl report --screenshot``), taken by headless Chromium."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from .errors import HarnessError
from .files import writable_output

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--hide-scrollbars",
]


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        raise HarnessError("chromium not found: `make chromium` installs it (Debian: apt-get install chromium)")
    return found


def screenshot(page: Path, png: Path, width: int = 1400, height: int = 2000, timeout: float = 120) -> Path:
    """A PNG of the top ``height`` pixels of ``page`` rendered by headless Chromium, written atomically."""
    png = Path(png)
    writable_output(png, "--screenshot", "report.png", suffix=".png")
    png.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{png.name}.", suffix=".png", dir=png.parent)
    os.close(fd)
    profile = tempfile.mkdtemp(prefix="ppl-chromium-")
    try:
        cmd = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
               f"--screenshot={tmp}", Path(page).resolve().as_uri()]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0 or os.path.getsize(tmp) == 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise HarnessError(f"chromium could not take the screenshot (exit {done.returncode}): {last}")
        os.replace(tmp, png)
    except subprocess.TimeoutExpired:
        raise HarnessError(f"chromium took longer than {timeout:.0f} s for the screenshot; try again") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        shutil.rmtree(profile, ignore_errors=True)
    return png
