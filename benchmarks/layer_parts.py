"""One bf16 SmolLM2 decoder layer on a full batch, whole and in parts: where its time goes.

    python benchmarks/layer_parts.py [--batch 4] [--length 1024] [--repeats 7]

Times, in turn (A B C D A B C D ..., five calls per sample, median): the layer through the
harness's compiled package (built into the cache first if missing, as ``ppl compile`` does),
the same layer eagerly, SDPA's causal kernel and (on AMX, where the harness installs it) the
harness's causal kernel on the layer's query, key and value shapes, and the layer's linears on
its input shapes. The package minus the attention it runs and the linears is the rest: norms,
rotary, the activation, residual adds (fused by inductor). GFLOP/s count the useful work
as ``benchmarks/flops.py`` does; the bf16 GEMM peak (4096^3) is measured before and after.
(SmolLM2 only: Gemma-3's sliding layers run the harness's own banded attention, which the model
gets when the harness loads it, not here.)
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.cases import prepare  # noqa: E402
from benchmarks.timing import alternate, gemm_peak  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    from harness import activation, attention, norm
    from harness.allocator import keep_freed_memory
    from harness.packaged import Packaged, _rotary, build_package, decoder_layers, package_paths, variants

    keep_freed_memory()  # as a harness run does
    torch.set_grad_enabled(False)
    model = AutoModelForCausalLM.from_pretrained(prepare("smollm2"), dtype=torch.bfloat16).eval()
    attention.install(model)  # as the harness's loading does (the causal kernel on AMX)
    activation.install(model)  # and SiLU x up through the harness's kernel
    norm.install(model)  # and the RMSNorms
    build_package(model)
    package = Packaged(model, package_paths(model))
    (idx,) = variants(model).values()  # Llama-style: one kind of layer
    i = idx[min(1, len(idx) - 1)]
    layer = decoder_layers(model)[i]
    cfg = model.config.get_text_config()
    B, T, H = args.batch, args.length, cfg.hidden_size
    heads, kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, getattr(cfg, "head_dim", None) or H // cfg.num_attention_heads
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, T, H, generator=g).bfloat16()
    cos, sin = _rotary(model)(hidden, torch.arange(T)[None])
    q = torch.randn(B, heads, T, hd, generator=g).bfloat16()
    k, v = (torch.randn(B, kv, T, hd, generator=g).bfloat16() for _ in range(2))
    linears = [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {m: torch.randn(B * T, m.in_features, generator=g).bfloat16() for m in linears}

    def run_linears():
        for m in linears:
            F.linear(inputs[m], m.weight)

    from harness import causal_kernel

    fns = {
        "layer through the compiled package": lambda: package.run(i, hidden, cos, sin),
        "layer eagerly": lambda: layer(hidden, position_embeddings=(cos, sin), attention_mask=None),
        "SDPA causal (flash, GQA in the kernel)": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        f"the {len(linears)} linears": run_linears,
    }
    # the attention the layer runs: the harness's kernel where the model got it (AMX), else SDPA's
    attn = "SDPA causal (flash, GQA in the kernel)"
    if model.config._attn_implementation == "causal_kernel":
        attn = "the harness's causal kernel"
        fns[attn] = lambda: causal_kernel.attention(q, k, v)
    peak = gemm_peak(torch.bfloat16)
    times = alternate({name: (lambda f=f: [f() for _ in range(5)]) for name, f in fns.items()}, args.repeats)
    peak = max(peak, gemm_peak(torch.bfloat16))
    ms = {name: statistics.median(t) / 5 * 1e3 for name, t in times.items()}
    pairs = T * (T + 1) // 2
    flops = {
        "SDPA causal (flash, GQA in the kernel)": 4.0 * B * heads * hd * T * (T + 1) // 2,
        "the harness's causal kernel": 4.0 * B * heads * hd * T * (T + 1) // 2,
        f"the {len(linears)} linears": 2.0 * B * T * sum(m.weight.numel() for m in linears),
    }
    flops["layer through the compiled package"] = flops[f"the {len(linears)} linears"] + 4.0 * B * heads * hd * pairs
    flops["layer eagerly"] = flops["layer through the compiled package"]
    print(f"SmolLM2 layer {i}, bf16, batch {B} x {T}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"bf16 GEMM peak {peak / 1e9:.0f} GFLOP/s (4096^3, larger of before/after); medians of {args.repeats}")
    print("| part | ms | GFLOP/s | of bf16 peak |")
    print("|---|---|---|---|")
    for name, t in ms.items():
        rate = flops[name] / (t / 1e3)
        print(f"| {name} | {t:.1f} | {rate / 1e9:.0f} | {rate / peak:.0%} |")
    rest = ms["layer through the compiled package"] - ms[attn] - ms[f"the {len(linears)} linears"]
    print(f"| the rest of the package (norms, rotary, activation, adds; by difference from {attn}) | {rest:.1f} | | |")


if __name__ == "__main__":
    main()
