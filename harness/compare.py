"""Comparing runs: one table from several result records, with an honest significance test.

Records are views on disk (``result.json`` and the ``windows.parquet`` beside it), so a
comparison never re-runs a model. Perplexity is only comparable between runs that scored the
*same tokens*: the same tokenizer, the same corpus text and length, the same protocol settings.
Precision is not among them: comparing a bf16 run with a float32 one is what comparing is for;
it is shown as the ``precision`` column (the body's dtype; the logits are float32 in both).
``check_comparable`` refuses anything else and names the field that differs. Bits per byte
divides by the bytes of the scored text instead of a token count, so it compares models with
different tokenizers (``across_tokenizers=True``), as long as the corpus and protocol match.

Conditional runs (``corpus.format: pairs | chat``) are compared sample by sample: the same rows
of the same corpus, each run's per-sample target NLL from ``samples.parquet``, the bootstrap
resampling samples. Raw pairs and the same pairs rendered as chat score different token
sequences (the chat target also holds its end-of-turn marker), so such runs are compared on
bits per byte of their targets, never on perplexity.

Significance. Two runs that scored the same windows are *paired*: the difference of their
per-unit NLL sums removes most of the corpus's own variance (hard documents are hard for both).
``paired_bootstrap`` (``paired.py``) resamples units (documents, or windows of a single stream) with replacement
and recomputes, for each resample, ``PPL_B - PPL_A = exp(sum_B / n) - exp(sum_A / n)`` on the
same drawn units; the 2.5 and 97.5 percentiles give the 95% interval of the difference, and the
difference is significant when that interval excludes zero. Unpaired runs (no windows file, or
different windows) fall back to asking whether the two 95% intervals are disjoint, which is
conservative and said so in the table.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from . import files
from .errors import HarnessError
from .paired import paired_bootstrap
from .results import RECORD, WINDOWS, atomic_write_text, iter_records, read_frame, read_record

WINDOW_KEYS = ["doc", "begin", "end", "score_begin", "score_end", "prefix", "replace_first"]
# settings that follow from the tokenizer itself (whether it adds BOS), not from the user's choice
TOKENIZER_DEPENDENT = {"tokenizer.fingerprint", "corpus.tokens", "protocol.bos", "protocol.add_special_tokens"}
NOTE = (
    "Perplexity compares only runs on the same tokens (tokenizer, corpus and protocol checked); "
    "bits per byte also compares across tokenizers."
)


# ---------------------------------------------------------------------------------------------
# Finding records


@dataclass
class Run:
    path: Path  # the run folder
    record: dict

    @property
    def label(self) -> str:
        return str(self.record.get("name") or self.record.get("run_id") or self.path.name)

    def windows(self) -> pd.DataFrame | None:
        f = self.path / WINDOWS
        return read_frame(f) if f.is_file() else None

    @property
    def conditional(self) -> bool:
        return "conditional" in self.record

    def samples(self) -> pd.DataFrame | None:
        f = self.path / "samples.parquet"
        return read_frame(f) if f.is_file() else None


def _expand(spec: str) -> Iterator[Path]:
    p = Path(spec)
    if p.is_file():
        yield p.parent
    elif p.is_dir() and (p / RECORD).is_file():
        yield p
    elif p.is_dir():
        yield from (f.parent for f, _ in iter_records(p))
    else:
        for m in sorted(glob.glob(spec)):
            if Path(m).is_dir() or Path(m).name == RECORD:
                yield from _expand(m)


def unique_labels(runs: list[Run]) -> None:
    """Runs that share a name (e.g. the points of a sweep) are labelled by their folder instead."""
    names = [r.label for r in runs]
    for r in runs:
        if names.count(r.label) > 1:
            r.record = {**r.record, "name": r.path.name}


def find_runs(specs: list[str]) -> list[Run]:
    """Run folders from paths to run folders, result.json files, results folders or globs."""
    runs, seen = [], set()
    for spec in specs:
        found = list(_expand(str(spec)))
        if not found:
            raise HarnessError(f"no result records at '{spec}': give run folders, result.json files, a results folder or a glob")
        for d in found:
            if d.resolve() not in seen:
                seen.add(d.resolve())
                runs.append(Run(d, read_record(d)))
    unique_labels(runs)
    return runs


# ---------------------------------------------------------------------------------------------
# Comparability


def _get(record: dict, dotted: str):
    node = record
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


# conditional runs (pairs, chat) of the same samples may render them differently (raw or as chat):
# they are compared sample by sample, on the same rows of the same corpus
SAMPLE_FIELDS = ["config.corpus.dataset", "config.corpus.config", "config.corpus.split", "config.corpus.path",
                 "config.corpus.prompt_field", "config.corpus.target_field", "config.corpus.messages_field",
                 "config.corpus.max_documents", "conditional.samples"]


def comparable_fields(a: dict, b: dict) -> list[str]:
    keys = set((a.get("protocol") or {})) | set((b.get("protocol") or {}))
    if "conditional" in a and "conditional" in b:
        return ["tokenizer.fingerprint", *SAMPLE_FIELDS, "protocol.format", "protocol.max_length", "protocol.stride"]
    return ["tokenizer.fingerprint", "corpus.text_sha256", "config.corpus.max_tokens", "corpus.tokens",
            *(f"protocol.{k}" for k in sorted(keys))]


def rendered_differently(runs: list[Run]) -> bool:
    """Conditional runs whose rendered texts differ (e.g. raw pairs and the same pairs as chat)."""
    return all(r.conditional for r in runs) and len({_get(r.record, "corpus.text_sha256") for r in runs}) > 1


def check_comparable(base: Run, other: Run, across_tokenizers: bool = False) -> None:
    """Raise HarnessError naming the first field that makes ``other`` incomparable with ``base``."""
    for name in comparable_fields(base.record, other.record):
        if across_tokenizers and name in TOKENIZER_DEPENDENT:
            continue
        va, vb = _get(base.record, name), _get(other.record, name)
        if va != vb:
            if name in TOKENIZER_DEPENDENT and not across_tokenizers:
                fix = "perplexity needs the same tokens; pass --bits-per-byte to compare bits per byte across tokenizers"
            else:
                fix = "compare runs of the same corpus text and protocol settings"
            raise HarnessError(f"{name} differs: {base.label} has {va!r}, {other.label} has {vb!r}; {fix}")


def paired_units(wa: pd.DataFrame, wb: pd.DataFrame, denom: str = "tokens") -> tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """Per-unit (nll_a, nll_b, denom_a, denom_b) when two runs scored the same units, else None.

    For tokens: the same windows (spans and counts). For bytes across tokenizers: the same
    documents (windows then differ, so a single stream cannot be paired).
    """
    if denom == "tokens":
        ka = wa.sort_values(WINDOW_KEYS).reset_index(drop=True)
        kb = wb.sort_values(WINDOW_KEYS).reset_index(drop=True)
        if len(ka) != len(kb) or not ka[WINDOW_KEYS + ["tokens"]].equals(kb[WINDOW_KEYS + ["tokens"]]):
            return None
        if ka.doc.nunique() > 1:
            ga, gb = ka.groupby("doc", sort=True), kb.groupby("doc", sort=True)
            return ("documents", ga.sum_nll.sum().to_numpy(), gb.sum_nll.sum().to_numpy(),
                    ga.tokens.sum().to_numpy(), gb.tokens.sum().to_numpy())
        return "windows", ka.sum_nll.to_numpy(), kb.sum_nll.to_numpy(), ka.tokens.to_numpy(), kb.tokens.to_numpy()
    ga, gb = wa.groupby("doc").agg({"sum_nll": "sum", denom: "sum"}), wb.groupby("doc").agg({"sum_nll": "sum", denom: "sum"})
    if len(ga) < 2 or not ga.index.equals(gb.index):
        return None
    return "documents", ga.sum_nll.to_numpy(), gb.sum_nll.to_numpy(), ga[denom].to_numpy(), gb[denom].to_numpy()


# ---------------------------------------------------------------------------------------------
# The comparison table


@dataclass
class Comparison:
    table: pd.DataFrame
    baseline: str
    metric: str  # what the delta, interval and verdict are about
    note: str
    runs: list[Run] = field(repr=False, default_factory=list)

    def markdown(self) -> str:
        return self.table.to_markdown(index=False, floatfmt=".4f") + f"\n\n{self.note}\n"


def _pick_baseline(runs: list[Run], baseline: str | None) -> Run:
    if baseline is None:
        return runs[0]
    for r in runs:
        if baseline in (r.label, r.record.get("run_id"), r.path.name, str(r.path)):
            return r
    labels = ", ".join(r.label for r in runs)
    raise HarnessError(f"--baseline: no run named '{baseline}' among {labels}; give one of those names")


KL_DETAILS = ["median", "p90", "p99", "max", "rms_delta_p", "ppl_ratio"]


def _precision(record: dict) -> str | None:
    """The body's dtype (and ``auto`` when it was resolved): a setting runs may differ in, shown."""
    p = record.get("precision")
    if p is None:  # records made before the precision section
        return ((record.get("config") or {}).get("model") or {}).get("dtype")
    return p["body"] + (" (auto)" if p.get("requested") == "auto" else "")


