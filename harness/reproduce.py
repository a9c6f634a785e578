"""``ppl reproduce``: re-run published perplexity figures and compare.

The registry is a folder of YAML files (``configs/reproduce/``), one published figure each::

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
entries. The CLI prints ``format_table(rows)`` and fails when an entry is out of tolerance.
"""

from __future__ import annotations

import importlib.util
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .config import ModelConfig, RunConfig, _format_errors
from .errors import ConfigError, HarnessError

REGISTRY = Path(__file__).resolve().parent.parent / "configs" / "reproduce"

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


def registry_dir(path: str | Path | None = None) -> Path:
    return Path(path) if path else Path(os.environ.get("PPL_REPRODUCE_DIR", REGISTRY))


def load_entries(path: str | Path | None = None) -> dict[str, Entry]:
    """Every entry of the registry, by file stem, validated (all problems of a file in one error)."""
    folder = registry_dir(path)
    files = sorted(folder.glob("*.yaml"))
    if not files:
        raise HarnessError(f"reproduce: no entries (*.yaml) in {folder}; pass --registry with the folder of entries")
    out = {}
    for f in files:
        try:
            out[f.stem] = Entry.model_validate(yaml.safe_load(f.read_text(encoding="utf-8")))
        except ValidationError as err:
            raise ConfigError(_format_errors(err), str(f)) from None
        except yaml.YAMLError:
            raise ConfigError(["YAML does not parse (fix the syntax)"], str(f)) from None
    return out


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


def model_key(m: ModelConfig) -> tuple:
    """Entries whose models are loaded the same way share one loaded model."""
    return (m.name_or_path, m.gguf_file, m.tokenizer, m.revision, m.dtype, m.device, m.device_map, m.attn_implementation)


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
    loaded: dict | None = None,
    progress: bool = False,
    output_dir: str | Path | None = None,
) -> list[Row]:
    """Run the selected entries (all by default) that can run here; one ``Row`` per entry.

    ``loaded`` maps ``model_key(model config)`` to an already loaded ``(model, tokenizer)``
    (tests pass the session's model); other models are loaded here, one at a time. With ``output_dir``
    each run's record is written to ``output_dir/<entry name>/``.
    """
    from .models import load_model, load_tokenizer
    from .runner import run

    entries = select(load_entries(registry), names)
    given = loaded or {}
    current_key, current = None, None  # the one model loaded here, kept while its entries run
    rows: list[Row] = []
    runnable = []
    for name, e in entries.items():
        row = Row(name, e.metric, e.expected, e.tolerance, "skipped", source=e.source)
        row.reason = unavailable(e)
        rows.append(row)
        if row.reason is None:
            runnable.append((row, e))
    # one model load per distinct model, its entries run back to back
    runnable.sort(key=lambda re_: str(model_key(re_[1].run.model)))
    for row, e in runnable:
        key = model_key(e.run.model)
        t0 = time.perf_counter()
        try:
            if key in given:
                model, tok = given[key]
            else:
                if key != current_key:
                    current = None  # free the previous model before loading the next
                    current, current_key = (load_model(e.run.model), load_tokenizer(e.run.model)), key
                model, tok = current
            out = Path(output_dir) / row.name if output_dir else None
            result = run(e.run, out, model=model, tokenizer=tok, progress=progress, write=out is not None)
        except HarnessError as err:
            row.status, row.reason = "error", str(err)
            continue
        row.seconds = time.perf_counter() - t0
        row.got = metric_value(result.record, e.metric)
        if row.got is None or not math.isfinite(row.got):
            row.status, row.reason = "error", f"the run's record has no finite {e.metric}"
        else:
            within = abs(row.got - row.expected) <= row.tolerance
            row.status = "ok" if within else ("FAIL" if e.must_match else "differs")
            row.reason = None if within else (
                f"|difference| > tolerance {row.tolerance:g}" if e.must_match else "not expected to match: see the entry's notes"
            )
    return rows


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
