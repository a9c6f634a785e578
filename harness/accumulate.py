"""Accumulation: per-window sums in, corpus metrics out. Pure: no model, no tensors.

Sums, never means. Every window contributes float64 sums (NLL, NLL squared) and integer counts
(scored tokens, bytes, words); per-document, per-domain, per-process and resumed partial
results all meet by adding these. Metrics are computed once, from the totals:

    perplexity = exp(sum_nll / scored_tokens)           (token-weighted, PROTOCOLS.md)
    bits_per_byte = sum_nll / (bytes * ln 2)
    word_perplexity = exp(sum_nll / words), byte_perplexity = exp(sum_nll / bytes)
    stderr_nll = sqrt(var / (n - 1)), var the population variance of per-token NLLs (llama.cpp)

The 95% interval is a bootstrap over documents (or over windows for a single stream), since
tokens inside a document are correlated; the normal interval is kept beside it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np


@dataclass
class Sums:
    """A mergeable accumulator."""

    sum_nll: float = 0.0
    sum_nll_sq: float = 0.0
    tokens: int = 0
    bytes: int = 0
    words: int = 0
    windows: int = 0

    def __add__(self, other: "Sums") -> "Sums":
        return Sums(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class WindowRecord:
    """One scored window: its spans (from the plan) and its sums (from the model)."""

    index: int
    doc: int
    begin: int
    end: int
    score_begin: int
    score_end: int
    prefix: bool
    replace_first: bool
    sum_nll: float
    sum_nll_sq: float
    tokens: int
    bytes: int
    words: int
    domain: str | None = None

    def sums(self) -> Sums:
        return Sums(self.sum_nll, self.sum_nll_sq, self.tokens, self.bytes, self.words, 1)


def total(records: list[WindowRecord]) -> Sums:
    out = Sums()
    for r in records:
        out = out + r.sums()
    return out


def group(records: list[WindowRecord], key: str) -> dict:
    """Sums per document (``key='doc'``) or per domain (``key='domain'``), in first-seen order."""
    out: dict = {}
    for r in records:
        k = getattr(r, key)
        out[k] = out.get(k, Sums()) + r.sums()
    return out


def override_counts(records: list[WindowRecord], doc_counts: dict[int, tuple[int, int]]) -> list[WindowRecord]:
    """Count bytes and words on each document's original text (lm-eval) instead of the scored text.

    The document's counts go to its first window and the others get zero, so totals and
    per-document sums are exact (per-window bytes then mean nothing for those documents).
    """
    seen: set[int] = set()
    out = []
    for r in sorted(records, key=lambda r: r.index):
        if r.doc in doc_counts:
            b, w = doc_counts[r.doc] if r.doc not in seen else (0, 0)
            seen.add(r.doc)
            r = WindowRecord(**{**asdict(r), "bytes": b, "words": w})
        out.append(r)
    return out


def _exp(x: float) -> float:
    return math.exp(x) if x < 709 else float("inf")


def metrics(s: Sums) -> dict:
    """The metrics every result carries (PROTOCOLS.md, "Metrics every result should carry")."""
    n = s.tokens
    mean = s.sum_nll / n if n else float("nan")
    var = max(s.sum_nll_sq / n - mean * mean, 0.0) if n else float("nan")
    se = math.sqrt(var / (n - 1)) if n > 1 else float("nan")
    ppl = _exp(mean)
    return {
        "perplexity": ppl,
        "sum_nll": s.sum_nll,
        "scored_tokens": n,
        "windows": s.windows,
        "nll_mean": mean,
        "bits_per_token": mean / math.log(2),
        "bytes": s.bytes,
        "words": s.words,
        "bits_per_byte": s.sum_nll / (s.bytes * math.log(2)) if s.bytes else None,
        "byte_perplexity": _exp(s.sum_nll / s.bytes) if s.bytes else None,
        "word_perplexity": _exp(s.sum_nll / s.words) if s.words else None,
        "stderr_nll": se,
        # llama.cpp prints PPL ± PPL * sqrt(var / (n - 1))
        "perplexity_pm": ppl * se,
        "ci95_normal": [_exp(mean - 1.96 * se), _exp(mean + 1.96 * se)] if n > 1 else None,
    }


def running_perplexity(records: list[WindowRecord]) -> list[float]:
    """Perplexity of everything scored up to and including each window, in plan order.

    llama-perplexity prints this after every chunk (``[1]4.13,[2]4.87,...``): window ``k`` gets
    ``exp(sum of sum_nll over windows 0..k / sum of tokens over windows 0..k)``.
    """
    order = sorted(range(len(records)), key=lambda i: records[i].index)
    nll = np.cumsum([records[i].sum_nll for i in order], dtype=np.float64)
    tok = np.cumsum([records[i].tokens for i in order], dtype=np.float64)
    out = [0.0] * len(records)
    for rank, i in enumerate(order):
        out[i] = _exp(nll[rank] / tok[rank]) if tok[rank] else float("nan")
    return out


def rescaled(sum_nll: float, n_tokens: int | None) -> float | None:
    """``exp(sum_nll / n_tokens)`` for a token count the corpus was *originally* measured in.

    The GPT-2 paper scored WikiText with its own byte-level tokens but divided the NLL by the
    dataset's original word-level token count (245,569 for WikiText-2 test), which makes the
    number comparable with word-level models of the time. ``None`` when no count is given.
    """
    return _exp(sum_nll / n_tokens) if n_tokens else None


def bootstrap_ci(nll: np.ndarray, tokens: np.ndarray, samples: int, seed: int, level: float = 0.95) -> list[float] | None:
    """Percentile bootstrap of the perplexity over units (documents or windows).

    Each resample draws units with replacement and recomputes exp(sum nll / sum tokens).
    """
    nll = np.asarray(nll, dtype=np.float64)
    tokens = np.asarray(tokens, dtype=np.float64)
    if samples <= 0 or len(nll) < 2:
        return None
    rng = np.random.default_rng(seed)
    stats = np.empty(samples)
    for k in range(0, samples, 256):
        m = min(256, samples - k)
        idx = rng.integers(0, len(nll), size=(m, len(nll)))
        stats[k : k + m] = nll[idx].sum(1) / tokens[idx].sum(1)
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return [_exp(lo), _exp(hi)]


def bootstrap_units(records: list[WindowRecord]) -> tuple[str, np.ndarray, np.ndarray]:
    """Documents when there are several, else windows: the units a bootstrap resamples."""
    by_doc = group(records, "doc")
    if len(by_doc) > 1:
        return "documents", np.array([s.sum_nll for s in by_doc.values()]), np.array([s.tokens for s in by_doc.values()])
    return "windows", np.array([r.sum_nll for r in records]), np.array([r.tokens for r in records])


def domain_metrics(records: list[WindowRecord]) -> dict | None:
    """Token perplexity per domain and their macro average (Paloma), when documents have domains."""
    if not any(r.domain is not None for r in records):
        return None
    per = {str(k): metrics(s) for k, s in group(records, "domain").items()}
    ppls = [m["perplexity"] for m in per.values()]
    return {
        "per_domain": {k: {"perplexity": m["perplexity"], "scored_tokens": m["scored_tokens"], "bits_per_byte": m["bits_per_byte"]} for k, m in per.items()},
        "macro_perplexity": float(np.mean(ppls)),
        "domains": len(per),
    }


@dataclass
class PositionStats:
    """Summed NLL by position in the window: how much context helps (mergeable)."""

    sum_nll: np.ndarray
    count: np.ndarray

    @classmethod
    def empty(cls, length: int) -> "PositionStats":
        return cls(np.zeros(length, dtype=np.float64), np.zeros(length, dtype=np.int64))

    def add(self, positions: np.ndarray, nlls: np.ndarray) -> None:
        np.add.at(self.sum_nll, positions, nlls.astype(np.float64))
        np.add.at(self.count, positions, 1)

    def __add__(self, other: "PositionStats") -> "PositionStats":
        return PositionStats(self.sum_nll + other.sum_nll, self.count + other.count)
