"""Precision policy: which dtype the model body runs in, and how the head keeps float32 logits.

``model.dtype: auto`` (the default) resolves to bfloat16 weights where the device computes
bf16 natively, float32 elsewhere:

- CUDA of compute capability 8.0 and up (Ampere), or ROCm (``cuda_bf16_native``);
- a CPU with AMX-BF16 or AVX-512 BF16 (the ``amx_bf16`` / ``avx512_bf16`` flags of
  /proc/cpuinfo on Linux, else torch's own CPU probes).

Whatever the body's dtype, the vocabulary projection's *output* and the log-sum-exp are float32:
logits are never rounded to bf16 before the log-softmax. A bf16 head weight and bf16 hidden
states are exact in float32, so "float32 output" means exact products of those bf16 values,
summed in float32 and never rounded to bf16. On the CPU the fastest way measured
(``benchmarks/head_precision.py``) is a float32 matmul of the upcast operands with oneDNN's
internal precision set to bf16 (``torch.backends.mkldnn`` ``fp32_precision = "bf16"``): on
operands that are already bf16 values that conversion is exact, the AMX/AVX-512-BF16 kernel
accumulates in float32 and writes float32. The float32 copy of the head weight is made once per
model (``head_weight32``). The CPU head by vocabulary blocks (``head.block_nlls``) takes MKL's
bf16 x bf16 -> float32 matmul on AMX instead (``mkl_bf16_gemm``), on the bf16 weight itself,
and that path makes no copy. On a GPU, ``torch.mm(..., out_dtype=torch.float32)`` where torch has
it, else the upcast operands.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

LOW = (torch.bfloat16, torch.float16)


@functools.cache
def _cpuinfo_flags() -> frozenset[str] | None:
    """The flags line of /proc/cpuinfo (None off Linux, where torch's own probes answer)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not (sys.platform.startswith("linux") and cpuinfo.is_file()):
        return None
    for line in cpuinfo.read_text(errors="replace").splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


@functools.cache
def cpu_bf16_flags() -> tuple[str, ...]:
    """The CPU's native-bf16 features found at run time (empty where it has none)."""
    flags = _cpuinfo_flags()
    if flags is not None:
        return tuple(f for f in ("amx_bf16", "avx512_bf16") if f in flags)
    probes = {"amx_bf16": "_is_amx_tile_supported", "avx512_bf16": "_is_avx512_bf16_supported"}
    return tuple(name for name, fn in probes.items() if getattr(torch.cpu, fn, lambda: False)())


def cpu_fp16_flags() -> tuple[str, ...]:
    """The CPU's native-fp16 arithmetic features (AVX-512 FP16, AMX-FP16; F16C only converts)."""
    flags = _cpuinfo_flags()
    if flags is None:
        return ("avx512_fp16",) if getattr(torch.cpu, "_is_avx512_fp16_supported", lambda: False)() else ()
    return tuple(f for f in ("amx_fp16", "avx512_fp16") if f in flags)


def cuda_bf16_native(device: torch.device) -> bool:
    """Whether the GPU computes bf16 natively: ROCm, or CUDA compute capability 8 (Ampere) and up.

    Not ``torch.cuda.is_bf16_supported()``: by default that also says yes where bf16 is only
    emulated (a V100 or T4), which would make ``auto`` pick the slow dtype there.
    """
    if not torch.cuda.is_available():
        return False
    if torch.version.hip:
        return True
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index)[0] >= 8


@dataclass(frozen=True)
class Resolved:
    dtype: torch.dtype
    reason: str  # one short phrase: why this dtype


def resolve_dtype(requested: str, device: str | torch.device) -> Resolved:
    """The body's dtype for ``model.dtype`` on ``device`` (``auto``: bf16 where it is native)."""
    if requested != "auto":
        return Resolved(getattr(torch, requested), "requested")
    dev = torch.device(device)
    if dev.type == "cuda":
        if cuda_bf16_native(dev):
            return Resolved(torch.bfloat16, "cuda bf16 supported")
        return Resolved(torch.float32, "cuda without native bf16")
    if dev.type == "cpu":
        flags = cpu_bf16_flags()
        if flags:
            return Resolved(torch.bfloat16, f"cpu {flags[0]}")
        return Resolved(torch.float32, "cpu without native bf16")
    return Resolved(torch.float32, f"{dev.type}: float32 by default")


