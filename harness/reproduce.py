"""``ppl reproduce``: re-run published perplexity figures and compare.

The registry is a folder of YAML files shipped in the package (``harness/registry/``, found
through ``importlib.resources``, so an installed wheel has it too), one published figure each::

    description: gpt2-large, HF guide, L = 1024, S = 512
    source: Hugging Face transformers, docs/source/en/perplexity.md
    metric: perplexity            # which number of the result record is compared
    expected: 16.44
    tolerance: 0.02               # absolute; |got - expected| <= tolerance passes
    notes: why a small difference is expected, if any
    run:                          # a whole run config (model, corpus, eval), as for `ppl run`
      model: {name_or_path: gpt2-large}
      corpus: {dataset: Salesforce/wikitext, config: wikitext-2-raw-v1}
      eval: {protocol: sliding, max_length: 1024, stride: 512}

``reproduce(names)`` runs every entry whose model (and corpus) can be loaded here and returns
one row per entry; entries that cannot run (a hub model not in the local cache while offline, a
package not installed) are skipped with the reason. Each model is loaded once for all of its
entries. An entry whose run fails is marked ``error`` and the others still run. The CLI prints
``format_table(rows)`` and fails when an entry is out of tolerance or failed.
"""

from __future__ import annotations

import importlib.util
import math
import os
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .config import ModelConfig, RunConfig, _format_errors
from .errors import ConfigError, HarnessError
from .files import reading
from .models import ModelPool, model_key
from .overrides import safe_load_unique

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

REGISTRY = "registry"  # the entries ship inside the package (package data): harness/registry/*.yaml

Metric = Literal[
    "perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte", "rescaled_perplexity", "macro_perplexity",
]


class Entry(BaseModel):
    """One published figure and the run that should reproduce it."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    description: str
    source: str = Field(description="Where the figure is published: paper table, doc page, README.")
    metric: Metric = "perplexity"
    expected: float
    tolerance: float = Field(gt=0, description="Absolute tolerance on the metric.")
    must_match: bool = Field(
        True, description="False for figures the harness cannot reproduce exactly (the notes say why): shown, never failed."
    )
    notes: str | None = None
    run: RunConfig

    @model_validator(mode="after")
    def _pinned_precision(self) -> "Entry":
        # a figure was made at one precision; `auto` would change it with the machine
        for key, m in (("run.model", self.run.model), ("run.baseline_model", self.run.baseline_model)):
            if m is not None and m.dtype == "auto":
                raise ValueError(f"{key}.dtype: pin the precision the figure was made at (e.g. float32), not auto")
        return self


def registry_dir(path: str | Path | None = None) -> Traversable:
    """The folder of entries: ``path``, else ``$PPL_REPRODUCE_DIR``, else the package's own."""
    path = path or os.environ.get("PPL_REPRODUCE_DIR")
    return Path(path) if path else resources.files(__package__) / REGISTRY


def load_entries(path: str | Path | None = None) -> dict[str, Entry]:
    """Every entry of the registry, by file stem, validated (all problems of a file in one error)."""
    folder = registry_dir(path)
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".yaml")), key=lambda f: f.name) if folder.is_dir() else []
    if not files:
        raise HarnessError(f"reproduce: no entries (*.yaml) in {folder}; pass --registry with the folder of entries")
    return {f.name.removesuffix(".yaml"): _read_entry(f) for f in files}


ENTRY_FIX = "save the entry as UTF-8 YAML, or move it out of the registry"


