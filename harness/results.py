"""Result records and the tables rendered from them.

A run writes ``<dir>/result.json`` (self-describing: metrics, resolved config, config hash,
protocol settings, versions) and ``<dir>/windows.parquet`` (one row per window: spans, sums,
counts). Tables are views rendered from the records on disk, never from live state: ``table``
reads every ``*/result.json`` under a results folder into one pandas DataFrame, one row per run,
with the protocol settings as columns. Every file is written atomically (temporary file, then
rename), and the table is rebuilt under a file lock, so concurrent runs never corrupt it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

import numpy as np
import pandas as pd
import pydantic

from . import files
from .errors import HarnessError, HarnessWarning

RECORD = "result.json"
WINDOWS = "windows.parquet"
TABLE_COLUMNS = [
    "run_id", "name", "model", "gguf_file", "dtype", "corpus", "protocol", "max_length", "stride", "bos",
    "mode", "detokenizer", "batch_size", "world_size", "scored_tokens", "windows", "perplexity", "ci95_low",
    "ci95_high", "bits_per_byte", "byte_perplexity", "word_perplexity", "macro_perplexity", "tokens_per_second", "wall_seconds",
    "peak_memory_mb", "tokenizer", "config_hash", "created",
]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


def _finite(o):
    """JSON has no NaN: write None for non-finite floats."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def write_record(run_dir: Path, record: dict) -> Path:
    path = run_dir / RECORD
    atomic_write_text(path, json.dumps(_finite(record), indent=2, default=_json_default, allow_nan=False) + "\n")
    return path


def write_frame(path: Path, frame: pd.DataFrame) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------------------------
# Reading records and their frames back: a damaged or foreign file is one line, never a traceback

RECORD_FIX = "re-run that config or remove its folder"
Number = Annotated[float, pydantic.Field(allow_inf_nan=False)]
Section = Optional[dict]


class _Config(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="allow", strict=True)
    model: dict
    corpus: dict


class _Record(pydantic.BaseModel):
    """The fields of ``result.json`` that the tables, ``compare``, ``report`` and ``show`` read,
    with their types (the record holds more; those are not checked)."""

    model_config = pydantic.ConfigDict(extra="allow", strict=True)
    run_id: str
    perplexity: Number
    config: _Config
    protocol: dict
    name: Optional[str] = None
    created: Optional[str] = None
    config_hash: Optional[str] = None
    ci95: Optional[Annotated[list[Optional[Number]], pydantic.Field(min_length=2, max_length=2)]] = None
    scored_tokens: Optional[int] = None
    windows: Optional[int] = None
    batch_size: Optional[int] = None
    world_size: Optional[int] = None
    peak_memory_bytes: Optional[int] = None
    bits_per_byte: Optional[Number] = None
    byte_perplexity: Optional[Number] = None
    word_perplexity: Optional[Number] = None
    tokens_per_second: Optional[Number] = None
    wall_seconds: Optional[Number] = None
    precision: Section = None
    tokenizer: Section = None
    corpus: Section = None
    model: Section = None
    domains: Section = None
    conditional: Section = None
    kl: Section = None
    versions: Optional[dict[str, Any]] = None


def read_record(path: Path) -> dict:
    """The record in ``path`` (a run folder or its ``result.json``); one line where it is missing,
    is not JSON, or lacks a field the views read or holds it with another type."""
    path = Path(path)
    if path.is_dir() and path.name != RECORD:  # a run folder (a folder named result.json is refused below)
        path = path / RECORD
    data = files.json_file(path, "record", "result record", RECORD_FIX)
    try:
        _Record.model_validate(data)
    except pydantic.ValidationError as err:
        e = err.errors()[0]
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        raise HarnessError(f"{path} is not a result record of this harness ({where}: {e['msg'].lower()}); {RECORD_FIX}") from None
    return data


def iter_records(root: Path) -> Iterator[tuple[Path, dict]]:
    """Every readable record under ``root``; a damaged one is skipped with a one-line warning (a
    table over many runs still gets written; ``compare`` and ``report`` of that run refuse it)."""
    runs = sorted(d for d in Path(root).iterdir() if d.is_dir()) if Path(root).is_dir() else []
    for path in (d / RECORD for d in runs if os.path.lexists(d / RECORD)):  # a dangling link too: it is named
        try:
            yield path, read_record(path)
        except HarnessError as err:
            warnings.warn(f"skipped {err}", HarnessWarning, stacklevel=2)


