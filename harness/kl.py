"""KL divergence of a model from a baseline model, on the same windows, in one pass.

llama.cpp's ``--kl-divergence`` stores the base model's logits (gigabytes) and reads them back
while running the candidate (PROTOCOLS.md section 3). Here both models are loaded and each batch
goes through both: the model bodies run once each to hidden states at the scored positions, and
the vocabulary projection is done chunk by chunk (``scoring.py``'s pieces), so at most a few
``[chunk, vocabulary]`` float32 tensors exist at any time. Per scored token ``t`` with base
distribution ``P`` and model distribution ``Q`` (float32 log-softmax):

    KL(P || Q) = sum_v P(v) * (log P(v) - log Q(v))   (nats; zero when the models agree)
    top-1 agreement: argmax P == argmax Q
    delta_p = Q(t) - P(t)                            (change of the correct token's probability)

and over all tokens: mean, median, 90th/99th percentile and max of KL; the share of top-1
agreement; ``rms_delta_p = sqrt(mean(delta_p^2))``; ``ppl_ratio = PPL(Q) / PPL(P) =
exp(mean(nll_Q - nll_P))``. Percentiles need every per-token value: they are kept as float32,
8 bytes per scored token for KL and delta_p together (2.3 MiB for all 287k tokens of WikiText-2;
80 MB for ten million tokens), never the distributions. Percentiles use numpy's linear
interpolation between order statistics. Sums are float64.

Per window, the runner's ``windows.parquet`` gets extra columns: ``kl_sum``, ``kl_max``,
``top1_agree`` (a count), ``base_sum_nll`` and ``delta_p_sq_sum``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import HarnessError
from .head import blocked_head, log_sum_exp, uses_head_path
from .scoring import Batch, chunk_size, hidden_nlls, logit_chunks, scored_hidden

KL_COLUMNS = ["kl_sum", "kl_max", "top1_agree", "base_sum_nll", "delta_p_sq_sum"]


def kl_statistics(kl, delta_p, nll_model, nll_base, top1_agree) -> dict:
    """The summary of per-token arrays (all of one length): the record's ``kl`` object."""
    kl = np.asarray(kl, dtype=np.float64)
    dp = np.asarray(delta_p, dtype=np.float64)
    n = len(kl)
    if n == 0:
        raise ValueError("no scored tokens")
    nll_model, nll_base = np.asarray(nll_model, np.float64), np.asarray(nll_base, np.float64)
    diff = nll_model - nll_base
    med, p90, p99, p999 = np.quantile(kl, [0.5, 0.9, 0.99, 0.999])
    return {
        "tokens": n,
        "mean": float(kl.mean()),
        "stderr_mean": float(kl.std() / math.sqrt(n - 1)) if n > 1 else None,
        "median": float(med),
        "p90": float(p90),
        "p99": float(p99),
        "p999": float(p999),
        "max": float(kl.max()),
        "min": float(kl.min()),
        "top1_agreement": float(np.mean(top1_agree)),
        "rms_delta_p": float(math.sqrt(np.mean(dp * dp))),
        "mean_delta_p": float(dp.mean()),
        "delta_p_p01": float(np.quantile(dp, 0.01)),
        "delta_p_p99": float(np.quantile(dp, 0.99)),
        "mean_ln_ppl_ratio": float(diff.mean()),
        "ppl_ratio": math.exp(diff.mean()),
        "ppl_model": math.exp(nll_model.mean()),
        "ppl_base": math.exp(nll_base.mean()),
    }


def _log_probs(logits: torch.Tensor, again=None) -> torch.Tensor:
    """``x - logsumexp(x)`` in place, the log-sum-exp taken as ``scoring.token_nlls`` takes it on
    whole chunks (``head.log_sum_exp``), so the KL mode's NLLs equal plain runs' (to the bit on
    equal chunks). A CPU head's NLLs are taken again by vocabulary blocks (``hidden_nlls``), as
    plain runs take them. (torch.log_softmax in float32 on CPU comes out about 1e-5 nats per
    token low on a 49k vocabulary.)
    """
    return logits.sub_(log_sum_exp(logits, again)[:, None])


