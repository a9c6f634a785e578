"""The harness's SiLU x up kernel (``activation``: C++, AVX-512 BF16) against eager torch and float64.

Eager bf16 rounds silu(gate) to bf16 and the product with up to bf16, each from float32; the kernel
rounds at the same points, so an element may differ from eager's only where float32's last bits
decide a bf16 rounding: by one bf16 unit, in a small share of elements (measured ~0.05%). The
routing (float32, switched off, a failed build: the model's own MLP) and a tiny bf16 Llama
through transformers are checked too; the real SmolLM2 runs it in bf16 in
``tests/test_precision.py`` (held to the float32 number) and compiled into its package in
``tests/test_compiled.py``. On a CPU without AVX-512 BF16 the kernel is never taken: there the
tests hold that it is not.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from harness import activation, precision

NATIVE = "avx512_bf16" in precision.cpu_bf16_flags()


def _unit(x: torch.Tensor) -> torch.Tensor:
    """One bf16 unit in the last place of each (nonzero, finite) value, as float32."""
    _, e = torch.frexp(x.float())
    return torch.ldexp(torch.ones_like(x, dtype=torch.float32), e - 8)


def test_available_exactly_on_cpus_with_avx512_bf16():
    assert activation.available() == NATIVE


@pytest.mark.parametrize("shape", [(4, 256, 1536), (7, 37), (1,), (3, 17, 5)])
def test_as_eager_rounds_it(shape):
    """silu(gate) equal to eager's or one bf16 unit from it, the differing share under 0.2%; the
    product with up rounded from it as eager rounds it (exactly); no further from float64 than
    eager's on the whole; lengths that are not whole vectors."""
    if not NATIVE:
        assert not activation.available()
        return
    gen = torch.Generator().manual_seed(0)
    gate = (torch.randn(shape, generator=gen) * 3).bfloat16()
    up = torch.randn(shape, generator=gen).bfloat16()
    got, eager = activation.silu_mul(gate, up), F.silu(gate) * up
    assert got.shape == eager.shape and got.dtype == torch.bfloat16 and got.is_contiguous()
    silu, silu_eager = activation.silu_mul(gate, torch.ones_like(up)), F.silu(gate)
    diff = silu != silu_eager
    assert float(diff.float().mean()) <= 2e-3
    assert bool(((silu.float() - silu_eager.float()).abs()[diff] <= _unit(silu_eager)[diff]).all())
    assert torch.equal(got, silu * up)
    exact = F.silu(gate.double()).bfloat16().double() * up.double()  # silu rounded as eager rounds it
    assert (got.double() - exact).abs().sum() <= 1.01 * (eager.double() - exact).abs().sum() + 1e-30


def test_extremes_and_layouts():
    """Zeros, infinities, NaN, and gates far below -88 (where e^-g overflows float32): as eager
    gives them; strided inputs are read as their values."""
    if not NATIVE:
        return
    gate = torch.tensor([-3e38, -200.0, -88.75, -88.5, -87.5, -20.0, -1e-3, 0.0, -0.0, 1e-3, 20.0, 87.5, 100.0, 3e38,
                         float("inf"), float("-inf"), float("nan")]).bfloat16()
    up = torch.ones_like(gate)
    got, eager = activation.silu_mul(gate, up), F.silu(gate) * up
    assert bool(((got == eager) | (got.isnan() & eager.isnan())).all()), (got.tolist(), eager.tolist())
    assert bool((torch.signbit(got) == torch.signbit(eager))[~eager.isnan()].all())
    g = torch.randn(64, 96).bfloat16()
    u = torch.randn(96, 64).bfloat16()
    assert torch.equal(activation.silu_mul(g.T, u), activation.silu_mul(g.T.contiguous(), u))


def test_tiny_bf16_llama_through_transformers(monkeypatch):
    """A tiny bf16 Llama: installed as loading installs it, every MLP takes the kernel (its calls
    counted), and the hidden states are as close to the float64 model's as the model's own MLP
    gives them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 300, (2, 100))
    with torch.inference_mode():
        ref = model.double().model(input_ids=ids).last_hidden_state
        model.float()
        assert activation.install(model) == 0  # float32: untouched
        model.to(torch.bfloat16)
        own = model.model(input_ids=ids).last_hidden_state.double()
        assert activation.install(model) == (2 if NATIVE else 0)
        assert activation.kernel_runs(model) == NATIVE
        calls = []
        monkeypatch.setattr(activation, "silu_mul", lambda g, u, op=activation.silu_mul: calls.append(g.shape) or op(g, u))
        got = model.model(input_ids=ids).last_hidden_state.double()
        assert calls == ([(2, 100, 352)] * 2 if NATIVE else [])
        monkeypatch.undo()
        model.float()  # back in float32 the installed forward does the model's own arithmetic
        assert not activation.kernel_runs(model)
        mlp, x = model.model.layers[0].mlp, torch.randn(2, 5, 128)
        assert torch.equal(mlp(x), type(mlp).forward(mlp, x))
    err, err_own = (got - ref).abs(), (own - ref).abs()
    assert err.max() <= 1.5 * err_own.max() and err.mean() <= 1.2 * err_own.mean()


def test_switched_off_and_failed_build_keep_the_models_own(monkeypatch, tmp_path):
    """``PPL_ACTIVATION_KERNEL=off`` installs nothing; a kernel that does not build warns once,
    in one line that says so, and installs nothing."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2)
    model = LlamaForCausalLM(config).eval().to(torch.bfloat16)
    monkeypatch.setenv("PPL_CACHE_DIR", str(tmp_path / "cache"))
    try:
        activation.available.cache_clear()
        monkeypatch.setenv("PPL_ACTIVATION_KERNEL", "off")
        assert activation.install(model) == 0 and not activation.kernel_runs(model)
        monkeypatch.delenv("PPL_ACTIVATION_KERNEL")
        if NATIVE:
            activation.available.cache_clear()
            broken = tmp_path / "silu_mul.cpp"
            broken.write_text("this is not C++\n")
            monkeypatch.setattr(activation, "SOURCE", broken)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                assert activation.install(model) == 0
            said = [str(w.message) for w in caught if "SiLU" in str(w.message)]
            assert len(said) == 1 and "\n" not in said[0] and "the model's own" in said[0], said
    finally:
        monkeypatch.undo()
        activation.available.cache_clear()
    assert activation.available() == NATIVE  # the real kernel again, for the tests that follow
