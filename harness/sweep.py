"""Sweeps: one config, a grid of overrides, one run per point, a plot of perplexity per point.

``ppl sweep CONFIG eval.max_length=256,512,1024 eval.stride=128,256`` runs every combination of
the comma-separated values (the product of the swept fields); overrides without a comma are
applied to every point. Every point's config and corpus source are validated before the first
one runs, so a typo in the third value fails at once instead of after an hour; a point that still
fails (e.g. a window longer than the model) leaves the finished points and no folder of its own.
A model is loaded once and reused by the points that share its settings (only eval or corpus
fields swept). The points' run folders go into one sweep folder, with ``sweep.csv``, ``sweep.png``
(perplexity against the first swept field, one line per combination of the others) and
``positions.png`` (mean NLL against the position in the window, one line per point).
"""

from __future__ import annotations

import itertools
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .config import RunConfig, load_config, parse_override, printable
from .errors import HarnessError
from .files import writable_folder
from .results import atomic_write_text, table_row

POSITION_BINS = 32
# a comma list, unless the value is a YAML flow list/mapping or quoted
_SPLIT = re.compile(r"^[^\[\{'\"].*,")


@dataclass
class SweepPoint:
    values: dict  # swept key -> value
    config: RunConfig
    run_dir: Path
    record: dict | None = None


@dataclass
class Sweep:
    dir: Path
    keys: list[str]
    points: list[SweepPoint]
    table: pd.DataFrame = field(default_factory=pd.DataFrame)
    plotted: pd.DataFrame | None = None
    positions: pd.DataFrame | None = None