def _read_entry(f: Traversable) -> Entry:
    """One entry file, validated. As for configs (``config.read_yaml``), a file that cannot be read
    (a folder, not UTF-8, unreadable) or parsed is one line naming it, not a traceback; the file
    may sit inside an installed package, so it is read through ``Traversable``, not as a Path."""
    if f.is_dir():
        raise HarnessError(f"reproduce: {f} is a folder, not an entry; an entry is a YAML file (rename or move the folder)")
    with reading(str(f), "reproduce", "registry entry", ENTRY_FIX):
        try:
            data = safe_load_unique(f.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(err, "problem", None) or ""
            fix = f": {problem}" if "given twice" in problem else " (fix the syntax)"
            raise ConfigError([f"YAML does not parse{where}{fix}"], str(f)) from None
        try:
            return Entry.model_validate(data)
        except ValidationError as err:
            raise ConfigError(_format_errors(err), str(f)) from None


def select(entries: dict[str, Entry], names: list[str] | None) -> dict[str, Entry]:
    if not names:
        return entries
    unknown = [n for n in names if n not in entries]
    if unknown:
        raise HarnessError(f"reproduce: unknown entry '{unknown[0]}'; known entries: {', '.join(entries)}")
    return {n: entries[n] for n in names}


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def _hub_cached(repo_id: str, revision: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    for name in ("config.json", "tokenizer_config.json"):
        hit = try_to_load_from_cache(repo_id, name, revision=revision)
        if isinstance(hit, str):
            return True
    return False


def _model_unavailable(m: ModelConfig) -> str | None:
    name = m.name_or_path
    if name.startswith("pkg:"):
        package = name[4:]
        return None if importlib.util.find_spec(package) else f"package '{package}' is not installed (make models)"
    if name.startswith((".", "/", "~")) or Path(name).expanduser().exists():
        return None if Path(name).expanduser().is_dir() else f"model folder {name} not found"
    if _offline() and not _hub_cached(name, m.revision):
        return f"hub model '{name}' is not in the local Hugging Face cache and the hub is offline (HF_HUB_OFFLINE=1)"
    return None


def unavailable(entry: Entry) -> str | None:
    """Why this entry cannot run here, or None when it can."""
    cfg = entry.run
    reason = _model_unavailable(cfg.model)
    if reason is None and cfg.model.tokenizer:
        reason = _model_unavailable(cfg.model.model_copy(update={"name_or_path": cfg.model.tokenizer, "gguf_file": None}))
    if reason:
        return reason
    if cfg.corpus.dataset:
        from .corpus import _offline as datasets_offline, find_in_mirror

        if datasets_offline() and find_in_mirror(cfg.corpus) is None:
            return f"corpus '{cfg.corpus.dataset}' ({cfg.corpus.config}) is not in the local mirror and the hub is offline"
    elif cfg.corpus.path and not Path(cfg.corpus.path).is_file():
        return f"corpus file {cfg.corpus.path} not found"
    return None


def metric_value(record: dict, metric: str) -> float | None:
    if metric == "macro_perplexity":
        return (record.get("domains") or {}).get("macro_perplexity")
    return record.get(metric)


@dataclass
class Row:
    name: str
    metric: str
    expected: float
    tolerance: float
    status: str  # "ok", "FAIL", "differs" (a must_match: false entry out of tolerance), "skipped" or "error"
    got: float | None = None
    seconds: float | None = None
    reason: str | None = None
    source: str = ""

    @property
    def difference(self) -> float | None:
        return None if self.got is None else self.got - self.expected


def reproduce(
    names: list[str] | None = None,
    registry: str | Path | None = None,
    pool: ModelPool | None = None,
    progress: bool = False,
    output_dir: str | Path | None = None,
) -> list[Row]:
    """Run the selected entries (all by default) that can run here; one ``Row`` per entry.

    Models come from ``pool`` (tests ``put`` the session's model there): each distinct model
    config (``models.model_key``) is loaded once, its entries run back to back, one model in
    memory at a time. An entry whose run fails, for whatever reason, is marked ``error`` with
    the reason and the others still run. With ``output_dir`` each run's record is written to
    ``output_dir/<entry name>/``.
    """
    entries = select(load_entries(registry), names)
    pool = pool if pool is not None else ModelPool()
    rows: list[Row] = []
    runnable = []
    for name, e in entries.items():
        row = Row(name, e.metric, e.expected, e.tolerance, "skipped", source=e.source)
        row.reason = unavailable(e)
        rows.append(row)
        if row.reason is None:
            runnable.append((row, e))
    runnable.sort(key=lambda re_: model_key(re_[1].run.model))  # one load per distinct model
    for row, e in runnable:
        t0 = time.perf_counter()
        try:
            got = _run_entry(row.name, e, pool, progress, output_dir)
        except HarnessError as err:
            row.status, row.reason = "error", str(err)
            continue
        except Exception as err:  # noqa: BLE001  (one broken entry must not end the table)
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            row.status, row.reason = "error", f"{type(err).__name__}: {first}" if first else type(err).__name__
            continue
        row.seconds = time.perf_counter() - t0
        row.got = got
        if row.got is None or not math.isfinite(row.got):
            row.status, row.reason = "error", f"the run's record has no finite {e.metric}"
        else:
            within = abs(row.got - row.expected) <= row.tolerance
            row.status = "ok" if within else ("FAIL" if e.must_match else "differs")
            row.reason = None if within else (
                f"|difference| > tolerance {row.tolerance:g}" if e.must_match else "not expected to match: see the entry's notes"
            )
    return rows


def _run_entry(name: str, e: Entry, pool: ModelPool, progress: bool, output_dir: str | Path | None) -> float | None:
    """The entry's metric, from one run (the model is the pool's: no reference outlives the call)."""
    from .runner import run

    model, tok = pool.get(e.run.model)
    out = Path(output_dir) / name if output_dir else None
    result = run(e.run, out, model=model, tokenizer=tok, progress=progress, write=out is not None)
    return metric_value(result.record, e.metric)


def format_table(rows: list[Row]) -> str:
    """A markdown table: expected, got, difference, within tolerance, and why a row was skipped."""
    import pandas as pd

    def num(x, fmt=".4f"):
        return "" if x is None else format(x, fmt)

    frame = pd.DataFrame(
        [
            {
                "entry": r.name,
                "metric": r.metric,
                "expected": num(r.expected),
                "got": num(r.got),
                "difference": num(r.difference, "+.4f"),
                "tolerance": num(r.tolerance, "g"),
                "status": r.status,
                "seconds": num(r.seconds, ".1f"),
                "note": r.reason or "",
            }
            for r in rows
        ]
    )
    return frame.to_markdown(index=False, disable_numparse=True)
