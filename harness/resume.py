"""Resume: finished windows are written durably as a run goes, so a killed run loses nothing.

After every batch, rank 0 appends one JSON line per finished window (its ``WindowRecord`` and
its per-token NLLs, float32 in base64) to ``<folder>/.partial/<config hash>.jsonl``, then
flushes and fsyncs. The folder is ``--output-dir`` when given, else the results root; the file
name is the config hash (which leaves out the batch size, the batching order and the output),
so a rerun of the same config resumes and a changed config never mixes with an old log.

A ``kill -9`` can cut the last line short; ``load`` drops that line and truncates the file back
to the last whole line before anything is appended. The windows in the log are not scored
again; their records and NLLs join the new ones where all sums meet (``accumulate.total``), so
the final record equals an uninterrupted run's. The log is deleted once the record is written.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import json
import math
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np

from .accumulate import PositionStats, WindowRecord
from .errors import HarnessError
from .files import first_line, reading
from .windows import Window

PARTIAL = ".partial"
PAD_INDEX = -1  # padding windows (uneven work across ranks) carry this index and score nothing
FORMAT = 1  # the log's layout; a log of another layout is refused with one line, never misread


@dataclass
class Finished:
    """One scored window: its record and the NLL of each scored token (float32)."""

    record: WindowRecord
    nlls: np.ndarray


def padding(window: Window) -> Window:
    """A copy of ``window`` that runs the same forward pass but scores no token."""
    return replace(window, index=PAD_INDEX, score_begin=window.score_end)


def is_padding(record: WindowRecord) -> bool:
    return record.index == PAD_INDEX


def remaining(windows: list[Window], done: list[Finished]) -> list[Window]:
    finished = {f.record.index for f in done}
    return [w for w in windows if w.index not in finished]


def positions_of(done: list[Finished], windows: list[Window], max_length: int) -> PositionStats:
    """NLL-by-position statistics of resumed windows, as ``score_windows`` would have added them."""
    stats = PositionStats.empty(max_length)
    for f in done:
        k0 = windows[f.record.index].first_target_offset
        stats.add(np.arange(k0, k0 + len(f.nlls)), f.nlls)
    return stats


def _encode(f: Finished) -> str:
    row = asdict(f.record)
    row["nll"] = base64.b64encode(np.ascontiguousarray(f.nlls, dtype="<f4").tobytes()).decode("ascii")
    return json.dumps(row)


_KEYS = [f.name for f in fields(WindowRecord)] + ["nll"]  # what ``_encode`` writes, no more, no less
_INTS = ("index", "doc", "begin", "end", "score_begin", "score_end", "tokens", "bytes", "words")


def _typed(row) -> None:
    """Each field of a logged window is there with its type; a wrong one would otherwise surface
    only after scoring, as a traceback where the sums meet (``runner._timing``, ``positions_of``)."""
    if not isinstance(row, dict):
        raise ValueError(f"a JSON {type(row).__name__}, not a window")
    missing, extra = [k for k in _KEYS if k not in row], [k for k in row if k not in _KEYS]
    if missing:
        raise ValueError(f"a window without {', '.join(missing)}")
    if extra:
        raise ValueError(f"unknown fields {', '.join(extra)}")
    kinds = {k: (type(row[k]) is int and row[k] >= 0, "a whole number >= 0") for k in _INTS}
    kinds.update({k: (type(row[k]) is bool, "true or false") for k in ("prefix", "replace_first")})
    for k in ("sum_nll", "sum_nll_sq"):
        kinds[k] = (type(row[k]) in (int, float) and math.isfinite(row[k]), "a finite number")
    kinds["domain"] = (row["domain"] is None or isinstance(row["domain"], str), "a string or null")
    kinds["nll"] = (isinstance(row["nll"], str), "a base64 string")
    for key, (ok, want) in kinds.items():
        if not ok:
            raise ValueError(f"window {row['index']!r}: {key} is {json.dumps(row[key])[:40]}, not {want}")


def _decode(line: bytes, n_windows: int, plan: list[Window] | None = None) -> Finished:
    """One logged window, checked against the run before anything is scored: an index in the plan,
    spans in order, one NLL per scored token, NLLs that add up to the record's sum (and, given the
    plan, the planned window's spans). Damage raises ValueError saying what; the caller names the file."""
    try:
        row = json.loads(line)
    except ValueError:
        raise ValueError("not a JSON line") from None
    _typed(row)
    try:
        nlls = np.frombuffer(base64.b64decode(row.pop("nll"), validate=True), dtype="<f4").copy()
    except (binascii.Error, ValueError):
        raise ValueError(f"window {row['index']}: nll is not base64 float32 values") from None
    r = WindowRecord(**row)
    if r.index >= n_windows:
        raise ValueError(f"window index {r.index} is not in this run's plan of {n_windows} windows")
    # the input [begin, end) predicts the tokens after each of its positions: t[end] is a target too
    if not r.begin <= r.score_begin <= r.score_end <= r.end + 1:
        raise ValueError(f"window {r.index}: spans out of order (begin, score_begin, score_end, end)")
    if not r.tokens == r.score_end - r.score_begin == len(nlls):
        raise ValueError(
            f"window {r.index} scores {r.score_end - r.score_begin} tokens but says {r.tokens} and holds {len(nlls)} NLLs"
        )
    total = float(nlls.sum(dtype=np.float64))
    if not (np.isfinite(nlls).all() and math.isclose(total, r.sum_nll, rel_tol=1e-5, abs_tol=1e-3)):
        raise ValueError(f"window {r.index}: its NLLs do not add up to its sum_nll")
    planned = plan[r.index] if plan is not None else None
    if planned is not None and (r.doc, r.begin, r.end, r.score_begin, r.score_end, r.prefix, r.replace_first) != (
        planned.doc, planned.begin, planned.end, planned.score_begin, planned.score_end, planned.prefix, planned.replace_first
    ):
        raise ValueError(f"window {r.index}: its spans are not the planned window's")
    return Finished(r, nlls)


