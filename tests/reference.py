"""Plain reference computations, written from PROTOCOLS.md without using the harness.

Each takes the full float64 logits of the model (the expensive, obvious way) and walks the
windows exactly as the protocol's description says. The harness must match them.
"""

from __future__ import annotations

import math

import torch


def full_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, dim=-1)


def sliding_reference(model, ids: list[int], L: int, S: int, bos: str, bos_id: int | None) -> tuple[float, int, int]:
    """The HF guide's loop: returns (sum_nll, scored labels counted directly, windows)."""
    every = bos == "every"
    cap = L - 1 if every else L
    total, count, windows, prev_end = 0.0, 0, 0, 0
    for begin in range(0, len(ids), S):
        end = min(begin + cap, len(ids))
        inp = list(ids[begin:end])
        if bos == "replace":
            inp[0] = bos_id
        if every:
            inp = [bos_id] + inp
        first = max(prev_end, begin if every else begin + 1)
        if end > first:
            logp = full_logprobs(model, inp)
            windows += 1
            for p in range(first, end):
                k = p - begin - 1 + (1 if every else 0)  # input position that predicts t[p]
                total -= float(logp[k, ids[p]])
                count += 1
        prev_end = end
        if end == len(ids):
            break
    return total, count, windows


def ppl(sum_nll: float, count: int) -> float:
    return math.exp(sum_nll / count)
