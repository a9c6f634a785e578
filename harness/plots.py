"""Plots rendered from records on disk (matplotlib, Agg backend: no display needed).

Every function writes one PNG and returns the numbers it drew, as a DataFrame, so tests check
the data behind a plot rather than its pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    """The figure as a PNG, rendered in memory first and written atomically: a figure that fails
    to render leaves no file, and a reader never sees half of one."""
    import io

    from .results import atomic_write_bytes

    buf = io.BytesIO()
    try:
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=120)
    finally:
        _pyplot().close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())


def plot_compare(table: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Bar chart of perplexity per run with its 95% interval (from a ``compare`` table)."""
    plt = _pyplot()
    data = table[["run", "perplexity", "ci95_low", "ci95_high"]].copy()
    data["err_low"] = data.perplexity - data.ci95_low
    data["err_high"] = data.ci95_high - data.perplexity
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(data) + 2), 3.6))
    x = np.arange(len(data))
    ax.bar(x, data.perplexity, yerr=[data.err_low.fillna(0), data.err_high.fillna(0)], capsize=5, color="#4C72B0")
    ax.set_xticks(x, data.run, rotation=20, ha="right")
    ax.set_ylabel("perplexity (95% interval)")
    # zoom on the bars' range: differences between checkpoints are small next to the PPL itself
    lo, hi = np.nanmin(data.ci95_low.fillna(data.perplexity)), np.nanmax(data.ci95_high.fillna(data.perplexity))
    ax.set_ylim(max(0.0, lo - max(hi - lo, 0.02 * lo)), hi + 0.25 * max(hi - lo, 0.02 * lo))
    _save(fig, path)
    return data


def plot_sweep(frame: pd.DataFrame, x: str, path: Path, group: list[str] | None = None, y: str = "perplexity") -> pd.DataFrame:
    """``y`` against the swept field ``x``; one line per combination of the ``group`` fields."""
    plt = _pyplot()
    cols = [x, *(group or []), y, "ci95_low", "ci95_high"]
    data = frame[[c for c in cols if c in frame.columns]].copy()
    numeric = pd.api.types.is_numeric_dtype(data[x])
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    groups = data.groupby(group, sort=True) if group else [((), data)]
    for key, part in groups:
        part = part.sort_values(x) if numeric else part
        xs = part[x] if numeric else np.arange(len(part))
        label = ", ".join(f"{g}={v}" for g, v in zip(group or [], key if isinstance(key, tuple) else (key,))) or None
        ax.plot(xs, part[y], marker="o", label=label)
        if "ci95_low" in part and part.ci95_low.notna().all():
            ax.fill_between(xs, part.ci95_low, part.ci95_high, alpha=0.2)
        if not numeric:
            ax.set_xticks(xs, part[x].astype(str))
    if numeric and data[x].min() > 0 and data[x].max() / data[x].min() >= 8:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    if group:
        ax.legend(fontsize=8)
    _save(fig, path)
    return data


def plot_positions(positions: dict[str, pd.DataFrame], path: Path, bins: int | None = None) -> pd.DataFrame:
    """Mean NLL against position in the window, one line per run (``positions.parquet`` frames).

    Position ``k`` is the input position whose logit predicts the token, so ``k`` tokens of
    context (plus itself) stand before the prediction: the curve shows how much context helps.
    With ``bins``, positions are grouped into that many equal ranges and each point is
    ``sum(nll) / count`` over its range (token-weighted), which steadies positions scored only a
    few times (under ``sliding`` only the first window scores positions below ``L - S``).
    """
    plt = _pyplot()
    parts = []
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for label, pos in positions.items():
        pos = pos[pos["count"] > 0].sort_values("position")
        if bins:
            width = max(1, -(-int(pos.position.max() + 1) // bins))
            g = pos.assign(start=pos.position // width * width).groupby("start", sort=True)
            pos = pd.DataFrame({"position": g.position.min(), "sum_nll": g.sum_nll.sum(), "count": g["count"].sum()})
            pos = pos.assign(start=pos.index.to_numpy(), end=pos.index.to_numpy() + width).reset_index(drop=True)
        mean = pos.sum_nll / pos["count"]
        x = (pos.start + pos.end - 1) / 2 if bins else pos.position
        ax.plot(x, mean, label=label, linewidth=1, marker="." if bins else None)
        part = pd.DataFrame({"run": label, "position": x.to_numpy(), "mean_nll": mean.to_numpy(), "count": pos["count"].to_numpy()})
        if bins:
            part = part.assign(start=pos.start.to_numpy(), end=pos.end.to_numpy())
        parts.append(part)
    ax.set_xlabel("position in window (tokens of context)")
    ax.set_ylabel("mean NLL (nats)" + (f", {bins} bins" if bins else ""))
    if len(positions) > 1:
        ax.legend(fontsize=8)
    _save(fig, path)
    return pd.concat(parts, ignore_index=True)
