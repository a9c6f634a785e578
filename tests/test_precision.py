"""Precision policy: what ``model.dtype: auto`` resolves to, and float32 logits from a bf16 head.

The reference for a bf16 model is plain float64 arithmetic on the same bf16 hidden states and
the same bf16 head weight, upcast: the harness's logits must be those products summed in
float32, never rounded to bf16 before the log-sum-exp.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from harness import precision
from harness.scoring import head_logits, release_workspace, scored_hidden, token_nlls

from .test_scoring_chunks import _batch


def _cpuinfo_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def test_resolve_dtype():
    assert precision.resolve_dtype("float32", "cpu").dtype == torch.float32
    assert precision.resolve_dtype("bfloat16", "cpu") == precision.Resolved(torch.bfloat16, "requested")
    assert precision.resolve_dtype("float16", "cuda").dtype == torch.float16
    native = bool(_cpuinfo_flags() & {"amx_bf16", "avx512_bf16"})
    auto = precision.resolve_dtype("auto", "cpu")
    assert auto.dtype == (torch.bfloat16 if native else torch.float32), auto
    assert auto.reason.startswith("cpu")
    cuda = precision.resolve_dtype("auto", "cuda")
    assert cuda.dtype == (torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32)
    assert precision.resolve_dtype("auto", "mps").dtype == torch.float32


@pytest.fixture(scope="module")
def tiny_bf16(tiny):
    _, model, tok = tiny
    return copy.deepcopy(model).to(torch.bfloat16).eval(), tok


def _reference_nlls(model, batch) -> np.ndarray:
    """float64 log-sum-exp of the bf16 hidden states times the bf16 head weight, both upcast."""
    with torch.inference_mode():
        hidden = scored_hidden(model, batch)
        assert hidden.dtype == torch.bfloat16
        logits = hidden.double() @ model.get_output_embeddings().weight.double().T
        logp = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        return -logp.gather(1, batch.targets[:, None])[:, 0].numpy()


@pytest.mark.parametrize("chunk", [None, 7])
def test_bf16_head_gives_float32_logits(tiny_bf16, chunk):
    model, tok = tiny_bf16
    batch = _batch(len(tok), n_tokens=150, L=40, S=16)
    ref = _reference_nlls(model, batch)
    release_workspace(model)
    got = token_nlls(model, batch, logits_chunk=chunk)  # CPU: through the float32 workspace
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    hidden = torch.randn(5, model.config.hidden_size).to(torch.bfloat16)
    with torch.inference_mode():
        logits = head_logits(model, hidden)  # without a workspace
    assert logits.dtype == torch.float32
    exact = hidden.double() @ model.get_output_embeddings().weight.double().T
    torch.testing.assert_close(logits.double(), exact, rtol=1e-6, atol=1e-6)
