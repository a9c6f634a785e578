"""Simple SVG charts for the report page: coordinates computed here, markup written by the
template (escaped there). ``line_chart`` draws series with optional bands; ``interval_bars``
places each row's interval on its table's common scale."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

MAX_POINTS = 400  # points drawn per line; longer series are thinned (drawing only)
PALETTE = ["#3b6fb6", "#d0703c", "#3f9a5b", "#b8405e", "#7b5ea7", "#8c6d46", "#c464a8", "#6f6f6f"]



def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    from matplotlib.ticker import MaxNLocator

    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    return [float(t) for t in MaxNLocator(n).tick_values(lo, hi) if lo - 1e-12 <= t <= hi + 1e-12]


def _thin(n: int) -> np.ndarray:
    if n <= MAX_POINTS:
        return np.arange(n)
    return np.unique(np.r_[np.linspace(0, n - 1, MAX_POINTS).round().astype(int), n - 1])


@dataclass
class Chart:
    width: int
    height: int
    left: int
    right: int
    top: int
    bottom: int
    xlabel: str
    ylabel: str
    lines: list[dict] = field(default_factory=list)  # label, color, points, band, dots
    xticks: list[tuple[float, str]] = field(default_factory=list)
    yticks: list[tuple[float, str]] = field(default_factory=list)


def line_chart(series: list[dict], xlabel: str, ylabel: str, width: int = 560, height: int = 240, xcategories=None) -> Chart | None:
    """``series``: dicts with label, x, y and optionally lo, hi (a band). Returns None if empty."""
    series = [s for s in series if len(s["x"])]
    if not series:
        return None
    c = Chart(width, height, 62, width - 14, 12, height - 42, xlabel, ylabel)
    xs = np.concatenate([np.asarray(s["x"], float) for s in series])
    ys = np.concatenate([np.asarray(s[k], float) for s in series for k in ("y", "lo", "hi") if s.get(k) is not None])
    ys = ys[np.isfinite(ys)]
    x0, x1 = float(xs.min()), float(xs.max())
    y0, y1 = (float(ys.min()), float(ys.max())) if len(ys) else (0.0, 1.0)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    pad = (y1 - y0) * 0.06 or abs(y0) * 0.05 or 1.0
    y0, y1 = y0 - pad, y1 + pad

    def px(x):
        return c.left + (x - x0) / (x1 - x0) * (c.right - c.left)

    def py(y):
        return c.bottom - (y - y0) / (y1 - y0) * (c.bottom - c.top)

    for i, s in enumerate(series):
        x, y = np.asarray(s["x"], float), np.asarray(s["y"], float)
        keep = _thin(len(x))
        x, y = x[keep], y[keep]
        ok = np.isfinite(y)
        line = {"label": s["label"], "color": PALETTE[i % len(PALETTE)],
                "points": " ".join(f"{px(a):.1f},{py(b):.1f}" for a, b in zip(x[ok], y[ok])), "band": None,
                "dots": [(round(px(a), 1), round(py(b), 1)) for a, b in zip(x[ok], y[ok])] if len(x) <= 24 else []}
        if s.get("lo") is not None and s.get("hi") is not None:
            lo, hi = np.asarray(s["lo"], float)[keep], np.asarray(s["hi"], float)[keep]
            good = np.isfinite(lo) & np.isfinite(hi)
            if good.any():
                up = [f"{px(a):.1f},{py(b):.1f}" for a, b in zip(x[good], hi[good])]
                down = [f"{px(a):.1f},{py(b):.1f}" for a, b in zip(x[good][::-1], lo[good][::-1])]
                line["band"] = " ".join(up + down)
        c.lines.append(line)
    if xcategories is not None:
        c.xticks = [(round(px(i), 1), str(v)) for i, v in enumerate(xcategories)]
    else:
        c.xticks = [(round(px(t), 1), f"{t:g}") for t in _ticks(x0, x1)]
    c.yticks = [(round(py(t), 1), f"{t:.4g}") for t in _ticks(y0, y1)]
    return c


def interval_bars(rows: list[dict], lo_key: str, hi_key: str, mid_key: str, zero: bool = False, width: int = 140) -> None:
    """Adds ``bar`` (x positions in a ``width``-pixel strip) to each row, on the rows' common scale."""
    vals = [v for r in rows for v in (r.get(lo_key), r.get(hi_key), r.get(mid_key)) if _num(v)]
    if zero:
        vals.append(0.0)
    if not vals:
        return
    lo, hi = min(vals), max(vals)
    span = (hi - lo) or abs(hi) * 0.1 or 1.0
    lo, hi = lo - 0.05 * span, hi + 0.05 * span

    def x(v):
        return round(4 + (v - lo) / (hi - lo) * (width - 8), 1)

    for r in rows:
        if _num(r.get(mid_key)):
            has = _num(r.get(lo_key)) and _num(r.get(hi_key))
            r["bar"] = {"width": width, "mid": x(r[mid_key]), "lo": x(r[lo_key]) if has else None,
                        "hi": x(r[hi_key]) if has else None, "zero": x(0.0) if zero else None}


def _num(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)
