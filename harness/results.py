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
from pathlib import Path
from typing import Iterator

import pandas as pd

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


def read_record(path: Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / RECORD
    return json.loads(path.read_text(encoding="utf-8"))


def iter_records(root: Path) -> Iterator[tuple[Path, dict]]:
    for path in sorted(Path(root).glob(f"*/{RECORD}")):
        try:
            yield path, read_record(path)
        except (OSError, json.JSONDecodeError):
            continue  # a record being written right now, or not ours


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
    with locked(root):
        frame = table(root)
        csv_path, md_path = root / "table.csv", root / "table.md"
        atomic_write_text(csv_path, frame.to_csv(index=False))
        atomic_write_text(md_path, frame.to_markdown(index=False, floatfmt=".4f") + "\n")
    return csv_path, md_path
