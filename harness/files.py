"""Reading the files a user names: one place that turns every failure into one line.

Every config, model, tokenizer, corpus and resume-log file the harness reads is opened through
``reading``: a missing path, a folder where a file was expected, a file that cannot be read,
and a file that its parser rejects (truncated, corrupt, of the wrong kind) each end in one
``HarnessError`` naming the key, the file and what is wrong, so the CLI exits 2 with that line
and no traceback, before anything is written.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from .errors import HarnessError


def first_line(err: BaseException, limit: int | None = None) -> str:
    """An exception's message cut to its first line (its type's name when it has none)."""
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:limit]


def cache_root() -> Path:
    """Where the harness keeps what it makes for later runs: ``$PPL_CACHE_DIR``, else
    ``~/.cache/ppl-harness`` (token cache, compiled layers, inductor's cache)."""
    return Path(os.environ.get("PPL_CACHE_DIR") or Path.home() / ".cache" / "ppl-harness")


def _kind(err: BaseException) -> str:
    """The exception's type as a user can search for it (``struct.error``, not ``error``)."""
    name = type(err).__name__
    return f"{type(err).__module__}.{name}" if name == "error" else name


def existing_file(path: str | Path, key: str, what: str = "file", fix: str = "check the path") -> Path:
    """``path`` as a Path, if it names a readable regular file; else one line naming the problem."""
    if not str(path).strip():
        raise HarnessError(f"{key}: the path is empty; give a {what}")
    p = Path(path).expanduser()
    if p.is_dir():
        raise HarnessError(f"{key}: {p} is a folder, not a {what}; give the {what} itself")
    if not p.exists():
        if p.is_symlink():  # a link whose target is missing, or a loop of links
            raise HarnessError(f"{key}: {p} is a link that leads to no file (its target is missing, or links loop); "
                               f"give the {what} itself")
        raise HarnessError(f"{key}: {what} not found: {p} ({fix})")
    if not p.is_file():
        raise HarnessError(f"{key}: {p} is not a regular file; give a {what}")
    return p


@contextlib.contextmanager
def reading(path: str | Path, key: str, what: str, fix: str, problem: str | None = None):
    """Run a parser on ``path``; any failure it raises becomes one line: key, file, reason, fix.

    ``HarnessError`` passes through unchanged (it is already one line). ``what`` names the kind of
    file ("GGUF model file", "Parquet file"); ``fix`` says what the user can do; ``problem`` replaces
    "is not a valid <what>" where more is known (a parser that fails only on a file cut short).
    """
    try:
        yield Path(path)
    except HarnessError:
        raise
    except PermissionError:
        raise HarnessError(f"{key}: cannot read {path}: permission denied ({fix})") from None
    except IsADirectoryError:
        raise HarnessError(f"{key}: {path} is a folder, not a {what}; give the {what} itself") from None
    except UnicodeDecodeError as err:
        raise HarnessError(f"{key}: {path} is not UTF-8 text (byte offset {err.start}); {fix}") from None
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except Exception as err:  # noqa: BLE001 - a parser's own error types are many; each is a bad file here
        raise HarnessError(f"{key}: {path} {problem or 'is not a valid ' + what} ({_kind(err)}: {first_line(err)}); {fix}") from None


# ---------------------------------------------------------------------------------------------
# Checks of model files, cheap enough to run before transformers parses them

GGUF_MAGIC = b"GGUF"
GGUF_FIX = "check model.name_or_path and model.gguf_file; a download cut short must be fetched again"
GGUF_DAMAGED = "is a GGUF file cut short or damaged: it does not parse"


def gguf_file(path: str | Path, key: str = "model.gguf_file") -> Path:
    """``path`` if it is a GGUF file by its first bytes (magic and version); else one line.

    Reading the 24-byte header costs nothing; a file cut short further on is caught where
    transformers parses it (``models.load_*`` run that inside ``reading``)."""
    import struct

    p = existing_file(path, key, "GGUF model file", GGUF_FIX)
    with reading(p, key, "GGUF model file", GGUF_FIX):
        with open(p, "rb") as f:
            head = f.read(24)
    if not head:
        raise HarnessError(f"{key}: {p} is empty, not a GGUF model file ({GGUF_FIX})")
    if head[:4] != GGUF_MAGIC:
        raise HarnessError(f"{key}: {p} is not a GGUF model file (it does not start with the bytes 'GGUF'); {GGUF_FIX}")
    if len(head) < 24:
        raise HarnessError(f"{key}: {p} is truncated: {len(head)} bytes, shorter than a GGUF header ({GGUF_FIX})")
    (version,) = struct.unpack_from("<I", head, 4)
    if version not in (2, 3):
        raise HarnessError(f"{key}: {p} is GGUF version {version}; versions 2 and 3 can be read (convert the file again)")
    return p


def json_file(path: str | Path, key: str, what: str, fix: str) -> dict:
    """The JSON object in ``path``; a file that is not one (empty, cut short, a list) is one line."""
    import json

    p = existing_file(path, key, what, fix)
    with reading(p, key, what, fix):
        data = json.loads(p.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise HarnessError(f"{key}: {p} is not a valid {what} (a JSON {type(data).__name__}, not an object); {fix}")
    return data


def safetensors_file(path: str | Path, key: str, fix: str) -> Path:
    """``path`` if its safetensors header parses and covers the whole file (so it is not cut short)."""
    from safetensors import safe_open

    p = existing_file(path, key, "safetensors file", fix)
    with reading(p, key, "safetensors file", fix):
        with safe_open(str(p), framework="pt") as f:
            f.keys()
    return p


def writable_output(out: Path, flag: str = "-o", example: str = "report.html", suffix: str | None = None) -> None:
    """A file a command was told to write (``flag``, e.g. ``-o``) can be written: not a folder, in
    a writable folder (or one that can be made), not read-only, ending in ``suffix`` where one is
    required; else a one-line error naming ``flag``. Checked before anything is written."""
    out = Path(out)
    if out.is_dir():
        raise HarnessError(f"{flag} {out} is a folder; give a file name such as {out / example}")
    if suffix and out.suffix.lower() != suffix:
        raise HarnessError(f"{flag} {out}: the file is written as {suffix[1:].upper()}; give a name ending in {suffix}")
    writable_folder(out.parent, flag, out)
    if out.exists() and not os.access(out, os.W_OK):
        raise HarnessError(f"cannot write {out}: the file is read-only; choose another {flag}")


def writable_folder(folder: Path, flag: str = "-o", target: Path | None = None) -> None:
    """``folder`` is (or can be made) a folder this process may write in; else one line naming
    ``flag`` and the first existing path above it that is a file or is not writable."""
    folder = Path(folder)
    existing = next((p for p in [folder, *folder.parents] if p.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        what = "a file, not a folder" if existing is not None and not existing.is_dir() else "not a writable folder"
        raise HarnessError(f"cannot write {target or folder}: {existing or folder} is {what}; choose another {flag}")
    try:  # os.access says yes to root everywhere, /proc and /sys included: make (and remove) a folder there
        os.rmdir(tempfile.mkdtemp(prefix=".ppl-probe-", dir=existing))
    except OSError as err:
        raise HarnessError(f"cannot write {target or folder}: {existing} is not a writable folder "
                           f"({err.strerror or type(err).__name__}); choose another {flag}") from None
