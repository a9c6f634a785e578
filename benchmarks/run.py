"""``make bench``: the harness against the HF guide's loop and lm-evaluation-harness.

Each case runs every tool on the same tokens, each in its own subprocess; the parent reads that
process's wall time and peak resident memory from the kernel (``os.wait4``), so nothing inside
the scoring code measures itself. Perplexities must agree across tools (the run fails if not).
Writes ``results/bench/bench.csv``, ``bench.md`` and ``bench.png``.

    python benchmarks/run.py [--scale 2] [--only gemma3] [--out results/bench]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from benchmarks.cases import CASES, REPO, Case  # noqa: E402

# Perplexities of two tools on the same tokens agree to float32 rounding; anything larger is a
# real disagreement. The bound is set by the other tools, not the harness: on SmolLM2's first
# 1,536 tokens the HF loop's float32 cross-entropy gives sum NLL 4276.0635, a float64 reference
# 4276.0878, the harness 4276.0878 (PPL 1.6e-5 apart between the loop and the harness).
AGREE_REL = 1e-4
LMEVAL_VENV = REPO / ".venv-bench" / "bin" / "python"


def lm_eval_python() -> str | None:
    """A Python that has lm_eval: this one, $PPL_BENCH_LMEVAL_PYTHON, or .venv-bench (make bench-env)."""
    if importlib.util.find_spec("lm_eval") is not None:
        return sys.executable
    for cand in (os.environ.get("PPL_BENCH_LMEVAL_PYTHON"), str(LMEVAL_VENV)):
        if cand and Path(cand).is_file():
            return cand
    return None


def run_child(python: str, args: list[str]) -> tuple[int, float, int]:
    """(exit status, wall seconds, peak RSS bytes) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen([python, "-m", "benchmarks.child", *args], cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    # ru_maxrss is KiB on Linux, bytes on macOS
    peak = usage.ru_maxrss * (1 if platform.system() == "Darwin" else 1024)
    return proc.returncode, time.perf_counter() - start, peak


def scaled(case: Case, scale: float) -> Case:
    return dataclasses.replace(case, tokens=int(case.tokens * scale), documents=max(1, round(case.documents * scale)) if case.documents else 0)


def bench_case(case: Case, lm_python: str | None) -> list[dict]:
    rows = []
    for tool in case.tools:
        python = lm_python if tool == "lm_eval" else sys.executable
        row = {"case": case.name, "tool": tool}
        if python is None:
            rows.append({**row, "note": "lm_eval not installed (make bench-env)"})
            print(f"[{case.name}] lm_eval not installed: skipped (make bench-env installs it in .venv-bench)")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out.json"
            print(f"[{case.name}] {tool} ...", flush=True)
            rc, wall, peak = run_child(python, [tool, json.dumps(dataclasses.asdict(case)), str(out)])
            if rc != 0:  # keep going: the other tools' figures are still worth having
                print(f"[{case.name}] {tool} failed (exit {rc})")
                rows.append({**row, "wall_s": wall, "peak_rss_gb": peak / 1e9, "note": f"failed (exit {rc})"})
                continue
            got = json.loads(out.read_text())
        if case.protocol != "lm-eval":
            got.pop("word_perplexity", None)  # the HF loop has no word counts; token PPL is the number
        rows.append({**row, **got, "tokens_per_s": got["scored_tokens"] / got["score_s"], "wall_s": wall, "peak_rss_gb": peak / 1e9, "note": ""})
    problem = check_agreement(case, [r for r in rows if "sum_nll" in r])
    if problem:
        print(f"[{case.name}] {problem}")
        for r in rows:
            r["note"] = (r.get("note") or "") + f" DISAGREE: {problem}"
    ref = next((r for r in rows if r["tool"] != "harness" and "tokens_per_s" in r), None)
    for r in rows:
        if ref and "tokens_per_s" in r:
            r["speedup"] = r["tokens_per_s"] / ref["tokens_per_s"]
        if r["tool"] == "harness":
            r["target"] = verdict(case, r, ref)
    return rows


def check_agreement(case: Case, rows: list[dict]) -> str | None:
    """None when every tool scored the same tokens to the same perplexity; else what differs."""
    keys = ["perplexity"] + (["word_perplexity"] if case.protocol == "lm-eval" else [])
    for a in rows[1:]:
        if a["scored_tokens"] != rows[0]["scored_tokens"]:
            return f"{a['tool']} scored {a['scored_tokens']} tokens, harness {rows[0]['scored_tokens']}"
        for k in keys:
            if not math.isclose(a[k], rows[0][k], rel_tol=AGREE_REL):
                return f"{k}: harness {rows[0][k]!r}, {a['tool']} {a[k]!r}"
    return None


def verdict(case: Case, harness: dict, ref: dict | None) -> str:
    parts = []
    if case.speedup_target and ref:
        ok = harness["speedup"] >= case.speedup_target
        parts.append(f"{'met' if ok else 'MISSED'} >= {case.speedup_target}x")
    if case.memory_limit_gb:
        ok = harness["peak_rss_gb"] <= case.memory_limit_gb
        parts.append(f"{'met' if ok else 'MISSED'} <= {case.memory_limit_gb} GB")
    return ", ".join(parts)


COLUMNS = ["case", "tool", "scored_tokens", "tokens_per_s", "speedup", "wall_s", "load_s", "score_s", "peak_rss_gb", "perplexity", "word_perplexity", "target", "note"]


def write_outputs(rows: list[dict], out: Path) -> str:
    import pandas as pd

    frame = pd.DataFrame(rows).reindex(columns=COLUMNS)
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "bench.csv", index=False)
    fmt = frame.copy()
    for col, spec in {"tokens_per_s": "{:.1f}", "speedup": "{:.2f}x", "wall_s": "{:.1f}", "load_s": "{:.1f}", "score_s": "{:.1f}",
                      "peak_rss_gb": "{:.2f}", "perplexity": "{:.4f}", "word_perplexity": "{:.4f}"}.items():
        fmt[col] = [spec.format(v) if isinstance(v, float) and not math.isnan(v) else "" for v in fmt[col]]
    fmt["scored_tokens"] = [str(int(v)) if v == v else "" for v in frame["scored_tokens"]]
    table = fmt.fillna("").to_markdown(index=False)
    (out / "bench.md").write_text(table + "\n")
    plot(frame, out / "bench.png")
    return table


