"""``make bench``: the harness against the HF guide's loop and lm-evaluation-harness.

Each case runs every tool on the same tokens, each in its own subprocess; the parent reads that
process's wall time and peak resident memory from the kernel (``os.wait4``), so nothing inside
the scoring code measures itself. Perplexities must agree across tools (the run fails if not).
Writes ``results/bench/bench.csv``, ``bench.md`` and ``bench.png``.

    python benchmarks/run.py [--scale 2] [--only gemma3] [--repeats 2] [--out results/bench]

Every tool of a case runs ``--repeats`` times, the tools in turn (A B C A B C ...), so a busy
spell of the machine hits them alike; the table gives the median tokens/s, the spread (min..max)
and ratios of medians. The measured GEMM peak (bf16 where the CPU has it natively, else float32:
the dtype `model.dtype: auto` runs in) is printed in the same run, and each row's
achieved FLOP/s as a fraction of it (FLOPs counted from the model's shapes: benchmarks/flops.py).
The harness's and the guide's runs measure that peak themselves, in their own process just
before and after scoring, and their fraction is taken against it: the machine's peak swings
between minutes (717 and 1,301 GFLOP/s at the start of two runs), and a share of a peak read
ten minutes earlier measured the swing as much as the tool.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from benchmarks.cases import CASES, REPO, Case  # noqa: E402
from benchmarks.flops import task_flops  # noqa: E402
from benchmarks.timing import gemm_peak, peak_dtype  # noqa: E402

# Perplexities of two tools on the same tokens agree to float32 rounding; anything larger is a
# real disagreement. The bound is set by the other tools, not the harness: on SmolLM2's first
# 1,536 tokens the HF loop's float32 cross-entropy gives sum NLL 4276.0635, a float64 reference
# 4276.0878, the harness 4276.0878 (PPL 1.6e-5 apart between the loop and the harness).
AGREE_REL = 1e-4
SAME_TOOL_REL = 1e-6
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


def run_tool(case: Case, tool: str, lm_python: str | None) -> dict:
    """One child run of ``tool`` on ``case``: its JSON, plus wall time and peak RSS (or a note)."""
    python = lm_python if tool.startswith("lm_eval") else sys.executable
    if python is None:
        return {"note": "lm_eval not installed (make bench-env)"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        rc, wall, peak = run_child(python, [tool, json.dumps(dataclasses.asdict(case)), str(out)])
        if rc != 0:  # keep going: the other tools' figures are still worth having
            return {"wall_s": wall, "peak_rss_gb": peak / 1e9, "note": f"failed (exit {rc})"}
        got = json.loads(out.read_text())
    return {**got, "tokens_per_s": got["scored_tokens"] / got["score_s"], "wall_s": wall, "peak_rss_gb": peak / 1e9, "note": ""}


def run_plan(case: Case, auto_dtype: str) -> tuple[list[str], str | None]:
    """The tools to run for ``case``, and the one that is not run but is ``harness:auto``'s runs.

    ``harness:auto`` resolves to ``auto_dtype`` on this CPU (the precision policy), so the
    harness row of that dtype is the same run, not run twice: bf16 on a CPU with native bf16,
    the float32 reference elsewhere."""
    same = f"harness:{auto_dtype}"
    alias = same if "harness:auto" in case.tools and same in case.tools else None
    return [t for t in case.tools if t != alias], alias


def bench_case(case: Case, lm_python: str | None, repeats: int, auto_dtype: str) -> dict[str, list[dict]]:
    """Every tool of the case, ``repeats`` times, in turn (A B C A B C ...): tool -> its runs."""
    tools, alias = run_plan(case, auto_dtype)
    runs: dict[str, list[dict]] = {t: [] for t in tools}
    skip: set[str] = set()
    for rep in range(repeats):
        for tool in tools:
            if tool in skip or (rep > 0 and tool not in case.timed):
                continue  # the float32 reference (for dPPL) and the memory case run once
            print(f"[{case.name}] {tool} (run {rep + 1} of {repeats if tool in case.timed else 1}) ...", flush=True)
            got = run_tool(case, tool, lm_python)
            runs[tool].append(got)
            if got.get("note"):
                print(f"[{case.name}] {tool}: {got['note']}")
                skip.add(tool)  # a tool that failed or is missing fails the same way again
            elif tool == "harness:auto" and got.get("dtype") != auto_dtype:
                raise SystemExit(f"harness:auto ran in {got.get('dtype')}, not {auto_dtype} as the precision policy says here")
    if alias:
        runs[alias] = runs["harness:auto"]
    return runs


def default_dtype(overrides: list[str], auto: str) -> str:
    """The dtype ``harness:auto`` runs in: ``auto`` resolved here, unless ``--set model.dtype=...`` says otherwise."""
    from harness.config import apply_overrides

    dtype = apply_overrides({"model": {"dtype": "auto"}}, overrides)["model"]["dtype"]
    return auto if dtype == "auto" else dtype


def for_this_cpu(case: Case) -> tuple[Case, list[dict]]:
    """The case as this CPU can run it, and a row for each comparison it cannot.

    Without native bf16 (no AVX-512 BF16, no AMX) bf16 is emulated: SmolLM2's linears ran at
    10 GFLOP/s in bf16 against 67 in float32 on a two-core AVX2 EPYC, so the same-precision (bf16)
    rows would take hours and say nothing a user of this CPU runs (``auto`` is float32 here)."""
    from harness.precision import cpu_bf16_flags

    if cpu_bf16_flags():
        return case, []
    keep = tuple(c for c in case.comparisons if "bfloat16" not in (c.tool + str(c.baseline)))
    rows = [{"case": case.name, "kind": c.kind, "tool": c.tool, "target": "not measured",
             "note": "not run: this CPU has no native bf16 (needs AVX-512 BF16 or AMX; emulated bf16 is slower than float32)"}
            for c in case.comparisons if c not in keep]
    return dataclasses.replace(case, comparisons=keep), rows


def summarize(runs: list[dict]) -> dict:
    """Medians and spread of one tool's runs; the numbers (PPL, counts) must be identical across runs."""
    ok = [r for r in runs if not r.get("note")]
    if not ok:
        return {"note": runs[0]["note"] if runs else "not run"}
    first = ok[0]
    tps = [r["tokens_per_s"] for r in ok]
    out = {k: first.get(k) for k in ("scored_tokens", "sum_nll", "perplexity", "word_perplexity", "dtype", "compile", "window_lengths", "shapes")}
    out.update({
        "runs": len(ok), "tokens_per_s": statistics.median(tps), "tps_min": min(tps), "tps_max": max(tps),
        "score_s": statistics.median(r["score_s"] for r in ok), "load_s": statistics.median(r["load_s"] for r in ok),
        "compile_s": statistics.median(r.get("compile_s") or 0.0 for r in ok) if first.get("compile") else None,
        "wall_s": statistics.median(r["wall_s"] for r in ok), "peak_rss_gb": max(r["peak_rss_gb"] for r in ok), "note": "",
    })
    if all(r.get("gemm_peak") for r in ok):  # the harness and the guide: the peak their own process measured around scoring
        out["gemm_peak"] = statistics.median(r["gemm_peak"] for r in ok)
    # a tool's runs score the same tokens to the same number, up to float32 summation order (a
    # threaded reduction need not add in the same order twice: lm-eval's two float32 runs were not
    # bitwise equal in one `make bench`); anything larger is a real disagreement
    spread = max(abs(r["perplexity"] / first["perplexity"] - 1) for r in ok)
    if spread > SAME_TOOL_REL or any(r["scored_tokens"] != first["scored_tokens"] for r in ok):
        out["note"] = f"runs of the same tool disagree (relative {spread:.1e})"
    return out


