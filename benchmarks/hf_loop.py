"""The baseline: perplexity the way the Hugging Face guide writes it, as users copy it today.

Batch 1, one window at a time, ``model(input_ids, labels=target_ids)``: the model computes the
full ``[1, T, vocabulary]`` logits and its own cross-entropy, and earlier tokens of a window are
masked with -100. The only change from the guide is the token count: we count the labels that
are really scored (after the shift) instead of subtracting one per window, which the guide gets
wrong by one per window after the first (docs/PROTOCOLS.md, section 1).
"""

from __future__ import annotations

import torch


def hf_guide_nll(model, input_ids: torch.Tensor, max_length: int, stride: int) -> tuple[float, int, int]:
    """(sum of NLL in nats, scored tokens, windows) over ``input_ids`` of shape [1, N]."""
    seq_len = input_ids.size(1)
    nll_sum, n_tokens, windows, prev_end_loc = 0.0, 0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc  # may be different from stride on the last loop
        ids = input_ids[:, begin_loc:end_loc]
        target_ids = ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            outputs = model(ids, labels=target_ids)
        # the loss is a mean over the labels that survive the one-position shift
        scored = int((target_ids[:, 1:] != -100).sum())
        if scored:
            nll_sum += float(outputs.loss) * scored
            n_tokens += scored
            windows += 1
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return nll_sum, n_tokens, windows
