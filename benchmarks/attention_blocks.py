"""Gemma-3's sliding layers: SDPA over the full masked score matrix against key blocks only.

    python benchmarks/attention_blocks.py [--repeats 5] [--length 1024] [--batch 1] [--dtype float32]

Per layer: one sliding layer's attention (Gemma-3-270M shapes: 4 query heads, 1 key/value head,
head_dim 256, window 512) on random inputs, transformers' SDPA with the full sliding mask against
``harness.attention`` at each block size. Per window: the whole model body on one window of
WikiText-2 tokens with either attention. Runs alternate (A B A B ...) and the medians are
printed with the spread (min..max), since the machine may be busy.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.timing import alternate  # noqa: E402


def show(title: str, times: dict[str, list[float]], unit: float, label: str) -> None:
    base = statistics.median(next(iter(times.values())))
    best = min(next(iter(times.values())))
    print(f"\n{title}\n| variant | median {label} | spread | vs first (medians) | vs first (best) |\n|---|---|---|---|---|")
    for k, ts in times.items():
        med = statistics.median(ts)
        print(f"| {k} | {med * unit:.1f} | {min(ts) * unit:.1f}..{max(ts) * unit:.1f} | {base / med:.2f}x | {best / min(ts):.2f}x |")


def per_layer(length: int, batch: int, dtype: torch.dtype, repeats: int) -> None:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from harness import attention

    window, heads, kv_heads, dim = 512, 4, 1, 256

    class Layer(torch.nn.Module):
        num_key_value_groups = heads // kv_heads
        is_causal = True
        sliding_window = window

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, length, dim, generator=gen).to(dtype)
    k = torch.randn(batch, kv_heads, length, dim, generator=gen).to(dtype)
    v = torch.randn(batch, kv_heads, length, dim, generator=gen).to(dtype)
    i = torch.arange(length)
    mask = ((i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window))[None, None].expand(batch, 1, length, length)
    kw = {"dropout": 0.0, "scaling": dim**-0.5, "sliding_window": window}
    layer = Layer()

    def blocks(divisor):
        def fn():
            attention.BLOCK_DIVISOR = divisor
            attention.sliding_blocks_attention(layer, q, k, v, mask, **kw)
        return fn

    fns = {"sdpa, full sliding mask": lambda: sdpa_attention_forward(layer, q, k, v, mask, **kw)}
    for d in (1, 2, 4, 8):
        fns[f"blocks of {window // d}"] = blocks(d)
    with torch.inference_mode():
        times = alternate(fns, repeats)
    attention.BLOCK_DIVISOR = 4
    show(f"One sliding layer's attention, {batch} x {length} tokens, {dtype}", times, 1e3, "ms")


def per_window(length: int, batch: int, dtype: torch.dtype, repeats: int) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.cases import cached_model, prepare
    from benchmarks.child import mirror
    from harness import attention

    folder = prepare("gemma3")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    tok = AutoTokenizer.from_pretrained(cached_model("gemma3"))
    import pandas as pd

    text = "\n\n".join(pd.read_parquet(mirror("Salesforce/wikitext"))["text"][:400])
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"][: batch * length]).view(batch, length)

    def body(impl):
        def fn():
            model.set_attn_implementation(impl)
            model.model(input_ids=ids, use_cache=False)
        return fn

    with torch.inference_mode():
        times = alternate({"sdpa": body("sdpa"), attention.NAME: body(attention.register())}, repeats)
    show(f"Gemma-3-270M body, {batch} x {length} tokens, {dtype}", times, 1e3, "ms")
    n = sum(t == "sliding_attention" for t in model.config.layer_types)
    saved = statistics.median(times["sdpa"]) - statistics.median(times[attention.NAME])
    print(f"saved per sliding layer (body difference / {n} layers): {saved / n * 1e3:.1f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--skip-window", action="store_true", help="Only the per-layer figures (no model load).")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    per_layer(args.length, args.batch, dtype, args.repeats)
    if not args.skip_window:
        per_window(args.length, args.batch, dtype, args.repeats)


if __name__ == "__main__":
    main()