class ResumeLog:
    """The append-only log of finished windows for one config in one folder (rank 0 only)."""

    def __init__(self, folder: Path, config_hash: str, n_windows: int, exclusive_folder: bool,
                 plan: list[Window] | None = None):
        self.dir = Path(folder) / PARTIAL
        self.path = self.dir / f"{config_hash[:32]}.jsonl"
        self.header = {"format": FORMAT, "config_hash": config_hash, "windows": n_windows}
        self.exclusive_folder = exclusive_folder  # the folder is this run's own: old logs are stale
        self.plan = plan  # the planned windows, when given: each logged window must be its planned one
        self._file = None

    def open(self) -> list[Finished]:
        """Take the log (locked against a second run of the same config) and read what it holds.

        Every line is checked here, before any window is scored: a damaged log is one line naming
        it, never a traceback after the scoring or a wrong record."""
        fix = f"delete {self.path} to start the run over"
        if self.dir.exists() and not self.dir.is_dir():
            raise HarnessError(f"resume log: {self.dir} is a file, not the folder of resume logs; delete it to start the run over")
        if self.path.is_dir():
            raise HarnessError(f"resume log: {self.path} is a folder, not a resume log; delete it to start the run over")
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.exclusive_folder:  # a changed config starts fresh: drop other configs' logs
            for old in self.dir.glob("*.jsonl"):
                if old != self.path and not old.is_dir():
                    old.unlink(missing_ok=True)
        with reading(self.path, "resume log", "resume log", fix):
            self._file = open(self.path, "a+b")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise HarnessError(
                f"another run of the same config is writing {self.path}; wait for it or use another --output-dir"
            ) from None
        try:
            done = self._read()
        except HarnessError:
            self.close()
            raise
        if not done and self._file.tell() == 0:
            self._write_lines([json.dumps(self.header)])
        return done

    def _read(self) -> list[Finished]:
        self._file.seek(0)
        data = self._file.read()
        good = data.rfind(b"\n") + 1  # a line cut short by a kill is dropped
        lines = data[:good].splitlines()
        if lines and self._header(lines[0]) != self.header:
            good, lines = 0, []  # another plan under the same name: start over
        seen: dict[int, Finished] = {}
        fix = f"delete {self.path} to start the run over"
        with reading(self.path, "resume log", "resume log", fix):
            for n, line in enumerate(lines[1:], start=2):
                try:
                    f = _decode(line, self.header["windows"], self.plan)
                except ValueError as err:  # a whole line that does not decode is damage, not a kill
                    raise ValueError(f"line {n}: {first_line(err, 200)}") from None
                except Exception as err:  # noqa: BLE001 - ditto, whatever the decoder raised
                    raise ValueError(f"line {n} is not a finished window: {type(err).__name__}") from None
                seen.setdefault(f.record.index, f)  # a window twice (checked both times): the first is kept
        self._file.truncate(good)
        self._file.seek(good)
        return list(seen.values())

    def _header(self, line: bytes) -> dict:
        """The log's first line; a header that is not this format's is one line naming the file."""
        fix = f"delete {self.path} to start the run over"
        with reading(self.path, "resume log", "resume log", fix):
            try:
                header = json.loads(line)
            except ValueError:
                raise ValueError("its first line is not a JSON header") from None
        if not isinstance(header, dict) or "config_hash" not in header:
            raise HarnessError(f"resume log: {self.path} is not a resume log (no header on its first line); {fix}")
        if header.get("format") != FORMAT:
            raise HarnessError(
                f"resume log: {self.path} was written by another version of the harness "
                f"(format {header.get('format', 0)}, this one reads {FORMAT}); {fix}"
            )
        return header

    def _write_lines(self, lines: list[str]) -> None:
        self._file.write("".join(line + "\n" for line in lines).encode("utf-8"))
        self._file.flush()
        os.fsync(self._file.fileno())

    def append(self, finished: list[Finished]) -> None:
        if finished:
            self._write_lines([_encode(f) for f in finished])

    def kept(self) -> int:
        """Windows the log holds now, read back from the file (an interrupt can land mid-append)."""
        data = self.path.read_bytes()
        return max(data[: data.rfind(b"\n") + 1].count(b"\n") - 1, 0)

    def close(self, delete: bool = False) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if delete:
            self.path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.dir.rmdir()


def recorder(gather, *sinks):
    """The per-batch callback: every rank's finished windows are gathered, and each sink there
    (the resume log, the per-token writer: anything with ``append``; None for none) gets them.

    Every rank calls it once per batch (the padding makes the batch counts equal), as the
    gather is a collective; only the main rank holds sinks."""
    live = [s for s in sinks if s is not None]

    def on_batch(finished: list[Finished]) -> None:
        everyone = [f for part in gather([finished]) for f in part if not is_padding(f.record)]
        for sink in live:
            sink.append(everyone)

    return on_batch


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run; the message says what was kept and how to resume."""


def interrupted(log: ResumeLog | None, total: int) -> Interrupted:
    kept = log.kept() if log is not None else 0
    if kept == 0:
        return Interrupted("interrupted: no window was finished; run the same command again to start over")
    return Interrupted(
        f"interrupted: {kept} of {total} windows are kept in {log.path}; "
        "run the same command (same config and --output-dir) again to resume"
    )
