"""Paired percentile bootstrap of two runs over the same units (pure numpy): the difference of
perplexity or bits per byte between run B and run A, its interval, ratio and p-value. Every
resample draws the same units for both runs, so what the runs share cancels."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np




def resample_indices(n: int, samples: int, seed: int, chunk: int = 256) -> Iterator[np.ndarray]:
    """Bootstrap draws of ``n`` unit indices, ``chunk`` resamples at a time (bounded memory)."""
    rng = np.random.default_rng(seed)
    for k in range(0, samples, chunk):
        yield rng.integers(0, n, size=(min(chunk, samples - k), n))


def _metric(sum_nll, denom, metric: str):
    if metric == "perplexity":
        return np.exp(np.asarray(sum_nll) / denom)
    return np.asarray(sum_nll) / (np.asarray(denom) * math.log(2))  # bits per byte


@dataclass
class Paired:
    """B against A on the same units: the difference of a metric, its interval and a verdict."""

    metric: str  # "perplexity" or "bits_per_byte"
    units: int
    delta: float  # metric(B) - metric(A) on all units
    ratio: float  # metric(B) / metric(A)
    ci95: list[float]  # percentile interval of delta
    ratio_ci95: list[float]
    p_value: float  # two-sided: 2 * min(share of resamples with delta <= 0, with delta >= 0)
    samples: int
    stats: np.ndarray = field(repr=False, default_factory=lambda: np.empty(0))

    @property
    def significant(self) -> bool:
        return not (self.ci95[0] <= 0.0 <= self.ci95[1])


def paired_bootstrap(
    nll_a, nll_b, denom_a, denom_b=None, *, metric: str = "perplexity", samples: int = 1000, seed: int = 0, level: float = 0.95
) -> Paired:
    """Paired percentile bootstrap of metric(B) - metric(A) over units.

    ``nll_a[i]`` and ``nll_b[i]`` are the NLL sums (nats) of unit ``i`` under runs A and B,
    ``denom_a[i]`` its token count (perplexity) or byte count (bits per byte); ``denom_b``
    defaults to ``denom_a`` (the same tokens). Every resample draws the same units for A and B.
    """
    a, b = np.asarray(nll_a, np.float64), np.asarray(nll_b, np.float64)
    da = np.asarray(denom_a, np.float64)
    db = da if denom_b is None else np.asarray(denom_b, np.float64)
    if not (len(a) == len(b) == len(da) == len(db)) or len(a) < 2:
        raise ValueError("paired bootstrap needs at least two units, the same number for both runs")
    if samples < 1:
        raise ValueError("samples must be positive")
    va, vb = _metric(a.sum(), da.sum(), metric), _metric(b.sum(), db.sum(), metric)
    delta = np.empty(samples)
    ratio = np.empty(samples)
    k = 0
    for idx in resample_indices(len(a), samples, seed):
        ma = _metric(a[idx].sum(1), da[idx].sum(1), metric)
        mb = _metric(b[idx].sum(1), db[idx].sum(1), metric)
        delta[k : k + len(idx)], ratio[k : k + len(idx)] = mb - ma, mb / ma
        k += len(idx)
    q = [(1 - level) / 2, (1 + level) / 2]
    p = min(1.0, 2 * min(np.mean(delta <= 0), np.mean(delta >= 0)))
    return Paired(metric, len(a), float(vb - va), float(vb / va), [float(x) for x in np.quantile(delta, q)],
                  [float(x) for x in np.quantile(ratio, q)], float(p), samples, delta)