def check_agreement(case: Case, a: dict, b: dict) -> str | None:
    """None when two float32 tools scored the same tokens to the same perplexity; else what differs."""
    if a.get("scored_tokens") is None or b.get("scored_tokens") is None:
        return None
    if a["scored_tokens"] != b["scored_tokens"]:
        return f"scored {b['scored_tokens']} tokens against {a['scored_tokens']}"
    keys = ["perplexity"] + (["word_perplexity"] if case.protocol == "lm-eval" else [])
    for k in keys:
        if not math.isclose(a[k], b[k], rel_tol=AGREE_REL):
            return f"{k}: {a[k]!r} against {b[k]!r}"
    return None


def case_rows(case: Case, stats: dict[str, dict], peak: float) -> list[dict]:
    """Table rows: the float32 reference, then each comparison's tool and baseline."""
    ref = stats.get("harness:float32") or next(iter(stats.values()))
    flops = None
    if ref.get("shapes") and ref.get("window_lengths"):
        flops = task_flops(ref["shapes"], ref["window_lengths"], ref["scored_tokens"])

    def row(kind: str, tool: str, s: dict) -> dict:
        r = {"case": case.name, "kind": kind, "tool": tool, **{k: v for k, v in s.items() if k not in ("window_lengths", "shapes", "gemm_peak")}}
        if case.protocol != "lm-eval":
            r.pop("word_perplexity", None)  # the HF loop has no word counts; token PPL is the number
        if "tokens_per_s" in s:
            r["spread"] = f"{s['tps_min']:.1f}..{s['tps_max']:.1f}"
            if flops:
                r["gflop_s"] = flops / s["score_s"] / 1e9
                # against the GEMM peak (timing.peak_dtype) measured in the same process just
                # before and after its scoring (the larger), where the tool reports it; else the
                # run's start peak
                r["peak_fraction"] = flops / s["score_s"] / s.get("gemm_peak", peak)
        if "perplexity" in s and "harness:float32" in stats and tool != "harness:float32":
            r["dppl_pct"] = 100 * (s["perplexity"] / stats["harness:float32"]["perplexity"] - 1)
        return r

    rows = []
    if "harness:float32" in stats:
        rows.append(row("float32 reference", "harness:float32", stats["harness:float32"]))
    for c in case.comparisons:
        mine = row(c.kind, c.tool, stats[c.tool])
        other = row(c.kind, c.baseline, stats[c.baseline]) if c.baseline else None
        if other and other.get("dtype") == "float32" and "harness:float32" in stats:
            problem = check_agreement(case, stats["harness:float32"], stats[c.baseline])
            if problem:
                other["note"] = (other.get("note") or "") + f" DISAGREE with harness:float32: {problem}"
        if other and "tokens_per_s" in mine and "tokens_per_s" in other:
            mine["speedup"] = mine["tokens_per_s"] / other["tokens_per_s"]
        mine["target"] = verdict(case, c, mine)
        rows += [mine] + ([other] if other else [])
    return rows


