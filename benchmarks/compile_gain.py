"""What ``eval.compile`` gives on a bench case: the same run eager and compiled, alternating.

    python benchmarks/compile_gain.py "smollm2 L1024" [--repeats 3] [--dtype bfloat16] [--tokens N]

One process, one model load; the runs alternate (eager, compiled, eager, compiled ...). The first
compiled run includes compiling (its ``compile s`` column: the batches during which a graph was
compiled, their own compute included); later compiled runs reuse the graph, so their time is the
steady state. Run it twice to see the warm-cache compile (inductor's cache is on disk).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from benchmarks import child  # noqa: E402
from benchmarks.cases import CASES  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("case", help="A bench case, by the start of its name (benchmarks/cases.py).")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tokens", type=int, default=None, help="Token slice (default: the case's).")
    args = ap.parse_args()
    case = next(c for c in CASES if c.name.startswith(args.case))
    case = dataclasses.replace(case, tokens=args.tokens or case.tokens)

    from harness.config import load_config
    from harness.models import load_model, load_tokenizer
    from harness.runner import run

    child.prepare(case.model)

    def cfg(compile_: str):
        return load_config(child.MODELS[case.model], child.harness_overrides(case, args.dtype) + [f"eval.compile={compile_}"])

    base = cfg("false")
    tok, model = load_tokenizer(base.model), load_model(base.model, device="cpu")
    runs: dict[str, list] = {"false": [], "true": []}
    for _ in range(args.repeats):
        for setting in runs:
            res = run(cfg(setting), model=model, tokenizer=tok, write=False, progress=False)
            runs[setting].append(res)
            print(f"compile={setting:5}  scoring {res['scoring_seconds']:6.2f} s  compile s {res['compile_seconds']:5.2f}  "
                  f"PPL {res.perplexity:.4f}", flush=True)
    eager = statistics.median(r["scoring_seconds"] for r in runs["false"])
    steady = statistics.median(r["scoring_seconds"] for r in runs["true"][1:]) if args.repeats > 1 else float("nan")
    first = runs["true"][0]["scoring_seconds"]
    windows = runs["false"][0]["windows"]
    print(f"{case.name}, {args.dtype}, {case.tokens} tokens, {windows} windows: eager {eager:.2f} s (median), "
          f"compiled {steady:.2f} s (median after the first), first compiled run {first:.2f} s; "
          f"steady-state gain {eager / steady:.2f}x, compile overhead ~{first - steady:.1f} s")


if __name__ == "__main__":
    main()
