"""Causal attention kernels on a model's shapes, against this machine's bf16 GEMM peak.

    python benchmarks/attention_kernels.py [--model smollm2] [--batch 4] [--length 1024] [--repeats 5]

Why: the linears of a bf16 body run near the GEMM peak, attention does not, so attention's share
of the time depends on the CPU. Each candidate runs the same [B, heads, T, head_dim] query against
the model's (grouped) keys and values, the candidates in turn (A B C ... A B C ...), median time;
GFLOP/s counts the useful work only, 4 x heads x head_dim per causal (query, key) pair, the count
``benchmarks/flops.py`` uses (a full-attention row does twice the pairs and is counted so).
The error is against float32 SDPA on the same bf16 values.

Candidates: SDPA's CPU flash kernel causal (what transformers runs, GQA in the kernel or with the
keys repeated), the harness's own causal kernel where it runs (CPUs with AVX-512 BF16; ``harness/causal_kernel.py``;
its output [B, T, heads, D] is already in the layout the output projection reads, so SDPA's
transpose copy, not timed here, is saved too), in float32, without the mask (twice the work: the kernel's throughput without
causal blocks), a causal split into the two halves' triangles and the lower-left rectangle merged
by their log-sum-exps, one bf16 ``bmm`` of Q K^T alone (half the work of attention, no softmax),
and compiled flex attention with a causal block mask; with ``--window W``, the harness's banded SDPA
for sliding layers (``attention.banded``) and the causal kernel with that window. A second table times the flash kernel
alone, causal, at several lengths: its throughput grows with its blocks (256 query rows from a
length of 768, 64 below), which is why splitting the causal triangle into smaller calls loses.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.timing import alternate, gemm_peak  # noqa: E402

# heads, kv heads, head_dim of the bench's models (their configs)
SHAPES = {"smollm2": (9, 3, 64), "gemma3": (4, 1, 256)}


def flash(q, k, v, causal: bool):
    """SDPA's CPU flash kernel, output [B, H, T, D] and its log-sum-exp [B, H, T]."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal)