def verdict(case: Case, c, r: dict) -> str:
    parts = []
    if c.speedup_target and "speedup" in r and r.get("dtype") == "float32" and c.tool == "harness:auto":
        # the speed targets were set where `auto` is bf16; here it is float32 like the baseline
        parts.append(f"n/a: >= {c.speedup_target}x is set for auto in bf16 (a CPU with native bf16)")
    elif c.speedup_target and "speedup" in r:
        parts.append(f"{'met' if r['speedup'] >= c.speedup_target else 'MISSED'} >= {c.speedup_target}x")
    if c.peak_fraction_target and "peak_fraction" in r:
        parts.append(f"{'met' if r['peak_fraction'] >= c.peak_fraction_target else 'MISSED'} >= {c.peak_fraction_target:.0%} of peak")
    if case.memory_limit_gb and "peak_rss_gb" in r:
        parts.append(f"{'met' if r['peak_rss_gb'] <= case.memory_limit_gb else 'MISSED'} <= {case.memory_limit_gb} GB")
    if "dppl_pct" in r:
        parts.append(f"{'met' if abs(r['dppl_pct']) <= 0.1 else 'MISSED'} dPPL within 0.1%")
    return ", ".join(parts)


COLUMNS = ["case", "kind", "tool", "dtype", "runs", "scored_tokens", "tokens_per_s", "spread", "speedup", "gflop_s", "peak_fraction",
           "score_s", "compile_s", "load_s", "wall_s", "peak_rss_gb", "perplexity", "word_perplexity", "dppl_pct", "target", "note"]
HEADERS = {"tokens_per_s": "tok/s (median)", "spread": "tok/s min..max", "speedup": "ratio of medians", "gflop_s": "GFLOP/s",
           "compile_s": "compiling s (in tok/s)", "dppl_pct": "dPPL vs f32", "peak_rss_gb": "peak RSS GB"}


def write_outputs(rows: list[dict], out: Path, header: str, peak_name: str = "bf16") -> str:
    import pandas as pd

    frame = pd.DataFrame(rows).reindex(columns=COLUMNS)
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "bench.csv", index=False)
    fmt = frame.copy()
    for col, spec in {"tokens_per_s": "{:.1f}", "speedup": "{:.2f}x", "gflop_s": "{:.0f}", "peak_fraction": "{:.0%}", "wall_s": "{:.1f}",
                      "load_s": "{:.1f}", "score_s": "{:.1f}", "compile_s": "{:.1f}", "peak_rss_gb": "{:.2f}", "perplexity": "{:.4f}",
                      "word_perplexity": "{:.4f}", "dppl_pct": "{:+.3f}%"}.items():
        fmt[col] = [spec.format(v) if isinstance(v, float) and not math.isnan(v) else "" for v in fmt[col]]
    for col in ("scored_tokens", "runs"):
        fmt[col] = [str(int(v)) if v == v and v is not None else "" for v in frame[col]]
    fmt = fmt.drop(columns=["score_s", "wall_s"])  # in bench.csv; the table keeps to what is compared
    fmt = fmt.astype(object).where(fmt.notna(), "").rename(columns={**HEADERS, "peak_fraction": f"of {peak_name} peak"})
    table = header + "\n\n" + fmt.to_markdown(index=False)
    (out / "bench.md").write_text(table + "\n")
    plot(frame, out / "bench.png")
    return table


