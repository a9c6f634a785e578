"""SiLU(gate) x up, the Llama-style MLP's activation, through the harness's bf16 kernel (``kernels/silu_mul.cpp``).

In a compiled bf16 SmolLM2 layer (batch 4 x 1,024) inductor's fused kernel for
``act_fn(gate_proj(x)) * up_proj(x)`` (Sleef's exponential and a float32 division) took about a
tenth of the layer. The op ``ppl_harness::silu_mul`` computes it with the same roundings as eager
torch (silu in float32 rounded to bf16, times up rounded to bf16) by a polynomial exponential and
a refined reciprocal: an element differs from eager's by one bf16 unit where float32's last bits
decide the rounding (~0.05% of them). ``benchmarks/README.md`` has the measurements.

``install(model)`` gives each MLP of a bf16 CPU model of the Llama-style families
(``attention.CAUSAL_FAMILIES``, SiLU activation) the forward ``mlp_forward``: the op where it
applies (bf16 CPU tensors, the kernel built on an AVX-512 BF16 CPU: ``cpu_kernels.py``), the
module's own arithmetic otherwise. The op has a fake kernel, so ``torch.export`` traces it into
the compiled layer packages. ``PPL_ACTIVATION_KERNEL=off``, another CPU, or a failed build (one
warning line) leave the model's own MLP.
"""

from __future__ import annotations

import functools
import types

import torch

from . import cpu_kernels

SOURCE = cpu_kernels.KERNELS / "silu_mul.cpp"
_FAKE: list = []  # the op's fake kernel, once registered


def fingerprint() -> str:
    return cpu_kernels.fingerprint(SOURCE)


@functools.cache
def available() -> bool:
    """The kernel is built (or found built), loaded and usable on this machine."""
    if cpu_kernels.switched_off("PPL_ACTIVATION_KERNEL") or not cpu_kernels.cpu_ok():
        return False
    if not cpu_kernels.try_build(SOURCE, "silu_mul", "activation: the SiLU x up kernel", "the model's own"):
        return False
    if not _FAKE:  # once per process (``available`` may be asked again after ``cache_clear``)

        @torch.library.register_fake("ppl_harness::silu_mul")
        def _(gate, up):
            return torch.empty_like(gate, memory_format=torch.contiguous_format)

        _FAKE.append(_)
    return True


@torch.compiler.assume_constant_result
def _ready() -> bool:
    """``available()``, a constant to dynamo (its cache cannot be traced)."""
    return available()


def applies(gate: torch.Tensor, up: torch.Tensor) -> bool:
    return gate.device.type == "cpu" and gate.dtype == up.dtype == torch.bfloat16 and gate.shape == up.shape and _ready()


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up as eager bf16 rounds it (bf16 CPU tensors of one shape)."""
    if not _ready():
        raise RuntimeError("the SiLU x up kernel is not available here (activation.available())")
    return torch.ops.ppl_harness.silu_mul(gate, up)


def mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    """A Llama-style MLP's forward (``down_proj(act_fn(gate_proj(x)) * up_proj(x))``), its
    activation through the kernel where it applies."""
    gate, up = self.gate_proj(x), self.up_proj(x)
    if applies(gate, up):
        return self.down_proj(silu_mul(gate, up))
    return self.down_proj(self.act_fn(gate) * up)


def _mlps(model) -> list[torch.nn.Module]:
    """The model's Llama-style MLPs: gate, up and down projections and a SiLU activation."""
    from .attention import CAUSAL_FAMILIES

    if getattr(model.config, "model_type", None) not in CAUSAL_FAMILIES or getattr(model.config, "hidden_act", None) != "silu":
        return []
    return [m for m in model.modules() if type(m).__name__.endswith("MLP")
            and all(hasattr(m, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn"))]


def install(model) -> int:
    """Give a bf16 CPU model's Llama-style MLPs ``mlp_forward`` where the kernel is available;
    returns how many (0: untouched)."""
    if not (model.dtype == torch.bfloat16 and model.device.type == "cpu"):
        return 0
    mlps = _mlps(model)
    if not mlps or not available():
        return 0
    for m in mlps:
        m.forward = types.MethodType(mlp_forward, m)
    return len(mlps)


def kernel_runs(model) -> bool:
    """The kernel computes this model's MLP activations: installed, and the model bf16 on the CPU."""
    mlps = _mlps(model)
    return (bool(mlps) and all(getattr(m.forward, "__func__", None) is mlp_forward for m in mlps)
            and model.dtype == torch.bfloat16 and model.device.type == "cpu" and available())


def describe(model) -> str:
    """The record's word for the MLP activation."""
    return "silu_mul (the harness's bf16 CPU kernel)" if kernel_runs(model) else "the model's own"
