"""The runner: ``run(config) -> Result``, the whole data flow in order.

config -> corpus -> tokens -> window plan -> scoring -> accumulation -> gather -> record -> table.

Each step lives in its own module; this one only sequences them and writes the outputs. No
record is written until every window is scored and the metrics are finite, so a failed run
leaves nothing half-written in the results folder; finished windows go to a resume log as they
are scored (resume.py), so a rerun of a killed run continues where it stopped.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from pathlib import Path

from . import activation, allocator, attention, compiled, norm, precision, protocols, record
from .accumulate import override_counts
from .batching import choose_batch_size
from .config import RunConfig
from .distributed import Distributor
from .errors import HarnessError, HarnessWarning
from .models import adds_bos, load_model, load_tokenizer, max_positions, vocabulary_rows
from .record import Result
from .results import WINDOWS, write_frame, write_record, write_table
from .resume import ResumeLog, interrupted, is_padding, padding, positions_of, recorder, remaining
from .scoring import input_device, score_windows
from .tokenization import tokenized_corpus
from .conditional import SAMPLES, conditional_section, samples_frame
from .pertoken import TokenWriter

__all__ = ["run", "Result"]


def _check_writable(root: Path) -> None:
    """``root`` can be made and written to; the folders made to find out are removed again, so a
    run that fails before its first window leaves no empty output folder behind."""
    made = [p for p in [root, *root.parents] if not p.exists()]  # deepest first
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise HarnessError(
            f"output.dir: cannot write to {root} ({err.strerror}); choose a writable folder with --output-dir or output.dir"
        ) from None
    finally:
        for folder in made:
            try:
                folder.rmdir()
            except OSError:
                break


def _check_token_ids(cfg: RunConfig, model, streams, dist) -> None:
    """Every token id of the corpus (every rank's share) is a row of the model's vocabulary: a
    tokenizer larger than the model's vocabulary failed in the embedding, mid-run."""
    rows = vocabulary_rows(model)
    top = max(dist.gather([max((int(s.ids.max()) for s in streams if len(s)), default=-1)]))
    if top >= rows:
        key = "model.tokenizer" if cfg.model.tokenizer else "model.name_or_path"
        raise HarnessError(f"{key}: the tokenizer gives token id {top:,}, but the model's vocabulary has {rows:,} rows; "
                           "use the tokenizer the model was trained with")


def _check_finite(rec: dict, log, vocabulary: int) -> None:
    """A perplexity past float64's range (a mean NLL above 709 nats) makes a record no view can
    read: said in one line instead, and the run's resume log removed (nothing is written)."""
    if rec.get("perplexity") is None or math.isfinite(rec["perplexity"]):
        return  # (None: nothing was scored, which the record says as it is)
    if log:
        log.close(delete=True)
        with contextlib.suppress(OSError):
            log.dir.parent.rmdir()  # the run's folder, made for the log alone (left where it holds anything)
    raise HarnessError(f"the mean NLL is {rec['nll_mean']:,.1f} nats per token, so the perplexity overflows float64: "
                       f"a broken model (a uniform guess over its {vocabulary:,}-token vocabulary gives "
                       f"{math.log(vocabulary):.1f}); check the model's weights and model.dtype")


def _merge(dist, records, positions, done, windows, settings, streams):
    """Every rank's window records and position statistics, with the earlier run's, in plan order."""
    records = sorted([r for r in dist.gather(records) if not is_padding(r)] + [f.record for f in done], key=lambda r: r.index)
    positions = sum(dist.gather([positions]), positions_of(done, windows, settings.max_length))
    if settings.counts_on == "original":
        # windows name a stream by its position in `streams` (empty documents have none)
        records = override_counts(records, {i: (s.count_bytes, s.count_words) for i, s in enumerate(streams) if s.count_bytes is not None})
    return records, positions


def _write(result: Result, run_dir: Path, cfg: RunConfig, tokens_out) -> None:
    """The run folder's tables, then the record, then the results table (the record last but one:
    a folder with a result.json is a finished run)."""
    if cfg.output.save_windows:
        write_frame(run_dir / WINDOWS, result.windows)
        write_frame(run_dir / "positions.parquet", result.positions)
    if result.samples is not None:
        write_frame(run_dir / SAMPLES, result.samples)
    if tokens_out is not None:
        tokens_out.close(keep=True)
    write_record(run_dir, result.record)
    write_table(run_dir.parent)
    result.run_dir = run_dir


def _pair_scorer(cfg: RunConfig, model, tokenizer, baseline_model, dist):
    """KL mode (``cfg.baseline_model``): the scorer running both models, and the baseline; else None."""
    if cfg.baseline_model is None:
        return None, baseline_model
    from .kl import PairScorer, load_baseline

    baseline_model = baseline_model or load_baseline(cfg, tokenizer, dist.device)
    return PairScorer(model, baseline_model, cfg.eval.logits_chunk), baseline_model


def _timing(dist, records, done, seconds: float, t0: float, t_corpus: float, models) -> dict:
    """Speed and memory: tokens/s counts only the windows scored in this run (not resumed ones)."""
    devices = {p.device for m in models if m is not None for p in m.parameters()}
    return {
        "tokens_per_second": (sum(r.tokens for r in records) - sum(f.record.tokens for f in done)) / max(seconds, 1e-9),
        "wall_seconds": time.perf_counter() - t0,
        "scoring_seconds": seconds,
        # of which: eval.compile loading or building its package, or the batches that compiled just in time
        "compile_seconds": sum(b.compile_seconds for m in models if m is not None and (b := compiled.body(m, any_state=True))),
        "corpus_seconds": t_corpus - t0,
        "peak_memory_bytes": max(dist.gather([record.peak_memory_bytes()])),
        "peak_device_memory_bytes": dist.device_peaks(devices),
    }


def _run_section(dist, batch_size: int, done, model, heap: str | None) -> dict:
    """How the run was laid out: batch size, processes, resumed windows, device, the CPU allocator."""
    return {"batch_size": batch_size, "world_size": dist.world, "resumed_windows": len(done),
            "device": str(next(model.parameters()).device), "allocator": heap}


def _precision(cfg: RunConfig, model, windows, say: bool) -> dict:
    """The record's precision section, with what eval.compile decided for this run's plan; ``say``:
    warn (one line) where the body's dtype has no native arithmetic on the device."""
    planned = compiled.decide(cfg.eval.compile, sum(w.input_length for w in windows), compiled.cached(model))
    body = precision.describe(model, cfg.model.dtype, input_device(model))
    slow = precision.emulated(body["body"], input_device(model)) if say else None
    if slow:
        warnings.warn(slow, HarnessWarning, stacklevel=2)
    return {**body, "attention": attention.describe(model),
            "activation": activation.describe(model), "norm": norm.describe(model),
            "compile": compiled.enable(model, planned).as_dict()}


def _scorer(cfg: RunConfig, settings, model, tokenizer, streams):
    """score(windows, batch_size, sort_by_length, **kw): ``score_windows`` on this run's model and streams."""

    def score(ws, batch_size, sort_by_length, **kw):
        return score_windows(model, tokenizer, streams, ws, batch_size, cfg.eval.logits_chunk, sort_by_length, settings.max_length, **kw)

    return score


def _taken_over(dist, folder: Path, chash: str, windows, exclusive_folder: bool):
    """The resume log (rank 0's) and the windows an earlier, interrupted run of this config
    finished: taken over, not rescored; every rank gets the same list."""
    log = ResumeLog(folder, chash, len(windows), exclusive_folder, plan=windows) if dist.is_main else None
    return log, dist.broadcast(log.open() if log else [])


@contextlib.contextmanager
def _cleaned_up(tokens_out, log, n_windows: int):
    """Scoring that ends by an exception drops the half-written tokens file; Ctrl-C (or SIGTERM)
    becomes the message saying what was kept and how to resume."""
    try:
        yield
    except BaseException as err:
        if tokens_out is not None:
            tokens_out.close(keep=False)
        if isinstance(err, KeyboardInterrupt):
            raise interrupted(log, n_windows) from None
        raise


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
    corpus_settings = protocols.resolve_corpus(cfg, adds_bos(tokenizer))
    corpus = tokenized_corpus(cfg.corpus, tokenizer, corpus_settings, dist)
    streams = corpus.streams
    t_corpus = time.perf_counter()

    model = model or load_model(cfg.model, device=None if cfg.model.device_map else dist.device)
    _check_token_ids(cfg, model, streams, dist)
    settings = protocols.resolve_windows(cfg, corpus_settings, max_positions(model))
    windows = protocols.plan_streams(settings, streams)
    prec = _precision(cfg, model, windows, dist.is_main)
    chash = record.config_hash(cfg, settings, prec)
    rid = record.run_id(cfg, settings, chash, output_dir)
    run_dir = Path(output_dir) if output_dir else root / rid

    pair, baseline_model = _pair_scorer(cfg, model, tokenizer, baseline_model, dist)
    resumable = write and pair is None  # not in KL mode: the per-token KL of earlier windows is not in the log
    log, done = _taken_over(dist, Path(output_dir or root), chash, windows, output_dir is not None) if resumable else (None, [])
    mine = dist.shard_padded(remaining(windows, done), padding)

    score = _scorer(cfg, settings, model, tokenizer, streams)
    trial = lambda ws: score(ws, len(ws), False, progress=False)  # noqa: E731  (the given windows as one batch)
    on_cpu = input_device(model).type == "cpu"
    heap = allocator.keep_freed_memory() if on_cpu else None  # a batch's freed activations serve the next
    batch_size = choose_batch_size(cfg.eval, trial, mine, dist, on_cpu=on_cpu)
    save_tokens = write and cfg.output.save_tokens  # each batch's scored tokens to tokens.parquet as they come
    tokens_out = TokenWriter(run_dir, streams, tokenizer, done) if save_tokens and dist.is_main else None
    on_batch = recorder(dist.gather, log, tokens_out) if resumable or save_tokens else None
    with _cleaned_up(tokens_out, log, len(windows)):
        records, positions, seconds = score(mine, batch_size, cfg.eval.sort_by_length, scorer=pair, on_batch=on_batch,
                                            progress=progress and dist.is_main)

    records, positions = _merge(dist, records, positions, done, windows, settings, streams)
    compiled.note_how(model, prec["compile"])
    seconds = max(dist.gather([seconds]))
    rec = record.build(
        run_id=rid, cfg=cfg, settings=settings, chash=chash, records=records,
        timing=_timing(dist, records, done, seconds, t0, t_corpus, (model, baseline_model)),
        run=_run_section(dist, batch_size, done, model, heap),
        model=model, tokenizer=tokenizer, corpus=corpus, versions=record.versions(dist.versions()), precision=prec,
    )
    kl_rows = None
    if pair is not None:
        rec["kl"], kl_rows = pair.gathered(dist.gather)
    result = Result(rec, record.windows_frame(records, kl_rows), None, record.positions_frame(positions))
    if settings.format != "text":  # per-sample target figures (conditional.py)
        result.samples = samples_frame(records, streams, tokenizer)
        rec["conditional"] = conditional_section(result.samples, settings.format)

    _check_finite(rec, log, vocabulary_rows(model))
    if write and dist.is_main:
        _write(result, run_dir, cfg, tokens_out)
    if log:
        log.close(delete=write)
    dist.barrier()
    return result
