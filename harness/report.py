"""One self-contained HTML page over a results folder: ``ppl report``.

The page is a view of the records on disk, like the tables and plots: every number in it is a
record's number (or a number from the parquet files beside it, or from a ``compare.csv`` or
``sweep.csv`` found in the folder), formatted, never recomputed. What it shows:

- a leaderboard, one table per group of *comparable* runs (the rules of ``ppl compare``: same
  tokenizer, corpus text and protocol settings), each perplexity with its 95% interval drawn as
  a bar on the group's scale; bits per byte is the column that crosses tokenizers, and runs on
  the same corpus and protocol with different tokenizers also get a bits-per-byte table;
- per run: the summary ``ppl run`` prints, running perplexity over windows, mean NLL by position
  in the window, per-domain and per-sample tables where the record has them, KL statistics, the
  resolved config and versions;
- every comparison (``compare.csv``) and sweep (``sweep.csv``) found under the folder.

Safety: the template is rendered by jinja2 with autoescaping, so a run name or a corpus text
with ``<script>`` in it shows as text; the page makes no request (inline CSS and SVG only), and
its Content-Security-Policy allows nothing but its own inline styles and the one inline script,
named by its sha256, so even markup that slipped through could not run.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .compare import NOTE, TOKENIZER_DEPENDENT, Run, _get, comparable_fields, unique_labels
from .errors import HarnessError
from .precision import summary_line
from .results import RECORD, WINDOWS, atomic_write_text, read_record, table_row

POSITIONS = "positions.parquet"
SAMPLES = "samples.parquet"
WORST_SAMPLES = 10
MAX_POINTS = 400  # points drawn per line; longer series are thinned (drawing only)
POSITION_BINS = 128
PALETTE = ["#3b6fb6", "#d0703c", "#3f9a5b", "#b8405e", "#7b5ea7", "#8c6d46", "#c464a8", "#6f6f6f"]
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--hide-scrollbars",
]


# ---------------------------------------------------------------------------------------------
# Formatting (the only arithmetic on record numbers is here: how many digits to show)


def fmt(x, spec: str = ".4f") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else "no"
    try:
        return format(x, spec)
    except (TypeError, ValueError):
        return str(x)


def fmt_ci(ci) -> str:
    if not ci or None in ci[:2]:
        return "n/a"
    return f"{fmt(ci[0])} .. {fmt(ci[1])}"


def fmt_cell(x) -> str:
    """A table cell from a csv or parquet value: ints with separators, floats to 4 decimals."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else "no"
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    if isinstance(x, (float, np.floating)):
        return fmt(float(x), ".4f") if abs(x) >= 1e-3 or x == 0 else fmt(float(x), ".4g")
    return str(x)


def sort_value(x) -> str:
    """What the page's script sorts by: the full number, or the text."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return ""
    return repr(float(x)) if isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) else str(x)


def summary_rows(r: dict) -> list[tuple[str, str]]:
    """The summary ``ppl run`` prints (and the report shows), as (label, value) rows, from a record."""
    p = r.get("protocol") or {}
    rows = [
        ("protocol", f"{p.get('protocol')} (L={p.get('max_length')}, S={p.get('stride')}, bos={p.get('bos')}, {p.get('mode')})"),
        ("perplexity", f"{fmt(r.get('perplexity'))}  (95% CI {fmt_ci(r.get('ci95'))})"),
        *([("precision", summary_line(r["precision"]))] if r.get("precision") else []),
        ("scored tokens", f"{fmt(r.get('scored_tokens'), ',')} in {fmt(r.get('windows'), ',')} windows"),
        ("bits per byte", fmt(r.get("bits_per_byte"))),
        ("word perplexity", fmt(r.get("word_perplexity"))),
    ]
    if p.get("protocol") == "llamacpp":
        rows.append(("llama.cpp", f"PPL = {fmt(r.get('perplexity'))} +/- {fmt(r.get('perplexity_pm'), '.5f')}"))
    if r.get("domains"):
        rows.append(("macro perplexity", f"{fmt(r['domains'].get('macro_perplexity'))} over {r['domains'].get('domains')} domains"))
    if r.get("rescaled_perplexity") is not None:
        rows.append(("rescaled", fmt(r["rescaled_perplexity"])))
    if r.get("conditional"):
        c = r["conditional"]
        rows.append(("targets", f"{fmt(c.get('samples'), ',')} samples; perplexity is over all target tokens, "
                                f"macro (mean of per-sample) {fmt(c.get('macro_perplexity'))}"))
    mem = r.get("peak_memory_bytes")
    rows += [
        ("tokens/s", fmt(r.get("tokens_per_second"), ".1f")),
        ("wall time", f"{fmt(r.get('wall_seconds'), '.1f')} s"),
        ("peak memory", f"{fmt(mem / 2**20, ',.0f') if mem is not None else 'n/a'} MiB"),
        ("batch size", f"{r.get('batch_size')} x {r.get('world_size')} process(es)"),
    ]
    if r.get("resumed_windows"):
        rows.append(("resumed", f"{r['resumed_windows']:,} windows taken over from the interrupted run"))
    return rows


def precision(record: dict) -> str:
    """The body/head precision section when the record has one, else the model's dtype."""
    p = record.get("precision")
    if isinstance(p, dict) and (p.get("body") is not None or p.get("head") is not None):
        body, head = p.get("body"), p.get("head")
        body = body.get("dtype", body) if isinstance(body, dict) else body
        head = head.get("dtype", head) if isinstance(head, dict) else head
        return str(body) if head in (None, body) else f"{body}, head {head}"
    return str((record.get("model") or {}).get("dtype") or _get(record, "config.model.dtype") or "n/a")


