"""The result record: what a run produced, assembled from the run's parts into one dict.

A record is self-describing: the metrics, how they were computed (the resolved protocol and
config, and a hash of everything that decides the number), what produced them (model,
tokenizer, corpus, versions) and what it cost (timings, memory). Each section has its own small
builder here; ``runner.run`` gathers the parts and calls ``build``. The per-window and
per-position tables that go beside the record are made here too.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import resource
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import __version__
from .accumulate import (
    PositionStats, WindowRecord, bootstrap_ci, bootstrap_units, domain_metrics, metrics, rescaled, running_perplexity, total,
)
from .config import RunConfig
from .models import describe_tokenizer, max_positions
from .tokenization import tokenizer_fingerprint


@dataclass
class Result:
    """What a run produced: the record (as written to result.json) and the per-window table."""

    record: dict
    windows: pd.DataFrame
    run_dir: Path | None = None
    positions: pd.DataFrame | None = field(default=None, repr=False)
    samples: pd.DataFrame | None = field(default=None, repr=False)  # conditional corpora: one row per sample

    def __getitem__(self, key: str):
        return self.record[key]

    @property
    def perplexity(self) -> float:
        return self.record["perplexity"]

    @property
    def scored_tokens(self) -> int:
        return self.record["scored_tokens"]


CONDITIONAL_KEYS = ("format", "prompt_field", "target_field", "separator", "as_chat", "messages_field", "score_roles", "chat_template")


def config_hash(cfg: RunConfig, settings, precision: dict | None = None) -> str:
    """Hash of everything that decides the number (not where it is written, nor its label).

    ``precision`` (the record's section): the body dtype ``auto`` resolved to is hashed, and in
    bf16/fp16, where the batch composition changes the last digits, so are the batching keys.
    """
    payload = cfg.model_dump(mode="json", exclude={"output": True, "name": True})
    payload["model"].pop("offload_folder", None)  # where offloaded weights wait cannot change a number
    if precision is None or precision["batch_invariant"]:
        payload["eval"].pop("sort_by_length", None)  # in float32 batching cannot change a number
        payload["eval"].pop("batch_size", None)
        payload["eval"].pop("max_batch_size", None)
    # what eval.compile decided is hashed, not the setting (fused kernels round the last digits
    # their own way); an uncompiled run hashes as it did before ``auto`` existed
    payload["eval"]["compile"] = bool(((precision or {}).get("compile") or {}).get("on", cfg.eval.compile is True))
    if precision is not None:
        payload["precision_body"] = precision["body"]
    for key in ("streaming", "cache"):  # how the corpus is read cannot change a number either
        payload["corpus"].pop(key, None)
    if payload["corpus"].get("format", "text") == "text":  # conditional keys, unused by plain text
        for key in CONDITIONAL_KEYS:
            payload["corpus"].pop(key, None)
    payload["settings"] = settings.as_dict()
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def run_id(cfg: RunConfig, settings, chash: str, output_dir: str | Path | None) -> str:
    """``output.run_id``, else the output folder's name, else time, model, protocol and hash."""
    if cfg.output.run_id:
        return cfg.output.run_id
    if output_dir:
        return Path(output_dir).name
    label = cfg.name or Path(cfg.model.gguf_file or cfg.model.name_or_path).stem
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", label).strip("-")[:40] or "model"
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{slug}-{settings.protocol}-{chash[:8]}"


def peak_memory_bytes() -> int:
    """This process's peak resident memory (ru_maxrss: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if platform.system() == "Darwin" else rss * 1024


def versions(extra: dict | None = None) -> dict:
    """The harness's version and commit, Python's, and the libraries' (``extra``: e.g. accelerate)."""
    from importlib.metadata import PackageNotFoundError, version

    import torch
    import transformers

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    try:  # datasets is needed only for a hub corpus (a mirrored parquet is read without it)
        datasets_version = version("datasets")
    except PackageNotFoundError:
        datasets_version = None
    return {
        "harness": __version__,
        "harness_commit": commit,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets_version,
        **(extra or {}),
        "numpy": np.__version__,
    }


def metrics_section(records: list[WindowRecord], cfg: RunConfig) -> dict:
    """The numbers: totals, metrics, the 95% interval (bootstrap where it can) and per-domain figures."""
    sums = total(records)
    m = metrics(sums)
    unit, unit_nll, unit_tokens = bootstrap_units(records)
    boot = bootstrap_ci(unit_nll, unit_tokens, cfg.eval.bootstrap, cfg.eval.seed)
    return {
        **m,
        "rescaled_perplexity": rescaled(sums.sum_nll, cfg.eval.rescale_tokens),
        "ci95": boot or m["ci95_normal"],
        "ci95_method": f"bootstrap over {unit} ({cfg.eval.bootstrap} resamples)" if boot else "normal",
        "domains": domain_metrics(records),
    }


def model_section(model) -> dict:
    first = next(model.parameters())
    return {
        "class": type(model).__name__,
        "model_type": getattr(model.config, "model_type", None),
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(first.dtype).removeprefix("torch."),
        "max_positions": max_positions(model),
    }


def tokenizer_section(tokenizer) -> dict:
    return {**describe_tokenizer(tokenizer), "fingerprint": tokenizer_fingerprint(tokenizer)[:16]}


def corpus_section(cfg: RunConfig, corpus, documents_mode: bool) -> dict:
    streams = corpus.streams
    return {
        "documents": corpus.documents if documents_mode else None,
        "streams": len(streams),
        "tokens": int(sum(len(s) for s in streams)),
        "text_sha256": corpus.text_sha256,
        "streaming": cfg.corpus.streaming,
        "token_cache": corpus.cache,
    }


def build(*, run_id: str, cfg: RunConfig, settings, chash: str, records: list[WindowRecord], timing: dict,
          run: dict, model, tokenizer, corpus, versions: dict, precision: dict | None = None) -> dict:
    """The whole record. ``timing``: tokens/s, wall and stage seconds, memory; ``run``: batch
    size, world size, resumed windows, device, the CPU allocator's settings."""
    return {
        "run_id": run_id,
        "name": cfg.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **metrics_section(records, cfg),
        **timing,
        **run,
        "protocol": settings.as_dict(),
        "config": cfg.model_dump(mode="json"),
        "config_hash": chash,
        "precision": precision,
        "model": model_section(model),
        "tokenizer": tokenizer_section(tokenizer),
        "corpus": corpus_section(cfg, corpus, settings.mode == "documents"),
        "versions": versions,
    }


def windows_frame(records: list[WindowRecord], extra_rows: list[dict] | None = None) -> pd.DataFrame:
    """One row per window (the record's parts), with the running perplexity after each;
    ``extra_rows`` (dicts with an ``index``) add columns, e.g. each window's KL statistics."""
    frame = pd.DataFrame([asdict(r) for r in records]).assign(running_perplexity=running_perplexity(records))
    return frame.merge(pd.DataFrame(extra_rows), on="index", how="left") if extra_rows else frame


def positions_frame(positions: PositionStats) -> pd.DataFrame:
    """Mean NLL by input position, over the positions that scored anything."""
    pos = pd.DataFrame({"position": np.arange(len(positions.count)), "sum_nll": positions.sum_nll, "count": positions.count})
    return pos[pos["count"] > 0].assign(mean_nll=lambda d: d.sum_nll / d["count"])
