"""Sliding-window attention that computes only the key blocks each query block can see.

Gemma-3 interleaves global layers with sliding-window layers (Gemma-3-270M: window 512, five in
six layers sliding). Transformers runs a sliding layer as SDPA over the whole ``T x T`` score
matrix with a boolean mask that hides everything outside the window, so at ``T = 1024`` three
quarters of the work it does for a window of 512 are thrown away. Here each query block
``[q0, q1)`` attends only to keys ``[max(0, q0 - window + 1), q1)``, with the same mask (causal,
window and padding) cut out of transformers' own mask for that block; positions outside it are
masked in the full computation anyway, so each block's softmax is over the same keys and the
result is the same number (held to 1e-6 in float32 by the tests).

With transformers' mask the blocks run one SDPA call each. Without one (as the compiled layers
run a batch) they run as one call (``banded``): the keys of every block are
overlapping views of the left-padded keys, and one mask serves all blocks; that form traces for
any length, so ``eval.compile`` exports it into Gemma-3's sliding-layer package.

The function is registered with transformers' ``AttentionInterface`` as ``sliding_blocks``,
with transformers' SDPA mask builder; global layers and windows no longer than the sliding
window go to transformers' own SDPA function unchanged. ``install(model)`` switches a loaded
Gemma-3 model to it (``harness.models.load_model`` does so unless ``model.attn_implementation``
is set).

A second function, ``causal_kernel``, is installed the same way on bf16 CPU models of
Llama-style families (``CAUSAL_FAMILIES``) where the machine runs the harness's causal kernel
(``causal_kernel.py``: AVX-512 BF16); it takes the kernel for calls without a mask, SDPA for the rest.
Llama's attention modules there also get ``rotary_attention_forward``: the kernel rotates their
queries and keys itself (bit for bit as eager bf16 does), so no separate rotary pass runs.
"""

from __future__ import annotations

import types

import torch

NAME = "sliding_blocks"
FAMILIES = {"gemma3", "gemma3_text"}
# Full causal attention through the harness's kernel where it applies (``causal_kernel.py``),
# SDPA otherwise. Gemma-3 (``sliding_blocks``) takes the kernel too, its sliding layers with
# their window (``sliding_blocks_attention``).
CAUSAL = "causal_kernel"
CAUSAL_FAMILIES = {"llama", "mistral", "qwen2", "qwen3", "smollm3", "olmo2"}
# Query positions per block, as a fraction of the window: keys per block are block + window - 1,
# so smaller blocks do less arithmetic but make more, smaller SDPA calls;
# benchmarks/attention_blocks.py measures the choice.
BLOCK_DIVISOR = 4  # blocks of 128 for Gemma-3-270M: 1.8x faster than the full mask, one thread (benchmarks/README.md)


def block_size(window: int) -> int:
    return max(1, window // BLOCK_DIVISOR)


def kernel_runs(model) -> bool:
    """The harness's causal kernel computes this model's attention (where it applies)."""
    from . import causal_kernel

    impl = getattr(model.config, "_attn_implementation", None)
    return (model.dtype == torch.bfloat16 and model.device.type == "cpu" and causal_kernel.available()
            and impl in (CAUSAL, NAME))


def sliding_blocks_attention(module, query, key, value, attention_mask, **kwargs):
    """Transformers attention function: block-sparse for sliding layers, SDPA otherwise.

    ``query`` [B, heads, T, D], ``key``/``value`` [B, kv_heads, S, D]; returns ([B, T, heads, D], None).
    Without a mask (no padding: the compiled layers) the blocks run as one SDPA call
    (``banded``), which traces for any length; with transformers' mask, block by block. Where
    the causal kernel applies (bf16 CPU tensors, no mask), the kernel, with the window: on an AMX
    Xeon a sliding layer's attention (4 x 1,024) took 11.3 ms against banded SDPA's 21.8 and a
    whole bf16 run was 1.05x faster; on an AMD Zen 4, 24 ms against 103 and 1.28x
    (``benchmarks/attention_kernels.py --model gemma3 --window 512``; see the README).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from . import causal_kernel

    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    q_len, kv_len = query.shape[2], key.shape[2]
    tracing = torch.compiler.is_compiling() or torch.compiler.is_exporting()
    if causal_kernel.applies(query, key, value, attention_mask, **{**kwargs, "sliding_window": window}):
        return causal_kernel.attention(query, key, value, kwargs.get("scaling"), window=window or 0), None
    if window and attention_mask is None and (tracing or (q_len == kv_len and q_len > window)):
        return banded(query, key, value, window, kwargs.get("scaling")), None
    if not window or q_len != kv_len or q_len <= window:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return _block_by_block(module, query, key, value, attention_mask, window, **kwargs), None


def causal_attention(module, query, key, value, attention_mask, **kwargs):
    """Transformers attention function: the harness's causal kernel where it applies (bf16 on
    a CPU with AVX-512 BF16, no mask: ``causal_kernel.applies``), transformers' SDPA function otherwise."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from . import causal_kernel

    if getattr(module, "is_causal", True) and causal_kernel.applies(query, key, value, attention_mask, **kwargs):
        return causal_kernel.attention(query, key, value, kwargs.get("scaling"), window=kwargs.get("sliding_window") or 0), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