# ---------------------------------------------------------------------------------------------
# Simple SVG charts: coordinates computed here, markup written by the template (escaped there)


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


# ---------------------------------------------------------------------------------------------
# Reading the results folder


def find_run_dirs(specs: list[str | Path]) -> tuple[list[Path], list[Path]]:
    """Run folders (with a result.json) and the folders searched for comparisons and sweeps."""
    runs, roots, seen = [], [], set()
    for spec in specs:
        p = Path(spec)
        if p.is_file():
            if p.name != RECORD:
                raise HarnessError(f"{p} is not a {RECORD}: give a results folder, run folders or {RECORD} files")
            found = [p.parent]
        elif p.is_dir():
            found = [p] if (p / RECORD).is_file() else sorted(f.parent for f in p.rglob(RECORD))
            roots.append(p)
        else:
            raise HarnessError(f"results not found: {p}; give a results folder, run folders or {RECORD} files")
        for d in found:
            if d.resolve() not in seen:
                seen.add(d.resolve())
                runs.append(d)
    if not runs:
        where = " ".join(map(str, specs))
        raise HarnessError(f"no result records ({RECORD}) under {where}: run `ppl run CONFIG` first or give the folder that holds them")
    return runs, roots


def _load_record(d: Path) -> dict:
    try:
        record = read_record(d)
    except (OSError, ValueError) as err:
        raise HarnessError(f"cannot read {d / RECORD}: {err}; re-run that config or remove the folder") from None
    if not isinstance(record, dict) or "perplexity" not in record:
        raise HarnessError(f"{d / RECORD} is not a result record (no perplexity); remove it or give another folder")
    return record


def _parquet(path: Path) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    try:
        return pd.read_parquet(path)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise HarnessError(f"cannot read {path}: {str(err).splitlines()[0]}; re-run that config or remove the file") from None


def _csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except Exception as err:
        raise HarnessError(f"cannot read {path}: {str(err).splitlines()[0]}; re-run the command that wrote it or remove it") from None


def _rel(path: Path, base: Path) -> str:
    try:
        return os.path.relpath(path.resolve(), base.resolve())
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------------------------
# Views: plain dicts and lists for the template


def comparable_key(record: dict, across_tokenizers: bool = False) -> str:
    """Runs with equal keys pass ``compare.check_comparable`` with each other (same field list)."""
    fields = comparable_fields(record, record)
    return json.dumps({f: _get(record, f) for f in fields if not (across_tokenizers and f in TOKENIZER_DEPENDENT)},
                      sort_keys=True, default=str)


def _group_title(record: dict, across_tokenizers: bool = False) -> list[tuple[str, str]]:
    p = record.get("protocol") or {}
    corpus = table_row(record)["corpus"]
    tokens = "" if across_tokenizers else f", {fmt(_get(record, 'corpus.tokens'), ',')} tokens"
    skip = {"protocol", *(k.split(".", 1)[1] for k in TOKENIZER_DEPENDENT if k.startswith("protocol."))} if across_tokenizers else {"protocol"}
    settings = ", ".join(f"{k}={v}" for k, v in p.items() if k not in skip)
    rows = [
        ("tokenizer", str(_get(record, "tokenizer.fingerprint"))),
        ("corpus", f"{corpus}{tokens}, text sha256 {str(_get(record, 'corpus.text_sha256'))[:12]}"),
        ("protocol", f"{p.get('protocol')}: {settings}"),
    ]
    return rows[1:] if across_tokenizers else rows


