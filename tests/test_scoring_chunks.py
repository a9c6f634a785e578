"""Chunked scoring: the same NLLs at every chunk size, and the output head's memory bounded.

The reference is the model's own forward pass with full logits (``model(...).logits``, every
position, the whole vocabulary), log-softmaxed in float32 and gathered at the scored positions:
the obvious way the harness avoids. Memory is checked by tensor sizes, never by time.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.head import head_logits, head_workspace, release_workspace
from harness.scoring import build_batch, token_nlls
from harness.tokens import TokenStream
from harness.windows import BosPolicy, plan_sliding


def _batch(vocab: int, n_tokens: int, L: int, S: int, seed: int = 0, bos_id: int = 0, pad_id: int = 2):
    """A length-sorted batch of sliding windows over random ids (the last window is shorter: padding)."""
    ids = np.random.default_rng(seed).integers(3, vocab, n_tokens).astype(np.int64)
    stream = TokenStream(ids, np.zeros(n_tokens + 1, np.int64), np.zeros(n_tokens + 1, np.int64))
    windows = sorted(plan_sliding(n_tokens, L, S, BosPolicy.STREAM), key=lambda w: -w.input_length)
    return build_batch(windows, [stream], bos_id, bos_id, pad_id)


def _full_logits_nlls(model, batch) -> np.ndarray:
    with torch.inference_mode():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        logp = torch.log_softmax(logits[batch.rows, batch.cols].float(), dim=-1)
        return -logp.gather(1, batch.targets[:, None])[:, 0].numpy()


def _check_chunks(model, batch, chunks) -> None:
    ref = _full_logits_nlls(model, batch)
    assert batch.attention_mask is not None  # the padded path is exercised
    for chunk in chunks:
        got = token_nlls(model, batch, logits_chunk=chunk)
        assert got.shape == ref.shape
        # per token: float32 rounding of the head's dot products, whose summation order the
        # matmul kernel picks by shape (one row at a time is a different kernel); in the sum,
        # which is what a perplexity is made of, those roundings average out below 1e-6
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6, err_msg=f"logits_chunk={chunk}")
        total, ref_total = got.astype(np.float64).sum(), ref.astype(np.float64).sum()
        assert abs(total - ref_total) <= 1e-6 * ref_total, (chunk, total, ref_total)


def test_chunk_sizes_equal_full_logits_tiny(tiny):
    _, model, tok = tiny
    batch = _batch(len(tok), n_tokens=150, L=40, S=16)
    _check_chunks(model, batch, chunks=(1, 7, 10**6))


def test_chunk_sizes_equal_full_logits_smollm2(smollm2):
    model, _ = smollm2
    batch = _batch(model.config.vocab_size, n_tokens=120, L=64, S=40, bos_id=1)
    _check_chunks(model, batch, chunks=(1, 7, 10**6))


@pytest.fixture(scope="module")
def wide_vocab_model():
    """Hidden size 16, vocabulary 200,000: the output head dominates every tensor."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=200_000, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def _largest_allocation(fn) -> int:
    """Bytes of the largest net allocation made by any single op (children included) during fn()."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(e.cpu_memory_usage for e in prof.events())


def _chunked_nlls(model, batch, chunk) -> np.ndarray:
    """The NLLs through ``logit_chunks`` (whole chunks of float32 logits in the reused workspace: the
    path of ``ppl compare --kl``, of offloaded heads and of GPUs), as ``token_nlls`` took them before
    the CPU head went by vocabulary blocks."""
    from harness.head import chunk_nll
    from harness.scoring import logit_chunks

    with torch.inference_mode():
        return torch.cat([chunk_nll(logits, batch.targets[sl], again) for sl, logits, again in logit_chunks(model, batch, chunk)]).numpy()


@pytest.mark.parametrize("path", ["blocks", "chunks"])
@pytest.mark.parametrize("chunk", [16, 64])
def test_head_memory_bounded_by_chunk_not_batch(wide_vocab_model, chunk, path):
    from harness.head import BLOCK_FLOATS, blocked_head

    model = wide_vocab_model
    assert blocked_head(model)  # token_nlls takes the vocabulary blocks on this CPU head
    vocab = model.config.vocab_size
    score = (lambda b: token_nlls(model, b, logits_chunk=chunk)) if path == "blocks" else (lambda b: _chunked_nlls(model, b, chunk))
    peaks = {}
    for shape in [(4, 32), (8, 128)]:  # windows x length: 8x more scored positions
        n_windows, L = shape
        batch = _batch(vocab, n_tokens=n_windows * L // 2 + L // 2, L=L, S=L // 2)
        release_workspace(model)  # so the measured call makes its head buffer again
        peaks[shape] = _largest_allocation(lambda: score(batch))
        assert len(batch.targets) > chunk  # several chunks ran
        np.testing.assert_allclose(score(batch), _full_logits_nlls(model, batch), rtol=1e-5, atol=1e-6)
    # the largest allocation is exactly one buffer of logits, whatever the batch: by blocks, one
    # block of BLOCK_FLOATS (rows x a vocabulary slice); by chunks, one chunk of rows x the whole
    # vocabulary (the CPU head pads rows to a multiple of 16, which 16 and 64 are)
    bound = BLOCK_FLOATS * 4 if path == "blocks" else chunk * vocab * 4
    for shape, peak in peaks.items():
        assert peak == bound, (shape, peak, bound)
    # the measurement can see growth: the full-logits forward allocates batch x length x vocab
    full = _batch(vocab, n_tokens=4 * 64 // 2 + 32, L=64, S=32)
    peak_full = _largest_allocation(lambda: _full_logits_nlls(model, full))
    assert peak_full >= full.input_ids.numel() * vocab * 4


def test_head_paths_agree(tiny):
    """The CPU workspace path (W @ h.T, padded rows) equals running the head module."""
    _, model, _ = tiny
    hidden = torch.randn(37, model.config.hidden_size)
    with torch.inference_mode():
        plain = head_logits(model, hidden)
        ws = head_workspace(model, 37)
        assert ws is not None and ws.numel() == model.config.vocab_size * 48  # 37 rows padded to 48
        fast = head_logits(model, hidden, ws)
    assert fast.shape == plain.shape
    torch.testing.assert_close(fast, plain, rtol=1e-6, atol=1e-6)


def test_unshifted_log_sum_exp_and_rows_computed_again():
    """``chunk_nll`` with ``again`` (the head path: exponentials of the logits as they are)
    against float64 log-softmax; rows out of its range (a logit of 100: the sum overflows; every
    logit below -60: it underflows; NaN) are computed again with their max subtracted, and only
    those rows."""
    from harness.head import chunk_nll

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5000, generator=gen) * 4
    logits[1, 17] = 100.0  # overflow
    logits[2] = logits[2] - 80.0  # underflow (largest logit near -65)
    logits[3, 5] = 75.0  # large, still in range
    logits[4, 9] = float("nan")
    targets = torch.tensor([3, 17, 40, 5, 0, 4999])
    ref = -torch.log_softmax(logits.double(), dim=1).gather(1, targets[:, None])[:, 0]
    asked = []

    def again(rows):
        asked.append(rows.tolist())
        return logits[rows].clone()

    got = chunk_nll(logits.clone(), targets, again)
    assert asked == [[1, 2, 4]]
    ok = torch.tensor([True, True, True, True, False, True])
    torch.testing.assert_close(got[ok].double(), ref[ok], rtol=2e-6, atol=2e-6)
    assert torch.isnan(got[4])
    shifted = chunk_nll(logits.clone(), targets)  # without again: max subtracted in every row
    torch.testing.assert_close(got[ok], shifted[ok], rtol=2e-6, atol=2e-6)
