"""``ppl show RECORD --worst N``: the samples (or windows) a model found hardest, with their text.

A conditional run (pairs, chat) has ``samples.parquet`` beside its record: the samples with the
highest mean target NLL (nats per target token) are listed with their prompt and target text.
Any other run lists the windows with the highest mean NLL over their scored tokens; their text
is decoded from the token ids, which are read again through the token cache with the tokenizer
and corpus named in the record (the record's text hash is checked, so the text shown is the text
that was scored).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from . import files
from .errors import HarnessError
from .results import RECORD, WINDOWS, read_frame, read_record


def _short(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def worst_samples(run_dir: Path, n: int) -> pd.DataFrame:
    s = read_frame(run_dir / "samples.parquet", "show", "re-run the config", also={"prompt": "text", "target": "text"})
    s = s.assign(mean_nll=s.target_nll / s.target_tokens)
    return s.sort_values("mean_nll", ascending=False).head(n)[
        ["sample", "target_tokens", "mean_nll", "target_perplexity", "prompt", "target"]]


def worst_windows(run_dir: Path, record: dict, n: int, tokenizer=None) -> pd.DataFrame:
    from . import protocols
    from .config import validate
    from .models import adds_bos, load_tokenizer
    from .tokenization import tokenized_corpus

    w = read_frame(run_dir / WINDOWS, "show", "re-run the config with output.save_windows: true")
    if (w.tokens <= 0).any():
        raise HarnessError(f"show: {run_dir / WINDOWS} has a window of no scored tokens; re-run the config")
    w = w.assign(mean_nll=w.sum_nll / w.tokens).sort_values("mean_nll", ascending=False).head(n)
    want = (record.get("corpus") or {}).get("text_sha256")
    if not want:
        raise HarnessError(f"show: {run_dir / RECORD} has no corpus.text_sha256 to check the text against; re-run the config")
    cfg = validate(record["config"])
    tokenizer = tokenizer or load_tokenizer(cfg.model)
    corpus = tokenized_corpus(cfg.corpus, tokenizer, protocols.resolve_corpus(cfg, adds_bos(tokenizer)))
    if corpus.text_sha256 != want:
        raise HarnessError(f"show: the corpus named in {run_dir / RECORD} has changed since the run (text hash differs); the text cannot be shown")
    streams = corpus.streams
    if not all(0 <= d < len(streams) and 0 <= a <= b <= len(streams[d].ids) for d, a, b in zip(w.doc, w.score_begin, w.score_end)):
        raise HarnessError(f"show: {run_dir / WINDOWS} names spans its record's corpus does not have; re-run the config")
    text = [tokenizer.decode(list(streams[d].ids[a:b])) for d, a, b in zip(w.doc, w.score_begin, w.score_end)]
    return w.assign(text=text)[["index", "doc", "score_begin", "score_end", "tokens", "mean_nll", "text"]]


def worst(path: str | Path, n: int = 20, tokenizer=None) -> tuple[str, pd.DataFrame]:
    """("samples" or "windows", the ``n`` hardest with their text) for the run at ``path``."""
    run_dir = Path(path)
    if run_dir.is_file() and run_dir.name != RECORD:
        raise HarnessError(f"show: {run_dir} is not a run folder or its {RECORD}; give one of those")
    run_dir = run_dir.parent if run_dir.name == RECORD else run_dir
    files.existing_file(run_dir / RECORD, "show", "result record", "give a run folder or its result.json")
    record = read_record(run_dir)
    if (run_dir / "samples.parquet").is_file():
        return "samples", worst_samples(run_dir, n)
    if not (run_dir / WINDOWS).is_file():
        raise HarnessError(f"show: {run_dir / WINDOWS} not found; re-run with output.save_windows: true")
    return "windows", worst_windows(run_dir, record, n, tokenizer)


def render(kind: str, frame: pd.DataFrame, width: int = 100) -> str:
    frame = frame.copy()
    for col in ("prompt", "target", "text"):
        if col in frame:
            frame[col] = frame[col].map(lambda t: _short(t, width if col != "prompt" else width // 2))
    head = f"the {len(frame)} {kind} with the highest mean NLL (nats per scored token):\n\n"
    return head + frame.to_markdown(index=False, floatfmt=".4f")
