"""The CPU head by vocabulary blocks (``head.block_nlls``) against a float64 log-softmax.

Every block matmul (MKL's bf16 x bf16 -> float32 where the CPU has AMX, oneDNN's float32 matmul in
bf16 precision, plain float32) on bf16, fp16 and float32 heads, with a bias and Gemma's soft-cap,
a vocabulary that is not a multiple of the block, and rows whose sum of exponentials is out of
range (computed again with their largest logit subtracted). The reference is written here: the
upcast operands' float64 logits, ``torch.logsumexp`` minus the target's logit.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from harness import head as head_mod
from harness import precision
from harness.head import block_gemm, block_nlls


class HeadOnly(torch.nn.Module):
    """What ``block_nlls`` reads of a causal LM: its output head and the soft-cap in its config."""

    def __init__(self, head: torch.nn.Linear, cap: float | None):
        super().__init__()
        self.head, self.config = head, SimpleNamespace(final_logit_softcapping=cap)

    def get_output_embeddings(self):
        return self.head


def _model(dtype, vocab=5000, width=64, bias=False, cap=None, seed=0) -> HeadOnly:
    gen = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(width, vocab, bias=bias)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, width, generator=gen) * 0.3)
        if bias:
            head.bias.copy_(torch.randn(vocab, generator=gen))
    return HeadOnly(head.to(dtype), cap).eval()


def _reference(model, hidden, targets) -> torch.Tensor:
    head = model.get_output_embeddings()
    logits = hidden.double() @ head.weight.double().T
    if head.bias is not None:
        logits += head.bias.double()
    cap = model.config.final_logit_softcapping
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return torch.logsumexp(logits, dim=1) - logits.gather(1, targets[:, None])[:, 0]


def _kinds(dtype) -> list[str]:
    if dtype == torch.bfloat16:
        return ["bf16-products"] + (["mkl"] if precision.mkl_bf16_gemm() else [])
    return ["float32"]


CASES = [(dtype, kind) for dtype in (torch.bfloat16, torch.float16, torch.float32) for kind in _kinds(dtype)]


@pytest.mark.parametrize("dtype,kind", CASES, ids=[f"{d}-{k}".removeprefix("torch.") for d, k in CASES])
@pytest.mark.parametrize("bias,cap", [(False, None), (True, 30.0)])
def test_blocks_equal_float64_log_softmax(monkeypatch, dtype, kind, bias, cap):
    monkeypatch.setattr(head_mod, "BLOCK_FLOATS", 37 * 200)  # blocks of 192 rows: 27 blocks, the last of 8
    model = _model(dtype, bias=bias, cap=cap)
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(37, 64, generator=gen).to(dtype)
    targets = torch.randint(0, 5000, (37,), generator=gen)
    targets[:3] = torch.tensor([0, 4999, 4992])  # the first row, the last, the last block's first
    with torch.inference_mode():
        got = block_nlls(model, hidden, targets, kind)
    assert got.dtype == torch.float32 and got.shape == (37,)
    torch.testing.assert_close(got.double(), _reference(model, hidden, targets), rtol=1e-5, atol=1e-5)


def test_rows_out_of_range_computed_again(monkeypatch):
    """A row whose largest logit is 200 (its sum of exponentials overflows) and rows whose logits
    all lie near -120 (their sums underflow) come back right, computed again and only they; a NaN
    hidden state gives NaN, not a number."""
    calls = []
    real = head_mod.block_gemm
    monkeypatch.setattr(head_mod, "block_gemm", lambda head, h, *a: calls.append(h.shape[0]) or real(head, h, *a))
    model = _model(torch.float32, vocab=3000, bias=True)
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(6, 64, generator=gen)
    w, bias = model.head.weight.detach(), model.head.bias.detach()
    hidden[1] = w[7] / w[7].norm() ** 2 * (200 - bias[7])  # the logit of token 7 is 200
    hidden[4] = float("nan")
    targets = torch.tensor([3, 7, 40, 5, 0, 2999])
    low = _model(torch.float32, vocab=3000, bias=True)
    with torch.no_grad():
        low.head.bias.sub_(120)  # every logit near -120
    with torch.inference_mode():
        got = block_nlls(model, hidden, targets)
        assert calls == [6, 2]  # all rows, then rows 1 (overflow) and 4 (NaN) again
        got_low = block_nlls(low, hidden[[0, 2]], targets[[0, 2]])
        assert calls == [6, 2, 2, 2]  # both rows underflow
    ref = _reference(model, hidden, targets)
    assert ref[1] < 1e-3  # token 7 takes almost all the mass: the row is far out of range, and right
    ok = torch.tensor([True, False, True, True, False, True])
    torch.testing.assert_close(got[ok].double(), ref[ok], rtol=1e-5, atol=1e-5)
    # row 1's NLL is the difference of two float32 numbers near 200, whose spacing is 1.5e-5
    torch.testing.assert_close(got[1].double(), ref[1], rtol=0, atol=8 * 200 * 2**-24)
    assert torch.isnan(got[4])
    torch.testing.assert_close(got_low.double(), _reference(low, hidden[[0, 2]], targets[[0, 2]]), rtol=1e-5, atol=1e-5)


def test_the_block_matmul_chosen():
    """MKL's kernel for bf16 weights and hidden states on an AMX CPU; oneDNN's bf16 products on
    other CPUs with native bf16; float32 for every other head."""
    h = torch.randn(4, 64)
    want = "mkl" if precision.mkl_bf16_gemm() else "bf16-products"
    assert ("amx_bf16" in precision.cpu_bf16_flags()) == (precision.mkl_bf16_gemm() is not None)  # torch's x86 wheel has MKL
    assert block_gemm(_model(torch.bfloat16).head, h.bfloat16())[1] == (want if precision.cpu_bf16_flags() else "float32")
    assert block_gemm(_model(torch.bfloat16).head, h)[1] == "float32"  # float32 hidden states: never rounded to bf16
    assert block_gemm(_model(torch.float16).head, h.half())[1] == "float32"
    assert block_gemm(_model(torch.float32).head, h)[1] == "float32"


def test_no_float32_copy_of_a_bf16_weight_with_mkl():
    """With MKL's kernel the bf16 weight is used as it is, also for rows computed again: the
    float32 copy (Gemma-3: 671 MB) is made only where another matmul reads it (oneDNN's bf16
    products; float32 on a CPU without native bf16)."""
    model = _model(torch.bfloat16, vocab=3000)
    hidden = torch.randn(4, 64).bfloat16()
    w = model.head.weight.detach()
    hidden[1] = (w[7].float() / w[7].float().norm() ** 2 * 200).bfloat16()  # out of range: computed again
    targets = torch.tensor([1, 7, 2, 3])
    with torch.inference_mode():
        got = block_nlls(model, hidden, targets)
    torch.testing.assert_close(got.double(), _reference(model, hidden, targets), rtol=1e-5, atol=8 * 200 * 2**-24)
    mkl = precision.mkl_bf16_gemm() is not None
    assert (model.head in precision._WEIGHT32) == (not mkl)


def test_token_ids_outside_the_head_are_refused():
    """A target id the head has no row for is an error, not an NLL of whatever the buffer held."""
    model = _model(torch.float32, vocab=300)
    hidden = torch.randn(3, 64)
    with torch.inference_mode():
        for bad in (300, -1):
            with pytest.raises(ValueError, match="outside the head's 300 rows"):
                block_nlls(model, hidden, torch.tensor([0, bad, 5]))
