"""Scoring: a batch of windows through the model, to the NLL of every scored token.

The expensive part of a language model's output is the vocabulary projection: float32 logits
for every position of a batch are ``batch x length x vocabulary`` floats (17 GB for Gemma-3 at
8 x 2048). We never make them. The model body runs once to hidden states; only the hidden
states at *scored* positions go through the output head, in chunks of ``logits_chunk``
positions, and each chunk's log-sum-exp is taken in float32 and reduced to one NLL per token at
once (the head and its log-sum-exp: ``head.py``; on the CPU by vocabulary blocks within a chunk,
so even a chunk's logits are never whole). Sums are kept in float64 by the caller.

Windows are right-padded to the longest in the batch; under a causal mask a real position never
attends to a later pad, so padding cannot change any number (the tests hold it to that).

Whatever the weights' dtype (``model.dtype``; ``auto`` picks bf16 where the device computes it
natively, see ``precision.py``), the head's output and the log-sum-exp are float32: a bf16/fp16
head writes float32 logits that were never rounded to its dtype. On a GPU: attention through
PyTorch SDPA (transformers' default, kept unless ``model.attn_implementation`` says otherwise);
length-sorted batches (the runner); inputs copied from pinned host memory without blocking, and NLLs kept on the device
until the batch is done, so the host waits once per batch rather than once per chunk.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from . import compiled
from .accumulate import PositionStats, WindowRecord
from .errors import HarnessError
from .head import BLOCK_ROWS, block_nlls, blocked_head, cached_workspace, chunk_nll, head_logits, head_workspace, loaded_head, uses_head_path
from .resume import Finished
from .tokens import TokenStream
from .windows import Window

# float32 logits per chunk (512 MiB): positions per chunk = budget // vocab. Each chunk streams
# the whole head weight from memory once, so tiny chunks are slow: at 128 MiB (128 positions
# for Gemma-3's 262k vocabulary) the chunked head took 1.5-2x the time of one big matmul on CPU.
LOGITS_BUDGET = 2**27


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor | None  # [B, T], None when no row is padded
    rows: torch.Tensor  # [M] batch row of each scored token
    cols: torch.Tensor  # [M] input position whose logit predicts it
    targets: torch.Tensor  # [M] token id
    counts: list[int]  # scored tokens per window, in batch order


def build_batch(windows: list[Window], streams: list[TokenStream], bos_id: int | None, prefix_id: int | None, pad_id: int) -> Batch:
    """Token ids for each window (prefix / BOS replacement applied) and where its targets are."""
    seqs, rows, cols, targets, counts = [], [], [], [], []
    for r, w in enumerate(windows):
        ids = streams[w.doc].ids
        seq = ids[w.begin : w.end].copy()
        if w.replace_first:
            seq[0] = bos_id
        if w.prefix:
            seq = np.concatenate([[prefix_id], seq])
        seqs.append(seq)
        k0 = w.first_target_offset
        n = w.scored
        rows.append(np.full(n, r))
        cols.append(np.arange(k0, k0 + n))
        targets.append(ids[w.score_begin : w.score_end])
        counts.append(n)
    width = max(len(s) for s in seqs)
    input_ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for r, s in enumerate(seqs):
        input_ids[r, : len(s)] = s
        mask[r, : len(s)] = 1
    return Batch(
        torch.from_numpy(input_ids),
        None if mask.all() else torch.from_numpy(mask),
        torch.from_numpy(np.concatenate(rows)),
        torch.from_numpy(np.concatenate(cols)),
        torch.from_numpy(np.concatenate(targets)),
        counts,
    )


def input_device(model) -> torch.device:
    emb = model.get_input_embeddings()
    dev = emb.weight.device
    if dev.type == "meta":  # offloaded by accelerate (device_map + max_memory): where its hook runs it
        dev = torch.device(getattr(getattr(emb, "_hf_hook", None), "execution_device", None) or "cpu")
    return dev


def to_device(t: torch.Tensor | None, dev: torch.device) -> torch.Tensor | None:
    """Host tensor to ``dev``; through pinned memory, asynchronously, when ``dev`` is a GPU."""
    if t is None or t.device == dev:
        return t
    if dev.type == "cuda":
        t = t.pin_memory()
    return t.to(dev, non_blocking=True)


def scored_hidden(model, batch: Batch) -> torch.Tensor:
    """Final hidden states at the scored positions only: [M, H]."""
    dev = input_device(model)
    compiled_body = compiled.body(model)  # eval.compile: layers compiled (harness/compiled.py)
    if compiled_body is not None:
        hidden = compiled_body(to_device(batch.input_ids, dev), to_device(batch.attention_mask, dev))
        return hidden[to_device(batch.rows, hidden.device), to_device(batch.cols, hidden.device)]
    out = model.base_model(
        input_ids=to_device(batch.input_ids, dev),
        attention_mask=to_device(batch.attention_mask, dev),
        use_cache=False,
    )
    hidden = out.last_hidden_state
    return hidden[to_device(batch.rows, hidden.device), to_device(batch.cols, hidden.device)]


def chunk_size(model, logits_chunk: int | None) -> int:
    if logits_chunk:
        return logits_chunk
    vocab = model.get_output_embeddings().weight.shape[0]
    return max(16, LOGITS_BUDGET // vocab)


def logit_chunks(model, batch: Batch, step: int, workspace: torch.Tensor | None = None, hidden: torch.Tensor | None = None):
    """Yield (slice, float32 logits [m, V], again) at the scored positions, ``step`` positions at a time.

    The caller may overwrite each chunk, and must be done with it before asking for the next:
    chunks share one buffer (``workspace``, made here if not given). Known families run the
    output head on the scored hidden states only, and ``again(rows)`` gives fresh logits of some
    of the chunk's rows; others give the model's own logits, gathered at scored positions (and
    ``again`` is None). ``hidden``: the head path's ``scored_hidden``, where the caller has it.
    """
    if uses_head_path(model):
        hidden = scored_hidden(model, batch) if hidden is None else hidden
        with loaded_head(model):
            if workspace is None:
                workspace = head_workspace(model, min(step, hidden.shape[0]))
            for s in range(0, hidden.shape[0], step):
                part = hidden[s : s + step]
                yield slice(s, s + step), head_logits(model, part, workspace), lambda rows, part=part: head_logits(model, part[rows])
        return
    dev = input_device(model)
    logits = model(
        input_ids=to_device(batch.input_ids, dev), attention_mask=to_device(batch.attention_mask, dev), use_cache=False
    ).logits
    picked = logits[to_device(batch.rows, logits.device), to_device(batch.cols, logits.device)].float()
    for s in range(0, picked.shape[0], step):
        yield slice(s, s + step), picked[s : s + step], None


@torch.inference_mode()
def token_nlls(model, batch: Batch, logits_chunk: int | None = None) -> np.ndarray:
    """Negative log-likelihood (nats, float32 log-sum-exp) of every scored token in the batch."""
    if blocked_head(model):  # the CPU head: by vocabulary blocks, the logits never whole
        return hidden_nlls(model, scored_hidden(model, batch), batch.targets, logits_chunk).numpy()
    step = chunk_size(model, logits_chunk)
    workspace = cached_workspace(model, min(step, batch.targets.shape[0])) if uses_head_path(model) else None
    out, targets = None, None
    for sl, logits, again in logit_chunks(model, batch, step, workspace):
        if out is None:  # NLLs stay on the device until the batch is done: one sync per batch
            targets = to_device(batch.targets, logits.device)
            out = torch.empty(targets.shape[0], dtype=torch.float32, device=logits.device)
        out[sl] = chunk_nll(logits, targets[sl], again)
    return np.zeros(0, dtype=np.float32) if out is None else out.cpu().numpy()


def hidden_nlls(model, hidden: torch.Tensor, targets: torch.Tensor, logits_chunk: int | None = None) -> torch.Tensor:
    """NLLs of the scored hidden states through a ``blocked_head`` model's head, ``logits_chunk``
    rows (default ``BLOCK_ROWS``) per ``block_nlls`` call: a plain run's numbers, to the bit."""
    rows = logits_chunk or BLOCK_ROWS
    parts = [block_nlls(model, hidden[s : s + rows], targets[s : s + rows]) for s in range(0, len(targets), rows)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float32)