def emulated(dtype: torch.dtype | str, device: str | torch.device) -> str | None:
    """One line saying that ``dtype`` has no native arithmetic on ``device`` (None where it has).

    torch still runs such a model, converting to float32 around every product: on a two-core AVX2
    EPYC a ``linear`` of SmolLM2's shapes ran at 10 GFLOP/s in bf16 against 67 in float32 (on a
    busy spell, 5.1 in bf16 and 6.5 in fp16 against 22.5). ``model.dtype: auto`` never picks such
    a dtype; named, it runs, and the run says so.
    """
    dev = torch.device(device)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    name = _name(dtype)
    if dev.type == "cpu" and dtype == torch.bfloat16 and not cpu_bf16_flags():
        what = "no AVX-512 BF16 or AMX"
    elif dev.type == "cpu" and dtype == torch.float16 and not cpu_fp16_flags():
        what = "no AVX-512 FP16 or AMX-FP16"
    elif dev.type == "cuda" and dtype == torch.bfloat16 and torch.cuda.is_available() and not cuda_bf16_native(dev):
        what = "compute capability below 8.0"
    else:
        return None
    auto = _name(resolve_dtype("auto", dev).dtype)
    return (f"model.dtype {name}: this {'GPU' if dev.type == 'cuda' else 'CPU'} has no native {name} arithmetic ({what}), "
            f"so torch emulates it, several times slower than float32; model.dtype: auto picks {auto} here")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def describe(model, requested: str, device: str | torch.device) -> dict:
    """The record's ``precision`` section: body, head and log-sum-exp, and why.

    ``batch_invariant`` says whether the batch composition (batch size, length sorting, process
    count) can change the last digits: not in float32 (the tests hold every batch size to 1e-6),
    but a bf16/fp16 body rounds differently with the batch's shape and padding.
    """
    body = next((p.dtype for p in model.base_model.parameters() if p.is_floating_point()), torch.float32)
    head = model.get_output_embeddings()
    hw = head.weight.dtype if head is not None else body
    if requested == "auto":
        auto = resolve_dtype("auto", device)
        reason = auto.reason if auto.dtype == body else "model passed in as loaded"
    else:
        reason = "requested" if getattr(torch, requested) == body else "model passed in as loaded"
    return {
        "requested": requested,
        "body": _name(body),
        "head": f"{_name(hw)} weights, float32 output" if hw in LOW else _name(hw),
        "logsumexp": "float32",
        "reason": reason,
        "batch_invariant": body not in LOW,
    }


def summary_line(precision: dict) -> str:
    p = precision
    why = f" ({p['reason']})" if p.get("reason") else ""
    line = f"{p['requested']} -> body {p['body']}, head {p['head']}, log-sum-exp {p['logsumexp']}{why}"
    comp = p.get("compile")
    if not comp or not comp.get("on"):
        return line
    how = f" {comp['how'].split(' (')[0]}" if comp.get("how") else ""
    return line + f"; layers compiled{how} ({comp['reason']})"


# ---------------------------------------------------------------------------------------------
# The head in float32 output from low-precision weights

_WEIGHT32: "weakref.WeakKeyDictionary[torch.nn.Module, torch.Tensor]" = weakref.WeakKeyDictionary()


def head_weight32(head: torch.nn.Module) -> torch.Tensor:
    """The head weight as float32 (the same values), made once per head module."""
    w = head.weight
    if w.dtype == torch.float32:
        return w
    cached = _WEIGHT32.get(head)
    if cached is None or cached.device != w.device or cached.shape != w.shape:
        cached = _WEIGHT32[head] = w.detach().float()
    return cached


