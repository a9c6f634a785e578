"""Llama's RMSNorm through the harness's bf16 kernel (``kernels/rms_norm.cpp``).

In a compiled bf16 SmolLM2 layer (batch 4 x 1,024) inductor's fused kernels for the two
RMSNorms took ~2.5x the time of a copy of the same bytes. The op ``ppl_harness::rms_norm``
computes ``weight * bf16(x * rsqrt(mean(x^2) + eps))`` with eager bf16's roundings in one read
of each row (the sum of squares in its own order: an element may differ from eager's by one bf16
unit where the float32 mean's last bit decides its rounding). ``benchmarks/README.md`` has the
measurements.

``install(model)`` gives each ``LlamaRMSNorm`` of a bf16 CPU model the forward ``norm_forward``:
the op where it applies (bf16 CPU input, a width that is a multiple of 16, the kernel built on an
AVX-512 BF16 CPU: ``cpu_kernels.py``), the module's own arithmetic otherwise; and each
``LlamaDecoderLayer`` ``layer_forward``, whose residual add after attention and the norm after it
run as one op (``add_rms_norm``: the sum rounded as eager's add rounds it). The ops have fake
kernels, so ``torch.export`` traces them into the compiled layer packages. ``PPL_NORM_KERNEL=off``,
another CPU, or a failed build (one warning line) leave the model's own norm.
"""

from __future__ import annotations

import functools
import types

import torch

from . import cpu_kernels

SOURCE = cpu_kernels.KERNELS / "rms_norm.cpp"
CLASSES = {"LlamaRMSNorm"}  # whose forward is exactly the arithmetic above
LAYER_CLASSES = {"LlamaDecoderLayer"}  # whose residual add and post-attention norm run as one op
_FAKE: list = []


def fingerprint() -> str:
    return cpu_kernels.fingerprint(SOURCE)


@functools.cache
def available() -> bool:
    """The kernel is built (or found built), loaded and usable on this machine."""
    if cpu_kernels.switched_off("PPL_NORM_KERNEL") or not cpu_kernels.cpu_ok():
        return False
    if not cpu_kernels.try_build(SOURCE, "rms_norm", "norm: the RMSNorm kernel", "the model's own"):
        return False
    if not _FAKE:  # once per process (``available`` may be asked again after ``cache_clear``)

        @torch.library.register_fake("ppl_harness::rms_norm")
        def _(x, weight, eps):
            return torch.empty_like(x, memory_format=torch.contiguous_format)

        @torch.library.register_fake("ppl_harness::add_rms_norm")
        def _add(x, r, weight, eps):
            return (torch.empty_like(x, memory_format=torch.contiguous_format),
                    torch.empty_like(x, memory_format=torch.contiguous_format))

        _FAKE.extend([_, _add])
    return True


@torch.compiler.assume_constant_result
def _ready() -> bool:
    """``available()``, a constant to dynamo (its cache cannot be traced)."""
    return available()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm of bf16 ``x`` [..., H] with a bf16 ``weight`` [H], as eager bf16 rounds it."""
    if not _ready():
        raise RuntimeError("the RMSNorm kernel is not available here (norm.available())")
    return torch.ops.ppl_harness.rms_norm(x, weight, float(eps))


def _applies(norm, x: torch.Tensor) -> bool:
    w = norm.weight
    return (x.device.type == "cpu" and x.dtype == w.dtype == torch.bfloat16 and w.dim() == 1 and x.shape[-1] == w.shape[0]
            and w.shape[0] % 16 == 0 and _ready())


def norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """A ``LlamaRMSNorm``'s forward through the kernel where it applies."""
    if _applies(self, hidden_states):
        return rms_norm(hidden_states, self.weight, self.variance_epsilon)
    return type(self).forward(self, hidden_states)


def add_rms_norm(x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + r as eager bf16 rounds it, its RMSNorm): a residual add and the norm after it, in one pass."""
    if not _ready():
        raise RuntimeError("the RMSNorm kernel is not available here (norm.available())")
    return torch.ops.ppl_harness.add_rms_norm(x, r, weight, float(eps))


def layer_forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A ``LlamaDecoderLayer``'s forward with its first residual add and the norm after it in one
    pass (``add_rms_norm``) where the kernel applies; the layer's own forward otherwise. The rest
    is the layer's own arithmetic: input norm, attention (with every keyword the layer got), MLP,
    final residual add."""
    post = self.post_attention_layernorm
    if args or not _applies(post, hidden_states):
        return type(self).forward(self, hidden_states, *args, **kwargs)
    h, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
    residual, h = add_rms_norm(hidden_states, h, post.weight, post.variance_epsilon)
    return residual + self.mlp(h)


def _norms(model) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__ in CLASSES and hasattr(m, "variance_epsilon")]


def _layers(model) -> list[torch.nn.Module]:
    """Decoder layers whose forward is Llama's: input norm, attention, residual add, norm, MLP, residual add."""
    return [m for m in model.modules() if type(m).__name__ in LAYER_CLASSES
            and all(type(getattr(m, a, None)).__name__ in CLASSES for a in ("input_layernorm", "post_attention_layernorm"))
            and hasattr(m, "self_attn") and hasattr(m, "mlp")]


def install(model) -> int:
    """Give a bf16 CPU model's ``LlamaRMSNorm``s ``norm_forward`` where the kernel is available;
    returns how many (0: untouched)."""
    if not (model.dtype == torch.bfloat16 and model.device.type == "cpu"):
        return 0
    norms = _norms(model)
    if not norms or not available():
        return 0
    for m in norms:
        m.forward = types.MethodType(norm_forward, m)
    for m in _layers(model):
        m.forward = types.MethodType(layer_forward, m)
    return len(norms)


def describe(model) -> str:
    """The record's word for the RMSNorms."""
    return "rms_norm (the harness's bf16 CPU kernel)" if kernel_runs(model) else "the model's own"


def kernel_runs(model) -> bool:
    """The kernel computes this model's RMSNorms: installed, and the model bf16 on the CPU."""
    norms = _norms(model)
    return (bool(norms) and all(getattr(m.forward, "__func__", None) is norm_forward for m in norms)
            and model.dtype == torch.bfloat16 and model.device.type == "cpu" and available())