def check_finite(nlls: np.ndarray, windows: list[Window], counts: list[int]) -> None:
    if np.isfinite(nlls).all():
        return
    bad = int(np.flatnonzero(~np.isfinite(nlls))[0])
    w = windows[int(np.searchsorted(np.cumsum(counts), bad, side="right"))]
    raise HarnessError(
        f"non-finite log-probability in window {w.index} (doc {w.doc}, input [{w.begin}, {w.end}), "
        f"scored [{w.score_begin}, {w.score_end})); the model produced NaN/inf, try model.dtype=float32"
    )


@dataclass(frozen=True)
class SpecialIds:
    """The token ids a window may need beside its stream: BOS, the prefix token, padding."""

    bos: int | None
    prefix: int | None  # BOS, else EOS (lm-eval's prefix token)
    pad: int  # any id: padded positions are masked and never scored

    @classmethod
    def of(cls, tokenizer) -> "SpecialIds":
        bos = tokenizer.bos_token_id
        prefix = bos if bos is not None else tokenizer.eos_token_id
        pad = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
        return cls(bos, prefix, pad)


def score_windows(model, tokenizer, streams: list[TokenStream], windows, batch_size: int, logits_chunk, sort_by_length: bool, max_length: int, progress: bool = True, scorer=None, on_batch=None):
    """Score windows in batches; returns per-window records and NLL-by-position statistics.

    ``scorer(batch, windows) -> nlls`` replaces the plain scoring (kl.PairScorer runs two models).
    ``on_batch(finished)`` is called after each batch with its windows' records and NLLs.
    """
    from tqdm.auto import tqdm

    ids = SpecialIds.of(tokenizer)
    if any(w.replace_first for w in windows) and ids.bos is None:
        raise HarnessError("eval.bos: 'replace' needs a BOS token and this tokenizer has none; use eval.bos=none")
    order = sorted(windows, key=lambda w: -w.input_length) if sort_by_length else list(windows)
    records: list[WindowRecord] = []
    positions = PositionStats.empty(max_length)
    scored = 0
    start = time.perf_counter()
    bar = tqdm(total=len(order), unit="win", desc="scoring", disable=not progress, dynamic_ncols=True)
    for i in range(0, len(order), batch_size):
        chunk = order[i : i + batch_size]
        batch = build_batch(chunk, streams, ids.bos, ids.prefix, ids.pad)
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
