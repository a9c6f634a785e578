"""One (case, tool) run, in its own process: ``python -m benchmarks.child TOOL CASE_JSON OUT.json``.

Writes the scored token count, the NLL sum, the perplexity, and the seconds spent loading and
scoring. Scoring time covers the scoring loop only (no model load, no corpus reading or
tokenizing) for every tool alike; wall time and peak memory are measured by the parent.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

from .cases import DOC_LEVEL, MODELS, Case, cached_model, prepare


def mirror(dataset: str, config: str = "wikitext-2-raw-v1", split: str = "test") -> Path:
    root = Path(os.environ.get("PPL_CORPUS_MIRROR", Path(__file__).resolve().parents[2] / "shared" / "corpora"))
    return root / dataset / config / f"{split}.parquet"


def harness_overrides(case: Case, dtype: str) -> list[str]:
    """The harness config overrides that run ``case`` on the bench's model folder in ``dtype``."""
    overrides = [
        f"model.name_or_path={cached_model(case.model)}", "model.gguf_file=null", "model.device=cpu", "eval.bootstrap=0",
        f"model.dtype={dtype}",
        f"eval.protocol={case.protocol}", f"eval.max_length={case.max_length}", f"eval.batch_size={case.batch_size}",
    ]
    if case.protocol == "lm-eval":
        overrides += [f"corpus.dataset={DOC_LEVEL}", "corpus.text_field=page", f"corpus.max_documents={case.documents}",
                      "corpus.join=null", "eval.stride=null"]
    else:
        overrides += [f"eval.stride={case.stride}", f"corpus.max_tokens={case.tokens}"]
    return overrides + list(case.overrides)


def run_harness(case: Case, dtype: str) -> dict:
    from harness.config import load_config
    from harness.models import load_model, load_tokenizer
    from harness.runner import run

    from .flops import model_shapes

    cfg = load_config(MODELS[case.model], harness_overrides(case, dtype))
    t0 = time.perf_counter()
    tok = load_tokenizer(cfg.model)
    model = load_model(cfg.model, device="cpu")
    load_s = time.perf_counter() - t0
    # the machine's GEMM peak (in timing.peak_dtype: bf16 where it is native) just before (in a
    # process of its own, which leaves this one's allocator as a user's run finds it) and after
    # scoring (here), the larger: the share of the peak is then taken against what the CPU gave
    # during this very run (the peak read at a bench's start swung from 717 to 1,301 GFLOP/s
    # between two runs). Not in the memory case: its matrices would count in the peak RSS.
    from .timing import gemm_peak, gemm_peak_elsewhere, peak_dtype

    peaks = [] if case.memory_limit_gb else [gemm_peak_elsewhere()]
    res = run(cfg, model=model, tokenizer=tok, write=False, progress=False)
    if peaks:
        peaks.append(gemm_peak(peak_dtype()))
    w = res.windows
    lengths = (w["end"] - w["begin"] + w["prefix"].astype(int)).astype(int).tolist()
    return {"scored_tokens": res.scored_tokens, "sum_nll": res["sum_nll"], "perplexity": res.perplexity,
            "word_perplexity": res["word_perplexity"], "load_s": load_s, "score_s": res["scoring_seconds"],
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "compile": res["precision"]["compile"]["on"],
            "compile_s": res["compile_seconds"],
            "window_lengths": lengths, "shapes": model_shapes(model), "gemm_peak": max(peaks, default=None)}


def run_hf_guide(case: Case, dtype: str) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .hf_loop import hf_guide_nll

    folder = cached_model(case.model)
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype))
    model.eval()
    load_s = time.perf_counter() - t0
    test = load_dataset("parquet", data_files={"test": str(mirror("Salesforce/wikitext"))}, split="test")
    encodings = tokenizer("\n\n".join(test["text"]), return_tensors="pt")
    input_ids = encodings.input_ids[:, : case.tokens]
    from .timing import gemm_peak, gemm_peak_elsewhere, peak_dtype

    peaks = [gemm_peak_elsewhere()]  # as in run_harness
    t1 = time.perf_counter()
    nll, n, _ = hf_guide_nll(model, input_ids, case.max_length, case.stride)
    score_s = time.perf_counter() - t1
    peaks.append(gemm_peak(peak_dtype()))
    return {"scored_tokens": n, "sum_nll": nll, "perplexity": math.exp(nll / n), "load_s": load_s, "score_s": score_s,
            "dtype": dtype, "gemm_peak": max(peaks)}


def run_tool(tool: str, case: Case) -> dict:
    """``tool`` is NAME:DTYPE, e.g. harness:auto, hf-guide:bfloat16, lm_eval:float32."""
    name, _, dtype = tool.partition(":")
    dtype = dtype or "float32"
    if name == "harness":
        return run_harness(case, dtype)
    if name == "hf-guide":
        return run_hf_guide(case, dtype)
    if name == "lm_eval" and dtype == "float32":
        from .lmeval_run import run_lm_eval

        return {**run_lm_eval(case, cached_model(case.model), mirror(DOC_LEVEL)), "dtype": dtype}
    raise SystemExit(f"unknown tool {tool!r}")


def compile_layers(key: str) -> None:
    """Build the harness's compiled-layer packages for KEY's model in bf16 and float32, once per
    machine (``ppl compile`` does the same for a config): the harness's runs then find them, as
    any run after the first does on a user's machine. Models that cannot be packaged say so."""
    from harness import compiled
    from harness.config import load_config
    from harness.models import load_model
    from harness.precision import cpu_bf16_flags

    for dtype in ("bfloat16", "float32"):
        if dtype == "bfloat16" and not cpu_bf16_flags():
            print(f"{key} {dtype}: not compiled, this CPU has no native bf16 (the bench runs no bf16 case here)")
            continue
        cfg = load_config(MODELS[key], [f"model.name_or_path={cached_model(key)}", "model.gguf_file=null", "model.device=cpu",
                                        f"model.dtype={dtype}"])
        model = load_model(cfg.model, device="cpu")
        why = compiled.packable(model)
        if why or compiled.cached(model):
            print(f"{key} {dtype}: {why or 'compiled layers already cached'}")
            continue
        start = time.perf_counter()
        compiled.build_package(model)
        print(f"{key} {dtype}: compiled layers built in {time.perf_counter() - start:.1f} s (once per machine)")


def main(argv: list[str]) -> None:
    if argv[0] == "prepare":
        print(prepare(argv[1]))
        return
    if argv[0] == "compile":
        compile_layers(argv[1])
        return
    tool, case_json, out = argv  # the parent passes the case (resized by --scale) as JSON
    fields = json.loads(case_json)
    fields.update(comparisons=(), overrides=tuple(fields.get("overrides", ())))  # the child needs the slice, not the targets
    Path(out).write_text(json.dumps(run_tool(tool, Case(**fields))))


if __name__ == "__main__":
    main(sys.argv[1:])
