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


def nll_at(logp: torch.Tensor, k: int, target: int) -> float:
    """-log p(target) from the distribution at input position ``k``."""
    return -float(logp[k, target])


def gptq_reference(model, ids: list[int], L: int) -> tuple[float, int, int]:
    """GPTQ/AWQ evaluation: ``N // L`` disjoint windows, tail dropped, the first token of each unscored."""
    total, count = 0.0, 0
    n = len(ids) // L
    for k in range(n):
        window = ids[k * L : (k + 1) * L]
        logp = full_logprobs(model, window)
        for j in range(1, L):  # label j is predicted by the logit at j - 1
            total += nll_at(logp, j - 1, window[j])
            count += 1
    return total, count, n


def llamacpp_reference(model, ids: list[int], C: int, add_bos: bool, bos_id: int | None) -> dict:
    """llama-perplexity: chunks of C, BOS overwrites token 0 of a chunk when the model adds BOS,
    logits at positions C//2 .. C-2 score the tokens after them. Returns the sums, the running
    PPL after each chunk, and llama.cpp's ``PPL +/- PPL * sqrt(var / (n - 1))``."""
    if len(ids) < 2 * C:
        raise ValueError("needs at least 2*ctx tokens")
    first = C // 2
    nlls: list[float] = []
    running: list[float] = []
    for k in range(len(ids) // C):
        chunk = list(ids[k * C : (k + 1) * C])
        targets = list(chunk)  # targets are the file's tokens, not the replaced BOS
        if add_bos:
            chunk[0] = bos_id
        logp = full_logprobs(model, chunk)
        for pos in range(first, C - 1):
            nlls.append(nll_at(logp, pos, targets[pos + 1]))
        running.append(math.exp(sum(nlls) / len(nlls)))
    n = len(nlls)
    mean = sum(nlls) / n
    var = sum(x * x for x in nlls) / n - mean * mean
    p = math.exp(mean)
    return {"sum_nll": sum(nlls), "count": n, "windows": len(running), "running": running, "pm": p * math.sqrt(var / (n - 1))}


def rolling_reference(model, ids: list[int], L: int, prefix_id: int) -> tuple[float, int, int]:
    """lm-eval's rolling loglikelihood of one document, written as "blocks of L predicted tokens".

    With ``seq = [prefix] + ids`` (so ``seq[i + 1] == ids[i]``), the block of targets
    ``ids[a:b]`` is predicted from the input ``seq[max(0, b - L) : b]``: the prefix and the
    first ``L - 1`` tokens for the first block, the ``L`` tokens before ``b`` for every later
    one (the last, short block included). Every token of the document is scored once.
    """
    seq = [prefix_id] + list(ids)
    total, count, windows = 0.0, 0, 0
    for a in range(0, len(ids), L):
        b = min(a + L, len(ids))
        start = max(0, b - L)
        logp = full_logprobs(model, seq[start:b])
        windows += 1
        for i in range(a, b):
            # ids[i] is seq[i + 1]; it is predicted at the position of seq[i], input index i - start
            total += nll_at(logp, i - start, ids[i])
            count += 1
    return total, count, windows


def detokenize_wikitext(s: str) -> str:
    """lm-evaluation-harness's wikitext detokenizer, in its order (PROTOCOLS.md section 4)."""
    import re

    s = s.replace("s '", "s'")
    s = re.sub(r"/' [0-9]/", r"/'[0-9]/", s)
    for a, b in [(" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" : ", ": "), (" ; ", "; "), (" . ", ". "),
                 (" ! ", "! "), (" ? ", "? "), (" , ", ", ")]:
        s = s.replace(a, b)
    for open_, close in ["()", "[]", "{}", '""', "''"]:
        o, c = re.escape(open_), re.escape(close)
        s = re.sub(o + r"\s*([^" + c + r"]*?)\s*" + c, open_.replace("\\", "") + r"\1" + close, s)
    for a, b in [("= = = =", "===="), ("= = =", "==="), ("= =", "=="), (" \u00b0 ", "\u00b0"), (" \n", "\n"),
                 ("\n ", "\n"), (" N ", " 1 "), (" 's", "'s")]:
        s = s.replace(a, b)
    return s


def lm_eval_counts(page: str) -> tuple[int, int]:
    """(words, bytes) of the original page, as lm-eval's wikitext task counts them."""
    import re

    return len(re.split(r"\s+", page)), len(page.encode("utf-8"))
