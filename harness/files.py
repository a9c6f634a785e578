"""Reading the files a user names: one place that turns every failure into one line.

Every config, model, tokenizer, corpus and resume-log file the harness reads is opened through
``reading``: a missing path, a folder where a file was expected, a file that cannot be read,
and a file that its parser rejects (truncated, corrupt, of the wrong kind) each end in one
``HarnessError`` naming the key, the file and what is wrong, so the CLI exits 2 with that line
and no traceback, before anything is written.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from .errors import HarnessError


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def existing_file(path: str | Path, key: str, what: str = "file", fix: str = "check the path") -> Path:
    """``path`` as a Path, if it names a readable regular file; else one line naming the problem."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise HarnessError(f"{key}: {p} is a folder, not a {what}; give the {what} itself")
    if not p.exists():
        raise HarnessError(f"{key}: {what} not found: {p} ({fix})")
    if not p.is_file():
        raise HarnessError(f"{key}: {p} is not a regular file; give a {what}")
    return p


@contextlib.contextmanager
def reading(path: str | Path, key: str, what: str, fix: str):
    """Run a parser on ``path``; any failure it raises becomes one line: key, file, reason, fix.

    ``HarnessError`` passes through unchanged (it is already one line). ``what`` names the kind of
    file ("GGUF model file", "Parquet file"); ``fix`` says what the user can do.
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
        raise HarnessError(f"{key}: {path} is not a valid {what} ({type(err).__name__}: {_first_line(err)}); {fix}") from None