def split_overrides(overrides: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Fixed overrides, and swept key -> its raw values (in the order given).

    A key swept twice, or swept and also fixed, is refused: one list would silently replace the
    other. A value given twice is refused too: both points would write the same folder."""
    fixed, swept = [], {}
    for item in overrides:
        key, eq, raw = item.partition("=")
        if eq and _SPLIT.match(raw.strip()):
            name = ".".join(parse_override(item)[0])  # the key's shape is checked like any override
            values = [v.strip() for v in raw.split(",")]
            if any(v == "" for v in values):
                raise HarnessError(f"sweep '{printable(item)}': empty value in the list; write KEY=V1,V2,...")
            if name in swept:
                raise HarnessError(f"sweep: {printable(name)} is swept twice; give all its values in one list, "
                                   f"e.g. {printable(name)}={','.join(swept[name] + values)}")
            parsed = [(type(v), v) for v in (parse_override(f"{name}={v}")[1] for v in values)]  # true is not 1
            twice = next((v for i, v in enumerate(values) if parsed[i] in parsed[:i]), None)
            if twice is not None:
                raise HarnessError(f"sweep '{printable(item)}': value {printable(twice)} is given twice; give each value once")
            swept[name] = values
        else:
            fixed.append(item)
    both = next((k for k in swept if any(".".join(parse_override(f)[0]) == k for f in fixed if "=" in f)), None)
    if both is not None:
        raise HarnessError(f"sweep: {printable(both)} is both swept and fixed; drop the fixed {printable(both)}=... "
                           "or add its value to the swept list")
    return fixed, swept


def _label(values: dict) -> str:
    return "__".join(f"{k.split('.')[-1]}={v}" for k, v in values.items()).replace("/", "-")


def plan(config: str | Path, overrides: list[str], output_dir: str | Path | None = None) -> Sweep:
    """Every point's validated config and run folder; nothing runs and nothing is written."""
    fixed, swept = split_overrides(overrides)
    if not swept:
        raise HarnessError("sweep: no swept field; give at least one KEY=V1,V2,... (e.g. eval.max_length=256,512)")
    base = load_config(config, fixed)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    root = Path(output_dir) if output_dir else Path(base.output.dir) / f"sweep-{stamp}-{'-'.join(k.split('.')[-1] for k in swept)}"
    points = []
    for combo in itertools.product(*swept.values()):
        raw = dict(zip(swept, combo))
        cfg = load_config(config, fixed + [f"{k}={v}" for k, v in raw.items()])
        values = {k: parse_override(f"{k}={v}")[1] for k, v in raw.items()}
        points.append(SweepPoint(values, cfg, root / _label(raw)))
    _check_points(points)
    return Sweep(root, list(swept), points)


def _check_points(points: list[SweepPoint]) -> None:
    """What can be checked without a model, for every point before the first runs: each corpus
    source (a missing file, mirror or split), and that no two points share a run folder."""
    from .corpus import source

    folders: dict[Path, dict] = {}
    for point in points:
        source(point.config.corpus)
        other = folders.setdefault(point.run_dir, point.values)
        if other is not point.values:
            raise HarnessError(f"sweep: points {printable(other)} and {printable(point.values)} would both write "
                               f"{printable(point.run_dir.name)}; give values that differ")


def _check_dir(root: Path) -> None:
    """The sweep folder is new or empty, and a folder: a rerun never mixes its points with an
    earlier sweep's (a failed sweep keeps its finished points; the failed point's folder is removed)."""
    if root.exists() and not root.is_dir():
        raise HarnessError(f"--output-dir {printable(root)} is a file, not a folder; choose another --output-dir")
    if root.exists() and any(root.iterdir()):
        raise HarnessError(f"sweep folder {printable(root)} is not empty (it holds an earlier sweep's runs); "
                           "remove it or choose another --output-dir")
    writable_folder(root, "--output-dir")  # before any model loads


def _check_lengths(points: list[SweepPoint], model=None) -> None:
    """Every point's ``eval.max_length`` fits its model's positions, checked before the first
    point runs (from each model's config, read without its weights), so that a value too large
    refuses the sweep instead of failing it after the points before it were written."""
    from .models import max_positions, model_key, stated_positions

    limits: dict[str, int | None] = {}
    for point in points:
        length, key = point.config.eval.max_length, model_key(point.config.model)
        if length is None:
            continue
        if key not in limits:
            limits[key] = max_positions(model) if model is not None else stated_positions(point.config.model)
        if (limit := limits[key]) and length > limit:
            where = printable(", ".join(f"{k}={v}" for k, v in point.values.items()))
            raise HarnessError(f"sweep point {where}: eval.max_length: {length} is larger than the model's {limit} "
                               f"positions; sweep values <= {limit} (no point has run)")


def _remove_empty(folder: Path, stop: Path | None) -> None:
    """Remove ``folder`` and then its parents up to ``stop`` (inclusive), each only while empty."""
    for path in [folder, *folder.parents]:
        if not path.is_dir() or any(path.iterdir()):
            return
        path.rmdir()
        if stop is None or path == stop:
            return


def run_sweep(sweep: Sweep, *, progress: bool = True, model=None, tokenizer=None) -> Sweep:
    """Run every point (reusing loaded models), then write sweep.csv and the plots."""
    from .distributed import world_size
    from .models import ModelPool
    from .plots import plot_positions, plot_sweep
    from .runner import run

    _check_dir(sweep.dir)
    _check_lengths(sweep.points, model)
    # the topmost folder this sweep creates: removed again, while empty, if the first point fails
    made = next((p for p in reversed([sweep.dir, *sweep.dir.parents]) if not p.exists()), None)
    pool = ModelPool()  # one model in memory at a time

    def models(point: SweepPoint) -> dict:
        if model is not None:
            return {"model": model, "tokenizer": tokenizer}
        if world_size() > 1:  # each process places its own model: let run() load it
            return {}
        return dict(zip(("model", "tokenizer"), pool.get(point.config.model)))

    positions = {}
    for point in sweep.points:
        try:
            result = run(point.config, point.run_dir, **models(point), progress=progress)
        except BaseException:  # a point that wrote nothing leaves no folder behind
            _remove_empty(point.run_dir, made)
            raise
        point.record = result.record
        if result.positions is not None:
            positions[_label(point.values)] = result.positions
    rows = [{**p.values, **table_row(p.record)} for p in sweep.points if p.record is not None]
    sweep.table = pd.DataFrame(rows)
    sweep.dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(sweep.dir / "sweep.csv", sweep.table.to_csv(index=False))
    x, group = sweep.keys[0], sweep.keys[1:]
    sweep.plotted = plot_sweep(sweep.table, x, sweep.dir / "sweep.png", group)
    if positions:
        sweep.positions = plot_positions(positions, sweep.dir / "positions.png", bins=POSITION_BINS)
    return sweep
