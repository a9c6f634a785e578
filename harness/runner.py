"""The runner: ``run(config) -> Result``, the whole data flow in order.

config -> corpus -> tokens -> window plan -> scoring -> accumulation -> gather -> record -> table.

Each step lives in its own module; this one only sequences them and writes the outputs. No
record is written until every window is scored and the metrics are finite, so a failed run
leaves nothing half-written in the results folder; finished windows go to a resume log as they
are scored (resume.py), so a rerun of a killed run continues where it stopped.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from . import compiled, precision, protocols, record
from .accumulate import override_counts
from .batching import choose_batch_size
from .config import RunConfig
from .distributed import Distributor
from .errors import HarnessError
from .models import adds_bos, load_model, load_tokenizer, max_positions
from .record import Result
from .results import WINDOWS, write_frame, write_record, write_table
from .resume import ResumeLog, interrupted, is_padding, padding, positions_of, recorder, remaining
from .scoring import input_device, score_windows
from .tokenization import tokenized_corpus

__all__ = ["run", "Result"]


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
    dist.reset_device_peaks()
    root = Path(output_dir).parent if output_dir else Path(cfg.output.dir)
    if write and dist.is_main:
        _check_writable(Path(output_dir) if output_dir else root)

    # corpus and tokens first: their mistakes surface before a slow model load
    tokenizer = tokenizer or load_tokenizer(cfg.model)
    early = protocols.resolve(cfg, adds_bos(tokenizer), None)
    corpus_cfg = cfg.corpus.model_copy(update={"mode": early.mode, "join": early.join, "detokenizer": early.detokenizer})
    corpus = tokenized_corpus(corpus_cfg, tokenizer, early, dist)
    streams = corpus.streams
    t_corpus = time.perf_counter()

    model = model or load_model(cfg.model, device=None if cfg.model.device_map else dist.device)
    settings = protocols.resolve(cfg, adds_bos(tokenizer), max_positions(model))
    compiled.enable(model, cfg.eval.compile, settings.max_length)
    windows = protocols.plan(settings, [len(s) for s in streams])
    prec = precision.describe(model, cfg.model.dtype, input_device(model))
    chash = record.config_hash(cfg, settings, prec)

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

    def score(ws, batch_size, sort_by_length, **kw):
        return score_windows(model, tokenizer, streams, ws, batch_size, cfg.eval.logits_chunk, sort_by_length, settings.max_length, **kw)

    trial = lambda ws: score(ws, len(ws), False, progress=False)  # noqa: E731  (the given windows as one batch)
    batch_size = choose_batch_size(cfg.eval, trial, mine, dist, on_cpu=input_device(model).type == "cpu")
    try:
        records, positions, seconds = score(
            mine, batch_size, cfg.eval.sort_by_length, progress=progress and dist.is_main, scorer=pair,
            on_batch=recorder(log, dist.gather) if resumable else None,
        )
    except KeyboardInterrupt:
        raise interrupted(log, len(windows)) from None

    # every rank's windows and the earlier run's meet here
    records = sorted([r for r in dist.gather(records) if not is_padding(r)] + [f.record for f in done], key=lambda r: r.index)
    positions = sum(dist.gather([positions]), positions_of(done, windows, settings.max_length))
    if settings.counts_on == "original":
        # windows name a stream by its position in `streams` (empty documents have none)
        records = override_counts(records, {i: (s.count_bytes, s.count_words) for i, s in enumerate(streams) if s.count_bytes is not None})
    seconds = max(dist.gather([seconds]))
    rec = record.build(
        run_id=record.run_id(cfg, settings, chash, output_dir), cfg=cfg, settings=settings, chash=chash, records=records,
        timing={
            "tokens_per_second": (sum(r.tokens for r in records) - sum(f.record.tokens for f in done)) / max(seconds, 1e-9),
            "wall_seconds": time.perf_counter() - t0,
            "scoring_seconds": seconds,
            "corpus_seconds": t_corpus - t0,
            "peak_memory_bytes": max(dist.gather([record.peak_memory_bytes()])),
            "peak_device_memory_bytes": dist.device_peaks({p.device for m in (model, baseline_model) if m is not None for p in m.parameters()}),
        },
        run={"batch_size": batch_size, "world_size": dist.world, "resumed_windows": len(done), "device": str(next(model.parameters()).device)},
        model=model, tokenizer=tokenizer, corpus=corpus, versions=record.versions(dist.versions()), precision=prec,
    )
    kl_rows = None
    if pair is not None:
        rec["kl"], kl_rows = pair.gathered(dist.gather)
    result = Result(rec, record.windows_frame(records, kl_rows), None, record.positions_frame(positions))

    if write and dist.is_main:
        run_dir = Path(output_dir) if output_dir else root / rec["run_id"]
        if cfg.output.save_windows:
            write_frame(run_dir / WINDOWS, result.windows)
            write_frame(run_dir / "positions.parquet", result.positions)
        write_record(run_dir, rec)
        write_table(run_dir.parent)
        result.run_dir = run_dir
    if log:
        log.close(delete=write)
    dist.barrier()
    return result
