"""The CPU output head two ways, in one run: the module (``h @ W.T`` into a new tensor) and the
harness's workspace path (``W @ h.T`` into a reused buffer, rows padded to a multiple of 16).

    python benchmarks/head_kernel.py [--model gemma3] [--rows 256 511 512 1024] [--repeat 3]

Both go through ``harness.head.head_logits`` (without and with a workspace), on random hidden
states, and must give the same logits; the time is the best of ``--repeat`` after a warm-up. The
module path allocates its output afresh each call, as the harness did before the workspace.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from benchmarks.cases import prepare  # noqa: E402
from benchmarks.timing import best  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3", choices=["gemma3", "smollm2"])
    ap.add_argument("--rows", nargs="+", type=int, default=[256, 511, 512, 1024])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    import pandas as pd
    import torch
    from transformers import AutoModelForCausalLM

    from harness.head import head_logits, head_workspace

    folder = prepare(args.model)  # idempotent: the dequantized folder, made once
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    vocab, width = model.get_output_embeddings().weight.shape
    torch.manual_seed(0)
    rows = []
    with torch.inference_mode():
        workspace = head_workspace(model, max(args.rows))
        for m in args.rows:
            hidden = torch.randn(m, width) * 0.05
            torch.testing.assert_close(head_logits(model, hidden, workspace), head_logits(model, hidden), rtol=1e-5, atol=1e-5)
            module = best(lambda: head_logits(model, hidden), args.repeat)
            fast = best(lambda: head_logits(model, hidden, workspace), args.repeat)
            gflop = 2 * m * width * vocab / 1e9
            rows.append({"rows": str(m), "module_s": module, "workspace_s": fast, "speedup": module / fast,
                         "module_gflops": gflop / module, "workspace_gflops": gflop / fast})
    print(f"{args.model} head {vocab} x {width}, float32, best of {args.repeat}:")
    print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".2f"))


if __name__ == "__main__":
    main()