def _row(run: Run, kl_details: bool = False) -> dict:
    r, cfg = run.record, run.record.get("config") or {}
    model = cfg.get("model") or {}
    ci = r.get("ci95") or [None, None]
    return {
        "run": run.label,
        "model": model.get("gguf_file") or model.get("name_or_path"),
        "precision": _precision(r),
        "quantize": model.get("quantize") or "-",
        "scored_tokens": r.get("scored_tokens"),
        "perplexity": r.get("perplexity"),
        "ci95_low": ci[0],
        "ci95_high": ci[1],
        "bits_per_byte": r.get("bits_per_byte"),
        # KL mode records: against the run's own baseline_model, not the table's baseline
        "kl_mean": (r.get("kl") or {}).get("mean"),
        "kl_top1_agreement": (r.get("kl") or {}).get("top1_agreement"),
        **({f"kl_{k}": (r.get("kl") or {}).get(k) for k in KL_DETAILS} if kl_details else {}),
    }


def compare(
    specs: list[str], baseline: str | None = None, *, across_tokenizers: bool = False, samples: int = 1000, seed: int = 0,
    kl_details: bool = False,
) -> Comparison:
    """The comparison table of the runs found at ``specs`` against ``baseline`` (default: the first)."""
    runs = find_runs(specs)
    if len(runs) < 2:
        raise HarnessError(f"compare needs at least two runs, found {len(runs)} at {' '.join(map(str, specs))}")
    if kl_details and not any(r.record.get("kl") for r in runs):
        raise HarnessError("--kl: none of these records has KL statistics (runs with a baseline_model have); leave --kl out")
    base = _pick_baseline(runs, baseline)
    # raw pairs against the same pairs as chat score different tokens: bits per byte, by sample
    across_tokenizers = across_tokenizers or rendered_differently(runs)
    for r in runs:
        check_comparable(base, r, across_tokenizers)
    metric = "bits_per_byte" if across_tokenizers else "perplexity"
    base_win = base.windows()
    rows = []
    for run in [base, *(r for r in runs if r is not base)]:
        row = _row(run, kl_details)
        row["compared_on"] = (
            "bits per byte of the targets, by sample (renderings differ)" if rendered_differently(runs)
            else "bits per byte (tokenizers may differ)" if across_tokenizers else "perplexity (same tokens)"
        )
        ppl, bppl = run.record.get("perplexity"), base.record.get("perplexity")
        bpb, bbpb = run.record.get("bits_per_byte"), base.record.get("bits_per_byte")
        row["delta_ppl"] = None if across_tokenizers else ppl - bppl
        row["ppl_ratio"] = None if across_tokenizers else ppl / bppl
        row["delta_bpb"] = bpb - bbpb if bpb is not None and bbpb is not None else None
        row.update({"delta_ci95_low": None, "delta_ci95_high": None, "significant": None, "test": "baseline"})
        if run is not base:
            row.update(_significance(base, run, base_win, metric, samples, seed))
        rows.append(row)
    note = NOTE + f" Deltas are against {base.label}; 'significant' means the 95% interval of the {metric.replace('_', ' ')} difference excludes zero."
    table = pd.DataFrame(rows)
    if table.kl_mean.isna().all():
        table = table.drop(columns=[c for c in table.columns if c.startswith("kl_")])
    else:
        note += " kl_mean (nats per token) and kl_top1_agreement are against each run's own baseline_model (KL mode)."
    return Comparison(table, base.label, metric, note, runs)