# Attention modules whose forward is Llama's: where the kernel runs them, the queries and keys are
# rotated inside it (``rotary_attention_forward``) instead of by a pass of their own before it.
ROTARY_CLASSES = {"LlamaAttention"}


def _rotary_in_kernel(module, hidden_states, args, kwargs) -> bool:
    """This call of a Llama attention module can run with its rotary embedding inside the kernel:
    the kernel's conditions (bf16 CPU, no mask, no cache, a head_dim it takes), position
    embeddings given as bf16 [B or 1, T, head_dim] tables."""
    from . import causal_kernel

    pe = kwargs.get("position_embeddings")
    if args or pe is None or module.training or hidden_states.dim() != 3 or any(
            kwargs.get(k) is not None for k in ("attention_mask", "cache", "past_key_values")):
        return False
    (cos, sin), cfg, (batch, length) = pe, module.config, hidden_states.shape[:2]
    return (hidden_states.device.type == "cpu" and hidden_states.dtype == cos.dtype == sin.dtype == torch.bfloat16
            and cos.dim() == 3 and cos.shape == sin.shape and cos.shape[0] in (1, batch) and cos.shape[1] == length
            and cos.shape[2] == module.head_dim and module.head_dim % 32 == 0 and module.head_dim <= 256
            and cfg.num_attention_heads % cfg.num_key_value_heads == 0 and getattr(cfg, "_attn_implementation", None) == CAUSAL
            and not getattr(cfg, "sliding_window", None) and causal_kernel._ready())


def rotary_attention_forward(self, hidden_states, *args, **kwargs):
    """A Llama attention module's forward with its queries and keys rotated inside the causal
    kernel where that applies (``_rotary_in_kernel``), the module's own forward otherwise. The
    kernel rotates them as eager bf16 does, to the bit (``tests/test_causal_kernel.py``); on a
    compiled bf16 SmolLM2 layer the separate rotary pass had cost ~1.5 ms of ~27."""
    from . import causal_kernel

    if not _rotary_in_kernel(self, hidden_states, args, kwargs):
        return type(self).forward(self, hidden_states, *args, **kwargs)
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    out = causal_kernel.attention(query, key, value, self.scaling, rotary=kwargs["position_embeddings"])
    return self.o_proj(out.reshape(*input_shape, -1)), None


def rotary_fused(model) -> bool:
    """Some attention module of the model runs ``rotary_attention_forward``."""
    return any(getattr(m.forward, "__func__", None) is rotary_attention_forward for m in model.modules())


