"""The harness's causal attention kernel (``causal_kernel``: C++, AVX-512 BF16) against float64 and SDPA.

The reference is float64 attention on the same bf16 values (SDPA in float64, keys repeated for
the grouped heads); the kernel's bf16 output must sit as close to it as SDPA's own bf16 output
does (measured: the same largest error, a mean error within 1% of SDPA's). The routing (mask,
float32, switched off, a failed build: SDPA) and a tiny bf16 Llama through transformers are
checked too; the real SmolLM2 in bf16 runs it in ``tests/test_precision.py`` (held to the float32
number) and compiled into its packages in ``tests/test_compiled.py``. On a CPU without AVX-512
BF16 the kernel is never taken: there the tests hold that it is not. On AMX CPUs its products run on
AMX tiles (torch packs the keys and values), on others with AVX-512 BF16 (an AMD Zen 4) on that
instruction set (the kernel lays out the pairs itself): whichever this machine is, it is tested.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from harness import attention, causal_kernel, precision

NATIVE = "avx512_bf16" in precision.cpu_bf16_flags()


def _qkv(B, Hq, Hkv, T, D, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, Hq, D, generator=gen).bfloat16().transpose(1, 2)  # strided, as a layer makes it
    k, v = (torch.randn(B, Hkv, T, D, generator=gen).bfloat16() for _ in range(2))
    return q, k, v


def _float64(q, k, v) -> torch.Tensor:
    r = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(q.double(), k.double().repeat_interleave(r, 1), v.double().repeat_interleave(r, 1), is_causal=True)
    return out.transpose(1, 2)


def test_available_exactly_on_cpus_with_avx512_bf16():
    assert causal_kernel.available() == NATIVE


SHAPES = [(2, 9, 3, 300, 64), (1, 4, 1, 1024, 256), (2, 2, 2, 129, 32), (1, 8, 2, 1, 128), (1, 3, 1, 256, 96), (3, 6, 3, 128, 64)]


@pytest.mark.parametrize("B,Hq,Hkv,T,D", SHAPES, ids=[f"B{s[0]}-H{s[1]}/{s[2]}-T{s[3]}-D{s[4]}" for s in SHAPES])
def test_kernel_as_close_to_float64_as_sdpa(B, Hq, Hkv, T, D):
    """SmolLM2's and Gemma-3's shapes, lengths that are not whole blocks of 128, one token, one
    head per key head and several, head_dims 32 to 256."""
    if not NATIVE:
        assert not causal_kernel.available()
        return
    q, k, v = _qkv(B, Hq, Hkv, T, D)
    ref = _float64(q, k, v)
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=Hq != Hkv).transpose(1, 2).double()
    got = causal_kernel.attention(q, k, v)
    assert got.shape == (B, T, Hq, D) and got.dtype == torch.bfloat16 and got.is_contiguous()
    err, err_sdpa = (got.double() - ref).abs(), (sdpa - ref).abs()
    assert err.max() <= 1.25 * err_sdpa.max() + 1e-6
    assert err.mean() <= 1.1 * err_sdpa.mean() + 1e-7
    # the scale is the one given (Gemma-3 scales by query_pre_attn_scalar, not head_dim)
    scaled = causal_kernel.attention(q, k, v, scaling=0.3)
    r = Hq // Hkv
    ref_scaled = F.scaled_dot_product_attention(q.double(), k.double().repeat_interleave(r, 1), v.double().repeat_interleave(r, 1),
                                                is_causal=True, scale=0.3).transpose(1, 2)
    sdpa_scaled = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=Hq != Hkv).transpose(1, 2).double()
    assert (scaled.double() - ref_scaled).abs().max() <= 1.25 * (sdpa_scaled - ref_scaled).abs().max() + 1e-6


WINDOWED = [(2, 9, 3, 300, 64, 100), (1, 4, 1, 1024, 256, 512), (2, 2, 2, 400, 32, 128), (1, 3, 1, 260, 96, 1), (1, 2, 1, 200, 64, 500)]


@pytest.mark.parametrize("B,Hq,Hkv,T,D,W", WINDOWED, ids=[f"T{s[3]}-D{s[4]}-W{s[5]}" for s in WINDOWED])
def test_sliding_window_as_close_to_float64_as_sdpa(B, Hq, Hkv, T, D, W):
    """With a window (Gemma-3's sliding layers: 512 over 1,024 positions), query t sees keys
    t - W < s <= t: windows that end inside a key block and on its edge, shorter than a block, of
    one key, and longer than the sequence (then plain causal)."""
    if not NATIVE:
        assert not causal_kernel.available()
        return
    q, k, v = _qkv(B, Hq, Hkv, T, D, seed=1)
    t = torch.arange(T)
    mask = (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - W)
    r = Hq // Hkv
    ref = F.scaled_dot_product_attention(q.double(), k.double().repeat_interleave(r, 1), v.double().repeat_interleave(r, 1),
                                         attn_mask=mask).transpose(1, 2)
    sdpa = F.scaled_dot_product_attention(q, k.repeat_interleave(r, 1), v.repeat_interleave(r, 1), attn_mask=mask)
    got = causal_kernel.attention(q, k, v, window=W)
    err, err_sdpa = (got.double() - ref).abs(), (sdpa.transpose(1, 2).double() - ref).abs()
    assert err.max() <= 1.25 * err_sdpa.max() + 1e-6
    assert err.mean() <= 1.1 * err_sdpa.mean() + 1e-7
    if W >= T:
        assert torch.equal(got, causal_kernel.attention(q, k, v))


ROTARY = [(2, 9, 3, 300, 64, 2, 0), (1, 4, 1, 260, 256, 1, 0), (2, 2, 2, 129, 32, 1, 0), (1, 3, 1, 256, 96, 1, 100)]


@pytest.mark.parametrize("B,Hq,Hkv,T,D,cos_rows,W", ROTARY, ids=[f"T{s[3]}-D{s[4]}-cos{s[5]}-W{s[6]}" for s in ROTARY])
def test_rotary_inside_the_kernel_is_eagers_to_the_bit(B, Hq, Hkv, T, D, cos_rows, W):
    """Queries and keys rotated inside the kernel (Llama's attention on the fast path) give the
    kernel's output on queries and keys rotated by transformers' ``apply_rotary_pos_emb`` in eager
    bf16, bit for bit: tables of one row and of one per batch row, strided queries, a window."""
    if not NATIVE:
        assert not causal_kernel.available()
        return
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q, k, v = _qkv(B, Hq, Hkv, T, D, seed=2)
    angles = torch.randn(cos_rows, T, D // 2, generator=torch.Generator().manual_seed(3)) * 3
    cos, sin = (f(torch.cat([angles, angles], -1)).bfloat16() for f in (torch.cos, torch.sin))
    q_rot, k_rot = apply_rotary_pos_emb(q, k, cos, sin)
    want = causal_kernel.attention(q_rot, k_rot, v, 0.2, window=W)
    assert torch.equal(causal_kernel.attention(q, k, v, 0.2, window=W, rotary=(cos, sin)), want)


def test_llama_attention_rotates_inside_the_kernel(monkeypatch):
    """A tiny bf16 Llama, installed as loading installs it: its attention modules take the forward
    that rotates inside the kernel (the kernel's calls with tables counted), and its hidden states
    equal the module's own forward's bit for bit; with a padding mask the module's own forward
    runs (the same hidden states either way)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512)
    model = LlamaForCausalLM(config).eval().to(torch.bfloat16)
    ids = torch.randint(0, 300, (2, 150))
    mask = torch.ones(2, 150, dtype=torch.long)
    mask[1, 120:] = 0
    attention.install(model)
    assert attention.rotary_fused(model) == NATIVE
    rotated = []
    kernel = causal_kernel.attention
    monkeypatch.setattr(causal_kernel, "attention", lambda *a, rotary=None, **kw: rotated.append(rotary is not None) or kernel(*a, rotary=rotary, **kw))
    with torch.inference_mode():
        got = model.model(input_ids=ids, use_cache=False).last_hidden_state
        assert rotated == [True, True] if NATIVE else not rotated
        padded = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        assert rotated == ([True, True] if NATIVE else [])  # padded: the modules' own forwards, then SDPA for the mask
        monkeypatch.undo()
        for m in model.modules():
            m.__dict__.pop("forward", None)  # the modules' own forwards (rotary, then the kernel or SDPA)
        assert not attention.rotary_fused(model)
        assert torch.equal(got, model.model(input_ids=ids, use_cache=False).last_hidden_state)
        assert torch.equal(padded, model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state)


def test_routing_kernel_only_where_it_applies():
    """The attention function takes the kernel for bf16 without a mask (on AVX-512 BF16), a sliding
    window as the kernel's window; with a padding mask or in float32, transformers' SDPA. Gemma-3's
    function takes it too, window and all, where it applies; elsewhere its banded SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2
    q, k, v = _qkv(2, 4, 2, 70, 64)
    got, _ = attention.causal_attention(module, q, k, v, None, scaling=0.125)
    want = causal_kernel.attention(q, k, v, 0.125) if NATIVE else sdpa_attention_forward(module, q, k, v, None, scaling=0.125)[0]
    assert torch.equal(got, want)
    mask = torch.ones(2, 1, 70, 70, dtype=torch.bool).tril()
    mask[1, ..., 60:] = False
    for args, kwargs in [((q, k, v, mask), {}), ((q.float(), k.float(), v.float(), None), {})]:
        got, _ = attention.causal_attention(module, *args, scaling=0.125, **kwargs)
        want, _ = sdpa_attention_forward(module, *args, scaling=0.125, **kwargs)
        assert torch.equal(got, want)
    got, _ = attention.causal_attention(module, q, k, v, None, scaling=0.125, sliding_window=32)
    if NATIVE:
        assert torch.equal(got, causal_kernel.attention(q, k, v, 0.125, window=32))
    got, _ = attention.sliding_blocks_attention(module, q, k, v, None, scaling=0.125, sliding_window=32)
    want = causal_kernel.attention(q, k, v, 0.125, window=32) if NATIVE else attention.banded(q, k, v, 32, 0.125)
    assert torch.equal(got, want)
    got, _ = attention.sliding_blocks_attention(module, q.float(), k.float(), v.float(), None, scaling=0.125, sliding_window=32)
    assert torch.equal(got, attention.banded(q.float(), k.float(), v.float(), 32, 0.125))


def test_attention_functions_compile_in_one_graph():
    """Compiled just in time, both attention functions (Llama-style causal; Gemma-3's, with its
    sliding window) trace the kernel's op in one graph (SDPA's and the banded SDPA where the kernel
    does not run): no graph break (the kernel's availability is a constant to dynamo) and the same
    output as eager."""
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2
    q, k, v = _qkv(2, 4, 2, 300, 64)
    for fn, kw in [(attention.causal_attention, {}), (attention.sliding_blocks_attention, {"sliding_window": 128})]:
        def call(q, k, v, fn=fn, kw=kw):
            return fn(module, q, k, v, None, scaling=0.125, **kw)[0]

        torch._dynamo.reset()
        explained = torch._dynamo.explain(call)(q, k, v)
        assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
        assert torch.equal(torch.compile(call, fullgraph=True)(q, k, v), call(q, k, v))


def test_switched_off_and_failed_build_fall_back_to_sdpa(monkeypatch, tmp_path):
    """``PPL_ATTENTION_KERNEL=off`` leaves SDPA in place; a kernel that does not build warns once,
    in one line that says so, and leaves SDPA in place."""
    from harness.files import cache_root

    monkeypatch.setenv("PPL_CACHE_DIR", str(tmp_path / "cache"))
    try:
        causal_kernel.available.cache_clear()
        monkeypatch.setenv("PPL_ATTENTION_KERNEL", "off")
        assert not causal_kernel.available()
        monkeypatch.delenv("PPL_ATTENTION_KERNEL")
        if NATIVE:  # elsewhere nothing is built, so nothing can fail
            causal_kernel.available.cache_clear()
            broken = tmp_path / "causal_attention.cpp"
            broken.write_text("this is not C++\n")
            monkeypatch.setattr(causal_kernel, "SOURCE", broken)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                assert not causal_kernel.available()
            said = [str(w.message) for w in caught if "causal kernel" in str(w.message)]
            assert len(said) == 1 and "\n" not in said[0] and "using SDPA" in said[0], said
            assert str(cache_root() / "kernels") in said[0]
    finally:
        monkeypatch.undo()
        causal_kernel.available.cache_clear()
    assert causal_kernel.available() == NATIVE  # the real kernel again, for the tests that follow


def test_tiny_bf16_llama_through_transformers():
    """A tiny Llama with head_dim 32, in bf16: hidden states with the kernel (installed as loading
    installs it) against SDPA's, both against the float64 model: no further off than SDPA."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 300, (2, 200))
    with torch.inference_mode():
        ref = model.double().model(input_ids=ids).last_hidden_state
        model.to(torch.bfloat16)
        sdpa = model.model(input_ids=ids, use_cache=False).last_hidden_state.double()
        installed = attention.install(model)
        assert installed == (attention.CAUSAL if NATIVE else None)
        got = model.model(input_ids=ids, use_cache=False).last_hidden_state.double()
    if NATIVE:
        assert not torch.equal(got, sdpa)  # the kernel ran
    err, err_sdpa = (got - ref).abs(), (sdpa - ref).abs()
    assert err.max() <= 1.5 * err_sdpa.max() and err.mean() <= 1.2 * err_sdpa.mean()