@torch.inference_mode()
def pair_token_stats(model, baseline, batch: Batch, logits_chunk: int | None = None):
    """Per scored token: (nll_model, nll_base, kl, top1_agree, delta_p) as numpy arrays."""
    # two models' chunks and a few temporaries live at once: half the single-model chunk
    step = max(8, chunk_size(baseline, logits_chunk) // (1 if logits_chunk else 2))
    m = batch.targets.shape[0]
    out = {k: np.empty(m, np.float32) for k in ("nll_m", "nll_b", "kl", "dp")}
    agree = np.empty(m, bool)
    hidden = {k: scored_hidden(mo, batch) if uses_head_path(mo) else None for k, mo in (("b", baseline), ("m", model))}
    s = 0
    chunks_b, chunks_m = logit_chunks(baseline, batch, step, hidden=hidden["b"]), logit_chunks(model, batch, step, hidden=hidden["m"])
    for (_, x_b, again_b), (_, x_m, again_m) in zip(chunks_b, chunks_m):
        lp_b = _log_probs(x_b, again_b)
        lp_m = _log_probs(x_m.to(x_b.device), None if again_m is None else lambda rows: again_m(rows).to(x_b.device))
        sl = slice(s, s + lp_b.shape[0])
        t = batch.targets[sl].to(lp_b.device)[:, None]
        g_b, g_m = lp_b.gather(1, t)[:, 0], lp_m.gather(1, t)[:, 0]
        kl = (lp_b - lp_m).mul_(lp_b.exp()).sum(-1)
        out["nll_b"][sl], out["nll_m"][sl] = (-g_b).cpu().numpy(), (-g_m).cpu().numpy()
        out["kl"][sl] = kl.cpu().numpy()
        out["dp"][sl] = (g_m.exp() - g_b.exp()).cpu().numpy()
        agree[sl] = (lp_b.argmax(-1) == lp_m.argmax(-1)).cpu().numpy()
        s += lp_b.shape[0]
    if s != m:
        raise AssertionError(f"scored {s} of {m} positions")
    for k, mo in (("b", baseline), ("m", model)):  # a CPU head's NLLs as a plain run takes them, to the bit
        if blocked_head(mo):
            out[f"nll_{k}"][:] = hidden_nlls(mo, hidden[k], batch.targets, logits_chunk).numpy()
    return out["nll_m"], out["nll_b"], out["kl"], agree, out["dp"]


@dataclass
class KLAccumulator:
    """Mergeable per-token arrays (float32) across batches and processes."""

    parts: list[tuple[np.ndarray, ...]] = field(default_factory=list)

    def add(self, nll_m, nll_b, kl, agree, dp) -> None:
        self.parts.append((nll_m, nll_b, kl, agree, dp))

    def __add__(self, other: "KLAccumulator") -> "KLAccumulator":
        return KLAccumulator(self.parts + other.parts)

    def arrays(self) -> tuple[np.ndarray, ...]:
        return tuple(np.concatenate([p[i] for p in self.parts]) for i in range(5))

    def summary(self) -> dict:
        nll_m, nll_b, kl, agree, dp = self.arrays()
        return kl_statistics(kl, dp, nll_m, nll_b, agree)


class PairScorer:
    """Scores a batch with both models: returns the model's NLLs, keeps KL statistics aside.

    The runner calls it in place of ``token_nlls``; ``window_rows`` holds one dict per window
    (its ``index`` and ``KL_COLUMNS``), ``acc`` the per-token arrays.
    """

    def __init__(self, model, baseline, logits_chunk: int | None = None):
        check_same_vocabulary(model, baseline)
        self.model, self.baseline, self.logits_chunk = model, baseline, logits_chunk
        self.acc = KLAccumulator()
        self.window_rows: list[dict] = []

    def __call__(self, batch: Batch, windows) -> np.ndarray:
        nll_m, nll_b, kl, agree, dp = pair_token_stats(self.model, self.baseline, batch, self.logits_chunk)
        self.acc.add(nll_m, nll_b, kl, agree, dp)
        offset = 0
        for w, n in zip(windows, batch.counts):
            sl = slice(offset, offset + n)
            offset += n
            self.window_rows.append({
                "index": w.index,
                "kl_sum": float(kl[sl].astype(np.float64).sum()),
                "kl_max": float(kl[sl].max()) if n else 0.0,
                "top1_agree": int(agree[sl].sum()),
                "base_sum_nll": float(nll_b[sl].astype(np.float64).sum()),
                "delta_p_sq_sum": float((dp[sl].astype(np.float64) ** 2).sum()),
            })
        return nll_m

    def gathered(self, gather) -> tuple[dict, list[dict]]:
        """Every process's KL statistics and per-window rows (``gather``: the distributor's)."""
        accs = gather([self.acc])
        return sum(accs[1:], accs[0]).summary(), gather(self.window_rows)


def _vocab(model) -> int:
    head = model.get_output_embeddings()
    w = getattr(head, "weight", None)
    return int(w.shape[0]) if isinstance(w, torch.Tensor) else int(model.config.vocab_size)


def check_same_vocabulary(model, baseline) -> None:
    if _vocab(model) != _vocab(baseline):
        raise HarnessError(
            f"baseline_model: its vocabulary ({_vocab(baseline)}) differs from the model's ({_vocab(model)}); "
            "KL divergence needs two models with the same tokenizer"
        )


def _same_source(a, b) -> bool:
    return (a.tokenizer or a.name_or_path, a.gguf_file if not a.tokenizer else None, a.revision) == (
        b.tokenizer or b.name_or_path, b.gguf_file if not b.tokenizer else None, b.revision)


def load_baseline(cfg, tokenizer, device: str | None):
    """Load ``cfg.baseline_model``, after checking that its tokenizer is the model's."""
    from .models import load_model, load_tokenizer

    base_cfg = cfg.baseline_model
    if not _same_source(cfg.model, base_cfg):
        other = load_tokenizer(base_cfg)
        if other.get_vocab() != tokenizer.get_vocab():
            raise HarnessError(
                "baseline_model: its tokenizer differs from the model's; KL divergence compares two models on the same "
                "tokens (set baseline_model.tokenizer to the model's tokenizer if they are the same)"
            )
    if base_cfg.device != "auto" and not base_cfg.device_map:  # the model's device unless the baseline names its own
        from .distributed import local_device

        device = local_device(base_cfg.device, key="baseline_model.device")
    return load_model(base_cfg, device=None if base_cfg.device_map else device)