def plot(frame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = frame.dropna(subset=["tokens_per_s"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, col, label in [(axes[0], "tokens_per_s", "scored tokens / s"), (axes[1], "peak_rss_gb", "peak RSS (GB)")]:
        wide = done.pivot(index="case", columns="tool", values=col).reindex(index=list(dict.fromkeys(done["case"])))
        wide.plot.bar(ax=ax, rot=15)
        ax.set_ylabel(label)
        ax.set_xlabel("")
    axes[1].axhline(3.5, color="red", linestyle="--", linewidth=1, label="3.5 GB target")
    axes[1].legend()
    fig.suptitle("ppl-harness vs HF guide loop and lm-evaluation-harness (CPU, same tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0, help="Multiply every case's token / document slice.")
    ap.add_argument("--only", default=None, help="Run only cases whose name contains this text.")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "bench")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cases = [scaled(c, args.scale) for c in CASES if not args.only or args.only in c.name]
    lm_python = lm_eval_python()
    for key in dict.fromkeys(c.model for c in cases):  # dequantize each GGUF model once
        rc, wall, _ = run_child(sys.executable, ["prepare", key])
        if rc != 0:
            raise SystemExit(f"preparing {key} failed (exit {rc})")
    rows = [r for c in cases for r in bench_case(c, lm_python)]
    table = write_outputs(rows, args.out)
    print(table)
    print(f"written: {args.out / 'bench.csv'}, bench.md, bench.png")
    if any(("DISAGREE" in (r.get("note") or "")) or ("failed" in (r.get("note") or "")) for r in rows):
        raise SystemExit("a tool failed or perplexities disagree (see the note column)")


if __name__ == "__main__":
    main()