def _model_label(record: dict) -> str:
    m = (record.get("config") or {}).get("model") or {}
    return str(m.get("gguf_file") or m.get("name_or_path"))


def _run_view(i: int, run: Run, base: Path) -> dict:
    r = run.record
    row = table_row(r)
    view = {
        "anchor": f"run-{i}",
        "label": run.label,
        "run_id": str(r.get("run_id")),
        "folder": _rel(run.path, base),
        "model": _model_label(r),
        "precision": precision(r),
        "corpus": row["corpus"],
        "protocol": str(row["protocol"]),
        "settings": f"L={row['max_length']} S={row['stride']}",
        "perplexity": r.get("perplexity"),
        "ci": (r.get("ci95") or [None, None])[:2],
        "bits_per_byte": r.get("bits_per_byte"),
        "word_perplexity": r.get("word_perplexity"),
        "scored_tokens": r.get("scored_tokens"),
        "tokens_per_second": r.get("tokens_per_second"),
        "created": str(r.get("created") or ""),
        "tokenizer": str(_get(r, "tokenizer.fingerprint")),
        "summary": summary_rows(r) + [("interval", str(r.get("ci95_method") or "n/a"))],
        "config": _yaml(r.get("config")),
        "versions": [(k, str(v)) for k, v in (r.get("versions") or {}).items()],
        "model_info": [(k, str(v)) for k, v in (r.get("model") or {}).items()],
        "kl": [(k, fmt_cell(v)) for k, v in (r.get("kl") or {}).items()],
        "domains": None,
        "samples": None,
    }
    view["ppl_text"], view["ci_text"], view["bpb_text"] = fmt(view["perplexity"]), fmt_ci(view["ci"]), fmt(view["bits_per_byte"])
    view["ci_low"], view["ci_high"] = view["ci"]
    dom = r.get("domains")
    if dom and dom.get("per_domain"):
        view["domains"] = {
            "macro": fmt(dom.get("macro_perplexity")),
            "rows": [(str(k), fmt(v.get("perplexity")), fmt(v.get("scored_tokens"), ","), fmt(v.get("bits_per_byte")))
                     for k, v in sorted(dom["per_domain"].items())],
        }
    win = _parquet(run.path / WINDOWS)
    view["windows_chart"] = None
    if win is not None and "running_perplexity" in win and len(win):
        order = win.sort_values("index") if "index" in win else win
        view["windows_chart"] = line_chart(
            [{"label": "running perplexity", "x": np.arange(1, len(order) + 1), "y": order.running_perplexity.to_numpy()}],
            "windows scored", "running perplexity")
    pos = _parquet(run.path / POSITIONS)
    view["positions_chart"] = None
    if pos is not None and len(pos):
        view["positions_chart"] = _positions_chart(pos)
    samples = _parquet(run.path / SAMPLES)
    if samples is not None and len(samples):
        view["samples"] = _samples_view(samples)
    return view


