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
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .charts import Chart, interval_bars, line_chart
from .compare import NOTE, TOKENIZER_DEPENDENT, Run, _get, comparable_fields, unique_labels
from .errors import HarnessError
from .files import writable_output
from .results import RECORD, WINDOWS, atomic_write_text, read_frame, read_record, table_row
from .summary import fmt, fmt_ci, fmt_cell, precision, sort_value, summary_rows

POSITIONS = "positions.parquet"
SAMPLES = "samples.parquet"
WORST_SAMPLES = 10
POSITION_BINS = 128


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


def _parquet(path: Path) -> pd.DataFrame | None:
    return read_frame(path) if path.is_file() else None


# the columns of compare.csv and sweep.csv the page draws, numbers where present
CSV_NUMBERS = ("perplexity", "ci95_low", "ci95_high", "bits_per_byte", "delta_ppl", "delta_ci95_low", "delta_ci95_high", "scored_tokens")


def _csv(path: Path) -> pd.DataFrame:
    fix = "re-run the command that wrote it or remove it"
    try:
        t = pd.read_csv(path)
    except Exception as err:
        raise HarnessError(f"cannot read {path}: {str(err).splitlines()[0]}; {fix}") from None
    for col in CSV_NUMBERS:
        if col in t.columns and not pd.api.types.is_numeric_dtype(t[col]):
            raise HarnessError(f"{path}: column '{col}' holds text where numbers belong; {fix}")
    return t


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
    runs = [Run(d, read_record(d)) for d in run_dirs]
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


def write_report(specs: list[str | Path], output: Path | None = None) -> tuple[Path, Report]:
    """Render the page for ``specs`` and write it atomically to ``output`` (default beside the records)."""
    specs = list(specs) or ["results"]
    out = Path(output) if output else default_output(specs)
    writable_output(out)
    report = build(specs, out)
    try:
        atomic_write_text(out, report.html)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(out, 0o666 & ~umask)  # a page to open and share, not a private temporary file
    except OSError as err:
        raise HarnessError(f"cannot write {out}: {err.strerror or err}; choose another -o") from None
    return out, report


__all__ = ["build", "write_report", "comparable_key"]