@contextlib.contextmanager
def bf16_products():
    """float32 matmuls computed by oneDNN from bf16 operands (exact on bf16 values), float32 out."""
    mm = torch.backends.mkldnn.matmul
    old = mm.fp32_precision
    mm.fp32_precision = "bf16"
    try:
        yield
    finally:
        mm.fp32_precision = old


def low_precision_head(head: torch.nn.Module, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """float32 logits [m, V] of a bf16/fp16 ``nn.Linear`` head, never rounded to the low dtype.

    On the CPU with an ``out`` buffer of ``V * ld`` floats (``ld >= m``, rows padded as the
    caller likes) the logits are written transposed into it, as the float32 workspace path does.
    """
    w = head.weight
    h = hidden.to(w.device)
    if w.device.type == "cpu":
        # an offloaded head (accelerate hook) is in memory only while it runs: no lasting copy
        offloaded = getattr(getattr(head, "_hf_hook", None), "offload", False)
        w32 = w.float() if offloaded else head_weight32(head)
        h32 = h.float()
        native = w.dtype == torch.bfloat16 and cpu_bf16_flags()
        with bf16_products() if native else contextlib.nullcontext():
            if out is not None:
                m, ld = h32.shape[0], out.numel() // w.shape[0]
                if ld != m:
                    h32 = torch.cat([h32, h32.new_zeros(ld - m, h32.shape[1])])
                logits_t = out.view(w.shape[0], ld)
                torch.mm(w32, h32.T, out=logits_t)
                logits = logits_t[:, :m].T
            else:
                logits = h32 @ w32.T
    else:
        try:
            logits = torch.mm(h.to(w.dtype), w.T, out_dtype=torch.float32)
        except (RuntimeError, TypeError):  # no float32-output kernel for this dtype/device
            logits = h.float() @ w.float().T
    if head.bias is not None:
        logits.add_(head.bias.float())
    return logits


@functools.cache
def mkl_gemm():
    """``gemm(a, b, out)``: ``out[m, n] = a[m, k] @ b[n, k]^T`` for bf16 ``a``, ``b`` (rows
    contiguous) into a float32 ``out`` (rows contiguous), by MKL's ``cblas_gemm_bf16bf16f32``:
    exact products of the bf16 values, summed in float32, written in float32; None where torch's
    library does not export it. torch has no op for a bf16 x bf16 -> float32 matmul on the CPU;
    its x86 wheels link MKL and export this function. (Whether to take it: ``mkl_bf16_gemm``.)
    """
    if not torch.backends.mkl.is_available():
        return None
    try:
        fn = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")).cblas_gemm_bf16bf16f32
    except (OSError, AttributeError):
        return None
    i, p = ctypes.c_int, ctypes.c_void_p
    fn.restype, fn.argtypes = None, [i, i, i, i, i, i, ctypes.c_float, p, i, p, i, ctypes.c_float, p, i]
    row_major, no_trans, trans = 101, 111, 112

    def gemm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        (m, k), n = a.shape, b.shape[0]
        assert a.dtype == b.dtype == torch.bfloat16 and out.dtype == torch.float32 and out.shape == (m, n)
        assert a.stride(1) == b.stride(1) == out.stride(1) == 1 and b.shape[1] == k and a.device.type == "cpu"
        fn(row_major, no_trans, trans, m, n, k, 1.0, a.data_ptr(), a.stride(0), b.data_ptr(), b.stride(0), 0.0,
           out.data_ptr(), out.stride(0))
        return out

    return gemm


def mkl_bf16_gemm():
    """``mkl_gemm()`` where it is the fastest such kernel measured, else None: on a CPU with AMX
    (``amx_bf16``), where it beat oneDNN's float32 matmul in bf16 precision on the head's blocks
    (``benchmarks/head_blocks.py``); on an AMD Zen 4 (AVX-512 BF16, no AMX) MKL took a slower path
    than oneDNN (``benchmarks/head_precision.py``), so oneDNN's stays the way there."""
    return mkl_gemm() if "amx_bf16" in cpu_bf16_flags() else None