# the columns each frame of a run folder must have for the views, by kind: "int", "number", "text"
FRAMES = {
    WINDOWS: {"index": "int", "doc": "int", "begin": "int", "end": "int", "score_begin": "int", "score_end": "int",
              "sum_nll": "number", "tokens": "int"},
    "positions.parquet": {"position": "int", "sum_nll": "number", "count": "int"},
    "samples.parquet": {"sample": "int", "target_tokens": "int", "target_nll": "number"},
}


def read_frame(path: Path, key: str = "record", fix: str = RECORD_FIX, also: dict | None = None) -> pd.DataFrame:
    """A run folder's Parquet frame (``FRAMES`` names its columns, ``also`` more a caller needs);
    one line where the file does not parse, lacks a column, holds one of another kind, a
    non-finite number, or no rows."""
    path = Path(path)
    files.existing_file(path, key, "Parquet file", fix)
    with files.reading(path, key, "Parquet file", fix):
        frame = pd.read_parquet(path)
    kinds = {"int": pd.api.types.is_integer_dtype, "number": pd.api.types.is_numeric_dtype,
             "text": lambda s: pd.api.types.is_string_dtype(s) or pd.api.types.is_object_dtype(s)}
    for col, kind in {**FRAMES.get(path.name, {}), **(also or {})}.items():
        if col not in frame.columns:
            raise HarnessError(f"{key}: {path} has no column '{col}'; {fix}")
        if not kinds[kind](frame[col]) or pd.api.types.is_bool_dtype(frame[col]):
            raise HarnessError(f"{key}: {path}: column '{col}' holds {frame[col].dtype}, not {kind}s; {fix}")
        if kind != "text" and not np.isfinite(frame[col].to_numpy(dtype=float)).all():
            raise HarnessError(f"{key}: {path}: column '{col}' holds a value that is not a finite number; {fix}")
    if frame.empty:
        raise HarnessError(f"{key}: {path} has no rows; {fix}")
    return frame


def _corpus_label(cfg: dict) -> str:
    c = cfg.get("corpus", {})
    if c.get("dataset"):
        return f"{c['dataset']}/{c.get('config') or ''}/{c.get('split')}"
    return str(c.get("path"))


def table_row(record: dict) -> dict:
    cfg = record.get("config", {})
    proto = record.get("protocol", {})
    ci = record.get("ci95") or [None, None]
    return {
        "run_id": record.get("run_id"),
        "name": record.get("name"),
        "model": cfg.get("model", {}).get("name_or_path"),
        "gguf_file": cfg.get("model", {}).get("gguf_file"),
        "dtype": (record.get("precision") or {}).get("body") or cfg.get("model", {}).get("dtype"),  # auto resolved
        "corpus": _corpus_label(cfg),
        "protocol": proto.get("protocol"),
        "max_length": proto.get("max_length"),
        "stride": proto.get("stride"),
        "bos": proto.get("bos"),
        "mode": proto.get("mode"),
        "detokenizer": proto.get("detokenizer"),
        "batch_size": record.get("batch_size"),
        "world_size": record.get("world_size"),
        "scored_tokens": record.get("scored_tokens"),
        "windows": record.get("windows"),
        "perplexity": record.get("perplexity"),
        "ci95_low": ci[0],
        "ci95_high": ci[1],
        "bits_per_byte": record.get("bits_per_byte"),
        "byte_perplexity": record.get("byte_perplexity"),
        "word_perplexity": record.get("word_perplexity"),
        # Paloma: the mean over domains of each domain's token perplexity
        "macro_perplexity": (record.get("domains") or {}).get("macro_perplexity"),
        "tokens_per_second": record.get("tokens_per_second"),
        "wall_seconds": record.get("wall_seconds"),
        "peak_memory_mb": (record.get("peak_memory_bytes") or 0) / 2**20,
        "tokenizer": (record.get("tokenizer") or {}).get("fingerprint"),
        "config_hash": record.get("config_hash"),
        "created": record.get("created"),
    }


def table(root: Path) -> pd.DataFrame:
    rows = [table_row(r) for _, r in iter_records(root)]
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


@contextlib.contextmanager
def locked(root: Path):
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".table.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def write_table(root: Path) -> tuple[Path, Path]:
    """Rebuild ``table.csv`` and ``table.md`` from every record under ``root``."""
    root = Path(root)
    for target in (root / "table.csv", root / "table.md"):
        if target.is_dir():
            raise HarnessError(f"cannot write {target}: a folder is in its place; remove it (the table is rebuilt from the records)")
    files.writable_folder(root, "results folder", root / "table.csv")
    with locked(root):
        frame = table(root)
        csv_path, md_path = root / "table.csv", root / "table.md"
        atomic_write_text(csv_path, frame.to_csv(index=False))
        atomic_write_text(md_path, frame.to_markdown(index=False, floatfmt=".4f") + "\n")
    return csv_path, md_path