def split_halves(q, k, v):
    """Causal attention as the two halves' causal triangles plus the lower-left rectangle (no
    mask), the lower half's two parts merged by their log-sum-exps."""
    h = q.shape[2] // 2
    top, _ = flash(q[:, :, :h], k[:, :, :h], v[:, :, :h], True)
    rect, l1 = flash(q[:, :, h:], k[:, :, :h], v[:, :, :h], False)
    diag, l2 = flash(q[:, :, h:], k[:, :, h:], v[:, :, h:], True)
    lse = torch.logaddexp(l1, l2)
    low = rect.float() * (l1 - lse).exp()[..., None] + diag.float() * (l2 - lse).exp()[..., None]
    return torch.cat([top, low.to(top.dtype)], 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(SHAPES), default="smollm2")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--lengths", type=int, nargs="*", default=[256, 512, 767, 768, 1024],
                    help="Lengths for the causal flash kernel alone (second table; none: skip it).")
    ap.add_argument("--no-flex", action="store_true", help="Skip compiled flex attention (its compile takes ~20 s).")
    ap.add_argument("--window", type=int, default=0,
                    help="Also time a sliding window of this many keys (gemma3: 512): the harness's banded SDPA "
                         "(attention.banded) and the causal kernel with the window.")
    args = ap.parse_args()
    heads, kv_heads, dim = SHAPES[args.model]
    B, T = args.batch, args.length
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, heads, T, dim, generator=g).bfloat16()
    k = torch.randn(B, kv_heads, T, dim, generator=g).bfloat16()
    v = torch.randn(B, kv_heads, T, dim, generator=g).bfloat16()
    rep = heads // kv_heads
    kk, vv = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    qf, kf, vf = q.float(), k.float(), v.float()
    causal = 4 * heads * dim * (T * (T + 1) // 2) * B
    full = 4 * heads * dim * T * T * B

    cases = {
        "SDPA flash, causal, bf16, GQA in the kernel (transformers)":
            (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), causal),
        "SDPA flash, causal, bf16, keys repeated": (lambda: F.scaled_dot_product_attention(q, kk, vv, is_causal=True), causal),
        "SDPA flash, causal, float32": (lambda: F.scaled_dot_product_attention(qf, kf, vf, is_causal=True, enable_gqa=True), causal),
        "SDPA flash, no mask, bf16 (all T^2 pairs)": (lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), full),
        "causal split: 2 triangles + 1 rectangle, merged": (lambda: split_halves(q, kk, vv), causal),
        "bmm Q K^T only, bf16 (all T^2 pairs, half the work)": (lambda: q @ kk.transpose(-1, -2), full // 2),
    }
    from harness import causal_kernel

    if causal_kernel.available():  # AVX-512 BF16 CPUs: built into the harness's cache on first use
        cases["the harness's causal kernel (harness/causal_kernel.py), bf16"] = (
            lambda: causal_kernel.attention(q, k, v).transpose(1, 2), causal)
    windowed = {}
    if args.window:
        from harness import attention

        from benchmarks.flops import causal_pairs

        W = args.window
        flops = 4 * heads * dim * causal_pairs(T, W) * B
        windowed[f"banded SDPA, window {W} (the harness's sliding layers)"] = (
            lambda: attention.banded(q, k, v, W).transpose(1, 2), flops)
        if causal_kernel.available():
            windowed[f"the harness's causal kernel, window {W}"] = (
                lambda: causal_kernel.attention(q, k, v, window=W).transpose(1, 2), flops)
        cases.update(windowed)
    if not args.no_flex:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, T, T, device="cpu")
        compiled = torch.compile(flex_attention)
        with torch.inference_mode():
            t0 = time.perf_counter()
            compiled(q, k, v, block_mask=mask, enable_gqa=True)
        print(f"flex attention compiled in {time.perf_counter() - t0:.1f} s")
        cases["flex attention, compiled, causal block mask, bf16"] = (
            lambda: compiled(q, k, v, block_mask=mask, enable_gqa=True), causal)

    with torch.inference_mode():
        ref = F.scaled_dot_product_attention(qf, kf, vf, is_causal=True, enable_gqa=True)
        if args.window:  # query t sees keys t - W < s <= t
            t = torch.arange(T)
            band = (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - args.window)
            ref_w = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=band, enable_gqa=True)
        errors = {}
        for name, (fn, _) in cases.items():
            out, want = fn().float(), ref_w if name in windowed else ref
            errors[name] = ((out - want).norm() / want.norm()).item() if out.shape == want.shape else None
        peak = gemm_peak(torch.bfloat16)
        times = alternate({name: fn for name, (fn, _) in cases.items()}, args.repeats)
        peak = max(peak, gemm_peak(torch.bfloat16))

    print(f"{args.model}: B {B}, {heads} heads ({kv_heads} kv), T {T}, head_dim {dim}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; bf16 GEMM peak {peak / 1e9:.0f} GFLOP/s (4096^3, larger of before/after); "
          f"medians of {args.repeats}")
    print("| kernel | ms (median) | min..max | GFLOP/s | of bf16 peak | rel. error vs float32 |")
    print("|---|---|---|---|---|---|")
    for name, (_, flops) in cases.items():
        med = statistics.median(times[name])
        err = f"{errors[name]:.1e}" if errors[name] is not None else "(scores only)"
        print(f"| {name} | {med * 1e3:.1f} | {min(times[name]) * 1e3:.1f}..{max(times[name]) * 1e3:.1f} | "
              f"{flops / med / 1e9:.0f} | {flops / med / peak:.0%} | {err} |")

    if args.lengths:
        print()
        print("| causal flash kernel alone, bf16, keys repeated: length | ms (median) | GFLOP/s | of bf16 peak |")
        print("|---|---|---|---|")
        with torch.inference_mode():
            for n in args.lengths:
                qn, kn, vn = (x[:, :, :n].contiguous() for x in (q, kk, vv))
                ts = alternate({n: lambda: flash(qn, kn, vn, True)}, args.repeats)[n]
                med, flops = statistics.median(ts), 4 * heads * dim * (n * (n + 1) // 2) * B
                print(f"| {n} | {med * 1e3:.1f} | {flops / med / 1e9:.0f} | {flops / med / peak:.0%} |")


if __name__ == "__main__":
    main()