def plot(frame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = frame.dropna(subset=["tokens_per_s"]).drop_duplicates(subset=["case", "tool"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, col, label in [(axes[0], "tokens_per_s", "scored tokens / s (median)"), (axes[1], "peak_rss_gb", "peak RSS (GB)")]:
        wide = done.pivot(index="case", columns="tool", values=col).reindex(index=list(dict.fromkeys(done["case"])))
        wide.plot.bar(ax=ax, rot=15)
        ax.set_ylabel(label)
        ax.set_xlabel("")
    axes[1].axhline(3.5, color="red", linestyle="--", linewidth=1, label="3.5 GB target")
    axes[1].legend(fontsize=7)
    axes[0].legend(fontsize=7)
    fig.suptitle("ppl-harness vs HF guide loop and lm-evaluation-harness (CPU, same tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cpu_description() -> str:
    """The CPU's model name, torch's capability level and its native-bf16 instructions: torch says
    AVX512 both on a Xeon with AMX and on an AMD Zen 4 (AVX-512 BF16 only), whose bf16 / float32
    GEMM ratios differ (about 3.5x against 2.1-2.6x), and so do this table's ratios."""
    import torch

    from harness.precision import cpu_bf16_flags

    name = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    name = name or platform.processor() or "CPU"
    flags = ", ".join(cpu_bf16_flags()) or "no native bf16"
    return f"{name} ({torch.backends.cpu.get_cpu_capability()}; {flags})"


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0, help="Multiply every case's token / document slice.")
    ap.add_argument("--only", default=None, help="Run only cases whose name contains this text.")
    ap.add_argument("--repeats", type=int, default=2, help="Runs of every tool, taken in turn (A B A B ...); medians are reported.")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="Harness config override for every harness run, e.g. --set eval.compile=true (repeatable).")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "bench")
    args = ap.parse_args()
    if args.repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cases = [dataclasses.replace(scaled(c, args.scale), overrides=tuple(args.set)) for c in CASES
             if (args.only and args.only in c.name) or (not args.only and c.in_default)]
    lm_python = lm_eval_python()
    for key in dict.fromkeys(c.model for c in cases):  # dequantize each GGUF model once
        rc, wall, _ = run_child(sys.executable, ["prepare", key])
        if rc != 0:
            raise SystemExit(f"preparing {key} failed (exit {rc})")
        rc, wall, _ = run_child(sys.executable, ["compile", key])  # the harness's compiled layers, once per machine
        if rc != 0:
            raise SystemExit(f"compiling {key}'s layers failed (exit {rc})")
    pdt = peak_dtype()  # bf16 where this CPU computes it natively, float32 elsewhere
    pname = str(pdt).removeprefix("torch.")
    peaks = [gemm_peak(pdt)]
    peaks.append(peaks[0] if pdt == torch.float32 else gemm_peak(torch.float32))
    rows = []
    for case in cases:
        case, skipped = for_this_cpu(case)
        stats = {tool: summarize(runs) for tool, runs in bench_case(case, lm_python, args.repeats, default_dtype(args.set, pname)).items()}
        rows += case_rows(case, stats, peaks[0]) + skipped
    peaks.append(gemm_peak(pdt))  # again at the end: was the machine as quiet throughout?
    header = (f"Measured GEMM peak (4096^3 matmul, best of 3): {pname} {peaks[0] / 1e9:.0f} GFLOP/s at the start, "
              f"{peaks[2] / 1e9:.0f} at the end" + ("" if pdt == torch.float32 else f"; float32 {peaks[1] / 1e9:.0f} GFLOP/s") +
              f". The peak is {pname}'s, the dtype `model.dtype: auto` runs in on this CPU. The harness's and the HF guide's "
              f"'of {pname} peak' are against the {pname} peak each run measured in its own process just before and after "
              f"scoring (the larger; median over runs), lm-eval's against the start peak. "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_description()}; "
              f"{args.repeats} runs per tool, in turn." + (f" Harness overrides: {' '.join(args.set)}." if args.set else ""))
    table = write_outputs(rows, args.out, header, pname)
    print(table)
    print(f"written: {args.out / 'bench.csv'}, bench.md, bench.png")
    if any(("DISAGREE" in (r.get("note") or "")) or ("failed" in (r.get("note") or "")) or ("disagree" in (r.get("note") or "")) for r in rows):
        raise SystemExit("a tool failed or perplexities disagree (see the note column)")


if __name__ == "__main__":
    main()
