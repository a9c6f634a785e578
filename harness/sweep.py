"""Sweeps: one config, a grid of overrides, one run per point, a plot of perplexity per point.

``ppl sweep CONFIG eval.max_length=256,512,1024 eval.stride=128,256`` runs every combination of
the comma-separated values (the product of the swept fields); overrides without a comma are
applied to every point. Every point's config is validated before the first one runs, so a typo
in the third value fails at once instead of after an hour. A model is loaded once and reused by
the points that share its settings (only eval or corpus fields swept). The points' run folders
go into one sweep folder, with ``sweep.csv``, ``sweep.png`` (perplexity against the first swept
field, one line per combination of the others) and ``positions.png`` (mean NLL against the
position in the window, one line per point).
"""

from __future__ import annotations

import itertools
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .config import RunConfig, load_config, parse_override
from .errors import HarnessError
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
    """Fixed overrides, and swept key -> its raw values (in the order given)."""
    fixed, swept = [], {}
    for item in overrides:
        key, eq, raw = item.partition("=")
        if eq and _SPLIT.match(raw.strip()):
            parse_override(item)  # the key's shape is checked like any override
            values = [v.strip() for v in raw.split(",")]
            if any(v == "" for v in values):
                raise HarnessError(f"sweep '{item}': empty value in the list; write KEY=V1,V2,...")
            swept[key.strip()] = values
        else:
            fixed.append(item)
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
    return Sweep(root, list(swept), points)


def run_sweep(sweep: Sweep, *, progress: bool = True, model=None, tokenizer=None) -> Sweep:
    """Run every point (reusing loaded models), then write sweep.csv and the plots."""
    from .distributed import world_size
    from .models import ModelPool
    from .plots import plot_positions, plot_sweep
    from .runner import run

    if sweep.dir.exists() and any(sweep.dir.iterdir()):
        raise HarnessError(f"sweep folder {sweep.dir} is not empty; choose another --output-dir")
    pool = ModelPool()  # one model in memory at a time

    def models(point: SweepPoint) -> dict:
        if model is not None:
            return {"model": model, "tokenizer": tokenizer}
        if world_size() > 1:  # each process places its own model: let run() load it
            return {}
        return dict(zip(("model", "tokenizer"), pool.get(point.config.model)))

    positions = {}
    for point in sweep.points:
        result = run(point.config, point.run_dir, **models(point), progress=progress)
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
