"""Where one window's time goes, and the speed-up ceiling that follows: ``make bench`` explained.

    python benchmarks/window_cost.py [--models smollm2 gemma3] [--repeat 3]

For one 1,024-token window of real WikiText-2 tokens, times (best of ``--repeat``, in this one
process, after a warm-up):
- ``body``: the model body alone (``model.base_model``), which every tool runs identically;
- ``harness(n)``: ``scoring.token_nlls`` scoring the last ``n`` positions (body, then the head
  and float32 log-sum-exp on those ``n`` only);
- ``hf-guide(n)``: ``model(ids, labels=...)`` with all but the last ``n`` labels masked, as the
  HF guide's loop does (full ``[1, T, V]`` logits and the model's own cross-entropy).

``hf-guide(n) / harness(n)`` is the steady-state ratio of a sliding run with stride ``n`` (every
window after the first scores ``n`` positions); ``n = 1023`` is a window where every position is
scored (the first window, ``S = L``, and the lm-eval protocol), where both tools do the same
arithmetic. The body's share of ``harness(n)`` is the part no scoring change can touch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from benchmarks.cases import prepare  # noqa: E402
from benchmarks.timing import best  # noqa: E402

T = 1024
SCORED = {"smollm2": (512, 1023), "gemma3": (256, 1023)}  # the strides the benchmark cases use


def window_ids(tokenizer):
    import pandas as pd

    from benchmarks.child import mirror

    text = "\n\n".join(pd.read_parquet(mirror("Salesforce/wikitext"))["text"][:400])
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :T]
    assert ids.shape[1] == T, ids.shape
    return ids


def measure(key: str, repeat: int) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harness.scoring import Batch, token_nlls

    folder = prepare(key)  # idempotent: the dequantized folder, made once
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = window_ids(AutoTokenizer.from_pretrained(folder))
    rows = []
    with torch.inference_mode():
        body = best(lambda: model.base_model(input_ids=ids, use_cache=False), repeat)
        for n in SCORED[key]:
            cols = torch.arange(T - 1 - n, T - 1)
            batch = Batch(ids, None, torch.zeros(n, dtype=torch.long), cols, ids[0, cols + 1], [n])
            labels = ids.clone()
            labels[:, : T - n] = -100
            harness = best(lambda: token_nlls(model, batch), repeat)
            guide = best(lambda: model(ids, labels=labels), repeat)
            rows.append({"model": key, "scored": n, "body_s": body, "harness_s": harness, "hf_guide_s": guide,
                         "body_share": body / harness, "ratio": guide / harness})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(SCORED), choices=list(SCORED))
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    import pandas as pd

    rows = [r for key in args.models for r in measure(key, args.repeat)]
    frame = pd.DataFrame(rows)
    print(f"one {T}-token window, best of {args.repeat}:")
    print(frame.to_markdown(index=False, floatfmt=".2f"))


if __name__ == "__main__":
    main()