def sample_units(base: Run, run: Run, metric: str):
    """Per-sample (nll_a, nll_b, denom_a, denom_b) of two conditional runs, paired by sample, or None."""
    sa, sb = base.samples(), run.samples()
    if sa is None or sb is None:
        return None
    sa, sb = sa.sort_values("sample").reset_index(drop=True), sb.sort_values("sample").reset_index(drop=True)
    if len(sa) < 2 or not sa["sample"].equals(sb["sample"]):
        return None
    denom = "target_tokens" if metric == "perplexity" else "target_bytes"
    return sa.target_nll.to_numpy(), sb.target_nll.to_numpy(), sa[denom].to_numpy(), sb[denom].to_numpy()


def _significance(base: Run, run: Run, base_win, metric: str, samples: int, seed: int) -> dict:
    if base.conditional and run.conditional:
        units = sample_units(base, run, metric)
        if units is not None:
            a, b, da, db = units
            res = paired_bootstrap(a, b, da, db, metric=metric, samples=samples, seed=seed)
            return {"delta_ci95_low": res.ci95[0], "delta_ci95_high": res.ci95[1], "significant": res.significant,
                    "test": f"paired bootstrap over {len(a)} samples"}
    win = run.windows()
    units = None
    if base_win is not None and win is not None:
        units = paired_units(base_win, win, "tokens" if metric == "perplexity" else "bytes")
    if units is not None:
        unit, a, b, da, db = units
        res = paired_bootstrap(a, b, da, db, metric=metric, samples=samples, seed=seed)
        return {"delta_ci95_low": res.ci95[0], "delta_ci95_high": res.ci95[1], "significant": res.significant,
                "test": f"paired bootstrap over {len(a)} {unit}"}
    if metric != "perplexity":
        return {"test": "none: bits per byte pairs documents, and these runs are one stream each"}
    lo_a, hi_a = base.record.get("ci95") or [None, None]
    lo_b, hi_b = run.record.get("ci95") or [None, None]
    if None in (lo_a, hi_a, lo_b, hi_b):
        return {"test": "no intervals"}
    return {"significant": bool(hi_b < lo_a or hi_a < lo_b), "test": "unpaired: 95% intervals disjoint (conservative)"}


def write_comparison(comp: Comparison, out_dir: Path, plot: bool = False) -> list[Path]:
    """compare.csv, compare.md (and compare.png) in ``out_dir``."""
    out_dir = Path(out_dir)
    csv_path, md_path, png_path = out_dir / "compare.csv", out_dir / "compare.md", out_dir / "compare.png"
    paths = [csv_path, md_path] + ([png_path] if plot else [])
    files.writable_folder(out_dir)  # every output checked before the first is written
    for path in paths:
        if path.is_dir() or (path.exists() and not os.access(path, os.W_OK)):
            why = "a folder is in its place" if path.is_dir() else "the file is read-only"
            raise HarnessError(f"cannot write {path}: {why}; remove it or choose another -o")
    if plot:
        from .plots import plot_compare

        plot_compare(comp.table, png_path)
    atomic_write_text(csv_path, comp.table.to_csv(index=False))
    atomic_write_text(md_path, comp.markdown())
    return paths


def default_output(specs: list[str], runs: list[Run]) -> Path:
    """A single results folder given: there; otherwise the parent of the first run."""
    if len(specs) == 1 and Path(specs[0]).is_dir() and not (Path(specs[0]) / RECORD).is_file():
        return Path(specs[0])
    return runs[0].path.parent
