"""What ``harness/allocator.py`` gives: the same harness run with glibc's freed memory kept, and
with the platform's default (``PPL_ALLOCATOR=default``), each in a fresh process, in turn.

    python benchmarks/allocator_gain.py ["smollm2 L1024"] [--repeats 2] [--dtype bfloat16]

Each run loads the bench's model folder (``make bench`` prepares it), scores the case's slice
with the harness (``run(cfg)``, as ``ppl run`` does) and reports its scoring time, the page
faults and the system CPU seconds of the scoring alone, and the perplexity, which must agree.
The processes are fresh because the setting is process-wide and glibc adapts its own thresholds
to what a process has freed before (a GEMM measured first in the same process changes them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from benchmarks.cases import CASES, prepare  # noqa: E402

ONE_RUN = """
import json, resource, sys
from benchmarks.cases import CASES, MODELS
from benchmarks.child import harness_overrides
from harness.config import load_config
from harness.models import load_model, load_tokenizer
from harness.runner import run
case = [c for c in CASES if c.name == sys.argv[1]][0]
cfg = load_config(MODELS[case.model], harness_overrides(case, sys.argv[2]))
tok, model = load_tokenizer(cfg.model), load_model(cfg.model, device="cpu")
before = resource.getrusage(resource.RUSAGE_SELF)
res = run(cfg, model=model, tokenizer=tok, write=False, progress=False)
after = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"score_s": res["scoring_seconds"], "tokens": res.scored_tokens, "perplexity": res.perplexity,
                  "faults": after.ru_minflt - before.ru_minflt, "sys_s": after.ru_stime - before.ru_stime,
                  "allocator": res["allocator"]}))
"""


def one(case: str, dtype: str, default: bool) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PPL_ALLOCATOR", None)
    if default:
        env["PPL_ALLOCATOR"] = "default"
    out = subprocess.run([sys.executable, "-c", ONE_RUN, case, dtype], cwd=REPO, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("case", nargs="?", default="smollm2 L1024", help="A bench case, by the start of its name.")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    case = next((c for c in CASES if c.name.startswith(args.case)), None)
    if case is None:
        raise SystemExit(f"no bench case starts with {args.case!r}: {', '.join(c.name for c in CASES)}")
    prepare(case.model)
    runs = {"kept (harness default)": [], "platform default": []}
    for _ in range(args.repeats):
        for name in runs:
            runs[name].append(one(case.name, args.dtype, default=name == "platform default"))
    ppl = {r["perplexity"] for rs in runs.values() for r in rs}
    print(f"{case.name}, {args.dtype}, {runs['platform default'][0]['tokens']:,} scored tokens; "
          f"{args.repeats} fresh processes each, in turn; medians; perplexity {', '.join(f'{p:.6f}' for p in sorted(ppl))}")
    print("| allocator | tok/s | scoring s (min..max) | page faults | system CPU s |")
    print("|---|---|---|---|---|")
    med = {}
    for name, rs in runs.items():
        s = [r["score_s"] for r in rs]
        med[name] = statistics.median(s)
        print(f"| {name}: {rs[0]['allocator']} | {rs[0]['tokens'] / med[name]:,.0f} | {med[name]:.2f} ({min(s):.2f}..{max(s):.2f}) "
              f"| {statistics.median(r['faults'] for r in rs):,.0f} | {statistics.median(r['sys_s'] for r in rs):.1f} |")
    print(f"gain: {med['platform default'] / med['kept (harness default)']:.2f}x")


if __name__ == "__main__":
    main()