def _positions_chart(pos: pd.DataFrame) -> Chart | None:
    pos = pos[pos["count"] > 0].sort_values("position")
    if len(pos) > POSITION_BINS:  # token-weighted bins, as `ppl positions` draws them
        width = -(-int(pos.position.max() + 1) // POSITION_BINS)
        g = pos.assign(start=pos.position // width * width).groupby("start", sort=True)
        x = g.position.mean().to_numpy()
        y = (g.sum_nll.sum() / g["count"].sum()).to_numpy()
        label = f"position in window ({POSITION_BINS} bins of {width})"
    else:
        x, y = pos.position.to_numpy(), (pos.mean_nll if "mean_nll" in pos else pos.sum_nll / pos["count"]).to_numpy()
        label = "position in window (tokens of context)"
    return line_chart([{"label": "mean NLL", "x": x, "y": y}], label, "mean NLL (nats)")


SAMPLE_SORT = ["perplexity", "target_perplexity", "target_nll", "nll", "sum_nll"]


def _samples_view(samples: pd.DataFrame) -> dict:
    key = next((k for k in SAMPLE_SORT if k in samples.columns), None)
    worst = samples.sort_values(key, ascending=False, kind="stable") if key else samples
    worst = worst.head(WORST_SAMPLES)
    cols = [c for c in worst.columns if c != "text"]
    rows = []
    for _, rec in worst.iterrows():
        text = rec.get("text")
        text = "" if text is None or (isinstance(text, float) and math.isnan(text)) else str(text)
        rows.append({"cells": [fmt_cell(rec[c]) for c in cols], "text": text[:600] + (" …" if len(text) > 600 else "")})
    return {"count": len(samples), "by": key, "columns": cols, "rows": rows, "has_text": "text" in samples.columns}


def _yaml(obj) -> str:
    import yaml

    return yaml.safe_dump(obj, sort_keys=False, allow_unicode=True, width=100) if obj is not None else ""


def _leaderboard(views: list[dict], runs: list[Run]) -> tuple[list[dict], list[dict]]:
    groups: dict[str, dict] = {}
    across: dict[str, dict] = {}
    for v, run in zip(views, runs):
        g = groups.setdefault(comparable_key(run.record), {"title": _group_title(run.record), "rows": []})
        g["rows"].append(v)
        a = across.setdefault(comparable_key(run.record, across_tokenizers=True), {"title": _group_title(run.record, True), "rows": []})
        a["rows"].append(v)
    out = sorted(groups.values(), key=lambda g: (-len(g["rows"]), g["rows"][0]["label"]))
    for n, g in enumerate(out, 1):
        g["id"] = f"group-{n}"
        interval_bars(g["rows"], "ci_low", "ci_high", "perplexity")
        for v in g["rows"]:
            v["group"] = g["id"]
            v["bar_ppl"] = v.pop("bar", None)
    bpb = [a for a in across.values() if len({v["tokenizer"] for v in a["rows"]}) > 1]
    for a in bpb:
        a["rows"] = sorted(a["rows"], key=lambda v: (v["bits_per_byte"] is None, v["bits_per_byte"] or 0))
    return out, bpb


def _comparison_view(path: Path, base: Path) -> dict:
    t = _csv(path)
    note = ""
    md = path.with_suffix(".md")
    if md.is_file():
        note = md.read_text(encoding="utf-8", errors="replace").strip().split("\n\n")[-1]
    rows = t.to_dict("records")
    for r in rows:
        for k in list(r):
            if isinstance(r[k], float) and math.isnan(r[k]):
                r[k] = None
    interval_bars(rows, "delta_ci95_low", "delta_ci95_high", "delta_ppl", zero=True)
    kl_cols = [c for c in t.columns if c.startswith("kl_")]
    out = []
    for r in rows:
        sig = r.get("significant")
        out.append({
            "run": str(r.get("run")),
            "model": str(r.get("model") or ""),
            "ppl": fmt(r.get("perplexity")), "ci": fmt_ci([r.get("ci95_low"), r.get("ci95_high")]),
            "bpb": fmt(r.get("bits_per_byte")),
            "delta": "baseline" if r.get("test") == "baseline" else fmt(r.get("delta_ppl"), "+.4f"),
            "delta_ci": fmt_ci([r.get("delta_ci95_low"), r.get("delta_ci95_high")]) if r.get("delta_ci95_low") is not None else "",
            "delta_bpb": fmt(r.get("delta_bpb"), "+.4f") if r.get("test") != "baseline" else "",
            "significant": "" if sig is None else ("yes" if str(sig).lower() == "true" else "no"),
            "test": str(r.get("test") or ""),
            "kl": [fmt_cell(r.get(c)) for c in kl_cols],
            "bar": None if r.get("test") == "baseline" else r.get("bar"),
        })
    return {"title": _rel(path.parent, base), "file": _rel(path, base), "note": note, "kl_columns": kl_cols, "rows": out,
            "compared_on": str(rows[0].get("compared_on") or "") if rows else ""}


def _sweep_view(path: Path, base: Path, anchors: dict[str, str]) -> dict:
    t = _csv(path)
    keys = list(t.columns[: list(t.columns).index("run_id")]) if "run_id" in t.columns else []
    view = {"title": _rel(path.parent, base), "file": _rel(path, base), "swept": keys, "chart": None, "rows": []}
    if not keys or "perplexity" not in t:
        return view
    x, group = keys[0], keys[1:]
    numeric = pd.api.types.is_numeric_dtype(t[x])
    series = []
    parts = t.groupby(group, sort=True) if group else [((), t)]
    categories = None if numeric else list(dict.fromkeys(t[x].astype(str)))
    for gk, part in parts:
        part = part.sort_values(x) if numeric else part
        xs = part[x].to_numpy(float) if numeric else np.array([categories.index(str(v)) for v in part[x]], float)
        gk = gk if isinstance(gk, tuple) else (gk,)
        series.append({"label": ", ".join(f"{g}={v}" for g, v in zip(group, gk)) or "perplexity", "x": xs,
                       "y": part.perplexity.to_numpy(float),
                       "lo": part.ci95_low.to_numpy(float) if "ci95_low" in part else None,
                       "hi": part.ci95_high.to_numpy(float) if "ci95_high" in part else None})
    view["chart"] = line_chart(series, x, "perplexity (95% interval)", xcategories=categories)
    for r in t.to_dict("records"):
        view["rows"].append({"values": [fmt_cell(r[k]) for k in keys], "ppl": fmt(r.get("perplexity")),
                             "ci": fmt_ci([r.get("ci95_low"), r.get("ci95_high")]), "bpb": fmt(r.get("bits_per_byte")),
                             "tokens": fmt_cell(r.get("scored_tokens")), "anchor": anchors.get(str(r.get("run_id")))})
    return view


# ---------------------------------------------------------------------------------------------
# Rendering


def _environment():
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("harness", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["sortv"] = sort_value
    env.filters["fmt"] = fmt
    return env


def script_source() -> str:
    from importlib.resources import files

    return files("harness").joinpath("templates", "report.js").read_text(encoding="utf-8")


@dataclass
class Report:
    html: str
    runs: int
    groups: int
    comparisons: int
    sweeps: int


def build(specs: list[str | Path], output: Path | None = None) -> Report:
    """Read the records at ``specs`` and render the page (nothing is written)."""
    run_dirs, roots = find_run_dirs(specs)
    runs = [Run(d, _load_record(d)) for d in run_dirs]
    unique_labels(runs)
    base = Path(output).parent if output else Path.cwd()
    views = [_run_view(i, run, base) for i, run in enumerate(runs, 1)]
    groups, bpb = _leaderboard(views, runs)
    anchors = {v["run_id"]: v["anchor"] for v in views}
    comparisons = [_comparison_view(p, base) for root in roots for p in sorted(root.rglob("compare.csv"))]
    sweeps = [_sweep_view(p, base, anchors) for root in roots for p in sorted(root.rglob("sweep.csv"))]
    script = script_source()
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode()
    from . import __version__

    facets = {k: sorted({v[k] for v in views}) for k in ("model", "corpus", "protocol", "precision")}
    page = _environment().get_template("report.html").render(
        views=views, groups=groups, bpb=bpb, comparisons=comparisons, sweeps=sweeps, facets=facets, note=NOTE,
        script=script, script_hash=digest, sources=[str(s) for s in specs], version=__version__,
        generated=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    )
    return Report(page, len(views), len(groups), len(comparisons), len(sweeps))


def default_output(specs: list[str | Path]) -> Path:
    first = Path(specs[0])
    if first.is_dir() and not (first / RECORD).is_file():
        return first / "report.html"
    return (first.parent if first.is_file() else first).parent / "report.html"


def _check_output(out: Path) -> None:
    if out.is_dir():
        raise HarnessError(f"-o {out} is a folder; give a file name such as {out / 'report.html'}")
    parent = out.parent
    existing = next((p for p in [parent, *parent.parents] if p.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise HarnessError(f"cannot write {out}: {existing or parent} is not a writable folder; choose another -o")
    if out.exists() and not os.access(out, os.W_OK):
        raise HarnessError(f"cannot write {out}: the file is read-only; choose another -o")


def write_report(specs: list[str | Path], output: Path | None = None) -> tuple[Path, Report]:
    """Render the page for ``specs`` and write it atomically to ``output`` (default beside the records)."""
    specs = list(specs) or ["results"]
    out = Path(output) if output else default_output(specs)
    _check_output(out)
    report = build(specs, out)
    try:
        atomic_write_text(out, report.html)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(out, 0o666 & ~umask)  # a page to open and share, not a private temporary file
    except OSError as err:
        raise HarnessError(f"cannot write {out}: {err.strerror or err}; choose another -o") from None
    return out, report


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        raise HarnessError("chromium not found: `make chromium` installs it (Debian: apt-get install chromium)")
    return found


def screenshot(page: Path, png: Path, width: int = 1400, height: int = 2000, timeout: float = 120) -> Path:
    """A PNG of the top ``height`` pixels of ``page`` rendered by headless Chromium, written atomically."""
    png = Path(png)
    _check_output(png)
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


__all__ = ["build", "write_report", "screenshot", "summary_rows", "precision", "comparable_key", "fmt", "fmt_ci"]
