"""The harness's causal attention kernel for bf16 on CPUs with AVX-512 BF16 (``kernels/causal_attention.cpp``).

SDPA's CPU flash kernel ran SmolLM2's causal attention (head_dim 64, batch 4 x 1,024) at about
400 GFLOP/s, a fifth of the bf16 GEMM peak, and was 38% of a compiled layer's time. The kernel
here computes the same attention (float32 scores and softmax, bf16 probabilities times V,
float32 sums; see the source) with the query heads of a key head stacked into one matmul, blocks
of 128 x 128, and a polynomial exponential; ``benchmarks/attention_kernels.py`` measures both.

It is C++, built on first use into the harness's cache (``cpu_kernels.py``) and loaded as the op
``ppl_harness::causal_attention``, with a fake kernel so that ``torch.export`` traces it into the
compiled layer packages. It is taken only where it was measured: a CPU with AVX-512 BF16 (an
AMX Xeon, whose products run on AMX tiles; an AMD Zen 4, whose products run on AVX-512 BF16 dot
products, where SDPA's flash kernel was no faster in bf16 than in float32), bf16 tensors, no mask
(unpadded or end-padded batches), head_dim a multiple of 32 up to 256. Elsewhere, or where the
build fails (one warning line), attention stays SDPA's.
"""

from __future__ import annotations

import functools

import torch

from . import cpu_kernels

SOURCE = cpu_kernels.KERNELS / "causal_attention.cpp"
_FAKE: list = []  # the op's fake kernel, once registered


def fingerprint() -> str:
    """The kernel's source and build, as a short digest (keys the build and the compiled packages)."""
    return cpu_kernels.fingerprint(SOURCE)


@functools.cache
def available() -> bool:
    """The kernel is built (or found built), loaded and usable on this machine; where it does not
    build (no compiler, no ninja, a failed build), SDPA, said once."""
    if cpu_kernels.switched_off("PPL_ATTENTION_KERNEL") or not cpu_kernels.cpu_ok():
        return False
    if not cpu_kernels.try_build(SOURCE, "causal", "attention: the causal kernel", "SDPA"):
        return False
    if not _FAKE:  # once per process (``available`` may be asked again after ``cache_clear``)

        @torch.library.register_fake("ppl_harness::causal_attention")
        def _(q, k, v, scale, window=0, cos=None, sin=None):
            B, H, T, D = q.shape
            return q.new_empty(B, T, H, D)

        _FAKE.append(_)
    return True


@torch.compiler.assume_constant_result
def _ready() -> bool:
    """``available()``, a constant to dynamo: its cache cannot be traced, and calling it in a
    compiled attention function broke the graph there."""
    return available()


def applies(query, key, value, attention_mask, **kwargs) -> bool:
    """The kernel computes this call of a transformers attention function exactly as SDPA's
    causal path would (up to rounding): bf16 CPU tensors, self-attention without a mask or cache
    (a sliding window is the kernel's ``window``), no dropout, soft-cap or sinks, a head_dim it takes."""
    return (
        attention_mask is None and query.device.type == "cpu" and query.dtype == key.dtype == value.dtype == torch.bfloat16
        and query.shape[2] == key.shape[2] and query.shape[3] % 32 == 0 and query.shape[3] <= 256
        and query.shape[1] % key.shape[1] == 0 and not kwargs.get("dropout")
        and not kwargs.get("softcap") and kwargs.get("s_aux") is None and _ready()
    )


def attention(query, key, value, scaling: float | None = None, window: int = 0, rotary=None) -> torch.Tensor:
    """Causal attention of [B, Hq, T, D] queries over [B, Hkv, T, D] keys and values: [B, T, Hq, D];
    with ``window`` > 0 query t sees keys t - window < s <= t only (transformers' sliding window).
    ``rotary``: (cos, sin) bf16 [B or 1, T, D]: the queries and keys are rotated first, inside the
    kernel, to the bit as transformers' ``apply_rotary_pos_emb`` rotates them in eager bf16."""
    if not _ready():
        raise RuntimeError("the causal attention kernel is not available here (causal_kernel.available())")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    cos, sin = rotary if rotary is not None else (None, None)
    return torch.ops.ppl_harness.causal_attention(query, key, value, float(scale), int(window), cos, sin)