@torch.compiler.disable  # eval.compile just in time: a loop over blocks; traced, it made one graph per window length
def _block_by_block(module, query, key, value, attention_mask, window, **kwargs):
    """One SDPA call per query block, each with its block of transformers' mask."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q_len = query.shape[2]
    step = block_size(window)
    outs = []
    for q0 in range(0, q_len, step):
        q1 = min(q0 + step, q_len)
        k0 = max(0, q0 - window + 1)
        mask = attention_mask[..., q0:q1, k0:q1].contiguous()  # a strided mask slowed SDPA down
        out, _ = sdpa_attention_forward(
            module, query[:, :, q0:q1], key[:, :, k0:q1], value[:, :, k0:q1], mask, **{**kwargs, "is_causal": False}
        )
        outs.append(out)
    return torch.cat(outs, dim=1)


def banded(query, key, value, window: int, scaling: float | None = None) -> torch.Tensor:
    """Causal sliding-window attention (no padding), every query block in one SDPA call.

    The length is padded to ``n`` blocks of ``s`` queries; block ``i`` sees the ``P + s`` keys
    ``[i*s - P, i*s + s)`` (``P``: ``window - 1`` rounded up to whole blocks), cut out of the
    left-padded keys as overlapping views. Which of them it may see (causal, within the window,
    not before the first token) is one mask shared by all blocks. Nothing here depends on the
    length's value, so the function traces once for every length. Returns [B, T, heads, D].
    """
    B, heads, T, D = query.shape
    kv_heads = key.shape[1]
    s = block_size(window)
    P = -(-(window - 1) // s) * s
    n = (T + s - 1) // s
    extra = n * s - T
    q = torch.nn.functional.pad(query, (0, 0, 0, extra)).view(B, heads, n, s, D).transpose(1, 2).reshape(B * n, heads, s, D)

    def blocks(x):  # [B, kv, T, D] -> [B * n, kv, P + s, D]
        x = torch.nn.functional.pad(x, (0, 0, P, extra)).unfold(2, P + s, s)  # [B, kv, n, D, P + s]
        return x.permute(0, 2, 1, 4, 3).reshape(B * n, kv_heads, P + s, D)

    r = torch.arange(s, device=query.device)[:, None]
    j = torch.arange(P + s, device=query.device)[None, :]
    visible = (j <= r + P) & (j > r + P - window)  # [s, P + s], the same in every block
    started = (torch.arange(n, device=query.device)[:, None, None] * s - P + j) >= 0  # [n, 1, P + s]
    mask = (visible & started)[None].expand(B, n, s, P + s).reshape(B * n, 1, s, P + s)
    out = torch.nn.functional.scaled_dot_product_attention(
        q, blocks(key), blocks(value), attn_mask=mask, scale=scaling, enable_gqa=heads != kv_heads
    )
    return out.view(B, n, heads, s, D).transpose(2, 3).reshape(B, n * s, heads, D)[:, :T]


def register() -> str:
    """Register the attention functions and their mask builder (SDPA's) with transformers; idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    for name, fn in ((NAME, sliding_blocks_attention), (CAUSAL, causal_attention)):
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, sdpa_mask)
    return NAME


def applies(model) -> bool:
    cfg = model.config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return getattr(cfg, "model_type", None) in FAMILIES and bool(getattr(text, "sliding_window", None))


def install(model) -> str | None:
    """Switch a loaded model's attention to the harness's: Gemma-3's sliding layers block by
    block (``sliding_blocks``); a bf16 CPU model of a ``CAUSAL_FAMILIES`` family whose machine
    runs the causal kernel, to it (``causal_kernel``). Returns the name set, or None (untouched)."""
    from . import causal_kernel

    if applies(model):
        register()
        model.set_attn_implementation(NAME)
        return NAME
    if (getattr(model.config, "model_type", None) in CAUSAL_FAMILIES and getattr(model.config, "_attn_implementation", None) == "sdpa"
            and model.dtype == torch.bfloat16 and model.device.type == "cpu" and causal_kernel.available()):
        register()
        model.set_attn_implementation(CAUSAL)
        for m in model.modules():
            if type(m).__name__ in ROTARY_CLASSES and all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")):
                m.forward = types.MethodType(rotary_attention_forward, m)
        return CAUSAL
    return None


def describe(model) -> str:
    """The record's word for the model's attention: transformers' implementation name, and
    whether the harness's causal kernel runs it."""
    impl = getattr(model.config, "_attn_implementation", None) or "unknown"
    if kernel_runs(model):
        return f"{impl} (the harness's bf16 CPU kernel)"
    return impl
