"""The harness's RMSNorm kernel (``norm``: C++, AVX-512 BF16) against transformers' LlamaRMSNorm and float64.

Eager bf16 computes the mean of squares in float32, rounds the normalised value to bf16 and its
product with the weight to bf16; the kernel rounds at the same points and sums the squares in its
own order, so an element may differ from eager's by one bf16 unit where the float32 mean's last
bit decides a rounding (measured: 11 of 2.4 million). The routing (float32, switched off, a
failed build: the model's own norm) and a tiny bf16 Llama are checked too; the real SmolLM2 runs
it in bf16 in ``tests/test_precision.py`` and compiled into its package in ``tests/test_compiled.py``.
On a CPU without AVX-512 BF16 the kernel is never taken: there the tests hold that it is not.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from harness import norm, precision

NATIVE = "avx512_bf16" in precision.cpu_bf16_flags()


def _llama_norm(width: int, seed: int = 0):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    m = LlamaRMSNorm(width, eps=1e-5)
    m.weight.data = torch.randn(width, generator=torch.Generator().manual_seed(seed)) * 0.3 + 1
    return m.bfloat16()


def test_available_exactly_on_cpus_with_avx512_bf16():
    assert norm.available() == NATIVE


@pytest.mark.parametrize("shape", [(4, 256, 576), (3, 7, 64), (1, 16), (5, 1024)])
def test_as_eager_rounds_it(shape):
    """Every element equal to eager's or one bf16 unit from it, under 0.01% of them differing, and
    no further from float64 (computed from the same bf16 values) than eager's on the whole."""
    if not NATIVE:
        assert not norm.available()
        return
    m = _llama_norm(shape[-1])
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 2).bfloat16()
    got, eager = norm.rms_norm(x, m.weight, m.variance_epsilon), m(x)
    assert got.shape == eager.shape and got.dtype == torch.bfloat16
    diff = got != eager
    assert float(diff.float().mean()) <= 1e-4
    _, e = torch.frexp(eager.float())
    assert bool(((got.float() - eager.float()).abs() <= torch.ldexp(torch.ones_like(e, dtype=torch.float32), e - 8))[diff].all())
    xd = x.double()
    exact = m.weight.double() * (xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + m.variance_epsilon)).bfloat16().double()
    assert (got.double() - exact).abs().sum() <= 1.01 * (eager.double() - exact).abs().sum() + 1e-30
    assert torch.equal(norm.rms_norm(x.transpose(0, -2).contiguous().transpose(0, -2), m.weight, m.variance_epsilon), got)
    r = (torch.randn(shape, generator=torch.Generator().manual_seed(2)) * 2).bfloat16()
    total, normed = norm.add_rms_norm(x, r, m.weight, m.variance_epsilon)
    assert torch.equal(total, r + x) and torch.equal(normed, norm.rms_norm(r + x, m.weight, m.variance_epsilon))


def test_tiny_bf16_llama_through_transformers(monkeypatch):
    """A tiny bf16 Llama: installed, every RMSNorm takes the kernel, each layer's post-attention
    one with the residual add before it (the calls counted), and the hidden states are as close to
    the float64 model's as the model's own norms give them; back in float32, the norm's own arithmetic."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 300, (2, 100))
    with torch.inference_mode():
        ref = model.double().model(input_ids=ids, use_cache=False).last_hidden_state
        model.float()
        assert norm.install(model) == 0  # float32: untouched
        model.to(torch.bfloat16)
        own = model.model(input_ids=ids, use_cache=False).last_hidden_state.double()
        assert norm.install(model) == (5 if NATIVE else 0)  # two per layer and the final one
        assert norm.kernel_runs(model) == NATIVE
        calls = []
        monkeypatch.setattr(norm, "rms_norm", lambda x, w, eps, op=norm.rms_norm: calls.append("norm") or op(x, w, eps))
        monkeypatch.setattr(norm, "add_rms_norm", lambda x, r, w, eps, op=norm.add_rms_norm: calls.append("add") or op(x, r, w, eps))
        got = model.model(input_ids=ids, use_cache=False).last_hidden_state.double()
        # each layer: its input norm, then its residual add and post-attention norm as one; the final norm
        assert calls == (["norm", "add", "norm", "add", "norm"] if NATIVE else [])
        monkeypatch.undo()
        model.float()  # back in float32 the installed forward does the model's own arithmetic
        assert not norm.kernel_runs(model)
        m, x = model.model.norm, torch.randn(2, 5, 128)
        assert torch.equal(m(x), type(m).forward(m, x))
    err, err_own = (got - ref).abs(), (own - ref).abs()
    assert err.max() <= 1.5 * err_own.max() and err.mean() <= 1.2 * err_own.mean()


def test_switched_off_and_failed_build_keep_the_models_own(monkeypatch, tmp_path):
    """``PPL_NORM_KERNEL=off`` installs nothing; a kernel that does not build warns once, in one
    line that says so, and installs nothing."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2)
    model = LlamaForCausalLM(config).eval().to(torch.bfloat16)
    monkeypatch.setenv("PPL_CACHE_DIR", str(tmp_path / "cache"))
    try:
        norm.available.cache_clear()
        monkeypatch.setenv("PPL_NORM_KERNEL", "off")
        assert norm.install(model) == 0 and not norm.kernel_runs(model)
        monkeypatch.delenv("PPL_NORM_KERNEL")
        if NATIVE:
            norm.available.cache_clear()
            broken = tmp_path / "rms_norm.cpp"
            broken.write_text("this is not C++\n")
            monkeypatch.setattr(norm, "SOURCE", broken)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                assert norm.install(model) == 0
            said = [str(w.message) for w in caught if "RMSNorm" in str(w.message)]
            assert len(said) == 1 and "\n" not in said[0] and "the model's own" in said[0], said
    finally:
        monkeypatch.undo()
        norm.available.cache_clear()
    assert norm.available() == NATIVE  # the real kernel again, for the tests that follow
