"""The runner: ``run(config) -> Result``, the whole data flow in order.

config -> corpus -> tokens -> window plan -> scoring -> accumulation -> gather -> record -> table.

Each step lives in its own module; this one only sequences them, times them and writes the
outputs. No record is written until every window is scored and the metrics are finite, so a
failed run leaves nothing half-written in the results folder; finished windows go to a resume
log as they are scored (resume.py), so a rerun of a killed run continues where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import resource
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import __version__, protocols
from .accumulate import (
    PositionStats, WindowRecord, bootstrap_ci, bootstrap_units, domain_metrics, metrics, override_counts, rescaled, running_perplexity,
    total,
)
from .config import RunConfig
from .batching import choose_batch_size
from .tokenization import tokenized_corpus, tokenizer_fingerprint
from .resume import Finished, ResumeLog, interrupted, is_padding, padding, positions_of, recorder, remaining
from .distributed import Distributor
from .errors import HarnessError
from .models import adds_bos, describe_tokenizer, load_model, load_tokenizer, max_positions
from .results import WINDOWS, write_frame, write_record, write_table
from .scoring import build_batch, check_finite, input_device, token_nlls
from .tokens import TokenStream


@dataclass
class Result:
    """What a run produced: the record (as written to result.json) and the per-window table."""

    record: dict
    windows: pd.DataFrame
    run_dir: Path | None = None
    positions: pd.DataFrame | None = field(default=None, repr=False)

    def __getitem__(self, key: str):
        return self.record[key]

    @property
    def perplexity(self) -> float:
        return self.record["perplexity"]

    @property
    def scored_tokens(self) -> int:
        return self.record["scored_tokens"]


def config_hash(cfg: RunConfig, settings: protocols.Settings) -> str:
    """Hash of everything that decides the number (not where it is written, nor its label)."""
    payload = cfg.model_dump(mode="json", exclude={"output": True, "name": True})
    payload["eval"].pop("sort_by_length", None)  # batching order cannot change a number
    payload["eval"].pop("batch_size", None)
    payload["eval"].pop("max_batch_size", None)
    for key in ("streaming", "cache"):  # how the corpus is read cannot change a number either
        payload["corpus"].pop(key, None)
    payload["settings"] = settings.as_dict()
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _versions() -> dict:
    import accelerate
    import datasets
    import torch
    import transformers

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "harness": __version__,
        "harness_commit": commit,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "accelerate": accelerate.__version__,
        "numpy": np.__version__,
    }


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")[:40] or "model"


def _check_writable(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise HarnessError(
            f"output.dir: cannot write to {root} ({err.strerror}); choose a writable folder with --output-dir or output.dir"
        ) from None


def _peak_memory_bytes() -> int:
    # ru_maxrss is in KiB on Linux (bytes on macOS)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if platform.system() == "Darwin" else rss * 1024


def score_windows(model, tokenizer, streams: list[TokenStream], windows, batch_size: int, logits_chunk, sort_by_length: bool, max_length: int, progress: bool = True, scorer=None, on_batch=None):
    """Score windows in batches; returns per-window records and NLL-by-position statistics.

    ``scorer(batch, windows) -> nlls`` replaces the plain scoring (kl.PairScorer runs two models).
    ``on_batch(finished)`` is called after each batch with its windows' records and NLLs.
    """
    from tqdm.auto import tqdm

    bos_id = tokenizer.bos_token_id
    prefix_id = bos_id if bos_id is not None else tokenizer.eos_token_id
    pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
    if any(w.replace_first for w in windows) and bos_id is None:
        raise HarnessError("eval.bos: 'replace' needs a BOS token and this tokenizer has none; use eval.bos=none")
    order = sorted(windows, key=lambda w: -w.input_length) if sort_by_length else list(windows)
    records: list[WindowRecord] = []
    positions = PositionStats.empty(max_length)
    scored = 0
    start = time.perf_counter()
    bar = tqdm(total=len(order), unit="win", desc="scoring", disable=not progress, dynamic_ncols=True)
    for i in range(0, len(order), batch_size):
        chunk = order[i : i + batch_size]
        batch = build_batch(chunk, streams, bos_id, prefix_id, pad_id)
        nlls = scorer(batch, chunk) if scorer else token_nlls(model, batch, logits_chunk)
        check_finite(nlls, chunk, batch.counts)
        positions.add(batch.cols.numpy(), nlls)
        nll64 = nlls.astype(np.float64)
        offset = 0
        first = len(records)
        for w, n in zip(chunk, batch.counts):
            part = nll64[offset : offset + n]
            offset += n
            s = streams[w.doc]
            records.append(
                WindowRecord(
                    index=w.index, doc=w.doc, begin=w.begin, end=w.end, score_begin=w.score_begin,
                    score_end=w.score_end, prefix=w.prefix, replace_first=w.replace_first,
                    sum_nll=float(part.sum()), sum_nll_sq=float((part * part).sum()), tokens=n,
                    bytes=int(s.byte_bounds[w.score_end] - s.byte_bounds[w.score_begin]),
                    words=int(s.word_bounds[w.score_end] - s.word_bounds[w.score_begin]),
                    domain=s.domain,
                )
            )
        if on_batch is not None:
            ends = np.cumsum(batch.counts)
            on_batch([Finished(r, nlls[e - r.tokens : e]) for r, e in zip(records[first:], ends)])
        scored += len(nlls)
        bar.update(len(chunk))
        bar.set_postfix(tok_s=f"{scored / max(time.perf_counter() - start, 1e-9):.0f}", refresh=False)
    bar.close()
    return records, positions, time.perf_counter() - start


def run(
    cfg: RunConfig,
    output_dir: str | Path | None = None,
    *,
    model=None,
    tokenizer=None,
    baseline_model=None,
    progress: bool = True,
    write: bool = True,
) -> Result:
    """Evaluate ``cfg``; write the record and update the results table unless ``write=False``.

    ``model``, ``tokenizer`` and ``baseline_model`` may be passed in already loaded (tests load a
    real model once). With ``cfg.baseline_model`` the record gets a ``kl`` object (see kl.py).
    """
    t0 = time.perf_counter()
    dist = Distributor(cfg.model.device)
    root = Path(output_dir).parent if output_dir else Path(cfg.output.dir)
    if write and dist.is_main:
        _check_writable(Path(output_dir) if output_dir else root)

    # corpus and tokens first: their mistakes surface before a slow model load
    tokenizer = tokenizer or load_tokenizer(cfg.model)
    early = protocols.resolve(cfg, adds_bos(tokenizer), None)
    corpus_cfg = cfg.corpus.model_copy(update={"mode": early.mode, "join": early.join, "detokenizer": early.detokenizer})
    corpus = tokenized_corpus(corpus_cfg, tokenizer, early, dist)
    streams = corpus.streams
    t_loaded_corpus = time.perf_counter()

    model = model or load_model(cfg.model, device=None if cfg.model.device_map else dist.device)
    settings = protocols.resolve(cfg, adds_bos(tokenizer), max_positions(model))
    windows = protocols.plan(settings, [len(s) for s in streams])
    chash = config_hash(cfg, settings)

    pair = None
    if cfg.baseline_model is not None:
        from .kl import PairScorer, load_baseline

        baseline_model = baseline_model or load_baseline(cfg, tokenizer, dist.device)
        pair = PairScorer(model, baseline_model, cfg.eval.logits_chunk)
    # windows finished by an earlier, interrupted run of this config are taken over, not rescored
    # (not in KL mode: the per-token KL of earlier windows is not in the log)
    resumable = write and pair is None
    log = ResumeLog(Path(output_dir or root), chash, len(windows), output_dir is not None) if resumable and dist.is_main else None
    done = dist.broadcast(log.open() if log else []) if resumable else []
    mine = dist.shard_padded(remaining(windows, done), padding)

    def trial(ws):  # the given windows as one batch: does it fit?
        return score_windows(model, tokenizer, streams, ws, len(ws), cfg.eval.logits_chunk, False, settings.max_length, progress=False)

    batch_size = choose_batch_size(cfg.eval, trial, mine, dist, on_cpu=input_device(model).type == "cpu")
    try:
        records, positions, scoring_seconds = score_windows(
            model, tokenizer, streams, mine, batch_size, cfg.eval.logits_chunk, cfg.eval.sort_by_length,
            settings.max_length, progress=progress and dist.is_main, scorer=pair,
            on_batch=recorder(log, dist.gather) if resumable else None,
        )
    except KeyboardInterrupt:
        raise interrupted(log, len(windows)) from None
    records = [r for r in dist.gather(records) if not is_padding(r)] + [f.record for f in done]
    records.sort(key=lambda r: r.index)
    pos_parts = dist.gather([positions]) + [positions_of(done, windows, settings.max_length)]
    positions = sum(pos_parts[1:], pos_parts[0])
    peaks = dist.gather([_peak_memory_bytes()])
    times = dist.gather([scoring_seconds])

    if settings.counts_on == "original":
        # windows name a stream by its position in `streams` (empty documents have none)
        doc_counts = {i: (s.count_bytes, s.count_words) for i, s in enumerate(streams) if s.count_bytes is not None}
        records = override_counts(records, doc_counts)
    sums = total(records)
    m = metrics(sums)
    unit, unit_nll, unit_tokens = bootstrap_units(records)
    boot = bootstrap_ci(unit_nll, unit_tokens, cfg.eval.bootstrap, cfg.eval.seed)
    run_id = cfg.output.run_id or (
        Path(output_dir).name if output_dir else
        f"{time.strftime('%Y%m%d-%H%M%S')}-{_slug(cfg.name or Path(cfg.model.gguf_file or cfg.model.name_or_path).stem)}-{settings.protocol}-{chash[:8]}"
    )
    import torch

    record = {
        "run_id": run_id,
        "name": cfg.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **m,
        "rescaled_perplexity": rescaled(sums.sum_nll, cfg.eval.rescale_tokens),
        "ci95": boot or m["ci95_normal"],
        "ci95_method": f"bootstrap over {unit} ({cfg.eval.bootstrap} resamples)" if boot else "normal",
        "tokens_per_second": (sums.tokens - sum(f.record.tokens for f in done)) / max(max(times), 1e-9),
        "wall_seconds": time.perf_counter() - t0,
        "scoring_seconds": max(times),
        "corpus_seconds": t_loaded_corpus - t0,
        "peak_memory_bytes": max(peaks),
        "peak_device_memory_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        "batch_size": batch_size,
        "world_size": dist.world,
        "resumed_windows": len(done),
        "device": str(next(model.parameters()).device),
        "protocol": settings.as_dict(),
        "domains": domain_metrics(records),
        "config": cfg.model_dump(mode="json"),
        "config_hash": chash,
        "model": {
            "class": type(model).__name__,
            "model_type": getattr(model.config, "model_type", None),
            "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "max_positions": max_positions(model),
        },
        "tokenizer": {**describe_tokenizer(tokenizer), "fingerprint": tokenizer_fingerprint(tokenizer)[:16]},
        "corpus": {
            "documents": corpus.documents if early.mode == "documents" else None,
            "streams": len(streams),
            "tokens": int(sum(len(s) for s in streams)),
            "text_sha256": corpus.text_sha256,
            "streaming": cfg.corpus.streaming,
            "token_cache": corpus.cache,
        },
        "versions": _versions(),
    }
    frame = pd.DataFrame([asdict(r) for r in records]).assign(running_perplexity=running_perplexity(records))
    if pair is not None:
        accs = dist.gather([pair.acc])
        record["kl"] = sum(accs[1:], accs[0]).summary()
        frame = frame.merge(pd.DataFrame(dist.gather(pair.window_rows)), on="index", how="left")
    pos = pd.DataFrame({"position": np.arange(len(positions.count)), "sum_nll": positions.sum_nll, "count": positions.count})
    pos = pos[pos["count"] > 0].assign(mean_nll=lambda d: d.sum_nll / d["count"])
    result = Result(record, frame, None, pos)
    if write and dist.is_main:
        run_dir = Path(output_dir) if output_dir else root / run_id
        if cfg.output.save_windows:
            write_frame(run_dir / WINDOWS, frame)
            write_frame(run_dir / "positions.parquet", pos)
        write_record(run_dir, record)
        write_table(run_dir.parent)
        result.run_dir = run_dir
    if log:
        log.close(delete=write)
    dist.barrier()
    return result
