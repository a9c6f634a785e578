"""What a record says, as text: the summary ``ppl run`` prints (and the report shows), and the
formatting of record numbers (the only arithmetic on them: how many digits to show)."""

from __future__ import annotations

import math

import numpy as np

from .precision import summary_line




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
    return str((record.get("model") or {}).get("dtype") or ((record.get("config") or {}).get("model") or {}).get("dtype") or "n/a")
